# hvmdm twin of qemu-seabios-ahci-boot: SeaBIOS boots SYSLINUX from AHCI port 0; data disks and a CD-ROM (ATAPI over AHCI) on ports 1-4; NCQ in use.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=1
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
SCENARIO_STORAGE="bios data qcow ro cd ncq"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware seabios --memory 512M --smp 2 \
        $(hvmdm_storage ahci disk "$BOOT_BIOS" cd) \
        --serial stdio --firmware-log "$FW_LOG"
}
