//! PIIX3 IDE (00:01.1, 8086:7010) in legacy (compatibility) mode: two channels with two drive
//! slots each, the ISA-style task-file ports and the SFF-8038i bus-master block.
//!
//! Regions served by [`IdeController`] (the PCI function maps the bus-master block at BAR4 and
//! registers it with [`REGION_BUS_MASTER`]; [`IdeController::register_legacy`] maps the rest):
//!
//! | id | region | ports | rules |
//! |----|--------|-------|-------|
//! | 0 [`REGION_PRIMARY_CMD`] | primary command block | 0x1F0..0x1F7 | [`CMD_BLOCK_RULES`] |
//! | 1 [`REGION_PRIMARY_CTL`] | primary alt status / device control | 0x3F6 | [`CTL_RULES`] |
//! | 2 [`REGION_SECONDARY_CMD`] | secondary command block | 0x170..0x177 | [`CMD_BLOCK_RULES`] |
//! | 3 [`REGION_SECONDARY_CTL`] | secondary alt status / device control | 0x376 | [`CTL_RULES`] |
//! | 4 [`REGION_BUS_MASTER`] | bus master, 16 bytes (primary +0..7, secondary +8..15) | BAR4 | [`BUS_MASTER_RULES`] |
//!
//! The data register (+0) takes 16- and 32-bit accesses; the other command-block registers are
//! bytes. Interrupts follow the PC legacy model: a completion raises the channel's ISA line
//! (14/15) unless nIEN is set, and a read of the status register lowers it.
//!
//! Behaviour chosen to match what firmware and Linux's libata probe expect (and what QEMU does):
//! - A channel with no drives reads 0 in every register (libata's device check then fails).
//! - With only a master, the slave slot's status and alternate status read 0 and commands to it
//!   are ignored; its other registers latch writes like real shared task-file registers, and after
//!   reset it holds an ATA signature with error 01h, so libata classifies "ATA with status 0" as no
//!   device instead of probing a phantom.
//! - SRST: while the bit is set every present drive is BSY; when it is cleared the drives post
//!   their signature (count 1, LBA 1, mid/high 00/00 for ATA, 14/EB for ATAPI), error 01h, status
//!   DRDY|DSC, and device 0 is selected. No interrupt (ATA spec; libata polls).
//!
//! ATAPI CD-ROM drives ([`IdeController::attach_cdrom`]) speak the PACKET protocol: after PACKET
//! (feature bit 0 = DMA, byte count limit in LBA mid/high) the drive asks for the 12-byte command
//! packet with DRQ and interrupt reason CoD (no interrupt); data comes in DRQ blocks no longer than
//! the limit (reason IO, size in LBA mid/high, an interrupt each) or through the bus master; the
//! end is reason CoD|IO with DRDY, or ERR with the sense key in the error register. The SCSI/MMC
//! side is [`super::atapi::AtapiDrive`]; media change through [`IdeController::insert_media`] /
//! [`IdeController::eject_media`].
//!
//! Image I/O runs off the vCPU thread, on one [`IoEngine`] worker per channel (`hvmdm-io-ide0`,
//! `hvmdm-io-ide1`): a DMA command (the PRD walk, guest-memory copies and image I/O), each PIO
//! DRQ block of READ/WRITE SECTORS/MULTIPLE, FLUSH CACHE and ATAPI medium reads (PIO and DMA). The
//! register access that starts one only submits a job and returns; meanwhile the drive reads BSY
//! (DRQ clear) and the bus master Active, and every other register of both channels answers at
//! once. The job's completion takes the controller lock, sets the final status/error/count
//! registers and bus-master bits and raises the interrupt exactly as a synchronous command
//! would. The completion reaches the controller through a `Weak` handle that
//! [`IdeController::register_legacy`] (or [`IdeController::enable_async`]) installs; a bare
//! controller without one runs the same jobs synchronously inside the access (unit tests).
//!
//! Resets (SRST, DEVICE RESET, EXECUTE DEVICE DIAGNOSTIC, [`IdeController::reset`], detach) drop
//! the command: each job carries a per-drive generation and a stale completion changes nothing.
//! The host I/O of a job already running still finishes (as a real drive finishes its sector);
//! a write it lands was never acknowledged to the guest. Stopping the bus master mid-transfer
//! clears Active, but the transfer completes (QEMU waits for it at that point instead).
//!
//! Locking: completions take the controller lock, so nothing may wait for the engines while
//! holding it. [`IdeController::drain`] (called by the machine without the lock, before saving
//! state and at shutdown) waits for all in-flight commands. Paths that run under the lock do not
//! wait: [`IdeController::flush_all`] flushes what has been acknowledged, `detach` abandons the
//! drive's command, and a snapshot taken with a command in flight records it as still to be done
//! and re-issues it on restore (see the save/restore notes).

use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;

use super::aio::IoEngine;
use super::ata::{
    cmd, error, status, AtaAction, AtaDisk, AtaError, DiskConfig, DriveKind, SectorIo, SectorXfer, Taskfile,
    SECTOR_SIZE,
};
use super::atapi::{
    AtapiAction, AtapiDrive, AtapiError, AtapiState, CdConfig, CdReader, Sense, CDB_LEN, CD_BLOCK_SIZE,
};
use super::bmdma::{DmaEngine, DmaFailure, DmaFault, PrdCursor};
use super::image::BlockBackend;
use crate::bus::{AccessRules, Bus, BusDevice, BusError, IoResult, RegionId};
use crate::irq::IsaIrq;
use crate::mem::GuestRam;
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

pub const REGION_PRIMARY_CMD: RegionId = 0;
pub const REGION_PRIMARY_CTL: RegionId = 1;
pub const REGION_SECONDARY_CMD: RegionId = 2;
pub const REGION_SECONDARY_CTL: RegionId = 3;
pub const REGION_BUS_MASTER: RegionId = 4;

pub const PRIMARY_CMD_BASE: u64 = 0x1f0;
pub const PRIMARY_CTL_BASE: u64 = 0x3f6;
pub const SECONDARY_CMD_BASE: u64 = 0x170;
pub const SECONDARY_CTL_BASE: u64 = 0x376;
pub const CMD_BLOCK_LEN: u64 = 8;
/// Only +6 of the control block: +7 (drive address) overlaps the floppy controller's DIR.
pub const CTL_LEN: u64 = 1;
pub const BUS_MASTER_LEN: u64 = 16;

/// Command block: bytes, plus 16/32-bit data-register accesses, delivered as issued.
pub const CMD_BLOCK_RULES: AccessRules = AccessRules::new(1, 4, 1, 4);
pub const CTL_RULES: AccessRules = AccessRules::BYTE_ONLY;
/// Bus master: any size 1..4, handled as bytes (the PRD address register assembles its bytes).
pub const BUS_MASTER_RULES: AccessRules = AccessRules::BYTES;

/// The four legacy regions: (base, len, rules, region id).
pub const LEGACY_REGIONS: [(u64, u64, AccessRules, RegionId); 4] = [
    (PRIMARY_CMD_BASE, CMD_BLOCK_LEN, CMD_BLOCK_RULES, REGION_PRIMARY_CMD),
    (PRIMARY_CTL_BASE, CTL_LEN, CTL_RULES, REGION_PRIMARY_CTL),
    (SECONDARY_CMD_BASE, CMD_BLOCK_LEN, CMD_BLOCK_RULES, REGION_SECONDARY_CMD),
    (SECONDARY_CTL_BASE, CTL_LEN, CTL_RULES, REGION_SECONDARY_CTL),
];

// Device control register.
const CTL_NIEN: u8 = 0x02;
const CTL_SRST: u8 = 0x04;
const CTL_HOB: u8 = 0x80;

// Bus-master command / status.
const BM_CMD_START: u8 = 0x01;
/// Set: the controller writes memory (device-to-host, a read command).
const BM_CMD_TO_MEMORY: u8 = 0x08;
const BM_ST_ACTIVE: u8 = 0x01;
const BM_ST_ERROR: u8 = 0x02;
const BM_ST_INTERRUPT: u8 = 0x04;
const BM_ST_DRIVE_DMA: u8 = 0x60;

/// Obsolete device-register bits that always read as one.
const DEV_ALWAYS_ONE: u8 = 0xa0;

#[derive(Debug, Error)]
pub enum IdeError {
    #[error("no IDE slot {channel}:{drive} (channel 0..1, drive 0..1)")]
    BadSlot { channel: usize, drive: usize },
    #[error("IDE slot {channel}:{drive} is already in use")]
    Occupied { channel: usize, drive: usize },
    #[error("IDE slot {channel}:{drive} is empty")]
    Empty { channel: usize, drive: usize },
    #[error("{0:?} drives are not supported yet")]
    Unsupported(DriveKind),
    #[error("flushing IDE slot {channel}:{drive} failed")]
    Flush { channel: usize, drive: usize },
    #[error("IDE slot {channel}:{drive} is not a CD-ROM drive")]
    NotCdrom { channel: usize, drive: usize },
    #[error("the CD-ROM tray of IDE slot {channel}:{drive} is locked by the guest")]
    Locked { channel: usize, drive: usize },
    #[error("IDE I/O is in flight")]
    Busy,
}

/// What occupies a slot: an ATA disk, or an ATAPI CD-ROM drive (with or without a medium).
#[derive(Debug)]
enum Media {
    Disk(AtaDisk),
    Cdrom(AtapiDrive),
}

impl Media {
    fn kind(&self) -> DriveKind {
        match self {
            Media::Disk(_) => DriveKind::Disk,
            Media::Cdrom(_) => DriveKind::Cdrom,
        }
    }
    fn backend(&self) -> Option<&Arc<dyn BlockBackend>> {
        match self {
            Media::Disk(d) => Some(d.backend()),
            Media::Cdrom(cd) => cd.media(),
        }
    }
}

/// ATAPI interrupt reason (sector count register): command/data and direction bits.
const IREASON_COD: u8 = 0x01;
const IREASON_IO: u8 = 0x02;
/// Byte count limit 0 is not valid for PIO; take the largest even value (as QEMU does).
const DEFAULT_BYTE_LIMIT: usize = 0xfffe;

/// The data of an ATAPI command still to be delivered: reply bytes or medium bytes already read
/// (`pending`), then `blocks` medium blocks from `lba`.
#[derive(Debug, Clone, Default)]
struct CdStream {
    pending: Vec<u8>,
    lba: u64,
    blocks: u32,
    /// PIO byte count limit from LBA mid/high at PACKET time (DRQ blocks are at most this long).
    limit: u16,
}

impl CdStream {
    fn remaining(&self) -> usize {
        self.pending.len() + self.blocks as usize * CD_BLOCK_SIZE
    }

    /// Size of the next PIO DRQ block under the byte count limit (even unless it is the last).
    fn pio_chunk(&self) -> usize {
        let rem = self.remaining();
        let limit = if self.limit == 0 { DEFAULT_BYTE_LIMIT } else { usize::from(self.limit) };
        let n = rem.min(limit);
        if n < rem {
            (n & !1).max(2)
        } else {
            n
        }
    }

    /// The next `n` bytes, reading medium blocks as needed. Fails with the sense to report.
    fn take(&mut self, cd: &CdReader, n: usize) -> Result<Vec<u8>, Sense> {
        let n = n.min(self.remaining());
        while self.pending.len() < n && self.blocks > 0 {
            let want = (n - self.pending.len()).div_ceil(CD_BLOCK_SIZE).min(self.blocks as usize);
            let start = self.pending.len();
            self.pending.resize(start + want * CD_BLOCK_SIZE, 0);
            cd.read_blocks(self.lba, &mut self.pending[start..])?;
            self.lba += want as u64;
            self.blocks -= want as u32;
        }
        let rest = self.pending.split_off(n);
        Ok(std::mem::replace(&mut self.pending, rest))
    }
}

/// PIO data phase of the selected drive.
#[derive(Debug, Default)]
enum Pio {
    #[default]
    Idle,
    /// Device to host: `buf` is the current DRQ block; `rest` is what follows it.
    In { buf: Vec<u8>, pos: usize, rest: Option<SectorXfer> },
    /// Host to device: `buf` fills up, then goes to `xfer.lba`.
    Out { buf: Vec<u8>, pos: usize, xfer: SectorXfer },
    /// ATAPI: the 12-byte command packet after PACKET; `dma` is feature bit 0.
    Cdb { buf: Vec<u8>, pos: usize, dma: bool, limit: u16 },
    /// ATAPI device-to-host data: `buf` is the current DRQ block, `stream` what follows.
    PacketIn { buf: Vec<u8>, pos: usize, stream: CdStream },
    /// A job is in flight on the I/O engine (the drive is BSY); what it does, so that a snapshot
    /// can re-issue it.
    Busy(Redo),
}

/// The non-DMA work of a command in flight, as it stood when the job was submitted.
#[derive(Debug, Clone)]
enum Redo {
    /// PIO read: the next DRQ block of `xfer` is being read.
    DiskRead(SectorXfer),
    /// PIO write: `buf` (one DRQ block) is being written at `xfer.lba`.
    DiskWrite { buf: Vec<u8>, xfer: SectorXfer },
    /// FLUSH CACHE (EXT).
    Flush,
    /// ATAPI PIO: the next `n` bytes of `stream` are being read from the medium.
    CdRead { stream: CdStream, n: usize },
}

/// Status while a job is in flight: BSY (the other bits are not valid then), DRQ clear.
const STATUS_IO_BUSY: u8 = status::BSY | status::DRDY | status::DSC;
/// Jobs a channel may have queued (one live per drive plus ones orphaned by resets) before new
/// commands fail with ABRT instead of growing the queue behind a stuck image.
const MAX_QUEUED_JOBS: usize = 16;

#[derive(Debug, Default)]
struct Drive {
    tf: Taskfile,
    status: u8,
    error: u8,
    media: Option<Media>,
    pio: Pio,
    /// Generation of the job in flight for this drive; a completion with another one is stale.
    pending: Option<u64>,
}

impl Drive {
    /// Post-reset register state (power-on, SRST release, EXECUTE DEVICE DIAGNOSTIC).
    fn post_signature(&mut self) {
        self.tf.set_signature(self.media.as_ref().map_or(DriveKind::Disk, Media::kind));
        self.error = error::DIAG_PASSED;
        self.status = match &self.media {
            Some(Media::Disk(_)) => status::DRDY | status::DSC,
            // Packet devices post their signature with DRDY clear (ATA/ATAPI-6 9.10).
            Some(Media::Cdrom(_)) | None => 0,
        };
        self.pio = Pio::Idle;
        self.pending = None;
    }

    fn fail(&mut self, e: AtaError) {
        self.pio = Pio::Idle;
        self.pending = None;
        self.status = status::DRDY | status::ERR;
        self.error = e.error_bits();
    }
}

/// What a DMA command moves.
#[derive(Debug, Clone)]
enum DmaWork {
    Ata(SectorXfer),
    /// ATAPI data-in (device to memory).
    Atapi(CdStream),
}

/// A DMA command waiting for the bus-master engine, or running (then its drive has a job
/// pending and this is what a snapshot re-issues).
#[derive(Debug, Clone)]
struct DmaJob {
    unit: usize,
    work: DmaWork,
}

/// A job for the I/O worker: everything it needs, detached from the controller.
enum Work {
    DiskDma { io: SectorIo, engine: DmaEngine },
    CdDma { reader: CdReader, stream: CdStream, prd: u32 },
    DiskRead { io: SectorIo, xfer: SectorXfer },
    DiskWrite { io: SectorIo, xfer: SectorXfer, buf: Vec<u8> },
    Flush { io: SectorIo },
    CdRead { reader: CdReader, stream: CdStream, n: usize },
}

/// Why an ATAPI DMA transfer stopped.
enum CdFailure {
    Medium(Sense),
    Bus(DmaFault),
}

/// A finished job's result, applied under the controller lock.
enum Done {
    DiskDma {
        next_lba: u64,
        ext: bool,
        result: Result<(), DmaFailure>,
    },
    CdDma(Result<(), CdFailure>),
    /// `xfer` advanced past the block read.
    DiskRead {
        xfer: SectorXfer,
        result: Result<Vec<u8>, AtaError>,
    },
    /// `xfer` advanced past the block written.
    DiskWrite {
        xfer: SectorXfer,
        result: Result<(), AtaError>,
    },
    Flush(Result<(), AtaError>),
    CdRead {
        stream: CdStream,
        result: Result<Vec<u8>, Sense>,
    },
    /// The engine did not take the job (queue limit, no thread): the command fails.
    Refused,
}

/// Runs on the I/O worker, with no lock held.
fn perform(work: Work, mem: &dyn GuestRam) -> Done {
    match work {
        Work::DiskDma { io, mut engine } => {
            let result = engine.run(mem, &io);
            Done::DiskDma { next_lba: engine.next_lba(), ext: engine.xfer().ext, result }
        }
        Work::CdDma { reader, stream, prd } => Done::CdDma(cd_dma(mem, &reader, stream, prd)),
        Work::DiskRead { io, mut xfer } => {
            let n = xfer.block.min(xfer.count);
            let mut buf = vec![0; n as usize * SECTOR_SIZE];
            let result = io.read_sectors(xfer.lba, &mut buf).map(|()| buf);
            if result.is_ok() {
                xfer.lba += u64::from(n);
                xfer.count -= n;
            }
            Done::DiskRead { xfer, result }
        }
        Work::DiskWrite { io, mut xfer, buf } => {
            let result = io.write_sectors(xfer.lba, &buf);
            if result.is_ok() {
                let n = (buf.len() / SECTOR_SIZE) as u32;
                xfer.lba += u64::from(n);
                xfer.count = xfer.count.saturating_sub(n);
            }
            Done::DiskWrite { xfer, result }
        }
        Work::Flush { io } => Done::Flush(io.flush()),
        Work::CdRead { reader, mut stream, n } => {
            let result = stream.take(&reader, n);
            Done::CdRead { stream, result }
        }
    }
}

/// Moves an ATAPI command's data into the PRD buffers, 64 KiB at a time.
fn cd_dma(mem: &dyn GuestRam, reader: &CdReader, mut stream: CdStream, prd: u32) -> Result<(), CdFailure> {
    let mut cursor = PrdCursor::new(prd);
    while stream.remaining() > 0 {
        let n = stream.remaining().min(DMA_CHUNK);
        let buf = stream.take(reader, n).map_err(CdFailure::Medium)?;
        let mut off = 0;
        while off < buf.len() {
            let (gpa, len) = cursor.next_segment(mem, buf.len() - off).map_err(CdFailure::Bus)?;
            mem.write(gpa, &buf[off..off + len])
                .map_err(|_| CdFailure::Bus(DmaFault::BufferNotRam { gpa, len }))?;
            off += len;
        }
    }
    Ok(())
}

struct Channel {
    index: usize,
    drives: [Drive; 2],
    unit: usize,
    ctl: u8,
    irq: IsaIrq,
    irq_pending: bool,
    irq_level: bool,
    bm_cmd: u8,
    bm_status: u8,
    bm_prd: u32,
    dma: Option<DmaJob>,
    mem: Arc<dyn GuestRam>,
    engine: Arc<IoEngine>,
    /// How a job's completion finds the controller; empty for a bare controller (synchronous).
    ctrl: Weak<Mutex<IdeController>>,
    /// Last job generation handed out.
    next_gen: u64,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("index", &self.index)
            .field("drives", &self.drives)
            .field("unit", &self.unit)
            .field("ctl", &self.ctl)
            .field("bm", &(self.bm_cmd, self.bm_status, self.bm_prd))
            .field("dma", &self.dma)
            .field("engine", &self.engine)
            .finish()
    }
}

