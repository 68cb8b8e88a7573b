#!/bin/bash
# benches/boot.sh: boot-time / memory / size benchmark, hvmdm vs Debian's QEMU (a benchmark,
# not a test; CI does not run it). Needs root (lane K builds its caches with apt).
#
# In ONE lane-K outer VM boot (TCG with nested KVM, see tests/lanes/README.md), boots the same
# guest with hvmdm and with `qemu-system-x86_64 -machine pc -enable-kvm`, alternating, N times
# each: guest kit kernel + initramfs, SeaBIOS (bios-256k.bin), direct kernel boot, the IDE test
# disk (a fresh copy per run), same RAM and vCPUs. Every run is also a lane-K scenario, so the
# usual checks prove each boot was complete (column "ok").
#
# Per run and as medians: wall time from VMM start to the HVMDM-DONE console line (timestamped
# inside the outer VM as it arrives), the guest's own uptime at that marker (HVMDM-UPTIME), their
# difference (VMM start + firmware + kernel loading: the device model's share), the VMM's CPU
# time (busybox `time -v`), its peak RSS (VmHWM sampled every 50 ms until it exits; includes the
# guest RAM the guest touched) and its RSS at HVMDM-DONE minus the resident guest RAM; binary
# sizes; hvmdm/QEMU ratios. Absolute times are nested-virtualisation times (L2 on KVM on TCG).
#
# Environment: BENCH_N (runs per VMM, default 5), BENCH_SMP (guest vCPUs, default 1),
# BENCH_MEM (guest MiB, default 512), HVMDM_BIN (default target/release/hvmdm),
# BENCH_OUT (default benches/out), LANEK_SMP (outer vCPUs, default 1).
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
LANES_DIR=$REPO_DIR/tests/lanes
N=${BENCH_N:-5}
SMP=${BENCH_SMP:-1}
MEM=${BENCH_MEM:-512}
export HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
export LANEK_OUT=${BENCH_OUT:-$BENCH_DIR/out}
export LANEK_NO_CHECK=1
[ -x "$HVMDM_BIN" ] || { echo "boot.sh: $HVMDM_BIN not built (cargo build --release)" >&2; exit 1; }
[ "$N" -ge 1 ] 2>/dev/null || { echo "boot.sh: BENCH_N must be >= 1" >&2; exit 1; }

# One outer boot for all runs (a run takes ~20 s; a run's own limit is PER_RUN). If the outer
# VM dies or freezes, the runs not yet started continue in a fresh one (run-lane-k.sh).
PER_RUN=240
export LANEK_TIMEOUT=${LANEK_TIMEOUT:-$((120 + 2 * N * 150))}
export LANEK_TOTAL_TIMEOUT=${LANEK_TOTAL_TIMEOUT:-$((LANEK_TIMEOUT + 900))}

rm -rf "$LANEK_OUT"
mkdir -p "$LANEK_OUT"
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
files=()
for i in $(seq 1 "$N"); do
    for vmm in hvmdm qemu; do
        f=$gen/bench-$(printf %02d "$i")-$vmm.sh
        sed -e "s/@VMM@/$vmm/g" -e "s/@TIMEOUT@/$PER_RUN/" -e "s/@SMP@/$SMP/" -e "s/@MEM@/$MEM/" \
            "$BENCH_DIR/bench-run.sh.in" > "$f"
        files+=("$f")
    done
done

"$LANES_DIR/run-lane-k.sh" "${files[@]}"
logs=()
for f in "${files[@]}"; do logs+=("$LANEK_OUT/$(basename "$f" .sh).log"); done
python3 "$LANES_DIR/check-lane-k.py" "${logs[@]}" > "$LANEK_OUT/checks.txt" || true
python3 "$BENCH_DIR/report.py" --hvmdm "$HVMDM_BIN" --qemu /usr/bin/qemu-system-x86_64 \
    --checks "$LANEK_OUT/checks.txt" "${logs[@]}" | tee "$LANEK_OUT/report.txt"
