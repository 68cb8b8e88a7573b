# dm_restrict=1 with Debian's qemu-xen: libxl runs the device model as xen-qemuuser-shared
# (created by dom0-init.sh), chrooted, with -xen-domid-restrict. The guest boots without PV
# drivers (nopv), so `xl shutdown -F` falls back to the ACPI power button: Xen raises PM1a's
# power-button event + SCI, the guest's `button` module (an extra initrd on the boot disk) counts
# it, guest-init.sh sees the counter move and powers off through ACPI S5. By name only.
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_QEMU_XEN'
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
