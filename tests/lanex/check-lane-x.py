#!/usr/bin/env python3
"""check-lane-x.py [LOG|NAME ...]: assert lane-X scenario results.

Reads tests/lanex/out/<scenario>.log as written by run-lane-x.sh (all scenario logs in out/
when no argument is given). Prints one `PASS scenario/check` or `FAIL scenario/check: reason`
line per check, `SKIP scenario: reason` for a skipped scenario, `INFO scenario: ...` with the
measured times, and ends with exactly `N passed, M failed`. Exit status 1 when anything failed
or nothing was checked, else 0.

Checks (a scenario's SCENARIO_CHECKS selects them; `ran` and `create` always run):
  ran          the scenario finished inside dom0 (no dom0/outer death, no time-out, exit 0)
  create       `xl create -p` succeeded and the guest's serial pty was found
  marker       HVMDM-READY and HVMDM-DONE on the guest's serial console (the xl console path)
  disk         the guest's HVMDM-DISK-SUM equals the host's sha256 of the boot image
  pci          the guest's HVMDM-PCI list holds every ID in SCENARIO_PCI
  acpi-errors  HVMDM-ACPI-ERRORS 0
  fwlog        `xl dmesg` shows hvmloader and SeaBIOS running in this scenario's domain, SeaBIOS
               finding at least one PCI device and booting from the hard disk, no firmware
               internal errors
  gone         the domain disappeared after the guest's poweroff (libxl's on_poweroff=destroy)
  exit         the device model did not outlive its domain
"""
import os
import re
import sys

