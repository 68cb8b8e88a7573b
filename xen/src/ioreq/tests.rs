//! Tests against a fake ioreq page playing Xen's side of the protocol.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering::{self, SeqCst};

use hvmdm_devices::mem::{GuestRam, TestRam};

use super::*;
use crate::sys::ioreq::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    PioR(u16, usize),
    PioW(u16, Vec<u8>),
    MmioR(u64, usize),
    MmioW(u64, Vec<u8>),
    CfgR(u32, u16, usize),
    CfgW(u32, u16, Vec<u8>),
}

/// Records calls; reads return bytes 0xA0, 0xA1, ... (distinct per call so ordering shows).
#[derive(Default)]
struct Rec {
    calls: Vec<Call>,
    next: u8,
}

impl Rec {
    fn fill(&mut self, d: &mut [u8]) {
        for b in d.iter_mut() {
            *b = 0xa0u8.wrapping_add(self.next);
            self.next = self.next.wrapping_add(1);
        }
    }
}

impl IoreqHandler for Rec {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.calls.push(Call::PioR(port, data.len()));
        self.fill(data);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.calls.push(Call::PioW(port, data.to_vec()));
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.calls.push(Call::MmioR(addr, data.len()));
        self.fill(data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.calls.push(Call::MmioW(addr, data.to_vec()));
    }
    fn pci_config_read(&mut self, sbdf: PciSbdf, reg: u16, data: &mut [u8]) {
        self.calls.push(Call::CfgR(sbdf.0, reg, data.len()));
        self.fill(data);
    }
    fn pci_config_write(&mut self, sbdf: PciSbdf, reg: u16, data: &[u8]) {
        self.calls.push(Call::CfgW(sbdf.0, reg, data.to_vec()));
    }
}

/// Builds the flags byte.
fn flags(state: u8, read: bool, ptr: bool, df: bool) -> u8 {
    state
        | if read { IOREQ_FLAG_DIR_READ } else { 0 }
        | if ptr { IOREQ_FLAG_DATA_IS_PTR } else { 0 }
        | if df { IOREQ_FLAG_DF } else { 0 }
}

#[allow(clippy::too_many_arguments, reason = "mirrors the ioreq fields, test helper")]
fn raw(ty: u8, addr: u64, data: u64, count: u32, size: u32, read: bool, ptr: bool, df: bool) -> IoreqRaw {
    IoreqRaw {
        addr,
        data,
        count,
        size,
        vp_eport: 77,
        _pad0: 0,
        flags: flags(STATE_IOREQ_READY, read, ptr, df),
        type_: ty,
    }
}

/// Xen's side: write the slot with state NONE, then publish READY.
fn post(page: &dyn SharedPage, vcpu: usize, r: IoreqRaw) {
    let b = vcpu * IOREQ_SIZE;
    page.store_u64(b + IOREQ_OFF_ADDR, r.addr, SeqCst);
    page.store_u64(b + IOREQ_OFF_DATA, r.data, SeqCst);
    page.store_u32(b + IOREQ_OFF_COUNT, r.count, SeqCst);
    page.store_u32(b + IOREQ_OFF_SIZE, r.size, SeqCst);
    page.store_u32(b + IOREQ_OFF_VP_EPORT, r.vp_eport, SeqCst);
    page.store_u8(b + IOREQ_OFF_TYPE, r.type_, SeqCst);
    page.store_u8(b + IOREQ_OFF_FLAGS, r.flags, SeqCst);
}

fn slot_data(page: &dyn SharedPage, vcpu: usize) -> u64 {
    page.load_u64(vcpu * IOREQ_SIZE + IOREQ_OFF_DATA, SeqCst)
}
fn slot_flags(page: &dyn SharedPage, vcpu: usize) -> u8 {
    page.load_u8(vcpu * IOREQ_SIZE + IOREQ_OFF_FLAGS, SeqCst)
}

/// Full round trip: post, fetch, process, complete. Returns (calls, reply data in the slot).
fn run(r: IoreqRaw, ram: &TestRam) -> (Vec<Call>, u64, Outcome) {
    let page = HeapPage::new(4096);
    post(&page, 3, r);
    let slot = IoreqSlot::new(&page, 3).unwrap();
    assert_eq!(slot.vp_eport(), 77);
    let req = fetch(&slot).unwrap();
    assert_eq!(slot.state(), STATE_IOREQ_INPROCESS);
    let mut h = Rec::default();
    let out = process(&req, &mut h, ram);
    complete(&slot, out.reply(&req)).unwrap();
    let f = slot_flags(&page, 3);
    assert_eq!(f & IOREQ_FLAG_STATE_MASK, STATE_IORESP_READY);
    // The other bitfields of the state byte are preserved.
    assert_eq!(f & !IOREQ_FLAG_STATE_MASK, r.flags & !IOREQ_FLAG_STATE_MASK);
    (h.calls, slot_data(&page, 3), out)
}

