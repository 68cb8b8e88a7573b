//! Character backends for the serial port: stdio, an append-only file, or a pseudo-terminal whose
//! name is logged (and later reported through QMP query-chardev, as libxl expects).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use thiserror::Error;

use crate::config::SerialConfig;

#[derive(Debug, Error)]
pub enum ChardevError {
    #[error("opening serial file {path}: {err}")]
    File { path: String, err: std::io::Error },
    #[error("allocating a pty: {0}")]
    Pty(std::io::Error),
}

/// Output half (for the device) and an optional input source (read by a thread).
pub struct Chardev {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn Read + Send>>,
    /// The pty slave path, for `query-chardev` and the log.
    pub pty_path: Option<String>,
}

/// Stdout, flushed after every write so guest output appears as it happens.
struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// A file writer that flushes per write (so a crash loses nothing already printed).
struct FlushingFile(File);

impl Write for FlushingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

pub fn open(cfg: &SerialConfig) -> Result<Option<Chardev>, ChardevError> {
    Ok(match cfg {
        SerialConfig::None => None,
        SerialConfig::Stdio => Some(Chardev {
            output: Box::new(FlushingStdout),
            // Only read stdin when it is a terminal or pipe someone writes to; /dev/null gives EOF.
            input: Some(Box::new(std::io::stdin())),
            pty_path: None,
        }),
        SerialConfig::File(p) => {
            Some(Chardev { output: Box::new(FlushingFile(open_append(p)?)), input: None, pty_path: None })
        }
        SerialConfig::Pty => {
            let (master, path) = open_pty().map_err(ChardevError::Pty)?;
            let reader = master.try_clone().map_err(ChardevError::Pty)?;
            log::info!("char device redirected to {path} (label serial0)");
            Some(Chardev {
                output: Box::new(FlushingFile(master)),
                input: Some(Box::new(reader)),
                pty_path: Some(path),
            })
        }
    })
}

pub fn open_append(p: &Path) -> Result<File, ChardevError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|err| ChardevError::File { path: p.display().to_string(), err })
}

fn open_pty() -> std::io::Result<(File, String)> {
    // SAFETY: posix_openpt has no memory-safety preconditions; we check the result.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own; File takes over closing it.
    let master = unsafe { File::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt take a valid pty master fd, which `master` holds.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: `buf` is writable for its full length, which we pass.
    if unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ptsname_r NUL-terminated the name inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    // Raw mode on the slave side so the guest's bytes pass through unchanged.
    if let Ok(slave) = OpenOptions::new().read(true).write(true).open(&name) {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `slave` is an open tty and `t` a valid termios to fill / read.
        unsafe {
            if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
    }
    // Non-blocking: with no one attached to the slave, the tty buffer fills after a few KiB and
    // a blocking write would stall the device model (and every vCPU behind it). The UART drops
    // the byte instead, as QEMU's pty backend does when nobody is connected.
    // SAFETY: fcntl on the fd `master` owns; no pointers involved.
    unsafe {
        let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    Ok((master, name))
}

/// Feeds bytes from `input` to `sink` until EOF or error, on its own thread.
pub fn spawn_input(mut input: Box<dyn Read + Send>, sink: impl Fn(&[u8]) + Send + 'static) {
    let _ = std::thread::Builder::new().name("serial-in".into()).spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match input.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => sink(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Non-blocking pty master with nothing to read.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                // A pty master reads EIO while no one has the slave open: wait and retry.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    std::thread::sleep(std::time::Duration::from_millis(200))
                }
                Err(_) => return,
            }
        }
    });
}
