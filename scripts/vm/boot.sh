#!/usr/bin/env bash
# Boot a kernel with an initramfs built by mkinitramfs.sh under qemu TCG, capture the serial console
# and extract the guest's job outputs.
#
#   scripts/vm/boot.sh KERNEL_DIR INITRD OUT_DIR [JOB_NAME ...]
#
# KERNEL_DIR is what fetch-kernel.sh printed. Writes OUT_DIR/console.log, OUT_DIR/NAME.json (a job's
# stdout), OUT_DIR/NAME.stderr (if any) and OUT_DIR/summary.json. Exits non-zero if the guest did not
# finish, if a named job produced no output, exited non-zero, or printed something that is not JSON.
# Environment: VM_MEM (2G), VM_SMP (2), VM_TIMEOUT (seconds, 900), VM_APPEND (extra kernel
# arguments), VM_VERBOSE=1 (stream the console to stderr), VM_BZIMAGE=1 (boot vmlinuz, not vmlinux).
set -euo pipefail
# shellcheck source=scripts/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kdir=${1:?usage: boot.sh KERNEL_DIR INITRD OUT_DIR [JOB_NAME ...]}
initrd=${2:?initrd}
out=${3:?out dir}
shift 3
expect=("$@")
mem=${VM_MEM:-2G} smp=${VM_SMP:-2} tmo=${VM_TIMEOUT:-900}

need_pkgs qemu-system-x86_64:qemu-system-x86 jq:jq timeout:coreutils
[[ -s $kdir/vmlinuz && -s $kdir/kernel.env ]] || die "$kdir has no vmlinuz/kernel.env (run fetch-kernel.sh)"
# shellcheck source=/dev/null
. "$kdir/kernel.env"
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.stderr "$out/console.log"
log="$out/console.log"
# The uncompressed PVH vmlinux boots ~2-3x faster under TCG than the bzImage (see fetch-kernel.sh).
kernel=$kdir/vmlinuz
[[ ${VM_BZIMAGE:-0} != 1 && -s $kdir/vmlinux ]] && kernel=$kdir/vmlinux

# TCG, not KVM: the host's KVM cannot boot a stock kernel. No NIC, no VGA: nothing the guest needs,
# and no option ROMs to look for. The console is the first serial port, written to a file.
qemu=(qemu-system-x86_64 -accel tcg -cpu max -m "$mem" -smp "$smp" -nographic -no-reboot
      -monitor none -serial "file:$log" -nic none -vga none
      -kernel "$kernel" -initrd "$initrd"
      -append "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init ${VM_APPEND:-}")
log "$SUITE: booting $RELEASE from ${kernel##*/} (mem $mem, smp $smp, timeout ${tmo}s)"
tailpid=''
if [[ ${VM_VERBOSE:-0} == 1 ]]; then
    : >"$log"; tail -n +1 -F "$log" >&2 2>/dev/null & tailpid=$!
fi
t0=$(date +%s.%N)
set +e
timeout -k 10 "$tmo" "${qemu[@]}" </dev/null >"$out/qemu.stdout" 2>"$out/qemu.stderr"
qrc=$?
set -e
t1=$(date +%s.%N)
[[ -n $tailpid ]] && { sleep 0.5; kill "$tailpid" 2>/dev/null || true; wait "$tailpid" 2>/dev/null || true; }
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
log "$SUITE: qemu exited $qrc after ${wall}s"

# Extract the marked blocks. Markers are matched anywhere in a line, in case a stray kernel message
# lands in front of one; carriage returns added by the serial line are dropped.
tr -d '\r' <"$log" | awk -v dir="$out" '
    function tag(s, m) { s = substr($0, index($0, m) + length(m)); sub(/===.*/, "", s); return s }
    index($0, "===PRECOPY-JSON-BEGIN ")   { f = dir "/" tag($0, "===PRECOPY-JSON-BEGIN ") ".json"; printf "" > f; next }
    index($0, "===PRECOPY-STDERR-BEGIN ") { f = dir "/" tag($0, "===PRECOPY-STDERR-BEGIN ") ".stderr"; printf "" > f; next }
    index($0, "===PRECOPY-JSON-END===") || index($0, "===PRECOPY-STDERR-END===") { if (f != "") close(f); f = ""; next }
    f != "" { print > f }
    index($0, "===PRECOPY-RC ") { print tag($0, "===PRECOPY-RC ") > (dir "/rc.txt") }
    index($0, "===PRECOPY-VM-UP ") { print "up " tag($0, "===PRECOPY-VM-UP ") > (dir "/rc.txt") }
    index($0, "===PRECOPY-VM-DONE ") { print "done " tag($0, "===PRECOPY-VM-DONE ") > (dir "/rc.txt") }'
