//! The QMP commands libxl 4.17 and xentop send to a Xen device model (xen-interfaces.md §3.2),
//! answered with QEMU 7.2's reply shapes and error texts. [`XenQmp`] is the [`Dispatcher`]; the
//! device model plugs in through [`DmControl`].
//!
//! Answered by the session itself, not here: `qmp_capabilities`, `query-version` (the session's
//! [`Version`], which must be [`XenQmp::version`] for the greeting and the reply to agree),
//! `query-commands`, `add-fd`, `remove-fd`, `query-fdsets`, `getfd`, `closefd`.
//!
//! Deliberately not implemented, so `CommandNotFound` (the session's answer for names missing from
//! [`XEN_COMMANDS`]): `device_del`, `cpu-add`,
//! `query-cpus` (libxl only falls back to it when `query-cpus-fast` is missing), `change`,
//! `human-monitor-command` and the COLO/NBD commands. `device_add` exists for vCPUs only (`xl
//! vcpu-set`); PCI passthrough and USB drivers get QEMU's error for a device model it lacks.

use super::{Args, Dispatcher, FdStore, QmpError, Version};
use serde_json::{json, Map, Value};
use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;

/// Command names [`XenQmp`] dispatches.
pub const XEN_COMMANDS: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "query-chardev",
    "query-vnc",
    "change-vnc-password",
    "query-cpus-fast",
    "query-hotpluggable-cpus",
    "query-pci",
    "query-block",
    "query-blockstats",
    "xen-save-devices-state",
    "xen-load-devices-state",
    "xen-set-global-dirty-log",
    "eject",
    "blockdev-change-medium",
    "system_wakeup",
    "device_add",
];

/// QEMU's texts for `system_wakeup` failures, for [`DmControl::system_wakeup`] implementations.
pub const WAKEUP_NOT_SUPPORTED: &str = "wake-up from suspend is not supported by this guest";
pub const WAKEUP_NOT_SUSPENDED: &str = "Unable to wake up: guest is not in suspended state";
/// QEMU's `QERR_IO_ERROR`.
const IO_ERROR: &str = "An IO error has occurred";

/// QEMU's `RunState` (qapi/run-state.json), reported by `query-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Debug,
    InMigrate,
    InternalError,
    IoError,
    Paused,
    PostMigrate,
    /// Started with `-S`, not yet `cont`inued (libxl's fresh-start expectation).
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
}

impl RunState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::InMigrate => "inmigrate",
            Self::InternalError => "internal-error",
            Self::IoError => "io-error",
            Self::Paused => "paused",
            Self::PostMigrate => "postmigrate",
            Self::Prelaunch => "prelaunch",
            Self::FinishMigrate => "finish-migrate",
            Self::RestoreVm => "restore-vm",
            Self::Running => "running",
            Self::SaveVm => "save-vm",
            Self::Shutdown => "shutdown",
            Self::Suspended => "suspended",
            Self::Watchdog => "watchdog",
            Self::GuestPanicked => "guest-panicked",
            Self::Colo => "colo",
        }
    }

    /// QEMU's `runstate_is_running`: the `running` member of `query-status`.
    pub fn is_running(&self) -> bool {
        *self == Self::Running
    }

    /// QEMU's `runstate_needs_reset`: `cont` is refused in these states.
    pub fn needs_reset(&self) -> bool {
        matches!(self, Self::InternalError | Self::Shutdown)
    }
}

/// One `query-chardev` entry. libxl needs `label` `serial<N>` with `filename` `pty:<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    pub frontend_open: bool,
}

/// A PCI BAR as `query-pci` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// BAR number 0-5, or 6 for the expansion ROM (QEMU's `PCI_ROM_SLOT`).
    pub bar: u8,
    pub kind: PciBarKind,
    /// Current guest address (all-ones while unmapped, as QEMU's `PCI_BAR_UNMAPPED`).
    pub address: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciBarKind {
    Io,
    Memory { prefetch: bool, mem_64: bool },
}

/// One function on bus 0 (hvmdm has no PCI bridges). Header type 0 is assumed, so the
/// subsystem ids are always reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// Class and subclass, config bytes 0x0b:0x0a (QEMU's `class_info.class`).
    pub class: u16,
    /// Config 0x3d; 0 = no interrupt (then `irq` is omitted).
    pub irq_pin: u8,
    /// Config 0x3c, reported as `irq` when `irq_pin != 0`.
    pub irq_line: u8,
    /// `-device ...,id=` (libxl finds passthrough devices by it); `None` reports `""`.
    pub qdev_id: Option<String>,
    /// Implemented BARs only.
    pub bars: Vec<PciBar>,
}

/// The medium in a drive (`query-block` `inserted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertedMedium {
    pub file: String,
    pub ro: bool,
    /// Format driver, e.g. `raw`, `qcow2`.
    pub drv: String,
    pub virtual_size: u64,
    /// `cache=writeback` (libxl's setting) vs writethrough.
    pub writeback: bool,
}

/// I/O counters (`query-blockstats` `stats`; xentop reads the first four).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub wr_highest_offset: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
}

/// One drive (`query-block` / `query-blockstats` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Block backend name: `ide0-hd0` for `-drive if=ide`, the `-drive id=` otherwise
    /// (`ide-5632` for libxl's cdroms). `eject`/`blockdev-change-medium` `device` matches it.
    pub device: String,
    /// The attached guest device's id (or QOM path); `eject`/`blockdev-change-medium` `id`
    /// matches it (libxl sends `ide-<dev_number>`).
    pub qdev: Option<String>,
    pub removable: bool,
    /// Guest locked the tray (only meaningful if removable).
    pub locked: bool,
    /// Only reported if removable.
    pub tray_open: bool,
    pub inserted: Option<InsertedMedium>,
    pub stats: BlockStats,
}

/// `blockdev-change-medium`'s `read-only-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnlyMode {
    Retain,
    ReadOnly,
    ReadWrite,
}

/// A medium to insert, opened by [`XenQmp`] (from `/dev/fdset/N` or a plain path).
#[derive(Debug)]
pub struct NewMedium {
    pub fd: OwnedFd,
    /// As given (`/dev/fdset/N` for libxl; the `add-fd` `opaque` holds `<format>:<path>`).
    pub filename: String,
    pub format: Option<String>,
    /// Whether `fd` was opened read-only (plain paths; fdset fds come as libxl opened them).
    pub read_only: bool,
    pub force: bool,
}

/// What the device model provides to [`XenQmp`]. Errors returned as [`QmpError`] are sent to the
/// client as they are; `String` errors are wrapped in QEMU's text for that command.
pub trait DmControl {
    /// The version the greeting and `query-version` report.
    fn version(&self) -> Version {
        Version::default()
    }

    fn run_state(&self) -> RunState;

    /// `stop`: stop emulation (under Xen, libxl pauses the domain's vCPUs itself).
    /// Must be idempotent. QEMU leaves `prelaunch` as it is and, in `inmigrate`, only cancels
    /// the automatic start.
    fn stop(&mut self) -> Result<(), QmpError>;

    /// `cont`. [`XenQmp`] has already refused `shutdown`/`internal-error` ("Resetting the
    /// Virtual Machine is required") and `finish-migrate`, and answers `suspended` itself.
    fn cont(&mut self) -> Result<(), QmpError>;

    fn chardevs(&self) -> Vec<ChardevInfo>;

    fn pci_devices(&self) -> Vec<PciDeviceInfo>;

    fn block_devices(&self) -> Vec<BlockInfo>;

