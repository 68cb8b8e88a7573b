//! The Xen ioreq server (`hvmdm_xen::IoreqServer`) started against `FakeXen`, with the fuzzer
//! playing a hostile Xen: requests posted by the protocol (`post_ioreq`) with any type, size,
//! count, direction, df, data_is_ptr and address (structured choices that pass validation, plus
//! raw values), slots written raw with any state byte and vp_eport, buffered-ring entries posted
//! properly or written raw (any type/dir/size word, pointers anywhere, out of range or backwards),
//! events on vCPU ports, the buffered port, unknown ports, spurious wake-ups, armed failures of
//! notify/unmask/map_guest, INVALIDATE. Guest RAM is a `MapCache` over the fake's RAM (with a
//! hole and an unmappable region above 4 GiB, and a tiny bucket bound so eviction happens), so
//! rep ins/outs/movs exercise the map cache too.
//!
//! Checks beyond "no panic/hang/leak":
//! - an answered request (`Completed`/`Refused`) leaves the slot in IORESP_READY, and the
//!   vCPU's port was notified; a spurious wake-up leaves the slot untouched;
//! - `StateChanged` never happens (nothing else touches the slot while a request is served);
//! - a refused plain read is answered with all-ones of its size; a completed plain PIO /
//!   PCI-config read has no bits above its size;
//! - the handler only sees sizes 1/2/4/8, ports with `port + size <= 0x10000`, config registers
//!   with `reg + size <= 0x1000`, and at most `count` calls per request;
//! - after every event the buffered ring is empty (read_pointer == write_pointer): every drain
//!   either consumes all entries or resynchronises a corrupt ring, single-threaded;
//! - at most 511 buffered entries are handled per drain.
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::Arbitrary;
use hvmdm_devices::mem::GuestRam;
use hvmdm_xen::fake::{FakeCall, FakeXen};
use hvmdm_xen::ioreq::{all_ones, IoreqHandler, PciSbdf, SharedPage};
use hvmdm_xen::sys::ioreq::*;
use hvmdm_xen::{EventOutcome, IoreqServer, MapCache};
use libfuzzer_sys::fuzz_target;

const DOMID: u16 = 9;
/// errno for armed failures (the fuzz crate does not depend on libc).
const EIO: i32 = 5;
const MIB: u64 = 1 << 20;
/// Fake RAM backing frames: a bit over 1 MiB.
const FAKE_RAM_PAGES: usize = 272;
/// What the map cache believes is RAM: 2 MiB below 4 GiB (the part past the fake's RAM is a
/// hole) and 1 MiB above (never maps in the fake).
const RAM_BELOW_4G: u64 = 2 * MIB;
const RAM_ABOVE_4G: u64 = MIB;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Type {
    Pio,
    Copy,
    PciConfig,
    TimeOffset,
    Invalidate,
    Raw(u8),
}

