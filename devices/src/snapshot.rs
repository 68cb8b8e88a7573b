//! The hvmdm device-state stream: what `xen-save-devices-state` writes and `-incoming fd:N` reads.
//!
//! libxl treats the blob as opaque (it lands in `/var/lib/xen/qemu-save.<domid>` and comes back
//! on restore), so the format is ours. Guest RAM is not part of it: Xen saves memory itself.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! magic    8 bytes  "HVMDMSTA"
//! version  u32      FORMAT_VERSION
//! count    u32      number of sections (<= MAX_SECTIONS)
//! count x { name_len u16, name (UTF-8, 1..=MAX_NAME_LEN), section version u32,
//!           payload_len u32, payload }
//! crc      u32      CRC-32 (IEEE, as zlib) of every byte before it
//! ```
//!
//! The stream comes from a file, so it is parsed defensively: every length is bounded and checked
//! against what is left, the whole stream is capped at [`MAX_STREAM_LEN`], and nothing panics.
//! Restore is two-phase so a bad stream never leaves a half-restored machine:
//! [`Snapshot::decode`] parses and validates a section against the device's configuration
//! without touching the device, and only when every section decoded does [`Snapshot::apply`]
//! install the states (apply cannot fail for a decoded state). [`restore_all`] does exactly that.
//!
//! Unknown sections are an error (a stream from a machine with devices this one lacks cannot be
//! restored faithfully), as are missing and duplicate ones.
//!
//! Devices are saved quiesced: the caller stops the vCPUs and any I/O workers first, so no access
//! and no DMA is in flight while a device is saved (see each device's notes).

use std::any::Any;
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Mutex;

use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"HVMDMSTA";
pub const FORMAT_VERSION: u32 = 1;
/// Largest stream accepted or produced (the real ones are a few tens of KiB).
pub const MAX_STREAM_LEN: usize = 64 << 20;
pub const MAX_SECTIONS: usize = 256;
pub const MAX_NAME_LEN: usize = 64;

const HEADER_LEN: usize = 8 + 4 + 4;
const CRC_LEN: usize = 4;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("not an hvmdm device-state stream (bad magic)")]
    BadMagic,
    #[error("device-state stream format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("section {section:?}: version {version} is not supported")]
    UnsupportedSectionVersion { section: String, version: u32 },
    #[error("device-state stream truncated ({0})")]
    Truncated(String),
    #[error("device-state stream checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("device-state stream has no section {0:?}")]
    MissingSection(String),
    #[error("device-state stream has a section {0:?} this machine does not know")]
    UnknownSection(String),
    #[error("device-state stream has section {0:?} twice")]
    DuplicateSection(String),
    #[error("bad section name {0:?}")]
    BadName(String),
    #[error("{what}: {len} exceeds the limit of {max}")]
    TooLarge { what: String, len: usize, max: usize },
    #[error("section {section:?}: {what}")]
    BadValue { section: String, what: String },
    #[error("section {section:?}: {extra} unexpected bytes after the state")]
    TrailingData { section: String, extra: usize },
    #[error("device-state stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SnapshotError {
    fn bad(section: &str, what: impl Into<String>) -> Self {
        SnapshotError::BadValue { section: section.to_string(), what: what.into() }
    }
}

// ---- CRC-32 (IEEE 802.3, reflected, as zlib's crc32) ----

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 of `data` (the zlib / Ethernet polynomial; `crc32(b"123456789") == 0xcbf43926`).
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

// ---- section payloads ----

/// Builds one section's payload.
#[derive(Debug, Default)]
pub struct SectionWriter {
    buf: Vec<u8>,
}

