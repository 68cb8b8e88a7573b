//! SFF-8038i bus-master DMA: the physical region descriptor (PRD) walker and a step-wise DMA
//! engine moving sectors between a disk (through its detached [`SectorIo`]) and guest RAM.
//!
//! A PRD entry is 8 bytes: u32 buffer address (bit 0 ignored), u16 byte count (bit 0 ignored,
//! 0 = 64 KiB), u16 flags (bit 15 = end of table). The table is dword aligned and may not cross a
//! 64 KiB boundary, so at most 8192 entries are ever read: an unterminated or looping table ends
//! with an error instead of a hang.
//!
//! [`DmaEngine::step`] moves at most [`DmaEngine::CHUNK_SECTORS`] sectors per call. The engine
//! holds no reference to the controller, so the IDE controller runs it to completion on its I/O
//! worker ([`super::aio::IoEngine`]) and completes the command afterwards.

use thiserror::Error;

use super::ata::{AtaError, DirectXfer, PieceError, SectorIo, SectorXfer, SECTOR_SIZE};
use crate::mem::GuestRam;

/// A bus (host side) failure: the controller sets its error bit.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    #[error("PRD entry at {0:#x} is not in guest RAM")]
    TableNotRam(u64),
    #[error("PRD table reached its 64 KiB boundary at {0:#x} without an end-of-table entry")]
    TableOverrun(u64),
    #[error("PRD table ended before the transfer did")]
    TableShort,
    #[error("DMA buffer {gpa:#x}+{len:#x} is not in guest RAM")]
    BufferNotRam { gpa: u64, len: usize },
}

/// Why a DMA transfer stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFailure {
    /// Guest memory / PRD problem (bus-master error bit).
    Bus(DmaFault),
    /// The device failed the command (image I/O error).
    Device(AtaError),
}

/// Walks a PRD table, handing out guest-memory segments.
#[derive(Debug, Clone)]
pub struct PrdCursor {
    next_entry: u64,
    window_end: u64,
    seg_addr: u64,
    seg_left: u32,
    eot: bool,
}

impl PrdCursor {
    pub fn new(table: u32) -> Self {
        let t = u64::from(table & !3);
        PrdCursor {
            next_entry: t,
            window_end: (t & !0xffff) + 0x1_0000,
            seg_addr: 0,
            seg_left: 0,
            eot: false,
        }
    }

    /// The next guest-memory piece of at most `max` bytes (never empty).
    pub fn next_segment(&mut self, mem: &dyn GuestRam, max: usize) -> Result<(u64, usize), DmaFault> {
        if self.seg_left == 0 {
            if self.eot {
                return Err(DmaFault::TableShort);
            }
            if self.next_entry + 8 > self.window_end {
                return Err(DmaFault::TableOverrun(self.next_entry));
            }
            let e = mem.read_u64(self.next_entry).map_err(|_| DmaFault::TableNotRam(self.next_entry))?;
            self.next_entry += 8;
            self.seg_addr = u64::from(e as u32 & !1);
            self.seg_left = match (e >> 32) as u32 & 0xfffe {
                0 => 0x1_0000,
                n => n,
            };
            self.eot = e & (1 << 63) != 0;
        }
        let n = (self.seg_left as usize).min(max);
        let a = self.seg_addr;
        self.seg_addr += n as u64;
        self.seg_left -= n as u32;
        Ok((a, n))
    }
}

/// Result of one [`DmaEngine::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaStatus {
    Running,
    Done,
    Failed(DmaFailure),
}

/// One DMA command in flight.
#[derive(Debug)]
pub struct DmaEngine {
    xfer: SectorXfer,
    cursor: PrdCursor,
    buf: Vec<u8>,
}

impl DmaEngine {
    /// Sectors moved per step (64 KiB bounce buffer).
    pub const CHUNK_SECTORS: u32 = 128;

    pub fn new(xfer: SectorXfer, prd_table: u32) -> Self {
        DmaEngine { xfer, cursor: PrdCursor::new(prd_table), buf: Vec::new() }
    }

    /// Sector after the last one moved.
    pub fn next_lba(&self) -> u64 {
        self.xfer.lba
    }

    pub fn xfer(&self) -> &SectorXfer {
        &self.xfer
    }

    /// Moves the next chunk.
    pub fn step(&mut self, mem: &dyn GuestRam, disk: &SectorIo) -> DmaStatus {
        if self.xfer.count == 0 {
            return DmaStatus::Done;
        }
        let n = self.xfer.count.min(Self::CHUNK_SECTORS);
        let bytes = n as usize * SECTOR_SIZE;
        let r = match disk.direct(self.xfer.lba, n, self.xfer.write) {
            Err(e) => Err(DmaFailure::Device(e)),
            // A raw image: straight between the image and guest memory, no bounce buffer.
            Ok(Some(d)) => {
                self.direct(mem, &d, bytes).and_then(|()| d.finish(None).map_err(DmaFailure::Device))
            }
            Ok(None) => self.buffered(mem, disk, bytes),
        };
        if let Err(f) = r {
            return DmaStatus::Failed(f);
        }
        self.xfer.lba += u64::from(n);
        self.xfer.count -= n;
        if self.xfer.count == 0 {
            DmaStatus::Done
        } else {
            DmaStatus::Running
        }
    }

