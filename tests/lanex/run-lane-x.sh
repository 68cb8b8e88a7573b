#!/bin/bash
# run-lane-x.sh [SCENARIO-FILE|NAME ...]: lane X — real Xen 4.17 + libxl inside a TCG VM.
# Without arguments: every tests/lanex/scenarios/*.sh with SCENARIO_DEFAULT != 0.
# Builds (or reuses) the dom0 cache (build-dom0.sh), lane K's guest kit
# (tests/lanes/build-guest-kit.sh) and the SYSLINUX boot disk (build-boot-disk.sh); appends an
# overlay cpio (/init = dom0-init.sh, scenario.sh, the scenarios, boot.img, hvmdm + its libraries)
# to dom0.cpio; boots Xen under qemu-system-x86_64 -accel tcg with Debian's kernel as dom0; splits
# the console into tests/lanex/out/<scenario>.log; runs check-lane-x.py on them.
#
# Environment:
#   HVMDM_BIN=path          hvmdm binary for scenarios with SCENARIO_NEEDS=hvmdm
#                           (default: target/release/hvmdm; such scenarios are SKIPped without it)
#   LANEX_TIMEOUT=SECS      hard limit for the outer VM (default 180 + the sum of the scenarios'
#                           SCENARIO_TIMEOUT, 600 each when unset)
#   LANEX_TOTAL_TIMEOUT=S   hard limit for the whole lane incl. cache builds (default
#                           LANEX_TIMEOUT + 300)
#   LANEX_GUEST_APPEND=...  extra guest kernel arguments for every scenario (build-boot-disk.sh)
#   LANEX_XEN_APPEND=...    extra Xen command line arguments
#   LANEX_DOM0_APPEND=...   extra dom0 kernel arguments (e.g. lanex.debug=1)
#   LANEX_CPU=...           outer -cpu (default max,-smap,-smep,-rdtscp; see specs/test-lanes.md)
#   LANEX_NO_CHECK=1        do not run check-lane-x.py
source "$(dirname "$0")/lib.sh"

HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
CPU=${LANEX_CPU:-max,-smap,-smep,-rdtscp}
SCEN_DIR=$LANEX_DIR/scenarios

select_scenarios "$SCEN_DIR" "$@"
# The outer VM gets dom0's boot plus every scenario's own limit (dom0-init.sh enforces those).
limits=180
for f in "${files[@]}"; do
    l=$(. "$f"; echo "${SCENARIO_TIMEOUT:-600}")
    limits=$((limits + l))
done
BOOT_TIMEOUT=${LANEX_TIMEOUT:-$limits}
TOTAL_TIMEOUT=${LANEX_TOTAL_TIMEOUT:-$((BOOT_TIMEOUT + 300))}

# Whole-lane watchdog: CI must never hang here.
if [ -z "${LANEX_WATCHDOG:-}" ]; then
    export LANEX_WATCHDOG=1
    exec timeout -s TERM -k 30 "$TOTAL_TIMEOUT" "$0" "$@"
fi
need_root
ensure_cmd qemu-system-x86_64 qemu-system-x86
ensure_cmd python3 python3

T_ALL=$(now)
D=$("$LANEX_DIR/build-dom0.sh")
KIT=$("$LANES_DIR/build-guest-kit.sh")
IMG=$("$LANEX_DIR/build-boot-disk.sh" "$KIT")
log "caches ready in $(elapsed "$T_ALL") s"
mkdir -p "$XOUT"