impl Channel {
    fn new(index: usize, irq: IsaIrq, mem: Arc<dyn GuestRam>) -> Self {
        Channel {
            index,
            drives: Default::default(),
            unit: 0,
            ctl: 0,
            irq,
            irq_pending: false,
            irq_level: false,
            bm_cmd: 0,
            bm_status: 0,
            bm_prd: 0,
            dma: None,
            mem,
            engine: Arc::new(IoEngine::new(&format!("ide{index}"))),
            ctrl: Weak::new(),
            next_gen: 0,
        }
    }

    fn reset(&mut self) {
        for d in &mut self.drives {
            match &mut d.media {
                Some(Media::Disk(disk)) => disk.reset(),
                Some(Media::Cdrom(cd)) => cd.reset(),
                None => {}
            }
            d.tf = Taskfile { device: DEV_ALWAYS_ONE, ..Default::default() };
            d.post_signature();
        }
        self.unit = 0;
        self.ctl = 0;
        self.bm_cmd = 0;
        self.bm_status = 0;
        self.bm_prd = 0;
        self.dma = None;
        self.irq_pending = false;
        self.irq_level = false;
        self.irq.set_level(false);
    }

    fn empty(&self) -> bool {
        self.drives.iter().all(|d| d.media.is_none())
    }

    /// Whether the bus master is moving data for a command (its job is in flight).
    fn dma_in_flight(&self) -> bool {
        self.dma.as_ref().is_some_and(|j| self.drives[j.unit].pending.is_some())
    }

    fn update_irq(&mut self) {
        let level = self.irq_pending && self.ctl & CTL_NIEN == 0;
        if level && !self.irq_level {
            // The bus-master interrupt bit latches the drive's INTRQ assertion.
            self.bm_status |= BM_ST_INTERRUPT;
        }
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    fn raise_irq(&mut self) {
        self.irq_pending = true;
        if self.ctl & CTL_NIEN == 0 {
            self.bm_status |= BM_ST_INTERRUPT;
        }
        self.update_irq();
    }

    fn lower_irq(&mut self) {
        self.irq_pending = false;
        self.update_irq();
    }

    fn status_value(&self) -> u8 {
        let d = &self.drives[self.unit];
        if d.media.is_none() {
            0
        } else {
            d.status
        }
    }

    // ---- deferred I/O ----

    /// Hands `work` to the channel's I/O engine; the drive is BSY until [`Self::complete`].
    fn start_io(&mut self, unit: usize, work: Work) {
        self.next_gen += 1;
        let gen = self.next_gen;
        let d = &mut self.drives[unit];
        d.pending = Some(gen);
        d.status = STATUS_IO_BUSY;
        if self.ctrl.strong_count() == 0 {
            // A bare controller (not behind the shared handle): run it here.
            let done = perform(work, &*self.mem);
            return self.complete(unit, gen, done);
        }
        let ch = self.index;
        if self.engine.in_flight() >= MAX_QUEUED_JOBS {
            warn_limited!(format!("ide{ch}-queue"), "ide{ch}.{unit}: I/O queue full, command aborted");
            return self.complete(unit, gen, Done::Refused);
        }
        let (ctrl, mem) = (self.ctrl.clone(), self.mem.clone());
        let job = Box::new(move || {
            let done = perform(work, &*mem);
            if let Some(c) = ctrl.upgrade() {
                c.lock().unwrap_or_else(|p| p.into_inner()).channels[ch].complete(unit, gen, done);
            }
        });
        if let Err(e) = self.engine.submit(job) {
            log::error!("ide{ch}.{unit}: {e}");
            self.complete(unit, gen, Done::Refused);
        }
    }

    /// Starts the non-DMA job `redo` for `unit` (also used to re-issue one after a restore).
    fn start_redo(&mut self, unit: usize, redo: Redo) {
        let d = &mut self.drives[unit];
        let work = match (&d.media, &redo) {
            (Some(Media::Disk(disk)), Redo::DiskRead(x)) => Work::DiskRead { io: disk.sector_io(), xfer: *x },
            (Some(Media::Disk(disk)), Redo::DiskWrite { buf, xfer }) => {
                Work::DiskWrite { io: disk.sector_io(), xfer: *xfer, buf: buf.clone() }
            }
            (Some(Media::Disk(disk)), Redo::Flush) => Work::Flush { io: disk.sector_io() },
            (Some(Media::Cdrom(cd)), Redo::CdRead { stream, n }) => {
                Work::CdRead { reader: cd.reader(), stream: stream.clone(), n: *n }
            }
            _ => return,
        };
        d.pio = Pio::Busy(redo);
        self.start_io(unit, work);
    }

    /// Runs the queued DMA command on the I/O engine (bus master started, command issued).
    fn start_dma(&mut self) {
        let Some(job) = &self.dma else { return };
        let unit = job.unit;
        if self.drives[unit].pending.is_some() {
            return;
        }
        let ch = self.index;
        let to_memory = self.bm_cmd & BM_CMD_TO_MEMORY != 0;
        let work = match (&job.work, &self.drives[unit].media) {
            (DmaWork::Ata(x), Some(Media::Disk(disk))) => {
                if to_memory == x.write {
                    warn_limited!(
                        format!("ide{ch}-bm-dir"),
                        "ide{ch}: bus-master direction bit disagrees with the command; following the command"
                    );
                }
                Work::DiskDma { io: disk.sector_io(), engine: DmaEngine::new(*x, self.bm_prd) }
            }
            (DmaWork::Atapi(stream), Some(Media::Cdrom(cd))) => {
                if !to_memory {
                    warn_limited!(
                        format!("ide{ch}-bm-dir"),
                        "ide{ch}: bus-master direction bit disagrees with the command; following the command"
                    );
                }
                Work::CdDma { reader: cd.reader(), stream: stream.clone(), prd: self.bm_prd }
            }
            _ => {
                self.dma = None;
                return;
            }
        };
        self.start_io(unit, work);
    }

    /// Applies a job's result: final registers and the interrupt. Stale results (the drive was
    /// reset or the job re-issued since) change nothing.
    fn complete(&mut self, unit: usize, gen: u64, done: Done) {
        let ch = self.index;
        let d = &mut self.drives[unit];
        if d.pending != Some(gen) {
            log::debug!("ide{ch}.{unit}: dropping the completion of an abandoned command");
            return;
        }
        d.pending = None;
        d.pio = Pio::Idle;
        match done {
            Done::DiskDma { next_lba, ext, result } => {
                self.dma = None;
                let d = &mut self.drives[unit];
                let Some(Media::Disk(disk)) = &d.media else { return };
                disk.set_address(&mut d.tf, next_lba, ext);
                match result {
                    Ok(()) => d.status = status::DRDY | status::DSC,
                    Err(DmaFailure::Device(e)) => d.fail(e),
                    Err(DmaFailure::Bus(f)) => {
                        warn_limited!(format!("ide{ch}-dma-fault"), "ide{ch}.{unit}: DMA failed: {f}");
                        self.bm_status |= BM_ST_ERROR;
                        d.fail(AtaError::Abort);
                    }
                }
                self.bm_status &= !BM_ST_ACTIVE;
                self.raise_irq();
            }
            Done::CdDma(result) => {
                self.dma = None;
                let failed = match result {
                    Ok(()) => false,
                    Err(CdFailure::Medium(s)) => {
                        if let Some(Media::Cdrom(cd)) = &mut self.drives[unit].media {
                            cd.set_sense(s);
                        }
                        true
                    }
                    Err(CdFailure::Bus(f)) => {
                        warn_limited!(format!("ide{ch}-dma-fault"), "ide{ch}.{unit}: ATAPI DMA failed: {f}");
                        self.bm_status |= BM_ST_ERROR;
                        // Sense stays "no sense": the error register reads ABRT.
                        true
                    }
                };
                self.bm_status &= !BM_ST_ACTIVE;
                self.packet_done(unit, failed);
            }
            Done::DiskRead { xfer, result } => {
                let Some(Media::Disk(disk)) = &d.media else { return };
                match result {
                    Ok(buf) => {
                        disk.set_address(&mut d.tf, xfer.lba, xfer.ext);
                        d.pio = Pio::In { buf, pos: 0, rest: Some(xfer) };
                        d.status = status::DRDY | status::DSC | status::DRQ;
                    }
                    Err(e) => d.fail(e),
                }
                self.raise_irq();
            }
            Done::DiskWrite { xfer, result } => {
                let Some(Media::Disk(disk)) = &d.media else { return };
                match result {
                    Ok(()) => {
                        disk.set_address(&mut d.tf, xfer.lba, xfer.ext);
                        if xfer.count > 0 {
                            let n = xfer.block.min(xfer.count) as usize;
                            d.pio = Pio::Out { buf: vec![0; n * SECTOR_SIZE], pos: 0, xfer };
                            d.status = status::DRDY | status::DSC | status::DRQ;
                        } else {
                            d.status = status::DRDY | status::DSC;
                        }
                    }
                    Err(e) => d.fail(e),
                }
                self.raise_irq();
            }
            Done::Flush(result) => {
                match result {
                    Ok(()) => d.status = status::DRDY | status::DSC,
                    Err(e) => d.fail(e),
                }
                self.raise_irq();
            }
            Done::CdRead { stream, result } => match result {
                Ok(buf) => self.packet_pio_block(unit, buf, stream),
                Err(s) => {
                    if let Some(Media::Cdrom(cd)) = &mut d.media {
                        cd.set_sense(s);
                    }
                    self.packet_done(unit, true);
                }
            },
            Done::Refused => {
                if self.dma.as_ref().is_some_and(|j| j.unit == unit) {
                    self.dma = None;
                    self.bm_status &= !BM_ST_ACTIVE;
                }
                let d = &mut self.drives[unit];
                match &mut d.media {
                    Some(Media::Cdrom(cd)) => {
                        cd.set_sense(Sense::READ_ERROR);
                        self.packet_done(unit, true);
                    }
                    Some(Media::Disk(_)) => {
                        d.fail(AtaError::Abort);
                        self.raise_irq();
                    }
                    None => {}
                }
            }
        }
    }

    // ---- command block ----

    fn read_reg(&mut self, reg: u64) -> u8 {
        if self.empty() {
            if reg == 7 {
                self.lower_irq();
            }
            return 0;
        }
        let hob = self.ctl & CTL_HOB != 0;
        let d = &self.drives[self.unit];
        let tf = &d.tf;
        match reg {
            1 if hob => tf.hob_feature,
            1 => d.error,
            2 if hob => tf.hob_count,
            2 => tf.count,
            3 if hob => tf.hob_lba_low,
            3 => tf.lba_low,
            4 if hob => tf.hob_lba_mid,
            4 => tf.lba_mid,
            5 if hob => tf.hob_lba_high,
            5 => tf.lba_high,
            6 => tf.device,
            _ => {
                let v = self.status_value();
                self.lower_irq();
                v
            }
        }
    }

    fn write_reg(&mut self, reg: u64, v: u8) {
        // Any command-block write clears HOB (ATA-6 device control).
        self.ctl &= !CTL_HOB;
        // Both devices latch task-file writes; only the selected one executes commands.
        for d in &mut self.drives {
            let tf = &mut d.tf;
            match reg {
                1 => (tf.hob_feature, tf.feature) = (tf.feature, v),
                2 => (tf.hob_count, tf.count) = (tf.count, v),
                3 => (tf.hob_lba_low, tf.lba_low) = (tf.lba_low, v),
                4 => (tf.hob_lba_mid, tf.lba_mid) = (tf.lba_mid, v),
                5 => (tf.hob_lba_high, tf.lba_high) = (tf.lba_high, v),
                6 => tf.device = v | DEV_ALWAYS_ONE,
                _ => {}
            }
        }
        match reg {
            6 => self.unit = usize::from(v >> 4 & 1),
            7 => self.exec_command(v),
            _ => {}
        }
    }

    /// A DMA command for `unit` while the bus master is busy with another drive's fails (one
    /// engine per channel).
    fn queue_dma(&mut self, unit: usize, work: DmaWork) {
        let ch = self.index;
        if self.dma_in_flight() {
            warn_limited!(
                format!("ide{ch}-dma-busy"),
                "ide{ch}.{unit}: DMA command while the bus master is busy"
            );
            match &self.drives[unit].media {
                Some(Media::Cdrom(_)) => self.packet_done(unit, true),
                _ => {
                    self.drives[unit].fail(AtaError::Abort);
                    self.raise_irq();
                }
            }
            return;
        }
        self.drives[unit].status = status::DRDY | status::DSC | status::DRQ;
        self.dma = Some(DmaJob { unit, work });
        if self.bm_cmd & BM_CMD_START != 0 {
            self.start_dma();
        }
    }

    fn exec_command(&mut self, command: u8) {
        let ch = self.index;
        let unit = self.unit;
        let d = &mut self.drives[unit];
        let Some(media) = d.media.as_mut() else {
            // Commands to an absent device go nowhere.
            return;
        };
        // DEVICE RESET is how a host recovers a packet device stuck in a data phase.
        let cd_reset = command == cmd::DEVICE_RESET && matches!(media, Media::Cdrom(_));
        if d.status & (status::BSY | status::DRQ) != 0 && !cd_reset {
            warn_limited!(
                format!("ide{ch}-busy-cmd"),
                "ide{ch}.{unit}: command {command:#04x} while busy (status {:#04x}) ignored",
                d.status
            );
            return;
        }
        d.tf.command = command;
        d.error = 0;
        d.pio = Pio::Idle;
        let disk = match media {
            Media::Disk(disk) => disk,
            Media::Cdrom(_) => return self.exec_packet_device_command(command),
        };
        if matches!(command, cmd::FLUSH_CACHE | cmd::FLUSH_CACHE_EXT) {
            // fdatasync can take long: on the worker.
            return self.start_redo(unit, Redo::Flush);
        }
        match disk.execute(&mut d.tf) {
            Ok(AtaAction::Complete) => {
                d.status = status::DRDY | status::DSC;
                self.raise_irq();
            }
            Ok(AtaAction::DataIn(buf)) => {
                d.pio = Pio::In { buf, pos: 0, rest: None };
                d.status = status::DRDY | status::DSC | status::DRQ;
                self.raise_irq();
            }
            Ok(AtaAction::Diagnostic) => {
                // Resets both devices: nothing queued on the channel survives it (fuzz finding 6:
                // a DMA job armed before the diagnostic must not run when the engine starts).
                for dr in &mut self.drives {
                    dr.post_signature();
                }
                self.dma = None;
                self.raise_irq();
            }
            Ok(AtaAction::Transfer(x)) if x.dma => self.queue_dma(unit, DmaWork::Ata(x)),
            Ok(AtaAction::Transfer(x)) if x.write => {
                let n = x.block.min(x.count) as usize;
                d.pio = Pio::Out { buf: vec![0; n * SECTOR_SIZE], pos: 0, xfer: x };
                // The first block of a PIO write is requested without an interrupt.
                d.status = status::DRDY | status::DSC | status::DRQ;
            }
            Ok(AtaAction::Transfer(x)) => self.start_redo(unit, Redo::DiskRead(x)),
            Err(e) => {
                d.fail(e);
                self.raise_irq();
            }
        }
    }

    /// The ATA commands of a packet device (ATA/ATAPI-7 "PACKET command feature set").
    fn exec_packet_device_command(&mut self, command: u8) {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        let Some(Media::Cdrom(cd)) = &mut d.media else { return };
        match command {
            cmd::PACKET => {
                // Overlapped/queued packet commands are not supported.
                if d.tf.feature & 0x02 != 0 {
                    d.fail(AtaError::Abort);
                    return self.raise_irq();
                }
                let limit = u16::from(d.tf.lba_high) << 8 | u16::from(d.tf.lba_mid);
                let dma = d.tf.feature & 0x01 != 0;
                d.pio = Pio::Cdb { buf: vec![0; CDB_LEN], pos: 0, dma, limit };
                d.tf.count = (d.tf.count & !(IREASON_COD | IREASON_IO)) | IREASON_COD;
                // DRQ without an interrupt: IDENTIFY PACKET DEVICE word 0 says "DRQ within 50 µs".
                d.status = status::DRDY | status::DSC | status::DRQ;
            }
            cmd::IDENTIFY_PACKET_DEVICE => {
                d.pio = Pio::In { buf: cd.identify_packet().to_vec(), pos: 0, rest: None };
                d.status = status::DRDY | status::DSC | status::DRQ;
                self.raise_irq();
            }
            cmd::DEVICE_RESET => {
                // Aborts whatever the device was doing (a job in flight becomes stale); posts the
                // signature, no interrupt.
                if self.dma.as_ref().is_some_and(|j| j.unit == unit) {
                    if self.dma_in_flight() {
                        self.bm_status &= !BM_ST_ACTIVE;
                    }
                    self.dma = None;
                }
                self.drives[unit].post_signature();
            }
            cmd::EXECUTE_DEVICE_DIAGNOSTIC => {
                for dr in &mut self.drives {
                    dr.post_signature();
                }
                self.dma = None;
                self.raise_irq();
            }
            cmd::SET_FEATURES => {
                if cd.set_features(d.tf.feature, d.tf.count) {
                    d.status = status::DRDY | status::DSC;
                } else {
                    d.fail(AtaError::Abort);
                }
                self.raise_irq();
            }
            cmd::CHECK_POWER_MODE => {
                d.tf.count = 0xff;
                d.status = status::DRDY | status::DSC;
                self.raise_irq();
            }
            cmd::STANDBY_IMMEDIATE
            | cmd::IDLE_IMMEDIATE
            | cmd::STANDBY
            | cmd::IDLE
            | cmd::SLEEP
            | cmd::FLUSH_CACHE => {
                d.status = status::DRDY | status::DSC;
                self.raise_irq();
            }
            // Firmware and drivers tell packet devices apart by these aborting with the ATAPI
            // signature in the registers.
            cmd::IDENTIFY_DEVICE | cmd::READ_SECTORS | cmd::READ_SECTORS_NORETRY => {
                d.tf.set_signature(DriveKind::Cdrom);
                d.fail(AtaError::Abort);
                self.raise_irq();
            }
            _ => {
                d.fail(AtaError::Abort);
                self.raise_irq();
            }
        }
    }

    /// Ends a packet command: interrupt reason "status", good or CHECK CONDITION status.
    fn packet_done(&mut self, unit: usize, check_condition: bool) {
        let d = &mut self.drives[unit];
        d.pio = Pio::Idle;
        d.pending = None;
        d.tf.count = (d.tf.count & !(IREASON_COD | IREASON_IO)) | IREASON_COD | IREASON_IO;
        if check_condition {
            d.error = match &d.media {
                Some(Media::Cdrom(cd)) => cd.error_register(),
                _ => error::ABRT,
            };
            d.status = status::DRDY | status::ERR;
        } else {
            d.error = 0;
            d.status = status::DRDY | status::DSC;
        }
        self.raise_irq();
    }

    /// The command packet is complete: run it and start its data phase.
    fn run_packet(&mut self, cdb: &[u8], dma: bool, limit: u16) {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        let Some(Media::Cdrom(cd)) = &mut d.media else { return };
        let stream = match cd.execute(cdb) {
            AtapiAction::Complete => return self.packet_done(unit, false),
            AtapiAction::CheckCondition => return self.packet_done(unit, true),
            AtapiAction::DataIn(pending) => CdStream { pending, lba: 0, blocks: 0, limit },
            AtapiAction::Read { lba, blocks } => {
                CdStream { pending: Vec::new(), lba: u64::from(lba), blocks, limit }
            }
        };
        if dma {
            d.pio = Pio::Idle;
            d.tf.count = (d.tf.count & !(IREASON_COD | IREASON_IO)) | IREASON_IO;
            self.queue_dma(unit, DmaWork::Atapi(stream));
        } else {
            self.packet_pio_next(unit, stream);
        }
    }

    /// Loads the next PIO DRQ block of a packet command (on the worker if the medium must be
    /// read), or ends it.
    fn packet_pio_next(&mut self, unit: usize, mut stream: CdStream) {
        let d = &mut self.drives[unit];
        let Some(Media::Cdrom(cd)) = &mut d.media else { return };
        if stream.remaining() == 0 {
            return self.packet_done(unit, false);
        }
        let n = stream.pio_chunk();
        if stream.pending.len() < n {
            return self.start_redo(unit, Redo::CdRead { stream, n });
        }
        match stream.take(&cd.reader(), n) {
            Ok(buf) => self.packet_pio_block(unit, buf, stream),
            Err(s) => {
                cd.set_sense(s);
                self.packet_done(unit, true)
            }
        }
    }

    /// Offers `buf` as the next ATAPI DRQ block (byte count in LBA mid/high), with an interrupt.
    fn packet_pio_block(&mut self, unit: usize, buf: Vec<u8>, stream: CdStream) {
        let d = &mut self.drives[unit];
        let n = buf.len();
        d.tf.lba_mid = n as u8;
        d.tf.lba_high = (n >> 8) as u8;
        d.tf.count = (d.tf.count & !(IREASON_COD | IREASON_IO)) | IREASON_IO;
        d.pio = Pio::PacketIn { buf, pos: 0, stream };
        d.status = status::DRDY | status::DSC | status::DRQ;
        self.raise_irq();
    }

    fn data_read(&mut self, out: &mut [u8]) {
        out.fill(0);
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if d.media.is_none() || d.status & status::DRQ == 0 {
            return;
        }
        if let Pio::PacketIn { buf, pos, stream } = &mut d.pio {
            // A DRQ block may have an odd length: the last access is padded with zeros.
            let n = out.len().min(buf.len() - *pos);
            out[..n].copy_from_slice(&buf[*pos..*pos + n]);
            *pos += n;
            if *pos >= buf.len() {
                let stream = std::mem::take(stream);
                self.packet_pio_next(unit, stream);
            }
            return;
        }
        let Pio::In { buf, pos, rest } = &mut d.pio else { return };
        let n = out.len();
        if *pos + n > buf.len() {
            return;
        }
        out.copy_from_slice(&buf[*pos..*pos + n]);
        *pos += n;
        if *pos < buf.len() {
            return;
        }
        match rest.take() {
            Some(x) if x.count > 0 => self.start_redo(unit, Redo::DiskRead(x)),
            // Last block read: no interrupt at the end of a PIO data-in command.
            _ => {
                d.pio = Pio::Idle;
                d.status = status::DRDY | status::DSC;
            }
        }
    }

    fn data_write(&mut self, data: &[u8]) {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if d.media.is_none() || d.status & status::DRQ == 0 {
            return;
        }
        if let Pio::Cdb { buf, pos, dma, limit } = &mut d.pio {
            let n = data.len().min(buf.len() - *pos);
            buf[*pos..*pos + n].copy_from_slice(&data[..n]);
            *pos += n;
            if *pos >= buf.len() {
                let (cdb, dma, limit) = (std::mem::take(buf), *dma, *limit);
                d.pio = Pio::Idle;
                self.run_packet(&cdb, dma, limit);
            }
            return;
        }
        let Pio::Out { buf, pos, xfer } = &mut d.pio else { return };
        let n = data.len();
        if *pos + n > buf.len() {
            return;
        }
        buf[*pos..*pos + n].copy_from_slice(data);
        *pos += n;
        if *pos < buf.len() {
            return;
        }
        // The block is complete: BSY while the worker writes it.
        let redo = Redo::DiskWrite { buf: std::mem::take(buf), xfer: *xfer };
        self.start_redo(unit, redo);
    }

    fn read_cmd_block(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() >= 2 {
            return self.data_read(data);
        }
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset + i as u64;
            *b = if reg == 0 {
                // The data register has no byte-wide PIO mode.
                warn_limited!(
                    format!("ide{}-data8", self.index),
                    "ide{}: 8-bit data register read",
                    self.index
                );
                0xff
            } else if reg < CMD_BLOCK_LEN {
                self.read_reg(reg)
            } else {
                0xff
            };
        }
    }

