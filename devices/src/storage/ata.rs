//! The ATA command layer, independent of the transport (legacy IDE task file today, AHCI FISes
//! later): an ATA disk's persistent settings, IDENTIFY DEVICE, command decoding into an
//! [`AtaAction`] the transport carries out, and range-checked sector I/O on a [`BlockBackend`].
//!
//! The transport owns data movement (PIO buffer or DMA scatter/gather) and interrupts; this layer
//! never touches guest memory.

use std::sync::Arc;

use thiserror::Error;

use super::image::BlockBackend;
use crate::mem::{GuestFileError, GuestMemError, GuestRam};
use crate::warn_limited;

pub const SECTOR_SIZE: usize = 512;
/// Largest DRQ block for READ/WRITE MULTIPLE (IDENTIFY word 47).
pub const MAX_MULTIPLE: u8 = 16;

/// Status register bits.
pub mod status {
    pub const BSY: u8 = 0x80;
    pub const DRDY: u8 = 0x40;
    pub const DF: u8 = 0x20;
    /// Device seek complete (obsolete, but SeaBIOS/old drivers look for it after reset).
    pub const DSC: u8 = 0x10;
    pub const DRQ: u8 = 0x08;
    pub const ERR: u8 = 0x01;
}

/// Error register bits.
pub mod error {
    pub const UNC: u8 = 0x40;
    pub const IDNF: u8 = 0x10;
    pub const ABRT: u8 = 0x04;
    /// After reset/EXECUTE DEVICE DIAGNOSTIC: "device 0 passed, device 1 passed or absent".
    pub const DIAG_PASSED: u8 = 0x01;
}

/// Command opcodes this layer knows.
pub mod cmd {
    pub const NOP: u8 = 0x00;
    pub const DEVICE_RESET: u8 = 0x08;
    pub const READ_SECTORS: u8 = 0x20;
    pub const READ_SECTORS_NORETRY: u8 = 0x21;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_NORETRY: u8 = 0x31;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    pub const WRITE_DMA_FUA_EXT: u8 = 0x3D;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY_NORETRY: u8 = 0x41;
    pub const READ_VERIFY_EXT: u8 = 0x42;
    /// NCQ (SATA only; decoded by [`super::AtaDisk::decode_ncq`], aborted by `execute`).
    pub const READ_FPDMA_QUEUED: u8 = 0x60;
    pub const WRITE_FPDMA_QUEUED: u8 = 0x61;
    pub const SEEK: u8 = 0x70;
    pub const EXECUTE_DEVICE_DIAGNOSTIC: u8 = 0x90;
    pub const INITIALIZE_DEVICE_PARAMETERS: u8 = 0x91;
    pub const PACKET: u8 = 0xA0;
    pub const SMART: u8 = 0xB0;
    pub const IDENTIFY_PACKET_DEVICE: u8 = 0xA1;
    pub const READ_MULTIPLE: u8 = 0xC4;
    pub const WRITE_MULTIPLE: u8 = 0xC5;
    pub const SET_MULTIPLE_MODE: u8 = 0xC6;
    pub const READ_DMA: u8 = 0xC8;
    pub const READ_DMA_NORETRY: u8 = 0xC9;
    pub const WRITE_DMA: u8 = 0xCA;
    pub const WRITE_DMA_NORETRY: u8 = 0xCB;
    pub const WRITE_MULTIPLE_FUA_EXT: u8 = 0xCE;
    pub const STANDBY_IMMEDIATE: u8 = 0xE0;
    pub const IDLE_IMMEDIATE: u8 = 0xE1;
    pub const STANDBY: u8 = 0xE2;
    pub const IDLE: u8 = 0xE3;
    pub const CHECK_POWER_MODE: u8 = 0xE5;
    pub const SLEEP: u8 = 0xE6;
    pub const FLUSH_CACHE: u8 = 0xE7;
    pub const IDENTIFY_DEVICE: u8 = 0xEC;
    pub const FLUSH_CACHE_EXT: u8 = 0xEA;
    pub const SET_FEATURES: u8 = 0xEF;
}

/// Device register bits.
pub const DEV_LBA: u8 = 0x40;
pub const DEV_SELECT: u8 = 0x10;

/// What sits in a drive slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveKind {
    /// ATA hard disk.
    Disk,
    /// ATAPI CD/DVD-ROM (signature and PACKET commands; see [`super::atapi`]).
    Cdrom,
}

/// The command-block registers as one device sees them. `hob_*` are the "previous" (high order)
/// bytes of the LBA48 FIFO registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taskfile {
    pub feature: u8,
    pub hob_feature: u8,
    pub count: u8,
    pub hob_count: u8,
    pub lba_low: u8,
    pub lba_mid: u8,
    pub lba_high: u8,
    pub hob_lba_low: u8,
    pub hob_lba_mid: u8,
    pub hob_lba_high: u8,
    pub device: u8,
    pub command: u8,
}

impl Taskfile {
    /// The post-reset signature (ATA: count 1, LBA 1, mid/high 00/00; ATAPI: 14/EB).
    pub fn set_signature(&mut self, kind: DriveKind) {
        self.count = 1;
        self.lba_low = 1;
        (self.lba_mid, self.lba_high) = match kind {
            DriveKind::Disk => (0, 0),
            DriveKind::Cdrom => (0x14, 0xeb),
        };
        self.hob_count = 0;
        self.hob_lba_low = 0;
        self.hob_lba_mid = 0;
        self.hob_lba_high = 0;
        // Head bits are cleared; DEV and the always-one bits stay.
        self.device &= 0xf0;
    }

    fn lba28(&self) -> u64 {
        (u64::from(self.device & 0x0f) << 24)
            | (u64::from(self.lba_high) << 16)
            | (u64::from(self.lba_mid) << 8)
            | u64::from(self.lba_low)
    }

    fn lba48(&self) -> u64 {
        (u64::from(self.hob_lba_high) << 40)
            | (u64::from(self.hob_lba_mid) << 32)
            | (u64::from(self.hob_lba_low) << 24)
            | (u64::from(self.lba_high) << 16)
            | (u64::from(self.lba_mid) << 8)
            | u64::from(self.lba_low)
    }

    /// Sector count: 0 means 256 (LBA28) or 65536 (LBA48).
    fn sector_count(&self, ext: bool) -> u32 {
        if ext {
            match (u32::from(self.hob_count) << 8) | u32::from(self.count) {
                0 => 65536,
                n => n,
            }
        } else {
            match self.count {
                0 => 256,
                n => u32::from(n),
            }
        }
    }
}

