# hvmdm twin of qemu-seabios-cd-boot: SeaBIOS boots ISOLINUX from an IDE CD-ROM (primary master); data disks on the other IDE slots.
SCENARIO_TIMEOUT=300
SCENARIO_DEFAULT=1
SCENARIO_NEEDS=hvmdm
SCENARIO_MEDIA=1
SCENARIO_STORAGE="cd data qcow ro"
SCENARIO_CHECKS="markers exit acpi errors pci fwlog fwlog-present storage"
scenario_cmd() {
    exec "$VMM_HVMDM" kvm --firmware seabios --memory 512M --smp 2 \
        $(hvmdm_storage ide cd "$CD_ISO") \
        --serial stdio --firmware-log "$FW_LOG"
}
