# Reference: Debian QEMU 7.2 on KVM, SeaBIOS boots SYSLINUX from an AHCI disk (ICH9 AHCI on the
# pc machine, port 0); the data disks and a CD-ROM (ATAPI over AHCI) on ports 1-4. Linux's
# ahci driver must use NCQ on the written disks (queue_depth > 1, "NCQ (depth" in dmesg).
SCENARIO_TIMEOUT=240
SCENARIO_MEDIA=1
SCENARIO_STORAGE="bios data qcow ro cd ncq"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" \
        $(qemu_storage ahci disk "$BOOT_BIOS" cd) $QEMU_CONSOLE
}
