//! The ATAPI CD/DVD-ROM command layer (SCSI primary + MMC subset), independent of the transport:
//! the IDE PACKET protocol and AHCI's ATAPI command slots both hand a 12-byte CDB to
//! [`AtapiDrive::execute`] and carry out the [`AtapiAction`] it returns.
//!
//! The drive holds an optional medium (2048-byte blocks, always read-only), the sense data of the
//! last failed command, the tray lock set by PREVENT ALLOW MEDIUM REMOVAL, a pending UNIT
//! ATTENTION after a medium was inserted and the media event GET EVENT STATUS NOTIFICATION
//! reports. Like a real drive:
//! - without a medium (or with the tray open) media commands fail NOT READY / MEDIUM NOT PRESENT
//!   (02/3A/00);
//! - after an insertion the first command that does not allow a unit attention (everything but
//!   INQUIRY, REQUEST SENSE, GET CONFIGURATION and GET EVENT STATUS NOTIFICATION) fails with
//!   UNIT ATTENTION / MEDIUM MAY HAVE CHANGED (06/28/00), once;
//! - bad fields get ILLEGAL REQUEST (05/24/00), blocks past the end LBA OUT OF RANGE (05/21/00),
//!   unknown opcodes INVALID COMMAND OPERATION CODE (05/20/00), host read errors MEDIUM ERROR /
//!   UNRECOVERED READ ERROR (03/11/00);
//! - replies are truncated to the CDB's allocation length (zero: no data phase at all).
//!
//! Media reads are not materialised: [`AtapiAction::Read`] names the blocks and the transport
//! pulls them with [`AtapiDrive::read_blocks`] in pieces of its choosing.

use std::sync::Arc;

use thiserror::Error;

use super::ata::{error as ata_error, SECTOR_SIZE};
use super::image::BlockBackend;
use crate::snapshot::{SectionReader, SectionWriter, SnapshotError};
use crate::warn_limited;

/// Logical block size of a CD/DVD data track.
pub const CD_BLOCK_SIZE: usize = 2048;
/// Size of a command packet (IDENTIFY PACKET DEVICE word 0 says 12 bytes).
pub const CDB_LEN: usize = 12;
/// Larger than this the drive reports a DVD profile (what QEMU does too: 74 min × 75 × 60).
const CD_MAX_BLOCKS: u64 = 333_000;

/// SCSI opcodes this layer decodes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const SEEK_10: u8 = 0x2b;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const READ_TRACK_INFORMATION: u8 = 0x52;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_12: u8 = 0xa8;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
    pub const READ_CD: u8 = 0xbe;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const NONE: Sense = Sense::new(key::NO_SENSE, 0, 0);
    pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(key::NOT_READY, 0x3a, 0);
    pub const MEDIUM_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x28, 0);
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0);
    pub const INVALID_FIELD: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0);
    pub const REMOVAL_PREVENTED: Sense = Sense::new(key::NOT_READY, 0x53, 0x02);
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }
}

/// What a command asks the transport to do.
#[derive(Debug, PartialEq, Eq)]
pub enum AtapiAction {
    /// Good status, no data.
    Complete,
    /// Device-to-host data (already truncated to the allocation length, never empty), then good
    /// status.
    DataIn(Vec<u8>),
    /// `blocks` (≥ 1, all on the medium) of 2048 bytes from `lba`, pulled with
    /// [`AtapiDrive::read_blocks`]; good status after the last one.
    Read { lba: u32, blocks: u32 },
    /// CHECK CONDITION: sense is set; the transport ends the command with ERR and
    /// [`AtapiDrive::error_register`].
    CheckCondition,
}

/// Media event reported (and consumed) by GET EVENT STATUS NOTIFICATION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MediaEvent {
    None = 0,
    EjectRequest = 1,
    NewMedia = 2,
    MediaRemoval = 3,
}

impl MediaEvent {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => MediaEvent::None,
            1 => MediaEvent::EjectRequest,
            2 => MediaEvent::NewMedia,
            3 => MediaEvent::MediaRemoval,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AtapiError {
    /// The guest locked the tray; QEMU's QMP text for it is built by the caller.
    #[error("the tray is locked by the guest")]
    Locked,
}

/// Identification strings of the drive.
#[derive(Debug, Clone)]
pub struct CdConfig {
    /// INQUIRY product (16 chars) and IDENTIFY model (40 chars).
    pub model: String,
    /// Up to 20 ASCII characters.
    pub serial: String,
    /// Up to 4 (INQUIRY revision) / 8 (IDENTIFY) characters.
    pub firmware: String,
}

impl Default for CdConfig {
    fn default() -> Self {
        CdConfig { model: "HVMDM DVD-ROM".into(), serial: "HV00000".into(), firmware: "1.0".into() }
    }
}

/// An ATAPI CD/DVD-ROM drive.
pub struct AtapiDrive {
    config: CdConfig,
    media: Option<Arc<dyn BlockBackend>>,
    /// Capacity of the medium in 2048-byte blocks (a partial tail block is not addressable).
    blocks: u64,
    sense: Sense,
    locked: bool,
    tray_open: bool,
    unit_attention: bool,
    event: MediaEvent,
    /// SET FEATURES transfer mode: 0 PIO, 0x20|n MWDMA n, 0x40|n UDMA n.
    xfer_mode: u8,
}

impl std::fmt::Debug for AtapiDrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtapiDrive")
            .field("blocks", &self.blocks)
            .field("sense", &self.sense)
            .field("locked", &self.locked)
            .field("tray_open", &self.tray_open)
            .field("unit_attention", &self.unit_attention)
            .finish()
    }
}

const DEFAULT_XFER_MODE: u8 = 0x45; // UDMA 5

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// LBA → minutes/seconds/frames (the 2-second pregap included), saturating at 255:59:74.
fn msf(lba: u64) -> [u8; 3] {
    let f = (lba + 150).min(255 * 60 * 75 + 59 * 75 + 74);
    [(f / (60 * 75)) as u8, (f / 75 % 60) as u8, (f % 75) as u8]
}