#[test]
fn pio_write_masks_data_to_size() {
    let ram = TestRam::new(0x1000);
    let (calls, _, out) = run(raw(IOREQ_TYPE_PIO, 0x3f8, 0xdead_ff41, 1, 1, false, false, false), &ram);
    assert_eq!(calls, vec![Call::PioW(0x3f8, vec![0x41])]);
    assert_eq!(out, Outcome::Reply(0x41));
}

#[test]
fn pio_read_replies_in_data() {
    let ram = TestRam::new(0x1000);
    let (calls, data, _) =
        run(raw(IOREQ_TYPE_PIO, 0xcfc, 0xffff_ffff_ffff_ffff, 1, 2, true, false, false), &ram);
    assert_eq!(calls, vec![Call::PioR(0xcfc, 2)]);
    assert_eq!(data, 0xa1a0);
}

#[test]
fn mmio_8_byte_read_and_write() {
    let ram = TestRam::new(0x1000);
    let (calls, data, _) = run(raw(IOREQ_TYPE_COPY, 0xfebf_0000, 0, 1, 8, true, false, false), &ram);
    assert_eq!(calls, vec![Call::MmioR(0xfebf_0000, 8)]);
    assert_eq!(data, 0xa7a6_a5a4_a3a2_a1a0);
    let (calls, _, _) =
        run(raw(IOREQ_TYPE_COPY, 0xfebf_0008, 0x0102_0304_0506_0708, 1, 8, false, false, false), &ram);
    assert_eq!(calls, vec![Call::MmioW(0xfebf_0008, vec![8, 7, 6, 5, 4, 3, 2, 1])]);
}

#[test]
fn rep_stos_to_mmio_steps_device_address_backwards_with_df() {
    let ram = TestRam::new(0x1000);
    let (calls, _, _) = run(raw(IOREQ_TYPE_COPY, 0xa0010, 0x55aa, 3, 2, false, false, true), &ram);
    assert_eq!(
        calls,
        vec![
            Call::MmioW(0xa0010, vec![0xaa, 0x55]),
            Call::MmioW(0xa000e, vec![0xaa, 0x55]),
            Call::MmioW(0xa000c, vec![0xaa, 0x55]),
        ]
    );
}

#[test]
fn rep_outs_reads_guest_memory_with_df() {
    let ram = TestRam::new(0x1000);
    ram.write(0x100, &[1, 2, 3, 4, 5, 6]).unwrap();
    // df: data, data-2, data-4.
    let (calls, _, _) = run(raw(IOREQ_TYPE_PIO, 0x1f0, 0x104, 3, 2, false, true, true), &ram);
    assert_eq!(
        calls,
        vec![Call::PioW(0x1f0, vec![5, 6]), Call::PioW(0x1f0, vec![3, 4]), Call::PioW(0x1f0, vec![1, 2])]
    );
}

