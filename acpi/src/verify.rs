//! Replays a linker/loader script the way SeaBIOS (`src/fw/romfile_loader.c`) and OVMF
//! (`OvmfPkg/Library/AcpiPlatformLib/QemuFwCfgAcpi.c`) do, into simulated guest memory, and then
//! checks the result the way the firmware and an OS would see it.
//!
//! `files(name)` must return what the firmware would download for a fw_cfg file: its contents
//! cut or zero-extended to the size in the fw_cfg directory the firmware read. Passing a stale
//! (smaller) size reproduces seed 000.
//!
//! Memory model: SeaBIOS places HIGH allocations downwards from 0x7FF00000 and FSEG allocations
//! upwards from 0xF5000; OVMF places blobs that are the target of a pointer narrower than 8
//! bytes below 4 GiB and all other blobs above 4 GiB (so a too-narrow pointer shows up as the
//! "unrepresentable" error a large guest would hit).

use std::collections::BTreeSet;

use thiserror::Error;

use crate::linker::{decode_script, LoaderCommand, RawName, LOADER_CMD_SIZE};
use crate::seabios_dsdt;
use crate::tables::{self, sum8, HEADER_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    SeaBios,
    Ovmf,
}

/// A table as the OS would find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledTable {
    pub signature: String,
    pub address: u64,
    pub length: u32,
}

/// A WRITE_POINTER the firmware performed: value written into fw_cfg file `file` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenPointer {
    pub file: String,
    pub offset: u32,
    pub size: u8,
    pub value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub firmware: Firmware,
    /// Tables installed (OVMF) or reachable from the RSDP (SeaBIOS), with their addresses.
    pub tables: Vec<InstalledTable>,
    /// Where SeaBIOS found the RSDP (OVMF builds its own).
    pub rsdp_address: Option<u64>,
    /// Allocated blobs: (file, base, size).
    pub blobs: Vec<(String, u64, usize)>,
    pub write_pointers: Vec<WrittenPointer>,
    /// Things the firmware does silently that may still matter (e.g. skipped ALLOCATEs).
    pub notes: Vec<String>,
}

