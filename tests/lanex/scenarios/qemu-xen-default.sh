# libxl's default device model (no device_model_override): proves the override scenario and
# the default path behave the same. By name only.
SCENARIO_DEFAULT=0
SCENARIO_DM=
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 5853:0001"
SCENARIO_GUEST_TIMEOUT=420
