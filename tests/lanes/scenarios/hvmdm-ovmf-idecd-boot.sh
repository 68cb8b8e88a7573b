# OVMF boots the CD's EFI El Torito image (ESP with a unified kernel image) from hvmdm's IDE CD-ROM
# (primary master, ATAPI over the PIIX3); data disks on the other IDE slots. By name only.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=0
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
# OVMF on an in-kernel LAPIC: see hvmdm-ovmf-ide.sh (isolated; BLOCKED on the stock outer QEMU).
SCENARIO_ISOLATE=1
SCENARIO_BLOCKED="outer TCG QEMU abort"
SCENARIO_BLOCKED_ON="tcg_handle_interrupt: assertion failed"
SCENARIO_STORAGE="cd data qcow ro"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog storage"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware ovmf --memory 512M --smp 2 \
        $(hvmdm_storage ide cd "$CD_ISO") \
        --serial stdio --firmware-log "$FW_LOG"
}