#[test]
fn rep_ins_writes_guest_memory() {
    let ram = TestRam::new(0x1000);
    let (calls, _, _) = run(raw(IOREQ_TYPE_PIO, 0x1f0, 0x200, 2, 4, true, true, false), &ram);
    assert_eq!(calls, vec![Call::PioR(0x1f0, 4), Call::PioR(0x1f0, 4)]);
    let mut b = [0u8; 8];
    ram.read(0x200, &mut b).unwrap();
    assert_eq!(b, [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
}

#[test]
fn rep_movs_both_directions() {
    let ram = TestRam::new(0x1000);
    ram.write(0x300, &[9, 8, 7, 6]).unwrap();
    let (calls, _, _) = run(raw(IOREQ_TYPE_COPY, 0xe000_0000, 0x300, 2, 2, false, true, false), &ram);
    assert_eq!(calls, vec![Call::MmioW(0xe000_0000, vec![9, 8]), Call::MmioW(0xe000_0002, vec![7, 6])]);
    let (calls, _, _) = run(raw(IOREQ_TYPE_COPY, 0xe000_0000, 0x400, 2, 1, true, true, false), &ram);
    assert_eq!(calls, vec![Call::MmioR(0xe000_0000, 1), Call::MmioR(0xe000_0001, 1)]);
    let mut b = [0u8; 2];
    ram.read(0x400, &mut b).unwrap();
    assert_eq!(b, [0xa0, 0xa1]);
}

#[test]
fn rep_into_missing_ram_stops_without_panic() {
    let ram = TestRam::new(0x1000);
    // Second element lands outside RAM.
    let (calls, _, _) = run(raw(IOREQ_TYPE_PIO, 0x1f0, 0xffe, 3, 2, true, true, false), &ram);
    assert_eq!(calls.len(), 2, "device read for elements 0 and 1, stop at the failed RAM write");
}

#[test]
fn pci_config_decodes_sbdf_and_register() {
    let ram = TestRam::new(0x1000);
    let sbdf = xen_dmop_pci_sbdf(0, 0, 3, 0);
    let addr = (u64::from(sbdf) << 32) | 0x3e;
    let (calls, data, _) = run(raw(IOREQ_TYPE_PCI_CONFIG, addr, 0, 1, 2, true, false, false), &ram);
    assert_eq!(calls, vec![Call::CfgR(0x18, 0x3e, 2)]);
    assert_eq!(data, 0xa1a0);
    let s = PciSbdf(0x0001_0a13);
    assert_eq!((s.segment(), s.bus(), s.device(), s.function()), (1, 0x0a, 2, 3));
    let (calls, _, _) =
        run(raw(IOREQ_TYPE_PCI_CONFIG, addr | 0x104, 0xffff_1234, 1, 4, false, false, false), &ram);
    assert_eq!(calls, vec![Call::CfgW(0x18, 0x13e, vec![0x34, 0x12, 0xff, 0xff])]);
}

#[test]
fn timeoffset_and_invalidate_are_reported() {
    let ram = TestRam::new(0x1000);
    let (calls, _, out) = run(raw(IOREQ_TYPE_TIMEOFFSET, 0, 3600, 1, 8, false, false, false), &ram);
    assert!(calls.is_empty());
    assert_eq!(out, Outcome::TimeOffset(3600));
    // Size and count are not used for INVALIDATE, so garbage there is harmless.
    let (calls, data, out) = run(raw(IOREQ_TYPE_INVALIDATE, 0, !0, 0, 99, false, false, false), &ram);
    assert!(calls.is_empty());
    assert_eq!(out, Outcome::Invalidate);
    assert_eq!(data, !0);
}

#[test]
fn not_ready_leaves_slot_alone() {
    let page = HeapPage::new(4096);
    for state in [STATE_IOREQ_NONE, STATE_IOREQ_INPROCESS, STATE_IORESP_READY, 0xf] {
        let mut r = raw(IOREQ_TYPE_PIO, 0x80, 0, 1, 1, false, false, false);
        r.flags = (r.flags & !IOREQ_FLAG_STATE_MASK) | state;
        post(&page, 0, r);
        let slot = IoreqSlot::new(&page, 0).unwrap();
        assert_eq!(fetch(&slot), Err(IoreqError::NotReady(state)));
        assert_eq!(slot_flags(&page, 0), r.flags);
    }
}

#[test]
fn slot_index_bounds() {
    let page = HeapPage::new(4096);
    assert!(IoreqSlot::new(&page, 127).is_some());
    assert!(IoreqSlot::new(&page, 128).is_none());
    assert!(IoreqSlot::new(&page, u32::MAX).is_none());
    let two = HeapPage::new(8192);
    assert_eq!(IoreqSlot::new(&two, 200).unwrap().vcpu(), 200);
}

#[test]
fn garbage_requests_are_refused_and_answered() {
    use Invalid::*;
    let cases: Vec<(IoreqRaw, Invalid)> = vec![
        (raw(5, 0, 0, 1, 1, true, false, false), Type(5)),
        (raw(0xff, 0, 0, 1, 1, true, false, false), Type(0xff)),
        (raw(IOREQ_TYPE_PIO, 0x80, 0, 1, 3, true, false, false), Size(3)),
        (raw(IOREQ_TYPE_PIO, 0x80, 0, 1, 8, true, false, false), Size(8)),
        (raw(IOREQ_TYPE_PIO, 0x80, 0, 1, 0, true, false, false), Size(0)),
        (raw(IOREQ_TYPE_COPY, 0x80, 0, 1, 16, true, false, false), Size(16)),
        (raw(IOREQ_TYPE_COPY, 0x80, 0, 1, u32::MAX, true, false, false), Size(u32::MAX)),
        (raw(IOREQ_TYPE_PCI_CONFIG, 0, 0, 1, 8, true, false, false), Size(8)),
        (raw(IOREQ_TYPE_PIO, 0x80, 0, 0, 1, true, false, false), Count(0)),
        (
            raw(IOREQ_TYPE_COPY, 0x80, 0, IOREQ_MAX_COUNT + 1, 1, true, false, false),
            Count(IOREQ_MAX_COUNT + 1),
        ),
        (raw(IOREQ_TYPE_COPY, 0x80, 0, u32::MAX, 8, false, true, false), Count(u32::MAX)),
        (raw(IOREQ_TYPE_PCI_CONFIG, 0, 0, 2, 4, true, false, false), Count(2)),
        (raw(IOREQ_TYPE_PCI_CONFIG, 0xffe, 0, 1, 4, true, false, false), Span),
        (raw(IOREQ_TYPE_PCI_CONFIG, 0, 0, 1, 4, true, true, false), Pointer),
        // Port beyond 16 bits (XSA-199) and a word access straddling the top port.
        (raw(IOREQ_TYPE_PIO, 0x1_0000, 0, 1, 1, true, false, false), Span),
        (raw(IOREQ_TYPE_PIO, 0xffff, 0, 1, 2, true, false, false), Span),
        (raw(IOREQ_TYPE_PIO, u64::MAX, 0, 1, 4, false, false, false), Span),
        // Guest-memory side wrapping upwards and (df) downwards.
        (raw(IOREQ_TYPE_PIO, 0x1f0, u64::MAX - 2, 2, 2, true, true, false), Span),
        (raw(IOREQ_TYPE_PIO, 0x1f0, 2, 3, 2, true, true, true), Span),
        // Device side of MMIO wrapping.
        (raw(IOREQ_TYPE_COPY, u64::MAX - 6, 0, 1, 8, true, false, false), Span),
        (raw(IOREQ_TYPE_COPY, 8, 0, 3, 8, false, false, true), Span),
    ];
    for (r, why) in cases {
        let page = HeapPage::new(4096);
        post(&page, 1, r);
        let slot = IoreqSlot::new(&page, 1).unwrap();
        let err = fetch(&slot).unwrap_err();
        let IoreqError::Invalid { reason, reply, .. } = err else { panic!("{r:?}: {err:?}") };
        assert_eq!(reason, why, "{r:?}");
        // Still answered, so the vCPU does not hang.
        assert_eq!(slot.state(), STATE_IOREQ_INPROCESS);
        complete(&slot, reply).unwrap();
        assert_eq!(slot.state(), STATE_IORESP_READY);
        let read = r.flags & IOREQ_FLAG_DIR_READ != 0;
        let ptr = r.flags & IOREQ_FLAG_DATA_IS_PTR != 0;
        let expect = if read && !ptr { all_ones(r.size) } else { r.data };
        assert_eq!(slot_data(&page, 1), expect, "{r:?}");
    }
}

#[test]
fn edge_requests_that_are_valid() {
    let ram = TestRam::new(0x1000);
    // Top port, exact fit; lowest address with df; highest address for MMIO.
    let (c, _, _) = run(raw(IOREQ_TYPE_PIO, 0xfffc, 0, 1, 4, true, false, false), &ram);
    assert_eq!(c, vec![Call::PioR(0xfffc, 4)]);
    let (c, _, _) = run(raw(IOREQ_TYPE_COPY, 4, 0, 3, 2, false, false, true), &ram);
    assert_eq!(c.len(), 3);
    let (c, _, _) = run(raw(IOREQ_TYPE_COPY, u64::MAX - 7, 0, 1, 8, true, false, false), &ram);
    assert_eq!(c, vec![Call::MmioR(u64::MAX - 7, 8)]);
    let (c, _, _) = run(raw(IOREQ_TYPE_PCI_CONFIG, 0xffc, 0, 1, 4, true, false, false), &ram);
    assert_eq!(c, vec![Call::CfgR(0, 0xffc, 4)]);
}

type Hook = Box<dyn FnMut(&HeapPage, usize)>;

/// A page that lets a test act as a hostile peer between our accesses.
struct SpyPage {
    inner: HeapPage,
    loads: RefCell<Vec<usize>>,
    hook: RefCell<Hook>,
    busy: Cell<bool>,
}

impl SpyPage {
    fn new(hook: impl FnMut(&HeapPage, usize) + 'static) -> Self {
        SpyPage {
            inner: HeapPage::new(4096),
            loads: RefCell::default(),
            hook: RefCell::new(Box::new(hook)),
            busy: Cell::new(false),
        }
    }
    fn after_load(&self, off: usize) {
        self.loads.borrow_mut().push(off);
        if !self.busy.replace(true) {
            (self.hook.borrow_mut())(&self.inner, off);
            self.busy.set(false);
        }
    }
}

impl SharedPage for SpyPage {
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn load_u8(&self, off: usize, o: Ordering) -> u8 {
        let v = self.inner.load_u8(off, o);
        self.after_load(off);
        v
    }
    fn store_u8(&self, off: usize, v: u8, o: Ordering) {
        self.inner.store_u8(off, v, o)
    }
    fn compare_exchange_u8(&self, off: usize, c: u8, n: u8, s: Ordering, f: Ordering) -> Result<u8, u8> {
        self.inner.compare_exchange_u8(off, c, n, s, f)
    }
    fn load_u32(&self, off: usize, o: Ordering) -> u32 {
        let v = self.inner.load_u32(off, o);
        self.after_load(off);
        v
    }
    fn store_u32(&self, off: usize, v: u32, o: Ordering) {
        self.inner.store_u32(off, v, o)
    }
    fn compare_exchange_u32(&self, off: usize, c: u32, n: u32, s: Ordering, f: Ordering) -> Result<u32, u32> {
        self.inner.compare_exchange_u32(off, c, n, s, f)
    }
    fn fetch_add_u32(&self, off: usize, v: u32, o: Ordering) -> u32 {
        self.inner.fetch_add_u32(off, v, o)
    }
    fn load_u64(&self, off: usize, o: Ordering) -> u64 {
        let v = self.inner.load_u64(off, o);
        self.after_load(off);
        v
    }
    fn store_u64(&self, off: usize, v: u64, o: Ordering) {
        self.inner.store_u64(off, v, o)
    }
}

#[test]
fn slot_is_copied_once_even_if_rewritten_during_fetch() {
    // After every load the peer rewrites the whole slot with garbage and flips the state.
    let mut rng = Rng(7);
    let page = SpyPage::new(move |p, _| {
        p.store_u64(IOREQ_OFF_ADDR, rng.next(), SeqCst);
        p.store_u64(IOREQ_OFF_DATA, rng.next(), SeqCst);
        p.store_u32(IOREQ_OFF_COUNT, rng.next() as u32, SeqCst);
        p.store_u32(IOREQ_OFF_SIZE, rng.next() as u32, SeqCst);
        p.store_u8(IOREQ_OFF_TYPE, rng.next() as u8, SeqCst);
        p.store_u8(IOREQ_OFF_FLAGS, rng.next() as u8, SeqCst);
    });
    for _ in 0..500 {
        post(&page.inner, 0, raw(IOREQ_TYPE_PIO, 0x70, 0x12, 1, 1, false, false, false));
        page.loads.borrow_mut().clear();
        let slot = IoreqSlot::new(&page, 0).unwrap();
        let res = fetch(&slot);
        let loads = page.loads.borrow().clone();
        let mut sorted = loads.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), loads.len(), "a field was read twice: {loads:?}");
        // The state byte is read first, and only it decides readiness.
        assert_eq!(loads[0], IOREQ_OFF_FLAGS);
        if let Ok(req) = res {
            // Whatever mix we copied, what we return satisfies the validated invariants.
            assert!(
                matches!(req.size, 1 | 2 | 4 | 8)
                    || matches!(req.ty, IoreqType::TimeOffset | IoreqType::Invalidate)
            );
            assert!(req.count >= 1 && req.count <= IOREQ_MAX_COUNT);
            let mut h = Rec::default();
            let _ = process(&req, &mut h, &TestRam::new(0x100));
            assert!(h.calls.len() <= req.count as usize);
        }
    }
}

