use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::Bus;
use crate::irq::{IrqEvent, RecordingIrqSink};
use crate::mem::TestRam;
use crate::pci::{PciBuses, PciFunction, PciIntx, PciMsi, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use crate::snapshot::testing::{assert_prefixes_fail, load, payload};
use crate::storage::ata::cmd as ata;
use crate::storage::image::MemImage;

const RAM: usize = 0x40_0000;
const CLB: u64 = 0x1000;
const FB: u64 = 0x2000;
const CT: u64 = 0x8000;
const BUF: u64 = 0x10_0000;
const DISK_SECTORS: usize = 2048;

struct Rig {
    mem: Arc<TestRam>,
    ctrl: Arc<Mutex<AhciController>>,
    img: Arc<MemImage>,
    sink: Arc<RecordingIrqSink>,
    cmdw: CommandWatch,
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 512) as u8).collect()
}

impl Rig {
    /// A controller with a disk on port 0 and INTx/MSI wired to a recording sink (slot 3).
    fn new() -> Self {
        Self::with(|c, img| c.attach_disk(0, img).unwrap())
    }
    /// A controller whose port 0 gets what `attach` puts there (`img` is the disk pattern).
    fn with(attach: impl FnOnce(&mut AhciController, Arc<MemImage>)) -> Self {
        let mem = Arc::new(TestRam::new(RAM));
        let img = Arc::new(MemImage::new(pattern(DISK_SECTORS * 512), false));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut ctrl = AhciController::new(mem.clone());
        let cmdw: CommandWatch = Arc::new(std::sync::atomic::AtomicU16::new(PCI_COMMAND_MASTER));
        ctrl.connect_pci(PciIntx::new(sink.clone(), 3, 0), PciMsi::new(sink.clone()), cmdw.clone());
        attach(&mut ctrl, img.clone());
        let ctrl = Arc::new(Mutex::new(ctrl));
        AhciController::enable_async(&ctrl);
        Rig { mem, ctrl, img, sink, cmdw }
    }
    /// The controller, locked (do not hold it across the register helpers: they drain).
    fn c(&self) -> std::sync::MutexGuard<'_, AhciController> {
        self.ctrl.lock().unwrap()
    }
    /// Waits for the I/O engines: the register helpers call it around every access, so tests
    /// written against synchronous execution see each command's completion at once.
    fn drain(&self) {
        AhciController::drain(&self.ctrl);
    }
    fn w(&mut self, off: u64, v: u32) {
        self.c().write(REGION_ABAR, off, &v.to_le_bytes());
        self.drain();
    }
    fn r(&mut self, off: u64) -> u32 {
        self.drain();
        self.raw_r(off)
    }
    /// A register read without waiting for anything.
    fn raw_r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.c().read(REGION_ABAR, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn pw(&mut self, port: u64, reg: u64, v: u32) {
        self.w(0x100 + port * 0x80 + reg, v);
    }
    fn pr(&mut self, port: u64, reg: u64) -> u32 {
        self.r(0x100 + port * 0x80 + reg)
    }
    /// What SeaBIOS/Linux do: lists, FIS receive, spin-up, interrupts on, start.
    fn start(&mut self, port: u64) {
        let off = port * 0x10000;
        self.pw(port, PX_CLB, (CLB + off) as u32);
        self.pw(port, PX_FB, (FB + off) as u32);
        self.pw(port, PX_CMD, pxcmd::FRE);
        self.pw(port, PX_CMD, pxcmd::FRE | pxcmd::SUD);
        self.pw(port, PX_IE, pxis::VALID);
        self.w(HBA_GHC, GHC_IE);
        self.pw(port, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    }
    /// Builds slot `slot` of port 0: header, command FIS, PRDT of (address, bytes, I bit).
    fn build(&self, slot: u64, fis: [u8; 20], prds: &[(u64, u32, bool)], write: bool) {
        self.build_flags(slot, fis, prds, if write { 1 << 6 } else { 0 });
    }
    /// Header flags beyond CFL 5 and PRDTL: W (bit 6), A (bit 5).
    fn build_flags(&self, slot: u64, fis: [u8; 20], prds: &[(u64, u32, bool)], extra: u32) {
        self.build_at(0, slot, fis, prds, extra);
    }
    /// [`Self::build_flags`] on any port started with [`Self::start`]; the table is at
    /// [`table`]`(port, slot)`.
    fn build_at(&self, port: u64, slot: u64, fis: [u8; 20], prds: &[(u64, u32, bool)], extra: u32) {
        let ct = table(port, slot);
        let flags = 5 | extra | (prds.len() as u32) << 16;
        let mut hdr = [0u8; 32];
        hdr[0..4].copy_from_slice(&flags.to_le_bytes());
        hdr[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        hdr[8..16].copy_from_slice(&ct.to_le_bytes());
        self.mem.write(CLB + port * 0x10000 + slot * 32, &hdr).unwrap();
        self.mem.write(ct, &fis).unwrap();
        for (i, &(a, n, ibit)) in prds.iter().enumerate() {
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&a.to_le_bytes());
            e[12..16].copy_from_slice(&((n - 1) | if ibit { 1 << 31 } else { 0 }).to_le_bytes());
            self.mem.write(ct + 0x80 + 16 * i as u64, &e).unwrap();
        }
    }
    fn issue(&mut self, slot: u64) {
        self.pw(0, PX_CI, 1 << slot);
    }
    fn prdbc(&self, slot: u64) -> u32 {
        self.mem.read_u32(CLB + slot * 32 + 4).unwrap()
    }
    fn fis(&self, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.mem.read(FB + off, &mut b).unwrap();
        b
    }
    fn guest(&self, a: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.mem.read(a, &mut b).unwrap();
        b
    }
}

/// Command table of `slot` on `port`.
fn table(port: u64, slot: u64) -> u64 {
    CT + port * 0x40000 + slot * 0x1000
}

fn h2d(command: u8, lba: u64, count: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = command;
    f[4] = lba as u8;
    f[5] = (lba >> 8) as u8;
    f[6] = (lba >> 16) as u8;
    f[7] = 0x40;
    f[8] = (lba >> 24) as u8;
    f[9] = (lba >> 32) as u8;
    f[10] = (lba >> 40) as u8;
    f[12] = count as u8;
    f[13] = (count >> 8) as u8;
    f
}

fn ncq(write: bool, tag: u8, lba: u64, count: u16) -> [u8; 20] {
    let mut f = h2d(if write { ata::WRITE_FPDMA_QUEUED } else { ata::READ_FPDMA_QUEUED }, lba, 0);
    f[3] = count as u8;
    f[11] = (count >> 8) as u8;
    f[12] = tag << 3;
    f
}

#[test]
fn hba_registers_at_power_on() {
    let mut r = Rig::new();
    let cap = r.r(HBA_CAP);
    assert_eq!(cap & 0x1f, 5, "six ports");
    assert_eq!((cap >> 8) & 0x1f, 31, "32 slots");
    assert_ne!(cap & CAP_SNCQ, 0);
    assert_ne!(cap & CAP_S64A, 0);
    assert_ne!(cap & CAP_SSS, 0);
    assert_eq!(r.r(HBA_GHC), GHC_AE);
    assert_eq!(r.r(HBA_PI), 0x3f);
    assert_eq!(r.r(HBA_VS), 0x0001_0300);
    assert_eq!(r.r(HBA_CAP2), 0);
    // Read-only registers ignore writes; AE stays set.
    r.w(HBA_CAP, 0);
    r.w(HBA_PI, 0);
    r.w(HBA_GHC, 0);
    assert_eq!((r.r(HBA_CAP), r.r(HBA_PI), r.r(HBA_GHC)), (CAP, PI, GHC_AE));
    // Ports before spin-up: no link, BSY-less "no device" TFD, no signature.
    for p in 0..6 {
        assert_eq!(r.pr(p, PX_SSTS), 0);
        assert_eq!(r.pr(p, PX_TFD), 0x7f);
        assert_eq!(r.pr(p, PX_SIG), 0xffff_ffff);
        assert_eq!(r.pr(p, PX_CMD), pxcmd::POD);
    }
    // Beyond the ports and sub-dword reads.
    assert_eq!(r.r(0x400), 0);
    assert_eq!(r.r(0xffc), 0);
    let mut b = [0u8; 1];
    r.c().read(REGION_ABAR, 1, &mut b);
    assert_eq!(b[0], 31);
}

#[test]
fn spin_up_delivers_signature_once_fis_receive_is_on() {
    let mut r = Rig::new();
    r.pw(0, PX_FB, FB as u32);
    r.pw(0, PX_CMD, pxcmd::SUD);
    assert_eq!(r.pr(0, PX_SSTS), 0x113, "link up after spin-up");
    assert_eq!(r.pr(0, PX_TFD), 0x80, "BSY until the signature FIS is received");
    assert_eq!(r.pr(0, PX_SIG), 0xffff_ffff);
    r.pw(0, PX_CMD, pxcmd::SUD | pxcmd::FRE);
    assert_eq!(r.pr(0, PX_CMD) & (pxcmd::FR | pxcmd::FRE), pxcmd::FR | pxcmd::FRE);
    assert_eq!(r.pr(0, PX_TFD), 0x150);
    assert_eq!(r.pr(0, PX_SIG), 0x101);
    let f = r.fis(cmd::RX_RFIS, 20);
    assert_eq!(&f[..4], &[0x34, 0, 0x50, 0x01]);
    assert_eq!((f[4], f[12]), (1, 1));
    assert_eq!(r.pr(0, PX_IS), 0, "signature FIS carries no I bit");
    // An empty port never links.
    r.pw(1, PX_CMD, pxcmd::SUD | pxcmd::FRE);
    assert_eq!((r.pr(1, PX_SSTS), r.pr(1, PX_TFD), r.pr(1, PX_SIG)), (0, 0x7f, 0xffff_ffff));
}

#[test]
fn comreset_through_sctl_det() {
    let mut r = Rig::new();
    r.start(0);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
    r.mem.write(FB + cmd::RX_RFIS, &[0xaa; 20]).unwrap();
    r.pw(0, PX_SCTL, 0x301);
    assert_eq!(r.pr(0, PX_SCTL), 0x301);
    assert_eq!((r.pr(0, PX_SSTS), r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0, 0x7f, 0xffff_ffff));
    r.pw(0, PX_SCTL, 0x300);
    assert_eq!((r.pr(0, PX_SSTS), r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0x113, 0x150, 0x101));
    assert_eq!(r.fis(cmd::RX_RFIS, 4), vec![0x34, 0, 0x50, 1]);
    // DET=4 takes the interface offline; back to 0 brings it up again.
    r.pw(0, PX_SCTL, 0x304);
    assert_eq!(r.pr(0, PX_SSTS), 4);
    r.pw(0, PX_SCTL, 0x300);
    assert_eq!(r.pr(0, PX_SSTS), 0x113);
    // Without FIS receive the signature waits.
    r.pw(0, PX_CMD, pxcmd::SUD);
    r.pw(0, PX_SCTL, 1);
    r.pw(0, PX_SCTL, 0);
    assert_eq!((r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0x80, 0xffff_ffff));
    r.pw(0, PX_CMD, pxcmd::SUD | pxcmd::FRE);
    assert_eq!((r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0x150, 0x101));
}

#[test]
fn port_cmd_engines_clo_and_write_one_to_clear() {
    let mut r = Rig::new();
    r.start(0);
    let c = r.pr(0, PX_CMD);
    assert_eq!(
        c & (pxcmd::ST | pxcmd::CR | pxcmd::FRE | pxcmd::FR),
        pxcmd::ST | pxcmd::CR | pxcmd::FRE | pxcmd::FR
    );
    // CR/FR and POD are read-only.
    r.pw(0, PX_CMD, pxcmd::SUD | pxcmd::CR | pxcmd::FR);
    assert_eq!(r.pr(0, PX_CMD), pxcmd::SUD | pxcmd::POD);
    // CLO clears BSY/DRQ and reads back 0.
    r.c().ports[0].regs.tfd = 0x88;
    r.pw(0, PX_CMD, pxcmd::SUD | pxcmd::CLO);
    assert_eq!(r.pr(0, PX_TFD), 0);
    assert_eq!(r.pr(0, PX_CMD) & pxcmd::CLO, 0);
    // PxIS/IS/SERR are write-1-to-clear; PxIE keeps only existing bits.
    r.c().ports[0].regs.is = pxis::DHRS | pxis::PSS | pxis::TFES;
    r.c().ports[0].regs.serr = 0x0401_0002;
    r.pw(0, PX_IS, pxis::PSS);
    assert_eq!(r.pr(0, PX_IS), pxis::DHRS | pxis::TFES);
    r.pw(0, PX_SERR, 0x0400_0000);
    assert_eq!(r.pr(0, PX_SERR), 0x0001_0002);
    r.pw(0, PX_IE, u32::MAX);
    assert_eq!(r.pr(0, PX_IE), pxis::VALID);
    // Byte write to IE touches only that byte.
    r.c().write(REGION_ABAR, 0x100 + PX_IE + 3, &[0]);
    assert_eq!(r.pr(0, PX_IE), pxis::VALID & 0x00ff_ffff);
    // CLB/FB alignment; upper halves.
    r.pw(0, PX_CLB, 0x1234_5fff);
    r.pw(0, PX_CLBU, 0x1);
    r.pw(0, PX_FB, 0x1234_5fff);
    assert_eq!((r.pr(0, PX_CLB), r.pr(0, PX_CLBU), r.pr(0, PX_FB)), (0x1234_5c00, 1, 0x1234_5f00));
    // 64-bit register access through the split (two dwords).
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&0x4000u32.to_le_bytes());
    b[4..].copy_from_slice(&0x2u32.to_le_bytes());
    r.c().write(REGION_ABAR, 0x100 + PX_CLB, &b[..4]);
    r.c().write(REGION_ABAR, 0x100 + PX_CLBU, &b[4..]);
    assert_eq!(r.c().ports[0].regs.clb, 0x2_0000_4000);
}

