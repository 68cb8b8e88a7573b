//! fw_cfg through its ports and DMA descriptors: selects, data-port streaming, descriptors with
//! any control/length/address (inside RAM, at its end, beyond it), all three ways of kicking a
//! transfer, a lazy hook that returns bad sizes, and resets.
//!
//! Checks beyond "no panic": DMA only writes guest memory inside the descriptor's buffer and its
//! status word; the status ends up 0 or ERROR; a SELECT+READ that succeeds delivers exactly the
//! item's bytes (zero-padded); port streaming matches `file()`; the directory stays consistent.
#![no_main]

use arbitrary::Arbitrary;
use hvmdm_devices::fw_cfg::{keys, FwCfg};
use hvmdm_devices::mem::GuestRam;
use hvmdm_fuzz::{Machine, FILES, FILE_SLOTS, RAM_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Gpa {
    Ram(u16),
    NearEnd(u8),
    Past(u16),
    Raw(u64),
}

impl Gpa {
    fn get(self) -> u64 {
        let ram = RAM_SIZE as u64;
        match self {
            Gpa::Ram(a) => u64::from(a) % ram,
            Gpa::NearEnd(d) => ram.saturating_sub(u64::from(d)),
            Gpa::Past(d) => ram + u64::from(d),
            Gpa::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Mid(u16),
    NearMax(u8),
    Raw(u32),
}

impl Len {
    fn get(self) -> u32 {
        match self {
            Len::Small(n) => n.into(),
            Len::Mid(n) => n.into(),
            Len::NearMax(d) => u32::MAX - u32::from(d),
            Len::Raw(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Key {
    File(u8),
    Dir,
    Item(u8),
    Raw(u16),
}

impl Key {
    fn get(self) -> u16 {
        match self {
            Key::File(n) => keys::FILE_FIRST + u16::from(n) % (FILE_SLOTS as u16 + 2),
            Key::Dir => keys::FILE_DIR,
            Key::Item(n) => [keys::SIGNATURE, keys::ID, keys::RAM_SIZE, keys::E820_TABLE, 0x8000, 0x4021]
                [usize::from(n) % 6],
            Key::Raw(k) => k,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Control {
    /// key << 16 | the five defined bits.
    Bits {
        key: Key,
        bits: u8,
    },
    Raw(u32),
}

impl Control {
    fn get(self) -> u32 {
        match self {
            Control::Bits { key, bits } => u32::from(key.get()) << 16 | u32::from(bits & 0x1f),
            Control::Raw(c) => c,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kick {
    /// SeaBIOS: low half only.
    Low,
    /// OVMF: high half, then low half.
    HighLow,
    /// One 64-bit write at 0x514.
    Qword,
    /// A stale high half latched before a low-half kick.
    StaleHigh(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Select(Key),
    /// Byte reads of the data port.
    Stream(u8),
    /// Select a file through the port and check the bytes it streams.
    SelectAndVerify {
        file: u8,
        n: u16,
    },
    /// Any access to 0x50c..0x51f.
    Port {
        off: u8,
        size: u8,
        write: bool,
        val: u64,
    },
    Dma {
        desc: Gpa,
        control: Control,
        len: Len,
        addr: Gpa,
        kick: Kick,
        write_desc: bool,
    },
    Poke {
        at: u16,
        bytes: [u8; 16],
    },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    lazy_sizes: Vec<u8>,
    ops: Vec<Op>,
}

/// Copies all of RAM into `v` (buffers are reused: allocation dominates under ASan otherwise).
fn snapshot(m: &Machine, v: &mut Vec<u8>) {
    v.resize(RAM_SIZE, 0);
    m.ram.read(0, v).expect("whole RAM");
}

/// What a SELECT of `key` followed by reading from offset 0 must deliver, if it is predictable.
fn item_bytes(fw: &FwCfg, key: u16) -> Option<Vec<u8>> {
    let key = key & !keys::WRITE_CHANNEL;
    let idx = key & keys::ENTRY_MASK;
    if usize::from(idx) >= usize::from(keys::FILE_FIRST) + fw.file_slots() {
        return Some(vec![]);
    }
    if key & keys::ARCH_LOCAL == 0 {
        if idx == keys::FILE_DIR {
            return None;
        }
        if idx >= keys::FILE_FIRST {
            let name = FILES.iter().map(|f| f.0).find(|n| fw.file_key(n) == Some(key));
            return Some(name.and_then(|n| fw.file(n)).map(<[u8]>::to_vec).unwrap_or_default());
        }
    }
    Some(fw.item(key).map(<[u8]>::to_vec).unwrap_or_default())
}

fn kick(m: &Machine, desc: u64, how: Kick) {
    match how {
        Kick::Low => m.write(0x518, &(desc as u32).to_be_bytes()),
        Kick::HighLow => {
            m.write(0x514, &((desc >> 32) as u32).to_be_bytes());
            m.write(0x518, &(desc as u32).to_be_bytes());
        }
        Kick::Qword => m.write(0x514, &desc.to_be_bytes()),
        Kick::StaleHigh(h) => {
            m.write(0x514, &h.to_be_bytes());
            m.write(0x518, &(desc as u32).to_be_bytes());
        }
    }
}

/// The descriptor address the device will actually use for a kick.
fn effective_desc(desc: u64, how: Kick) -> u64 {
    match how {
        Kick::Low => desc & 0xffff_ffff,
        Kick::HighLow | Kick::Qword => desc,
        Kick::StaleHigh(h) => u64::from(h) << 32 | (desc & 0xffff_ffff),
    }
}

struct Snapshots {
    before: Vec<u8>,
    after: Vec<u8>,
}

#[allow(clippy::too_many_arguments)]
fn dma(
    m: &Machine,
    snaps: &mut Snapshots,
    desc: Gpa,
    control: Control,
    len: Len,
    addr: Gpa,
    how: Kick,
    write_desc: bool,
) {
    let (control, len, addr) = (control.get(), len.get(), addr.get());
    let desc = effective_desc(desc.get(), how);
    if write_desc {
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&control.to_be_bytes());
        d[4..8].copy_from_slice(&len.to_be_bytes());
        d[8..].copy_from_slice(&addr.to_be_bytes());
        // Fails (and is skipped) when the descriptor is not in RAM: the device must cope.
        let _ = m.ram.write(desc, &d);
    }
    snapshot(m, &mut snaps.before);
    kick(m, desc, how);
    snapshot(m, &mut snaps.after);
    let (before, after) = (&snaps.before, &snaps.after);

    // What the device sees is what RAM held, not what we meant to write.
    let seen = usize::try_from(desc)
        .ok()
        .filter(|&d| d.checked_add(16).is_some_and(|e| e <= RAM_SIZE))
        .map(|d| &before[d..d + 16]);
    let status_range =
        usize::try_from(desc).ok().filter(|&d| d.checked_add(4).is_some_and(|e| e <= RAM_SIZE));
    let mut buf_range = None;
    if let Some(s) = seen {
        let c = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
        let l = u64::from(u32::from_be_bytes([s[4], s[5], s[6], s[7]]));
        let a = u64::from_be_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
        if c & 0x02 != 0 {
            buf_range = Some((a, a.saturating_add(l)));
            // SELECT+READ from offset 0 that succeeded: exact item bytes, zero-padded.
            let d = desc as usize;
            let status = u32::from_be_bytes([after[d], after[d + 1], after[d + 2], after[d + 3]]);
            let end = a.saturating_add(l);
            let overlaps_desc = a < desc + 16 && end > desc;
            if c & 0x08 != 0 && status == 0 && end <= RAM_SIZE as u64 && !overlaps_desc {
                let fw = m.fw.lock().unwrap();
                if let Some(item) = item_bytes(&fw, (c >> 16) as u16) {
                    let got = &after[a as usize..end as usize];
                    let mut want = item;
                    want.resize(l as usize, 0);
                    want.truncate(l as usize);
                    assert!(got == &want[..], "SELECT+READ of key {:#x}: wrong bytes", c >> 16);
                }
            }
        }
    }
    // Compare 64-byte blocks first: a byte loop over all of RAM is what the fuzzer's comparison
    // tracing makes expensive.
    let changed = before
        .chunks(64)
        .zip(after.chunks(64))
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .flat_map(|(c, (b, a))| (0..b.len()).filter(move |&j| b[j] != a[j]).map(move |j| c * 64 + j));
    for i in changed {
        let i = i as u64;
        let in_status = status_range.is_some_and(|d| i >= d as u64 && i < d as u64 + 4);
        let in_buf = buf_range.is_some_and(|(s, e)| i >= s && i < e);
        assert!(
            in_status || in_buf,
            "DMA (desc {desc:#x}, seen {seen:x?}) wrote RAM at {i:#x} outside its buffer and status"
        );
    }
    if let Some(d) = status_range {
        let st = u32::from_be_bytes([after[d], after[d + 1], after[d + 2], after[d + 3]]);
        // The status word is written last, so it is 0 or ERROR — unless the device never touched
        // it because the kick did not start a transfer.
        if before[d..d + 4] != after[d..d + 4] {
            assert!(st == 0 || st == 1, "DMA status {st:#x}");
        }
    }
}

fuzz_target!(|input: Input| {
    if input.ops.len() > 256 {
        return;
    }
    let m = Machine::new(input.lazy_sizes);
    let mut snaps = Snapshots { before: Vec::new(), after: Vec::new() };
    for op in input.ops {
        match op {
            Op::Select(k) => m.write(0x510, &k.get().to_le_bytes()),
            Op::Stream(n) => {
                for _ in 0..n {
                    m.inb(0x511);
                }
            }
            Op::SelectAndVerify { file, n } => {
                let (name, _) = FILES[usize::from(file) % FILES.len()];
                let key = m.fw.lock().unwrap().file_key(name).expect("known file");
                m.write(0x510, &key.to_le_bytes());
                let n = usize::from(n % 8200);
                let got: Vec<u8> = (0..n).map(|_| m.inb(0x511)).collect();
                let mut want = m.fw.lock().unwrap().file(name).expect("known file").to_vec();
                want.resize(n.max(want.len()), 0);
                assert_eq!(&got[..], &want[..n], "port streaming of {name:?}");
            }
            Op::Port { off, size, write, val } => {
                let port = 0x50c + u64::from(off % 0x14);
                let size = usize::from(size % 10);
                if write {
                    let b = val.to_le_bytes();
                    let mut d = b[..size.min(8)].to_vec();
                    d.resize(size, 0);
                    m.write(port, &d);
                } else {
                    m.checked_read(port, size);
                }
            }
            Op::Dma { desc, control, len, addr, kick, write_desc } => {
                dma(&m, &mut snaps, desc, control, len, addr, kick, write_desc)
            }
            Op::Poke { at, bytes } => {
                let _ = m.ram.write(u64::from(at), &bytes);
            }
            Op::Reset => m.reset(),
        }
    }
    m.check_directory();
    let fw = m.fw.lock().unwrap();
    for (name, max) in FILES {
        let len = fw.file(name).map(<[u8]>::len);
        assert!(len.is_some_and(|l| l <= max), "{name:?}: {len:?} bytes, maximum {max}");
    }
    assert_eq!(fw.file(hvmdm_fuzz::WRITABLE).map(<[u8]>::len), Some(8), "writable file resized");
});
