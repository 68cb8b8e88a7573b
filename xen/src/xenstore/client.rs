//! Synchronous xenstore client with asynchronous watch-event queueing.
//!
//! One request is outstanding at a time; replies are matched by `req_id`. `WATCH_EVENT`
//! frames can arrive at any moment (also between a request and its reply): they are queued
//! and handed out by [`Client::poll_events`] / [`Client::wait_event`].
//!
//! mio integration: register `SourceFd(&client.as_raw_fd())` for READABLE and call
//! [`Client::poll_events`] when it fires. Because a request call may itself read queued
//! events off the descriptor (the fd then no longer signals them), also call
//! `poll_events()` (or check [`Client::has_queued_events`]) after issuing requests.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use thiserror::Error;

use super::transport::{wait_readable, Transport};
use super::wire::{
    join_strings, split_strings, Decoder, Errno, Message, MsgType, WireError, HEADER_LEN,
    XENSTORE_PAYLOAD_MAX,
};

/// Retries of [`Client::transaction`] after EAGAIN before giving up (default).
pub const DEFAULT_TX_RETRIES: u32 = 16;

#[derive(Debug, Error)]
pub enum XsError {
    #[error("xenstore I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("xenstore connection closed by the daemon")]
    Closed,
    #[error("xenstore connection unusable after an earlier error")]
    Broken,
    #[error("xenstored replied {0}")]
    Daemon(Errno),
    #[error("xenstore protocol error: {0}")]
    Protocol(#[from] WireError),
    #[error("xenstore reply of type {got:?} to a {expected:?} request")]
    UnexpectedReply { expected: MsgType, got: MsgType },
    #[error("xenstore request payload of {0} bytes exceeds XENSTORE_PAYLOAD_MAX")]
    TooLarge(usize),
    #[error("invalid xenstore path or token {0:?}")]
    InvalidArgument(String),
    #[error("xenstore request timed out")]
    Timeout,
    #[error("xenstore transaction still conflicting after {0} attempts")]
    TxRetriesExhausted(u32),
}

impl XsError {
    /// The daemon's errno, if this is a daemon error reply.
    pub fn errno(&self) -> Option<&Errno> {
        match self {
            XsError::Daemon(e) => Some(e),
            _ => None,
        }
    }

    pub fn is_enoent(&self) -> bool {
        self.errno() == Some(&Errno::Enoent)
    }
}

/// Access a domain has to a node (`n`, `r`, `w`, `b` in the perm string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

/// One permission entry such as `"r1"`. In a node's list the first entry names the owner
/// and gives the default access of every domain not listed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    pub access: Access,
    pub domid: u16,
}

impl Perm {
    pub fn new(access: Access, domid: u16) -> Self {
        Self { access, domid }
    }
}

impl FromStr for Perm {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, WireError> {
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(WireError::BadPayload("permission letter")),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::BadPayload("permission domid"));
        }
        let domid = rest.parse().map_err(|_| WireError::BadPayload("permission domid"))?;
        Ok(Perm { access, domid })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

/// A fired watch: the node that changed and the token given to [`Client::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

fn check_str(s: &str) -> Result<&[u8], XsError> {
    if s.is_empty() || s.as_bytes().contains(&0) {
        return Err(XsError::InvalidArgument(s.chars().take(64).collect()));
    }
    Ok(s.as_bytes())
}

/// Node operations, shared by the plain connection and an open transaction.
pub trait XenStore {
    /// Sends one request in this context (transaction or none) and returns the reply
    /// payload, or the daemon's error.
    fn request(&mut self, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>, XsError>;

    fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError> {
        let p = join_strings(&[check_str(path)?]);
        self.request(MsgType::Read, p)
    }

    /// `read` that maps ENOENT to `None`.
    fn try_read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_string(&mut self, path: &str) -> Result<String, XsError> {
        String::from_utf8(self.read(path)?)
            .map_err(|_| XsError::Protocol(WireError::BadPayload("value is not UTF-8")))
    }

    /// Creates the node (and missing parents) if needed. The value is raw bytes, not
    /// NUL-terminated on the wire.
    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        let mut p = join_strings(&[check_str(path)?]);
        p.extend_from_slice(value);
        self.request(MsgType::Write, p).map(drop)
    }

    fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        let p = join_strings(&[check_str(path)?]);
        self.request(MsgType::Mkdir, p).map(drop)
    }

    /// Removes the node and its whole subtree.
    fn rm(&mut self, path: &str) -> Result<(), XsError> {
        let p = join_strings(&[check_str(path)?]);
        self.request(MsgType::Rm, p).map(drop)
    }

    /// Names (not paths) of the node's children.
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        let p = join_strings(&[check_str(path)?]);
        Ok(split_strings(&self.request(MsgType::Directory, p)?)?)
    }

    fn get_perms(&mut self, path: &str) -> Result<Vec<Perm>, XsError> {
        let p = join_strings(&[check_str(path)?]);
        let reply = self.request(MsgType::GetPerms, p)?;
        let perms = split_strings(&reply)?.iter().map(|s| s.parse()).collect::<Result<Vec<Perm>, _>>()?;
        if perms.is_empty() {
            return Err(WireError::BadPayload("empty permission list").into());
        }
        Ok(perms)
    }

    /// `perms[0]` is the owner / default entry; at least one entry is required.
    fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::InvalidArgument("empty permission list".into()));
        }
        let strs: Vec<String> = perms.iter().map(Perm::to_string).collect();
        let mut parts: Vec<&[u8]> = vec![check_str(path)?];
        parts.extend(strs.iter().map(|s| s.as_bytes()));
        self.request(MsgType::SetPerms, join_strings(&parts)).map(drop)
    }
}

/// A connection to xenstored.
#[derive(Debug)]
pub struct Client {
    transport: Transport,
    decoder: Decoder,
    events: VecDeque<WatchEvent>,
    next_req_id: u32,
    broken: bool,
    request_timeout: Option<Duration>,
    tx_retries: u32,
}

impl Client {
    /// Connects like libxenstore: `$XENSTORED_PATH` or `/run/xenstored/socket`, falling back
    /// to `/dev/xen/xenbus`.
    pub fn open() -> Result<Self, XsError> {
        Ok(Self::new(Transport::open_default()?))
    }

    pub fn connect_socket(path: &Path) -> Result<Self, XsError> {
        Ok(Self::new(Transport::connect_socket(path)?))
    }

    pub fn open_device(path: &Path) -> Result<Self, XsError> {
        Ok(Self::new(Transport::open_device(path)?))
    }

    pub fn new(transport: Transport) -> Self {
        Client {
            transport,
            decoder: Decoder::new(),
            events: VecDeque::new(),
            next_req_id: 1,
            broken: false,
            request_timeout: None,
            tx_retries: DEFAULT_TX_RETRIES,
        }
    }

    /// Bounds how long a request waits for its reply (default: forever, like libxenstore).
    /// A timed-out request's late reply is recognised by its req_id and dropped.
    pub fn set_request_timeout(&mut self, t: Option<Duration>) {
        self.request_timeout = t;
    }

    /// How many times [`Client::transaction`] retries after EAGAIN.
    pub fn set_transaction_retries(&mut self, n: u32) {
        self.tx_retries = n;
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Registers a watch on `path` (and its subtree). xenstored fires it once right away.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let p = join_strings(&[check_str(path)?, check_str(token)?]);
        self.request_tx(MsgType::Watch, 0, p).map(drop)
    }

