#!/bin/bash
# benches/storage.sh: guest disk throughput, hvmdm vs Debian's QEMU 7.2 (a benchmark, not a test;
# CI does not run it). Needs root (lane K builds its caches with apt).
#
# In ONE lane-K outer VM boot (TCG with nested KVM, tests/lanes/README.md), for each VMM and bus
# (IDE: PIIX3 with bus-master DMA; AHCI: ICH9 on the pc machine), boots the guest kit with one
# 64 MiB raw disk (same image content, a fresh copy per run, in the outer VM's RAM) and runs the
# kit's /bin/io-rate (tests/lanes/guest-tools/io-rate.c, O_DIRECT) on it: sequential read and
# write with 1 MiB requests, 4 KiB random reads at queue depth 1 and 8 (8 threads). Prints one
# row per VMM x bus (median over BENCH_N runs) and hvmdm/QEMU ratios. Absolute figures are
# nested-virtualisation figures (L2 on KVM on TCG); only the ratios between VMMs mean something.
#
# Environment: BENCH_N (runs per VMM x bus, default 1), BENCH_SECS (seconds per measurement,
# default 5), BENCH_VMMS (default "hvmdm qemu"; "qemu" alone until hvmdm has AHCI),
# BENCH_BUSES (default "ide ahci"), HVMDM_BIN (default target/release/hvmdm),
# BENCH_OUT (default benches/out-storage), LANEK_SMP (outer vCPUs, default 1).
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
LANES_DIR=$REPO_DIR/tests/lanes
N=${BENCH_N:-1}
SECS=${BENCH_SECS:-5}
VMMS=${BENCH_VMMS:-hvmdm qemu}
BUSES=${BENCH_BUSES:-ide ahci}
export HVMDM_BIN=${HVMDM_BIN:-$REPO_DIR/target/release/hvmdm}
export LANEK_OUT=${BENCH_OUT:-$BENCH_DIR/out-storage}
export LANEK_NO_CHECK=1
export LANEK_GUEST_TOOLS=1
case " $VMMS " in *" hvmdm "*) [ -x "$HVMDM_BIN" ] || { echo "storage.sh: $HVMDM_BIN not built (cargo build --release, or BENCH_VMMS=qemu)" >&2; exit 1; } ;; esac

PER_RUN=$((120 + 4 * SECS * 3))
runs=$(( N * $(echo $VMMS | wc -w) * $(echo $BUSES | wc -w) ))
export LANEK_TIMEOUT=${LANEK_TIMEOUT:-$((120 + runs * PER_RUN))}
export LANEK_TOTAL_TIMEOUT=${LANEK_TOTAL_TIMEOUT:-$((LANEK_TIMEOUT + 900))}

rm -rf "$LANEK_OUT"
mkdir -p "$LANEK_OUT"
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
files=()
for i in $(seq 1 "$N"); do
    for bus in $BUSES; do
        for vmm in $VMMS; do
            needs=; [ "$vmm" = hvmdm ] && needs=hvmdm
            f=$gen/storage-$(printf %02d "$i")-$bus-$vmm.sh
            sed -e "s/@VMM@/$vmm/g" -e "s/@BUS@/$bus/g" -e "s/@TIMEOUT@/$PER_RUN/" -e "s/@SECS@/$SECS/" \
                -e "s/@NEEDS@/$needs/" "$BENCH_DIR/storage-run.sh.in" > "$f"
            files+=("$f")
        done
    done
done

"$LANES_DIR/run-lane-k.sh" "${files[@]}"
logs=()
for f in "${files[@]}"; do logs+=("$LANEK_OUT/$(basename "$f" .sh).log"); done
python3 "$LANES_DIR/check-lane-k.py" "${logs[@]}" > "$LANEK_OUT/checks.txt" || true
python3 - "${logs[@]}" <<'PY' | tee "$LANEK_OUT/report.txt"
import os, re, statistics, sys
rows = {}
for path in sys.argv[1:]:
    m = re.match(r"storage-\d+-(\w+)-(\w+)\.log$", os.path.basename(path))
    if not m or not os.path.exists(path):
        continue
    bus, vmm = m.groups()
    for line in open(path, errors="replace"):
        i = line.find("HVMDM-IORATE ")
        if i < 0:
            continue
        kv = dict(x.split("=", 1) for x in line[i:].split()[1:] if "=" in x)
        key = kv["mode"] + ("" if kv["mode"] != "randread" else "-qd" + kv["threads"])
        val = float(kv["mbs"] if kv["mode"].startswith("seq") else kv["iops"])
        rows.setdefault((bus, vmm), {}).setdefault(key, []).append(val)
cols = [("seqread", "seq read MB/s"), ("seqwrite", "seq write MB/s"),
        ("randread-qd1", "4k rand read IOPS qd1"), ("randread-qd8", "4k rand read IOPS qd8")]
med = lambda v: statistics.median(v) if v else None
fmt = lambda x: "-" if x is None else ("%.1f" % x)
print("%-6s %-6s " % ("bus", "vmm") + " ".join("%22s" % c[1] for c in cols))
for (bus, vmm), r in sorted(rows.items()):
    print("%-6s %-6s " % (bus, vmm) + " ".join("%22s" % fmt(med(r.get(k, []))) for k, _ in cols))
for bus in sorted({b for b, _ in rows}):
    h, q = rows.get((bus, "hvmdm")), rows.get((bus, "qemu"))
    if not h or not q:
        continue
    rat = []
    for k, _ in cols:
        a, b = med(h.get(k, [])), med(q.get(k, []))
        rat.append("-" if not a or not b else "%.2f" % (a / b))
    print("%-6s %-6s " % (bus, "ratio") + " ".join("%22s" % x for x in rat) +
          "   (hvmdm/QEMU; targets: >= 1.2 sequential, >= 1.0 IOPS)")
if not rows:
    print("no HVMDM-IORATE results (see %s)" % os.path.dirname(sys.argv[1]))
PY