OUT = os.environ.get("LANEX_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
DEFAULT_CHECKS = ["marker", "disk", "pci", "acpi-errors", "fwlog", "gone", "exit"]
ORDER = ["ran", "create"] + DEFAULT_CHECKS

# Guest firmware lines in `xl dmesg` (Xen prefixes them with "(d<domid>) "; the domid is taken
# from the scenario's "unpaused domain N" step so an earlier scenario's guest cannot stand in).
HVMLOADER_RE = r"HVM Loader"
SEABIOS_RE = r"SeaBIOS \(version"
PCI_FOUND_RE = r"Found (\d+) PCI devices"
BOOTING_RE = r"Booting from Hard Disk"
FW_BAD_RE = (r"(internal error|Unable to allocate resource|WARNING - Timeout|"
             r"\*\*\* HVMLoader bug|BUG at|crashed)")


def kv(words):
    return dict(w.split("=", 1) for w in words if "=" in w)


def parse(path):
    d = {"meta": {}, "expect": {}, "host": {}, "measure": None, "result": None, "skip": None,
         "streams": {}}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("LANEX-META "):
                d["meta"] = kv(line.split()[1:])
            elif line.startswith("LANEX-EXPECT "):
                p = line.split()
                if len(p) >= 3:
                    d["expect"][p[1]] = p[2]
            elif line.startswith("LANEX-HOST "):
                d["host"] = kv(line.split()[1:])
            elif line.startswith("LANEX-MEASURE "):
                d["measure"] = kv(line.split()[2:])
            elif line.startswith("LANEX-RESULT "):
                d["result"] = line.split()[2:]
            elif line.startswith("LANEX-SKIP "):
                p = line.split(" ", 2)
                d["skip"] = p[2] if len(p) > 2 else "skipped"
            else:
                m = re.match(r"^([\w.-]+)\| ?(.*)$", line)
                if m:
                    d["streams"].setdefault(m.group(1), []).append(m.group(2))
    return d


def markers(serial):
    """HVMDM-* lines from the guest console; kernel output may precede them on a line."""
    res = []
    for line in serial:
        i = line.find("HVMDM-")
        if i >= 0:
            res.append(line[i:].strip())
    return res


def first(ms, key):
    for m in ms:
        p = m.split(" ", 1)
        if p[0] == key:
            return p[1] if len(p) > 1 else ""
    return None


def tail(lines, n=4):
    return " | ".join(l.strip() for l in lines[-n:] if l.strip())[:400]


def check(path, report, info):
    name = os.path.basename(path)[:-4] if path.endswith(".log") else os.path.basename(path)
    if not os.path.exists(path):
        report("FAIL", name, "ran", "no log %s" % path)
        return
    d = parse(path)
    if d["skip"] is not None:
        report("SKIP", name, None, d["skip"])
        return
    st = d["streams"]
    step = st.get("step", [])
    r = d["result"]
    if not r or r[0] in ("outer-died", "not-run"):
        why = "no result" if not r else " ".join(r)
        report("FAIL", name, "ran", "%s; console tail: %s" % (why, tail(st.get("tail", []) + st.get("qemu", []))))
        return
    res = kv(r)
    ms = d["measure"] or {}
    if res.get("timeout") == "1":
        report("FAIL", name, "ran", "scenario killed at dom0's time limit (wall %ss); last steps: %s"
               % (res.get("wall"), tail(step)))
    elif res.get("exit") != "0":
        report("FAIL", name, "ran", "scenario exit %s; stderr: %s" % (res.get("exit"), tail(st.get("script", []))))
    elif not d["measure"]:
        report("FAIL", name, "ran", "no LANEX-MEASURE line")
    else:
        report("PASS", name, "ran", None)

    if ms.get("create_rc") != "0":
        report("FAIL", name, "create", "xl create -p rc=%s: %s" % (ms.get("create_rc"), tail(st.get("xl-create", []), 6)))
    elif ms.get("tty", "none") == "none":
        report("FAIL", name, "create", "no serial pty in xenstore (serial/0/tty)")
    else:
        report("PASS", name, "create", None)

    checks = [c for c in d["meta"].get("checks", ",".join(DEFAULT_CHECKS)).split(",") if c]
    serial = st.get("serial", [])
    mk = markers(serial)
    dmesg = st.get("xl-dmesg", []) + st.get("outer", [])
    domid = None
    for l in step:
        m = re.match(r"unpaused domain (\d+) ", l)
        if m:
            domid = m.group(1)
    for c in DEFAULT_CHECKS:
        if c not in checks:
            continue
        ok, why = True, None
        if c == "marker":
            miss = [k for k in ("HVMDM-READY", "HVMDM-DONE") if first(mk, k) is None]
            if miss:
                ok, why = False, "missing %s; last serial: %s" % (",".join(miss), tail(serial))
        elif c == "disk":
            s = first(mk, "HVMDM-DISK-SUM")
            want = d["expect"].get("disk-sha256")
            if s is None:
                ok, why = False, "no HVMDM-DISK-SUM line"
            else:
                p = s.split()
                got = p[2] if len(p) >= 3 else "?"
                if got != want:
                    ok, why = False, "guest %s (%s) != host %s" % (got, s, want)
        elif c == "pci":
            s = first(mk, "HVMDM-PCI")
            want = [x for x in d["meta"].get("pci", "").split(",") if x]
            if s is None:
                ok, why = False, "no HVMDM-PCI line"
            else:
                have = set(s.split())
                miss = [x for x in want if x not in have]
                if miss:
                    ok, why = False, "missing %s (have %s)" % (" ".join(miss), s)
        elif c == "acpi-errors":
            s = first(mk, "HVMDM-ACPI-ERRORS")
            if s is None:
                ok, why = False, "no HVMDM-ACPI-ERRORS line"
            elif s.strip() != "0":
                errs = [m for m in mk if m.startswith("HVMDM-ACPI-ERROR ")]
                ok, why = False, "%s ACPI error lines: %s" % (s.strip(), tail(errs, 3))
        elif c == "fwlog":
            # `xl dmesg` as read in dom0 after the run (the outer console copy is not used).
            dom = re.compile(r"\(d%s\) " % (domid or r"\d+"))
            xd = [l for l in st.get("xl-dmesg", []) if dom.search(l)]
            hl = [l for l in xd if re.search(HVMLOADER_RE, l)]
            sb = [l for l in xd if re.search(SEABIOS_RE, l)]
            pf = [int(m.group(1)) for m in (re.search(PCI_FOUND_RE, l) for l in xd) if m]
            boot = [l for l in xd if re.search(BOOTING_RE, l)]
            bad = [l for l in xd if re.search(FW_BAD_RE, l, re.IGNORECASE)]
            if not hl or not sb:
                ok, why = False, "xl dmesg lacks %s for d%s" % (" and ".join(
                    x for x, v in (("hvmloader", hl), ("SeaBIOS", sb)) if not v), domid or "?")
            elif not pf or max(pf) == 0:
                ok, why = False, "SeaBIOS found no PCI devices (%s)" % (pf or "no 'Found N PCI devices' line")
            elif not boot:
                ok, why = False, "SeaBIOS never booted from the hard disk"
            elif bad:
                ok, why = False, "firmware trouble: %s" % tail(bad, 3)
        elif c == "gone":
            if ms.get("gone") != "1":
                ok, why = False, "domain still there %s after the guest's poweroff" % (
                    "(no HVMDM-DONE first)" if ms.get("marker") != "1" else "")
        elif c == "exit":
            alive = [l for l in step if "still alive after domain end" in l]
            if alive:
                ok, why = False, alive[0]
        report("PASS" if ok else "FAIL", name, c, why)

    dom = re.compile(r"\(d%s\) " % (domid or r"\d+"))
    pcidev = [l for l in st.get("xl-dmesg", []) if dom.search(l) and re.search(PCI_FOUND_RE, l)]
    h = d["host"]
    info(name, "toolstack %ss after QEMU start, xl create -p %ss, marker %ss after unpause, domain gone %ss "
         "after marker, dm peak RSS %s kB, scenario wall %ss, outer wall %s%s"
         % (h.get("toolstack_s", "?"), ms.get("create_s", "?"), ms.get("marker_s", "?"), ms.get("gone_s", "?"),
            ms.get("dm_rss_kb", "?"), res.get("wall", "?"), h.get("host_wall", "?"),
            ("; SeaBIOS: " + pcidev[0].strip()) if pcidev else ""))


def main(argv):
    paths = []
    for a in argv:
        if os.path.exists(a):
            paths.append(a)
        else:
            paths.append(os.path.join(OUT, a if a.endswith(".log") else a + ".log"))
    if not paths and os.path.isdir(OUT):
        paths = sorted(os.path.join(OUT, f) for f in os.listdir(OUT)
                       if f.endswith(".log") and f != "console.log")
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def report(kind, name, c, why):
        counts[kind] += 1
        label = name if c is None else "%s/%s" % (name, c)
        print("%s %s%s" % (kind, label, (": " + why) if why else ""))

    def info(name, text):
        print("INFO %s: %s" % (name, text))

    for p in paths:
        check(p, report, info)
    print("%d passed, %d failed" % (counts["PASS"], counts["FAIL"]))
    return 1 if counts["FAIL"] or not counts["PASS"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
