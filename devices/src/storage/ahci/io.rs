//! Deferred command execution: commands that touch an image run as jobs on the port's
//! [`IoEngine`] (`hvmdm-io-ahci<port>`), off the vCPU thread and without the controller lock.
//!
//! The register write that makes a command runnable fetches and validates it under the lock
//! (header, command FIS, ATAPI packet, the ATA/ATAPI layer's decision) and, if it needs the image,
//! records it as an [`IoCmd`] in the slot and submits a job holding everything the job needs (the
//! command, a `SectorIo`/`CdReader`, guest memory). The job walks the PRDT and moves data between
//! guest memory and the image, then locks the controller through a `Weak` handle and completes
//! the slot (PRDBC, FIS, PxTFD, PxCI/PxSACT, PxIS, interrupt) if the port's generation is still
//! the one it started under. COMRESET, clearing PxCMD.ST, HBA and controller reset, detach, a
//! task-file error (the device aborts what else it had queued) and a restore bump the
//! generation: a stale completion changes nothing (its host I/O still finishes).
//!
//! Locking: a completion takes the controller lock, so nobody waits for an engine while holding
//! it ([`AhciController::drain`] clones the engines under the lock and waits after releasing it).

use std::sync::{Arc, Mutex, Weak};

use super::super::aio::IoEngine;
use super::super::ata::{SectorIo, SectorXfer, Taskfile};
use super::super::atapi::{CdReader, Sense};
use super::cmd::{self, Completion, Failure, Prdt};
use super::{AhciController, AhciError, PortDevice, NUM_PORTS, NUM_SLOTS};
use crate::mem::GuestRam;
use crate::snapshot::{SectionReader, SectionWriter, SnapshotError};
use crate::warn_limited;

/// Jobs a port's engine may hold (32 live NCQ tags plus ones orphaned by resets) before new
/// commands fail instead of growing the queue behind a stuck image.
pub(super) const MAX_QUEUED_JOBS: usize = 2 * NUM_SLOTS;

/// What a command in flight does with the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoKind {
    /// Non-queued DMA or PIO sector transfer.
    Disk(SectorXfer),
    /// READ/WRITE FPDMA QUEUED.
    Ncq { xfer: SectorXfer, fua: bool },
    /// FLUSH CACHE (EXT).
    Flush,
    /// ATAPI READ: `blocks` from `lba` into the PRDT (what fits); `dma` as the guest asked.
    CdRead { lba: u32, blocks: u32, dma: bool },
}

/// A command whose job is in flight, as it was fetched: enough to complete it, or to re-issue it
/// after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IoCmd {
    pub kind: IoKind,
    pub tf: Taskfile,
    /// Command header (PRDBC is written back there).
    pub hdr: u64,
    /// Command table (PRDT at +0x80) and its entry count.
    pub ctba: u64,
    pub prdtl: u16,
}

impl IoCmd {
    pub fn queued(&self) -> bool {
        matches!(self.kind, IoKind::Ncq { .. })
    }
}

/// The device handle a job uses.
enum Handle {
    Disk(SectorIo),
    Cd(CdReader),
}

/// A finished job: bytes moved through the PRDT, whether an entry with the I bit completed, and
/// how it ended.
pub(super) struct Done {
    moved: u32,
    dps: bool,
    result: Result<(), JobFailure>,
}

enum JobFailure {
    Cmd(Failure),
    /// A medium read failed: the drive's sense, then CHECK CONDITION.
    Medium(Sense),
}

impl Done {
    fn refused() -> Self {
        Done { moved: 0, dps: false, result: Err(JobFailure::Cmd(Failure::Hba)) }
    }
}

/// Runs on the I/O worker (or inline for a bare controller), with no lock held.
fn perform(c: &IoCmd, h: &Handle, mem: &dyn GuestRam, port: usize) -> Done {
    let mut prdt = Prdt::new(mem, c.ctba, c.prdtl);
    let result = match (c.kind, h) {
        (IoKind::Disk(x), Handle::Disk(io)) => {
            cmd::transfer(io, &mut prdt, &x, None, port).map_err(JobFailure::Cmd)
        }
        (IoKind::Ncq { xfer, fua }, Handle::Disk(io)) => {
            let mut r = cmd::transfer(io, &mut prdt, &xfer, Some(false), port);
            if r.is_ok() && fua && xfer.write {
                r = io.flush().map_err(Failure::from);
            }
            r.map_err(JobFailure::Cmd)
        }
        (IoKind::Flush, Handle::Disk(io)) => io.flush().map_err(|e| JobFailure::Cmd(e.into())),
        (IoKind::CdRead { lba, blocks, .. }, Handle::Cd(rd)) => {
            cmd::packet_read(rd, &mut prdt, lba, blocks, port).map_err(|e| match e {
                Ok(s) => JobFailure::Medium(s),
                Err(f) => JobFailure::Cmd(f),
            })
        }
        // start_io pairs kinds and handles.
        _ => Err(JobFailure::Cmd(Failure::Hba)),
    };
    Done { moved: prdt.done, dps: prdt.dps, result }
}

