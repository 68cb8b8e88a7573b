//! Minimal SMBIOS 2.8 tables and the 32-bit entry point, as QEMU hands them to firmware in
//! `etc/smbios/smbios-tables` and `etc/smbios/smbios-anchor`.
//!
//! What the firmware requires of the pair:
//! - SeaBIOS (`biostables.c:smbios_romfile_setup`): the anchor is exactly 31 bytes (the 2.1-style
//!   `_SM_`/`_DMI_` entry point) and its `structure_table_length` equals the tables file size.
//!   SeaBIOS copies the tables itself, writes their address into the anchor and recomputes both
//!   checksums. It adds its own type 0 only when the tables have none.
//! - OVMF (`DetectSmbiosVersionLib.c`): 31-byte anchor with major version 2, `_SM_`, `_DMI_` and
//!   `TableLength` equal to the tables size; then `SmbiosPlatformDxe` installs every structure up
//!   to type 127 with its own handle (handles must be unique; type 127 must be present).
//!
//! QEMU leaves the table address 0 and the checksums for firmware; we compute the checksums
//! (over address 0) anyway so the anchor is self-consistent.

use thiserror::Error;

use super::{FileOpts, FwCfg, FwCfgError};

pub const SMBIOS_TABLES_FILE: &str = "etc/smbios/smbios-tables";
pub const SMBIOS_ANCHOR_FILE: &str = "etc/smbios/smbios-anchor";
/// Size of the SMBIOS 2.x (32-bit) entry point.
pub const ANCHOR_LEN: usize = 0x1f;
/// QEMU describes RAM as DIMMs of at most 16 GiB each.
const MAX_DIMM_SIZE: u64 = 16 << 30;

/// Handles follow QEMU's scheme: `type << 8`, plus an index for repeated structures.
const H_BIOS: u16 = 0x0000;
const H_SYSTEM: u16 = 0x0100;
const H_CHASSIS: u16 = 0x0300;
const H_CPU: u16 = 0x0400;
const H_MEM_ARRAY: u16 = 0x1000;
const H_MEM_DEVICE: u16 = 0x1100;
const H_MEM_MAPPED: u16 = 0x1300;
const H_BOOT: u16 = 0x2000;
const H_END: u16 = 0x7f00;
/// Handle ranges of the repeated structures must not run into the next one.
const MAX_CPUS: u32 = (H_MEM_ARRAY - H_CPU) as u32;
const MAX_DIMMS: u64 = (H_MEM_MAPPED - H_MEM_DEVICE) as u64;
const MAX_RANGES: usize = (H_BOOT - H_MEM_MAPPED) as usize;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SmbiosError {
    #[error("SMBIOS needs at least one CPU and some memory")]
    Empty,
    #[error("{0} CPUs exceed the {MAX_CPUS} processor structures this layout supports")]
    TooManyCpus(u32),
    #[error("{0} MiB of RAM needs more than {MAX_DIMMS} memory device structures")]
    TooMuchMemory(u64),
    #[error("{0} memory ranges exceed the {MAX_RANGES} structures this layout supports")]
    TooManyRanges(usize),
    #[error("memory range {start:#x}+{len:#x} is empty or wraps")]
    BadRange { start: u64, len: u64 },
    #[error("SMBIOS tables are {0} bytes; a 2.x entry point describes at most 65535")]
    TooLarge(usize),
}

/// What the tables describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmbiosInfo {
    /// Manufacturer of system, chassis, processors and memory; BIOS vendor in type 0.
    pub vendor: String,
    /// System version; BIOS version in type 0.
    pub version: String,
    /// System product name.
    pub product: String,
    /// Raw 16 bytes in string order (as the FW_CFG UUID item); stored with the first three
    /// fields little-endian in type 1, as SMBIOS ≥ 2.6 requires.
    pub uuid: [u8; 16],
    pub cpus: u32,
    pub mem_mb: u64,
    /// RAM ranges `(start, len)` for type 19 (e.g. below and above 4 GiB). Empty: one range
    /// `[0, mem_mb MiB)`.
    pub mem_ranges: Vec<(u64, u64)>,
}

/// The two fw_cfg files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosBlobs {
    /// `etc/smbios/smbios-tables`
    pub tables: Vec<u8>,
    /// `etc/smbios/smbios-anchor` (31 bytes)
    pub anchor: Vec<u8>,
}

