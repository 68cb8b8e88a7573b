//! ICH9 AHCI SATA controller (8086:2922 rev 2, class 01.06.01): six ports, 32 command slots,
//! NCQ, 64-bit addressing, MSI and INTx, on the transport-independent ATA layer
//! ([`super::ata`]) the IDE controller uses.
//!
//! Regions served by [`AhciController`] (the PCI function [`Ich9Ahci`] maps them through its BARs):
//!
//! | id | region | BAR | rules |
//! |----|--------|-----|-------|
//! | 0 [`REGION_ABAR`] | HBA memory registers, [`ABAR_SIZE`] bytes | BAR5, 32-bit MMIO | [`ABAR_RULES`] |
//! | 1 [`REGION_IDP`] | index/data pair (index +0x10, data +0x14), [`IDP_SIZE`] bytes | BAR4, I/O | [`IDP_RULES`] |
//!
//! Behaviour, as the clients (Linux libahci, SeaBIOS, edk2 AtaAtapiPassThru) need it:
//! - CAP: 6 ports, NCS 31, SNCQ, S64A, SAM (so GHC.AE reads 1), SCLO, SSS with Gen1 speed.
//!   With staggered spin-up the link of a port only comes up when the guest sets PxCMD.SUD.
//! - Link-up (SUD set, or COMRESET through PxSCTL.DET = 1 then 0): PxTFD reads BSY until the
//!   device's signature D2H FIS arrives, which needs PxCMD.FRE; then PxSIG = 0x00000101,
//!   PxTFD = 0x0150 and the FIS sits in the receive area (no interrupt: it carries no I bit).
//!   During COMRESET PxTFD reads 0x7F and PxSSTS.DET 0; a port without a device keeps
//!   PxSSTS.DET = 0, PxTFD = 0x7F and PxSIG = all-ones.
//! - Commands are issued by the PxCI (or PxCMD.ST) write that makes them runnable, in slot
//!   order. Those without image I/O complete inside that write; data transfers (DMA and PIO),
//!   NCQ, FLUSH CACHE and ATAPI medium reads run on the port's I/O worker (see [`io`]'s module
//!   notes): meanwhile a non-queued command keeps its PxCI bit and PxTFD reads BSY (0xD0), an NCQ
//!   command leaves PxCI at once and keeps its PxSACT bit, and every register answers. A
//!   non-queued command waits for queued ones in flight. PIO data-in commands (IDENTIFY, READ SECTORS) end with a PIO Setup FIS
//!   (I bit, E_Status 0x50, PxIS.PSS); other commands with a D2H Register FIS (PxIS.DHRS); NCQ
//!   commands post a DMA Setup FIS and complete through a Set Device Bits FIS that clears their
//!   PxSACT bit (PxIS.SDBS). PRDBC in the command header is written for every command.
//! - Errors (ATA aborts, LBAs past the end, command lists, tables or PRDTs outside RAM, PRDTs
//!   shorter than the data, reserved FIS types, no device) post a D2H FIS with ERR, set
//!   PxTFD = 0x51 | ABRT << 8 and PxIS.TFES|DHRS (an NCQ error posts an SDB FIS with ERR
//!   instead), and halt the port until software clears PxCMD.ST (AHCI 1.3 §6.2.2).
//! - Interrupts: IS collects ports whose PxIS & PxIE is non-zero; with GHC.IE the function's
//!   MSI is sent for each new event when the guest enabled MSI, else INTA# is held high while IS
//!   is non-zero.
//!
//! - ATAPI CD-ROM drives ([`AhciController::attach_cdrom`], on [`super::atapi::AtapiDrive`])
//!   sign on with PxSIG = 0xEB140101. PACKET (A0h) takes its CDB from the ACMD area of the
//!   command table (offset 40h); data goes to the PRDT whether the guest asked for DMA (feature
//!   bit 0) or PIO. PIO data-in posts a PIO Setup FIS (PxIS.PSS) and every packet command ends
//!   with a D2H Register FIS (PxIS.DHRS): libahci and edk2 take the final ATAPI status from it.
//!   CHECK CONDITION ends as an error with error register = sense key << 4 | ABRT. A PRDT shorter
//!   than the reply gets what fits (PRDBC says how much) and the command succeeds, as on QEMU.
//!   IDENTIFY DEVICE aborts with the ATAPI signature in the FIS; IDENTIFY PACKET DEVICE, DEVICE
//!   RESET, EXECUTE DEVICE DIAGNOSTIC, SET FEATURES and the power commands work. Media change:
//!   [`AhciController::insert_media`] / [`AhciController::eject_media`].

mod cmd;
mod io;
mod pci;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;

use super::aio::IoEngine;
use super::ata::{AtaDisk, DiskConfig, SECTOR_SIZE};
use super::atapi::{AtapiDrive, AtapiError, CdConfig};
use super::image::BlockBackend;
use crate::bus::{AccessRules, BusDevice, IoResult, RegionId, SharedDevice};
use crate::irq::IrqSink;
use crate::mem::GuestRam;
use crate::pci::{CommandWatch, PciBuses, PciError, PciIntx, PciMsi, RegionTarget, PCI_COMMAND_MASTER};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

pub use pci::{Ich9Ahci, AHCI_ABAR_BAR, AHCI_IDP_BAR, AHCI_MSI_CAP, AHCI_SATA_CAP};

