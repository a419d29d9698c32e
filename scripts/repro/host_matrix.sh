#!/bin/sh
# Runs wp_async_stress RUNS times in each of 4 configurations on this machine: unpinned and
# pinned to CPU 0 (taskset -c 0), each without and with -c (forced full TLB flush per round).
# Usage: scripts/repro/host_matrix.sh [RUNS [ARGS...]]   (ARGS go to wp_async_stress)
# Prints one JSON line per run to stdout; each run's stderr goes to $OUT/NAME.stderr.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-5}
[ $# -gt 0 ] && shift
OUT=${OUT:-/tmp/repro/host}
mkdir -p "$OUT"
bin=$OUT/wp_async_stress
gcc -O2 -Wall -pthread -o "$bin" "$here/wp_async_stress.c"
i=0
while [ "$i" -lt "$runs" ]; do
  i=$((i + 1))
  for pin in no yes; do
    for flush in no yes; do
      name=pin-$pin-flush-$flush-$i
      pre=""; [ "$pin" = yes ] && pre="taskset -c 0"
      c=""; [ "$flush" = yes ] && c="-c"
      rc=0
      json=$($pre "$bin" $c "$@" 2>"$OUT/$name.stderr") || rc=$?
      echo "{\"run\":\"$name\",\"pinned\":\"$pin\",\"flush\":\"$flush\",\"rc\":$rc,\"result\":${json:-null}}"
    done
  done
done
