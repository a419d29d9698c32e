#!/bin/sh
# One demo run under perf (scheduler and signal tracepoints), one CPU hog pinned to core 0.
# Usage: perf-run.sh BINARY OUT   -> OUT.data, OUT.json, OUT.err
# The final phase starts at the driver's last SIGSTOP (sig=19) to the source:
#   perf script -i OUT.data -F time,comm,pid,tid,event,trace | grep 'sig=19'
# then: perf sched timehist -i OUT.data -w --time START,START+0.05
set -u
B=$(readlink -f "$1"); OUT=$2
taskset -c 0 sh -c 'while :; do :; done' &
HOG=$!
trap 'kill $HOG 2>/dev/null' EXIT INT TERM
perf record -q -a -o "$OUT.data" -e sched:sched_switch -e sched:sched_wakeup -e sched:sched_waking \
  -e sched:sched_wakeup_new -e sched:sched_process_exit -e sched:sched_migrate_task -e signal:signal_generate -- \
  "$B" demo --size 2G --dirty-rate 100M --pattern hot-set --max-downtime 50 --json > "$OUT.json" 2> "$OUT.err"