/// A TOC address field: MSF as 00 M S F, or a big-endian LBA.
fn toc_addr(lba: u64, use_msf: bool) -> [u8; 4] {
    if use_msf {
        let [m, s, f] = msf(lba);
        [0, m, s, f]
    } else {
        (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
    }
}

/// Copies `s` space-padded into `out` (ASCII only).
fn put_ascii(out: &mut [u8], s: &str) {
    out.fill(b' ');
    for (d, c) in out.iter_mut().zip(s.bytes().filter(|c| c.is_ascii_graphic() || *c == b' ')) {
        *d = c;
    }
}

impl AtapiDrive {
    /// A drive holding `media` (or empty), tray closed.
    pub fn new(media: Option<Arc<dyn BlockBackend>>, config: CdConfig) -> Self {
        let mut d = AtapiDrive {
            config,
            media: None,
            blocks: 0,
            sense: Sense::NONE,
            locked: false,
            tray_open: false,
            unit_attention: false,
            event: MediaEvent::None,
            xfer_mode: DEFAULT_XFER_MODE,
        };
        d.set_media(media);
        d
    }

    fn set_media(&mut self, media: Option<Arc<dyn BlockBackend>>) {
        self.blocks = media.as_ref().map_or(0, |m| m.len() / CD_BLOCK_SIZE as u64);
        self.media = media;
    }

    /// Power-on state: sense cleared, tray unlocked and closed, no event pending. The medium
    /// stays in the drive.
    pub fn reset(&mut self) {
        self.sense = Sense::NONE;
        self.locked = false;
        self.tray_open = false;
        self.unit_attention = false;
        self.event = MediaEvent::None;
        self.xfer_mode = DEFAULT_XFER_MODE;
    }

    /// A medium is in the drive and the tray is closed (media commands can work).
    pub fn has_media(&self) -> bool {
        self.media.is_some() && !self.tray_open
    }

    pub fn media(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.media.as_ref()
    }

    pub fn capacity_blocks(&self) -> u64 {
        self.blocks
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn is_tray_open(&self) -> bool {
        self.tray_open
    }

    pub fn sense(&self) -> Sense {
        self.sense
    }

    /// ATA error register for a failed command: sense key in bits 7:4, ABRT.
    pub fn error_register(&self) -> u8 {
        self.sense.key << 4 | ata_error::ABRT
    }

    /// Host side: a new medium, tray closed. The guest sees a UNIT ATTENTION and a new-media event.
    pub fn insert(&mut self, backend: Arc<dyn BlockBackend>) {
        self.set_media(Some(backend));
        self.tray_open = false;
        self.unit_attention = true;
        self.event = MediaEvent::NewMedia;
    }

    /// Host side: takes the medium out (tray left open). While the guest holds the lock this
    /// fails with [`AtapiError::Locked`] and the guest gets an eject-request event instead, unless
    /// `force` (which also drops the lock). Ejecting an empty drive succeeds.
    pub fn eject(&mut self, force: bool) -> Result<Option<Arc<dyn BlockBackend>>, AtapiError> {
        if self.locked && !force {
            self.event = MediaEvent::EjectRequest;
            return Err(AtapiError::Locked);
        }
        self.locked = false;
        let old = self.media.take();
        self.blocks = 0;
        self.tray_open = true;
        self.unit_attention = false;
        if old.is_some() {
            self.event = MediaEvent::MediaRemoval;
        }
        Ok(old)
    }

    /// SET FEATURES as a packet device takes it (transfer mode, the no-op settings).
    pub fn set_features(&mut self, feature: u8, count: u8) -> bool {
        match feature {
            0x03 => match count {
                0x00 | 0x01 | 0x08..=0x0c => self.xfer_mode = 0,
                0x20..=0x22 | 0x40..=0x45 => self.xfer_mode = count,
                _ => return false,
            },
            0x02 | 0x82 | 0x55 | 0xaa | 0x66 | 0xcc => {}
            _ => return false,
        }
        true
    }

    /// IDENTIFY PACKET DEVICE data (512 bytes, little-endian words, checksummed).
    pub fn identify_packet(&self) -> [u8; SECTOR_SIZE] {
        let mut id = [0u16; 256];
        // ATAPI, CD-ROM device type, removable, DRQ within 50 µs of PACKET (no interrupt before
        // the command packet), 12-byte packets.
        id[0] = (2 << 14) | (5 << 8) | (1 << 7) | (2 << 5);
        let mut put = |first: usize, words: usize, s: &str| {
            let mut b = vec![0u8; words * 2];
            put_ascii(&mut b, s);
            for i in 0..words {
                id[first + i] = u16::from(b[2 * i]) << 8 | u16::from(b[2 * i + 1]);
            }
        };
        put(10, 10, &self.config.serial);
        put(23, 4, &self.config.firmware);
        put(27, 20, &self.config.model);
        id[49] = (1 << 11) | (1 << 9) | (1 << 8); // IORDY, LBA, DMA
        id[53] = 0x7; // words 54-58, 64-70 and 88 valid
        id[62] = 0x7; // single-word DMA 0-2 (legacy word some BIOSes read)
        id[63] = 0x7; // MWDMA 0-2
        id[64] = 0x3; // PIO 3-4
        id[65] = 0xb4;
        id[66] = 0xb4;
        id[67] = 0x12c;
        id[68] = 0xb4;
        id[71] = 30; // PACKET to bus release, ns
        id[72] = 30; // SERVICE to BSY clear, ns
        id[80] = 0xf0; // ATA/ATAPI-4 .. -7
        id[82] = (1 << 14) | (1 << 9) | (1 << 4); // NOP, DEVICE RESET, PACKET feature set
        id[83] = 1 << 14;
        id[84] = 1 << 14;
        id[85] = (1 << 14) | (1 << 9) | (1 << 4);
        id[86] = 0;
        id[87] = 1 << 14;
        id[88] = 0x3f; // UDMA 0-5
        match self.xfer_mode {
            m @ 0x20..=0x22 => id[63] |= 0x100 << (m & 7),
            m @ 0x40..=0x45 => id[88] |= 0x100 << (m & 7),
            _ => {}
        }
        id[93] = (1 << 14) | (1 << 13) | 1; // device 0 via jumper, 80-wire cable detected
        id[255] = 0x00a5;
        let mut out = [0u8; SECTOR_SIZE];
        for (i, w) in id.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
        let sum = out[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        out[511] = sum.wrapping_neg();
        out
    }

    fn fail(&mut self, s: Sense) -> AtapiAction {
        self.sense = s;
        AtapiAction::CheckCondition
    }

    /// Reply data truncated to the allocation length (an empty reply is a plain completion).
    fn reply(&mut self, mut data: Vec<u8>, alloc: usize) -> AtapiAction {
        data.truncate(alloc);
        if data.is_empty() {
            AtapiAction::Complete
        } else {
            AtapiAction::DataIn(data)
        }
    }

    /// Decodes and performs one command. `cdb` is the packet as the guest sent it (shorter
    /// packets read as zero-padded).
    pub fn execute(&mut self, cdb: &[u8]) -> AtapiAction {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        let opcode = c[0];
        let allows_ua = matches!(
            opcode,
            op::INQUIRY | op::REQUEST_SENSE | op::GET_CONFIGURATION | op::GET_EVENT_STATUS_NOTIFICATION
        );
        if self.unit_attention && !allows_ua {
            self.unit_attention = false;
            return self.fail(Sense::MEDIUM_CHANGED);
        }
        let needs_media = matches!(
            opcode,
            op::TEST_UNIT_READY
                | op::READ_CAPACITY
                | op::READ_10
                | op::READ_12
                | op::READ_CD
                | op::SEEK_10
                | op::READ_TOC
                | op::READ_DISC_INFORMATION
                | op::READ_TRACK_INFORMATION
        );
        if needs_media && !self.has_media() {
            return self.fail(Sense::MEDIUM_NOT_PRESENT);
        }
        if opcode != op::REQUEST_SENSE {
            self.sense = Sense::NONE;
        }
        match opcode {
            op::TEST_UNIT_READY | op::SET_CD_SPEED => AtapiAction::Complete,
            op::REQUEST_SENSE => self.request_sense(&c),
            op::INQUIRY => self.inquiry(&c),
            op::READ_CAPACITY => {
                let last = self.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut r = last.to_be_bytes().to_vec();
                r.extend_from_slice(&(CD_BLOCK_SIZE as u32).to_be_bytes());
                AtapiAction::DataIn(r)
            }
            op::READ_10 => self.read(be32(&c[2..]), u32::from(be16(&c[7..]))),
            op::READ_12 => self.read(be32(&c[2..]), be32(&c[6..])),
            op::READ_CD => self.read_cd(&c),
            op::SEEK_10 => {
                if u64::from(be32(&c[2..])) >= self.blocks {
                    return self.fail(Sense::LBA_OUT_OF_RANGE);
                }
                AtapiAction::Complete
            }
            op::READ_TOC => self.read_toc(&c),
            op::GET_CONFIGURATION => self.get_configuration(&c),
            op::GET_EVENT_STATUS_NOTIFICATION => self.event_status(&c),
            op::MODE_SENSE_10 => self.mode_sense(&c),
            op::START_STOP_UNIT => self.start_stop(&c),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.locked = c[4] & 1 != 0;
                AtapiAction::Complete
            }
            op::READ_DISC_INFORMATION => self.disc_information(&c),
            op::READ_TRACK_INFORMATION => self.track_information(&c),
            op::MECHANISM_STATUS => {
                let mut r = vec![0u8; 8];
                if self.tray_open {
                    r[1] = 0x10; // door open
                }
                self.reply(r, usize::from(be16(&c[8..])))
            }
            other => {
                warn_limited!(format!("atapi-op-{other:02x}"), "atapi: unsupported command {other:#04x}");
                self.fail(Sense::INVALID_OPCODE)
            }
        }
    }

    fn request_sense(&mut self, c: &[u8]) -> AtapiAction {
        // A pending unit attention is reported (and consumed) by REQUEST SENSE.
        let s = if self.unit_attention {
            self.unit_attention = false;
            Sense::MEDIUM_CHANGED
        } else {
            self.sense
        };
        self.sense = Sense::NONE;
        let mut r = vec![0u8; 18];
        r[0] = 0x70; // current error, fixed format
        r[2] = s.key;
        r[7] = 10; // additional length
        r[12] = s.asc;
        r[13] = s.ascq;
        self.reply(r, usize::from(c[4]))
    }

    fn inquiry(&mut self, c: &[u8]) -> AtapiAction {
        if c[1] & 1 != 0 || c[2] != 0 {
            // No vital product data pages.
            return self.fail(Sense::INVALID_FIELD);
        }
        let mut r = vec![0u8; 36];
        r[0] = 0x05; // CD/DVD device
        r[1] = 0x80; // removable
        r[2] = 0x00; // no SCSI version claimed (ATAPI)
        r[3] = 0x21; // ATAPI transport, response data format 1
        r[4] = 31; // additional length
        put_ascii(&mut r[8..16], "HVMDM");
        put_ascii(&mut r[16..32], &self.config.model);
        put_ascii(&mut r[32..36], &self.config.firmware);
        self.reply(r, usize::from(be16(&c[3..])))
    }

    fn read(&mut self, lba: u32, blocks: u32) -> AtapiAction {
        if u64::from(lba) + u64::from(blocks) > self.blocks {
            return self.fail(Sense::LBA_OUT_OF_RANGE);
        }
        if blocks == 0 {
            return AtapiAction::Complete;
        }
        AtapiAction::Read { lba, blocks }
    }

    fn read_cd(&mut self, c: &[u8]) -> AtapiAction {
        let lba = be32(&c[2..]);
        let blocks = u32::from(c[6]) << 16 | u32::from(be16(&c[7..]));
        // Expected sector type any / mode 1 data, and only user data (or nothing) selected.
        if !matches!(c[1] >> 2 & 7, 0 | 2) {
            return self.fail(Sense::INVALID_FIELD);
        }
        match c[9] & 0xf8 {
            0x00 => {
                if u64::from(lba) + u64::from(blocks) > self.blocks {
                    return self.fail(Sense::LBA_OUT_OF_RANGE);
                }
                AtapiAction::Complete
            }
            0x10 => self.read(lba, blocks),
            _ => self.fail(Sense::INVALID_FIELD),
        }
    }

    /// READ TOC/PMA/ATIP: one data track on a single-session disc.
    fn read_toc(&mut self, c: &[u8]) -> AtapiAction {
        let use_msf = c[1] & 2 != 0;
        // Format in byte 2; old (SFF-8020) drivers put it in the top bits of byte 9.
        let format = match c[2] & 0xf {
            0 => c[9] >> 6,
            f => f,
        };
        let track = c[6];
        let alloc = usize::from(be16(&c[7..]));
        let leadout = self.blocks;
        let mut r = vec![0u8; 4];
        match format {
            0 => {
                if track > 1 && track != 0xaa {
                    return self.fail(Sense::INVALID_FIELD);
                }
                r[2] = 1; // first track
                r[3] = 1; // last track
                if track <= 1 {
                    r.extend_from_slice(&[0, 0x14, 1, 0]); // ADR 1, data track, track 1
                    r.extend_from_slice(&toc_addr(0, use_msf));
                }
                r.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                r.extend_from_slice(&toc_addr(leadout, use_msf));
            }
            1 => {
                // Multi-session information: the first track of the last session.
                r[2] = 1;
                r[3] = 1;
                r.extend_from_slice(&[0, 0x14, 1, 0]);
                r.extend_from_slice(&toc_addr(0, use_msf));
            }
            2 => {
                // Raw TOC: the A0 (first track), A1 (last track), A2 (lead-out) and track-1
                // descriptors of session 1, 11 bytes each.
                r[2] = 1;
                r[3] = 1;
                let mut desc = |point: u8, p: [u8; 3]| {
                    r.extend_from_slice(&[1, 0x14, 0, point, 0, 0, 0, 0, p[0], p[1], p[2]]);
                };
                desc(0xa0, [1, 0, 0]); // first track 1, disc type CD-ROM
                desc(0xa1, [1, 0, 0]); // last track 1
                let lo = if use_msf {
                    msf(leadout)
                } else {
                    let b = (leadout.min(0xff_ffff) as u32).to_be_bytes();
                    [b[1], b[2], b[3]]
                };
                desc(0xa2, lo);
                desc(1, if use_msf { msf(0) } else { [0, 0, 0] });
            }
            _ => return self.fail(Sense::INVALID_FIELD),
        }
        let len = (r.len() - 2) as u16;
        r[..2].copy_from_slice(&len.to_be_bytes());
        self.reply(r, alloc)
    }

    fn current_profile(&self) -> u16 {
        match (self.has_media(), self.blocks > CD_MAX_BLOCKS) {
            (false, _) => 0,
            (true, true) => 0x0010,  // DVD-ROM
            (true, false) => 0x0008, // CD-ROM
        }
    }

    fn get_configuration(&mut self, c: &[u8]) -> AtapiAction {
        let rt = c[1] & 3;
        let start = be16(&c[2..]);
        let alloc = usize::from(be16(&c[7..]));
        if rt == 3 {
            return self.fail(Sense::INVALID_FIELD);
        }
        let profile = self.current_profile();
        // (feature code, current, additional data)
        let cur = |p: u16| u8::from(profile == p);
        let features: [(u16, bool, Vec<u8>); 4] = [
            // Profile list: DVD-ROM and CD-ROM.
            (0x0000, true, vec![0x00, 0x10, cur(0x0010), 0, 0x00, 0x08, cur(0x0008), 0]),
            // Core: ATAPI physical interface.
            (0x0001, true, vec![0, 0, 0, 2, 0, 0, 0, 0]),
            // Morphing: asynchronous (GESN polling) supported.
            (0x0002, true, vec![0x02, 0, 0, 0]),
            // Removable medium: tray loading mechanism, eject, lock (with the lock state).
            (0x0003, true, vec![(1 << 5) | (1 << 3) | (u8::from(self.locked) << 1) | 1, 0, 0, 0]),
        ];
        let mut r = vec![0u8; 8];
        r[6..8].copy_from_slice(&profile.to_be_bytes());
        for (code, current, data) in features {
            let pick = match rt {
                0 => code >= start,
                1 => code >= start && current,
                _ => code == start,
            };
            if !pick {
                continue;
            }
            r.extend_from_slice(&code.to_be_bytes());
            // Version 0/1, persistent (profile list and core are always current), current.
            let version = if code == 0x0001 { 1 } else { 0 };
            r.push(version << 2 | if code <= 1 { 2 } else { 0 } | u8::from(current));
            r.push(data.len() as u8);
            r.extend_from_slice(&data);
        }
        let len = (r.len() - 4) as u32;
        r[..4].copy_from_slice(&len.to_be_bytes());
        self.reply(r, alloc)
    }

    fn event_status(&mut self, c: &[u8]) -> AtapiAction {
        if c[1] & 1 == 0 {
            // Asynchronous notification is not supported: only polled requests.
            return self.fail(Sense::INVALID_FIELD);
        }
        let alloc = usize::from(be16(&c[7..]));
        const MEDIA_CLASS: u8 = 1 << 4;
        let mut r = vec![0u8; 4];
        r[3] = MEDIA_CLASS; // supported classes
        if c[4] & MEDIA_CLASS != 0 {
            r[1] = 6;
            r[2] = 4; // notification class: media
            let ev = std::mem::replace(&mut self.event, MediaEvent::None);
            let status = u8::from(self.tray_open) | u8::from(self.has_media()) << 1;
            r.extend_from_slice(&[ev as u8, status, 0, 0]);
        } else {
            r[1] = 2;
            r[2] = 0x80; // no event available
        }
        self.reply(r, alloc)
    }

    fn mode_sense(&mut self, c: &[u8]) -> AtapiAction {
        let pc = c[2] >> 6;
        let page = c[2] & 0x3f;
        let alloc = usize::from(be16(&c[7..]));
        if pc == 3 {
            return self.fail(Sense::SAVING_NOT_SUPPORTED);
        }
        let changeable = pc == 1;
        let error_recovery = || {
            let mut p = vec![0x01, 6, 0, 5, 0, 0, 0, 0];
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let capabilities = || {
            let mut p = vec![0u8; 22];
            p[0] = 0x2a;
            p[1] = 20;
            p[2] = 0x3b; // reads CD-R, CD-RW, DVD-ROM, DVD-R, DVD-RAM
            p[4] = 0x71; // audio play, mode 2 form 1/2, multi-session
            p[5] = 3 << 5; // UPC, ISRC
            p[6] = (1 << 5) | (1 << 3) | (u8::from(self.locked) << 1) | 1; // tray, eject, lock
            p[8..10].copy_from_slice(&706u16.to_be_bytes()); // 4x, KB/s (obsolete field)
            p[10..12].copy_from_slice(&2u16.to_be_bytes()); // volume levels
            p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer KB
            p[14..16].copy_from_slice(&706u16.to_be_bytes());
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let mut r = vec![0u8; 8];
        r[2] = if self.has_media() { 0x01 } else { 0x70 }; // 120 mm data disc / no disc
        match page {
            0x01 => r.extend(error_recovery()),
            0x2a => r.extend(capabilities()),
            0x3f => {
                r.extend(error_recovery());
                r.extend(capabilities());
            }
            _ => return self.fail(Sense::INVALID_FIELD),
        }
        let len = (r.len() - 2) as u16;
        r[..2].copy_from_slice(&len.to_be_bytes());
        self.reply(r, alloc)
    }

    fn start_stop(&mut self, c: &[u8]) -> AtapiAction {
        let start = c[4] & 1 != 0;
        let loej = c[4] & 2 != 0;
        if !loej {
            // Spin up / down: nothing to do for an image.
            return AtapiAction::Complete;
        }
        if start {
            // Close the tray: a medium left in it is loaded again.
            if self.tray_open {
                self.tray_open = false;
                if self.media.is_some() {
                    self.event = MediaEvent::NewMedia;
                }
            }
        } else {
            if self.locked {
                return self.fail(Sense::REMOVAL_PREVENTED);
            }
            if !self.tray_open {
                self.tray_open = true;
                if self.media.is_some() {
                    self.event = MediaEvent::MediaRemoval;
                }
            }
        }
        AtapiAction::Complete
    }

    fn disc_information(&mut self, c: &[u8]) -> AtapiAction {
        if c[1] & 7 != 0 {
            // Only standard disc information (no track resources / POW).
            return self.fail(Sense::INVALID_FIELD);
        }
        let mut r = vec![0u8; 34];
        r[1] = 32;
        r[2] = 0x0e; // last session complete, disc complete (finalised)
        r[3] = 1; // first track
        r[4] = 1; // sessions
        r[5] = 1; // first track in last session
        r[6] = 1; // last track in last session
        r[7] = 0x20; // unrestricted use
        r[8] = 0x00; // CD-DA or CD-ROM disc
                     // Last possible lead-out start: none (FF/FF/FF), as for a pressed disc.
        r[20..24].copy_from_slice(&[0xff; 4]);
        r[16..20].copy_from_slice(&[0xff; 4]);
        self.reply(r, usize::from(be16(&c[7..])))
    }

    /// READ TRACK INFORMATION for our only track (track 1, session 1, a finalised data track
    /// spanning the medium; Linux asks for it when it opens the drive). Addressed by an LBA on the
    /// medium, track 1 or session 1; anything else (lead-in, the invisible track) is refused.
    fn track_information(&mut self, c: &[u8]) -> AtapiAction {
        let n = be32(&c[2..]);
        let ok = match c[1] & 3 {
            0 => u64::from(n) < self.blocks,
            1 | 2 => n == 1,
            _ => false,
        };
        if !ok {
            return self.fail(if c[1] & 3 == 0 { Sense::LBA_OUT_OF_RANGE } else { Sense::INVALID_FIELD });
        }
        let mut r = vec![0u8; 36];
        r[1] = 34;
        r[2] = 1; // track number (LSB)
        r[3] = 1; // session number (LSB)
        r[5] = 0x04; // track mode: data, recorded uninterrupted
        r[6] = 0x01; // data mode 1; not blank, not packet, not reserved
                     // r[7] = 0: no next writable / last recorded address (a pressed disc); start LBA 0.
        let size = self.blocks.min(u64::from(u32::MAX)) as u32;
        r[24..28].copy_from_slice(&size.to_be_bytes());
        self.reply(r, usize::from(be16(&c[7..])))
    }

    /// Reads `buf.len() / 2048` blocks at `lba` for a [`AtapiAction::Read`]. On failure the
    /// command must end in CHECK CONDITION: sense is set (LBA OUT OF RANGE if the medium went
    /// away or is shorter than asked, MEDIUM ERROR on a host read error).
    pub fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), Sense> {
        let r = self.reader().read_blocks(lba, buf);
        if let Err(s) = r {
            self.sense = s;
        }
        r
    }

    /// A detached handle on the current medium for an I/O worker; the transport reports a
    /// failure back with [`AtapiDrive::set_sense`].
    pub fn reader(&self) -> CdReader {
        CdReader { media: if self.tray_open { None } else { self.media.clone() }, blocks: self.blocks }
    }

    /// Records the sense of a failed [`CdReader::read_blocks`] (before CHECK CONDITION).
    pub fn set_sense(&mut self, s: Sense) {
        self.sense = s;
    }

    // ---- save/restore (inside the transport's section) ----

    /// Guest-visible state: sense, lock, tray, unit attention, pending event, transfer mode and
    /// the medium's presence and size (the medium itself is configuration).
    pub fn save_state(&self, w: &mut SectionWriter) {
        w.put_raw(&[self.sense.key, self.sense.asc, self.sense.ascq]);
        w.put_bool(self.locked);
        w.put_bool(self.tray_open);
        w.put_bool(self.unit_attention);
        w.put_u8(self.event as u8);
        w.put_u8(self.xfer_mode);
        w.put_bool(self.media.is_some());
        w.put_u64(self.blocks);
    }

    pub fn decode_state(&self, r: &mut SectionReader<'_>) -> Result<AtapiState, SnapshotError> {
        let [k, asc, ascq] = r.get_array::<3>()?;
        let locked = r.get_bool()?;
        let tray_open = r.get_bool()?;
        let unit_attention = r.get_bool()?;
        let ev = r.get_u8()?;
        let event = MediaEvent::from_u8(ev).ok_or_else(|| r.bad(format!("ATAPI media event {ev}")))?;
        let xfer_mode = r.get_u8()?;
        if !matches!(xfer_mode, 0 | 0x20..=0x22 | 0x40..=0x45) || k > 0xf {
            return Err(r.bad(format!("ATAPI transfer mode {xfer_mode:#x} / sense key {k:#x}")));
        }
        let had_media = r.get_bool()?;
        let blocks = r.get_u64()?;
        Ok(AtapiState {
            sense: Sense::new(k, asc, ascq),
            locked,
            tray_open,
            unit_attention,
            event,
            xfer_mode,
            had_media,
            blocks,
        })
    }

    /// Applies decoded state. If the medium attached now is not the one saved (present vs.
    /// absent, or another size), the guest is told about a media change instead of failing the
    /// restore: the configuration decides what is in the drive.
    pub fn apply_state(&mut self, st: &AtapiState) {
        self.sense = st.sense;
        self.locked = st.locked;
        self.tray_open = st.tray_open;
        self.unit_attention = st.unit_attention;
        self.event = st.event;
        self.xfer_mode = st.xfer_mode;
        let same = st.had_media == self.media.is_some() && (!st.had_media || st.blocks == self.blocks);
        if !same {
            log::info!("atapi: medium differs from the saved one; reporting a media change");
            if self.media.is_some() {
                self.tray_open = false;
                self.unit_attention = true;
                self.event = MediaEvent::NewMedia;
            } else {
                self.event = MediaEvent::MediaRemoval;
            }
        }
    }
}

/// Decoded [`AtapiDrive`] state (see [`AtapiDrive::save_state`]).
#[derive(Debug, Clone, Copy)]
pub struct AtapiState {
    sense: Sense,
    locked: bool,
    tray_open: bool,
    unit_attention: bool,
    event: MediaEvent,
    xfer_mode: u8,
    had_media: bool,
    blocks: u64,
}

/// Medium reads of one command, detached from the [`AtapiDrive`] (`Send`, cheap to clone).
#[derive(Clone)]
pub struct CdReader {
    media: Option<Arc<dyn BlockBackend>>,
    blocks: u64,
}

impl std::fmt::Debug for CdReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdReader")
            .field("media", &self.media.is_some())
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl CdReader {
    /// [`AtapiDrive::read_blocks`] without recording the sense.
    pub fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), Sense> {
        let n = (buf.len() / CD_BLOCK_SIZE) as u64;
        let Some(m) = &self.media else { return Err(Sense::MEDIUM_NOT_PRESENT) };
        if lba.checked_add(n).is_none_or(|e| e > self.blocks) {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        m.read_at(lba * CD_BLOCK_SIZE as u64, &mut buf[..(n as usize) * CD_BLOCK_SIZE]).map_err(|e| {
            warn_limited!("atapi-read-err", "atapi: image read at block {lba} failed: {e}");
            Sense::READ_ERROR
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::{BlockError, MemImage};
    use super::*;

    fn image(blocks: usize) -> Arc<dyn BlockBackend> {
        let bytes: Vec<u8> = (0..blocks * CD_BLOCK_SIZE).map(|i| (i / CD_BLOCK_SIZE * 3 + i) as u8).collect();
        Arc::new(MemImage::new(bytes, true))
    }

    fn drive(blocks: usize) -> AtapiDrive {
        AtapiDrive::new(Some(image(blocks)), CdConfig::default())
    }

    fn cdb(bytes: &[u8]) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn data(a: AtapiAction) -> Vec<u8> {
        match a {
            AtapiAction::DataIn(d) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    /// Runs `c`, expecting CHECK CONDITION with `s`, and checks REQUEST SENSE reports it.
    fn expect_sense(d: &mut AtapiDrive, c: &[u8], s: Sense) {
        assert_eq!(d.execute(c), AtapiAction::CheckCondition, "{c:02x?}");
        assert_eq!(d.sense(), s);
        assert_eq!(d.error_register(), s.key << 4 | 4);
        let r = data(d.execute(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 18])));
        assert_eq!((r[0], r[2], r[7], r[12], r[13]), (0x70, s.key, 10, s.asc, s.ascq));
        // Reported once.
        let r = data(d.execute(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 18])));
        assert_eq!(r[2], 0);
    }

    const TUR: [u8; 12] = [0; 12];

    #[test]
    fn test_unit_ready_media_states() {
        let mut d = drive(10);
        assert_eq!(d.execute(&TUR), AtapiAction::Complete);
        let mut e = AtapiDrive::new(None, CdConfig::default());
        assert!(!e.has_media());
        expect_sense(&mut e, &TUR, Sense::MEDIUM_NOT_PRESENT);
        assert_eq!(Sense::MEDIUM_NOT_PRESENT, Sense::new(2, 0x3a, 0));
    }

    #[test]
    fn unit_attention_once_after_insert() {
        let mut d = AtapiDrive::new(None, CdConfig::default());
        d.insert(image(4));
        // INQUIRY and GET EVENT STATUS pass through a pending unit attention.
        let inq = cdb(&[op::INQUIRY, 0, 0, 0, 36]);
        assert_eq!(data(d.execute(&inq)).len(), 36);
        expect_sense(&mut d, &TUR, Sense::MEDIUM_CHANGED);
        assert_eq!(d.execute(&TUR), AtapiAction::Complete);
        // REQUEST SENSE consumes it too.
        d.insert(image(4));
        let r = data(d.execute(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 252])));
        assert_eq!(r.len(), 18);
        assert_eq!((r[2], r[12], r[13]), (6, 0x28, 0));
        assert_eq!(d.execute(&TUR), AtapiAction::Complete);
    }

    #[test]
    fn inquiry_and_truncation() {
        let mut d = drive(1);
        let r = data(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 96])));
        assert_eq!(r.len(), 36);
        assert_eq!(&r[..5], &[5, 0x80, 0, 0x21, 31]);
        assert_eq!(&r[8..16], b"HVMDM   ");
        assert_eq!(&r[16..32], b"HVMDM DVD-ROM   ");
        assert_eq!(data(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 5]))), r[..5]);
        assert_eq!(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 0])), AtapiAction::Complete);
        // Allocation length 0xffff (absurd): still 36 bytes.
        assert_eq!(data(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0xff, 0xff]))).len(), 36);
        expect_sense(&mut d, &cdb(&[op::INQUIRY, 1, 0x80, 0, 36]), Sense::INVALID_FIELD);
    }

    #[test]
    fn read_capacity_and_reads() {
        let mut d = drive(100);
        let r = data(d.execute(&cdb(&[op::READ_CAPACITY])));
        assert_eq!(r, [0, 0, 0, 99, 0, 0, 8, 0]);
        assert_eq!(
            d.execute(&cdb(&[op::READ_10, 0, 0, 0, 0, 98, 0, 0, 2])),
            AtapiAction::Read { lba: 98, blocks: 2 }
        );
        assert_eq!(
            d.execute(&cdb(&[op::READ_12, 0, 0, 0, 0, 1, 0, 0, 0, 3])),
            AtapiAction::Read { lba: 1, blocks: 3 }
        );
        // Zero length: nothing to move; at the end of the disc also fine.
        assert_eq!(d.execute(&cdb(&[op::READ_10, 0, 0, 0, 0, 100, 0, 0, 0])), AtapiAction::Complete);
        expect_sense(&mut d, &cdb(&[op::READ_10, 0, 0, 0, 0, 99, 0, 0, 2]), Sense::LBA_OUT_OF_RANGE);
        expect_sense(
            &mut d,
            &cdb(&[op::READ_12, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Sense::LBA_OUT_OF_RANGE,
        );
        let mut buf = vec![0u8; 2 * CD_BLOCK_SIZE];
        d.read_blocks(98, &mut buf).unwrap();
        assert_eq!(buf[0], (98 * 3 + 98 * CD_BLOCK_SIZE) as u8);
        assert_eq!(d.read_blocks(99, &mut buf), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(d.read_blocks(u64::MAX, &mut buf), Err(Sense::LBA_OUT_OF_RANGE));
        // READ CD, user data only.
        assert_eq!(
            d.execute(&cdb(&[op::READ_CD, 0, 0, 0, 0, 5, 0, 0, 1, 0x10])),
            AtapiAction::Read { lba: 5, blocks: 1 }
        );
        expect_sense(&mut d, &cdb(&[op::READ_CD, 0, 0, 0, 0, 5, 0, 0, 1, 0xf8]), Sense::INVALID_FIELD);
    }

    struct Broken;
    impl BlockBackend for Broken {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            Err(BlockError::Io { offset, len: buf.len(), source: std::io::Error::from_raw_os_error(5) })
        }
        fn write_at(&self, _: u64, _: &[u8]) -> Result<(), BlockError> {
            Err(BlockError::ReadOnly)
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn len(&self) -> u64 {
            8 * CD_BLOCK_SIZE as u64
        }
        fn is_read_only(&self) -> bool {
            true
        }
    }

    #[test]
    fn host_read_error_is_medium_error() {
        let mut d = AtapiDrive::new(Some(Arc::new(Broken)), CdConfig::default());
        let mut buf = vec![0u8; CD_BLOCK_SIZE];
        assert_eq!(d.read_blocks(0, &mut buf), Err(Sense::new(3, 0x11, 0)));
        assert_eq!(d.error_register(), 0x34);
    }

    #[test]
    fn toc_formats() {
        // 1000 blocks: lead-out LBA 1000 = MSF 00:15:25 (1150 frames).
        let mut d = drive(1000);
        let r = data(d.execute(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100])));
        assert_eq!(r, [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 0x03, 0xe8]);
        let r = data(d.execute(&cdb(&[op::READ_TOC, 2, 0, 0, 0, 0, 0, 0, 100])));
        assert_eq!(&r[8..12], &[0, 0, 2, 0]);
        assert_eq!(&r[16..20], &[0, 0, 15, 25]);
        // Lead-out only.
        let r = data(d.execute(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0xaa, 0, 100])));
        assert_eq!(r, [0, 10, 1, 1, 0, 0x14, 0xaa, 0, 0, 0, 0x03, 0xe8]);
        expect_sense(&mut d, &cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 2, 0, 100]), Sense::INVALID_FIELD);
        // Truncated to 4 bytes (header only), length field still the full one.
        assert_eq!(data(d.execute(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 4]))), [0, 18, 1, 1]);
        // Session info.
        let r = data(d.execute(&cdb(&[op::READ_TOC, 0, 1, 0, 0, 0, 0, 0, 12])));
        assert_eq!(r, [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
        // Old-style format in byte 9.
        assert_eq!(data(d.execute(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0x40]))), r);
        // Raw TOC, MSF.
        let r = data(d.execute(&cdb(&[op::READ_TOC, 2, 2, 0, 0, 0, 0, 0xff, 0xff])));
        assert_eq!(r.len(), 4 + 44);
        assert_eq!(&r[..4], &[0, 46, 1, 1]);
        assert_eq!(&r[4..15], &[1, 0x14, 0, 0xa0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&r[26..37], &[1, 0x14, 0, 0xa2, 0, 0, 0, 0, 0, 15, 25]);
        assert_eq!(&r[37..48], &[1, 0x14, 0, 1, 0, 0, 0, 0, 0, 2, 0]);
        expect_sense(&mut d, &cdb(&[op::READ_TOC, 0, 5, 0, 0, 0, 0, 0, 12]), Sense::INVALID_FIELD);
        let mut e = AtapiDrive::new(None, CdConfig::default());
        expect_sense(&mut e, &cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12]), Sense::MEDIUM_NOT_PRESENT);
    }

    #[test]
    fn get_configuration_profiles() {
        let mut d = drive(1000);
        let r = data(d.execute(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0xff, 0xff])));
        assert_eq!(be32(&r) as usize, r.len() - 4);
        assert_eq!(&r[6..8], &[0, 8]); // CD-ROM current
        assert_eq!(&r[8..12], &[0, 0, 3, 8]);
        assert_eq!(&r[12..20], &[0, 0x10, 0, 0, 0, 0x08, 1, 0]);
        // rt=2: only the requested feature (removable medium).
        let r = data(d.execute(&cdb(&[op::GET_CONFIGURATION, 2, 0, 3, 0, 0, 0, 0, 0xff])));
        assert_eq!(&r[8..12], &[0, 3, 1, 4]);
        assert_eq!(r.len(), 16);
        // Big disc: DVD; empty drive: no current profile.
        let mut dvd = drive(CD_MAX_BLOCKS as usize + 1);
        let r = data(dvd.execute(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8])));
        assert_eq!(&r[6..8], &[0, 0x10]);
        let mut e = AtapiDrive::new(None, CdConfig::default());
        let r = data(e.execute(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8])));
        assert_eq!(&r[6..8], &[0, 0]);
        expect_sense(&mut e, &cdb(&[op::GET_CONFIGURATION, 3]), Sense::INVALID_FIELD);
    }

    #[test]
    fn event_status_media_events() {
        let gesn = cdb(&[op::GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8]);
        let mut d = AtapiDrive::new(None, CdConfig::default());
        assert_eq!(data(d.execute(&gesn)), [0, 6, 4, 0x10, 0, 0, 0, 0]);
        d.insert(image(4));
        assert_eq!(data(d.execute(&gesn)), [0, 6, 4, 0x10, 2, 2, 0, 0]);
        assert_eq!(data(d.execute(&gesn)), [0, 6, 4, 0x10, 0, 2, 0, 0]);
        // Locked: the host eject is refused and the guest is asked to eject.
        d.execute(&TUR);
        assert_eq!(d.execute(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1])), AtapiAction::Complete);
        assert!(matches!(d.eject(false), Err(AtapiError::Locked)));
        assert!(d.has_media());
        assert_eq!(data(d.execute(&gesn)), [0, 6, 4, 0x10, 1, 2, 0, 0]);
        assert!(d.eject(true).unwrap().is_some());
        assert!(!d.is_locked());
        assert_eq!(data(d.execute(&gesn)), [0, 6, 4, 0x10, 3, 1, 0, 0]);
        // Other classes: no event available.
        let r = data(d.execute(&cdb(&[op::GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x04, 0, 0, 0, 8])));
        assert_eq!(r, [0, 2, 0x80, 0x10]);
        expect_sense(
            &mut d,
            &cdb(&[op::GET_EVENT_STATUS_NOTIFICATION, 0, 0, 0, 0x10, 0, 0, 0, 8]),
            Sense::INVALID_FIELD,
        );
    }

    #[test]
    fn mode_sense_pages() {
        let mut d = drive(10);
        let r = data(d.execute(&cdb(&[op::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 0xff])));
        assert_eq!(r.len(), 30);
        assert_eq!(be16(&r) as usize, 28);
        assert_eq!(&r[8..10], &[0x2a, 20]);
        assert_eq!(r[14] & 2, 0);
        d.execute(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1]));
        let r = data(d.execute(&cdb(&[op::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 0xff])));
        assert_eq!(r[14] & 2, 2);
        let r = data(d.execute(&cdb(&[op::MODE_SENSE_10, 0, 0x01, 0, 0, 0, 0, 0, 0xff])));
        assert_eq!(r, [0, 14, 1, 0, 0, 0, 0, 0, 1, 6, 0, 5, 0, 0, 0, 0]);
        let r = data(d.execute(&cdb(&[op::MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 0, 0xff])));
        assert_eq!(r.len(), 8 + 8 + 22);
        assert_eq!(data(d.execute(&cdb(&[op::MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 0, 2]))), [0, 36]);
        expect_sense(&mut d, &cdb(&[op::MODE_SENSE_10, 0, 0x05, 0, 0, 0, 0, 0, 0xff]), Sense::INVALID_FIELD);
        expect_sense(
            &mut d,
            &cdb(&[op::MODE_SENSE_10, 0, 0xea, 0, 0, 0, 0, 0, 0xff]),
            Sense::SAVING_NOT_SUPPORTED,
        );
    }

    #[test]
    fn start_stop_respects_lock() {
        let mut d = drive(10);
        let eject = cdb(&[op::START_STOP_UNIT, 0, 0, 0, 2]);
        let load = cdb(&[op::START_STOP_UNIT, 0, 0, 0, 3]);
        d.execute(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1]));
        expect_sense(&mut d, &eject, Sense::REMOVAL_PREVENTED);
        assert!(d.has_media());
        d.execute(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0]));
        assert_eq!(d.execute(&eject), AtapiAction::Complete);
        assert!(d.is_tray_open() && !d.has_media());
        expect_sense(&mut d, &TUR, Sense::MEDIUM_NOT_PRESENT);
        let r = data(d.execute(&cdb(&[op::MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8])));
        assert_eq!(r[1], 0x10);
        assert_eq!(d.execute(&load), AtapiAction::Complete);
        assert_eq!(d.execute(&TUR), AtapiAction::Complete);
        // Spin up/down only.
        assert_eq!(d.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 0])), AtapiAction::Complete);
        assert!(d.has_media());
    }

    #[test]
    fn disc_info_speed_mechanism_and_unknown() {
        let mut d = drive(10);
        let r = data(d.execute(&cdb(&[op::READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34])));
        assert_eq!(&r[..9], &[0, 32, 0x0e, 1, 1, 1, 1, 0x20, 0]);
        expect_sense(
            &mut d,
            &cdb(&[op::READ_DISC_INFORMATION, 1, 0, 0, 0, 0, 0, 0, 34]),
            Sense::INVALID_FIELD,
        );
        assert_eq!(d.execute(&cdb(&[op::SET_CD_SPEED, 0, 0xff, 0xff])), AtapiAction::Complete);
        assert_eq!(data(d.execute(&cdb(&[op::MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8]))), [0; 8]);
        // READ TRACK INFORMATION: by track 1, by session 1 and by an LBA inside the medium.
        for (kind, n) in [(1u8, 1u8), (2, 1), (0, 9)] {
            let r = data(d.execute(&cdb(&[op::READ_TRACK_INFORMATION, kind, 0, 0, 0, n, 0, 0, 36])));
            assert_eq!(&r[..8], &[0, 34, 1, 1, 0, 4, 1, 0]);
            assert_eq!(&r[24..28], &10u32.to_be_bytes(), "track size = medium blocks");
        }
        let r = data(d.execute(&cdb(&[op::READ_TRACK_INFORMATION, 1, 0, 0, 0, 1, 0, 0, 8])));
        assert_eq!(r.len(), 8, "allocation length honoured");
        expect_sense(
            &mut d,
            &cdb(&[op::READ_TRACK_INFORMATION, 0, 0, 0, 0, 10, 0, 0, 36]),
            Sense::LBA_OUT_OF_RANGE,
        );
        for (kind, n) in [(1u8, 0u8), (1, 0xff), (2, 2), (3, 1)] {
            expect_sense(
                &mut d,
                &cdb(&[op::READ_TRACK_INFORMATION, kind, 0, 0, 0, n, 0, 0, 36]),
                Sense::INVALID_FIELD,
            );
        }
        expect_sense(&mut d, &cdb(&[0xff]), Sense::INVALID_OPCODE);
        expect_sense(&mut d, &cdb(&[0x0a]), Sense::INVALID_OPCODE); // WRITE(6)
                                                                    // Short packets read as zero-padded; an empty one is TEST UNIT READY.
        assert_eq!(d.execute(&[]), AtapiAction::Complete);
        let mut e = AtapiDrive::new(None, CdConfig::default());
        expect_sense(
            &mut e,
            &cdb(&[op::READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34]),
            Sense::MEDIUM_NOT_PRESENT,
        );
    }

    #[test]
    fn identify_packet_device_words() {
        let mut d = drive(1);
        let id = d.identify_packet();
        let w = |i: usize| u16::from_le_bytes([id[2 * i], id[2 * i + 1]]);
        assert_eq!(w(0), 0x85c0);
        assert_eq!(id.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(w(49) & 0x300, 0x300);
        assert_eq!(w(88), 0x203f);
        assert!(d.set_features(0x03, 0x22));
        assert!(!d.set_features(0x03, 0x47));
        assert!(!d.set_features(0x99, 0));
        let id = d.identify_packet();
        assert_eq!(u16::from_le_bytes([id[126], id[127]]), 0x407);
        d.reset();
        assert_eq!(d.identify_packet()[177], 0x20);
    }

    #[test]
    fn state_roundtrip_and_media_mismatch() {
        let mut d = drive(10);
        d.execute(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1]));
        d.execute(&cdb(&[op::READ_10, 0, 0, 0, 1, 0, 0, 0, 1]));
        d.insert(image(10));
        let mut w = SectionWriter::new();
        d.save_state(&mut w);
        let mut e = drive(10);
        let mut r = SectionReader::new("t", w.as_bytes());
        let st = e.decode_state(&mut r).unwrap();
        r.finish().unwrap();
        e.apply_state(&st);
        assert!(e.is_locked());
        assert_eq!(e.sense(), Sense::LBA_OUT_OF_RANGE);
        expect_sense(&mut e, &TUR, Sense::MEDIUM_CHANGED);
        // Restored with no medium attached: the guest sees it gone, not a failed restore.
        let mut f = AtapiDrive::new(None, CdConfig::default());
        f.apply_state(&st);
        expect_sense(&mut f, &TUR, Sense::MEDIUM_CHANGED);
        expect_sense(&mut f, &TUR, Sense::MEDIUM_NOT_PRESENT);
        // Bad event code.
        let mut bad = w.as_bytes().to_vec();
        bad[6] = 9;
        assert!(e.decode_state(&mut SectionReader::new("t", &bad)).is_err());
    }

    #[test]
    fn arbitrary_cdbs_never_panic() {
        let mut d = drive(3);
        let mut x: u32 = 12345;
        for _ in 0..20000 {
            let mut c = [0u8; 12];
            for b in &mut c {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (x >> 16) as u8;
            }
            c[0] = [
                0x00, 0x03, 0x12, 0x1b, 0x1e, 0x25, 0x28, 0x43, 0x46, 0x4a, 0x51, 0x52, 0x5a, 0xa8, 0xbb,
                0xbd, 0xbe, c[0],
            ][(x % 18) as usize];
            if let AtapiAction::Read { lba, blocks } = d.execute(&c) {
                assert!(u64::from(lba) + u64::from(blocks) <= 3);
            }
        }
    }
}
