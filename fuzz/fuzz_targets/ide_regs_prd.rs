//! The PIIX3 IDE controller (`hvmdm_devices::storage::IdeController`) behind its legacy ports and
//! its bus-master block, with a RAM-backed master disk on the primary channel, an optional slave
//! (odd-sized image: its partial last sector is not addressable), an empty secondary channel and
//! `TestRam` for DMA. Input: task-file register writes/reads, device control (SRST, nIEN, HOB),
//! structured ATA commands (every opcode the layer knows, LBA28/LBA48/CHS, LBA and count in range,
//! at the end, past it), raw opcodes, data-port streaming of 2/4 bytes, bus-master command/status/
//! PRD-address writes, PRD tables in RAM (zero and odd counts, missing EOT, tables and buffers past
//! the RAM end and across 64 KiB boundaries), whole DMA commands, RAM pokes and controller resets.
//!
//! Checks beyond "no panic/hang/leak":
//! - DMA writes RAM only inside the buffers of the programmed PRD tables (RAM compared around every
//!   access that can start DMA; skipped when the transfer rewrote its own table);
//! - the images are written only during command/data/bus-master writes, only whole sectors inside
//!   the capacity (never the partial tail sector, never a read-only image), and only inside the
//!   LBA range of a write command issued to that drive since its last reset/SRST/other command;
//!   at the end, every byte outside the written sectors still equals the initial image;
//! - the device never asks an image for bytes past its end;
//! - a controller reset restores the power-on state: every task-file register of both drives
//!   (incl. HOB), status, alternate status, the bus-master block, both IRQ lines low and the
//!   IDENTIFY data (multiple-sector setting, CHS translation, write cache, transfer mode);
//! - an SRST pulse leaves the master's signature (count 1, LBA 1/0/0, error 01, status 50h);
//! - IRQ 14 is low while nIEN is set and right after a status-register read; the empty secondary
//!   channel never raises IRQ 15 and reads 0 in every register.
//!
//! Image I/O runs on manual `IoEngine`s (no threads, deterministic), drained right after every
//! access inside that access's bookkeeping window, so each command's deferred completion is
//! attributed to the access that started it. (The in-flight states themselves are exercised by
//! the `atapi` target and the unit tests.)
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use hvmdm_devices::bus::Bus;
use hvmdm_devices::irq::{IrqEvent, IsaIrq, RecordingIrqSink};
use hvmdm_devices::mem::{GuestRam, TestRam};
use hvmdm_devices::storage::ata::{cmd, DiskConfig, DriveKind};
use hvmdm_devices::storage::ide::{IdeController, BUS_MASTER_LEN, BUS_MASTER_RULES, REGION_BUS_MASTER};
use hvmdm_devices::storage::{BlockBackend, BlockError, IoEngine, MemImage};
use libfuzzer_sys::fuzz_target;

/// 128 KiB: one 64 KiB boundary inside RAM and an end that tables and buffers can run past.
const RAM_SIZE: u64 = 0x2_0000;
const BM: u64 = 0xc000;
const SECTOR: u64 = 512;
const MASTER_SECTORS: u64 = 64;
const P_CMD: u64 = 0x1f0;
const P_CTL: u64 = 0x3f6;
const S_CMD: u64 = 0x170;
const S_CTL: u64 = 0x376;
const NIEN: u8 = 0x02;
const SRST: u8 = 0x04;
const HOB: u8 = 0x80;
const BSY_DRQ: u8 = 0x88;

/// Commands that write the medium (incl. WRITE DMA/MULTIPLE FUA EXT), and which are LBA48.
const WRITE_CMDS: [u8; 10] = [0x30, 0x31, 0x34, 0x39, 0xc5, 0xca, 0xcb, 0x35, 0x3d, 0xce];
const EXT_CMDS: [u8; 12] = [0x24, 0x25, 0x29, 0x34, 0x35, 0x39, 0x42, 0xea, 0x27, 0x37, 0x3d, 0xce];

