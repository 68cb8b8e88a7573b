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
#   LANEK_TOTAL_TIMEOUT=S  hard limit for the whole lane incl. cache builds (default 1200)
#   LANEK_OUTER_APPEND=... extra outer kernel args (e.g. lanek.kvm_amd=avic=0 lanek.debug=1)
#   LANEK_NO_CHECK=1       do not run check-lane-k.py
source "$(dirname "$0")/lib.sh"

HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
SMP=${LANEK_SMP:-1}
BOOT_TIMEOUT=${LANEK_TIMEOUT:-900}
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
files=()
if [ $# -eq 0 ]; then
    for f in "$SCEN_DIR"/*.sh; do
        d=$(. "$f"; echo "${SCENARIO_DEFAULT:-1}")
        [ "$d" = 0 ] || files+=("$f")
    done
else
    for a in "$@"; do
        if [ -f "$a" ]; then files+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")")
        elif [ -f "$SCEN_DIR/$a.sh" ]; then files+=("$SCEN_DIR/$a.sh")
        else die "no scenario $a"; fi
    done
fi

meta() { # FILE -> one line of metadata
    ( SCENARIO_TIMEOUT=300 SCENARIO_NEEDS= SCENARIO_DEFAULT=1 SCENARIO_ISOLATE=0
      SCENARIO_CHECKS="markers acpi errors pci disk exit fwlog"
      SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113" SCENARIO_ACPI="DSDT FACP APIC"
      SCENARIO_APPEND=
      . "$1"
      echo "timeout=$SCENARIO_TIMEOUT needs=$SCENARIO_NEEDS isolate=$SCENARIO_ISOLATE checks=${SCENARIO_CHECKS// /,} pci=${SCENARIO_PCI// /,} acpi=${SCENARIO_ACPI// /,}" )
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
    local n need=0
    for n in "$@"; do
        cp "${FILE_OF[$n]}" "$ov/lanek/scenarios/$n.sh"
        echo "$n" >> "$ov/lanek/list"
        grep -q '^SCENARIO_NEEDS=.*hvmdm' "${FILE_OF[$n]}" && need=1
    done
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
    set +e
    timeout -s KILL "$BOOT_TIMEOUT" qemu-system-x86_64 -accel "$accel" -cpu max -m 4096 -smp "$SMP" \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -kernel "$L/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 rdinit=/init loglevel=4 panic=1 ${LANEK_OUTER_APPEND:-}" \
        < /dev/null 2> "$stderr" | tr -d '\r' | tee "$console" | grep --line-buffered -v '^LANEK-LOG ' >&2
    local qrc=${PIPESTATUS[0]}
    set -e
    local wall; wall=$(elapsed "$t0")
    rm -f "$initrd"
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
            echo "LANEK-META name=$n $(meta "${FILE_OF[$n]}") batch=$b outer_smp=$SMP"
            echo "LANEK-EXPECT disk-sha256 $(cat "$KIT/disk.img.sha256")"
            awk -v n="$n" '$1 == "LANEK-LOG" && $2 == n { s = $3; sub(/^LANEK-LOG [^ ]+ [^ ]+ ?/, ""); print s "| " $0 }' "$console"
            if [ -n "$result" ]; then
                echo "$result"
            else
                echo "LANEK-RESULT $n outer-died outer_exit=$qrc"
                sed 's/^/outer| /' "$stderr"
                tail -n 40 "$console" | sed 's/^/outer| /'
            fi
        } > "$OUT/$n.log"
        [ -n "$result" ] && echo "  $result" >> "$SUMMARY"
    done
}

pending=("${shared[@]}")
tries=0
while [ ${#pending[@]} -gt 0 ] && [ $tries -lt 3 ]; do
    run_batch "${pending[@]}"
    if [ ${#REQUEUE[@]} -eq ${#pending[@]} ]; then tries=$((tries + 1)); else tries=0; fi
    pending=("${REQUEUE[@]}")
done
for n in "${isolated[@]}"; do
    run_batch "$n"
    [ ${#REQUEUE[@]} -eq 0 ] || pending+=("$n")
done
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