impl SectionWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put_u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn put_bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn put_u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Fixed-size raw bytes (the reader must know the length: [`SectionReader::get_array`]).
    pub fn put_raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Variable-length bytes: u32 length, then the bytes ([`SectionReader::get_bytes`]).
    /// Device buffers are far below 4 GiB; a longer slice is stored truncated, which the
    /// stream-level size cap rejects long before.
    pub fn put_bytes(&mut self, v: &[u8]) {
        let n = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.put_u32(n);
        self.buf.extend_from_slice(&v[..n as usize]);
    }
    pub fn put_str(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Reads one section's payload; every getter fails with [`SnapshotError::Truncated`] instead of
/// reading past the end.
#[derive(Debug)]
pub struct SectionReader<'a> {
    section: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> SectionReader<'a> {
    pub fn new(section: &'a str, data: &'a [u8]) -> Self {
        SectionReader { section, data, pos: 0 }
    }

    pub fn section(&self) -> &'a str {
        self.section
    }

    /// A [`SnapshotError::BadValue`] naming this section.
    pub fn bad(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::bad(self.section, what)
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if n > self.remaining() {
            return Err(SnapshotError::Truncated(format!(
                "section {:?} needs {n} more bytes at offset {}, has {}",
                self.section,
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn get_array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn get_u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.get_array::<1>()?[0])
    }
    /// A bool stored as 0 or 1; anything else is a [`SnapshotError::BadValue`].
    pub fn get_bool(&mut self) -> Result<bool, SnapshotError> {
        match self.get_u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.bad(format!("boolean byte {v:#x}"))),
        }
    }
    pub fn get_u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.get_array()?))
    }
    pub fn get_u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.get_array()?))
    }
    pub fn get_u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.get_array()?))
    }
    pub fn get_i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.get_array()?))
    }
    /// Variable-length bytes written by [`SectionWriter::put_bytes`], at most `max` of them.
    pub fn get_bytes(&mut self, max: usize) -> Result<Vec<u8>, SnapshotError> {
        let n = self.get_u32()? as usize;
        if n > max {
            return Err(SnapshotError::TooLarge {
                what: format!("section {:?}: byte string", self.section),
                len: n,
                max,
            });
        }
        Ok(self.take(n)?.to_vec())
    }
    pub fn get_str(&mut self, max: usize) -> Result<String, SnapshotError> {
        let b = self.get_bytes(max)?;
        String::from_utf8(b).map_err(|_| self.bad("string is not UTF-8"))
    }
    /// Fails unless the whole payload was consumed (a longer payload is not this version's).
    pub fn finish(&self) -> Result<(), SnapshotError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(SnapshotError::TrailingData { section: self.section.to_string(), extra }),
        }
    }
}

// ---- per-device trait ----

/// A device state decoded and validated by [`Snapshot::decode`], waiting for
/// [`Snapshot::apply`] on the same device.
pub struct PendingState(Box<dyn Any + Send>);

impl PendingState {
    pub fn new<T: Any + Send>(state: T) -> Self {
        PendingState(Box::new(state))
    }
    /// The state as `T`; a state of another device type is a [`SnapshotError::BadValue`].
    pub fn downcast<T: Any>(self, section: &str) -> Result<T, SnapshotError> {
        self.0
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| SnapshotError::bad(section, "state of another device type"))
    }
}

impl std::fmt::Debug for PendingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingState")
    }
}

/// A device whose state goes into the stream. Object safe, so the machine can list its devices.
pub trait Snapshot {
    /// Default section name (the machine may pick instance names, e.g. two UARTs).
    fn section(&self) -> &'static str;
    /// Version of the payload [`Snapshot::save`] writes.
    fn section_version(&self) -> u32;
    /// Writes the device state. The device must be quiesced (no access or I/O in flight).
    fn save(&self, w: &mut SectionWriter);
    /// Parses and validates a payload of `version` against this device's configuration (e.g.
    /// which drives are attached) without changing the device.
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError>;
    /// Installs a state returned by [`Snapshot::decode`] of this device, with the side effects a
    /// guest programming the same registers would cause (BAR mappings, IRQ levels, PAM, PIRQ
    /// routes); it cannot fail for such a state. An error means a state of another type.
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError>;

    /// `decode` then `apply`, for a single device.
    fn load(&mut self, version: u32, r: &mut SectionReader<'_>) -> Result<(), SnapshotError> {
        let s = self.decode(version, r)?;
        self.apply(s)
    }
}

