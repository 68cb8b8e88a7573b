//! A model of SeaBIOS's small DSDT scanner (`src/fw/dsdt_parser.c`), written from its
//! behaviour. SeaBIOS walks the DSDT's object list, records every `Device` with its `_HID`,
//! `_STA` and `_CRS`, and stops a term list at the first opcode it does not know. It uses the
//! result to decide, e.g., whether a PS/2 keyboard (PNP0303) exists: a DSDT that trips the
//! scanner before the keyboard's device makes SeaBIOS skip PS/2 setup.
//!
//! Out-of-range reads see zero bytes (SeaBIOS would read beyond the table).

/// One device the scanner recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedDevice {
    /// The last name segment(s) as SeaBIOS prints them (trailing `_` dropped).
    pub name: String,
    /// Bytes after `Name(_HID,` (offset 5 of the Name op).
    pub hid_value: Option<Vec<u8>>,
    /// `_STA`: `Some(None)` for a method (unknown), `Some(Some(v))` for a constant.
    pub sta: Option<Option<u64>>,
    /// `_CRS` buffer contents, if a static buffer.
    pub crs: Option<Vec<u8>>,
}

/// The scan result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub devices: Vec<ScannedDevice>,
    /// Parse problems, in the words SeaBIOS's debug output uses.
    pub errors: Vec<String>,
}

/// `acpi_dsdt_present_eisaid` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    No,
    Yes,
    Unknown,
}

impl Scan {
    /// Whether a device with `_HID` EISAID("PNPxxxx") (or the string form) is present.
    pub fn present_eisaid(&self, eisaid: u16) -> Presence {
        if self.devices.is_empty() {
            return Presence::Unknown;
        }
        let [hi, lo] = eisaid.to_be_bytes();
        let dword = [0x0c, 0x41, 0xd0, hi, lo];
        let mut string = vec![0x0d];
        string.extend_from_slice(format!("PNP{:04X}", eisaid).as_bytes());
        // SeaBIOS keeps devices in a list with the newest first.
        let dev =
            self.devices.iter().rev().find(|d| {
                d.hid_value.as_ref().is_some_and(|h| h.starts_with(&dword) || h.starts_with(&string))
            });
        match dev {
            None => Presence::No,
            Some(d) => match d.sta {
                None => Presence::Yes,
                Some(None) => Presence::Unknown,
                Some(Some(0)) => Presence::No,
                Some(Some(_)) => Presence::Yes,
            },
        }
    }
}

struct Parser<'a> {
    t: &'a [u8],
    name: String,
    dev: Option<usize>,
    error: bool,
    depth: u32,
    out: Scan,
}

