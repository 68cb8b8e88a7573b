#!/bin/sh
# /init of the L2 guest kit (busybox initramfs). Prints HVMDM-* marker lines on the
# serial console and powers off. Scenario knobs come from the kernel command line:
#   hvmdm.check=LIST   comma list of acpi,pci,block,errors,disk (default: all)
#   hvmdm.disk=DEV     block device to checksum (default: sda)
#   hvmdm.diskmib=N    checksum the first N MiB (default: 16; 0 = whole device)
#   hvmdm.wait=SECS    how long to wait for the disk to appear (default: 20)
#   hvmdm.modules=LIST comma list of extra module names to insmod (must be in the kit)
#   hvmdm.end=poweroff|reboot|shell (default: poweroff)
#   hvmdm.reboot=1     reboot once in-process first: when the last sector of hvmdm.disk does not
#                      hold the reboot mark, write it (fsync, re-read past the page cache), print
#                      HVMDM-REBOOTING and `reboot -f`; when it does, print HVMDM-REBOOTED and go
#                      on with the checks. The mark lives in the last MiB, so pair this knob with
#                      hvmdm.diskmib=15 to checksum only the untouched region.
#   hvmdm.beat=SECS    (lane X operations) after HVMDM-DONE stay up instead of hvmdm.end and print
#                      `HVMDM-BEAT <n> <uptime> <boot_id>` every SECS; the PV control path's
#                      /sbin/poweroff (SIGUSR2 to init) and /sbin/reboot (SIGTERM) are honoured
#                      with HVMDM-PV-POWEROFF / HVMDM-PV-REBOOT and poweroff -f / reboot -f.
#   hvmdm.storage=LIST lane K storage checks (boot media of build-boot-media.sh): comma list of
#                      ROLE:MIB[:w|:ro]. A disk (sd*) of exactly MIB MiB gets ROLE (found by size, not
#                      by name); every CD (sr*) gets role cd. Waits up to hvmdm.wait for all the
#                      disk roles, then per device: HVMDM-STORAGE-DEV role dev bytes model qd= ncq=;
#                      HVMDM-STORAGE-READ role dev bytes sha256 (O_DIRECT read of the whole device);
#                      :w roles: HVMDM-STORAGE-WRITE role dev off len sha rc readback -- a 1 MiB guest
#                      pattern written O_DIRECT + fsync at size/2 - 512 KiB, then read back O_DIRECT
#                      (the host checksums that region of the image after poweroff: run-one.sh);
#                      :ro roles: HVMDM-STORAGE-RO role dev rc err after -- an O_DIRECT write that
#                      must fail, and the device's checksum afterwards.
#   hvmdm.iobench=MIB[:SECS]  (benches/storage.sh; needs the kit built with LANEK_GUEST_TOOLS=1) on
#                      the disk of MIB MiB run /bin/io-rate: seqread and seqwrite (1 MiB O_DIRECT
#                      requests), randread (4 KiB, 1 and 8 threads), SECS each (default 5); prints
#                      its HVMDM-IORATE lines.
#   hvmdm.powerbtn=1   with hvmdm.beat: watch the ACPI fixed power-button event counter
#                      (/sys/firmware/acpi/interrupts/ff_pwr_btn, enabled by the `button` module:
#                      add hvmdm.modules=button) and on a press print HVMDM-POWERBTN, poweroff -f.
#   hvmdm.cpuhp=1      with hvmdm.beat: online every hot-added CPU (ACPI CPU hotplug, `xl vcpu-set`)
#                      and print HVMDM-CPU-ONLINE <cpuN> <its online flag> <online CPU list>.
#   hvmdm.nmireboot=1  with hvmdm.beat: on an NMI (`xl trigger nmi`) print HVMDM-NMI-REBOOT and
#                      reboot -f (the kernel resets through the reset register / i8042).
#   hvmdm.slpbtn=1     with hvmdm.beat: on an ACPI fixed sleep-button event (`xl trigger sleep`)
#                      print HVMDM-S3-ENTER, suspend to RAM (echo mem > /sys/power/state), then
#                      print HVMDM-S3-RESUMED (or HVMDM-S3-FAILED if the kernel refused).
#   hvmdm.cdwatch=1    with hvmdm.beat: each beat read the first 32 KiB of /dev/sr0 (O_DIRECT) and
#                      on a change print HVMDM-CD <beat> <sha256 | none> (none: no medium, the read
#                      failed); the first beat prints the initial state (`xl cd-eject/insert`).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s

