//! Guest memory as devices see it (DMA). The backend implements [`GuestRam`] over its own memory
//! (vm-memory on KVM, a map cache over xenforeignmemory on Xen). Every address here is
//! guest-controlled, so every access is fallible.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum GuestMemError {
    #[error("guest physical range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: usize },
}

/// A transfer between guest memory and a host file failed on one side or the other.
#[derive(Debug, Error)]
pub enum GuestFileError {
    /// The guest range is not RAM (a DMA fault: the controller's error, not the drive's).
    #[error(transparent)]
    Mem(#[from] GuestMemError),
    /// The host read or write failed (the drive's error).
    #[error("host file I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub trait GuestRam: Send + Sync {
    /// Copies `buf.len()` bytes from guest physical `gpa`. Fails without side effects if any part of
    /// the range is not guest RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError>;
    /// Copies `buf` to guest physical `gpa`. Fails without writing if any part is not guest RAM.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemError>;

    fn read_u32(&self, gpa: u64) -> Result<u32, GuestMemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_u64(&self, gpa: u64) -> Result<u64, GuestMemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), GuestMemError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Reads `len` bytes at `offset` of `file` into guest memory at `gpa` (disk DMA from a raw
    /// image). This default goes through a bounce buffer; a backend whose RAM is mapped in this
    /// process overrides it with one `pread` straight into the mapping (one copy instead of two).
    fn read_from_file(&self, gpa: u64, len: usize, file: &File, offset: u64) -> Result<(), GuestFileError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        self.write(gpa, &buf)?;
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `gpa` to `file` at `offset` (disk DMA to a raw
    /// image); the counterpart of [`GuestRam::read_from_file`].
    fn write_to_file(&self, gpa: u64, len: usize, file: &File, offset: u64) -> Result<(), GuestFileError> {
        let mut buf = vec![0u8; len];
        self.read(gpa, &mut buf)?;
        file.write_all_at(&buf, offset)?;
        Ok(())
    }
}

/// A flat RAM for unit tests and fuzzers: guest physical 0..len.
#[derive(Debug)]
pub struct TestRam {
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl TestRam {
    pub fn new(len: usize) -> Self {
        TestRam { bytes: std::sync::Mutex::new(vec![0; len]) }
    }
    fn range(&self, gpa: u64, len: usize, total: usize) -> Result<std::ops::Range<usize>, GuestMemError> {
        let err = GuestMemError::OutOfRange { gpa, len };
        let start = usize::try_from(gpa).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > total {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl GuestRam for TestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.range(gpa, buf.len(), b.len())?;
        buf.copy_from_slice(&b[r]);
        Ok(())
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.range(gpa, buf.len(), b.len())?;
        b[r].copy_from_slice(buf);
        Ok(())
    }
}