#[test]
fn hba_reset_and_global_interrupt_status() {
    let mut r = Rig::new();
    r.start(0);
    r.build(0, h2d(ata::FLUSH_CACHE_EXT, 0, 0), &[], false);
    r.issue(0);
    assert_eq!(r.r(HBA_IS), 1);
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    // Clearing IS alone re-latches from the still-pending PxIS; clearing PxIS first works.
    r.w(HBA_IS, 1);
    assert_eq!(r.r(HBA_IS), 1);
    r.pw(0, PX_IS, u32::MAX);
    r.w(HBA_IS, 1);
    assert_eq!(r.r(HBA_IS), 0);
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, false)]);
    r.w(HBA_GHC, GHC_HR | GHC_IE);
    assert_eq!(r.r(HBA_GHC), GHC_AE, "HR self-clears, IE cleared");
    assert_eq!(r.pr(0, PX_CMD), pxcmd::POD);
    assert_eq!((r.pr(0, PX_CLB), r.pr(0, PX_IE), r.pr(0, PX_SSTS)), (0, 0, 0));
    assert_eq!((r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0x7f, 0xffff_ffff));
}

#[test]
fn identify_through_pio_setup() {
    let mut r = Rig::new();
    r.start(0);
    r.sink.take();
    r.build(0, h2d(ata::IDENTIFY_DEVICE, 0, 0), &[(BUF, 512, false)], false);
    r.issue(0);
    assert_eq!(r.pr(0, PX_CI), 0);
    assert_eq!(r.pr(0, PX_IS), pxis::PSS);
    assert_eq!(r.pr(0, PX_TFD), 0x50);
    assert_eq!(r.prdbc(0), 512);
    let ps = r.fis(cmd::RX_PSFIS, 20);
    assert_eq!(&ps[..4], &[0x5f, 0x60, 0x58, 0]);
    assert_eq!((ps[15], u16::from_le_bytes([ps[16], ps[17]])), (0x50, 512));
    let id = r.guest(BUF, 512);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x40);
    assert_eq!(u16::from_le_bytes([id[150], id[151]]), 31, "NCQ depth 32");
    assert_ne!(u16::from_le_bytes([id[152], id[153]]) & 0x100, 0, "NCQ supported");
    assert_eq!(u16::from_le_bytes([id[200], id[201]]), DISK_SECTORS as u16);
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    // SeaBIOS's probe: IDENTIFY PACKET DEVICE on a disk aborts with DHRS + TFES.
    r.pw(0, PX_IS, u32::MAX);
    r.build(1, h2d(ata::IDENTIFY_PACKET_DEVICE, 0, 0), &[(BUF, 512, false)], false);
    r.issue(1);
    assert_eq!(r.pr(0, PX_IS), pxis::TFES | pxis::DHRS);
    assert_eq!(r.pr(0, PX_TFD), 0x451);
    assert_eq!(&r.fis(cmd::RX_RFIS, 4), &[0x34, 0x40, 0x51, 0x04]);
    assert_eq!(r.pr(0, PX_CI), 0);
    // Halted until ST is cleared (SeaBIOS's recovery), then commands run again.
    r.build(2, h2d(ata::FLUSH_CACHE, 0, 0), &[], false);
    r.issue(2);
    assert_eq!(r.pr(0, PX_CI), 4);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
    assert_eq!(r.pr(0, PX_CI), 0);
    r.pw(0, PX_IS, u32::MAX);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    r.issue(2);
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD)), (pxis::DHRS, 0x50));
}

