# `xl reboot` and `xl shutdown` through the PV control node, with hvmdm as the device model: the
# guest kernel runs with its Xen PV support on (no `nopv`), and without the Xen platform PCI
# device (hvmdm has none yet) Linux still brings xenbus up over the per-vCPU upcall vector, so
# libxl finds PV control available. xl reboot: the guest's control/shutdown watch runs
# /sbin/reboot (HVMDM-PV-REBOOT), which resets through hvmdm; a new domain boots to HVMDM-DONE.
# xl shutdown: the same path powers off (HVMDM-PV-POWEROFF) through hvmdm's ACPI S5. qemu-xen-ops
# covers the same operations with qemu-xen (and its platform device). AHCI disk; by name only.
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:2922"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="hvmdm.beat=2"
SCENARIO_ON_REBOOT=restart
SCENARIO_OPS="reboot shutdown"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog reboot shutdown dm-log gone exit"
SCENARIO_TIMEOUT=1500
