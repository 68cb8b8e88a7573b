//! Builds the device graph from a MachineConfig; shared by both backends.
//!
//! The layout is the i440FX/PIIX3 PC that hvmloader, SeaBIOS and OVMF expect: 00:00.0 host bridge,
//! 00:01.0 PIIX3 ISA, 00:01.1 PIIX3 IDE, 00:01.3 PIIX4 PM, 00:03.0 ICH9 AHCI when a disk uses it
//! (00:02.0 stays free for the Xen platform device); ISA devices at their legacy ports; fw_cfg
//! with our own ACPI tables (rebuilt lazily after every reset, with the firmware-programmed PM base).

use std::sync::{Arc, Mutex};

use hvmdm_devices::bus::{Bus, BusError, SharedDevice};
use hvmdm_devices::chipset::{
    Cmos, CmosConfig, CpuHotplugBitmap, DebugCon, PciHotplug, Piix4Pm as PmIo, PostCode, ResetPort92, I8042,
};
use hvmdm_devices::fw_cfg::{self, FileOpts, FwCfg, PcItems};
use hvmdm_devices::irq::{IrqSink, IsaIrq};
use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::pci::devfn;
use hvmdm_devices::pci::{
    I440fxHostBridge, PciBuses, PciConfigIo, PciRoot, Piix3Ide, Piix3Isa, Piix4Pm as PmFunction,
    RegionTarget, DEVFN_HOST_BRIDGE, DEVFN_PIIX3_IDE, DEVFN_PIIX3_ISA, DEVFN_PIIX4_PM, PCI_CONFIG_IO_BASE,
    PCI_CONFIG_IO_LEN,
};
use hvmdm_devices::platform::{PlatformControl, ShadowControl};
use hvmdm_devices::serial::Serial;
use hvmdm_devices::snapshot::{self, DeviceEntry, SnapshotError};
use hvmdm_devices::storage::ahci::{self, AhciController, Ich9Ahci};
use hvmdm_devices::storage::{self, DriveKind, IdeController};
use hvmdm_devices::topology::Topology;
use thiserror::Error;

use crate::acpi_glue;
use crate::chardev;
use crate::config::{DiskInterface, MachineConfig};

