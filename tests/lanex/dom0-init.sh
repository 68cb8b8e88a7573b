#!/bin/sh
# /init of lane X's dom0 (Debian root fs in an initramfs, under Xen 4.17 in a TCG VM).
# The xencommons equivalent: mounts, Xen modules, xenfs, xenstored, xen-init-dom0, xenconsoled;
# then runs /lanex/scenario.sh with a hard time limit and powers the machine off.
# Console protocol (dom0's hvc0, which Xen copies to the outer serial port):
#   LANEX-BOOT <uptime>                 init started
#   LANEX-TOOLSTACK ok|failed <uptime> [what]
#   LANEX-INFO <key> <value>            xl info fields (virt_caps, xen_version, ...)
#   LANEX-START <scenario> <uptime>
#   LANEX-LOG <scenario> <stream> <line>  (written by scenario.sh)
#   LANEX-MEASURE <scenario> key=value ... (scenario.sh: times, marker, domain gone)
#   LANEX-RESULT <scenario> exit=<rc> timeout=<0|1> wall=<s>
#   LANEX-ALL-DONE <uptime>
# Kernel command line: lanex.timeout=SECS (scenario limit, default 600; a scenario's own
# SCENARIO_TIMEOUT wins), lanex.debug=1.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
XENBIN=/usr/lib/xen-4.17/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/xen /run/xenstored /var/log/xen /var/lib/xen /var/run
[ -L /var/run ] || mount --bind /run /var/run 2>/dev/null

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "$*" > /dev/console; }
say "LANEX-BOOT $(up)"

TIMEOUT=600
DEBUG=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lanex.timeout=*) TIMEOUT=${arg#*=} ;;
        lanex.debug=*) DEBUG=${arg#*=} ;;
    esac
done

finish() {
    [ "$DEBUG" = 1 ] && dmesg | sed 's/^/LANEX-DMESG /' > /dev/console
    say "LANEX-ALL-DONE $(up)"
    sync
    busybox poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

toolstack_failed() {
    say "LANEX-TOOLSTACK failed $(up) $*"
    dmesg | tail -n 40 | sed 's/^/LANEX-DMESG /' > /dev/console
    finish
}

for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback tun bridge loop; do
    modprobe "$m" 2>/dev/null || say "LANEX-MODPROBE-FAILED $m"
done
dmesg -n 1
mount -t xenfs xenfs /proc/xen || toolstack_failed "mount xenfs"
[ -e /proc/xen/capabilities ] && grep -q control_d /proc/xen/capabilities || toolstack_failed "not dom0 (/proc/xen/capabilities)"

"$XENBIN/xenstored" --pid-file /run/xenstored.pid > /var/log/xen/xenstored.out 2>&1 || toolstack_failed "xenstored exit $?"
i=0
while [ ! -S /run/xenstored/socket ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -S /run/xenstored/socket ] || toolstack_failed "no /run/xenstored/socket"
timeout 60 "$XENBIN/xen-init-dom0" > /var/log/xen/xen-init-dom0.log 2>&1 || toolstack_failed "xen-init-dom0: $(tail -n 3 /var/log/xen/xen-init-dom0.log | tr '\n' ' ')"
"$XENBIN/xenconsoled" --pid-file=/run/xenconsoled.pid --log=all --log-dir=/var/log/xen || toolstack_failed "xenconsoled exit $?"
# The shared pseudo-user libxl runs a restricted device model as (dm_restrict=1,
# docs/features/qemu-deprivilege.pandoc); Debian's xen-utils do not create it.
if ! grep -q '^xen-qemuuser-shared:' /etc/passwd; then
    echo 'xen-qemuuser-shared:x:980:980:Xen device model:/nonexistent:/usr/sbin/nologin' >> /etc/passwd
    echo 'xen-qemuuser-shared:x:980:' >> /etc/group
fi
say "LANEX-TOOLSTACK ok $(up)"
timeout 60 "$XENBIN/xl" info > /tmp/xlinfo 2>&1
for k in xen_version virt_caps total_memory free_memory nr_cpus xen_commandline; do
    say "LANEX-INFO $k $(awk -F': ' -v k="$k" '$1 ~ "^" k " *$" { print $2; exit }' /tmp/xlinfo)"
done

# Before a timed-out scenario is killed: where every process, and every device-model thread,
# is blocked in the kernel (a stuck scenario has been seen once, with maxvcpus=2).
timeout_dump() {
    # Only files that never take the target's mm lock (wchan, stack, stat; not cmdline or status),
    # so a device model stuck in the kernel cannot stall the dump itself.
    # Device models by comm (pgrep -f would read cmdline, which takes the mm lock).
    for d in /proc/[0-9]*; do
        case "$(cat "$d/comm" 2>/dev/null)" in hvmdm | qemu-system-i38) ;; *) continue ;; esac
        p=${d#/proc/}
        for t in "$d"/task/*; do
            echo "pid $p tid ${t##*/} $(cat "$t/comm" 2>/dev/null) state=$(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null)"
            cat "$t/stack" 2>/dev/null
        done
    done | sed "s/^/LANEX-LOG $1 dm-stacks /" > /dev/console
    # The scenario's own processes (its session): what each waits on in the kernel.
    for d in /proc/[0-9]*; do
        [ "$(cut -d' ' -f6 "$d/stat" 2>/dev/null)" = "$2" ] || continue
        echo "pid ${d#/proc/} $(cat "$d/comm" 2>/dev/null) state=$(cut -d' ' -f3 "$d/stat" 2>/dev/null) wchan=$(cat "$d/wchan" 2>/dev/null)"
        cat "$d/stack" 2>/dev/null | head -n 12
    done | sed "s/^/LANEX-LOG $1 scenario-procs /" > /dev/console
    ps -eo pid,ppid,stat,wchan:24,etime,comm 2>&1 | awk '$2 != 2 && $1 != 2' | head -n 100 |
        sed "s/^/LANEX-LOG $1 ps-at-timeout /" > /dev/console
}