pub const REGION_ABAR: RegionId = 0;
pub const REGION_IDP: RegionId = 1;
/// ABAR size QEMU and Linux use for ICH9 (the registers end at 0x400; the rest reads 0).
pub const ABAR_SIZE: u64 = 0x1000;
pub const IDP_SIZE: u64 = 32;
/// Registers are dwords; byte/word accesses and 64-bit accesses (split in two) also work.
pub const ABAR_RULES: AccessRules = AccessRules::new(1, 8, 1, 4);
pub const IDP_RULES: AccessRules = AccessRules::DWORD_ANY;

pub const NUM_PORTS: usize = 6;
pub const NUM_SLOTS: usize = 32;
/// NCQ queue depth advertised to the drives.
const NCQ_DEPTH: u8 = 32;

// HBA registers.
const HBA_CAP: u64 = 0x00;
const HBA_GHC: u64 = 0x04;
const HBA_IS: u64 = 0x08;
const HBA_PI: u64 = 0x0c;
const HBA_VS: u64 = 0x10;
const HBA_CAP2: u64 = 0x24;
const PORT_BASE: u64 = 0x100;
const PORT_STRIDE: u64 = 0x80;

pub const CAP_SNCQ: u32 = 1 << 30;
pub const CAP_S64A: u32 = 1 << 31;
pub const CAP_SSS: u32 = 1 << 27;
pub const CAP_SCLO: u32 = 1 << 24;
pub const CAP_SAM: u32 = 1 << 18;
/// NP = 5 (six ports), NCS = 31 (32 slots), ISS = Gen1.
pub const CAP: u32 = (NUM_PORTS as u32 - 1)
    | ((NUM_SLOTS as u32 - 1) << 8)
    | CAP_SAM
    | (1 << 20)
    | CAP_SCLO
    | CAP_SSS
    | CAP_SNCQ
    | CAP_S64A;
pub const GHC_HR: u32 = 1 << 0;
pub const GHC_IE: u32 = 1 << 1;
pub const GHC_AE: u32 = 1 << 31;
/// AHCI 1.3.
pub const VS: u32 = 0x0001_0300;
pub const PI: u32 = (1 << NUM_PORTS) - 1;

// Port registers (offsets inside a port's 0x80 bytes).
const PX_CLB: u64 = 0x00;
const PX_CLBU: u64 = 0x04;
const PX_FB: u64 = 0x08;
const PX_FBU: u64 = 0x0c;
const PX_IS: u64 = 0x10;
const PX_IE: u64 = 0x14;
const PX_CMD: u64 = 0x18;
const PX_TFD: u64 = 0x20;
const PX_SIG: u64 = 0x24;
const PX_SSTS: u64 = 0x28;
const PX_SCTL: u64 = 0x2c;
const PX_SERR: u64 = 0x30;
const PX_SACT: u64 = 0x34;
const PX_CI: u64 = 0x38;

/// PxIS bits.
pub mod pxis {
    pub const DHRS: u32 = 1 << 0;
    pub const PSS: u32 = 1 << 1;
    pub const DSS: u32 = 1 << 2;
    pub const SDBS: u32 = 1 << 3;
    pub const DPS: u32 = 1 << 5;
    pub const TFES: u32 = 1 << 30;
    /// Bits that exist (PxIE writable bits, PxIS write-1-to-clear bits).
    pub const VALID: u32 = 0xfdc0_00ff;
}

/// PxCMD bits.
pub mod pxcmd {
    pub const ST: u32 = 1 << 0;
    pub const SUD: u32 = 1 << 1;
    pub const POD: u32 = 1 << 2;
    pub const CLO: u32 = 1 << 3;
    pub const FRE: u32 = 1 << 4;
    pub const FR: u32 = 1 << 14;
    pub const CR: u32 = 1 << 15;
    pub const ATAPI: u32 = 1 << 24;
    pub const DLAE: u32 = 1 << 25;
    /// What a guest write can change (ICC and the rest need features CAP does not claim).
    pub const WRITABLE: u32 = ST | SUD | CLO | FRE | ATAPI | DLAE;
}

/// PxTFD status values.
const TFD_NO_DEVICE: u32 = 0x7f;
const TFD_BSY: u32 = 0x80;
/// BSY|DRDY|DSC: a non-queued command's job is in flight.
const TFD_IO_BUSY: u32 = 0xd0;
/// DRDY|DSC with error register 01h (diagnostics passed), after the signature FIS.
const TFD_READY_AFTER_RESET: u32 = 0x0150;
/// SSTS with an established Gen1 link in the active state.
const SSTS_UP: u32 = 0x113;
const SCTL_VALID: u32 = 0xfff;
const SIG_NONE: u32 = 0xffff_ffff;

#[derive(Debug, Error)]
pub enum AhciError {
    #[error("AHCI port {0} does not exist (0..5)")]
    BadPort(usize),
    #[error("AHCI port {0} already has a device")]
    Occupied(usize),
    #[error("AHCI port {0} is empty")]
    Empty(usize),
    #[error("AHCI port {0}: flushing the image failed")]
    Flush(usize),
    #[error("AHCI port {0} has no CD-ROM drive")]
    NotCdrom(usize),
    #[error("AHCI port {0}: the tray is locked by the guest")]
    Locked(usize),
    #[error("AHCI commands are in flight")]
    Busy,
}

/// What sits on a port.
#[derive(Debug)]
pub enum PortDevice {
    Disk(AtaDisk),
    Cdrom(AtapiDrive),
}

