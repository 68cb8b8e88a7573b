#!/usr/bin/env python3
"""selftest.py: proves check-lane-x.py catches broken lane-X runs (no VM needed, < 1 s).

good.log is a trimmed real log of the qemu-xen-ide scenario (Debian's qemu-xen as device model).
Each case below mutates it and names exactly the checks that must FAIL; every other check must
PASS. Prints one PASS/FAIL line per case and `N passed, M failed`; exit 1 on any failure.
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKER = os.path.join(HERE, "..", "check-lane-x.py")
GOOD = open(os.path.join(HERE, "good.log")).read()


def sub(pat, rep, count=0):
    return lambda s: re.sub(pat, rep, s, count=count, flags=re.M)


def drop(pat):
    return lambda s: "".join(l for l in s.splitlines(True) if not re.search(pat, l))


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
    for name, mut, want in CASES:
        text = mut(GOOD)
        if name != "good" and text == GOOD:
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
