# CD-ROM media change under real libxl: an AHCI boot disk plus an IDE CD-ROM (hdc; libxl always
# puts CD-ROMs on IDE). The guest watches /dev/sr0 (hvmdm.cdwatch=1); `xl cd-eject` and
# `xl cd-insert` reach hvmdm as QMP eject and add-fd + blockdev-change-medium (cdchange), then
# `xl destroy`. qemu-xen-cd is the same guest with qemu-xen. Skipped without HVMDM_BIN.
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ahci
SCENARIO_CDROM=1
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:2922"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="nopv hvmdm.beat=2 hvmdm.cdwatch=1"
SCENARIO_OPS="cdchange destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog cdchange destroy dm-log gone exit"
SCENARIO_TIMEOUT=900
