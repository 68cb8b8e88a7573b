//! Command processing: command header → command FIS → ATA layer, data through the PRDT, and
//! the FISes a device sends back (AHCI 1.3 §4.2, SATA 2.6 §10.3).

use thiserror::Error;

use super::super::ata::{
    cmd as ata_cmd, AtaAction, AtaDisk, AtaError, DirectXfer, DriveKind, PieceError, SectorIo, SectorXfer,
    Taskfile,
};
use super::super::atapi::{AtapiAction, AtapiDrive, CdReader, Sense, CDB_LEN, CD_BLOCK_SIZE};
use super::io::{IoCmd, IoKind};
use super::{pxis, AhciController, PortDevice, PortRegs, SECTOR, TFD_IO_BUSY};
use crate::mem::{GuestMemError, GuestRam};
use crate::warn_limited;

// FIS types.
const FIS_H2D: u8 = 0x27;
const FIS_D2H: u8 = 0x34;
const FIS_DMA_SETUP: u8 = 0x41;
const FIS_PIO_SETUP: u8 = 0x5f;
const FIS_SDB: u8 = 0xa1;
/// Byte 1 of device-to-host FISes: interrupt on arrival.
const FIS_I: u8 = 0x40;
/// Byte 1 of PIO/DMA Setup FISes: data moves device to host.
const FIS_D: u8 = 0x20;
/// Byte 1 of a DMA Setup FIS: auto-activate (write: the device starts taking data at once).
const FIS_A: u8 = 0x80;

// Offsets in the FIS receive area.
pub(super) const RX_DSFIS: u64 = 0x00;
pub(super) const RX_PSFIS: u64 = 0x20;
pub(super) const RX_RFIS: u64 = 0x40;
pub(super) const RX_SDBFIS: u64 = 0x58;

// Command header DW0 bits.
const HDR_CFL: u32 = 0x1f;
/// Command table: command FIS at 0, ATAPI command (ACMD, 16 bytes) at 0x40, PRDT at 0x80.
const CT_ACMD: u64 = 0x40;
const CT_PRDT: u64 = 0x80;
const PRD_SIZE: u64 = 16;
/// Device control: software reset.
const CTL_SRST: u8 = 0x04;

/// Status values in completion FISes.
const ST_OK: u8 = 0x50;
const ST_ERR: u8 = 0x51;
const ERR_ABRT: u8 = 0x04;

/// Sectors moved per step between image and guest memory (bounds the bounce buffer).
const CHUNK_SECTORS: u32 = 128;
/// The same for CD blocks (64 KiB).
const CHUNK_CD_BLOCKS: u32 = 32;
/// ATAPI interrupt reason (sector count register): command/data, direction.
pub(super) const IREASON_COD: u8 = 0x01;
pub(super) const IREASON_IO: u8 = 0x02;

/// Why data could not move between guest memory and the device.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub(super) enum DmaFault {
    #[error("PRDT has fewer bytes than the command transfers")]
    Short,
    #[error(transparent)]
    Mem(#[from] GuestMemError),
}

/// How a direct (raw image) transfer stopped.
enum DirectFault {
    Dma(DmaFault),
    Ata(AtaError),
}

impl From<DmaFault> for DirectFault {
    fn from(e: DmaFault) -> Self {
        DirectFault::Dma(e)
    }
}

/// How a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// The drive aborted it (error register bits).
    Ata(AtaError),
    /// The HBA could not fetch the command or move its data; the drive sees an aborted command.
    Hba,
    /// ATAPI CHECK CONDITION: the error register (sense key << 4 | ABRT).
    Sense(u8),
}

impl Failure {
    fn error_bits(self) -> u8 {
        match self {
            Failure::Ata(e) => e.error_bits(),
            Failure::Hba => ERR_ABRT,
            Failure::Sense(bits) => bits,
        }
    }
}