/// PxSIG of an ATA disk and of an ATAPI device (count, LBA low, mid, high of the signature FIS).
pub const SIG_ATA: u32 = 0x0000_0101;
pub const SIG_ATAPI: u32 = 0xeb14_0101;

impl PortDevice {
    /// The image (none for an empty CD-ROM drive).
    fn backend(&self) -> Option<&Arc<dyn BlockBackend>> {
        match self {
            PortDevice::Disk(d) => Some(d.backend()),
            PortDevice::Cdrom(cd) => cd.media(),
        }
    }
    /// PxSIG value of the device's reset signature.
    fn signature(&self) -> u32 {
        match self {
            PortDevice::Disk(_) => SIG_ATA,
            PortDevice::Cdrom(_) => SIG_ATAPI,
        }
    }
    fn reset(&mut self) {
        match self {
            PortDevice::Disk(d) => d.reset(),
            PortDevice::Cdrom(cd) => cd.reset(),
        }
    }
}

/// One port's registers (the guest-visible part of the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortRegs {
    clb: u64,
    fb: u64,
    is: u32,
    ie: u32,
    cmd: u32,
    tfd: u32,
    sig: u32,
    sctl: u32,
    serr: u32,
    sact: u32,
    ci: u32,
}

impl PortRegs {
    const POWER_ON: PortRegs = PortRegs {
        clb: 0,
        fb: 0,
        is: 0,
        ie: 0,
        cmd: pxcmd::POD,
        tfd: TFD_NO_DEVICE,
        sig: SIG_NONE,
        sctl: 0,
        serr: 0,
        sact: 0,
        ci: 0,
    };
}

#[derive(Debug)]
struct Port {
    regs: PortRegs,
    dev: Option<PortDevice>,
    /// The device's signature D2H FIS is waiting for FIS receive to be enabled.
    sig_pending: bool,
    /// SRST asserted by a control FIS; clearing it resets the device.
    srst: bool,
    /// Stopped on a task-file error until software clears PxCMD.ST.
    halted: bool,
    /// Commands whose job is in flight, by slot.
    inflight: [Option<io::IoCmd>; NUM_SLOTS],
    /// Bumped when the port's commands are abandoned; jobs of an older one are stale.
    gen: u64,
}

impl Port {
    fn new() -> Self {
        Port {
            regs: PortRegs::POWER_ON,
            dev: None,
            sig_pending: false,
            srst: false,
            halted: false,
            inflight: [None; NUM_SLOTS],
            gen: 0,
        }
    }

    /// Slots with a job in flight.
    fn running(&self) -> u32 {
        self.inflight.iter().enumerate().filter(|(_, c)| c.is_some()).fold(0, |m, (i, _)| m | 1 << i)
    }

    /// A non-queued command is in flight (nothing else may start).
    fn busy_unqueued(&self) -> bool {
        self.inflight.iter().flatten().any(|c| !c.queued())
    }

    fn det(&self) -> u32 {
        self.regs.sctl & 0xf
    }

    /// Phy communication established: a device, spun up, not held in COMRESET or offline.
    fn link_up(&self) -> bool {
        self.dev.is_some() && self.regs.cmd & pxcmd::SUD != 0 && !matches!(self.det(), 1 | 4)
    }

    fn ssts(&self) -> u32 {
        if self.link_up() {
            SSTS_UP
        } else if self.det() == 4 {
            4
        } else {
            0
        }
    }

    /// Power-on / HBA-reset state of the registers; the device keeps its image and settings.
    fn reset_regs(&mut self) {
        self.regs = PortRegs::POWER_ON;
        self.sig_pending = false;
        self.srst = false;
        self.halted = false;
    }
}

/// A controller with empty ports and its PCI function, wired together: the function's BAR5/BAR4
/// map the controller's regions on `buses`, its INTA# is `slot`'s pin A on `irq`, its MSI goes
/// to `irq` and its bus-master enable gates the controller's DMA. Add the function to the PCI
/// root at `slot` and attach disks to the controller.
pub fn build(
    mem: Arc<dyn GuestRam>,
    irq: Arc<dyn IrqSink>,
    slot: u8,
    buses: &PciBuses,
) -> Result<(Arc<Mutex<AhciController>>, Ich9Ahci), PciError> {
    let ctrl = Arc::new(Mutex::new(AhciController::new(mem)));
    AhciController::enable_async(&ctrl);
    let dev: SharedDevice = ctrl.clone();
    let intx = PciIntx::new(irq.clone(), slot, 0);
    let msi = PciMsi::new(irq);
    let func = Ich9Ahci::new(
        buses,
        RegionTarget::new(dev.clone(), REGION_ABAR, ABAR_RULES),
        RegionTarget::new(dev, REGION_IDP, IDP_RULES),
        intx.clone(),
        msi.clone(),
    )?;
    ctrl.lock().unwrap_or_else(|p| p.into_inner()).connect_pci(intx, msi, func.command_watch());
    Ok((ctrl, func))
}

/// The AHCI HBA: global registers and six ports.
pub struct AhciController {
    mem: Arc<dyn GuestRam>,
    intx: Option<PciIntx>,
    msi: Option<PciMsi>,
    command: Option<CommandWatch>,
    ghc: u32,
    is: u32,
    idp_index: u32,
    ports: [Port; NUM_PORTS],
    /// Interrupt condition last reported (GHC.IE and IS non-zero).
    level: bool,
    /// One I/O engine per port: a port's jobs run in order, ports do not wait for each other.
    engines: [Arc<IoEngine>; NUM_PORTS],
    /// How a job's completion finds the controller; empty for a bare controller (synchronous).
    this: Weak<Mutex<AhciController>>,
}