# Marker lines go to the first serial port, the kernel console.
OUTDEV=/dev/ttyS0
[ -c "$OUTDEV" ] || OUTDEV=/dev/console
out() { echo "$*" > "$OUTDEV"; }

CHECK=acpi,pci,block,errors,disk
DISK=sda
DISKMIB=16
WAIT=20
EXTRA=
END=poweroff
REBOOT=0
BEAT=0
POWERBTN=0
CPUHP=0
SLPBTN=0
NMIREBOOT=0
CDWATCH=0
STORAGE=
IOBENCH=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        hvmdm.check=*) CHECK=${arg#*=} ;;
        hvmdm.disk=*) DISK=${arg#*=} ;;
        hvmdm.diskmib=*) DISKMIB=${arg#*=} ;;
        hvmdm.wait=*) WAIT=${arg#*=} ;;
        hvmdm.modules=*) EXTRA=${arg#*=} ;;
        hvmdm.end=*) END=${arg#*=} ;;
        hvmdm.reboot=*) REBOOT=${arg#*=} ;;
        hvmdm.beat=*) BEAT=${arg#*=} ;;
        hvmdm.powerbtn=*) POWERBTN=${arg#*=} ;;
        hvmdm.cpuhp=*) CPUHP=${arg#*=} ;;
        hvmdm.slpbtn=*) SLPBTN=${arg#*=} ;;
        hvmdm.nmireboot=*) NMIREBOOT=${arg#*=} ;;
        hvmdm.cdwatch=*) CDWATCH=${arg#*=} ;;
        hvmdm.storage=*) STORAGE=${arg#*=} ;;
        hvmdm.iobench=*) IOBENCH=${arg#*=} ;;
    esac
done
want() { case ",$CHECK," in *",$1,"*|*",all,"*) return 0 ;; esac; return 1; }

# Load the kit's drivers in dependency order; a driver with no device just fails to bind.
FAILED=
while read -r m; do
    [ -n "$m" ] || continue
    insmod "$m" 2>/dev/null || FAILED="$FAILED $(basename "$m" .ko)"
done < /etc/modules.load
for m in $(echo "$EXTRA" | tr ',' ' '); do
    f=$(find /lib/modules -name "$m.ko" | head -1)
    [ -n "$f" ] && { insmod "$f" 2>/dev/null || FAILED="$FAILED $m"; }
done

# Quiet the console so marker lines are not interleaved with kernel messages.
dmesg -n 1

out "HVMDM-READY $(uname -r)"
out "HVMDM-CMDLINE $(cat /proc/cmdline)"
[ -n "$FAILED" ] && out "HVMDM-INSMOD-FAILED$FAILED"

wait_disk() {
    i=0
    while [ ! -b "/dev/$DISK" ] && [ "$i" -lt $((WAIT * 10)) ]; do usleep 100000; i=$((i + 1)); done
}

