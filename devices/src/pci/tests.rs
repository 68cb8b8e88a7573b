//! Whole-chipset tests through the 0xCF8/0xCFC ports on a real PIO bus.

use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::Bus;
use crate::irq::{IrqEvent, RecordingIrqSink};
use crate::platform::{PamAttr, RecordingPlatform};

/// Records accesses; reads return 0x11.
#[derive(Default)]
struct Probe(Vec<(RegionId, char, u64, usize)>);
impl BusDevice for Probe {
    fn read(&mut self, r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        data.fill(0x11);
        self.0.push((r, 'r', offset, data.len()));
        IoResult::Done
    }
    fn write(&mut self, r: RegionId, offset: u64, data: &[u8]) -> IoResult {
        self.0.push((r, 'w', offset, data.len()));
        IoResult::Done
    }
}

struct Pc {
    pio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
    platform: Arc<RecordingPlatform>,
    irq: Arc<RecordingIrqSink>,
    pm: Arc<Mutex<Piix4Pm>>,
    pm_dev: Arc<Mutex<Probe>>,
    ide_dev: Arc<Mutex<Probe>>,
}

impl Pc {
    fn new() -> Pc {
        let buses = PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) };
        let platform = Arc::new(RecordingPlatform::default());
        let irq = Arc::new(RecordingIrqSink::default());
        let pm_dev = Arc::new(Mutex::new(Probe::default()));
        let ide_dev = Arc::new(Mutex::new(Probe::default()));
        let pm = Arc::new(Mutex::new(Piix4Pm::new(
            buses.pio.clone(),
            RegionTarget::new(pm_dev.clone(), 0, AccessRules::DWORD_ANY),
        )));
        let ide =
            Piix3Ide::new(&buses, RegionTarget::new(ide_dev.clone(), 2, AccessRules::DWORD_ANY)).unwrap();
        let mut root = PciRoot::new();
        root.add(DEVFN_HOST_BRIDGE, Arc::new(Mutex::new(I440fxHostBridge::new(platform.clone())))).unwrap();
        root.add(DEVFN_PIIX3_ISA, Arc::new(Mutex::new(Piix3Isa::new(irq.clone())))).unwrap();
        root.add(DEVFN_PIIX3_IDE, Arc::new(Mutex::new(ide))).unwrap();
        root.add(DEVFN_PIIX4_PM, pm.clone()).unwrap();
        let root = Arc::new(Mutex::new(root));
        let cfg = Arc::new(Mutex::new(PciConfigIo::new(root.clone(), platform.clone())));
        buses
            .pio
            .insert(PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, PciConfigIo::RULES, cfg, PciConfigIo::REGION)
            .unwrap();
        Pc { pio: buses.pio, root, platform, irq, pm, pm_dev, ide_dev }
    }

    fn inb(&self, port: u64) -> u8 {
        let mut d = [0u8; 1];
        self.pio.read_sync(port, &mut d);
        d[0]
    }
    fn inw(&self, port: u64) -> u16 {
        let mut d = [0u8; 2];
        self.pio.read_sync(port, &mut d);
        u16::from_le_bytes(d)
    }
    fn inl(&self, port: u64) -> u32 {
        let mut d = [0u8; 4];
        self.pio.read_sync(port, &mut d);
        u32::from_le_bytes(d)
    }
    fn outb(&self, port: u64, v: u8) {
        self.pio.write_sync(port, &[v]);
    }
    fn outw(&self, port: u64, v: u16) {
        self.pio.write_sync(port, &v.to_le_bytes());
    }
    fn outl(&self, port: u64, v: u32) {
        self.pio.write_sync(port, &v.to_le_bytes());
    }
    fn addr(&self, devfn: u8, reg: u8) {
        self.outl(0xcf8, 0x8000_0000 | (devfn as u32) << 8 | reg as u32);
    }
    /// hvmloader-style accessors (pci_readl etc. in hvmloader/pci.c use port 0xcfc + (reg & 3)).
    fn cfg_readl(&self, devfn: u8, reg: u8) -> u32 {
        self.addr(devfn, reg & !3);
        self.inl(0xcfc)
    }
    fn cfg_readw(&self, devfn: u8, reg: u8) -> u16 {
        self.addr(devfn, reg & !3);
        self.inw(0xcfc + (reg & 2) as u64)
    }
    fn cfg_writel(&self, devfn: u8, reg: u8, v: u32) {
        self.addr(devfn, reg & !3);
        self.outl(0xcfc, v);
    }
    fn cfg_writew(&self, devfn: u8, reg: u8, v: u16) {
        self.addr(devfn, reg & !3);
        self.outw(0xcfc + (reg & 2) as u64, v);
    }
    fn cfg_writeb(&self, devfn: u8, reg: u8, v: u8) {
        self.addr(devfn, reg & !3);
        self.outb(0xcfc + (reg & 3) as u64, v);
    }
}