impl std::fmt::Debug for AhciController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AhciController")
            .field("ghc", &format_args!("{:#x}", self.ghc))
            .field("is", &format_args!("{:#x}", self.is))
            .field("ports", &self.ports)
            .finish()
    }
}

impl AhciController {
    /// A controller with empty ports. Connect it to its PCI function with [`Self::connect_pci`]
    /// (without it, tests: no interrupts are delivered and DMA is always allowed).
    pub fn new(mem: Arc<dyn GuestRam>) -> Self {
        AhciController {
            mem,
            intx: None,
            msi: None,
            command: None,
            ghc: GHC_AE,
            is: 0,
            idp_index: 0,
            ports: std::array::from_fn(|_| Port::new()),
            level: false,
            engines: std::array::from_fn(|i| Arc::new(IoEngine::new(&format!("ahci{i}")))),
            this: Weak::new(),
        }
    }

    /// The function's INTA# line, its MSI and its command register (bus-master enable gates
    /// command fetch and DMA).
    pub fn connect_pci(&mut self, intx: PciIntx, msi: PciMsi, command: CommandWatch) {
        self.intx = Some(intx);
        self.msi = Some(msi);
        self.command = Some(command);
    }

    fn port_ok(&self, port: usize) -> Result<(), AhciError> {
        if port < NUM_PORTS {
            Ok(())
        } else {
            Err(AhciError::BadPort(port))
        }
    }

    /// Attaches a disk with a default identity (serial derived from the port).
    pub fn attach_disk(&mut self, port: usize, backend: Arc<dyn BlockBackend>) -> Result<(), AhciError> {
        self.attach_disk_with_config(port, backend, Self::disk_config(port))
    }

    /// The identity [`Self::attach_disk`] gives a disk on `port` (serial HVA000n).
    pub fn disk_config(port: usize) -> DiskConfig {
        DiskConfig { serial: format!("HVA{:04}", port + 1), ..Default::default() }
    }

    pub fn attach_disk_with_config(
        &mut self,
        port: usize,
        backend: Arc<dyn BlockBackend>,
        config: DiskConfig,
    ) -> Result<(), AhciError> {
        let mut disk = AtaDisk::new(backend, config);
        disk.enable_ncq(NCQ_DEPTH);
        self.put_device(port, PortDevice::Disk(disk))
    }

    fn put_device(&mut self, port: usize, dev: PortDevice) -> Result<(), AhciError> {
        self.port_ok(port)?;
        let p = &mut self.ports[port];
        if p.dev.is_some() {
            return Err(AhciError::Occupied(port));
        }
        p.dev = Some(dev);
        Ok(())
    }

    /// Attaches an ATAPI CD-ROM drive holding `media` (read-only; `None`: an empty drive, present
    /// all the same).
    pub fn attach_cdrom(
        &mut self,
        port: usize,
        media: Option<Arc<dyn BlockBackend>>,
        config: CdConfig,
    ) -> Result<(), AhciError> {
        self.put_device(port, PortDevice::Cdrom(AtapiDrive::new(media, config)))
    }

    /// The CD-ROM drive on a port (medium, lock and tray state for QMP `query-block`).
    pub fn cdrom(&self, port: usize) -> Option<&AtapiDrive> {
        match &self.ports.get(port)?.dev {
            Some(PortDevice::Cdrom(cd)) => Some(cd),
            _ => None,
        }
    }

    fn cdrom_mut(&mut self, port: usize) -> Result<&mut AtapiDrive, AhciError> {
        self.port_ok(port)?;
        match &mut self.ports[port].dev {
            Some(PortDevice::Cdrom(cd)) => Ok(cd),
            _ => Err(AhciError::NotCdrom(port)),
        }
    }

    /// Host side (QMP `blockdev-change-medium`): a new medium in the port's CD-ROM drive,
    /// replacing any old one. The guest sees a UNIT ATTENTION and a new-media event.
    pub fn insert_media(&mut self, port: usize, backend: Arc<dyn BlockBackend>) -> Result<(), AhciError> {
        self.cdrom_mut(port)?.insert(backend);
        Ok(())
    }

    /// Host side (QMP `eject`): takes the medium out and returns it. Refused with
    /// [`AhciError::Locked`] while the guest locks the tray (it gets an eject request), unless
    /// `force`.
    pub fn eject_media(
        &mut self,
        port: usize,
        force: bool,
    ) -> Result<Option<Arc<dyn BlockBackend>>, AhciError> {
        self.cdrom_mut(port)?.eject(force).map_err(|e| match e {
            AtapiError::Locked => AhciError::Locked(port),
        })
    }

    /// Removes a port's device (Xen PV unplug), flushing its image first, and returns the image
    /// (none for an empty CD-ROM drive). The port then reads as empty; the guest sees the link
    /// drop.
    pub fn detach(&mut self, port: usize) -> Result<Option<Arc<dyn BlockBackend>>, AhciError> {
        self.port_ok(port)?;
        let p = &mut self.ports[port];
        let dev = p.dev.take().ok_or(AhciError::Empty(port))?;
        p.sig_pending = false;
        p.regs.tfd = TFD_NO_DEVICE;
        p.regs.sig = SIG_NONE;
        self.abandon(port);
        let backend = dev.backend().cloned();
        if let Some(b) = &backend {
            b.flush().map_err(|e| {
                log::error!("ahci port {port}: flush on detach failed: {e}");
                AhciError::Flush(port)
            })?;
        }
        Ok(backend)
    }