/// An ATA error outcome: the command ends with ERR in status and these bits in the error register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AtaError {
    #[error("command aborted")]
    Abort,
    #[error("address not found")]
    IdNotFound,
}

impl AtaError {
    pub fn error_bits(self) -> u8 {
        match self {
            AtaError::Abort => error::ABRT,
            AtaError::IdNotFound => error::IDNF,
        }
    }
}

/// A sector transfer the transport must carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorXfer {
    /// First sector (LBA, whatever the guest's addressing mode).
    pub lba: u64,
    /// Sectors left.
    pub count: u32,
    /// Host to device.
    pub write: bool,
    /// Through the DMA engine (else PIO).
    pub dma: bool,
    /// PIO: sectors per DRQ block (1, or the multiple setting).
    pub block: u32,
    /// LBA48 command (how the transport reports the final address back).
    pub ext: bool,
}

/// A decoded READ/WRITE FPDMA QUEUED command: the NCQ tag (count bits 7:3), the transfer (count
/// in the feature registers, LBA48 address) and Force Unit Access (device bit 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcqCommand {
    pub tag: u8,
    pub xfer: SectorXfer,
    pub fua: bool,
}

/// What a command asks the transport to do.
#[derive(Debug, PartialEq, Eq)]
pub enum AtaAction {
    /// Finished without data; completes with DRDY|DSC and an interrupt.
    Complete,
    /// Device-to-host PIO of a fixed buffer (IDENTIFY DEVICE).
    DataIn(Vec<u8>),
    /// Sector read/write.
    Transfer(SectorXfer),
    /// EXECUTE DEVICE DIAGNOSTIC: both devices on the bus post their signature.
    Diagnostic,
}

/// Identification strings and power-on settings of an ATA disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Up to 40 ASCII characters.
    pub model: String,
    /// Up to 20 ASCII characters.
    pub serial: String,
    /// Up to 8 ASCII characters.
    pub firmware: String,
    /// Write cache enabled at power-on (FLUSH CACHE then makes writes durable). When disabled,
    /// every write is flushed before it completes.
    pub write_cache: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            model: "HVMDM HARDDISK".into(),
            serial: "HV00000".into(),
            firmware: env!("CARGO_PKG_VERSION").into(),
            write_cache: true,
        }
    }
}

impl DiskConfig {
    /// The identity qemu-xen gives IDE disks ("QEMU HARDDISK", serial QM0000n with n = 1..4 in
    /// slot order, firmware "2.5+"), for guests migrated from qemu-xen that key on disk identity.
    pub fn qemu_compatible(channel: usize, drive: usize) -> Self {
        DiskConfig {
            model: "QEMU HARDDISK".into(),
            serial: format!("QM{:05}", channel * 2 + drive + 1),
            firmware: "2.5+".into(),
            write_cache: true,
        }
    }
}

/// Transfer mode chosen with SET FEATURES (reflected in IDENTIFY words 63/88).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XferMode {
    Pio,
    Mwdma(u8),
    Udma(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chs {
    cylinders: u32,
    heads: u32,
    sectors: u32,
}

/// An ATA hard disk on a block backend.
pub struct AtaDisk {
    backend: Arc<dyn BlockBackend>,
    config: DiskConfig,
    /// Capacity in sectors (a trailing partial sector of the image is not addressable).
    sectors: u64,
    default_chs: Chs,
    /// Translation set by INITIALIZE DEVICE PARAMETERS.
    current_chs: Chs,
    multiple: u8,
    write_cache: bool,
    mode: XferMode,
    /// The current command is a FUA write: each of its writes is durable before it completes.
    fua: bool,
    /// NCQ queue depth advertised in IDENTIFY (0: no NCQ, the PATA case).
    ncq_depth: u8,
}

impl std::fmt::Debug for AtaDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtaDisk")
            .field("sectors", &self.sectors)
            .field("read_only", &self.backend.is_read_only())
            .field("model", &self.config.model)
            .finish()
    }
}

/// Copies `s` into ATA string words: space padded, two characters per word, first in the high byte.
fn put_string(id: &mut [u16; 256], first_word: usize, words: usize, s: &str) {
    let mut bytes = vec![b' '; words * 2];
    for (d, c) in bytes.iter_mut().zip(s.bytes().filter(|c| c.is_ascii() && !c.is_ascii_control())) {
        *d = c;
    }
    for i in 0..words {
        id[first_word + i] = (u16::from(bytes[2 * i]) << 8) | u16::from(bytes[2 * i + 1]);
    }
}

impl AtaDisk {
    pub fn new(backend: Arc<dyn BlockBackend>, config: DiskConfig) -> Self {
        let sectors = backend.len() / SECTOR_SIZE as u64;
        // The conventional 16 heads / 63 sectors translation, cylinders capped at 16383.
        let cylinders = (sectors / (16 * 63)).clamp(1, 16383) as u32;
        let chs = Chs { cylinders, heads: 16, sectors: 63 };
        let write_cache = config.write_cache;
        AtaDisk {
            backend,
            config,
            sectors,
            default_chs: chs,
            current_chs: chs,
            multiple: MAX_MULTIPLE,
            write_cache,
            mode: XferMode::Udma(5),
            fua: false,
            ncq_depth: 0,
        }
    }

    /// Advertises native command queuing with `depth` (1..=32) tags in IDENTIFY words 75/76 (a
    /// SATA transport that implements READ/WRITE FPDMA QUEUED calls this once, at attach).
    pub fn enable_ncq(&mut self, depth: u8) {
        self.ncq_depth = depth.min(32);
    }

    /// Decodes READ/WRITE FPDMA QUEUED (the command layer does not execute NCQ itself: the
    /// transport owns tags). The address is always LBA48 and the sector count is in the feature
    /// registers (0 = 65536).
    pub fn decode_ncq(&self, tf: &Taskfile) -> Result<NcqCommand, AtaError> {
        let write = match tf.command {
            cmd::READ_FPDMA_QUEUED => false,
            cmd::WRITE_FPDMA_QUEUED => true,
            _ => return Err(AtaError::Abort),
        };
        if self.ncq_depth == 0 {
            return Err(AtaError::Abort);
        }
        let count = match (u32::from(tf.hob_feature) << 8) | u32::from(tf.feature) {
            0 => 65536,
            n => n,
        };
        let lba = tf.lba48();
        self.check_range(lba, count)?;
        if write && self.is_read_only() {
            return Err(AtaError::Abort);
        }
        Ok(NcqCommand {
            tag: tf.count >> 3,
            xfer: SectorXfer { lba, count, write, dma: true, block: 0, ext: true },
            fua: tf.device & 0x80 != 0,
        })
    }

