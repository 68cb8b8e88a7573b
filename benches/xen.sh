#!/bin/bash
# benches/xen.sh: lane-X benchmark, hvmdm vs Debian's qemu-xen as the Xen HVM device model (a
# benchmark, not a test; CI does not run it). Needs root (lane X builds its caches with apt).
#
# In ONE lane-X outer boot (Xen 4.17 under TCG, see tests/lanex/README.md), creates the same HVM
# guest (IDE boot disk, SYSLINUX, lane K's guest kit) with device_model_override=hvmdm and with
# Debian's qemu-xen, alternating (hvmdm first), N times each. Every run is also a lane-X
# scenario (copies of scenarios/hvmdm-ide.sh and qemu-xen-ide.sh), so check-lane-x.py proves
# each boot was complete (column "ok" = its checks passed).
#
# Per run and as medians (from scenario.sh's LANEX-MEASURE line and the guest's serial stream):
#   create_s   `xl create -p` wall time (libxl spawns the DM and waits until it is running)
#   marker_s   unpause to the guest's HVMDM-DONE line (hvmloader + SeaBIOS + boot + checks)
#   uptime_s   the guest kernel's uptime at HVMDM-DONE (marker_s - uptime_s = firmware and
#              boot loader, where the DM serves every disk sector one PIO ioreq at a time)
#   dm_rss_kb  the device model's peak RSS (VmHWM, sampled at HVMDM-DONE)
#   dm_pio/s   the guest's `inb` round trips per second on port 0x64 (i8042 status: no Xen
#              emulator claims it, so each read is one ioreq to the DM and back; served by both
#              DMs) and xen_pio/s on port 0x21 (8259 IMR, Xen's own vPIC: the same trap
#              without the DM, the baseline). Measured by tests/lanes/guest-tools/pio-rate.c,
#              run as a pre-init (rdinit=/bin/pio-rate) before the kit's /init.
# and the ratios hvmdm/qemu-xen. Absolute times are Xen-under-TCG times: compare ratios.
#
# Environment: BENCH_N (runs per DM, default 1: a run takes ~5 min), BENCH_PIO (1 = build the
# kit with pio-rate and measure the PIO rate, default 1; 0 = lane X's own kit and boot disk),
# HVMDM_BIN (default target/release/hvmdm), BENCH_OUT (default benches/out/xen),
# LANEX_CACHE / LANEK_CACHE (reuse another checkout's caches; note the kit/boot disk of the
# other variant is pruned there when BENCH_PIO differs from its last build).
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
LANEX_DIR=$REPO_DIR/tests/lanex
N=${BENCH_N:-1}
PIO=${BENCH_PIO:-1}
export HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
export LANEX_OUT=${BENCH_OUT:-$BENCH_DIR/out/xen}
export LANEX_NO_CHECK=1
[ -x "$HVMDM_BIN" ] || { echo "xen.sh: $HVMDM_BIN not built (cargo build --release)" >&2; exit 1; }
[ "$N" -ge 1 ] 2>/dev/null || { echo "xen.sh: BENCH_N must be >= 1" >&2; exit 1; }
if [ "$PIO" = 1 ]; then
    export LANEK_GUEST_TOOLS=1
    export LANEX_GUEST_APPEND="${LANEX_GUEST_APPEND:-} rdinit=/bin/pio-rate"
fi

# One outer boot for all runs: ~15 s to the toolstack, then ~4-5 min per run (IDE under TCG).
PER_RUN=480
export LANEX_TIMEOUT=${LANEX_TIMEOUT:-$((120 + 2 * N * PER_RUN))}
export LANEX_TOTAL_TIMEOUT=${LANEX_TOTAL_TIMEOUT:-$((LANEX_TIMEOUT + 600))}