#[derive(Debug, Error)]
pub enum MachineError {
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("PCI: {0}")]
    Pci(#[from] hvmdm_devices::pci::PciError),
    #[error("chipset: {0}")]
    Chipset(#[from] hvmdm_devices::chipset::ChipsetError),
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] fw_cfg::FwCfgError),
    #[error("SMBIOS: {0}")]
    Smbios(#[from] fw_cfg::smbios::SmbiosError),
    #[error("direct kernel boot: {0}")]
    Linux(#[from] fw_cfg::linux::LinuxBootError),
    #[error("reading {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{0} (SeaBIOS direct kernel boot needs it: apt-get install qemu-system-data)")]
    LinuxbootRom(String),
    #[error("disk {path}: {err}")]
    Disk { path: String, err: storage::BlockError },
    #[error("IDE: {0}")]
    Ide(#[from] storage::IdeError),
    #[error("AHCI: {0}")]
    Ahci(#[from] ahci::AhciError),
    #[error(transparent)]
    Chardev(#[from] chardev::ChardevError),
    #[error("ACPI: {0}")]
    Acpi(String),
    #[error("{0}")]
    Unsupported(String),
}

/// What a backend gives the machine.
pub struct MachineEnv {
    pub mem: Arc<dyn GuestRam>,
    pub irq: Arc<dyn IrqSink>,
    pub platform: Arc<dyn PlatformControl>,
    pub shadow: Arc<dyn ShadowControl>,
    pub ram_below_4g: u64,
    pub ram_above_4g: u64,
    pub topology: Topology,
}

pub struct Machine {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pci_root: Arc<Mutex<PciRoot>>,
    pci_io: Arc<Mutex<PciConfigIo>>,
    /// The PCI functions again, typed, for save/restore (the root holds them as trait objects).
    host: Arc<Mutex<I440fxHostBridge>>,
    piix3: Arc<Mutex<Piix3Isa>>,
    ide_fn: Arc<Mutex<Piix3Ide>>,
    pm_fn: Arc<Mutex<PmFunction>>,
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    pm: Arc<Mutex<PmIo>>,
    port92: Arc<Mutex<ResetPort92>>,
    debugcon: Option<Arc<Mutex<DebugCon>>>,
    serial: Option<Arc<Mutex<Serial>>>,
    fw_cfg: Option<Arc<Mutex<FwCfg>>>,
    ide: Arc<Mutex<IdeController>>,
    /// The AHCI controller and its PCI function, when a disk uses AHCI.
    ahci: Option<AhciParts>,
    /// Xen only: the ACPI hotplug register blocks hvmloader's DSDT reads.
    cpu_hotplug: Option<Arc<Mutex<CpuHotplugBitmap>>>,
    pci_hotplug: Option<Arc<Mutex<PciHotplug>>>,
    max_cpus: u32,
    pub pty_path: Option<String>,
}

fn read(p: &std::path::Path) -> Result<Vec<u8>, MachineError> {
    std::fs::read(p).map_err(|err| MachineError::Read { path: p.display().to_string(), err })
}

fn shared<T: hvmdm_devices::bus::BusDevice + 'static>(d: &Arc<Mutex<T>>) -> SharedDevice {
    d.clone()
}

/// The AHCI controller and its PCI function.
type AhciParts = (Arc<Mutex<AhciController>>, Arc<Mutex<Ich9Ahci>>);

/// Slot of the AHCI function: the first free one after the Xen platform device's 00:02. (QEMU
/// under libxl puts it after the VGA and NICs, which hvmdm does not have.)
pub const AHCI_SLOT: u8 = 3;

/// Where Debian's qemu-system-data keeps the option ROM SeaBIOS uses for direct kernel boot.
pub const LINUXBOOT_DMA_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";

impl Machine {
    pub fn build(cfg: &MachineConfig, env: MachineEnv) -> Result<Machine, MachineError> {
        let pio = Arc::new(Bus::new("pio"));
        let mmio = Arc::new(Bus::new("mmio"));
        let buses = PciBuses { pio: pio.clone(), mmio: mmio.clone() };
        let isa = |n: u8| IsaIrq::new(env.irq.clone(), n);

        // Chipset I/O devices.
        let cmos = Arc::new(Mutex::new(Cmos::new(
            &CmosConfig {
                ram_below_4g: env.ram_below_4g,
                ram_above_4g: env.ram_above_4g,
                cpus: env.topology.boot_cpus,
                boot_order: cfg.boot_order.clone(),
                xen: cfg.xen,
            },
            Some(isa(Cmos::IRQ)),
        )?));
        pio.insert(Cmos::BASE, Cmos::LEN, Cmos::RULES, shared(&cmos), Cmos::REGION)?;
        if !cfg.xen {
            // On Xen the RTC (and its periodic/update interrupts) is the hypervisor's.
            Cmos::spawn_ticker(&cmos)
                .map_err(|err| MachineError::Read { path: "cmos ticker".into(), err })?;
        }

        let i8042 =
            Arc::new(Mutex::new(I8042::new(isa(I8042::KBD_IRQ), isa(I8042::AUX_IRQ), env.platform.clone())));
        pio.insert(I8042::DATA_PORT, I8042::LEN, I8042::RULES, shared(&i8042), I8042::REGION_DATA)?;
        pio.insert(I8042::CMD_PORT, I8042::LEN, I8042::RULES, shared(&i8042), I8042::REGION_CMD)?;

        let pm = Arc::new(Mutex::new(PmIo::new(isa(PmIo::SCI_IRQ), env.platform.clone(), cfg.xen)));
        pio.insert(PmIo::GPE0_BASE, PmIo::GPE0_LEN, PmIo::GPE0_RULES, shared(&pm), PmIo::REGION_GPE0)?;
        pio.insert(PmIo::APM_BASE, PmIo::APM_LEN, PmIo::APM_RULES, shared(&pm), PmIo::REGION_APM)?;

        let port92 = Arc::new(Mutex::new(ResetPort92::new(env.platform.clone())));
        pio.insert(
            ResetPort92::BASE,
            ResetPort92::LEN,
            ResetPort92::RULES,
            shared(&port92),
            ResetPort92::REGION,
        )?;

        // On Xen, firmware output goes to port 0xE9, which Xen itself turns into `xl dmesg` lines;
        // claiming 0x402/0x80 there would only add round trips (and SeaBIOS would switch its log
        // to 0x402 on seeing our debug console), so only the KVM machine has them.
        let debugcon = if cfg.xen {
            None
        } else {
            let fw_log: Option<Box<dyn std::io::Write + Send>> = match &cfg.firmware_log {
                Some(p) => Some(Box::new(chardev::open_append(p)?)),
                None => None,
            };
            let debugcon = Arc::new(Mutex::new(DebugCon::new(fw_log)));
            pio.insert(DebugCon::BASE, DebugCon::LEN, DebugCon::RULES, shared(&debugcon), DebugCon::REGION)?;
            let post = Arc::new(Mutex::new(PostCode::new()));
            pio.insert(PostCode::BASE, PostCode::LEN, PostCode::RULES, shared(&post), PostCode::REGION)?;
            Some(debugcon)
        };
        let (cpu_hotplug, pci_hotplug) = if cfg.xen {
            let cpus = Arc::new(Mutex::new(CpuHotplugBitmap::new(cfg.smp, cfg.max_cpus)));
            pio.insert(
                CpuHotplugBitmap::BASE,
                CpuHotplugBitmap::LEN,
                CpuHotplugBitmap::RULES,
                shared(&cpus),
                CpuHotplugBitmap::REGION,
            )?;
            // Slots 0 (host bridge), 1 (PIIX) and 2 (reserved for the Xen platform device), and
            // the AHCI controller's: built in, never ejectable.
            let ahci_bit = if Self::wants_ahci(cfg) { 1 << AHCI_SLOT } else { 0 };
            let pcihp = Arc::new(Mutex::new(PciHotplug::new(0b111 | ahci_bit)));
            pio.insert(
                PciHotplug::BASE,
                PciHotplug::LEN,
                PciHotplug::RULES,
                shared(&pcihp),
                PciHotplug::REGION,
            )?;
            (Some(cpus), Some(pcihp))
        } else {
            (None, None)
        };

        let mut pty_path = None;
        let serial = match chardev::open(&cfg.serial)? {
            Some(cd) => {
                let s = Arc::new(Mutex::new(Serial::new(isa(Serial::COM1_IRQ), Some(cd.output))));
                pio.insert(Serial::COM1_BASE, Serial::LEN, Serial::RULES, shared(&s), Serial::REGION)?;
                if let Some(input) = cd.input {
                    let s2 = s.clone();
                    chardev::spawn_input(input, move |bytes| {
                        let mut dev = s2.lock().unwrap_or_else(|p| p.into_inner());
                        dev.enqueue_input(bytes);
                    });
                }
                pty_path = cd.pty_path;
                Some(s)
            }
            None => None,
        };

        // IDE.
        let ide = Arc::new(Mutex::new(IdeController::new(env.mem.clone(), isa(14), isa(15))));
        IdeController::register_legacy(&ide, &pio)?;
        for (i, d) in cfg.disks.iter().filter(|d| d.interface == DiskInterface::Ide).enumerate() {
            let pos = d.index.map_or(i, usize::from);
            let open = |ro| {
                storage::open_image(&d.path, d.format, ro)
                    .map_err(|err| MachineError::Disk { path: d.path.display().to_string(), err })
            };
            let mut c = ide.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_cdrom() {
                // A CD medium is read-only whatever the configuration says; no medium = empty drive.
                let media = if d.has_medium() { Some(open(true)?) } else { None };
                let cd = storage::CdConfig { serial: format!("HV{:05}", pos + 1), ..Default::default() };
                c.attach_cdrom(pos / 2, pos % 2, media, cd)?;
            } else {
                let dc = storage::DiskConfig {
                    write_cache: d.write_cache,
                    ..IdeController::disk_config(pos / 2, pos % 2)
                };
                c.attach_with_config(pos / 2, pos % 2, open(d.readonly)?, DriveKind::Disk, dc)?;
            }
        }

        let ahci = Self::build_ahci(cfg, &env, &buses)?;

        // PCI.
        let pci_root = Arc::new(Mutex::new(PciRoot::new()));
        let host = Arc::new(Mutex::new(I440fxHostBridge::new(env.shadow.clone())));
        let piix3 = Arc::new(Mutex::new(Piix3Isa::new(env.irq.clone())));
        let ide_fn = Arc::new(Mutex::new(Piix3Ide::new(
            &buses,
            RegionTarget::new(shared(&ide), storage::ide::REGION_BUS_MASTER, storage::ide::BUS_MASTER_RULES),
        )?));
        let pm_fn = Arc::new(Mutex::new(PmFunction::new(
            pio.clone(),
            RegionTarget::new(shared(&pm), PmIo::REGION_PM, PmIo::PM_RULES),
        )));
        {
            let mut root = pci_root.lock().unwrap_or_else(|p| p.into_inner());
            root.add(DEVFN_HOST_BRIDGE, host.clone())?;
            root.add(DEVFN_PIIX3_ISA, piix3.clone())?;
            root.add(DEVFN_PIIX3_IDE, ide_fn.clone())?;
            root.add(DEVFN_PIIX4_PM, pm_fn.clone())?;
            if let Some((_, f)) = &ahci {
                root.add(devfn(AHCI_SLOT, 0), f.clone())?;
            }
            // Power-on state, reported to the backend (PAM, PIRQ routes).
            root.reset();
        }
        let pci_io = Arc::new(Mutex::new(PciConfigIo::new(pci_root.clone(), env.platform.clone())));
        pio.insert(
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
            PciConfigIo::RULES,
            shared(&pci_io),
            PciConfigIo::REGION,
        )?;

        // fw_cfg and our ACPI tables: the KVM machine only. On Xen hvmloader builds the tables and
        // SeaBIOS takes its boot order from CMOS; direct kernel boot through fw_cfg is not wired
        // for Xen yet.
        let fw_cfg = if cfg.xen {
            if cfg.kernel.is_some() {
                return Err(MachineError::Unsupported(
                    "direct kernel boot (-kernel) under Xen is not supported yet".into(),
                ));
            }
            None
        } else {
            Some(Self::build_fw_cfg(cfg, &env, &pio, &pm_fn)?)
        };

        Ok(Machine {
            pio,
            mmio,
            pci_root,
            pci_io,
            host,
            piix3,
            ide_fn,
            pm_fn,
            cmos,
            i8042,
            pm,
            port92,
            debugcon,
            serial,
            fw_cfg,
            ide,
            ahci,
            cpu_hotplug,
            pci_hotplug,
            max_cpus: cfg.max_cpus,
            pty_path,
        })
    }

    fn wants_ahci(cfg: &MachineConfig) -> bool {
        cfg.disks.iter().any(|d| d.interface == DiskInterface::Ahci)
    }

    /// The AHCI controller with the AHCI disks and CD-ROM drives on their ports (given, or the
    /// free ones in order), and its PCI function (INTA# and MSI), if any drive uses AHCI.
    fn build_ahci(
        cfg: &MachineConfig,
        env: &MachineEnv,
        buses: &PciBuses,
    ) -> Result<Option<AhciParts>, MachineError> {
        if !Self::wants_ahci(cfg) {
            return Ok(None);
        }
        let (ctrl, func) = ahci::build(env.mem.clone(), env.irq.clone(), AHCI_SLOT, buses)?;
        let disks: Vec<_> = cfg.disks.iter().filter(|d| d.interface == DiskInterface::Ahci).collect();
        let given: Vec<usize> = disks.iter().filter_map(|d| d.index.map(usize::from)).collect();
        let mut free = (0..ahci::NUM_PORTS).filter(|p| !given.contains(p));
        for d in disks {
            let open = |ro| {
                storage::open_image(&d.path, d.format, ro)
                    .map_err(|err| MachineError::Disk { path: d.path.display().to_string(), err })
            };
            // Drives without a port take the free ones in order (more than six fail below).
            let port = d.index.map(usize::from).or_else(|| free.next()).unwrap_or(ahci::NUM_PORTS);
            let mut c = ctrl.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_cdrom() {
                // A CD medium is read-only whatever the configuration says; no medium = empty drive.
                let media = if d.has_medium() { Some(open(true)?) } else { None };
                let cd = storage::CdConfig { serial: format!("HVA{:04}", port + 1), ..Default::default() };
                c.attach_cdrom(port, media, cd)?;
            } else {
                let dc =
                    storage::DiskConfig { write_cache: d.write_cache, ..AhciController::disk_config(port) };
                c.attach_disk_with_config(port, open(d.readonly)?, dc)?;
            }
        }
        Ok(Some((ctrl, Arc::new(Mutex::new(func)))))
    }

    fn build_fw_cfg(
        cfg: &MachineConfig,
        env: &MachineEnv,
        pio: &Arc<Bus>,
        pm_fn: &Arc<Mutex<PmFunction>>,
    ) -> Result<Arc<Mutex<FwCfg>>, MachineError> {
        let fw = Arc::new(Mutex::new(FwCfg::new(env.mem.clone())));
        {
            let mut f = fw.lock().unwrap_or_else(|p| p.into_inner());
            let uuid = machine_uuid();
            f.add_pc_items(&PcItems {
                uuid,
                boot_cpus: env.topology.boot_cpus as u16,
                apic_id_limit: env.topology.apic_id_limit() as u16,
                nographic: false,
                boot_menu: false,
            })?;
            let mut e820 = vec![fw_cfg::E820Entry { addr: 0, len: env.ram_below_4g, kind: fw_cfg::E820_RAM }];
            if env.ram_above_4g > 0 {
                e820.push(fw_cfg::E820Entry { addr: 1 << 32, len: env.ram_above_4g, kind: fw_cfg::E820_RAM });
            }
            e820.push(fw_cfg::E820Entry {
                addr: crate::kvm::KVM_PRIVATE_PAGES,
                len: 0x4000,
                kind: fw_cfg::E820_RESERVED,
            });
            let blob = fw_cfg::e820_blob(&e820);
            f.add_file(fw_cfg::E820_FILE, blob.clone(), FileOpts::read_only(blob.len()))?;

            let mut ranges = vec![(0, env.ram_below_4g)];
            if env.ram_above_4g > 0 {
                ranges.push((1 << 32, env.ram_above_4g));
            }
            fw_cfg::smbios::smbios_tables(&fw_cfg::smbios::SmbiosInfo {
                vendor: "hvmdm".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                product: "hvmdm i440FX".into(),
                uuid,
                cpus: env.topology.boot_cpus,
                mem_mb: (env.ram_below_4g + env.ram_above_4g) >> 20,
                mem_ranges: ranges,
            })?
            .install(&mut f)?;

            let mut boot: Vec<&str> = Vec::new();
            if let Some(k) = &cfg.kernel {
                let kernel = read(k)?;
                let initrd = match &cfg.initrd {
                    Some(p) => Some(read(p)?),
                    None => None,
                };
                fw_cfg::linux::load_linux(&kernel, initrd.as_deref(), &cfg.append, env.ram_below_4g)?
                    .install(&mut f)?;
                if !cfg.firmware.is_ovmf() {
                    let rom = std::fs::read(LINUXBOOT_DMA_ROM)
                        .map_err(|e| MachineError::LinuxbootRom(format!("{LINUXBOOT_DMA_ROM}: {e}")))?;
                    fw_cfg::linux::add_linuxboot_dma_rom(&mut f, &rom)?;
                    boot.push(fw_cfg::linux::LINUXBOOT_DMA_BOOTORDER);
                }
            }
            let bo = fw_cfg::bootorder_blob(&boot);
            f.add_file("bootorder", bo.clone(), FileOpts::read_only(4096.max(bo.len())))?;
            acpi_glue::install(&mut f, pm_fn.clone(), env)?;
        }
        pio.insert(
            fw_cfg::PORT_BASE,
            fw_cfg::PORT_LEN,
            fw_cfg::PORT_RULES,
            shared(&fw),
            fw_cfg::REGION_PORT,
        )?;
        pio.insert(fw_cfg::DMA_BASE, fw_cfg::DMA_LEN, fw_cfg::DMA_RULES, shared(&fw), fw_cfg::REGION_DMA)?;

        Ok(fw)
    }

    /// Power-on state for every device (the guest reboots in-process).
    pub fn reset(&self) {
        fn r<T>(m: &Arc<Mutex<T>>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        r(&self.pci_root).reset();
        r(&self.pci_io).reset();
        r(&self.cmos).reset();
        r(&self.i8042).reset();
        r(&self.pm).reset();
        r(&self.port92).reset();
        if let Some(d) = &self.debugcon {
            r(d).reset();
        }
        if let Some(s) = &self.serial {
            r(s).reset();
        }
        if let Some(f) = &self.fw_cfg {
            r(f).reset();
        }
        r(&self.ide).reset();
        if let Some((c, _)) = &self.ahci {
            r(c).reset();
        }
        if let Some(c) = &self.cpu_hotplug {
            r(c).reset();
        }
        if let Some(p) = &self.pci_hotplug {
            r(p).reset();
        }
    }

    /// A PCI configuration read as the Xen backend receives it (already decoded from CF8/CFC).
    pub fn pci_config_read(&self, bus: u8, devfn: u8, reg: u16, size: u8) -> u32 {
        self.pci_root.lock().unwrap_or_else(|p| p.into_inner()).config_read(bus, devfn, reg, size)
    }

    pub fn pci_config_write(&self, bus: u8, devfn: u8, reg: u16, size: u8, value: u32) {
        self.pci_root.lock().unwrap_or_else(|p| p.into_inner()).config_write(bus, devfn, reg, size, value)
    }

    /// Device/function numbers of every function on bus 0.
    pub fn pci_devfns(&self) -> Vec<u8> {
        self.pci_root.lock().unwrap_or_else(|p| p.into_inner()).devfns()
    }

    /// The CPU present bitmap (Xen machine only).
    pub fn cpu_hotplug(&self) -> Option<&Arc<Mutex<CpuHotplugBitmap>>> {
        self.cpu_hotplug.as_ref()
    }

    /// Marks vCPU `n` present in the legacy CPU hotplug bitmap and raises its GPE (SCI if the
    /// guest enabled it). False without the bitmap (KVM machines) or when `n` is out of range or
    /// present already.
    pub fn plug_cpu(&self, n: u32) -> bool {
        let Some(cpus) = &self.cpu_hotplug else { return false };
        if !cpus.lock().unwrap_or_else(|p| p.into_inner()).plug(n) {
            return false;
        }
        self.pm.lock().unwrap_or_else(|p| p.into_inner()).set_gpe_status(CpuHotplugBitmap::GPE_BIT);
        true
    }

    /// Before waking the guest from ACPI S3: CMOS shutdown status 0xFE tells the firmware to
    /// take its resume path (jump to the OS waking vector) instead of a cold boot, as QEMU's
    /// RTC sets it on suspend.
    pub fn prepare_s3_resume(&self) {
        const SHUTDOWN_STATUS: u8 = 0x0f;
        const S3_RESUME: u8 = 0xfe;
        self.cmos.lock().unwrap_or_else(|p| p.into_inner()).set_nvram(SHUTDOWN_STATUS, S3_RESUME);
    }

    pub fn max_cpus(&self) -> u32 {
        self.max_cpus
    }

    /// The IDE controller (QMP changes CD-ROM media through it).
    pub fn ide(&self) -> &Arc<Mutex<IdeController>> {
        &self.ide
    }

    /// Every device with state, in a fixed order, under its section name.
    fn snapshot_entries(&self) -> Vec<DeviceEntry<'_>> {
        // PCI functions first: restoring them re-maps their BARs and the PM block, which the
        // devices behind those regions do not depend on.
        let mut v: Vec<DeviceEntry<'_>> = vec![
            DeviceEntry::new(&*self.pci_io),
            DeviceEntry::new(&*self.host),
            DeviceEntry::new(&*self.piix3),
            DeviceEntry::new(&*self.ide_fn),
            DeviceEntry::new(&*self.pm_fn),
            DeviceEntry::new(&*self.ide),
            DeviceEntry::new(&*self.cmos),
            DeviceEntry::new(&*self.i8042),
            DeviceEntry::new(&*self.pm),
            DeviceEntry::new(&*self.port92),
        ];
        if let Some((c, f)) = &self.ahci {
            v.push(DeviceEntry::new(&**f));
            v.push(DeviceEntry::new(&**c));
        }
        if let Some(s) = &self.serial {
            v.push(DeviceEntry::new(&**s));
        }
        if let Some(c) = &self.cpu_hotplug {
            v.push(DeviceEntry::new(&**c));
        }
        if let Some(p) = &self.pci_hotplug {
            v.push(DeviceEntry::new(&**p));
        }
        if let Some(f) = &self.fw_cfg {
            v.push(DeviceEntry::new(&**f));
        }
        v
    }

    /// Waits for the IDE and AHCI commands in flight on the I/O workers (no device lock held).
    fn drain_disks(&self) {
        IdeController::drain(&self.ide);
        if let Some((c, _)) = &self.ahci {
            AhciController::drain(c);
        }
    }

    /// The device state as one stream (`xen-save-devices-state`). Guest RAM is not included:
    /// Xen saves it. Call with the guest paused (no request in flight).
    pub fn save_state(&self) -> Result<Vec<u8>, SnapshotError> {
        // Let disk commands in flight complete first (without the lock: completions take it).
        self.drain_disks();
        snapshot::save_all(&self.snapshot_entries())
    }

    /// Restores a stream from [`Machine::save_state`] of an identically configured machine: all
    /// sections are validated before any device changes.
    pub fn load_state(&self, stream: &[u8]) -> Result<(), SnapshotError> {
        self.drain_disks();
        snapshot::restore_all(stream, &self.snapshot_entries())
    }

    /// Before the process ends: everything acknowledged reaches the disk images.
    pub fn shutdown(&self) {
        self.drain_disks();
        let ide = self.ide.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = ide.flush_all() {
            log::error!("flushing disks at shutdown: {e}");
        }
        if let Some((c, _)) = &self.ahci {
            if let Err(e) = c.lock().unwrap_or_else(|p| p.into_inner()).flush_all() {
                log::error!("flushing AHCI disks at shutdown: {e}");
            }
        }
        if let Some(d) = &self.debugcon {
            d.lock().unwrap_or_else(|p| p.into_inner()).flush();
        }
    }
}

/// A per-run UUID (random from the kernel; SMBIOS type 1 and fw_cfg UUID).
fn machine_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
        for (i, b) in u.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
        }
    }
    u
}

