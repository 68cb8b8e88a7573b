//! Sequential read throughput of an image through `open_image` (not a test):
//! `cargo run --release -p hvmdm-devices --example image_read_bench -- IMAGE raw|qcow2 [CHUNK_KIB]`.
//! Drop the page cache first (or run twice) to compare cold or warm reads fairly.

use std::time::Instant;

use hvmdm_devices::storage::{open_image, ImageFormat};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(fmt)) = (args.get(1), args.get(2)) else {
        return Err("usage: image_read_bench IMAGE raw|qcow2 [CHUNK_KIB]".into());
    };
    let format: ImageFormat = fmt.parse()?;
    let chunk = args.get(3).map_or(Ok(1024), |s| s.parse::<usize>())? * 1024;
    let img = open_image(path, format, true)?;
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut off = 0u64;
    let mut sum = 0u64;
    while off < img.len() {
        let n = chunk.min((img.len() - off) as usize);
        img.read_at(off, &mut buf[..n])?;
        // A cheap checksum (one byte per KiB) so formats can be compared for equal contents.
        sum = buf[..n].iter().step_by(1024).fold(sum, |a, &b| a.rotate_left(5) ^ u64::from(b));
        off += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let mib_s = off as f64 / secs / (1 << 20) as f64;
    println!("{path} ({fmt}): {} MiB in {secs:.3} s = {mib_s:.0} MiB/s, checksum {sum:016x}", off >> 20);
    Ok(())
}