impl SmbiosBlobs {
    /// Adds `etc/smbios/smbios-tables` and `etc/smbios/smbios-anchor` (maximum = current size).
    pub fn install(self, fw: &mut FwCfg) -> Result<(), FwCfgError> {
        let (t, a) = (self.tables.len(), self.anchor.len());
        fw.add_file(SMBIOS_TABLES_FILE, self.tables, FileOpts::read_only(t))?;
        fw.add_file(SMBIOS_ANCHOR_FILE, self.anchor, FileOpts::read_only(a))
    }
}

/// One structure: the formatted area and its string set.
struct Structure {
    data: Vec<u8>,
    strings: Vec<u8>,
    nstr: u8,
}

impl Structure {
    fn new(ty: u8, len: u8, handle: u16) -> Self {
        let mut data = vec![0u8; len as usize];
        data[0] = ty;
        data[1] = len;
        data[2..4].copy_from_slice(&handle.to_le_bytes());
        Structure { data, strings: Vec::new(), nstr: 0 }
    }
    fn u8(&mut self, off: usize, v: u8) {
        self.data[off] = v;
    }
    fn u16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, off: usize, v: u64) {
        self.data[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, off: usize, v: &[u8]) {
        self.data[off..off + v.len()].copy_from_slice(v);
    }
    /// Appends a string and stores its 1-based number; empty strings are "none" (0).
    fn str(&mut self, off: usize, s: &str) {
        if s.is_empty() {
            self.data[off] = 0;
            return;
        }
        // NUL would end the string early and corrupt the set.
        self.strings.extend(s.bytes().map(|b| if b == 0 { b' ' } else { b }));
        self.strings.push(0);
        self.nstr += 1;
        self.data[off] = self.nstr;
    }
    fn finish(mut self) -> Vec<u8> {
        if self.strings.is_empty() {
            self.data.extend_from_slice(&[0, 0]);
        } else {
            self.data.extend_from_slice(&self.strings);
            self.data.push(0);
        }
        self.data
    }
}