impl VerifyReport {
    fn empty(firmware: Firmware) -> Self {
        VerifyReport {
            firmware,
            tables: Vec::new(),
            rsdp_address: None,
            blobs: Vec::new(),
            write_pointers: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn has(&self, sig: &str) -> bool {
        self.tables.iter().any(|t| t.signature == sig)
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The firmware rejected a command (OVMF: whole script rolled back, no ACPI at all; SeaBIOS:
    /// `warn_internalerror()` and carries on with broken tables).
    #[error("{firmware:?}: loader command {index:?}: {message}")]
    Loader { firmware: Firmware, index: Option<usize>, message: String },
    /// The script ran, but the resulting tables are not what the OS needs.
    #[error("{firmware:?}: {message}")]
    Tables { firmware: Firmware, message: String },
}

struct Blob {
    name: RawName,
    base: u64,
    data: Vec<u8>,
    fseg: bool,
}

struct Mem {
    blobs: Vec<Blob>,
}

impl Mem {
    fn find(&self, name: &RawName) -> Option<usize> {
        self.blobs.iter().position(|b| b.name == *name)
    }

    /// Bytes at `[addr, addr+len)` if they lie inside one blob.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.blobs.iter().find_map(|b| {
            let off = addr.checked_sub(b.base)?;
            let off = usize::try_from(off).ok()?;
            b.data.get(off..off.checked_add(len)?)
        })
    }

    /// Bytes from `addr` to the end of its blob.
    fn rest(&self, addr: u64) -> Option<&[u8]> {
        self.blobs.iter().find_map(|b| {
            let off = usize::try_from(addr.checked_sub(b.base)?).ok()?;
            b.data.get(off..)
        })
    }
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

const SEABIOS_HIGH_TOP: u64 = 0x7ff0_0000;
const SEABIOS_FSEG_START: u64 = 0xf_5000;
const SEABIOS_FSEG_END: u64 = 0x10_0000;
const OVMF_LOW_TOP: u64 = 0x7f00_0000;
const OVMF_HIGH_BASE: u64 = 0x1_0000_0000;
const OVMF_TABLES_MAX: usize = 128;
const PAGE: u64 = 4096;

/// Replays `loader` with `fw`'s rules and checks the resulting tables.
pub fn verify(
    loader: &[u8],
    files: &dyn Fn(&str) -> Option<Vec<u8>>,
    fw: Firmware,
) -> Result<VerifyReport, VerifyError> {
    match fw {
        Firmware::SeaBios => seabios(loader, files),
        Firmware::Ovmf => ovmf(loader, files),
    }
}

fn ptr_size_ok(size: u8) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

fn fits(value: u64, size: u8) -> bool {
    size >= 8 || value >> (u32::from(size) * 8) == 0
}

// ---------------------------------------------------------------- SeaBIOS

fn seabios(loader: &[u8], files: &dyn Fn(&str) -> Option<Vec<u8>>) -> Result<VerifyReport, VerifyError> {
    let fw = Firmware::SeaBios;
    let mut report = VerifyReport::empty(fw);
    let internal = |func: &str, detail: String| {
        format!("WARNING - internal error detected at src/fw/romfile_loader.c ({func}: {detail})")
    };
    if loader.len() % LOADER_CMD_SIZE != 0 {
        // The whole script is dropped; SeaBIOS falls back to its built-in tables.
        return Err(VerifyError::Loader {
            firmware: fw,
            index: None,
            message: internal(
                "romfile_loader_execute",
                format!("size {:#x} is not a multiple of {LOADER_CMD_SIZE}", loader.len()),
            ),
        });
    }
    let mut mem = Mem { blobs: Vec::new() };
    let mut high_top = SEABIOS_HIGH_TOP;
    let mut fseg_next = SEABIOS_FSEG_START;
    let mut errors: Vec<(usize, String)> = Vec::new();
    // Only allocated files are known to the loader, by name; names must be terminated.
    let find = |mem: &Mem, n: &RawName| n.as_str().and_then(|_| mem.find(n));

    for (i, cmd) in decode_script(loader).into_iter().enumerate() {
        match cmd {
            LoaderCommand::Allocate { file, align, zone } => {
                if align & align.wrapping_sub(1) != 0 {
                    errors.push((i, internal("romfile_loader_allocate", format!("alignment {align:#x}"))));
                    continue;
                }
                if zone != 1 && zone != 2 {
                    errors.push((i, internal("romfile_loader_allocate", format!("zone {zone}"))));
                    continue;
                }
                let align = u64::from(align.max(16));
                let Some(name) = file.as_str() else {
                    errors.push((i, internal("romfile_loader_allocate", "unterminated file name".into())));
                    continue;
                };
                let data = match files(name) {
                    Some(d) if !d.is_empty() => d,
                    _ => {
                        report
                            .notes
                            .push(format!("ALLOCATE {name:?}: file missing or empty, skipped silently"));
                        continue;
                    }
                };
                let size = data.len() as u64;
                let base = if zone == 2 {
                    let b = align_up(fseg_next, align);
                    if b + size > SEABIOS_FSEG_END {
                        report
                            .notes
                            .push(format!("WARNING - Unable to allocate resource ({name:?} in FSEG)"));
                        continue;
                    }
                    fseg_next = b + size;
                    b
                } else {
                    let Some(b) = high_top.checked_sub(size) else {
                        report.notes.push(format!("WARNING - Unable to allocate resource ({name:?})"));
                        continue;
                    };
                    let b = b / align * align;
                    high_top = b;
                    b
                };
                report.blobs.push((name.to_string(), base, data.len()));
                mem.blobs.push(Blob { name: file, base, data, fseg: zone == 2 });
            }
            LoaderCommand::AddPointer { dest, src, offset, size } => {
                let (d, s) = (find(&mem, &dest), find(&mem, &src));
                let (Some(d), Some(s)) = (d, s) else {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_add_pointer",
                            format!("file {:?} or {:?} not loaded", dest.display(), src.display()),
                        ),
                    ));
                    continue;
                };
                let off = offset as usize;
                let dlen = mem.blobs[d].data.len();
                let end = off.checked_add(usize::from(size));
                if end.is_none_or(|e| e > dlen) || !ptr_size_ok(size) {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_add_pointer",
                            format!(
                                "pointer {offset:#x}+{size} outside {:?} (size {dlen:#x})",
                                dest.display()
                            ),
                        ),
                    ));
                    continue;
                }
                let n = usize::from(size);
                let old = le(&mem.blobs[d].data[off..off + n]);
                // Not range-checked by SeaBIOS; truncated to the field width.
                let new = old.wrapping_add(mem.blobs[s].base);
                mem.blobs[d].data[off..off + n].copy_from_slice(&new.to_le_bytes()[..n]);
            }
            LoaderCommand::AddChecksum { file, result_offset, start, length } => {
                let Some(f) = find(&mem, &file) else {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_add_checksum",
                            format!("file {:?} not loaded", file.display()),
                        ),
                    ));
                    continue;
                };
                let size = mem.blobs[f].data.len();
                let end = (start as usize).checked_add(length as usize);
                if result_offset as usize >= size || end.is_none_or(|e| e > size) {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_add_checksum",
                            format!(
                                "range {start:#x}+{length:#x} / result {result_offset:#x} outside {:?} (size {size:#x})",
                                file.display()
                            ),
                        ),
                    ));
                    continue;
                }
                let data = &mut mem.blobs[f].data;
                let sum = sum8(&data[start as usize..start as usize + length as usize]);
                data[result_offset as usize] = data[result_offset as usize].wrapping_sub(sum);
            }
            LoaderCommand::WritePointer { dest, src, dst_offset, src_offset, size } => {
                let dest_file = dest.as_str().and_then(|n| files(n).map(|d| (n.to_string(), d.len())));
                let s = find(&mem, &src);
                let (Some((dname, dlen)), Some(s)) = (dest_file, s) else {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_write_pointer",
                            format!("file {:?} or {:?} unknown", dest.display(), src.display()),
                        ),
                    ));
                    continue;
                };
                let slen = mem.blobs[s].data.len();
                let end = (dst_offset as usize).checked_add(usize::from(size));
                let value = mem.blobs[s].base + u64::from(src_offset);
                if end.is_none_or(|e| e > dlen)
                    || src_offset as usize >= slen
                    || !ptr_size_ok(size)
                    || !fits(value, size)
                {
                    errors.push((
                        i,
                        internal(
                            "romfile_loader_write_pointer",
                            format!("bad location {dst_offset:#x}+{size} in {dname:?} or src offset {src_offset:#x}"),
                        ),
                    ));
                    continue;
                }
                report.write_pointers.push(WrittenPointer { file: dname, offset: dst_offset, size, value });
            }
            LoaderCommand::Unknown(_) => {}
        }
    }
    if let Some((index, message)) = errors.first() {
        let more = if errors.len() > 1 { format!(" (and {} more)", errors.len() - 1) } else { String::new() };
        return Err(VerifyError::Loader {
            firmware: fw,
            index: Some(*index),
            message: format!("{message}{more}"),
        });
    }

    // find_acpi_rsdp(): 16-byte steps over the F segment.
    let tbl_err = |message: String| VerifyError::Tables { firmware: fw, message };
    let mut rsdp = None;
    'scan: for b in mem.blobs.iter().filter(|b| b.fseg) {
        let mut addr = align_up(b.base, 16);
        while addr < b.base + b.data.len() as u64 {
            if let Some(len) = rsdp_len(mem.rest(addr).unwrap_or(&[])) {
                rsdp = Some((addr, len));
                break 'scan;
            }
            addr += 16;
        }
    }
    let Some((rsdp_addr, rsdp_len)) = rsdp else {
        return Err(tbl_err(
            "no valid RSDP in the F segment; SeaBIOS falls back to its built-in tables".into(),
        ));
    };
    report.rsdp_address = Some(rsdp_addr);
    let r = mem.read(rsdp_addr, rsdp_len).unwrap_or(&[]);
    let rsdt = le(r.get(16..20).unwrap_or(&[]));
    let xsdt = if r.get(15).copied().unwrap_or(0) >= 2 { le(r.get(24..32).unwrap_or(&[])) } else { 0 };

    let mut entries = Vec::new();
    for (root, sig, width) in [(xsdt, "XSDT", 8usize), (rsdt, "RSDT", 4)] {
        if root == 0 {
            continue;
        }
        let t =
            check_table(&mem, root, Some(sig)).map_err(|m| tbl_err(format!("{sig} at {root:#x}: {m}")))?;
        report.tables.push(t.clone());
        let body = mem.read(root, t.length as usize).unwrap_or(&[]);
        for e in body[HEADER_LEN..].chunks_exact(width) {
            entries.push(le(e));
        }
    }
    if entries.is_empty() {
        return Err(tbl_err("RSDP points to no RSDT/XSDT".into()));
    }
    let mut seen = BTreeSet::new();
    for addr in entries {
        if !seen.insert(addr) {
            continue;
        }
        let t = check_table(&mem, addr, None).map_err(|m| tbl_err(format!("table at {addr:#x}: {m}")))?;
        report.tables.push(t);
    }
    add_fadt_children(&mem, &mut report).map_err(tbl_err)?;
    common_checks(&mem, &report).map_err(tbl_err)?;

    // SeaBIOS then scans the DSDT for devices (PS/2 keyboard detection).
    if let Some(d) = report.tables.iter().find(|t| t.signature == "DSDT") {
        let dsdt = mem.read(d.address, d.length as usize).unwrap_or(&[]);
        let scan = seabios_dsdt::scan(dsdt);
        if let Some(e) = scan.errors.first() {
            return Err(tbl_err(format!("SeaBIOS DSDT scan: {e}")));
        }
    }
    Ok(report)
}