#[test]
fn dma_ext_read_and_write_through_two_prds() {
    let mut r = Rig::new();
    r.start(0);
    // 3 sectors at LBA 5: 1024 bytes in the first entry, 512 in the second (I bit set).
    r.build(3, h2d(ata::READ_DMA_EXT, 5, 3), &[(BUF, 1024, false), (BUF + 0x4000, 512, true)], false);
    r.issue(3);
    assert_eq!(r.pr(0, PX_IS), pxis::DHRS | pxis::DPS);
    assert_eq!(r.prdbc(3), 1536);
    let want = pattern(DISK_SECTORS * 512);
    assert_eq!(r.guest(BUF, 1024), &want[5 * 512..7 * 512]);
    assert_eq!(r.guest(BUF + 0x4000, 512), &want[7 * 512..8 * 512]);
    assert_eq!(&r.fis(cmd::RX_RFIS, 4), &[0x34, 0x40, 0x50, 0]);
    // Write two sectors back to LBA 100 from two entries.
    r.mem.write(BUF + 0x8000, &[0x11; 512]).unwrap();
    r.mem.write(BUF + 0x9000, &[0x22; 512]).unwrap();
    r.build(
        4,
        h2d(ata::WRITE_DMA_EXT, 100, 2),
        &[(BUF + 0x8000, 512, false), (BUF + 0x9000, 512, false)],
        true,
    );
    r.issue(4);
    assert_eq!(r.prdbc(4), 1024);
    let img = r.img.contents();
    assert_eq!(&img[100 * 512..101 * 512], &[0x11; 512][..]);
    assert_eq!(&img[101 * 512..102 * 512], &[0x22; 512][..]);
    assert_eq!(&img[102 * 512..103 * 512], &want[102 * 512..103 * 512]);
    // FLUSH reaches the image.
    r.build(5, h2d(ata::FLUSH_CACHE_EXT, 0, 0), &[], false);
    let before = r.img.flush_count();
    r.issue(5);
    assert_eq!(r.img.flush_count(), before + 1);
    assert_eq!(r.pr(0, PX_TFD), 0x50);
}

#[test]
fn pio_read_sectors_and_multiple_slots_in_one_write() {
    let mut r = Rig::new();
    r.start(0);
    r.build(0, h2d(ata::READ_SECTORS_EXT, 1, 1), &[(BUF, 512, false)], false);
    r.build(1, h2d(ata::READ_DMA_EXT, 2, 1), &[(BUF + 512, 512, false)], false);
    r.pw(0, PX_CI, 3);
    assert_eq!(r.pr(0, PX_CI), 0);
    assert_eq!(r.pr(0, PX_IS), pxis::PSS | pxis::DHRS);
    let want = pattern(DISK_SECTORS * 512);
    assert_eq!(r.guest(BUF, 1024), &want[512..1536]);
}

#[test]
fn ncq_two_tags_complete_through_sdb() {
    let mut r = Rig::new();
    r.start(0);
    r.sink.take();
    r.mem.write(BUF + 0x2000, &[0x5a; 1024]).unwrap();
    r.build(0, ncq(false, 0, 10, 2), &[(BUF, 1024, false)], false);
    r.build(7, ncq(true, 7, 300, 2), &[(BUF + 0x2000, 1024, false)], true);
    r.pw(0, PX_SACT, 1 | 1 << 7);
    assert_eq!(r.pr(0, PX_SACT), 0x81);
    r.pw(0, PX_CI, 1 | 1 << 7);
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_SACT)), (0, 0));
    assert_eq!(r.pr(0, PX_IS), pxis::SDBS);
    let sdb = r.fis(cmd::RX_SDBFIS, 8);
    assert_eq!(&sdb[..4], &[0xa1, 0x40, 0x50, 0]);
    assert_eq!(u32::from_le_bytes([sdb[4], sdb[5], sdb[6], sdb[7]]), 1 << 7, "last SDB names tag 7");
    let ds = r.fis(cmd::RX_DSFIS, 28);
    assert_eq!((ds[0], ds[1], ds[4]), (0x41, 0x80, 7));
    assert_eq!(u32::from_le_bytes([ds[20], ds[21], ds[22], ds[23]]), 1024);
    let want = pattern(DISK_SECTORS * 512);
    assert_eq!(r.guest(BUF, 1024), &want[10 * 512..12 * 512]);
    assert_eq!(&r.img.contents()[300 * 512..302 * 512], &[0x5a; 1024][..]);
    assert_eq!((r.prdbc(0), r.prdbc(7)), (1024, 1024));
    // One INTx assertion (the line stays up for the second completion).
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    // FUA flushes.
    let before = r.img.flush_count();
    let mut f = ncq(true, 1, 400, 1);
    f[7] |= 0x80;
    r.build(1, f, &[(BUF, 512, false)], true);
    r.pw(0, PX_SACT, 2);
    r.pw(0, PX_CI, 2);
    assert_eq!(r.img.flush_count(), before + 1);
    // NCQ error (past the end): SDB with ERR, TFES, SACT bit stays until ST is cleared.
    r.pw(0, PX_IS, u32::MAX);
    r.build(2, ncq(false, 2, DISK_SECTORS as u64, 1), &[(BUF, 512, false)], false);
    r.pw(0, PX_SACT, 4);
    r.pw(0, PX_CI, 4);
    assert_eq!(r.pr(0, PX_IS), pxis::TFES);
    assert_eq!(r.pr(0, PX_TFD), 0x1051, "IDNF");
    assert_eq!(r.pr(0, PX_SACT), 4);
    assert_eq!(&r.fis(cmd::RX_SDBFIS, 8), &[0xa1, 0x40, 0x51, 0x10, 0, 0, 0, 0]);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
    assert_eq!(r.pr(0, PX_SACT), 0);
}

