#!/bin/bash
# A resume whose connection breaks again before the destination sent RESUME.
#
# Runs `precopy demo` over TCP with reconnects allowed and kills its connections twice with
# `ss -K`, GAP seconds apart (default: a sweep of 50-75 ms, where the second cut tends to land
# in the first resume's handshake). Before the receiver waited for another attempt, the
# destination ended ("sending RESUME failed") and the source used up its attempts on
# "Connection refused": on 2026-11-30 5 of 6 gaps failed that way; since, every run verifies.
#
# usage: scripts/repro/resume-cut-twice.sh [PRECOPY_BINARY]   (root: ss -K needs CAP_NET_ADMIN)
set -u
B=${1:-target/release/precopy}
OUT=$(mktemp -d)
fails=0
for gap in ${GAP:-0.05 0.055 0.06 0.065 0.07 0.075}; do
    "$B" demo --size 256M --dirty-rate 64M --bandwidth 64M --reconnect-attempts 20 \
        --reconnect-backoff 50 --json >"$OUT/run.json" 2>"$OUT/run.err" &
    demo=$!
    sleep 1.5
    dest=$(pgrep -P "$demo" -f __demo-dest | head -1)
    port=$(ss -tlnp | grep "pid=$dest," | awk '{print $4}' | sed 's/.*://' | head -1)
    ss -K "( sport = :$port )" >/dev/null 2>&1
    sleep "$gap"
    ss -K "( sport = :$port )" >/dev/null 2>&1
    wait "$demo"
    rc=$?
    [ "$rc" = 0 ] || fails=$((fails + 1))
    python3 -c 'import json,sys
v = json.load(open(sys.argv[1])); m = v.get("migration") or {}
print("gap", sys.argv[2], "rc", sys.argv[3], "verified", v["verified"], "reconnects", m.get("reconnects"),
      ((v["error"] or {}).get("message") or "")[:160])' "$OUT/run.json" "$gap" "$rc"
done
rm -rf "$OUT"
echo "$fails failed"
[ "$fails" = 0 ]