/// Length of a valid RSDP at the start of `b` (SeaBIOS `get_acpi_rsdp_length`).
fn rsdp_len(b: &[u8]) -> Option<usize> {
    if b.get(..8)? != b"RSD PTR " || sum8(b.get(..20)?) != 0 {
        return None;
    }
    if *b.get(15)? > 1 {
        let len = le(b.get(20..24)?) as usize;
        if sum8(b.get(..len)?) != 0 {
            return None;
        }
        return Some(len);
    }
    Some(20)
}

/// A table at `addr`: header inside memory, length fits, checksum 0 (FACS: no checksum).
fn check_table(mem: &Mem, addr: u64, want: Option<&str>) -> Result<InstalledTable, String> {
    let h = mem.read(addr, 8).ok_or("not inside any allocated blob")?;
    let sig = String::from_utf8_lossy(&h[..4]).into_owned();
    let length = le(&h[4..8]) as u32;
    if let Some(w) = want {
        if sig != w {
            return Err(format!("signature {sig:?}, expected {w:?}"));
        }
    }
    let min = if sig == "FACS" { 64 } else { HEADER_LEN as u32 };
    if length < min {
        return Err(format!("[{sig}] length {length} too small"));
    }
    let body =
        mem.read(addr, length as usize).ok_or(format!("[{sig}] length {length:#x} runs past its blob"))?;
    if sig != "FACS" && sum8(body) != 0 {
        return Err(format!("ACPI BIOS Warning (bug): Incorrect checksum in table [{sig}]"));
    }
    Ok(InstalledTable { signature: sig, address: addr, length })
}