up() { cut -d' ' -f1 /proc/uptime; }
# role_of DEV: R = the storage role of a block device (hvmdm.storage), M = its mode (w, ro or
# empty); R is empty when none. Builtins only: the wait loop below calls it often, and every fork
# is slow in a nested guest.
role_of() {
    R= M=
    case "$1" in sr*) R=cd; return ;; esac
    read -r sz < "/sys/block/$1/size" 2>/dev/null || return 0
    for r in $ROLELIST; do
        rest=${r#*:}
        if [ "${rest%%:*}" = $((sz / 2048)) ]; then
            R=${r%%:*}
            case "$rest" in *:*) M=${rest#*:} ;; esac
            return
        fi
    done
}
# dsum DEV [OFFSET] -> sha256 of the device (or of the 1 MiB at OFFSET), read O_DIRECT in 1 MiB
# requests (64 KiB requests made the whole-device reads ~10x slower in lane K).
dsum() {
    if [ $# -eq 1 ]; then dd if="/dev/$1" bs=1048576 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
    else dd if="/dev/$1" bs=1048576 skip="$2" count=1 iflag=direct,skip_bytes 2>/dev/null | sha256sum | cut -d' ' -f1; fi
}
# pattern ROLE -> 1 MiB of 64-byte lines naming the role and the line (the guest's own data).
pattern() {
    awk -v r="$1" 'BEGIN { for (i = 0; i < 16384; i++) printf "GUEST %-4s line=%06d x%08x %-30s\n", r, i, (i * 2654435761) % 268435456, "w" }'
}
storage_checks() {
    ROLELIST=$(echo "$STORAGE" | tr ',' ' ')
    # Wait for the disk roles this machine has: all of them, or until the set found has not
    # changed for 2 s (a scenario need not attach every role, e.g. bios and gpt never both).
    i=0; last=; stable=0
    while [ "$i" -lt $((WAIT * 5)) ]; do
        found=
        for b in /sys/block/sd* /sys/block/sr*; do
            [ -e "$b" ] || continue
            role_of "${b##*/}"
            found="$found $R"
        done
        miss=0
        for r in $ROLELIST; do case "$found " in *" ${r%%:*} "*) ;; *) miss=1 ;; esac; done
        [ "$miss" = 0 ] && break
        if [ -n "${found// /}" ] && [ "$found" = "$last" ]; then
            stable=$((stable + 1)); [ "$stable" -ge 10 ] && break
        else stable=0; fi
        last=$found
        usleep 200000; i=$((i + 1))
    done
    dmesg > /tmp/dmesg.st
    for b in /sys/block/sd* /sys/block/sr*; do
        [ -e "$b" ] || continue
        dev=${b##*/}
        role_of "$dev"
        role=${R:-none} mode=$M
        bytes=$(( $(cat "$b/size") * 512 ))
        model=$(cat "$b/device/model" 2>/dev/null | tr -s ' ' '_' | sed 's/_$//')
        qd=$(cat "$b/device/queue_depth" 2>/dev/null)
        port=$(readlink -f "$b/device" | tr '/' '\n' | grep '^ata[0-9]*$' | head -1)
        ncq=0
        [ -n "$port" ] && grep -q " $port\.00: .*NCQ (depth [0-9]*" /tmp/dmesg.st && ncq=1
        out "HVMDM-STORAGE-DEV $role $dev $bytes model=${model:-?} qd=${qd:-?} ncq=$ncq port=${port:-?}"
        [ "$role" = none ] && continue
        t0=$(up)
        rsum=$(dsum "$dev")
        out "HVMDM-STORAGE-READ $role $dev $bytes $rsum t=$t0-$(up)"
        case "$mode" in
            w)
                t0=$(up)
                off=$((bytes / 2 - 524288))
                pattern "$role" > /tmp/pat
                psum=$(sha256sum < /tmp/pat | cut -d' ' -f1)
                dd if=/tmp/pat of="/dev/$dev" bs=1048576 seek="$off" oflag=direct,seek_bytes conv=notrunc,fsync 2>/tmp/err
                rc=$?
                sync
                blockdev --flushbufs "/dev/$dev" 2>/dev/null
                out "HVMDM-STORAGE-WRITE $role $dev $off 1048576 $psum rc=$rc readback=$(dsum "$dev" "$off") t=$t0-$(up)"
                [ "$rc" = 0 ] || out "HVMDM-STORAGE-WRITE-ERR $role $(tail -1 /tmp/err)"
                ;;
            ro)
                pattern "$role" | head -c 4096 > /tmp/pat
                dd if=/tmp/pat of="/dev/$dev" bs=4096 seek=16 count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err
                rc=$?
                err=$(grep -v records /tmp/err | tail -1 | tr ' ' '_')
                out "HVMDM-STORAGE-RO $role $dev rc=$rc err=${err:-none} after=$(dsum "$dev")"
                ;;
        esac
    done
    out "HVMDM-STORAGE-END"
}

iobench() {
    mib=${IOBENCH%%:*}; secs=5
    case "$IOBENCH" in *:*) secs=${IOBENCH#*:} ;; esac
    dev=
    i=0
    while [ -z "$dev" ] && [ "$i" -lt $((WAIT * 5)) ]; do
        for b in /sys/block/sd*; do
            [ -f "$b/size" ] && [ $(( $(cat "$b/size") / 2048 )) = "$mib" ] && dev=$(basename "$b")
        done
        [ -n "$dev" ] || { usleep 200000; i=$((i + 1)); }
    done
    if [ -z "$dev" ]; then out "HVMDM-IORATE-NODISK $mib"; return; fi
    out "HVMDM-IOBENCH-DEV $dev qd=$(cat "/sys/block/$dev/device/queue_depth" 2>/dev/null)"
    for run in "seqread $secs" "seqwrite $secs" "randread $secs 4096 1" "randread $secs 4096 8"; do
        /bin/io-rate "/dev/$dev" $run > "$OUTDEV" 2>&1 || out "HVMDM-IORATE-FAILED $run"
    done
}

