//! Byte transports to xenstored: its unix socket, or the xenbus character device (the
//! kernel relays the same wire protocol to the daemon over the shared ring).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Socket path when `XENSTORED_PATH` is unset (`/var/run` is a symlink to `/run` on Debian).
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";
/// Character device used when no daemon socket is reachable (e.g. in a driver domain).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// A connected byte stream to xenstored.
#[derive(Debug)]
pub enum Transport {
    Socket(UnixStream),
    Device(File),
}

impl Transport {
    pub fn connect_socket(path: &Path) -> io::Result<Self> {
        UnixStream::connect(path).map(Transport::Socket)
    }

    pub fn open_device(path: &Path) -> io::Result<Self> {
        OpenOptions::new().read(true).write(true).open(path).map(Transport::Device)
    }

    /// What libxenstore's `xs_open` does: the socket named by `XENSTORED_PATH` (default
    /// [`DEFAULT_SOCKET`]); if that fails, `XENSTORED_PATH` itself when it names a character
    /// device, else [`XENBUS_DEVICE`].
    pub fn open_default() -> io::Result<Self> {
        Self::open_with(std::env::var_os("XENSTORED_PATH"))
    }

    /// [`Transport::open_default`] with the environment value passed in (testable).
    pub fn open_with(xenstored_path: Option<OsString>) -> io::Result<Self> {
        let sock = xenstored_path.as_ref().map(PathBuf::from).unwrap_or_else(|| DEFAULT_SOCKET.into());
        let sock_err = match Self::connect_socket(&sock) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let dev = match xenstored_path.as_ref().map(PathBuf::from) {
            Some(p) if std::fs::metadata(&p).map(|m| m.file_type().is_char_device()).unwrap_or(false) => p,
            _ => PathBuf::from(XENBUS_DEVICE),
        };
        Self::open_device(&dev).map_err(|dev_err| {
            io::Error::new(
                dev_err.kind(),
                format!(
                    "xenstore unreachable: socket {}: {sock_err}; device {}: {dev_err}",
                    sock.display(),
                    dev.display()
                ),
            )
        })
    }

    pub fn is_device(&self) -> bool {
        matches!(self, Transport::Device(_))
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Socket(s) => s.read(buf),
            Transport::Device(f) => f.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Socket(s) => s.write(buf),
            Transport::Device(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Transport {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Transport::Socket(s) => s.as_raw_fd(),
            Transport::Device(f) => f.as_raw_fd(),
        }
    }
}

/// Waits until `fd` is readable (or has hung up). `None` waits forever. Returns false on
/// timeout. Used instead of O_NONBLOCK so the descriptor stays usable by blocking writes
/// and by a mio registration at the same time.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // Round up so a sub-millisecond remainder does not spin.
                left.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is a valid, exclusively borrowed pollfd array of length 1 for the
        // duration of the call; poll does not retain the pointer.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if ms == 0 {
                return Ok(false);
            }
            continue; // re-evaluate the deadline (spurious early wakeups)
        }
        // POLLHUP/POLLERR also count: the following read reports EOF or the error.
        return Ok(pfd.revents != 0);
    }
}