    /// Power-on state of the settable parameters.
    pub fn reset(&mut self) {
        self.current_chs = self.default_chs;
        self.multiple = MAX_MULTIPLE;
        self.write_cache = self.config.write_cache;
        self.mode = XferMode::Udma(5);
        self.fua = false;
    }

    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.sectors
    }

    pub fn is_read_only(&self) -> bool {
        self.backend.is_read_only()
    }

    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache
    }

    /// IDENTIFY DEVICE data (512 bytes, little-endian words, checksummed).
    pub fn identify(&self) -> [u8; SECTOR_SIZE] {
        let mut id = [0u16; 256];
        let d = self.default_chs;
        let c = self.current_chs;
        id[0] = 0x0040; // fixed, non-removable ATA device
        id[1] = d.cylinders as u16;
        id[3] = d.heads as u16;
        id[6] = d.sectors as u16;
        put_string(&mut id, 10, 10, &self.config.serial);
        put_string(&mut id, 23, 4, &self.config.firmware);
        put_string(&mut id, 27, 20, &self.config.model);
        id[47] = 0x8000 | u16::from(MAX_MULTIPLE);
        id[48] = 1; // 32-bit PIO (legacy word; drivers that check it then use dword I/O)
        id[49] = (1 << 11) | (1 << 9) | (1 << 8); // IORDY, LBA, DMA
        id[50] = 1 << 14;
        id[51] = 0x200;
        id[52] = 0x200;
        id[53] = 0x7; // words 54-58, 64-70 and 88 valid
        id[54] = c.cylinders as u16;
        id[55] = c.heads as u16;
        id[56] = c.sectors as u16;
        let chs_cap = u64::from(c.cylinders) * u64::from(c.heads) * u64::from(c.sectors);
        let chs_cap = chs_cap.min(self.sectors) as u32;
        id[57] = chs_cap as u16;
        id[58] = (chs_cap >> 16) as u16;
        if self.multiple != 0 {
            id[59] = 0x100 | u16::from(self.multiple);
        }
        let lba28 = self.sectors.min(0x0fff_ffff) as u32;
        id[60] = lba28 as u16;
        id[61] = (lba28 >> 16) as u16;
        id[63] = 0x07; // MWDMA 0-2 supported
        id[64] = 0x03; // PIO 3-4
        id[65] = 120;
        id[66] = 120;
        id[67] = 120;
        id[68] = 120;
        id[80] = 0xf0; // ATA/ATAPI-4 .. ATA/ATAPI-7
        id[82] = (1 << 14) | (1 << 5) | 1; // NOP, write cache, SMART
        id[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10); // FLUSH EXT, FLUSH, LBA48
        id[84] = (1 << 14) | (1 << 6); // WRITE DMA/MULTIPLE FUA EXT
                                       // SMART is always enabled (see `smart`).
        id[85] = (1 << 14) | if self.write_cache { 1 << 5 } else { 0 } | 1;
        id[86] = (1 << 13) | (1 << 12) | (1 << 10);
        id[87] = (1 << 14) | (1 << 6);
        id[88] = 0x3f; // UDMA 0-5
        match self.mode {
            XferMode::Pio => {}
            XferMode::Mwdma(m) => id[63] |= 0x100 << m,
            XferMode::Udma(m) => id[88] |= 0x100 << m,
        }
        if self.ncq_depth > 0 {
            id[75] = u16::from(self.ncq_depth - 1);
            id[76] = (1 << 8) | (1 << 1); // NCQ, SATA Gen1 signalling
        }
        id[93] = (1 << 14) | (1 << 13) | 1; // device 0 via jumper, 80-wire cable detected
        id[100] = self.sectors as u16;
        id[101] = (self.sectors >> 16) as u16;
        id[102] = (self.sectors >> 32) as u16;
        id[103] = (self.sectors >> 48) as u16;
        id[106] = 1 << 14; // word valid: one 512-byte logical sector per physical sector
        id[255] = 0x00a5;
        let mut out = [0u8; SECTOR_SIZE];
        for (i, w) in id.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
        // Checksum byte makes all 512 bytes sum to 0 mod 256.
        let sum = out[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        out[511] = sum.wrapping_neg();
        out
    }

    /// The command's starting sector, from LBA28, LBA48 or CHS registers.
    fn start_sector(&self, tf: &Taskfile, ext: bool) -> Result<u64, AtaError> {
        if ext {
            return Ok(tf.lba48());
        }
        if tf.device & DEV_LBA != 0 {
            return Ok(tf.lba28());
        }
        let cyl = (u32::from(tf.lba_high) << 8) | u32::from(tf.lba_mid);
        let head = u32::from(tf.device & 0x0f);
        let sector = u32::from(tf.lba_low);
        let g = self.current_chs;
        if sector == 0 || sector > g.sectors || head >= g.heads {
            return Err(AtaError::IdNotFound);
        }
        Ok((u64::from(cyl) * u64::from(g.heads) + u64::from(head)) * u64::from(g.sectors)
            + u64::from(sector - 1))
    }

    fn check_range(&self, lba: u64, count: u32) -> Result<(), AtaError> {
        check_range(self.sectors, lba, count)
    }

    /// Writes the address of sector `next` back into the registers in the command's addressing
    /// mode (after a transfer the registers point past the last sector moved).
    pub fn set_address(&self, tf: &mut Taskfile, next: u64, ext: bool) {
        if ext {
            tf.lba_low = next as u8;
            tf.lba_mid = (next >> 8) as u8;
            tf.lba_high = (next >> 16) as u8;
            tf.hob_lba_low = (next >> 24) as u8;
            tf.hob_lba_mid = (next >> 32) as u8;
            tf.hob_lba_high = (next >> 40) as u8;
        } else if tf.device & DEV_LBA != 0 {
            tf.lba_low = next as u8;
            tf.lba_mid = (next >> 8) as u8;
            tf.lba_high = (next >> 16) as u8;
            tf.device = (tf.device & 0xf0) | ((next >> 24) as u8 & 0x0f);
        } else {
            let g = self.current_chs;
            let per_cyl = u64::from(g.heads) * u64::from(g.sectors);
            let cyl = next / per_cyl;
            let rem = next % per_cyl;
            tf.lba_mid = cyl as u8;
            tf.lba_high = (cyl >> 8) as u8;
            tf.device = (tf.device & 0xf0) | ((rem / u64::from(g.sectors)) as u8 & 0x0f);
            tf.lba_low = (rem % u64::from(g.sectors)) as u8 + 1;
        }
    }

    fn xfer(
        &self,
        tf: &Taskfile,
        ext: bool,
        write: bool,
        dma: bool,
        block: u32,
    ) -> Result<AtaAction, AtaError> {
        let count = tf.sector_count(ext);
        let lba = self.start_sector(tf, ext)?;
        self.check_range(lba, count)?;
        if write && self.is_read_only() {
            return Err(AtaError::Abort);
        }
        Ok(AtaAction::Transfer(SectorXfer { lba, count, write, dma, block, ext }))
    }

    /// Decodes and, for non-data commands, performs `tf.command`. May update the registers in `tf`
    /// (CHECK POWER MODE's count, VERIFY's address).
    pub fn execute(&mut self, tf: &mut Taskfile) -> Result<AtaAction, AtaError> {
        use cmd::*;
        let multiple = u32::from(self.multiple);
        self.fua = matches!(tf.command, WRITE_DMA_FUA_EXT | WRITE_MULTIPLE_FUA_EXT);
        match tf.command {
            IDENTIFY_DEVICE => Ok(AtaAction::DataIn(self.identify().to_vec())),
            READ_SECTORS | READ_SECTORS_NORETRY => self.xfer(tf, false, false, false, 1),
            READ_SECTORS_EXT => self.xfer(tf, true, false, false, 1),
            WRITE_SECTORS | WRITE_SECTORS_NORETRY => self.xfer(tf, false, true, false, 1),
            WRITE_SECTORS_EXT => self.xfer(tf, true, true, false, 1),
            READ_MULTIPLE
            | READ_MULTIPLE_EXT
            | WRITE_MULTIPLE
            | WRITE_MULTIPLE_EXT
            | WRITE_MULTIPLE_FUA_EXT
                if multiple == 0 =>
            {
                Err(AtaError::Abort)
            }
            READ_MULTIPLE => self.xfer(tf, false, false, false, multiple),
            READ_MULTIPLE_EXT => self.xfer(tf, true, false, false, multiple),
            WRITE_MULTIPLE => self.xfer(tf, false, true, false, multiple),
            WRITE_MULTIPLE_EXT | WRITE_MULTIPLE_FUA_EXT => self.xfer(tf, true, true, false, multiple),
            READ_DMA | READ_DMA_NORETRY => self.xfer(tf, false, false, true, 0),
            READ_DMA_EXT => self.xfer(tf, true, false, true, 0),
            WRITE_DMA | WRITE_DMA_NORETRY => self.xfer(tf, false, true, true, 0),
            WRITE_DMA_EXT | WRITE_DMA_FUA_EXT => self.xfer(tf, true, true, true, 0),
            READ_VERIFY | READ_VERIFY_NORETRY | READ_VERIFY_EXT => {
                let ext = tf.command == READ_VERIFY_EXT;
                let count = tf.sector_count(ext);
                let lba = self.start_sector(tf, ext)?;
                self.check_range(lba, count)?;
                self.set_address(tf, lba + u64::from(count) - 1, ext);
                Ok(AtaAction::Complete)
            }
            SEEK => {
                let lba = self.start_sector(tf, false)?;
                self.check_range(lba, 1)?;
                Ok(AtaAction::Complete)
            }
            FLUSH_CACHE | FLUSH_CACHE_EXT => {
                self.flush()?;
                Ok(AtaAction::Complete)
            }
            SET_FEATURES => self.set_features(tf),
            SMART => Self::smart(tf),
            SET_MULTIPLE_MODE => {
                let n = tf.count;
                if n > MAX_MULTIPLE || (n != 0 && !n.is_power_of_two()) {
                    return Err(AtaError::Abort);
                }
                self.multiple = n;
                Ok(AtaAction::Complete)
            }
            INITIALIZE_DEVICE_PARAMETERS => {
                if tf.count == 0 {
                    return Err(AtaError::Abort);
                }
                let heads = u32::from(tf.device & 0x0f) + 1;
                let sectors = u32::from(tf.count);
                let cylinders = (self.sectors / u64::from(heads * sectors)).clamp(1, 65535) as u32;
                self.current_chs = Chs { cylinders, heads, sectors };
                Ok(AtaAction::Complete)
            }
            // Recalibrate (0x10..0x1F, obsolete) and power management: nothing to do for an image.
            0x10..=0x1f | STANDBY_IMMEDIATE | IDLE_IMMEDIATE | STANDBY | IDLE | SLEEP => {
                Ok(AtaAction::Complete)
            }
            CHECK_POWER_MODE => {
                tf.count = 0xff; // active or idle
                Ok(AtaAction::Complete)
            }
            EXECUTE_DEVICE_DIAGNOSTIC => Ok(AtaAction::Diagnostic),
            // ATA disks abort the packet commands (that is how firmware tells disks from ATAPI),
            // DEVICE RESET (packet devices only) and NOP (by definition).
            NOP | DEVICE_RESET | PACKET | IDENTIFY_PACKET_DEVICE => Err(AtaError::Abort),
            other => {
                warn_limited!(
                    format!("ata-unknown-cmd-{other:02x}"),
                    "ata: unsupported command {other:#04x}"
                );
                Err(AtaError::Abort)
            }
        }
    }

    /// Minimal SMART, enough for smartctl and guest health probes: the feature set is always
    /// enabled (DISABLE OPERATIONS aborts, so there is no state to save), the status is "no
    /// threshold exceeded", the data and threshold pages carry no attributes, and the offline
    /// and self-test commands complete at once. Every subcommand needs the 4Fh/C2h key.
    fn smart(tf: &mut Taskfile) -> Result<AtaAction, AtaError> {
        const READ_DATA: u8 = 0xd0;
        const READ_THRESHOLDS: u8 = 0xd1;
        const AUTOSAVE: u8 = 0xd2;
        const EXECUTE_OFFLINE: u8 = 0xd4;
        const ENABLE: u8 = 0xd8;
        const RETURN_STATUS: u8 = 0xda;
        if (tf.lba_mid, tf.lba_high) != (0x4f, 0xc2) {
            return Err(AtaError::Abort);
        }
        let page = |fill: &dyn Fn(&mut [u8; SECTOR_SIZE])| {
            let mut p = [0u8; SECTOR_SIZE];
            p[0] = 1; // data structure revision
            fill(&mut p);
            let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
            p[511] = sum.wrapping_neg();
            AtaAction::DataIn(p.to_vec())
        };
        match tf.feature {
            ENABLE | AUTOSAVE | EXECUTE_OFFLINE => Ok(AtaAction::Complete),
            // "No threshold exceeded" leaves the key in LBA mid/high.
            RETURN_STATUS => Ok(AtaAction::Complete),
            READ_DATA => Ok(page(&|p| {
                p[362] = 0x82; // off-line data collection completed without error
                p[367] = 0x1b; // off-line immediate, self-test, abort on new command supported
                p[368] = 0x03; // saves data before power saving, supports the autosave timer
                p[370] = 0x01; // error logging supported
                p[372] = 1; // short self-test polling time (minutes)
                p[373] = 1; // extended self-test polling time
            })),
            READ_THRESHOLDS => Ok(page(&|_| {})),
            other => {
                warn_limited!(
                    format!("ata-smart-{other:02x}"),
                    "ata: unsupported SMART subcommand {other:#04x}"
                );
                Err(AtaError::Abort)
            }
        }
    }

    fn set_features(&mut self, tf: &Taskfile) -> Result<AtaAction, AtaError> {
        match tf.feature {
            0x02 => self.write_cache = true,
            0x82 => {
                // Switching the cache off must not lose what it held.
                self.flush()?;
                self.write_cache = false;
            }
            0x03 => {
                self.mode = match tf.count {
                    0x00 | 0x01 | 0x08..=0x0c => XferMode::Pio,
                    m @ 0x20..=0x22 => XferMode::Mwdma(m & 7),
                    m @ 0x40..=0x45 => XferMode::Udma(m & 7),
                    _ => return Err(AtaError::Abort),
                }
            }
            // Read look-ahead on/off, reverting to power-on defaults on/off: accepted, no effect.
            0x55 | 0xaa | 0x66 | 0xcc => {}
            other => {
                warn_limited!(
                    format!("ata-setfeat-{other:02x}"),
                    "ata: unsupported SET FEATURES {other:#04x}"
                );
                return Err(AtaError::Abort);
            }
        }
        Ok(AtaAction::Complete)
    }

    /// Reads `buf.len() / 512` sectors at `lba`. Host errors are logged and become ABRT.
    pub fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        self.sector_io().read_sectors(lba, buf)
    }

    /// Writes whole sectors at `lba` for the current command; with the write cache disabled or
    /// a FUA command the write is made durable before it completes.
    pub fn write_sectors(&self, lba: u64, buf: &[u8]) -> Result<(), AtaError> {
        self.sector_io().write_sectors(lba, buf)
    }

    /// [`Self::write_sectors`] with the FUA bit given by the transport (NCQ carries it per
    /// command). Host errors (EIO, ENOSPC) are logged and become ABRT, as on QEMU.
    pub fn write_sectors_fua(&self, lba: u64, buf: &[u8], fua: bool) -> Result<(), AtaError> {
        self.sector_io().write_sectors_fua(lba, buf, fua)
    }

    pub fn flush(&self) -> Result<(), AtaError> {
        self.sector_io().flush()
    }

    /// A detached handle for the current command's sector I/O (image, capacity, write-cache and
    /// FUA settings as of now), for an I/O worker that runs without the controller lock.
    pub fn sector_io(&self) -> SectorIo {
        SectorIo {
            backend: self.backend.clone(),
            sectors: self.sectors,
            write_through: !self.write_cache,
            fua: self.fua,
        }
    }
}