rm -rf "$LANEX_OUT"
mkdir -p "$LANEX_OUT"
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
files=()
for i in $(seq 1 "$N"); do
    for dm in hvmdm qemu-xen; do
        # dom0 runs /lanex/scenarios/*.sh in name order: bench-01-hvmdm, bench-01-qemu-xen, ...
        f=$gen/bench-$(printf %02d "$i")-$dm.sh
        cp "$LANEX_DIR/scenarios/$dm-ide.sh" "$f"
        files+=("$f")
    done
done

"$LANEX_DIR/run-lane-x.sh" "${files[@]}"
logs=()
for f in "${files[@]}"; do logs+=("$LANEX_OUT/$(basename "$f" .sh).log"); done
python3 "$LANEX_DIR/check-lane-x.py" "${logs[@]}" > "$LANEX_OUT/checks.txt" || true

python3 - "$LANEX_OUT/checks.txt" "${logs[@]}" <<'PYEOF' | tee "$LANEX_OUT/report.txt"
import os, re, statistics, sys

checks = open(sys.argv[1]).read().splitlines()
rows = []
for path in sys.argv[2:]:
    name = os.path.basename(path)[:-4]
    dm = "hvmdm" if name.endswith("-hvmdm") else "qemu-xen"
    r = {"name": name, "dm": dm}
    fails = [l for l in checks if l.startswith("FAIL %s/" % name) or l == "FAIL " + name]
    passes = [l for l in checks if l.startswith("PASS %s/" % name)]
    r["ok"] = "yes" if passes and not fails else "NO"
    if os.path.exists(path):
        for line in open(path, errors="replace"):
            line = line.rstrip("\n")
            if line.startswith("LANEX-MEASURE "):
                kv = dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)
                for k in ("create_s", "marker_s", "dm_rss_kb"):
                    try:
                        r[k] = float(kv.get(k, ""))
                    except ValueError:
                        pass
            elif line.startswith("serial|"):
                m = re.search(r"HVMDM-UPTIME ([0-9.]+)", line)
                if m:
                    r["uptime_s"] = float(m.group(1))
                m = re.search(r"HVMDM-PIORATE port=0x([0-9a-f]+) .*per_s=([0-9]+)", line)
                if m:
                    key = {"64": "dm_pio", "21": "xen_pio"}.get(m.group(1))
                    if key:
                        r[key] = float(m.group(2))
    rows.append(r)

cols = [("create_s", "%.1f"), ("marker_s", "%.1f"), ("uptime_s", "%.1f"),
        ("dm_rss_kb", "%.0f"), ("dm_pio", "%.0f"), ("xen_pio", "%.0f")]
head = ["run", "ok"] + [c if c not in ("dm_pio", "xen_pio") else c + "/s" for c, _ in cols]
fmt = "%-22s %-3s" + " %10s" * len(cols)
print(fmt % tuple(head))
for r in rows:
    print(fmt % tuple([r["name"], r["ok"]] + [f % r[c] if c in r else "-" for c, f in cols]))

def med(dm, c):
    v = [r[c] for r in rows if r["dm"] == dm and c in r and r["ok"] == "yes"]
    return statistics.median(v) if v else None

print()
print("medians over passing runs (%d hvmdm, %d qemu-xen):" % (
    sum(r["dm"] == "hvmdm" and r["ok"] == "yes" for r in rows),
    sum(r["dm"] == "qemu-xen" and r["ok"] == "yes" for r in rows)))
print("%-12s %12s %12s %16s" % ("", "hvmdm", "qemu-xen", "hvmdm/qemu-xen"))
for c, f in cols:
    a, b = med("hvmdm", c), med("qemu-xen", c)
    ratio = "%.2f" % (a / b) if a is not None and b else "-"
    print("%-12s %12s %12s %16s" % (c, f % a if a is not None else "-", f % b if b is not None else "-", ratio))
print("(times: lower is better; dm_pio/s: higher is better; xen_pio/s is Xen's own emulation,"
      " a ratio near 1 shows the two runs had comparable host load)")
PYEOF
