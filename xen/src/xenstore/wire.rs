//! xenstore wire format (facts from Xen's public `io/xs_wire.h`).
//!
//! Every message is a 16-byte little-endian header `{type, req_id, tx_id, len}` followed by
//! `len` payload bytes, `len <= XENSTORE_PAYLOAD_MAX`. Requests and replies share the
//! format; the daemon echoes `req_id`, and answers failures with `ERROR` whose payload is
//! an errno name such as `"ENOENT\0"`.

use std::fmt;

use thiserror::Error;

/// Largest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;

/// Message types used by the device model (`enum xsd_sockmsg_type`; values are positional
/// in the C enum, so they are spelled out here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    // 20 was XS_RESTRICT, removed upstream.
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    /// Maps a raw header value; `None` for values the protocol does not define.
    pub fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// Errors of framing/decoding. After one of these the byte stream is out of sync.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("payload of {0} bytes exceeds XENSTORE_PAYLOAD_MAX")]
    Oversized(usize),
    #[error("unknown message type {0}")]
    UnknownType(u32),
    #[error("decoder poisoned by an earlier malformed frame")]
    Poisoned,
    #[error("malformed payload: {0}")]
    BadPayload(&'static str),
}

/// Errno names xenstored sends in `ERROR` replies (`xsd_errors[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Errno {
    Einval,
    Eacces,
    Eexist,
    Eisdir,
    Enoent,
    Enomem,
    Enospc,
    Eio,
    Enotempty,
    Enosys,
    Erofs,
    Ebusy,
    Eagain,
    Eisconn,
    E2big,
    Eperm,
    /// A name this client does not know (kept verbatim, truncated to a sane length).
    Other(String),
}

const ERRNO_NAMES: &[(&str, Errno)] = &[
    ("EINVAL", Errno::Einval),
    ("EACCES", Errno::Eacces),
    ("EEXIST", Errno::Eexist),
    ("EISDIR", Errno::Eisdir),
    ("ENOENT", Errno::Enoent),
    ("ENOMEM", Errno::Enomem),
    ("ENOSPC", Errno::Enospc),
    ("EIO", Errno::Eio),
    ("ENOTEMPTY", Errno::Enotempty),
    ("ENOSYS", Errno::Enosys),
    ("EROFS", Errno::Erofs),
    ("EBUSY", Errno::Ebusy),
    ("EAGAIN", Errno::Eagain),
    ("EISCONN", Errno::Eisconn),
    ("E2BIG", Errno::E2big),
    ("EPERM", Errno::Eperm),
];

impl Errno {
    /// Parses an `ERROR` payload (`"ENOENT\0"`; the NUL is optional).
    pub fn from_payload(payload: &[u8]) -> Self {
        let s = payload.split(|&b| b == 0).next().unwrap_or(&[]);
        let s = String::from_utf8_lossy(&s[..s.len().min(64)]);
        ERRNO_NAMES.iter().find(|(n, _)| *n == s).map(|(_, e)| e.clone()).unwrap_or(Errno::Other(s.into()))
    }

    /// The wire name, e.g. `"EAGAIN"`.
    pub fn name(&self) -> &str {
        match self {
            Errno::Other(s) => s,
            e => ERRNO_NAMES.iter().find(|(_, x)| x == e).map(|(n, _)| *n).unwrap_or("EIO"),
        }
    }

    /// The Linux errno value (EIO for unknown names).
    pub fn errno(&self) -> i32 {
        match self {
            Errno::Einval => libc::EINVAL,
            Errno::Eacces => libc::EACCES,
            Errno::Eexist => libc::EEXIST,
            Errno::Eisdir => libc::EISDIR,
            Errno::Enoent => libc::ENOENT,
            Errno::Enomem => libc::ENOMEM,
            Errno::Enospc => libc::ENOSPC,
            Errno::Eio | Errno::Other(_) => libc::EIO,
            Errno::Enotempty => libc::ENOTEMPTY,
            Errno::Enosys => libc::ENOSYS,
            Errno::Erofs => libc::EROFS,
            Errno::Ebusy => libc::EBUSY,
            Errno::Eagain => libc::EAGAIN,
            Errno::Eisconn => libc::EISCONN,
            Errno::E2big => libc::E2BIG,
            Errno::Eperm => libc::EPERM,
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One framed message. `ty` stays raw so a decoder can carry types it does not interpret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// Serialises header + payload; refuses payloads the daemon would treat as a protocol
    /// violation (it drops the connection for those).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        if self.payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::Oversized(self.payload.len()));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.ty as u32).to_le_bytes());
        out.extend_from_slice(&self.req_id.to_le_bytes());
        out.extend_from_slice(&self.tx_id.to_le_bytes());
        // Bounded by XENSTORE_PAYLOAD_MAX above, so the cast is lossless.
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(out)
    }
}

/// Streaming decoder: feed arbitrary chunks with [`Decoder::push`], pull whole frames with
/// [`Decoder::next_message`]. A bad header poisons it (the stream cannot be resynchronised).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    poisoned: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.poisoned {
            return;
        }
        // Compact lazily so a long session does not grow the buffer without bound.
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 2 * (HEADER_LEN + XENSTORE_PAYLOAD_MAX) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let avail = &self.buf[self.start..];
        let Some(hdr) = avail.get(..HEADER_LEN) else { return Ok(None) };
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (raw_ty, req_id, tx_id, len) = (word(0), word(4), word(8), word(12));
        // Validate the header before waiting for the body so a hostile length never makes
        // us buffer (or wait for) more than one maximal frame.
        if len as usize > XENSTORE_PAYLOAD_MAX {
            self.poisoned = true;
            return Err(WireError::Oversized(len as usize));
        }
        let Some(ty) = MsgType::from_u32(raw_ty) else {
            self.poisoned = true;
            return Err(WireError::UnknownType(raw_ty));
        };
        let total = HEADER_LEN + len as usize;
        let Some(body) = avail.get(HEADER_LEN..total) else { return Ok(None) };
        let msg = Message { ty, req_id, tx_id, payload: body.to_vec() };
        self.start += total;
        Ok(Some(msg))
    }
}

