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
Operations (scenario.sh SCENARIO_OPS; judged from its `op` lines and the guest's heartbeat
HVMDM-BEAT <n> <uptime> <boot_id>):
  pause        `xl pause`/`xl unpause` succeed, xl lists the domain paused, no heartbeat while
               paused (2 s grace, then a window of at least two measured heartbeat intervals),
               heartbeats again after the unpause
  save         `xl save` succeeds, the domain and its device model go away, `xl restore -p`
               succeeds with a new device model started with -incoming, and after the unpause the
               same boot (boot_id) goes on: higher heartbeat number, higher uptime
  reboot       `xl reboot` succeeds, xl builds a new domain (on_reboot="restart"), the old device
               model exits, the new boot reaches HVMDM-DONE again with a new boot_id
  vcpuset      `xl vcpu-set` to 2 succeeds and the guest brings the hot-added vCPU up (cpu1
               online, online list 0-1)
  s3           `xl trigger sleep` makes the guest suspend to RAM, `xl trigger s3resume` wakes it,
               and the same boot goes on (boot_id unchanged, heartbeats continue)
  nmireboot    a guest-initiated reboot (`xl trigger nmi`, the guest runs `reboot -f`, which resets
               through the device model): shutdown reason reboot, then as `reboot`
  shutdown     `xl shutdown -F` succeeds, the guest saw the request (PV control or ACPI power
               button), the domain and its device model go away, shutdown reason poweroff
  powerbtn     that shutdown went through the ACPI power button (no PV drivers in the guest)
  cdchange     the guest reads the first CD medium, `xl cd-eject` empties the drive (the guest's
               read fails), `xl cd-insert` of a second medium makes the guest read its content
  destroy      `xl destroy` succeeds, the device model exits within 10 s, the domain is gone
  restricted   the device model runs deprivileged (dm_restrict=1): non-root uid,
               -xen-domid-restrict on its command line
  dm-log       no error lines in the device models' logs (all of them: restore and reboot start
               new ones), except what the scenario's SCENARIO_DMLOG_IGNORE regex allows