    /// Flushes every attached image (before save, shutdown or unplug).
    pub fn flush_all(&self) -> Result<(), AhciError> {
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(b) = p.dev.as_ref().and_then(PortDevice::backend) {
                b.flush().map_err(|e| {
                    log::error!("ahci port {i}: flush failed: {e}");
                    AhciError::Flush(i)
                })?;
            }
        }
        Ok(())
    }

    pub fn has_device(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(|p| p.dev.is_some())
    }

    /// Power-on state: registers, interrupt line low, drive settings to their defaults.
    pub fn reset(&mut self) {
        self.hba_reset();
        self.idp_index = 0;
        for p in &mut self.ports {
            if let Some(d) = &mut p.dev {
                d.reset();
            }
        }
    }

    /// GHC.HR: global and port registers to their reset values, as a COMRESET of every port.
    fn hba_reset(&mut self) {
        self.ghc = GHC_AE;
        self.is = 0;
        for port in 0..NUM_PORTS {
            self.ports[port].reset_regs();
            self.abandon(port);
        }
        self.update_irq(false);
    }

    fn bus_master(&self) -> bool {
        self.command.as_ref().is_none_or(|c| c.load(Ordering::Acquire) & PCI_COMMAND_MASTER != 0)
    }

    // ---- interrupts ----

    /// Sets PxIS bits of `port` and re-evaluates the interrupt.
    fn raise(&mut self, port: usize, bits: u32) {
        let p = &mut self.ports[port];
        p.regs.is |= bits;
        let new_event = bits & p.regs.ie != 0;
        self.update_irq(new_event);
    }

    /// IS collects the ports with an enabled event; with GHC.IE the line follows IS (INTx), or a
    /// message goes out when the condition appears or a new event adds to it (MSI).
    fn update_irq(&mut self, new_event: bool) {
        for (i, p) in self.ports.iter().enumerate() {
            if p.regs.is & p.regs.ie != 0 {
                self.is |= 1 << i;
            }
        }
        let level = self.ghc & GHC_IE != 0 && self.is != 0;
        if let Some(intx) = &self.intx {
            // PciIntx holds the line low while MSI is enabled.
            intx.set_level(level);
        }
        if let Some(msi) = &self.msi {
            if level && (new_event || !self.level) && msi.enabled() {
                msi.signal();
            }
        }
        self.level = level;
    }

    // ---- link and reset events ----

    /// The link came up (spin-up or the end of a COMRESET): the device will send its signature.
    fn link_event(&mut self, port: usize) {
        let p = &mut self.ports[port];
        if !p.link_up() {
            return;
        }
        p.regs.tfd = TFD_BSY;
        p.regs.sig = SIG_NONE;
        p.srst = false;
        p.sig_pending = true;
        self.deliver_signature(port);
    }

    /// Posts a pending signature FIS once the port receives FISes.
    fn deliver_signature(&mut self, port: usize) {
        let p = &mut self.ports[port];
        let Some(dev) = &p.dev else { return };
        if !p.sig_pending || p.regs.cmd & pxcmd::FRE == 0 {
            return;
        }
        let sig = dev.signature();
        p.sig_pending = false;
        p.regs.sig = sig;
        p.regs.tfd = TFD_READY_AFTER_RESET;
        let fis = cmd::signature_fis(sig);
        cmd::post_fis(&*self.mem, port, &p.regs, cmd::RX_RFIS, &fis);
    }

    // ---- registers ----

    fn read_reg(&self, off: u64) -> u32 {
        match off {
            HBA_CAP => CAP,
            HBA_GHC => self.ghc,
            HBA_IS => self.is,
            HBA_PI => PI,
            HBA_VS => VS,
            HBA_CAP2 => 0,
            o if (PORT_BASE..PORT_BASE + PORT_STRIDE * NUM_PORTS as u64).contains(&o) => {
                let p = &self.ports[((o - PORT_BASE) / PORT_STRIDE) as usize];
                let r = &p.regs;
                match (o - PORT_BASE) % PORT_STRIDE {
                    PX_CLB => r.clb as u32,
                    PX_CLBU => (r.clb >> 32) as u32,
                    PX_FB => r.fb as u32,
                    PX_FBU => (r.fb >> 32) as u32,
                    PX_IS => r.is,
                    PX_IE => r.ie,
                    PX_CMD => r.cmd,
                    PX_TFD => r.tfd,
                    PX_SIG => r.sig,
                    PX_SSTS => p.ssts(),
                    PX_SCTL => r.sctl,
                    PX_SERR => r.serr,
                    PX_SACT => r.sact,
                    PX_CI => r.ci,
                    // SNTF, FBS, DEVSLP, vendor: features not claimed in CAP/CAP2.
                    _ => 0,
                }
            }
            // CCC, enclosure management, BOHC (not claimed), vendor space, beyond the ports.
            _ => 0,
        }
    }

    /// Guest write of the bytes of `v` selected by `m` (a byte mask expanded to bits) to the
    /// dword register at `off`.
    fn write_reg(&mut self, off: u64, v: u32, m: u32) {
        let merge = |old: u32, keep: u32| (old & !m) | (v & m & keep) | (old & m & !keep);
        match off {
            HBA_GHC => {
                if v & m & GHC_HR != 0 {
                    log::debug!("ahci: HBA reset");
                    self.hba_reset();
                    return;
                }
                self.ghc = merge(self.ghc, GHC_IE) | GHC_AE;
                self.update_irq(false);
            }
            HBA_IS => {
                self.is &= !(v & m);
                self.update_irq(false);
            }
            o if (PORT_BASE..PORT_BASE + PORT_STRIDE * NUM_PORTS as u64).contains(&o) => {
                let port = ((o - PORT_BASE) / PORT_STRIDE) as usize;
                self.write_port(port, (o - PORT_BASE) % PORT_STRIDE, v, m);
            }
            _ => {
                if off < PORT_BASE + PORT_STRIDE * NUM_PORTS as u64 && off >= 0x2c {
                    // Reserved / vendor space: ignored like on real hardware.
                } else if !matches!(off, HBA_CAP | HBA_PI | HBA_VS | HBA_CAP2) {
                    warn_limited!(format!("ahci-w-{off:x}"), "ahci: write {v:#x} to {off:#x} ignored");
                }
            }
        }
    }

    fn write_port(&mut self, port: usize, reg: u64, v: u32, m: u32) {
        let merge = |old: u32, keep: u32| (old & !(m & keep)) | (v & m & keep);
        let p = &mut self.ports[port];
        let r = &mut p.regs;
        match reg {
            // The command list is 1 KiB aligned, the FIS area 256 bytes (no FIS-based switching).
            PX_CLB => r.clb = (r.clb & !0xffff_ffff) | u64::from(merge(r.clb as u32, 0xffff_fc00)),
            PX_CLBU => r.clb = (r.clb & 0xffff_ffff) | (u64::from(merge((r.clb >> 32) as u32, !0)) << 32),
            PX_FB => r.fb = (r.fb & !0xffff_ffff) | u64::from(merge(r.fb as u32, 0xffff_ff00)),
            PX_FBU => r.fb = (r.fb & 0xffff_ffff) | (u64::from(merge((r.fb >> 32) as u32, !0)) << 32),
            PX_IS => {
                r.is &= !(v & m & pxis::VALID);
                self.update_irq(false);
            }
            PX_IE => {
                r.ie = merge(r.ie, pxis::VALID);
                self.update_irq(false);
            }
            PX_CMD => {
                let new = merge(r.cmd, pxcmd::WRITABLE);
                self.write_cmd(port, new);
            }
            PX_SCTL => {
                let old_det = p.det();
                p.regs.sctl = merge(p.regs.sctl, SCTL_VALID);
                let det = p.det();
                if det == 1 && old_det != 1 {
                    // COMRESET asserted: the link drops, the device is reset and forgets the
                    // commands it had.
                    p.regs.tfd = TFD_NO_DEVICE;
                    p.regs.sig = SIG_NONE;
                    p.regs.ci = 0;
                    p.regs.sact = 0;
                    p.sig_pending = false;
                    p.srst = false;
                    self.abandon(port);
                } else if matches!(old_det, 1 | 4) && !matches!(det, 1 | 4) {
                    self.link_event(port);
                }
            }
            PX_SERR => r.serr &= !(v & m),
            // Only meaningful while the port runs (cleared when ST goes to 0).
            PX_SACT if r.cmd & pxcmd::ST != 0 => r.sact |= v & m,
            PX_CI => {
                if r.cmd & pxcmd::ST != 0 {
                    r.ci |= v & m;
                    self.process(port);
                } else if v & m != 0 {
                    warn_limited!(
                        format!("ahci-ci-stopped-{port}"),
                        "ahci port {port}: PxCI written while PxCMD.ST is clear; ignored"
                    );
                }
            }
            // TFD, SIG, SSTS are read-only; SNTF, FBS and the rest are not implemented.
            _ => {}
        }
    }

    fn write_cmd(&mut self, port: usize, new: u32) {
        let p = &mut self.ports[port];
        let old = p.regs.cmd;
        let mut cmd = new & !pxcmd::CLO;
        if new & pxcmd::CLO != 0 {
            // Command list override: clear BSY and DRQ so a new command can be issued.
            p.regs.tfd &= !0x88;
        }
        // The engines start and stop at once: FR follows FRE, CR follows ST.
        cmd = (cmd & !(pxcmd::FR | pxcmd::CR))
            | if cmd & pxcmd::FRE != 0 { pxcmd::FR } else { 0 }
            | if cmd & pxcmd::ST != 0 { pxcmd::CR } else { 0 };
        p.regs.cmd = cmd;
        if old & pxcmd::ST != 0 && cmd & pxcmd::ST == 0 {
            p.regs.ci = 0;
            p.regs.sact = 0;
            p.halted = false;
            self.abandon(port);
        }
        if old & pxcmd::SUD == 0 && cmd & pxcmd::SUD != 0 {
            self.link_event(port);
        }
        if cmd & pxcmd::FRE != 0 {
            self.deliver_signature(port);
        }
        if old & pxcmd::ST == 0 && cmd & pxcmd::ST != 0 {
            self.process(port);
        }
    }

    /// Issues every issued slot of `port` in order, unless the port is stopped, halted on an
    /// error or bus mastering is off (then the slots wait for the next register write). A
    /// non-queued command in flight holds back the slots after it; queued (NCQ) commands go
    /// out together, and a non-queued one waits until they have completed.
    fn process(&mut self, port: usize) {
        if !self.bus_master() {
            if self.ports[port].regs.ci & !self.ports[port].running() != 0 {
                warn_limited!(
                    format!("ahci-no-bme-{port}"),
                    "ahci port {port}: commands issued with bus mastering disabled wait for it"
                );
            }
            return;
        }
        for slot in 0..NUM_SLOTS {
            let p = &self.ports[port];
            if p.regs.cmd & pxcmd::ST == 0 || p.halted || p.busy_unqueued() {
                return;
            }
            if p.regs.ci & (1 << slot) == 0 || p.inflight[slot].is_some() {
                continue;
            }
            if !self.exec_slot(port, slot) {
                return;
            }
        }
    }

    fn idp_read(&self, offset: u64) -> u32 {
        match offset {
            0x10 => self.idp_index,
            0x14 => self.read_reg(u64::from(self.idp_index)),
            _ => 0,
        }
    }

    fn idp_write(&mut self, offset: u64, v: u32, m: u32) {
        match offset {
            // The index addresses dwords of the ABAR register space (bits 10:2).
            0x10 => self.idp_index = (self.idp_index & !m) | (v & m & 0x7fc),
            0x14 => self.write_reg(u64::from(self.idp_index), v, m),
            _ => {}
        }
    }
}

