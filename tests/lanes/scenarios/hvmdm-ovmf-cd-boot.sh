# hvmdm twin of qemu-ovmf-cd-boot: OVMF boots the CD's EFI El Torito image from an AHCI CD-ROM (port 0); data disks on ports 1-3; NCQ in use.
# In the default set since session 4: its one session-3 run wedged the outer TCG VM (no console
# output, the in-VM 300 s time-out never fired), the three runs since passed (7/7, ~50 s). An
# isolated scenario whose outer VM dies or wedges is run once more (run-lane-k.sh).
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=1
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
# OVMF on an in-kernel LAPIC: see hvmdm-ovmf-ide.sh (isolated; BLOCKED on the stock outer QEMU).
SCENARIO_ISOLATE=1
SCENARIO_BLOCKED="outer TCG QEMU abort"
SCENARIO_BLOCKED_ON="tcg_handle_interrupt: assertion failed"
SCENARIO_STORAGE="cd data qcow ro ncq"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog storage"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware ovmf --memory 512M --smp 2 \
        $(hvmdm_storage ahci cd "$CD_ISO") \
        --serial stdio --firmware-log "$FW_LOG"
}
