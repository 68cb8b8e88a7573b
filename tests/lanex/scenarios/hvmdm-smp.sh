# hvmdm-ahci with maxvcpus=2 (vcpus=1): hvmdm binds two vCPU ports and serves each vCPU's
# requests on its own worker thread (a single-vCPU domain is served inline), with AHCI's I/O
# worker completions. A boot to the marker and poweroff, no operations. By name only.
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 8086:2922"
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_CFG_EXTRA="maxvcpus=2"
SCENARIO_TIMEOUT=600
