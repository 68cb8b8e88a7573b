# hvmdm as the device model (device_model_override), IDE disk: libxl spawns hvmdm with its
# qemu-xen argv, hvmloader and SeaBIOS find hvmdm's PCI devices, the guest boots from hvmdm's IDE
# disk to its marker on the serial pty and powers off through hvmdm's PM1a_CNT (S5).
# Skipped when the hvmdm binary does not exist.
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010"
SCENARIO_GUEST_TIMEOUT=600
