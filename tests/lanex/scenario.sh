#!/bin/sh
# scenario.sh SCENARIO-FILE DIR: one lane-X guest run inside dom0 (started by dom0-init.sh in its
# own session, stdout on the console). Creates the HVM guest paused, attaches to its serial pty,
# unpauses, waits for HVMDM-DONE, then for the domain to disappear after the guest's poweroff.
# Prints LANEX-LOG <name> <stream> <line> (streams: serial, xl-dmesg, dm, xl, cfg, step) and one
#   LANEX-MEASURE <name> create_rc= create_s= tty= marker= marker_s= gone= gone_s= dm_rss_kb=
# Scenario variables (see scenarios/README.md): SCENARIO_DM (device_model_override, empty = libxl's
# default qemu-xen), SCENARIO_HDTYPE (ide|ahci), SCENARIO_MEMORY (MiB), SCENARIO_GUEST_TIMEOUT (s,
# unpause -> HVMDM-DONE), SCENARIO_GONE_TIMEOUT (s, HVMDM-DONE -> domain gone), SCENARIO_CFG_EXTRA
# (extra xl.cfg lines).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
XENBIN=/usr/lib/xen-4.17/bin
XL=$XENBIN/xl
f=$1
dir=$2
name=$(basename "$f" .sh)
GUEST=lanex-$name

SCENARIO_DM=
SCENARIO_HDTYPE=ide
SCENARIO_MEMORY=256
SCENARIO_GUEST_TIMEOUT=420
SCENARIO_GONE_TIMEOUT=60
SCENARIO_CFG_EXTRA=
. "$f"
# Placeholders a scenario may use.
VMM_QEMU_XEN=/usr/libexec/xen-qemu-system-i386
VMM_HVMDM=/lanex/bin/hvmdm
DM=$(eval echo "$SCENARIO_DM")

up() { cut -d' ' -f1 /proc/uptime; }
# dom_exists DOMID: the domain's xenstore home or xl still knows it. Two sources, because a
# single `xl domid` has been seen to fail once mid-run while the domain was alive.
dom_exists() {
    timeout 20 xenstore-read "/local/domain/$1/name" > /dev/null 2>&1 && return 0
    timeout 20 "$XL" list "$1" > "$dir/xl-list.out" 2>&1 && return 0
    return 1
}
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }'; }
emit() { # STREAM < lines
    tr -d '\r' | sed "s|^|LANEX-LOG $name $1 |"
}
step() { echo "$*" | emit step; }

disk=/lanex/boot.img
cfg=$dir/guest.cfg
{
    echo "name=\"$GUEST\""
    echo 'type="hvm"'
    echo "memory=$SCENARIO_MEMORY"
    echo 'vcpus=1'
    echo 'serial="pty"'
    echo 'vga="none"'
    echo 'nographic=1'
    echo 'vnc=0'
    echo 'sdl=0'
    echo 'boot="c"'
    echo 'on_poweroff="destroy"'
    echo 'on_reboot="destroy"'
    echo 'on_crash="destroy"'
    echo "disk=['format=raw,vdev=hda,access=rw,backendtype=qdisk,target=$disk']"
    [ "$SCENARIO_HDTYPE" = ahci ] && echo 'hdtype="ahci"'
    echo 'device_model_version="qemu-xen"'
    [ -n "$DM" ] && echo "device_model_override=\"$DM\""
    [ -n "$SCENARIO_CFG_EXTRA" ] && printf '%s\n' "$SCENARIO_CFG_EXTRA"
} > "$cfg"
emit cfg < "$cfg"

tty=none marker=0 marker_s= gone=0 gone_s= rss=
t0=$(up)
timeout 180 "$XL" -vvv create -p "$cfg" > "$dir/create.log" 2>&1
create_rc=$?
create_s=$(since "$t0")
step "xl create -p rc=$create_rc in ${create_s}s"
domid=$(timeout 30 "$XL" domid "$GUEST" 2>/dev/null)

