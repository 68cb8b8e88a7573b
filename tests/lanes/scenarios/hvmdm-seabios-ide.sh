# hvmdm on KVM, SeaBIOS, direct kernel boot, PIIX3 IDE disk. Skipped until target/release/hvmdm exists.
SCENARIO_TIMEOUT=240
SCENARIO_NEEDS=hvmdm
SCENARIO_APPEND="hvmdm.check=all"
# SeaBIOS logs to port 0x402: require the log, so the fwlog check is not vacuous.
SCENARIO_CHECKS="markers exit acpi errors pci disk fwlog fwlog-present"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware seabios --memory 512M --smp 2 \
        --kernel "$KERNEL" --initrd "$INITRD" --append "$GUEST_APPEND" \
        --disk file="$DISK",if=ide \
        --serial stdio --firmware-log "$FW_LOG"
}
