#!/bin/sh
# scenario.sh SCENARIO-FILE DIR: one lane-X guest run inside dom0 (started by dom0-init.sh in its
# own session, stdout on the console). Creates the HVM guest paused, attaches to its serial pty,
# unpauses, waits for HVMDM-DONE, then for the domain to disappear after the guest's poweroff.
# Prints LANEX-LOG <name> <stream> <line> (streams: serial, xl-dmesg, dm, xl, cfg, step) and one
#   LANEX-MEASURE <name> create_rc= create_s= tty= marker= marker_s= gone= gone_s= dm_rss_kb=
# Scenario variables (see scenarios/README.md): SCENARIO_DM (device_model_override, empty = libxl's
# default qemu-xen), SCENARIO_HDTYPE (ide|ahci), SCENARIO_MEMORY (MiB), SCENARIO_GUEST_TIMEOUT (s,
# unpause -> HVMDM-DONE), SCENARIO_GONE_TIMEOUT (s, HVMDM-DONE -> domain gone), SCENARIO_CFG_EXTRA
# (extra xl.cfg lines), SCENARIO_ON_REBOOT (xl.cfg on_reboot, default destroy), SCENARIO_OPS
# (space list of xl operations run in order once HVMDM-DONE is seen, on the same guest: pause,
# save, vcpuset, s3, reboot, nmireboot, shutdown, destroy; needs the guest in heartbeat mode, hvmdm.beat=SECS). Each
# operation prints one `LANEX-LOG <name> op <operation> key=value ...` line (judged by the
# checker) and its xl output as stream xl-<operation>.
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
SCENARIO_ON_REBOOT=destroy
SCENARIO_OPS=
SCENARIO_CDROM=0
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
# Bounded: once (hvmdm-pvctl, right after `xl reboot`) this pipeline's `tr` spun at 100 % of
# dom0's only CPU for 23 minutes (state R; its input was xl's output), starving the guest and the
# device models (whose threads all sat idle in poll/futex) until the scenario's time-limit. Not
# understood; a stuck emit now loses its output instead of the whole scenario.
emit() { # STREAM < lines
    timeout 120 tr -d '\r' | timeout 120 sed "s|^|LANEX-LOG $name $1 |"
}
step() { echo "$*" | emit step; }

disk=/lanex/disks/$name.img
[ -f "$disk" ] || disk=/lanex/boot.img
cfg=$dir/guest.cfg
if [ "$SCENARIO_CDROM" = 1 ]; then
    # Two 1 MiB media of random content; the guest reports sha256 of the first 32 KiB.
    for m in cd1 cd2; do
        dd if=/dev/urandom of="$dir/$m.iso" bs=2048 count=512 2>/dev/null
    done
fi
cdsum() { head -c 32768 "$dir/$1.iso" | sha256sum | cut -d' ' -f1; }
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
    echo "on_reboot=\"$SCENARIO_ON_REBOOT\""
    echo 'on_crash="destroy"'
    if [ "$SCENARIO_CDROM" = 1 ]; then
        # An IDE CD-ROM (hdc) holding cd1.iso; op_cdchange swaps it for cd2.iso.
        echo "disk=['format=raw,vdev=hda,access=rw,backendtype=qdisk,target=$disk', 'format=raw,vdev=hdc,access=ro,devtype=cdrom,target=$dir/cd1.iso']"
    else
        echo "disk=['format=raw,vdev=hda,access=rw,backendtype=qdisk,target=$disk']"
    fi
    [ "$SCENARIO_HDTYPE" = ahci ] && echo 'hdtype="ahci"'
    echo 'device_model_version="qemu-xen"'
    [ -n "$DM" ] && echo "device_model_override=\"$DM\""
    [ -n "$SCENARIO_CFG_EXTRA" ] && printf '%s\n' "$SCENARIO_CFG_EXTRA"
} > "$cfg"
emit cfg < "$cfg"

