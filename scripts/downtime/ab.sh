#!/bin/sh
# A/B: alternate two binaries run by run, one CPU hog pinned to core 0 for the whole batch.
# Usage: ab.sh BINARY_A BINARY_B OUTDIR [PAIRS]  -> OUTDIR/a and OUTDIR/b, each readable by table.py
set -u
A=$(readlink -f "$1"); B=$(readlink -f "$2"); OUT=$3; N=${4:-10}
mkdir -p "$OUT/a" "$OUT/b"
: > "$OUT/a/runs.txt"; : > "$OUT/b/runs.txt"
taskset -c 0 sh -c 'while :; do :; done' &
HOG=$!
trap 'kill $HOG 2>/dev/null' EXIT INT TERM
for i in $(seq 1 "$N"); do
  for side in a b; do
    if [ $side = a ]; then BIN=$A; else BIN=$B; fi
    echo "$i $(date -u +%H:%M:%S) $(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/$side/runs.txt"
    "$BIN" demo --size 2G --dirty-rate 100M --pattern hot-set --max-downtime 50 --json > "$OUT/$side/run$i.json" 2> "$OUT/$side/run$i.err"
    echo "rc $?" >> "$OUT/$side/runs.txt"
  done
done