    fn write_cmd_block(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() >= 2 {
            return self.data_write(data);
        }
        for (i, b) in data.iter().enumerate() {
            let reg = offset + i as u64;
            if reg == 0 {
                warn_limited!(
                    format!("ide{}-data8w", self.index),
                    "ide{}: 8-bit data register write",
                    self.index
                );
            } else if reg < CMD_BLOCK_LEN {
                self.write_reg(reg, *b);
            }
        }
    }

    // ---- control block ----

    fn read_alt_status(&self) -> u8 {
        if self.empty() {
            0
        } else {
            self.status_value()
        }
    }

    fn write_ctl(&mut self, v: u8) {
        let old = self.ctl;
        self.ctl = v;
        if v & CTL_SRST != 0 && old & CTL_SRST == 0 {
            // Reset asserted: abort whatever runs (a job in flight becomes stale); drives stay
            // busy until it is released.
            self.dma = None;
            self.bm_status &= !BM_ST_ACTIVE;
            for d in &mut self.drives {
                d.pio = Pio::Idle;
                d.pending = None;
                if d.media.is_some() {
                    d.status = status::BSY;
                }
            }
            self.irq_pending = false;
        } else if v & CTL_SRST == 0 && old & CTL_SRST != 0 {
            for d in &mut self.drives {
                d.tf.device = DEV_ALWAYS_ONE;
                d.post_signature();
            }
            self.unit = 0;
        }
        self.update_irq();
    }

    // ---- bus master ----

    fn bm_read(&self, reg: u64) -> u8 {
        match reg {
            0 => self.bm_cmd,
            2 => self.bm_status,
            4..=7 => (self.bm_prd >> (8 * (reg - 4))) as u8,
            _ => 0,
        }
    }

    fn bm_write(&mut self, reg: u64, v: u8) {
        match reg {
            0 => {
                let was = self.bm_cmd & BM_CMD_START;
                self.bm_cmd = v & (BM_CMD_START | BM_CMD_TO_MEMORY);
                if v & BM_CMD_START != 0 && was == 0 {
                    self.bm_status |= BM_ST_ACTIVE;
                    self.start_dma();
                } else if v & BM_CMD_START == 0 && was != 0 {
                    // Stop. A transfer in flight still completes (status, interrupt); a command
                    // not started yet stays queued until the engine is started again.
                    self.bm_status &= !BM_ST_ACTIVE;
                }
            }
            2 => {
                let keep = self.bm_status & !(BM_ST_ERROR | BM_ST_INTERRUPT | BM_ST_DRIVE_DMA);
                let w1c = self.bm_status & (BM_ST_ERROR | BM_ST_INTERRUPT) & !v;
                self.bm_status = keep | w1c | (v & BM_ST_DRIVE_DMA);
            }
            4..=7 => {
                let shift = 8 * (reg - 4);
                let v = (self.bm_prd & !(0xff << shift)) | (u32::from(v) << shift);
                self.bm_prd = v & !3;
            }
            _ => {}
        }
    }
}

/// Bytes per ATAPI DMA step (the disk engine's bounce-buffer size).
const DMA_CHUNK: usize = DmaEngine::CHUNK_SECTORS as usize * SECTOR_SIZE;

/// The PIIX3 IDE function's device side: both channels and the bus-master block.
pub struct IdeController {
    channels: [Channel; 2],
}

impl std::fmt::Debug for IdeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdeController").field("channels", &self.channels).finish()
    }
}

impl IdeController {
    /// `irq14`/`irq15` are the primary/secondary channel lines.
    pub fn new(mem: Arc<dyn GuestRam>, irq14: IsaIrq, irq15: IsaIrq) -> Self {
        let mut c =
            IdeController { channels: [Channel::new(0, irq14, mem.clone()), Channel::new(1, irq15, mem)] };
        c.reset();
        c
    }

    /// Maps the four legacy regions (see the module table) on the port-I/O bus, and makes
    /// image I/O asynchronous ([`Self::enable_async`]).
    pub fn register_legacy(this: &Arc<Mutex<IdeController>>, pio: &Bus) -> Result<(), BusError> {
        Self::enable_async(this);
        for (base, len, rules, id) in LEGACY_REGIONS {
            pio.insert(base, len, rules, this.clone(), id)?;
        }
        Ok(())
    }

    /// Lets I/O jobs complete through `this`: from now on commands that touch an image run on
    /// the channel's I/O engine. Without it (a bare controller) they run inside the access.
    pub fn enable_async(this: &Arc<Mutex<IdeController>>) {
        let weak = Arc::downgrade(this);
        for ch in &mut this.lock().unwrap_or_else(|p| p.into_inner()).channels {
            ch.ctrl = weak.clone();
        }
    }

    /// Replaces the channels' I/O engines (e.g. with [`IoEngine::manual`] ones for
    /// deterministic fuzzing). Refused with [`IdeError::Busy`] while jobs are queued: dropping
    /// an engine runs its jobs, whose completions need the lock the caller holds.
    pub fn set_io_engines(
        &mut self,
        primary: Arc<IoEngine>,
        secondary: Arc<IoEngine>,
    ) -> Result<(), IdeError> {
        if self.channels.iter().any(|ch| ch.engine.in_flight() > 0) {
            return Err(IdeError::Busy);
        }
        self.channels[0].engine = primary;
        self.channels[1].engine = secondary;
        Ok(())
    }

    /// Waits until every command in flight has completed (status set, interrupt raised). Takes
    /// the lock only to find the engines: call it WITHOUT holding the controller lock (the
    /// completions need it), before saving state, final flushes, detaching and shutdown.
    pub fn drain(this: &Arc<Mutex<IdeController>>) {
        let engines: Vec<Arc<IoEngine>> = {
            let c = this.lock().unwrap_or_else(|p| p.into_inner());
            c.channels.iter().map(|ch| ch.engine.clone()).collect()
        };
        for e in engines {
            e.drain();
        }
    }

    /// Whether some drive has a command in flight on an I/O engine.
    pub fn io_busy(&self) -> bool {
        self.channels.iter().any(|ch| ch.drives.iter().any(|d| d.pending.is_some()))
    }

    fn slot(&self, channel: usize, drive: usize) -> Result<(), IdeError> {
        if channel < 2 && drive < 2 {
            Ok(())
        } else {
            Err(IdeError::BadSlot { channel, drive })
        }
    }

    /// Attaches an image with default identification (serial derived from the slot).
    pub fn attach(
        &mut self,
        channel: usize,
        drive: usize,
        backend: Box<dyn BlockBackend>,
        kind: DriveKind,
    ) -> Result<(), IdeError> {
        self.attach_with_config(channel, drive, Arc::from(backend), kind, Self::disk_config(channel, drive))
    }

    /// The identity [`Self::attach`] gives a disk at `channel`/`drive` (serial HV0000n).
    pub fn disk_config(channel: usize, drive: usize) -> DiskConfig {
        DiskConfig { serial: format!("HV{:05}", channel * 2 + drive + 1), ..Default::default() }
    }

    /// Attaches an image with explicit model/serial/firmware/write-cache settings.
    pub fn attach_with_config(
        &mut self,
        channel: usize,
        drive: usize,
        backend: Arc<dyn BlockBackend>,
        kind: DriveKind,
        config: DiskConfig,
    ) -> Result<(), IdeError> {
        if kind == DriveKind::Cdrom {
            let cd = CdConfig { serial: config.serial, firmware: config.firmware, ..Default::default() };
            return self.attach_cdrom(channel, drive, Some(backend), cd);
        }
        let media = Media::Disk(AtaDisk::new(backend, config));
        self.put_drive(channel, drive, media)
    }

    fn put_drive(&mut self, channel: usize, drive: usize, media: Media) -> Result<(), IdeError> {
        self.slot(channel, drive)?;
        let d = &mut self.channels[channel].drives[drive];
        if d.media.is_some() {
            return Err(IdeError::Occupied { channel, drive });
        }
        d.media = Some(media);
        d.post_signature();
        Ok(())
    }

    /// Attaches an ATAPI CD-ROM drive, holding `media` or empty (the drive is present either way).
    pub fn attach_cdrom(
        &mut self,
        channel: usize,
        drive: usize,
        media: Option<Arc<dyn BlockBackend>>,
        config: CdConfig,
    ) -> Result<(), IdeError> {
        self.put_drive(channel, drive, Media::Cdrom(AtapiDrive::new(media, config)))
    }

    fn cdrom_mut(&mut self, channel: usize, drive: usize) -> Result<&mut AtapiDrive, IdeError> {
        self.slot(channel, drive)?;
        match &mut self.channels[channel].drives[drive].media {
            Some(Media::Cdrom(cd)) => Ok(cd),
            _ => Err(IdeError::NotCdrom { channel, drive }),
        }
    }

    /// The CD-ROM drive in a slot (medium, lock and tray state for QMP `query-block`).
    pub fn cdrom(&self, channel: usize, drive: usize) -> Option<&AtapiDrive> {
        match &self.channels.get(channel)?.drives.get(drive)?.media {
            Some(Media::Cdrom(cd)) => Some(cd),
            _ => None,
        }
    }

    /// Host side (QMP `blockdev-change-medium`): puts a new medium in a CD-ROM drive, replacing
    /// any old one. The guest sees a UNIT ATTENTION and a new-media event.
    pub fn insert_media(
        &mut self,
        channel: usize,
        drive: usize,
        backend: Arc<dyn BlockBackend>,
    ) -> Result<(), IdeError> {
        self.cdrom_mut(channel, drive)?.insert(backend);
        Ok(())
    }

    /// Host side (QMP `eject`): takes the medium out of a CD-ROM drive and returns it. Refused
    /// with [`IdeError::Locked`] while the guest locks the tray, unless `force`.
    pub fn eject_media(
        &mut self,
        channel: usize,
        drive: usize,
        force: bool,
    ) -> Result<Option<Arc<dyn BlockBackend>>, IdeError> {
        self.cdrom_mut(channel, drive)?.eject(force).map_err(|e| match e {
            AtapiError::Locked => IdeError::Locked { channel, drive },
        })
    }

    /// Removes a drive (Xen PV unplug), flushing its image first, and returns the image (none
    /// for an empty CD-ROM drive). The slot then reads as absent. A command in flight for the
    /// drive is abandoned (its host I/O may still land after the flush, but was never
    /// acknowledged); call [`Self::drain`] first, without the lock, to let it finish.
    pub fn detach(
        &mut self,
        channel: usize,
        drive: usize,
    ) -> Result<Option<Arc<dyn BlockBackend>>, IdeError> {
        self.slot(channel, drive)?;
        let ch = &mut self.channels[channel];
        let Some(media) = ch.drives[drive].media.take() else {
            return Err(IdeError::Empty { channel, drive });
        };
        if ch.dma.as_ref().is_some_and(|j| j.unit == drive) {
            if ch.dma_in_flight() {
                ch.bm_status &= !BM_ST_ACTIVE;
            }
            ch.dma = None;
        }
        let d = &mut ch.drives[drive];
        d.pio = Pio::Idle;
        d.post_signature();
        let Some(backend) = media.backend().cloned() else { return Ok(None) };
        backend.flush().map_err(|e| {
            log::error!("ide{channel}.{drive}: flush on detach failed: {e}");
            IdeError::Flush { channel, drive }
        })?;
        Ok(Some(backend))
    }

    /// Flushes every attached image (before save, shutdown or unplug). Does not wait for
    /// commands in flight (it runs under the controller lock): what they write has not been
    /// acknowledged yet. [`Self::drain`] first makes the flush cover them.
    pub fn flush_all(&self) -> Result<(), IdeError> {
        for (c, ch) in self.channels.iter().enumerate() {
            for (i, d) in ch.drives.iter().enumerate() {
                if let Some(b) = d.media.as_ref().and_then(Media::backend) {
                    b.flush().map_err(|e| {
                        log::error!("ide{c}.{i}: flush failed: {e}");
                        IdeError::Flush { channel: c, drive: i }
                    })?;
                }
            }
        }
        Ok(())
    }

    pub fn drive_kind(&self, channel: usize, drive: usize) -> Option<DriveKind> {
        self.channels.get(channel)?.drives.get(drive)?.media.as_ref().map(Media::kind)
    }

    /// Power-on state: registers, bus master, interrupt lines low; drive settings to defaults.
    pub fn reset(&mut self) {
        for ch in &mut self.channels {
            ch.reset();
        }
    }
}

impl BusDevice for IdeController {
    fn read(&mut self, region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        match region {
            REGION_PRIMARY_CMD | REGION_SECONDARY_CMD => {
                self.channels[region / 2].read_cmd_block(offset, data);
            }
            REGION_PRIMARY_CTL | REGION_SECONDARY_CTL => {
                let v = self.channels[region / 2].read_alt_status();
                data.fill(v);
            }
            REGION_BUS_MASTER => {
                for (i, b) in data.iter_mut().enumerate() {
                    let off = offset + i as u64;
                    *b = match self.channels.get((off / 8) as usize) {
                        Some(ch) => ch.bm_read(off % 8),
                        None => 0xff,
                    };
                }
            }
            _ => {
                warn_limited!(format!("ide-region-{region}"), "ide: read of unknown region {region}");
                data.fill(0xff);
            }
        }
        IoResult::Done
    }

    fn write(&mut self, region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        match region {
            REGION_PRIMARY_CMD | REGION_SECONDARY_CMD => {
                self.channels[region / 2].write_cmd_block(offset, data);
            }
            REGION_PRIMARY_CTL | REGION_SECONDARY_CTL => {
                if let Some(v) = data.first() {
                    self.channels[region / 2].write_ctl(*v);
                }
            }
            REGION_BUS_MASTER => {
                for (i, b) in data.iter().enumerate() {
                    let off = offset + i as u64;
                    if let Some(ch) = self.channels.get_mut((off / 8) as usize) {
                        ch.bm_write(off % 8, *b);
                    }
                }
            }
            _ => {
                warn_limited!(format!("ide-region-w{region}"), "ide: write to unknown region {region}");
            }
        }
        IoResult::Done
    }
}

