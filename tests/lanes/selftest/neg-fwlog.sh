# A SeaBIOS internal-error line in the firmware log: fwlog must FAIL.
SCENARIO_TIMEOUT=120
scenario_cmd() {
    "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 1 -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -kernel "$KERNEL" -initrd "$INITRD" -append "$GUEST_APPEND" -serial stdio -chardev file,id=dbg,path="$FW_LOG" -device isa-debugcon,iobase=0x402,chardev=dbg -drive file="$DISK",if=ide,format=raw
    r=$?
    echo "WARNING - internal error detected at src/fw/romfile_loader.c:99!" >> "$FW_LOG"
    return $r
}
