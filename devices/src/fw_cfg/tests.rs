use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::Bus;
use crate::mem::TestRam;

const RAM_SIZE: usize = 0x40000;
const DESC: u64 = 0x1000;
const BUF: u64 = 0x2000;

struct Rig {
    bus: Bus,
    fw: Arc<Mutex<FwCfg>>,
    ram: Arc<TestRam>,
}

fn rig() -> Rig {
    let ram = Arc::new(TestRam::new(RAM_SIZE));
    let fw = Arc::new(Mutex::new(FwCfg::new(ram.clone())));
    let bus = Bus::new("pio");
    bus.insert(PORT_BASE, PORT_LEN, PORT_RULES, fw.clone(), REGION_PORT).unwrap();
    bus.insert(DMA_BASE, DMA_LEN, DMA_RULES, fw.clone(), REGION_DMA).unwrap();
    Rig { bus, fw, ram }
}

impl Rig {
    fn outw_select(&self, key: u16) {
        self.bus.write_sync(0x510, &key.to_le_bytes());
    }
    fn inb(&self) -> u8 {
        let mut b = [0u8; 1];
        self.bus.read_sync(0x511, &mut b);
        b[0]
    }
    fn port_read(&self, key: u16, n: usize) -> Vec<u8> {
        self.outw_select(key);
        (0..n).map(|_| self.inb()).collect()
    }
    fn put_desc(&self, at: u64, control: u32, len: u32, addr: u64) {
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&control.to_be_bytes());
        d[4..8].copy_from_slice(&len.to_be_bytes());
        d[8..].copy_from_slice(&addr.to_be_bytes());
        self.ram.write(at, &d).unwrap();
    }
    fn control(&self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ram.read(at, &mut b).unwrap();
        u32::from_be_bytes(b)
    }
    /// SeaBIOS: `outl(cpu_to_be32((u32)&access), 0x518)` only.
    fn seabios_kick(&self, desc: u32) {
        self.bus.write_sync(0x518, &desc.to_be().to_le_bytes());
    }
    /// OVMF: high half to 0x514, then low half to 0x518, both byte-swapped.
    fn ovmf_kick(&self, desc: u64) {
        self.bus.write_sync(0x514, &((desc >> 32) as u32).to_be().to_le_bytes());
        self.bus.write_sync(0x518, &(desc as u32).to_be().to_le_bytes());
    }
    /// SeaBIOS-style SELECT|READ of `len` bytes of `key` into BUF; returns (control, data).
    fn dma_read(&self, key: u16, len: u32) -> (u32, Vec<u8>) {
        self.put_desc(DESC, (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, len, BUF);
        self.seabios_kick(DESC as u32);
        let mut v = vec![0u8; len as usize];
        self.ram.read(BUF, &mut v).unwrap();
        (self.control(DESC), v)
    }
}

struct Dir {
    count: u32,
    entries: Vec<(u32, u16, String)>,
    raw_len: usize,
}

fn parse_dir(raw: &[u8]) -> Dir {
    let count = u32::from_be_bytes(raw[..4].try_into().unwrap());
    let entries = (0..count as usize)
        .map(|i| {
            let e = &raw[4 + i * 64..4 + (i + 1) * 64];
            let size = u32::from_be_bytes(e[..4].try_into().unwrap());
            let sel = u16::from_be_bytes(e[4..6].try_into().unwrap());
            assert_eq!(&e[6..8], &[0, 0]);
            let n = e[8..].iter().position(|&b| b == 0).expect("name NUL-terminated");
            (size, sel, String::from_utf8(e[8..8 + n].to_vec()).unwrap())
        })
        .collect();
    Dir { count, entries, raw_len: raw.len() }
}

#[test]
fn signature_and_id_via_ports_through_bus() {
    let r = rig();
    assert_eq!(r.port_read(keys::SIGNATURE, 4), b"QEMU");
    // Past the end: zeroes.
    assert_eq!(r.inb(), 0);
    assert_eq!(r.port_read(keys::ID, 4), vec![3, 0, 0, 0]);
    // Re-selecting restarts at offset 0.
    assert_eq!(r.port_read(keys::SIGNATURE, 2), b"QE");
    // Byte writes to the data port are ignored; selector unchanged.
    r.bus.write_sync(0x511, &[0x42]);
    assert_eq!(r.inb(), b'M');
    // A 16-bit read is rejected (all-ones) and does not consume data.
    let mut w = [0u8; 2];
    r.bus.read_sync(0x510, &mut w);
    assert_eq!(w, [0xff, 0xff]);
    assert_eq!(r.inb(), b'U');
    // Invalid selectors read 0.
    assert_eq!(r.port_read(0x3fff, 3), vec![0, 0, 0]);
    assert_eq!(r.port_read(0x0006, 2), vec![0, 0]);
    // Bit 14 (write channel) is ignored.
    assert_eq!(r.port_read(keys::WRITE_CHANNEL, 4), b"QEMU");
}

