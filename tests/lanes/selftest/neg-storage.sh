# qemu-seabios-ide-boot with two storage faults: the data disk is attached with snapshot=on (the
# guest's acknowledged, flushed writes never reach the image) and the read-only disk without the
# blkdebug write failure (the guest's write succeeds). storage must FAIL and name both.
SCENARIO_TIMEOUT=240
SCENARIO_MEDIA=1
SCENARIO_STORAGE="bios data qcow ro"
SCENARIO_CHECKS="markers exit storage"
scenario_cmd() {
    export TMPDIR="$RUN_DIR"   # snapshot=on's temporary overlay (the outer VM has no /var/tmp)
    exec "$VMM_QEMU" -enable-kvm -machine pc -cpu host -m 512M -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -bios "$SEABIOS" -boot order=c \
        -drive file="$BOOT_BIOS",if=ide,index=0,format=raw \
        -drive file="$DATA_DISK",if=ide,index=1,format=raw,snapshot=on \
        -drive file="$RO_DISK",if=ide,index=2,format=raw \
        -drive file="$QCOW_DISK",if=ide,index=3,format=qcow2 \
        $QEMU_CONSOLE
}