impl From<AtaError> for Failure {
    fn from(e: AtaError) -> Self {
        Failure::Ata(e)
    }
}

/// What ends a command.
#[derive(Debug)]
pub(super) enum Completion {
    /// D2H Register FIS with I bit (PxIS.DHRS).
    D2h(Taskfile),
    /// PIO data-in: PIO Setup FIS with I bit and E_Status (PxIS.PSS), `bytes` moved.
    PioIn(Taskfile, u32),
    /// ATAPI packet command: after a PIO data-in phase of `Some(bytes)` a PIO Setup FIS
    /// (PxIS.PSS), then always a D2H Register FIS with I bit (PxIS.DHRS).
    Packet { tf: Taskfile, pio: Option<u32> },
    /// NCQ: Set Device Bits FIS clearing the slot's PxSACT bit (PxIS.SDBS).
    Sdb,
    /// Control FIS: nothing is sent back.
    Silent,
    /// Error: D2H FIS (or SDB FIS for NCQ) with ERR, PxIS.TFES.
    Error { tf: Taskfile, fail: Failure, ncq: bool },
}

/// Scatter/gather through a command table's PRDT, reading entries on demand. The table is never
/// walked beyond PRDTL entries, so a long or endless table costs at most what the data needs.
pub(super) struct Prdt<'a> {
    mem: &'a dyn GuestRam,
    table: u64,
    entries: u16,
    next: u16,
    addr: u64,
    left: u32,
    ibit: bool,
    /// Bytes moved so far (PRDBC).
    pub done: u32,
    /// An entry with the I bit was completed (PxIS.DPS).
    pub dps: bool,
}

impl<'a> Prdt<'a> {
    pub(super) fn new(mem: &'a dyn GuestRam, ctba: u64, entries: u16) -> Self {
        Prdt {
            mem,
            table: ctba.wrapping_add(CT_PRDT),
            entries,
            next: 0,
            addr: 0,
            left: 0,
            ibit: false,
            done: 0,
            dps: false,
        }
    }

    fn load(&mut self) -> Result<(), DmaFault> {
        if self.next >= self.entries {
            return Err(DmaFault::Short);
        }
        let mut e = [0u8; PRD_SIZE as usize];
        self.mem.read(self.table.wrapping_add(u64::from(self.next) * PRD_SIZE), &mut e)?;
        self.next += 1;
        let dw = |i: usize| u32::from_le_bytes([e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3]]);
        // DBA bit 0 is reserved (word alignment); DBC is bits 21:0, the byte count minus one.
        self.addr = (u64::from(dw(1)) << 32 | u64::from(dw(0))) & !1;
        self.left = (dw(3) & 0x3f_ffff) + 1;
        self.ibit = dw(3) & (1 << 31) != 0;
        Ok(())
    }

    /// Moves `len` bytes, calling `f(guest address, range in the caller's buffer)` per piece.
    fn walk<E: From<DmaFault>>(
        &mut self,
        len: usize,
        mut f: impl FnMut(&dyn GuestRam, u64, std::ops::Range<usize>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pos = 0;
        while pos < len {
            if self.left == 0 {
                self.load()?;
            }
            let n = (self.left as usize).min(len - pos);
            f(self.mem, self.addr, pos..pos + n)?;
            self.addr = self.addr.wrapping_add(n as u64);
            self.left -= n as u32;
            self.done = self.done.saturating_add(n as u32);
            pos += n;
            if self.left == 0 && self.ibit {
                self.dps = true;
            }
        }
        Ok(())
    }

    /// Device to guest memory.
    pub(super) fn write_guest(&mut self, data: &[u8]) -> Result<(), DmaFault> {
        self.walk(data.len(), |m, a, r| Ok::<_, DmaFault>(m.write(a, &data[r])?))
    }

    /// Guest memory to device.
    pub(super) fn read_guest(&mut self, data: &mut [u8]) -> Result<(), DmaFault> {
        self.walk(data.len(), |m, a, r| Ok::<_, DmaFault>(m.read(a, &mut data[r])?))
    }

    /// A whole raw-image transfer of `len` bytes, piece by piece straight between the image
    /// and guest memory.
    fn direct(&mut self, d: &DirectXfer<'_>, len: usize) -> Result<(), DirectFault> {
        self.walk(len, |m, a, r| {
            d.piece(m, r.start, a, r.len()).map_err(|e| match e {
                PieceError::Mem(m) => DirectFault::Dma(DmaFault::Mem(m)),
                PieceError::Device(a) => DirectFault::Ata(a),
            })
        })
    }
}