#[test]
fn guest_rewriting_slot_after_fetch_does_not_change_the_request() {
    let page = HeapPage::new(4096);
    post(&page, 0, raw(IOREQ_TYPE_PIO, 0x3f8, 0x41, 1, 1, false, false, false));
    let slot = IoreqSlot::new(&page, 0).unwrap();
    let req = fetch(&slot).unwrap();
    // The peer now scribbles over the slot (different port, size, pointer flag).
    post(&page, 0, raw(IOREQ_TYPE_COPY, 0xdead_0000, 0x4242, 1000, 8, true, true, true));
    let mut h = Rec::default();
    let out = process(&req, &mut h, &TestRam::new(0x100));
    assert_eq!(h.calls, vec![Call::PioW(0x3f8, vec![0x41])]);
    // It also moved the state back to READY: we must not answer over it.
    assert_eq!(complete(&slot, out.reply(&req)), Err(IoreqError::StateChanged(STATE_IOREQ_READY)));
    assert_eq!(slot.state(), STATE_IOREQ_READY);
    // State flapped to NONE: same.
    page.store_u8(IOREQ_OFF_FLAGS, STATE_IOREQ_NONE, SeqCst);
    assert_eq!(complete(&slot, 0), Err(IoreqError::StateChanged(STATE_IOREQ_NONE)));
    assert_eq!(slot.state(), STATE_IOREQ_NONE);
}