#[cfg(test)]
mod tests {
    //! Machine-level tests: the firmware's view of the assembled graph, driven through the same
    //! port accesses SeaBIOS and OVMF make (the unit-lane cover for what OVMF needs from hvmdm).

    use super::*;
    use crate::config::{FirmwareConfig, SerialConfig};
    use hvmdm_acpi as acpi;
    use hvmdm_devices::irq::RecordingIrqSink;
    use hvmdm_devices::mem::TestRam;
    use hvmdm_devices::platform::{RecordingPlatform, SystemEvent};

    fn machine(cpus: u32) -> (Machine, Arc<TestRam>, Arc<RecordingPlatform>) {
        let ram = Arc::new(TestRam::new(4 << 20));
        let platform = Arc::new(RecordingPlatform::default());
        let cfg = MachineConfig {
            memory: 256 << 20,
            smp: cpus,
            firmware: FirmwareConfig::OvmfSplit {
                code: "ovmf-code".into(),
                vars_template: "ovmf-vars".into(),
            },
            kernel: None,
            initrd: None,
            append: String::new(),
            disks: vec![],
            serial: SerialConfig::None,
            firmware_log: None,
            boot_order: "c".into(),
            max_cpus: cpus,
            xen: false,
        };
        let m = Machine::build(
            &cfg,
            MachineEnv {
                mem: ram.clone(),
                irq: Arc::new(RecordingIrqSink::default()),
                platform: platform.clone(),
                shadow: platform.clone(),
                ram_below_4g: 256 << 20,
                ram_above_4g: 0,
                topology: Topology::flat(cpus, cpus),
            },
        )
        .unwrap();
        (m, ram, platform)
    }