/// Writes `fis` at `offset` of the port's FIS receive area if FIS receive is on. A receive area
/// outside RAM loses the FIS (logged); the registers still change.
pub(super) fn post_fis(mem: &dyn GuestRam, port: usize, regs: &PortRegs, offset: u64, fis: &[u8]) {
    if regs.cmd & super::pxcmd::FRE == 0 {
        return;
    }
    if let Err(e) = mem.write(regs.fb.wrapping_add(offset), fis) {
        warn_limited!(format!("ahci-fis-{port}"), "ahci port {port}: FIS receive area not in RAM: {e}");
    }
}

fn tf_fis(kind: u8, flags: u8, tf: &Taskfile, status: u8, error: u8) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = kind;
    f[1] = flags;
    f[2] = status;
    f[3] = error;
    f[4] = tf.lba_low;
    f[5] = tf.lba_mid;
    f[6] = tf.lba_high;
    f[7] = tf.device;
    f[8] = tf.hob_lba_low;
    f[9] = tf.hob_lba_mid;
    f[10] = tf.hob_lba_high;
    f[12] = tf.count;
    f[13] = tf.hob_count;
    f
}

/// The D2H Register FIS a device sends after reset: its signature, status DRDY|DSC, error 01h,
/// no interrupt.
pub(super) fn signature_fis(sig: u32) -> [u8; 20] {
    let [count, lba_low, lba_mid, lba_high] = sig.to_le_bytes();
    let tf = Taskfile { count, lba_low, lba_mid, lba_high, ..Default::default() };
    tf_fis(FIS_D2H, 0, &tf, ST_OK, 0x01)
}

fn pio_setup_fis(tf: &Taskfile, bytes: u32) -> [u8; 20] {
    // Status on entering the data phase is DRDY|DRQ; E_Status is what the command ends with.
    let mut f = tf_fis(FIS_PIO_SETUP, FIS_I | FIS_D, tf, 0x58, 0);
    f[15] = ST_OK;
    f[16..18].copy_from_slice(&(bytes.min(0xffff) as u16).to_le_bytes());
    f
}

fn sdb_fis(status: u8, error: u8, done: u32) -> [u8; 8] {
    let mut f = [0u8; 8];
    f[0] = FIS_SDB;
    f[1] = FIS_I;
    // Status-Hi (6:4) and Status-Lo (2:0).
    f[2] = status & 0x77;
    f[3] = error;
    f[4..8].copy_from_slice(&done.to_le_bytes());
    f
}

fn dma_setup_fis(slot: usize, write: bool, bytes: u32) -> [u8; 28] {
    let mut f = [0u8; 28];
    f[0] = FIS_DMA_SETUP;
    f[1] = if write { FIS_A } else { FIS_D };
    // DMA buffer identifier: the tag; offset 0; the whole transfer.
    f[4] = slot as u8;
    f[20..24].copy_from_slice(&bytes.to_le_bytes());
    f
}

/// The register H2D FIS that carries `tf` (the inverse of [`taskfile`]).
pub(super) fn h2d_fis(tf: &Taskfile) -> [u8; 20] {
    let mut f = tf_fis(FIS_H2D, 0x80, tf, tf.command, tf.feature);
    f[11] = tf.hob_feature;
    f
}