    /// Removes a watch and drops its already-queued events.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let p = join_strings(&[check_str(path)?, check_str(token)?]);
        self.request_tx(MsgType::Unwatch, 0, p)?;
        let sub = format!("{}/", path.trim_end_matches('/'));
        self.events.retain(|e| !(e.token == token && (e.path == path || e.path.starts_with(&sub))));
        Ok(())
    }

    /// Whether events are already queued (they will not make the fd readable again).
    pub fn has_queued_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Reads whatever is available without blocking and returns all queued events in
    /// arrival order.
    pub fn poll_events(&mut self) -> Result<Vec<WatchEvent>, XsError> {
        // Bounded so a daemon flooding events cannot pin the caller here.
        let mut res = Ok(());
        for _ in 0..64 {
            match self.drain_frames(None).and_then(|_| self.fill(Some(Duration::ZERO))) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        if let (Err(e), true) = (res, self.events.is_empty()) {
            return Err(e);
        }
        Ok(self.events.drain(..).collect())
    }

    /// Next event, waiting up to `timeout`; `Ok(None)` on timeout.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, XsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            self.drain_frames(None)?;
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.fill(Some(left))? && left.is_zero() {
                return Ok(None);
            }
        }
    }

    /// Starts a transaction; it is aborted on drop unless committed.
    pub fn transaction_start(&mut self) -> Result<Transaction<'_>, XsError> {
        let reply = self.request_tx(MsgType::TransactionStart, 0, vec![0])?;
        let s = reply.strip_suffix(&[0]).unwrap_or(&reply);
        let id = std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&id| id != 0)
            .ok_or(WireError::BadPayload("transaction id"))?;
        Ok(Transaction { client: self, id, done: false })
    }

    /// Runs `f` in a transaction and commits; on EAGAIN (conflict) the whole closure is run
    /// again in a fresh transaction, at most the configured number of retries. Any other
    /// error from `f` aborts the transaction and is returned.
    pub fn transaction<T, F>(&mut self, mut f: F) -> Result<T, XsError>
    where
        F: FnMut(&mut Transaction<'_>) -> Result<T, XsError>,
    {
        let attempts = self.tx_retries.saturating_add(1);
        for attempt in 1..=attempts {
            let mut tx = self.transaction_start()?;
            match f(&mut tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(XsError::Daemon(Errno::Eagain)) => {}
                    Err(e) => return Err(e),
                },
                Err(XsError::Daemon(Errno::Eagain)) => {
                    let _ = tx.abort();
                }
                Err(e) => {
                    if let Err(ae) = tx.abort() {
                        debug!("xenstore: abort after failed transaction body: {ae}");
                    }
                    return Err(e);
                }
            }
            debug!("xenstore: transaction conflict (EAGAIN), attempt {attempt}/{attempts}");
        }
        Err(XsError::TxRetriesExhausted(attempts))
    }

    fn alloc_req_id(&mut self) -> u32 {
        let id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1);
        id
    }

    fn request_tx(&mut self, ty: MsgType, tx_id: u32, payload: Vec<u8>) -> Result<Vec<u8>, XsError> {
        if self.broken {
            return Err(XsError::Broken);
        }
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(XsError::TooLarge(payload.len()));
        }
        let req_id = self.alloc_req_id();
        let bytes = Message { ty, req_id, tx_id, payload }.encode()?;
        // One write per message: the xenbus device wants whole messages.
        if let Err(e) = self.transport.write_all(&bytes) {
            self.broken = true;
            return Err(e.into());
        }
        let deadline = self.request_timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(reply) = self.drain_frames(Some(req_id))? {
                // Queue events that arrived right behind the reply so callers see them.
                if let Err(e) = self.drain_frames(None) {
                    warn!("xenstore: after reply: {e}");
                }
                return match reply.ty {
                    MsgType::Error => Err(XsError::Daemon(Errno::from_payload(&reply.payload))),
                    t if t == ty => Ok(reply.payload),
                    got => {
                        self.broken = true;
                        Err(XsError::UnexpectedReply { expected: ty, got })
                    }
                };
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !self.fill(left)? && left.is_some_and(|l| l.is_zero()) {
                return Err(XsError::Timeout);
            }
        }
    }

    /// Decodes buffered frames: events are queued; with `want` the first frame carrying
    /// that req_id is returned. Other replies (late answers to timed-out requests) are dropped.
    fn drain_frames(&mut self, want: Option<u32>) -> Result<Option<Message>, XsError> {
        if self.broken {
            return Err(XsError::Broken);
        }
        loop {
            let msg = match self.decoder.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            if msg.ty == MsgType::WatchEvent {
                self.queue_event(&msg.payload);
            } else if want == Some(msg.req_id) {
                return Ok(Some(msg));
            } else {
                warn!("xenstore: dropping unmatched {:?} reply (req_id {})", msg.ty, msg.req_id);
            }
        }
    }

    fn queue_event(&mut self, payload: &[u8]) {
        match split_strings(payload) {
            Ok(v) if v.len() >= 2 => {
                let mut it = v.into_iter();
                if let (Some(path), Some(token)) = (it.next(), it.next()) {
                    self.events.push_back(WatchEvent { path, token });
                }
            }
            _ => warn!("xenstore: dropping malformed watch event ({} bytes)", payload.len()),
        }
    }

    /// Waits for readability and reads once into the decoder. Ok(false) on timeout.
    fn fill(&mut self, timeout: Option<Duration>) -> Result<bool, XsError> {
        if self.broken {
            return Err(XsError::Broken);
        }
        if !wait_readable(self.transport.as_raw_fd(), timeout)? {
            return Ok(false);
        }
        let mut buf = [0u8; HEADER_LEN + XENSTORE_PAYLOAD_MAX];
        match self.transport.read(&mut buf) {
            Ok(0) => {
                self.broken = true;
                Err(XsError::Closed)
            }
            Ok(n) => {
                self.decoder.push(&buf[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => Ok(true),
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }
}

impl XenStore for Client {
    fn request(&mut self, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>, XsError> {
        self.request_tx(ty, 0, payload)
    }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.transport.as_raw_fd()
    }
}

/// An open transaction. Node operations through it see and stage a private view;
/// [`Transaction::commit`] may fail with `XsError::Daemon(Errno::Eagain)` on conflict.
#[derive(Debug)]
pub struct Transaction<'a> {
    client: &'a mut Client,
    id: u32,
    done: bool,
}

impl Transaction<'_> {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn commit(mut self) -> Result<(), XsError> {
        self.end(true)
    }

    pub fn abort(mut self) -> Result<(), XsError> {
        self.end(false)
    }

    fn end(&mut self, commit: bool) -> Result<(), XsError> {
        // The daemon forgets the transaction whatever the outcome (also on EAGAIN).
        self.done = true;
        let p = join_strings(&[if commit { b"T" } else { b"F" }]);
        self.client.request_tx(MsgType::TransactionEnd, self.id, p).map(drop)
    }
}