touch "$out/rc.txt"

fail=() warn=()
((qrc == 0)) || fail+=("qemu exit status $qrc$( ((qrc == 124)) && echo " (timeout after ${tmo}s)")")
grep -q '^done ' "$out/rc.txt" || fail+=("the guest did not finish its jobs (no ===PRECOPY-VM-DONE===)")
jobs_json='{}'
while read -r name rc s e; do
    [[ $name == up || $name == "done" ]] && continue
    jobs_json=$(jq -c --arg n "$name" --argjson rc "$rc" --argjson s "$s" --argjson e "$e" \
        '. + {($n): {rc: $rc, guest_start_s: $s, guest_seconds: (($e - $s) * 100 | round / 100)}}' <<<"$jobs_json")
done <"$out/rc.txt"
for name in "${expect[@]}"; do
    rc=$(jq -r --arg n "$name" '.[$n].rc // empty' <<<"$jobs_json")
    if [[ -z $rc ]]; then fail+=("job $name: no output block"); continue; fi
    # A non-zero exit with valid JSON is a result (e.g. `probe` on a kernel the engine cannot use):
    # reported, not fatal. No JSON at all is fatal.
    if [[ ! -s $out/$name.json ]]; then fail+=("job $name: empty stdout (exit status $rc, stderr in $out/$name.stderr if any)")
    elif ! jq empty "$out/$name.json" 2>/dev/null; then fail+=("job $name: stdout is not JSON (exit status $rc)")
    elif [[ $rc != 0 ]]; then
        m="job $name: exit status $rc with JSON output"
        [[ -s $out/$name.stderr ]] && m+=" (stderr: $out/$name.stderr)"
        warn+=("$m")
    fi
done
guest_up=$(awk '$1 == "up" { sub(/.*uptime=/, ""); print; exit }' "$out/rc.txt")
jq -n --arg suite "$SUITE" --arg package "$PACKAGE" --arg version "$VERSION" --arg release "$RELEASE" \
    --arg mem "$mem" --argjson smp "$smp" --argjson wall "$wall" --argjson qrc "$qrc" \
    --arg kfile "${kernel##*/}" --arg guest_up "${guest_up:-}" --argjson jobs "$jobs_json" \
    --arg errors "$(printf '%s\n' "${fail[@]+"${fail[@]}"}")" \
    --arg warnings "$(printf '%s\n' "${warn[@]+"${warn[@]}"}")" \
    '{suite: $suite, kernel_package: $package, kernel_version: $version, kernel_release: $release,
      qemu: {accel: "tcg", cpu: "max", mem: $mem, smp: $smp, kernel_file: $kfile, exit: $qrc},
      host_wall_seconds: $wall, guest_uptime_at_init_s: ($guest_up | tonumber? // null),
      jobs: $jobs, warnings: ($warnings | split("\n") | map(select(. != ""))), errors: ($errors | split("\n") | map(select(. != "")))}' >"$out/summary.json"

for m in "${warn[@]+"${warn[@]}"}"; do printf '[vm] warning: %s: %s\n' "$SUITE" "$m" >&2; done
if ((${#fail[@]})); then
    for m in "${fail[@]}"; do printf '[vm] ERROR: %s: %s\n' "$SUITE" "$m" >&2; done
    printf '[vm] last console lines (%s):\n' "$log" >&2
    tr -d '\r' <"$log" | tail -n 25 | sed 's/^/    /' >&2
    [[ -s $out/qemu.stderr ]] && sed 's/^/    qemu: /' "$out/qemu.stderr" >&2
    exit 1
fi
log "$SUITE: ok: ${expect[*]:-no jobs checked} -> $out"
