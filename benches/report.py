#!/usr/bin/env python3
"""report.py --hvmdm BIN --qemu BIN [--checks FILE] LOG...: the benches/boot.sh table.

LOGs are lane-K scenario logs of benches/bench-run.sh.in runs (serial lines carry the outer
VM's uptime as a prefix; BENCH-SNAP/BENCH-RUN/BENCH-TIME lines come from the scenario).
"""
import argparse
import os
import re
import statistics
import subprocess
import tempfile

# glibc's own libraries: not counted in "binary + non-libc shared libraries".
GLIBC = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libresolv.so.2",
         "ld-linux-x86-64.so.2", "libutil.so.1", "libanl.so.1", "linux-vdso.so.1"}

# The targets for hvmdm/QEMU.
TARGET_SHARE = 0.5
TARGET_RSS = 0.25


def parse(path):
    r = {"name": os.path.basename(path)[:-4], "done": None, "uptime": None, "snap": {}, "run": {},
         "hwm": None, "cpu": 0.0}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            # Console lines carry the outer uptime at arrival; BENCH-* lines come unstamped.
            m = re.match(r"^serial\| ?(?:(\d+\.\d+) )?(.*)$", line)
            if m:
                t, text = (float(m.group(1)) if m.group(1) else None), m.group(2)
                if "HVMDM-DONE" in text and r["done"] is None and t is not None:
                    r["done"] = t
                u = re.search(r"HVMDM-UPTIME (\d+\.\d+)", text)
                if u and r["uptime"] is None:
                    r["uptime"] = float(u.group(1))
                s = text.find("BENCH-SNAP ")
                if s >= 0:
                    r["snap"] = dict(kv.split("=", 1) for kv in text[s:].split()[1:] if "=" in kv)
                s = text.find("BENCH-RUN ")
                if s >= 0:
                    r["run"] = dict(kv.split("=", 1) for kv in text[s:].split()[1:] if "=" in kv)
                m2 = re.search(r"BENCH-HWM vmhwm=(\d+)", text)
                if m2:
                    r["hwm"] = int(m2.group(1))
                m2 = re.search(r"BENCH-TIME (User|System) time \(seconds\): (\d+\.\d+)", text)
                if m2:
                    r["cpu"] += float(m2.group(2))
    r["vmm"] = r["run"].get("vmm", "hvmdm" if r["name"].endswith("hvmdm") else "qemu")
    t0 = float(r["run"]["t0"]) if "t0" in r["run"] else None
    r["wall"] = (r["done"] - t0) if (r["done"] is not None and t0 is not None) else None
    r["share"] = (r["wall"] - r["uptime"]) if (r["wall"] is not None and r["uptime"] is not None) else None
    sn = r["snap"]
    if "VmRSS" in sn and "guest_ram_rss" in sn:
        r["nonguest"] = int(sn["VmRSS"]) - int(sn["guest_ram_rss"])
    else:
        r["nonguest"] = None
    r["guestrss"] = int(sn["guest_ram_rss"]) if "guest_ram_rss" in sn else None
    if not r["cpu"]:
        r["cpu"] = None
    return r


