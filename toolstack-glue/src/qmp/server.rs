//! QMP over AF_UNIX stream sockets: a non-blocking listener on a path (stale socket unlinked
//! first) or on an inherited, already listening fd (`-chardev socket,fd=N` with `-S`), serving
//! one connection at a time as QEMU's socket chardev does (further clients wait in the listen
//! backlog), and SCM_RIGHTS descriptor passing for `add-fd`/`getfd`.
//!
//! Everything is non-blocking and edge-trigger safe: register [`QmpServer::listener_fd`] and
//! [`QmpServer::connection_fd`] (readable, plus writable while [`QmpServer::wants_write`]) with
//! mio and call [`QmpServer::service`] on any readiness; it works until a syscall would block.
//! Re-register when `connection_fd` changes.

use super::{Dispatcher, Event, Session, Version};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Most descriptors accepted with one message (libxl sends one).
pub const MAX_FDS_PER_MESSAGE: usize = 8;
const READ_CHUNK: usize = 64 * 1024;

/// Receives bytes and any SCM_RIGHTS descriptors (close-on-exec) without blocking.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    const FD_BYTES: usize = MAX_FDS_PER_MESSAGE * size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES as u32) } as usize;
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at iov (covering `buf`) and `control`, both live and writable for
        // the lengths given; the kernel writes at most those lengths.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR reads only msg_control/msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null cmsg from CMSG_FIRSTHDR/CMSG_NXTHDR points at a complete header
        // inside `control`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_DATA of a valid header points at its payload inside `control`.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            let header_len = data as usize - cmsg as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / size_of::<libc::c_int>();
            for i in 0..count {
                // SAFETY: `count` ints fit in the payload (cmsg_len bounds it, and the kernel
                // never reports more than msg_controllen); read_unaligned copes with alignment.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i)) };
                // SAFETY: SCM_RIGHTS installed this fd in our table just now; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: msg and cmsg are valid as above; CMSG_NXTHDR returns null past the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!("qmp: peer sent more than {MAX_FDS_PER_MESSAGE} descriptors; extra ones were discarded");
    }
    Ok((n, fds))
}