if [ "$create_rc" = 0 ] && [ -n "$domid" ]; then
    tty=$(timeout 30 xenstore-read "/local/domain/$domid/serial/0/tty" 2>/dev/null ||
          timeout 30 xenstore-read "/local/domain/$domid/console/tty" 2>/dev/null)
    if [ -n "$tty" ] && [ -c "$tty" ]; then
        # Attach before unpausing so no guest output is lost (QEMU's pty drops output while no
        # one holds the other side open).
        stty -F "$tty" raw -echo 2>/dev/null
        cat "$tty" > "$dir/serial.log" 2>/dev/null &
        catpid=$!
    else
        step "no serial pty for domain $domid (serial/0/tty='$tty')"
        tty=none
    fi
    dmpid=$(timeout 30 xenstore-read "/local/domain/$domid/image/device-model-pid" 2>/dev/null)
    tu=$(up)
    timeout 60 "$XL" unpause "$GUEST" 2>&1 | emit step
    step "unpaused domain $domid at $(up) (dm pid ${dmpid:-?})"
    deadline=$(awk -v a="$tu" -v t="$SCENARIO_GUEST_TIMEOUT" 'BEGIN { print int(a + t) }')
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do
        if grep -aq 'HVMDM-DONE' "$dir/serial.log" 2>/dev/null; then
            marker=1
            marker_s=$(since "$tu")
            break
        fi
        # Peak-ish RSS of the device model (sampled every 0.5 s).
        if [ -n "$dmpid" ]; then
            r=$(awk '/^VmHWM:/ { print $2 }' "/proc/$dmpid/status" 2>/dev/null)
            [ -n "$r" ] && rss=$r
        fi
        if ! dom_exists "$domid"; then
            sleep 1
            if ! dom_exists "$domid"; then
                step "domain $domid vanished before HVMDM-DONE ($(tr '\n' ' ' < "$dir/xl-list.out"))"
                break
            fi
        fi
        sleep 0.5
    done
    [ "$marker" = 1 ] && step "HVMDM-DONE ${marker_s}s after unpause" || step "no HVMDM-DONE (waited $(since "$tu")s)"
    if [ -n "$dmpid" ]; then
        r=$(awk '/^VmHWM:/ { print $2 }' "/proc/$dmpid/status" 2>/dev/null)
        [ -n "$r" ] && rss=$r
    fi
    # The guest powers itself off after HVMDM-DONE; xl's background process destroys the domain.
    tg=$(up)
    deadline=$(awk -v a="$tg" -v t="$SCENARIO_GONE_TIMEOUT" 'BEGIN { print int(a + t) }')
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do
        if ! dom_exists "$domid"; then
            gone=1
            gone_s=$(since "$tg")
            break
        fi
        sleep 0.5
    done
    step "domain gone=$gone after ${gone_s:-$(since "$tg")}s"
    if [ "$gone" = 0 ]; then
        timeout 60 "$XL" list 2>&1 | emit step
        timeout 60 "$XL" destroy "$GUEST" 2>&1 | emit step
    fi
    # Device model still running after the domain is gone?
    if [ -n "$dmpid" ] && [ -d "/proc/$dmpid" ]; then
        sleep 2
        [ -d "/proc/$dmpid" ] && step "device model pid $dmpid still alive after domain end"
    fi
    [ -n "${catpid:-}" ] && kill "$catpid" 2>/dev/null
else
    step "xl create failed (rc=$create_rc domid='$domid')"
    timeout 60 "$XL" destroy "$GUEST" > /dev/null 2>&1
fi

emit xl-create < "$dir/create.log"
[ -f "$dir/serial.log" ] && emit serial < "$dir/serial.log"
timeout 60 "$XL" dmesg 2>&1 | emit xl-dmesg
for l in /var/log/xen/qemu-dm-"$GUEST".log /var/log/xen/xl-"$GUEST".log; do
    [ -f "$l" ] || continue
    case "$l" in *qemu-dm-*) s=dm ;; *) s=xl ;; esac
    emit "$s" < "$l"
done
echo "LANEX-MEASURE $name create_rc=$create_rc create_s=$create_s tty=$tty marker=$marker marker_s=${marker_s:-none} gone=$gone gone_s=${gone_s:-none} dm_rss_kb=${rss:-none}"