#[test]
fn config_data_byte_word_dword() {
    let pc = Pc::new();
    pc.addr(DEVFN_HOST_BRIDGE, 0);
    assert_eq!(pc.inl(0xcfc), 0x1237_8086);
    assert_eq!(pc.inw(0xcfc), 0x8086);
    assert_eq!(pc.inw(0xcfe), 0x1237);
    assert_eq!([pc.inb(0xcfc), pc.inb(0xcfd), pc.inb(0xcfe), pc.inb(0xcff)], [0x86, 0x80, 0x37, 0x12]);
    // Writes of each width land on the right bytes (PIRQRC of the ISA bridge).
    pc.addr(DEVFN_PIIX3_ISA, 0x60);
    pc.outb(0xcfe, 0x0b);
    assert_eq!(pc.inl(0xcfc), 0x800b_8080);
    pc.outw(0xcfc, 0x0a05);
    assert_eq!(pc.inl(0xcfc), 0x800b_0a05);
    pc.outb(0xcff, 0x0e);
    pc.outl(0xcfc, 0x0b0b_0a0a);
    assert_eq!(pc.inl(0xcfc), 0x0b0b_0a0a);
    assert_eq!(pc.inw(0xcfe), 0x0b0b);
    // Unaligned word at 0xcfd is rejected by the bus rules (no write lands).
    pc.outw(0xcfd, 0xffff);
    assert_eq!(pc.inl(0xcfc), 0x0b0b_0a0a);
    let ev = pc.irq.take();
    assert_eq!(ev.first(), Some(&IrqEvent::Route(2, Some(11))));
    assert_eq!(ev.last(), Some(&IrqEvent::Route(3, Some(11))));
}

#[test]
fn absent_functions_and_other_buses_read_all_ones() {
    let pc = Pc::new();
    pc.addr(devfn(5, 0), 0);
    assert_eq!(pc.inl(0xcfc), u32::MAX);
    assert_eq!(pc.inw(0xcfe), 0xffff);
    assert_eq!(pc.inb(0xcfd), 0xff);
    pc.outl(0xcfc, 0); // dropped, no panic
    pc.addr(devfn(1, 2), 0); // function 2 of device 1 does not exist
    assert_eq!(pc.inl(0xcfc), u32::MAX);
    pc.outl(0xcf8, 0x8001_0000); // bus 1, 00.0
    assert_eq!(pc.inl(0xcfc), u32::MAX);
    pc.outl(0xcfc, 0x3333_3333);
    assert!(pc.platform.pam.lock().unwrap().is_empty());
}

#[test]
fn config_address_disabled_and_readback() {
    let pc = Pc::new();
    pc.outl(0xcf8, 0x0000_0058); // 00:00.0 reg 0x58 without the enable bit
    assert_eq!(pc.inl(0xcfc), u32::MAX);
    pc.outl(0xcfc, 0x3333_3300);
    assert!(pc.platform.pam.lock().unwrap().is_empty(), "write with CONFIG_ADDRESS disabled dropped");
    // Reserved bits read 0 (Linux's pci_check_type1 reads back 0x80000000).
    pc.outl(0xcf8, 0xffff_ffff);
    assert_eq!(pc.inl(0xcf8), 0x80ff_fffc);
    pc.outl(0xcf8, 0x8000_0000);
    assert_eq!(pc.inl(0xcf8), 0x8000_0000);
    // Type-2 probe byte write to 0xcfb does not touch CONFIG_ADDRESS.
    pc.outb(0xcfb, 0x01);
    pc.outb(0xcf8, 0x00);
    assert_eq!(pc.inl(0xcf8), 0x8000_0000);
    assert_eq!(pc.inb(0xcf8), 0xff);
    assert_eq!(pc.inw(0xcf8), 0xffff);
}

