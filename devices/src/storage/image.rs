//! Disk images as the storage controllers see them: a byte-addressed block of fixed length.
//!
//! [`BlockBackend`] takes `&self` so one image can later be shared with an I/O worker thread
//! (positional I/O needs no seek state). Formats other than raw (qcow2, see [`super::qcow2`])
//! implement the same trait; [`open_image`] opens a file in an explicitly named format.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("image I/O at offset {offset:#x} (+{len:#x}) failed: {source}")]
    Io { offset: u64, len: usize, source: std::io::Error },
    #[error("access {offset:#x}+{len:#x} is beyond the image end {size:#x}")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("image is read-only")]
    ReadOnly,
    #[error("image {path} is not a usable image of its format: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Image formats [`open_image`] understands. There is no probing: the user names the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("image format {other:?} is not supported (raw, qcow2)")),
        }
    }
}

/// Opens `path` as `format`. Never probes: `Qcow2` on a file without the qcow2 magic is an
/// error, while `Raw` on a file that has it is honoured (raw is raw; the guest then sees the
/// qcow2 bytes, as with QEMU's `format=raw`). Backing files of a qcow2 image open read-only,
/// relative to the image's directory.
pub fn open_image(
    path: impl AsRef<Path>,
    format: ImageFormat,
    read_only: bool,
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    let path = path.as_ref();
    Ok(match format {
        ImageFormat::Raw => {
            if super::qcow2::has_qcow2_magic(path) {
                log::warn!(
                    "{}: has the qcow2 magic but is opened as raw (pass format=qcow2?)",
                    path.display()
                );
            }
            Arc::new(RawFile::open(path, read_only)?)
        }
        ImageFormat::Qcow2 => Arc::new(super::qcow2::Qcow2Image::open(path, read_only)?),
    })
}

/// A disk image. Offsets and lengths are in bytes; callers keep accesses inside `len()`.
pub trait BlockBackend: Send + Sync {
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` at `offset`. Fails with [`BlockError::ReadOnly`] on a read-only image.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable (fdatasync for files).
    fn flush(&self) -> Result<(), BlockError>;
    /// Image size in bytes (fixed while attached).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn is_read_only(&self) -> bool;
    /// The file whose bytes are the disk, byte for byte (a raw image): controllers then move
    /// data between it and guest memory directly ([`crate::mem::GuestRam::read_from_file`]).
    /// `None` (the default) for formats with their own mapping, such as qcow2.
    fn host_file(&self) -> Option<&File> {
        None
    }
}

/// A shared image is an image (so an `Arc` from [`open_image`] fits APIs taking a `Box`).
impl<T: BlockBackend + ?Sized> BlockBackend for Arc<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn host_file(&self) -> Option<&File> {
        (**self).host_file()
    }
}

pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// A raw image file (or block device) accessed with pread/pwrite.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens `path`; `read_only` opens it O_RDONLY and makes writes fail.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let open_err = |source| BlockError::Open { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        Self::from_file(file, read_only).map_err(|e| match e {
            BlockError::Io { source, .. } => open_err(source),
            other => other,
        })
    }

    /// Wraps an open file. The size is taken once, now (block devices report it via seek).
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, BlockError> {
        use std::io::Seek;
        let size = file.seek(std::io::SeekFrom::End(0)).map_err(|source| BlockError::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        Ok(RawFile { file, size, read_only })
    }
}

impl BlockBackend for RawFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset).map_err(|source| BlockError::Io {
            offset,
            len: buf.len(),
            source,
        })
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset).map_err(|source| BlockError::Io {
            offset,
            len: buf.len(),
            source,
        })
    }
    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| BlockError::Io { offset: 0, len: 0, source })
    }
    fn len(&self) -> u64 {
        self.size
    }
    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// An in-memory image, for tests and fuzzers.
#[derive(Debug)]
pub struct MemImage {
    bytes: Mutex<Vec<u8>>,
    size: u64,
    read_only: bool,
    /// Number of `flush` calls, so tests can see that a flush reached the backend.
    flushes: Mutex<u64>,
}

impl MemImage {
    pub fn new(bytes: Vec<u8>, read_only: bool) -> Self {
        let size = bytes.len() as u64;
        MemImage { bytes: Mutex::new(bytes), size, read_only, flushes: Mutex::new(0) }
    }
    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn flush_count(&self) -> u64 {
        *self.flushes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockBackend for MemImage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len(), self.size)?;
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize; // in range of a Vec, so fits usize
        buf.copy_from_slice(&b[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        b[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        *self.flushes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Ok(())
    }
    fn len(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Temporary files for unit tests (no tempfile crate in the tree).
#[cfg(test)]
pub(crate) mod testfile {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    static N: AtomicU32 = AtomicU32::new(0);

    /// A file removed on drop.
    pub struct TempFile(pub PathBuf);
    impl TempFile {
        pub fn with_contents(bytes: &[u8]) -> Self {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("hvmdm-img-{}-{n}.raw", std::process::id()));
            std::fs::write(&p, bytes).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testfile::TempFile;
    use super::*;

    #[test]
    fn raw_file_read_write_flush_roundtrip() {
        let t = TempFile::with_contents(&[7u8; 4096]);
        let f = RawFile::open(&t.0, false).unwrap();
        assert_eq!(f.len(), 4096);
        let mut b = [0u8; 4];
        f.read_at(10, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        f.write_at(512, &[1, 2, 3]).unwrap();
        f.flush().unwrap();
        let on_disk = std::fs::read(&t.0).unwrap();
        assert_eq!(&on_disk[512..515], &[1, 2, 3]);
    }

    #[test]
    fn raw_file_bounds_and_read_only() {
        let t = TempFile::with_contents(&[0u8; 1024]);
        let f = RawFile::open(&t.0, true).unwrap();
        assert!(f.is_read_only());
        assert!(matches!(f.write_at(0, &[1]), Err(BlockError::ReadOnly)));
        let mut b = [0u8; 2];
        assert!(matches!(f.read_at(1023, &mut b), Err(BlockError::OutOfRange { .. })));
        assert!(matches!(f.read_at(u64::MAX, &mut b), Err(BlockError::OutOfRange { .. })));
        assert!(f.flush().is_ok());
        assert!(matches!(RawFile::open("/nonexistent/hvmdm.img", true), Err(BlockError::Open { .. })));
    }

    #[test]
    fn mem_image_counts_flushes() {
        let m = MemImage::new(vec![0; 1024], false);
        m.write_at(1000, &[9; 24]).unwrap();
        assert!(m.write_at(1001, &[9; 24]).is_err());
        m.flush().unwrap();
        assert_eq!(m.flush_count(), 1);
        assert_eq!(m.contents()[1023], 9);
    }
}
