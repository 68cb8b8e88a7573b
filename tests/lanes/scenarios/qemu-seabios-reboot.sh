# Reference twin of hvmdm-seabios-reboot: Debian QEMU 7.2 on KVM without -no-reboot, so the
# guest's `reboot -f` resets the machine in-process. Proves the reboot scenario and its checks;
# not run by default (run it by name).
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=0
SCENARIO_APPEND="hvmdm.check=all hvmdm.reboot=1 hvmdm.diskmib=15"
SCENARIO_CHECKS="markers exit acpi errors pci disk fwlog fwlog-present reboot"
SCENARIO_FW_BOOTS=2
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none \
        -bios "$SEABIOS" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" \
        -drive file="$DISK",if=ide,format=raw \
        -serial stdio \
        -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg
}
