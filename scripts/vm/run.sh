#!/usr/bin/env bash
# Run the `precopy` CLI inside Debian kernels under qemu TCG emulation (this host has no soft-dirty;
# Debian's kernels do). See scripts/vm/README.md.
#
#   scripts/vm/run.sh [--kernel trixie|bookworm|both] [--bench-args "..."] [--out DIR] [--binary PATH]
#                     [--no-bench] [--job NAME=COMMAND ...] [--no-precopy]
#                     [--mem 2G] [--smp 2] [--timeout SECONDS] [--thp always|madvise|never]
#                     [--thp-defrag MODE] [--hugepages N] [--extra STATIC_EXE ...] [--append "KERNEL ARGS"]
#                     [--refresh] [--verbose]
set -euo pipefail
# shellcheck source=scripts/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

# Guest-friendly default: under TCG a 1 GiB sweep takes ~8 min per guest (uffd-sync/mprotect pay ms per
# first write), this ~30 s. Pass --bench-args '' for the bench's own quick sweep.
kernels=both bench_args='--no-files --sizes 64M --fractions 1% --patterns random --thp off --rounds 10' out=$REPO_ROOT/out/vm binary='' no_bench=0 no_precopy=0 refresh=0
custom_jobs=() mk_args=()
export VM_MEM=${VM_MEM:-2G} VM_SMP=${VM_SMP:-2} VM_TIMEOUT=${VM_TIMEOUT:-900} VM_APPEND=${VM_APPEND:-} VM_VERBOSE=${VM_VERBOSE:-0}
while (($#)); do
    case $1 in
        --kernel) kernels=$2; shift 2 ;;
        --bench-args) bench_args=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --no-bench) no_bench=1; shift ;;
        --no-precopy) no_precopy=1; shift ;;
        --job) [[ $2 == *=* ]] || die "--job wants NAME=COMMAND"; custom_jobs+=("$2"); shift 2 ;;
        --mem) VM_MEM=$2; shift 2 ;;
        --smp) VM_SMP=$2; shift 2 ;;
        --timeout) VM_TIMEOUT=$2; shift 2 ;;
        --append) VM_APPEND=$2; shift 2 ;;
        --thp) mk_args+=(--thp "$2"); shift 2 ;;
        --thp-defrag) mk_args+=(--thp-defrag "$2"); shift 2 ;;
        --hugepages) mk_args+=(--hugepages "$2"); shift 2 ;;
        --extra) mk_args+=(--extra "$(realpath "$2")"); shift 2 ;;
        --refresh) refresh=1; shift ;;
        --verbose) VM_VERBOSE=1; shift ;;
        -h|--help) usage 0 ;;
        *) printf 'unknown argument: %s\n\n' "$1" >&2; usage 2 ;;
    esac
done
case $kernels in
    both) suites=(trixie bookworm) ;;
    *,*) IFS=, read -r -a suites <<<"$kernels" ;;
    *) suites=("$kernels") ;;
esac
mkdir -p "$out"; out=$(cd "$out" && pwd)

# ---- the jobs the guest runs, in order. "guest" (kernel facts + soft-dirty self-check) always runs.
jobfile=$VM_CACHE/jobs.txt
mkdir -p "$VM_CACHE"
names=(guest)
printf 'guest\tsoftdirty-check\n' >"$jobfile"
add_job() {
    [[ $1 =~ ^[A-Za-z0-9_.-]+$ ]] || die "job name '$1' must be [A-Za-z0-9_.-]+"
    [[ $2 != *$'\n'* && $2 != *$'\t'* ]] || die "job $1: command must be one line without tabs"
    names+=("$1"); printf '%s\t%s\n' "$1" "$2" >>"$jobfile"
}
if ((${#custom_jobs[@]})); then
    for j in "${custom_jobs[@]}"; do add_job "${j%%=*}" "${j#*=}"; done
elif ((!no_precopy)); then
    add_job probe "precopy probe --json"
    ((no_bench)) || add_job bench "precopy bench --json $bench_args"
    # A migration driven by soft-dirty (the source paused around each collection), verified
    # byte for byte: the driver's fallback where WP_ASYNC is missing (6.1).
    add_job demo-soft-dirty "precopy demo --json --backend soft-dirty --size 64M --dirty-rate 8M --transport unix"
fi

# ---- the binary
if ((no_precopy)); then
    binary=''
elif [[ -z $binary ]]; then
    need_pkgs cargo:cargo
    log "building a static precopy (cargo build --release --target x86_64-unknown-linux-gnu -p precopy-cli, +crt-static)"
    (cd "$REPO_ROOT" && RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        cargo build --release --target x86_64-unknown-linux-gnu -p precopy-cli >&2) || die "cargo build failed"
    binary=$REPO_ROOT/target/x86_64-unknown-linux-gnu/release/precopy
fi
[[ -z $binary ]] || binary=$(realpath "$binary")

# ---- kernels, initramfs, boots
kdirs=() fetch_args=()
((refresh)) && fetch_args=(--refresh)
for s in "${suites[@]}"; do
    kdirs+=("$("$VM_DIR/fetch-kernel.sh" "$s" "${fetch_args[@]+"${fetch_args[@]}"}")") || die "fetching the $s kernel failed"
done
initrd=$VM_CACHE/initramfs.cpio.gz
"$VM_DIR/mkinitramfs.sh" --out "$initrd" --jobs "$jobfile" ${binary:+--binary "$binary"} "${mk_args[@]+"${mk_args[@]}"}"

failed=()
for i in "${!suites[@]}"; do
    s=${suites[$i]}
    "$VM_DIR/boot.sh" "${kdirs[$i]}" "$initrd" "$out/$s" "${names[@]}" || failed+=("$s")
done

# ---- one line per kernel
for s in "${suites[@]}"; do
    sum=$out/$s/summary.json g=$out/$s/guest.json
    [[ -s $sum ]] || continue
    jq -r --slurpfile g <(if [[ -s $g ]] && jq empty "$g" 2>/dev/null; then cat "$g"; else echo '{}'; fi) '
        def show: if . == null then "?" else tostring end;
        "\(.suite): \(.kernel_release) boot+run \(.host_wall_seconds)s, soft-dirty \($g[0].soft_dirty.supported | show), " +
        "uffd WP_ASYNC \($g[0].uffd.wp_async | show), PAGEMAP_SCAN \($g[0].pagemap_scan.supported | show), " +
        "jobs " + ([.jobs | to_entries[] | "\(.key)=rc\(.value.rc)"] | join(" ")) +
        (if (.warnings // [] | length) > 0 then ", warnings: " + (.warnings | join("; ")) else "" end) +
        (if (.errors | length) > 0 then ", ERRORS: " + (.errors | join("; ")) else "" end)' "$sum" >&2
done
if ((${#failed[@]})); then die "guest run failed on: ${failed[*]} (see $out/<kernel>/console.log)"; fi
log "results in $out/{$(IFS=,; echo "${suites[*]}")}/"
