# hvmdm on KVM, SeaBIOS, direct kernel boot, PIIX3 IDE disk, one in-process reboot: guest-init
# marks the last sector of the disk and runs `reboot -f` (Linux's default method: the FADT
# reset register, 0xCF9 <- 6, then the keyboard controller); the second boot finds the mark,
# prints HVMDM-REBOOTED and runs the usual checks. The disk checksum covers the first 15 MiB
# (the mark lives in the last one); SeaBIOS must POST twice.
SCENARIO_TIMEOUT=300
SCENARIO_NEEDS=hvmdm
SCENARIO_APPEND="hvmdm.check=all hvmdm.reboot=1 hvmdm.diskmib=15"
SCENARIO_CHECKS="markers exit acpi errors pci disk fwlog fwlog-present reboot"
SCENARIO_FW_BOOTS=2
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware seabios --memory 512M --smp 2 \
        --kernel "$KERNEL" --initrd "$INITRD" --append "$GUEST_APPEND" \
        --disk file="$DISK",if=ide \
        --serial stdio --firmware-log "$FW_LOG"
}