    /// Present vCPU indices (`-smp N` plus hot-added ones).
    fn cpus(&self) -> Vec<u32>;

    /// `maxcpus`: the possible vCPUs `query-hotpluggable-cpus` lists.
    fn max_cpus(&self) -> u32;

    /// The CPU QOM type `query-hotpluggable-cpus` reports. QEMU's default for the xenfv/pc
    /// machine without `-cpu` (libxl passes none) is qemu64.
    fn cpu_type(&self) -> String {
        "qemu64-x86_64-cpu".to_string()
    }

    /// Host thread id for a vCPU (`query-cpus-fast` `thread-id`). Under Xen the DM runs no
    /// vCPU threads; QEMU reports its dummy per-vCPU threads, we default to the process id.
    fn cpu_thread_id(&self, _index: u32) -> i64 {
        i64::from(std::process::id())
    }

    /// Writes the device state to `fd` (a file or pipe opened for writing). Called with the VM
    /// not running: [`XenQmp`] stops a running VM around it as QEMU does. `live` is
    /// `xen-save-devices-state`'s flag (default true): a live migration whose source gives up
    /// its disk images afterwards.
    fn save_devices_state(&mut self, fd: OwnedFd, live: bool) -> Result<(), String>;

    /// Reads device state saved by [`DmControl::save_devices_state`] (COLO restore). Only
    /// called while not running.
    fn load_devices_state(&mut self, fd: OwnedFd) -> Result<(), String>;

    /// Start/stop reporting DM writes to guest RAM to Xen (`xendevicemodel_modified_memory`).
    fn set_global_dirty_log(&mut self, on: bool);

    /// `eject` of drive `device` (its [`BlockInfo::device`]; [`XenQmp`] resolved the client's
    /// `id`/`device` and checked the drive is removable). QEMU: a locked tray without `force`
    /// gets an eject request to the guest and the error "Device '<name>' is locked and force
    /// was not specified, wait for tray to open and try again".
    fn eject(&mut self, device: &str, force: bool) -> Result<(), QmpError> {
        let _ = force;
        Err(QmpError::generic(format!("Eject of '{device}' is not supported")))
    }

    /// `blockdev-change-medium`: replaces the medium of removable drive `device`.
    fn change_medium(&mut self, device: &str, medium: NewMedium) -> Result<(), QmpError> {
        drop(medium);
        Err(QmpError::generic(format!("Changing the medium of '{device}' is not supported")))
    }

    /// `device_add` of vCPU `index` (`xl vcpu-set`): mark it present and tell the guest (the
    /// legacy CPU hotplug GPE). [`XenQmp`] has checked the driver type and the index range;
    /// the vCPU is not present yet.
    fn hotplug_cpu(&mut self, index: u32) -> Result<(), QmpError> {
        Err(QmpError::generic(format!("CPU hotplug of vCPU {index} is not supported")))
    }

    /// `system_wakeup` (`xl trigger <d> s3resume`). QEMU's errors: [`WAKEUP_NOT_SUPPORTED`]
    /// unless the guest can suspend, then [`WAKEUP_NOT_SUSPENDED`] unless it is suspended.
    fn system_wakeup(&mut self) -> Result<(), QmpError> {
        Err(QmpError::generic(WAKEUP_NOT_SUPPORTED))
    }
}

/// The Xen command set over a [`DmControl`], with the process's fd store.
pub struct XenQmp<C: DmControl> {
    ctl: C,
    fds: FdStore,
}

impl<C: DmControl> XenQmp<C> {
    pub fn new(ctl: C) -> Self {
        Self { ctl, fds: FdStore::new() }
    }

    /// Pass this to [`super::Session::new`] / `QmpServer::new`.
    pub fn version(&self) -> Version {
        self.ctl.version()
    }

    pub fn ctl(&self) -> &C {
        &self.ctl
    }

    pub fn ctl_mut(&mut self) -> &mut C {
        &mut self.ctl
    }

    fn query_status(&self) -> Value {
        let st = self.ctl.run_state();
        json!({"running": st.is_running(), "singlestep": false, "status": st.as_str()})
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        match self.ctl.run_state() {
            st if st.needs_reset() => Err(QmpError::generic("Resetting the Virtual Machine is required")),
            RunState::Suspended => Ok(()),
            RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
            _ => self.ctl.cont(),
        }
    }

    fn query_chardev(&self) -> Value {
        let list = self
            .ctl
            .chardevs()
            .into_iter()
            .map(|c| json!({"label": c.label, "filename": c.filename, "frontend-open": c.frontend_open}));
        Value::Array(list.collect())
    }

    fn cpu_props(index: u32) -> Value {
        // libxl's topology: one core, one thread per socket; no dies, no NUMA nodes.
        json!({"core-id": 0, "socket-id": index, "thread-id": 0})
    }

    fn cpu_qom_path(index: u32) -> String {
        format!("/machine/unattached/device[{index}]")
    }

    fn query_cpus_fast(&self) -> Value {
        let mut cpus = self.ctl.cpus();
        cpus.sort_unstable();
        cpus.dedup();
        let list = cpus.into_iter().map(|i| {
            json!({
                "cpu-index": i,
                "qom-path": Self::cpu_qom_path(i),
                "thread-id": self.ctl.cpu_thread_id(i),
                "props": Self::cpu_props(i),
                "target": "x86_64",
            })
        });
        Value::Array(list.collect())
    }

    fn query_hotpluggable_cpus(&self) -> Value {
        let present = self.ctl.cpus();
        let ty = self.ctl.cpu_type();
        // QEMU builds the list by prepending, so the highest index comes first.
        let list = (0..self.ctl.max_cpus()).rev().map(|i| {
            let mut e = json!({"type": ty, "vcpus-count": 1, "props": Self::cpu_props(i)});
            if present.contains(&i) {
                e["qom-path"] = Value::String(Self::cpu_qom_path(i));
            }
            e
        });
        Value::Array(list.collect())
    }

    fn query_pci(&self) -> Value {
        let devices: Vec<Value> = self.ctl.pci_devices().iter().map(pci_device_json).collect();
        json!([{"bus": 0, "devices": devices}])
    }

    fn query_block(&self) -> Value {
        Value::Array(self.ctl.block_devices().iter().map(block_info_json).collect())
    }

    fn query_blockstats(&self) -> Value {
        Value::Array(self.ctl.block_devices().iter().map(block_stats_json).collect())
    }

    /// `device_add`: vCPUs of the type `query-hotpluggable-cpus` reports, in libxl's topology
    /// (socket n, core 0, thread 0). Checks follow QEMU's order and texts (`qdev_device_add`,
    /// `pc_cpu_pre_plug`); any other driver is one this device model does not have.
    fn device_add(&mut self, a: &mut Args<'_>) -> Result<(), QmpError> {
        let driver = a.str("driver")?;
        let ty = self.ctl.cpu_type();
        if driver != ty {
            return Err(QmpError::generic(format!("'{driver}' is not a valid device model name")));
        }
        a.opt_str("id")?;
        let max = self.ctl.max_cpus();
        let mut topo = [0u32; 3];
        for (slot, (name, limit)) in topo.iter_mut().zip([("socket", max), ("core", 1), ("thread", 1)]) {
            let key = format!("{name}-id");
            let Some(v) = a.opt_int(&key)? else {
                return Err(QmpError::generic(format!("CPU {key} is not set")));
            };
            match u32::try_from(v) {
                Ok(v) if v < limit => *slot = v,
                _ => {
                    return Err(QmpError::generic(format!(
                        "Invalid CPU {key}: {v} must be in range 0:{}",
                        limit.saturating_sub(1)
                    )))
                }
            }
        }
        // Anything else would be a CPU property hvmdm does not model.
        let extra = a.unread().next().map(str::to_owned);
        if let Some(k) = extra {
            return Err(QmpError::generic(format!("Property '{ty}.{k}' not found")));
        }
        let index = topo[0];
        if self.ctl.cpus().contains(&index) {
            // One thread per socket: the APIC ID is the socket's index.
            return Err(QmpError::generic(format!("CPU[{index}] with APIC ID {index} exists")));
        }
        self.ctl.hotplug_cpu(index)
    }