# One in-process reboot, remembered on the scenario's fresh disk copy (see hvmdm.reboot).
MARK=HVMDM-REBOOTMARK
if [ "$REBOOT" = 1 ]; then
    wait_disk
    if [ ! -b "/dev/$DISK" ]; then
        out "HVMDM-REBOOT-NODISK $DISK"
    else
        last=$(( $(cat "/sys/block/$DISK/size") - 1 ))
        readmark() { dd if="/dev/$DISK" bs=512 skip="$last" count=1 2>/dev/null | head -c ${#MARK}; }
        if [ "$(readmark)" = "$MARK" ]; then
            out "HVMDM-REBOOTED lba=$last"
        else
            echo "$MARK" | dd of="/dev/$DISK" bs=512 seek="$last" count=1 conv=sync,fsync 2>/dev/null
            sync
            # Drop the (clean) cached copy so the re-read comes from the device.
            echo 3 > /proc/sys/vm/drop_caches
            if [ "$(readmark)" = "$MARK" ]; then
                out "HVMDM-REBOOTING lba=$last"
                sync
                reboot -f
                out "HVMDM-REBOOT-FAILED reboot -f returned"
                while :; do sleep 3600; done
            fi
            out "HVMDM-REBOOT-MARK-FAILED lba=$last"
        fi
    fi
fi

if want acpi; then
    T=
    if [ -d /sys/firmware/acpi/tables ]; then
        for f in /sys/firmware/acpi/tables/*; do
            [ -f "$f" ] && T="$T $(basename "$f")"
        done
    fi
    out "HVMDM-ACPI-TABLES $(echo $T | tr ' ' '\n' | sort | tr '\n' ' ')"
fi

if want pci; then
    L=
    for d in /sys/bus/pci/devices/*; do
        [ -f "$d/vendor" ] || continue
        v=$(cat "$d/vendor"); p=$(cat "$d/device"); c=$(cat "$d/class")
        id="${v#0x}:${p#0x}"
        L="$L $id"
        out "HVMDM-PCI-DEV $(basename "$d") $id class=${c#0x} irq=$(cat "$d/irq" 2>/dev/null) driver=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)"
    done
    out "HVMDM-PCI$L"
fi

if want disk || want block; then
    # Probing is asynchronous; wait for the disk when one is expected.
    if want disk; then wait_disk; fi
fi

if want block; then
    B=
    for b in /sys/block/*; do
        [ -f "$b/size" ] || continue
        n=$(basename "$b")
        case "$n" in loop*|ram*) continue ;; esac
        B="$B $n=$(( $(cat "$b/size") * 512 ))"
    done
    out "HVMDM-BLOCK$B"
fi

if want errors; then
    dmesg > /tmp/dmesg
    grep -E 'ACPI Error|ACPI BIOS Error|\[Firmware Bug\]' /tmp/dmesg > /tmp/acpierr || true
    out "HVMDM-ACPI-ERRORS $(wc -l < /tmp/acpierr)"
    while read -r l; do out "HVMDM-ACPI-ERROR $l"; done < /tmp/acpierr
fi

if want disk; then
    if [ -b "/dev/$DISK" ]; then
        if [ "$DISKMIB" = 0 ]; then
            S=$(sha256sum < "/dev/$DISK" | cut -d' ' -f1)
        else
            S=$(dd if="/dev/$DISK" bs=1048576 count="$DISKMIB" 2>/dev/null | sha256sum | cut -d' ' -f1)
        fi
        out "HVMDM-DISK-SUM $DISK $DISKMIB $S"
    else
        out "HVMDM-DISK-SUM $DISK $DISKMIB missing"
    fi
fi

if [ -n "$STORAGE" ]; then storage_checks; fi
if [ -n "$IOBENCH" ]; then iobench; fi

out "HVMDM-UPTIME $(cut -d' ' -f1 /proc/uptime)"
out "HVMDM-DONE"
sync
if [ "$BEAT" -gt 0 ] 2>/dev/null; then
    # Operations mode: the host pauses, saves/restores, reboots or shuts the guest down and
    # watches the heartbeat (boot_id tells a restore, same boot, from a reboot).
    BOOTID=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
    PB=/sys/firmware/acpi/interrupts/ff_pwr_btn
    pbcount() { set -- $(cat "$PB" 2>/dev/null); echo "${1:-0}"; }
    pb0=$(pbcount)
    SB=/sys/firmware/acpi/interrupts/ff_slp_btn
    sbcount() { set -- $(cat "$SB" 2>/dev/null); echo "${1:-0}"; }
    sb0=$(sbcount)
    [ "$SLPBTN" = 1 ] && out "HVMDM-SLPBTN-WATCH $(cat "$SB" 2>/dev/null || echo missing)"
    cpus_done=
    # NMIs summed over CPUs (a hot-added CPU adds a column); no awk: busybox awk crashed on it.
    nmis() {
        set -- $(sed -n 's/^ *NMI:\([0-9 ]*\).*/\1/p' /proc/interrupts)
        t=0
        for v in "$@"; do t=$((t + v)); done
        echo "$t"
    }
    nmi0=$(nmis)
    [ "$POWERBTN" = 1 ] && out "HVMDM-POWERBTN-WATCH $(cat "$PB" 2>/dev/null || echo missing)"
    # busybox poweroff/reboot without -f signal init (the PV control path runs them).
    trap 'out "HVMDM-PV-POWEROFF"; sync; poweroff -f' USR2
    trap 'out "HVMDM-PV-REBOOT"; sync; reboot -f' TERM
    # The medium in the first CD drive: a checksum of its first 32 KiB, or none.
    cdstate() {
        rm -f /tmp/cd
        if dd if=/dev/sr0 of=/tmp/cd bs=2048 count=16 iflag=direct 2>/dev/null && [ -s /tmp/cd ]; then
            set -- $(sha256sum < /tmp/cd)
            echo "$1"
        else
            echo none
        fi
    }
    cd0=
    n=0
    while :; do
        n=$((n + 1))
        out "HVMDM-BEAT $n $(cut -d' ' -f1 /proc/uptime) $BOOTID"
        if [ "$CDWATCH" = 1 ]; then
            c=$(cdstate)
            [ "$c" != "$cd0" ] && out "HVMDM-CD $n $c"
            cd0=$c
        fi
        if [ "$POWERBTN" = 1 ] && [ "$(pbcount)" != "$pb0" ]; then
            out "HVMDM-POWERBTN $(cat "$PB")"
            sync
            poweroff -f
        fi
        if [ "$CPUHP" = 1 ]; then
            for c in /sys/devices/system/cpu/cpu[1-9]*; do
                [ -f "$c/online" ] || continue
                case " $cpus_done " in *" ${c##*/} "*) continue ;; esac
                cpus_done="$cpus_done ${c##*/}"
                [ "$(cat "$c/online")" = 1 ] || echo 1 > "$c/online" 2>/dev/null
                out "HVMDM-CPU-ONLINE ${c##*/} $(cat "$c/online") $(cat /sys/devices/system/cpu/online)"
            done
        fi
        if [ "$NMIREBOOT" = 1 ] && [ "$(nmis)" != "$nmi0" ]; then
            out "HVMDM-NMI-REBOOT $(nmis)"
            sync
            reboot -f
        fi
        if [ "$SLPBTN" = 1 ] && [ "$(sbcount)" != "$sb0" ]; then
            sb0=$(sbcount)
            out "HVMDM-S3-ENTER $n"
            sync
            if echo mem > /sys/power/state; then
                out "HVMDM-S3-RESUMED $n"
            else
                out "HVMDM-S3-FAILED $n"
            fi
        fi
        sleep "$BEAT"
    done
fi
case "$END" in
    shell) exec setsid cttyhack sh ;;
    reboot) reboot -f ;;
    *) poweroff -f ;;
esac
# poweroff -f returned: the platform ignored the ACPI sleep request.
out "HVMDM-POWEROFF-FAILED"
while :; do sleep 3600; done