// ---- buffered ring ----

fn buf_word(ty: u8, read: bool, size_code: u32, addr: u32) -> u32 {
    u32::from(ty)
        | (u32::from(read) << BUF_IOREQ_DIR_SHIFT)
        | (size_code << BUF_IOREQ_SIZE_SHIFT)
        | (addr << BUF_IOREQ_ADDR_SHIFT)
}

fn put_slot(page: &dyn SharedPage, ptr: u32, w0: u32, data: u32) {
    let off = BUFIOREQ_OFF_SLOTS + (ptr % IOREQ_BUFFER_SLOT_NUM) as usize * 8;
    page.store_u32(off, w0, SeqCst);
    page.store_u32(off + 4, data, SeqCst);
}

/// Xen's producer: returns false if full.
fn produce(page: &dyn SharedPage, ty: u8, size_code: u32, addr: u32, data: u64) -> bool {
    let rd = page.load_u32(BUFIOREQ_OFF_READ_POINTER, SeqCst);
    let wr = page.load_u32(BUFIOREQ_OFF_WRITE_POINTER, SeqCst);
    let qw = size_code == 3;
    if wr - rd >= IOREQ_BUFFER_SLOT_NUM - u32::from(qw) {
        return false;
    }
    let w0 = buf_word(ty, false, size_code, addr);
    put_slot(page, wr, w0, data as u32);
    if qw {
        put_slot(page, wr + 1, w0, (data >> 32) as u32);
    }
    page.store_u32(BUFIOREQ_OFF_WRITE_POINTER, wr + if qw { 2 } else { 1 }, SeqCst);
    true
}

