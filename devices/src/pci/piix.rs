//! PIIX3 functions of device 1: ISA bridge (00:01.0, PIRQ routing), IDE (00:01.1, bus-master BAR)
//! and the PIIX4 power-management function (00:01.3, PMBA window) that QEMU and hvmloader pair
//! with them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::Bus;
use crate::irq::IrqSink;
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};

use super::{
    BarKind, CommandWatch, ConfigSpace, ConfigSpaceState, PciBuses, PciError, PciFunction, PciHeader,
    RegionTarget, Window, DEFAULT_SUBSYSTEM_ID, DEFAULT_SUBSYSTEM_VENDOR_ID, PCI_COMMAND, PCI_COMMAND_MASTER,
    PCI_HEADER_MULTI_FUNCTION, PCI_STATUS, PCI_STATUS_DEVSEL_MEDIUM, PCI_STATUS_FAST_BACK,
};

fn intel(device_id: u16, revision: u8, class_code: u32, header_type: u8, interrupt_pin: u8) -> PciHeader {
    PciHeader {
        vendor_id: 0x8086,
        device_id,
        revision,
        class_code,
        header_type,
        subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
        subsystem_id: DEFAULT_SUBSYSTEM_ID,
        interrupt_pin,
    }
}

// ---------------------------------------------------------------------------------------------
// ISA bridge

/// PIRQRC[A-D].
pub const PIIX_PIRQRC: u16 = 0x60;
const PIRQ_DISABLED: u8 = 0x80;

pub struct Piix3Isa {
    cs: ConfigSpace,
    irq: Arc<dyn IrqSink>,
}

impl std::fmt::Debug for Piix3Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Piix3Isa({:?})", self.cs)
    }
}

impl Piix3Isa {
    /// PIRQ routing changes go to `irq` as `set_pci_link_route`.
    pub fn new(irq: Arc<dyn IrqSink>) -> Self {
        let mut cs = ConfigSpace::new("piix3-isa", intel(0x7000, 0, 0x060100, PCI_HEADER_MULTI_FUNCTION, 0));
        cs.init_word(PCI_COMMAND, 0x0007);
        cs.init_word(PCI_STATUS, PCI_STATUS_DEVSEL_MEDIUM);
        // Power-on values of the PIIX3 registers (datasheet / QEMU piix3_reset).
        for (off, v) in [
            (0x4c, 0x4d), // IORT
            (0x4e, 0x03), // XBCS
            (0x69, 0x02), // TOM
            (0x70, 0x80), // MBIRQ0 disabled
            (0x76, 0x0c), // MBDMA0
            (0x77, 0x0c), // MBDMA1
            (0x78, 0x02), // PCSC
            (0xa0, 0x08), // SMICNTL
            (0xa8, 0x0f), // SEEC
        ] {
            cs.init_byte(off, v);
        }
        for link in 0..4 {
            cs.init_byte(PIIX_PIRQRC + link, PIRQ_DISABLED);
            // Bits 6:4 are reserved.
            cs.init_wmask(PIIX_PIRQRC + link, 0x8f);
        }
        Piix3Isa { cs, irq }
    }

    pub fn config_space(&self) -> &ConfigSpace {
        &self.cs
    }

    /// Where PIRQ `link` (0..3) routes now.
    pub fn link_route(&self, link: u8) -> Option<u8> {
        pirq_route(self.cs.byte(PIIX_PIRQRC + (link & 3) as u16))
    }
}

/// ISA IRQ a PIRQRC value routes to. Bit 7 disables; IRQ 0 (the timer) is treated as disabled
/// too, which is also what Xen's set_pci_link_route takes 0 to mean.
fn pirq_route(v: u8) -> Option<u8> {
    let irq = v & 0x0f;
    (v & PIRQ_DISABLED == 0 && irq != 0).then_some(irq)
}