/// `count` sectors from `lba` lie on a disk of `sectors` sectors (else IDNF).
fn check_range(sectors: u64, lba: u64, count: u32) -> Result<(), AtaError> {
    match lba.checked_add(u64::from(count)) {
        Some(end) if end <= sectors => Ok(()),
        _ => Err(AtaError::IdNotFound),
    }
}

/// Sector I/O of one command, detached from the [`AtaDisk`] (`Send`, cheap to clone): what an
/// I/O worker calls. Same checks and error mapping as the disk's own methods.
#[derive(Clone)]
pub struct SectorIo {
    backend: Arc<dyn BlockBackend>,
    sectors: u64,
    write_through: bool,
    fua: bool,
}

impl std::fmt::Debug for SectorIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorIo").field("sectors", &self.sectors).field("fua", &self.fua).finish()
    }
}

impl SectorIo {
    fn check_range(&self, lba: u64, n: u32) -> Result<(), AtaError> {
        check_range(self.sectors, lba, n)
    }

    /// Reads `buf.len() / 512` sectors at `lba`. Host errors are logged and become ABRT.
    pub fn read_sectors(&self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        self.check_range(lba, (buf.len() / SECTOR_SIZE) as u32)?;
        self.backend.read_at(lba * SECTOR_SIZE as u64, buf).map_err(|e| {
            warn_limited!("ata-read-err", "ata: image read at sector {lba} failed: {e}");
            AtaError::Abort
        })
    }