/// Adds the FACS and DSDT the FADT points to (SeaBIOS/OS view).
fn add_fadt_children(mem: &Mem, report: &mut VerifyReport) -> Result<(), String> {
    let fadt = report.tables.iter().find(|t| t.signature == "FACP").cloned().ok_or("no FACP table")?;
    let f = mem.read(fadt.address, fadt.length as usize).unwrap_or(&[]);
    let field = |off: usize, n: usize| f.get(off..off + n).map(le).unwrap_or(0);
    let facs = field(tables::FADT_FIRMWARE_CTRL, 4);
    let xfacs = field(tables::FADT_X_FIRMWARE_CTRL, 8);
    let dsdt = field(tables::FADT_DSDT, 4);
    let xdsdt = field(tables::FADT_X_DSDT, 8);
    if dsdt != 0 && xdsdt != 0 && dsdt != xdsdt {
        return Err(format!(
            "ACPI BIOS Warning (bug): 32/64X DSDT address mismatch in FADT - {dsdt:#x}/{xdsdt:#x}"
        ));
    }
    if facs != 0 && xfacs != 0 && facs != xfacs {
        return Err(format!(
            "ACPI BIOS Warning (bug): 32/64X FACS address mismatch in FADT - {facs:#x}/{xfacs:#x}"
        ));
    }
    let facs = if facs != 0 { facs } else { xfacs };
    let dsdt = if xdsdt != 0 { xdsdt } else { dsdt };
    let t = check_table(mem, facs, Some("FACS")).map_err(|m| format!("FADT FIRMWARE_CTRL {facs:#x}: {m}"))?;
    if facs % 64 != 0 {
        return Err(format!("FACS at {facs:#x} is not 64-byte aligned"));
    }
    report.tables.push(t);
    let t = check_table(mem, dsdt, Some("DSDT")).map_err(|m| format!("FADT DSDT {dsdt:#x}: {m}"))?;
    report.tables.push(t);
    Ok(())
}

