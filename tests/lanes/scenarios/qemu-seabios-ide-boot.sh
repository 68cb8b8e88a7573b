# Reference: Debian QEMU 7.2 on KVM, SeaBIOS boots SYSLINUX from an IDE disk (no --kernel); the
# guest then checks the storage roles (guest-init.sh hvmdm.storage, baked into the boot media):
# reads every disk whole, writes + flushes 1 MiB on the raw and the qcow2 data disks (the host
# checksums them after poweroff), and a write to the read-only disk must fail (QEMU's ide-hd
# refuses read-only drives, so blkdebug fails every write with EIO instead).
SCENARIO_TIMEOUT=240
SCENARIO_MEDIA=1
# By name only: CI runs the two QEMU storage references that cover the most (seabios-ahci-boot:
# AHCI disk + CD, NCQ; ovmf-cd-boot: UEFI + ATAPI on AHCI) to keep lane K short.
SCENARIO_DEFAULT=0
SCENARIO_STORAGE="bios data qcow ro"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" \
        $(qemu_storage ide disk "$BOOT_BIOS") $QEMU_CONSOLE
}