impl PciFunction for Piix3Isa {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cs.read(reg)
    }

    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8) {
        let old = self.cs.write(reg, value, byte_mask);
        if reg & !3 == PIIX_PIRQRC {
            let new = self.cs.dword(PIIX_PIRQRC);
            for link in 0..4u8 {
                let (o, n) = ((old >> (8 * link)) as u8, (new >> (8 * link)) as u8);
                if pirq_route(o) != pirq_route(n) {
                    self.irq.set_pci_link_route(link, pirq_route(n));
                }
            }
        }
    }

    fn reset(&mut self) {
        self.cs.reset();
        for link in 0..4 {
            self.irq.set_pci_link_route(link, None);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IDE

/// IDETIM primary / secondary.
pub const PIIX_IDETIM_PRI: u16 = 0x40;
pub const PIIX_IDETIM_SEC: u16 = 0x42;
/// IDETIM bit 15: the channel's legacy ports decode.
pub const IDETIM_IDE_DECODE: u16 = 0x8000;
/// BAR4: SFF-8038i bus-master registers, 16 bytes of I/O.
pub const PIIX_IDE_BM_BAR: usize = 4;
pub const PIIX_IDE_BM_LEN: u64 = 16;

/// PIIX3 IDE in legacy (compatibility) mode: the 0x1F0/0x170 ports and IRQ 14/15 are fixed and
/// registered by the machine; only the bus-master BAR is relocatable.
pub struct Piix3Ide {
    cs: ConfigSpace,
}

impl std::fmt::Debug for Piix3Ide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Piix3Ide({:?})", self.cs)
    }
}

impl Piix3Ide {
    /// `bm` serves the 16-byte bus-master block (BAR4, on `buses.pio`).
    pub fn new(buses: &PciBuses, bm: RegionTarget) -> Result<Self, PciError> {
        let mut cs = ConfigSpace::new("piix3-ide", intel(0x7010, 0, 0x010180, 0, 0));
        cs.init_word(PCI_STATUS, PCI_STATUS_FAST_BACK | PCI_STATUS_DEVSEL_MEDIUM);
        // IDETIM decode enable (bit 15) set from reset: the legacy ports always decode here, and
        // Linux's ata_piix skips a channel whose enable bit is clear, which OVMF never sets
        // (SeaBIOS and hvmloader do). The rest of IDETIM stays 0 and guest-writable.
        cs.init_word(PIIX_IDETIM_PRI, IDETIM_IDE_DECODE);
        cs.init_word(PIIX_IDETIM_SEC, IDETIM_IDE_DECODE);
        cs.add_bar(PIIX_IDE_BM_BAR, BarKind::Io, PIIX_IDE_BM_LEN, bm, buses)?;
        Ok(Piix3Ide { cs })
    }

    pub fn config_space(&self) -> &ConfigSpace {
        &self.cs
    }

    /// Live view of the command register, for the IDE DMA engine (bus-master enable, bit 2).
    pub fn command_watch(&self) -> CommandWatch {
        self.cs.command_watch()
    }

    pub fn bus_master_enabled(&self) -> bool {
        self.cs.command_watch().load(Ordering::Acquire) & PCI_COMMAND_MASTER != 0
    }

    /// Where the bus-master block decodes now.
    pub fn bm_base(&self) -> Option<u16> {
        self.cs.bar_mapped(PIIX_IDE_BM_BAR).map(|b| b as u16)
    }
}

impl PciFunction for Piix3Ide {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cs.read(reg)
    }
    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8) {
        self.cs.write(reg, value, byte_mask);
    }
    fn reset(&mut self) {
        self.cs.reset();
    }
}

// ---------------------------------------------------------------------------------------------
// PIIX4 PM

pub const PIIX4_PMBA: u16 = 0x40;
pub const PIIX4_DEVACTB: u16 = 0x58;
pub const PIIX4_PMREGMISC: u16 = 0x80;
pub const PIIX4_SMBBA: u16 = 0x90;
pub const PIIX4_SMBHSTCFG: u16 = 0xd2;
/// Size of the PM I/O block at PMBA.
pub const PIIX4_PM_IO_LEN: u64 = 64;
/// DEVACTB byte 3 bit 1: SMI on APMC writes. Preset so SeaBIOS believes SMM is set up already.
const DEVACTB_APMC_EN: u8 = 0x02;

/// PIIX4 power management function. The PM registers themselves (PM1, PM timer) belong to the
/// device in `pm_io`; this function only places that 64-byte block at PMBA while PMREGMISC.PMIOSE
/// is set. Like QEMU (and the PIIX4 datasheet), PCICMD.IOSE does not gate it: SeaBIOS and
/// hvmloader never set IOSE on this function.
pub struct Piix4Pm {
    cs: ConfigSpace,
    window: Window,
}

