# As qemu-xen-restrict (see there: dm_restrict=1, ACPI power button), with hvmdm as the device
# model. Skipped without HVMDM_BIN.
SCENARIO_DEFAULT=0
SCENARIO_NEEDS=hvmdm
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 5853:0001"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_CFG_EXTRA='dm_restrict=1'
SCENARIO_GUEST_APPEND="nopv hvmdm.beat=2 hvmdm.powerbtn=1"
SCENARIO_GUEST_MODULES=button
SCENARIO_OPS="shutdown"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog restricted shutdown powerbtn dm-log gone exit"
SCENARIO_TIMEOUT=900
# The restricted DM cannot serve the qdisk PV backend (documented dm_restrict limitation; the guest
# uses the emulated disk).
SCENARIO_DMLOG_IGNORE="xen be core: can't open evtchn device"