impl Type {
    fn raw(self) -> u8 {
        match self {
            Type::Pio => IOREQ_TYPE_PIO,
            Type::Copy => IOREQ_TYPE_COPY,
            Type::PciConfig => IOREQ_TYPE_PCI_CONFIG,
            Type::TimeOffset => IOREQ_TYPE_TIMEOFFSET,
            Type::Invalidate => IOREQ_TYPE_INVALIDATE,
            Type::Raw(t) => t,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    Pow2(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    One,
    Small(u8),
    Raw(u32),
}

/// A guest-physical address (a data pointer or an MMIO address).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Gpa {
    /// Inside the fake's RAM.
    Ram(u32),
    /// Around a bucket boundary.
    Boundary(u8, i8),
    /// In the hole below 4 GiB (RAM per layout, frames do not map).
    Hole(u32),
    /// Around 4 GiB / above it.
    Above(i32),
    Raw(u64),
}

impl Gpa {
    fn value(self) -> u64 {
        match self {
            Gpa::Ram(o) => u64::from(o) % (FAKE_RAM_PAGES as u64 * 4096),
            Gpa::Boundary(b, d) => (u64::from(b % 3) * MIB).wrapping_add_signed(i64::from(d)),
            Gpa::Hole(o) => {
                FAKE_RAM_PAGES as u64 * 4096 + u64::from(o) % (RAM_BELOW_4G - FAKE_RAM_PAGES as u64 * 4096)
            }
            Gpa::Above(d) => (1u64 << 32).wrapping_add_signed(i64::from(d)),
            Gpa::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// A port (PIO) or register (PCI config: SBDF in the high half).
    Port(u16),
    Config {
        sbdf: u32,
        reg: u16,
    },
    Mem(Gpa),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Req {
    ty: Type,
    addr: Addr,
    data: Gpa,
    count: Count,
    size: Size,
    read: bool,
    df: bool,
    ptr: bool,
    /// Bits 7 (padding) of the flags byte.
    pad: bool,
}

impl Req {
    fn raw(&self) -> IoreqRaw {
        let addr = match self.addr {
            Addr::Port(p) => u64::from(p),
            Addr::Config { sbdf, reg } => (u64::from(sbdf) << 32) | u64::from(reg),
            Addr::Mem(g) => g.value(),
        };
        let size = match self.size {
            Size::Pow2(i) => 1 << (i % 4),
            Size::Raw(s) => s,
        };
        let count = match self.count {
            Count::One => 1,
            Count::Small(n) => u32::from(n % 32),
            Count::Raw(n) => n,
        };
        let mut flags = 0;
        if self.read {
            flags |= IOREQ_FLAG_DIR_READ;
        }
        if self.df {
            flags |= IOREQ_FLAG_DF;
        }
        if self.ptr {
            flags |= IOREQ_FLAG_DATA_IS_PTR;
        }
        if self.pad {
            flags |= 0x80;
        }
        IoreqRaw {
            addr,
            data: self.data.value(),
            count,
            size,
            vp_eport: 0,
            _pad0: 0,
            flags,
            type_: self.ty.raw(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Failure {
    Notify,
    Unmask,
    MapGuest,
    Pending,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Xen's ioreq_send: contents, then READY, then the vCPU's port fires; served at once.
    Sync {
        vcpu: u8,
        req: Req,
    },
    /// The slot written raw (any state byte, vp_eport), optionally followed by an event.
    RawSlot {
        vcpu: u8,
        addr: u64,
        data: u64,
        count: u32,
        size: u32,
        flags: u8,
        type_: u8,
        eport: u32,
        fire: bool,
    },
    /// Xen's ioreq_send_buffered (type, address, size index, value).
    Buffered {
        ty: Type,
        addr: u32,
        size: u8,
        data: u64,
        fire: bool,
    },
    /// A ring slot written raw.
    RingSlot {
        index: u16,
        word0: u32,
        data: u32,
    },
    /// The ring pointers written raw (may be backwards, far apart, near wrap).
    RingPointers {
        read: u32,
        write: u32,
    },
    /// Fire the buffered port / a vCPU's port without a new request / an arbitrary port.
    FireBuffered,
    FireVcpu(u8),
    FirePort(u32),
    /// Poll pending events through handle_pending.
    Pending,
    /// Xen took the response (state back to NONE).
    Ack(u8),
    /// Arm one failure in the fake.
    Fail(Failure),
}

#[derive(Arbitrary, Debug)]
struct Input {
    vcpus: u8,
    max_buckets: u8,
    dirty_log: bool,
    ops: Vec<Op>,
}

/// Checks what the server hands to devices; MMIO falls back to guest RAM like the real
/// dispatcher does.
struct Handler {
    ram: Arc<MapCache<FakeXen, FakeXen>>,
    calls: u64,
    regs: [u8; 64],
}

impl Handler {
    fn size_ok(len: usize) {
        assert!(matches!(len, 1 | 2 | 4 | 8), "handler got size {len}");
    }
    fn port(&mut self, port: u16, len: usize, write: bool) {
        Self::size_ok(len);
        // Finding 7 (README "Findings", fixed): the buffered ring used to hand out 8-byte PIO
        // writes (size field 3); now always asserted.
        let _ = write;
        assert!(len <= 4, "port access of {len} bytes");
        assert!(u32::from(port) + len as u32 <= 0x1_0000, "port {port:#x}+{len} past 64 KiB");
        self.calls += 1;
    }
    fn config(&mut self, reg: u16, len: usize) {
        Self::size_ok(len);
        assert!(len <= 4, "config access of {len} bytes");
        assert!(usize::from(reg) + len <= 0x1000, "config reg {reg:#x}+{len} past 4 KiB");
        self.calls += 1;
    }
}

impl IoreqHandler for Handler {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.port(port, data.len(), false);
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs[(usize::from(port) + i) % 64];
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.port(port, data.len(), true);
        for (i, b) in data.iter().enumerate() {
            self.regs[(usize::from(port) + i) % 64] = *b;
        }
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        Self::size_ok(data.len());
        self.calls += 1;
        if self.ram.read(addr, data).is_err() {
            data.fill(0xff);
        }
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        Self::size_ok(data.len());
        self.calls += 1;
        let _ = self.ram.write(addr, data);
    }
    fn pci_config_read(&mut self, _sbdf: PciSbdf, reg: u16, data: &mut [u8]) {
        self.config(reg, data.len());
        data.fill(0xff);
    }
    fn pci_config_write(&mut self, _sbdf: PciSbdf, reg: u16, data: &[u8]) {
        self.config(reg, data.len());
    }
}

fn slot_base(vcpu: u32) -> usize {
    vcpu as usize * IOREQ_SIZE
}

fn set_state(fake: &FakeXen, vcpu: u32, state: u8) {
    let p = fake.ioreq_page();
    let off = slot_base(vcpu) + IOREQ_OFF_FLAGS;
    let f = p.load_u8(off, Ordering::Relaxed);
    p.store_u8(off, (f & !IOREQ_FLAG_STATE_MASK) | (state & IOREQ_FLAG_STATE_MASK), Ordering::Release);
}

fn notified(fake: &FakeXen, port: u32) -> bool {
    fake.calls().contains(&FakeCall::Notify(port))
}

fuzz_target!(|input: Input| {
    let vcpus = u32::from(input.vcpus % 4) + 1;
    let fake = Arc::new(FakeXen::new(vcpus, FAKE_RAM_PAGES));
    let ram = Arc::new(
        MapCache::new(fake.clone(), fake.clone(), DOMID, RAM_BELOW_4G, RAM_ABOVE_4G)
            .with_max_buckets(usize::from(input.max_buckets % 4) + 1),
    );
    ram.set_dirty_log(input.dirty_log);
    let mut srv = IoreqServer::start(fake.clone(), fake.clone(), fake.clone(), DOMID, vcpus)
        .expect("server starts on a healthy fake");
    let inv = ram.clone();
    srv.set_invalidate_hook(Box::new(move || inv.invalidate()));
    let mut h = Handler { ram: ram.clone(), calls: 0, regs: [0; 64] };
    let buf_port = srv.buffered_port().expect("buffered port bound");
    let mut armed = false;

    for op in input.ops.iter().take(64) {
        // What to check after serving an event: the request posted on that vCPU, if known.
        let mut expect: Option<(u32, Option<IoreqRaw>)> = None;
        let mut fire: Option<u32> = None;
        match *op {
            Op::Sync { vcpu, req } => {
                let v = u32::from(vcpu) % vcpus;
                let raw = req.raw();
                fire = fake.post_ioreq(v, &raw);
                expect = Some((v, Some(raw)));
            }
            Op::RawSlot { vcpu, addr, data, count, size, flags, type_, eport, fire: f } => {
                let v = u32::from(vcpu) % vcpus;
                let p = fake.ioreq_page();
                let b = slot_base(v);
                p.store_u64(b + IOREQ_OFF_ADDR, addr, Ordering::Relaxed);
                p.store_u64(b + IOREQ_OFF_DATA, data, Ordering::Relaxed);
                p.store_u32(b + IOREQ_OFF_COUNT, count, Ordering::Relaxed);
                p.store_u32(b + IOREQ_OFF_SIZE, size, Ordering::Relaxed);
                p.store_u32(b + IOREQ_OFF_VP_EPORT, eport, Ordering::Relaxed);
                p.store_u8(b + IOREQ_OFF_TYPE, type_, Ordering::Relaxed);
                p.store_u8(b + IOREQ_OFF_FLAGS, flags, Ordering::Release);
                if f {
                    fire = srv.vcpu_port(v);
                    expect = Some((v, None));
                }
            }
            Op::Buffered { ty, addr, size, data, fire: f } => {
                let size = 1u32 << (size % 4);
                let local = fake.post_buffered(ty.raw(), addr, size, data);
                if f {
                    fire = local;
                }
            }
            Op::RingSlot { index, word0, data } => {
                let off =
                    BUFIOREQ_OFF_SLOTS + (u32::from(index) % IOREQ_BUFFER_SLOT_NUM) as usize * BUF_IOREQ_SIZE;
                fake.buf_page().store_u32(off, word0, Ordering::Relaxed);
                fake.buf_page().store_u32(off + 4, data, Ordering::Relaxed);
            }
            Op::RingPointers { read, write } => {
                fake.buf_page().store_u32(BUFIOREQ_OFF_READ_POINTER, read, Ordering::Relaxed);
                fake.buf_page().store_u32(BUFIOREQ_OFF_WRITE_POINTER, write, Ordering::Release);
            }
            Op::FireBuffered => fire = Some(buf_port),
            Op::FireVcpu(v) => {
                let v = u32::from(v) % vcpus;
                fire = srv.vcpu_port(v);
                expect = Some((v, None));
            }
            Op::FirePort(p) => fire = Some(p),
            Op::Pending => {
                let r = srv.handle_pending(&mut h, &*ram);
                assert!(armed || r.is_ok(), "handle_pending failed without an armed failure: {r:?}");
            }
            Op::Ack(v) => {
                let v = u32::from(v) % vcpus;
                if fake.slot_result(v).0 == STATE_IORESP_READY {
                    set_state(&fake, v, STATE_IOREQ_NONE);
                }
            }
            Op::Fail(ref f) => {
                armed = true;
                let op = match f {
                    Failure::Notify => "notify",
                    Failure::Unmask => "unmask",
                    Failure::MapGuest => "map_guest",
                    Failure::Pending => "pending",
                };
                fake.fail_next(op, EIO);
            }
        }

        if let Some(port) = fire {
            let before: Vec<u8> = (0..vcpus).map(|v| fake.slot_result(v).0).collect();
            fake.clear_calls();
            let calls_before = h.calls;
            let r = srv.on_event(port, &mut h, &*ram);
            let out = match r {
                Ok(o) => o,
                Err(e) => {
                    assert!(armed, "on_event failed without an armed failure: {e}");
                    continue;
                }
            };
            match out {
                EventOutcome::Completed { vcpu } | EventOutcome::Refused { vcpu, .. } => {
                    let (state, data) = fake.slot_result(vcpu);
                    assert_eq!(state, STATE_IORESP_READY, "answered slot of vCPU {vcpu} not IORESP_READY");
                    assert!(notified(&fake, port), "vCPU {vcpu} answered but port {port} not notified");
                    if let Some((v, Some(raw))) = expect {
                        assert_eq!(v, vcpu);
                        let read = raw.flags & IOREQ_FLAG_DIR_READ != 0;
                        let ptr = raw.flags & IOREQ_FLAG_DATA_IS_PTR != 0;
                        if let EventOutcome::Refused { .. } = out {
                            if read && !ptr {
                                assert_eq!(data, all_ones(raw.size), "refused read not all-ones");
                            }
                        } else if read && !ptr && matches!(raw.type_, IOREQ_TYPE_PIO | IOREQ_TYPE_PCI_CONFIG)
                        {
                            assert_eq!(data & !all_ones(raw.size), 0, "read reply wider than its size");
                        }
                        if let EventOutcome::Completed { .. } = out {
                            // Buffered entries drained first count too: at most 511 of them.
                            let reps = u64::from(raw.count.max(1));
                            assert!(h.calls - calls_before <= reps + 511, "more device calls than count");
                        }
                    }
                }
                EventOutcome::Spurious { vcpu } => {
                    if let Some((_, Some(_))) = expect {
                        panic!("a posted request on vCPU {vcpu} was taken for spurious");
                    }
                    let after = fake.slot_result(vcpu);
                    assert_eq!(before[vcpu as usize], after.0, "spurious wake-up changed the slot state");
                    assert_ne!(after.0, STATE_IOREQ_READY);
                }
                EventOutcome::StateChanged { vcpu, state } => {
                    panic!("vCPU {vcpu}: state changed to {state} with nobody else touching the slot")
                }
                EventOutcome::Buffered(stats) => {
                    assert!(stats.delivered + stats.dropped <= IOREQ_BUFFER_SLOT_NUM);
                    assert!(!stats.more, "single-threaded drain left work");
                }
                EventOutcome::UnknownPort => {
                    assert!(port != buf_port && (0..vcpus).all(|v| srv.vcpu_port(v) != Some(port)));
                }
            }
            let rd = fake.buf_page().load_u32(BUFIOREQ_OFF_READ_POINTER, Ordering::Relaxed);
            let wr = fake.buf_page().load_u32(BUFIOREQ_OFF_WRITE_POINTER, Ordering::Relaxed);
            if !matches!(out, EventOutcome::UnknownPort) {
                assert_eq!(rd, wr, "buffered ring not empty after an event ({out:?})");
            }
        }
    }
    drop(srv);
    // Teardown happened: the server destroyed itself.
    assert!(fake.calls().iter().any(|c| matches!(c, FakeCall::Destroy { .. })));
});
