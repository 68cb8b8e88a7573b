# hvmdm twin of qemu-ovmf-ahci-boot: OVMF boots the unified kernel image on the GPT disk's ESP (AHCI port 0); data disks on ports 1-3; NCQ in use.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=1
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
# OVMF on an in-kernel LAPIC: see hvmdm-ovmf-ide.sh (isolated; BLOCKED on the stock outer QEMU).
SCENARIO_ISOLATE=1
SCENARIO_BLOCKED="outer TCG QEMU abort"
SCENARIO_BLOCKED_ON="tcg_handle_interrupt: assertion failed"
SCENARIO_STORAGE="gpt data qcow ro ncq"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog storage"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware ovmf --memory 512M --smp 2 \
        $(hvmdm_storage ahci disk "$BOOT_GPT") \
        --serial stdio --firmware-log "$FW_LOG"
}
