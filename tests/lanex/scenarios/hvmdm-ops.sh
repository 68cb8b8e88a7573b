# As qemu-xen-ops (see there), with hvmdm as the device model. Skipped without HVMDM_BIN.
SCENARIO_DEFAULT=0
SCENARIO_NEEDS=hvmdm
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 5853:0001"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="hvmdm.beat=1"
SCENARIO_ON_REBOOT=restart
SCENARIO_OPS="pause save reboot shutdown destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog pause save reboot shutdown destroy dm-log gone exit"
SCENARIO_TIMEOUT=1800