/// Every bad-input case ends with TFES, ERR|ABRT (or IDNF) and the interrupt, the image intact.
#[test]
fn bad_input_ends_in_ata_errors() {
    type Setup = Box<dyn Fn(&Rig)>;
    let cases: Vec<(&str, Setup, u32)> = vec![
        (
            "LBA past the end",
            Box::new(|r| {
                r.build(0, h2d(ata::READ_DMA_EXT, DISK_SECTORS as u64, 1), &[(BUF, 512, false)], false)
            }),
            0x1051,
        ),
        (
            "write past the end",
            Box::new(|r| {
                r.build(0, h2d(ata::WRITE_DMA_EXT, DISK_SECTORS as u64 - 1, 2), &[(BUF, 1024, false)], true)
            }),
            0x1051,
        ),
        ("zero-length PRDT", Box::new(|r| r.build(0, h2d(ata::READ_DMA_EXT, 0, 1), &[], false)), 0x451),
        (
            "PRDT too short",
            Box::new(|r| r.build(0, h2d(ata::READ_DMA_EXT, 0, 4), &[(BUF, 1024, false)], false)),
            0x451,
        ),
        (
            "short PRDT for IDENTIFY",
            Box::new(|r| r.build(0, h2d(ata::IDENTIFY_DEVICE, 0, 0), &[(BUF, 256, false)], false)),
            0x451,
        ),
        (
            "PRD past RAM",
            Box::new(|r| r.build(0, h2d(ata::READ_DMA_EXT, 0, 1), &[(RAM as u64 - 256, 512, false)], false)),
            0x451,
        ),
        (
            "write from beyond RAM",
            Box::new(|r| r.build(0, h2d(ata::WRITE_DMA_EXT, 0, 1), &[(u64::MAX - 100, 512, false)], true)),
            0x451,
        ),
        (
            "reserved FIS type",
            Box::new(|r| {
                let mut f = h2d(ata::READ_DMA_EXT, 0, 1);
                f[0] = 0x5f;
                r.build(0, f, &[(BUF, 512, false)], false)
            }),
            0x451,
        ),
        (
            "bad CFL",
            Box::new(|r| {
                r.build(0, h2d(ata::FLUSH_CACHE, 0, 0), &[], false);
                r.mem.write_u32(CLB, 2).unwrap()
            }),
            0x451,
        ),
        (
            "command table outside RAM",
            Box::new(|r| {
                r.build(0, h2d(ata::FLUSH_CACHE, 0, 0), &[], false);
                r.mem.write_u32(CLB + 8, 0xffff_ff80).unwrap();
                r.mem.write_u32(CLB + 12, 0xffff_ffff).unwrap()
            }),
            0x451,
        ),
        ("unknown command", Box::new(|r| r.build(0, h2d(0xfe, 0, 0), &[], false)), 0x451),
    ];
    for (what, setup, tfd) in cases {
        let mut r = Rig::new();
        r.start(0);
        r.sink.take();
        setup(&r);
        r.issue(0);
        assert_eq!(r.pr(0, PX_CI), 0, "{what}");
        assert_eq!(r.pr(0, PX_IS) & pxis::TFES, pxis::TFES, "{what}");
        assert_eq!(r.pr(0, PX_TFD), tfd, "{what}");
        assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)], "{what}");
        assert_eq!(r.img.contents(), pattern(DISK_SECTORS * 512), "{what}: image changed");
    }
    // Command list outside RAM: the header cannot be read.
    let mut r = Rig::new();
    r.start(0);
    r.pw(0, PX_CMD, pxcmd::SUD);
    r.pw(0, PX_CLB, 0xffff_fc00);
    r.pw(0, PX_CLBU, 0xffff_ffff);
    r.pw(0, PX_FB, 0xffff_ff00);
    r.pw(0, PX_FBU, 0xffff_ffff);
    r.pw(0, PX_CMD, pxcmd::SUD | pxcmd::FRE | pxcmd::ST);
    r.issue(31);
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_TFD)), (0, 0x451));
    assert_eq!(r.pr(0, PX_IS), pxis::TFES | pxis::DHRS);
    // A port without a device: the command errors out, it never completes with data.
    let mut r = Rig::new();
    r.start(1);
    r.mem.write(BUF, &[0xee; 512]).unwrap();
    let ct = CT + 0x10000;
    let mut hdr = [0u8; 32];
    hdr[0..4].copy_from_slice(&(5u32 | 1 << 16).to_le_bytes());
    hdr[8..16].copy_from_slice(&ct.to_le_bytes());
    r.mem.write(CLB + 0x10000, &hdr).unwrap();
    r.mem.write(ct, &h2d(ata::IDENTIFY_DEVICE, 0, 0)).unwrap();
    r.pw(1, PX_CI, 1);
    assert_eq!(r.pr(1, PX_CI), 0);
    assert_eq!(r.pr(1, PX_IS), pxis::TFES | pxis::DHRS);
    assert_eq!(r.guest(BUF, 512), vec![0xee; 512]);
}

#[test]
fn read_only_disk_aborts_writes() {
    let mut r = Rig::new();
    let img = Arc::new(MemImage::new(vec![0; 64 * 512], true));
    r.c().attach_disk(2, img.clone()).unwrap();
    assert!(matches!(r.c().attach_disk(2, img.clone()), Err(AhciError::Occupied(2))));
    assert!(matches!(r.c().attach_disk(6, img.clone()), Err(AhciError::BadPort(6))));
    r.start(2);
    let ct = CT + 0x20000;
    let mut hdr = [0u8; 32];
    hdr[0..4].copy_from_slice(&(5u32 | 1 << 6 | 1 << 16).to_le_bytes());
    hdr[8..16].copy_from_slice(&ct.to_le_bytes());
    r.mem.write(CLB + 0x20000, &hdr).unwrap();
    r.mem.write(ct, &h2d(ata::WRITE_DMA_EXT, 0, 1)).unwrap();
    r.mem.write(ct + 0x80, &[0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 1, 0, 0]).unwrap();
    r.pw(2, PX_CI, 1);
    assert_eq!(r.pr(2, PX_TFD), 0x451);
    assert_eq!(img.contents(), vec![0; 64 * 512]);
}

#[test]
fn software_reset_through_control_fis() {
    let mut r = Rig::new();
    r.start(0);
    let mut srst = [0u8; 20];
    srst[0] = 0x27;
    srst[15] = 0x04;
    r.build(0, srst, &[], false);
    r.issue(0);
    assert_eq!(r.pr(0, PX_CI), 0);
    assert_eq!(r.pr(0, PX_TFD), 0x80);
    srst[15] = 0;
    r.mem.write(FB + cmd::RX_RFIS, &[0; 20]).unwrap();
    r.build(1, srst, &[], false);
    r.issue(1);
    assert_eq!((r.pr(0, PX_TFD), r.pr(0, PX_SIG)), (0x150, 0x101));
    assert_eq!(&r.fis(cmd::RX_RFIS, 4), &[0x34, 0, 0x50, 1]);
    assert_eq!(r.pr(0, PX_IS), 0);
}