"""
import os
import re
import sys

OUT = os.environ.get("LANEX_OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
DEFAULT_CHECKS = ["marker", "disk", "pci", "acpi-errors", "fwlog", "gone", "exit"]
OP_CHECKS = ["pause", "save", "vcpuset", "s3", "cdchange", "reboot", "nmireboot", "shutdown", "powerbtn", "destroy", "restricted", "dm-log"]
ALL_CHECKS = DEFAULT_CHECKS + OP_CHECKS
ORDER = ["ran", "create"] + ALL_CHECKS

# Guest firmware lines in `xl dmesg` (Xen prefixes them with "(d<domid>) "; the domid is taken
# from the scenario's "unpaused domain N" step so an earlier scenario's guest cannot stand in).
HVMLOADER_RE = r"HVM Loader"
SEABIOS_RE = r"SeaBIOS \(version"
PCI_FOUND_RE = r"Found (\d+) PCI devices"
BOOTING_RE = r"Booting from Hard Disk"
FW_BAD_RE = (r"(internal error|Unable to allocate resource|WARNING - Timeout|"
             r"\*\*\* HVMLoader bug|BUG at|crashed)")
# Device-model log lines that mean trouble (qemu-xen's normal log is a pty line and its SIGHUP
# exit line).
DM_BAD_RE = r"(error|fail|abort|assert|panic|segfault|core dumped|cannot|can't|could not|unable)"


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def check_op(c, ops):
    """(ok, why) for one operation check from the scenario's `op` lines."""
    name = {"powerbtn": "shutdown", "restricted": "dm"}.get(c, c)
    o = ops.get(name)
    if o is None:
        return False, "no `op %s` line (operation not run: no HVMDM-DONE first?)" % name
    bad = []

    def need(cond, why):
        if not cond:
            bad.append(why)

    line = " ".join("%s=%s" % kv for kv in o.items())
    if c == "pause":
        need(o.get("rc") == "0", "xl pause rc=%s" % o.get("rc"))
        need(o.get("unpause_rc") == "0", "xl unpause rc=%s" % o.get("unpause_rc"))
        need("p" in o.get("state", ""), "xl list state %s is not paused" % o.get("state"))
        b0, b1, b2, b3 = (num(o.get(k)) for k in ("beats_before", "beats_pause_start", "beats_pause_end", "beats_after"))
        need(b0 is not None and b0 > 0, "no heartbeat before the pause")
        need(b1 is not None and b1 == b2, "heartbeats while paused (%s -> %s)" % (b1, b2))
        need(b3 is not None and b2 is not None and b3 > b2, "no heartbeat after the unpause")
        iv, win = num(o.get("beat_interval_s")), num(o.get("pause_window_s"))
        need(iv is not None and win is not None and win >= 2 * iv,
             "pause window %s s shorter than two heartbeat intervals (%s s)" % (win, iv))
    elif c == "save":
        need(o.get("rc") == "0", "xl save rc=%s" % o.get("rc"))
        need(o.get("old_domain_gone") == "1", "domain still there after xl save")
        need(num(o.get("old_dm_gone_s")) is not None, "old device model still running after xl save")
        need(o.get("restore_rc") == "0", "xl restore rc=%s" % o.get("restore_rc"))
        need(o.get("dm_incoming") == "1", "restored device model not started with -incoming")
        need(o.get("unpause_rc") == "0", "xl unpause after restore rc=%s" % o.get("unpause_rc"))
        need((num(o.get("new_beats")) or 0) > 0, "no heartbeat after the restore")
        need(o.get("boot_before") not in (None, "none") and o.get("boot_after") == o.get("boot_before"),
             "boot_id changed (%s -> %s): not the same boot" % (o.get("boot_before"), o.get("boot_after")))
        nb, na = num(o.get("beat_before")), num(o.get("beat_after"))
        ub, ua = num(o.get("uptime_before")), num(o.get("uptime_after"))
        need(nb is not None and na is not None and na > nb, "heartbeat number did not go on (%s -> %s)" % (nb, na))
        need(ub is not None and ua is not None and ua > ub, "uptime did not go on (%s -> %s)" % (ub, ua))
    elif c == "vcpuset":
        need(o.get("rc") == "0", "xl vcpu-set rc=%s" % o.get("rc"))
        need(o.get("guest_saw") == "1", "the guest never reported a hot-added CPU")
        need(o.get("cpu") == "cpu1" and o.get("online") == "1",
             "cpu1 not brought online (cpu=%s online=%s)" % (o.get("cpu"), o.get("online")))
        need(o.get("cpus") == "0-1", "online CPUs %s, not 0-1" % o.get("cpus"))
    elif c == "s3":
        need(o.get("rc") == "0", "xl trigger sleep rc=%s" % o.get("rc"))
        need(o.get("entered") == "1", "the guest never started suspending (no HVMDM-S3-ENTER)")
        need(o.get("failed") == "0", "the guest kernel refused to suspend (HVMDM-S3-FAILED)")
        need(o.get("resume_rc") == "0", "xl trigger s3resume rc=%s" % o.get("resume_rc"))
        need(o.get("resumed") == "1", "the guest did not come back from S3")
        need(o.get("boot_before") not in (None, "none") and o.get("boot_after") == o.get("boot_before"),
             "boot_id changed (%s -> %s): not the same boot" % (o.get("boot_before"), o.get("boot_after")))
        nb, na = num(o.get("beat_before")), num(o.get("beat_after"))
        need(nb is not None and na is not None and na > nb, "heartbeat did not go on (%s -> %s)" % (nb, na))
    elif c == "cdchange":
        need(o.get("initial") == "1", "the guest did not read the first medium's content")
        need(o.get("eject_rc") == "0", "xl cd-eject rc=%s" % o.get("eject_rc"))
        need(o.get("ejected") == "1", "the guest still read a medium after xl cd-eject")
        need(o.get("insert_rc") == "0", "xl cd-insert rc=%s" % o.get("insert_rc"))
        need(o.get("inserted") == "1", "the guest did not read the inserted medium's content")
    elif c in ("reboot", "nmireboot"):
        need(o.get("rc") == "0", "xl %s rc=%s" % ("reboot" if c == "reboot" else "trigger nmi", o.get("rc")))
        if c == "nmireboot":
            need(o.get("guest_saw") == "nmi-reboot", "the guest did not reboot on the NMI (saw %s)" % o.get("guest_saw"))
            need(o.get("reason") == "1", "shutdown reason %s is not reboot (1)" % o.get("reason"))
        need(o.get("new_domid") not in (None, "none"), "no new domain after the reboot")
        need(num(o.get("old_dm_gone_s")) is not None, "old device model still running after the reboot")
        need(o.get("marker2") == "1", "second boot did not reach HVMDM-DONE")
        need(o.get("boot_after") not in (None, "none", o.get("boot_before")),
             "boot_id did not change (%s -> %s)" % (o.get("boot_before"), o.get("boot_after")))
    elif c == "shutdown":
        need(o.get("rc") == "0", "xl shutdown rc=%s" % o.get("rc"))
        need(o.get("guest_saw") not in (None, "none"), "guest never saw the shutdown request")
        need(o.get("gone") == "1", "domain still there after xl shutdown")
        need(num(o.get("dm_gone_s")) is not None, "device model still running after the shutdown")
        need(o.get("reason") in ("0", "none"), "shutdown reason %s is not poweroff (0)" % o.get("reason"))
    elif c == "powerbtn":
        need(o.get("path") == "acpi", "xl did not use the ACPI power button (path=%s)" % o.get("path"))
        need(o.get("guest_saw") == "powerbtn", "guest did not see a power-button press (saw %s)" % o.get("guest_saw"))
    elif c == "destroy":
        need(o.get("rc") == "0", "xl destroy rc=%s" % o.get("rc"))
        need(num(o.get("dm_gone_s")) is not None, "device model pid %s still running 10 s after xl destroy" % o.get("dm_pid"))
        need(o.get("gone") == "1", "domain still there after xl destroy")
    elif c == "restricted":
        need(o.get("running") == "1", "device model not running at HVMDM-DONE")
        need(o.get("uid") not in (None, "0"), "device model runs as uid %s" % o.get("uid"))
        need(o.get("domid_restrict") == "1", "no -xen-domid-restrict on the device model's command line")
    return (not bad), ("; ".join(bad) + " [" + line + "]") if bad else None


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
    ops = {}
    for l in st.get("op", []):
        p = l.split()
        if p:
            ops[p[0]] = kv(p[1:])
    for c in ALL_CHECKS:
        if c not in checks:
            continue
        ok, why = True, None
        if c in OP_CHECKS and c != "dm-log":
            ok, why = check_op(c, ops)
        elif c == "dm-log":
            # SCENARIO_DMLOG_IGNORE: a scenario's known, documented noise (a regex; spaces were
            # turned into '.' for the META line).
            ign = d["meta"].get("dmlog_ignore", "")
            bad = [l for l in st.get("dm", []) if re.search(DM_BAD_RE, l, re.IGNORECASE)
                   and not (ign and re.search(ign, l))]
            if not st.get("dm"):
                ok, why = False, "no device-model log"
            elif bad:
                ok, why = False, "device-model log: %s" % tail(bad, 3)
        elif c == "marker":
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
    timing = {"pause": ["beat_interval_s", "pause_window_s", "resume_s"], "save": ["save_s", "size", "restore_s"],
              "vcpuset": ["seen_s", "cpus"], "s3": ["resume_s"], "cdchange": ["eject_s", "insert_s"],
              "reboot": ["restart_s", "marker2_s"], "nmireboot": ["restart_s", "marker2_s"], "shutdown": ["path", "guest_saw", "gone_s", "dm_gone_s"],
              "destroy": ["fresh", "destroy_s", "dm_gone_s"], "dm": ["uid", "domid_restrict"]}
    t = ["%s %s" % (o, " ".join("%s=%s" % (k, ops[o].get(k, "?")) for k in timing[o]))
         for o in timing if o in ops]
    if t:
        info(name, "operations: " + "; ".join(t))


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