/// Rejects versions other than `supported` with [`SnapshotError::UnsupportedSectionVersion`].
pub fn check_version(r: &SectionReader<'_>, version: u32, supported: u32) -> Result<(), SnapshotError> {
    if version == supported {
        Ok(())
    } else {
        Err(SnapshotError::UnsupportedSectionVersion { section: r.section().to_string(), version })
    }
}

/// The shared form the machine holds devices in (`Arc<Mutex<T>>` derefs to `Mutex<T>`): locks
/// the device for each step.
pub trait SharedSnapshot: Sync {
    fn section(&self) -> &'static str;
    fn section_version(&self) -> u32;
    fn save(&self, w: &mut SectionWriter);
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError>;
    fn apply(&self, state: PendingState) -> Result<(), SnapshotError>;
}

impl<T: Snapshot + Send> SharedSnapshot for Mutex<T> {
    fn section(&self) -> &'static str {
        self.lock().unwrap_or_else(|p| p.into_inner()).section()
    }
    fn section_version(&self) -> u32 {
        self.lock().unwrap_or_else(|p| p.into_inner()).section_version()
    }
    fn save(&self, w: &mut SectionWriter) {
        self.lock().unwrap_or_else(|p| p.into_inner()).save(w)
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).decode(version, r)
    }
    fn apply(&self, state: PendingState) -> Result<(), SnapshotError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).apply(state)
    }
}

/// One device of the machine's save list, under its section name.
pub struct DeviceEntry<'a> {
    pub name: String,
    pub dev: &'a dyn SharedSnapshot,
}

impl<'a> DeviceEntry<'a> {
    /// Under the device's default section name.
    pub fn new(dev: &'a dyn SharedSnapshot) -> Self {
        DeviceEntry { name: dev.section().to_string(), dev }
    }
    /// Under an instance name (e.g. `"serial.1"` for a second UART).
    pub fn named(name: impl Into<String>, dev: &'a dyn SharedSnapshot) -> Self {
        DeviceEntry { name: name.into(), dev }
    }
}

// ---- stream ----

fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

/// Assembles a stream section by section.
#[derive(Debug)]
pub struct StreamWriter {
    buf: Vec<u8>,
    names: Vec<String>,
}

impl Default for StreamWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamWriter {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // count, patched by finish()
        StreamWriter { buf, names: Vec::new() }
    }

    /// Appends a section. Errors: bad or duplicate name, too many sections, stream too large.
    pub fn add_section(&mut self, name: &str, version: u32, payload: &[u8]) -> Result<(), SnapshotError> {
        check_name(name)?;
        if self.names.iter().any(|n| n == name) {
            return Err(SnapshotError::DuplicateSection(name.to_string()));
        }
        if self.names.len() >= MAX_SECTIONS {
            return Err(SnapshotError::TooLarge {
                what: "section count".into(),
                len: self.names.len() + 1,
                max: MAX_SECTIONS,
            });
        }
        let total = self.buf.len() + 2 + name.len() + 8 + payload.len() + CRC_LEN;
        if total > MAX_STREAM_LEN {
            return Err(SnapshotError::TooLarge { what: "stream".into(), len: total, max: MAX_STREAM_LEN });
        }
        // Bounded by MAX_NAME_LEN and MAX_STREAM_LEN above.
        self.buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.names.push(name.to_string());
        Ok(())
    }

    /// Saves a device (locking it) as section `name`.
    pub fn add_device(&mut self, name: &str, dev: &dyn SharedSnapshot) -> Result<(), SnapshotError> {
        let mut w = SectionWriter::new();
        dev.save(&mut w);
        self.add_section(name, dev.section_version(), &w.buf)
    }

    /// Saves an unshared device as section `name`.
    pub fn add(&mut self, name: &str, dev: &dyn Snapshot) -> Result<(), SnapshotError> {
        let mut w = SectionWriter::new();
        dev.save(&mut w);
        self.add_section(name, dev.section_version(), &w.buf)
    }

    /// The finished stream (count and checksum filled in).
    pub fn finish(mut self) -> Vec<u8> {
        // At most MAX_SECTIONS.
        let count = self.names.len() as u32;
        self.buf[12..16].copy_from_slice(&count.to_le_bytes());
        let crc = crc32(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// One section of a parsed stream.
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    pub version: u32,
    pub payload: &'a [u8],
}

/// A stream whose header, structure and checksum were verified. Sections are taken by name;
/// [`StreamReader::finish`] then fails if any were left (unknown to this machine).
#[derive(Debug)]
pub struct StreamReader<'a> {
    sections: BTreeMap<String, Section<'a>>,
}

