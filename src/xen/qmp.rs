//! What libxl and xentop ask over QMP, answered from the running machine
//! (`hvmdm_toolstack::qmp::commands::XenQmp` does the protocol side).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use hvmdm_devices::snapshot;
use hvmdm_devices::storage::{self, ImageFormat};
use hvmdm_devices::storage::{BlockBackend, IdeController, IdeError, RawFile};
pub use hvmdm_toolstack::qmp::commands::RunState;
use hvmdm_toolstack::qmp::commands::{
    BlockInfo, BlockStats, ChardevInfo, DmControl, InsertedMedium, NewMedium, PciBar, PciBarKind,
    PciDeviceInfo, WAKEUP_NOT_SUPPORTED, WAKEUP_NOT_SUSPENDED,
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
    drives: Vec<Drive>,
}

/// A drive as `query-block` names it.
#[derive(Debug, Clone)]
struct Drive {
    /// Block backend name; for libxl's CD-ROMs also the guest device's id (`ide-<devnum>`).
    id: String,
    /// Image path; for a CD-ROM the medium's name as given (`/dev/fdset/N` after a change).
    path: String,
    ro: bool,
    /// Image format as `query-block` names it (`raw`, `qcow2`).
    drv: &'static str,
    /// Guest-visible size in bytes (a qcow2 image's virtual size, not its file size).
    size: u64,
    /// IDE (channel, unit) of a CD-ROM drive.
    cd: Option<(usize, usize)>,
}

impl Drive {
    fn block_info(&self, ide: &Mutex<IdeController>) -> BlockInfo {
        let mut b = BlockInfo {
            device: self.id.clone(),
            qdev: None,
            removable: false,
            locked: false,
            tray_open: false,
            inserted: Some(InsertedMedium {
                file: self.path.clone(),
                ro: self.ro,
                drv: self.drv.into(),
                virtual_size: self.size,
                writeback: true,
            }),
            // Per-drive counters are not kept yet (issue 4): xentop shows zeros.
            stats: BlockStats::default(),
        };
        if let Some((ch, unit)) = self.cd {
            let ide = ide.lock().unwrap_or_else(|p| p.into_inner());
            let cd = ide.cdrom(ch, unit);
            b.qdev = Some(self.id.clone());
            b.removable = true;
            b.locked = cd.is_some_and(|c| c.is_locked());
            b.tray_open = cd.is_some_and(|c| c.is_tray_open());
            b.inserted = cd.and_then(|c| c.media()).map(|m| InsertedMedium {
                file: self.path.clone(),
                ro: true,
                drv: "raw".into(),
                virtual_size: m.len(),
                writeback: true,
            });
        }
        b
    }

    fn cd_slot(&self) -> Result<(usize, usize), QmpError> {
        self.cd.ok_or_else(|| QmpError::generic(format!("Device '{}' is not removable", self.id)))
    }

    /// QEMU's `do_open_tray` error when the guest holds the lock.
    fn ide_error(&self, e: IdeError) -> QmpError {
        match e {
            IdeError::Locked { .. } => QmpError::generic(format!(
                "Device '{}' is locked and force was not specified, wait for tray to open and try again",
                self.id
            )),
            other => QmpError::generic(format!("Device '{}': {other}", self.id)),
        }
    }

    /// `eject`: opens the tray (refused while locked unless `force`) and removes the medium.
    fn eject(&mut self, ide: &Mutex<IdeController>, force: bool) -> Result<(), QmpError> {
        let (ch, unit) = self.cd_slot()?;
        let mut ide = ide.lock().unwrap_or_else(|p| p.into_inner());
        ide.eject_media(ch, unit, force).map_err(|e| self.ide_error(e))?;
        log::info!("qmp: ejected the medium of {}", self.id);
        self.path.clear();
        self.size = 0;
        Ok(())
    }