#[test]
fn cf9_byte_is_reset_control_cf8_dword_is_address() {
    let pc = Pc::new();
    pc.outl(0xcf8, 0x8000_0004);
    assert!(pc.platform.events.lock().unwrap().is_empty(), "dword at 0xcf8 with bit 10 set: no reset");
    assert_eq!(pc.inb(0xcf9), 0);
    pc.outb(0xcf9, 0x02);
    assert_eq!(pc.inb(0xcf9), 0x02);
    assert!(pc.platform.events.lock().unwrap().is_empty());
    assert_eq!(pc.inl(0xcf8), 0x8000_0004, "RCR write leaves CONFIG_ADDRESS alone");
    pc.outb(0xcf9, 0x06);
    assert_eq!(*pc.platform.events.lock().unwrap(), vec![SystemEvent::Reset]);
    // Only bit 1 is stored.
    pc.outb(0xcf9, 0xf9);
    assert_eq!(pc.inb(0xcf9), 0x00);
    // A dword whose byte 1 has bit 2 set is CONFIG_ADDRESS, not a reset.
    pc.outl(0xcf8, 0x8000_0400);
    assert_eq!(pc.platform.events.lock().unwrap().len(), 1);
    assert_eq!(pc.inl(0xcf8), 0x8000_0400);
}

#[test]
fn hvmloader_sequence() {
    let pc = Pc::new();
    // The IDs hvmloader asserts on.
    assert_eq!(pc.cfg_readw(DEVFN_PIIX3_ISA, 0), 0x8086);
    assert_eq!(pc.cfg_readw(DEVFN_PIIX3_ISA, 2), 0x7000);
    let mut pm_found = 0;
    for df in 0..=255u8 {
        let id = pc.cfg_readl(df, 0);
        if id == u32::MAX {
            continue;
        }
        let class = pc.cfg_readw(df, 0x0a);
        if class == 0x0680 {
            assert_eq!(id, 0x7113_8086);
            pm_found += 1;
        }
        if class == 0x0101 {
            assert_eq!(id, 0x7010_8086);
        }
    }
    assert_eq!(pm_found, 1);
    // Function 0 of device 1 advertises multi-function so function 1/3 get scanned.
    assert_eq!(pc.cfg_readl(DEVFN_PIIX3_ISA, 0x0c) >> 16 & 0x80, 0x80);
    // PIRQ routing, one byte at a time (hvmloader: 5, 10, 11, 5 from mask 0x0c20).
    for (link, irq) in [(0u8, 5u8), (1, 10), (2, 11), (3, 5)] {
        pc.cfg_writeb(DEVFN_PIIX3_ISA, 0x60 + link, irq);
    }
    assert_eq!(
        pc.irq.take(),
        vec![
            IrqEvent::Route(0, Some(5)),
            IrqEvent::Route(1, Some(10)),
            IrqEvent::Route(2, Some(11)),
            IrqEvent::Route(3, Some(5))
        ]
    );
    // PM: SMBus off, SCI line, PM base, PM I/O enable.
    pc.cfg_writeb(DEVFN_PIIX4_PM, 0xd2, 0x00);
    pc.cfg_writeb(DEVFN_PIIX4_PM, 0x3c, 9);
    pc.cfg_writel(DEVFN_PIIX4_PM, 0x40, 0xb001);
    pc.cfg_writeb(DEVFN_PIIX4_PM, 0x80, 0x01);
    assert_eq!(pc.pm.lock().unwrap().pm_base(), Some(0xb000));
    assert_eq!(pc.inw(0xb004), 0x1111);
    pc.outw(0xb004, 0x0001);
    assert_eq!(pc.pm_dev.lock().unwrap().0, vec![(0, 'r', 4, 2), (0, 'w', 4, 2)]);
    // IDE: IDETIM decode enable, then BAR sizing and assignment of BAR4, command IO + master.
    pc.cfg_writew(DEVFN_PIIX3_IDE, 0x40, 0x8000);
    pc.cfg_writew(DEVFN_PIIX3_IDE, 0x42, 0x8000);
    assert_eq!(pc.cfg_readl(DEVFN_PIIX3_IDE, 0x40), 0x8000_8000);
    pc.cfg_writel(DEVFN_PIIX3_IDE, 0x20, u32::MAX);
    assert_eq!(pc.cfg_readl(DEVFN_PIIX3_IDE, 0x20), 0xffff_fff1);
    pc.cfg_writel(DEVFN_PIIX3_IDE, 0x20, 0xc001);
    assert!(!pc.pio.is_claimed(0xc000));
    pc.cfg_writew(DEVFN_PIIX3_IDE, 0x04, 0x0005);
    pc.outb(0xc002, 0x04);
    assert_eq!(pc.ide_dev.lock().unwrap().0, vec![(2, 'w', 2, 1)]);
    // Reboot: PAM reported, PM and BAR unmapped, routes cleared.
    pc.root.lock().unwrap().reset();
    assert!(!pc.pio.is_claimed(0xb004));
    assert!(!pc.pio.is_claimed(0xc000));
    let pam = pc.platform.pam.lock().unwrap().clone();
    assert_eq!(pam.len(), 13);
    assert!(pam.iter().all(|(_, a)| *a == PamAttr::default()));
    assert_eq!(pc.irq.take().len(), 4);
}

