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
#   h_*        the same two intervals on the host's clock (timestamps of scenario.sh's live
#              step lines on the outer console; ~0.1 s coarser, immune to dom0 clock trouble)
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
# BENCH_GUEST_TIMEOUT (s from unpause to the marker, default 900), HVMDM_BIN (default
# target/release/hvmdm), BENCH_OUT (default benches/out/xen), BENCH_REPORT_ONLY=1 (no run:
# report again from the logs in BENCH_OUT, same BENCH_N),
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
[ "${BENCH_REPORT_ONLY:-0}" = 1 ] || [ -x "$HVMDM_BIN" ] || { echo "xen.sh: $HVMDM_BIN not built (cargo build --release)" >&2; exit 1; }
[ "$N" -ge 1 ] 2>/dev/null || { echo "xen.sh: BENCH_N must be >= 1" >&2; exit 1; }
if [ "$PIO" = 1 ]; then
    export LANEK_GUEST_TOOLS=1
    export LANEX_GUEST_APPEND="${LANEX_GUEST_APPEND:-} rdinit=/bin/pio-rate"
fi

# One outer boot for all runs: ~15 s to the toolstack, then ~4-5 min per run (IDE under TCG) on
# an idle host, over 10 min on a loaded one: generous limits (limits only, not waits).
GUEST_TIMEOUT=${BENCH_GUEST_TIMEOUT:-900}
PER_RUN=$((GUEST_TIMEOUT + 180))
# On a loaded host dom0's own TSC calibration can fail (seen once: 295509 MHz for a 2596 MHz
# TSC), leaving dom0's clock ~100x slow (scenario timings, sleeps, DM timers): then retry, or
# try LANEX_DOM0_APPEND=clocksource=xen (not proven: its one run hit the host-load stall of
# benches/README.md).
export LANEX_DOM0_APPEND="${LANEX_DOM0_APPEND:-} lanex.timeout=$PER_RUN"
export LANEX_TIMEOUT=${LANEX_TIMEOUT:-$((120 + 2 * N * PER_RUN))}
export LANEX_TOTAL_TIMEOUT=${LANEX_TOTAL_TIMEOUT:-$((LANEX_TIMEOUT + 600))}

gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
files=()
for i in $(seq 1 "$N"); do
    for dm in hvmdm qemu-xen; do
        # dom0 runs /lanex/scenarios/*.sh in name order: bench-01-hvmdm, bench-01-qemu-xen, ...
        f=$gen/bench-$(printf %02d "$i")-$dm.sh
        cp "$LANEX_DIR/scenarios/$dm-ide.sh" "$f"
        echo "SCENARIO_GUEST_TIMEOUT=$GUEST_TIMEOUT" >> "$f"
        files+=("$f")
    done
done

if [ "${BENCH_REPORT_ONLY:-0}" != 1 ]; then
    rm -rf "$LANEX_OUT"
    mkdir -p "$LANEX_OUT"
    "$LANEX_DIR/run-lane-x.sh" "${files[@]}"
fi
logs=()
for f in "${files[@]}"; do logs+=("$LANEX_OUT/$(basename "$f" .sh).log"); done
python3 "$LANEX_DIR/check-lane-x.py" "${logs[@]}" > "$LANEX_OUT/checks.txt" || true

python3 - "$LANEX_OUT/checks.txt" "$LANEX_OUT/console.log.ts" "${logs[@]}" <<'PYEOF' | tee "$LANEX_OUT/report.txt"
import os, re, statistics, sys

checks = open(sys.argv[1]).read().splitlines()
# Host timestamps (s since the outer QEMU started) of each scenario's live LANEX-LOG lines.
host = {}
if os.path.exists(sys.argv[2]):
    for line in open(sys.argv[2], errors="replace"):
        p = line.rstrip("\n").split(" ", 5)
        if len(p) >= 5 and p[1] == "LANEX-LOG":
            host.setdefault(p[2], []).append((float(p[0]), p[3], p[4] + " " + (p[5] if len(p) > 5 else "")))
rows = []
for path in sys.argv[3:]:
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
            # From the serial stream or, via Xen's debug port 0xe9, the outer console ("(dN) ").
            m = re.search(r"HVMDM-PIORATE port=0x([0-9a-f]+) .*per_s=([0-9]+)", line)
            if m and (line.startswith("serial|") or line.startswith("outer|")):
                key = {"64": "dm_pio", "21": "xen_pio"}.get(m.group(1))
                if key and key not in r:
                    r[key] = float(m.group(2))
    # The same intervals on the host's clock: the last cfg line (just before `xl create -p`) to
    # the create step, the unpause step to the HVMDM-DONE step (dom0 polls every 0.5 s).
    ev = host.get(name, [])
    t_cfg = [t for t, s, _ in ev if s == "cfg"]
    t_cre = [t for t, s, m in ev if s == "step" and m.startswith("xl create -p")]
    t_unp = [t for t, s, m in ev if s == "step" and m.startswith("unpaused")]
    t_done = [t for t, s, m in ev if s == "step" and m.startswith("HVMDM-DONE")]
    if t_cfg and t_cre:
        r["h_create_s"] = t_cre[0] - t_cfg[-1]
    if t_unp and t_done:
        r["h_marker_s"] = t_done[0] - t_unp[0]
    rows.append(r)

cols = [("create_s", "%.1f"), ("h_create_s", "%.1f"), ("marker_s", "%.1f"), ("h_marker_s", "%.1f"),
        ("uptime_s", "%.1f"),
        ("dm_rss_kb", "%.0f"), ("dm_pio", "%.0f"), ("xen_pio", "%.0f")]
head = ["run", "ok"] + [c if c not in ("dm_pio", "xen_pio") else c + "/s" for c, _ in cols]
fmt = "%-22s %-3s" + " %11s" * len(cols)
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
