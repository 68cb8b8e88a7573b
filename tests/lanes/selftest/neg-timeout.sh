# Killed after 8 s, before the guest is up: markers, exit and every marker check must FAIL.
SCENARIO_TIMEOUT=8
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" -serial stdio -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg -drive file="$DISK",if=ide,format=raw
}
