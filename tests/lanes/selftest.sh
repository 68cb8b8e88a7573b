#!/bin/bash
# selftest.sh: proves the lane-K harness honest. Runs scenarios built to fail one check
# each (selftest/neg-*.sh; neg-storage breaks two storage guarantees) plus scenarios/hvmdm-seabios-ide.sh with selftest/fake-hvmdm.sh
# (Debian QEMU behind the hvmdm CLI), and requires exactly the expected FAIL lines.
# Output goes to tests/lanes/out/selftest/. ~4 min on a 2-core machine.
source "$(dirname "$0")/lib.sh"
export LANEK_OUT=$OUT/selftest
export LANEK_NO_CHECK=1
export HVMDM_BIN=$LANES_DIR/selftest/fake-hvmdm.sh
rm -rf "$LANEK_OUT"
ensure_cmd python3 python3
"$LANES_DIR/run-lane-k.sh" "$LANES_DIR"/selftest/neg-*.sh hvmdm-seabios-ide hvmdm-seabios-ahci-boot
res=$(python3 "$LANES_DIR/check-lane-k.py" "$LANEK_OUT"/neg-*.log "$LANEK_OUT"/hvmdm-seabios-ide.log "$LANEK_OUT"/hvmdm-seabios-ahci-boot.log || true)
echo "$res"
got=$(echo "$res" | sed -n 's/^FAIL \([^:]*\).*/\1/p' | sort)
want=$(sort "$LANES_DIR/selftest/expected-failures")
# BLOCKED: a recorded known outer abort (synthetic log) is reported and counted as skipped.
syn=$LANEK_OUT/synthetic-blocked.log
printf '%s\n' "LANEK-META name=synthetic-blocked checks=markers,exit" \
    "$(printf 'LANEK-BLOCKED %s\t%s' "tcg_handle_interrupt: assertion failed" "outer TCG QEMU abort")" \
    "LANEK-RESULT synthetic-blocked outer-died outer_exit=134" "outer| **" \
    "outer| ERROR:../../accel/tcg/tcg-accel-ops.c:81:tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked())" > "$syn"
bres=$(python3 "$LANES_DIR/check-lane-k.py" "$syn" || true)
echo "$bres"
bwant="BLOCKED synthetic-blocked: outer TCG QEMU abort (tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked()))
0 passed, 0 failed, 1 skipped"
[ "$bres" = "$bwant" ] || { echo "SELFTEST FAILED: BLOCKED report differs"; exit 1; }
# The storage faults must both be named (lost flushed writes; a read-only disk that took a write).
st=$(echo "$res" | grep '^FAIL neg-storage/storage' || true)
case "$st" in *"data lost"*"read-only disk succeeded"*) ;; *)
    echo "SELFTEST FAILED: neg-storage/storage does not name both faults: $st"; exit 1 ;; esac
if [ "$got" = "$want" ] && echo "$res" | grep -q '^PASS hvmdm-seabios-ide/disk$'; then
    echo "SELFTEST OK: the checker failed exactly the broken checks"
else
    diff <(echo "$want") <(echo "$got") | sed 's/^/  /' >&2 || true
    echo "SELFTEST FAILED: unexpected check results (diff: < expected, > got)"
    exit 1
fi
