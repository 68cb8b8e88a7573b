# Reference: Debian QEMU 7.2 on KVM, OVMF boots EFI/BOOT/BOOTX64.EFI (a unified kernel image)
# from the ESP of a GPT disk on AHCI port 0; data disks on ports 1-3, NCQ required.
# Userspace LAPIC (kernel-irqchip=off) and -smp 1: see qemu-ovmf-ide-userlapic.sh.
SCENARIO_TIMEOUT=300
SCENARIO_MEDIA=1
# By name only: CI runs the two QEMU storage references that cover the most (seabios-ahci-boot:
# AHCI disk + CD, NCQ; ovmf-cd-boot: UEFI + ATAPI on AHCI) to keep lane K short.
SCENARIO_DEFAULT=0
SCENARIO_STORAGE="gpt data qcow ro ncq"
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog storage"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc,kernel-irqchip=off -cpu qemu64 -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$OVMF" \
        $(qemu_storage ahci disk "$BOOT_GPT") $QEMU_CONSOLE
}
