# Debian's qemu-xen as the device model, named through device_model_override (the exact path
# hvmdm will take), IDE disk (hda) holding the SYSLINUX boot image of lane K's guest kit.
SCENARIO_DM='$VMM_QEMU_XEN'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 5853:0001"
SCENARIO_GUEST_TIMEOUT=420
