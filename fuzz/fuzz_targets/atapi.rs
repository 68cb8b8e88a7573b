//! An ATAPI CD-ROM drive (`hvmdm_devices::storage::atapi`) behind the PIIX3 IDE controller: a CD at
//! the primary master (with a medium of any size, a medium whose reads fail, or none) and an
//! optional ATA disk as slave, `TestRam` for DMA. Input: PACKET commands with arbitrary command
//! packets (every opcode the drive knows with random fields, or raw bytes; any byte count limit;
//! PIO or DMA; packets cut short), data-port streaming, task-file and device-control writes (SRST,
//! nIEN), raw ATA opcodes, bus-master programming with PRD tables anywhere, host-side media
//! insert/eject (forced or not), controller resets and snapshot round trips into a fresh
//! controller mid-command.
//!
//! Checks beyond "no panic/hang/leak":
//! - the medium is never written and never read past its end (nor its partial tail block);
//! - a host eject of a tray the guest locked fails unless forced, and leaves the medium in;
//! - after every operation the drive still answers: DEVICE RESET then TEST UNIT READY ends with
//!   status 50h (good) or 41h with sense key NOT READY / UNIT ATTENTION in the error register;
//! - a saved state always loads into an identically configured controller.
//!
//! Image I/O runs on manual `IoEngine`s (deterministic): jobs complete when the harness drains,
//! after every operation unless the input said `Hold(true)`, so commands can also be left in
//! flight across data-port accesses, resets, DEVICE RESET, media changes and snapshots (a
//! snapshot with a job in flight re-issues it in the fresh controller).
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use hvmdm_devices::bus::Bus;
use hvmdm_devices::irq::{IsaIrq, RecordingIrqSink};
use hvmdm_devices::mem::{GuestRam, TestRam};
use hvmdm_devices::snapshot::{SectionReader, SectionWriter, Snapshot};
use hvmdm_devices::storage::ata::{cmd, DriveKind};
use hvmdm_devices::storage::ide::{
    IdeController, IdeError, BUS_MASTER_LEN, BUS_MASTER_RULES, REGION_BUS_MASTER,
};
use hvmdm_devices::storage::{BlockBackend, BlockError, CdConfig, IoEngine, MemImage};
use libfuzzer_sys::fuzz_target;

const RAM_SIZE: u64 = 0x2_0000;
const BM: u64 = 0xc000;
const CMD: u64 = 0x1f0;
const CTL: u64 = 0x3f6;
const BLOCK: u64 = 2048;

/// Opcodes the drive decodes (plus a few it must refuse).
const OPCODES: [u8; 20] = [
    0x00, 0x03, 0x12, 0x1b, 0x1e, 0x25, 0x28, 0x2b, 0x43, 0x46, 0x4a, 0x51, 0x5a, 0xa8, 0xbb, 0xbd, 0xbe,
    0x0a, 0x2a, 0xff,
];

/// A medium recording reads past its end and any write.
struct Watched {
    img: MemImage,
    fail: bool,
    bad: Mutex<Vec<String>>,
}