/// Builds a payload of NUL-terminated strings (`"a\0b\0"`).
pub fn join_strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    out
}

/// Splits a NUL-separated list as DIRECTORY / GET_PERMS / WATCH_EVENT replies carry it.
/// The final terminator is optional; an empty payload is an empty list.
pub fn split_strings(payload: &[u8]) -> Result<Vec<String>, WireError> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).map_err(|_| WireError::BadPayload("string is not UTF-8")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u32, req: u32, tx: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [ty, req, tx, payload.len() as u32] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn encode_layout_is_little_endian() {
        let m = Message { ty: MsgType::Write, req_id: 0x01020304, tx_id: 7, payload: b"a\0b".to_vec() };
        let e = m.encode().unwrap();
        assert_eq!(e, frame(11, 0x01020304, 7, b"a\0b"));
        assert_eq!(&e[4..8], &[4, 3, 2, 1]);
    }

    #[test]
    fn encode_refuses_oversized() {
        let ok = Message { ty: MsgType::Write, req_id: 1, tx_id: 0, payload: vec![b'x'; 4096] };
        assert!(ok.encode().is_ok());
        let big = Message { payload: vec![b'x'; 4097], ..ok };
        assert_eq!(big.encode(), Err(WireError::Oversized(4097)));
    }

    #[test]
    fn decoder_handles_byte_by_byte_and_batched_input() {
        let mut stream = frame(2, 5, 0, b"value");
        stream.extend(frame(15, 0, 0, b"/p\0tok\0"));
        stream.extend(frame(16, 6, 0, b"ENOENT\0"));
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].ty, MsgType::Read);
        assert_eq!(got[0].payload, b"value");
        assert_eq!(got[1].ty, MsgType::WatchEvent);
        assert_eq!(got[2].req_id, 6);
        assert_eq!(d.buffered(), 0);

        let mut d = Decoder::new();
        d.push(&stream);
        assert_eq!(d.next_message().unwrap().unwrap(), got[0]);
        assert_eq!(d.next_message().unwrap().unwrap(), got[1]);
        assert_eq!(d.next_message().unwrap().unwrap(), got[2]);
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn decoder_rejects_oversized_before_body_arrives() {
        let mut d = Decoder::new();
        d.push(&frame(2, 1, 0, b"")[..12]);
        assert_eq!(d.next_message(), Ok(None));
        d.push(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(d.next_message(), Err(WireError::Oversized(0xffff_ffff)));
        assert_eq!(d.next_message(), Err(WireError::Poisoned));
        d.push(&frame(2, 1, 0, b"x"));
        assert_eq!(d.next_message(), Err(WireError::Poisoned));
        assert!(d.is_poisoned());
    }

    #[test]
    fn decoder_rejects_unknown_type_and_max_payload_is_ok() {
        let mut d = Decoder::new();
        d.push(&frame(20, 1, 0, b""));
        assert_eq!(d.next_message(), Err(WireError::UnknownType(20)));
        let mut d = Decoder::new();
        d.push(&frame(0xffff, 1, 0, b""));
        assert_eq!(d.next_message(), Err(WireError::UnknownType(0xffff)));
        let mut d = Decoder::new();
        d.push(&frame(2, 1, 0, &[7u8; XENSTORE_PAYLOAD_MAX]));
        assert_eq!(d.next_message().unwrap().unwrap().payload.len(), XENSTORE_PAYLOAD_MAX);
    }

    #[test]
    fn decoder_fuzz_never_panics() {
        // Deterministic xorshift garbage in random chunk sizes.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200 {
            let mut d = Decoder::new();
            for _ in 0..50 {
                let n = (next() % 40) as usize;
                let chunk: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                d.push(&chunk);
                while let Ok(Some(m)) = d.next_message() {
                    assert!(m.payload.len() <= XENSTORE_PAYLOAD_MAX);
                }
            }
        }
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(Errno::from_payload(b"EAGAIN\0"), Errno::Eagain);
        assert_eq!(Errno::from_payload(b"ENOENT"), Errno::Enoent);
        assert_eq!(Errno::from_payload(b"EACCES\0junk"), Errno::Eacces);
        assert_eq!(Errno::from_payload(b"EWEIRD\0"), Errno::Other("EWEIRD".into()));
        assert_eq!(Errno::from_payload(b""), Errno::Other(String::new()));
        assert_eq!(Errno::Eagain.errno(), libc::EAGAIN);
        assert_eq!(Errno::E2big.name(), "E2BIG");
        assert_eq!(Errno::Other("X".into()).errno(), libc::EIO);
        for (n, e) in ERRNO_NAMES {
            assert_eq!(Errno::from_payload(n.as_bytes()), *e);
            assert_eq!(e.name(), *n);
        }
    }

    #[test]
    fn string_lists() {
        assert_eq!(split_strings(b"a\0bc\0").unwrap(), vec!["a", "bc"]);
        assert_eq!(split_strings(b"a\0bc").unwrap(), vec!["a", "bc"]);
        assert_eq!(split_strings(b"").unwrap(), Vec::<String>::new());
        assert_eq!(split_strings(b"\0").unwrap(), Vec::<String>::new());
        assert!(split_strings(b"\xff\0").is_err());
        assert_eq!(join_strings(&[b"/p", b"tok"]), b"/p\0tok\0");
    }
}
