//! QEMU's ACPI linker/loader script (`etc/table-loader`): 128-byte little-endian commands that
//! SeaBIOS and OVMF replay to place fw_cfg blobs in guest memory, relocate pointers between them,
//! fix checksums and report addresses back to the device model.
//!
//! Layout of one command (offsets inside the 128-byte entry):
//! - ALLOCATE (1): `file[56]` @4, `u32 align` @60, `u8 zone` @64
//! - ADD_POINTER (2): `dest[56]` @4, `src[56]` @60, `u32 offset` @116, `u8 size` @120
//! - ADD_CHECKSUM (3): `file[56]` @4, `u32 result_offset` @60, `u32 start` @64, `u32 length` @68
//! - WRITE_POINTER (4): `dest[56]` @4, `src[56]` @60, `u32 dst_offset` @116, `u32 src_offset` @120,
//!   `u8 size` @124

use thiserror::Error;

/// Size of one loader command.
pub const LOADER_CMD_SIZE: usize = 128;
/// Size of a file-name field, including the mandatory NUL terminator.
pub const LOADER_FILESZ: usize = 56;

pub const CMD_ALLOCATE: u32 = 1;
pub const CMD_ADD_POINTER: u32 = 2;
pub const CMD_ADD_CHECKSUM: u32 = 3;
pub const CMD_WRITE_POINTER: u32 = 4;

/// Where the firmware places an allocated blob. OVMF ignores the zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AllocZone {
    /// Anywhere in RAM (SeaBIOS: high memory below 4 GiB).
    High = 1,
    /// The 0xF0000 segment (needed for the RSDP so SeaBIOS's scan finds it).
    FSeg = 2,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkerError {
    #[error("loader file name {0:?} is empty or longer than 55 bytes")]
    BadName(String),
    #[error("alignment {0:#x} is not a power of two")]
    BadAlign(u32),
    #[error("file {0:?} is allocated twice")]
    DuplicateAllocate(String),
    #[error("file {0:?} is used before it is allocated")]
    NotAllocated(String),
    #[error("pointer size {0} is not 1, 2, 4 or 8")]
    BadPointerSize(u8),
    #[error("checksum result offset {result:#x} is outside [{start:#x}, {start:#x}+{len:#x})")]
    BadChecksumRange { result: u32, start: u32, len: u32 },
}

/// A file-name field exactly as stored in a command (56 bytes). Kept raw so the verifier can
/// reject a missing terminator the way the firmwares do.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RawName(pub [u8; LOADER_FILESZ]);

impl RawName {
    fn new(name: &str) -> Result<Self, LinkerError> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= LOADER_FILESZ || b.contains(&0) {
            return Err(LinkerError::BadName(name.to_string()));
        }
        let mut raw = [0u8; LOADER_FILESZ];
        raw[..b.len()].copy_from_slice(b);
        Ok(RawName(raw))
    }

    /// The name if the field is NUL-terminated within 56 bytes (byte 55 == 0) and UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        if self.0[LOADER_FILESZ - 1] != 0 {
            return None;
        }
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(LOADER_FILESZ);
        std::str::from_utf8(&self.0[..end]).ok()
    }

    /// Lossy text for messages, even for a malformed field.
    pub fn display(&self) -> String {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(LOADER_FILESZ);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

impl std::fmt::Debug for RawName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

/// One decoded loader command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoaderCommand {
    Allocate {
        file: RawName,
        align: u32,
        zone: u8,
    },
    AddPointer {
        dest: RawName,
        src: RawName,
        offset: u32,
        size: u8,
    },
    AddChecksum {
        file: RawName,
        result_offset: u32,
        start: u32,
        length: u32,
    },
    WritePointer {
        dest: RawName,
        src: RawName,
        dst_offset: u32,
        src_offset: u32,
        size: u8,
    },
    /// Any other command value, including the all-zero padding entries; both firmwares skip these.
    Unknown(u32),
}

fn rd32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn rdname(b: &[u8], off: usize) -> RawName {
    let mut raw = [0u8; LOADER_FILESZ];
    raw.copy_from_slice(&b[off..off + LOADER_FILESZ]);
    RawName(raw)
}

impl LoaderCommand {
    /// Decodes one 128-byte entry.
    pub fn decode(e: &[u8; LOADER_CMD_SIZE]) -> Self {
        match rd32(e, 0) {
            CMD_ALLOCATE => LoaderCommand::Allocate { file: rdname(e, 4), align: rd32(e, 60), zone: e[64] },
            CMD_ADD_POINTER => LoaderCommand::AddPointer {
                dest: rdname(e, 4),
                src: rdname(e, 60),
                offset: rd32(e, 116),
                size: e[120],
            },
            CMD_ADD_CHECKSUM => LoaderCommand::AddChecksum {
                file: rdname(e, 4),
                result_offset: rd32(e, 60),
                start: rd32(e, 64),
                length: rd32(e, 68),
            },
            CMD_WRITE_POINTER => LoaderCommand::WritePointer {
                dest: rdname(e, 4),
                src: rdname(e, 60),
                dst_offset: rd32(e, 116),
                src_offset: rd32(e, 120),
                size: e[124],
            },
            other => LoaderCommand::Unknown(other),
        }
    }

