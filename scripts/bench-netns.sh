#!/bin/sh
# Runs the transfer stream bench (crates/transfer/benches/stream.rs) across a rate-limited veth pair
# between two network namespaces instead of loopback: engine against a raw socket copy when the
# link, not the CPU, is the limit.
#
#   scripts/bench-netns.sh [--rate 4gbit] [--mib 512]
#
# The bench runs in precopy-src (10.77.0.1); its receivers listen in precopy-dst (10.77.0.2), with a
# shared key because that is not loopback. Needs root and iproute2; builds the bench first.
set -eu

RATE=4gbit
MIB=512
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE=$2; shift 2 ;;
        --mib) MIB=$2; shift 2 ;;
        *) echo "usage: $0 [--rate RATE] [--mib MIB]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
cargo bench -p precopy-transfer --bench stream --no-run
. scripts/lib/netns.sh
netns_up "$RATE"
ip netns exec "$SRC" env PRECOPY_BENCH_NETNS="$DST:10.77.0.2" PRECOPY_BENCH_MIB="$MIB" \
    cargo bench --offline -p precopy-transfer --bench stream