/// Builds types 0, 1, 3, 4 (one per CPU), 16, 17, 19, 32 and 127 plus the 2.8 entry point.
pub fn smbios_tables(info: &SmbiosInfo) -> Result<SmbiosBlobs, SmbiosError> {
    if info.cpus == 0 || info.mem_mb == 0 {
        return Err(SmbiosError::Empty);
    }
    if info.cpus > MAX_CPUS {
        return Err(SmbiosError::TooManyCpus(info.cpus));
    }
    let mem_bytes = info.mem_mb.checked_mul(1 << 20).ok_or(SmbiosError::TooMuchMemory(info.mem_mb))?;
    let dimms = mem_bytes.div_ceil(MAX_DIMM_SIZE);
    if dimms > MAX_DIMMS {
        return Err(SmbiosError::TooMuchMemory(info.mem_mb));
    }
    let ranges = if info.mem_ranges.is_empty() { vec![(0, mem_bytes)] } else { info.mem_ranges.clone() };
    if ranges.len() > MAX_RANGES {
        return Err(SmbiosError::TooManyRanges(ranges.len()));
    }
    for &(start, len) in &ranges {
        if len == 0 || start.checked_add(len).is_none() {
            return Err(SmbiosError::BadRange { start, len });
        }
    }

    let mut structs = Vec::new();

    // Type 0: BIOS information (2.4+ layout, 24 bytes).
    let mut t = Structure::new(0, 0x18, H_BIOS);
    t.str(4, &info.vendor);
    t.str(5, &info.version);
    t.u16(6, 0xe800);
    t.u8(8, 0); // release date: none
    t.u64(10, 0x08); // characteristics not supported
    t.u8(18, 0);
    t.u8(19, 0x14); // targeted content distribution | virtual machine
    t.u8(22, 0xff); // no embedded controller
    t.u8(23, 0xff);
    structs.push(t.finish());

    // Type 1: system information (27 bytes).
    let mut t = Structure::new(1, 0x1b, H_SYSTEM);
    t.str(4, &info.vendor);
    t.str(5, &info.product);
    t.str(6, &info.version);
    t.bytes(8, &smbios_uuid(&info.uuid));
    t.u8(24, 0x06); // wake-up type: power switch
    structs.push(t.finish());

    // Type 3: chassis (22 bytes with SKU, no contained elements).
    let mut t = Structure::new(3, 0x16, H_CHASSIS);
    t.str(4, &info.vendor);
    t.u8(5, 0x01); // other
    t.u8(9, 0x03); // boot-up state: safe
    t.u8(10, 0x03); // power supply: safe
    t.u8(11, 0x03); // thermal: safe
    t.u8(12, 0x02); // security: unknown
    structs.push(t.finish());

    // Type 4: one processor per CPU (2.6+ layout, 42 bytes).
    for i in 0..info.cpus {
        let mut t = Structure::new(4, 0x2a, H_CPU + i as u16);
        t.str(4, &format!("CPU {i}"));
        t.u8(5, 0x03); // central processor
        t.u8(6, 0xfe); // family: see family 2
        t.str(7, &info.vendor);
        t.u16(0x14, 2000); // max speed MHz (QEMU's default)
        t.u16(0x16, 2000); // current speed
        t.u8(0x18, 0x41); // socket populated, CPU enabled
        t.u8(0x19, 0x01); // upgrade: other
        t.u16(0x1a, 0xffff); // no cache information
        t.u16(0x1c, 0xffff);
        t.u16(0x1e, 0xffff);
        t.u8(0x23, 1); // cores
        t.u8(0x24, 1); // cores enabled
        t.u8(0x25, 1); // threads
        t.u16(0x26, 0x02); // characteristics: unknown
        t.u16(0x28, 0x01); // family 2: other
        structs.push(t.finish());
    }

    // Type 16: physical memory array (2.7+ layout, 23 bytes).
    let mem_kb = mem_bytes >> 10;
    let mut t = Structure::new(16, 0x17, H_MEM_ARRAY);
    t.u8(4, 0x01); // location: other
    t.u8(5, 0x03); // use: system memory
    t.u8(6, 0x06); // error correction: multi-bit ECC
    if mem_kb < 0x8000_0000 {
        t.u32(7, mem_kb as u32);
    } else {
        t.u32(7, 0x8000_0000);
        t.u64(15, mem_bytes);
    }
    t.u16(11, 0xfffe); // no error information
    t.u16(13, dimms as u16);
    structs.push(t.finish());

    // Type 17: memory devices of at most 16 GiB (2.8 layout, 40 bytes).
    for i in 0..dimms {
        let size = (mem_bytes - i * MAX_DIMM_SIZE).min(MAX_DIMM_SIZE);
        let size_mb = size.div_ceil(1 << 20);
        let mut t = Structure::new(17, 0x28, H_MEM_DEVICE + i as u16);
        t.u16(4, H_MEM_ARRAY);
        t.u16(6, 0xfffe); // no error information
        t.u16(8, 0xffff); // total width unknown
        t.u16(10, 0xffff); // data width unknown
        if size_mb < 0x7fff {
            t.u16(12, size_mb as u16);
        } else {
            t.u16(12, 0x7fff);
            t.u32(0x1c, size_mb as u32);
        }
        t.u8(14, 0x09); // DIMM
        t.str(16, &format!("DIMM {i}"));
        t.u8(18, 0x07); // RAM
        t.u16(19, 0x02); // type detail: other
        t.str(23, &info.vendor);
        structs.push(t.finish());
    }

    // Type 19: memory array mapped addresses (2.7+ layout, 31 bytes).
    for (i, &(start, len)) in ranges.iter().enumerate() {
        let end = start + len - 1;
        let mut t = Structure::new(19, 0x1f, H_MEM_MAPPED + i as u16);
        let (start_kb, end_kb) = (start >> 10, end >> 10);
        if start_kb < u64::from(u32::MAX) && end_kb < u64::from(u32::MAX) {
            t.u32(4, start_kb as u32);
            t.u32(8, end_kb as u32);
        } else {
            t.u32(4, u32::MAX);
            t.u32(8, u32::MAX);
            t.u64(15, start);
            t.u64(23, end);
        }
        t.u16(12, H_MEM_ARRAY);
        t.u8(14, 1); // partition width
        structs.push(t.finish());
    }

    // Type 32: system boot information, no errors (11 bytes).
    structs.push(Structure::new(32, 0x0b, H_BOOT).finish());
    // Type 127: end of table.
    structs.push(Structure::new(127, 4, H_END).finish());

    let max_struct = structs.iter().map(Vec::len).max().unwrap_or(0);
    let count = structs.len();
    let tables: Vec<u8> = structs.concat();
    let table_len = u16::try_from(tables.len()).map_err(|_| SmbiosError::TooLarge(tables.len()))?;

    let mut a = vec![0u8; ANCHOR_LEN];
    a[0..4].copy_from_slice(b"_SM_");
    a[5] = ANCHOR_LEN as u8;
    a[6] = 2; // SMBIOS 2.8
    a[7] = 8;
    // Bounded by table_len, which fits in u16.
    a[8..10].copy_from_slice(&(max_struct as u16).to_le_bytes());
    a[0x10..0x15].copy_from_slice(b"_DMI_");
    a[0x16..0x18].copy_from_slice(&table_len.to_le_bytes());
    // 0x18..0x1c: table address, filled in by firmware.
    a[0x1c..0x1e].copy_from_slice(&(count as u16).to_le_bytes());
    a[0x1e] = 0x28;
    a[0x15] = checksum_byte(&a[0x10..]);
    a[4] = checksum_byte(&a);
    Ok(SmbiosBlobs { tables, anchor: a })
}