    /// `blockdev-change-medium`: QEMU's open tray, remove, insert, close tray.
    fn change_medium(&mut self, ide: &Mutex<IdeController>, m: NewMedium) -> Result<(), QmpError> {
        let (ch, unit) = self.cd_slot()?;
        match m.format.as_deref() {
            None | Some("raw") => {}
            Some(f) => {
                return Err(QmpError::generic(format!(
                    "Image format '{f}' is not supported for CD-ROM media"
                )))
            }
        }
        // A CD medium is read-only whatever mode the file was opened in.
        let img = RawFile::from_file(std::fs::File::from(m.fd), true)
            .map_err(|e| QmpError::generic(format!("Could not open '{}': {e}", m.filename)))?;
        let size = img.len();
        let mut ide = ide.lock().unwrap_or_else(|p| p.into_inner());
        ide.eject_media(ch, unit, m.force).map_err(|e| self.ide_error(e))?;
        ide.insert_media(ch, unit, Arc::new(img)).map_err(|e| self.ide_error(e))?;
        log::info!("qmp: {} now holds {} ({size} bytes)", self.id, m.filename);
        self.path = m.filename;
        self.size = size;
        Ok(())
    }
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
            .enumerate()
            .map(|(i, (d, id))| {
                // The slot as the machine assigns it (index, or position in the list).
                let pos = d.index.map_or(i, usize::from);
                // The guest-visible size (a qcow2 image's virtual size); the image is opened a
                // second time read-only just for its header, so IDE and AHCI disks need no lookup.
                let size = if d.has_medium() {
                    storage::open_image(&d.path, d.format, true).map_or(0, |b| b.len())
                } else {
                    0
                };
                let drv = match d.format {
                    ImageFormat::Raw => "raw",
                    ImageFormat::Qcow2 => "qcow2",
                };
                Drive {
                    id: id.clone(),
                    path: d.path.display().to_string(),
                    ro: d.readonly,
                    drv,
                    size,
                    cd: d.is_cdrom().then_some((pos / 2, pos % 2)),
                }
            })
            .collect();
        Control { machine, platform, ram, state, drives }
    }
}