#[test]
fn commands_wait_for_bus_mastering() {
    let mut r = Rig::new();
    r.start(0);
    r.cmdw.store(0, std::sync::atomic::Ordering::Release);
    r.build(0, h2d(ata::FLUSH_CACHE, 0, 0), &[], false);
    r.issue(0);
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (1, 0));
    r.cmdw.store(PCI_COMMAND_MASTER, std::sync::atomic::Ordering::Release);
    r.issue(0);
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (0, pxis::DHRS));
}

#[test]
fn msi_replaces_intx_when_enabled() {
    let sink = Arc::new(RecordingIrqSink::default());
    let mem = Arc::new(TestRam::new(RAM));
    let buses = PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) };
    let (ctrl, mut f) = build(mem.clone(), sink.clone(), 4, &buses).unwrap();
    let img = Arc::new(MemImage::new(vec![0; 64 * 512], false));
    ctrl.lock().unwrap().attach_disk(0, img).unwrap();
    assert_eq!(f.config_read(0), 0x2922_8086);
    assert_eq!(f.config_read(8), 0x0106_0102);
    assert_eq!(f.config_read(0x3c) >> 8 & 0xff, 1, "INTA#");
    assert_eq!(f.config_read(0x34), 0x80);
    assert_eq!(f.config_read(0x80) & 0xff_ffff, 0x80a805);
    assert_eq!(f.config_read(0xa8), 0x0010_0012);
    assert_eq!(f.config_read(0xac), 0x48);
    // BAR sizing and mapping.
    f.config_write(0x24, u32::MAX, 0xf);
    assert_eq!(f.config_read(0x24), 0xffff_f000);
    f.config_write(0x20, u32::MAX, 0xf);
    assert_eq!(f.config_read(0x20), 0xffff_ffe1);
    f.config_write(0x24, 0xfebf_0000, 0xf);
    f.config_write(0x20, 0xc040, 0xf);
    f.config_write(4, u32::from(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | 1), 0x3);
    assert_eq!(f.abar(), Some(0xfebf_0000));
    let mut b = [0u8; 4];
    buses.mmio.read_sync(0xfebf_0000 + HBA_VS, &mut b);
    assert_eq!(u32::from_le_bytes(b), VS);
    // The index/data pair reaches the same registers.
    buses.pio.write_sync(0xc050, &(HBA_PI as u32).to_le_bytes());
    buses.pio.read_sync(0xc054, &mut b);
    assert_eq!(u32::from_le_bytes(b), PI);

    let mmio = buses.mmio.clone();
    let w = |off: u64, v: u32| mmio.write_sync(0xfebf_0000 + off, &v.to_le_bytes());
    let run_flush = |slot: u64| {
        let ct = CT + slot * 0x1000;
        let mut hdr = [0u8; 32];
        hdr[0..4].copy_from_slice(&5u32.to_le_bytes());
        hdr[8..16].copy_from_slice(&ct.to_le_bytes());
        mem.write(CLB + slot * 32, &hdr).unwrap();
        mem.write(ct, &h2d(ata::FLUSH_CACHE, 0, 0)).unwrap();
        w(0x100 + PX_CI, 1 << slot);
        // The flush runs on the port's I/O worker.
        AhciController::drain(&ctrl);
    };
    w(0x100 + PX_CLB, CLB as u32);
    w(0x100 + PX_FB, FB as u32);
    w(0x100 + PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    w(0x100 + PX_IE, pxis::DHRS);
    w(HBA_GHC, GHC_IE);
    sink.take();
    run_flush(0);
    assert_eq!(sink.take(), vec![IrqEvent::Intx(4, 0, true)]);
    w(0x100 + PX_IS, u32::MAX);
    w(HBA_IS, 1);
    assert_eq!(sink.take(), vec![IrqEvent::Intx(4, 0, false)]);
    // Enable MSI: address/data programmed, then the enable bit.
    f.config_write(0x84, 0xfee0_0000, 0xf);
    f.config_write(0x8c, 0x0031, 0x3);
    f.config_write(0x80, 1 << 16, 0x4);
    run_flush(1);
    assert_eq!(sink.take(), vec![IrqEvent::Msi(0xfee0_0000, 0x31)]);
    // A second event before the guest acknowledges the first is a second message.
    run_flush(2);
    assert_eq!(sink.take(), vec![IrqEvent::Msi(0xfee0_0000, 0x31)]);
    // Masked at the HBA (GHC.IE clear): nothing.
    w(0x100 + PX_IS, u32::MAX);
    w(HBA_IS, 1);
    w(HBA_GHC, 0);
    run_flush(3);
    assert!(sink.take().is_empty());
    // Save/restore of both sections, then reset.
    let pf = payload(&f);
    let pc = payload(&*ctrl.lock().unwrap());
    assert_prefixes_fail(&f, &pf);
    load(&mut f, &pf).unwrap();
    load(&mut *ctrl.lock().unwrap(), &pc).unwrap();
    assert!(msi_enabled(&f));
    f.reset();
    assert!(!msi_enabled(&f));
}

fn msi_enabled(f: &Ich9Ahci) -> bool {
    f.config_space().word(0x82) & 1 != 0
}

#[test]
fn snapshot_round_trip() {
    let mut a = Rig::new();
    a.start(0);
    a.build(0, h2d(ata::SET_MULTIPLE_MODE, 0, 4), &[], false);
    a.issue(0);
    a.build(1, h2d(ata::IDENTIFY_PACKET_DEVICE, 0, 0), &[], false);
    a.issue(1); // halts the port with TFES pending
    a.pw(1, PX_CMD, pxcmd::SUD);
    a.pw(1, PX_SCTL, 0x301);
    a.c().idp_index = 0x10;
    let p = payload(&*a.c());
    assert_prefixes_fail(&*a.c(), &p);
    let mut b = Rig::new();
    load(&mut *b.c(), &p).unwrap();
    assert_eq!(payload(&*b.c()), p);
    assert_eq!(b.sink.take(), vec![IrqEvent::Intx(3, 0, true)], "the line comes back up");
    assert_eq!(b.pr(0, PX_TFD), 0x451);
    assert!(b.c().ports[0].halted);
    // Restoring into a controller with different devices or with bad values fails.
    let c = Rig::new();
    c.c().attach_disk(3, Arc::new(MemImage::new(vec![0; 512], false))).unwrap();
    assert!(load(&mut *c.c(), &p).is_err());
    let mut bad = p.clone();
    bad[0] = 0xff; // GHC reserved bits
    assert!(load(&mut *b.c(), &bad).is_err());
    // Power-on reset clears everything but the attachment.
    b.c().reset();
    assert_eq!((b.pr(0, PX_CMD), b.pr(0, PX_TFD), b.r(HBA_GHC)), (pxcmd::POD, 0x7f, GHC_AE));
    assert!(b.c().has_device(0));
    assert!(b.c().detach(0).is_ok());
    assert!(!b.c().has_device(0));
    assert!(matches!(b.c().detach(0), Err(AhciError::Empty(0))));
}

mod deferred;

/// ATAPI CD-ROM drives on a port.
mod cd {
    use super::*;
    use crate::storage::atapi::{op, CdConfig, CD_BLOCK_SIZE};

    const CD_BLOCKS: usize = 100;