#[test]
fn root_direct_access_for_xen_pci_config() {
    let pc = Pc::new();
    let root = pc.root.lock().unwrap();
    assert_eq!(root.devfns(), vec![0x00, 0x08, 0x09, 0x0b]);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x0a, 2), 0x0680);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x08, 1), 0x03);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x00, 4), 0x7113_8086);
    // Crossing a dword, bad sizes, beyond 0xff, other bus: all-ones of the access size.
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x03, 2), 0xffff);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x00, 3), 0xff_ffff);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x100, 4), u32::MAX);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0xfff, 1), 0xff);
    assert_eq!(root.config_read(2, DEVFN_PIIX4_PM, 0, 4), u32::MAX);
    root.config_write(0, DEVFN_PIIX4_PM, 0x41, 1, 0xffff_ffb0); // upper junk ignored
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x40, 4), 0xb001);
    root.config_write(0, DEVFN_PIIX4_PM, 0x3f, 2, 0); // crossing: dropped
    root.config_write(0, DEVFN_PIIX4_PM, 0x40, 8, 0);
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0x40, 4), 0xb001);
}

#[test]
fn root_add_remove() {
    let pc = Pc::new();
    let mut root = pc.root.lock().unwrap();
    let dup = Arc::new(Mutex::new(Piix3Isa::new(pc.irq.clone())));
    assert_eq!(root.add(DEVFN_PIIX3_ISA, dup), Err(PciError::DevfnInUse(0x08)));
    root.config_write(0, DEVFN_PIIX4_PM, 0x40, 4, 0xb000);
    root.config_write(0, DEVFN_PIIX4_PM, 0x80, 1, 1);
    assert!(pc.pio.is_claimed(0xb000));
    assert!(root.remove(DEVFN_PIIX4_PM).is_some());
    assert!(!pc.pio.is_claimed(0xb000), "removed function stops decoding");
    assert_eq!(root.config_read(0, DEVFN_PIIX4_PM, 0, 4), u32::MAX);
    assert!(root.remove(DEVFN_PIIX4_PM).is_none());
}

#[test]
fn config_io_reset_clears_latches() {
    let root = Arc::new(Mutex::new(PciRoot::new()));
    let mut io = PciConfigIo::new(root, Arc::new(RecordingPlatform::default()));
    io.write(0, 0, &0x8000_0010u32.to_le_bytes());
    io.write(0, 1, &[0x02]);
    io.reset();
    assert_eq!(io.config_address(), 0);
    let mut d = [0u8; 1];
    io.read(0, 1, &mut d);
    assert_eq!(d, [0]);
}

#[test]
fn config_io_latch_roundtrip() {
    use crate::snapshot::testing::{load, payload};
    let root = Arc::new(Mutex::new(PciRoot::new()));
    let p = Arc::new(RecordingPlatform::default());
    let mut a = PciConfigIo::new(root.clone(), p.clone());
    a.write(0, 0, &0x8000_0810u32.to_le_bytes());
    a.write(0, 1, &[RCR_SYS_RST]);
    let blob = payload(&a);
    let mut b = PciConfigIo::new(root, p.clone());
    load(&mut b, &blob).unwrap();
    assert_eq!(b.config_address(), 0x8000_0810);
    let mut d = [0u8];
    b.read(0, 1, &mut d);
    assert_eq!(d[0], RCR_SYS_RST);
    assert!(p.events.lock().unwrap().is_empty());
    let mut bad = blob.clone();
    bad[0] = 0x13; // low address bits do not exist
    assert!(load(&mut b, &bad).is_err());
    let mut bad = blob;
    bad[4] = RCR_RST_CPU;
    assert!(load(&mut b, &bad).is_err());
    assert_eq!(b.config_address(), 0x8000_0810);
}
