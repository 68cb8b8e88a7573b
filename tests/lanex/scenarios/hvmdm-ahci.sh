# hvmdm as the device model with hdtype="ahci": libxl's `-device ahci` + `ide-hd,bus=ahci0.0`
# become hvmdm's ICH9 AHCI at 00:03.0; hvmloader and SeaBIOS find it, SeaBIOS boots from the AHCI
# disk, the guest's ahci driver (MSI through xendevicemodel_inject_msi, NCQ) reads its checksum.
# Skipped when the hvmdm binary does not exist.
SCENARIO_NEEDS=hvmdm
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 8086:2922"
SCENARIO_GUEST_TIMEOUT=600