impl XenStore for Transaction<'_> {
    fn request(&mut self, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>, XsError> {
        self.client.request_tx(ty, self.id, payload)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.end(false) {
                debug!("xenstore: abort of dropped transaction {}: {e}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::super::fake::FakeXenstored;
    use super::*;

    fn connect(fake: &FakeXenstored) -> Client {
        let mut c = Client::connect_socket(&fake.path).unwrap();
        // Keeps a broken test from hanging the suite.
        c.set_request_timeout(Some(Duration::from_secs(5)));
        c
    }

    fn exercise_basic_ops(c: &mut Client) {
        c.write("/local/domain/0/device-model/5/state", b"running").unwrap();
        assert_eq!(c.read("/local/domain/0/device-model/5/state").unwrap(), b"running");
        assert_eq!(c.read_string("/local/domain/0/device-model/5/state").unwrap(), "running");
        // Parents were created implicitly.
        assert_eq!(c.directory("/local/domain/0").unwrap(), vec!["device-model"]);
        c.mkdir("/local/domain/0/device-model/5/backends").unwrap();
        c.mkdir("/local/domain/0/device-model/5/backends").unwrap(); // idempotent
        assert_eq!(c.read("/local/domain/0/device-model/5/backends").unwrap(), b"");
        let mut kids = c.directory("/local/domain/0/device-model/5").unwrap();
        kids.sort();
        assert_eq!(kids, vec!["backends", "state"]);
        assert_eq!(c.directory("/local/domain/0/device-model/5/state").unwrap(), Vec::<String>::new());
        // Binary values survive (no NUL termination on the wire).
        c.write("/bin", b"a\0b\xff").unwrap();
        assert_eq!(c.read("/bin").unwrap(), b"a\0b\xff");
        assert_eq!(c.try_read("/nope").unwrap(), None);
        assert_eq!(c.try_read("/bin").unwrap().as_deref(), Some(&b"a\0b\xff"[..]));

        assert_eq!(c.get_perms("/bin").unwrap(), vec![Perm::new(Access::None, 0)]);
        let perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, 1), Perm::new(Access::Both, 7)];
        c.set_perms("/bin", &perms).unwrap();
        assert_eq!(c.get_perms("/bin").unwrap(), perms);

        c.rm("/local/domain/0/device-model/5").unwrap();
        assert!(c.read("/local/domain/0/device-model/5/state").unwrap_err().is_enoent());
        assert_eq!(c.directory("/local/domain/0/device-model").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn all_node_operations() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        exercise_basic_ops(&mut c);
    }

    #[test]
    fn partial_reads_from_a_dribbling_daemon() {
        let fake = FakeXenstored::start();
        fake.set_dribble(true);
        let mut c = connect(&fake);
        exercise_basic_ops(&mut c);
        c.watch("/w", "t").unwrap();
        c.write("/w/x", b"1").unwrap();
        let ev = c.poll_events().unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1], WatchEvent { path: "/w/x".into(), token: "t".into() });
    }

    #[test]
    fn perm_strings() {
        assert_eq!("r1".parse::<Perm>().unwrap(), Perm::new(Access::Read, 1));
        assert_eq!("n0".parse::<Perm>().unwrap(), Perm::new(Access::None, 0));
        assert_eq!("w32752".parse::<Perm>().unwrap(), Perm::new(Access::Write, 0x7ff0));
        assert_eq!("b65535".parse::<Perm>().unwrap().to_string(), "b65535");
        for bad in ["", "r", "x1", "r-1", "r+1", "r65536", "r1 ", "1r"] {
            assert!(bad.parse::<Perm>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn daemon_errors_are_mapped() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        assert!(matches!(c.read("/missing"), Err(XsError::Daemon(Errno::Enoent))));
        assert!(matches!(c.write("/ro/x", b"1"), Err(XsError::Daemon(Errno::Eacces))));
        assert!(matches!(c.rm("/missing"), Err(XsError::Daemon(Errno::Enoent))));
        assert!(matches!(c.get_perms("/missing"), Err(XsError::Daemon(Errno::Enoent))));
        assert!(matches!(c.unwatch("/x", "never"), Err(XsError::Daemon(Errno::Enoent))));
        assert!(matches!(c.read("relative"), Err(XsError::Daemon(Errno::Einval))));
        // A perm string the daemon refuses, sent raw.
        c.write("/p", b"").unwrap();
        let raw = join_strings(&[b"/p", b"q9"]);
        assert!(matches!(c.request(MsgType::SetPerms, raw), Err(XsError::Daemon(Errno::Einval))));
        // An unsupported request type answers ENOSYS.
        assert!(matches!(c.request(MsgType::Introduce, vec![0]), Err(XsError::Daemon(Errno::Enosys))));
        // Client-side argument checks send nothing.
        assert!(matches!(c.read(""), Err(XsError::InvalidArgument(_))));
        assert!(matches!(c.read("/a\0b"), Err(XsError::InvalidArgument(_))));
        assert!(matches!(c.watch("/a", ""), Err(XsError::InvalidArgument(_))));
        assert!(matches!(c.set_perms("/p", &[]), Err(XsError::InvalidArgument(_))));
        // The connection is fine after all of that.
        c.write("/ok", b"yes").unwrap();
        assert_eq!(c.read("/ok").unwrap(), b"yes");
        assert_eq!(XsError::Daemon(Errno::Eagain).to_string(), "xenstored replied EAGAIN");
    }

    #[test]
    fn oversized_payloads_refused_before_sending() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        let path = "/big";
        // path + NUL + value == XENSTORE_PAYLOAD_MAX exactly is legal.
        let max_val = vec![b'v'; XENSTORE_PAYLOAD_MAX - path.len() - 1];
        c.write(path, &max_val).unwrap();
        assert_eq!(c.read(path).unwrap(), max_val);
        let too_big = vec![b'v'; max_val.len() + 1];
        assert!(matches!(c.write(path, &too_big), Err(XsError::TooLarge(4097))));
        let long_path = format!("/{}", "x".repeat(XENSTORE_PAYLOAD_MAX));
        assert!(matches!(c.read(&long_path), Err(XsError::TooLarge(_))));
        // Nothing reached the daemon; the stream is still in sync.
        assert_eq!(c.read(path).unwrap(), max_val);
    }

    #[test]
    fn oversized_reply_is_an_error_not_a_panic() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        assert!(matches!(c.read("/fake/oversized"), Err(XsError::Protocol(WireError::Oversized(5000)))));
        assert!(matches!(c.read("/a"), Err(XsError::Broken)));
        assert!(matches!(c.poll_events(), Err(XsError::Broken)));
        assert!(matches!(c.wait_event(Duration::ZERO), Err(XsError::Broken)));
    }

    #[test]
    fn truncated_reply_then_eof() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        assert!(matches!(c.read("/fake/truncated"), Err(XsError::Closed)));
        assert!(matches!(c.read("/a"), Err(XsError::Broken)));
    }

    #[test]
    fn garbage_reply_stream() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.set_request_timeout(Some(Duration::from_millis(500)));
        let e = c.read("/fake/garbage").unwrap_err();
        assert!(matches!(e, XsError::Protocol(_) | XsError::Timeout), "{e:?}");
    }

    #[test]
    fn garbage_or_eof_from_raw_peer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut c = Client::new(Transport::Socket(a));
        assert_eq!(c.poll_events().unwrap(), vec![]);
        // Half a header: nothing yet, no error.
        b.write_all(&[15, 0, 0]).unwrap();
        assert_eq!(c.poll_events().unwrap(), vec![]);
        assert_eq!(c.wait_event(Duration::from_millis(20)).unwrap(), None);
        // Rest of a valid event frame, then junk with an unknown type.
        let ev = join_strings(&[b"/x", b"t"]);
        let mut rest = vec![0u8; 9];
        rest.extend_from_slice(&(ev.len() as u32).to_le_bytes());
        rest.extend_from_slice(&ev);
        rest.extend_from_slice(&[0xee; 16]);
        b.write_all(&rest).unwrap();
        // The good event is still delivered; the error surfaces on the next call.
        assert_eq!(c.poll_events().unwrap(), vec![WatchEvent { path: "/x".into(), token: "t".into() }]);
        assert!(matches!(c.poll_events(), Err(XsError::Broken)));

        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(Transport::Socket(a));
        drop(b);
        assert!(matches!(c.wait_event(Duration::from_secs(1)), Err(XsError::Closed)));
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(Transport::Socket(a));
        drop(b);
        assert!(c.read("/x").is_err());
    }

    #[test]
    fn stale_and_mismatched_replies() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        // A reply with a foreign req_id is skipped; ours is returned.
        assert_eq!(c.read("/fake/stale").unwrap(), b"fresh");
        // A malformed watch event is dropped, the reply still arrives.
        assert_eq!(c.read("/fake/badevent").unwrap(), b"after");
        assert!(!c.has_queued_events());
        c.write("/a", b"1").unwrap();
        // Reply type that does not match the request.
        assert!(matches!(
            c.read("/fake/wrongtype"),
            Err(XsError::UnexpectedReply { expected: MsgType::Read, got: MsgType::Write })
        ));
    }

    #[test]
    fn timed_out_request_late_reply_is_dropped() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.write("/a", b"1").unwrap();
        c.set_request_timeout(Some(Duration::from_millis(50)));
        assert!(matches!(c.read("/fake/slow"), Err(XsError::Timeout)));
        std::thread::sleep(Duration::from_millis(400));
        c.set_request_timeout(Some(Duration::from_secs(5)));
        assert_eq!(c.read("/a").unwrap(), b"1");
    }

    #[test]
    fn watch_events_ordering_and_unwatch() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.watch("/local/domain/5/device", "dev").unwrap();
        c.watch("/other", "oth").unwrap();
        // The initial events came after the replies and are queued.
        assert!(c.has_queued_events());
        // The fake (like xenstored) sends the event for our own write *before* the reply.
        c.write("/local/domain/5/device/vbd/768/state", b"1").unwrap();
        c.write("/unwatched", b"x").unwrap();
        c.write("/local/domain/5/device", b"").unwrap();
        let ev = c.poll_events().unwrap();
        let got: Vec<(&str, &str)> = ev.iter().map(|e| (e.path.as_str(), e.token.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("/local/domain/5/device", "dev"),
                ("/other", "oth"),
                ("/local/domain/5/device/vbd/768/state", "dev"),
                ("/local/domain/5/device", "dev"),
            ]
        );
        assert!(!c.has_queued_events());
        assert_eq!(c.poll_events().unwrap(), vec![]);

        // rm of a parent fires a watch on a node below it.
        c.write("/other/leaf", b"1").unwrap();
        c.rm("/other").unwrap();
        let ev = c.poll_events().unwrap();
        assert_eq!(ev.iter().filter(|e| e.token == "oth").count(), 2);

        // unwatch drops events already queued for that watch and stops new ones.
        c.write("/local/domain/5/device/x", b"1").unwrap();
        c.write("/other", b"1").unwrap();
        c.unwatch("/local/domain/5/device", "dev").unwrap();
        c.write("/local/domain/5/device/y", b"1").unwrap();
        let ev = c.poll_events().unwrap();
        assert_eq!(ev, vec![WatchEvent { path: "/other".into(), token: "oth".into() }]);
        assert!(matches!(c.watch("/other", "oth"), Err(XsError::Daemon(Errno::Eexist))));
    }

    #[test]
    fn wait_event_from_another_connection() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.watch("/local/domain/0/device-model/3", "dm").unwrap();
        assert_eq!(c.wait_event(Duration::from_secs(1)).unwrap().unwrap().token, "dm");
        assert_eq!(c.wait_event(Duration::from_millis(30)).unwrap(), None);
        let path = fake.path.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut other = Client::connect_socket(&path).unwrap();
            other.write("/local/domain/0/device-model/3/command", b"go").unwrap();
        });
        let ev = c.wait_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(ev.path, "/local/domain/0/device-model/3/command");
        writer.join().unwrap();
        // An event written by someone else while we wait for our own reply is kept too.
        fake.external_write("/local/domain/0/device-model/3/x", b"1");
        assert_eq!(c.read("/local/domain/0/device-model/3/command").unwrap(), b"go");
        assert!(c.has_queued_events());
        assert_eq!(c.wait_event(Duration::ZERO).unwrap().unwrap().path, "/local/domain/0/device-model/3/x");
    }

    #[test]
    fn explicit_transactions() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.write("/t/a", b"old").unwrap();
        let mut tx = c.transaction_start().unwrap();
        assert_ne!(tx.id(), 0);
        tx.write("/t/a", b"new").unwrap();
        tx.write("/t/b", b"2").unwrap();
        assert_eq!(tx.read("/t/a").unwrap(), b"new");
        tx.commit().unwrap();
        assert_eq!(c.read("/t/a").unwrap(), b"new");
        assert_eq!(c.read("/t/b").unwrap(), b"2");

        let mut tx = c.transaction_start().unwrap();
        tx.rm("/t/b").unwrap();
        tx.abort().unwrap();
        assert_eq!(c.read("/t/b").unwrap(), b"2");

        {
            let mut tx = c.transaction_start().unwrap();
            tx.write("/t/c", b"dropped").unwrap();
        } // dropped => aborted
        assert!(c.read("/t/c").unwrap_err().is_enoent());
        let st = fake.state.lock().unwrap();
        assert_eq!((st.tx_started, st.tx_committed, st.tx_aborted), (3, 1, 2));
    }

    #[test]
    fn transaction_helper_retries_on_eagain() {
        let fake = FakeXenstored::start();
        let mut c = connect(&fake);
        c.write("/cnt", b"0").unwrap();
        fake.set_force_eagain(1);
        let mut runs = 0;
        let out = c
            .transaction(|tx| {
                runs += 1;
                let v: u32 = tx.read_string("/cnt")?.parse().unwrap();
                tx.write("/cnt", (v + 1).to_string().as_bytes())?;
                Ok(v + 1)
            })
            .unwrap();
        assert_eq!((out, runs), (1, 2));
        assert_eq!(c.read("/cnt").unwrap(), b"1");

        // A real conflict: someone else writes between our read and commit (first run only).
        let mut runs = 0;
        c.transaction(|tx| {
            runs += 1;
            let v: u32 = tx.read_string("/cnt")?.parse().unwrap();
            if runs == 1 {
                fake.external_write("/cnt", b"10");
            }
            tx.write("/cnt", (v + 1).to_string().as_bytes())
        })
        .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(c.read("/cnt").unwrap(), b"11");

        // Bounded retries.
        c.set_transaction_retries(2);
        fake.set_force_eagain(100);
        let mut runs = 0;
        let e = c.transaction(|tx| {
            runs += 1;
            tx.write("/cnt", b"x")
        });
        assert!(matches!(e, Err(XsError::TxRetriesExhausted(3))));
        assert_eq!(runs, 3);
        fake.set_force_eagain(0);
        assert_eq!(c.read("/cnt").unwrap(), b"11");

        // Any other error aborts and is returned without retry.
        let mut runs = 0;
        let e = c.transaction(|tx| {
            runs += 1;
            tx.write("/cnt", b"y")?;
            tx.read("/missing")
        });
        assert!(e.unwrap_err().is_enoent());
        assert_eq!(runs, 1);
        assert_eq!(c.read("/cnt").unwrap(), b"11");
        let st = fake.state.lock().unwrap();
        assert!(st.txs.is_empty(), "no transaction left open");
    }

    #[test]
    fn xenstored_path_is_honoured() {
        let fake = FakeXenstored::start();
        // The only test that touches the environment.
        std::env::set_var("XENSTORED_PATH", &fake.path);
        let c = Client::open();
        std::env::remove_var("XENSTORED_PATH");
        let mut c = c.unwrap();
        assert!(!c.transport().is_device());
        c.write("/via-env", b"1").unwrap();
        assert_eq!(c.read("/via-env").unwrap(), b"1");
        assert!(c.as_raw_fd() >= 0);

        let missing = fake.path.with_file_name("no-such-socket");
        let t = Transport::open_with(Some(missing.clone().into()));
        if !Path::new(super::super::XENBUS_DEVICE).exists() {
            let msg = t.unwrap_err().to_string();
            assert!(msg.contains("no-such-socket") && msg.contains("/dev/xen/xenbus"), "{msg}");
        }
        let mut c = Client::new(Transport::open_with(Some(fake.path.clone().into())).unwrap());
        assert_eq!(c.read("/via-env").unwrap(), b"1");
    }
}
