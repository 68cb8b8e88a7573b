# The "VMM" exits 3 after a good run: exit must FAIL (also with a declared blocker, which
# only covers its own outer-VM abort).
SCENARIO_TIMEOUT=120
SCENARIO_BLOCKED="outer TCG QEMU abort"
SCENARIO_BLOCKED_ON="tcg_handle_interrupt: assertion failed"
scenario_cmd() {
    "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" -serial stdio -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg -drive file="$DISK",if=ide,format=raw
    echo "VMM failed on purpose" >&2
    return 3
}
