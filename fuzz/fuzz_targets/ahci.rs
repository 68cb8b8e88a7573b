//! The ICH9 AHCI controller (`hvmdm_devices::storage::ahci`) with its PCI function: a writable
//! 64-sector disk on port 0, a read-only 16-sector disk on port 1, an ATAPI CD-ROM drive with a
//! 24-block medium on port 2, ports 3..5 empty, `TestRam`
//! (256 KiB) for command lists, FIS areas, command tables and data. Input: ABAR and index/data
//! pair accesses of any size, config-space writes (MSI, command register), RAM pokes, and whole
//! commands built from the input: command headers (CFL, W, PRDTL, CTBA in RAM / at its end /
//! outside), command FISes (H2D command or control, reserved FIS types, every ATA opcode the
//! layer knows plus NCQ, LBAs in range / at the end / past it / raw), PACKET commands with CDBs
//! in the ACMD area (every SCSI opcode the ATAPI layer knows with fuzzed LBAs, lengths and
//! allocation lengths, or raw bytes; DMA or PIO; header A bit or not), PRDTs (zero length, entries
//! in and past RAM, odd byte counts, I bits), host media insert/eject (forced or not), port
//! start/stop, COMRESET, HBA reset, bus-master enable, save/restore and device resets.
//! Image I/O runs on manual I/O engines: commands that need the image stay in flight (PxCI or
//! PxSACT set) until a `Drain` step (or the end of the input) runs their jobs, so resets, stops,
//! saves and new commands land while jobs are pending and their completions may be stale.
//!
//! The first input byte picks the disks' backing: memory images (the buffered path) or raw files
//! in the temp directory (the direct path, DMA straight between the file and guest memory).
//!
//! Checks beyond "no panic/hang/leak":
//! - the images are only written whole sectors inside the writable disk; the read-only image and
//!   the CD never change and no request reaches past an image's end;
//! - PxSIG is all-ones or the device's signature (ATA on the disks, ATAPI on the CD port);
//! - register invariants after every step: CR follows ST, FR follows FRE, PxCI and PxSACT are 0
//!   while ST is clear, PxIS/PxIE hold only existing bits, IS only implemented ports, GHC.AE set,
//!   empty ports never link (SSTS.DET 0 or 4) and never get a signature;
//! - save → restore into an identically built controller (with a copy of guest RAM) reproduces
//!   the same payload, commands in flight included (they are re-issued there);
//! - a device reset restores the power-on register file.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use hvmdm_devices::bus::{Bus, BusDevice};
use hvmdm_devices::irq::RecordingIrqSink;
use hvmdm_devices::mem::{GuestRam, TestRam};
use hvmdm_devices::pci::{PciBuses, PciFunction, PCI_COMMAND_MASTER};
use hvmdm_devices::snapshot::{SectionReader, SectionWriter, Snapshot};
use hvmdm_devices::storage::ahci::{
    self, pxcmd, pxis, AhciController, Ich9Ahci, REGION_ABAR, REGION_IDP, SIG_ATA, SIG_ATAPI,
};
use hvmdm_devices::storage::ata::cmd;
use hvmdm_devices::storage::atapi::{op as scsi, CdConfig};
use hvmdm_devices::storage::{BlockBackend, BlockError, IoEngine, MemImage, RawFile};
use libfuzzer_sys::fuzz_target;

const RAM_SIZE: u64 = 0x4_0000;
const SECTOR: u64 = 512;
const RW_SECTORS: u64 = 64;
const RO_SECTORS: u64 = 16;
const CD_BLOCKS: u64 = 24;
const CD_PORT: u8 = 2;