impl Parser<'_> {
    fn b(&self, pos: usize) -> u8 {
        self.t.get(pos).copied().unwrap_or(0)
    }

    fn nameseg(&self, pos: usize, dst: &mut String) -> usize {
        dst.push(self.b(pos) as char);
        for i in 1..4 {
            let c = self.b(pos + i);
            if c != b'_' {
                dst.push(c as char);
            }
        }
        4
    }

    fn namestring(&mut self, pos: usize) -> usize {
        let mut dst = String::new();
        let mut off = 0;
        loop {
            match self.b(pos + off) {
                0 => {
                    off += 1;
                }
                0x2e => {
                    off += 1;
                    off += self.nameseg(pos + off, &mut dst);
                    dst.push('.');
                    off += self.nameseg(pos + off, &mut dst);
                }
                0x2f => {
                    off += 1;
                    let count = self.b(pos + off);
                    off += 1;
                    for i in 0..count {
                        if i > 0 {
                            dst.push('.');
                        }
                        off += self.nameseg(pos + off, &mut dst);
                    }
                }
                b'\\' | b'^' => {
                    dst.push(self.b(pos + off) as char);
                    off += 1;
                    continue;
                }
                b'A'..=b'Z' | b'_' => {
                    off += self.nameseg(pos + off, &mut dst);
                }
                other => {
                    self.out
                        .errors
                        .push(format!("parse_namestring: unexpected byte {other:#04x} at {:#x}", pos + off));
                    self.error = true;
                }
            }
            break;
        }
        self.name = dst;
        off
    }

    /// Integer term (Zero/One/Byte/Word/DWord only, as SeaBIOS).
    fn termarg_int(&mut self, pos: usize, record_error: bool) -> (usize, u64) {
        let rd = |n: usize| (0..n).fold(0u64, |v, i| v | u64::from(self.b(pos + 1 + i)) << (8 * i));
        match self.b(pos) {
            0x00 => (1, 0),
            0x01 => (1, 1),
            0x0a => (2, rd(1)),
            0x0b => (3, rd(2)),
            0x0c => (5, rd(4)),
            other => {
                if record_error {
                    self.out
                        .errors
                        .push(format!("parse_termarg_int: unsupported opcode {other:#04x} at {pos:#x}"));
                    self.error = true;
                }
                (1, 0)
            }
        }
    }

    fn pkglength(&self, pos: usize) -> (usize, usize) {
        let lead = self.b(pos);
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return (1, usize::from(lead & 0x3f));
        }
        let mut len = usize::from(lead & 0x0f);
        for i in 0..follow {
            len |= usize::from(self.b(pos + 1 + i)) << (4 + 8 * i);
        }
        (1 + follow, len)
    }

    fn termlist(&mut self, base: usize, mut offset: usize, pkglength: usize) {
        loop {
            offset += self.termobj(base + offset);
            if offset == pkglength {
                return;
            }
            if offset > pkglength {
                self.out.errors.push(format!("parse_termlist: overrun: {offset}/{pkglength}"));
                self.error = true;
                return;
            }
            if self.error {
                self.out.errors.push(format!("parse_termlist: parse error, skip from {offset}/{pkglength}"));
                self.error = false;
                return;
            }
        }
    }

    /// Skips a PkgLength-delimited object, optionally naming it; returns its length.
    fn pkg_skip(&mut self, pos: usize, named: bool) -> usize {
        let (off, len) = self.pkglength(pos);
        if named {
            self.namestring(pos + off);
        }
        len
    }

    fn termobj(&mut self, pos: usize) -> usize {
        let mut off = 1;
        if self.depth == 16 {
            self.out.errors.push("parse_termobj: deep recursion".into());
            self.error = true;
            return off;
        }
        self.depth += 1;
        match self.b(pos) {
            0x00 | 0x01 => {}
            0x06 => {
                off += self.namestring(pos + off);
                off += self.namestring(pos + off);
            }
            0x08 => {
                off += self.namestring(pos + off);
                off += self.termobj(pos + off);
                if let Some(d) = self.dev {
                    // SeaBIOS compares the bytes at offset 5 of the Name op (one NameSeg).
                    if self.name == "_HID" {
                        let end = (pos + 5 + 16).min(self.t.len());
                        self.out.devices[d].hid_value =
                            Some(self.t.get(pos + 5..end).unwrap_or(&[]).to_vec());
                    }
                    if self.name == "_STA" {
                        let (_, v) = self.termarg_int(pos + 5, false);
                        self.out.devices[d].sta = Some(Some(v));
                    }
                }
            }
            0x0a => off += 1,
            0x0b => off += 2,
            0x0c => off += 4,
            0x0d => {
                while pos + off < self.t.len() && self.b(pos + off) != 0 {
                    off += 1;
                }
                off += 1;
            }
            0x10 => {
                let (o, len) = self.pkglength(pos + off);
                let n = self.namestring(pos + off + o);
                self.termlist(pos + off, o + n, len);
                off += len;
            }
            0x11 => {
                let (o, len) = self.pkglength(pos + off);
                let (io, blen) = self.termarg_int(pos + off + o, true);
                if let Some(d) = self.dev {
                    if self.name == "_CRS" {
                        let start = pos + off + o + io;
                        let end = start.saturating_add(blen as usize).min(self.t.len());
                        self.out.devices[d].crs = Some(self.t.get(start..end).unwrap_or(&[]).to_vec());
                    }
                }
                off += len;
            }
            0x12 | 0x13 => off += self.pkg_skip(pos + off, false),
            0x14 => {
                off += self.pkg_skip(pos + off, true);
                if let Some(d) = self.dev {
                    if self.name == "_STA" {
                        self.out.devices[d].sta = Some(None);
                    }
                }
            }
            0x5b => {
                off += 1;
                match self.b(pos + 1) {
                    0x01 => {
                        off += self.namestring(pos + off);
                        off += 1;
                    }
                    0x80 => {
                        off += self.namestring(pos + off);
                        off += 1;
                        off += self.termarg_int(pos + off, true).0;
                        off += self.termarg_int(pos + off, true).0;
                    }
                    0x81 | 0x83 | 0x84 | 0x85 => off += self.pkg_skip(pos + off, true),
                    0x82 => {
                        let (o, len) = self.pkglength(pos + off);
                        let n = self.namestring(pos + off + o);
                        self.out.devices.push(ScannedDevice {
                            name: self.name.clone(),
                            hid_value: None,
                            sta: None,
                            crs: None,
                        });
                        self.dev = Some(self.out.devices.len() - 1);
                        self.termlist(pos + off, o + n, len);
                        // SeaBIOS clears the current device after any device, even a nested one.
                        self.dev = None;
                        off += len;
                    }
                    other => {
                        self.out
                            .errors
                            .push(format!("parse_termobj: unknown ext opcode 0x5b {other:#04x} at {pos:#x}"));
                        self.error = true;
                    }
                }
            }
            other => {
                self.out.errors.push(format!("parse_termobj: unknown opcode {other:#04x} at {pos:#x}"));
                self.error = true;
            }
        }
        self.depth -= 1;
        off
    }
}