    fn cfg_write(m: &Machine, devfn: u8, reg: u8, v: u32) {
        m.pio.write_sync(0xcf8, &(0x8000_0000u32 | (devfn as u32) << 8 | reg as u32).to_le_bytes());
        m.pio.write_sync(0xcfc, &v.to_le_bytes());
    }

    /// The fw_cfg directory as a firmware reads it through the ports: name -> (key, size).
    fn directory(m: &Machine) -> Vec<(String, u16, u32)> {
        m.pio.write_sync(0x510, &0x19u16.to_le_bytes());
        let rd = |n: usize| {
            let mut v = vec![0u8; n];
            for b in v.iter_mut() {
                let mut x = [0u8];
                m.pio.read_sync(0x511, &mut x);
                *b = x[0];
            }
            v
        };
        let count = u32::from_be_bytes(rd(4).try_into().unwrap());
        (0..count)
            .map(|_| {
                let e = rd(64);
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
                let key = u16::from_be_bytes(e[4..6].try_into().unwrap());
                let name = String::from_utf8_lossy(&e[8..]).trim_end_matches('\0').to_string();
                (name, key, size)
            })
            .collect()
    }

    /// OVMF style: port select, then a DMA READ of `size` bytes (both address halves written).
    fn dma_read(m: &Machine, ram: &TestRam, key: u16, size: u32) -> Vec<u8> {
        m.pio.write_sync(0x510, &key.to_le_bytes());
        let desc = 0x1000u64;
        let buf = 0x10000u64;
        ram.write(desc, &0x02u32.to_be_bytes()).unwrap();
        ram.write(desc + 4, &size.to_be_bytes()).unwrap();
        ram.write(desc + 8, &buf.to_be_bytes()).unwrap();
        m.pio.write_sync(0x514, &0u32.to_be_bytes());
        m.pio.write_sync(0x518, &(desc as u32).to_be_bytes());
        let mut ctl = [0u8; 4];
        ram.read(desc, &mut ctl).unwrap();
        assert_eq!(u32::from_be_bytes(ctl), 0, "DMA control after transfer");
        let mut out = vec![0u8; size as usize];
        ram.read(buf, &mut out).unwrap();
        out
    }