const SCSI_OPCODES: [u8; 17] = [
    scsi::TEST_UNIT_READY,
    scsi::REQUEST_SENSE,
    scsi::INQUIRY,
    scsi::START_STOP_UNIT,
    scsi::PREVENT_ALLOW_MEDIUM_REMOVAL,
    scsi::READ_CAPACITY,
    scsi::READ_10,
    scsi::SEEK_10,
    scsi::READ_TOC,
    scsi::GET_CONFIGURATION,
    scsi::GET_EVENT_STATUS_NOTIFICATION,
    scsi::READ_DISC_INFORMATION,
    scsi::MODE_SENSE_10,
    scsi::READ_12,
    scsi::SET_CD_SPEED,
    scsi::MECHANISM_STATUS,
    scsi::READ_CD,
];

const OPCODES: [u8; 25] = [
    cmd::IDENTIFY_DEVICE,
    cmd::IDENTIFY_PACKET_DEVICE,
    cmd::READ_DMA,
    cmd::READ_DMA_EXT,
    cmd::WRITE_DMA,
    cmd::WRITE_DMA_EXT,
    cmd::READ_SECTORS,
    cmd::READ_SECTORS_EXT,
    cmd::WRITE_SECTORS,
    cmd::WRITE_SECTORS_EXT,
    cmd::READ_MULTIPLE,
    cmd::WRITE_MULTIPLE_EXT,
    cmd::READ_FPDMA_QUEUED,
    cmd::WRITE_FPDMA_QUEUED,
    cmd::READ_FPDMA_QUEUED,
    cmd::WRITE_FPDMA_QUEUED,
    cmd::FLUSH_CACHE,
    cmd::FLUSH_CACHE_EXT,
    cmd::SET_FEATURES,
    cmd::SET_MULTIPLE_MODE,
    cmd::READ_VERIFY_EXT,
    cmd::EXECUTE_DEVICE_DIAGNOSTIC,
    cmd::CHECK_POWER_MODE,
    cmd::PACKET,
    cmd::DEVICE_RESET,
];

/// The disks' initial contents.
fn pattern(sectors: u64) -> Vec<u8> {
    (0..sectors * SECTOR).map(|i| (i * 13 + i / 512) as u8).collect()
}

/// Where a [`Watched`] image keeps its bytes: memory (the buffered path), or a raw file, which
/// the controller reaches directly (`BlockBackend::host_file`: DMA between the file and guest
/// memory without a bounce buffer) as well as through `read_at`/`write_at` (PIO).
enum Store {
    Mem(MemImage),
    File { raw: RawFile, path: PathBuf },
}

/// An image that records out-of-range and partial-sector requests.
struct Watched {
    store: Store,
    len: u64,
    read_only: bool,
    bad: Mutex<Vec<String>>,
}