serial=$dir/serial.log
: > "$serial"
catpid=
dmpid_of() { timeout 30 xenstore-read "/local/domain/$1/image/device-model-pid" 2>/dev/null; }
# attach DOMID: (re)attach to the domain's serial pty, appending to serial.log; sets $atty.
# Attach before unpausing so no guest output is lost (QEMU's pty drops output while no one
# holds the other side open).
attach() {
    [ -n "$catpid" ] && kill "$catpid" 2>/dev/null
    catpid= atty= i=0
    # Only serial/0/tty: after a reboot xl builds the domain first and libxl writes the key once
    # the new DM answers QMP, while console/tty (xenconsoled's PV console pty) may already exist.
    while [ -z "$atty" ] && [ "$i" -lt 120 ]; do
        atty=$(timeout 30 xenstore-read "/local/domain/$1/serial/0/tty" 2>/dev/null)
        [ -n "$atty" ] || sleep 0.5
        i=$((i + 1))
    done
    if [ -n "$atty" ] && [ -c "$atty" ]; then
        stty -F "$atty" raw -echo 2>/dev/null
        cat "$atty" >> "$serial" 2>/dev/null &
        catpid=$!
        step "serial of domain $1: $atty"
        return 0
    fi
    step "no serial pty for domain $1 (serial/0/tty='$atty')"
    atty=none
    return 1
}
# wait_for SECS CMD...: run CMD every 0.5 s until it succeeds (0) or SECS have passed (1).
wait_for() {
    _d=$(awk -v a="$(up)" -v t="$1" 'BEGIN { print a + t }')
    shift
    while :; do
        "$@" && return 0
        awk -v d="$_d" -v u="$(up)" 'BEGIN { exit !(u > d) }' && return 1
        sleep 0.5
    done
}
count() { grep -ac -- "$1" "$serial"; }
more() { [ "$(count "$1")" -gt "$2" ]; }
# Only complete heartbeat lines count: the serial log is read while the guest is still writing
# one (byte by byte under TCG), and a bare "HVMDM-BEAT " prefix has no fields yet.
BEAT_RE='HVMDM-BEAT [0-9][0-9]* [0-9][0-9.]* [0-9a-f-]\{36\}'
nbeats() { count "$BEAT_RE"; }
# The last heartbeat: "<n> <uptime> <boot_id>".
lastbeat() { grep -a -- "$BEAT_RE" "$serial" | tail -n 1 | tr -d '\r' | sed 's/.*HVMDM-BEAT //'; }
beating() { wait_for 60 more "$BEAT_RE" "$(nbeats)"; }
# Two misses in a row (see dom_exists).
dom_gone() { ! dom_exists "$1" && sleep 1 && ! dom_exists "$1"; }
pid_gone() { [ ! -d "/proc/$1" ] || grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# dm_gone_s SECS PID: seconds until PID exited, "no" when it still runs after SECS.
dm_gone_s() {
    [ -n "$2" ] || { echo unknown; return; }
    _t=$(up)
    if wait_for "$1" pid_gone "$2"; then since "$_t"; else echo no; fi
}
op() { echo "$*" | emit op; }
xlop() { # NAME TIMEOUT ARGS...: run xl, keep its output as stream xl-NAME, return its status
    _n=$1 _to=$2
    shift 2
    timeout "$_to" "$XL" "$@" > "$dir/op.out" 2>&1
    _rc=$?
    emit "xl-$_n" < "$dir/op.out"
    return $_rc
}

# The operations (SCENARIO_OPS). Each works on the current $domid/$dmpid and updates them.
op_pause() {
    beating
    # The guest's clock runs several times slower than dom0's under nested TCG: measure one
    # heartbeat interval and watch the paused guest for three of them.
    b=$(nbeats)
    t=$(up)
    wait_for 90 more "$BEAT_RE" "$b"
    iv=$(since "$t")
    win=$(awk -v i="$iv" 'BEGIN { w = 3 * i + 2; if (w < 10) w = 10; if (w > 120) w = 120; printf "%d", w }')
    b0=$(nbeats)
    xlop pause 60 pause "$GUEST"; rc=$?
    state=$(timeout 30 "$XL" list "$GUEST" 2>/dev/null | awk 'NR == 2 { print $5 }')
    # A line already on its way through the device model may still land after the pause.
    sleep 2
    b1=$(nbeats)
    sleep "$win"
    b2=$(nbeats)
    tu=$(up)
    xlop unpause 60 unpause "$GUEST"; urc=$?
    wait_for 120 more "$BEAT_RE" "$b2"
    op "pause rc=$rc state=${state:-none} unpause_rc=$urc beat_interval_s=$iv pause_window_s=$win beats_before=$b0 beats_pause_start=$b1 beats_pause_end=$b2 beats_after=$(nbeats) resume_s=$(since "$tu")"
}

op_save() {
    beating
    set -- $(lastbeat)
    n0=${1:-none} u0=${2:-none} id0=${3:-none}
    olddom=$domid olddm=$dmpid
    t=$(up)
    xlop save 600 save "$GUEST" "$dir/guest.save"; rc=$?
    save_s=$(since "$t")
    size=$(stat -c %s "$dir/guest.save" 2>/dev/null || echo 0)
    wait_for 30 dom_gone "$olddom" && ogone=1 || ogone=0
    dmg=$(dm_gone_s 15 "$olddm")
    t=$(up)
    # -p: stay paused until the new pty is attached.
    xlop restore 600 restore -p "$dir/guest.save"; rrc=$?
    restore_s=$(since "$t")
    rm -f "$dir/guest.save"
    domid=$(timeout 30 "$XL" domid "$GUEST" 2>/dev/null)
    dmpid=$(dmpid_of "$domid")
    incoming=0
    [ -n "$dmpid" ] && tr '\0' '\n' < "/proc/$dmpid/cmdline" 2>/dev/null | grep -q '^-incoming$' && incoming=1
    attach "$domid"
    b1=$(nbeats)
    xlop unpause 60 unpause "$GUEST"; urc=$?
    wait_for 60 more "$BEAT_RE" "$b1"
    new=$(( $(nbeats) - b1 ))
    set -- $(lastbeat)
    op "save rc=$rc save_s=$save_s size=$size old_domain_gone=$ogone old_dm_gone_s=$dmg restore_rc=$rrc restore_s=$restore_s domid=${domid:-none} dm_pid=${dmpid:-none} dm_incoming=$incoming unpause_rc=$urc beat_before=$n0 uptime_before=$u0 boot_before=$id0 new_beats=$new beat_after=${1:-none} uptime_after=${2:-none} boot_after=${3:-none}"
}

newdom() { nd=$(timeout 20 "$XL" domid "$GUEST" 2>/dev/null) && [ -n "$nd" ] && [ "$nd" != "$olddom" ]; }
# reboot_via OP XL-ARGS...: ask for a reboot with `xl XL-ARGS`; xl's monitor process then builds
# a new domain (on_reboot="restart") whose boot must reach HVMDM-DONE again.
reboot_via() {
    opname=$1
    shift
    beating
    xlargs="$*"
    set -- $(lastbeat)
    id0=${3:-none}
    d0=$(count 'HVMDM-DONE')
    r0=$(count 'HVMDM-PV-REBOOT')
    n0=$(count 'HVMDM-NMI-REBOOT')
    olddom=$domid olddm=$dmpid
    t=$(up)
    # shellcheck disable=SC2086 # xlargs is a word list
    xlop "$opname" 60 $xlargs; rc=$?
    nd= restart_s=none dmg=none m2=0 m2_s=none
    if wait_for 180 newdom; then
        domid=$nd
        restart_s=$(since "$t")
        dmg=$(dm_gone_s 15 "$olddm")
        attach "$domid"
        wait_for 30 dmpid_of "$domid" > /dev/null
        dmpid=$(dmpid_of "$domid")
        tm=$(up)
        if wait_for "$SCENARIO_GUEST_TIMEOUT" more 'HVMDM-DONE' "$d0"; then
            m2=1
            m2_s=$(since "$tm")
            beating
        fi
    fi
    guest=none
    [ "$(count 'HVMDM-PV-REBOOT')" -gt "$r0" ] && guest=pv-reboot
    [ "$(count 'HVMDM-NMI-REBOOT')" -gt "$n0" ] && guest=nmi-reboot
    reason=$(grep -a 'has shut down, reason code' "/var/log/xen/xl-$GUEST.log" 2>/dev/null | tail -n 1 |
             sed -n 's/.*reason code \([0-9]*\).*/\1/p')
    set -- $(lastbeat)
    op "$opname rc=$rc guest_saw=$guest reason=${reason:-none} new_domid=${nd:-none} restart_s=$restart_s old_dm_gone_s=$dmg marker2=$m2 marker2_s=$m2_s boot_before=$id0 boot_after=${3:-none}"
}
# `xl reboot`: through the guest's PV control node (PV drivers needed).
op_reboot() { reboot_via reboot reboot "$GUEST"; }
# A guest-initiated reboot (hvmdm.nmireboot=1: an NMI makes the guest run `reboot -f`, which
# resets through the device model: ACPI reset register 0xCF9 or the keyboard controller).
op_nmireboot() { reboot_via nmireboot trigger "$GUEST" nmi; }

# `xl vcpu-set` to 2 (the guest has vcpus=1, maxvcpus=2 and hvmdm.cpuhp=1): the device model's
# CPU bitmap + GPE tell the guest, which brings vCPU 1 up.
op_vcpuset() {
    beating
    c0=$(count 'HVMDM-CPU-ONLINE ')
    t=$(up)
    # --ignore-host: dom0's outer VM has one physical CPU, and xl refuses to overcommit it.
    xlop vcpuset 60 vcpu-set --ignore-host "$GUEST" 2; rc=$?
    wait_for 120 more 'HVMDM-CPU-ONLINE ' "$c0" && seen=1 || seen=0
    set -- $(grep -a 'HVMDM-CPU-ONLINE ' "$serial" | tail -n 1 | tr -d '\r' | sed 's/.*HVMDM-CPU-ONLINE //')
    beating
    op "vcpuset rc=$rc guest_saw=$seen cpu=${1:-none} online=${2:-none} cpus=${3:-none} seen_s=$(since "$t")"
}

# ACPI S3 round trip (hvmdm.slpbtn=1): `xl trigger sleep` presses the sleep button, the guest
# suspends to RAM, `xl trigger s3resume` (QMP system_wakeup) wakes it, the same boot goes on.
op_s3() {
    beating
    e0=$(count 'HVMDM-S3-ENTER ')
    r0=$(count 'HVMDM-S3-RESUMED ')
    set -- $(lastbeat)
    n0=${1:-none} id0=${3:-none}
    xlop sleep 60 trigger "$GUEST" sleep; rc=$?
    wait_for 120 more 'HVMDM-S3-ENTER ' "$e0" && entered=1 || entered=0
    # Let the guest finish suspending; the beat loop is blocked in the suspend meanwhile.
    sleep 20
    b0=$(nbeats)
    t=$(up)
    xlop s3resume 60 trigger "$GUEST" s3resume; wrc=$?
    wait_for 240 more 'HVMDM-S3-RESUMED ' "$r0" && resumed=1 || resumed=0
    resume_s=$(since "$t")
    failed=$(count 'HVMDM-S3-FAILED ')
    wait_for 60 more "$BEAT_RE" "$b0"
    set -- $(lastbeat)
    op "s3 rc=$rc entered=$entered resume_rc=$wrc resumed=$resumed failed=$failed resume_s=$resume_s beat_before=$n0 boot_before=$id0 beat_after=${1:-none} boot_after=${3:-none}"
}

op_shutdown() {
    beating
    olddom=$domid olddm=$dmpid
    p0=$(count 'HVMDM-POWERBTN ')
    v0=$(count 'HVMDM-PV-POWEROFF')
    t=$(up)
    # -F: without PV drivers, fall back to the ACPI power button (Xen's PM1a event + SCI).
    xlop shutdown 60 shutdown -F "$GUEST"; rc=$?
    path=pv
    grep -qi 'power button' "$dir/op.out" && path=acpi
    wait_for 180 dom_gone "$olddom" && gone=1 || gone=0
    gone_s=$(since "$t")
    dmg=$(dm_gone_s 15 "$olddm")
    guest=none
    [ "$(count 'HVMDM-POWERBTN ')" -gt "$p0" ] && guest=powerbtn
    [ "$(count 'HVMDM-PV-POWEROFF')" -gt "$v0" ] && guest=pv-poweroff
    reason=$(grep -a 'has shut down, reason code' "/var/log/xen/xl-$GUEST.log" 2>/dev/null | tail -n 1 |
             sed -n 's/.*reason code \([0-9]*\).*/\1/p')
    op "shutdown rc=$rc path=$path guest_saw=$guest gone=$gone gone_s=$gone_s dm_gone_s=$dmg reason=${reason:-none}"
}

op_destroy() {
    fresh=0
    if [ -z "$domid" ] || ! dom_exists "$domid"; then
        # The guest is already gone (shutdown): a fresh one, destroyed while its firmware runs.
        fresh=1
        xlop create 180 create -p "$cfg"
        domid=$(timeout 30 "$XL" domid "$GUEST" 2>/dev/null)
        dmpid=$(dmpid_of "$domid")
        xlop unpause 60 unpause "$GUEST"
        sleep 10
    fi
    olddom=$domid olddm=$dmpid
    t=$(up)
    xlop destroy 60 destroy "$GUEST"; rc=$?
    destroy_s=$(since "$t")
    dmg=$(dm_gone_s 10 "$olddm")
    wait_for 30 dom_gone "$olddom" && gone=1 || gone=0
    op "destroy fresh=$fresh rc=$rc destroy_s=$destroy_s domid=${olddom:-none} dm_pid=${olddm:-none} dm_gone_s=$dmg gone=$gone"
}

# CD-ROM media change (SCENARIO_CDROM=1, hvmdm.cdwatch=1): the guest first sees cd1, then
# `xl cd-eject` (QMP eject) leaves the drive empty, then `xl cd-insert` (add-fd +
# blockdev-change-medium) puts cd2 in; the guest reads each state back from the drive.
cdlast() { grep -a 'HVMDM-CD [0-9]* [0-9a-fn]' "$serial" | tail -n 1 | tr -d '\r' | sed 's/.*HVMDM-CD [0-9]* //'; }
cdis() { [ "$(cdlast)" = "$1" ]; }
op_cdchange() {
    beating
    s1=$(cdsum cd1) s2=$(cdsum cd2)
    wait_for 60 cdis "$s1" && initial=1 || initial=0
    t=$(up)
    # The guest's watcher holds /dev/sr0 open for each read, and Linux locks the tray while it
    # is open: an eject that lands then is refused ("Device 'ide-5632' is locked and force was
    # not specified, wait for tray to open and try again", from hvmdm and qemu-xen alike, and
    # libxl does not force). Try again, as an operator would; the attempts are reported.
    etries=0
    while :; do
        etries=$((etries + 1))
        xlop cdeject 60 cd-eject "$GUEST" hdc; erc=$?
        [ "$erc" = 0 ] || [ "$etries" -ge 5 ] && break
        sleep 1
    done
    wait_for 120 cdis none && ejected=1 || ejected=0
    eject_s=$(since "$t")
    t=$(up)
    itries=0
    while :; do
        itries=$((itries + 1))
        xlop cdinsert 60 cd-insert "$GUEST" hdc "$dir/cd2.iso"; irc=$?
        [ "$irc" = 0 ] || [ "$itries" -ge 5 ] && break
        sleep 1
    done
    wait_for 120 cdis "$s2" && inserted=1 || inserted=0
    insert_s=$(since "$t")
    op "cdchange initial=$initial eject_rc=$erc eject_tries=$etries ejected=$ejected eject_s=$eject_s insert_rc=$irc insert_tries=$itries inserted=$inserted insert_s=$insert_s last=$(cdlast | cut -c1-16)"
}

# What the running device model looks like: restricted (dm_restrict=1) or not.
op_dm() {
    [ -n "$dmpid" ] && [ -d "/proc/$dmpid" ] || { op "dm pid=${dmpid:-none} running=0"; return; }
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$dmpid/status")
    args=$(tr '\0' ' ' < "/proc/$dmpid/cmdline")
    has() { case " $args " in *" $1 "*) echo 1 ;; *) echo 0 ;; esac; }
    op "dm pid=$dmpid running=1 uid=$uid domid_restrict=$(has -xen-domid-restrict) chroot=$(has -chroot) runas=$(has -runas) exe=$(readlink "/proc/$dmpid/exe")"
}

