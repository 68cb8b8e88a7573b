# hvmdm-cd (see there) with Debian's qemu-xen as the device model: the same AHCI boot disk, IDE
# CD-ROM and `xl cd-eject` / `xl cd-insert` (harness honesty for cdchange).
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_QEMU_XEN'
SCENARIO_HDTYPE=ahci
SCENARIO_CDROM=1
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:2922"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="nopv hvmdm.beat=2 hvmdm.cdwatch=1"
SCENARIO_OPS="cdchange destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog cdchange destroy dm-log gone exit"
SCENARIO_TIMEOUT=900