pub(super) fn taskfile(c: &[u8; 20]) -> Taskfile {
    Taskfile {
        command: c[2],
        feature: c[3],
        lba_low: c[4],
        lba_mid: c[5],
        lba_high: c[6],
        device: c[7],
        hob_lba_low: c[8],
        hob_lba_mid: c[9],
        hob_lba_high: c[10],
        hob_feature: c[11],
        count: c[12],
        hob_count: c[13],
    }
}

/// Moves the sectors of `x` between the image and the PRDT (on an I/O worker). `fua`, if given,
/// overrides the command's Force Unit Access setting for the writes.
pub(super) fn transfer(
    io: &SectorIo,
    prdt: &mut Prdt<'_>,
    x: &SectorXfer,
    fua: Option<bool>,
    port: usize,
) -> Result<(), Failure> {
    // A raw image: one copy, image <-> guest memory, and no bounce buffer.
    if let Some(d) = io.direct(x.lba, x.count, x.write)? {
        return match prdt.direct(&d, x.count as usize * SECTOR) {
            Ok(()) => Ok(d.finish(fua)?),
            Err(DirectFault::Ata(e)) => Err(e.into()),
            Err(DirectFault::Dma(e)) => {
                warn_limited!(format!("ahci-dma-{port}"), "ahci port {port}: DMA failed: {e}");
                Err(Failure::Hba)
            }
        };
    }
    let mut buf = vec![0u8; x.count.min(CHUNK_SECTORS) as usize * SECTOR];
    let (mut lba, mut left) = (x.lba, x.count);
    while left > 0 {
        let n = left.min(CHUNK_SECTORS);
        let b = &mut buf[..n as usize * SECTOR];
        let moved = if x.write {
            prdt.read_guest(b).map(|()| match fua {
                Some(f) => io.write_sectors_fua(lba, b, f),
                None => io.write_sectors(lba, b),
            })
        } else {
            io.read_sectors(lba, b)?;
            prdt.write_guest(b).map(|()| Ok(()))
        };
        match moved {
            Ok(r) => r?,
            Err(e) => {
                warn_limited!(format!("ahci-dma-{port}"), "ahci port {port}: DMA failed: {e}");
                return Err(Failure::Hba);
            }
        }
        lba += u64::from(n);
        left -= n;
    }
    Ok(())
}

/// How issuing a slot went.
enum Step {
    /// Finished at once (no image I/O): the completion and, for commands that got as far as
    /// their PRDT, (bytes moved, descriptor interrupt).
    Done(Completion, Option<(u32, bool)>),
    /// Needs the image: runs as a job.
    Io(IoCmd),
    /// A non-queued command while queued ones are in flight: it waits for them.
    Wait,
}

/// What a command asks of the transport after the device layer decoded it.
enum Exec {
    Now(Completion),
    Io(IoKind, Taskfile),
}

impl AhciController {
    /// Issues command slot `slot` of `port`: runs it to completion if it needs no image I/O,
    /// else starts its job (the slot stays busy until the job completes). False: the command
    /// must wait until the port's queued commands have completed.
    pub(super) fn exec_slot(&mut self, port: usize, slot: usize) -> bool {
        let mem = self.mem.clone();
        let hdr_addr = self.ports[port].regs.clb.wrapping_add(32 * slot as u64);
        match self.run_command(&*mem, port, slot, hdr_addr) {
            Step::Wait => return false,
            Step::Done(completion, prd) => self.finish(port, slot, hdr_addr, completion, prd),
            Step::Io(c) => {
                let p = &mut self.ports[port];
                if let IoKind::Ncq { xfer, .. } = c.kind {
                    // The device accepted the command (D2H with BSY clear: PxCI drops) and
                    // sets up the transfer; PxSACT stays set until the SDB FIS.
                    let bytes = xfer.count.saturating_mul(SECTOR as u32);
                    post_fis(&*mem, port, &p.regs, RX_DSFIS, &dma_setup_fis(slot, xfer.write, bytes));
                    p.regs.ci &= !(1 << slot);
                } else {
                    p.regs.tfd = TFD_IO_BUSY;
                }
                self.start_io(port, slot, c);
            }
        }
        true
    }