/// Required tables present exactly once, FADT pointers resolve to installed tables.
fn common_checks(mem: &Mem, report: &VerifyReport) -> Result<(), String> {
    for sig in ["FACP", "DSDT", "FACS", "APIC"] {
        let n = report.tables.iter().filter(|t| t.signature == sig).count();
        if n != 1 {
            return Err(format!("expected exactly one {sig} table, found {n}"));
        }
    }
    let addr_of = |sig: &str| report.tables.iter().find(|t| t.signature == sig).map(|t| t.address);
    let fadt = addr_of("FACP").unwrap_or(0);
    let f = mem.read(fadt, tables::FADT_X_DSDT + 8).ok_or("FADT too short")?;
    let facs = le(&f[tables::FADT_FIRMWARE_CTRL..tables::FADT_FIRMWARE_CTRL + 4]);
    let dsdt = le(&f[tables::FADT_DSDT..tables::FADT_DSDT + 4]);
    let xdsdt = le(&f[tables::FADT_X_DSDT..tables::FADT_X_DSDT + 8]);
    if Some(facs) != addr_of("FACS") {
        return Err(format!("FADT FIRMWARE_CTRL {facs:#x} does not point to the installed FACS"));
    }
    if Some(dsdt) != addr_of("DSDT") || (xdsdt != 0 && xdsdt != dsdt) {
        return Err(format!("FADT DSDT {dsdt:#x} / X_DSDT {xdsdt:#x} do not point to the installed DSDT"));
    }
    Ok(())
}

// ---------------------------------------------------------------- OVMF