/// Every opcode the ATA layer decodes (plus the packet ones a disk must abort).
const OPCODES: [u8; 37] = [
    cmd::NOP,
    cmd::DEVICE_RESET,
    cmd::READ_SECTORS,
    cmd::READ_SECTORS_NORETRY,
    cmd::READ_SECTORS_EXT,
    cmd::READ_DMA_EXT,
    cmd::READ_MULTIPLE_EXT,
    cmd::WRITE_SECTORS,
    cmd::WRITE_SECTORS_NORETRY,
    cmd::WRITE_SECTORS_EXT,
    cmd::WRITE_DMA_EXT,
    cmd::WRITE_MULTIPLE_EXT,
    cmd::READ_VERIFY,
    cmd::READ_VERIFY_NORETRY,
    cmd::READ_VERIFY_EXT,
    cmd::SEEK,
    cmd::EXECUTE_DEVICE_DIAGNOSTIC,
    cmd::INITIALIZE_DEVICE_PARAMETERS,
    cmd::PACKET,
    cmd::IDENTIFY_PACKET_DEVICE,
    cmd::READ_MULTIPLE,
    cmd::WRITE_MULTIPLE,
    cmd::SET_MULTIPLE_MODE,
    cmd::READ_DMA,
    cmd::READ_DMA_NORETRY,
    cmd::WRITE_DMA,
    cmd::WRITE_DMA_NORETRY,
    cmd::STANDBY_IMMEDIATE,
    cmd::IDLE_IMMEDIATE,
    cmd::STANDBY,
    cmd::IDLE,
    cmd::CHECK_POWER_MODE,
    cmd::SLEEP,
    cmd::FLUSH_CACHE,
    cmd::IDENTIFY_DEVICE,
    cmd::FLUSH_CACHE_EXT,
    cmd::SET_FEATURES,
];
/// SET FEATURES subcommands (and the counts SET TRANSFER MODE takes).
const FEATURES: [u8; 8] = [0x02, 0x82, 0x03, 0x55, 0xaa, 0x66, 0xcc, 0x00];
const XFER_MODES: [u8; 8] = [0x00, 0x01, 0x0c, 0x22, 0x45, 0x46, 0x40, 0x0d];

/// A `MemImage` that records every request, so writes can be attributed to operations.
struct Watched {
    img: MemImage,
    /// Addressable sectors (the image may end with a partial one).
    sectors: u64,
    writes: Mutex<Vec<(u64, usize)>>,
    oob: Mutex<Vec<String>>,
}

impl Watched {
    fn new(bytes: Vec<u8>, read_only: bool) -> Self {
        let sectors = bytes.len() as u64 / SECTOR;
        Watched {
            img: MemImage::new(bytes, read_only),
            sectors,
            writes: Mutex::default(),
            oob: Mutex::default(),
        }
    }
    fn note_range(&self, what: &str, offset: u64, len: usize) {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.img.len()) {
            self.oob.lock().unwrap().push(format!("{what} {offset:#x}+{len:#x} past {:#x}", self.img.len()));
        }
    }
}

impl BlockBackend for Watched {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.note_range("read", offset, buf.len());
        self.img.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.note_range("write", offset, buf.len());
        self.writes.lock().unwrap().push((offset, buf.len()));
        self.img.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.img.flush()
    }
    fn len(&self) -> u64 {
        self.img.len()
    }
    fn is_read_only(&self) -> bool {
        self.img.is_read_only()
    }
}

