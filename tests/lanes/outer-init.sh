#!/bin/sh
# /init of the lane-K outer VM (runs under TCG with emulated SVM). Loads kvm_amd,
# runs each scenario listed in /lanek/list with its own time limit, and prints
# machine-readable lines on the console for run-lane-k.sh:
#   LANEK-BOOT <uptime>                   init started
#   LANEK-KVM ok|missing <uptime>         /dev/kvm after loading kvm_amd
#   LANEK-START <name> <uptime>
#   LANEK-LOG <name> <stream> <line>      stream: serial (L2 console), vmm (VMM stderr), fw (firmware log),
#                                         host (run-one.sh's image checksums after the VMM exited)
#   LANEK-RESULT <name> exit=<rc> timeout=<0|1> wall=<s>
#   LANEK-ALL-DONE <uptime>
# Kernel command line: lanek.kvm_amd="param=value ..." (module parameters),
# lanek.debug=1 (print the outer dmesg at the end).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "$*" > /dev/console; }
say "LANEK-BOOT $(up)"

KVM_AMD_PARAMS=
DEBUG=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lanek.kvm_amd=*) KVM_AMD_PARAMS=$(echo "${arg#*=}" | tr ',' ' ') ;;
        lanek.debug=*) DEBUG=${arg#*=} ;;
    esac
done

while read -r m; do
    [ -n "$m" ] || continue
    case "$m" in
        */kvm-amd.ko) insmod "$m" $KVM_AMD_PARAMS ;;
        *) insmod "$m" ;;
    esac || say "LANEK-INSMOD-FAILED $m"
done < /etc/modules.load
dmesg -n 1

if [ -c /dev/kvm ]; then
    say "LANEK-KVM ok $(up)"
else
    say "LANEK-KVM missing $(up)"
    dmesg | grep -iE 'kvm|svm' | sed 's/^/LANEK-DMESG /' > /dev/console
fi

# Placeholders a scenario's scenario_cmd may use (see scenarios/README).
export VMM_QEMU=/usr/bin/qemu-system-x86_64
export VMM_HVMDM=/lanek/bin/hvmdm
export KERNEL=/kit/vmlinuz
export INITRD=/kit/initrd.cpio.gz
export SEABIOS=/usr/share/seabios/bios-256k.bin
export OVMF=/usr/share/ovmf/OVMF.fd
export OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
export GUEST_APPEND_BASE="console=ttyS0 panic=-1"

for name in $(cat /lanek/list 2>/dev/null); do
    f=/lanek/scenarios/$name.sh
    dir=/tmp/run/$name
    mkdir -p "$dir"
    T=$(sed -n 's/^SCENARIO_TIMEOUT=\([0-9]*\).*/\1/p' "$f" | tail -1)
    T=${T:-300}
    say "LANEK-START $name $(up)"
    t0=$(up)
    # Own session + process group so the time limit kills the VMM and its children.
    setsid sh /lanek/run-one.sh "$f" "$dir" < /dev/null > "$dir/serial.log" 2> "$dir/vmm.log" &
    pid=$!
    ( sleep "$T"; touch "$dir/timedout"; kill -KILL -"$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null ) &
    wd=$!
    wait "$pid"
    rc=$?
    kill "$wd" 2>/dev/null
    t1=$(up)
    to=0; [ -e "$dir/timedout" ] && to=1
    for s in serial vmm fw host; do
        [ -f "$dir/$s.log" ] || continue
        tr -d '\r' < "$dir/$s.log" | sed "s/^/LANEK-LOG $name $s /" > /dev/console
    done
    say "LANEK-RESULT $name exit=$rc timeout=$to wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
    rm -f "$dir"/*.img "$dir"/*.qcow2 "$dir"/*.fd
done

if [ "$DEBUG" = 1 ]; then
    dmesg | sed 's/^/LANEK-DMESG /' > /dev/console
fi
say "LANEK-ALL-DONE $(up)"
sync
poweroff -f