    fn download(m: &Machine, ram: &TestRam, dir: &[(String, u16, u32)], name: &str) -> Vec<u8> {
        let (_, key, size) = dir.iter().find(|(n, ..)| n == name).unwrap();
        dma_read(m, ram, *key, *size)
    }

    fn fadt_pm1a_evt(report: &acpi::VerifyReport, mem: &dyn Fn(u64, usize) -> Vec<u8>) -> u32 {
        let t = report.tables.iter().find(|t| t.signature == "FACP").unwrap();
        u32::from_le_bytes(mem(t.address + 56, 4).try_into().unwrap())
    }

    fn check_boot(
        m: &Machine,
        ram: &TestRam,
        fw: acpi::Firmware,
        pm_base: u16,
        dir: Vec<(String, u16, u32)>,
    ) {
        // OVMF selects the loader after reading its size; the select runs the lazy rebuild.
        let loader = download(m, ram, &dir, acpi::LOADER_FILE);
        let dir_after = directory(m);
        let (tables, rsdp) = match fw {
            // SeaBIOS keeps the sizes it cached before PCI setup.
            acpi::Firmware::SeaBios => {
                (download(m, ram, &dir, acpi::TABLES_FILE), download(m, ram, &dir, acpi::RSDP_FILE))
            }
            acpi::Firmware::Ovmf => (
                download(m, ram, &dir_after, acpi::TABLES_FILE),
                download(m, ram, &dir_after, acpi::RSDP_FILE),
            ),
        };
        assert_eq!(dir, dir_after, "directory sizes must not change across the lazy rebuild");
        let files = |n: &str| match n {
            acpi::TABLES_FILE => Some(tables.clone()),
            acpi::LOADER_FILE => Some(loader.clone()),
            acpi::RSDP_FILE => Some(rsdp.clone()),
            _ => None,
        };
        let report = acpi::verify(&loader, &files, fw).unwrap();
        for sig in ["FACP", "DSDT", "APIC"] {
            assert!(report.has(sig), "{fw:?}: {sig} missing from {:?}", report.tables);
        }
        // The FADT carries the PM base the firmware programmed (QEMU's lazy-build behaviour).
        let blob_base = report.blobs.iter().find(|b| b.0 == acpi::TABLES_FILE).unwrap().1;
        let mem = |addr: u64, n: usize| tables[(addr - blob_base) as usize..][..n].to_vec();
        assert_eq!(fadt_pm1a_evt(&report, &mem), pm_base as u32);
    }