fn pointers(page: &dyn SharedPage) -> (u32, u32) {
    (page.load_u32(BUFIOREQ_OFF_READ_POINTER, SeqCst), page.load_u32(BUFIOREQ_OFF_WRITE_POINTER, SeqCst))
}

fn set_pointers(page: &dyn SharedPage, rd: u32, wr: u32) {
    page.store_u32(BUFIOREQ_OFF_READ_POINTER, rd, SeqCst);
    page.store_u32(BUFIOREQ_OFF_WRITE_POINTER, wr, SeqCst);
}

#[test]
fn ring_delivers_writes_in_order() {
    let page = HeapPage::new(4096);
    assert!(produce(&page, IOREQ_TYPE_COPY, 0, 0xa0000, 0x11));
    assert!(produce(&page, IOREQ_TYPE_COPY, 2, 0xa0004, 0x2233_4455));
    assert!(produce(&page, IOREQ_TYPE_TIMEOFFSET, 3, 0, 0xffff_ffff_ffff_fff0));
    assert!(produce(&page, IOREQ_TYPE_PIO, 1, 0x3c4, 0x0f02));
    let mut ring = BufferedRing::new(&page).unwrap();
    let mut got = vec![];
    let st = ring.drain(|r| got.push(*r));
    assert_eq!(st, DrainStats { delivered: 4, ..Default::default() });
    let summary: Vec<_> = got.iter().map(|r| (r.ty, r.addr, r.size, r.data)).collect();
    assert_eq!(
        summary,
        vec![
            (IoreqType::Copy, 0xa0000, 1, 0x11),
            (IoreqType::Copy, 0xa0004, 4, 0x2233_4455),
            (IoreqType::TimeOffset, 0, 8, 0xffff_ffff_ffff_fff0),
            (IoreqType::Pio, 0x3c4, 2, 0x0f02),
        ]
    );
    assert!(got.iter().all(|r| !r.dir_read && r.count == 1 && !r.data_is_ptr));
    assert_eq!(pointers(&page), (5, 5));
    // Processing a buffered entry goes through the same executor.
    let mut h = Rec::default();
    process(&got[3], &mut h, &TestRam::new(0));
    assert_eq!(h.calls, vec![Call::PioW(0x3c4, vec![2, 0x0f])]);
    assert_eq!(ring.drain(|_| panic!("empty")), DrainStats::default());
}