// ---- save/restore: section "ide", version 3 ----
//
// Saved per channel: selected unit, device control, pending interrupt, bus-master registers and a
// DMA command armed but not started (ATA sectors, or an ATAPI data stream); per drive: what the
// slot holds (none / disk / CD-ROM), task file, status, error, the PIO data phase (current DRQ
// block with position, and the rest of the transfer; for ATAPI also a half-written command packet)
// and the device's settable state (disk parameters; CD sense, lock, tray, unit attention, event).
// Attached images are configuration: the stream must match which slots hold a disk (and their
// size) or a CD-ROM drive; a CD medium that differs from the saved one becomes a media change.
//
// Commands in flight on the I/O engine: the machine drains before saving ([`IdeController::drain`]),
// so normally there are none. If one is (a save under the lock cannot wait for it), it is saved
// as still to be done and re-issued on restore: a DMA command as the queued job with the bus
// master started (a state that otherwise never persists), a PIO block, flush or ATAPI medium
// read as PIO state 5 with what the job was given. Re-doing it is safe: reads are repeated,
// writes rewrite the same data from the same place. The source's own job still completes.
//
// Version 3 added PIO state 5. Version 2 and version 1 (no ATAPI) are still read: version 1
// had a presence flag where later versions have the slot kind (0/1 mean the same) and no DMA
// kind tag.

/// Largest PIO block: READ/WRITE MULTIPLE with the maximum multiple count, or an ATAPI DRQ block.
const MAX_PIO_BLOCK: usize = DEFAULT_BYTE_LIMIT + 1;
/// Largest ATAPI bytes read ahead or replied but not yet moved.
const MAX_CD_PENDING: usize = 0x1_0000 + CD_BLOCK_SIZE;

const SLOT_EMPTY: u8 = 0;
const SLOT_DISK: u8 = 1;
const SLOT_CDROM: u8 = 2;

struct DriveState {
    tf: Taskfile,
    status: u8,
    error: u8,
    pio: Pio,
    disk: Option<super::ata::AtaDiskState>,
    cd: Option<AtapiState>,
}

struct ChannelState {
    unit: usize,
    ctl: u8,
    irq_pending: bool,
    bm_cmd: u8,
    bm_status: u8,
    bm_prd: u32,
    dma: Option<DmaJob>,
    drives: [DriveState; 2],
}

fn put_xfer(w: &mut SectionWriter, x: &SectorXfer) {
    w.put_u64(x.lba);
    w.put_u32(x.count);
    w.put_bool(x.write);
    w.put_bool(x.dma);
    w.put_u32(x.block);
    w.put_bool(x.ext);
}

fn get_xfer(r: &mut SectionReader<'_>) -> Result<SectorXfer, SnapshotError> {
    Ok(SectorXfer {
        lba: r.get_u64()?,
        count: r.get_u32()?,
        write: r.get_bool()?,
        dma: r.get_bool()?,
        block: r.get_u32()?,
        ext: r.get_bool()?,
    })
}

fn put_stream(w: &mut SectionWriter, s: &CdStream) {
    w.put_bytes(&s.pending);
    w.put_u64(s.lba);
    w.put_u32(s.blocks);
    w.put_u16(s.limit);
}

/// A stream as the drive could have left it (medium reads past the end fail at read time).
fn get_stream(r: &mut SectionReader<'_>) -> Result<CdStream, SnapshotError> {
    Ok(CdStream {
        pending: r.get_bytes(MAX_CD_PENDING)?,
        lba: r.get_u64()?,
        blocks: r.get_u32()?,
        limit: r.get_u16()?,
    })
}

fn put_tf(w: &mut SectionWriter, t: &Taskfile) {
    w.put_raw(&[
        t.feature,
        t.hob_feature,
        t.count,
        t.hob_count,
        t.lba_low,
        t.lba_mid,
        t.lba_high,
        t.hob_lba_low,
        t.hob_lba_mid,
        t.hob_lba_high,
        t.device,
        t.command,
    ]);
}

fn get_tf(r: &mut SectionReader<'_>) -> Result<Taskfile, SnapshotError> {
    let b = r.get_array::<12>()?;
    Ok(Taskfile {
        feature: b[0],
        hob_feature: b[1],
        count: b[2],
        hob_count: b[3],
        lba_low: b[4],
        lba_mid: b[5],
        lba_high: b[6],
        hob_lba_low: b[7],
        hob_lba_mid: b[8],
        hob_lba_high: b[9],
        device: b[10],
        command: b[11],
    })
}

/// A transfer the disk could have been asked for: in range, of a sane shape.
fn xfer_ok(disk: &AtaDisk, x: &SectorXfer, dma: bool, write: Option<bool>, min_count: u32) -> bool {
    let block_ok =
        if dma { x.block == 0 } else { (1..=u32::from(super::ata::MAX_MULTIPLE)).contains(&x.block) };
    x.dma == dma
        && write.is_none_or(|w| w == x.write)
        && block_ok
        && (min_count..=65536).contains(&x.count)
        && disk.range_ok(x.lba, x.count)
}

fn put_pio(w: &mut SectionWriter, pio: &Pio) {
    match pio {
        Pio::Idle => w.put_u8(0),
        Pio::In { buf, pos, rest } => {
            w.put_u8(1);
            w.put_bytes(buf);
            w.put_u32(*pos as u32);
            w.put_bool(rest.is_some());
            if let Some(x) = rest {
                put_xfer(w, x);
            }
        }
        Pio::Out { buf, pos, xfer } => {
            w.put_u8(2);
            w.put_bytes(buf);
            w.put_u32(*pos as u32);
            put_xfer(w, xfer);
        }
        Pio::Cdb { buf, pos, dma, limit } => {
            w.put_u8(3);
            w.put_bytes(buf);
            w.put_u32(*pos as u32);
            w.put_bool(*dma);
            w.put_u16(*limit);
        }
        Pio::PacketIn { buf, pos, stream } => {
            w.put_u8(4);
            w.put_bytes(buf);
            w.put_u32(*pos as u32);
            put_stream(w, stream);
        }
        Pio::Busy(redo) => {
            w.put_u8(5);
            match redo {
                Redo::DiskRead(x) => {
                    w.put_u8(0);
                    put_xfer(w, x);
                }
                Redo::DiskWrite { buf, xfer } => {
                    w.put_u8(1);
                    w.put_bytes(buf);
                    put_xfer(w, xfer);
                }
                Redo::Flush => w.put_u8(2),
                Redo::CdRead { stream, n } => {
                    w.put_u8(3);
                    put_stream(w, stream);
                    w.put_u32(*n as u32);
                }
            }
        }
    }
}

fn get_pio(r: &mut SectionReader<'_>) -> Result<Pio, SnapshotError> {
    Ok(match r.get_u8()? {
        0 => Pio::Idle,
        1 => {
            let buf = r.get_bytes(MAX_PIO_BLOCK)?;
            let pos = r.get_u32()? as usize;
            let rest = if r.get_bool()? { Some(get_xfer(r)?) } else { None };
            Pio::In { buf, pos, rest }
        }
        2 => {
            let buf = r.get_bytes(MAX_PIO_BLOCK)?;
            let pos = r.get_u32()? as usize;
            Pio::Out { buf, pos, xfer: get_xfer(r)? }
        }
        3 => {
            let buf = r.get_bytes(CDB_LEN)?;
            let pos = r.get_u32()? as usize;
            Pio::Cdb { buf, pos, dma: r.get_bool()?, limit: r.get_u16()? }
        }
        4 => {
            let buf = r.get_bytes(MAX_PIO_BLOCK)?;
            let pos = r.get_u32()? as usize;
            Pio::PacketIn { buf, pos, stream: get_stream(r)? }
        }
        5 => Pio::Busy(match r.get_u8()? {
            0 => Redo::DiskRead(get_xfer(r)?),
            1 => {
                let buf = r.get_bytes(MAX_PIO_BLOCK)?;
                Redo::DiskWrite { buf, xfer: get_xfer(r)? }
            }
            2 => Redo::Flush,
            3 => {
                let stream = get_stream(r)?;
                Redo::CdRead { stream, n: r.get_u32()? as usize }
            }
            t => return Err(r.bad(format!("pending I/O kind {t}"))),
        }),
        t => return Err(r.bad(format!("PIO state {t}"))),
    })
}

/// Whether a PIO phase fits the device: disks move sectors, CD-ROM drives take packets and
/// return IDENTIFY PACKET DEVICE data or packet data.
fn pio_ok(media: &Media, pio: &Pio) -> bool {
    match (media, pio) {
        (_, Pio::Idle) => true,
        (Media::Disk(disk), Pio::In { buf, pos, rest }) => {
            !buf.is_empty()
                && *pos <= buf.len()
                && rest.as_ref().is_none_or(|x| xfer_ok(disk, x, false, Some(false), 0))
        }
        (Media::Disk(disk), Pio::Out { buf, pos, xfer }) => {
            xfer_ok(disk, xfer, false, Some(true), 1)
                && buf.len() == xfer.block.min(xfer.count) as usize * SECTOR_SIZE
                && *pos <= buf.len()
        }
        (Media::Cdrom(_), Pio::In { buf, pos, rest: None }) => buf.len() == SECTOR_SIZE && *pos <= buf.len(),
        (Media::Cdrom(_), Pio::Cdb { buf, pos, .. }) => buf.len() == CDB_LEN && *pos < CDB_LEN,
        (Media::Cdrom(_), Pio::PacketIn { buf, pos, .. }) => !buf.is_empty() && *pos < buf.len(),
        (Media::Disk(disk), Pio::Busy(Redo::DiskRead(x))) => xfer_ok(disk, x, false, Some(false), 1),
        (Media::Disk(disk), Pio::Busy(Redo::DiskWrite { buf, xfer })) => {
            xfer_ok(disk, xfer, false, Some(true), 1)
                && buf.len() == xfer.block.min(xfer.count) as usize * SECTOR_SIZE
        }
        (Media::Disk(_), Pio::Busy(Redo::Flush)) => true,
        (Media::Cdrom(_), Pio::Busy(Redo::CdRead { stream, n })) => {
            (1..=MAX_PIO_BLOCK).contains(n) && *n <= stream.remaining()
        }
        _ => false,
    }
}

impl Channel {
    fn save_state(&self, w: &mut SectionWriter) {
        // unit is 0 or 1.
        w.put_u8(self.unit as u8);
        w.put_u8(self.ctl);
        w.put_bool(self.irq_pending);
        w.put_u8(self.bm_cmd);
        w.put_u8(self.bm_status);
        w.put_u32(self.bm_prd);
        w.put_bool(self.dma.is_some());
        if let Some(j) = &self.dma {
            w.put_u8(j.unit as u8);
            match &j.work {
                DmaWork::Ata(x) => {
                    w.put_u8(0);
                    put_xfer(w, x);
                }
                DmaWork::Atapi(s) => {
                    w.put_u8(1);
                    put_stream(w, s);
                }
            }
        }
        for d in &self.drives {
            w.put_u8(match &d.media {
                None => SLOT_EMPTY,
                Some(Media::Disk(_)) => SLOT_DISK,
                Some(Media::Cdrom(_)) => SLOT_CDROM,
            });
            put_tf(w, &d.tf);
            w.put_u8(d.status);
            w.put_u8(d.error);
            put_pio(w, &d.pio);
            match &d.media {
                Some(Media::Disk(disk)) => disk.save_state(w),
                Some(Media::Cdrom(cd)) => cd.save_state(w),
                None => {}
            }
        }
    }

    fn decode_state(&self, version: u32, r: &mut SectionReader<'_>) -> Result<ChannelState, SnapshotError> {
        let ch = self.index;
        let unit = usize::from(r.get_u8()?);
        let ctl = r.get_u8()?;
        let irq_pending = r.get_bool()?;
        let bm_cmd = r.get_u8()?;
        let bm_status = r.get_u8()?;
        let bm_prd = r.get_u32()?;
        if unit > 1 || bm_cmd & !(BM_CMD_START | BM_CMD_TO_MEMORY) != 0 || bm_prd & 3 != 0 {
            return Err(r.bad(format!("ide{ch}: unit {unit}, BM command {bm_cmd:#x}, PRD {bm_prd:#x}")));
        }
        let dma = if r.get_bool()? {
            let unit = usize::from(r.get_u8()?);
            let kind = if version == 1 { 0 } else { r.get_u8()? };
            let work = match kind {
                0 => DmaWork::Ata(get_xfer(r)?),
                1 => DmaWork::Atapi(get_stream(r)?),
                t => return Err(r.bad(format!("ide{ch}: DMA kind {t}"))),
            };
            Some(DmaJob { unit, work })
        } else {
            None
        };
        let mut drives = Vec::with_capacity(2);
        for (i, cur) in self.drives.iter().enumerate() {
            let slot = r.get_u8()?;
            let tf = get_tf(r)?;
            let status = r.get_u8()?;
            let error = r.get_u8()?;
            let pio = get_pio(r)?;
            let (mut disk, mut cd) = (None, None);
            match (&cur.media, slot) {
                (Some(Media::Disk(dk)), SLOT_DISK) => disk = Some(dk.decode_state(r)?),
                (Some(Media::Cdrom(c)), SLOT_CDROM) => cd = Some(c.decode_state(r)?),
                (None, SLOT_EMPTY) => {}
                (m, s) => {
                    return Err(r.bad(format!(
                        "ide{ch}.{i}: saved with slot kind {s}, attached {:?}",
                        m.as_ref().map(Media::kind)
                    )))
                }
            }
            let pio_fits = match &cur.media {
                Some(m) => pio_ok(m, &pio),
                None => matches!(pio, Pio::Idle),
            };
            if !pio_fits {
                return Err(r.bad(format!("ide{ch}.{i}: inconsistent PIO transfer state")));
            }
            if let Some(j) = dma.as_ref().filter(|j| j.unit == i) {
                let fits = match (&cur.media, &j.work) {
                    (Some(Media::Disk(dk)), DmaWork::Ata(x)) => xfer_ok(dk, x, true, None, 1),
                    (Some(Media::Cdrom(_)), DmaWork::Atapi(_)) => true,
                    _ => false,
                };
                if !fits {
                    return Err(r.bad(format!("ide{ch}.{i}: bad queued DMA transfer")));
                }
            }
            drives.push(DriveState { tf, status, error, pio, disk, cd });
        }
        if let Some(j) = &dma {
            if j.unit > 1 {
                return Err(r.bad(format!("ide{ch}: DMA queued for unit {}", j.unit)));
            }
        }
        let drives: [DriveState; 2] = drives.try_into().map_err(|_| r.bad("drive count"))?;
        Ok(ChannelState { unit, ctl, irq_pending, bm_cmd, bm_status, bm_prd, dma, drives })
    }

    fn apply_state(&mut self, st: ChannelState) {
        self.unit = st.unit;
        self.ctl = st.ctl;
        self.irq_pending = st.irq_pending;
        self.bm_cmd = st.bm_cmd;
        self.bm_status = st.bm_status;
        self.bm_prd = st.bm_prd;
        self.dma = st.dma;
        for (d, s) in self.drives.iter_mut().zip(st.drives) {
            // Whatever this controller had in flight is superseded by the restored state.
            d.pending = None;
            d.tf = s.tf;
            d.status = s.status;
            d.error = s.error;
            d.pio = s.pio;
            match (&mut d.media, &s.disk, &s.cd) {
                (Some(Media::Disk(disk)), Some(ds), _) => disk.apply_state(ds),
                (Some(Media::Cdrom(cd)), _, Some(cs)) => cd.apply_state(cs),
                _ => {}
            }
        }
        // Drive the line directly: update_irq() would also latch the bus-master interrupt bit,
        // which the restored status already holds as the guest left it.
        let level = self.irq_pending && self.ctl & CTL_NIEN == 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
        // Re-issue what was in flight when the state was saved.
        for unit in 0..2 {
            if let Pio::Busy(redo) = &self.drives[unit].pio {
                let redo = redo.clone();
                self.start_redo(unit, redo);
            }
        }
        if self.bm_cmd & BM_CMD_START != 0 && self.dma.is_some() {
            self.start_dma();
        }
    }
}

