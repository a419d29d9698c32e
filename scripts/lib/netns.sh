# Sourced by scripts/netns-demo.sh and scripts/bench-netns.sh: two network namespaces joined by a
# veth pair, both directions shaped with tc tbf (this kernel has no netem). Needs root and iproute2.
#
#   netns_up RATE     creates precopy-src (10.77.0.1) and precopy-dst (10.77.0.2); removes them on exit
SRC=precopy-src
DST=precopy-dst

netns_down() {
    ip netns del "$SRC" 2>/dev/null || true
    ip netns del "$DST" 2>/dev/null || true
}

netns_up() {
    trap netns_down EXIT INT TERM
    netns_down
    ip netns add "$SRC"
    ip netns add "$DST"
    ip link add veth-src netns "$SRC" type veth peer name veth-dst netns "$DST"
    ip -n "$SRC" addr add 10.77.0.1/24 dev veth-src
    ip -n "$DST" addr add 10.77.0.2/24 dev veth-dst
    for ns in "$SRC" "$DST"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$SRC" link set veth-src up
    ip -n "$DST" link set veth-dst up
    # Token bucket on both directions: the rate, a 256 KiB burst.
    tc -n "$SRC" qdisc add dev veth-src root tbf rate "$1" burst 256kb latency 50ms
    tc -n "$DST" qdisc add dev veth-dst root tbf rate "$1" burst 256kb latency 50ms
    echo "veth pair 10.77.0.1 <-> 10.77.0.2 shaped to $1" >&2
}