impl std::fmt::Debug for Piix4Pm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Piix4Pm({:?}, {:?})", self.cs, self.window)
    }
}

impl Piix4Pm {
    pub fn new(pio: Arc<Bus>, pm_io: RegionTarget) -> Self {
        let mut cs = ConfigSpace::new("piix4-pm", intel(0x7113, 3, 0x068000, 0, 1));
        // PMBA: bits 15:6 base, bit 0 hard-wired 1 (I/O space indicator).
        cs.init_dword(PIIX4_PMBA, 0x1);
        cs.init_wmask_dword(PIIX4_PMBA, 0x0000_ffc0);
        cs.init_byte(PIIX4_DEVACTB + 3, DEVACTB_APMC_EN);
        cs.init_wmask(PIIX4_PMREGMISC, 0x01);
        // SMBBA: bits 15:4, bit 0 hard-wired 1. SMBus itself is not emulated (stored only).
        cs.init_dword(PIIX4_SMBBA, 0x1);
        cs.init_wmask_dword(PIIX4_SMBBA, 0x0000_fff0);
        Piix4Pm { cs, window: Window::new("piix4-pm-io", pio, pm_io, PIIX4_PM_IO_LEN) }
    }

    pub fn config_space(&self) -> &ConfigSpace {
        &self.cs
    }

    /// The PM I/O base the guest enabled (PMBA with PMIOSE set), for the FADT.
    pub fn pm_base(&self) -> Option<u16> {
        let base = self.cs.word(PIIX4_PMBA) & 0xffc0;
        let enabled = self.cs.byte(PIIX4_PMREGMISC) & 1 != 0;
        (enabled && base != 0).then_some(base)
    }

    /// Where the PM block is actually mapped (differs from [`Self::pm_base`] only on overlap).
    pub fn pm_mapped(&self) -> Option<u16> {
        self.window.mapped().map(|b| b as u16)
    }

    fn update_window(&mut self) {
        let want = self.pm_base().map(u64::from);
        self.window.set(want);
    }
}

impl PciFunction for Piix4Pm {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cs.read(reg)
    }

    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8) {
        self.cs.write(reg, value, byte_mask);
        if matches!(reg & !3, PIIX4_PMBA | PIIX4_PMREGMISC) {
            self.update_window();
        }
    }

    fn reset(&mut self) {
        self.cs.reset();
        self.window.unmap();
    }
}

// ---------------------------------------------------------------------------------------------
// Save/restore: each function's section is its config space (version 1); restoring repeats the
// side effects of the guest writes that produced it.

fn decode_cs(
    cs: &ConfigSpace,
    version: u32,
    r: &mut SectionReader<'_>,
) -> Result<PendingState, SnapshotError> {
    check_version(r, version, 1)?;
    Ok(PendingState::new(cs.decode_state(r)?))
}

/// Section "piix3-isa". Restore reports all four PIRQ routes to the interrupt sink.
impl Snapshot for Piix3Isa {
    fn section(&self) -> &'static str {
        "piix3-isa"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        self.cs.save_state(w);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        decode_cs(&self.cs, version, r)
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: ConfigSpaceState = state.downcast(self.cs.name())?;
        self.cs.apply_state(&st);
        for link in 0..4u8 {
            self.irq.set_pci_link_route(link, self.link_route(link));
        }
        Ok(())
    }
}

/// Section "piix3-ide". Restore maps the bus-master BAR where the saved registers place it and
/// updates the command mirror the DMA engine reads. (The IDE device state is [`IdeController`]'s
/// own section.)
///
/// [`IdeController`]: crate::storage::IdeController
impl Snapshot for Piix3Ide {
    fn section(&self) -> &'static str {
        "piix3-ide"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        self.cs.save_state(w);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        decode_cs(&self.cs, version, r)
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: ConfigSpaceState = state.downcast(self.cs.name())?;
        self.cs.apply_state(&st);
        Ok(())
    }
}