    /// QEMU's `qmp_get_blk`: exactly one of `device` (backend name) and `id` (guest device).
    fn find_block(&self, device: Option<&str>, id: Option<&str>) -> Result<BlockInfo, QmpError> {
        let blocks = self.ctl.block_devices();
        let found = match (device, id) {
            (Some(name), None) => blocks.into_iter().find(|b| b.device == name).ok_or(name),
            (None, Some(id)) => blocks.into_iter().find(|b| b.qdev.as_deref() == Some(id)).ok_or(id),
            _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
        };
        found.map_err(QmpError::device_not_found)
    }

    fn removable_block(&self, device: Option<&str>, id: Option<&str>) -> Result<BlockInfo, QmpError> {
        let b = self.find_block(device, id)?;
        if !b.removable {
            let name = device.or(id).unwrap_or_default();
            return Err(QmpError::generic(format!("Device '{name}' is not removable")));
        }
        Ok(b)
    }

    /// A `filename` argument: `/dev/fdset/N` (a dup of the set's first fd, as libxl sends) or
    /// a path the DM opens itself, as QEMU's `qemu_open` allows.
    fn open_file(&self, filename: &str, how: Open) -> Result<OwnedFd, QmpError> {
        if filename.starts_with("/dev/fdset/") {
            return self.fds.open_fdset_path(filename);
        }
        let mut o = OpenOptions::new();
        match how {
            // QEMU's flags for a state file: O_WRONLY | O_CREAT | O_TRUNC, mode 0660.
            Open::Create => o.write(true).create(true).truncate(true).mode(0o660),
            Open::Read => o.read(true),
            Open::ReadWrite => o.read(true).write(true),
        };
        o.open(filename)
            .map(OwnedFd::from)
            .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {}", strerror(&e))))
    }

    fn save_devices_state(&mut self, filename: &str, live: bool) -> Result<(), QmpError> {
        let was_running = self.ctl.run_state().is_running();
        if was_running {
            self.ctl.stop()?;
        }
        let result = self.open_file(filename, Open::Create).and_then(|fd| {
            self.ctl.save_devices_state(fd, live).map_err(|e| {
                log::warn!("qmp: xen-save-devices-state to {filename}: {e}");
                QmpError::generic(format!("{IO_ERROR}: {e}"))
            })
        });
        // Restart even after a failed save; the save's error is the one reported.
        let restarted = if was_running { self.ctl.cont() } else { Ok(()) };
        result.and(restarted)
    }

    fn load_devices_state(&mut self, filename: &str) -> Result<(), QmpError> {
        if self.ctl.run_state().is_running() {
            return Err(QmpError::generic("Cannot update device state while vm is running"));
        }
        let fd = self.open_file(filename, Open::Read)?;
        self.ctl.load_devices_state(fd).map_err(|e| {
            log::warn!("qmp: xen-load-devices-state from {filename}: {e}");
            QmpError::generic(format!("{IO_ERROR}: {e}"))
        })
    }

    fn change_medium(&mut self, req: ChangeMedium<'_>) -> Result<(), QmpError> {
        let b = self.removable_block(req.device, req.id)?;
        // `retain` keeps the drive's current mode; an empty drive (libxl's cdroms are created
        // `readonly=on`) is taken as read-only.
        let read_only = match req.mode {
            ReadOnlyMode::ReadOnly => true,
            ReadOnlyMode::ReadWrite => false,
            ReadOnlyMode::Retain => b.inserted.as_ref().is_none_or(|m| m.ro),
        };
        let fd = self.open_file(req.filename, if read_only { Open::Read } else { Open::ReadWrite })?;
        let medium = NewMedium {
            fd,
            filename: req.filename.to_string(),
            format: req.format.map(str::to_string),
            read_only,
            force: req.force,
        };
        self.ctl.change_medium(&b.device, medium)
    }
}

#[derive(Clone, Copy)]
enum Open {
    Create,
    Read,
    ReadWrite,
}

/// `blockdev-change-medium` arguments.
struct ChangeMedium<'a> {
    device: Option<&'a str>,
    id: Option<&'a str>,
    filename: &'a str,
    format: Option<&'a str>,
    force: bool,
    mode: ReadOnlyMode,
}

impl<'a> ChangeMedium<'a> {
    fn parse(a: &mut Args<'a>) -> Result<Self, QmpError> {
        Ok(Self {
            device: a.opt_str("device")?,
            id: a.opt_str("id")?,
            filename: a.str("filename")?,
            format: a.opt_str("format")?,
            force: a.opt_bool("force")?.unwrap_or(false),
            mode: match a.opt_str("read-only-mode")? {
                None | Some("retain") => ReadOnlyMode::Retain,
                Some("read-only") => ReadOnlyMode::ReadOnly,
                Some("read-write") => ReadOnlyMode::ReadWrite,
                Some(other) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'read-only-mode' does not accept value '{other}'"
                    )))
                }
            },
        })
    }
}

impl<C: DmControl> Dispatcher for XenQmp<C> {
    fn commands(&self) -> &[&str] {
        XEN_COMMANDS
    }

    fn execute(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        // Arguments are read (and type-checked) before `finish` rejects extra ones and before
        // anything acts, as QEMU's generated marshallers do.
        let empty = || json!({});
        let r = match cmd {
            "query-status" => {
                a.finish()?;
                self.query_status()
            }
            "stop" => {
                a.finish()?;
                self.ctl.stop()?;
                empty()
            }
            "cont" => {
                a.finish()?;
                self.cont()?;
                empty()
            }
            "query-chardev" => {
                a.finish()?;
                self.query_chardev()
            }
            "query-vnc" => {
                a.finish()?;
                json!({"enabled": false})
            }
            "change-vnc-password" => {
                a.str("password")?;
                a.finish()?;
                // QEMU's text when there is no VNC display to set it on.
                return Err(QmpError::generic("Could not set password"));
            }
            "query-cpus-fast" => {
                a.finish()?;
                self.query_cpus_fast()
            }
            "query-hotpluggable-cpus" => {
                a.finish()?;
                self.query_hotpluggable_cpus()
            }
            "query-pci" => {
                a.finish()?;
                self.query_pci()
            }
            "query-block" => {
                a.finish()?;
                self.query_block()
            }
            "query-blockstats" => {
                // `query-nodes` asks for per-node stats; hvmdm has no node graph, so its answer
                // is the same list.
                a.opt_bool("query-nodes")?;
                a.finish()?;
                self.query_blockstats()
            }
            "xen-save-devices-state" => {
                let filename = a.str("filename")?;
                let live = a.opt_bool("live")?.unwrap_or(true);
                a.finish()?;
                self.save_devices_state(filename, live)?;
                empty()
            }
            "xen-load-devices-state" => {
                let filename = a.str("filename")?;
                a.finish()?;
                self.load_devices_state(filename)?;
                empty()
            }
            "xen-set-global-dirty-log" => {
                let on = a.bool("enable")?;
                a.finish()?;
                self.ctl.set_global_dirty_log(on);
                empty()
            }
            "eject" => {
                let device = a.opt_str("device")?;
                let id = a.opt_str("id")?;
                let force = a.opt_bool("force")?.unwrap_or(false);
                a.finish()?;
                let b = self.removable_block(device, id)?;
                self.ctl.eject(&b.device, force)?;
                empty()
            }
            "blockdev-change-medium" => {
                let req = ChangeMedium::parse(&mut a)?;
                a.finish()?;
                self.change_medium(req)?;
                empty()
            }
            "device_add" => {
                self.device_add(&mut a)?;
                empty()
            }
            "system_wakeup" => {
                a.finish()?;
                self.ctl.system_wakeup()?;
                empty()
            }
            _ => return Err(QmpError::command_not_found(cmd)),
        };
        Ok(r)
    }

