# No disk attached and an extra PCI ID (AHCI) demanded: disk and pci must FAIL.
SCENARIO_TIMEOUT=120
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:7113 8086:2922"
SCENARIO_APPEND="hvmdm.wait=3"
scenario_cmd() {
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" -serial stdio -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg
}
