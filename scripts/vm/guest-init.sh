#!/bin/busybox sh
# shellcheck shell=dash
# /init of the VM harness's initramfs (scripts/vm/mkinitramfs.sh copies it in).
#
# Mounts proc/sys/dev, applies the THP/hugetlb knobs from /etc/precopy-vm.conf, runs each job of
# /etc/precopy-vm.jobs ("NAME<TAB>COMMAND" a line) and prints on the serial console:
#   ===PRECOPY-JSON-BEGIN NAME===      the job's stdout
#   ===PRECOPY-JSON-END===
#   ===PRECOPY-STDERR-BEGIN NAME===    the job's stderr (only if any)
#   ===PRECOPY-STDERR-END===
#   ===PRECOPY-RC NAME RC START END=== exit code, guest uptime (s) when it started and ended
# then ===PRECOPY-VM-DONE=== and powers off. scripts/vm/boot.sh parses this.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/hugepages
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null
# Keep kernel messages off the console so they cannot split the JSON lines.
dmesg -n 1

up() { cut -d' ' -f1 /proc/uptime; }
knob() { # knob FILE VALUE: write and report
    if echo "$2" >"$1" 2>/dev/null; then echo "knob $1 = $(cat "$1")"; else echo "knob $1: cannot set '$2'"; fi
}

THP='' THP_DEFRAG='' HUGEPAGES=''
# shellcheck disable=SC1091
[ -r /etc/precopy-vm.conf ] && . /etc/precopy-vm.conf
[ -n "$THP" ] && knob /sys/kernel/mm/transparent_hugepage/enabled "$THP"
[ -n "$THP_DEFRAG" ] && knob /sys/kernel/mm/transparent_hugepage/defrag "$THP_DEFRAG"
[ -n "$HUGEPAGES" ] && knob /proc/sys/vm/nr_hugepages "$HUGEPAGES"

echo "===PRECOPY-VM-UP $(uname -r) uptime=$(up)==="
tab=$(printf '\t')
while IFS="$tab" read -r name cmd; do
    [ -n "$name" ] || continue
    case $name in \#*) continue ;; esac
    t0=$(up)
    sh -c "$cmd" </dev/null >"/tmp/job.out" 2>"/tmp/job.err"
    rc=$?
    t1=$(up)
    echo "===PRECOPY-JSON-BEGIN $name==="
    awk 1 /tmp/job.out
    echo "===PRECOPY-JSON-END==="
    if [ -s /tmp/job.err ]; then
        echo "===PRECOPY-STDERR-BEGIN $name==="
        awk 1 /tmp/job.err
        echo "===PRECOPY-STDERR-END==="
    fi
    echo "===PRECOPY-RC $name $rc $t0 $t1==="
done </etc/precopy-vm.jobs
echo "===PRECOPY-VM-DONE uptime=$(up)==="
sync
poweroff -f
echo o >/proc/sysrq-trigger
sleep 5