meta() { # FILE -> one line of metadata for the checker
    ( SCENARIO_NEEDS= SCENARIO_DM= SCENARIO_DMLOG_IGNORE= SCENARIO_HDTYPE=ide SCENARIO_CHECKS="marker disk pci acpi-errors fwlog gone exit"
      SCENARIO_PCI="8086:1237 8086:7000 8086:7010"
      . "$1"
      ign=${SCENARIO_DMLOG_IGNORE:-}
      echo "needs=${SCENARIO_NEEDS:-none} hdtype=$SCENARIO_HDTYPE dm=${SCENARIO_DM:-default} checks=${SCENARIO_CHECKS// /,} pci=${SCENARIO_PCI// /,}${ign:+ dmlog_ignore=${ign// /.}}" )
}
# disk_for FILE -> the boot image for that scenario: the default one, or a variant with the
# scenario's SCENARIO_GUEST_APPEND / SCENARIO_GUEST_MODULES (cached per variant).
disk_for() {
    local app mods
    app=$(. "$1"; echo "${SCENARIO_GUEST_APPEND:-}")
    mods=$(. "$1"; echo "${SCENARIO_GUEST_MODULES:-}")
    if [ -z "$app" ] && [ -z "$mods" ]; then echo "$IMG"; return; fi
    LANEX_GUEST_APPEND="${LANEX_GUEST_APPEND:-} $app" LANEX_GUEST_MODULES="$mods" \
        "$LANEX_DIR/build-boot-disk.sh" "$KIT"
}
declare -A DISK

ov=$(mktemp -d)
trap 'rm -rf "$ov"' EXIT
mkdir -p "$ov/lanex/scenarios" "$ov/lanex/bin"
names=()
need_hvmdm=0
for f in "${files[@]}"; do
    n=$(basename "$f" .sh)
    names+=("$n")
    m=$(meta "$f")
    rm -f "$XOUT/$n.log"
    if [ "$(. "$f"; echo "${SCENARIO_NEEDS:-}")" = hvmdm ]; then
        if [ ! -x "$HVMDM_BIN" ]; then
            { echo "LANEX-META name=$n $m"; echo "LANEX-SKIP $n $HVMDM_BIN not built"; } > "$XOUT/$n.log"
            log "skip $n: $HVMDM_BIN not built"
            continue
        fi
        need_hvmdm=1
    fi
    cp "$f" "$ov/lanex/scenarios/$n.sh"
    DISK[$n]=$(disk_for "$f")
    if [ "${DISK[$n]}" != "$IMG" ]; then
        mkdir -p "$ov/lanex/disks"
        cp "${DISK[$n]}" "$ov/lanex/disks/$n.img"
    fi