    /// Reports the end of slot `slot`'s command: PRDBC, the FIS, PxTFD, PxCI (PxSACT for NCQ),
    /// PxIS and the interrupt. An error halts the port and abandons its other commands.
    pub(super) fn finish(
        &mut self,
        port: usize,
        slot: usize,
        hdr_addr: u64,
        completion: Completion,
        prd: Option<(u32, bool)>,
    ) {
        let mem = self.mem.clone();
        if let Some((done, _)) = prd {
            if let Err(e) = mem.write_u32(hdr_addr.wrapping_add(4), done) {
                warn_limited!(format!("ahci-prdbc-{port}"), "ahci port {port}: PRDBC not written: {e}");
            }
        }
        let dps = if prd.is_some_and(|(_, dps)| dps) { pxis::DPS } else { 0 };
        let queued = matches!(completion, Completion::Sdb | Completion::Error { ncq: true, .. });
        let failed = matches!(completion, Completion::Error { .. });
        let p = &mut self.ports[port];
        if !queued {
            // (An NCQ command left PxCI when it was accepted.)
            p.regs.ci &= !(1 << slot);
        }
        let (bits, fis_at, fis): (u32, u64, Vec<u8>) = match completion {
            Completion::D2h(tf) => {
                p.regs.tfd = u32::from(ST_OK);
                (pxis::DHRS, RX_RFIS, tf_fis(FIS_D2H, FIS_I, &tf, ST_OK, 0).to_vec())
            }
            Completion::PioIn(tf, bytes) => {
                p.regs.tfd = u32::from(ST_OK);
                (pxis::PSS, RX_PSFIS, pio_setup_fis(&tf, bytes).to_vec())
            }
            Completion::Packet { tf, pio } => {
                p.regs.tfd = u32::from(ST_OK);
                let mut bits = pxis::DHRS;
                if let Some(bytes) = pio {
                    let [lo, hi, ..] = bytes.min(0xffff).to_le_bytes();
                    let ps = Taskfile { count: IREASON_IO, lba_mid: lo, lba_high: hi, ..tf };
                    post_fis(&*mem, port, &p.regs, RX_PSFIS, &pio_setup_fis(&ps, bytes));
                    bits |= pxis::PSS;
                }
                (bits, RX_RFIS, tf_fis(FIS_D2H, FIS_I, &tf, ST_OK, 0).to_vec())
            }
            Completion::Sdb => {
                p.regs.sact &= !(1 << slot);
                p.regs.tfd = u32::from(ST_OK);
                (pxis::SDBS, RX_SDBFIS, sdb_fis(ST_OK, 0, 1 << slot).to_vec())
            }
            Completion::Silent => (0, 0, Vec::new()),
            Completion::Error { tf, fail, ncq } => {
                let err = fail.error_bits();
                p.regs.tfd = u32::from(ST_ERR) | u32::from(err) << 8;
                p.halted = true;
                if ncq {
                    (pxis::TFES, RX_SDBFIS, sdb_fis(ST_ERR, err, 0).to_vec())
                } else {
                    (pxis::TFES | pxis::DHRS, RX_RFIS, tf_fis(FIS_D2H, FIS_I, &tf, ST_ERR, err).to_vec())
                }
            }
        };
        if !fis.is_empty() {
            post_fis(&*mem, port, &p.regs, fis_at, &fis);
        }
        if failed {
            // The device aborts everything else it had queued; their completions are stale.
            self.abandon(port);
        }
        if bits | dps != 0 {
            self.raise(port, bits | dps);
        }
    }

