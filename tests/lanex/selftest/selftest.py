#!/usr/bin/env python3
"""selftest.py: proves check-lane-x.py catches broken lane-X runs (no VM needed, < 1 s).

good.log, good-ops.log and good-restrict.log are trimmed real logs of the qemu-xen-ide,
qemu-xen-ops and qemu-xen-restrict scenarios (Debian's qemu-xen as device model). Each case below
mutates one of them and names exactly the checks that must FAIL; every other check must PASS. Prints one PASS/FAIL line per case and `N passed, M failed`; exit 1 on any failure.
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKER = os.path.join(HERE, "..", "check-lane-x.py")
BASES = {b: open(os.path.join(HERE, b + ".log")).read() for b in ("good", "good-ops", "good-restrict")}


def sub(pat, rep, count=0):
    return lambda s: re.sub(pat, rep, s, count=count, flags=re.M)


def drop(pat):
    return lambda s: "".join(l for l in s.splitlines(True) if not re.search(pat, l))


def opkv(op, key, val):
    """Set key=val on the `op| <op> ...` line."""
    return sub(r"^(op\| %s .*\b%s=)\S+" % (op, key), r"\g<1>%s" % val)


def both(*fs):
    def f(s):
        for g in fs:
            s = g(s)
        return s
    return f


OPS = [
    ("ops-good", "good-ops", lambda s: s, []),
    ("pause-fails", "good-ops", opkv("pause", "rc", "1"), ["pause"]),
    ("pause-not-paused", "good-ops", opkv("pause", "state", "-b----"), ["pause"]),
    ("beats-while-paused", "good-ops", opkv("pause", "beats_pause_end", "99"), ["pause"]),
    ("no-beat-after-unpause", "good-ops", both(opkv("pause", "beats_after", "0")), ["pause"]),
    ("pause-window-short", "good-ops", opkv("pause", "pause_window_s", "1"), ["pause"]),
    ("save-fails", "good-ops", opkv("save", "rc", "1"), ["save"]),
    ("restore-no-incoming", "good-ops", opkv("save", "dm_incoming", "0"), ["save"]),
    ("restore-new-boot", "good-ops", opkv("save", "boot_after", "00000000-0000-0000-0000-000000000000"), ["save"]),
    ("restore-no-beats", "good-ops", opkv("save", "new_beats", "0"), ["save"]),
    ("restore-uptime-back", "good-ops", opkv("save", "uptime_after", "0.5"), ["save"]),
    ("save-old-dm-stays", "good-ops", opkv("save", "old_dm_gone_s", "no"), ["save"]),
    ("reboot-no-second-marker", "good-ops", opkv("reboot", "marker2", "0"), ["reboot"]),
    ("reboot-same-boot", "good-ops", lambda s: re.sub(r"^(op\| reboot .*boot_before=)(\S+)(.*boot_after=)\S+",
                                                      r"\1\2\3\2", s, flags=re.M), ["reboot"]),
    ("reboot-no-new-domain", "good-ops", opkv("reboot", "new_domid", "none"), ["reboot"]),
    ("shutdown-ignored", "good-ops", opkv("shutdown", "guest_saw", "none"), ["shutdown"]),
    ("shutdown-domain-stays", "good-ops", opkv("shutdown", "gone", "0"), ["shutdown"]),
    ("shutdown-crash-reason", "good-ops", opkv("shutdown", "reason", "3"), ["shutdown"]),
    ("destroy-dm-stays", "good-ops", opkv("destroy", "dm_gone_s", "no"), ["destroy"]),
    ("destroy-fails", "good-ops", opkv("destroy", "rc", "1"), ["destroy"]),
    ("op-missing", "good-ops", drop(r"^op\| save "), ["save"]),
    ("dm-log-error", "good-ops", sub(r"^(dm\| char device redirected.*)$", r"\1\ndm| qemu: xen: failed to load device state", 1),
     ["dm-log"]),
    ("restrict-good", "good-restrict", lambda s: s, []),
    ("powerbtn-via-pv", "good-restrict", both(opkv("shutdown", "path", "pv"), opkv("shutdown", "guest_saw", "pv-poweroff")),
     ["powerbtn"]),
    ("dm-root", "good-restrict", opkv("dm", "uid", "0"), ["restricted"]),
    ("dm-unrestricted", "good-restrict", opkv("dm", "domid_restrict", "0"), ["restricted"]),
    ("dm-log-ignore-only-known", "good-restrict", sub(r"^(dm\| xen be core: can't open evtchn device)$", r"\1\ndm| xen be core: can't map grant ref", 1),
     ["dm-log"]),
]


CASES = [
    ("good", lambda s: s, []),
    ("disk-corrupt", sub(r"(HVMDM-DISK-SUM sda 0 )[0-9a-f]", r"\g<1>0"), ["disk"]),
    ("disk-missing", sub(r"(HVMDM-DISK-SUM sda 0 ).*", r"\1missing"), ["disk"]),
    ("no-platform-dev", sub(r" 5853:0001$", ""), ["pci"]),
    ("no-done", drop(r"HVMDM-DONE$"), ["marker"]),
    ("acpi-error", sub(r"HVMDM-ACPI-ERRORS 0", "HVMDM-ACPI-ERRORS 1"), ["acpi-errors"]),
    ("no-seabios", drop(r"^xl-dmesg\| \(d1\) SeaBIOS \(version"), ["fwlog"]),
    ("no-hvmloader", drop(r"^xl-dmesg\| \(d1\) HVM Loader"), ["fwlog"]),
    ("zero-pci-devices", sub(r"Found \d+ PCI devices", "Found 0 PCI devices"), ["fwlog"]),
    ("fw-internal-error", sub(r"^(xl-dmesg\| \(d1\) )Booting from Hard Disk.*", r"\g<0>\n\1WARNING - internal error detected at 0x1"),
     ["fwlog"]),
    ("other-domain-fw", sub(r"^xl-dmesg\| \(d1\) ", "xl-dmesg| (d7) "), ["fwlog"]),
    ("domain-stays", sub(r" gone=1 gone_s=\S+", " gone=0 gone_s=none"), ["gone"]),
    ("dm-outlives", sub(r"^(step\| domain gone=1.*)$", r"\1\nstep| device model pid 147 still alive after domain end"), ["exit"]),
    ("create-failed", sub(r"create_rc=0", "create_rc=3"), ["create"]),
    ("timeout", sub(r"(LANEX-RESULT \S+ exit=0) timeout=0", r"\1 timeout=1"), ["ran"]),
    # A run that died before its result: only `ran` is reported, and it fails.
    ("outer-died", drop(r"^LANEX-(RESULT|MEASURE) "), ["ran"]),
]


def run(text):
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        p = subprocess.run([sys.executable, CHECKER, path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    fails = sorted(set(m.group(1) for m in re.finditer(r"^FAIL [^/\s]+/([\w-]+)", p.stdout, re.M)))
    return p.returncode, fails, p.stdout


def main():
    passed = failed = 0
    cases = [(n, "good", m, w) for n, m, w in CASES] + OPS
    for name, base, mut, want in cases:
        good = BASES[base]
        text = mut(good)
        if not name.endswith("good") and text == good:
            print("FAIL %s: mutation changed nothing" % name)
            failed += 1
            continue
        rc, fails, out = run(text)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        ok = fails == sorted(want) and (rc == 0) == (not want) and re.match(r"^\d+ passed, \d+ failed$", last)
        if ok:
            passed += 1
            print("PASS %s" % name)
        else:
            failed += 1
            print("FAIL %s: expected failing %s, got %s (rc %d)\n%s" % (name, want, fails, rc, out))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
