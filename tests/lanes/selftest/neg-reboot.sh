# Reboot scenario under QEMU with -no-reboot: the VMM exits at the guest's reboot, so the
# second boot never happens: markers (no HVMDM-DONE), reboot and fwlog-present (1 POST of 2)
# must FAIL; exit stays 0.
SCENARIO_TIMEOUT=120
SCENARIO_APPEND="hvmdm.reboot=1 hvmdm.diskmib=15"
SCENARIO_CHECKS="markers exit reboot fwlog-present"
SCENARIO_FW_BOOTS=2
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" -serial stdio -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg -drive file="$DISK",if=ide,format=raw
}
