# Reference: Debian QEMU 7.2 on KVM, SeaBIOS boots ISOLINUX from an IDE CD-ROM (El Torito, no
# emulation; primary master), with the raw, read-only and qcow2 data disks on the other IDE
# slots. The guest reads the whole CD (ATAPI) and compares it with the ISO's checksum.
SCENARIO_TIMEOUT=240
SCENARIO_MEDIA=1
# By name only: CI runs the two QEMU storage references that cover the most (seabios-ahci-boot:
# AHCI disk + CD, NCQ; ovmf-cd-boot: UEFI + ATAPI on AHCI) to keep lane K short.
SCENARIO_DEFAULT=0
SCENARIO_STORAGE="cd data qcow ro"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" \
        $(qemu_storage ide cd "$CD_ISO") $QEMU_CONSOLE
}