#[test]
fn dma_register_reads_signature() {
    let r = rig();
    let mut d = [0u8; 4];
    r.bus.read_sync(0x514, &mut d);
    assert_eq!(&d, b"QEMU");
    r.bus.read_sync(0x518, &mut d);
    assert_eq!(&d, b" CFG");
    let mut b = [0u8; 1];
    r.bus.read_sync(0x51b, &mut b);
    assert_eq!(b, [b'G']);
}

#[test]
fn directory_sorted_with_true_sizes() {
    let r = rig();
    {
        let mut fw = r.fw.lock().unwrap();
        fw.add_file("etc/e820", vec![1; 40], FileOpts::read_only(40)).unwrap();
        fw.add_file("bootorder", bootorder_blob(&["/a", "/b"]), FileOpts::read_only(64)).unwrap();
        fw.add_file("etc/acpi/tables", vec![2; 100], FileOpts::read_only(0x20000)).unwrap();
        fw.set_file("etc/acpi/tables", vec![3; 300]).unwrap();
    }
    let raw = r.dma_read(keys::FILE_DIR, (4 + 64 * DEFAULT_FILE_SLOTS) as u32).1;
    let d = parse_dir(&raw);
    assert_eq!(d.count, 3);
    assert_eq!(d.raw_len, 4 + 64 * 0x40);
    let names: Vec<_> = d.entries.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(names, vec!["bootorder", "etc/acpi/tables", "etc/e820"]);
    let sels: Vec<_> = d.entries.iter().map(|e| e.1).collect();
    assert_eq!(sels, vec![0x20, 0x21, 0x22]);
    assert_eq!(d.entries[0].0, 6); // "/a\n/b\0"
    assert_eq!(d.entries[1].0, 300);
    assert_eq!(d.entries[2].0, 40);
    // Every advertised size is what is served.
    for (size, sel, _) in &d.entries {
        let (ctl, v) = r.dma_read(*sel, *size);
        assert_eq!(ctl, 0);
        assert_eq!(v.len(), *size as usize);
    }
    assert_eq!(r.port_read(0x20, 6), b"/a\n/b\0");
    // Unused slots read as zero and are inside the blob.
    assert!(raw[4 + 3 * 64..].iter().all(|&b| b == 0));
}

#[test]
fn file_errors() {
    let r = rig();
    let mut fw = r.fw.lock().unwrap();
    let long = "x".repeat(56);
    assert_eq!(
        fw.add_file(&long, vec![], FileOpts::read_only(0)),
        Err(FwCfgError::NameTooLong(long.clone()))
    );
    fw.add_file(&long[..55], vec![], FileOpts::read_only(0)).unwrap();
    assert!(matches!(fw.add_file("", vec![], FileOpts::read_only(0)), Err(FwCfgError::BadName(_))));
    assert!(matches!(fw.add_file("a\0b", vec![], FileOpts::read_only(0)), Err(FwCfgError::BadName(_))));
    fw.add_file("a", vec![1], FileOpts::read_only(4)).unwrap();
    assert_eq!(fw.add_file("a", vec![1], FileOpts::read_only(4)), Err(FwCfgError::Duplicate("a".into())));
    assert!(matches!(fw.add_file("b", vec![0; 5], FileOpts::read_only(4)), Err(FwCfgError::TooBig { .. })));
    assert!(matches!(fw.set_file("a", vec![0; 5]), Err(FwCfgError::TooBig { .. })));
    assert_eq!(fw.file("a").unwrap(), &[1]);
    assert!(matches!(fw.set_file("zz", vec![]), Err(FwCfgError::NoSuchFile(_))));
    assert!(matches!(
        fw.add_file("m", vec![], FileOpts::read_only(usize::MAX)),
        Err(FwCfgError::MaxTooLarge { .. })
    ));
    for k in [keys::FILE_DIR, 0x20, 0x4005, 0x8020] {
        assert_eq!(fw.add_item(k, vec![]), Err(FwCfgError::BadKey(k)));
    }
    fw.add_item_u32(keys::IRQ0_OVERRIDE, 1).unwrap();
    for i in 0..(DEFAULT_FILE_SLOTS - 2) {
        fw.add_file(&format!("f{i:03}"), vec![], FileOpts::read_only(0)).unwrap();
    }
    assert_eq!(fw.add_file("last", vec![], FileOpts::read_only(0)), Err(FwCfgError::DirectoryFull(0x40)));
}