    #[test]
    fn ovmf_sequence_gets_verified_tables_with_its_pm_base() {
        let (m, ram, _) = machine(2);
        // OVMF: PMBA 0xB000 + PMREGMISC before its ACPI driver runs.
        cfg_write(&m, 0x0b, 0x40, 0xb001);
        cfg_write(&m, 0x0b, 0x80, 1);
        let dir = directory(&m);
        check_boot(&m, &ram, acpi::Firmware::Ovmf, 0xb000, dir);
    }

    #[test]
    fn seabios_sequence_with_stale_directory_and_pm_move_then_reboot() {
        let (m, ram, platform) = machine(4);
        // SeaBIOS reads the directory before PCI setup, then moves PM to 0x600.
        let dir = directory(&m);
        cfg_write(&m, 0x0b, 0x40, 0x601);
        cfg_write(&m, 0x0b, 0x80, 1);
        check_boot(&m, &ram, acpi::Firmware::SeaBios, 0x600, dir);
        // Guest reboots through 0xCF9; after the machine reset the tables are rebuilt again
        // for whatever the firmware programs this time.
        m.pio.write_sync(0xcf9, &[0x06]);
        assert_eq!(platform.events.lock().unwrap().last(), Some(&SystemEvent::Reset));
        m.reset();
        let dir = directory(&m);
        cfg_write(&m, 0x0b, 0x40, 0xb001);
        cfg_write(&m, 0x0b, 0x80, 1);
        check_boot(&m, &ram, acpi::Firmware::SeaBios, 0xb000, dir);
    }

    #[test]
    fn pm_block_follows_pmba_and_s5_powers_off() {
        let (m, _, platform) = machine(1);
        cfg_write(&m, 0x0b, 0x40, 0xb001);
        cfg_write(&m, 0x0b, 0x80, 1);
        // hvmloader: enable ACPI through 0xB2, then SCI_EN reads back from PM1a_CNT.
        m.pio.write_sync(0xb2, &[0xf1]);
        let mut cnt = [0u8; 2];
        m.pio.read_sync(0xb004, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & 1, 1);
        // S5: SLP_TYP 0 with SLP_EN.
        m.pio.write_sync(0xb004, &(0x2001u16).to_le_bytes());
        assert_eq!(platform.events.lock().unwrap().last(), Some(&SystemEvent::PowerOff));
    }

    fn xen_machine(boot: u32, max: u32) -> (Machine, Arc<RecordingIrqSink>, Arc<RecordingPlatform>) {
        let ram = Arc::new(TestRam::new(4 << 20));
        let platform = Arc::new(RecordingPlatform::default());
        let irq = Arc::new(RecordingIrqSink::default());
        let cfg = MachineConfig {
            memory: 256 << 20,
            smp: boot,
            firmware: FirmwareConfig::Hvmloader,
            kernel: None,
            initrd: None,
            append: String::new(),
            disks: vec![],
            serial: SerialConfig::None,
            firmware_log: None,
            boot_order: "cda".into(),
            max_cpus: max,
            xen: true,
        };
        let m = Machine::build(
            &cfg,
            MachineEnv {
                mem: ram,
                irq: irq.clone(),
                platform: platform.clone(),
                shadow: platform.clone(),
                ram_below_4g: 256 << 20,
                ram_above_4g: 0,
                topology: Topology::flat(boot, max),
            },
        )
        .unwrap();
        (m, irq, platform)
    }

    /// What hvmloader asserts and does (specs/xen-interfaces.md §7.1), through PCI_CONFIG-style
    /// accesses as Xen delivers them, plus the ports the Xen DSDT reads.
    #[test]
    fn xen_machine_passes_hvmloader_checks() {
        let (m, irq, platform) = xen_machine(2, 4);
        // Bus 0 scan: 00:01.0 must be the PIIX3 ISA bridge, class 0x0680 only the PIIX4 PM.
        assert_eq!(m.pci_config_read(0, 0x08, 0, 4), 0x7000_8086);
        for devfn in m.pci_devfns() {
            let class = m.pci_config_read(0, devfn, 0x0a, 2);
            if class == 0x0680 {
                assert_eq!(m.pci_config_read(0, devfn, 0, 4), 0x7113_8086);
            }
            assert_ne!(devfn >> 3, 2, "slot 2 is the Xen platform device's");
        }
        assert_eq!(m.pci_config_read(0, 0x10, 0, 4), 0xffff_ffff, "00:02.0 is empty");
        // PIRQ routing goes to the IRQ sink (set_pci_link_route on Xen).
        m.pci_config_write(0, 0x08, 0x60, 1, 10);
        assert!(irq.take().contains(&hvmdm_devices::irq::IrqEvent::Route(0, Some(10))));
        // PM: base 0xB000, enable, ACPI enable through 0xB2, SCI_EN reads back.
        m.pci_config_write(0, 0x0b, 0x40, 4, 0xb001);
        m.pci_config_write(0, 0x0b, 0x80, 1, 1);
        let mut cnt = [0u8; 2];
        m.pio.read_sync(0xb004, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & 1, 0);
        m.pio.write_sync(0xb2, &[0xf1]);
        m.pio.read_sync(0xb004, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & 1, 1, "hvmloader BUG()s without SCI_EN");
        // The DSDT's CPU bitmap and PCI hotplug registers.
        let mut v = [0u8; 4];
        m.pio.read_sync(0xaf00, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0b11);
        m.pio.read_sync(0xae0c, &mut v);
        assert_eq!(u32::from_le_bytes(v) & 0b111, 0, "built-in slots are not removable");
        // Xen owns these: nothing of ours may claim them.
        for port in [0x20u64, 0x40, 0x61, 0xa0, 0x4d0, 0x402, 0x510, 0x80] {
            assert!(!m.pio.is_claimed(port), "port {port:#x} must be left to Xen or absent");
        }
        for port in [0x70u64, 0x71, 0x60, 0x64, 0x92, 0xcf8, 0xcf9, 0xcfc, 0xafe0, 0x1f0, 0x170] {
            assert!(m.pio.is_claimed(port), "port {port:#x} is the device model's");
        }
        // S5 and 0xCF9 reset become platform requests (xendevicemodel_shutdown on Xen).
        m.pio.write_sync(0xcf9, &[0x06]);
        m.pio.write_sync(0xb004, &(0x2001u16).to_le_bytes());
        let ev = platform.events.lock().unwrap().clone();
        assert_eq!(ev, vec![SystemEvent::Reset, SystemEvent::PowerOff]);
    }