    /// Fetches and decodes one command; runs it if it needs no image I/O.
    fn run_command(&mut self, mem: &dyn GuestRam, port: usize, slot: usize, hdr_addr: u64) -> Step {
        let hba_fail = |why: String| {
            warn_limited!(format!("ahci-cmd-{port}"), "ahci port {port} slot {slot}: {why}");
            Completion::Error { tf: Taskfile::default(), fail: Failure::Hba, ncq: false }
        };
        let mut hdr = [0u8; 16];
        if let Err(e) = mem.read(hdr_addr, &mut hdr) {
            return Step::Done(hba_fail(format!("command header: {e}")), None);
        }
        let dw = |i: usize| u32::from_le_bytes([hdr[4 * i], hdr[4 * i + 1], hdr[4 * i + 2], hdr[4 * i + 3]]);
        let flags = dw(0);
        let prdtl = (flags >> 16) as u16;
        let ctba = (u64::from(dw(3)) << 32 | u64::from(dw(2))) & !0x7f;
        let cfl = flags & HDR_CFL;
        let mut cfis = [0u8; 20];
        if let Err(e) = mem.read(ctba, &mut cfis) {
            return Step::Done(hba_fail(format!("command table: {e}")), Some((0, false)));
        }
        if !(5..=16).contains(&cfl) || cfis[0] != FIS_H2D {
            return Step::Done(
                hba_fail(format!(
                    "command FIS type {:#04x}, length {cfl} dwords: not a H2D register FIS",
                    cfis[0]
                )),
                Some((0, false)),
            );
        }
        let tf = taskfile(&cfis);
        let p = &mut self.ports[port];
        let queued = cfis[1] & 0x80 != 0
            && matches!(p.dev, Some(PortDevice::Disk(_)))
            && matches!(tf.command, ata_cmd::READ_FPDMA_QUEUED | ata_cmd::WRITE_FPDMA_QUEUED);
        if !queued && p.running() != 0 {
            return Step::Wait;
        }
        if cfis[1] & 0x80 == 0 {
            // Control FIS: SRST asserted, then released (the device resets and sends its signature).
            if cfis[15] & CTL_SRST != 0 {
                p.srst = true;
                p.regs.tfd = super::TFD_BSY;
            } else if p.srst {
                p.srst = false;
                p.sig_pending = true;
                self.deliver_signature(port);
            }
            return Step::Done(Completion::Silent, Some((0, false)));
        }
        let Some(dev) = &mut p.dev else {
            warn_limited!(
                format!("ahci-nodev-{port}"),
                "ahci port {port}: command {:#04x} with no device",
                tf.command
            );
            return Step::Done(Completion::Error { tf, fail: Failure::Hba, ncq: false }, Some((0, false)));
        };
        let mut prdt = Prdt::new(mem, ctba, prdtl);
        let exec = match dev {
            PortDevice::Cdrom(cd) => Self::run_packet_device(cd, &mut prdt, tf, ctba, port),
            PortDevice::Disk(disk) if queued => Self::run_ncq(disk, tf, port, slot),
            PortDevice::Disk(disk) => Self::run_ata(disk, &mut prdt, tf, port),
        };
        match exec {
            Exec::Now(c) => Step::Done(c, Some((prdt.done, prdt.dps))),
            Exec::Io(kind, tf) => Step::Io(IoCmd { kind, tf, hdr: hdr_addr, ctba, prdtl }),
        }
    }