    /// Writes whole sectors at `lba`, durable before returning for a FUA command or with the
    /// write cache off.
    pub fn write_sectors(&self, lba: u64, buf: &[u8]) -> Result<(), AtaError> {
        self.write_sectors_fua(lba, buf, self.fua)
    }

    pub fn write_sectors_fua(&self, lba: u64, buf: &[u8], fua: bool) -> Result<(), AtaError> {
        self.check_write(lba, (buf.len() / SECTOR_SIZE) as u32)?;
        self.backend.write_at(lba * SECTOR_SIZE as u64, buf).map_err(|e| {
            warn_limited!("ata-write-err", "ata: image write at sector {lba} failed: {e}");
            AtaError::Abort
        })?;
        self.settle_write(fua)
    }

    /// A write of `n` sectors at `lba` may go ahead: inside the disk (else IDNF) and the image
    /// writable (else ABRT).
    fn check_write(&self, lba: u64, n: u32) -> Result<(), AtaError> {
        self.check_range(lba, n)?;
        if self.backend.is_read_only() {
            return Err(AtaError::Abort);
        }
        Ok(())
    }

    /// After a write: durable before it completes for a FUA command or with the write cache off.
    fn settle_write(&self, fua: bool) -> Result<(), AtaError> {
        if self.write_through || fua {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<(), AtaError> {
        self.backend.flush().map_err(|e| {
            warn_limited!("ata-flush-err", "ata: image flush failed: {e}");
            AtaError::Abort
        })
    }

    /// A transfer of `n` sectors at `lba` straight between guest memory and the image file,
    /// after the checks [`Self::read_sectors`] / [`Self::write_sectors`] make (range, read-only).
    /// `Ok(None)`: the image is not a plain file (qcow2); use the buffered methods.
    pub fn direct(&self, lba: u64, n: u32, write: bool) -> Result<Option<DirectXfer<'_>>, AtaError> {
        if write {
            self.check_write(lba, n)?;
        } else {
            self.check_range(lba, n)?;
        }
        Ok(self.backend.host_file().map(|file| DirectXfer { io: self, file, lba, write }))
    }
}

/// One command's data moving between guest memory and a raw image without a bounce buffer:
/// the transport walks its scatter list and hands each guest piece to [`DirectXfer::piece`].
pub struct DirectXfer<'a> {
    io: &'a SectorIo,
    file: &'a std::fs::File,
    lba: u64,
    write: bool,
}

