//! What libxl and xentop ask over QMP, answered from the running machine
//! (`hvmdm_toolstack::qmp::commands::XenQmp` does the protocol side).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use hvmdm_devices::snapshot;
pub use hvmdm_toolstack::qmp::commands::RunState;
use hvmdm_toolstack::qmp::commands::{
    BlockInfo, BlockStats, ChardevInfo, DmControl, InsertedMedium, PciBar, PciBarKind, PciDeviceInfo,
    WAKEUP_NOT_SUPPORTED, WAKEUP_NOT_SUSPENDED,
};
use hvmdm_toolstack::qmp::QmpError;
use hvmdm_xen::dm::XenDeviceModel;
use hvmdm_xen::foreign::XenForeignMemory;
use hvmdm_xen::mapcache::MapCache;
use hvmdm_xen::XenPlatform;

use super::config::XenOpts;
use crate::config::MachineConfig;
use crate::machine::Machine;

pub struct Control<'a> {
    machine: &'a Machine,
    platform: Arc<XenPlatform<XenDeviceModel>>,
    ram: Arc<MapCache<XenDeviceModel, XenForeignMemory>>,
    state: RunState,
    drives: Vec<(String, String, bool, u64)>,
}

impl<'a> Control<'a> {
    pub fn new(
        machine: &'a Machine,
        platform: Arc<XenPlatform<XenDeviceModel>>,
        state: RunState,
        ram: Arc<MapCache<XenDeviceModel, XenForeignMemory>>,
        cfg: &MachineConfig,
        opts: &XenOpts,
    ) -> Self {
        let drives = cfg
            .disks
            .iter()
            .zip(&opts.drive_ids)
            .map(|(d, id)| {
                let size = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0);
                (id.clone(), d.path.display().to_string(), d.readonly, size)
            })
            .collect();
        Control { machine, platform, ram, state, drives }
    }
}

/// Loads a device-state stream written by `xen-save-devices-state` (`-incoming fd:N`).
pub fn load_state(machine: &Machine, mut r: impl Read) -> Result<(), String> {
    let buf = snapshot::read_stream(&mut r).map_err(|e| format!("reading: {e}"))?;
    machine.load_state(&buf).map_err(|e| e.to_string())
}

impl DmControl for Control<'_> {
    fn run_state(&self) -> RunState {
        // Xen holds a guest in S3 itself; a paused or migrating state says more than that.
        if self.state == RunState::Running && self.platform.is_suspended() {
            return RunState::Suspended;
        }
        self.state
    }

    fn system_wakeup(&mut self) -> Result<(), QmpError> {
        if !self.platform.can_suspend() {
            return Err(QmpError::generic(WAKEUP_NOT_SUPPORTED));
        }
        if !self.platform.is_suspended() {
            return Err(QmpError::generic(WAKEUP_NOT_SUSPENDED));
        }
        // Devices keep their state over S3 (the guest's drivers re-initialise what they use;
        // PIIX config such as the PM base survives, as with qemu-xen); only the firmware's
        // resume flag is set.
        self.machine.prepare_s3_resume();
        self.platform.wakeup().map(drop).map_err(|e| QmpError::generic(format!("wake-up failed: {e}")))
    }

    fn stop(&mut self) -> Result<(), QmpError> {
        if matches!(self.state, RunState::Running) {
            self.state = RunState::Paused;
        }
        Ok(())
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        self.state = RunState::Running;
        Ok(())
    }

    fn chardevs(&self) -> Vec<ChardevInfo> {
        match &self.machine.pty_path {
            Some(p) => vec![ChardevInfo {
                label: "serial0".into(),
                filename: format!("pty:{p}"),
                frontend_open: true,
            }],
            None => Vec::new(),
        }
    }

    fn pci_devices(&self) -> Vec<PciDeviceInfo> {
        let m = self.machine;
        m.pci_devfns()
            .into_iter()
            .map(|devfn| {
                let rd = |reg: u16, size: u8| m.pci_config_read(0, devfn, reg, size);
                let mut bars = Vec::new();
                for bar in 0..6u8 {
                    let reg = 0x10 + u16::from(bar) * 4;
                    let v = rd(reg, 4);
                    // Only the BARs a function implements read non-zero (IDE's BMDMA, ...);
                    // the size is not probed here, so it is reported as 0 when unknown.
                    if v == 0 {
                        continue;
                    }
                    let kind = if v & 1 != 0 {
                        PciBarKind::Io
                    } else {
                        PciBarKind::Memory { prefetch: v & 8 != 0, mem_64: v & 6 == 4 }
                    };
                    let address = if v & 1 != 0 { u64::from(v & !3) } else { u64::from(v & !0xf) };
                    bars.push(PciBar { bar, kind, address, size: 0 });
                }
                PciDeviceInfo {
                    bus: 0,
                    slot: devfn >> 3,
                    function: devfn & 7,
                    vendor: rd(0, 2) as u16,
                    device: rd(2, 2) as u16,
                    subsystem_vendor: rd(0x2c, 2) as u16,
                    subsystem: rd(0x2e, 2) as u16,
                    class: rd(0x0a, 2) as u16,
                    irq_pin: rd(0x3d, 1) as u8,
                    irq_line: rd(0x3c, 1) as u8,
                    qdev_id: None,
                    bars,
                }
            })
            .collect()
    }

    fn block_devices(&self) -> Vec<BlockInfo> {
        self.drives
            .iter()
            .map(|(id, path, ro, size)| BlockInfo {
                device: id.clone(),
                qdev: None,
                removable: false,
                locked: false,
                tray_open: false,
                inserted: Some(InsertedMedium {
                    file: path.clone(),
                    ro: *ro,
                    drv: "raw".into(),
                    virtual_size: *size,
                    writeback: true,
                }),
                // Per-drive counters are not kept yet (issue 4): xentop shows zeros.
                stats: BlockStats::default(),
            })
            .collect()
    }

    fn cpus(&self) -> Vec<u32> {
        match self.machine.cpu_hotplug() {
            Some(c) => c.lock().unwrap_or_else(|p| p.into_inner()).present(),
            None => vec![0],
        }
    }

    fn max_cpus(&self) -> u32 {
        self.machine.max_cpus()
    }

    fn hotplug_cpu(&mut self, index: u32) -> Result<(), QmpError> {
        // Xen created every vCPU at build time; the guest's DSDT learns of the new one from the
        // present bitmap and brings it up itself.
        if self.machine.plug_cpu(index) {
            log::info!("vCPU {index} hot-added");
            Ok(())
        } else {
            Err(QmpError::generic(format!("CPU hotplug of vCPU {index} is not available")))
        }
    }

    fn save_devices_state(&mut self, fd: OwnedFd, _live: bool) -> Result<(), String> {
        let bytes = self.machine.save_state().map_err(|e| e.to_string())?;
        let mut f = std::fs::File::from(fd);
        f.write_all(&bytes).and_then(|()| f.flush()).map_err(|e| format!("writing device state: {e}"))?;
        log::info!("device state saved ({} bytes)", bytes.len());
        Ok(())
    }

    fn load_devices_state(&mut self, fd: OwnedFd) -> Result<(), String> {
        load_state(self.machine, std::fs::File::from(fd))
    }

    fn set_global_dirty_log(&mut self, on: bool) {
        self.ram.set_dirty_log(on);
    }
}