/// (dword offset, shift, bit mask) of an access of `len` bytes at `offset`.
fn split(offset: u64, len: usize) -> (u64, u32, u32) {
    let shift = (offset & 3) as u32 * 8;
    let bits = if len >= 4 { u32::MAX } else { (1u32 << (len * 8)) - 1 };
    (offset & !3, shift, bits << shift)
}

impl BusDevice for AhciController {
    fn read(&mut self, region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let (reg, shift, _) = split(offset, data.len());
        let v = match region {
            REGION_ABAR => self.read_reg(reg),
            REGION_IDP => self.idp_read(reg),
            _ => u32::MAX,
        } >> shift;
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        IoResult::Done
    }

    fn write(&mut self, region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let (reg, shift, mask) = split(offset, data.len());
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b) << shift;
        match region {
            REGION_ABAR => self.write_reg(reg, v, mask),
            REGION_IDP => self.idp_write(reg, v, mask),
            _ => {}
        }
        IoResult::Done
    }
}

// ---- save/restore ----

#[derive(Debug)]
struct PortState {
    regs: PortRegs,
    sig_pending: bool,
    srst: bool,
    halted: bool,
    dev: Option<DevState>,
    /// Commands in flight at save time (re-issued on restore).
    inflight: Vec<(usize, io::IoCmd)>,
}

