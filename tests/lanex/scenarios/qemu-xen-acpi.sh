# hvmdm-ops's guest and operations with Debian's qemu-xen as the device model, proving the
# harness for what only ACPI can do without PV drivers (`nopv`): vCPU hotplug (`xl vcpu-set 2`
# with maxvcpus=2, the guest onlines cpu1), an S3 round trip (`xl trigger sleep`, then
# `s3resume` = QMP system_wakeup), save/restore, a guest-initiated reboot (`xl trigger nmi`),
# shutdown through the ACPI power button. By name only (two guest boots, ~15 min under nested TCG).
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_QEMU_XEN'
SCENARIO_HDTYPE=ahci
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 8086:2922"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="nopv hvmdm.beat=1 hvmdm.powerbtn=1 hvmdm.cpuhp=1 hvmdm.slpbtn=1 hvmdm.nmireboot=1"
SCENARIO_GUEST_MODULES=button
SCENARIO_CFG_EXTRA="maxvcpus=2"
SCENARIO_ON_REBOOT=restart
SCENARIO_OPS="pause vcpuset save nmireboot s3 shutdown destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog pause vcpuset save nmireboot s3 shutdown powerbtn destroy dm-log gone exit"
SCENARIO_TIMEOUT=1800
