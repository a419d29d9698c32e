#!/bin/sh
# 20 runs of the downtime table (BENCHMARKS.md) with one CPU hog pinned to core 0 for the whole batch.
# Usage: run.sh BINARY OUTDIR [RUNS]   then: python3 table.py OUTDIR
set -u
B=$(readlink -f "$1")
OUT=$2
N=${3:-20}
mkdir -p "$OUT"
cd "$OUT" || exit 1
: > runs.txt
taskset -c 0 sh -c 'while :; do :; done' &
HOG=$!
trap 'kill $HOG 2>/dev/null' EXIT INT TERM
for i in $(seq 1 "$N"); do
  echo "$i $(date -u +%H:%M:%S) $(cut -d' ' -f1 /proc/loadavg)" >> runs.txt
  "$B" demo --size 2G --dirty-rate 100M --pattern hot-set --max-downtime 50 --json > "run$i.json" 2> "run$i.err"
  echo "rc $?" >> runs.txt
done