/// Why a piece of a [`DirectXfer`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceError {
    /// The guest range is not RAM: a DMA fault of the controller.
    Mem(GuestMemError),
    /// The host I/O failed (logged): the drive aborts the command.
    Device(AtaError),
}

impl DirectXfer<'_> {
    /// Moves `len` bytes at byte `pos` of the transfer from/to guest memory at `gpa`.
    pub fn piece(&self, mem: &dyn GuestRam, pos: usize, gpa: u64, len: usize) -> Result<(), PieceError> {
        let off = self.lba * SECTOR_SIZE as u64 + pos as u64;
        let r = if self.write {
            mem.write_to_file(gpa, len, self.file, off)
        } else {
            mem.read_from_file(gpa, len, self.file, off)
        };
        r.map_err(|e| match e {
            GuestFileError::Mem(m) => PieceError::Mem(m),
            GuestFileError::Io(e) => {
                let what = if self.write { "write" } else { "read" };
                warn_limited!("ata-direct-err", "ata: image {what} at byte {off} failed: {e}");
                PieceError::Device(AtaError::Abort)
            }
        })
    }

    /// Ends the transfer: a write is made durable before it completes when `fua` (None: the
    /// command's own FUA setting) or the write cache is off, as [`SectorIo::write_sectors_fua`].
    pub fn finish(&self, fua: Option<bool>) -> Result<(), AtaError> {
        if !self.write {
            return Ok(());
        }
        self.io.settle_write(fua.unwrap_or(self.io.fua))
    }
}

// ---- save/restore (used by the IDE controller's section) ----

/// The guest-settable parameters of a disk, decoded and validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AtaDiskState {
    current_chs: Chs,
    multiple: u8,
    write_cache: bool,
    mode: XferMode,
}

impl AtaDisk {
    /// Capacity (checked on restore: the image must be the same size) and the settings a guest
    /// changes with INITIALIZE DEVICE PARAMETERS, SET MULTIPLE MODE and SET FEATURES.
    pub(crate) fn save_state(&self, w: &mut crate::snapshot::SectionWriter) {
        w.put_u64(self.sectors);
        let c = self.current_chs;
        for v in [c.cylinders, c.heads, c.sectors] {
            w.put_u32(v);
        }
        w.put_u8(self.multiple);
        w.put_bool(self.write_cache);
        let (tag, m) = match self.mode {
            XferMode::Pio => (0, 0),
            XferMode::Mwdma(m) => (1, m),
            XferMode::Udma(m) => (2, m),
        };
        w.put_u8(tag);
        w.put_u8(m);
    }

    pub(crate) fn decode_state(
        &self,
        r: &mut crate::snapshot::SectionReader<'_>,
    ) -> Result<AtaDiskState, crate::snapshot::SnapshotError> {
        let sectors = r.get_u64()?;
        let (cylinders, heads, spt) = (r.get_u32()?, r.get_u32()?, r.get_u32()?);
        let multiple = r.get_u8()?;
        let write_cache = r.get_bool()?;
        let mode = match (r.get_u8()?, r.get_u8()?) {
            (0, 0) => XferMode::Pio,
            (1, m @ 0..=2) => XferMode::Mwdma(m),
            (2, m @ 0..=5) => XferMode::Udma(m),
            (t, m) => return Err(r.bad(format!("ATA transfer mode {t}/{m}"))),
        };
        if sectors != self.sectors {
            return Err(r.bad(format!("disk has {} sectors, the saved one had {sectors}", self.sectors)));
        }
        // What INITIALIZE DEVICE PARAMETERS can produce; zero would divide by zero later.
        if !(1..=65535).contains(&cylinders) || !(1..=16).contains(&heads) || !(1..=255).contains(&spt) {
            return Err(r.bad(format!("CHS translation {cylinders}/{heads}/{spt}")));
        }
        if multiple > MAX_MULTIPLE || (multiple != 0 && !multiple.is_power_of_two()) {
            return Err(r.bad(format!("multiple count {multiple}")));
        }
        Ok(AtaDiskState { current_chs: Chs { cylinders, heads, sectors: spt }, multiple, write_cache, mode })
    }

    pub(crate) fn apply_state(&mut self, st: &AtaDiskState) {
        self.current_chs = st.current_chs;
        self.multiple = st.multiple;
        self.write_cache = st.write_cache;
        self.mode = st.mode;
        // Whether an in-flight write was FUA is not saved: treat it as FUA (an extra flush,
        // never a lost durability guarantee).
        self.fua = true;
    }

