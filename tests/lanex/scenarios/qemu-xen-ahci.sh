# As qemu-xen-ide with hdtype="ahci" (SeaBIOS loads the kernel through AHCI DMA: ~4x faster
# under nested TCG). By name only.
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_QEMU_XEN'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 5853:0001 8086:2922"
SCENARIO_GUEST_TIMEOUT=300