    /// `xl vcpu-set` (QMP device_add): the bitmap shows the new vCPU and GPE0 bit 2 raises the
    /// SCI once the guest enabled it; plugging it again or past maxcpus does nothing. Also the
    /// other toolstack-driven change of guest-visible state, the S3 resume flag.
    #[test]
    fn xen_cpu_hotplug_and_s3_flag() {
        use hvmdm_devices::irq::IrqEvent;
        let (m, irq, _) = xen_machine(1, 3);
        m.pci_config_write(0, 0x0b, 0x40, 4, 0xb001);
        m.pci_config_write(0, 0x0b, 0x80, 1, 1);
        m.pio.write_sync(0xb2, &[0xf1]);
        m.pio.write_sync(0xafe2, &[1 << CpuHotplugBitmap::GPE_BIT]);
        irq.take();
        assert!(m.plug_cpu(2));
        let mut v = [0u8; 1];
        m.pio.read_sync(0xaf00, &mut v);
        assert_eq!(v[0], 0b101);
        m.pio.read_sync(0xafe0, &mut v);
        assert_eq!(v[0] & (1 << CpuHotplugBitmap::GPE_BIT), 1 << CpuHotplugBitmap::GPE_BIT);
        assert!(irq.take().contains(&IrqEvent::Isa(9, true)), "SCI raised");
        // S3 wake-up: the firmware's resume flag in CMOS 0x0F.
        m.prepare_s3_resume();
        m.pio.write_sync(0x70, &[0x0f]);
        m.pio.read_sync(0x71, &mut v);
        assert_eq!(v[0], 0xfe);
        assert!(!m.plug_cpu(2), "already present");
        assert!(!m.plug_cpu(3), "beyond maxcpus");
        // The guest acknowledges the GPE: the SCI drops.
        m.pio.write_sync(0xafe0, &[1 << CpuHotplugBitmap::GPE_BIT]);
        assert!(irq.take().contains(&IrqEvent::Isa(9, false)));
    }

    /// A Xen or KVM machine with AHCI disks on ports 0 and 2 (and one IDE disk), over
    /// temporary raw images that are removed when the returned guard drops.
    fn ahci_machine(xen: bool) -> (Machine, TempImages) {
        ahci_machine_with(xen, Vec::new())
    }

    /// [`ahci_machine`] with `extra` drives after its three disks.
    fn ahci_machine_with(xen: bool, extra: Vec<crate::config::DiskConfig>) -> (Machine, TempImages) {
        // Unique per call: tests run in parallel and one test may build two machines.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir();
        let paths: Vec<std::path::PathBuf> =
            (0..3).map(|i| dir.join(format!("hvmdm-ahci-test-{}-{n}-{i}.img", std::process::id()))).collect();
        for p in &paths {
            std::fs::write(p, vec![0u8; 64 * 512]).unwrap();
        }
        let disk = |i: usize, interface, index| crate::config::DiskConfig {
            path: paths[i].clone(),
            interface,
            readonly: false,
            format: storage::ImageFormat::Raw,
            index,
            id: None,
            media: crate::config::DiskMedia::Disk,
            write_cache: true,
        };
        let cfg = MachineConfig {
            memory: 256 << 20,
            smp: 1,
            firmware: if xen {
                FirmwareConfig::Hvmloader
            } else {
                FirmwareConfig::OvmfSplit { code: "ovmf-code".into(), vars_template: "ovmf-vars".into() }
            },
            kernel: None,
            initrd: None,
            append: String::new(),
            disks: vec![
                disk(0, DiskInterface::Ahci, Some(2)),
                disk(1, DiskInterface::Ide, None),
                disk(2, DiskInterface::Ahci, None),
            ]
            .into_iter()
            .chain(extra)
            .collect(),
            serial: SerialConfig::None,
            firmware_log: None,
            boot_order: "c".into(),
            max_cpus: 1,
            xen,
        };
        let platform = Arc::new(RecordingPlatform::default());
        let m = Machine::build(
            &cfg,
            MachineEnv {
                mem: Arc::new(TestRam::new(4 << 20)),
                irq: Arc::new(RecordingIrqSink::default()),
                platform: platform.clone(),
                shadow: platform,
                ram_below_4g: 256 << 20,
                ram_above_4g: 0,
                topology: Topology::flat(1, 1),
            },
        )
        .unwrap();
        (m, TempImages(paths))
    }

