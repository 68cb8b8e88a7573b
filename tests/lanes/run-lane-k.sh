#!/bin/bash
# run-lane-k.sh [SCENARIO-FILE|NAME ...]: run lane-K scenarios and check them.
# Without arguments: every tests/lanes/scenarios/*.sh with SCENARIO_DEFAULT != 0.
# Builds (or reuses) the guest kit and the outer base, appends an overlay cpio with
# /init, the scenarios and the hvmdm binary, boots the outer TCG VM, and splits its
# console into tests/lanes/out/<scenario>.log; then runs check-lane-k.py on them.
# Scenarios with SCENARIO_ISOLATE=1 get an outer VM of their own; when the outer VM
# dies mid-batch, the scenario that was running is recorded as failed and the ones
# not yet started are retried in a fresh outer VM.
#
# Environment:
#   HVMDM_BIN=path         hvmdm binary (default: target/release/hvmdm)
#   LANEK_SMP=N            outer vCPUs (default 1; >1 uses -accel tcg,thread=multi)
#   LANEK_TIMEOUT=SECS     hard limit for each outer VM boot (default 900)
#   LANEK_STALL=SECS       kill the outer VM when it used no CPU time for this long (default 60)
#   LANEK_TOTAL_TIMEOUT=S  hard limit for the whole lane incl. cache builds (default 1200)
#   LANEK_OUTER_APPEND=... extra outer kernel args (e.g. lanek.kvm_amd=avic=0 lanek.debug=1)
#   LANEK_NO_CHECK=1       do not run check-lane-k.py
source "$(dirname "$0")/lib.sh"

HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
SMP=${LANEK_SMP:-1}
BOOT_TIMEOUT=${LANEK_TIMEOUT:-900}
STALL=${LANEK_STALL:-60}
TOTAL_TIMEOUT=${LANEK_TOTAL_TIMEOUT:-1200}
SCEN_DIR=$LANES_DIR/scenarios

# Whole-lane watchdog: CI must never hang here.
if [ -z "${LANEK_WATCHDOG:-}" ]; then
    export LANEK_WATCHDOG=1
    exec timeout -s TERM -k 30 "$TOTAL_TIMEOUT" "$0" "$@"
fi

T_ALL=$(now)
L=$("$LANES_DIR/build-lane-k.sh")
KIT=$CACHE/guest
mkdir -p "$OUT"

# Scenario selection.
select_scenarios "$SCEN_DIR" "$@"
# Storage media (build-boot-media.sh) only when a selected scenario uses them.
MEDIA=
if grep -q '^SCENARIO_MEDIA=1' "${files[@]}"; then MEDIA=$("$LANES_DIR/build-boot-media.sh" "$KIT"); fi

meta() { # FILE -> one line of metadata
    ( SCENARIO_TIMEOUT=300 SCENARIO_NEEDS= SCENARIO_DEFAULT=1 SCENARIO_ISOLATE=0
      SCENARIO_CHECKS="markers acpi errors pci disk exit fwlog"
      SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113" SCENARIO_ACPI="DSDT FACP APIC"
      SCENARIO_APPEND= SCENARIO_FW_BOOTS=1 SCENARIO_MEDIA=0 SCENARIO_STORAGE=
      . "$1"
      mib=$(echo " $SCENARIO_APPEND " | sed -n 's/.* hvmdm\.diskmib=\([0-9]*\) .*/\1/p')
      echo "timeout=$SCENARIO_TIMEOUT needs=$SCENARIO_NEEDS isolate=$SCENARIO_ISOLATE checks=${SCENARIO_CHECKS// /,} pci=${SCENARIO_PCI// /,} acpi=${SCENARIO_ACPI// /,} diskmib=${mib:-16} fwboots=$SCENARIO_FW_BOOTS media=$SCENARIO_MEDIA storage=$(echo $SCENARIO_STORAGE | tr ' ' ',')" )
}

# blocked FILE -> "LANEK-BLOCKED <substring>\t<reason>" when the scenario declares a known
# outer-VM failure (SCENARIO_BLOCKED reason, SCENARIO_BLOCKED_ON text of the outer QEMU's stderr).
blocked() {
    ( SCENARIO_BLOCKED= SCENARIO_BLOCKED_ON=
      . "$1"
      [ -z "$SCENARIO_BLOCKED" ] || printf 'LANEK-BLOCKED %s\t%s\n' "$SCENARIO_BLOCKED_ON" "$SCENARIO_BLOCKED" )
}

# disk_expect MIB -> the expected HVMDM-DISK-SUM checksum of the kit disk's first MIB MiB
# (16 or 0 = the whole disk, checksum cached by the kit).
disk_expect() {
    case "$1" in
        0|16) cat "$KIT/disk.img.sha256" ;;
        *) head -c $(($1 * 1048576)) "$KIT/disk.img" | sha256sum | cut -d' ' -f1 ;;
    esac
}