#[derive(Debug)]
enum DevState {
    Disk(super::ata::AtaDiskState),
    Cdrom(super::atapi::AtapiState),
}

/// Device kind byte of a port in the snapshot (version 1 had a presence flag: 0 or 1, a disk).
const SLOT_EMPTY: u8 = 0;
const SLOT_DISK: u8 = 1;
const SLOT_CDROM: u8 = 2;

#[derive(Debug)]
struct AhciState {
    ghc: u32,
    is: u32,
    idp_index: u32,
    ports: Vec<PortState>,
}

impl AhciController {
    /// The section in the layout of `version` (2 or 3; tests write old streams with it).
    fn save_as(&self, w: &mut SectionWriter, version: u32) {
        w.put_u32(self.ghc);
        w.put_u32(self.is);
        w.put_u32(self.idp_index);
        for p in &self.ports {
            let r = &p.regs;
            w.put_u64(r.clb);
            w.put_u64(r.fb);
            for v in [r.is, r.ie, r.cmd, r.tfd, r.sig, r.sctl, r.serr, r.sact, r.ci] {
                w.put_u32(v);
            }
            w.put_bool(p.sig_pending);
            w.put_bool(p.srst);
            w.put_bool(p.halted);
            match &p.dev {
                Some(PortDevice::Disk(d)) => {
                    w.put_u8(SLOT_DISK);
                    d.save_state(w);
                }
                Some(PortDevice::Cdrom(cd)) => {
                    w.put_u8(SLOT_CDROM);
                    cd.save_state(w);
                }
                None => w.put_u8(SLOT_EMPTY),
            }
            if version >= 3 {
                w.put_u32(p.running());
                for c in p.inflight.iter().flatten() {
                    io::put_cmd(w, c);
                }
            }
        }
    }
}

