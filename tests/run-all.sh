#!/usr/bin/env bash
# hvmdm's test command (README: "run all the tests"; .ci/run calls it).
#   1. installs Debian packages it needs (tests/setup.sh)
#   2. unit lane: cargo fmt --check, clippy -D warnings, cargo test (every crate), brief fuzzing
#   3. lane K: real SeaBIOS/OVMF + Debian Linux guests on real KVM nested in a TCG VM
#      (tests/lanes/run-lane-k.sh builds and caches the guest kit and the outer VM)
#   4. lane X: real Xen 4.17 + libxl in a TCG VM; `xl create` with hvmdm as the device model
#      (dm_restrict=1 with `xl shutdown` through the ACPI power button; AHCI with CD media change), and
#      the same scenario with Debian's qemu-xen (harness honesty) (tests/lanex/run-lane-x.sh)
# The last line sums both lanes' checkers: "lanes: N passed, M failed, K skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

echo "== unit lane"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
HVMDM_REQUIRE_XENSTORED=1 cargo test --workspace 2>&1 | tee /tmp/hvmdm-unit.log
grep -q "test result: FAILED" /tmp/hvmdm-unit.log && { echo "unit lane failed"; exit 1; }
# The lane X checker must fail broken runs (mutations of real logs; < 1 s).
python3 tests/lanex/selftest/selftest.py | tail -1

echo "== fuzz (brief; long runs are by hand, see fuzz/README.md)"
bash fuzz/run-brief.sh "${HVMDM_FUZZ_SECONDS:-15}"

echo "== lane K"
cargo build --release
# The outer TCG QEMU, rebuilt from Debian's source with our one-hunk fix for the CR8/VIRQ
# assertion that otherwise aborts it whenever an L2 guest runs OVMF on an in-kernel LAPIC
# (cached after the first build, ~5-8 min cold). If it cannot be built, the stock QEMU is used
# and the OVMF scenario reports BLOCKED.
if oq=$(bash tests/lanes/build-outer-qemu.sh); then
    export PATH="$oq:$PATH"
else
    echo "lane K: patched outer QEMU unavailable; OVMF scenarios will be blocked by the TCG trap" >&2
fi
set +e
bash tests/lanes/run-lane-k.sh 2>&1 | tee /tmp/hvmdm-lanek.log
k_rc=${PIPESTATUS[0]}

echo "== lane X"
# One outer Xen boot runs the scenarios in order (~3-5 min each under TCG, plus ~3 min to build the
# dom0 root fs on a fresh machine). Nested TCG guests occasionally crash on their own (a guest
# segfault seen once with qemu-xen too): a scenario that fails is run once more in a fresh outer
# boot, and both results are printed; the retry's counts replace the first attempt's.
# CI set: hvmdm-restrict (IDE boot under dm_restrict=1, ACPI power-button shutdown; covers all
# of hvmdm-ide's checks), hvmdm-cd (AHCI boot, `xl cd-eject`/`cd-insert` on an IDE CD-ROM,
# destroy; covers hvmdm-ahci's checks) and qemu-xen-ide (harness honesty).
# By name: hvmdm-ide, hvmdm-ahci, hvmdm-smp (maxvcpus=2), qemu-xen-cd, and hvmdm-ops with its
# qemu-xen twin qemu-xen-acpi (pause, vcpu-set, S3, save/restore, guest reboot, ACPI shutdown,
# destroy; ~15 min each). A scenario that times out dumps where its processes and the device
# model's threads were blocked (a stalled scenario script was seen twice, not reproduced since).
scenarios=${LANEX_SCENARIOS:-hvmdm-restrict hvmdm-cd qemu-xen-ide}
bash tests/lanex/run-lane-x.sh $scenarios 2>&1 | tee /tmp/hvmdm-lanex.log
x_rc=${PIPESTATUS[0]}
failed=$(sed -nE 's#^FAIL ([^/]+)/.*#\1#p' /tmp/hvmdm-lanex.log | sort -u | tr '\n' ' ')
: > /tmp/hvmdm-lanex-retry.log
if [ -n "${failed// /}" ] && [ -z "${LANEX_NO_RETRY:-}" ]; then
    # The retry overwrites tests/lanex/out: keep the failed attempt, and print what it did
    # (steps, operations, xl and device-model output; not the guest's serial or xl dmesg).
    rm -rf tests/lanex/out.first && cp -r tests/lanex/out tests/lanex/out.first
    for n in $failed; do
        echo "== lane X: first attempt of $n (kept in tests/lanex/out.first/$n.log)"
        grep -aE '^[A-Za-z0-9._-]+\|' "tests/lanex/out/$n.log" |
            grep -avE '^(serial|xl-dmesg|xl-create|outer|cfg|hypervisor\.log|xl|ps-[a-z-]+)\|' | tail -n 80
    done
    echo "== lane X: retrying $failed"
    bash tests/lanex/run-lane-x.sh $failed 2>&1 | tee /tmp/hvmdm-lanex-retry.log
    x_rc=${PIPESTATUS[0]}
fi

# Per-check results: the first attempt's for scenarios not retried, the retry's for the others.
counts() {
    { awk -v skip=" $failed " '/^(PASS|FAIL) / { split($2, a, "/"); if (index(skip, " " a[1] " ") == 0) print $1 }' /tmp/hvmdm-lanex.log
      awk '/^(PASS|FAIL) / { print $1 }' /tmp/hvmdm-lanex-retry.log; } | sort | uniq -c
}
xp=$(counts | awk '$2 == "PASS" { print $1 }'); xf=$(counts | awk '$2 == "FAIL" { print $1 }')
xs=$(grep -cE '^SKIP ' /tmp/hvmdm-lanex.log || true)
# Lane K's closing line ("N passed, M failed, K skipped").
read -r kp kf ks < <(grep -E '^[0-9]+ passed, [0-9]+ failed' /tmp/hvmdm-lanek.log | tail -1 |
    sed -E 's/^([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?.*/\1 \2 \4/')
p=$(( ${kp:-0} + ${xp:-0} )); f=$(( ${kf:-0} + ${xf:-0} )); sk=$(( ${ks:-0} + ${xs:-0} ))
# A lane that reported nothing failed as a whole.
[ -n "${kp:-}" ] || f=$((f + 1))
[ -n "${xp:-}" ] || f=$((f + 1))
echo "lanes: $p passed, $f failed, $sk skipped"
[ "$k_rc" -eq 0 ] && [ "$x_rc" -eq 0 ] && [ "$f" -eq 0 ]