for f in /lanex/scenarios/*.sh; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .sh)
    dir=/tmp/run/$name
    mkdir -p "$dir"
    limit=$(. "$f" > /dev/null 2>&1; echo "${SCENARIO_TIMEOUT:-}")
    case "$limit" in ''|*[!0-9]*) limit=$TIMEOUT ;; esac
    say "LANEX-START $name $(up)"
    t0=$(up)
    # Own session so the time limit takes the scenario's children (xl, cat, ...) with it.
    setsid sh /lanex/scenario.sh "$f" "$dir" < /dev/null > /dev/console 2> "$dir/stderr" &
    pid=$!
    ( sleep "$limit"; touch "$dir/timedout"; timeout_dump "$name" "$pid"; kill -KILL -"$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null ) &
    wd=$!
    wait "$pid"
    rc=$?
    kill "$wd" 2>/dev/null
    to=0; [ -e "$dir/timedout" ] && to=1
    tr -d '\r' < "$dir/stderr" | sed "s/^/LANEX-LOG $name script /" > /dev/console
    # A timed-out scenario may have left its domain behind: show what is left, then destroy it.
    if [ "$to" = 1 ]; then
        timeout 30 "$XENBIN/xl" list 2>&1 | sed "s/^/LANEX-LOG $name xl-list-after-timeout /" > /dev/console
        for l in /var/log/xen/*; do
            [ -f "$l" ] || continue
            tail -n 40 "$l" | tr -d '\r' | sed "s|^|LANEX-LOG $name $(basename "$l") |" > /dev/console
        done
        timeout 30 "$XENBIN/xl" dmesg 2>&1 | tail -n 60 | sed "s/^/LANEX-LOG $name xl-dmesg /" > /dev/console
        # What the guest printed (timeout_dump showed what was blocked where).
        [ -f "$dir/serial.log" ] && tail -n 80 "$dir/serial.log" | tr -d '\r' |
            sed "s/^/LANEX-LOG $name serial /" > /dev/console
    fi
    say "LANEX-RESULT $name exit=$rc timeout=$to wall=$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')"
done
finish