    fn fds(&mut self) -> &mut FdStore {
        &mut self.fds
    }
}

/// `strerror` text without Rust's " (os error N)" suffix, as QEMU's `error_setg_errno` prints.
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// QEMU's `pci_class_descriptions` names for the classes an hvmdm machine can contain.
fn pci_class_desc(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0106 => "SATA controller",
        0x0180 => "Storage controller",
        0x0200 => "Ethernet controller",
        0x0300 => "VGA controller",
        0x0380 => "Display controller",
        0x0401 => "Audio controller",
        0x0403 => "Audio controller",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0680 => "Bridge",
        0x0c03 => "USB controller",
        0x0c05 => "SMBus",
        _ => return None,
    })
}

fn pci_device_json(d: &PciDeviceInfo) -> Value {
    let regions: Vec<Value> = d
        .bars
        .iter()
        .map(|b| match b.kind {
            PciBarKind::Io => json!({"bar": b.bar, "type": "io", "address": b.address, "size": b.size}),
            PciBarKind::Memory { prefetch, mem_64 } => json!({
                "bar": b.bar, "type": "memory", "address": b.address, "size": b.size,
                "prefetch": prefetch, "mem_type_64": mem_64,
            }),
        })
        .collect();
    let mut class_info = json!({"class": d.class});
    if let Some(desc) = pci_class_desc(d.class) {
        class_info["desc"] = desc.into();
    }
    let mut v = json!({
        "bus": d.bus,
        "slot": d.slot,
        "function": d.function,
        "class_info": class_info,
        "id": {
            "device": d.device,
            "vendor": d.vendor,
            "subsystem": d.subsystem,
            "subsystem-vendor": d.subsystem_vendor,
        },
        "irq_pin": d.irq_pin,
        "qdev_id": d.qdev_id.as_deref().unwrap_or(""),
        "regions": regions,
    });
    if d.irq_pin != 0 {
        v["irq"] = d.irq_line.into();
    }
    v
}

fn block_info_json(b: &BlockInfo) -> Value {
    let mut v = json!({
        "device": b.device,
        "type": "unknown",
        "removable": b.removable,
        "locked": b.locked,
    });
    if let Some(q) = &b.qdev {
        v["qdev"] = q.as_str().into();
    }
    if b.removable {
        v["tray_open"] = b.tray_open.into();
    }
    if let Some(m) = &b.inserted {
        v["inserted"] = json!({
            "file": m.file,
            "ro": m.ro,
            "drv": m.drv,
            "backing_file_depth": 0,
            "encrypted": false,
            "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "cache": {"writeback": m.writeback, "direct": false, "no-flush": false},
            "image": {"filename": m.file, "format": m.drv, "virtual-size": m.virtual_size},
        });
    }
    v
}