marker=0 marker_s= gone=0 gone_s= rss=
t0=$(up)
timeout 180 "$XL" -vvv create -p "$cfg" > "$dir/create.log" 2>&1
create_rc=$?
create_s=$(since "$t0")
step "xl create -p rc=$create_rc in ${create_s}s"
domid=$(timeout 30 "$XL" domid "$GUEST" 2>/dev/null)

if [ "$create_rc" = 0 ] && [ -n "$domid" ]; then
    attach "$domid"
    tty=$atty
    dmpid=$(dmpid_of "$domid")
    tu=$(up)
    timeout 60 "$XL" unpause "$GUEST" 2>&1 | emit step
    step "unpaused domain $domid at $(up) (dm pid ${dmpid:-?})"
    deadline=$(awk -v a="$tu" -v t="$SCENARIO_GUEST_TIMEOUT" 'BEGIN { print int(a + t) }')
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do
        if grep -aq 'HVMDM-DONE' "$serial" 2>/dev/null; then
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
    if [ "$marker" = 1 ]; then
        [ -n "$SCENARIO_OPS" ] && op_dm
        for o in $SCENARIO_OPS; do
            to=$(up)
            step "op $o on domain $domid"
            "op_$o"
            step "op $o done in $(since "$to")s"
        done
    fi
    # The guest powers itself off after HVMDM-DONE (or an operation ended it); xl's background
    # process destroys the domain.
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
    if [ -n "$dmpid" ] && ! pid_gone "$dmpid"; then
        sleep 2
        pid_gone "$dmpid" || step "device model pid $dmpid still alive after domain end"
    fi
    [ -n "${catpid:-}" ] && kill "$catpid" 2>/dev/null
else
    tty=none
    step "xl create failed (rc=$create_rc domid='$domid')"
    timeout 60 "$XL" destroy "$GUEST" > /dev/null 2>&1
fi

emit xl-create < "$dir/create.log"
emit serial < "$serial"
timeout 60 "$XL" dmesg 2>&1 | emit xl-dmesg
# libxl rotates a domain's logs (.log.1 is the previous DM's) when it starts a new DM (restore,
# reboot, a fresh domain): oldest first, each behind a "== file ==" line.
for base in qemu-dm xl; do
    case "$base" in qemu-dm) s=dm ;; *) s=xl ;; esac
    for l in $(ls -r /var/log/xen/"$base-$GUEST".log.* 2>/dev/null) /var/log/xen/"$base-$GUEST".log; do
        [ -f "$l" ] || continue
        [ "$l" = "/var/log/xen/$base-$GUEST.log" ] && [ ! -f "$l.1" ] || echo "== $(basename "$l") ==" | emit "$s"
        emit "$s" < "$l"
    done
done
echo "LANEX-MEASURE $name create_rc=$create_rc create_s=$create_s tty=$tty marker=$marker marker_s=${marker_s:-none} gone=$gone gone_s=${gone_s:-none} dm_rss_kb=${rss:-none}"