    /// Encodes into one 128-byte entry.
    pub fn encode(&self) -> [u8; LOADER_CMD_SIZE] {
        let mut e = [0u8; LOADER_CMD_SIZE];
        let put32 = |e: &mut [u8; LOADER_CMD_SIZE], off: usize, v: u32| {
            e[off..off + 4].copy_from_slice(&v.to_le_bytes());
        };
        match self {
            LoaderCommand::Allocate { file, align, zone } => {
                put32(&mut e, 0, CMD_ALLOCATE);
                e[4..60].copy_from_slice(&file.0);
                put32(&mut e, 60, *align);
                e[64] = *zone;
            }
            LoaderCommand::AddPointer { dest, src, offset, size } => {
                put32(&mut e, 0, CMD_ADD_POINTER);
                e[4..60].copy_from_slice(&dest.0);
                e[60..116].copy_from_slice(&src.0);
                put32(&mut e, 116, *offset);
                e[120] = *size;
            }
            LoaderCommand::AddChecksum { file, result_offset, start, length } => {
                put32(&mut e, 0, CMD_ADD_CHECKSUM);
                e[4..60].copy_from_slice(&file.0);
                put32(&mut e, 60, *result_offset);
                put32(&mut e, 64, *start);
                put32(&mut e, 68, *length);
            }
            LoaderCommand::WritePointer { dest, src, dst_offset, src_offset, size } => {
                put32(&mut e, 0, CMD_WRITE_POINTER);
                e[4..60].copy_from_slice(&dest.0);
                e[60..116].copy_from_slice(&src.0);
                put32(&mut e, 116, *dst_offset);
                put32(&mut e, 120, *src_offset);
                e[124] = *size;
            }
            LoaderCommand::Unknown(v) => put32(&mut e, 0, *v),
        }
        e
    }
}

/// Decodes a whole script; a trailing partial entry is ignored (callers check `len % 128`).
pub fn decode_script(script: &[u8]) -> Vec<LoaderCommand> {
    script
        .chunks_exact(LOADER_CMD_SIZE)
        .map(|c| {
            let mut e = [0u8; LOADER_CMD_SIZE];
            e.copy_from_slice(c);
            LoaderCommand::decode(&e)
        })
        .collect()
}

/// Builds a loader script. ALLOCATE commands are emitted before all others (as QEMU does), so
/// every file is allocated before any command uses it.
#[derive(Debug, Default, Clone)]
pub struct Linker {
    allocs: Vec<LoaderCommand>,
    cmds: Vec<LoaderCommand>,
    allocated: Vec<String>,
}

impl Linker {
    pub fn new() -> Self {
        Self::default()
    }

    fn check_allocated(&self, name: &str) -> Result<(), LinkerError> {
        if self.allocated.iter().any(|a| a == name) {
            Ok(())
        } else {
            Err(LinkerError::NotAllocated(name.to_string()))
        }
    }

    fn check_size(size: u8) -> Result<(), LinkerError> {
        match size {
            1 | 2 | 4 | 8 => Ok(()),
            s => Err(LinkerError::BadPointerSize(s)),
        }
    }

