#!/usr/bin/env python3
"""check-lane-k.py [LOG|NAME ...]: assert lane-K scenario results.

Reads tests/lanes/out/<scenario>.log as written by run-lane-k.sh (all logs in out/
when no argument is given). Prints one `PASS scenario/check` or
`FAIL scenario/check: reason` line per check, `SKIP scenario: reason` for skipped
scenarios, `BLOCKED scenario: reason` for a scenario that hit its declared known outer-VM
failure (SCENARIO_BLOCKED; counted as skipped), and ends with exactly
`N passed, M failed, K skipped`. Exit status 1 when anything failed (or nothing was
checked), else 0.
"""
import os
import re
import sys

OUT = os.environ.get("LANEK_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))

ALL_CHECKS = ["markers", "exit", "acpi", "errors", "pci", "disk", "fwlog", "fwlog-present", "reboot", "storage"]

# guest-init.sh hvmdm.storage roles the guest writes (1 MiB at size/2 - 512 KiB) and the one whose
# writes must fail; the rest are only read.
WRITE_ROLES = ("data", "qcow")
RO_ROLES = ("ro",)


def storage_problems(ms, host, expect, want):
    """Problems with the storage markers (guest-init.sh hvmdm.storage) and run-one.sh's HOST-*
    lines for the roles in `want` (plus `ncq`: NCQ in use on every written disk)."""
    bad = []
    rows = lambda key: [m.split()[1:] for m in ms if m.split(" ", 1)[0] == key]
    dev = {r[0]: r for r in rows("HVMDM-STORAGE-DEV") if r}
    read = {r[0]: r for r in rows("HVMDM-STORAGE-READ") if len(r) >= 4}
    wrote = {r[0]: r for r in rows("HVMDM-STORAGE-WRITE") if len(r) >= 7}
    ro = {r[0]: r for r in rows("HVMDM-STORAGE-RO") if len(r) >= 5}
    hsum = {}
    qcheck = None
    for l in host:
        f = l.split()
        if f and f[0] == "HOST-SUM" and len(f) >= 3:
            hsum[f[1]] = f[2:]
        elif f and f[0] == "HOST-QCOW-CHECK":
            qcheck = " ".join(f[1:])
    if not any(m.startswith("HVMDM-STORAGE-END") for m in ms):
        bad.append("no HVMDM-STORAGE-END (guest-init.sh hvmdm.storage did not finish)")
    kv = lambda row: dict(x.split("=", 1) for x in row if "=" in x)
    for role in want:
        if role == "ncq":
            continue
        exp = expect.get("storage-" + role)
        if role not in dev:
            bad.append("%s: no device (have %s)" % (role, " ".join(sorted(dev)) or "none"))
            continue
        r = read.get(role)
        if not exp:
            bad.append("%s: no expected checksum in the log" % role)
        elif not r:
            bad.append("%s: no HVMDM-STORAGE-READ" % role)
        elif r[3] != exp:
            bad.append("%s: read %s, expected %s" % (role, r[3][:16], exp[:16]))
        if role in WRITE_ROLES:
            w = wrote.get(role)
            if not w:
                bad.append("%s: no HVMDM-STORAGE-WRITE" % role)
                continue
            wsum, o = w[4], kv(w[5:])
            if o.get("rc") != "0":
                bad.append("%s: guest write failed rc=%s" % (role, o.get("rc")))
            if o.get("readback") != wsum:
                bad.append("%s: read back %s after writing %s" % (role, o.get("readback", "?")[:16], wsum[:16]))
            h = hsum.get(role)
            if not h or len(h) < 3:
                bad.append("%s: no HOST-SUM after poweroff" % role)
            else:
                if h[1] != wsum:
                    bad.append("%s: image region after poweroff %s, guest wrote %s (acknowledged and flushed data lost)"
                               % (role, h[1][:16], wsum[:16]))
                for part, got in (("pre", h[0]), ("post", h[2])):
                    if got != expect.get("storage-%s-%s" % (role, part)):
                        bad.append("%s: image changed outside the written region (%s)" % (role, part))
            if role == "qcow" and qcheck != "ok":
                bad.append("qcow: qemu-img check after the run: %s" % qcheck)
        if role in RO_ROLES:
            o = ro.get(role)
            if not o:
                bad.append("%s: no HVMDM-STORAGE-RO" % role)
            else:
                k = kv(o[2:])
                if k.get("rc") == "0":
                    bad.append("%s: write to the read-only disk succeeded" % role)
                if k.get("after") != exp:
                    bad.append("%s: device content changed after the refused write" % role)
            h = hsum.get(role)
            if not h or h[0] != exp:
                bad.append("%s: image file changed (%s)" % (role, (h or ["no HOST-SUM"])[0][:16]))
    if "ncq" in want:
        for role in WRITE_ROLES:
            if role not in want or role not in dev:
                continue
            k = kv(dev[role][3:])
            qd = k.get("qd", "?")
            if not qd.isdigit() or int(qd) <= 1 or k.get("ncq") != "1":
                bad.append("ncq: %s (%s) qd=%s ncq=%s" % (role, dev[role][1], qd, k.get("ncq")))
    return bad

# Printed once per SeaBIOS POST (also after an in-process reboot), right after the version
# banner; the banner itself is printed a second time when the VGA text console comes up.
SEABIOS_POST_RE = re.compile(r"^\s*BUILD: ")

# Firmware log strings that mean the firmware tripped over the device model's data:
# SeaBIOS warn_internalerror()/warn_noalloc()/warn_timeout(), OVMF's ACPI linker/loader
# (QemuFwCfgAcpi.c) and EDK2 assertions.
FW_BAD = [
    r"internal error",
    r"invalid checksum range",
    r"invalid blob reference",
    r"invalid pointer",
    r"Unable to allocate resource",
    r"WARNING - Timeout",
    r"Protocol Error",
    r"ProcessCmd\w+: .*(invalid|unsupported|failed|not found|too)",
    r"ASSERT [^ ]+\(\d+\)",
]
FW_BAD_RE = re.compile("|".join(FW_BAD), re.IGNORECASE)


def parse(path):
    d = {"meta": {}, "result": None, "skip": None, "blocked": None, "expect": {}, "streams": {}}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("LANEK-META "):
                for kv in line.split()[1:]:
                    if "=" in kv:
                        k, v = kv.split("=", 1)
                        d["meta"][k] = v
            elif line.startswith("LANEK-EXPECT "):
                p = line.split()
                if len(p) >= 3:
                    d["expect"][p[1]] = p[2]
            elif line.startswith("LANEK-RESULT "):
                d["result"] = line.split()[2:]
            elif line.startswith("LANEK-BLOCKED "):
                on, _, reason = line[len("LANEK-BLOCKED "):].partition("\t")
                d["blocked"] = (on.strip(), reason.strip())
            elif line.startswith("LANEK-SKIP "):
                d["skip"] = line.split(" ", 2)[2] if line.count(" ") >= 2 else "skipped"
            else:
                m = re.match(r"^(\w+)\| ?(.*)$", line)
                if m:
                    d["streams"].setdefault(m.group(1), []).append(m.group(2))
    return d


def markers(serial):
    """HVMDM-* lines from the L2 console. Marker lines may be preceded by noise on the
    same line (kernel output without a newline), so search rather than match."""
    res = []
    for line in serial:
        i = line.find("HVMDM-")
        if i >= 0:
            res.append(line[i:])
    return res


def first(ms, key):
    for m in ms:
        p = m.split(" ", 1)
        if p[0] == key:
            return p[1] if len(p) > 1 else ""
    return None


def count(ms, key):
    return sum(1 for m in ms if m.split(" ", 1)[0] == key)


def tail(lines, n=5):
    return " | ".join(l.strip() for l in lines[-n:] if l.strip())[:400]


def check(path, report):
    name = os.path.basename(path)[:-4] if path.endswith(".log") else os.path.basename(path)
    if not os.path.exists(path):
        report("FAIL", name, "ran", "no log %s" % path)
        return
    d = parse(path)
    if d["skip"] is not None:
        report("SKIP", name, None, d["skip"])
        return
    r = d["result"]
    if not r or r[0] in ("outer-died", "not-run"):
        why = "no result" if not r else " ".join(r)
        outer = d["streams"].get("outer", [])
        # A declared known outer-VM failure is not a result either way: report it as blocked
        # (skipped), but only when the outer QEMU died with exactly that message.
        if r and r[0] == "outer-died" and d["blocked"] and d["blocked"][0]:
            on, reason = d["blocked"]
            hit = [l for l in outer if on in l]
            if hit:
                text = hit[0][hit[0].find(on):].strip()
                report("BLOCKED", name, None, "%s (%s)" % (reason, text[:200]))
                return
        abort = [l for l in outer if "assert" in l.lower() or "abort" in l.lower()]
        report("FAIL", name, "ran", "%s%s" % (why, (": " + tail(abort or outer, 3)) if (abort or outer) else ""))
        return
    res = dict(kv.split("=", 1) for kv in r if "=" in kv)
    meta = d["meta"]
    checks = [c for c in meta.get("checks", ",".join(ALL_CHECKS)).split(",") if c]
    serial = d["streams"].get("serial", [])
    vmm = d["streams"].get("vmm", [])
    fw = d["streams"].get("fw", [])
    ms = markers(serial)

    for c in ALL_CHECKS:
        if c not in checks:
            continue
        ok, why = True, ""
        if c == "markers":
            missing = [k for k in ("HVMDM-READY", "HVMDM-DONE") if first(ms, k) is None]
            if missing:
                ok, why = False, "missing %s; last serial: %s" % (",".join(missing), tail(serial))
        elif c == "exit":
            if res.get("timeout") == "1":
                ok, why = False, "VMM killed after the scenario timeout (wall %ss)" % res.get("wall")
            elif res.get("exit") != "0":
                ok, why = False, "VMM exit status %s; stderr: %s" % (res.get("exit"), tail(vmm))
        elif c == "acpi":
            t = first(ms, "HVMDM-ACPI-TABLES")
            want = [x for x in meta.get("acpi", "DSDT,FACP,APIC").split(",") if x]
            if t is None:
                ok, why = False, "no HVMDM-ACPI-TABLES line"
            else:
                have = set(t.split())
                miss = [x for x in want if x not in have]
                if miss:
                    ok, why = False, "missing %s (have %s)" % (" ".join(miss), " ".join(sorted(have)))
        elif c == "errors":
            t = first(ms, "HVMDM-ACPI-ERRORS")
            lines = [m for m in ms if m.startswith("HVMDM-ACPI-ERROR ")]
            if t is None:
                ok, why = False, "no HVMDM-ACPI-ERRORS line"
            elif t.strip() != "0" or lines:
                ok, why = False, "%s error line(s): %s" % (t.strip(), tail(lines, 3))
        elif c == "pci":
            t = first(ms, "HVMDM-PCI")
            want = [x for x in meta.get("pci", "").split(",") if x]
            if t is None:
                ok, why = False, "no HVMDM-PCI line"
            else:
                have = set(t.split())
                miss = [x for x in want if x not in have]
                if miss:
                    ok, why = False, "missing %s (have %s)" % (" ".join(miss), " ".join(sorted(have)))
        elif c == "disk":
            t = first(ms, "HVMDM-DISK-SUM")
            exp = d["expect"].get("disk-sha256")
            # hvmdm.diskmib=N scenarios checksum only the first N MiB (e.g. the reboot mark
            # lives in the last MiB); the expectation is computed for the same N.
            mib = d["expect"].get("disk-mib", "16")
            f = t.split() if t is not None else []
            if t is None:
                ok, why = False, "no HVMDM-DISK-SUM line (block: %s)" % first(ms, "HVMDM-BLOCK")
            elif not exp:
                ok, why = False, "no expected checksum in the log"
            elif len(f) < 3 or f[1] != mib:
                ok, why = False, "checksummed %s MiB, expected %s MiB: %s" % (f[1] if len(f) > 1 else "?", mib, t)
            elif f[-1] != exp:
                ok, why = False, "got %s, expected %s" % (t, exp)
        elif c == "fwlog":
            bad = [l for l in fw if FW_BAD_RE.search(l)]
            if bad:
                ok, why = False, "%d bad line(s): %s" % (len(bad), tail(bad, 3))
        elif c == "fwlog-present":
            # Opt-in: a firmware that logs (SeaBIOS) must have logged, or "fwlog" proves nothing.
            # Exactly SCENARIO_FW_BOOTS SeaBIOS POSTs, so an unexpected reset (or a reboot that
            # never reached the firmware) fails here.
            boots = sum(1 for l in fw if SEABIOS_POST_RE.search(l))
            want = int(meta.get("fwboots", "1") or 1)
            if not any(l.strip() for l in fw):
                ok, why = False, "firmware log is empty"
            elif boots != want:
                ok, why = False, "%d SeaBIOS POST(s) (BUILD: lines), expected %d" % (boots, want)
        elif c == "reboot":
            # guest-init hvmdm.reboot=1: one in-process reboot, then a normal run.
            ing, ed = count(ms, "HVMDM-REBOOTING"), count(ms, "HVMDM-REBOOTED")
            bad = [m for m in ms if m.split(" ", 1)[0] in
                   ("HVMDM-REBOOT-FAILED", "HVMDM-REBOOT-MARK-FAILED", "HVMDM-REBOOT-NODISK")]
            keys = [m.split(" ", 1)[0] for m in ms]
            if bad:
                ok, why = False, tail(bad, 3)
            elif ing != 1 or ed != 1:
                ok, why = False, "HVMDM-REBOOTING x%d, HVMDM-REBOOTED x%d (want 1 each); last serial: %s" % (
                    ing, ed, tail(serial, 3))
            elif keys.index("HVMDM-REBOOTING") > keys.index("HVMDM-REBOOTED"):
                ok, why = False, "HVMDM-REBOOTED before HVMDM-REBOOTING"
        elif c == "storage":
            want = [x for x in meta.get("storage", "").split(",") if x]
            if not want:
                ok, why = False, "SCENARIO_STORAGE is empty"
            else:
                bad = storage_problems(ms, d["streams"].get("host", []), d["expect"], want)
                if bad:
                    ok, why = False, "; ".join(bad)[:1000]
        report("PASS" if ok else "FAIL", name, c, why)

    up = first(ms, "HVMDM-UPTIME")
    resets = [l.strip() for l in vmm if re.search(r"reset requested|requesting system reset|fast reset|guest reset", l)]
    print("INFO %s wall=%ss guest_uptime=%s fwlog_lines=%d serial_lines=%d%s"
          % (name, res.get("wall", "?"), (up or "?").strip(), len(fw), len(serial),
             (" vmm_reset: " + " | ".join(resets)[:300]) if resets else ""))


def main(argv):
    args = argv[1:]
    if not args:
        args = sorted(os.path.join(OUT, f) for f in os.listdir(OUT) if f.endswith(".log")) if os.path.isdir(OUT) else []
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def report(kind, name, what, why):
        counts["SKIP" if kind == "BLOCKED" else kind] += 1
        label = name if what is None else "%s/%s" % (name, what)
        print("%s %s%s" % (kind, label, (": " + why) if why and kind != "PASS" else ""))

    for a in args:
        path = a if (os.sep in a or a.endswith(".log")) else os.path.join(OUT, a + ".log")
        check(path, report)
    print("%d passed, %d failed, %d skipped" % (counts["PASS"], counts["FAIL"], counts["SKIP"]))
    return 1 if counts["FAIL"] or counts["PASS"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