impl AhciController {
    /// Lets jobs complete through `this`: from now on commands that touch an image run on the
    /// ports' I/O engines. Without it (a bare controller, unit tests) they run inside the access.
    /// [`super::build`] calls it.
    pub fn enable_async(this: &Arc<Mutex<AhciController>>) {
        this.lock().unwrap_or_else(|p| p.into_inner()).this = Arc::downgrade(this);
    }

    /// Replaces the ports' I/O engines (e.g. with [`IoEngine::manual`] ones for deterministic
    /// fuzzing). Refused with [`AhciError::Busy`] while jobs are queued: dropping an engine runs
    /// its jobs, whose completions need the lock the caller holds.
    pub fn set_io_engines(&mut self, engines: [Arc<IoEngine>; NUM_PORTS]) -> Result<(), AhciError> {
        if self.engines.iter().any(|e| e.in_flight() > 0) {
            return Err(AhciError::Busy);
        }
        self.engines = engines;
        Ok(())
    }

    /// Waits until every job submitted so far has finished (and completed its command, if
    /// still current). Takes the lock only to find the engines: call it WITHOUT holding the
    /// controller lock, before saving state, final flushes and shutdown.
    pub fn drain(this: &Arc<Mutex<AhciController>>) {
        let engines: Vec<Arc<IoEngine>> = this.lock().unwrap_or_else(|p| p.into_inner()).engines.to_vec();
        for e in engines {
            e.drain();
        }
    }

    /// Whether some port has a command in flight on an I/O engine.
    pub fn io_busy(&self) -> bool {
        self.ports.iter().any(|p| p.running() != 0)
    }

    /// Abandons the port's commands in flight: their completions become stale.
    pub(super) fn abandon(&mut self, port: usize) {
        let p = &mut self.ports[port];
        p.gen = p.gen.wrapping_add(1);
        p.inflight = [None; NUM_SLOTS];
    }

    /// Records `c` as slot `slot`'s command in flight and hands its I/O to the port's engine.
    pub(super) fn start_io(&mut self, port: usize, slot: usize, c: IoCmd) {
        let p = &mut self.ports[port];
        let handle = match (&p.dev, c.kind) {
            (Some(PortDevice::Disk(d)), IoKind::Disk(_) | IoKind::Ncq { .. } | IoKind::Flush) => {
                Handle::Disk(d.sector_io())
            }
            (Some(PortDevice::Cdrom(cd)), IoKind::CdRead { .. }) => Handle::Cd(cd.reader()),
            _ => return,
        };
        p.inflight[slot] = Some(c);
        let gen = p.gen;
        if self.this.strong_count() == 0 {
            let done = perform(&c, &handle, &*self.mem, port);
            self.complete_io(port, slot, gen, done);
            return;
        }
        let engine = &self.engines[port];
        if engine.in_flight() >= MAX_QUEUED_JOBS {
            warn_limited!(format!("ahci-queue-{port}"), "ahci port {port}: I/O queue full, command aborted");
            self.complete_io(port, slot, gen, Done::refused());
            return;
        }
        let (ctrl, mem): (Weak<Mutex<AhciController>>, _) = (self.this.clone(), self.mem.clone());
        let job = Box::new(move || {
            let done = perform(&c, &handle, &*mem, port);
            if let Some(ctrl) = ctrl.upgrade() {
                let mut ctrl = ctrl.lock().unwrap_or_else(|p| p.into_inner());
                if ctrl.complete_io(port, slot, gen, done) {
                    // Slots that waited for this one (or for the port to go idle) run now.
                    ctrl.process(port);
                }
            }
        });
        if let Err(e) = engine.submit(job) {
            log::error!("ahci port {port}: {e}");
            self.complete_io(port, slot, gen, Done::refused());
        }
    }

