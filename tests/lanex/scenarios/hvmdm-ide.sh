# hvmdm as the device model (device_model_override), IDE disk. Skipped while the hvmdm binary
# does not exist; expected to fail until hvmdm serves Xen guests (issue 3).
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010"
SCENARIO_GUEST_TIMEOUT=420
