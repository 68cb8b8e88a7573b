# Declares the known outer-QEMU abort as its blocker, but the outer VM dies differently (it is
# powered off): SCENARIO_BLOCKED must not hide that, so ran must FAIL.
SCENARIO_TIMEOUT=60
SCENARIO_ISOLATE=1
SCENARIO_BLOCKED="outer TCG QEMU abort"
SCENARIO_BLOCKED_ON="tcg_handle_interrupt: assertion failed"
scenario_cmd() {
    poweroff -f
}