    fn run_ata(disk: &mut AtaDisk, prdt: &mut Prdt<'_>, mut tf: Taskfile, port: usize) -> Exec {
        let fail = |tf, fail| Exec::Now(Completion::Error { tf, fail, ncq: false });
        if matches!(tf.command, ata_cmd::FLUSH_CACHE | ata_cmd::FLUSH_CACHE_EXT) {
            // fdatasync can take long: on the worker.
            return Exec::Io(IoKind::Flush, tf);
        }
        match disk.execute(&mut tf) {
            Ok(AtaAction::Complete) => Exec::Now(Completion::D2h(tf)),
            Ok(AtaAction::DataIn(buf)) => Exec::Now(pio_in(prdt, tf, &buf, port)),
            Ok(AtaAction::Transfer(x)) => Exec::Io(IoKind::Disk(x), tf),
            Ok(AtaAction::Diagnostic) => {
                // The registers hold the ATA signature again.
                Exec::Now(Completion::D2h(Taskfile { count: 1, lba_low: 1, ..Default::default() }))
            }
            Err(e) => fail(tf, e.into()),
        }
    }

    fn run_ncq(disk: &mut AtaDisk, tf: Taskfile, port: usize, slot: usize) -> Exec {
        let n = match disk.decode_ncq(&tf) {
            Ok(n) => n,
            Err(e) => return Exec::Now(Completion::Error { tf, fail: e.into(), ncq: true }),
        };
        if usize::from(n.tag) != slot {
            warn_limited!(
                format!("ahci-ncq-tag-{port}"),
                "ahci port {port}: NCQ tag {} issued in slot {slot}; the slot is used",
                n.tag
            );
        }
        Exec::Io(IoKind::Ncq { xfer: n.xfer, fua: n.fua }, tf)
    }
}

/// Completion of a PIO data-in command whose data is `buf`: a PRDT too short for it or outside
/// RAM fails the command (the drive sees it aborted).
fn pio_in(prdt: &mut Prdt<'_>, tf: Taskfile, buf: &[u8], port: usize) -> Completion {
    match prdt.write_guest(buf) {
        Ok(()) => Completion::PioIn(tf, buf.len() as u32),
        Err(e) => {
            warn_limited!(format!("ahci-dma-{port}"), "ahci port {port}: PIO data-in failed: {e}");
            Completion::Error { tf, fail: Failure::Hba, ncq: false }
        }
    }
}

/// Reply data of a packet command to the guest: what fits in the PRDT (a short table is not an
/// error: the guest learns the count from PRDBC, as QEMU does). Memory faults fail the command.
fn packet_data(prdt: &mut Prdt<'_>, data: &[u8], port: usize) -> Result<bool, Failure> {
    match prdt.write_guest(data) {
        Ok(()) => Ok(true),
        Err(DmaFault::Short) => Ok(false),
        Err(e @ DmaFault::Mem(_)) => {
            warn_limited!(format!("ahci-dma-{port}"), "ahci port {port}: ATAPI data-in failed: {e}");
            Err(Failure::Hba)
        }
    }
}

/// Media blocks of a READ command to the PRDT, a chunk at a time (on an I/O worker); stops early
/// (successfully) when the PRDT is exhausted, so an absurd transfer length never reads more than
/// a chunk beyond what the guest can take. Errors: `Ok(sense)` for a medium failure (CHECK
/// CONDITION), `Err` for a memory fault.
pub(super) fn packet_read(
    cd: &CdReader,
    prdt: &mut Prdt<'_>,
    lba: u32,
    blocks: u32,
    port: usize,
) -> Result<(), Result<Sense, Failure>> {
    let mut buf = vec![0u8; blocks.min(CHUNK_CD_BLOCKS) as usize * CD_BLOCK_SIZE];
    let (mut lba, mut left) = (u64::from(lba), blocks);
    while left > 0 {
        let n = left.min(CHUNK_CD_BLOCKS);
        let b = &mut buf[..n as usize * CD_BLOCK_SIZE];
        cd.read_blocks(lba, b).map_err(Ok)?;
        if !packet_data(prdt, b, port).map_err(Err)? {
            break;
        }
        lba += u64::from(n);
        left -= n;
    }
    Ok(())
}