impl Watched {
    fn new(sectors: u64, read_only: bool, file: bool) -> Self {
        let bytes = pattern(sectors);
        let len = bytes.len() as u64;
        let store = if file {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("hvmdm-fuzz-ahci-{}-{n}", std::process::id()));
            std::fs::write(&path, &bytes).unwrap();
            Store::File { raw: RawFile::open(&path, read_only).unwrap(), path }
        } else {
            Store::Mem(MemImage::new(bytes, read_only))
        };
        Watched { store, len, read_only, bad: Mutex::default() }
    }
    fn backend(&self) -> &dyn BlockBackend {
        match &self.store {
            Store::Mem(m) => m,
            Store::File { raw, .. } => raw,
        }
    }
    fn contents(&self) -> Vec<u8> {
        match &self.store {
            Store::Mem(m) => m.contents(),
            Store::File { path, .. } => std::fs::read(path).unwrap(),
        }
    }
    fn note(&self, what: &str, offset: u64, len: usize) {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.len) || offset % SECTOR != 0 || len as u64 % SECTOR != 0 {
            self.bad.lock().unwrap().push(format!("{what} {offset:#x}+{len:#x}"));
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Store::File { path, .. } = &self.store {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl BlockBackend for Watched {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.note("read", offset, buf.len());
        self.backend().read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.note("write", offset, buf.len());
        if self.read_only {
            self.bad.lock().unwrap().push("write to a read-only image".into());
        }
        self.backend().write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.backend().flush()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn host_file(&self) -> Option<&std::fs::File> {
        self.backend().host_file()
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// Inside RAM (wrapped).
    In(u32),
    /// `n` bytes before the end of RAM (so structures run past it).
    NearEnd(u16),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::In(a) => u64::from(a) % RAM_SIZE,
            Addr::NearEnd(n) => RAM_SIZE.saturating_sub(u64::from(n)),
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Lba {
    In(u8),
    NearEnd(u8),
    PastEnd(u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Opcode {
    Known(u8),
    Raw(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Prd {
    addr: Addr,
    /// Byte count minus one (bits 21:0 used) and the I bit.
    dbc: u32,
    small: bool,
    ibit: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    /// 1..=8 sectors (in the feature registers for NCQ).
    Small(u8),
    Raw(u16),
}

impl Count {
    fn get(self) -> u16 {
        match self {
            Count::Small(n) => u16::from(n % 8) + 1,
            Count::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FisKind {
    Command,
    Command2,
    Command3,
    /// Control FIS (C bit clear) with this device control byte (SRST is 0x04).
    Control(u8),
    /// Another FIS type byte in place of 0x27.
    Reserved(u8),
}

/// The ATAPI command packet of a PACKET command.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cdb {
    /// A known opcode; `lba` at bytes 2..6, `len` at 7..9 (READ(10) and the allocation lengths
    /// of the 10-byte commands) and 6..10 (READ(12)), `alloc` at byte 4 (6-byte commands) and
    /// `b1`/`b9` in the flag bytes (READ CD's transfer length takes byte 6 too).
    Known {
        op: u8,
        lba: Lba,
        len: u32,
        alloc: u8,
        b1: u8,
        b9: u8,
    },
    Raw([u8; 12]),
}

impl Cdb {
    fn bytes(self) -> [u8; 16] {
        let mut c = [0u8; 16];
        match self {
            Cdb::Known { op, lba, len, alloc, b1, b9 } => {
                let op = SCSI_OPCODES[usize::from(op) % SCSI_OPCODES.len()];
                c[0] = op;
                c[1] = b1;
                let lba = match lba {
                    Lba::In(n) => u64::from(n) % CD_BLOCKS,
                    Lba::NearEnd(n) => CD_BLOCKS.saturating_sub(u64::from(n % 8)),
                    Lba::PastEnd(n) => CD_BLOCKS + u64::from(n),
                    Lba::Raw(v) => v,
                } as u32;
                if matches!(
                    op,
                    scsi::INQUIRY
                        | scsi::REQUEST_SENSE
                        | scsi::START_STOP_UNIT
                        | scsi::PREVENT_ALLOW_MEDIUM_REMOVAL
                ) {
                    c[4] = alloc;
                } else {
                    c[2..6].copy_from_slice(&lba.to_be_bytes());
                }
                if op == scsi::READ_12 {
                    c[6..10].copy_from_slice(&len.to_be_bytes());
                } else {
                    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
                    if op == scsi::READ_CD {
                        c[6] = (len >> 16) as u8;
                    }
                    c[9] = b9;
                }
            }
            Cdb::Raw(b) => c[..12].copy_from_slice(&b),
        }
        c
    }
}

#[derive(Arbitrary, Debug)]
struct Command {
    port: u8,
    slot: u8,
    kind: FisKind,
    op: Opcode,
    lba: Lba,
    count: Count,
    feature: u16,
    device: u8,
    /// Command FIS length in dwords (None: 5).
    cfl: Option<u8>,
    write: bool,
    /// Starts the PRDT with one valid 64 KiB entry at the top of RAM.
    good_prd: bool,
    /// Command table elsewhere than its slot's default place.
    table: Option<Addr>,
    prds: Vec<Prd>,
    /// Extra PRDTL beyond the entries written (stale RAM as entries).
    extra_prdtl: u8,
    set_sact: bool,
    issue: bool,
    /// PACKET: the command packet, the A bit of the header.
    cdb: Cdb,
    atapi: bool,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        off: u16,
        size: u8,
        val: u64,
    },
    Read {
        off: u16,
        size: u8,
    },
    Idp {
        off: u8,
        write: bool,
        val: u32,
        size: u8,
    },
    Config {
        reg: u8,
        val: u32,
        mask: u8,
    },
    /// Enables MSI with an address/data.
    Msi {
        on: bool,
        data: u16,
    },
    Poke {
        addr: u32,
        bytes: Vec<u8>,
    },
    /// Lists, FIS receive, spin-up and start, as drivers do.
    Start {
        port: u8,
        clb: Addr,
        fb: Addr,
        ie: u32,
        ghc_ie: bool,
    },
    Stop {
        port: u8,
    },
    Comreset {
        port: u8,
    },
    HbaReset,
    BusMaster(bool),
    Command(Command),
    /// Host media change on the CD port: insert the medium again, or eject it.
    Media {
        insert: bool,
        force: bool,
    },
    SaveRestore,
    Reset,
    /// Runs the queued I/O jobs (their completions land now).
    Drain,
}

struct Rig {
    mem: Arc<TestRam>,
    ctrl: Arc<Mutex<AhciController>>,
    func: Ich9Ahci,
    /// Port 0, port 1, the CD medium.
    disks: [Arc<Watched>; 3],
}

/// `file`: the disks are raw files (the direct DMA path) rather than memory images.
fn images(file: bool) -> [Arc<Watched>; 3] {
    [
        Arc::new(Watched::new(RW_SECTORS, false, file)),
        Arc::new(Watched::new(RO_SECTORS, true, file)),
        Arc::new(Watched::new(CD_BLOCKS * 4, true, file)),
    ]
}

fn build(disks: &[Arc<Watched>; 3]) -> (Arc<TestRam>, Arc<Mutex<AhciController>>, Ich9Ahci) {
    let mem = Arc::new(TestRam::new(RAM_SIZE as usize));
    let sink = Arc::new(RecordingIrqSink::default());
    let buses = PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) };
    let (ctrl, func) = ahci::build(mem.clone(), sink, 3, &buses).unwrap();
    {
        let mut c = ctrl.lock().unwrap();
        c.attach_disk(0, disks[0].clone()).unwrap();
        c.attach_disk(1, disks[1].clone()).unwrap();
        c.attach_cdrom(usize::from(CD_PORT), Some(disks[2].clone()), CdConfig::default()).unwrap();
        // Deterministic: jobs run only when the input drains them.
        c.set_io_engines(std::array::from_fn(|i| Arc::new(IoEngine::manual(&format!("ahci{i}"))))).unwrap();
    }
    (mem, ctrl, func)
}

impl Rig {
    fn new(file: bool) -> Self {
        let disks = images(file);
        let (mem, ctrl, mut func) = build(&disks);
        func.config_write(4, u32::from(PCI_COMMAND_MASTER), 0x3);
        Rig { mem, ctrl, func, disks }
    }

    /// Ports 0..2 started the way drivers do (lists at 0x1000 * (port + 1), FIS areas after).
    fn started(file: bool) -> Self {
        let mut r = Rig::new(file);
        for port in 0..3u8 {
            let base = 0x1000 * (u32::from(port) + 1);
            let start =
                Op::Start { port, clb: Addr::In(base), fb: Addr::In(base + 0x400), ie: !0, ghc_ie: true };
            r.step(&start);
        }
        r
    }
    fn w32(&self, off: u64, v: u32) {
        self.ctrl.lock().unwrap().write(REGION_ABAR, off, &v.to_le_bytes());
    }
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.lock().unwrap().read(REGION_ABAR, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn port_reg(port: u8, reg: u64) -> u64 {
        0x100 + u64::from(port % 6) * 0x80 + reg
    }

    fn command(&self, c: &Command) {
        let port = c.port % 6;
        let slot = u64::from(c.slot % 32);
        let clb =
            u64::from(self.r32(Self::port_reg(port, 0))) | u64::from(self.r32(Self::port_reg(port, 4))) << 32;
        let table = c.table.map_or(0x2_0000 + slot * 0x400, Addr::get) & !0x7f;
        let sectors = if port == 1 { RO_SECTORS } else { RW_SECTORS };
        let lba = match c.lba {
            Lba::In(n) => u64::from(n) % sectors,
            Lba::NearEnd(n) => sectors.saturating_sub(u64::from(n % 8)),
            Lba::PastEnd(n) => sectors + u64::from(n),
            Lba::Raw(v) => v,
        };
        let opcode = match c.op {
            // Mostly PACKET on the CD port.
            _ if port == CD_PORT && matches!(c.kind, FisKind::Command2 | FisKind::Command3) => cmd::PACKET,
            Opcode::Known(i) => OPCODES[usize::from(i) % OPCODES.len()],
            Opcode::Raw(v) => v,
        };
        let count = c.count.get();
        let mut fis = [0u8; 20];
        fis[0] = 0x27;
        fis[1] = 0x80;
        match c.kind {
            FisKind::Command | FisKind::Command2 | FisKind::Command3 => {}
            FisKind::Control(ctl) => {
                fis[1] = 0;
                fis[15] = ctl;
            }
            FisKind::Reserved(t) => fis[0] = t,
        }
        fis[2] = opcode;
        fis[3] = c.feature as u8;
        fis[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        fis[7] = c.device | 0x40;
        fis[8..11].copy_from_slice(&lba.to_le_bytes()[3..6]);
        fis[11] = (c.feature >> 8) as u8;
        fis[12..14].copy_from_slice(&count.to_le_bytes());
        if matches!(opcode, cmd::READ_FPDMA_QUEUED | cmd::WRITE_FPDMA_QUEUED) {
            fis[3..5].copy_from_slice(&count.to_le_bytes());
            fis[11] = (count >> 8) as u8;
            fis[12] = (slot as u8) << 3 | (c.feature as u8 & 7);
            fis[4..7].copy_from_slice(&lba.to_le_bytes()[..3]);
        }
        let good =
            c.good_prd.then_some(Prd { addr: Addr::In(0x3_0000), dbc: 0xffff, small: false, ibit: true });
        let prds: Vec<[u8; 16]> = good
            .iter()
            .chain(c.prds.iter().take(8))
            .map(|p| {
                let mut e = [0u8; 16];
                e[0..8].copy_from_slice(&p.addr.get().to_le_bytes());
                let dbc = if p.small { p.dbc % 4096 } else { p.dbc } & 0x3f_ffff;
                e[12..16].copy_from_slice(&(dbc | if p.ibit { 1 << 31 } else { 0 }).to_le_bytes());
                e
            })
            .collect();
        let prdtl = prds.len() as u32 + u32::from(c.extra_prdtl % 4);
        let flags = u32::from(c.cfl.map_or(5, |n| n % 32))
            | if c.write { 1 << 6 } else { 0 }
            | if c.atapi { 1 << 5 } else { 0 }
            | prdtl << 16;
        if opcode == cmd::PACKET {
            let _ = self.mem.write(table.wrapping_add(0x40), &c.cdb.bytes());
        }
        let mut hdr = [0u8; 32];
        hdr[0..4].copy_from_slice(&flags.to_le_bytes());
        hdr[8..16].copy_from_slice(&table.to_le_bytes());
        // Any of these may be outside RAM: then the device must cope with what is (not) there.
        let _ = self.mem.write(clb.wrapping_add(slot * 32), &hdr);
        let _ = self.mem.write(table, &fis);
        for (i, e) in prds.iter().enumerate() {
            let _ = self.mem.write(table.wrapping_add(0x80 + 16 * i as u64), e);
        }
        if c.set_sact {
            self.w32(Self::port_reg(port, 0x34), 1 << slot);
        }
        if c.issue {
            self.w32(Self::port_reg(port, 0x38), 1 << slot);
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Write { off, size, val } => {
                let size = 1usize << (size % 3);
                let off = u64::from(*off) % 0x1000 & !(size as u64 - 1);
                self.ctrl.lock().unwrap().write(REGION_ABAR, off, &val.to_le_bytes()[..size]);
            }
            Op::Read { off, size } => {
                let size = 1usize << (size % 3);
                let off = u64::from(*off) % 0x1000 & !(size as u64 - 1);
                let mut b = [0u8; 4];
                self.ctrl.lock().unwrap().read(REGION_ABAR, off, &mut b[..size]);
            }
            Op::Idp { off, write, val, size } => {
                let size = 1usize << (size % 3);
                let off = u64::from(*off) % 32 & !(size as u64 - 1);
                let mut c = self.ctrl.lock().unwrap();
                if *write {
                    c.write(REGION_IDP, off, &val.to_le_bytes()[..size]);
                } else {
                    let mut b = [0u8; 4];
                    c.read(REGION_IDP, off, &mut b[..size]);
                }
            }
            Op::Config { reg, val, mask } => self.func.config_write(u16::from(*reg) & 0xfc, *val, mask & 0xf),
            Op::Msi { on, data } => {
                self.func.config_write(0x84, 0xfee0_0000, 0xf);
                self.func.config_write(0x8c, u32::from(*data), 0x3);
                self.func.config_write(0x80, u32::from(*on) << 16, 0x4);
            }
            Op::Poke { addr, bytes } => {
                let a = u64::from(*addr) % RAM_SIZE;
                let n = bytes.len().min(64).min((RAM_SIZE - a) as usize);
                self.mem.write(a, &bytes[..n]).unwrap();
            }
            Op::Start { port, clb, fb, ie, ghc_ie } => {
                let clb = clb.get();
                let fb = fb.get();
                self.w32(Self::port_reg(*port, 0x00), clb as u32);
                self.w32(Self::port_reg(*port, 0x04), (clb >> 32) as u32);
                self.w32(Self::port_reg(*port, 0x08), fb as u32);
                self.w32(Self::port_reg(*port, 0x0c), (fb >> 32) as u32);
                self.w32(Self::port_reg(*port, 0x18), pxcmd::FRE | pxcmd::SUD);
                self.w32(Self::port_reg(*port, 0x14), *ie);
                self.w32(0x04, if *ghc_ie { 2 } else { 0 });
                self.w32(Self::port_reg(*port, 0x18), pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
            }
            Op::Stop { port } => {
                let c = self.r32(Self::port_reg(*port, 0x18));
                self.w32(Self::port_reg(*port, 0x18), c & !pxcmd::ST);
            }
            Op::Comreset { port } => {
                self.w32(Self::port_reg(*port, 0x2c), 0x301);
                self.w32(Self::port_reg(*port, 0x2c), 0x300);
            }
            Op::HbaReset => self.w32(0x04, 1),
            Op::BusMaster(on) => {
                let v = if *on { PCI_COMMAND_MASTER } else { 0 };
                self.func.config_write(4, u32::from(v), 0x3);
            }
            Op::Command(c) => self.command(c),
            Op::Media { insert, force } => {
                let mut c = self.ctrl.lock().unwrap();
                if *insert {
                    c.insert_media(usize::from(CD_PORT), self.disks[2].clone()).unwrap();
                } else {
                    let locked = c.cdrom(usize::from(CD_PORT)).unwrap().is_locked();
                    let r = c.eject_media(usize::from(CD_PORT), *force);
                    assert_eq!(
                        r.is_err(),
                        locked && !*force,
                        "eject refused only while locked: {:?}",
                        r.err()
                    );
                }
            }
            Op::SaveRestore => self.save_restore(),
            Op::Drain => AhciController::drain(&self.ctrl),
            Op::Reset => {
                self.func.reset();
                self.ctrl.lock().unwrap().reset();
                let fresh = Rig::new(false);
                for off in (0..0x400u64).step_by(4) {
                    assert_eq!(self.r32(off), fresh.r32(off), "register {off:#x} after reset");
                }
            }
        }
    }

    fn save_restore(&self) {
        let mut w = SectionWriter::new();
        self.ctrl.lock().unwrap().save(&mut w);
        let disks = images(false);
        let (mem, other, _) = build(&disks);
        // Commands in flight are re-issued from what the save recorded; their PRDTs are in RAM.
        let mut ram = vec![0u8; RAM_SIZE as usize];
        self.mem.read(0, &mut ram).unwrap();
        mem.write(0, &ram).unwrap();
        let mut o = other.lock().unwrap();
        // The same configuration: the CD drive empty if it is empty here.
        if self.ctrl.lock().unwrap().cdrom(usize::from(CD_PORT)).unwrap().media().is_none() {
            o.eject_media(usize::from(CD_PORT), true).unwrap();
        }
        let mut r = SectionReader::new("ahci", w.as_bytes());
        let st = o.decode(o.section_version(), &mut r).expect("own payload decodes");
        r.finish().expect("own payload fully consumed");
        o.apply(st).unwrap();
        let mut w2 = SectionWriter::new();
        o.save(&mut w2);
        assert_eq!(w.as_bytes(), w2.as_bytes(), "save/restore/save differs");
    }

    fn check(&self) {
        let ghc = self.r32(0x04);
        assert_ne!(ghc & (1 << 31), 0, "GHC.AE");
        assert_eq!(ghc & !0x8000_0002, 0, "GHC {ghc:#x}");
        assert_eq!(self.r32(0x08) & !0x3f, 0, "IS beyond the ports");
        for port in 0..6u8 {
            let cmd = self.r32(Self::port_reg(port, 0x18));
            let st = cmd & pxcmd::ST != 0;
            assert_eq!(cmd & pxcmd::CR != 0, st, "port {port}: CR follows ST ({cmd:#x})");
            assert_eq!(cmd & pxcmd::FR != 0, cmd & pxcmd::FRE != 0, "port {port}: FR follows FRE");
            assert_eq!(cmd & pxcmd::CLO, 0, "CLO reads 0");
            if !st {
                assert_eq!(self.r32(Self::port_reg(port, 0x38)), 0, "port {port}: CI with ST clear");
                assert_eq!(self.r32(Self::port_reg(port, 0x34)), 0, "port {port}: SACT with ST clear");
            }
            assert_eq!(self.r32(Self::port_reg(port, 0x10)) & !pxis::VALID, 0);
            assert_eq!(self.r32(Self::port_reg(port, 0x14)) & !pxis::VALID, 0);
            assert!(self.r32(Self::port_reg(port, 0x20)) <= 0xffff, "TFD has 16 bits");
            let sig = self.r32(Self::port_reg(port, 0x24));
            if port > CD_PORT {
                assert!(matches!(self.r32(Self::port_reg(port, 0x28)), 0 | 4), "empty port {port} linked");
                assert_eq!(sig, 0xffff_ffff);
            } else {
                let want = if port == CD_PORT { SIG_ATAPI } else { SIG_ATA };
                assert!(sig == want || sig == 0xffff_ffff, "port {port}: PxSIG {sig:#x}");
            }
        }
        for d in &self.disks {
            let bad = d.bad.lock().unwrap();
            assert!(bad.is_empty(), "image requests: {bad:?}");
        }
        assert_eq!(self.disks[1].contents(), pattern(RO_SECTORS), "read-only image changed");
        assert_eq!(self.disks[2].contents(), pattern(CD_BLOCKS * 4), "CD medium changed");
        assert_eq!(self.disks[0].contents().len() as u64, RW_SECTORS * SECTOR, "writable image resized");
    }
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (file, ops) = input;
    let mut rig = Rig::started(file);
    for op in ops.iter().take(64) {
        rig.step(op);
        rig.check();
    }
    AhciController::drain(&rig.ctrl);
    rig.check();
});
