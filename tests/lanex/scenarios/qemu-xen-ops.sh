# xl operations on one running guest, Debian's qemu-xen as the device model (IDE disk, as
# hvmdm-ops): after HVMDM-DONE the guest prints a heartbeat (hvmdm.beat=1) and scenario.sh runs
# xl pause/unpause, save + restore -p, reboot (on_reboot="restart": the second boot must reach
# HVMDM-DONE again), shutdown -F (the Linux guest has PV drivers, so xl asks through the PV
# control node and the guest powers off through ACPI S5), then destroy of a fresh domain while
# its firmware runs. 10-14 min (two guest boots). By name only.
SCENARIO_DEFAULT=0
SCENARIO_DM='$VMM_QEMU_XEN'
SCENARIO_HDTYPE=ide
SCENARIO_PCI="8086:1237 8086:7000 8086:7010 5853:0001"
SCENARIO_MEMORY=128
SCENARIO_GUEST_TIMEOUT=600
SCENARIO_GUEST_APPEND="hvmdm.beat=1"
SCENARIO_ON_REBOOT=restart
SCENARIO_OPS="pause save reboot shutdown destroy"
SCENARIO_CHECKS="marker disk pci acpi-errors fwlog pause save reboot shutdown destroy dm-log gone exit"
SCENARIO_TIMEOUT=1800