/// Scans a DSDT (header included) the way SeaBIOS's `acpi_dsdt_parse` does.
pub fn scan(dsdt: &[u8]) -> Scan {
    let mut p =
        Parser { t: dsdt, name: String::new(), dev: None, error: false, depth: 0, out: Scan::default() };
    if dsdt.len() < 36 {
        p.out.errors.push("DSDT shorter than its header".into());
        return p.out;
    }
    let length = u32::from_le_bytes([dsdt[4], dsdt[5], dsdt[6], dsdt[7]]) as usize;
    if length <= 36 {
        return p.out;
    }
    p.termlist(0, 36, length);
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_devices_and_stops_on_unknown_opcodes() {
        let desc = crate::PlatformDesc::pc(crate::PlatformDesc::simple_cpus(2, 1), 0x600, 0x8000_0000);
        let d = crate::dsdt::dsdt(&desc);
        let s = scan(&d);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.present_eisaid(0x0303), Presence::Yes);
        assert_eq!(s.present_eisaid(0x0f13), Presence::Yes);
        assert_eq!(s.present_eisaid(0x0700), Presence::No);
        let com1 = s.devices.iter().find(|d| d.name == "COM1").unwrap();
        assert_eq!(com1.crs.as_ref().unwrap()[..4], [0x47, 0x01, 0xf8, 0x03]);

        // A QWORD integer at object level (unknown to SeaBIOS) hides everything after it in
        // that scope, including the keyboard.
        let mut bad = d[..36].to_vec();
        bad.extend_from_slice(&[0x08, b'X', b'X', b'X', b'X', 0x0e, 1, 2, 3, 4, 5, 6, 7, 8]);
        bad.extend_from_slice(&d[36..]);
        crate::tables::set_len(&mut bad);
        let s = scan(&bad);
        assert!(!s.errors.is_empty());
        assert_eq!(s.present_eisaid(0x0303), Presence::Unknown);
    }

    #[test]
    fn garbage_never_panics() {
        let mut t = vec![0u8; 36];
        t[4] = 0xff;
        t[5] = 0xff;
        for seed in 0..200u32 {
            let mut x = seed.wrapping_mul(2654435761);
            let body: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let mut tt = t.clone();
            tt.extend_from_slice(&body);
            let _ = scan(&tt);
        }
    }
}