    /// Applies a job's result under the lock; false (nothing changes) if the command was
    /// abandoned since.
    fn complete_io(&mut self, port: usize, slot: usize, gen: u64, done: Done) -> bool {
        let p = &mut self.ports[port];
        if p.gen != gen {
            log::debug!("ahci port {port} slot {slot}: dropping the completion of an abandoned command");
            return false;
        }
        let Some(c) = p.inflight[slot].take() else { return false };
        let packet_tf = Taskfile { count: cmd::IREASON_COD | cmd::IREASON_IO, ..c.tf };
        let completion = match (c.kind, done.result) {
            (IoKind::Disk(x), Ok(())) if !x.dma && !x.write => {
                Completion::PioIn(c.tf, x.count.saturating_mul(super::SECTOR as u32))
            }
            (IoKind::Disk(_) | IoKind::Flush, Ok(())) => Completion::D2h(c.tf),
            (IoKind::Ncq { .. }, Ok(())) => Completion::Sdb,
            (IoKind::CdRead { dma, .. }, Ok(())) => Completion::Packet {
                tf: Taskfile { lba_mid: 0, lba_high: 0, ..packet_tf },
                pio: (!dma).then_some(done.moved),
            },
            (IoKind::CdRead { .. }, Err(f)) => {
                let fail = match (f, &mut p.dev) {
                    (JobFailure::Medium(s), Some(PortDevice::Cdrom(cd))) => {
                        cd.set_sense(s);
                        Failure::Sense(cd.error_register())
                    }
                    (JobFailure::Cmd(f), _) => f,
                    (JobFailure::Medium(_), _) => Failure::Hba,
                };
                Completion::Error { tf: packet_tf, fail, ncq: false }
            }
            (kind, Err(f)) => {
                let fail = match f {
                    JobFailure::Cmd(f) => f,
                    JobFailure::Medium(_) => Failure::Hba,
                };
                Completion::Error { tf: c.tf, fail, ncq: matches!(kind, IoKind::Ncq { .. }) }
            }
        };
        self.finish(port, slot, c.hdr, completion, Some((done.moved, done.dps)));
        true
    }
}

// ---- save/restore of commands in flight ----

const KIND_DISK: u8 = 0;
const KIND_NCQ: u8 = 1;
const KIND_FLUSH: u8 = 2;
const KIND_CD: u8 = 3;

fn put_sectors(w: &mut SectionWriter, x: &SectorXfer) {
    w.put_u64(x.lba);
    w.put_u32(x.count);
    w.put_u32(x.block);
    w.put_u8(u8::from(x.write) | u8::from(x.dma) << 1 | u8::from(x.ext) << 2);
}

fn get_sectors(r: &mut SectionReader<'_>) -> Result<SectorXfer, SnapshotError> {
    let lba = r.get_u64()?;
    let count = r.get_u32()?;
    let block = r.get_u32()?;
    let f = r.get_u8()?;
    if f & !7 != 0 || count == 0 {
        return Err(r.bad(format!("sector transfer flags {f:#x}, count {count}")));
    }
    Ok(SectorXfer { lba, count, block, write: f & 1 != 0, dma: f & 2 != 0, ext: f & 4 != 0 })
}

pub(super) fn put_cmd(w: &mut SectionWriter, c: &IoCmd) {
    w.put_raw(&cmd::h2d_fis(&c.tf));
    w.put_u64(c.hdr);
    w.put_u64(c.ctba);
    w.put_u16(c.prdtl);
    match c.kind {
        IoKind::Disk(x) => {
            w.put_u8(KIND_DISK);
            put_sectors(w, &x);
        }
        IoKind::Ncq { xfer, fua } => {
            w.put_u8(KIND_NCQ);
            put_sectors(w, &xfer);
            w.put_bool(fua);
        }
        IoKind::Flush => w.put_u8(KIND_FLUSH),
        IoKind::CdRead { lba, blocks, dma } => {
            w.put_u8(KIND_CD);
            w.put_u32(lba);
            w.put_u32(blocks);
            w.put_bool(dma);
        }
    }
}

/// Reads one command in flight and checks it fits the port's device.
pub(super) fn get_cmd(r: &mut SectionReader<'_>, dev: Option<&PortDevice>) -> Result<IoCmd, SnapshotError> {
    let tf = cmd::taskfile(&r.get_array::<20>()?);
    let hdr = r.get_u64()?;
    let ctba = r.get_u64()?;
    let prdtl = r.get_u16()?;
    let kind = match r.get_u8()? {
        KIND_DISK => IoKind::Disk(get_sectors(r)?),
        KIND_NCQ => IoKind::Ncq { xfer: get_sectors(r)?, fua: r.get_bool()? },
        KIND_FLUSH => IoKind::Flush,
        KIND_CD => IoKind::CdRead { lba: r.get_u32()?, blocks: r.get_u32()?, dma: r.get_bool()? },
        k => return Err(r.bad(format!("command kind {k}"))),
    };
    let fits = match (dev, kind) {
        (Some(PortDevice::Disk(d)), IoKind::Disk(x) | IoKind::Ncq { xfer: x, .. }) => {
            d.range_ok(x.lba, x.count)
        }
        (Some(PortDevice::Disk(_)), IoKind::Flush) => true,
        (Some(PortDevice::Cdrom(_)), IoKind::CdRead { blocks, .. }) => blocks > 0,
        _ => false,
    };
    if !fits || ctba & 0x7f != 0 || hdr & 0x1f != 0 {
        return Err(r.bad(format!("command in flight {kind:?} does not fit the device")));
    }
    Ok(IoCmd { kind, tf, hdr, ctba, prdtl })
}
