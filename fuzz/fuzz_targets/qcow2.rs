//! qcow2 images (`hvmdm_devices::storage::qcow2::Qcow2Image`, imago underneath) from hostile
//! bytes: either a small valid v3 image built here (512-byte clusters, 64 KiB virtual size, one
//! L2 table with a data, a zero and a compressed cluster) with fuzzer byte patches anywhere in
//! it, or fuzzer bytes as the whole file. The file is opened read-write or read-only, then
//! reads, writes and flushes run on it; finally it is reopened and read again.
//!
//! Checks beyond "no panic/hang/leak/absurd allocation":
//! - accesses past the virtual end fail with `OutOfRange`; a read-only image refuses writes;
//! - with no patches (a valid image) every read returns what a byte model says (initial
//!   contents plus our writes), both live and after flush + reopen.
#![no_main]

use std::path::PathBuf;

use arbitrary::Arbitrary;
use hvmdm_devices::storage::qcow2::Qcow2Image;
use hvmdm_devices::storage::{BlockBackend, BlockError};
use libfuzzer_sys::fuzz_target;

const CS: usize = 512;
const VSIZE: usize = 64 << 10;

#[derive(Arbitrary, Debug)]
enum Source {
    Template(Vec<(u16, u8)>),
    Whole(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { off: u32, len: u16 },
    Write { off: u32, len: u16, pat: u8 },
    Flush,
}

#[derive(Arbitrary, Debug)]
struct Input {
    source: Source,
    read_only: bool,
    ops: Vec<Op>,
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The template image and its guest-visible contents.
fn template() -> (Vec<u8>, Vec<u8>) {
    let mut f = vec![0u8; 8 * CS];
    f[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut f, 4, 3); // version
    put32(&mut f, 20, 9); // cluster_bits
    put64(&mut f, 24, VSIZE as u64);
    put32(&mut f, 36, 2); // l1_size
    put64(&mut f, 40, 3 * CS as u64); // l1_table_offset
    put64(&mut f, 48, CS as u64); // refcount_table_offset
    put32(&mut f, 56, 1); // refcount_table_clusters
    put32(&mut f, 96, 4); // refcount_order: 16 bits
    put32(&mut f, 100, 104); // header_length (extension end marker follows: zeros)
    put64(&mut f, CS, 2 * CS as u64); // reftable[0] -> refblock at cluster 2
    for c in 0..8 {
        f[2 * CS + 2 * c + 1] = 1; // clusters 0..7 in use
    }
    const COPIED: u64 = 1 << 63;
    put64(&mut f, 3 * CS, COPIED | (4 * CS) as u64); // L1[0] -> L2 at cluster 4
    put64(&mut f, 4 * CS, COPIED | (5 * CS) as u64); // L2[0]: data in cluster 5
    put64(&mut f, 4 * CS + 8, 1); // L2[1]: zero cluster
    // L2[2]: compressed; a deflate "stored" block of 512 bytes (517 bytes: 2 sectors) at
    // cluster 6. With 9 cluster bits the sector count field starts at bit 61.
    put64(&mut f, 4 * CS + 16, (1 << 62) | (1 << 61) | (6 * CS) as u64);
    let mut guest = vec![0u8; VSIZE];
    for i in 0..CS {
        f[5 * CS + i] = (i as u8).wrapping_mul(7);
        guest[i] = (i as u8).wrapping_mul(7);
    }
    let z = 6 * CS;
    f[z] = 1; // BFINAL, stored
    f[z + 1..z + 3].copy_from_slice(&(CS as u16).to_le_bytes());
    f[z + 3..z + 5].copy_from_slice(&(!(CS as u16)).to_le_bytes());
    for i in 0..CS {
        f[z + 5 + i] = (i as u8) ^ 0x5a;
        guest[2 * CS + i] = (i as u8) ^ 0x5a;
    }
    (f, guest)
}

fn dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let d = base.join(format!("hvmdm-fuzz-qcow2-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fuzz_target!(|input: Input| {
    let d = dir();
    let path = d.join("img.qcow2");
    let (mut file, mut model) = template();
    let valid = match &input.source {
        Source::Template(patches) => {
            for &(at, v) in patches {
                if let Some(b) = file.get_mut(usize::from(at) % (8 * CS)) {
                    *b = v;
                }
            }
            patches.is_empty()
        }
        Source::Whole(bytes) => {
            file = bytes.clone();
            false
        }
    };
    std::fs::write(&path, &file).unwrap();
    let img = match Qcow2Image::open(&path, input.read_only) {
        Ok(i) => i,
        Err(_) => {
            assert!(!valid, "the template must open");
            return;
        }
    };
    let size = img.len();
    if valid {
        assert_eq!(size, VSIZE as u64);
    }
    for op in input.ops.iter().take(32) {
        match *op {
            Op::Read { off, len } => {
                let (off, len) = (u64::from(off), usize::from(len));
                let mut buf = vec![0u8; len];
                let r = img.read_at(off, &mut buf);
                if off + len as u64 > size {
                    assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
                } else if valid {
                    r.unwrap();
                    assert!(buf == model[off as usize..off as usize + len], "read {off:#x}+{len:#x}");
                }
            }
            Op::Write { off, len, pat } => {
                let (off, len) = (u64::from(off), usize::from(len));
                let r = img.write_at(off, &vec![pat; len]);
                if input.read_only {
                    assert!(matches!(r, Err(BlockError::ReadOnly)));
                } else if off + len as u64 > size {
                    assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
                } else if valid {
                    r.unwrap();
                    model[off as usize..off as usize + len].fill(pat);
                }
            }
            Op::Flush => {
                let r = img.flush();
                if valid {
                    r.unwrap();
                }
            }
        }
    }
    let flushed = img.flush();
    drop(img);
    if valid {
        flushed.unwrap();
        let img = Qcow2Image::open(&path, true).unwrap();
        let mut all = vec![0u8; VSIZE];
        img.read_at(0, &mut all).unwrap();
        assert!(all == model, "contents after reopen");
    }
});