impl Snapshot for IdeController {
    fn section(&self) -> &'static str {
        "ide"
    }
    fn section_version(&self) -> u32 {
        3
    }
    fn save(&self, w: &mut SectionWriter) {
        for ch in &self.channels {
            ch.save_state(w);
        }
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        if !(1..=2).contains(&version) {
            check_version(r, version, 3)?;
        }
        let a = self.channels[0].decode_state(version, r)?;
        let b = self.channels[1].decode_state(version, r)?;
        Ok(PendingState::new([a, b]))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: [ChannelState; 2] = state.downcast(self.section())?;
        for (ch, s) in self.channels.iter_mut().zip(st) {
            ch.apply_state(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::ata::cmd;
    use super::super::image::testfile::TempFile;
    use super::super::image::{BlockError, MemImage, RawFile};
    use super::*;
    use crate::irq::RecordingIrqSink;
    use crate::mem::TestRam;

    const BM: u64 = 0xc000;
    const RAM: usize = 0x20_0000;

    struct Rig {
        bus: Bus,
        ctrl: Arc<Mutex<IdeController>>,
        irqs: Arc<RecordingIrqSink>,
        mem: Arc<TestRam>,
    }

    impl Rig {
        fn new() -> Self {
            let irqs = Arc::new(RecordingIrqSink::default());
            let mem = Arc::new(TestRam::new(RAM));
            let ctrl = Arc::new(Mutex::new(IdeController::new(
                mem.clone(),
                IsaIrq::new(irqs.clone(), 14),
                IsaIrq::new(irqs.clone(), 15),
            )));
            let bus = Bus::new("pio");
            IdeController::register_legacy(&ctrl, &bus).unwrap();
            bus.insert(BM, BUS_MASTER_LEN, BUS_MASTER_RULES, ctrl.clone(), REGION_BUS_MASTER).unwrap();
            Rig { bus, ctrl, irqs, mem }
        }
        fn with_disk(img: impl BlockBackend + 'static) -> Self {
            let r = Rig::new();
            r.ctrl.lock().unwrap().attach(0, 0, Box::new(img), DriveKind::Disk).unwrap();
            r
        }
        /// Waits for the I/O engines: the port helpers below call it after every access, so
        /// the tests written against synchronous I/O see each command's completion at once.
        fn drain(&self) {
            IdeController::drain(&self.ctrl);
        }
        fn write(&self, port: u64, data: &[u8]) {
            self.bus.write_sync(port, data);
            self.drain();
        }
        fn read<const N: usize>(&self, port: u64) -> [u8; N] {
            let mut d = [0u8; N];
            self.bus.read_sync(port, &mut d);
            self.drain();
            d
        }
        fn outb(&self, port: u64, v: u8) {
            self.write(port, &[v]);
        }
        fn inb(&self, port: u64) -> u8 {
            self.read::<1>(port)[0]
        }
        fn inw(&self, port: u64) -> u16 {
            u16::from_le_bytes(self.read(port))
        }
        fn outw(&self, port: u64, v: u16) {
            self.write(port, &v.to_le_bytes());
        }
        fn inl(&self, port: u64) -> u32 {
            u32::from_le_bytes(self.read(port))
        }
        fn outl(&self, port: u64, v: u32) {
            self.write(port, &v.to_le_bytes());
        }
        /// Sets up an LBA28 command on the primary master and issues it.
        fn lba28(&self, command: u8, lba: u32, count: u8) {
            self.outb(0x1f6, 0xe0 | (lba >> 24) as u8 & 0xf);
            self.outb(0x1f2, count);
            self.outb(0x1f3, lba as u8);
            self.outb(0x1f4, (lba >> 8) as u8);
            self.outb(0x1f5, (lba >> 16) as u8);
            self.outb(0x1f7, command);
        }
        fn lba48(&self, command: u8, lba: u64, count: u16) {
            self.outb(0x1f6, 0xe0);
            self.outb(0x1f2, (count >> 8) as u8);
            self.outb(0x1f3, (lba >> 24) as u8);
            self.outb(0x1f4, (lba >> 32) as u8);
            self.outb(0x1f5, (lba >> 40) as u8);
            self.outb(0x1f2, count as u8);
            self.outb(0x1f3, lba as u8);
            self.outb(0x1f4, (lba >> 8) as u8);
            self.outb(0x1f5, (lba >> 16) as u8);
            self.outb(0x1f7, command);
        }
        /// Reads `sectors` through the data register with 16-bit accesses.
        fn pio_read16(&self, sectors: usize) -> Vec<u8> {
            let mut v = Vec::new();
            for _ in 0..sectors {
                assert_eq!(self.inb(0x3f6) & status::DRQ, status::DRQ);
                for _ in 0..256 {
                    v.extend_from_slice(&self.inw(0x1f0).to_le_bytes());
                }
            }
            v
        }
        fn irq14(&self) -> bool {
            self.irqs.isa_level(14)
        }
        fn write_prd(&self, table: u64, entries: &[(u32, u16, bool)]) {
            for (i, (addr, count, eot)) in entries.iter().enumerate() {
                let flags: u64 = if *eot { 0x8000 } else { 0 };
                let e = u64::from(*addr) | (u64::from(*count) << 32) | (flags << 48);
                self.mem.write(table + 8 * i as u64, &e.to_le_bytes()).unwrap();
            }
        }
    }

    fn pattern(sectors: usize) -> Vec<u8> {
        (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE * 7 + i * 13) as u8).collect()
    }

    #[test]
    fn identify_through_ports_with_irq() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        assert_eq!(r.inb(0x1f7), 0x50);
        r.outb(0x1f6, 0xa0);
        r.outb(0x1f7, cmd::IDENTIFY_DEVICE);
        assert!(r.irq14());
        assert_eq!(r.inb(0x3f6), 0x58); // alt status does not clear the interrupt
        assert!(r.irq14());
        assert_eq!(r.inb(0x1f7), 0x58);
        assert!(!r.irq14());
        // Mix 16- and 32-bit data reads.
        let mut id = Vec::new();
        for i in 0..128 {
            if i % 2 == 0 {
                id.extend_from_slice(&r.inl(0x1f0).to_le_bytes());
            } else {
                id.extend_from_slice(&r.inw(0x1f0).to_le_bytes());
                id.extend_from_slice(&r.inw(0x1f0).to_le_bytes());
            }
        }
        assert_eq!(r.inb(0x1f7), 0x50);
        assert!(!r.irq14());
        assert_eq!(id.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // Words 60-61: 1 MiB.
        assert_eq!(u16::from_le_bytes([id[120], id[121]]), 2048);
        // No DRQ: data reads are 0 and do not disturb anything.
        assert_eq!(r.inw(0x1f0), 0);
    }

    #[test]
    fn pio_lba28_write_then_read_roundtrip_to_file() {
        let t = TempFile::with_contents(&vec![0u8; 64 * SECTOR_SIZE]);
        let r = Rig::with_disk(RawFile::open(&t.0, false).unwrap());
        let data = pattern(3);
        r.lba28(cmd::WRITE_SECTORS, 5, 3);
        assert_eq!(r.inb(0x3f6), 0x58);
        assert!(!r.irq14(), "no interrupt before the first block of a PIO write");
        for s in 0..3 {
            for w in data[s * 512..(s + 1) * 512].chunks(4) {
                r.outl(0x1f0, u32::from_le_bytes(w.try_into().unwrap()));
            }
            assert!(r.irq14(), "interrupt after block {s}");
            let st = r.inb(0x1f7);
            assert_eq!(st, if s < 2 { 0x58 } else { 0x50 });
        }
        // Registers point past the last sector.
        assert_eq!(r.inb(0x1f3), 8);
        r.lba28(cmd::FLUSH_CACHE, 0, 0);
        assert_eq!(r.inb(0x1f7), 0x50);
        let file = std::fs::read(&t.0).unwrap();
        assert_eq!(&file[5 * 512..8 * 512], &data[..]);
        // Read back, 16-bit.
        r.lba28(cmd::READ_SECTORS, 5, 3);
        let mut got = Vec::new();
        for _ in 0..3 {
            assert!(r.irq14());
            assert_eq!(r.inb(0x1f7), 0x58);
            got.extend(r.pio_read16(1));
        }
        assert_eq!(got, data);
        assert!(!r.irq14(), "no interrupt after the last block of a PIO read");
        assert_eq!(r.inb(0x1f7), 0x50);
    }

    #[test]
    fn pio_lba48_on_sparse_8gib_file() {
        let t = TempFile::with_contents(&[]);
        let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
        f.set_len((1u64 << 33) + (1 << 20)).unwrap(); // 8 GiB + 1 MiB, sparse
        drop(f);
        let r = Rig::with_disk(RawFile::open(&t.0, false).unwrap());
        let lba: u64 = (1 << 24) + 0x345; // beyond any 24-bit register
        let data = pattern(2);
        r.lba48(cmd::WRITE_SECTORS_EXT, lba, 2);
        for w in data.chunks(2) {
            r.outw(0x1f0, u16::from_le_bytes([w[0], w[1]]));
        }
        assert_eq!(r.inb(0x1f7), 0x50);
        // HOB readback of the final address.
        assert_eq!(r.inb(0x1f3), 0x47);
        r.outb(0x3f6, CTL_HOB);
        assert_eq!(r.inb(0x1f3), 0x01);
        r.outb(0x3f6, 0);
        r.lba48(cmd::READ_SECTORS_EXT, lba, 2);
        assert_eq!(r.pio_read16(2), data);
        let mut file = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&t.0).unwrap(), &mut file, lba * 512)
            .unwrap();
        assert_eq!(file, data);
        // One sector past the end of the image: IDNF.
        r.lba48(cmd::READ_SECTORS_EXT, (1 << 33) / 512 + 2048, 1);
        assert_eq!(r.inb(0x1f7), 0x41);
        assert_eq!(r.inb(0x1f1), error::IDNF);
    }

    #[test]
    fn chs_read_and_multiple() {
        let img = pattern(4096);
        let r = Rig::with_disk(MemImage::new(img.clone(), false));
        // C/H/S 1/2/3 with the default 16 heads x 63 sectors translation.
        r.outb(0x1f6, 0xa2);
        r.outb(0x1f2, 1);
        r.outb(0x1f3, 3);
        r.outb(0x1f4, 1);
        r.outb(0x1f5, 0);
        r.outb(0x1f7, cmd::READ_SECTORS);
        let lba = (16 + 2) * 63 + 2;
        assert_eq!(r.pio_read16(1), img[lba * 512..(lba + 1) * 512]);
        // READ MULTIPLE with the default 16-sector block: 20 sectors = 2 interrupts.
        r.inb(0x1f7);
        r.lba28(cmd::READ_MULTIPLE, 100, 20);
        let mut irqs = 0;
        let mut got = Vec::new();
        while r.inb(0x3f6) & status::DRQ != 0 {
            irqs += usize::from(r.irq14());
            r.inb(0x1f7);
            for _ in 0..(if got.is_empty() { 16 * 256 } else { 4 * 256 }) {
                got.extend_from_slice(&r.inw(0x1f0).to_le_bytes());
            }
        }
        assert_eq!(irqs, 2);
        assert_eq!(got, img[100 * 512..120 * 512]);
    }

    #[test]
    fn dma_read_multi_entry_and_64k_entry() {
        let img = pattern(256);
        dma_read_multi_entry_on(&Rig::with_disk(MemImage::new(img.clone(), false)), &img);
        // A raw file: the direct path (image <-> guest memory, no bounce buffer).
        let t = TempFile::with_contents(&img);
        dma_read_multi_entry_on(&Rig::with_disk(RawFile::open(&t.0, false).unwrap()), &img);
    }

    fn dma_read_multi_entry_on(r: &Rig, img: &[u8]) {
        // 8 sectors over three uneven pieces.
        r.write_prd(0x1000, &[(0x10000, 512, false), (0x20000, 1024, false), (0x30000, 2560, true)]);
        r.outl(BM + 4, 0x1000);
        r.outb(BM, BM_CMD_TO_MEMORY);
        r.outb(BM + 2, BM_ST_INTERRUPT | BM_ST_ERROR | BM_ST_DRIVE_DMA);
        assert_eq!(r.inb(BM + 2), BM_ST_DRIVE_DMA);
        r.lba28(cmd::READ_DMA, 10, 8);
        assert_eq!(r.inb(0x3f6) & status::DRQ, status::DRQ);
        assert!(!r.irq14());
        r.outb(BM, BM_CMD_TO_MEMORY | BM_CMD_START);
        assert!(r.irq14());
        assert_eq!(r.inb(BM + 2), BM_ST_DRIVE_DMA | BM_ST_INTERRUPT);
        assert_eq!(r.inb(0x1f7), 0x50);
        assert!(!r.irq14());
        let mut m = vec![0u8; 4096];
        r.mem.read(0x10000, &mut m[..512]).unwrap();
        r.mem.read(0x20000, &mut m[512..1536]).unwrap();
        r.mem.read(0x30000, &mut m[1536..]).unwrap();
        assert_eq!(m, img[10 * 512..18 * 512]);
        r.outb(BM, BM_CMD_TO_MEMORY);
        r.outb(BM + 2, BM_ST_INTERRUPT | BM_ST_DRIVE_DMA);
        assert_eq!(r.inb(BM + 2), BM_ST_DRIVE_DMA);
        // Count 0 = 64 KiB: 128 sectors into one entry; engine started before the command.
        r.write_prd(0x1000, &[(0x40000, 0, true)]);
        r.outb(BM, BM_CMD_TO_MEMORY | BM_CMD_START);
        assert_eq!(r.inb(BM + 2) & BM_ST_ACTIVE, BM_ST_ACTIVE);
        r.lba48(cmd::READ_DMA_EXT, 100, 128);
        assert_eq!(r.inb(BM + 2) & (BM_ST_ACTIVE | BM_ST_INTERRUPT), BM_ST_INTERRUPT);
        let mut m = vec![0u8; 65536];
        r.mem.read(0x40000, &mut m).unwrap();
        assert_eq!(m, img[100 * 512..228 * 512]);
        assert_eq!(r.inb(0x1f7), 0x50);
    }

    #[test]
    fn diagnostic_drops_a_queued_dma_job() {
        // Fuzz finding 6: WRITE DMA queued on the master, then EXECUTE DEVICE DIAGNOSTIC through
        // the slave; starting the engine afterwards must not run the stale write.
        let r = Rig::with_disk(MemImage::new(vec![0; 64 * SECTOR_SIZE], false));
        r.ctrl
            .lock()
            .unwrap()
            .attach(0, 1, Box::new(MemImage::new(vec![0; 8 * SECTOR_SIZE], false)), DriveKind::Disk)
            .unwrap();
        r.mem.write(0x1000, &[0xee; SECTOR_SIZE]).unwrap();
        r.write_prd(0x100, &[(0x1000, 512, true)]);
        r.outl(BM + 4, 0x100);
        r.lba28(cmd::WRITE_DMA, 5, 1);
        assert_eq!(r.inb(0x1f7), 0x58);
        r.outb(0x1f6, 0xb0);
        r.outb(0x1f7, cmd::EXECUTE_DEVICE_DIAGNOSTIC);
        r.outb(0x1f6, 0xa0);
        assert_eq!(r.inb(0x1f7), 0x50);
        r.outb(BM, BM_CMD_START);
        let mut sector = vec![0u8; SECTOR_SIZE];
        r.outb(BM, 0);
        r.lba28(cmd::READ_SECTORS, 5, 1);
        for chunk in sector.chunks_mut(2) {
            chunk.copy_from_slice(&r.inw(0x1f0).to_le_bytes());
        }
        assert_eq!(sector, vec![0u8; SECTOR_SIZE], "the stale DMA write reached the disk");
    }

    #[test]
    fn dma_write_reaches_file_and_flush() {
        let t = TempFile::with_contents(&vec![0u8; 128 * SECTOR_SIZE]);
        let r = Rig::with_disk(RawFile::open(&t.0, false).unwrap());
        let data = pattern(4);
        r.mem.write(0x50000, &data[..1000]).unwrap();
        r.mem.write(0x60000, &data[1000..]).unwrap();
        r.write_prd(0x2000, &[(0x50000, 1000, false), (0x60000, 1048, true)]);
        r.outl(BM + 12, 0x2000); // secondary PRD register must not be touched
        r.outl(BM + 4, 0x2000);
        assert_eq!(r.inl(BM + 12), 0x2000);
        r.outb(BM, 0);
        r.lba28(cmd::WRITE_DMA, 20, 4);
        r.outb(BM, BM_CMD_START);
        assert!(r.irq14());
        assert_eq!(r.inb(0x1f7), 0x50);
        r.lba28(cmd::FLUSH_CACHE_EXT, 0, 0);
        assert_eq!(r.inb(0x1f7), 0x50);
        let file = std::fs::read(&t.0).unwrap();
        assert_eq!(&file[20 * 512..24 * 512], &data[..]);
    }

    #[test]
    fn dma_bad_prd_tables_end_with_error_not_hang() {
        dma_bad_prd_tables_on(&Rig::with_disk(MemImage::new(vec![0; 1 << 20], false)));
        let t = TempFile::with_contents(&vec![0; 1 << 20]);
        dma_bad_prd_tables_on(&Rig::with_disk(RawFile::open(&t.0, false).unwrap()));
    }

    #[test]
    fn dma_write_to_read_only_raw_file_aborts_and_leaves_it() {
        let t = TempFile::with_contents(&vec![0x5a; 64 * SECTOR_SIZE]);
        let r = Rig::with_disk(RawFile::open(&t.0, true).unwrap());
        r.mem.write(0x50000, &[0xee; 1024]).unwrap();
        r.write_prd(0x2000, &[(0x50000, 1024, true)]);
        r.outl(BM + 4, 0x2000);
        r.outb(BM, 0);
        r.lba28(cmd::WRITE_DMA, 3, 2);
        r.outb(BM, BM_CMD_START);
        assert!(r.irq14());
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        assert_eq!(std::fs::read(&t.0).unwrap(), vec![0x5a; 64 * SECTOR_SIZE]);
    }

    fn dma_bad_prd_tables_on(r: &Rig) {
        let run = |table: u32, sectors: u8| {
            r.outb(BM, 0);
            r.outb(BM + 2, BM_ST_INTERRUPT | BM_ST_ERROR);
            r.inb(0x1f7);
            r.outl(BM + 4, table);
            r.lba28(cmd::READ_DMA, 0, sectors);
            r.outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
            let irq = r.irq14();
            (r.inb(BM + 2), r.inb(0x1f7), r.inb(0x1f1), irq)
        };
        let failed = (BM_ST_ERROR | BM_ST_INTERRUPT, 0x41, error::ABRT, true);
        // No end-of-table: 2-byte entries right below a 64 KiB boundary, 512 bytes needed.
        let entries: Vec<_> = (0..8).map(|_| (0x8000u32, 2u16, false)).collect();
        r.write_prd(0xffc0, &entries);
        assert_eq!(run(0xffc0, 1), failed);
        // Table outside RAM.
        assert_eq!(run(0xfff0_0000, 1), failed);
        // Buffer outside RAM.
        r.write_prd(0x3000, &[(0xfff0_0000, 512, true)]);
        assert_eq!(run(0x3000, 1), failed);
        // Table shorter than the transfer.
        r.write_prd(0x3000, &[(0x8000, 512, true)]);
        assert_eq!(run(0x3000, 2), failed);
        // An all-zero table (64 KiB entries at address 0, no EOT) is bounded too: it just works.
        r.mem.write(0x4000, &[0; 64]).unwrap();
        let ok = run(0x4000, 4);
        assert_eq!((ok.0, ok.1), (BM_ST_INTERRUPT, 0x50));
        // The channel still works afterwards.
        r.write_prd(0x3000, &[(0x8000, 512, true)]);
        assert_eq!(run(0x3000, 1), (BM_ST_INTERRUPT, 0x50, 0, true));
    }

    #[test]
    fn nien_masks_irq_and_status_read_clears() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        r.outb(0x3f6, CTL_NIEN);
        r.lba28(cmd::READ_VERIFY, 0, 1);
        assert!(!r.irq14());
        assert_eq!(r.inb(BM + 2) & BM_ST_INTERRUPT, 0);
        // Unmasking with an interrupt pending asserts the line.
        r.outb(0x3f6, 0);
        assert!(r.irq14());
        r.inb(0x1f7);
        assert!(!r.irq14());
        r.outb(0x3f6, CTL_NIEN);
        r.outb(0x3f6, 0);
        assert!(!r.irq14());
        // Secondary channel line untouched.
        assert!(!r.irqs.isa_level(15));
    }

    #[test]
    fn soft_reset_posts_signature() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        r.lba28(0xff, 0x123456, 9); // unknown command: ABRT
        assert_eq!(r.inb(0x1f7), 0x41);
        assert_eq!(r.inb(0x1f1), error::ABRT);
        r.outb(0x3f6, CTL_SRST | CTL_NIEN);
        assert_eq!(r.inb(0x3f6), status::BSY);
        r.outb(0x1f7, cmd::IDENTIFY_DEVICE); // ignored while busy
        r.outb(0x3f6, CTL_NIEN);
        assert_eq!(r.inb(0x3f6), 0x50);
        assert!(!r.irq14());
        let regs: Vec<u8> = (1..=6).map(|i| r.inb(0x1f0 + i)).collect();
        assert_eq!(regs, vec![0x01, 0x01, 0x01, 0x00, 0x00, 0xa0]);
        assert_eq!(r.inb(0x1f7), 0x50);
    }

    /// libata's probe sequence against master-only and empty channels.
    #[test]
    fn absent_slave_and_empty_channel() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        let devchk = |base: u64, dev: u8| {
            r.outb(base + 6, dev);
            r.outb(base + 2, 0x55);
            r.outb(base + 3, 0xaa);
            (r.inb(base + 2), r.inb(base + 3))
        };
        // Master answers; the slave's registers latch (shared task file) but its status is 0.
        assert_eq!(devchk(0x1f0, 0xa0), (0x55, 0xaa));
        assert_eq!(devchk(0x1f0, 0xb0), (0x55, 0xaa));
        assert_eq!(r.inb(0x1f7), 0);
        assert_eq!(r.inb(0x3f6), 0);
        assert_eq!(r.inb(0x1f6), 0xb0); // SeaBIOS re-reads the device register
        r.outb(0x1f7, cmd::IDENTIFY_DEVICE);
        assert!(!r.irq14());
        assert_eq!(r.inb(0x1f7), 0);
        // SRST, then classify the slave: error 01, ATA signature, status 0 -> "no device".
        r.outb(0x3f6, CTL_SRST);
        r.outb(0x3f6, 0);
        r.outb(0x1f6, 0xb0);
        assert_eq!((r.inb(0x1f1), r.inb(0x1f2), r.inb(0x1f3)), (1, 1, 1));
        assert_eq!((r.inb(0x1f4), r.inb(0x1f5), r.inb(0x1f7)), (0, 0, 0));
        r.outb(0x1f6, 0xa0);
        assert_eq!(r.inb(0x1f7), 0x50);
        // Empty secondary channel: everything reads 0 and nothing happens.
        assert_eq!(devchk(0x170, 0xa0), (0, 0));
        r.outb(0x177, cmd::IDENTIFY_DEVICE);
        assert_eq!((r.inb(0x177), r.inb(0x376), r.inw(0x170)), (0, 0, 0));
        assert!(!r.irqs.isa_level(15));
    }

    #[test]
    fn read_only_image_and_out_of_range() {
        let r = Rig::with_disk(MemImage::new(vec![0; 64 * 512], true));
        r.lba28(cmd::WRITE_SECTORS, 0, 1);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        r.outl(BM + 4, 0x1000);
        r.lba28(cmd::WRITE_DMA, 0, 1);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        r.lba28(cmd::READ_SECTORS, 63, 2);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::IDNF));
        r.lba28(cmd::READ_SECTORS, 63, 1);
        assert_eq!(r.pio_read16(1), vec![0; 512]);
        // A command after an error works.
        r.lba28(cmd::CHECK_POWER_MODE, 0, 0);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f2)), (0x50, 0xff));
    }

    struct Broken;
    impl BlockBackend for Broken {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            Err(BlockError::Io { offset, len: buf.len(), source: std::io::Error::other("EIO") })
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
            Err(BlockError::Io { offset, len: buf.len(), source: std::io::Error::other("EIO") })
        }
        fn flush(&self) -> Result<(), BlockError> {
            Err(BlockError::Io { offset: 0, len: 0, source: std::io::Error::other("EIO") })
        }
        fn len(&self) -> u64 {
            1 << 20
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn host_io_errors_abort() {
        let r = Rig::with_disk(Broken);
        r.lba28(cmd::READ_SECTORS, 0, 1);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        r.lba28(cmd::WRITE_SECTORS, 0, 1);
        for _ in 0..256 {
            r.outw(0x1f0, 0xabcd);
        }
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        r.lba28(cmd::FLUSH_CACHE, 0, 0);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        r.write_prd(0x1000, &[(0x8000, 512, true)]);
        r.outl(BM + 4, 0x1000);
        r.lba28(cmd::READ_DMA, 0, 1);
        r.outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
        assert_eq!((r.inb(0x1f7), r.inb(0x1f1)), (0x41, error::ABRT));
        assert_eq!(r.inb(BM + 2) & BM_ST_ERROR, 0, "a device error is not a bus error");
        assert!(r.ctrl.lock().unwrap().flush_all().is_err());
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        assert_eq!(r.inb(0x1f0), 0xff);
        r.outb(0x1f0, 1);
        assert_eq!(r.inl(0x1f4), 0x50a0_0000); // bytes 4..7: lba mid/high, device, status
        let mut d = [0u8; 2];
        r.bus.read_sync(0x1f1, &mut d); // unaligned: rejected by the bus
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(r.inb(BM + 1), 0);
        r.outb(BM + 3, 0xff);
        r.outl(BM + 4, 0x1234_5677);
        assert_eq!(r.inl(BM + 4), 0x1234_5674);
        // Data writes with no transfer, stop without start, BM start with nothing queued.
        r.outw(0x1f0, 0x1234);
        r.outb(BM, 0);
        r.outb(BM, BM_CMD_START);
        assert_eq!(r.inb(BM + 2) & BM_ST_ACTIVE, BM_ST_ACTIVE);
        r.outb(BM, 0);
        assert_eq!(r.inb(BM + 2) & BM_ST_ACTIVE, 0);
        let mut c = r.ctrl.lock().unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(c.read(9, 0, &mut b), IoResult::Done));
        assert_eq!(b, [0xff]);
        assert!(matches!(c.write(9, 0, &b), IoResult::Done));
    }

    #[test]
    fn attach_detach_reset() {
        let r = Rig::new();
        let mut c = r.ctrl.lock().unwrap();
        let img = Arc::new(MemImage::new(vec![0; 1 << 20], false));
        assert!(matches!(
            c.attach(2, 0, Box::new(MemImage::new(vec![], false)), DriveKind::Disk),
            Err(IdeError::BadSlot { .. })
        ));
        c.attach(1, 0, Box::new(MemImage::new(vec![], false)), DriveKind::Cdrom).unwrap();
        assert_eq!(c.drive_kind(1, 0), Some(DriveKind::Cdrom));
        assert!(c.detach(1, 0).unwrap().is_some());
        c.attach_with_config(1, 1, img.clone(), DriveKind::Disk, DiskConfig::default()).unwrap();
        assert!(matches!(
            c.attach(1, 1, Box::new(MemImage::new(vec![], false)), DriveKind::Disk),
            Err(IdeError::Occupied { .. })
        ));
        assert_eq!(c.drive_kind(1, 1), Some(DriveKind::Disk));
        drop(c);
        // Slave-only channel: the slave answers, the master reads 0.
        r.outb(0x176, 0xb0);
        assert_eq!(r.inb(0x177), 0x50);
        r.outb(0x176, 0xa0);
        assert_eq!(r.inb(0x177), 0);
        // Leave state behind, then reset.
        r.outb(0x176, 0xb0);
        r.outb(0x376, CTL_NIEN | CTL_HOB);
        r.outb(0x177, cmd::IDENTIFY_DEVICE);
        r.outb(BM + 8, BM_CMD_START);
        r.ctrl.lock().unwrap().reset();
        assert_eq!(r.inb(BM + 10), 0);
        assert_eq!(r.inb(BM + 8), 0);
        r.outb(0x176, 0xb0);
        assert_eq!(r.inb(0x177), 0x50);
        assert_eq!(r.inb(0x172), 1);
        let mut c = r.ctrl.lock().unwrap();
        c.detach(1, 1).unwrap();
        assert_eq!(img.flush_count(), 1);
        assert!(matches!(c.detach(1, 1), Err(IdeError::Empty { .. })));
        drop(c);
        assert_eq!(r.inb(0x177), 0);
    }

    /// SeaBIOS's `src/hw/ata.c`, port for port: what one channel sees from `ata_detect`,
    /// `ata_reset`, `init_drive_atapi`/`init_drive_ata` and `ata_readwrite` (PIO, no bus
    /// master). Every helper returns what SeaBIOS would conclude, so a failure names the step.
    struct SeaBios<'a> {
        r: &'a Rig,
        base: u64,
        ctl: u64,
        /// CONFIG_ATA_PIO32: `rep insl` instead of `rep insw`.
        pio32: bool,
    }

    const DC_HD15: u8 = 0x08;

    impl SeaBios<'_> {
        fn stat(&self) -> u8 {
            self.r.inb(self.base + 7)
        }
        /// await_not_bsy / powerup_await_non_bsy (a synchronous device must be idle at once).
        fn not_bsy(&self) -> u8 {
            let s = self.stat();
            assert_eq!(s & status::BSY, 0, "still busy");
            s
        }
        /// Port-valid check of ata_detect: device select, then SC/SN write-read.
        fn ports_valid(&self, newdh: u8) -> bool {
            self.not_bsy();
            self.r.outb(self.base + 6, newdh);
            self.not_bsy();
            self.r.outb(self.base + 6, newdh);
            let dh = self.r.inb(self.base + 6);
            self.r.outb(self.base + 2, 0x55);
            self.r.outb(self.base + 3, 0xaa);
            let (sc, sn) = (self.r.inb(self.base + 2), self.r.inb(self.base + 3));
            sc == 0x55 && sn == 0xaa && dh == newdh
        }
        /// ata_reset for the master with the dummy drive (type 0, so no await_rdy).
        fn reset(&self) {
            self.r.outb(self.ctl, DC_HD15 | CTL_NIEN | CTL_SRST);
            self.r.outb(self.ctl, DC_HD15 | CTL_NIEN);
            self.not_bsy();
            self.r.outb(self.base + 6, 0xa0);
            self.r.outb(self.ctl, DC_HD15);
        }
        /// send_cmd: select (device register keeps DEV from `slave`), LBA48 high bytes, command.
        fn send_cmd(&self, slave: bool, device: u8, hob: Option<[u8; 5]>, lo: [u8; 5], command: u8) {
            self.not_bsy();
            let newdh = (device & !0x10) | if slave { 0xb0 } else { 0xa0 };
            let olddh = self.r.inb(self.base + 6);
            self.r.outb(self.base + 6, newdh);
            if (olddh ^ newdh) & 0x10 != 0 {
                self.not_bsy();
            }
            for regs in hob.iter().chain(std::iter::once(&lo)) {
                for (i, v) in regs.iter().enumerate() {
                    self.r.outb(self.base + 1 + i as u64, *v);
                }
            }
            self.r.outb(self.base + 7, command);
        }
        /// ata_pio_cmd_data for a read: Err(code) with SeaBIOS's negative return codes.
        fn pio_in(
            &self,
            slave: bool,
            device: u8,
            lo: [u8; 5],
            command: u8,
            sectors: usize,
        ) -> Result<Vec<u8>, i32> {
            self.r.outb(self.ctl, DC_HD15 | CTL_NIEN);
            self.send_cmd(slave, device, None, lo, command);
            let res = self.wait_data().and_then(|()| self.pio_transfer(sectors));
            self.r.outb(self.ctl, DC_HD15);
            res
        }
        /// ata_wait_data.
        fn wait_data(&self) -> Result<(), i32> {
            let s = self.not_bsy();
            if s & status::ERR != 0 {
                let _err = self.r.inb(self.base + 1);
                return Err(-4);
            }
            if s & status::DRQ == 0 {
                return Err(-5);
            }
            Ok(())
        }
        /// ata_pio_transfer (read): each `rep ins` arrives as single 2- or 4-byte accesses.
        fn pio_transfer(&self, sectors: usize) -> Result<Vec<u8>, i32> {
            let mut buf = Vec::new();
            let mut left = sectors;
            loop {
                if self.pio32 {
                    for _ in 0..128 {
                        buf.extend_from_slice(&self.r.inl(self.base).to_le_bytes());
                    }
                } else {
                    for _ in 0..256 {
                        buf.extend_from_slice(&self.r.inw(self.base).to_le_bytes());
                    }
                }
                self.r.inb(self.ctl); // pause_await_not_bsy: one alt-status read
                let s = self.not_bsy();
                left -= 1;
                if left == 0 {
                    return if s & (status::BSY | status::DRQ | status::ERR) != 0 {
                        Err(-7)
                    } else {
                        Ok(buf)
                    };
                }
                if s & (status::BSY | status::DRQ | status::ERR) != status::DRQ {
                    return Err(-6);
                }
            }
        }
        /// ata_detect for one slot: Some(IDENTIFY words) when SeaBIOS registers an ATA disk.
        fn detect(&self, slave: bool, didreset: &mut bool) -> Option<Vec<u16>> {
            if !self.ports_valid(if slave { 0xb0 } else { 0xa0 }) {
                return None;
            }
            if !*didreset {
                self.reset();
                *didreset = true;
            }
            // init_drive_atapi: IDENTIFY PACKET DEVICE must fail on a disk.
            if let Ok(buf) = self.pio_in(slave, 0, [0; 5], cmd::IDENTIFY_PACKET_DEVICE, 1) {
                panic!("ATA disk answered IDENTIFY PACKET DEVICE: {:?}", &buf[..8]);
            }
            if self.stat() == 0 {
                return None;
            }
            assert_ne!(self.stat() & status::DRDY, 0, "await_rdy");
            let buf = self.pio_in(slave, 0, [0; 5], cmd::IDENTIFY_DEVICE, 1).ok()?;
            Some(buf.chunks(2).map(|w| u16::from_le_bytes([w[0], w[1]])).collect())
        }
        /// ata_readwrite (read, LBA28, PIO).
        fn read(&self, lba: u32, count: u8) -> Result<Vec<u8>, i32> {
            let lo = [0, count, lba as u8, (lba >> 8) as u8, (lba >> 16) as u8];
            self.pio_in(false, (lba >> 24) as u8 & 0xf | DEV_LBA_BIT, lo, cmd::READ_SECTORS, count.into())
        }
    }

    const DEV_LBA_BIT: u8 = 0x40;

    /// Regression: SeaBIOS must print "ata0-0: ... Hard-Disk" and read the boot sector. On the
    /// KVM backend this failed while a `rep insw` exit reached the bus as one 512-byte access
    /// (rejected, so IDENTIFY data was never consumed and DRQ stayed set: ata_pio_transfer's
    /// "no sectors left (status 58)"); the vCPU loop now splits it into 2-byte accesses.
    #[test]
    fn seabios_detect_and_boot_sector_replay() {
        for pio32 in [false, true] {
            let mut disk = pattern(64);
            disk[510] = 0x55;
            disk[511] = 0xaa;
            let r = Rig::with_disk(MemImage::new(disk.clone(), false));
            let sb = SeaBios { r: &r, base: 0x1f0, ctl: 0x3f6, pio32 };
            let mut didreset = false;
            let id = sb.detect(false, &mut didreset).expect("ata0-0 not detected");
            // What init_drive_ata prints: model, version, size (words 60-61, or 100-103 if LBA48).
            let model: String =
                id[27..47].iter().flat_map(|w| [(w >> 8) as u8 as char, *w as u8 as char]).collect();
            assert_eq!(model.trim_end(), "HVMDM HARDDISK");
            assert_eq!(15 - id[80].leading_zeros() as usize, 7); // "ATA-7"
            assert_ne!(id[83] & (1 << 10), 0);
            assert_eq!(u64::from(id[100]) | u64::from(id[101]) << 16, 64);
            assert_eq!(u32::from(id[60]) | u32::from(id[61]) << 16, 64);
            // Word 93 does not claim "device 0 answers for device 1", so the slave is probed and
            // rejected (status 0 after its IDENTIFY PACKET went nowhere).
            assert_ne!(id[93] & 0xdf61, 0x4041);
            assert_eq!(sb.detect(true, &mut didreset), None);
            // Boot: one sector at LBA 0, then a multi-sector read as INT 13h issues it.
            let mbr = sb.read(0, 1).expect("boot sector read");
            assert_eq!(&mbr[510..], &[0x55, 0xaa]);
            assert_eq!(mbr, disk[..512]);
            assert_eq!(sb.read(5, 3).expect("3-sector read"), disk[5 * 512..8 * 512]);
            // Interrupts were masked (nIEN) throughout; nothing is left pending once re-enabled.
            assert!(!r.irq14());
            // Empty secondary: the SC/SN check fails, nothing is registered.
            let sb2 = SeaBios { r: &r, base: 0x170, ctl: 0x376, pio32 };
            let mut didreset2 = false;
            assert_eq!(sb2.detect(false, &mut didreset2), None);
            assert_eq!(sb2.detect(true, &mut didreset2), None);
        }
    }

    /// Deferred completion: a backend that blocks until the test opens its gate.
    mod deferred {
        use super::*;
        use std::sync::Condvar;
        use std::time::{Duration, Instant};

        #[derive(Default)]
        struct GateState {
            open: bool,
            /// Names of the threads that entered the backend, in order.
            entered: Vec<String>,
        }

        struct Gated {
            img: MemImage,
            st: Mutex<GateState>,
            cv: Condvar,
        }

        impl Gated {
            fn new(bytes: Vec<u8>) -> Arc<Self> {
                Arc::new(Gated { img: MemImage::new(bytes, false), st: Mutex::default(), cv: Condvar::new() })
            }
            fn enter(&self) {
                let mut st = self.st.lock().unwrap();
                st.entered.push(std::thread::current().name().unwrap_or("?").to_string());
                self.cv.notify_all();
                while !st.open {
                    st = self.cv.wait(st).unwrap();
                }
            }
            /// Waits (bounded) until `n` requests have reached the backend.
            fn wait_entered(&self, n: usize) -> Vec<String> {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut st = self.st.lock().unwrap();
                while st.entered.len() < n {
                    let left = deadline.checked_duration_since(Instant::now()).expect("I/O never started");
                    st = self.cv.wait_timeout(st, left).unwrap().0;
                }
                st.entered.clone()
            }
            fn set_open(&self, open: bool) {
                self.st.lock().unwrap().open = open;
                self.cv.notify_all();
            }
        }

        impl BlockBackend for Gated {
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
                self.enter();
                self.img.read_at(offset, buf)
            }
            fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
                self.enter();
                self.img.write_at(offset, buf)
            }
            fn flush(&self) -> Result<(), BlockError> {
                self.enter();
                self.img.flush()
            }
            fn len(&self) -> u64 {
                self.img.len()
            }
            fn is_read_only(&self) -> bool {
                false
            }
        }

        /// Opens the gate when dropped, so a failing test unwinds instead of hanging in the
        /// engine's join. Declare it after the rig (dropped first).
        struct OpenOnDrop(Arc<Gated>);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                self.0.set_open(true);
            }
        }

        const SECTORS: usize = 256;

        /// Primary master on a gated image, secondary master on a plain one.
        fn rig() -> (Rig, Arc<Gated>) {
            let r = Rig::new();
            let g = Gated::new(pattern(SECTORS));
            let mut c = r.ctrl.lock().unwrap();
            c.attach_with_config(0, 0, g.clone(), DriveKind::Disk, DiskConfig::default()).unwrap();
            c.attach(1, 0, Box::new(MemImage::new(pattern(SECTORS), false)), DriveKind::Disk).unwrap();
            drop(c);
            (r, g)
        }

        impl Rig {
            fn raw_outb(&self, port: u64, v: u8) {
                self.bus.write_sync(port, &[v]);
            }
            fn raw_inb(&self, port: u64) -> u8 {
                let mut d = [0u8];
                self.bus.read_sync(port, &mut d);
                d[0]
            }
            fn raw_inw(&self, port: u64) -> u16 {
                let mut d = [0u8; 2];
                self.bus.read_sync(port, &mut d);
                u16::from_le_bytes(d)
            }
            /// LBA28 command on the primary master without waiting for anything.
            fn raw_lba28(&self, command: u8, lba: u32, count: u8) {
                for (port, v) in [
                    (0x1f6, 0xe0 | (lba >> 24) as u8 & 0xf),
                    (0x1f2, count),
                    (0x1f3, lba as u8),
                    (0x1f4, (lba >> 8) as u8),
                    (0x1f5, (lba >> 16) as u8),
                    (0x1f7, command),
                ] {
                    self.raw_outb(port, v);
                }
            }
            fn drain_channel(&self, ch: usize) {
                let e = self.ctrl.lock().unwrap().channels[ch].engine.clone();
                e.drain();
            }
        }

        /// The other channel works normally while the primary's image is stuck.
        fn secondary_still_works(r: &Rig) {
            r.raw_outb(0x176, 0xe0);
            r.raw_outb(0x172, 1);
            r.raw_outb(0x173, 7);
            r.raw_outb(0x174, 0);
            r.raw_outb(0x175, 0);
            r.raw_outb(0x177, cmd::READ_SECTORS);
            r.drain_channel(1);
            assert!(r.irqs.isa_level(15));
            assert_eq!(r.raw_inb(0x177), 0x58);
            let got: Vec<u8> = (0..256).flat_map(|_| r.raw_inw(0x170).to_le_bytes()).collect();
            assert_eq!(got, pattern(SECTORS)[7 * 512..8 * 512]);
            assert_eq!(r.raw_inb(0x177), 0x50);
        }

        #[test]
        fn dma_read_in_flight_leaves_registers_responsive() {
            let (r, g) = rig();
            let _open = OpenOnDrop(g.clone());
            r.write_prd(0x1000, &[(0x10000, 0, false), (0x20000, 0x2000, true)]);
            r.raw_outb(BM + 4, 0x00);
            r.raw_outb(BM + 5, 0x10);
            r.raw_lba28(cmd::READ_DMA, 3, 136);
            assert_eq!(r.raw_inb(0x1f7), 0x58, "DMA armed, waiting for the bus master");
            let t = Instant::now();
            r.raw_outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
            let who = g.wait_entered(1);
            assert_eq!(who, ["hvmdm-io-ide0"], "the image is read on the channel's worker");
            // The job is blocked inside the image: the guest still gets answers.
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert_eq!(r.raw_inb(0x3f6) & (status::BSY | status::DRQ), status::BSY);
            assert_eq!(r.raw_inb(BM + 2) & (BM_ST_ACTIVE | BM_ST_INTERRUPT), BM_ST_ACTIVE);
            assert_eq!(r.raw_inw(0x1f0), 0, "no data while busy");
            assert!(!r.irq14());
            assert!(r.ctrl.lock().unwrap().io_busy());
            // A command to the busy drive is ignored.
            r.raw_outb(0x1f7, cmd::IDENTIFY_DEVICE);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            secondary_still_works(&r);
            assert!(t.elapsed() < Duration::from_secs(5));
            g.set_open(true);
            r.drain();
            assert!(!r.ctrl.lock().unwrap().io_busy());
            assert!(r.irq14(), "completion raises IRQ 14");
            assert_eq!(r.raw_inb(BM + 2) & (BM_ST_ACTIVE | BM_ST_INTERRUPT | BM_ST_ERROR), BM_ST_INTERRUPT);
            assert_eq!(r.raw_inb(0x1f7), 0x50);
            assert!(!r.irq14());
            let mut m = vec![0u8; 136 * 512];
            r.mem.read(0x10000, &mut m[..0x10000]).unwrap();
            r.mem.read(0x20000, &mut m[0x10000..]).unwrap();
            assert_eq!(m, pattern(SECTORS)[3 * 512..139 * 512]);
            // The registers point past the transfer.
            assert_eq!(r.raw_inb(0x1f3), 139);
        }

        #[test]
        fn pio_read_and_write_blocks_complete_deferred() {
            let (r, g) = rig();
            let _open = OpenOnDrop(g.clone());
            r.raw_lba28(cmd::READ_SECTORS, 10, 2);
            g.wait_entered(1);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert_eq!(r.raw_inw(0x1f0), 0, "data reads while BSY return 0 and do not advance");
            assert!(!r.irq14());
            secondary_still_works(&r);
            g.set_open(true);
            r.drain();
            assert!(r.irq14());
            assert_eq!(r.pio_read16(2), pattern(SECTORS)[10 * 512..12 * 512]);
            assert_eq!(r.inb(0x1f7), 0x50);
            // Write: BSY after the block is filled, until the image has it.
            g.set_open(false);
            r.raw_lba28(cmd::WRITE_SECTORS, 20, 1);
            assert_eq!(r.raw_inb(0x1f7), 0x58);
            for _ in 0..256 {
                r.bus.write_sync(0x1f0, &0xa55au16.to_le_bytes());
            }
            g.wait_entered(2);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert!(!r.irq14());
            // FLUSH CACHE is ignored while busy, then runs on the worker too.
            g.set_open(true);
            r.drain();
            assert!(r.irq14());
            assert_eq!(r.inb(0x1f7), 0x50);
            assert_eq!(&g.img.contents()[20 * 512..21 * 512], &[0x5a, 0xa5].repeat(256)[..]);
            g.set_open(false);
            r.raw_lba28(cmd::FLUSH_CACHE, 0, 0);
            let who = g.wait_entered(3);
            assert_eq!(who[2], "hvmdm-io-ide0");
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            g.set_open(true);
            r.drain();
            assert_eq!(r.inb(0x1f7), 0x50);
            assert_eq!(g.img.flush_count(), 1);
        }

        #[test]
        fn reset_during_a_job_makes_its_completion_stale() {
            let (r, g) = rig();
            let _open = OpenOnDrop(g.clone());
            // DMA write in flight, then SRST.
            r.mem.write(0x8000, &[0x77; 512]).unwrap();
            r.write_prd(0x1000, &[(0x8000, 512, true)]);
            r.raw_outb(BM + 4, 0x00);
            r.raw_outb(BM + 5, 0x10);
            r.raw_lba28(cmd::WRITE_DMA, 30, 1);
            r.raw_outb(BM, BM_CMD_START);
            g.wait_entered(1);
            r.raw_outb(0x3f6, CTL_SRST);
            assert_eq!(r.raw_inb(0x3f6), status::BSY);
            r.raw_outb(0x3f6, 0);
            assert_eq!(r.raw_inb(0x1f7), 0x50, "signature posted while the old job still runs");
            assert_eq!(r.raw_inb(BM + 2) & BM_ST_ACTIVE, 0);
            g.set_open(true);
            r.drain();
            // The stale completion changed nothing; the host write itself did finish.
            assert!(!r.irq14());
            assert_eq!(r.inb(BM + 2) & (BM_ST_INTERRUPT | BM_ST_ERROR), 0);
            assert_eq!((r.inb(0x1f1), r.inb(0x1f2), r.inb(0x1f3)), (1, 1, 1));
            assert_eq!(&g.img.contents()[30 * 512..31 * 512], &[0x77; 512][..]);
            // Machine reset during a PIO read; then the drive works normally.
            g.set_open(false);
            r.outb(BM, 0);
            r.raw_lba28(cmd::READ_SECTORS, 40, 1);
            g.wait_entered(2);
            r.ctrl.lock().unwrap().reset();
            g.set_open(true);
            r.drain();
            assert!(!r.irq14());
            assert_eq!(r.inb(0x1f7), 0x50);
            assert_eq!(r.inw(0x1f0), 0, "no data from the abandoned read");
            r.lba28(cmd::READ_SECTORS, 41, 1);
            assert_eq!(r.pio_read16(1), pattern(SECTORS)[41 * 512..42 * 512]);
        }

        #[test]
        fn manual_engines_hold_jobs_until_drained() {
            let r = Rig::with_disk(MemImage::new(pattern(64), false));
            let manual = || Arc::new(IoEngine::manual("m"));
            r.ctrl.lock().unwrap().set_io_engines(manual(), manual()).unwrap();
            r.raw_lba28(cmd::READ_SECTORS, 1, 1);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert!(!r.irq14());
            assert!(matches!(r.ctrl.lock().unwrap().set_io_engines(manual(), manual()), Err(IdeError::Busy)));
            r.drain();
            assert!(r.irq14());
            assert_eq!(r.pio_read16(1), pattern(64)[512..1024]);
        }

        #[test]
        fn a_stuck_image_cannot_grow_the_queue() {
            let (r, g) = rig();
            let _open = OpenOnDrop(g.clone());
            // Each SRST orphans the job in flight; the next command queues another.
            for i in 0..MAX_QUEUED_JOBS {
                r.raw_lba28(cmd::READ_SECTORS, 0, 1);
                assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY, "command {i}");
                r.raw_outb(0x3f6, CTL_SRST);
                r.raw_outb(0x3f6, 0);
            }
            g.wait_entered(1);
            r.raw_lba28(cmd::READ_SECTORS, 0, 1);
            assert!(r.irq14());
            assert_eq!((r.raw_inb(0x1f7), r.raw_inb(0x1f1)), (0x41, error::ABRT));
            g.set_open(true);
            r.drain();
            r.lba28(cmd::READ_SECTORS, 2, 1);
            assert_eq!(r.pio_read16(1), pattern(SECTORS)[2 * 512..3 * 512]);
        }

        /// A snapshot taken while a command is in flight (the save cannot wait under the lock)
        /// records it as still to be done; the restored controller re-issues it.
        #[test]
        fn snapshot_with_a_job_in_flight_reissues_it() {
            use crate::snapshot::testing::{assert_prefixes_fail, load, payload};
            type Setup = fn(&Rig);
            type Check = fn(&Rig);
            let prd = |r: &Rig| {
                r.write_prd(0x1000, &[(0x30000, 1024, true)]);
                r.bus.write_sync(BM + 4, &0x1000u32.to_le_bytes());
            };
            let cases: [(&str, Setup, Check); 4] = [
                (
                    "dma read",
                    |r| {
                        r.write_prd(0x1000, &[(0x30000, 1024, true)]);
                        r.bus.write_sync(BM + 4, &0x1000u32.to_le_bytes());
                        r.raw_lba28(cmd::READ_DMA, 50, 2);
                        r.raw_outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
                    },
                    |r| {
                        assert_eq!(r.inb(BM + 2) & (BM_ST_ACTIVE | BM_ST_INTERRUPT), BM_ST_INTERRUPT);
                        let mut m = vec![0u8; 1024];
                        r.mem.read(0x30000, &mut m).unwrap();
                        assert_eq!(m, pattern(SECTORS)[50 * 512..52 * 512]);
                    },
                ),
                (
                    "pio read",
                    |r| r.raw_lba28(cmd::READ_SECTORS, 60, 1),
                    |r| {
                        assert_eq!(r.inb(0x3f6), 0x58);
                        assert_eq!(r.pio_read16(1), pattern(SECTORS)[60 * 512..61 * 512]);
                    },
                ),
                (
                    "pio write",
                    |r| {
                        r.raw_lba28(cmd::WRITE_SECTORS, 70, 1);
                        for _ in 0..256 {
                            r.bus.write_sync(0x1f0, &0x1234u16.to_le_bytes());
                        }
                    },
                    |r| {
                        r.lba28(cmd::READ_SECTORS, 70, 1);
                        assert_eq!(r.pio_read16(1), [0x34, 0x12].repeat(256));
                    },
                ),
                ("flush", |r| r.raw_lba28(cmd::FLUSH_CACHE_EXT, 0, 0), |_| {}),
            ];
            for (name, setup, check) in cases {
                let (a, g) = rig();
                let _open = OpenOnDrop(g.clone());
                setup(&a);
                g.wait_entered(1);
                let blob = payload(&*a.ctrl.lock().unwrap());
                assert_eq!(a.raw_inb(0x1f7), STATUS_IO_BUSY, "{name}: still in flight after the save");
                let b = Rig::with_disk(MemImage::new(pattern(SECTORS), false));
                b.ctrl
                    .lock()
                    .unwrap()
                    .attach(1, 0, Box::new(MemImage::new(pattern(SECTORS), false)), DriveKind::Disk)
                    .unwrap();
                prd(&b);
                assert_prefixes_fail(&*b.ctrl.lock().unwrap(), &blob);
                load(&mut *b.ctrl.lock().unwrap(), &blob).unwrap();
                b.drain();
                assert!(b.irq14(), "{name}: the re-issued command completes with its interrupt");
                assert_eq!(b.inb(0x1f7) & !status::DRQ, 0x50, "{name}");
                check(&b);
                // The source finishes on its own once its image answers.
                g.set_open(true);
                a.drain();
                assert!(a.irq14(), "{name}: source completion");
            }
        }

        #[test]
        fn atapi_reads_complete_deferred() {
            let r = Rig::new();
            let blocks = 40;
            let iso: Vec<u8> = (0..blocks * CD_BLOCK_SIZE).map(|i| (i * 3 + i / 2048) as u8).collect();
            let g = Gated::new(iso.clone());
            let _open = OpenOnDrop(g.clone());
            let media: Arc<dyn BlockBackend> = g.clone();
            r.ctrl.lock().unwrap().attach_cdrom(0, 0, Some(media), CdConfig::default()).unwrap();
            let packet = |cdb: &[u8], limit: u16, dma: bool| {
                r.raw_outb(0x1f6, 0xa0);
                r.raw_outb(0x1f1, u8::from(dma));
                r.raw_outb(0x1f4, limit as u8);
                r.raw_outb(0x1f5, (limit >> 8) as u8);
                r.raw_outb(0x1f7, cmd::PACKET);
                let mut c = [0u8; 12];
                c[..cdb.len()].copy_from_slice(cdb);
                for w in c.chunks(2) {
                    r.bus.write_sync(0x1f0, w);
                }
            };
            let read10 = |lba: u8, n: u8| [0x28, 0, 0, 0, 0, lba, 0, 0, n];
            // PIO: the first DRQ block needs a medium read.
            packet(&read10(2, 1), 2048, false);
            g.wait_entered(1);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert!(!r.irq14());
            g.set_open(true);
            r.drain();
            assert!(r.irq14());
            assert_eq!(r.inb(0x1f7), 0x58);
            let got: Vec<u8> = (0..1024).flat_map(|_| r.inw(0x1f0).to_le_bytes()).collect();
            assert_eq!(got, iso[2 * 2048..3 * 2048]);
            assert_eq!(r.inb(0x1f7), 0x50);
            // DMA.
            g.set_open(false);
            r.outb(BM + 2, BM_ST_INTERRUPT | BM_ST_ERROR);
            r.write_prd(0x1000, &[(0x40000, 4096, true)]);
            r.bus.write_sync(BM + 4, &0x1000u32.to_le_bytes());
            packet(&read10(5, 2), 0, true);
            assert_eq!(r.raw_inb(0x1f7), 0x58);
            r.raw_outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
            g.wait_entered(2);
            assert_eq!(r.raw_inb(0x1f7), STATUS_IO_BUSY);
            assert_eq!(r.raw_inb(BM + 2) & BM_ST_ACTIVE, BM_ST_ACTIVE);
            // DEVICE RESET is accepted while busy and abandons the command.
            r.raw_outb(0x1f7, cmd::DEVICE_RESET);
            assert_eq!(r.raw_inb(0x1f7), 0);
            g.set_open(true);
            r.drain();
            assert!(!r.irq14(), "the abandoned DMA does not interrupt");
            assert_eq!(r.inb(BM + 2) & (BM_ST_ACTIVE | BM_ST_INTERRUPT), 0);
            // Again, to completion.
            r.outb(BM, 0);
            packet(&read10(5, 2), 0, true);
            r.outb(BM, BM_CMD_START | BM_CMD_TO_MEMORY);
            assert!(r.irq14());
            assert_eq!(r.inb(0x1f7), 0x50);
            let mut m = vec![0u8; 4096];
            r.mem.read(0x40000, &mut m).unwrap();
            assert_eq!(m, iso[5 * 2048..7 * 2048]);
        }
    }

    /// The original failure mode, kept as a check that the device does not half-consume an
    /// access the bus rejects: a flattened `rep insw` leaves the whole IDENTIFY block pending.
    #[test]
    fn flattened_rep_insw_is_not_data() {
        let r = Rig::with_disk(MemImage::new(vec![0; 1 << 20], false));
        r.outb(0x1f6, 0xa0);
        r.outb(0x1f7, cmd::IDENTIFY_DEVICE);
        let mut block = [0u8; 512];
        r.bus.read_sync(0x1f0, &mut block);
        assert!(block.iter().all(|b| *b == 0xff));
        assert_eq!(r.inb(0x1f7), 0x58); // DRQ still set: SeaBIOS's -7
        assert_eq!(r.pio_read16(1).len(), 512);
        assert_eq!(r.inb(0x1f7), 0x50);
    }

    mod atapi {
        use super::super::super::atapi::op;
        use super::*;
        use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

        /// Secondary channel, as libxl puts its CD (hdc = ide-5632).
        const CMD: u64 = 0x170;
        const BM2: u64 = BM + 8;

        /// The IDE test rig with a CD drive at 1:0.
        struct Cd {
            r: Rig,
        }

        impl std::ops::Deref for Cd {
            type Target = Rig;
            fn deref(&self) -> &Rig {
                &self.r
            }
        }

        fn iso(blocks: usize) -> Vec<u8> {
            (0..blocks * CD_BLOCK_SIZE).map(|i| (i * 5 + i / CD_BLOCK_SIZE * 11) as u8).collect()
        }

        impl Cd {
            /// The drive holds `blocks` blocks of [`iso`] (or nothing).
            fn new(blocks: Option<usize>) -> Cd {
                let r = Rig::new();
                let media = blocks.map(|n| Arc::new(MemImage::new(iso(n), true)) as Arc<dyn BlockBackend>);
                r.ctrl.lock().unwrap().attach_cdrom(1, 0, media, CdConfig::default()).unwrap();
                Cd { r }
            }
            fn inw(&self) -> u16 {
                self.r.inw(CMD)
            }
            fn irq(&self) -> bool {
                self.irqs.isa_level(15)
            }
            /// PACKET with `limit` and DMA flag, then the command packet as six 16-bit writes.
            fn packet(&self, cdb: &[u8], limit: u16, dma: bool) {
                let mut c = [0u8; 12];
                c[..cdb.len()].copy_from_slice(cdb);
                self.outb(CMD + 6, 0xa0);
                self.outb(CMD + 1, u8::from(dma));
                self.outb(CMD + 4, limit as u8);
                self.outb(CMD + 5, (limit >> 8) as u8);
                self.outb(CMD + 7, cmd::PACKET);
                assert_eq!(self.inb(CMD + 0x206), 0x58, "DRQ for the packet");
                assert_eq!(self.inb(CMD + 2) & 3, IREASON_COD);
                assert!(!self.irq(), "no interrupt before the packet");
                for w in c.chunks(2) {
                    self.write(CMD, w);
                }
            }
            /// Reads one DRQ block: (bytes announced, data, interrupt reason).
            fn drq_block(&self) -> (usize, Vec<u8>) {
                assert!(self.irq());
                assert_eq!(self.inb(CMD + 7), 0x58);
                assert!(!self.irq());
                assert_eq!(self.inb(CMD + 2) & 3, IREASON_IO);
                let n = usize::from(self.inb(CMD + 4)) | usize::from(self.inb(CMD + 5)) << 8;
                let mut v = Vec::new();
                for _ in 0..n.div_ceil(2) {
                    v.extend_from_slice(&self.inw().to_le_bytes());
                }
                v.truncate(n);
                (n, v)
            }
            /// After the last data: good status, "status" interrupt reason, interrupt.
            fn expect_good(&self) {
                assert!(self.irq());
                assert_eq!(self.inb(CMD + 7), 0x50);
                assert_eq!(self.inb(CMD + 2) & 3, IREASON_COD | IREASON_IO);
            }
            /// CHECK CONDITION with sense key `key`.
            fn expect_check(&self, key: u8) {
                assert!(self.irq());
                assert_eq!(self.inb(CMD + 7), 0x41);
                assert_eq!(self.inb(CMD + 1), key << 4 | error::ABRT);
                assert_eq!(self.inb(CMD + 2) & 3, IREASON_COD | IREASON_IO);
            }
            fn sense(&self) -> (u8, u8, u8) {
                self.packet(&[op::REQUEST_SENSE, 0, 0, 0, 18], 18, false);
                let (_, s) = self.drq_block();
                self.expect_good();
                (s[2], s[12], s[13])
            }
        }

        #[test]
        fn signature_identify_and_empty_drive() {
            for blocks in [Some(4), None] {
                let r = Cd::new(blocks);
                r.outb(CMD + 6, 0xa0);
                // ATAPI signature, DRDY clear; the absent slave reads status 0.
                assert_eq!(
                    [r.inb(CMD + 2), r.inb(CMD + 3), r.inb(CMD + 4), r.inb(CMD + 5)],
                    [1, 1, 0x14, 0xeb]
                );
                assert_eq!(r.inb(CMD + 7), 0);
                // IDENTIFY DEVICE aborts and leaves the signature in the registers.
                r.outb(CMD + 4, 0);
                r.outb(CMD + 7, cmd::IDENTIFY_DEVICE);
                assert!(r.irq());
                assert_eq!(r.inb(CMD + 7), 0x41);
                assert_eq!(r.inb(CMD + 1), error::ABRT);
                assert_eq!((r.inb(CMD + 4), r.inb(CMD + 5)), (0x14, 0xeb));
                r.outb(CMD + 7, cmd::IDENTIFY_PACKET_DEVICE);
                assert!(r.irq());
                assert_eq!(r.inb(CMD + 7), 0x58);
                let id: Vec<u16> = (0..256).map(|_| r.inw()).collect();
                assert_eq!(id[0], 0x85c0);
                assert_eq!(r.inb(CMD + 7), 0x50);
                // SET FEATURES transfer mode: MWDMA2 shows in word 63.
                r.outb(CMD + 1, 0x03);
                r.outb(CMD + 2, 0x22);
                r.outb(CMD + 7, cmd::SET_FEATURES);
                assert_eq!(r.inb(CMD + 7), 0x50);
                r.outb(CMD + 7, cmd::IDENTIFY_PACKET_DEVICE);
                let id: Vec<u16> = (0..256).map(|_| r.inw()).collect();
                assert_eq!(id[63], 0x407);
                assert_eq!(r.ctrl.lock().unwrap().drive_kind(1, 0), Some(DriveKind::Cdrom));
            }
        }

        #[test]
        fn pio_read_through_packet_and_byte_count_limit() {
            let r = Cd::new(Some(40));
            let img = iso(40);
            // Unit attention? None: the medium was there at power-on.
            r.packet(&[op::READ_10, 0, 0, 0, 0, 2, 0, 0, 2], 2048, false);
            let (n, a) = r.drq_block();
            assert_eq!(n, 2048);
            let (_, b) = r.drq_block();
            r.expect_good();
            assert_eq!([a, b].concat(), img[2 * 2048..4 * 2048]);
            // An odd limit that does not divide the data: even DRQ blocks, the rest at the end.
            r.packet(&[op::READ_12, 0, 0, 0, 0, 5, 0, 0, 0, 2], 3001, false);
            let (n1, a) = r.drq_block();
            let (n2, b) = r.drq_block();
            r.expect_good();
            assert_eq!((n1, n2), (3000, 1096));
            assert_eq!([a, b].concat(), img[5 * 2048..7 * 2048]);
            // Limit 0: one DRQ block of up to 0xfffe bytes.
            r.packet(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 40], 0, false);
            let (n1, _) = r.drq_block();
            assert_eq!(n1, 0xfffe);
            let (n2, b) = r.drq_block();
            assert_eq!(n2, 40 * 2048 - 0xfffe);
            assert_eq!(b, img[0xfffe..]);
            r.expect_good();
            // Odd-length reply (INQUIRY with allocation 5): the last word is padded.
            r.packet(&[op::INQUIRY, 0, 0, 0, 5], 0x100, false);
            let (n, d) = r.drq_block();
            assert_eq!((n, &d[..2]), (5, &[5u8, 0x80][..]));
            r.expect_good();
            // Past the end.
            r.packet(&[op::READ_10, 0, 0, 0, 0, 39, 0, 0, 2], 2048, false);
            r.expect_check(5);
            assert_eq!(r.sense(), (5, 0x21, 0));
        }

        #[test]
        fn dma_read_through_prds() {
            let r = Cd::new(Some(16));
            let img = iso(16);
            // 3 blocks over two PRD entries; engine started after the packet.
            let e0 = 0x10000u64 | (2048u64 << 32);
            let e1 = 0x20000u64 | (4096u64 << 32) | (1 << 63);
            r.mem.write(0x1000, &e0.to_le_bytes()).unwrap();
            r.mem.write(0x1008, &e1.to_le_bytes()).unwrap();
            r.bus.write_sync(BM2 + 4, &0x1000u32.to_le_bytes());
            r.packet(&[op::READ_10, 0, 0, 0, 0, 7, 0, 0, 3], 0, true);
            assert!(!r.irq());
            assert_eq!(r.inb(CMD + 0x206) & status::DRQ, status::DRQ);
            r.outb(BM2, BM_CMD_START | BM_CMD_TO_MEMORY);
            assert_eq!(r.inb(BM2 + 2) & (BM_ST_INTERRUPT | BM_ST_ACTIVE | BM_ST_ERROR), BM_ST_INTERRUPT);
            r.expect_good();
            let mut m = vec![0u8; 3 * 2048];
            r.mem.read(0x10000, &mut m[..2048]).unwrap();
            r.mem.read(0x20000, &mut m[2048..]).unwrap();
            assert_eq!(m, img[7 * 2048..10 * 2048]);
            // A small reply by DMA (engine already running), and a non-data command with DMA set.
            r.outb(BM2, 0);
            r.outb(BM2 + 2, BM_ST_INTERRUPT);
            r.outb(BM2, BM_CMD_START | BM_CMD_TO_MEMORY);
            r.packet(&[op::READ_CAPACITY], 0, true);
            r.expect_good();
            let mut cap = [0u8; 8];
            r.mem.read(0x10000, &mut cap).unwrap();
            assert_eq!(cap, [0, 0, 0, 15, 0, 0, 8, 0]);
            r.packet(&[op::TEST_UNIT_READY], 0, true);
            r.expect_good();
            // PRD table outside RAM: bus-master error, ABRT.
            r.outb(BM2, 0);
            r.outb(BM2 + 2, BM_ST_INTERRUPT | BM_ST_ERROR);
            r.bus.write_sync(BM2 + 4, &0xfff0_0000u32.to_le_bytes());
            r.packet(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1], 0, true);
            r.outb(BM2, BM_CMD_START | BM_CMD_TO_MEMORY);
            assert_eq!(r.inb(BM2 + 2) & BM_ST_ERROR, BM_ST_ERROR);
            r.expect_check(0);
        }

        #[test]
        fn media_change_lock_and_empty_drive() {
            let r = Cd::new(None);
            r.packet(&[op::TEST_UNIT_READY], 0, false);
            r.expect_check(2);
            assert_eq!(r.sense(), (2, 0x3a, 0));
            let disc: Arc<dyn BlockBackend> = Arc::new(MemImage::new(iso(8), true));
            r.ctrl.lock().unwrap().insert_media(1, 0, disc).unwrap();
            r.packet(&[op::TEST_UNIT_READY], 0, false);
            r.expect_check(6);
            assert_eq!(r.sense(), (6, 0x28, 0));
            r.packet(&[op::TEST_UNIT_READY], 0, false);
            r.expect_good();
            // Guest locks the tray: the host eject is refused, then forced.
            r.packet(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1], 0, false);
            r.expect_good();
            let mut c = r.ctrl.lock().unwrap();
            assert!(matches!(c.eject_media(1, 0, false), Err(IdeError::Locked { channel: 1, drive: 0 })));
            assert!(c.cdrom(1, 0).unwrap().has_media());
            assert!(c.eject_media(1, 0, true).unwrap().is_some());
            assert!(!c.cdrom(1, 0).unwrap().has_media());
            assert!(matches!(c.eject_media(0, 0, false), Err(IdeError::NotCdrom { .. })));
            assert!(matches!(
                c.insert_media(0, 1, Arc::new(MemImage::new(vec![], true))),
                Err(IdeError::NotCdrom { .. })
            ));
            drop(c);
            r.packet(&[op::READ_CAPACITY], 8, false);
            r.expect_check(2);
        }

        #[test]
        fn device_reset_aborts_a_data_phase() {
            let r = Cd::new(Some(4));
            r.packet(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 2], 2048, false);
            assert_eq!(r.inb(CMD + 7), 0x58);
            r.outb(CMD + 7, cmd::DEVICE_RESET);
            assert_eq!(r.inb(CMD + 7), 0);
            assert_eq!((r.inb(CMD + 4), r.inb(CMD + 5), r.inb(CMD + 1)), (0x14, 0xeb, 1));
            assert_eq!(r.inw(), 0);
            // Half a packet, then SRST: the drive is usable afterwards.
            r.outb(CMD + 7, cmd::PACKET);
            r.bus.write_sync(CMD, &[0, 0]);
            r.outb(CMD + 0x206, CTL_SRST);
            r.outb(CMD + 0x206, 0);
            assert_eq!(r.inb(CMD + 7), 0);
            r.packet(&[op::TEST_UNIT_READY], 0, false);
            r.expect_good();
            // Overlapped PACKET is refused; a disk-only command aborts.
            r.outb(CMD + 1, 2);
            r.outb(CMD + 7, cmd::PACKET);
            assert_eq!(r.inb(CMD + 7), 0x41);
            r.outb(CMD + 7, cmd::WRITE_DMA);
            assert_eq!(r.inb(CMD + 7), 0x41);
            assert_eq!(r.inb(CMD + 1), error::ABRT);
        }

        #[test]
        fn snapshot_mid_read_with_lock_and_unit_attention() {
            let a = Cd::new(Some(8));
            a.packet(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1], 0, false);
            a.expect_good();
            a.packet(&[op::READ_10, 0, 0, 0, 0, 3, 0, 0, 2], 3000, false);
            let (_, first) = a.drq_block();
            let mut got = first;
            // Half of the second DRQ block is read before the save.
            assert!(a.irq());
            let n = usize::from(a.inb(CMD + 4)) | usize::from(a.inb(CMD + 5)) << 8;
            for _ in 0..100 {
                got.extend_from_slice(&a.inw().to_le_bytes());
            }
            let blob = payload(&*a.ctrl.lock().unwrap());
            let b = Cd::new(Some(8));
            assert_prefixes_fail(&*b.ctrl.lock().unwrap(), &blob);
            load(&mut *b.ctrl.lock().unwrap(), &blob).unwrap();
            for _ in 100..n / 2 {
                got.extend_from_slice(&b.inw().to_le_bytes());
            }
            b.expect_good();
            assert_eq!(got, iso(8)[3 * 2048..5 * 2048]);
            assert!(b.ctrl.lock().unwrap().cdrom(1, 0).unwrap().is_locked());
            // Restored without a medium: the drive is there, the guest sees the disc gone.
            let c = Cd::new(None);
            load(&mut *c.ctrl.lock().unwrap(), &blob).unwrap();
            assert!(!c.ctrl.lock().unwrap().cdrom(1, 0).unwrap().has_media());
            // A disk where the CD was: refused.
            let irqs = Arc::new(RecordingIrqSink::default());
            let mut d = IdeController::new(
                Arc::new(TestRam::new(0x1000)),
                IsaIrq::new(irqs.clone(), 14),
                IsaIrq::new(irqs, 15),
            );
            d.attach(1, 0, Box::new(MemImage::new(iso(8), false)), DriveKind::Disk).unwrap();
            assert!(load(&mut d, &blob).is_err());
        }

        #[test]
        fn queued_atapi_dma_survives_snapshot() {
            let a = Cd::new(Some(8));
            let e0 = 0x30000u64 | (2048u64 << 32) | (1 << 63);
            a.mem.write(0x2000, &e0.to_le_bytes()).unwrap();
            a.bus.write_sync(BM2 + 4, &0x2000u32.to_le_bytes());
            a.packet(&[op::READ_10, 0, 0, 0, 0, 6, 0, 0, 1], 0, true);
            let blob = payload(&*a.ctrl.lock().unwrap());
            let b = Cd::new(Some(8));
            load(&mut *b.ctrl.lock().unwrap(), &blob).unwrap();
            b.mem.write(0x2000, &e0.to_le_bytes()).unwrap();
            b.outb(BM2, BM_CMD_START | BM_CMD_TO_MEMORY);
            b.expect_good();
            let mut m = vec![0u8; 2048];
            b.mem.read(0x30000, &mut m).unwrap();
            assert_eq!(m, iso(8)[6 * 2048..7 * 2048]);
        }
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::super::ata::cmd;
    use super::super::image::MemImage;
    use super::*;
    use crate::irq::RecordingIrqSink;
    use crate::mem::TestRam;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    struct Rig {
        ctrl: IdeController,
        irqs: Arc<RecordingIrqSink>,
        mem: Arc<TestRam>,
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    impl Rig {
        /// A controller with the same 64-sector disk contents at 0:0 (and optionally 1:1).
        fn new(second: bool) -> Rig {
            let irqs = Arc::new(RecordingIrqSink::default());
            let mem = Arc::new(TestRam::new(0x10_0000));
            let mut ctrl =
                IdeController::new(mem.clone(), IsaIrq::new(irqs.clone(), 14), IsaIrq::new(irqs.clone(), 15));
            let img = MemImage::new(pattern(64 * SECTOR_SIZE), false);
            ctrl.attach(0, 0, Box::new(img), DriveKind::Disk).unwrap();
            if second {
                let img = MemImage::new(vec![0; 64 * SECTOR_SIZE], false);
                ctrl.attach(1, 1, Box::new(img), DriveKind::Disk).unwrap();
            }
            irqs.take();
            Rig { ctrl, irqs, mem }
        }
        fn outb(&mut self, region: RegionId, off: u64, v: u8) {
            self.ctrl.write(region, off, &[v]);
        }
        fn inb(&mut self, region: RegionId, off: u64) -> u8 {
            let mut d = [0u8];
            self.ctrl.read(region, off, &mut d);
            d[0]
        }
        fn inw(&mut self) -> u16 {
            let mut d = [0u8; 2];
            self.ctrl.read(REGION_PRIMARY_CMD, 0, &mut d);
            u16::from_le_bytes(d)
        }
        fn lba28(&mut self, command: u8, lba: u8, count: u8) {
            self.outb(REGION_PRIMARY_CMD, 6, 0xe0);
            self.outb(REGION_PRIMARY_CMD, 2, count);
            self.outb(REGION_PRIMARY_CMD, 3, lba);
            self.outb(REGION_PRIMARY_CMD, 4, 0);
            self.outb(REGION_PRIMARY_CMD, 5, 0);
            self.outb(REGION_PRIMARY_CMD, 7, command);
        }
    }

    #[test]
    fn pio_read_resumes_mid_block_after_restore() {
        let mut a = Rig::new(false);
        a.outb(REGION_PRIMARY_CMD, 2, 4);
        a.outb(REGION_PRIMARY_CMD, 7, cmd::SET_MULTIPLE_MODE);
        let _ = a.inb(REGION_PRIMARY_CMD, 7);
        a.lba28(cmd::READ_SECTORS, 3, 3);
        let mut got = Vec::new();
        for _ in 0..300 {
            got.extend_from_slice(&a.inw().to_le_bytes());
        }
        // Also queue a bus-master setting that must survive.
        a.outb(REGION_BUS_MASTER, 4, 0x00);
        a.outb(REGION_BUS_MASTER, 5, 0x20);
        let blob = payload(&a.ctrl);

        let mut b = Rig::new(false);
        assert_prefixes_fail(&b.ctrl, &blob);
        load(&mut b.ctrl, &blob).unwrap();
        assert!(b.irqs.isa_level(14), "the block's interrupt is still pending");
        assert_eq!(b.inb(REGION_BUS_MASTER, 5), 0x20);
        assert_eq!(b.inb(REGION_PRIMARY_CMD, 7), 0x58);
        assert!(!b.irqs.isa_level(14));
        while got.len() < 3 * SECTOR_SIZE {
            assert_eq!(b.inb(REGION_PRIMARY_CTL, 0) & status::DRQ, status::DRQ);
            got.extend_from_slice(&b.inw().to_le_bytes());
        }
        assert_eq!(got, pattern(64 * SECTOR_SIZE)[3 * SECTOR_SIZE..6 * SECTOR_SIZE]);
        assert_eq!(b.inb(REGION_PRIMARY_CMD, 7), 0x50);
        // The multiple count survived: IDENTIFY word 59.
        b.outb(REGION_PRIMARY_CMD, 7, cmd::IDENTIFY_DEVICE);
        let id: Vec<u16> = (0..256).map(|_| b.inw()).collect();
        assert_eq!(id[59], 0x104);
    }

    #[test]
    fn queued_dma_runs_after_restore() {
        let mut a = Rig::new(true);
        a.mem.write(0x1000, &(0x2000u64 | (512u64 << 32) | (1u64 << 63)).to_le_bytes()).unwrap();
        a.lba28(cmd::READ_DMA, 9, 1);
        for (i, v) in [0x00u8, 0x10, 0, 0].into_iter().enumerate() {
            a.outb(REGION_BUS_MASTER, 4 + i as u64, v);
        }
        let blob = payload(&a.ctrl);
        let mut b = Rig::new(true);
        load(&mut b.ctrl, &blob).unwrap();
        b.mem.write(0x1000, &(0x2000u64 | (512u64 << 32) | (1u64 << 63)).to_le_bytes()).unwrap();
        b.outb(REGION_BUS_MASTER, 0, BM_CMD_START | BM_CMD_TO_MEMORY);
        assert!(b.irqs.isa_level(14));
        let mut buf = vec![0u8; SECTOR_SIZE];
        b.mem.read(0x2000, &mut buf).unwrap();
        assert_eq!(buf, pattern(64 * SECTOR_SIZE)[9 * SECTOR_SIZE..10 * SECTOR_SIZE]);
    }

    #[test]
    fn configuration_mismatch_and_bad_state_rejected() {
        let a = Rig::new(true);
        let blob = payload(&a.ctrl);
        // Saved with a disk at 1:1, restored without.
        let mut b = Rig::new(false);
        assert!(load(&mut b.ctrl, &blob).is_err());
        // A differently sized disk.
        let mut c = Rig::new(false);
        c.ctrl
            .attach(1, 1, Box::new(MemImage::new(vec![0; 65 * SECTOR_SIZE], false)), DriveKind::Disk)
            .unwrap();
        assert!(load(&mut c.ctrl, &blob).is_err());
        // unit 2.
        let mut bad = blob.clone();
        bad[0] = 2;
        let mut d = Rig::new(true);
        assert!(load(&mut d.ctrl, &bad).is_err());
        load(&mut d.ctrl, &blob).unwrap();
    }
}