/// Sends bytes with descriptors attached to the first byte (as libxl does for `add-fd`).
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let (space, len) =
        unsafe { (libc::CMSG_SPACE(fd_bytes as u32) as usize, libc::CMSG_LEN(fd_bytes as u32)) };
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: all-zero is a valid empty msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` writable bytes, enough for one header.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: cmsg is non-null (the buffer holds a header) and points into `control`; the
        // payload written below is fd_bytes long, which CMSG_SPACE reserved.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg references `iov` (over `data`, only read) and `control`, both live.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Non-blocking send that never raises SIGPIPE.
fn send_nosignal(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: data is a live slice of the given length, only read by the kernel.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are live locals of the sizes passed.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// A listening QMP socket.
pub struct QmpListener {
    listener: UnixListener,
    /// Path we bound and its inode, unlinked on drop if still ours.
    bound: Option<(PathBuf, u64, u64)>,
}

impl QmpListener {
    /// Binds `path`, first removing a stale socket left by a previous run (never another kind
    /// of file).
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Self { listener, bound: Some((path.to_path_buf(), m.dev(), m.ino())) })
    }

    /// Adopts an inherited descriptor after checking it is a listening AF_UNIX stream socket.
    /// Call at most once per fd number: the listener owns and eventually closes it.
    pub fn from_inherited_fd(fd: RawFd) -> io::Result<Self> {
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: borrowing only for the checks below; fcntl(F_GETFD) fails with EBADF if the
        // number is not open, before anything else uses it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        // SAFETY: F_GETFD takes no pointer argument.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd}: {what}"));
        if sockopt_int(borrowed, libc::SO_DOMAIN).map_err(|_| bad("not a socket"))? != libc::AF_UNIX {
            return Err(bad("not an AF_UNIX socket"));
        }
        if sockopt_int(borrowed, libc::SO_TYPE)? != libc::SOCK_STREAM {
            return Err(bad("not a stream socket"));
        }
        if sockopt_int(borrowed, libc::SO_ACCEPTCONN)? == 0 {
            return Err(bad("not listening"));
        }
        // SAFETY: the fd is open and is a listening socket (checked above); libxl passed it to
        // this process for the QMP server, and the caller hands it over exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Keep it from leaking into anything we exec.
        // SAFETY: F_SETFD with an int flag argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = UnixListener::from(owned);
        listener.set_nonblocking(true)?;
        Ok(Self { listener, bound: None })
    }

    /// Accepts one pending client, if any.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client went away between connect and accept.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for QmpListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for QmpListener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.bound {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// One client connection and its protocol session.
pub struct QmpConnection {
    stream: UnixStream,
    session: Session,
    eof: bool,
    buf: Vec<u8>,
}

impl QmpConnection {
    pub fn new(stream: UnixStream, version: &Version) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, session: Session::new(version), eof: false, buf: vec![0; READ_CHUNK] })
    }

    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    pub fn wants_write(&self) -> bool {
        !self.session.output().is_empty()
    }

    /// Reads, executes and writes until blocked. Ok(false) once the connection is finished.
    pub fn service(&mut self, d: &mut dyn Dispatcher) -> io::Result<bool> {
        loop {
            let mut progress = false;
            while !self.session.output().is_empty() {
                match send_nosignal(self.stream.as_fd(), self.session.output()) {
                    Ok(n) => {
                        self.session.consume_output(n);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                        return Ok(false)
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.session.output().is_empty() {
                // Commands held back by backpressure run now.
                self.session.process(d);
                progress |= !self.session.output().is_empty();
            }
            if self.eof {
                if self.session.output().is_empty() && !self.session.has_pending_input() {
                    return Ok(false);
                }
            } else if self.session.wants_input() {
                match recv_with_fds(self.stream.as_fd(), &mut self.buf) {
                    Ok((0, _)) => {
                        self.eof = true;
                        progress = true;
                    }
                    Ok((n, fds)) => {
                        self.session.receive(&self.buf[..n], fds, d);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            if !progress {
                return Ok(true);
            }
        }
    }
}

impl AsRawFd for QmpConnection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// A QMP monitor: a listener plus at most one active connection.
pub struct QmpServer {
    listener: QmpListener,
    version: Version,
    conn: Option<QmpConnection>,
    served: u64,
}

impl QmpServer {
    pub fn new(listener: QmpListener, version: Version) -> Self {
        Self { listener, version, conn: None, served: 0 }
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The active connection's fd; changes as clients come and go.
    pub fn connection_fd(&self) -> Option<RawFd> {
        self.conn.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub fn wants_write(&self) -> bool {
        self.conn.as_ref().is_some_and(QmpConnection::wants_write)
    }

    /// Connections accepted so far.
    pub fn connections_served(&self) -> u64 {
        self.served
    }

    /// Queues an event for the active connection (if negotiated); call `service` to send it.
    pub fn push_event(&mut self, ev: &Event) -> bool {
        self.conn.as_mut().is_some_and(|c| c.session.push_event(ev))
    }

    /// Does all work possible without blocking: serves the active connection, and when it ends
    /// accepts the next waiting client. A failing client is dropped and logged, not returned;
    /// errors are the listener's own.
    pub fn service(&mut self, d: &mut dyn Dispatcher) -> io::Result<()> {
        loop {
            if let Some(c) = &mut self.conn {
                match c.service(d) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(e) => log::warn!("qmp: connection dropped: {e}"),
                }
                self.conn = None;
            }
            match self.listener.accept()? {
                Some(stream) => {
                    self.served += 1;
                    match QmpConnection::new(stream, &self.version) {
                        Ok(c) => self.conn = Some(c),
                        Err(e) => log::warn!("qmp: cannot set up connection: {e}"),
                    }
                }
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::session::tests::TestMachine;
    use super::*;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::time::Duration;

    fn tmp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hvmdm-qmp-{}-{name}", std::process::id()))
    }

    /// Runs the server on this thread until `done` is set by the client thread.
    fn run<F: FnOnce() + Send + 'static>(mut server: QmpServer, m: &mut TestMachine, client: F) -> QmpServer {
        let h = std::thread::spawn(client);
        while !h.is_finished() {
            server.service(m).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        h.join().unwrap();
        server
    }

    struct Client {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl Client {
        fn connect(path: &Path) -> Self {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Self { r: BufReader::new(s.try_clone().unwrap()), w: s }
        }
        fn line(&mut self) -> Value {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            assert!(l.ends_with("\r\n"), "{l:?}");
            serde_json::from_str(&l).unwrap()
        }
        fn cmd(&mut self, s: &str) -> Value {
            self.w.write_all(s.as_bytes()).unwrap();
            self.line()
        }
    }

    #[test]
    fn sequential_connections_and_add_fd() {
        let path = tmp_path("seq");
        // A stale socket from a previous run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = QmpServer::new(QmpListener::bind(&path).unwrap(), Version::default());
        let mut m = TestMachine::default();
        let p = path.clone();
        let server = run(server, &mut m, move || {
            // libxl's spawn check: capabilities, query, close.
            let mut c = Client::connect(&p);
            assert_eq!(c.line()["QMP"]["version"]["qemu"]["major"], 7);
            assert_eq!(
                c.cmd("{\"execute\":\"qmp_capabilities\",\"id\":1}\r\n"),
                json!({"return": {}, "id": 1})
            );
            assert_eq!(c.cmd("{\"execute\":\"query-status\",\"id\":2}\r\n")["return"]["status"], "paused");
            drop(c);
            // Next connection redoes the handshake; second client waits in the backlog meanwhile.
            let mut c = Client::connect(&p);
            let mut waiting = Client::connect(&p);
            c.line();
            assert_eq!(c.cmd("{\"execute\":\"cont\",\"id\":1}\r\n")["error"]["class"], "CommandNotFound");
            c.cmd("{\"execute\":\"qmp_capabilities\",\"id\":2}\r\n");
            assert_eq!(c.cmd("{\"execute\":\"cont\",\"id\":3}\r\n"), json!({"return": {}, "id": 3}));
            // add-fd with SCM_RIGHTS on the first byte, as libxl sends it.
            let (mine, theirs) = UnixStream::pair().unwrap();
            let cmd = b"{\"execute\":\"add-fd\",\"id\":4}\r\n";
            let n = send_with_fds(c.w.as_fd(), cmd, &[theirs.as_fd()]).unwrap();
            assert_eq!(n, cmd.len());
            drop(theirs);
            let r = c.line();
            assert_eq!(r["return"]["fdset-id"], 0);
            assert!(r["return"]["fd"].as_i64().unwrap() >= 0);
            // The server holds the other end: writing to ours must succeed and stay open.
            (&mine).write_all(b"x").unwrap();
            c.w.shutdown(std::net::Shutdown::Both).unwrap();
            drop(c);
            // The waiting client is served next.
            assert!(waiting.line().get("QMP").is_some());
            assert_eq!(waiting.cmd("{\"execute\":\"qmp_capabilities\",\"id\":\"x\"}")["id"], "x");
            // Garbage, then a full command without a newline.
            let r = waiting.cmd("not-json!\r\n");
            assert_eq!(r["error"]["class"], "GenericError");
            assert_eq!(waiting.cmd("{\"execute\":\"query-fdsets\",\"id\":5}")["return"][0]["fdset-id"], 0);
        });
        assert_eq!(server.connections_served(), 3);
        assert_eq!(m.calls, vec!["query-status", "cont"]);
        // The stored fd is the other end of `mine` (already dropped by the client thread): it
        // must be readable with the byte written.
        let (fd, _) = m.fds.fdset(0).next().unwrap();
        let mut s = UnixStream::from(fd.try_clone_to_owned().unwrap());
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        drop(server);
        assert!(!path.exists(), "socket unlinked on drop");
    }

    #[test]
    fn inherited_listening_fd() {
        let path = tmp_path("inherit");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A client may connect before the server starts reading (backlog), as with -S.
        let early = UnixStream::connect(&path).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        let server = QmpServer::new(QmpListener::from_inherited_fd(fd).unwrap(), Version::default());
        let mut m = TestMachine::default();
        let server = run(server, &mut m, move || {
            let mut c = Client { r: BufReader::new(early.try_clone().unwrap()), w: early };
            c.w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert!(c.line().get("QMP").is_some());
            c.cmd("{\"execute\":\"qmp_capabilities\",\"id\":1}");
            assert_eq!(c.cmd("{\"execute\":\"query-status\",\"id\":2}")["return"]["status"], "paused");
        });
        assert_eq!(server.connections_served(), 1);
        drop(server);
        // Not bound by us: the path is left alone.
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn inherited_fd_must_be_a_listening_unix_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let e = QmpListener::from_inherited_fd(a.as_raw_fd()).err().unwrap();
        assert!(e.to_string().contains("not listening"), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = QmpListener::from_inherited_fd(f.as_raw_fd()).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(QmpListener::from_inherited_fd(-1).is_err());
    }

    #[test]
    fn bind_refuses_to_delete_a_regular_file() {
        let path = tmp_path("file");
        std::fs::write(&path, b"keep").unwrap();
        let e = QmpListener::bind(&path).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn recv_without_fds_and_too_many_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"hi").unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hi"[..], 0));
        let e = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let pairs: Vec<_> = (0..MAX_FDS_PER_MESSAGE + 1).map(|_| UnixStream::pair().unwrap().0).collect();
        let borrowed: Vec<_> = pairs.iter().map(|p| p.as_fd()).collect();
        assert!(send_with_fds(a.as_fd(), b"x", &borrowed).is_err());
        let n = send_with_fds(a.as_fd(), b"y", &borrowed[..2]).unwrap();
        assert_eq!(n, 1);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 2));
    }
}