impl AhciController {
    /// The ATA commands of a packet device, and PACKET itself (ATA8-ACS "PACKET feature set").
    fn run_packet_device(
        cd: &mut AtapiDrive,
        prdt: &mut Prdt<'_>,
        mut tf: Taskfile,
        ctba: u64,
        port: usize,
    ) -> Exec {
        let abort = |tf| Completion::Error { tf, fail: Failure::Ata(AtaError::Abort), ncq: false };
        let mut signature = Taskfile::default();
        signature.set_signature(DriveKind::Cdrom);
        let now = match tf.command {
            ata_cmd::PACKET => return Self::run_packet(cd, prdt, tf, ctba, port),
            ata_cmd::IDENTIFY_PACKET_DEVICE => pio_in(prdt, tf, &cd.identify_packet(), port),
            // Drivers and firmware tell packet devices apart by these aborting with the ATAPI
            // signature in the registers.
            ata_cmd::IDENTIFY_DEVICE | ata_cmd::READ_SECTORS | ata_cmd::READ_SECTORS_NORETRY => {
                abort(Taskfile { device: tf.device, ..signature })
            }
            // The device resets its command state (not the tray lock or medium) and reports its
            // signature.
            ata_cmd::DEVICE_RESET | ata_cmd::EXECUTE_DEVICE_DIAGNOSTIC => Completion::D2h(signature),
            ata_cmd::SET_FEATURES if cd.set_features(tf.feature, tf.count) => Completion::D2h(tf),
            ata_cmd::CHECK_POWER_MODE => {
                tf.count = 0xff;
                Completion::D2h(tf)
            }
            ata_cmd::STANDBY_IMMEDIATE
            | ata_cmd::IDLE_IMMEDIATE
            | ata_cmd::STANDBY
            | ata_cmd::IDLE
            | ata_cmd::SLEEP
            | ata_cmd::FLUSH_CACHE => Completion::D2h(tf),
            other => {
                warn_limited!(
                    format!("ahci-cd-cmd-{port}"),
                    "ahci port {port}: ATA command {other:#04x} to a packet device aborted"
                );
                abort(tf)
            }
        };
        Exec::Now(now)
    }

    /// PACKET: the CDB from the ACMD area, its reply or media blocks through the PRDT.
    fn run_packet(cd: &mut AtapiDrive, prdt: &mut Prdt<'_>, tf: Taskfile, ctba: u64, port: usize) -> Exec {
        let fail = |fail| {
            Exec::Now(Completion::Error {
                tf: Taskfile { count: IREASON_COD | IREASON_IO, ..tf },
                fail,
                ncq: false,
            })
        };
        // Overlapped/queued packet commands are not supported (IDENTIFY PACKET DEVICE says so).
        if tf.feature & 0x02 != 0 {
            return fail(Failure::Ata(AtaError::Abort));
        }
        let mut cdb = [0u8; CDB_LEN];
        if let Err(e) = prdt.mem.read(ctba.wrapping_add(CT_ACMD), &mut cdb) {
            warn_limited!(format!("ahci-cmd-{port}"), "ahci port {port}: ATAPI command not in RAM: {e}");
            return fail(Failure::Hba);
        }
        let dma = tf.feature & 0x01 != 0;
        let moved = match cd.execute(&cdb) {
            AtapiAction::Complete => Ok(false),
            AtapiAction::CheckCondition => Err(Failure::Sense(cd.error_register())),
            AtapiAction::DataIn(data) => packet_data(prdt, &data, port).map(|_| true),
            // Medium reads run on the I/O worker.
            AtapiAction::Read { lba, blocks } => return Exec::Io(IoKind::CdRead { lba, blocks, dma }, tf),
        };
        match moved {
            Ok(data) => Exec::Now(Completion::Packet {
                tf: Taskfile { count: IREASON_COD | IREASON_IO, lba_mid: 0, lba_high: 0, ..tf },
                pio: (data && !dma).then_some(prdt.done),
            }),
            Err(f) => fail(f),
        }
    }
}