    /// Whether `count` sectors from `lba` lie on the disk.
    pub(crate) fn range_ok(&self, lba: u64, count: u32) -> bool {
        self.check_range(lba, count).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::MemImage;
    use super::*;

    fn disk(sectors: usize) -> (AtaDisk, Arc<MemImage>) {
        let img = Arc::new(MemImage::new(vec![0; sectors * SECTOR_SIZE], false));
        (AtaDisk::new(img.clone(), DiskConfig::default()), img)
    }

    fn word(id: &[u8], w: usize) -> u16 {
        u16::from_le_bytes([id[2 * w], id[2 * w + 1]])
    }

    fn string(id: &[u8], first: usize, words: usize) -> String {
        let mut s = String::new();
        for w in first..first + words {
            let v = word(id, w);
            s.push((v >> 8) as u8 as char);
            s.push(v as u8 as char);
        }
        s
    }

    #[test]
    fn identify_words_and_checksum() {
        let (d, _) = disk(20160 + 5); // 20 cylinders of 16*63, plus a partial cylinder
        let id = d.identify();
        let sum = id.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        assert_eq!(sum, 0);
        assert_eq!(id[510], 0xa5);
        assert_eq!(word(&id, 0), 0x0040);
        assert_eq!((word(&id, 1), word(&id, 3), word(&id, 6)), (20, 16, 63));
        assert_eq!(string(&id, 27, 20).trim_end(), "HVMDM HARDDISK");
        assert_eq!(string(&id, 10, 10).trim_end(), "HV00000");
        assert_eq!(string(&id, 23, 4).trim_end(), env!("CARGO_PKG_VERSION"));
        assert_eq!(word(&id, 47), 0x8010);
        assert_eq!(word(&id, 49) & 0x300, 0x300);
        assert_eq!(word(&id, 53), 7);
        assert_eq!(word(&id, 59), 0x110);
        assert_eq!(u32::from(word(&id, 60)) | (u32::from(word(&id, 61)) << 16), 20165);
        assert_eq!(word(&id, 63) & 0xff, 7);
        assert_eq!(word(&id, 80), 0xf0);
        assert_eq!(word(&id, 82) & (1 << 5), 1 << 5);
        assert_eq!(word(&id, 83), 0x7400);
        assert_eq!(word(&id, 85) & (1 << 5), 1 << 5);
        assert_eq!(word(&id, 86), 0x3400);
        assert_eq!(word(&id, 88), 0x203f);
        assert_eq!(word(&id, 100), 20165);
        assert_eq!((word(&id, 101), word(&id, 102), word(&id, 103)), (0, 0, 0));
        assert_eq!(word(&id, 106), 0x4000);
    }

    #[test]
    fn minimal_smart() {
        let (mut d, _) = disk(64);
        let id = d.identify();
        assert_eq!((word(&id, 82) & 1, word(&id, 85) & 1), (1, 1));
        let mut tf = Taskfile {
            command: cmd::SMART,
            feature: 0xda,
            lba_mid: 0x4f,
            lba_high: 0xc2,
            ..Default::default()
        };
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        assert_eq!((tf.lba_mid, tf.lba_high), (0x4f, 0xc2), "no threshold exceeded");
        for f in [0xd0u8, 0xd1] {
            tf.feature = f;
            let Ok(AtaAction::DataIn(p)) = d.execute(&mut tf) else { panic!("SMART {f:#x}") };
            assert_eq!(p.len(), SECTOR_SIZE);
            assert_eq!(p.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        }
        for f in [0xd8u8, 0xd2, 0xd4] {
            tf.feature = f;
            assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        }
        // DISABLE OPERATIONS, READ LOG and a missing key abort.
        tf.feature = 0xd9;
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        tf.feature = 0xd5;
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        tf.feature = 0xda;
        tf.lba_high = 0;
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
    }

    #[test]
    fn qemu_identity_strings() {
        let img = Arc::new(MemImage::new(vec![0; 4096], false));
        let id = AtaDisk::new(img, DiskConfig::qemu_compatible(1, 0)).identify();
        assert_eq!(string(&id, 27, 20).trim_end(), "QEMU HARDDISK");
        assert_eq!(string(&id, 10, 10).trim_end(), "QM00003");
        assert_eq!(string(&id, 23, 4), "2.5+    ");
    }

    #[test]
    fn set_features_changes_identify() {
        let (mut d, _) = disk(100);
        let mut tf =
            Taskfile { command: cmd::SET_FEATURES, feature: 0x03, count: 0x22, ..Default::default() };
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        let id = d.identify();
        assert_eq!(word(&id, 63), 0x0407);
        assert_eq!(word(&id, 88), 0x003f);
        tf.feature = 0x82;
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        assert_eq!(word(&d.identify(), 85) & (1 << 5), 0);
        tf.feature = 0x03;
        tf.count = 0x47; // UDMA7 not supported
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        tf.feature = 0x05; // APM, not advertised
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        let mut sm = Taskfile { command: cmd::SET_MULTIPLE_MODE, count: 3, ..Default::default() };
        assert_eq!(d.execute(&mut sm), Err(AtaError::Abort));
        sm.count = 8;
        assert_eq!(d.execute(&mut sm), Ok(AtaAction::Complete));
        assert_eq!(word(&d.identify(), 59), 0x108);
        sm.count = 0;
        d.execute(&mut sm).unwrap();
        assert_eq!(word(&d.identify(), 59), 0);
        let mut rm =
            Taskfile { command: cmd::READ_MULTIPLE, count: 1, device: DEV_LBA, ..Default::default() };
        assert_eq!(d.execute(&mut rm), Err(AtaError::Abort));
        d.reset();
        assert!(matches!(d.execute(&mut rm), Ok(AtaAction::Transfer(SectorXfer { block: 16, .. }))));
    }

    #[test]
    fn addressing_modes_and_range() {
        let (mut d, _) = disk(20160);
        // LBA28 with the top nibble in the device register.
        let mut tf = Taskfile {
            command: cmd::READ_SECTORS,
            count: 2,
            lba_low: 0x10,
            lba_mid: 0x02,
            device: 0xe0,
            ..Default::default()
        };
        let Ok(AtaAction::Transfer(x)) = d.execute(&mut tf) else { panic!() };
        assert_eq!((x.lba, x.count, x.write, x.dma), (0x210, 2, false, false));
        // CHS: cylinder 1, head 2, sector 3 -> (1*16+2)*63+2
        tf.device = 0xa2;
        tf.lba_low = 3;
        tf.lba_mid = 1;
        let Ok(AtaAction::Transfer(x)) = d.execute(&mut tf) else { panic!() };
        assert_eq!(x.lba, (16 + 2) * 63 + 2);
        tf.lba_low = 0; // sector 0 does not exist
        assert_eq!(d.execute(&mut tf), Err(AtaError::IdNotFound));
        // LBA48 with count 0 = 65536 sectors is out of range for this disk.
        let mut ext = Taskfile { command: cmd::READ_DMA_EXT, device: 0x40, ..Default::default() };
        assert_eq!(d.execute(&mut ext), Err(AtaError::IdNotFound));
        ext.count = 1;
        ext.hob_lba_low = 1; // LBA 1<<24
        assert_eq!(d.execute(&mut ext), Err(AtaError::IdNotFound));
        ext.hob_lba_low = 0;
        ext.lba_low = 0x7f;
        let Ok(AtaAction::Transfer(x)) = d.execute(&mut ext) else { panic!() };
        assert_eq!((x.lba, x.count, x.dma, x.ext), (0x7f, 1, true, true));
        // Last sector is fine, one past is IDNF.
        let mut last = Taskfile { command: cmd::READ_VERIFY, count: 1, device: 0x40, ..Default::default() };
        d.set_address(&mut last, 20159, false);
        assert_eq!(d.execute(&mut last), Ok(AtaAction::Complete));
        d.set_address(&mut last, 20160, false);
        assert_eq!(d.execute(&mut last), Err(AtaError::IdNotFound));
    }

    #[test]
    fn set_address_roundtrips_chs() {
        let (d, _) = disk(20160);
        let mut tf = Taskfile { device: 0xa0, ..Default::default() };
        d.set_address(&mut tf, 12345, false);
        assert_eq!(d.start_sector(&tf, false), Ok(12345));
        tf.device = 0xe0;
        d.set_address(&mut tf, 0x0abc_def1, false);
        assert_eq!(d.start_sector(&tf, false), Ok(0x0abc_def1));
        d.set_address(&mut tf, 0xab_cdef_0123, true);
        assert_eq!(d.start_sector(&tf, true), Ok(0xab_cdef_0123));
    }

    #[test]
    fn read_only_disk_aborts_writes() {
        let img = Arc::new(MemImage::new(vec![0; 4096], true));
        let mut d = AtaDisk::new(img, DiskConfig::default());
        let mut tf = Taskfile { command: cmd::WRITE_SECTORS, count: 1, device: 0x40, ..Default::default() };
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        assert_eq!(d.write_sectors(0, &[0; 512]), Err(AtaError::Abort));
        let mut fl = Taskfile { command: cmd::FLUSH_CACHE, ..Default::default() };
        assert_eq!(d.execute(&mut fl), Ok(AtaAction::Complete));
    }

    #[test]
    fn fua_writes_flush_before_completing() {
        let (mut d, img) = disk(64);
        let id = d.identify();
        assert_eq!((word(&id, 84) & (1 << 6), word(&id, 87) & (1 << 6)), (1 << 6, 1 << 6));
        let mut tf = Taskfile { command: cmd::WRITE_DMA_FUA_EXT, count: 2, lba_low: 3, ..Default::default() };
        let Ok(AtaAction::Transfer(x)) = d.execute(&mut tf) else { panic!() };
        assert_eq!((x.lba, x.count, x.write, x.dma, x.ext), (3, 2, true, true, true));
        d.write_sectors(x.lba, &[7; 1024]).unwrap();
        assert_eq!(img.flush_count(), 1);
        assert_eq!(img.contents()[3 * 512], 7);
        tf.command = cmd::WRITE_MULTIPLE_FUA_EXT;
        let Ok(AtaAction::Transfer(x)) = d.execute(&mut tf) else { panic!() };
        assert_eq!((x.dma, x.block, x.ext), (false, u32::from(MAX_MULTIPLE), true));
        d.write_sectors(x.lba, &[8; 512]).unwrap();
        assert_eq!(img.flush_count(), 2);
        // A plain write with the cache on does not flush; the NCQ-style entry point takes the bit.
        tf.command = cmd::WRITE_DMA_EXT;
        d.execute(&mut tf).unwrap();
        d.write_sectors(3, &[9; 512]).unwrap();
        assert_eq!(img.flush_count(), 2);
        d.write_sectors_fua(3, &[9; 512], true).unwrap();
        assert_eq!(img.flush_count(), 3);
        // Out of range, read-only and multiple-mode-off cases.
        tf.command = cmd::WRITE_DMA_FUA_EXT;
        d.set_address(&mut tf, 63, true);
        assert_eq!(d.execute(&mut tf), Err(AtaError::IdNotFound));
        let mut sm = Taskfile { command: cmd::SET_MULTIPLE_MODE, count: 0, ..Default::default() };
        d.execute(&mut sm).unwrap();
        tf.command = cmd::WRITE_MULTIPLE_FUA_EXT;
        d.set_address(&mut tf, 0, true);
        assert_eq!(d.execute(&mut tf), Err(AtaError::Abort));
        let mut ro = AtaDisk::new(Arc::new(MemImage::new(vec![0; 4096], true)), DiskConfig::default());
        tf.command = cmd::WRITE_DMA_FUA_EXT;
        assert_eq!(ro.execute(&mut tf), Err(AtaError::Abort));
    }

    #[test]
    fn ncq_decode_and_identify() {
        let (mut d, _) = disk(100);
        let mut tf = Taskfile {
            command: cmd::READ_FPDMA_QUEUED,
            feature: 8,
            count: 5 << 3,
            lba_low: 10,
            device: 0x40,
            ..Default::default()
        };
        assert_eq!(d.decode_ncq(&tf), Err(AtaError::Abort), "no NCQ before enable_ncq");
        assert_eq!(word(&d.identify(), 76), 0);
        d.enable_ncq(32);
        let id = d.identify();
        assert_eq!((word(&id, 75), word(&id, 76) & 0x100), (31, 0x100));
        let n = d.decode_ncq(&tf).unwrap();
        assert_eq!((n.tag, n.xfer.lba, n.xfer.count, n.xfer.write, n.fua), (5, 10, 8, false, false));
        tf.command = cmd::WRITE_FPDMA_QUEUED;
        tf.device = 0xc0;
        assert!(d.decode_ncq(&tf).unwrap().fua);
        tf.lba_low = 93; // 93 + 8 > 100
        assert_eq!(d.decode_ncq(&tf), Err(AtaError::IdNotFound));
        tf.feature = 0; // 65536 sectors
        tf.lba_low = 0;
        assert_eq!(d.decode_ncq(&tf), Err(AtaError::IdNotFound));
        tf.command = cmd::READ_DMA_EXT;
        assert_eq!(d.decode_ncq(&tf), Err(AtaError::Abort));
    }

    #[test]
    fn misc_commands() {
        let (mut d, img) = disk(64);
        let mut tf = Taskfile { command: cmd::CHECK_POWER_MODE, ..Default::default() };
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        assert_eq!(tf.count, 0xff);
        for c in [cmd::NOP, cmd::DEVICE_RESET, cmd::PACKET, cmd::IDENTIFY_PACKET_DEVICE, 0xb0, 0xff] {
            tf.command = c;
            assert_eq!(d.execute(&mut tf), Err(AtaError::Abort), "command {c:#x}");
        }
        tf.command = cmd::FLUSH_CACHE_EXT;
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        assert_eq!(img.flush_count(), 1);
        tf.command = cmd::EXECUTE_DEVICE_DIAGNOSTIC;
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Diagnostic));
        tf.command = cmd::INITIALIZE_DEVICE_PARAMETERS;
        tf.count = 32;
        tf.device = 0xa3;
        assert_eq!(d.execute(&mut tf), Ok(AtaAction::Complete));
        let id = d.identify();
        assert_eq!((word(&id, 55), word(&id, 56)), (4, 32));
        // Write-through mode flushes each write.
        d.write_cache = false;
        d.write_sectors(1, &[1; 512]).unwrap();
        assert_eq!(img.flush_count(), 2);
    }
}