/// Section "ahci", version 3: global registers, then per port the registers, the reset and
/// error flags, the device kind (0 none, 1 disk, 2 CD-ROM), the device's ATA settings or ATAPI
/// state, and the commands in flight: a slot mask, then per slot what its job was given (kind,
/// task file, header and table addresses, the transfer). The machine drains the engines before
/// saving, so normally there are none; a save under the lock cannot wait, and then the restored
/// controller re-issues them (reads are repeated, writes rewrite the same data from the same
/// guest buffers). Version 2 had no in-flight list; version 1 (no CD-ROMs) also had a presence
/// flag in place of the kind, which reads the same.
impl Snapshot for AhciController {
    fn section(&self) -> &'static str {
        "ahci"
    }
    fn section_version(&self) -> u32 {
        3
    }
    fn save(&self, w: &mut SectionWriter) {
        self.save_as(w, 3);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        if !matches!(version, 1 | 2) {
            check_version(r, version, 3)?;
        }
        let ghc = r.get_u32()?;
        let is = r.get_u32()?;
        let idp_index = r.get_u32()?;
        if ghc & !(GHC_IE | GHC_AE) != 0 || ghc & GHC_AE == 0 || is & !PI != 0 || idp_index & !0x7fc != 0 {
            return Err(r.bad(format!("GHC {ghc:#x}, IS {is:#x}, IDP index {idp_index:#x}")));
        }
        let mut ports = Vec::with_capacity(NUM_PORTS);
        for (i, p) in self.ports.iter().enumerate() {
            let clb = r.get_u64()?;
            let fb = r.get_u64()?;
            let mut v = [0u32; 9];
            for x in &mut v {
                *x = r.get_u32()?;
            }
            let [is, ie, cmd, tfd, sig, sctl, serr, sact, ci] = v;
            let regs = PortRegs { clb, fb, is, ie, cmd, tfd, sig, sctl, serr, sact, ci };
            let sig_pending = r.get_bool()?;
            let srst = r.get_bool()?;
            let halted = r.get_bool()?;
            let kind = r.get_u8()?;
            let fixed_cmd = pxcmd::POD
                | if cmd & pxcmd::FRE != 0 { pxcmd::FR } else { 0 }
                | if cmd & pxcmd::ST != 0 { pxcmd::CR } else { 0 };
            if clb & 0x3ff != 0
                || fb & 0xff != 0
                || is & !pxis::VALID != 0
                || ie & !pxis::VALID != 0
                || cmd & !(pxcmd::WRITABLE & !pxcmd::CLO) != fixed_cmd
                || tfd > 0xffff
                || sctl & !SCTL_VALID != 0
            {
                return Err(r.bad(format!("port {i}: registers {regs:x?}")));
            }
            let dev = match (&p.dev, kind) {
                (None, SLOT_EMPTY) => None,
                (Some(PortDevice::Disk(d)), SLOT_DISK) => Some(DevState::Disk(d.decode_state(r)?)),
                (Some(PortDevice::Cdrom(cd)), SLOT_CDROM) if version >= 2 => {
                    Some(DevState::Cdrom(cd.decode_state(r)?))
                }
                (here, _) => {
                    let here = match here {
                        None => SLOT_EMPTY,
                        Some(PortDevice::Disk(_)) => SLOT_DISK,
                        Some(PortDevice::Cdrom(_)) => SLOT_CDROM,
                    };
                    return Err(r.bad(format!("port {i}: device kind {kind} saved, {here} here")));
                }
            };
            let mut inflight = Vec::new();
            if version >= 3 {
                let mask = r.get_u32()?;
                // Only a running port has commands in flight; a non-queued one keeps its PxCI
                // bit and runs alone.
                if mask != 0 && (cmd & pxcmd::ST == 0 || halted) {
                    return Err(r.bad(format!("port {i}: commands in flight {mask:#x} with {regs:x?}")));
                }
                for slot in (0..NUM_SLOTS).filter(|s| mask & 1 << s != 0) {
                    let c = io::get_cmd(r, p.dev.as_ref())?;
                    if !c.queued() && ci & 1 << slot == 0 {
                        return Err(r.bad(format!("port {i}: slot {slot} in flight, PxCI {ci:#x}")));
                    }
                    inflight.push((slot, c));
                }
                if inflight.len() > 1 && inflight.iter().any(|(_, c)| !c.queued()) {
                    return Err(r.bad(format!("port {i}: a non-queued command with others in flight")));
                }
            }
            ports.push(PortState { regs, sig_pending, srst, halted, dev, inflight });
        }
        Ok(PendingState::new(AhciState { ghc, is, idp_index, ports }))
    }

    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: AhciState = state.downcast(self.section())?;
        self.ghc = st.ghc;
        self.is = st.is;
        self.idp_index = st.idp_index;
        let mut reissue = Vec::new();
        for (p, s) in self.ports.iter_mut().zip(st.ports) {
            reissue.push(s.inflight);
            // Whatever this controller had in flight is superseded by the restored state.
            p.gen = p.gen.wrapping_add(1);
            p.inflight = [None; NUM_SLOTS];
            p.regs = s.regs;
            p.sig_pending = s.sig_pending;
            p.srst = s.srst;
            p.halted = s.halted;
            match (&mut p.dev, &s.dev) {
                (Some(PortDevice::Disk(d)), Some(DevState::Disk(ds))) => d.apply_state(ds),
                (Some(PortDevice::Cdrom(cd)), Some(DevState::Cdrom(cs))) => cd.apply_state(cs),
                // decode checked that the kinds match.
                _ => {}
            }
        }
        // The INTx level follows the restored registers; no MSI is re-sent (the guest saw it).
        self.level = self.ghc & GHC_IE != 0 && self.is != 0;
        if let Some(intx) = &self.intx {
            intx.set_level(self.level);
        }
        // Re-issue what was in flight when the state was saved, then whatever waited for it.
        for (port, cmds) in reissue.into_iter().enumerate() {
            for (slot, c) in cmds {
                self.start_io(port, slot, c);
            }
            self.process(port);
        }
        Ok(())
    }
}

/// Bytes per sector, for the command engine.
const SECTOR: usize = SECTOR_SIZE;