    pub(super) fn cd_image() -> Arc<dyn BlockBackend> {
        Arc::new(MemImage::new(cd_pattern(), true))
    }
    pub(super) fn cd_pattern() -> Vec<u8> {
        (0..CD_BLOCKS * CD_BLOCK_SIZE).map(|i| (i / CD_BLOCK_SIZE * 5 + i * 3) as u8).collect()
    }

    /// A CD-ROM drive on port 0 (with a medium or empty), the port started.
    fn rig(media: bool) -> Rig {
        let mut r = Rig::with(|c, _| {
            c.attach_cdrom(0, media.then(cd_image), CdConfig::default()).unwrap();
        });
        r.start(0);
        r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST | pxcmd::ATAPI);
        r.sink.take();
        r
    }

    pub(super) fn packet(dma: bool) -> [u8; 20] {
        let mut f = h2d(ata::PACKET, 0, 0);
        f[3] = u8::from(dma);
        // Byte count limit (PIO), as Linux sets it.
        f[5] = 0x00;
        f[6] = 0x80;
        f
    }

    impl Rig {
        /// Slot `slot`: PACKET with `cdb` in the ACMD area, header bit A set.
        pub(super) fn packet(&self, slot: u64, cdb: &[u8], dma: bool, prds: &[(u64, u32, bool)]) {
            self.build_flags(slot, packet(dma), prds, 1 << 5);
            let mut acmd = [0u8; 16];
            acmd[..cdb.len()].copy_from_slice(cdb);
            self.mem.write(CT + slot * 0x1000 + 0x40, &acmd).unwrap();
        }
        /// Issues slot 0 and returns (PxIS, PxTFD), then clears PxIS; after an error restarts
        /// the port as SeaBIOS and edk2 do (ST off and on).
        fn run(&mut self) -> (u32, u32) {
            self.issue(0);
            assert_eq!(self.pr(0, PX_CI), 0);
            let out = (self.pr(0, PX_IS), self.pr(0, PX_TFD));
            self.pw(0, PX_IS, u32::MAX);
            self.w(HBA_IS, u32::MAX);
            if out.0 & pxis::TFES != 0 {
                self.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
                self.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
            }
            out
        }
        fn cdb(&mut self, cdb: &[u8], dma: bool, prds: &[(u64, u32, bool)]) -> (u32, u32) {
            self.packet(0, cdb, dma, prds);
            self.run()
        }
    }

    /// TFD of a CHECK CONDITION with sense key `key`.
    fn check(key: u32) -> u32 {
        0x51 | (key << 4 | 4) << 8
    }

    pub(super) fn read10(lba: u32, blocks: u16) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = op::READ_10;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    #[test]
    fn signature_identify_and_ata_commands() {
        let mut r = rig(true);
        assert_eq!((r.pr(0, PX_SIG), r.pr(0, PX_TFD), r.pr(0, PX_SSTS)), (SIG_ATAPI, 0x150, 0x113));
        assert_ne!(r.pr(0, PX_CMD) & pxcmd::ATAPI, 0);
        let f = r.fis(cmd::RX_RFIS, 20);
        assert_eq!((f[0], f[4], f[5], f[6], f[12]), (0x34, 1, 0x14, 0xeb, 1));
        // IDENTIFY DEVICE aborts with the ATAPI signature in the FIS.
        r.build(0, h2d(ata::IDENTIFY_DEVICE, 0, 0), &[(BUF, 512, false)], false);
        assert_eq!(r.run(), (pxis::TFES | pxis::DHRS, 0x451));
        let f = r.fis(cmd::RX_RFIS, 20);
        assert_eq!((f[2], f[3], f[5], f[6]), (0x51, 0x04, 0x14, 0xeb));
        assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true), IrqEvent::Intx(3, 0, false)]);
        // IDENTIFY PACKET DEVICE through a PIO Setup FIS (SeaBIOS's and edk2's probe).
        r.build(0, h2d(ata::IDENTIFY_PACKET_DEVICE, 0, 0), &[(BUF, 512, false)], false);
        assert_eq!(r.run(), (pxis::PSS, 0x50));
        assert_eq!(r.prdbc(0), 512);
        let ps = r.fis(cmd::RX_PSFIS, 20);
        assert_eq!((ps[0], ps[1], ps[15]), (0x5f, 0x60, 0x50));
        let id = r.guest(BUF, 512);
        assert_eq!(u16::from_le_bytes([id[0], id[1]]) >> 14, 2, "ATAPI");
        assert_eq!(u16::from_le_bytes([id[0], id[1]]) >> 8 & 0x1f, 5, "CD-ROM");
        // SET FEATURES (transfer mode), a bad subcommand, CHECK POWER MODE, DEVICE RESET.
        let mut sf = h2d(ata::SET_FEATURES, 0, 0x44);
        sf[3] = 0x03;
        r.build(0, sf, &[], false);
        assert_eq!(r.run(), (pxis::DHRS, 0x50));
        sf[3] = 0x77;
        r.build(0, sf, &[], false);
        assert_eq!(r.run(), (pxis::TFES | pxis::DHRS, 0x451));
        r.build(0, h2d(ata::CHECK_POWER_MODE, 0, 0), &[], false);
        assert_eq!(r.run(), (pxis::DHRS, 0x50));
        assert_eq!(r.fis(cmd::RX_RFIS, 13)[12], 0xff);
        r.build(0, h2d(ata::DEVICE_RESET, 0, 0), &[], false);
        assert_eq!(r.run(), (pxis::DHRS, 0x50));
        let f = r.fis(cmd::RX_RFIS, 20);
        assert_eq!((f[1], f[4], f[5], f[6], f[12]), (0x40, 1, 0x14, 0xeb, 1));
        // NCQ and disk reads are not for packet devices.
        r.build(0, ncq(false, 0, 0, 1), &[(BUF, 512, false)], false);
        assert_eq!(r.run(), (pxis::TFES | pxis::DHRS, 0x451));
        r.build(0, h2d(ata::READ_DMA_EXT, 0, 1), &[(BUF, 512, false)], false);
        assert_eq!(r.run(), (pxis::TFES | pxis::DHRS, 0x451));
        // COMRESET brings the ATAPI signature back.
        r.pw(0, PX_SCTL, 1);
        assert_eq!(r.pr(0, PX_SIG), 0xffff_ffff);
        r.pw(0, PX_SCTL, 0);
        assert_eq!((r.pr(0, PX_SIG), r.pr(0, PX_TFD)), (SIG_ATAPI, 0x150));
    }

    #[test]
    fn unit_attention_after_insert_then_request_sense() {
        let mut r = rig(false);
        assert!(!r.c().cdrom(0).unwrap().has_media());
        // No medium: NOT READY / MEDIUM NOT PRESENT, interrupt raised.
        assert_eq!(r.cdb(&[op::TEST_UNIT_READY], false, &[]), (pxis::TFES | pxis::DHRS, check(2)));
        let f = r.fis(cmd::RX_RFIS, 20);
        assert_eq!((f[1], f[2], f[3], f[12]), (0x40, 0x51, 0x24, 3));
        assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true), IrqEvent::Intx(3, 0, false)]);
        r.c().insert_media(0, cd_image()).unwrap();
        assert_eq!(r.cdb(&[op::TEST_UNIT_READY], false, &[]), (pxis::TFES | pxis::DHRS, check(6)));
        // REQUEST SENSE by PIO: PIO Setup FIS then the D2H FIS with the final status.
        r.mem.write(FB + cmd::RX_RFIS, &[0; 20]).unwrap();
        let rs = [op::REQUEST_SENSE, 0, 0, 0, 18, 0];
        assert_eq!(r.cdb(&rs, false, &[(BUF, 512, false)]), (pxis::PSS | pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 18);
        let ps = r.fis(cmd::RX_PSFIS, 20);
        assert_eq!((ps[0], ps[1], ps[12], ps[15], ps[16]), (0x5f, 0x60, 2, 0x50, 18));
        let d2h = r.fis(cmd::RX_RFIS, 20);
        assert_eq!((d2h[0], d2h[1], d2h[2], d2h[3], d2h[12]), (0x34, 0x40, 0x50, 0, 3));
        let sense = r.guest(BUF, 18);
        assert_eq!((sense[0], sense[2] & 0xf, sense[12], sense[13]), (0x70, 6, 0x28, 0));
        // Now ready: a no-data command completes with a D2H FIS only.
        assert_eq!(r.cdb(&[op::TEST_UNIT_READY], false, &[]), (pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 0);
    }

    #[test]
    fn read_capacity_and_read10_through_two_prds() {
        let mut r = rig(true);
        let rc = [op::READ_CAPACITY];
        assert_eq!(r.cdb(&rc, true, &[(BUF, 8, false)]), (pxis::DHRS, 0x50), "DMA: no PIO Setup");
        assert_eq!(r.prdbc(0), 8);
        assert_eq!(r.guest(BUF, 8), vec![0, 0, 0, 99, 0, 0, 8, 0]);
        // Two blocks at LBA 5: one per PRD, the second with its I bit.
        let prds = [(BUF, 2048, false), (BUF + 0x8000, 2048, true)];
        assert_eq!(r.cdb(&read10(5, 2), true, &prds), (pxis::DHRS | pxis::DPS, 0x50));
        assert_eq!(r.prdbc(0), 4096);
        let want = cd_pattern();
        assert_eq!(r.guest(BUF, 2048), want[5 * 2048..6 * 2048]);
        assert_eq!(r.guest(BUF + 0x8000, 2048), want[6 * 2048..7 * 2048]);
        // The same by PIO (edk2): PIO Setup with the byte count, then D2H.
        let prds = [(BUF + 0x10000, 4096, false)];
        assert_eq!(r.cdb(&read10(98, 2), false, &prds), (pxis::PSS | pxis::DHRS, 0x50));
        assert_eq!(r.guest(BUF + 0x10000, 4096), want[98 * 2048..]);
        assert_eq!(u16::from_le_bytes(r.fis(cmd::RX_PSFIS, 18)[16..18].try_into().unwrap()), 4096);
        // Past the end: ILLEGAL REQUEST, nothing moved.
        assert_eq!(r.cdb(&read10(99, 2), true, &prds), (pxis::TFES | pxis::DHRS, check(5)));
        assert_eq!(r.prdbc(0), 0);
        let rs = [op::REQUEST_SENSE, 0, 0, 0, 18, 0];
        r.cdb(&rs, true, &[(BUF, 18, false)]);
        assert_eq!((r.guest(BUF, 14)[2], r.guest(BUF, 14)[12]), (5, 0x21));
    }

    /// Short PRDTs get what fits; absurd lengths and bad PRDTs end in errors with the interrupt.
    #[test]
    fn short_and_bad_prdts_and_absurd_lengths() {
        let mut r = rig(true);
        // INQUIRY with allocation length 96 into 8 bytes of PRDT: 8 bytes, success.
        let inq = [op::INQUIRY, 0, 0, 0, 96, 0];
        assert_eq!(r.cdb(&inq, true, &[(BUF, 8, false)]), (pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 8);
        assert_eq!(r.guest(BUF, 1)[0], 0x05, "CD/DVD device");
        // No PRDT at all: nothing moves, the command still completes (PIO: the data phase
        // happened, so a PIO Setup FIS).
        assert_eq!(r.cdb(&inq, false, &[]), (pxis::PSS | pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 0);
        // READ(10) of 64 blocks into 4 KiB: two blocks arrive.
        r.mem.write(BUF + 4096, &[0xee; 16]).unwrap();
        assert_eq!(r.cdb(&read10(0, 64), true, &[(BUF, 4096, false)]), (pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 4096);
        assert_eq!(r.guest(BUF + 4096, 16), vec![0xee; 16]);
        // READ(12) of 2^32-1 blocks: LBA out of range, the medium is not read at all.
        let mut r12 = [0u8; 12];
        r12[0] = op::READ_12;
        r12[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(r.cdb(&r12, true, &[(BUF, 4096, false)]), (pxis::TFES | pxis::DHRS, check(5)));
        // Allocation length 0xffff for GET CONFIGURATION into a short table: what fits.
        let gc = [op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0];
        assert_eq!(r.cdb(&gc, false, &[(BUF, 8, false)]), (pxis::PSS | pxis::DHRS, 0x50));
        assert_eq!(r.prdbc(0), 8);
        // A PRD outside RAM, a data buffer running past RAM: HBA abort with interrupt.
        r.sink.take();
        assert_eq!(
            r.cdb(&read10(0, 1), true, &[(u64::MAX - 100, 2048, false)]),
            (pxis::TFES | pxis::DHRS, 0x451)
        );
        assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true), IrqEvent::Intx(3, 0, false)]);
        assert_eq!(r.cdb(&inq, false, &[(RAM as u64 - 4, 96, false)]), (pxis::TFES | pxis::DHRS, 0x451));
        // Unknown opcode and overlapped PACKET.
        assert_eq!(r.cdb(&[0xff], false, &[]), (pxis::TFES | pxis::DHRS, check(5)));
        let mut ovl = packet(false);
        ovl[3] = 0x02;
        r.build_flags(0, ovl, &[], 1 << 5);
        assert_eq!(r.run(), (pxis::TFES | pxis::DHRS, 0x451));
        // The medium is read-only whatever the guest does.
        assert!(r.c().cdrom(0).unwrap().media().unwrap().is_read_only());
    }

    #[test]
    fn lock_refuses_host_eject_and_media_api() {
        let mut r = rig(true);
        let lock = [op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0];
        assert_eq!(r.cdb(&lock, false, &[]), (pxis::DHRS, 0x50));
        assert!(r.c().cdrom(0).unwrap().is_locked());
        assert!(matches!(r.c().eject_media(0, false), Err(AhciError::Locked(0))));
        assert!(r.c().cdrom(0).unwrap().has_media());
        // The guest hears about the eject request (GET EVENT STATUS NOTIFICATION, media class).
        let gesn = [op::GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
        assert_eq!(r.cdb(&gesn, true, &[(BUF, 8, false)]), (pxis::DHRS, 0x50));
        assert_eq!(r.guest(BUF, 5)[4] & 0xf, 1, "eject request");
        // Forced eject works; the drive is then empty.
        assert!(r.c().eject_media(0, true).unwrap().is_some());
        assert_eq!(r.cdb(&read10(0, 1), true, &[(BUF, 2048, false)]), (pxis::TFES | pxis::DHRS, check(2)));
        // Media calls on the wrong port.
        r.c().attach_disk(1, r.img.clone()).unwrap();
        assert!(matches!(r.c().insert_media(1, cd_image()), Err(AhciError::NotCdrom(1))));
        assert!(matches!(r.c().eject_media(2, false), Err(AhciError::NotCdrom(2))));
        assert!(matches!(r.c().eject_media(6, false), Err(AhciError::BadPort(6))));
        assert!(r.c().cdrom(1).is_none());
        assert!(r.c().cdrom(9).is_none());
        assert!(matches!(r.c().attach_cdrom(0, None, CdConfig::default()), Err(AhciError::Occupied(0))));
        // Reset keeps the medium (none now; insert one first) and drops the lock.
        r.c().insert_media(0, cd_image()).unwrap();
        r.cdb(&lock, false, &[]);
        r.c().reset();
        let c = r.c();
        let cd = c.cdrom(0).unwrap();
        assert!(cd.has_media() && !cd.is_locked());
        drop(c);
        // Flush and detach of an empty drive.
        r.c().eject_media(0, false).unwrap();
        assert!(r.c().flush_all().is_ok());
        assert!(r.c().detach(0).unwrap().is_none());
    }

    #[test]
    fn snapshot_round_trip_with_cdrom() {
        let mut a = rig(true);
        a.cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0], false, &[]);
        a.cdb(&read10(200, 1), true, &[]); // leaves ILLEGAL REQUEST sense
        a.packet(0, &[op::TEST_UNIT_READY], false, &[]);
        let p = payload(&*a.c());
        assert_prefixes_fail(&*a.c(), &p);
        let mut b = rig(true);
        load(&mut *b.c(), &p).unwrap();
        assert_eq!(payload(&*b.c()), p);
        let c = b.c();
        let cd = c.cdrom(0).unwrap();
        assert!(cd.is_locked());
        assert_eq!(cd.sense().key, 5);
        drop(c);
        assert_eq!(b.pr(0, PX_SIG), SIG_ATAPI);
        // A disk where the CD was, or no device: refused.
        assert!(load(&mut *Rig::new().c(), &p).is_err());
        assert!(load(&mut *Rig::with(|_, _| {}).c(), &p).is_err());
        // A restore into a drive with another medium reports a media change.
        let mut c = Rig::with(|c, _| {
            let other: Arc<dyn BlockBackend> = Arc::new(MemImage::new(vec![0; 10 * CD_BLOCK_SIZE], true));
            c.attach_cdrom(0, Some(other), CdConfig::default()).unwrap();
        });
        load(&mut *c.c(), &p).unwrap();
        c.build_flags(0, packet(false), &[], 1 << 5);
        c.mem.write(CT + 0x40, &[0; 16]).unwrap();
        assert_eq!(c.run(), (pxis::TFES | pxis::DHRS, check(6)));
        // Version 1 streams (disks only) and version 2 ones (no in-flight list) still load; a
        // version-1 reader rejects a CD kind byte.
        let d = Rig::new();
        let mut w = SectionWriter::new();
        d.c().save_as(&mut w, 2);
        let v1 = w.as_bytes().to_vec();
        for version in [1, 2] {
            let e = Rig::new();
            let mut rd = SectionReader::new("ahci", &v1);
            let st = e.c().decode(version, &mut rd).unwrap();
            rd.finish().unwrap();
            e.c().apply(st).unwrap();
            let pe = payload(&*e.c());
            assert_eq!(pe, payload(&*d.c()));
        }
        let mut w = SectionWriter::new();
        b.c().save_as(&mut w, 2);
        let mut rd = SectionReader::new("ahci", w.as_bytes());
        let st = b.c().decode(2, &mut rd).unwrap();
        rd.finish().unwrap();
        b.c().apply(st).unwrap();
        assert_eq!(payload(&*b.c()), p);
        let mut rd = SectionReader::new("ahci", &p);
        assert!(b.c().decode(1, &mut rd).is_err());
        assert!(b.c().decode(4, &mut SectionReader::new("ahci", &p)).is_err());
    }
}