/// Section "piix4-pm". Restore maps the PM I/O block at the saved PMBA if PMIOSE is set. (The PM
/// registers are the "pm-io" section of [`crate::chipset::Piix4Pm`].)
impl Snapshot for Piix4Pm {
    fn section(&self) -> &'static str {
        "piix4-pm"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        self.cs.save_state(w);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        decode_cs(&self.cs, version, r)
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: ConfigSpaceState = state.downcast(self.cs.name())?;
        self.cs.apply_state(&st);
        self.update_window();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{AccessRules, BusDevice, IoResult, RegionId};
    use crate::irq::{IrqEvent, RecordingIrqSink};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Probe(Vec<(RegionId, u64)>);
    impl BusDevice for Probe {
        fn read(&mut self, r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
            data.fill(0);
            self.0.push((r, offset));
            IoResult::Done
        }
        fn write(&mut self, r: RegionId, offset: u64, _data: &[u8]) -> IoResult {
            self.0.push((r, offset));
            IoResult::Done
        }
    }

    #[test]
    fn isa_ids_and_defaults() {
        let mut isa = Piix3Isa::new(Arc::new(RecordingIrqSink::default()));
        assert_eq!(isa.config_read(0), 0x7000_8086);
        assert_eq!(isa.config_read(8) >> 8, 0x060100);
        assert_eq!(isa.config_read(0xc) >> 16 & 0xff, 0x80);
        assert_eq!(isa.config_read(0x60), 0x8080_8080);
        assert_eq!(isa.config_read(0x4c), 0x0003_004d);
    }

    #[test]
    fn pirq_routing_reports_changes_only() {
        let sink = Arc::new(RecordingIrqSink::default());
        let mut isa = Piix3Isa::new(sink.clone());
        // SeaBIOS: 10, 10, 11, 11 in one dword.
        isa.config_write(0x60, 0x0b0b_0a0a, 0xf);
        assert_eq!(
            sink.take(),
            vec![
                IrqEvent::Route(0, Some(10)),
                IrqEvent::Route(1, Some(10)),
                IrqEvent::Route(2, Some(11)),
                IrqEvent::Route(3, Some(11))
            ]
        );
        // Byte write to PIRQC only; same value again reports nothing.
        isa.config_write(0x60, 0x0005_0000, 0x4);
        isa.config_write(0x60, 0x0005_0000, 0x4);
        assert_eq!(sink.take(), vec![IrqEvent::Route(2, Some(5))]);
        // Disable bit, IRQ 0, reserved bits.
        isa.config_write(0x60, 0x0000_008a, 0x1);
        isa.config_write(0x60, 0x0000_0000, 0x2);
        isa.config_write(0x60, 0x7e00_0000, 0x8);
        assert_eq!(
            sink.take(),
            vec![IrqEvent::Route(0, None), IrqEvent::Route(1, None), IrqEvent::Route(3, Some(14))]
        );
        assert_eq!(isa.config_read(0x60) >> 24, 0x0e);
        assert_eq!(isa.link_route(3), Some(14));
        isa.reset();
        assert_eq!(sink.take().len(), 4);
        assert_eq!(isa.config_read(0x60), 0x8080_8080);
        // Other registers are stored harmlessly.
        isa.config_write(0x4c, 0x0102_0304, 0xf);
        assert_eq!(isa.config_read(0x4c), 0x0102_0304);
        assert!(sink.take().is_empty());
    }