/// The byte that makes `data` (which holds 0 at the checksum position) sum to zero.
fn checksum_byte(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |s, &b| s.wrapping_add(b)).wrapping_neg()
}

/// SMBIOS ≥ 2.6 stores time_low, time_mid and time_hi_and_version little-endian.
fn smbios_uuid(u: &[u8; 16]) -> [u8; 16] {
    let mut o = *u;
    o[0..4].reverse();
    o[4..6].reverse();
    o[6..8].reverse();
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SmbiosInfo {
        SmbiosInfo {
            vendor: "hvmdm".into(),
            version: "1.0".into(),
            product: "Standard PC".into(),
            uuid: [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8],
            cpus: 2,
            mem_mb: 40 * 1024,
            mem_ranges: vec![],
        }
    }

    /// One walked structure: offset, type, handle, formatted length, strings.
    type Walked = (usize, u8, u16, usize, Vec<String>);

    /// Walks the structures the way SeaBIOS's `smbios_next` / OVMF's `SmbiosTableLength` do.
    fn walk(t: &[u8]) -> Vec<Walked> {
        let mut out = vec![];
        let mut p = 0;
        loop {
            assert!(p + 4 <= t.len(), "ran off the end without type 127");
            let (ty, len) = (t[p], t[p + 1] as usize);
            let handle = u16::from_le_bytes([t[p + 2], t[p + 3]]);
            let mut q = p + len;
            let mut strings = vec![];
            let next = if t[q] == 0 && t[q + 1] == 0 {
                q + 2
            } else {
                loop {
                    let e = q + t[q..].iter().position(|&b| b == 0).unwrap();
                    strings.push(String::from_utf8(t[q..e].to_vec()).unwrap());
                    q = e + 1;
                    if t[q] == 0 {
                        break q + 1;
                    }
                }
            };
            out.push((p, ty, handle, len, strings));
            if ty == 127 {
                assert_eq!(next, t.len(), "data after type 127");
                return out;
            }
            p = next;
        }
    }

    #[test]
    fn anchor_is_valid_for_seabios_and_ovmf() {
        let b = smbios_tables(&info()).unwrap();
        let a = &b.anchor;
        assert_eq!(a.len(), 31);
        assert_eq!(&a[0..4], b"_SM_");
        assert_eq!(&a[0x10..0x15], b"_DMI_");
        assert_eq!(a[6], 2);
        assert_eq!(a[7], 8);
        assert_eq!(a[5], 0x1f);
        let sum = |d: &[u8]| d.iter().fold(0u8, |s, &x| s.wrapping_add(x));
        assert_eq!(sum(a), 0);
        assert_eq!(sum(&a[0x10..]), 0);
        assert_eq!(sum(&a[..0x10]), 0, "SeaBIOS checks the first 16 bytes separately");
        assert_eq!(u16::from_le_bytes([a[0x16], a[0x17]]) as usize, b.tables.len());
        let s = walk(&b.tables);
        assert_eq!(u16::from_le_bytes([a[0x1c], a[0x1d]]) as usize, s.len());
        let max = u16::from_le_bytes([a[8], a[9]]) as usize;
        assert!((40..100).contains(&max));
    }

    #[test]
    fn structures_types_handles_and_strings() {
        let b = smbios_tables(&info()).unwrap();
        let s = walk(&b.tables);
        let types: Vec<u8> = s.iter().map(|x| x.1).collect();
        // 40 GiB = three DIMMs (16+16+8).
        assert_eq!(types, vec![0, 1, 3, 4, 4, 16, 17, 17, 17, 19, 32, 127]);
        let mut handles: Vec<u16> = s.iter().map(|x| x.2).collect();
        handles.sort();
        handles.dedup();
        assert_eq!(handles.len(), s.len(), "handles must be unique for OVMF");
        assert_eq!(s[0].4, vec!["hvmdm", "1.0"]);
        assert_eq!(s[1].4, vec!["hvmdm", "Standard PC", "1.0"]);
        assert_eq!(s[3].4, vec!["CPU 0", "hvmdm"]);
        assert_eq!(s[4].2, 0x401);
        assert_eq!(s[10].4, Vec::<String>::new());
        assert_eq!(s[11].2, 0x7f00);
        // Formatted lengths of the SMBIOS 2.8 layouts.
        let lens: Vec<usize> = s.iter().map(|x| x.3).collect();
        assert_eq!(lens, vec![24, 27, 22, 42, 42, 23, 40, 40, 40, 31, 11, 4]);
        // Type 1 UUID: first three fields byte-swapped, the rest as is.
        let t1 = s[1].0;
        assert_eq!(
            &b.tables[t1 + 8..t1 + 24],
            &[0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        // Type 17 sizes in MiB: 16 GiB, 16 GiB, 8 GiB.
        let sizes: Vec<u16> = s
            .iter()
            .filter(|x| x.1 == 17)
            .map(|x| u16::from_le_bytes([b.tables[x.0 + 12], b.tables[x.0 + 13]]))
            .collect();
        assert_eq!(sizes, vec![16384, 16384, 8192]);
        // Type 19 covers [0, 40 GiB) in KiB, inclusive end.
        let t19 = s[9].0;
        let rd = |o: usize| u32::from_le_bytes(b.tables[t19 + o..t19 + o + 4].try_into().unwrap());
        assert_eq!((rd(4), rd(8)), (0, (40 << 20) - 1));
    }

    #[test]
    fn large_memory_uses_extended_fields() {
        let mut i = info();
        i.cpus = 1;
        i.mem_mb = (8 << 20) + 1; // just over 8 TiB: 513 DIMMs is too many
        assert_eq!(smbios_tables(&i), Err(SmbiosError::TooMuchMemory((8 << 20) + 1)));
        i.mem_mb = 4 << 20; // 4 TiB
        i.mem_ranges = vec![(0, 3 << 30), (1 << 32, (4 << 40) - (3 << 30))];
        let b = smbios_tables(&i).unwrap();
        let s = walk(&b.tables);
        let t19: Vec<usize> = s.iter().filter(|x| x.1 == 19).map(|x| x.0).collect();
        assert_eq!(t19.len(), 2);
        assert_eq!(s.iter().filter(|x| x.1 == 17).count(), 256);
        let t = &b.tables[t19[1]..];
        assert_eq!(&t[4..12], &[0xff; 8], "32-bit fields say 'see extended'");
        assert_eq!(u64::from_le_bytes(t[15..23].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(t[23..31].try_into().unwrap()), (1 << 32) + (4 << 40) - (3 << 30) - 1);
        // Type 16 capacity: 4 TiB in KiB is 2^32, so the extended field is used.
        let t16 = s.iter().find(|x| x.1 == 16).unwrap().0;
        assert_eq!(u32::from_le_bytes(b.tables[t16 + 7..t16 + 11].try_into().unwrap()), 0x8000_0000);
        assert_eq!(u64::from_le_bytes(b.tables[t16 + 15..t16 + 23].try_into().unwrap()), 4 << 40);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut i = info();
        i.cpus = 0;
        assert_eq!(smbios_tables(&i), Err(SmbiosError::Empty));
        i.cpus = 5000;
        assert_eq!(smbios_tables(&i), Err(SmbiosError::TooManyCpus(5000)));
        i.cpus = 1;
        i.mem_ranges = vec![(u64::MAX, 2)];
        assert!(matches!(smbios_tables(&i), Err(SmbiosError::BadRange { .. })));
        i.mem_ranges = vec![];
        i.mem_mb = u64::MAX;
        assert!(matches!(smbios_tables(&i), Err(SmbiosError::TooMuchMemory(_))));
        // Too many CPUs for a 16-bit table length.
        i.mem_mb = 1024;
        i.cpus = 2000;
        i.vendor = "x".repeat(40);
        assert!(matches!(smbios_tables(&i), Err(SmbiosError::TooLarge(_))));
    }

    #[test]
    fn install_adds_both_files() {
        let ram = std::sync::Arc::new(crate::mem::TestRam::new(0x1000));
        let mut fw = FwCfg::new(ram);
        let b = smbios_tables(&info()).unwrap();
        b.clone().install(&mut fw).unwrap();
        assert_eq!(fw.file(SMBIOS_TABLES_FILE).unwrap(), b.tables);
        assert_eq!(fw.file(SMBIOS_ANCHOR_FILE).unwrap(), b.anchor);
    }

    #[test]
    fn nul_in_strings_is_sanitised() {
        let mut i = info();
        i.vendor = "a\0b".into();
        let b = smbios_tables(&i).unwrap();
        assert_eq!(walk(&b.tables)[0].4[0], "a b");
    }
}
