//! Builds the device graph from a MachineConfig; shared by both backends.
//!
//! The layout is the i440FX/PIIX3 PC that hvmloader, SeaBIOS and OVMF expect: 00:00.0 host bridge,
//! 00:01.0 PIIX3 ISA, 00:01.1 PIIX3 IDE, 00:01.3 PIIX4 PM; ISA devices at their legacy ports; fw_cfg
//! with our own ACPI tables (rebuilt lazily after every reset, with the firmware-programmed PM base).

use std::sync::{Arc, Mutex};

use hvmdm_devices::bus::{Bus, BusError, SharedDevice};
use hvmdm_devices::chipset::{Cmos, CmosConfig, DebugCon, Piix4Pm as PmIo, PostCode, ResetPort92, I8042};
use hvmdm_devices::fw_cfg::{self, FileOpts, FwCfg, PcItems};
use hvmdm_devices::irq::{IrqSink, IsaIrq};
use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::pci::{
    I440fxHostBridge, PciBuses, PciConfigIo, PciRoot, Piix3Ide, Piix3Isa, Piix4Pm as PmFunction,
    RegionTarget, DEVFN_HOST_BRIDGE, DEVFN_PIIX3_IDE, DEVFN_PIIX3_ISA, DEVFN_PIIX4_PM, PCI_CONFIG_IO_BASE,
    PCI_CONFIG_IO_LEN,
};
use hvmdm_devices::platform::{PlatformControl, ShadowControl};
use hvmdm_devices::serial::Serial;
use hvmdm_devices::storage::{self, DriveKind, IdeController, RawFile};
use hvmdm_devices::topology::Topology;
use thiserror::Error;

use crate::acpi_glue;
use crate::chardev;
use crate::config::MachineConfig;

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
    #[error(transparent)]
    Chardev(#[from] chardev::ChardevError),
    #[error("ACPI: {0}")]
    Acpi(String),
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
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
    pm: Arc<Mutex<PmIo>>,
    port92: Arc<Mutex<ResetPort92>>,
    debugcon: Arc<Mutex<DebugCon>>,
    serial: Option<Arc<Mutex<Serial>>>,
    fw_cfg: Arc<Mutex<FwCfg>>,
    ide: Arc<Mutex<IdeController>>,
    pub pty_path: Option<String>,
}

fn read(p: &std::path::Path) -> Result<Vec<u8>, MachineError> {
    std::fs::read(p).map_err(|err| MachineError::Read { path: p.display().to_string(), err })
}

fn shared<T: hvmdm_devices::bus::BusDevice + 'static>(d: &Arc<Mutex<T>>) -> SharedDevice {
    d.clone()
}

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
                xen: false,
            },
            Some(isa(Cmos::IRQ)),
        )?));
        pio.insert(Cmos::BASE, Cmos::LEN, Cmos::RULES, shared(&cmos), Cmos::REGION)?;
        Cmos::spawn_ticker(&cmos).map_err(|err| MachineError::Read { path: "cmos ticker".into(), err })?;

        let i8042 =
            Arc::new(Mutex::new(I8042::new(isa(I8042::KBD_IRQ), isa(I8042::AUX_IRQ), env.platform.clone())));
        pio.insert(I8042::DATA_PORT, I8042::LEN, I8042::RULES, shared(&i8042), I8042::REGION_DATA)?;
        pio.insert(I8042::CMD_PORT, I8042::LEN, I8042::RULES, shared(&i8042), I8042::REGION_CMD)?;

        let pm = Arc::new(Mutex::new(PmIo::new(isa(PmIo::SCI_IRQ), env.platform.clone(), false)));
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

        let fw_log: Option<Box<dyn std::io::Write + Send>> = match &cfg.firmware_log {
            Some(p) => Some(Box::new(chardev::open_append(p)?)),
            None => None,
        };
        let debugcon = Arc::new(Mutex::new(DebugCon::new(fw_log)));
        pio.insert(DebugCon::BASE, DebugCon::LEN, DebugCon::RULES, shared(&debugcon), DebugCon::REGION)?;
        let post = Arc::new(Mutex::new(PostCode::new()));
        pio.insert(PostCode::BASE, PostCode::LEN, PostCode::RULES, shared(&post), PostCode::REGION)?;

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
        for (i, d) in cfg.disks.iter().enumerate() {
            let img = RawFile::open(&d.path, d.readonly)
                .map_err(|err| MachineError::Disk { path: d.path.display().to_string(), err })?;
            let mut c = ide.lock().unwrap_or_else(|p| p.into_inner());
            c.attach(i / 2, i % 2, Box::new(img), DriveKind::Disk)?;
        }

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
            root.add(DEVFN_PIIX3_ISA, piix3)?;
            root.add(DEVFN_PIIX3_IDE, ide_fn)?;
            root.add(DEVFN_PIIX4_PM, pm_fn.clone())?;
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

        // fw_cfg.
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
            acpi_glue::install(&mut f, pm_fn.clone(), &env)?;
        }
        pio.insert(
            fw_cfg::PORT_BASE,
            fw_cfg::PORT_LEN,
            fw_cfg::PORT_RULES,
            shared(&fw),
            fw_cfg::REGION_PORT,
        )?;
        pio.insert(fw_cfg::DMA_BASE, fw_cfg::DMA_LEN, fw_cfg::DMA_RULES, shared(&fw), fw_cfg::REGION_DMA)?;

        Ok(Machine {
            pio,
            mmio,
            pci_root,
            pci_io,
            cmos,
            i8042,
            pm,
            port92,
            debugcon,
            serial,
            fw_cfg: fw,
            ide,
            pty_path,
        })
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
        r(&self.debugcon).reset();
        if let Some(s) = &self.serial {
            r(s).reset();
        }
        r(&self.fw_cfg).reset();
        r(&self.ide).reset();
    }

    /// Before the process ends: everything acknowledged reaches the disk images.
    pub fn shutdown(&self) {
        let ide = self.ide.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = ide.flush_all() {
            log::error!("flushing disks at shutdown: {e}");
        }
        let mut d = self.debugcon.lock().unwrap_or_else(|p| p.into_inner());
        d.flush();
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