    fn buses() -> PciBuses {
        PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) }
    }

    #[test]
    fn ide_bm_bar_and_idetim() {
        let b = buses();
        let probe = Arc::new(Mutex::new(Probe::default()));
        let t = RegionTarget::new(probe.clone(), 7, AccessRules::DWORD_ANY);
        let mut ide = Piix3Ide::new(&b, t).unwrap();
        assert_eq!(ide.config_read(0), 0x7010_8086);
        assert_eq!(ide.config_read(8) >> 8, 0x010180);
        assert_eq!(ide.config_read(0x20), 1);
        // Both channels decode from reset (bytes 0x41/0x43 = 0x80), as Linux's ata_piix requires.
        assert_eq!(ide.config_read(0x40), 0x8000_8000);
        ide.config_write(0x40, 0, 0xf);
        assert_eq!(ide.config_read(0x40), 0);
        ide.reset();
        assert_eq!(ide.config_read(0x40), 0x8000_8000);
        ide.config_write(0x20, u32::MAX, 0xf);
        assert_eq!(ide.config_read(0x20), 0xffff_fff1);
        ide.config_write(0x20, 0xc000, 0xf);
        ide.config_write(0x40, 0x8000_8000, 0xf); // hvmloader: IDETIM decode enable, both channels
        assert_eq!(ide.config_read(0x40), 0x8000_8000);
        assert_eq!(ide.bm_base(), None);
        ide.config_write(4, 0x5, 0x3);
        assert!(ide.bus_master_enabled());
        assert_eq!(ide.bm_base(), Some(0xc000));
        b.pio.write_sync(0xc00a, &[1]);
        assert_eq!(probe.lock().unwrap().0, vec![(7, 0xa)]);
        ide.reset();
        assert_eq!(ide.bm_base(), None);
        assert!(!ide.bus_master_enabled());
        assert!(!b.pio.is_claimed(0xc000));
    }

    fn pm() -> (Piix4Pm, Arc<Bus>, Arc<Mutex<Probe>>) {
        let pio = Arc::new(Bus::new("pio"));
        let probe = Arc::new(Mutex::new(Probe::default()));
        let t = RegionTarget::new(probe.clone(), 3, AccessRules::DWORD_ANY);
        (Piix4Pm::new(pio.clone(), t), pio, probe)
    }

    #[test]
    fn pm_ids_and_defaults() {
        let (mut pm, _, _) = pm();
        assert_eq!(pm.config_read(0), 0x7113_8086);
        assert_eq!(pm.config_read(8), 0x0680_0003);
        assert_eq!(pm.config_read(0x3c) >> 8 & 0xff, 1);
        assert_eq!(pm.config_read(0x40), 1);
        assert_eq!(pm.config_read(0x58) >> 24, 0x02);
        assert_eq!(pm.config_read(0x90), 1);
        assert_eq!(pm.pm_base(), None);
    }

    #[test]
    fn pm_seabios_sequence_and_remap() {
        let (mut pm, pio, probe) = pm();
        pm.config_write(0x40, 0x601, 0xf);
        assert_eq!(pm.config_read(0x40), 0x601);
        assert_eq!(pm.pm_base(), None, "not enabled yet");
        assert!(!pio.is_claimed(0x600));
        pm.config_write(0x80, 1, 0x1);
        assert_eq!(pm.pm_base(), Some(0x600));
        pio.write_sync(0x604, &[1, 0]);
        assert_eq!(probe.lock().unwrap().0, vec![(3, 4)]);
        // Remap.
        pm.config_write(0x40, 0xb001, 0x3);
        assert_eq!(pm.pm_mapped(), Some(0xb000));
        assert!(!pio.is_claimed(0x600));
        assert!(pio.is_claimed(0xb03f));
        assert!(!pio.is_claimed(0xb040));
        // Low bits are read-only; bit 0 stays 1.
        pm.config_write(0x40, 0xffff_fffe, 0xf);
        assert_eq!(pm.config_read(0x40), 0xffc1);
        // Disable.
        pm.config_write(0x80, 0, 0x1);
        assert_eq!(pm.pm_mapped(), None);
        assert!(!pio.is_claimed(0xffc0));
        // Base 0 is not sane: never mapped.
        pm.config_write(0x40, 0, 0xf);
        pm.config_write(0x80, 1, 0x1);
        assert_eq!(pm.pm_mapped(), None);
        pm.config_write(0x40, 0xb000, 0x3);
        assert_eq!(pm.pm_mapped(), Some(0xb000));
        pm.reset();
        assert_eq!(pm.pm_mapped(), None);
        assert!(!pio.is_claimed(0xb000));
        assert_eq!(pm.config_read(0x80), 0);
    }

    #[test]
    fn pm_ovmf_sequence_with_iose() {
        let (mut pm, pio, _) = pm();
        pm.config_write(0x40, 0xb000, 0xf);
        pm.config_write(0x04, 0x1, 0x3);
        assert_eq!(pm.pm_mapped(), None, "IOSE alone does not enable PM I/O");
        pm.config_write(0x80, 0x1, 0x1);
        assert_eq!(pm.pm_base(), Some(0xb000));
        assert!(pio.is_claimed(0xb008));
        // SMBus registers are stored.
        pm.config_write(0x90, 0xb101, 0xf);
        pm.config_write(0xd0, 0x0009_0000, 0x4);
        assert_eq!(pm.config_read(0x90), 0xb101);
        assert_eq!(pm.config_read(0xd0) >> 16 & 0xff, 0x09);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::{AccessRules, BusDevice, IoResult, RegionId};
    use crate::irq::{IrqEvent, RecordingIrqSink};
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};
    use crate::snapshot::SnapshotError;
    use std::sync::Mutex;

    struct Nop;
    impl BusDevice for Nop {
        fn read(&mut self, _r: RegionId, _o: u64, data: &mut [u8]) -> IoResult {
            data.fill(0x11);
            IoResult::Done
        }
        fn write(&mut self, _r: RegionId, _o: u64, _d: &[u8]) -> IoResult {
            IoResult::Done
        }
    }

    fn buses() -> PciBuses {
        PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) }
    }
    fn target() -> RegionTarget {
        RegionTarget::new(Arc::new(Mutex::new(Nop)), 0, AccessRules::BYTES)
    }

    #[test]
    fn isa_routes_reported_on_restore() {
        let mut a = Piix3Isa::new(Arc::new(RecordingIrqSink::default()));
        a.config_write(PIIX_PIRQRC, 0x800b_0a05, 0xf);
        let blob = payload(&a);
        let sink = Arc::new(RecordingIrqSink::default());
        let mut b = Piix3Isa::new(sink.clone());
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        assert_eq!(
            sink.take(),
            vec![
                IrqEvent::Route(0, Some(5)),
                IrqEvent::Route(1, Some(10)),
                IrqEvent::Route(2, Some(11)),
                IrqEvent::Route(3, None)
            ]
        );
        assert_eq!(b.config_read(PIIX_PIRQRC), 0x800b_0a05);
        // Reserved PIRQRC bits 6:4 can never be set by a guest.
        let mut bad = blob.clone();
        bad[PIIX_PIRQRC as usize] |= 0x10;
        assert!(matches!(load(&mut b, &bad), Err(SnapshotError::BadValue { .. })));
        assert!(sink.take().is_empty());
    }

    #[test]
    fn ide_bus_master_bar_remapped() {
        let ba = buses();
        let mut a = Piix3Ide::new(&ba, target()).unwrap();
        a.config_write(0x20, 0xc041, 0xf);
        a.config_write(PCI_COMMAND, 0x5, 0x3);
        assert_eq!(a.bm_base(), Some(0xc040));
        let blob = payload(&a);

        let bb = buses();
        let mut b = Piix3Ide::new(&bb, target()).unwrap();
        let watch = b.command_watch();
        load(&mut b, &blob).unwrap();
        assert_eq!(b.bm_base(), Some(0xc040));
        assert!(bb.pio.is_claimed(0xc040) && bb.pio.is_claimed(0xc04f));
        assert!(b.bus_master_enabled());
        assert_eq!(watch.load(Ordering::Acquire), 0x5);
        let mut d = [0u8];
        bb.pio.read_sync(0xc042, &mut d);
        assert_eq!(d[0], 0x11);
        // The I/O-space indicator bit of the BAR is hard-wired.
        let mut bad = blob.clone();
        bad[0x20] &= !1;
        assert!(load(&mut Piix3Ide::new(&buses(), target()).unwrap(), &bad).is_err());
    }

    #[test]
    fn pm_block_mapped_at_saved_pmba() {
        let pa = Arc::new(Bus::new("pio"));
        let mut a = Piix4Pm::new(pa, target());
        a.config_write(PIIX4_PMBA, 0xb001, 0xf);
        a.config_write(PIIX4_PMREGMISC, 1, 0x1);
        let blob = payload(&a);
        let pb = Arc::new(Bus::new("pio"));
        let mut b = Piix4Pm::new(pb.clone(), target());
        // Already mapped elsewhere: restore moves it.
        b.config_write(PIIX4_PMBA, 0x0601, 0xf);
        b.config_write(PIIX4_PMREGMISC, 1, 0x1);
        assert!(pb.is_claimed(0x600));
        load(&mut b, &blob).unwrap();
        assert_eq!(b.pm_base(), Some(0xb000));
        assert_eq!(b.pm_mapped(), Some(0xb000));
        assert!(pb.is_claimed(0xb03f) && !pb.is_claimed(0x600));
        // A fresh function without PMIOSE saved stays unmapped.
        let c = Piix4Pm::new(Arc::new(Bus::new("pio")), target());
        load(&mut b, &payload(&c)).unwrap();
        assert_eq!(b.pm_mapped(), None);
        assert!(!pb.is_claimed(0xb000));
    }
}