#[test]
fn ring_wraps_around_including_a_split_8_byte_entry() {
    let page = HeapPage::new(4096);
    // 8-byte entry in slots 510 and 0, then a 1-byte one in slot 1.
    set_pointers(&page, 510, 510);
    assert!(produce(&page, IOREQ_TYPE_COPY, 3, 0xb8000, 0x8877_6655_4433_2211));
    assert!(produce(&page, IOREQ_TYPE_COPY, 0, 0xb8008, 0x99));
    let mut got = vec![];
    let st = BufferedRing::new(&page).unwrap().drain(|r| got.push((r.addr, r.size, r.data)));
    assert_eq!(st.delivered, 2);
    assert_eq!(got, vec![(0xb8000, 8, 0x8877_6655_4433_2211), (0xb8008, 1, 0x99)]);
    assert_eq!(pointers(&page), (513, 513));
}

#[test]
fn ring_full_is_bounded_per_drain() {
    let page = HeapPage::new(4096);
    let mut n = 0;
    while produce(&page, IOREQ_TYPE_COPY, 0, 0xa0000 + n, u64::from(n)) {
        n += 1;
    }
    assert_eq!(n, 511);
    let mut ring = BufferedRing::new(&page).unwrap();
    let mut seen = 0u32;
    let st = ring.drain(|r| {
        assert_eq!(r.data, u64::from(seen));
        seen += 1;
    });
    assert_eq!(st.delivered, 511);
    assert!(!st.more);
    // Keep a producer ahead of us: one drain call still stops after one ring's worth.
    for i in 0..600u32 {
        if !produce(&page, IOREQ_TYPE_COPY, 0, 0xa0000, u64::from(i)) {
            break;
        }
    }
    assert_eq!(ring.drain(|_| {}).delivered, 511);
}

#[test]
fn ring_drops_reads_and_unknown_types() {
    let page = HeapPage::new(4096);
    put_slot(&page, 0, buf_word(IOREQ_TYPE_COPY, true, 0, 0xa0000), 1);
    put_slot(&page, 1, buf_word(IOREQ_TYPE_INVALIDATE, false, 0, 0), 1);
    put_slot(&page, 2, buf_word(0x42, false, 0, 0), 1);
    put_slot(&page, 3, buf_word(IOREQ_TYPE_PCI_CONFIG, false, 2, 0), 1);
    put_slot(&page, 4, buf_word(IOREQ_TYPE_PIO, false, 2, 0xfffe), 1);
    put_slot(&page, 5, buf_word(IOREQ_TYPE_COPY, false, 0, 0xa0001), 7);
    set_pointers(&page, 0, 6);
    let mut got = vec![];
    let st = BufferedRing::new(&page).unwrap().drain(|r| got.push(r.data));
    assert_eq!((st.delivered, st.dropped), (1, 5));
    assert_eq!(got, vec![7]);
    assert_eq!(pointers(&page), (6, 6));
}

#[test]
fn ring_pointers_out_of_range_resync_without_looping() {
    for (rd, wr) in [(10u32, 5u32), (0, 512), (0, u32::MAX), (u32::MAX, 0), (100, 100 + 600)] {
        let page = HeapPage::new(4096);
        set_pointers(&page, rd, wr);
        let mut ring = BufferedRing::new(&page).unwrap();
        let st = ring.drain(|_| panic!("nothing may be delivered from a corrupt ring"));
        assert!(st.resynced, "{rd} {wr}");
        assert_eq!(ring.resyncs(), 1);
        assert_eq!(pointers(&page), (wr, wr), "resync discards pending entries");
        if wr > u32::MAX - 8 {
            continue; // a producer would overflow the pointer here; nothing more to check
        }
        // Consistent again: new entries flow.
        assert!(produce(&page, IOREQ_TYPE_COPY, 0, 0xa0000, 5));
        assert_eq!(ring.drain(|r| assert_eq!(r.data, 5)).delivered, 1);
    }
}

#[test]
fn ring_half_of_an_8_byte_entry_is_corruption() {
    let page = HeapPage::new(4096);
    put_slot(&page, 0, buf_word(IOREQ_TYPE_COPY, false, 3, 0xa0000), 1);
    set_pointers(&page, 0, 1);
    let st = BufferedRing::new(&page).unwrap().drain(|_| panic!("no"));
    assert!(st.resynced);
    assert_eq!(pointers(&page), (1, 1));
}

#[test]
fn ring_read_pointer_rebased_forever_gives_up() {
    // The peer moves read_pointer after every load: we retry a bounded number of times.
    let flip = Cell::new(0u32);
    let page = SpyPage::new(move |p, off| {
        if off == BUFIOREQ_OFF_READ_POINTER {
            flip.set(flip.get() + 1);
            p.store_u32(BUFIOREQ_OFF_READ_POINTER, flip.get() % 2, SeqCst);
        }
    });
    page.inner.store_u32(BUFIOREQ_OFF_WRITE_POINTER, 3, SeqCst);
    let mut ring = BufferedRing::new(&page).unwrap();
    let st = ring.drain(|_| {});
    assert!(st.more);
    assert!(page.loads.borrow().len() < 200);
    assert!(BufferedRing::new(&HeapPage::new(64)).is_err());
}