impl BlockBackend for Watched {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.img.len() / BLOCK * BLOCK) {
            self.bad.lock().unwrap().push(format!("read {offset:#x}+{:#x}", buf.len()));
        }
        if self.fail {
            return Err(BlockError::Io {
                offset,
                len: buf.len(),
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        self.img.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.bad.lock().unwrap().push(format!("write {offset:#x}+{:#x}", buf.len()));
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.img.len()
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct MediumCfg {
    blocks: u8,
    tail: u16,
    fail: bool,
}

#[derive(Arbitrary, Debug)]
enum Cdb {
    Known {
        op: u8,
        fields: [u8; 11],
    },
    /// READ(10)/(12) around the end of the medium.
    Read {
        twelve: bool,
        lba_back: u8,
        count: u16,
    },
    Raw([u8; 12]),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Packet { cdb: Cdb, limit: u16, dma: bool, feature_junk: u8, words: u8 },
    DataIn { wide: bool, n: u16 },
    DataOut { wide: bool, n: u8, val: u32 },
    RegWrite { reg: u8, val: u8 },
    RegRead { reg: u8 },
    Ctl(u8),
    Select(bool),
    Ata(u8),
    Prd { table: u16, entries: Vec<(u32, u16, bool)> },
    BmStart { to_memory: bool },
    BmStop,
    BmStatus(u8),
    Insert(MediumCfg),
    Eject { force: bool },
    Reset,
    Snapshot,
    Hold(bool),
}

struct Rig {
    bus: Bus,
    ctrl: Arc<Mutex<IdeController>>,
    ram: Arc<TestRam>,
    media: Vec<Arc<Watched>>,
    slave: bool,
    /// Jobs stay in flight after operations (until `Hold(false)` or the final check).
    hold: bool,
}

fn controller(ram: &Arc<TestRam>) -> IdeController {
    let irq = Arc::new(RecordingIrqSink::default());
    IdeController::new(ram.clone(), IsaIrq::new(irq.clone(), 14), IsaIrq::new(irq, 15))
}

impl Rig {
    fn new(medium: Option<MediumCfg>, slave: bool) -> Rig {
        let ram = Arc::new(TestRam::new(RAM_SIZE as usize));
        let ctrl = Arc::new(Mutex::new(controller(&ram)));
        let bus = Bus::new("pio");
        IdeController::register_legacy(&ctrl, &bus).expect("legacy ports");
        bus.insert(BM, BUS_MASTER_LEN, BUS_MASTER_RULES, ctrl.clone(), REGION_BUS_MASTER).expect("bm");
        ctrl.lock()
            .unwrap()
            .set_io_engines(Arc::new(IoEngine::manual("ide0")), Arc::new(IoEngine::manual("ide1")))
            .expect("nothing in flight yet");
        let mut rig = Rig { bus, ctrl, ram, media: Vec::new(), slave, hold: false };
        let m = medium.map(|c| rig.medium(c) as Arc<dyn BlockBackend>);
        rig.attach(&mut rig.ctrl.lock().unwrap(), m);
        rig
    }

    fn attach(&self, c: &mut IdeController, m: Option<Arc<dyn BlockBackend>>) {
        c.attach_cdrom(0, 0, m, CdConfig::default()).expect("cd");
        if self.slave {
            c.attach(0, 1, Box::new(MemImage::new(vec![0x11; 16 * 512], false)), DriveKind::Disk)
                .expect("disk");
        }
    }

    fn medium(&mut self, c: MediumCfg) -> Arc<Watched> {
        let len = u64::from(c.blocks) * BLOCK + u64::from(c.tail % 2048);
        let bytes = (0..len).map(|i| (i * 7 + i / BLOCK) as u8).collect();
        let w = Arc::new(Watched { img: MemImage::new(bytes, true), fail: c.fail, bad: Mutex::default() });
        self.media.push(w.clone());
        w
    }

    fn outb(&self, port: u64, v: u8) {
        self.bus.write_sync(port, &[v]);
        if !self.hold {
            IdeController::drain(&self.ctrl);
        }
    }
    fn inb(&self, port: u64) -> u8 {
        let mut d = [0u8];
        self.bus.read_sync(port, &mut d);
        d[0]
    }

    fn check_media(&self) {
        for m in &self.media {
            let bad = m.bad.lock().unwrap();
            assert!(bad.is_empty(), "medium misuse: {bad:?}");
        }
    }

    /// DEVICE RESET and TEST UNIT READY on the CD: it must answer.
    fn check_alive(&mut self) {
        self.hold = false;
        IdeController::drain(&self.ctrl);
        self.outb(CTL, 0);
        self.outb(CMD + 6, 0xa0);
        self.outb(CMD + 7, cmd::DEVICE_RESET);
        assert_eq!(self.inb(CMD + 7), 0, "status after DEVICE RESET");
        self.outb(CMD + 1, 0);
        self.outb(CMD + 7, cmd::PACKET);
        assert_eq!(self.inb(CMD + 7) & 0x89, 0x08, "PACKET must ask for the command packet");
        for _ in 0..6 {
            self.bus.write_sync(CMD, &[0, 0]);
        }
        IdeController::drain(&self.ctrl);
        let st = self.inb(CMD + 7);
        let err = self.inb(CMD + 1);
        let ok = st == 0x50 || (st == 0x41 && matches!(err >> 4, 2 | 6));
        assert!(ok, "TEST UNIT READY: status {st:#x} error {err:#x}");
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = arbitrary::Unstructured::new(data);
    let medium: Option<MediumCfg> = u.arbitrary()?;
    let slave: bool = u.arbitrary()?;
    let mut rig = Rig::new(medium, slave);
    let mut ops = 0;
    while !u.is_empty() && ops < 128 {
        ops += 1;
        match u.arbitrary::<Op>()? {
            Op::Packet { cdb, limit, dma, feature_junk, words } => {
                let mut c = [0u8; 12];
                match cdb {
                    Cdb::Known { op, fields } => {
                        c[0] = OPCODES[usize::from(op) % OPCODES.len()];
                        c[1..].copy_from_slice(&fields);
                    }
                    Cdb::Read { twelve, lba_back, count } => {
                        let blocks = rig.ctrl.lock().unwrap().cdrom(0, 0).map_or(0, |d| d.capacity_blocks());
                        let lba = (blocks as u32).wrapping_sub(u32::from(lba_back % 8));
                        c[0] = if twelve { 0xa8 } else { 0x28 };
                        c[2..6].copy_from_slice(&lba.to_be_bytes());
                        if twelve {
                            c[6..10].copy_from_slice(&u32::from(count % 64).to_be_bytes());
                        } else {
                            c[7..9].copy_from_slice(&(count % 64).to_be_bytes());
                        }
                    }
                    Cdb::Raw(b) => c = b,
                }
                rig.outb(CMD + 6, 0xa0);
                rig.outb(CMD + 1, u8::from(dma) | (feature_junk & 0xfc & !0x02));
                rig.outb(CMD + 4, limit as u8);
                rig.outb(CMD + 5, (limit >> 8) as u8);
                rig.outb(CMD + 7, cmd::PACKET);
                for w in c.chunks(2).take(usize::from(words % 8)) {
                    rig.bus.write_sync(CMD, w);
                }
            }
            Op::DataIn { wide, n } => {
                let mut d = [0u8; 4];
                for _ in 0..n % 0x9000 {
                    rig.bus.read_sync(CMD, &mut d[..if wide { 4 } else { 2 }]);
                }
            }
            Op::DataOut { wide, n, val } => {
                for _ in 0..n {
                    rig.bus.write_sync(CMD, &val.to_le_bytes()[..if wide { 4 } else { 2 }]);
                }
            }
            Op::RegWrite { reg, val } => rig.outb(CMD + 1 + u64::from(reg % 6), val),
            Op::RegRead { reg } => {
                rig.inb(CMD + 1 + u64::from(reg % 7));
            }
            Op::Ctl(v) => rig.outb(CTL, v),
            Op::Select(slave) => rig.outb(CMD + 6, 0xa0 | u8::from(slave) << 4),
            Op::Ata(c) => rig.outb(CMD + 7, c),
            Op::Prd { table, entries } => {
                let t = u64::from(table) & !3;
                for (i, (addr, count, eot)) in entries.iter().take(16).enumerate() {
                    let e = u64::from(*addr) | u64::from(*count) << 32 | u64::from(*eot) << 63;
                    let _ = rig.ram.write(t + 8 * i as u64, &e.to_le_bytes());
                }
                rig.bus.write_sync(BM + 4, &(t as u32).to_le_bytes());
            }
            Op::BmStart { to_memory } => rig.outb(BM, 1 | u8::from(to_memory) << 3),
            Op::BmStop => rig.outb(BM, 0),
            Op::BmStatus(v) => rig.outb(BM + 2, v),
            Op::Insert(c) => {
                let m = rig.medium(c);
                rig.ctrl.lock().unwrap().insert_media(0, 0, m).expect("insert");
            }
            Op::Eject { force } => {
                let mut c = rig.ctrl.lock().unwrap();
                let locked = c.cdrom(0, 0).is_some_and(|d| d.is_locked());
                let had = c.cdrom(0, 0).is_some_and(|d| d.media().is_some());
                match c.eject_media(0, 0, force) {
                    Ok(_) => assert!(force || !locked, "eject of a locked tray without force succeeded"),
                    Err(IdeError::Locked { .. }) => {
                        assert!(locked && !force);
                        assert_eq!(c.cdrom(0, 0).is_some_and(|d| d.media().is_some()), had);
                    }
                    Err(e) => panic!("eject: {e}"),
                }
            }
            Op::Reset => rig.ctrl.lock().unwrap().reset(),
            Op::Snapshot => {
                let c = rig.ctrl.lock().unwrap();
                let mut w = SectionWriter::new();
                c.save(&mut w);
                let mut fresh = controller(&rig.ram);
                let media = c.cdrom(0, 0).and_then(|d| d.media().cloned());
                rig.attach(&mut fresh, media);
                let mut r = SectionReader::new("ide", w.as_bytes());
                let st = fresh.decode(fresh.section_version(), &mut r).expect("own state decodes");
                r.finish().expect("all consumed");
                fresh.apply(st).expect("applies");
                drop(c);
                // The fresh controller is bare: a re-issued job ran inside apply.
                assert!(!fresh.io_busy(), "re-issued work left in flight on a bare controller");
            }
            Op::Hold(h) => rig.hold = h,
        }
        if !rig.hold {
            IdeController::drain(&rig.ctrl);
        }
        rig.check_media();
    }
    rig.check_alive();
    rig.check_media();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
