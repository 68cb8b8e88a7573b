# hvmdm twin of qemu-seabios-ide-boot: SeaBIOS boots SYSLINUX from IDE disk 0; raw, read-only and qcow2 data disks on the other IDE slots.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=1
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
SCENARIO_STORAGE="bios data qcow ro"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware seabios --memory 512M --smp 2 \
        $(hvmdm_storage ide disk "$BOOT_BIOS") \
        --serial stdio --firmware-log "$FW_LOG"
}