/// A raw image file takes the direct path (image <-> guest memory, no bounce buffer): DMA and
/// NCQ reads and writes land where they should, a PRD outside RAM is a DMA fault, and a
/// read-only file refuses writes untouched.
#[test]
fn raw_file_disk_moves_data_directly() {
    use crate::storage::image::{testfile::TempFile, RawFile};
    let data = pattern(256 * 512);
    let t = TempFile::with_contents(&data);
    let ro = TempFile::with_contents(&[0x77; 64 * 512]);
    let mut r = Rig::new();
    r.c().attach_disk(1, Arc::new(RawFile::open(&t.0, false).unwrap())).unwrap();
    r.c().attach_disk(2, Arc::new(RawFile::open(&ro.0, true).unwrap())).unwrap();
    r.start(1);
    r.start(2);
    let ci = |r: &mut Rig, port: u64, slot: u64| r.pw(port, PX_CI, 1 << slot);
    // DMA read of 3 sectors over two entries.
    r.build_at(1, 0, h2d(ata::READ_DMA_EXT, 9, 3), &[(BUF, 1024, false), (BUF + 0x4000, 512, true)], 0);
    ci(&mut r, 1, 0);
    assert_eq!(r.pr(1, PX_TFD), 0x50);
    assert_eq!(r.guest(BUF, 1024), &data[9 * 512..11 * 512]);
    assert_eq!(r.guest(BUF + 0x4000, 512), &data[11 * 512..12 * 512]);
    // DMA write, then NCQ write + read back.
    r.mem.write(BUF + 0x8000, &[0x11; 1024]).unwrap();
    r.build_at(1, 1, h2d(ata::WRITE_DMA_EXT, 40, 2), &[(BUF + 0x8000, 1024, false)], 1 << 6);
    ci(&mut r, 1, 1);
    r.mem.write(BUF + 0x9000, &[0x22; 512]).unwrap();
    r.build_at(1, 2, ncq(true, 2, 50, 1), &[(BUF + 0x9000, 512, false)], 1 << 6);
    r.pw(1, PX_SACT, 1 << 2);
    ci(&mut r, 1, 2);
    assert_eq!((r.pr(1, PX_CI), r.pr(1, PX_SACT), r.pr(1, PX_TFD)), (0, 0, 0x50));
    r.build_at(1, 3, ncq(false, 3, 40, 11), &[(BUF + 0x10000, 11 * 512, false)], 0);
    r.pw(1, PX_SACT, 1 << 3);
    ci(&mut r, 1, 3);
    let got = r.guest(BUF + 0x10000, 11 * 512);
    assert_eq!(&got[..1024], &[0x11; 1024][..]);
    assert_eq!(&got[1024..10 * 512], &data[42 * 512..50 * 512]);
    assert_eq!(&got[10 * 512..], &[0x22; 512][..]);
    let file = std::fs::read(&t.0).unwrap();
    assert_eq!(&file[40 * 512..42 * 512], &[0x11; 1024][..]);
    assert_eq!(&file[50 * 512..51 * 512], &[0x22; 512][..]);
    // A buffer outside RAM: TFES, ERR|ABRT, the image intact.
    r.pw(1, PX_IS, u32::MAX);
    r.build_at(1, 4, h2d(ata::WRITE_DMA_EXT, 60, 1), &[(RAM as u64 + 0x1000, 512, false)], 1 << 6);
    ci(&mut r, 1, 4);
    assert_eq!(r.pr(1, PX_IS) & pxis::TFES, pxis::TFES);
    assert_eq!(r.pr(1, PX_TFD), 0x451);
    assert_eq!(&std::fs::read(&t.0).unwrap()[60 * 512..61 * 512], &data[60 * 512..61 * 512]);
    // The read-only file: ABRT, unchanged.
    r.build_at(2, 0, h2d(ata::WRITE_DMA_EXT, 0, 1), &[(BUF, 512, false)], 1 << 6);
    ci(&mut r, 2, 0);
    assert_eq!(r.pr(2, PX_TFD), 0x451);
    assert_eq!(std::fs::read(&ro.0).unwrap(), vec![0x77; 64 * 512]);
}