def sizes(binary):
    """(binary bytes, stripped bytes or None, [(lib, bytes)] non-glibc libraries)."""
    b = os.path.getsize(binary)
    stripped = None
    with tempfile.TemporaryDirectory() as d:
        try:
            subprocess.run(["strip", "-o", os.path.join(d, "s"), binary], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stripped = os.path.getsize(os.path.join(d, "s"))
        except (OSError, subprocess.CalledProcessError):
            pass
    libs = []
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for line in out.splitlines():
        p = line.split()
        if not p or p[0] in GLIBC or os.path.basename(p[0]) in GLIBC:
            continue
        if len(p) >= 3 and p[1] == "=>" and p[2].startswith("/"):
            libs.append((p[0], os.path.getsize(os.path.realpath(p[2]))))
    return b, stripped, libs


def fmt(v, f="%.2f"):
    return "-" if v is None else f % v


def med(rs, key):
    v = [r[key] for r in rs if r[key] is not None]
    return statistics.median(v) if v else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hvmdm", required=True)
    ap.add_argument("--qemu", required=True)
    ap.add_argument("--checks")
    ap.add_argument("logs", nargs="+")
    a = ap.parse_args()

    fails = {}
    if a.checks and os.path.exists(a.checks):
        for line in open(a.checks):
            m = re.match(r"^FAIL ([^/:]+)(?:/([^:]+))?", line)
            if m:
                fails.setdefault(m.group(1), []).append(m.group(2) or "ran")

    runs = [parse(p) for p in a.logs if os.path.exists(p)]
    print("%-16s %-6s %10s %10s %10s %10s %11s %11s  %s" % (
        "run", "vmm", "to-DONE s", "guest-up s", "dm-share s", "VMM CPU s", "peakRSS MiB", "non-RAM MiB", "ok"))
    for r in runs:
        ok = "ok" if r["name"] not in fails else "FAIL:" + ",".join(fails[r["name"]])
        print("%-16s %-6s %10s %10s %10s %10s %11s %11s  %s" % (
            r["name"], r["vmm"], fmt(r["wall"]), fmt(r["uptime"]), fmt(r["share"]), fmt(r["cpu"]),
            fmt(r["hwm"] / 1024 if r["hwm"] else None, "%.1f"),
            fmt(r["nonguest"] / 1024 if r["nonguest"] is not None else None, "%.1f"), ok))

    good = [r for r in runs if r["name"] not in fails]
    by = {v: [r for r in good if r["vmm"] == v] for v in ("hvmdm", "qemu")}
    meds = {}
    print()
    print("medians over passing runs:")
    print("%-6s %3s %10s %10s %10s %10s %11s %12s %11s" % ("vmm", "n", "to-DONE s", "guest-up s", "dm-share s",
                                                          "VMM CPU s", "peakRSS MiB", "guestRAM MiB", "non-RAM MiB"))
    for v, rs in by.items():
        m = {k: med(rs, k) for k in ("wall", "uptime", "share", "cpu", "hwm", "guestrss", "nonguest")}
        meds[v] = m
        print("%-6s %3d %10s %10s %10s %10s %11s %12s %11s" % (
            v, len(rs), fmt(m["wall"]), fmt(m["uptime"]), fmt(m["share"]), fmt(m["cpu"]),
            fmt(m["hwm"] / 1024 if m["hwm"] else None, "%.1f"),
            fmt(m["guestrss"] / 1024 if m["guestrss"] is not None else None, "%.1f"),
            fmt(m["nonguest"] / 1024 if m["nonguest"] is not None else None, "%.1f")))

    hb, hs, hl = sizes(a.hvmdm)
    qb, qs, ql = sizes(a.qemu)
    htot = (hs or hb) + sum(s for _, s in hl)
    qtot = qb + sum(s for _, s in ql)
    print()
    print("binary sizes (glibc's libc/libm/libpthread/libdl/librt/libresolv/ld-linux not counted):")
    print("  hvmdm: %.2f MiB as built%s, + %d non-glibc libs (%s) %.2f MiB = %.2f MiB (stripped binary counted)"
          % (hb / 2**20, (", %.2f MiB stripped" % (hs / 2**20)) if hs else "", len(hl),
             " ".join(n for n, _ in hl), sum(s for _, s in hl) / 2**20, htot / 2**20))
    print("  qemu-system-x86_64: %.2f MiB, + %d non-glibc libs %.2f MiB = %.2f MiB"
          % (qb / 2**20, len(ql), sum(s for _, s in ql) / 2**20, qtot / 2**20))

    def ratio(k):
        h, q = meds["hvmdm"].get(k), meds["qemu"].get(k)
        return (h / q) if (h is not None and q) else None

    print()
    print("hvmdm/QEMU (medians):")
    rs, rr, rn = ratio("share"), ratio("hwm"), ratio("nonguest")
    print("  to-DONE wall      %s" % fmt(ratio("wall"), "%.2fx"))
    print("  device-model share %s   (target <= %.2fx: %s)" % (
        fmt(rs, "%.2fx"), TARGET_SHARE, "-" if rs is None else ("met" if rs <= TARGET_SHARE else "NOT met")))
    print("  VMM CPU time      %s" % fmt(ratio("cpu"), "%.2fx"))
    print("  peak RSS (VmHWM)  %s   (target <= %.2fx: %s)" % (
        fmt(rr, "%.2fx"), TARGET_RSS, "-" if rr is None else ("met" if rr <= TARGET_RSS else "NOT met")))
    print("  RSS without the resident guest RAM, at DONE %s" % fmt(rn, "%.2fx"))
    print("  binary + non-glibc libs %.2fx" % (htot / qtot))


if __name__ == "__main__":
    main()