fn ovmf(loader: &[u8], files: &dyn Fn(&str) -> Option<Vec<u8>>) -> Result<VerifyReport, VerifyError> {
    let fw = Firmware::Ovmf;
    let mut report = VerifyReport::empty(fw);
    let fail =
        |index: Option<usize>, message: String| Err(VerifyError::Loader { firmware: fw, index, message });
    if loader.len() % LOADER_CMD_SIZE != 0 {
        return fail(
            None,
            format!("InstallQemuFwCfgTables: \"etc/table-loader\" has invalid size {:#x}", loader.len()),
        );
    }
    let cmds = decode_script(loader);

    // Pre-pass: blobs pointed to by pointers narrower than 8 bytes must stay below 4 GiB.
    let mut restricted: Vec<RawName> = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        if let LoaderCommand::AddPointer { src, size, .. } = c {
            if src.as_str().is_none() {
                return fail(Some(i), "CollectAllocationsRestrictedTo32Bit: malformed file name".into());
            }
            if *size < 8 && !restricted.contains(src) {
                restricted.push(*src);
            }
        }
    }

    // Pass 1.
    let mut mem = Mem { blobs: Vec::new() };
    let mut low_top = OVMF_LOW_TOP;
    let mut high_next = OVMF_HIGH_BASE;
    for (i, cmd) in cmds.iter().enumerate() {
        match cmd {
            LoaderCommand::Allocate { file, align, .. } => {
                let Some(name) = file.as_str() else {
                    return fail(Some(i), "ProcessCmdAllocate: malformed file name".into());
                };
                if u64::from(*align) > PAGE {
                    return fail(Some(i), format!("ProcessCmdAllocate: unsupported alignment {align:#x}"));
                }
                let Some(data) = files(name) else {
                    return fail(
                        Some(i),
                        format!("ProcessCmdAllocate: QemuFwCfgFindFile(\"{name}\"): Not Found"),
                    );
                };
                if mem.find(file).is_some() {
                    return fail(Some(i), format!("ProcessCmdAllocate: duplicated file \"{name}\""));
                }
                let pages = (data.len() as u64).div_ceil(PAGE).max(1);
                let base = if restricted.contains(file) {
                    low_top -= pages * PAGE;
                    low_top
                } else {
                    let b = high_next;
                    high_next += pages * PAGE;
                    b
                };
                report.blobs.push((name.to_string(), base, data.len()));
                mem.blobs.push(Blob { name: *file, base, data, fseg: false });
            }
            LoaderCommand::AddPointer { dest, src, offset, size } => {
                if dest.as_str().is_none() || src.as_str().is_none() {
                    return fail(Some(i), "ProcessCmdAddPointer: malformed file name".into());
                }
                let (Some(d), Some(s)) = (mem.find(dest), mem.find(src)) else {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdAddPointer: invalid blob reference(s) \"{}\" / \"{}\"",
                            dest.display(),
                            src.display()
                        ),
                    );
                };
                let dlen = mem.blobs[d].data.len() as u64;
                let n = u64::from(*size);
                if !ptr_size_ok(*size) || dlen < n || dlen - n < u64::from(*offset) {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdAddPointer: invalid pointer location or size in \"{}\"",
                            dest.display()
                        ),
                    );
                }
                let (off, n) = (*offset as usize, usize::from(*size));
                let value = le(&mem.blobs[d].data[off..off + n]);
                if value >= mem.blobs[s].data.len() as u64 {
                    return fail(
                        Some(i),
                        format!("ProcessCmdAddPointer: invalid pointer value in \"{}\"", dest.display()),
                    );
                }
                let value = value + mem.blobs[s].base;
                if !fits(value, *size) {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdAddPointer: relocated pointer value unrepresentable in \"{}\"",
                            dest.display()
                        ),
                    );
                }
                mem.blobs[d].data[off..off + n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            LoaderCommand::AddChecksum { file, result_offset, start, length } => {
                if file.as_str().is_none() {
                    return fail(Some(i), "ProcessCmdAddChecksum: malformed file name".into());
                }
                let Some(f) = mem.find(file) else {
                    return fail(
                        Some(i),
                        format!("ProcessCmdAddChecksum: invalid blob reference \"{}\"", file.display()),
                    );
                };
                let size = mem.blobs[f].data.len() as u64;
                let (r, s, l) = (u64::from(*result_offset), u64::from(*start), u64::from(*length));
                if size <= r || size < l || size - l < s {
                    return fail(
                        Some(i),
                        format!("ProcessCmdAddChecksum: invalid checksum range in \"{}\"", file.display()),
                    );
                }
                let data = &mut mem.blobs[f].data;
                // CalculateCheckSum8 over the range as it is now, overwriting the byte.
                let sum = sum8(&data[s as usize..(s + l) as usize]);
                data[r as usize] = 0u8.wrapping_sub(sum);
            }
            LoaderCommand::WritePointer { dest, src, dst_offset, src_offset, size } => {
                if dest.as_str().is_none() || src.as_str().is_none() {
                    return fail(Some(i), "ProcessCmdWritePointer: malformed file name".into());
                }
                let dest_size = dest.as_str().and_then(files).map(|d| d.len() as u64);
                let (Some(dsize), Some(s)) = (dest_size, mem.find(src)) else {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdWritePointer: invalid fw_cfg file or blob reference \"{}\" / \"{}\"",
                            dest.display(),
                            src.display()
                        ),
                    );
                };
                let n = u64::from(*size);
                if !ptr_size_ok(*size) || dsize < n || dsize - n < u64::from(*dst_offset) {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdWritePointer: invalid pointer location or size in \"{}\"",
                            dest.display()
                        ),
                    );
                }
                if u64::from(*src_offset) >= mem.blobs[s].data.len() as u64 {
                    return fail(Some(i), "ProcessCmdWritePointer: invalid PointeeOffset".into());
                }
                let value = mem.blobs[s].base + u64::from(*src_offset);
                if !fits(value, *size) {
                    return fail(
                        Some(i),
                        format!(
                            "ProcessCmdWritePointer: pointer value unrepresentable in \"{}\"",
                            dest.display()
                        ),
                    );
                }
                report.write_pointers.push(WrittenPointer {
                    file: dest.display(),
                    offset: *dst_offset,
                    size: *size,
                    value,
                });
            }
            LoaderCommand::Unknown(_) => {}
        }
    }

    // Pass 2: which pointer targets are ACPI tables.
    let mut seen = BTreeSet::new();
    let uninstall = |message: String| Err(VerifyError::Tables { firmware: fw, message });
    for cmd in &cmds {
        let LoaderCommand::AddPointer { dest, src, offset, size } = cmd else { continue };
        let (Some(d), Some(s)) = (mem.find(dest), mem.find(src)) else { continue };
        let off = *offset as usize;
        let Some(field) = mem.blobs[d].data.get(off..off + usize::from(*size)) else { continue };
        let value = le(field);
        if !seen.insert(value) {
            continue;
        }
        let b2 = &mem.blobs[s];
        let Some(rest) = value.checked_sub(b2.base).and_then(|o| b2.data.get(o as usize..)) else { continue };
        let mut table = None;
        if rest.len() >= 64 && &rest[..4] == b"FACS" {
            let len = le(&rest[4..8]);
            if len >= 64 && len <= rest.len() as u64 {
                table = Some(("FACS".to_string(), len as u32));
            }
        }
        if table.is_none() && rest.len() >= HEADER_LEN {
            let len = le(&rest[4..8]);
            if len >= HEADER_LEN as u64 && len <= rest.len() as u64 && sum8(&rest[..len as usize]) == 0 {
                let sig = String::from_utf8_lossy(&rest[..4]).into_owned();
                if sig == "RSDT" || sig == "XSDT" {
                    continue;
                }
                table = Some((sig, len as u32));
            }
        }
        let Some((signature, length)) = table else {
            report.notes.push(format!("pointer target {value:#x} in \"{}\" is opaque data", src.display()));
            continue;
        };
        if report.tables.len() == OVMF_TABLES_MAX {
            return uninstall(format!(
                "Process2ndPassCmdAddPointer: can't install more than {OVMF_TABLES_MAX} tables"
            ));
        }
        // EFI_ACPI_TABLE_PROTOCOL accepts one FADT, FACS and DSDT.
        if ["FACP", "FACS", "DSDT"].contains(&signature.as_str()) && report.has(&signature) {
            return uninstall("Process2ndPassCmdAddPointer: InstallAcpiTable(): Access Denied".into());
        }
        report.tables.push(InstalledTable { signature, address: value, length });
    }
    common_checks(&mem, &report).map_err(|message| VerifyError::Tables { firmware: fw, message })?;
    Ok(report)
}

#[cfg(test)]
mod tests;
