# Reference: Debian QEMU 7.2 on KVM with OVMF. A userspace LAPIC (kernel-irqchip=off) is
# required: with KVM's in-kernel LAPIC the outer TCG QEMU aborts (see qemu-ovmf-ide-kvmlapic).
# -smp 1: with -smp 2 (userspace LAPIC) OVMF printed nothing in 150 s; -smp 1 boots in ~75 s
# (pflash OVMF_CODE_4M + VARS: ~81 s).
SCENARIO_TIMEOUT=240
SCENARIO_APPEND="hvmdm.check=all"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc,kernel-irqchip=off -cpu qemu64 -m 512M -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot \
        -bios "$OVMF" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" \
        -drive file="$DISK",if=ide,format=raw \
        -serial stdio \
        -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg
}
