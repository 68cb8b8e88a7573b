# Reference: Debian QEMU 7.2 on KVM, SeaBIOS, direct kernel boot, PIIX3 IDE disk.
SCENARIO_TIMEOUT=240
SCENARIO_APPEND="hvmdm.check=all"
# SeaBIOS logs to port 0x402: require the log, so the fwlog check is not vacuous.
SCENARIO_CHECKS="markers exit acpi errors pci disk fwlog fwlog-present"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot \
        -bios "$SEABIOS" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" \
        -drive file="$DISK",if=ide,format=raw \
        -serial stdio \
        -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg
}