    /// ALLOCATE: the firmware downloads fw_cfg file `file` to memory aligned to `align` in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: AllocZone) -> Result<(), LinkerError> {
        let raw = RawName::new(file)?;
        if !align.is_power_of_two() {
            return Err(LinkerError::BadAlign(align));
        }
        if self.allocated.iter().any(|a| a == file) {
            return Err(LinkerError::DuplicateAllocate(file.to_string()));
        }
        self.allocated.push(file.to_string());
        self.allocs.push(LoaderCommand::Allocate { file: raw, align, zone: zone as u8 });
        Ok(())
    }

    /// ADD_POINTER: the `size` bytes at `dest_file + dest_offset` hold an offset into `src_file`;
    /// the firmware adds `src_file`'s address. The caller stores the offset in the blob.
    pub fn add_pointer(
        &mut self,
        dest_file: &str,
        dest_offset: u32,
        size: u8,
        src_file: &str,
    ) -> Result<(), LinkerError> {
        Self::check_size(size)?;
        self.check_allocated(dest_file)?;
        self.check_allocated(src_file)?;
        self.cmds.push(LoaderCommand::AddPointer {
            dest: RawName::new(dest_file)?,
            src: RawName::new(src_file)?,
            offset: dest_offset,
            size,
        });
        Ok(())
    }

    /// ADD_CHECKSUM over `[start, start+len)` of `file`, result at `result_offset` (which must lie
    /// inside the range and be 0 in the blob). Issue it after the pointers into that range.
    pub fn add_checksum(
        &mut self,
        file: &str,
        start: u32,
        len: u32,
        result_offset: u32,
    ) -> Result<(), LinkerError> {
        self.check_allocated(file)?;
        if result_offset < start || result_offset - start >= len {
            return Err(LinkerError::BadChecksumRange { result: result_offset, start, len });
        }
        self.cmds.push(LoaderCommand::AddChecksum {
            file: RawName::new(file)?,
            result_offset,
            start,
            length: len,
        });
        Ok(())
    }

    /// WRITE_POINTER: the firmware writes `addr(src_file) + src_offset` (`size` bytes LE) into the
    /// writable fw_cfg file `dest_file` at `dst_offset`, through fw_cfg DMA. `dest_file` is not
    /// allocated in guest memory; `src_file` must be.
    pub fn write_pointer(
        &mut self,
        dest_file: &str,
        dst_offset: u32,
        size: u8,
        src_file: &str,
        src_offset: u32,
    ) -> Result<(), LinkerError> {
        Self::check_size(size)?;
        self.check_allocated(src_file)?;
        self.cmds.push(LoaderCommand::WritePointer {
            dest: RawName::new(dest_file)?,
            src: RawName::new(src_file)?,
            dst_offset,
            src_offset,
            size,
        });
        Ok(())
    }

    /// All commands in script order.
    pub fn commands(&self) -> impl Iterator<Item = &LoaderCommand> {
        self.allocs.iter().chain(self.cmds.iter())
    }

    /// The script bytes, unpadded (a multiple of 128).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.commands().flat_map(|c| c.encode()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_and_layout() {
        let mut l = Linker::new();
        l.allocate("etc/acpi/tables", 64, AllocZone::High).unwrap();
        l.allocate("etc/acpi/rsdp", 16, AllocZone::FSeg).unwrap();
        l.add_pointer("etc/acpi/rsdp", 16, 4, "etc/acpi/tables").unwrap();
        l.add_checksum("etc/acpi/rsdp", 0, 20, 8).unwrap();
        l.write_pointer("etc/vmgenid_addr", 0, 8, "etc/acpi/tables", 40).unwrap();
        let b = l.to_bytes();
        assert_eq!(b.len(), 5 * 128);
        // ALLOCATE tables: command 1, name, align 64 at @60, zone 1 at @64.
        assert_eq!(&b[0..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..19], b"etc/acpi/tables");
        assert_eq!(b[19], 0);
        assert_eq!(&b[60..64], &64u32.to_le_bytes());
        assert_eq!(b[64], 1);
        assert_eq!(b[128 + 64], 2);
        // ADD_POINTER: offset @116, size @120.
        let p = &b[256..384];
        assert_eq!(&p[0..4], &2u32.to_le_bytes());
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert_eq!(&p[116..120], &16u32.to_le_bytes());
        assert_eq!(p[120], 4);
        // WRITE_POINTER: dst @116, src_offset @120, size @124.
        let w = &b[512..640];
        assert_eq!(&w[116..120], &0u32.to_le_bytes());
        assert_eq!(&w[120..124], &40u32.to_le_bytes());
        assert_eq!(w[124], 8);
        let cmds = decode_script(&b);
        assert_eq!(cmds, l.commands().cloned().collect::<Vec<_>>());
        assert_eq!(LoaderCommand::decode(&[0u8; 128]), LoaderCommand::Unknown(0));
    }

    #[test]
    fn allocates_come_first() {
        let mut l = Linker::new();
        l.allocate("a", 16, AllocZone::High).unwrap();
        l.add_checksum("a", 0, 4, 1).unwrap();
        l.allocate("b", 16, AllocZone::High).unwrap();
        let kinds: Vec<_> = decode_script(&l.to_bytes())
            .iter()
            .map(|c| matches!(c, LoaderCommand::Allocate { .. }))
            .collect();
        assert_eq!(kinds, vec![true, true, false]);
    }

    #[test]
    fn rejects_bad_input() {
        let mut l = Linker::new();
        assert_eq!(l.allocate("x", 3, AllocZone::High), Err(LinkerError::BadAlign(3)));
        assert!(matches!(l.allocate(&"n".repeat(56), 16, AllocZone::High), Err(LinkerError::BadName(_))));
        assert!(matches!(l.allocate("", 16, AllocZone::High), Err(LinkerError::BadName(_))));
        l.allocate(&"n".repeat(55), 16, AllocZone::High).unwrap();
        l.allocate("t", 16, AllocZone::High).unwrap();
        assert!(matches!(l.allocate("t", 16, AllocZone::High), Err(LinkerError::DuplicateAllocate(_))));
        assert_eq!(l.add_pointer("t", 0, 3, "t"), Err(LinkerError::BadPointerSize(3)));
        assert!(matches!(l.add_pointer("t", 0, 4, "u"), Err(LinkerError::NotAllocated(_))));
        assert!(matches!(l.add_checksum("t", 4, 4, 8), Err(LinkerError::BadChecksumRange { .. })));
        assert!(matches!(l.add_checksum("t", 4, 4, 3), Err(LinkerError::BadChecksumRange { .. })));
        assert!(matches!(l.write_pointer("w", 0, 8, "u", 0), Err(LinkerError::NotAllocated(_))));
    }

    #[test]
    fn raw_name_requires_terminator() {
        let mut raw = [b'a'; LOADER_FILESZ];
        assert_eq!(RawName(raw).as_str(), None);
        raw[55] = 0;
        assert_eq!(RawName(raw).as_str().map(str::len), Some(55));
    }
}