#[test]
fn ring_rebase_between_drains_is_transparent() {
    let page = HeapPage::new(4096);
    set_pointers(&page, 511 * 3 + 7, 511 * 3 + 7);
    assert!(produce(&page, IOREQ_TYPE_COPY, 1, 0xa0000, 0xbeef));
    // Xen's ATOMIC-mode rebase: both pointers down by a multiple of 511.
    set_pointers(&page, 7, 8);
    let mut got = vec![];
    BufferedRing::new(&page).unwrap().drain(|r| got.push(r.data));
    assert_eq!(got, vec![0xbeef]);
}

// ---- randomized ----

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Counts handler calls instead of recording them (fuzz volume).
#[derive(Default)]
struct Count(u64);
impl IoreqHandler for Count {
    fn pio_read(&mut self, _: u16, d: &mut [u8]) {
        self.0 += 1;
        d.fill(0xff);
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {
        self.0 += 1;
    }
    fn mmio_read(&mut self, _: u64, d: &mut [u8]) {
        self.0 += 1;
        d.fill(0xff);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {
        self.0 += 1;
    }
    fn pci_config_read(&mut self, _: PciSbdf, _: u16, d: &mut [u8]) {
        self.0 += 1;
        d.fill(0xff);
    }
    fn pci_config_write(&mut self, _: PciSbdf, _: u16, _: &[u8]) {
        self.0 += 1;
    }
}

#[test]
fn fuzz_random_pages_never_panic_and_work_is_bounded() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let ram = TestRam::new(0x10000);
    let (mut ok, mut invalid) = (0u32, 0u32);
    for round in 0..300 {
        let page = HeapPage::new(4096);
        for off in (0..4096).step_by(8) {
            let mut v = rng.next();
            // Bias towards plausible slots so the executor is exercised, not only validation.
            if off % 32 == 24 && round % 2 == 0 {
                let ty = [IOREQ_TYPE_PIO, IOREQ_TYPE_COPY, IOREQ_TYPE_PCI_CONFIG, 7, 8, 3][(v % 6) as usize];
                v = (v & 0x00ff_ffff_ffff)
                    | (u64::from(ty) << 56)
                    | (u64::from(STATE_IOREQ_READY | (v as u8 & 0x70)) << 48);
            }
            if off % 32 == 16 && round % 2 == 0 {
                // count small, size in 0..9
                v = (v & 0x7) | ((v >> 32) % 10) << 32;
            }
            if off % 32 == 8 && round % 4 == 0 {
                v &= 0xffff; // data as a pointer into TestRam
            }
            page.store_u64(off, v, SeqCst);
        }
        for vcpu in 0..128 {
            let slot = IoreqSlot::new(&page, vcpu).unwrap();
            match fetch(&slot) {
                Ok(req) => {
                    ok += 1;
                    let mut h = Count::default();
                    let out = process(&req, &mut h, &ram);
                    assert!(h.0 <= u64::from(req.count), "{req:?}");
                    complete(&slot, out.reply(&req)).unwrap();
                }
                Err(IoreqError::Invalid { reply, .. }) => {
                    invalid += 1;
                    complete(&slot, reply).unwrap();
                }
                Err(IoreqError::NotReady(_)) => {}
                Err(e @ IoreqError::StateChanged(_)) => panic!("{e}"),
            }
        }
        // The same garbage as a buffered page, plus biased pointers.
        if round % 3 == 0 {
            let rd = (rng.next() % 2000) as u32;
            set_pointers(&page, rd, rd + (rng.next() % 600) as u32);
        }
        let mut ring = BufferedRing::new(&page).unwrap();
        let mut n = 0u32;
        let st = ring.drain(|r| {
            n += 1;
            assert!(matches!(r.size, 1 | 2 | 4 | 8) && r.count == 1 && !r.dir_read);
            let mut h = Count::default();
            process(r, &mut h, &ram);
            assert!(h.0 <= 1);
        });
        assert!(st.delivered + st.dropped <= IOREQ_BUFFER_SLOT_NUM + 1);
        assert_eq!(n, st.delivered);
    }
    assert!(ok > 1000 && invalid > 1000, "ok {ok} invalid {invalid}");
}