#[test]
fn dma_read_seabios_style_and_zero_fill_past_end() {
    let r = rig();
    r.fw.lock().unwrap().add_file("f", (1..=10).collect(), FileOpts::read_only(10)).unwrap();
    r.ram.write(BUF, &[0xee; 32]).unwrap();
    let (ctl, v) = r.dma_read(0x20, 16);
    assert_eq!(ctl, 0);
    assert_eq!(&v[..10], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(&v[10..], &[0; 6], "zero-filled, not an error");
    let mut after = [0u8; 1];
    r.ram.read(BUF + 16, &mut after).unwrap();
    assert_eq!(after, [0xee], "nothing written past length");
}

#[test]
fn ovmf_port_select_then_dma_skip_and_read() {
    let r = rig();
    r.fw.lock().unwrap().add_file("f", (0..100).collect(), FileOpts::read_only(100)).unwrap();
    r.outw_select(0x20);
    r.put_desc(DESC, DMA_CTL_SKIP, 40, 0);
    r.ovmf_kick(DESC);
    assert_eq!(r.control(DESC), 0);
    r.put_desc(DESC, DMA_CTL_READ, 4, BUF);
    r.ovmf_kick(DESC);
    assert_eq!(r.control(DESC), 0);
    let mut v = [0u8; 4];
    r.ram.read(BUF, &mut v).unwrap();
    assert_eq!(v, [40, 41, 42, 43]);
    // The data offset is shared with the port interface.
    assert_eq!(r.inb(), 44);
}

#[test]
fn dma_high_half_is_cleared_after_each_transfer() {
    let r = rig();
    // OVMF sets a high half of 1 (descriptor above 4 GiB: not RAM here) ...
    r.put_desc(DESC, DMA_CTL_SELECT, 0, 0);
    r.ovmf_kick((1u64 << 32) | DESC);
    // ... nothing reachable was written. Then SeaBIOS writes only the low half: it must reach DESC.
    r.put_desc(DESC, (u32::from(keys::SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 4, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
    let mut v = [0u8; 4];
    r.ram.read(BUF, &mut v).unwrap();
    assert_eq!(&v, b"QEMU");
    // A latched high half with no low write is also forgotten by reset.
    r.bus.write_sync(0x514, &1u32.to_be().to_le_bytes());
    r.fw.lock().unwrap().reset();
    r.put_desc(DESC, DMA_CTL_SELECT | DMA_CTL_READ, 4, BUF + 4);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
}

#[test]
fn dma_select_only_and_priority() {
    let r = rig();
    r.fw.lock().unwrap().add_file("w", vec![0; 8], FileOpts::writable(8)).unwrap();
    // SELECT alone: length ignored, success.
    r.put_desc(DESC, (0x20 << 16) | DMA_CTL_SELECT, 1000, 0xdead_0000);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
    // READ beats WRITE: reading a writable file with both bits set leaves it unchanged.
    r.ram.write(BUF, &[9; 8]).unwrap();
    r.put_desc(DESC, (0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_READ | DMA_CTL_WRITE, 8, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
    assert_eq!(r.fw.lock().unwrap().file("w").unwrap(), &[0; 8]);
    let mut v = [1u8; 8];
    r.ram.read(BUF, &mut v).unwrap();
    assert_eq!(v, [0; 8]);
}

#[test]
fn dma_write_rules() {
    let r = rig();
    {
        let mut fw = r.fw.lock().unwrap();
        fw.add_file("etc/ro", vec![5; 8], FileOpts::read_only(8)).unwrap();
        fw.add_file("etc/vmgenid_addr", vec![0; 8], FileOpts::writable(8)).unwrap();
    }
    let ro = 0x20;
    let wr = 0x21;
    r.ram.write(BUF, &0x1234_5678_9abc_def0u64.to_le_bytes()).unwrap();
    // Read-only file: ERROR, unchanged.
    r.put_desc(DESC, (ro << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 8, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    assert_eq!(r.fw.lock().unwrap().file("etc/ro").unwrap(), &[5; 8]);
    // Non-file item: ERROR.
    r.put_desc(DESC, (u32::from(keys::SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    // WRITE_POINTER as SeaBIOS does it: select + skip(dst_offset) ... here offset 0, 8 bytes.
    r.put_desc(DESC, (wr << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 8, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
    assert_eq!(
        r.fw.lock().unwrap().file("etc/vmgenid_addr").unwrap(),
        &0x1234_5678_9abc_def0u64.to_le_bytes()
    );
    // OVMF: port select, SKIP 4, WRITE 4.
    r.ram.write(BUF, &[0xaa; 4]).unwrap();
    r.outw_select(wr as u16);
    r.put_desc(DESC, DMA_CTL_SKIP, 4, 0);
    r.ovmf_kick(DESC);
    r.put_desc(DESC, DMA_CTL_WRITE, 4, BUF);
    r.ovmf_kick(DESC);
    assert_eq!(r.control(DESC), 0);
    assert_eq!(&r.fw.lock().unwrap().file("etc/vmgenid_addr").unwrap()[4..], &[0xaa; 4]);
    // A write that does not fit entirely: ERROR and nothing written.
    r.ram.write(BUF, &[0x11; 8]).unwrap();
    r.outw_select(wr as u16);
    r.put_desc(DESC, DMA_CTL_SKIP, 4, 0);
    r.ovmf_kick(DESC);
    r.put_desc(DESC, DMA_CTL_WRITE, 8, BUF);
    r.ovmf_kick(DESC);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    assert_eq!(&r.fw.lock().unwrap().file("etc/vmgenid_addr").unwrap()[4..], &[0xaa; 4]);
    // Bad source buffer: ERROR, nothing written.
    r.put_desc(DESC, (wr << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 8, 0xffff_ffff_0000);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    // Reset clears writable files (WRITE_POINTER targets).
    r.fw.lock().unwrap().reset();
    assert_eq!(r.fw.lock().unwrap().file("etc/vmgenid_addr").unwrap(), &[0; 8]);
    assert_eq!(r.fw.lock().unwrap().file("etc/ro").unwrap(), &[5; 8]);
    // Port writes never reach file data.
    r.outw_select(wr as u16);
    r.bus.write_sync(0x511, &[0x77]);
    assert_eq!(r.fw.lock().unwrap().file("etc/vmgenid_addr").unwrap(), &[0; 8]);
}

#[test]
fn bad_descriptor_and_buffer_addresses() {
    let r = rig();
    // Descriptor outside RAM: nothing to write the error to; must not panic.
    r.ovmf_kick(0xffff_ffff_ffff_fff8);
    r.seabios_kick(RAM_SIZE as u32 - 8);
    // Descriptor straddling the end of RAM: unreadable, and its control word (first 4 bytes,
    // inside RAM) gets ERROR.
    let at = RAM_SIZE as u64 - 8;
    r.ram.write(at, &[0; 8]).unwrap();
    r.seabios_kick(at as u32);
    assert_eq!(r.control(at), DMA_CTL_ERROR);
    // Buffer outside RAM.
    r.put_desc(DESC, DMA_CTL_SELECT | DMA_CTL_READ, 4, 0x1_0000_0000);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    // Buffer whose end wraps the address space.
    r.put_desc(DESC, DMA_CTL_SELECT | DMA_CTL_READ, 16, u64::MAX - 4);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    // Malformed register writes are ignored: 2-byte, 4-byte unaligned.
    r.bus.write_sync(0x518, &[1, 2]);
    r.bus.write_sync(0x516, &[1, 2, 3, 4]);
}

#[test]
fn giant_length_is_bounded() {
    let r = rig();
    // 4 GiB - 1 read into a 256 KiB RAM: fills what exists chunk by chunk, then fails.
    r.put_desc(DESC, DMA_CTL_SELECT | DMA_CTL_READ, u32::MAX, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
    let mut v = [0xffu8; 4];
    r.ram.read(BUF, &mut v).unwrap();
    assert_eq!(&v, b"QEMU");
    // Giant SKIP is O(1) and succeeds; later reads are past the end.
    r.outw_select(keys::SIGNATURE);
    r.put_desc(DESC, DMA_CTL_SKIP, u32::MAX, 0);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), 0);
    r.put_desc(DESC, DMA_CTL_SKIP, u32::MAX, 0);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.inb(), 0);
    // Giant WRITE to a small writable file: ERROR without allocating.
    r.fw.lock().unwrap().add_file("w", vec![0; 8], FileOpts::writable(8)).unwrap();
    r.put_desc(DESC, (0x20 << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, u32::MAX, BUF);
    r.seabios_kick(DESC as u32);
    assert_eq!(r.control(DESC), DMA_CTL_ERROR);
}

fn lazy_rig(counter: Arc<AtomicUsize>, sizes: Arc<Mutex<Vec<usize>>>) -> Rig {
    let r = rig();
    {
        let mut fw = r.fw.lock().unwrap();
        fw.add_file("etc/acpi/tables", vec![0; 64], FileOpts::read_only(128)).unwrap();
        fw.add_file("etc/table-loader", vec![0; 32], FileOpts::read_only(32)).unwrap();
        fw.add_file("etc/acpi/rsdp", vec![0; 20], FileOpts::read_only(36)).unwrap();
        fw.add_file("other", vec![1], FileOpts::read_only(1)).unwrap();
        let hook: LazyHook = Box::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) as u8 + 1;
            let s = sizes.lock().unwrap().clone();
            vec![
                ("etc/acpi/tables".to_string(), vec![n; s[0]]),
                ("etc/table-loader".to_string(), vec![n; s[1]]),
                ("etc/acpi/rsdp".to_string(), vec![n; s[2]]),
                ("other".to_string(), vec![n]),
            ]
        });
        fw.set_lazy_group(&["etc/acpi/tables", "etc/table-loader", "etc/acpi/rsdp"], hook).unwrap();
    }
    r
}

#[test]
fn lazy_group_runs_once_per_reset_on_port_or_dma_select() {
    let count = Arc::new(AtomicUsize::new(0));
    let sizes = Arc::new(Mutex::new(vec![64, 32, 20]));
    let r = lazy_rig(count.clone(), sizes.clone());
    let key = |n: &str| r.fw.lock().unwrap().file_key(n).unwrap();
    let (k_tables, k_loader, k_rsdp, k_other) =
        (key("etc/acpi/tables"), key("etc/table-loader"), key("etc/acpi/rsdp"), key("other"));
    // Directory and non-group selects do not trigger it.
    r.dma_read(keys::FILE_DIR, 64);
    r.port_read(k_other, 1);
    assert_eq!(count.load(Ordering::SeqCst), 0);
    // First port select of any member runs it once.
    assert_eq!(r.port_read(k_loader, 2), vec![1, 1]);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    r.port_read(k_tables, 1);
    r.dma_read(k_rsdp, 4);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Files outside the group are never replaced by the hook.
    assert_eq!(r.port_read(k_other, 1), vec![1]);
    // After reset: the next DMA SELECT runs it again.
    r.fw.lock().unwrap().reset();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let (ctl, v) = r.dma_read(k_rsdp, 2);
    assert_eq!((ctl, v), (0, vec![2, 2]));
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // Shrinking is allowed; the directory follows the blob.
    *sizes.lock().unwrap() = vec![100, 16, 36];
    r.fw.lock().unwrap().reset();
    r.port_read(k_tables, 1);
    let d = parse_dir(&r.dma_read(keys::FILE_DIR, 4 + 64 * 4).1);
    let size_of = |n: &str| d.entries.iter().find(|e| e.2 == n).unwrap().0;
    assert_eq!(
        (size_of("etc/acpi/tables"), size_of("etc/table-loader"), size_of("etc/acpi/rsdp")),
        (100, 16, 36)
    );
    // Oversized results are refused per blob; the old blob (and its size) stays.
    *sizes.lock().unwrap() = vec![129, 8, 37];
    r.fw.lock().unwrap().reset();
    r.port_read(k_tables, 1);
    assert_eq!(count.load(Ordering::SeqCst), 4);
    let fw = r.fw.lock().unwrap();
    assert_eq!(fw.file("etc/acpi/tables").unwrap(), &[3; 100]);
    assert_eq!(fw.file("etc/table-loader").unwrap(), &[4; 8]);
    assert_eq!(fw.file("etc/acpi/rsdp").unwrap(), &[3; 36]);
    drop(fw);
    let d = parse_dir(&r.dma_read(keys::FILE_DIR, 4 + 64 * 4).1);
    let size_of = |n: &str| d.entries.iter().find(|e| e.2 == n).unwrap().0;
    assert_eq!((size_of("etc/acpi/tables"), size_of("etc/table-loader")), (100, 8));
}

#[test]
fn lazy_group_errors() {
    let r = rig();
    let mut fw = r.fw.lock().unwrap();
    fw.add_file("a", vec![], FileOpts::read_only(1)).unwrap();
    assert!(matches!(fw.set_lazy_group(&["a", "nope"], Box::new(Vec::new)), Err(FwCfgError::NoSuchFile(_))));
    fw.set_lazy_group(&["a"], Box::new(Vec::new)).unwrap();
    assert_eq!(fw.set_lazy_group(&["a"], Box::new(Vec::new)), Err(FwCfgError::AlreadyLazy("a".into())));
}

#[test]
fn keys_shift_when_files_sort_before() {
    let r = rig();
    let mut fw = r.fw.lock().unwrap();
    fw.add_file("m", vec![1], FileOpts::read_only(1)).unwrap();
    assert_eq!(fw.file_key("m"), Some(0x20));
    fw.add_file("a", vec![2], FileOpts::read_only(1)).unwrap();
    assert_eq!(fw.file_key("m"), Some(0x21));
    assert_eq!(fw.file_key("a"), Some(0x20));
    drop(fw);
    assert_eq!(r.port_read(0x21, 1), vec![1]);
    // A file key beyond the populated files but inside the slots reads 0.
    assert_eq!(r.port_read(0x30, 1), vec![0]);
}

#[test]
fn reset_selects_signature() {
    let r = rig();
    r.port_read(keys::ID, 2);
    r.fw.lock().unwrap().reset();
    assert_eq!((0..4).map(|_| r.inb()).collect::<Vec<_>>(), b"QEMU");
}

#[test]
fn pc_items() {
    let r = rig();
    let mut fw = r.fw.lock().unwrap();
    fw.add_pc_items(&PcItems {
        uuid: [7; 16],
        boot_cpus: 2,
        apic_id_limit: 4,
        nographic: true,
        boot_menu: false,
    })
    .unwrap();
    assert_eq!(fw.item(keys::NB_CPUS).unwrap(), &[2, 0]);
    assert_eq!(fw.item(keys::MAX_CPUS).unwrap(), &[4, 0]);
    assert_eq!(fw.item(keys::NOGRAPHIC).unwrap(), &[1, 0]);
    assert_eq!(fw.item(keys::BOOT_MENU).unwrap(), &[0, 0]);
    assert_eq!(fw.item(keys::UUID).unwrap(), &[7; 16]);
    assert_eq!(fw.item(keys::IRQ0_OVERRIDE).unwrap(), &[1, 0, 0, 0]);
    drop(fw);
    assert_eq!(r.port_read(keys::IRQ0_OVERRIDE, 4), vec![1, 0, 0, 0]);
    assert_eq!(r.port_read(keys::IRQ0_OVERRIDE | keys::WRITE_CHANNEL, 1), vec![1]);
}

#[test]
fn bootorder_format() {
    assert_eq!(bootorder_blob(&[]), Vec::<u8>::new());
    assert_eq!(
        bootorder_blob(&["/rom@genroms/linuxboot_dma.bin", "/pci@i0cf8/ide@1,1/drive@0/disk@0"]),
        b"/rom@genroms/linuxboot_dma.bin\n/pci@i0cf8/ide@1,1/drive@0/disk@0\0".to_vec()
    );
}

mod snapshot {
    use super::*;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    /// A device with a writable file, a read-only file and a lazy group whose hook counts calls.
    fn dev(ram: Arc<TestRam>, calls: Arc<AtomicUsize>, tag: u8) -> FwCfg {
        let mut fw = FwCfg::new(ram);
        fw.add_file("etc/wp", vec![0; 8], FileOpts::writable(8)).unwrap();
        fw.add_file("etc/ro", vec![1, 2, 3], FileOpts::read_only(16)).unwrap();
        fw.add_file("etc/acpi/tables", vec![0; 4], FileOpts::read_only(64)).unwrap();
        fw.set_lazy_group(
            &["etc/acpi/tables"],
            Box::new(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                vec![("etc/acpi/tables".to_string(), vec![tag; 6])]
            }),
        )
        .unwrap();
        fw
    }

    #[test]
    fn roundtrip_selection_files_and_lazy_state() {
        let r = rig();
        let calls = Arc::new(AtomicUsize::new(0));
        *r.fw.lock().unwrap() = dev(r.ram.clone(), calls.clone(), 0xaa);
        // Guest: read the lazy tables (hook runs), DMA-write the WRITE_POINTER file, then select
        // the read-only file and read one byte of it.
        let tables = r.fw.lock().unwrap().file_key("etc/acpi/tables").unwrap();
        assert_eq!(r.port_read(tables, 6), vec![0xaa; 6]);
        let wp = r.fw.lock().unwrap().file_key("etc/wp").unwrap();
        r.ram.write(BUF, &[9, 8, 7, 6]).unwrap();
        r.put_desc(DESC, (u32::from(wp) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, BUF);
        r.bus.write_sync(0x518, &(DESC as u32).to_be_bytes());
        assert_eq!(r.control(DESC), 0);
        let ro = r.fw.lock().unwrap().file_key("etc/ro").unwrap();
        assert_eq!(r.port_read(ro, 1), vec![1]);
        r.bus.write_sync(0x514, &1u32.to_be_bytes());
        let blob = payload(&*r.fw.lock().unwrap());

        let calls2 = Arc::new(AtomicUsize::new(0));
        let mut b = dev(r.ram.clone(), calls2.clone(), 0xbb);
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        // Selection and offset: the next byte of etc/ro is 2.
        assert_eq!(b.read_data_byte(), 2);
        assert_eq!(b.dma_addr, 1 << 32);
        assert_eq!(b.file("etc/wp").unwrap(), &[9, 8, 7, 6, 0, 0, 0, 0]);
        // The guest keeps the tables it read; the new machine's hook does not run again.
        b.select(tables);
        assert_eq!(b.file("etc/acpi/tables").unwrap(), &[0xaa; 6]);
        assert_eq!(calls2.load(Ordering::SeqCst), 0);
        // The directory follows the restored size.
        b.select(keys::FILE_DIR);
        let dir: Vec<u8> = (0..4 + 64 * 3).map(|_| b.read_data_byte()).collect();
        let sizes: Vec<u32> =
            (0..3).map(|i| u32::from_be_bytes(dir[4 + 64 * i..8 + 64 * i].try_into().unwrap())).collect();
        assert_eq!(sizes, vec![6, 3, 8]);
    }

    #[test]
    fn unknown_readonly_and_oversize_files_rejected() {
        let ram = Arc::new(TestRam::new(RAM_SIZE));
        let calls = Arc::new(AtomicUsize::new(0));
        let a = dev(ram.clone(), calls.clone(), 1);
        let good = payload(&a);
        let mut b = dev(ram.clone(), calls.clone(), 1);
        let mut plain = FwCfg::new(ram.clone());
        assert!(load(&mut plain, &good).is_err(), "lazy group count differs");
        // Hand-built payloads: key, offset, dma, 1 group (armed=false), 1 file.
        let build = |name: &str, data: &[u8], armed: bool| {
            let mut w = crate::snapshot::SectionWriter::new();
            w.put_u16(0);
            w.put_u64(0);
            w.put_u64(0);
            w.put_u32(1);
            w.put_bool(armed);
            w.put_u32(1);
            w.put_str(name);
            w.put_bytes(data);
            w.as_bytes().to_vec()
        };
        assert!(load(&mut b, &build("etc/nope", &[], false)).is_err());
        assert!(load(&mut b, &build("etc/ro", &[5], false)).is_err());
        assert!(load(&mut b, &build("etc/wp", &[0; 9], false)).is_err());
        assert!(load(&mut b, &build("etc/acpi/tables", &[0; 65], false)).is_err());
        assert!(load(&mut b, &build("etc/acpi/tables", &[0; 5], true)).is_err(), "armed group");
        load(&mut b, &build("etc/acpi/tables", &[7; 5], false)).unwrap();
        assert_eq!(b.file("etc/acpi/tables").unwrap(), &[7; 5]);
        assert_eq!(b.file("etc/ro").unwrap(), &[1, 2, 3]);
    }
}