    fn direct(&mut self, mem: &dyn GuestRam, d: &DirectXfer<'_>, bytes: usize) -> Result<(), DmaFailure> {
        let mut off = 0;
        while off < bytes {
            let (gpa, len) = self.cursor.next_segment(mem, bytes - off).map_err(DmaFailure::Bus)?;
            d.piece(mem, off, gpa, len).map_err(|e| match e {
                PieceError::Mem(_) => DmaFailure::Bus(DmaFault::BufferNotRam { gpa, len }),
                PieceError::Device(a) => DmaFailure::Device(a),
            })?;
            off += len;
        }
        Ok(())
    }

    /// Through the bounce buffer (images that are not a plain file).
    fn buffered(&mut self, mem: &dyn GuestRam, disk: &SectorIo, bytes: usize) -> Result<(), DmaFailure> {
        self.buf.resize(bytes, 0);
        if self.xfer.write {
            self.gather(mem, bytes).map_err(DmaFailure::Bus).and_then(|()| {
                disk.write_sectors(self.xfer.lba, &self.buf[..bytes]).map_err(DmaFailure::Device)
            })
        } else {
            disk.read_sectors(self.xfer.lba, &mut self.buf[..bytes])
                .map_err(DmaFailure::Device)
                .and_then(|()| self.scatter(mem, bytes).map_err(DmaFailure::Bus))
        }
    }

    /// Runs to completion (bounded: at most 512 steps of 64 KiB).
    pub fn run(&mut self, mem: &dyn GuestRam, disk: &SectorIo) -> Result<(), DmaFailure> {
        loop {
            match self.step(mem, disk) {
                DmaStatus::Running => {}
                DmaStatus::Done => return Ok(()),
                DmaStatus::Failed(f) => return Err(f),
            }
        }
    }

    fn scatter(&mut self, mem: &dyn GuestRam, bytes: usize) -> Result<(), DmaFault> {
        let mut off = 0;
        while off < bytes {
            let (gpa, len) = self.cursor.next_segment(mem, bytes - off)?;
            mem.write(gpa, &self.buf[off..off + len]).map_err(|_| DmaFault::BufferNotRam { gpa, len })?;
            off += len;
        }
        Ok(())
    }

    fn gather(&mut self, mem: &dyn GuestRam, bytes: usize) -> Result<(), DmaFault> {
        let mut off = 0;
        while off < bytes {
            let (gpa, len) = self.cursor.next_segment(mem, bytes - off)?;
            mem.read(gpa, &mut self.buf[off..off + len]).map_err(|_| DmaFault::BufferNotRam { gpa, len })?;
            off += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::TestRam;

    fn entry(mem: &TestRam, at: u64, addr: u32, count: u16, eot: bool) {
        let flags: u16 = if eot { 0x8000 } else { 0 };
        let v = u64::from(addr) | (u64::from(count) << 32) | (u64::from(flags) << 48);
        mem.write(at, &v.to_le_bytes()).unwrap();
    }

    #[test]
    fn cursor_splits_and_honours_eot_and_zero_count() {
        let mem = TestRam::new(0x3_0000);
        entry(&mem, 0x100, 0x1001, 0x0201, false); // bit 0 of both ignored
        entry(&mem, 0x108, 0x2000, 0, true); // 64 KiB
        let mut c = PrdCursor::new(0x103); // low bits of the table address ignored
        assert_eq!(c.next_segment(&mem, 0x100), Ok((0x1000, 0x100)));
        assert_eq!(c.next_segment(&mem, 0x1000), Ok((0x1100, 0x100)));
        assert_eq!(c.next_segment(&mem, 0x2_0000), Ok((0x2000, 0x1_0000)));
        assert_eq!(c.next_segment(&mem, 1), Err(DmaFault::TableShort));
    }

    #[test]
    fn cursor_stops_at_window_end_and_outside_ram() {
        let mem = TestRam::new(0x2_0000);
        // Two unterminated entries right below a 64 KiB boundary.
        entry(&mem, 0xfff0, 0x100, 2, false);
        entry(&mem, 0xfff8, 0x100, 2, false);
        let mut c = PrdCursor::new(0xfff0);
        assert!(c.next_segment(&mem, 512).is_ok());
        assert!(c.next_segment(&mem, 512).is_ok());
        assert_eq!(c.next_segment(&mem, 512), Err(DmaFault::TableOverrun(0x1_0000)));
        let mut c = PrdCursor::new(0xffff_fff0);
        assert_eq!(c.next_segment(&mem, 512), Err(DmaFault::TableNotRam(0xffff_fff0)));
    }
}
