# As qemu-xen-ops (see there), with hvmdm as the device model and an AHCI disk (hdtype="ahci":
# SeaBIOS loads the kernel by DMA, twice as fast under nested TCG as IDE). The guest runs `nopv`
# (no PV drivers): `xl shutdown -F` presses the ACPI power button (Xen raises it; the guest's
# button driver powers off through hvmdm's PM1a_CNT), checked by `powerbtn`. No `xl reboot` here
# (hvmdm-pvctl covers it with the guest's PV support on; Xen has no reset trigger for
# `xl reboot -F`). Instead `xl trigger nmi` makes the guest run `reboot -f` (nmireboot), which
# resets through hvmdm: a new domain and hvmdm boot.
# With maxvcpus=2, `xl vcpu-set 2` hot-adds vCPU 1 through hvmdm's QMP device_add, CPU bitmap and
# GPE (vcpuset), and an ACPI S3 round trip (`xl trigger sleep` / `s3resume`, s3) runs on the
# rebooted guest. qemu-xen-acpi is the same guest and operations with qemu-xen.
# Skipped without HVMDM_BIN.
SCENARIO_DEFAULT=0
SCENARIO_NEEDS=hvmdm
SCENARIO_DM='$VMM_HVMDM'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:2922"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="nopv hvmdm.beat=1 hvmdm.powerbtn=1 hvmdm.cpuhp=1 hvmdm.slpbtn=1 hvmdm.nmireboot=1"
SCENARIO_CFG_EXTRA="maxvcpus=2"
SCENARIO_GUEST_MODULES=button
SCENARIO_ON_REBOOT=restart
SCENARIO_OPS="pause vcpuset save nmireboot s3 shutdown destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog pause vcpuset save nmireboot s3 shutdown powerbtn destroy dm-log gone exit"
SCENARIO_TIMEOUT=1800