/// A cursor over the raw stream for the header/section framing.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        if n > self.data.len() - self.pos {
            return Err(SnapshotError::Truncated(format!("{what} at offset {}", self.pos)));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, SnapshotError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl<'a> StreamReader<'a> {
    /// Verifies magic, format version, size, checksum and framing.
    pub fn parse(data: &'a [u8]) -> Result<Self, SnapshotError> {
        let n = data.len().min(MAGIC.len());
        if data[..n] != MAGIC[..n] {
            return Err(SnapshotError::BadMagic);
        }
        if data.len() < HEADER_LEN + CRC_LEN {
            return Err(SnapshotError::Truncated(format!("stream of {} bytes", data.len())));
        }
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        if data.len() > MAX_STREAM_LEN {
            return Err(SnapshotError::TooLarge {
                what: "stream".into(),
                len: data.len(),
                max: MAX_STREAM_LEN,
            });
        }
        let (body, tail) = data.split_at(data.len() - CRC_LEN);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let computed = crc32(body);
        if stored != computed {
            return Err(SnapshotError::Checksum { stored, computed });
        }
        let mut c = Cursor { data: body, pos: HEADER_LEN };
        let count = u32::from_le_bytes([data[12], data[13], data[14], data[15]]) as usize;
        if count > MAX_SECTIONS {
            return Err(SnapshotError::TooLarge {
                what: "section count".into(),
                len: count,
                max: MAX_SECTIONS,
            });
        }
        let mut sections = BTreeMap::new();
        for i in 0..count {
            let name_len = c.u16("section name length")? as usize;
            if name_len > MAX_NAME_LEN {
                return Err(SnapshotError::TooLarge {
                    what: format!("section {i} name length"),
                    len: name_len,
                    max: MAX_NAME_LEN,
                });
            }
            let name = c.take(name_len, "section name")?;
            let name = std::str::from_utf8(name)
                .map_err(|_| SnapshotError::BadName(String::from_utf8_lossy(name).into_owned()))?;
            check_name(name)?;
            let version = c.u32("section version")?;
            let len = c.u32("section length")? as usize;
            let payload = c.take(len, "section payload")?;
            if sections.insert(name.to_string(), Section { version, payload }).is_some() {
                return Err(SnapshotError::DuplicateSection(name.to_string()));
            }
        }
        if c.pos != body.len() {
            return Err(SnapshotError::TrailingData {
                section: "<stream>".into(),
                extra: body.len() - c.pos,
            });
        }
        Ok(StreamReader { sections })
    }

    /// Names of the sections not taken yet.
    pub fn names(&self) -> Vec<&str> {
        self.sections.keys().map(String::as_str).collect()
    }

    /// Removes and returns section `name`.
    pub fn take(&mut self, name: &str) -> Result<Section<'a>, SnapshotError> {
        self.sections.remove(name).ok_or_else(|| SnapshotError::MissingSection(name.to_string()))
    }

    /// Takes section `name` and decodes it with `dev` (which must consume the whole payload).
    pub fn decode_with(
        &mut self,
        name: &str,
        decode: impl FnOnce(u32, &mut SectionReader<'_>) -> Result<PendingState, SnapshotError>,
    ) -> Result<PendingState, SnapshotError> {
        let s = self.take(name)?;
        let mut r = SectionReader::new(name, s.payload);
        let st = decode(s.version, &mut r)?;
        r.finish()?;
        Ok(st)
    }

    /// Fails with [`SnapshotError::UnknownSection`] if a section was not taken.
    pub fn finish(self) -> Result<(), SnapshotError> {
        match self.sections.into_keys().next() {
            Some(name) => Err(SnapshotError::UnknownSection(name)),
            None => Ok(()),
        }
    }
}