names=()
shared=()
isolated=()
declare -A FILE_OF=()
for f in "${files[@]}"; do
    n=$(basename "$f" .sh)
    FILE_OF[$n]=$f
    names+=("$n")
    m=$(meta "$f")
    rm -f "$OUT/$n.log"
    case " $m " in
        *" needs=hvmdm "*)
            if [ ! -x "$HVMDM_BIN" ]; then
                { echo "LANEK-META name=$n $m"; echo "LANEK-SKIP $n $HVMDM_BIN not built"; } > "$OUT/$n.log"
                log "skip $n: $HVMDM_BIN not built"
                continue
            fi ;;
    esac
    case " $m " in *" isolate=1 "*) isolated+=("$n") ;; *) shared+=("$n") ;; esac
done

# build_initrd OUTFILE NAME...: base + overlay(/init, runner, scenarios, hvmdm).
build_initrd() {
    local outf=$1; shift
    local ov; ov=$(mktemp -d)
    mkdir -p "$ov/lanek/scenarios" "$ov/lanek/bin"
    install -m 0755 "$LANES_DIR/outer-init.sh" "$ov/init"
    install -m 0755 "$LANES_DIR/run-one.sh" "$ov/lanek/run-one.sh"
    local n need=0 media=0
    for n in "$@"; do
        cp "${FILE_OF[$n]}" "$ov/lanek/scenarios/$n.sh"
        echo "$n" >> "$ov/lanek/list"
        grep -q '^SCENARIO_NEEDS=.*hvmdm' "${FILE_OF[$n]}" && need=1
        grep -q '^SCENARIO_MEDIA=1' "${FILE_OF[$n]}" && media=1
    done
    if [ "$media" = 1 ]; then
        mkdir -p "$ov/lanek/media"
        local x
        for x in bios.img gpt.img cd.iso ro.img qcow.qcow2 backing.img; do cp "$MEDIA/$x" "$ov/lanek/media/$x"; done
    fi
    if [ "$need" = 1 ]; then
        cp -L "$HVMDM_BIN" "$ov/lanek/bin/hvmdm"
        local lib
        for lib in $(ldd "$HVMDM_BIN" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
            mkdir -p "$ov/$(dirname "$lib")"
            cp -L "$lib" "$ov/$lib"
        done
    fi
    mkcpio "$ov" "$outf.overlay"
    cat "$L/base.cpio" "$outf.overlay" > "$outf"
    rm -rf "$ov" "$outf.overlay"
}

accel=tcg
[ "$SMP" -gt 1 ] && accel=tcg,thread=multi

SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
batch_no=0

# run_batch NAME...: one outer VM boot; sets REQUEUE to the names never started.
run_batch() {
    batch_no=$((batch_no + 1))
    local b=batch$batch_no
    local initrd=$OUT/$b.initrd
    local console=$OUT/$b.console stderr=$OUT/$b.stderr
    build_initrd "$initrd" "$@"
    log "$b: booting outer VM (smp=$SMP) for: $*"
    local t0; t0=$(now)
    local pidf=$OUT/$b.pid rcf=$OUT/$b.rc
    rm -f "$pidf" "$rcf"
    : > "$console"
    set +e
    { timeout -s KILL "$BOOT_TIMEOUT" qemu-system-x86_64 -accel "$accel" -cpu max -m 4096 -smp "$SMP" \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio -pidfile "$pidf" \
        -kernel "$L/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 rdinit=/init loglevel=4 panic=1 ${LANEK_OUTER_APPEND:-}" \
        < /dev/null 2> "$stderr"; echo $? > "$rcf"; } |
        stdbuf -oL tr -d '\r' | tee "$console" | grep --line-buffered -v '^LANEK-LOG ' >&2 &
    local pipe=$!
    # The outer TCG QEMU has been seen to freeze (its vCPU halted for good, no wake-up by any
    # timer): after STALL seconds in which it used (almost) no CPU time, kill it; the running
    # scenario is then recorded as outer-died and the rest are retried in a fresh outer VM.
    # An outer VM that is merely waiting still burns some CPU on timer ticks.
    local cpu=-1 idle=0 cur qpid
    while kill -0 "$pipe" 2>/dev/null; do
        sleep 5
        qpid=$(cat "$pidf" 2>/dev/null || true)
        [ -n "$qpid" ] || continue
        cur=$(awk '{ print $14 + $15 }' "/proc/$qpid/stat" 2>/dev/null || echo -1)
        if [ "$cpu" -ge 0 ] && [ "$cur" -ge 0 ] && [ $((cur - cpu)) -le 1 ]; then
            idle=$((idle + 5))
        else
            idle=0
            cpu=$cur
        fi
        if [ "$idle" -ge "$STALL" ]; then
            echo "lanek: outer VM frozen: no CPU time used for $STALL s; killed" >> "$stderr"
            log "$b: outer VM frozen (no CPU time for $STALL s): killing it"
            kill -KILL "$qpid" 2>/dev/null || true
            idle=0
        fi
    done
    wait "$pipe"
    local qrc; qrc=$(cat "$rcf" 2>/dev/null || echo 255)
    set -e
    local wall; wall=$(elapsed "$t0")
    rm -f "$initrd" "$pidf" "$rcf"
    local kvm boot done_at
    kvm=$(awk '$1 == "LANEK-KVM" { print $2 "@" $3 "s"; exit }' "$console")
    done_at=$(awk '$1 == "LANEK-ALL-DONE" { print $2; exit }' "$console")
    echo "$b scenarios=$* outer_exit=$qrc host_wall=${wall}s kvm=${kvm:-none} all_done=${done_at:-none}s smp=$SMP" >> "$SUMMARY"
    log "$b: outer VM exit $qrc after $wall s (kvm ${kvm:-none})"
    REQUEUE=()
    local n started result
    for n in "$@"; do
        started=$(awk -v n="$n" '$1 == "LANEK-START" && $2 == n { print $3; exit }' "$console")
        result=$(awk -v n="$n" '$1 == "LANEK-RESULT" && $2 == n { print; exit }' "$console")
        if [ -z "$started" ] && [ -z "$result" ]; then
            REQUEUE+=("$n")
            continue
        fi
        {
            local m; m=$(meta "${FILE_OF[$n]}")
            echo "LANEK-META name=$n $m batch=$b outer_smp=$SMP"
            blocked "${FILE_OF[$n]}"
            local mib=${m##* diskmib=}; mib=${mib%% *}
            echo "LANEK-EXPECT disk-sha256 $(disk_expect "$mib")"
            echo "LANEK-EXPECT disk-mib $mib"
            case " $m " in *" media=1 "*) sed 's/^/LANEK-EXPECT storage-/' "$MEDIA/expect.txt" ;; esac
            awk -v n="$n" '$1 == "LANEK-LOG" && $2 == n { s = $3; sub(/^LANEK-LOG [^ ]+ [^ ]+ ?/, ""); print s "| " $0 }' "$console"
            if [ -n "$result" ]; then
                echo "$result"
            else
                echo "LANEK-RESULT $n outer-died outer_exit=$qrc"
                sed 's/^/outer| /' "$stderr"
                tail -n 40 "$console" | sed 's/^/outer| /'
            fi
        } > "$OUT/$n.log"
        if [ -n "$result" ]; then echo "  $result" >> "$SUMMARY"; fi
    done
    # (Without this, a last scenario without a result made the function fail under set -e.)
    return 0
}

pending=("${shared[@]}")
tries=0
while [ ${#pending[@]} -gt 0 ] && [ $tries -lt 3 ]; do
    run_batch "${pending[@]}"
    if [ ${#REQUEUE[@]} -eq ${#pending[@]} ]; then tries=$((tries + 1)); else tries=0; fi
    pending=("${REQUEUE[@]}")
done
# Isolated scenarios get their own outer boot, limited to the scenario's own time-out plus the
# outer VM's boot (not the whole lane's limit): an outer TCG VM that wedges (seen once with
# hvmdm-ovmf-cd-boot: no console output at all, the in-VM time-out never fired) then costs
# minutes, and the scenario is run once more in a fresh boot. Both attempts stay on record: the
# first one's log as <name>.wedged.log, and a line in summary.txt.
lane_limit=$BOOT_TIMEOUT
for n in "${isolated[@]}"; do
    t=$(. "${FILE_OF[$n]}" > /dev/null 2>&1; echo "${SCENARIO_TIMEOUT:-300}")
    case "$t" in ''|*[!0-9]*) t=300 ;; esac
    BOOT_TIMEOUT=$((t + 150))
    [ "$BOOT_TIMEOUT" -gt "$lane_limit" ] && BOOT_TIMEOUT=$lane_limit
    run_batch "$n"
    if [ ${#REQUEUE[@]} -eq 0 ] && grep -q "^LANEK-RESULT $n outer-died" "$OUT/$n.log" 2>/dev/null; then
        mv "$OUT/$n.log" "$OUT/$n.wedged.log"
        echo "$n: outer VM died or wedged (log kept as $n.wedged.log); retried in a fresh boot" >> "$SUMMARY"
        log "$n: outer VM died or wedged; once more in a fresh boot"
        run_batch "$n"
    fi
    [ ${#REQUEUE[@]} -eq 0 ] || pending+=("$n")
done
BOOT_TIMEOUT=$lane_limit
for n in "${pending[@]}"; do
    { echo "LANEK-META name=$n $(meta "${FILE_OF[$n]}")"; echo "LANEK-RESULT $n not-run"; } > "$OUT/$n.log"
done

log "lane K total $(elapsed "$T_ALL") s"
echo "total host_wall=$(elapsed "$T_ALL")s" >> "$SUMMARY"
cat "$SUMMARY" >&2
[ "${LANEK_NO_CHECK:-0}" = 1 ] && exit 0
ensure_cmd python3 python3
logs=()
for n in "${names[@]}"; do logs+=("$OUT/$n.log"); done
exec python3 "$LANES_DIR/check-lane-k.py" "${logs[@]}"
