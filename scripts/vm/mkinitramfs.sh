#!/usr/bin/env bash
# Build the harness's initramfs: static busybox, scripts/vm/guest-init.sh as /init, the guest check
# (softdirty-check.c, compiled statically), optionally a static `precopy` binary, and the job list.
#
#   scripts/vm/mkinitramfs.sh --out FILE --jobs FILE [--binary PATH] [--thp MODE] [--thp-defrag MODE]
#                             [--hugepages N] [--extra PATH ...]
#
# --extra PATH: another static executable, installed as /bin/$(basename PATH) (repeatable), e.g. a
# `cargo test --no-run` binary to run the backends' accuracy tests inside the guest.
# --jobs FILE: lines "NAME<TAB>COMMAND", run in order by the guest; the binary is at /bin/precopy.
set -euo pipefail
# shellcheck source=scripts/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out='' jobs='' binary='' thp='' thp_defrag='' hugepages='' extras=()
while (($#)); do
    case $1 in
        --out) out=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --thp) thp=$2; shift 2 ;;
        --thp-defrag) thp_defrag=$2; shift 2 ;;
        --hugepages) hugepages=$2; shift 2 ;;
        --extra) extras+=("$2"); shift 2 ;;
        *) die "mkinitramfs.sh: unknown argument $1" ;;
    esac
done
[[ -n $out && -n $jobs ]] || die "usage: mkinitramfs.sh --out FILE --jobs FILE [--binary PATH] ..."
[[ -r $jobs ]] || die "no job file $jobs"

need_pkgs /bin/busybox:busybox-static cpio:cpio gcc:gcc readelf:binutils strip:binutils gzip:gzip
/bin/busybox --list >/dev/null 2>&1 || die "/bin/busybox does not run"
is_static() { ! readelf -l "$1" 2>/dev/null | grep -q 'program interpreter'; }
is_static /bin/busybox || die "/bin/busybox is dynamically linked: install busybox-static (not busybox)"

stage=$(mktemp -d "${TMPDIR:-/tmp}/precopy-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,usr/bin,usr/sbin}
cp /bin/busybox "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m 0755 "$VM_DIR/guest-init.sh" "$stage/init"
gcc -static -O2 -Wall -o "$stage/bin/softdirty-check" "$VM_DIR/softdirty-check.c"
if [[ -n $binary ]]; then
    [[ -x $binary ]] || die "binary $binary is not an executable file"
    is_static "$binary" || die "binary $binary is dynamically linked; the guest has no libc. Build it with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu"
    # Debug info only makes the initramfs bigger (and slower to unpack under emulation); symbols stay.
    strip --strip-debug -o "$stage/bin/precopy" "$binary" 2>/dev/null || cp "$binary" "$stage/bin/precopy"
    chmod 0755 "$stage/bin/precopy"
fi
for x in "${extras[@]+"${extras[@]}"}"; do
    [[ -x $x ]] || die "extra $x is not an executable file"
    is_static "$x" || die "extra $x is dynamically linked; the guest has no libc (build with +crt-static)"
    strip --strip-debug -o "$stage/bin/$(basename "$x")" "$x" 2>/dev/null || cp "$x" "$stage/bin/"
    chmod 0755 "$stage/bin/$(basename "$x")"
done
cp "$jobs" "$stage/etc/precopy-vm.jobs"
printf 'THP=%q\nTHP_DEFRAG=%q\nHUGEPAGES=%q\n' "$thp" "$thp_defrag" "$hugepages" >"$stage/etc/precopy-vm.conf"
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$out.tmp"
mv "$out.tmp" "$out"
log "initramfs $out ($(du -h "$out" | cut -f1))${binary:+ with $binary}"