#[derive(Arbitrary, Debug)]
struct SlaveCfg {
    sectors: u8,
    tail: u16,
    read_only: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Lba {
    In(u16),
    /// `n` sectors before the end (so a multi-sector transfer runs past it).
    NearEnd(u8),
    PastEnd(u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    Zero,
    One,
    Small(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addressing {
    Lba28,
    Lba48,
    /// C/H/S registers as given (LBA bit clear).
    Chs {
        cyl: u16,
        head: u8,
        sector: u8,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Opcode {
    Known(u8),
    Raw(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum BufAddr {
    In(u32),
    NearEnd(u16),
    Near64k(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ByteCount {
    /// 0 = 64 KiB.
    Zero,
    Sector(u8),
    Odd(u16),
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct PrdEntry {
    addr: BufAddr,
    count: ByteCount,
    eot: bool,
    /// Reserved flag bits (ignored by hardware).
    junk_flags: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum TableAddr {
    Low(u16),
    /// Entries just below a 64 KiB boundary (the walker must stop there).
    Below64k(u8),
    /// Entries running past the end of RAM.
    NearEnd(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Byte write to a task-file register of either channel.
    RegWrite {
        secondary: bool,
        reg: u8,
        val: u8,
    },
    RegRead {
        secondary: bool,
        reg: u8,
    },
    /// Any aligned access of 1/2/4 bytes inside a command block (multi-register writes included).
    CmdAccess {
        secondary: bool,
        off: u8,
        size: u8,
        write: bool,
        val: u32,
    },
    /// Read of any size anywhere around the control ports (floating neighbours included).
    CtlRead {
        secondary: bool,
        off: u8,
        size: u8,
    },
    Ctl {
        secondary: bool,
        val: u8,
    },
    SrstPulse,
    Select {
        slave: bool,
    },
    Command {
        slave: bool,
        op: Opcode,
        addressing: Addressing,
        lba: Lba,
        count: Count,
        feature: u8,
    },
    /// Data-port streaming: `n` reads or writes of 2 or 4 bytes.
    DataIn {
        wide: bool,
        n: u16,
    },
    DataOut {
        wide: bool,
        n: u16,
        seed: u8,
    },
    /// Bus-master register access (either channel's half; misaligned ones are rejected by the bus).
    BmAccess {
        off: u8,
        size: u8,
        write: bool,
        val: u32,
    },
    BmStart {
        secondary: bool,
        to_memory: bool,
    },
    BmStop {
        secondary: bool,
    },
    /// Write-one-to-clear status write.
    BmStatus {
        secondary: bool,
        val: u8,
    },
    /// Writes a PRD table into RAM and points the channel's PRD register at it.
    Prd {
        secondary: bool,
        table: TableAddr,
        entries: Vec<PrdEntry>,
    },
    /// A whole DMA command: table, PRD register, command and engine start in either order.
    Dma {
        slave: bool,
        write: bool,
        ext: bool,
        lba: Lba,
        count: Count,
        table: TableAddr,
        entries: Vec<PrdEntry>,
        start_first: bool,
        wrong_direction: bool,
    },
    RamPoke {
        addr: u32,
        val: u64,
    },
    Reset,
}

/// Register state after power-on/reset as seen through the ports, labelled for readable diffs.
type PowerState = Vec<(String, u8)>;

struct Rig {
    bus: Bus,
    ctrl: Arc<Mutex<IdeController>>,
    irq: Arc<RecordingIrqSink>,
    ram: Arc<TestRam>,
    disks: [Option<Arc<Watched>>; 2],
    initial: [Vec<u8>; 2],
    /// Sectors written so far, per drive.
    dirty: [Vec<bool>; 2],
    /// Sector ranges each drive may currently write.
    windows: [Vec<(u64, u64)>; 2],
    /// Last value written to each device control register.
    ctl: [u8; 2],
    /// IRQ 14 / 15 levels as signalled.
    levels: [bool; 2],
    /// Whether the current operation may write an image (command, data or bus-master write).
    disk_write_ok: bool,
    baseline: PowerState,
}

fn in_span(port: u64, addr: u64, len: usize) -> bool {
    port >= addr && port < addr + len as u64
}

/// Bus-delivered: a valid size, naturally aligned (the legacy and BM regions reject the rest).
fn delivered(addr: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && addr.is_multiple_of(len as u64)
}

impl Rig {
    fn new(slave: Option<&SlaveCfg>, master_ro: bool) -> Rig {
        let irq = Arc::new(RecordingIrqSink::default());
        let ram = Arc::new(TestRam::new(RAM_SIZE as usize));
        let ctrl = Arc::new(Mutex::new(IdeController::new(
            ram.clone(),
            IsaIrq::new(irq.clone(), 14),
            IsaIrq::new(irq.clone(), 15),
        )));
        let bus = Bus::new("pio");
        IdeController::register_legacy(&ctrl, &bus).expect("legacy ports");
        bus.insert(BM, BUS_MASTER_LEN, BUS_MASTER_RULES, ctrl.clone(), REGION_BUS_MASTER)
            .expect("bus master");
        ctrl.lock()
            .unwrap()
            .set_io_engines(Arc::new(IoEngine::manual("ide0")), Arc::new(IoEngine::manual("ide1")))
            .expect("nothing in flight yet");
        let pattern = |n: usize, salt: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ salt).collect()
        };
        let master_img = pattern((MASTER_SECTORS * SECTOR) as usize, 0x5a);
        let master = Arc::new(Watched::new(master_img.clone(), master_ro));
        let mut disks = [Some(master), None];
        let mut initial = [master_img, Vec::new()];
        if let Some(s) = slave {
            let len = (u64::from(s.sectors % 32) * SECTOR + u64::from(s.tail % 512)) as usize;
            let img = pattern(len, 0xa5);
            disks[1] = Some(Arc::new(Watched::new(img.clone(), s.read_only)));
            initial[1] = img;
        }
        {
            let mut c = ctrl.lock().unwrap();
            for (unit, d) in disks.iter().enumerate() {
                if let Some(d) = d {
                    let backend: Arc<dyn BlockBackend> = d.clone();
                    c.attach_with_config(
                        0,
                        unit,
                        backend,
                        DriveKind::Disk,
                        DiskConfig::qemu_compatible(0, unit),
                    )
                    .expect("attach");
                }
            }
        }
        let dirty = [
            vec![false; disks[0].as_ref().map_or(0, |d| d.sectors as usize)],
            vec![false; disks[1].as_ref().map_or(0, |d| d.sectors as usize)],
        ];
        let mut rig = Rig {
            bus,
            ctrl,
            irq,
            ram,
            disks,
            initial,
            dirty,
            windows: Default::default(),
            ctl: [0; 2],
            levels: [false; 2],
            disk_write_ok: false,
            baseline: Vec::new(),
        };
        rig.baseline = rig.power_state();
        rig.after_op("power-on");
        rig
    }

    // ---- raw port access (no bookkeeping) ----

    fn raw_in(&self, port: u64, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.bus.read_sync(port, &mut d);
        d
    }
    fn raw_inb(&self, port: u64) -> u8 {
        let mut d = [0u8; 1];
        self.bus.read_sync(port, &mut d);
        d[0]
    }
    fn raw_outb(&self, port: u64, v: u8) {
        self.bus.write_sync(port, &[v]);
    }

    // ---- checked access ----

    /// A guest read: device state may change (status read lowers the IRQ, data reads advance).
    fn read(&mut self, port: u64, n: usize) -> Vec<u8> {
        let d = self.raw_in(port, n);
        // A data read can start the next PIO block's job.
        IdeController::drain(&self.ctrl);
        self.disk_write_ok = false;
        self.after_op("read");
        // Secondary channel: nothing attached, every register reads 0 (8-bit reads of the data
        // register are 0xff on any channel, as in QEMU: it has no byte-wide PIO mode).
        if port >= S_CMD && port + n as u64 <= S_CMD + 8 && delivered(port, n) && (port, n) != (S_CMD, 1) {
            assert!(d.iter().all(|&b| b == 0), "empty secondary read {port:#x}/{n} gave {d:x?}");
        }
        // A delivered read of the primary status register lowers the interrupt.
        if delivered(port, n) && in_span(P_CMD + 7, port, n) {
            assert!(!self.levels[0], "IRQ 14 still high after a status read at {port:#x}/{n}");
        }
        d
    }

    fn inb(&mut self, port: u64) -> u8 {
        self.read(port, 1)[0]
    }

    /// A guest write, with the command-window and DMA bookkeeping around it.
    fn write(&mut self, port: u64, data: &[u8]) {
        let n = data.len();
        let ok = delivered(port, n);
        if ok && in_span(P_CMD + 7, port, n) {
            self.prepare_command(port, data);
        }
        let dma_capable = ok
            && (in_span(P_CMD + 7, port, n)
                || in_span(S_CMD + 7, port, n)
                || in_span(BM, port, n)
                || in_span(BM + 8, port, n));
        let before = dma_capable.then(|| (self.ram_snapshot(), self.prd_regs()));
        if port == P_CTL && n == 1 {
            self.ctl_write(0, data[0]);
        } else if port == S_CTL && n == 1 {
            self.ctl[1] = data[0];
        }
        self.bus.write_sync(port, data);
        IdeController::drain(&self.ctrl);
        if let Some((ram, prds)) = before {
            self.check_dma(&ram, prds, port, data);
        }
        self.disk_write_ok = dma_capable || (ok && in_span(P_CMD, port, n));
        self.after_op("write");
    }

    fn outb(&mut self, port: u64, v: u8) {
        self.write(port, &[v]);
    }

    fn ctl_write(&mut self, ch: usize, v: u8) {
        if v & SRST != 0 && self.ctl[ch] & SRST == 0 && ch == 0 {
            // Reset asserted: whatever command was pending is gone.
            self.windows = Default::default();
        }
        self.ctl[ch] = v;
    }

    /// Reads the selected drive's task file (incl. HOB) and status without side effects.
    fn taskfile(&self) -> ([u8; 4], [u8; 4], u8, u8) {
        let status = self.raw_inb(P_CTL);
        let cur = [
            self.raw_inb(P_CMD + 2),
            self.raw_inb(P_CMD + 3),
            self.raw_inb(P_CMD + 4),
            self.raw_inb(P_CMD + 5),
        ];
        let device = self.raw_inb(P_CMD + 6);
        // Same SRST/nIEN bits: no reset edge, no IRQ change.
        self.raw_outb(P_CTL, self.ctl[0] | HOB);
        let hob = [
            self.raw_inb(P_CMD + 2),
            self.raw_inb(P_CMD + 3),
            self.raw_inb(P_CMD + 4),
            self.raw_inb(P_CMD + 5),
        ];
        self.raw_outb(P_CTL, self.ctl[0]);
        (cur, hob, device, status)
    }

    /// Before a write reaching the primary command register: works out which sectors the command
    /// may write and updates the drive's window.
    fn prepare_command(&mut self, port: u64, data: &[u8]) {
        let (mut cur, mut hob, mut device, status) = self.taskfile();
        let unit_before = usize::from(device >> 4 & 1);
        let mut opcode = 0;
        for (i, &b) in data.iter().enumerate() {
            match port + i as u64 - P_CMD {
                r @ 2..=5 => {
                    let k = (r - 2) as usize;
                    hob[k] = cur[k];
                    cur[k] = b;
                }
                6 => device = b | 0xa0,
                7 => opcode = b,
                _ => {}
            }
        }
        let unit = usize::from(device >> 4 & 1);
        let Some(disk) = &self.disks[unit] else { return };
        let cap = disk.sectors;
        let known_idle = unit == unit_before && status & BSY_DRQ == 0;
        if WRITE_CMDS.contains(&opcode) {
            let range = if EXT_CMDS.contains(&opcode) {
                let lba = u64::from_le_bytes([cur[1], cur[2], cur[3], hob[1], hob[2], hob[3], 0, 0]);
                let n = match u64::from(hob[0]) << 8 | u64::from(cur[0]) {
                    0 => 65536,
                    n => n,
                };
                (lba, lba + n)
            } else if device & 0x40 != 0 {
                let lba = u64::from_le_bytes([cur[1], cur[2], cur[3], device & 0x0f, 0, 0, 0, 0]);
                let n = if cur[0] == 0 { 256 } else { u64::from(cur[0]) };
                (lba, lba + n)
            } else {
                (0, cap) // CHS: the translation is the device's business; stay inside the disk.
            };
            if known_idle {
                self.windows[unit] = vec![range];
            } else {
                self.windows[unit].push(range);
            }
        } else if known_idle {
            self.windows[unit].clear();
            if opcode == cmd::EXECUTE_DEVICE_DIAGNOSTIC {
                // Both devices post their signature: nothing may be pending on either (finding 6,
                // fixed: a DMA command queued on the other drive used to survive and run at the
                // next bus-master start).
                self.windows = Default::default();
            }
        }
    }

    // ---- DMA / RAM ----

    fn ram_snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; RAM_SIZE as usize];
        self.ram.read(0, &mut v).expect("RAM");
        v
    }

    fn prd_regs(&self) -> [u32; 2] {
        let r = |o: u64| {
            let d = self.raw_in(BM + o, 4);
            u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        };
        [r(4), r(12)]
    }

    /// Buffers a PRD table at `table` describes, walked like SFF-8038i (dword-aligned, up to EOT,
    /// the table's 64 KiB boundary or the end of RAM), and the end of the walked table.
    fn prd_buffers(ram: &[u8], table: u32, out: &mut Vec<(u64, u64)>) -> u64 {
        let t = u64::from(table & !3);
        let window_end = (t & !0xffff) + 0x1_0000;
        let mut e = t;
        while e + 8 <= window_end && e + 8 <= RAM_SIZE {
            let i = e as usize;
            let v = u64::from_le_bytes(ram[i..i + 8].try_into().unwrap());
            let addr = u64::from(v as u32 & !1);
            let count = match (v >> 32) as u32 & 0xfffe {
                0 => 0x1_0000,
                n => u64::from(n),
            };
            out.push((addr, addr + count));
            e += 8;
            if v & (1 << 63) != 0 {
                break;
            }
        }
        e.min(RAM_SIZE)
    }

    fn check_dma(&self, before: &[u8], prds: [u32; 2], port: u64, data: &[u8]) {
        let after = self.ram_snapshot();
        if after == before {
            return;
        }
        let mut allowed = Vec::new();
        for table in prds.into_iter().chain(self.prd_regs()) {
            let t = u64::from(table & !3).min(RAM_SIZE) as usize;
            let end = Self::prd_buffers(before, table, &mut allowed) as usize;
            if t < end && before[t..end] != after[t..end] {
                // The transfer rewrote its own table while walking it: entries read after that
                // point are not the ones modelled here.
                return;
            }
        }
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if a != b {
                let i = i as u64;
                assert!(
                    allowed.iter().any(|&(s, e)| i >= s && i < e),
                    "DMA changed RAM at {i:#x} ({a:#04x} -> {b:#04x}) outside the PRD buffers {allowed:x?} \
                     (access {port:#x} <- {data:x?}, PRD registers {prds:x?})"
                );
            }
        }
    }

    // ---- invariants after every operation ----

    fn after_op(&mut self, what: &str) {
        for ev in self.irq.take() {
            match ev {
                IrqEvent::Isa(14, l) => self.levels[0] = l,
                IrqEvent::Isa(15, l) => self.levels[1] = l,
                other => panic!("{what}: unexpected interrupt event {other:?}"),
            }
        }
        assert!(!self.levels[1], "{what}: IRQ 15 raised by the empty secondary channel");
        if self.ctl[0] & NIEN != 0 {
            assert!(!self.levels[0], "{what}: IRQ 14 high with nIEN set (ctl {:#04x})", self.ctl[0]);
        }
        for unit in 0..2 {
            let Some(d) = self.disks[unit].clone() else { continue };
            let oob = std::mem::take(&mut *d.oob.lock().unwrap());
            assert!(oob.is_empty(), "{what}: drive {unit} asked the image for {oob:?}");
            let writes = std::mem::take(&mut *d.writes.lock().unwrap());
            for (off, len) in writes {
                let (len, s) = (len as u64, off / SECTOR);
                let n = len / SECTOR;
                assert!(
                    self.disk_write_ok,
                    "{what}: drive {unit} image written ({off:#x}+{len:#x}) by this access"
                );
                assert!(!d.is_read_only(), "{what}: read-only drive {unit} image write {off:#x}+{len:#x}");
                assert!(
                    off % SECTOR == 0 && len % SECTOR == 0 && len > 0,
                    "{what}: drive {unit} partial-sector image write {off:#x}+{len:#x}"
                );
                assert!(
                    s + n <= d.sectors,
                    "{what}: drive {unit} write {off:#x}+{len:#x} past the {} addressable sectors",
                    d.sectors
                );
                assert!(
                    self.windows[unit].iter().any(|&(a, b)| s >= a && s + n <= b),
                    "{what}: drive {unit} wrote sectors {s}..{} outside its write commands' ranges {:?}",
                    s + n,
                    self.windows[unit]
                );
                for x in &mut self.dirty[unit][s as usize..(s + n) as usize] {
                    *x = true;
                }
            }
        }
    }

    /// Ports-only view of the power-on state. Issues IDENTIFY on each drive and resets the
    /// controller afterwards, so it must only be called in (what should be) power-on state.
    fn power_state(&mut self) -> PowerState {
        let mut s = PowerState::new();
        let mut push = |name: String, v: u8| s.push((name, v));
        for (ch, cmd_base, ctl_base) in [(0, P_CMD, P_CTL), (1, S_CMD, S_CTL)] {
            for unit in [1u8, 0] {
                self.raw_outb(cmd_base + 6, 0xa0 | unit << 4);
                push(format!("ch{ch}.{unit} altstatus"), self.raw_inb(ctl_base));
                for r in 1..=6 {
                    push(format!("ch{ch}.{unit} reg{r}"), self.raw_inb(cmd_base + r));
                }
                self.raw_outb(ctl_base, HOB);
                for r in 2..=5 {
                    push(format!("ch{ch}.{unit} hob reg{r}"), self.raw_inb(cmd_base + r));
                }
                self.raw_outb(ctl_base, 0);
            }
            push(format!("ch{ch} status"), self.raw_inb(cmd_base + 7));
        }
        for o in 0..BUS_MASTER_LEN {
            push(format!("bm+{o}"), self.raw_inb(BM + o));
        }
        for ev in self.irq.take() {
            if let IrqEvent::Isa(i @ (14 | 15), l) = ev {
                self.levels[usize::from(i - 14)] = l;
            }
        }
        push("irq14".into(), u8::from(self.levels[0]));
        push("irq15".into(), u8::from(self.levels[1]));
        for unit in 0..2u8 {
            if self.disks[usize::from(unit)].is_none() {
                continue;
            }
            self.raw_outb(P_CMD + 6, 0xa0 | unit << 4);
            self.raw_outb(P_CMD + 7, cmd::IDENTIFY_DEVICE);
            for w in 0..256 {
                let d = self.raw_in(P_CMD, 2);
                push(format!("drive {unit} IDENTIFY word {w} lo"), d[0]);
                push(format!("drive {unit} IDENTIFY word {w} hi"), d[1]);
            }
        }
        self.ctrl.lock().unwrap().reset();
        for ev in self.irq.take() {
            if let IrqEvent::Isa(i @ (14 | 15), l) = ev {
                self.levels[usize::from(i - 14)] = l;
            }
        }
        assert!(!self.levels[0] && !self.levels[1], "IRQ line high after reset");
        s
    }

    fn reset(&mut self) {
        self.ctrl.lock().unwrap().reset();
        self.ctl = [0; 2];
        self.windows = Default::default();
        let now = self.power_state();
        if now != self.baseline {
            let diff: Vec<_> = now
                .iter()
                .zip(&self.baseline)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (&a.0, a.1, b.1))
                .take(8)
                .collect();
            panic!("after reset the state differs from power-on (name, now, power-on): {diff:x?}");
        }
        self.after_op("reset");
    }

    fn finish(&mut self) {
        for unit in 0..2 {
            let Some(d) = &self.disks[unit] else { continue };
            let now = d.img.contents();
            assert_eq!(now.len(), self.initial[unit].len(), "drive {unit} image size changed");
            for (i, (a, b)) in now.iter().zip(&self.initial[unit]).enumerate() {
                let s = i / SECTOR as usize;
                if a != b && !self.dirty[unit].get(s).copied().unwrap_or(false) {
                    panic!("drive {unit} image byte {i:#x} changed without a recorded sector write");
                }
            }
        }
    }

    // ---- structured helpers ----

    fn capacity(&self, unit: usize) -> u64 {
        self.disks[unit].as_ref().map_or(MASTER_SECTORS, |d| d.sectors)
    }

    fn lba_value(&self, unit: usize, lba: Lba) -> u64 {
        let cap = self.capacity(unit);
        match lba {
            Lba::In(x) => u64::from(x) % cap.max(1),
            Lba::NearEnd(k) => cap.saturating_sub(u64::from(k % 16)),
            Lba::PastEnd(k) => cap + u64::from(k),
            Lba::Raw(x) => x,
        }
    }

    fn count_value(count: Count) -> u16 {
        match count {
            Count::Zero => 0,
            Count::One => 1,
            Count::Small(n) => u16::from(n % 20),
            Count::Raw(n) => n,
        }
    }

    /// Loads the task file and writes the command, all through the ports.
    fn command(
        &mut self,
        slave: bool,
        opcode: u8,
        addressing: Addressing,
        lba: u64,
        count: u16,
        feature: u8,
    ) {
        let unit = u8::from(slave);
        match addressing {
            Addressing::Lba48 => {
                self.outb(P_CMD + 6, 0xe0 | unit << 4);
                self.outb(P_CMD + 1, 0);
                self.outb(P_CMD + 2, (count >> 8) as u8);
                self.outb(P_CMD + 3, (lba >> 24) as u8);
                self.outb(P_CMD + 4, (lba >> 32) as u8);
                self.outb(P_CMD + 5, (lba >> 40) as u8);
                self.outb(P_CMD + 1, feature);
                self.outb(P_CMD + 2, count as u8);
                self.outb(P_CMD + 3, lba as u8);
                self.outb(P_CMD + 4, (lba >> 8) as u8);
                self.outb(P_CMD + 5, (lba >> 16) as u8);
            }
            Addressing::Lba28 => {
                self.outb(P_CMD + 6, 0xe0 | unit << 4 | (lba >> 24) as u8 & 0x0f);
                self.outb(P_CMD + 1, feature);
                self.outb(P_CMD + 2, count as u8);
                self.outb(P_CMD + 3, lba as u8);
                self.outb(P_CMD + 4, (lba >> 8) as u8);
                self.outb(P_CMD + 5, (lba >> 16) as u8);
            }
            Addressing::Chs { cyl, head, sector } => {
                self.outb(P_CMD + 6, 0xa0 | unit << 4 | head & 0x0f);
                self.outb(P_CMD + 1, feature);
                self.outb(P_CMD + 2, count as u8);
                self.outb(P_CMD + 3, sector);
                self.outb(P_CMD + 4, cyl as u8);
                self.outb(P_CMD + 5, (cyl >> 8) as u8);
            }
        }
        self.outb(P_CMD + 7, opcode);
    }

    fn write_prd(&mut self, secondary: bool, table: TableAddr, entries: &[PrdEntry]) {
        let n = entries.len().max(1) as u64;
        let t = match table {
            TableAddr::Low(x) => u64::from(x) & 0xfffc,
            TableAddr::Below64k(k) => 0x1_0000 - 8 * (u64::from(k) % n.max(1) + 1),
            TableAddr::NearEnd(k) => RAM_SIZE - 8 * (u64::from(k) % n.max(1) + 1),
            TableAddr::Raw(x) => u64::from(x),
        };
        for (i, e) in entries.iter().enumerate() {
            let addr = match e.addr {
                BufAddr::In(x) => x % RAM_SIZE as u32,
                BufAddr::NearEnd(k) => (RAM_SIZE as u32).wrapping_sub(u32::from(k)),
                BufAddr::Near64k(k) => 0x1_0000u32.wrapping_sub(u32::from(k)),
                BufAddr::Raw(x) => x,
            };
            let count = match e.count {
                ByteCount::Zero => 0,
                ByteCount::Sector(k) => u16::from(k % 129).wrapping_mul(512),
                ByteCount::Odd(k) => k | 1,
                ByteCount::Raw(k) => k,
            };
            let flags = (if e.eot { 0x8000u16 } else { 0 }) | u16::from(e.junk_flags);
            let v = u64::from(addr) | u64::from(count) << 32 | u64::from(flags) << 48;
            // Entries that fall outside RAM are simply not written (the walker must cope).
            let _ = self.ram.write(t.wrapping_add(8 * i as u64), &v.to_le_bytes());
        }
        let base = BM + if secondary { 8 } else { 0 };
        self.write(base + 4, &(t as u32).to_le_bytes());
    }

    fn bm_cmd(&mut self, secondary: bool, v: u8) {
        self.outb(BM + if secondary { 8 } else { 0 }, v);
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = arbitrary::Unstructured::new(data);
    let slave: Option<SlaveCfg> = u.arbitrary()?;
    let master_ro = u.ratio(1, 16)?;
    let mut rig = Rig::new(slave.as_ref(), master_ro);
    let mut ops = 0;
    while !u.is_empty() && ops < 256 {
        ops += 1;
        let op: Op = u.arbitrary()?;
        match op {
            Op::RegWrite { secondary, reg, val } => {
                let base = if secondary { S_CMD } else { P_CMD };
                rig.outb(base + u64::from(reg % 8), val);
            }
            Op::RegRead { secondary, reg } => {
                let base = if secondary { S_CMD } else { P_CMD };
                rig.inb(base + u64::from(reg % 8));
            }
            Op::CmdAccess { secondary, off, size, write, val } => {
                let base = if secondary { S_CMD } else { P_CMD };
                let size = [1usize, 2, 4][usize::from(size % 3)];
                let port = base + u64::from(off % 8);
                if port + size as u64 > base + 8 {
                    continue;
                }
                if write {
                    rig.write(port, &val.to_le_bytes()[..size]);
                } else {
                    rig.read(port, size);
                }
            }
            Op::CtlRead { secondary, off, size } => {
                let base = if secondary { S_CTL } else { P_CTL };
                let port = base - 4 + u64::from(off % 8);
                rig.read(port, [1usize, 2, 4, 8][usize::from(size % 4)]);
            }
            Op::Ctl { secondary, val } => rig.outb(if secondary { S_CTL } else { P_CTL }, val),
            Op::SrstPulse => {
                let keep = rig.ctl[0] & NIEN;
                let unit = usize::from(rig.raw_inb(P_CMD + 6) >> 4 & 1);
                rig.outb(P_CTL, keep | SRST);
                // The selected drive is BSY; an absent slave reads 0.
                let busy = if rig.disks[unit].is_some() { 0x80 } else { 0 };
                assert_eq!(rig.inb(P_CTL), busy, "drive {unit} status while SRST is asserted");
                rig.outb(P_CTL, keep);
                let sig = [P_CMD + 1, P_CMD + 2, P_CMD + 3, P_CMD + 4, P_CMD + 5, P_CMD + 6, P_CTL]
                    .map(|p| rig.raw_inb(p));
                assert_eq!(sig, [0x01, 0x01, 0x01, 0, 0, 0xa0, 0x50], "master signature after SRST");
                assert!(!rig.levels[0], "SRST left IRQ 14 high");
            }
            Op::Select { slave } => rig.outb(P_CMD + 6, 0xa0 | u8::from(slave) << 4),
            Op::Command { slave, op, addressing, lba, count, feature } => {
                let opcode = match op {
                    Opcode::Known(i) => OPCODES[usize::from(i) % OPCODES.len()],
                    Opcode::Raw(x) => x,
                };
                let unit = usize::from(slave);
                let lba = rig.lba_value(unit, lba);
                let mut count = Rig::count_value(count);
                let mut feature = feature;
                if opcode == cmd::SET_FEATURES {
                    feature = FEATURES[usize::from(feature) % FEATURES.len()];
                    if feature == 0x03 {
                        count = u16::from(XFER_MODES[usize::from(count) % XFER_MODES.len()]);
                    }
                }
                rig.command(slave, opcode, addressing, lba, count, feature);
            }
            Op::DataIn { wide, n } => {
                let size = if wide { 4 } else { 2 };
                for _ in 0..n % 1100 {
                    rig.read(P_CMD, size);
                }
            }
            Op::DataOut { wide, n, seed } => {
                let size = if wide { 4 } else { 2 };
                for i in 0..n % 1100 {
                    let v = (u32::from(seed) << 16 | u32::from(i)).to_le_bytes();
                    rig.write(P_CMD, &v[..size]);
                }
            }
            Op::BmAccess { off, size, write, val } => {
                let size = [1usize, 2, 4][usize::from(size % 3)];
                let port = BM + u64::from(off % 16);
                if write {
                    rig.write(port, &val.to_le_bytes()[..size]);
                } else {
                    rig.read(port, size);
                }
            }
            Op::BmStart { secondary, to_memory } => rig.bm_cmd(secondary, 1 | u8::from(to_memory) << 3),
            Op::BmStop { secondary } => rig.bm_cmd(secondary, 0),
            Op::BmStatus { secondary, val } => rig.outb(BM + 2 + if secondary { 8 } else { 0 }, val),
            Op::Prd { secondary, table, entries } => {
                rig.write_prd(secondary, table, &entries[..entries.len().min(64)]);
            }
            Op::Dma { slave, write, ext, lba, count, table, entries, start_first, wrong_direction } => {
                rig.write_prd(false, table, &entries[..entries.len().min(64)]);
                let to_memory = !write ^ wrong_direction;
                rig.bm_cmd(false, 0);
                if start_first {
                    rig.bm_cmd(false, 1 | u8::from(to_memory) << 3);
                }
                let opcode = match (write, ext) {
                    (false, false) => cmd::READ_DMA,
                    (false, true) => cmd::READ_DMA_EXT,
                    (true, false) => cmd::WRITE_DMA,
                    (true, true) => cmd::WRITE_DMA_EXT,
                };
                let unit = usize::from(slave);
                let lba = rig.lba_value(unit, lba);
                let count = Rig::count_value(count);
                let addressing = if ext { Addressing::Lba48 } else { Addressing::Lba28 };
                rig.command(slave, opcode, addressing, lba, count, 0);
                if !start_first {
                    rig.bm_cmd(false, 1 | u8::from(to_memory) << 3);
                }
                rig.read(BM + 2, 1);
                rig.outb(BM + 2, 0x06);
                rig.inb(P_CMD + 7);
            }
            Op::RamPoke { addr, val } => {
                let _ = rig.ram.write(u64::from(addr) % RAM_SIZE, &val.to_le_bytes());
            }
            Op::Reset => rig.reset(),
        }
    }
    rig.finish();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