fn block_stats_json(b: &BlockInfo) -> Value {
    let s = &b.stats;
    let mut v = json!({
        "device": b.device,
        "stats": {
            "rd_bytes": s.rd_bytes,
            "wr_bytes": s.wr_bytes,
            "unmap_bytes": 0,
            "rd_operations": s.rd_operations,
            "wr_operations": s.wr_operations,
            "flush_operations": s.flush_operations,
            "unmap_operations": 0,
            "rd_total_time_ns": s.rd_total_time_ns,
            "wr_total_time_ns": s.wr_total_time_ns,
            "flush_total_time_ns": s.flush_total_time_ns,
            "unmap_total_time_ns": 0,
            "wr_highest_offset": s.wr_highest_offset,
            "rd_merged": 0,
            "wr_merged": 0,
            "unmap_merged": 0,
            "failed_rd_operations": s.failed_rd_operations,
            "failed_wr_operations": s.failed_wr_operations,
            "failed_flush_operations": s.failed_flush_operations,
            "failed_unmap_operations": 0,
            "invalid_rd_operations": 0,
            "invalid_wr_operations": 0,
            "invalid_flush_operations": 0,
            "invalid_unmap_operations": 0,
            "account_invalid": true,
            "account_failed": true,
            "timed_stats": [],
        },
    });
    if let Some(q) = &b.qdev {
        v["qdev"] = q.as_str().into();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::super::{Session, BUILTIN_COMMANDS};
    use super::*;
    use std::io::{Read, Write};
    use std::path::PathBuf;

    /// A device model with two vCPUs of four, a disk and an empty cdrom, recording calls.
    struct FakeDm {
        state: RunState,
        calls: Vec<String>,
        dirty: Option<bool>,
        loaded: Vec<u8>,
        fail_save: bool,
        media: Vec<(String, String, Option<String>, bool, bool)>,
    }

    impl Default for FakeDm {
        fn default() -> Self {
            Self {
                state: RunState::Prelaunch,
                calls: Vec::new(),
                dirty: None,
                loaded: Vec::new(),
                fail_save: false,
                media: Vec::new(),
            }
        }
    }

    fn disks() -> Vec<BlockInfo> {
        vec![
            BlockInfo {
                device: "ide0-hd0".into(),
                qdev: None,
                removable: false,
                locked: false,
                tray_open: false,
                inserted: Some(InsertedMedium {
                    file: "/var/lib/xen/images/vm1.img".into(),
                    ro: false,
                    drv: "raw".into(),
                    virtual_size: 1 << 30,
                    writeback: true,
                }),
                stats: BlockStats {
                    rd_bytes: 4096,
                    wr_bytes: 512,
                    rd_operations: 8,
                    wr_operations: 1,
                    flush_operations: 2,
                    ..Default::default()
                },
            },
            BlockInfo {
                device: "ide-5632".into(),
                qdev: Some("ide-5632".into()),
                removable: true,
                locked: false,
                tray_open: false,
                inserted: None,
                stats: BlockStats::default(),
            },
        ]
    }

    impl DmControl for FakeDm {
        fn run_state(&self) -> RunState {
            self.state
        }
        fn stop(&mut self) -> Result<(), QmpError> {
            self.calls.push("stop".into());
            if self.state == RunState::Running {
                self.state = RunState::Paused;
            }
            Ok(())
        }
        fn cont(&mut self) -> Result<(), QmpError> {
            self.calls.push("cont".into());
            self.state = RunState::Running;
            Ok(())
        }
        fn chardevs(&self) -> Vec<ChardevInfo> {
            vec![
                ChardevInfo {
                    label: "serial0".into(),
                    filename: "pty:/dev/pts/3".into(),
                    frontend_open: true,
                },
                ChardevInfo {
                    label: "libxl-cmd".into(),
                    filename: "unix:/var/run/xen/qmp-libxl-1,server=on".into(),
                    frontend_open: true,
                },
            ]
        }
        fn pci_devices(&self) -> Vec<PciDeviceInfo> {
            vec![
                PciDeviceInfo {
                    bus: 0,
                    slot: 0,
                    function: 0,
                    vendor: 0x8086,
                    device: 0x1237,
                    subsystem_vendor: 0x1af4,
                    subsystem: 0x1100,
                    class: 0x0600,
                    irq_pin: 0,
                    irq_line: 0,
                    qdev_id: None,
                    bars: vec![],
                },
                PciDeviceInfo {
                    bus: 0,
                    slot: 2,
                    function: 0,
                    vendor: 0x5853,
                    device: 0x0001,
                    subsystem_vendor: 0x5853,
                    subsystem: 0x0001,
                    class: 0xff80,
                    irq_pin: 1,
                    irq_line: 28,
                    qdev_id: Some("pci-pt-03_00.0".into()),
                    bars: vec![
                        PciBar { bar: 0, kind: PciBarKind::Io, address: 0xc000, size: 0x100 },
                        PciBar {
                            bar: 1,
                            kind: PciBarKind::Memory { prefetch: true, mem_64: false },
                            address: 0xf000_0000,
                            size: 0x100_0000,
                        },
                    ],
                },
            ]
        }
        fn block_devices(&self) -> Vec<BlockInfo> {
            disks()
        }
        fn cpus(&self) -> Vec<u32> {
            vec![1, 0]
        }
        fn max_cpus(&self) -> u32 {
            4
        }
        fn cpu_thread_id(&self, index: u32) -> i64 {
            1000 + i64::from(index)
        }
        fn save_devices_state(&mut self, fd: OwnedFd, live: bool) -> Result<(), String> {
            self.calls.push(format!("save live={live} state={}", self.state.as_str()));
            if self.fail_save {
                return Err("disk full".into());
            }
            std::fs::File::from(fd)
                .write_all(format!("HVMDM live={live}").as_bytes())
                .map_err(|e| e.to_string())
        }
        fn load_devices_state(&mut self, fd: OwnedFd) -> Result<(), String> {
            self.calls.push("load".into());
            self.loaded.clear();
            std::fs::File::from(fd).read_to_end(&mut self.loaded).map(drop).map_err(|e| e.to_string())
        }
        fn set_global_dirty_log(&mut self, on: bool) {
            self.dirty = Some(on);
        }
        fn eject(&mut self, device: &str, force: bool) -> Result<(), QmpError> {
            self.calls.push(format!("eject {device} force={force}"));
            Ok(())
        }
        fn hotplug_cpu(&mut self, index: u32) -> Result<(), QmpError> {
            self.calls.push(format!("plug cpu {index}"));
            Ok(())
        }
        fn change_medium(&mut self, device: &str, m: NewMedium) -> Result<(), QmpError> {
            let mut content = String::new();
            std::fs::File::from(m.fd)
                .read_to_string(&mut content)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            self.media.push((device.into(), m.filename, m.format, m.read_only, m.force));
            self.calls.push(format!("change {device} {content}"));
            Ok(())
        }
    }

    /// A device model relying on every default method.
    struct MinimalDm;

    impl DmControl for MinimalDm {
        fn run_state(&self) -> RunState {
            RunState::Running
        }
        fn stop(&mut self) -> Result<(), QmpError> {
            Err(QmpError::generic("no"))
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
            disks()
        }
        fn cpus(&self) -> Vec<u32> {
            vec![0]
        }
        fn max_cpus(&self) -> u32 {
            1
        }
        fn save_devices_state(&mut self, _: OwnedFd, _: bool) -> Result<(), String> {
            Ok(())
        }
        fn load_devices_state(&mut self, _: OwnedFd) -> Result<(), String> {
            Ok(())
        }
        fn set_global_dirty_log(&mut self, _: bool) {}
    }

    fn lines(out: &[u8]) -> Vec<Value> {
        let s = std::str::from_utf8(out).unwrap();
        assert!(s.is_empty() || s.ends_with("\r\n"), "{s:?}");
        s.split_terminator("\r\n").map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    struct Vm<C: DmControl> {
        s: Session,
        q: XenQmp<C>,
        next_id: u64,
    }

    impl<C: DmControl> Vm<C> {
        /// A negotiated session over a fresh `XenQmp`.
        fn new(ctl: C) -> Self {
            let mut q = XenQmp::new(ctl);
            let mut s = Session::new(&q.version());
            s.receive(b"{\"execute\":\"qmp_capabilities\"}", Vec::new(), &mut q);
            assert_eq!(lines(&s.take_output())[1], json!({"return": {}}));
            Self { s, q, next_id: 0 }
        }

        /// Sends one command (with fds) and returns its reply, checking the echoed id.
        fn send(&mut self, cmd: &str, args: Option<Value>, fds: Vec<OwnedFd>) -> Value {
            self.next_id += 1;
            let mut req = json!({"execute": cmd, "id": self.next_id});
            if let Some(a) = args {
                req["arguments"] = a;
            }
            self.s.receive(format!("{req}\r\n").as_bytes(), fds, &mut self.q);
            let mut r = lines(&self.s.take_output());
            assert_eq!(r.len(), 1, "{r:?}");
            let mut r = r.remove(0);
            assert_eq!(r["id"], self.next_id);
            r.as_object_mut().unwrap().remove("id");
            r
        }

        fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
            let r = self.send(cmd, args, Vec::new());
            assert!(r.get("return").is_some(), "{cmd}: {r}");
            r["return"].clone()
        }

        /// The `error` member of the reply.
        fn err(&mut self, cmd: &str, args: Option<Value>) -> Value {
            let r = self.send(cmd, args, Vec::new());
            assert!(r.get("error").is_some(), "{cmd}: {r}");
            r["error"].clone()
        }

        fn ctl(&mut self) -> &mut C {
            self.q.ctl_mut()
        }
    }

    fn generic(desc: &str) -> Value {
        json!({"class": "GenericError", "desc": desc})
    }

    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("hvmdm-qmpcmd-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }
        fn str(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn status_stop_cont() {
        let mut vm = Vm::new(FakeDm::default());
        assert_eq!(
            vm.ok("query-status", None),
            json!({"running": false, "singlestep": false, "status": "prelaunch"})
        );
        assert_eq!(vm.ok("cont", None), json!({}));
        assert_eq!(
            vm.ok("query-status", None),
            json!({"running": true, "singlestep": false, "status": "running"})
        );
        assert_eq!(vm.ok("stop", Some(json!({}))), json!({}));
        assert_eq!(vm.ok("query-status", None)["status"], "paused");
        assert_eq!(vm.ctl().calls, ["cont", "stop"]);
        // QEMU's refusals, checked before the device model is asked.
        vm.ctl().calls.clear();
        vm.ctl().state = RunState::Shutdown;
        assert_eq!(vm.err("cont", None), generic("Resetting the Virtual Machine is required"));
        vm.ctl().state = RunState::InternalError;
        assert_eq!(vm.err("cont", None), generic("Resetting the Virtual Machine is required"));
        vm.ctl().state = RunState::FinishMigrate;
        assert_eq!(vm.err("cont", None), generic("Migration is not finalized yet"));
        vm.ctl().state = RunState::Suspended;
        assert_eq!(vm.ok("cont", None), json!({}));
        assert_eq!(vm.ok("query-status", None)["status"], "suspended");
        assert!(vm.ctl().calls.is_empty());
        // Errors from the device model pass through unchanged.
        let mut vm = Vm::new(MinimalDm);
        assert_eq!(vm.err("stop", None), generic("no"));
    }

    #[test]
    fn runstate_strings() {
        use RunState::*;
        let all = [
            (Debug, "debug"),
            (InMigrate, "inmigrate"),
            (InternalError, "internal-error"),
            (IoError, "io-error"),
            (Paused, "paused"),
            (PostMigrate, "postmigrate"),
            (Prelaunch, "prelaunch"),
            (FinishMigrate, "finish-migrate"),
            (RestoreVm, "restore-vm"),
            (Running, "running"),
            (SaveVm, "save-vm"),
            (Shutdown, "shutdown"),
            (Suspended, "suspended"),
            (Watchdog, "watchdog"),
            (GuestPanicked, "guest-panicked"),
            (Colo, "colo"),
        ];
        for (st, s) in all {
            assert_eq!(st.as_str(), s);
            assert_eq!(st.is_running(), s == "running");
        }
    }

    #[test]
    fn version_matches_greeting() {
        let mut q = XenQmp::new(FakeDm::default());
        let mut s = Session::new(&q.version());
        s.receive(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-version\"}", Vec::new(), &mut q);
        let r = lines(&s.take_output());
        assert_eq!(r[0]["QMP"]["version"], r[2]["return"]);
        assert_eq!(r[2]["return"]["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
    }

    #[test]
    fn chardev_and_vnc() {
        let mut vm = Vm::new(FakeDm::default());
        assert_eq!(
            vm.ok("query-chardev", None),
            json!([
                {"label": "serial0", "filename": "pty:/dev/pts/3", "frontend-open": true},
                {"label": "libxl-cmd", "filename": "unix:/var/run/xen/qmp-libxl-1,server=on", "frontend-open": true},
            ])
        );
        assert_eq!(vm.ok("query-vnc", None), json!({"enabled": false}));
        assert_eq!(
            vm.err("change-vnc-password", Some(json!({"password": "s3cret"}))),
            generic("Could not set password")
        );
        assert_eq!(vm.err("change-vnc-password", None), generic("Parameter 'password' is missing"));
        assert_eq!(
            vm.err("change-vnc-password", Some(json!({"password": 1234}))),
            generic("Invalid parameter type for 'password', expected: string")
        );
    }

    #[test]
    fn cpus() {
        let mut vm = Vm::new(FakeDm::default());
        assert_eq!(
            vm.ok("query-cpus-fast", None),
            json!([
                {"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 1000,
                 "props": {"core-id": 0, "socket-id": 0, "thread-id": 0}, "target": "x86_64"},
                {"cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 1001,
                 "props": {"core-id": 0, "socket-id": 1, "thread-id": 0}, "target": "x86_64"},
            ])
        );
        let h = vm.ok("query-hotpluggable-cpus", None);
        let h = h.as_array().unwrap();
        assert_eq!(h.len(), 4);
        // libxl takes the type of element 0; QEMU lists the highest index first.
        assert_eq!(
            h[0],
            json!({"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
                   "props": {"core-id": 0, "socket-id": 3, "thread-id": 0}})
        );
        assert_eq!(h[2]["props"]["socket-id"], 1);
        assert_eq!(h[2]["qom-path"], "/machine/unattached/device[1]");
        assert_eq!(h[3]["qom-path"], "/machine/unattached/device[0]");
        assert!(h[1].get("qom-path").is_none());
        // The default thread id is the process id.
        let mut vm = Vm::new(MinimalDm);
        assert_eq!(vm.ok("query-cpus-fast", None)[0]["thread-id"], std::process::id());
    }

    #[test]
    fn pci() {
        let mut vm = Vm::new(FakeDm::default());
        let r = vm.ok("query-pci", None);
        assert_eq!(r.as_array().unwrap().len(), 1);
        assert_eq!(r[0]["bus"], 0);
        let d = r[0]["devices"].as_array().unwrap();
        assert_eq!(
            d[0],
            json!({"bus": 0, "slot": 0, "function": 0,
                   "class_info": {"class": 0x0600, "desc": "Host bridge"},
                   "id": {"vendor": 0x8086, "device": 0x1237, "subsystem": 0x1100, "subsystem-vendor": 0x1af4},
                   "irq_pin": 0, "qdev_id": "", "regions": []})
        );
        assert_eq!(
            d[1],
            json!({"bus": 0, "slot": 2, "function": 0,
            "class_info": {"class": 0xff80},
            "id": {"vendor": 0x5853, "device": 1, "subsystem": 1, "subsystem-vendor": 0x5853},
            "irq_pin": 1, "irq": 28, "qdev_id": "pci-pt-03_00.0",
            "regions": [
                {"bar": 0, "type": "io", "address": 0xc000, "size": 0x100},
                {"bar": 1, "type": "memory", "address": 0xf000_0000u32, "size": 0x100_0000,
                 "prefetch": true, "mem_type_64": false},
            ]})
        );
    }

    #[test]
    fn block_queries() {
        let mut vm = Vm::new(FakeDm::default());
        let r = vm.ok("query-block", None);
        assert_eq!(
            r[0],
            json!({"device": "ide0-hd0", "type": "unknown", "removable": false, "locked": false,
                   "inserted": {
                       "file": "/var/lib/xen/images/vm1.img", "ro": false, "drv": "raw",
                       "backing_file_depth": 0, "encrypted": false, "detect_zeroes": "off",
                       "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                       "write_threshold": 0,
                       "cache": {"writeback": true, "direct": false, "no-flush": false},
                       "image": {"filename": "/var/lib/xen/images/vm1.img", "format": "raw",
                                 "virtual-size": 1u64 << 30}}})
        );
        assert_eq!(
            r[1],
            json!({"device": "ide-5632", "qdev": "ide-5632", "type": "unknown", "removable": true,
                   "locked": false, "tray_open": false})
        );
        for args in [None, Some(json!({"query-nodes": false}))] {
            let r = vm.ok("query-blockstats", args);
            assert_eq!(r[0]["device"], "ide0-hd0");
            assert!(r[0].get("qdev").is_none());
            let s = &r[0]["stats"];
            assert_eq!(
                (&s["rd_bytes"], &s["wr_bytes"], &s["rd_operations"], &s["wr_operations"]),
                (&json!(4096), &json!(512), &json!(8), &json!(1))
            );
            assert_eq!(s["flush_operations"], 2);
            assert_eq!(s["timed_stats"], json!([]));
            assert_eq!(r[1]["qdev"], "ide-5632");
            assert_eq!(r[1]["stats"]["rd_bytes"], 0);
        }
        assert_eq!(
            vm.err("query-blockstats", Some(json!({"query-nodes": 1}))),
            generic("Invalid parameter type for 'query-nodes', expected: boolean")
        );
    }

    #[test]
    fn save_through_add_fd() {
        let mut vm = Vm::new(FakeDm::default());
        let tmp = TempPath::new("save-fdset");
        // libxl opens the file O_WRONLY|O_CREAT and passes it with add-fd.
        let file = std::fs::File::create(&tmp.0).unwrap();
        vm.ok("stop", None);
        let r = vm.send("add-fd", None, vec![file.into()]);
        assert_eq!(r["return"]["fdset-id"], 0);
        let r = vm.ok("xen-save-devices-state", Some(json!({"filename": "/dev/fdset/0", "live": false})));
        assert_eq!(r, json!({}));
        assert_eq!(std::fs::read_to_string(&tmp.0).unwrap(), "HVMDM live=false");
        assert_eq!(vm.ctl().calls, ["stop", "save live=false state=prelaunch"]);
        // `live` defaults to true. The set keeps its fd (each save used a dup), and dups share
        // the file offset, so a second save appends, as with QEMU.
        vm.ok("xen-save-devices-state", Some(json!({"filename": "/dev/fdset/0"})));
        assert_eq!(std::fs::read_to_string(&tmp.0).unwrap(), "HVMDM live=falseHVMDM live=true");
        vm.ok("remove-fd", Some(json!({"fdset-id": 0})));
        assert_eq!(
            vm.err("xen-save-devices-state", Some(json!({"filename": "/dev/fdset/0"}))),
            generic("File descriptor named 'fdset-id:0' not found")
        );
        assert_eq!(
            vm.err("xen-save-devices-state", Some(json!({"filename": "/dev/fdset/x"}))),
            generic("'/dev/fdset/x' is not a /dev/fdset/N path")
        );
    }

    #[test]
    fn save_and_load_plain_paths() {
        let mut vm = Vm::new(FakeDm::default());
        let tmp = TempPath::new("save-plain");
        std::fs::write(&tmp.0, "old contents that are longer").unwrap();
        // A running VM is stopped around the save and restarted, as QEMU does.
        vm.ctl().state = RunState::Running;
        vm.ok("xen-save-devices-state", Some(json!({"filename": tmp.str(), "live": true})));
        assert_eq!(vm.ctl().calls, ["stop", "save live=true state=paused", "cont"]);
        assert_eq!(vm.ctl().state, RunState::Running);
        // Truncated, not overwritten in place.
        assert_eq!(std::fs::read_to_string(&tmp.0).unwrap(), "HVMDM live=true");
        assert_eq!(
            vm.err("xen-load-devices-state", Some(json!({"filename": tmp.str()}))),
            generic("Cannot update device state while vm is running")
        );
        vm.ctl().state = RunState::Paused;
        vm.ok("xen-load-devices-state", Some(json!({"filename": tmp.str()})));
        assert_eq!(vm.ctl().loaded, b"HVMDM live=true");
        assert_eq!(
            vm.err("xen-load-devices-state", Some(json!({"filename": "/nonexistent/hvmdm/state"}))),
            generic("Could not open '/nonexistent/hvmdm/state': No such file or directory")
        );
        assert_eq!(
            vm.err("xen-save-devices-state", Some(json!({"filename": "/nonexistent/hvmdm/state"}))),
            generic("Could not open '/nonexistent/hvmdm/state': No such file or directory")
        );
        // A failing save reports QEMU's IO error (with the reason) and still restarts the VM.
        vm.ctl().fail_save = true;
        vm.ctl().state = RunState::Running;
        vm.ctl().calls.clear();
        assert_eq!(
            vm.err("xen-save-devices-state", Some(json!({"filename": tmp.str()}))),
            generic("An IO error has occurred: disk full")
        );
        assert_eq!(vm.ctl().calls, ["stop", "save live=true state=paused", "cont"]);
    }

    #[test]
    fn dirty_log() {
        let mut vm = Vm::new(FakeDm::default());
        vm.ok("xen-set-global-dirty-log", Some(json!({"enable": true})));
        assert_eq!(vm.ctl().dirty, Some(true));
        vm.ok("xen-set-global-dirty-log", Some(json!({"enable": false})));
        assert_eq!(vm.ctl().dirty, Some(false));
        assert_eq!(
            vm.err("xen-set-global-dirty-log", Some(json!({"enable": 1}))),
            generic("Invalid parameter type for 'enable', expected: boolean")
        );
        assert_eq!(
            vm.err("xen-set-global-dirty-log", Some(json!({"enable": true, "all": true}))),
            generic("Parameter 'all' is unexpected")
        );
        assert_eq!(vm.ctl().dirty, Some(false));
    }

    #[test]
    fn eject_and_change_medium() {
        let mut vm = Vm::new(FakeDm::default());
        vm.ok("eject", Some(json!({"id": "ide-5632"})));
        vm.ok("eject", Some(json!({"device": "ide-5632", "force": true})));
        assert_eq!(vm.ctl().calls, ["eject ide-5632 force=false", "eject ide-5632 force=true"]);
        let need_one = generic("Need exactly one of 'device' and 'id'");
        assert_eq!(vm.err("eject", None), need_one);
        assert_eq!(vm.err("eject", Some(json!({"id": "ide-5632", "device": "ide-5632"}))), need_one);
        assert_eq!(
            vm.err("eject", Some(json!({"id": "ide-768"}))),
            json!({"class": "DeviceNotFound", "desc": "Device 'ide-768' not found"})
        );
        assert_eq!(
            vm.err("eject", Some(json!({"device": "ide0-hd0"}))),
            generic("Device 'ide0-hd0' is not removable")
        );
        assert_eq!(
            vm.err("eject", Some(json!({"id": "ide-5632", "force": "yes"}))),
            generic("Invalid parameter type for 'force', expected: boolean")
        );

        // libxl's cdrom insert: add-fd with opaque "<format>:<path>", then change the medium.
        let iso = TempPath::new("cd.iso");
        std::fs::write(&iso.0, "ISO").unwrap();
        let f = std::fs::File::open(&iso.0).unwrap();
        let r = vm.send("add-fd", Some(json!({"opaque": format!("raw:{}", iso.str())})), vec![f.into()]);
        let set = r["return"]["fdset-id"].as_i64().unwrap();
        vm.ctl().calls.clear();
        vm.ok(
            "blockdev-change-medium",
            Some(json!({"id": "ide-5632", "filename": format!("/dev/fdset/{set}"), "format": "raw"})),
        );
        vm.ok(
            "blockdev-change-medium",
            Some(json!({"device": "ide-5632", "filename": iso.str(), "force": true})),
        );
        assert_eq!(vm.ctl().calls, ["change ide-5632 ISO", "change ide-5632 ISO"]);
        assert_eq!(
            vm.ctl().media,
            [
                ("ide-5632".into(), format!("/dev/fdset/{set}"), Some("raw".into()), true, false),
                ("ide-5632".into(), iso.str().to_string(), None, true, true),
            ]
        );
        assert_eq!(
            vm.err("blockdev-change-medium", Some(json!({"id": "ide-5632"}))),
            generic("Parameter 'filename' is missing")
        );
        assert_eq!(
            vm.err(
                "blockdev-change-medium",
                Some(json!({"id": "ide-5632", "filename": iso.str(), "read-only-mode": "sometimes"}))
            ),
            generic("Parameter 'read-only-mode' does not accept value 'sometimes'")
        );
        assert_eq!(
            vm.err("blockdev-change-medium", Some(json!({"id": "nope", "filename": iso.str()})))["class"],
            "DeviceNotFound"
        );
        assert_eq!(
            vm.err(
                "blockdev-change-medium",
                Some(json!({"id": "ide-5632", "filename": "/nonexistent/x.iso"}))
            ),
            generic("Could not open '/nonexistent/x.iso': No such file or directory")
        );
        assert_eq!(vm.ctl().calls.len(), 2);

        // Device models that keep the default methods refuse with a GenericError.
        let mut vm = Vm::new(MinimalDm);
        assert_eq!(
            vm.err("eject", Some(json!({"id": "ide-5632"}))),
            generic("Eject of 'ide-5632' is not supported")
        );
        assert_eq!(
            vm.err("blockdev-change-medium", Some(json!({"id": "ide-5632", "filename": iso.str()}))),
            generic("Changing the medium of 'ide-5632' is not supported")
        );
    }

    #[test]
    fn wakeup_and_unimplemented_commands() {
        let mut vm = Vm::new(FakeDm::default());
        assert_eq!(vm.err("system_wakeup", None), generic(WAKEUP_NOT_SUPPORTED));
        for cmd in ["device_del", "query-cpus", "cpu-add", "human-monitor-command", "change"] {
            assert_eq!(
                vm.err(cmd, Some(json!({"id": "cpu-2", "driver": "qemu64-x86_64-cpu"}))),
                json!({"class": "CommandNotFound", "desc": format!("The command {cmd} has not been found")})
            );
        }
        // Direct execute of a name outside the list (the session never does this).
        assert_eq!(
            vm.q.execute("device_del", &Map::new()).unwrap_err().class,
            super::super::ErrorClass::CommandNotFound
        );
        let names = vm.ok("query-commands", None);
        let names: Vec<&str> =
            names.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), BUILTIN_COMMANDS.len() + XEN_COMMANDS.len());
        assert!(XEN_COMMANDS.iter().all(|c| names.contains(c)));
    }

    /// `xl vcpu-set` raising the count: libxl's exact `device_add` for each new vCPU, and
    /// QEMU's errors for everything it could get wrong.
    #[test]
    fn device_add_vcpu() {
        let mut vm = Vm::new(FakeDm::default());
        let ty = "qemu64-x86_64-cpu";
        let add = |n: i64| json!({"id": format!("cpu-{n}"), "driver": ty, "socket-id": n, "core-id": 0, "thread-id": 0});
        assert_eq!(vm.ok("device_add", Some(add(2))), json!({}));
        assert_eq!(vm.ctl().calls, ["plug cpu 2"]);
        // vCPU 1 is present in FakeDm; 4 is past maxcpus.
        assert_eq!(vm.err("device_add", Some(add(1))), generic("CPU[1] with APIC ID 1 exists"));
        assert_eq!(
            vm.err("device_add", Some(add(4))),
            generic("Invalid CPU socket-id: 4 must be in range 0:3")
        );
        assert_eq!(
            vm.err("device_add", Some(add(-1))),
            generic("Invalid CPU socket-id: -1 must be in range 0:3")
        );
        let mut a = add(3);
        a["core-id"] = json!(1);
        assert_eq!(vm.err("device_add", Some(a)), generic("Invalid CPU core-id: 1 must be in range 0:0"));
        let mut a = add(3);
        a.as_object_mut().unwrap().remove("socket-id");
        assert_eq!(vm.err("device_add", Some(a)), generic("CPU socket-id is not set"));
        let mut a = add(3);
        a["apic-id"] = json!(3);
        assert_eq!(vm.err("device_add", Some(a)), generic(&format!("Property '{ty}.apic-id' not found")));
        let mut a = add(3);
        a["socket-id"] = json!("3");
        assert_eq!(vm.err("device_add", Some(a))["class"], "GenericError");
        // Other device models libxl may name (PCI passthrough, USB) do not exist here.
        for driver in ["xen-pci-passthrough", "piix3-usb-uhci", "host-x86_64-cpu"] {
            assert_eq!(
                vm.err("device_add", Some(json!({"driver": driver, "id": "x"}))),
                generic(&format!("'{driver}' is not a valid device model name"))
            );
        }
        assert_eq!(vm.err("device_add", None)["class"], "GenericError");
        assert_eq!(vm.ctl().calls, ["plug cpu 2"]);
    }

    /// Framing junk (bad JSON, oversized messages, bad `execute`/`arguments`) is covered by
    /// session.rs (`junk_then_recovery`, `oversized_message_is_bounded`, `argument_errors`);
    /// this checks the per-command argument validation and huge values.
    #[test]
    fn junk_arguments() {
        let mut vm = Vm::new(FakeDm::default());
        vm.ctl().state = RunState::Running;
        // Every command without arguments rejects any, before acting.
        let no_args = [
            "query-status",
            "stop",
            "cont",
            "query-chardev",
            "query-vnc",
            "query-cpus-fast",
            "query-hotpluggable-cpus",
            "query-pci",
            "query-block",
            "query-blockstats",
            "system_wakeup",
        ];
        for cmd in no_args {
            assert_eq!(
                vm.err(cmd, Some(json!({"bogus": [1, {}]}))),
                generic("Parameter 'bogus' is unexpected"),
                "{cmd}"
            );
        }
        // Type errors win over unexpected members, and nothing runs.
        let typed = [
            (
                "xen-save-devices-state",
                json!({"filename": 7, "x": 1}),
                "Invalid parameter type for 'filename', expected: string",
            ),
            (
                "xen-save-devices-state",
                json!({"filename": "/dev/fdset/0", "live": "no"}),
                "Invalid parameter type for 'live', expected: boolean",
            ),
            ("xen-save-devices-state", json!({"live": true}), "Parameter 'filename' is missing"),
            (
                "xen-save-devices-state",
                json!({"filename": "/dev/fdset/0", "x": 1}),
                "Parameter 'x' is unexpected",
            ),
            (
                "xen-load-devices-state",
                json!({"filename": null}),
                "Invalid parameter type for 'filename', expected: string",
            ),
            (
                "xen-set-global-dirty-log",
                json!({"enable": "true"}),
                "Invalid parameter type for 'enable', expected: boolean",
            ),
            ("eject", json!({"id": ["ide-5632"]}), "Invalid parameter type for 'id', expected: string"),
            ("eject", json!({"device": {}}), "Invalid parameter type for 'device', expected: string"),
            (
                "blockdev-change-medium",
                json!({"id": "ide-5632", "filename": "/x", "format": 1}),
                "Invalid parameter type for 'format', expected: string",
            ),
            (
                "blockdev-change-medium",
                json!({"id": "ide-5632", "filename": "/x", "read-only-mode": true}),
                "Invalid parameter type for 'read-only-mode', expected: string",
            ),
            (
                "blockdev-change-medium",
                json!({"id": "ide-5632", "filename": "/x", "extra": 1}),
                "Parameter 'extra' is unexpected",
            ),
        ];
        for (cmd, args, desc) in typed {
            assert_eq!(vm.err(cmd, Some(args)), generic(desc), "{cmd}");
        }
        assert!(vm.ctl().calls.is_empty(), "{:?}", vm.ctl().calls);
        assert_eq!(vm.ctl().dirty, None);
        assert_eq!(vm.ctl().state, RunState::Running);

        // Huge strings (under the session's 1 MiB message limit) get ordinary errors.
        let big = "A".repeat(512 * 1024);
        let e = vm.err("eject", Some(json!({"id": big})));
        assert_eq!(e, json!({"class": "DeviceNotFound", "desc": format!("Device '{big}' not found")}));
        vm.ctl().state = RunState::Paused;
        let e = vm.err("xen-load-devices-state", Some(json!({"filename": format!("/tmp/{big}")})));
        assert_eq!(e["desc"], format!("Could not open '/tmp/{big}': File name too long"));
        let e = vm.err("xen-save-devices-state", Some(json!({"filename": format!("/dev/fdset/{big}")})));
        assert_eq!(e["class"], "GenericError");
        let e =
            vm.err("xen-save-devices-state", Some(json!({"filename": "/dev/fdset/99999999999999999999"})));
        assert_eq!(e["class"], "GenericError");
        assert_eq!(
            vm.err("change-vnc-password", Some(json!({"password": big}))),
            generic("Could not set password")
        );
        // Embedded NUL and odd unicode in a path are refused, not truncated.
        let e = vm.err("xen-save-devices-state", Some(json!({"filename": "/tmp/a\u{0}b"})));
        assert_eq!(e["class"], "GenericError");
        assert!(e["desc"].as_str().unwrap().starts_with("Could not open '/tmp/a\u{0}b'"));
        assert!(vm.ctl().calls.is_empty());
        // The session is still healthy.
        assert_eq!(vm.ok("query-status", None)["status"], "paused");
    }
}