/// The drive `XenQmp` resolved (it only passes names from `block_devices`).
fn find_drive<'d>(drives: &'d mut [Drive], device: &str) -> Result<&'d mut Drive, QmpError> {
    drives.iter_mut().find(|d| d.id == device).ok_or_else(|| QmpError::device_not_found(device))
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
        self.drives.iter().map(|d| d.block_info(self.machine.ide())).collect()
    }

    fn eject(&mut self, device: &str, force: bool) -> Result<(), QmpError> {
        let ide = self.machine.ide();
        find_drive(&mut self.drives, device)?.eject(ide, force)
    }

    fn change_medium(&mut self, device: &str, medium: NewMedium) -> Result<(), QmpError> {
        let ide = self.machine.ide();
        find_drive(&mut self.drives, device)?.change_medium(ide, medium)
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

#[cfg(test)]
mod tests {
    use super::*;
    use hvmdm_devices::bus::BusDevice;
    use hvmdm_devices::irq::{IsaIrq, RecordingIrqSink};
    use hvmdm_devices::mem::TestRam;
    use hvmdm_devices::storage::CdConfig;
    use hvmdm_toolstack::qmp::{Dispatcher, XenQmp};
    use serde_json::{json, Map, Value};

    /// The drive table and an IDE controller with libxl's CD at hdc (ide-5632, empty) and a disk.
    struct CdDm {
        ide: Mutex<IdeController>,
        drives: Vec<Drive>,
    }

    impl CdDm {
        fn new() -> Self {
            let irqs = Arc::new(RecordingIrqSink::default());
            let mut ide = IdeController::new(
                Arc::new(TestRam::new(0x1000)),
                IsaIrq::new(irqs.clone(), 14),
                IsaIrq::new(irqs, 15),
            );
            ide.attach_cdrom(1, 0, None, CdConfig::default()).unwrap();
            let disk = Drive {
                id: "ide0-hd0".into(),
                path: "/d.img".into(),
                ro: false,
                drv: "raw",
                size: 512,
                cd: None,
            };
            let cd = Drive {
                id: "ide-5632".into(),
                path: String::new(),
                ro: true,
                drv: "raw",
                size: 0,
                cd: Some((1, 0)),
            };
            CdDm { ide: Mutex::new(ide), drives: vec![disk, cd] }
        }
    }

    impl DmControl for CdDm {
        fn run_state(&self) -> RunState {
            RunState::Running
        }
        fn stop(&mut self) -> Result<(), QmpError> {
            Ok(())
        }
        fn cont(&mut self) -> Result<(), QmpError> {
            Ok(())
        }
        fn chardevs(&self) -> Vec<ChardevInfo> {
            Vec::new()
        }
        fn pci_devices(&self) -> Vec<PciDeviceInfo> {
            Vec::new()
        }
        fn block_devices(&self) -> Vec<BlockInfo> {
            self.drives.iter().map(|d| d.block_info(&self.ide)).collect()
        }
        fn cpus(&self) -> Vec<u32> {
            vec![0]
        }
        fn max_cpus(&self) -> u32 {
            1
        }
        fn save_devices_state(&mut self, _: OwnedFd, _: bool) -> Result<(), String> {
            Err("no".into())
        }
        fn load_devices_state(&mut self, _: OwnedFd) -> Result<(), String> {
            Err("no".into())
        }
        fn set_global_dirty_log(&mut self, _: bool) {}
        fn eject(&mut self, device: &str, force: bool) -> Result<(), QmpError> {
            find_drive(&mut self.drives, device)?.eject(&self.ide, force)
        }
        fn change_medium(&mut self, device: &str, medium: NewMedium) -> Result<(), QmpError> {
            find_drive(&mut self.drives, device)?.change_medium(&self.ide, medium)
        }
    }

    fn run(q: &mut XenQmp<CdDm>, cmd: &str, args: Value) -> Result<Value, Value> {
        let args: Map<String, Value> = args.as_object().cloned().unwrap_or_default();
        q.execute(cmd, &args).map_err(|e| json!({"class": e.class.to_string(), "desc": e.desc}))
    }

    fn cd_block(q: &mut XenQmp<CdDm>) -> Value {
        let all = run(q, "query-block", json!({})).unwrap();
        all.as_array().unwrap().iter().find(|b| b["device"] == "ide-5632").unwrap().clone()
    }

    /// What a guest does with a PACKET command on the secondary master: (status, error).
    fn guest_packet(q: &mut XenQmp<CdDm>, cdb: [u8; 12]) -> (u8, u8) {
        let mut ide = q.ctl().ide.lock().unwrap();
        ide.write(2, 6, &[0xa0]);
        ide.write(2, 7, &[0xa0]);
        for w in cdb.chunks(2) {
            ide.write(2, 0, w);
        }
        let (mut st, mut err) = ([0u8], [0u8]);
        ide.read(2, 1, &mut err);
        ide.read(2, 7, &mut st);
        (st[0], err[0])
    }

    #[test]
    fn libxl_cdrom_insert_lock_and_eject() {
        let mut q = XenQmp::new(CdDm::new());
        let b = cd_block(&mut q);
        assert_eq!(
            (&b["removable"], &b["tray_open"], &b["qdev"]),
            (&json!(true), &json!(false), &json!("ide-5632"))
        );
        assert!(b.get("inserted").is_none());

        let iso = std::env::temp_dir().join(format!("hvmdm-qmp-cd-{}.iso", std::process::id()));
        std::fs::write(&iso, vec![0x5a; 4 * 2048]).unwrap();
        let path = iso.display().to_string();
        run(&mut q, "blockdev-change-medium", json!({"id": "ide-5632", "filename": path, "format": "raw"}))
            .unwrap();
        let b = cd_block(&mut q);
        assert_eq!(b["inserted"]["file"], json!(path));
        assert_eq!(b["inserted"]["ro"], json!(true));
        assert_eq!(b["inserted"]["image"]["virtual-size"], json!(8192));
        // The guest sees the media change once, then locks the tray.
        assert_eq!(guest_packet(&mut q, [0; 12]), (0x41, 0x64));
        assert_eq!(guest_packet(&mut q, [0; 12]), (0x50, 0));
        assert_eq!(guest_packet(&mut q, [0x1e, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]), (0x50, 0));
        assert_eq!(cd_block(&mut q)["locked"], json!(true));

        let locked = json!({"class": "GenericError",
            "desc": "Device 'ide-5632' is locked and force was not specified, wait for tray to open and try again"});
        assert_eq!(run(&mut q, "eject", json!({"id": "ide-5632"})), Err(locked.clone()));
        assert_eq!(
            run(&mut q, "blockdev-change-medium", json!({"id": "ide-5632", "filename": path})),
            Err(locked)
        );
        assert!(cd_block(&mut q).get("inserted").is_some());
        run(&mut q, "eject", json!({"id": "ide-5632", "force": true})).unwrap();
        let b = cd_block(&mut q);
        assert!(b.get("inserted").is_none());
        assert_eq!((&b["locked"], &b["tray_open"]), (&json!(false), &json!(true)));
        // Guest: medium not present.
        assert_eq!(guest_packet(&mut q, [0; 12]), (0x41, 0x24));
        // Ejecting an empty drive is fine; disks are not removable; formats other than raw fail.
        run(&mut q, "eject", json!({"device": "ide-5632"})).unwrap();
        assert_eq!(
            run(&mut q, "eject", json!({"device": "ide0-hd0"})).unwrap_err()["desc"],
            json!("Device 'ide0-hd0' is not removable")
        );
        assert_eq!(
            run(
                &mut q,
                "blockdev-change-medium",
                json!({"id": "ide-5632", "filename": path, "format": "qcow2"})
            )
            .unwrap_err()["desc"],
            json!("Image format 'qcow2' is not supported for CD-ROM media")
        );
        assert_eq!(
            run(&mut q, "eject", json!({"id": "ide-768"})).unwrap_err()["class"],
            json!("DeviceNotFound")
        );
        std::fs::remove_file(&iso).unwrap();
    }
}