done
install -m 0755 "$LANEX_DIR/dom0-init.sh" "$ov/init"
install -m 0755 "$LANEX_DIR/scenario.sh" "$ov/lanex/scenario.sh"
cp "$IMG" "$ov/lanex/boot.img"
if [ "$need_hvmdm" = 1 ]; then
    # Only libraries dom0 lacks: the host's copies (e.g. a newer libxen* security build) must not
    # replace the ones dom0's toolstack was installed with.
    install -m 0755 "$HVMDM_BIN" "$ov/lanex/bin/hvmdm"
    for lib in $(ldd "$HVMDM_BIN" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
        rel=${lib#/}; rel=${rel#usr/}
        grep -qxF -e "usr/$rel" -e "$rel" "$D/dom0.files" && continue
        mkdir -p "$ov/$(dirname "$lib")"
        cp -L "$lib" "$ov/$lib"
        log "hvmdm: adding $lib (not in dom0)"
    done
fi

console=$XOUT/console.log
stderr=$XOUT/qemu.stderr
initrd=$XOUT/dom0+overlay.cpio
if [ -n "$(ls "$ov/lanex/scenarios")" ]; then
    mkcpio "$ov" "$XOUT/overlay.cpio"
    cat "$D/dom0.cpio" "$XOUT/overlay.cpio" > "$initrd"
    rm -f "$XOUT/overlay.cpio"
    XEN_APPEND="console=com1 com1=115200 dom0_mem=1536M,max:1536M dom0_max_vcpus=1 loglvl=all guest_loglvl=all noreboot conring_size=1m ${LANEX_XEN_APPEND:-}"
    DOM0_APPEND="console=hvc0 rdinit=/init ${LANEX_DOM0_APPEND:-}"
    # QEMU's multiboot loader: modules are comma-separated "path args"; a literal comma is ",,".
    log "booting Xen (outer -cpu $CPU, limit $BOOT_TIMEOUT s) for: $(ls "$ov/lanex/scenarios" | sed 's/\.sh$//' | tr '\n' ' ')"
    t0=$(now)
    t0us=${EPOCHREALTIME/./}
    set +e
    # Host timestamps (s since QEMU start) on every console line: boot/toolstack timings.
    timeout -s KILL "$BOOT_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu "$CPU" -m 3072 -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$D/xen" -append "$XEN_APPEND" \
        -initrd "$D/vmlinuz ${DOM0_APPEND//,/,,},$initrd" < /dev/null 2> "$stderr" |
        stdbuf -oL tr -d '\r' | while IFS= read -r l; do
            d=$(( (${EPOCHREALTIME/./} - t0us) / 100000 ))
            printf '%d.%d %s\n' $((d / 10)) $((d % 10)) "$l"
            case "$l" in
                LANEX-LOG*) ;;
                LANEX-*|*"Kernel panic"*|*"(XEN) Panic"*) log "outer: $l" ;;
            esac
        done > "$console.ts"
    qrc=${PIPESTATUS[0]}
    set -e
    wall=$(elapsed "$t0")
    rm -f "$initrd"
    sed 's/^[0-9.]* //' "$console.ts" > "$console"
    log "outer VM exit $qrc after $wall s"
    at() { awk -v k="$1" '$2 == k { print $1; exit }' "$console.ts"; }
    echo "outer_exit=$qrc host_wall=${wall}s dom0_init=$(at LANEX-BOOT)s toolstack=$(at LANEX-TOOLSTACK)s all_done=$(at LANEX-ALL-DONE)s" > "$XOUT/summary.txt"

    for n in "${names[@]}"; do
        [ -f "$ov/lanex/scenarios/$n.sh" ] || continue
        {
            echo "LANEX-META name=$n $(meta "$ov/lanex/scenarios/$n.sh")"
            echo "LANEX-EXPECT disk-sha256 $(cat "${DISK[$n]}.sha256")"
            echo "LANEX-HOST outer_exit=$qrc host_wall=${wall}s dom0_init_s=$(at LANEX-BOOT) toolstack_s=$(at LANEX-TOOLSTACK) start_s=$(awk -v n="$n" '$2 == "LANEX-START" && $3 == n { print $1; exit }' "$console.ts")"
            grep '^LANEX-INFO ' "$console" || true
            # Everything Xen and dom0 printed while the scenario ran ((d1) firmware lines, dom0
            # kernel messages), then the scenario's own streams and results.
            awk -v n="$n" '$1 == "LANEX-START" && $2 == n { on = 1; next }
                           $1 == "LANEX-RESULT" && $2 == n { on = 0 }
                           on && $1 !~ /^LANEX-/ { print "outer| " $0 }' "$console"
            awk -v n="$n" '$1 == "LANEX-LOG" && $2 == n { s = $3; sub(/^LANEX-LOG [^ ]+ [^ ]+ ?/, ""); print s "| " $0 }' "$console"
            grep -E "^LANEX-(MEASURE|RESULT) $n " "$console" || true
            if ! grep -q "^LANEX-RESULT $n " "$console"; then
                echo "LANEX-RESULT $n outer-died outer_exit=$qrc"
                sed 's/^/qemu| /' "$stderr"
                tail -n 60 "$console" | sed 's/^/tail| /'
            fi
        } > "$XOUT/$n.log"
        grep -hE "^LANEX-(MEASURE|RESULT) $n " "$XOUT/$n.log" | sed 's/^/  /' >> "$XOUT/summary.txt" || true
    done
fi
log "lane X total $(elapsed "$T_ALL") s"
echo "total host_wall=$(elapsed "$T_ALL")s" >> "$XOUT/summary.txt"
cat "$XOUT/summary.txt" >&2
[ "${LANEX_NO_CHECK:-0}" = 1 ] && exit 0
logs=()
for n in "${names[@]}"; do logs+=("$XOUT/$n.log"); done
exec python3 "$LANEX_DIR/check-lane-x.py" "${logs[@]}"
