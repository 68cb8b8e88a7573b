# Known trap (test-lanes.md): OVMF under QEMU/KVM with the in-kernel LAPIC makes the outer
# TCG QEMU abort (tcg_handle_interrupt: assertion failed). Diagnostic only: not run by default,
# and in an outer VM of its own so the abort cannot take other scenarios with it.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=0
SCENARIO_ISOLATE=1
SCENARIO_APPEND="hvmdm.check=all"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot \
        -bios "$OVMF" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" \
        -drive file="$DISK",if=ide,format=raw \
        -serial stdio \
        -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg
}