    struct TempImages(Vec<std::path::PathBuf>);
    impl Drop for TempImages {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    #[test]
    fn ahci_function_appears_at_slot_3_with_ich9_ids() {
        for xen in [true, false] {
            let (m, _imgs) = ahci_machine(xen);
            let df = devfn(AHCI_SLOT, 0);
            assert!(m.pci_devfns().contains(&df));
            assert_eq!(m.pci_config_read(0, df, 0, 4), 0x2922_8086);
            assert_eq!(m.pci_config_read(0, df, 0x08, 4), 0x0106_0102, "class 01.06.01, rev 2");
            assert_eq!(m.pci_config_read(0, df, 0x3d, 1), 1, "INTA#");
            assert_eq!(m.pci_config_read(0, df, 0x34, 1), 0x80, "MSI capability first");
            assert_eq!(m.pci_config_read(0, df, 0x80, 1), 0x05);
            assert_eq!(m.pci_config_read(0, 0x10, 0, 4), 0xffff_ffff, "00:02.0 stays free");
            // ABAR: size, map, read CAP and the ports' links after spin-up.
            m.pci_config_write(0, df, 0x24, 4, u32::MAX);
            assert_eq!(m.pci_config_read(0, df, 0x24, 4), 0xffff_f000);
            m.pci_config_write(0, df, 0x24, 4, 0xfebf_0000);
            m.pci_config_write(0, df, 0x04, 2, 0x6);
            let rd = |off: u64| {
                let mut b = [0u8; 4];
                m.mmio.read_sync(0xfebf_0000 + off, &mut b);
                u32::from_le_bytes(b)
            };
            assert_eq!(rd(0) & 0x1f, 5);
            assert_eq!(rd(0x0c), 0x3f);
            let links: Vec<u32> = (0..6u64)
                .map(|p| {
                    m.mmio.write_sync(0xfebf_0000 + 0x118 + p * 0x80, &0x12u32.to_le_bytes());
                    rd(0x128 + p * 0x80) & 0xf
                })
                .collect();
            assert_eq!(links, vec![3, 0, 3, 0, 0, 0], "disks on ports 2 (given) and 0 (first free)");
            if xen {
                let mut v = [0u8; 4];
                m.pio.read_sync(0xae0c, &mut v);
                assert_eq!(u32::from_le_bytes(v) & (1 << AHCI_SLOT), 0, "AHCI slot is not removable");
            }
            // The IDE disk is still the primary master.
            let mut st = [0u8; 1];
            m.pio.read_sync(0x1f7, &mut st);
            assert_eq!(st[0] & 0x40, 0x40);
            // Save/restore and reset keep the function.
            let stream = m.save_state().unwrap();
            let (m2, _imgs2) = ahci_machine(xen);
            m2.load_state(&stream).unwrap();
            let mut b = [0u8; 4];
            m2.mmio.read_sync(0xfebf_0000 + 0x128, &mut b);
            assert_eq!(u32::from_le_bytes(b) & 0xf, 3);
            m.reset();
            assert_eq!(m.pci_config_read(0, df, 0x24, 4), 0);
            m.shutdown();
        }
    }

    /// `--disk file=X.iso,if=ahci,media=cdrom` and `--disk if=ahci,media=cdrom`: ATAPI drives on
    /// the next free port and on a given one, with and without a medium.
    #[test]
    fn ahci_cdrom_drives() {
        let iso = std::env::temp_dir().join(format!("hvmdm-ahci-cd-{}.iso", std::process::id()));
        std::fs::write(&iso, vec![0x5au8; 8 * 2048]).unwrap();
        let _guard = TempImages(vec![iso.clone()]);
        let mut with_medium =
            crate::config::parse_disk(&format!("file={},if=ahci,media=cdrom", iso.display())).unwrap();
        with_medium.index = Some(4);
        let empty = crate::config::parse_disk("if=ahci,media=cdrom").unwrap();
        let (m, _imgs) = ahci_machine_with(false, vec![with_medium, empty]);
        let (ctrl, _) = m.ahci.as_ref().unwrap();
        let c = ctrl.lock().unwrap();
        let cd = c.cdrom(4).unwrap();
        assert!(cd.has_media() && cd.media().unwrap().is_read_only());
        assert_eq!(cd.capacity_blocks(), 8);
        assert!(!c.cdrom(1).unwrap().has_media(), "the empty drive takes the first free port");
        assert!(c.cdrom(0).is_none() && c.has_device(0), "port 0 keeps its disk");
        drop(c);
        m.pci_config_write(0, devfn(AHCI_SLOT, 0), 0x24, 4, 0xfebf_0000);
        m.pci_config_write(0, devfn(AHCI_SLOT, 0), 0x04, 2, 0x6);
        let port4 = 0xfebf_0000 + 0x100 + 4 * 0x80;
        m.mmio.write_sync(port4 + 0x18, &0x12u32.to_le_bytes());
        let mut b = [0u8; 4];
        m.mmio.read_sync(port4 + 0x24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xeb14_0101, "ATAPI signature");
        m.shutdown();
    }

    /// xen-save-devices-state / -incoming: a fresh machine of the same configuration continues
    /// with the saved device state (BAR/PM mappings included), and a corrupt stream changes
    /// nothing.
    #[test]
    fn device_state_round_trips_between_machines() {
        let (a, _, _) = xen_machine(1, 2);
        a.pci_config_write(0, 0x0b, 0x40, 4, 0xb001);
        a.pci_config_write(0, 0x0b, 0x80, 1, 1);
        a.pio.write_sync(0xb2, &[0xf1]);
        a.pci_config_write(0, 0x08, 0x61, 1, 11);
        a.pio.write_sync(0x70, &[0x40]);
        a.pio.write_sync(0x71, &[0x5a]);
        a.cpu_hotplug().unwrap().lock().unwrap().plug(1);
        let stream = a.save_state().unwrap();

        let (b, irq, _) = xen_machine(1, 2);
        assert!(!b.pio.is_claimed(0xb004));
        let mut bad = stream.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(b.load_state(&bad).is_err());
        assert!(!b.pio.is_claimed(0xb004), "a refused stream changes nothing");
        b.load_state(&stream).unwrap();
        let mut cnt = [0u8; 2];
        b.pio.read_sync(0xb004, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & 1, 1, "PM block re-mapped with SCI_EN");
        b.pio.write_sync(0x70, &[0x40]);
        let mut v = [0u8; 1];
        b.pio.read_sync(0x71, &mut v);
        assert_eq!(v[0], 0x5a);
        assert!(irq.take().contains(&hvmdm_devices::irq::IrqEvent::Route(1, Some(11))));
        assert_eq!(b.cpu_hotplug().unwrap().lock().unwrap().present(), vec![0, 1]);
        // A machine with another vCPU maximum refuses the stream.
        let (c, _, _) = xen_machine(1, 1);
        assert!(c.load_state(&stream).is_err());
    }
}