/// Saves every device of `devices` (in order) into one stream.
pub fn save_all(devices: &[DeviceEntry<'_>]) -> Result<Vec<u8>, SnapshotError> {
    let mut w = StreamWriter::new();
    for d in devices {
        w.add_device(&d.name, d.dev)?;
    }
    Ok(w.finish())
}

/// Restores `devices` from `stream`, all or nothing: every section is decoded and validated
/// before any device changes, and the stream must hold exactly these sections.
pub fn restore_all(stream: &[u8], devices: &[DeviceEntry<'_>]) -> Result<(), SnapshotError> {
    let mut r = StreamReader::parse(stream)?;
    let mut pending = Vec::with_capacity(devices.len());
    for d in devices {
        pending.push(r.decode_with(&d.name, |v, sr| d.dev.decode(v, sr))?);
    }
    r.finish()?;
    for (d, st) in devices.iter().zip(pending) {
        d.dev.apply(st)?;
    }
    Ok(())
}

/// Reads a whole stream from `r` (e.g. the `-incoming fd:N` file), refusing more than
/// [`MAX_STREAM_LEN`] bytes.
pub fn read_stream(r: &mut dyn Read) -> Result<Vec<u8>, SnapshotError> {
    let mut buf = Vec::new();
    let n = r.take(MAX_STREAM_LEN as u64 + 1).read_to_end(&mut buf)?;
    if n > MAX_STREAM_LEN {
        return Err(SnapshotError::TooLarge { what: "stream".into(), len: n, max: MAX_STREAM_LEN });
    }
    Ok(buf)
}

/// Helpers for device round-trip tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The payload `dev` saves.
    pub fn payload(dev: &dyn Snapshot) -> Vec<u8> {
        let mut w = SectionWriter::new();
        dev.save(&mut w);
        w.buf
    }

    /// Loads a version-`dev.section_version()` payload into `dev`, requiring it all consumed.
    pub fn load(dev: &mut dyn Snapshot, payload: &[u8]) -> Result<(), SnapshotError> {
        let name = dev.section();
        let mut r = SectionReader::new(name, payload);
        let st = dev.decode(dev.section_version(), &mut r)?;
        r.finish()?;
        dev.apply(st)
    }

    /// Every strict prefix of `payload` must fail to decode (and never panic).
    pub fn assert_prefixes_fail(dev: &dyn Snapshot, payload: &[u8]) {
        for n in 0..payload.len() {
            let mut r = SectionReader::new(dev.section(), &payload[..n]);
            let ok = dev.decode(dev.section_version(), &mut r).is_ok() && r.finish().is_ok();
            assert!(!ok, "prefix of {n} bytes decoded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy device: one u32 register and a byte buffer of at most 8 bytes.
    #[derive(Debug, Default, PartialEq)]
    struct Toy {
        reg: u32,
        buf: Vec<u8>,
    }

    impl Snapshot for Toy {
        fn section(&self) -> &'static str {
            "toy"
        }
        fn section_version(&self) -> u32 {
            1
        }
        fn save(&self, w: &mut SectionWriter) {
            w.put_u32(self.reg);
            w.put_bytes(&self.buf);
        }
        fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
            check_version(r, version, 1)?;
            let reg = r.get_u32()?;
            if reg == 0xdead {
                return Err(r.bad("reg"));
            }
            let buf = r.get_bytes(8)?;
            Ok(PendingState::new(Toy { reg, buf }))
        }
        fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
            *self = state.downcast::<Toy>(self.section())?;
            Ok(())
        }
    }

    fn two_toys() -> (Mutex<Toy>, Mutex<Toy>) {
        (Mutex::new(Toy { reg: 7, buf: vec![1, 2, 3] }), Mutex::new(Toy { reg: 9, buf: vec![] }))
    }

    fn small_stream() -> Vec<u8> {
        let (a, b) = two_toys();
        save_all(&[DeviceEntry::new(&a), DeviceEntry::named("toy.1", &b)]).unwrap()
    }

    #[test]
    fn crc_known_answer() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn roundtrip_and_layout() {
        let s = small_stream();
        assert_eq!(&s[..8], b"HVMDMSTA");
        assert_eq!(u32::from_le_bytes(s[8..12].try_into().unwrap()), FORMAT_VERSION);
        assert_eq!(u32::from_le_bytes(s[12..16].try_into().unwrap()), 2);
        // First section: name "toy", version 1, payload 4 + 4 + 3 bytes.
        assert_eq!(&s[16..18], &3u16.to_le_bytes());
        assert_eq!(&s[18..21], b"toy");
        assert_eq!(&s[21..25], &1u32.to_le_bytes());
        assert_eq!(&s[25..29], &11u32.to_le_bytes());
        let (body, crc) = s.split_at(s.len() - 4);
        assert_eq!(crc32(body).to_le_bytes(), crc);

        let (a, b) = (Mutex::new(Toy::default()), Mutex::new(Toy::default()));
        restore_all(&s, &[DeviceEntry::new(&a), DeviceEntry::named("toy.1", &b)]).unwrap();
        assert_eq!(*a.lock().unwrap(), Toy { reg: 7, buf: vec![1, 2, 3] });
        assert_eq!(*b.lock().unwrap(), Toy { reg: 9, buf: vec![] });
    }

    fn restore_err(s: &[u8]) -> SnapshotError {
        let (a, b) = (Mutex::new(Toy::default()), Mutex::new(Toy::default()));
        let e = restore_all(s, &[DeviceEntry::new(&a), DeviceEntry::named("toy.1", &b)]).unwrap_err();
        // All or nothing: a failed restore leaves both devices untouched.
        assert_eq!(*a.lock().unwrap(), Toy::default());
        assert_eq!(*b.lock().unwrap(), Toy::default());
        e
    }

    #[test]
    fn bad_magic_and_version() {
        let mut s = small_stream();
        s[0] = b'X';
        assert!(matches!(restore_err(&s), SnapshotError::BadMagic));
        assert!(matches!(restore_err(b"QEVM"), SnapshotError::BadMagic));
        assert!(matches!(restore_err(b""), SnapshotError::Truncated(_)));
        let mut s = small_stream();
        s[8] = 2;
        assert!(matches!(restore_err(&s), SnapshotError::UnsupportedVersion(2)));
    }

    /// Re-seals a modified stream so the structural checks behind the checksum are reached.
    fn reseal(s: &mut Vec<u8>) {
        s.truncate(s.len() - 4);
        let c = crc32(s);
        s.extend_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn truncated_at_every_length_never_panics() {
        let s = small_stream();
        for n in 0..s.len() {
            let _ = restore_err(&s[..n]);
            // Also with a valid checksum over the truncated body, to reach the framing checks.
            // (n == len - 4 is the intact body, which is valid.)
            if n >= HEADER_LEN && n != s.len() - 4 {
                let mut t = s[..n].to_vec();
                t.extend_from_slice(&crc32(&s[..n]).to_le_bytes());
                let _ = restore_err(&t);
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let s = small_stream();
        for i in 0..s.len() {
            for bit in [0x01u8, 0x80] {
                let mut t = s.clone();
                t[i] ^= bit;
                let e = restore_err(&t);
                if i >= 12 {
                    assert!(matches!(e, SnapshotError::Checksum { .. }), "byte {i}: {e}");
                }
            }
        }
    }

    #[test]
    fn oversize_lengths_rejected_without_allocating() {
        // Section count.
        let mut s = small_stream();
        s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut s);
        assert!(matches!(restore_err(&s), SnapshotError::TooLarge { .. }));
        // Name length.
        let mut s = small_stream();
        s[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
        reseal(&mut s);
        assert!(matches!(restore_err(&s), SnapshotError::TooLarge { .. }));
        // Payload length.
        let mut s = small_stream();
        s[25..29].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut s);
        assert!(matches!(restore_err(&s), SnapshotError::Truncated(_)));
        // Inner byte-string length above the device's bound (8).
        let mut s = small_stream();
        s[33..37].copy_from_slice(&1000u32.to_le_bytes());
        reseal(&mut s);
        assert!(matches!(restore_err(&s), SnapshotError::TooLarge { .. }));
        // Payload longer than the state: trailing bytes.
        let mut w = StreamWriter::new();
        w.add_section("toy", 1, &[7, 0, 0, 0, 0, 0, 0, 0, 0xaa]).unwrap();
        w.add_section("toy.1", 1, &[0; 8]).unwrap();
        assert!(matches!(restore_err(&w.finish()), SnapshotError::TrailingData { .. }));
    }

    #[test]
    fn section_set_must_match() {
        let (a, _) = two_toys();
        // Missing toy.1.
        let only_a = save_all(&[DeviceEntry::new(&a)]).unwrap();
        assert!(matches!(restore_err(&only_a), SnapshotError::MissingSection(n) if n == "toy.1"));
        // Unknown extra section.
        let mut w = StreamWriter::new();
        w.add("toy", &Toy::default()).unwrap();
        w.add("toy.1", &Toy::default()).unwrap();
        w.add("vga", &Toy::default()).unwrap();
        assert!(matches!(restore_err(&w.finish()), SnapshotError::UnknownSection(n) if n == "vga"));
        // Duplicate, bad names and versions.
        let mut w = StreamWriter::new();
        w.add("toy", &Toy::default()).unwrap();
        assert!(matches!(w.add("toy", &Toy::default()), Err(SnapshotError::DuplicateSection(_))));
        assert!(matches!(w.add("", &Toy::default()), Err(SnapshotError::BadName(_))));
        assert!(matches!(w.add(&"x".repeat(65), &Toy::default()), Err(SnapshotError::BadName(_))));
        let mut w = StreamWriter::new();
        w.add_section("toy", 2, &[0; 8]).unwrap();
        w.add("toy.1", &Toy::default()).unwrap();
        assert!(matches!(
            restore_err(&w.finish()),
            SnapshotError::UnsupportedSectionVersion { version: 2, .. }
        ));
        // A device-level validation failure in the second section leaves the first untouched.
        let mut w = StreamWriter::new();
        w.add("toy", &Toy { reg: 1, buf: vec![] }).unwrap();
        w.add("toy.1", &Toy { reg: 0xdead, buf: vec![] }).unwrap();
        assert!(matches!(restore_err(&w.finish()), SnapshotError::BadValue { .. }));
    }

    #[test]
    fn reader_helpers() {
        let mut w = SectionWriter::new();
        w.put_u8(1);
        w.put_bool(true);
        w.put_u16(0x1234);
        w.put_u64(u64::MAX - 1);
        w.put_i64(-5);
        w.put_str("hé");
        w.put_raw(&[9, 9]);
        w.put_u8(2);
        let mut r = SectionReader::new("t", &w.buf);
        assert_eq!(r.get_u8().unwrap(), 1);
        assert!(r.get_bool().unwrap());
        assert_eq!(r.get_u16().unwrap(), 0x1234);
        assert_eq!(r.get_u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.get_i64().unwrap(), -5);
        assert_eq!(r.get_str(8).unwrap(), "hé");
        assert_eq!(r.get_array::<2>().unwrap(), [9, 9]);
        assert!(matches!(r.get_bool(), Err(SnapshotError::BadValue { .. })));
        assert!(matches!(r.get_u8(), Err(SnapshotError::Truncated(_))));
        r.finish().unwrap();
        assert!(matches!(PendingState::new(5u8).downcast::<u16>("t"), Err(SnapshotError::BadValue { .. })));
    }

    #[test]
    fn read_stream_caps_input() {
        let s = small_stream();
        assert_eq!(read_stream(&mut s.as_slice()).unwrap(), s);
        let mut big = std::io::repeat(0).take(MAX_STREAM_LEN as u64 + 10);
        assert!(matches!(read_stream(&mut big), Err(SnapshotError::TooLarge { .. })));
    }
}
