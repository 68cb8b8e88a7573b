# Reference: Debian QEMU 7.2 on KVM, OVMF boots the CD's EFI El Torito image (ESP with a unified
# kernel image) from an AHCI CD-ROM (ATAPI over AHCI, port 0); data disks on ports 1-3.
# Userspace LAPIC (kernel-irqchip=off) and -smp 1: see qemu-ovmf-ide-userlapic.sh.
SCENARIO_TIMEOUT=300
SCENARIO_MEDIA=1
SCENARIO_STORAGE="cd data qcow ro ncq"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog storage"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc,kernel-irqchip=off -cpu qemu64 -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$OVMF" \
        $(qemu_storage ahci cd "$CD_ISO") $QEMU_CONSOLE
}
