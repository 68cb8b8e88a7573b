//! Access to pages shared with Xen (the synchronous ioreq page and the buffered ring).
//!
//! Those pages are written concurrently by Xen (and, for legacy gfn-mapped servers, by the guest),
//! so every access is a single atomic load or store of a naturally aligned field: never a Rust
//! reference to the page's contents, never a read that the compiler could repeat (XSA-197).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// One or more shared pages, addressed by byte offset. Offsets come from this crate (slot index *
/// 32 + field offset), not from the guest; implementations still check them and treat an
/// out-of-range or misaligned offset as a no-op that reads 0, so no caller bug becomes memory
/// unsafety.
pub trait SharedPage {
    /// Size in bytes.
    fn size(&self) -> usize;
    fn load_u8(&self, off: usize, order: Ordering) -> u8;
    fn store_u8(&self, off: usize, val: u8, order: Ordering);
    /// Compare-and-swap of one byte; returns the value found (equal to `current` on success).
    fn compare_exchange_u8(
        &self,
        off: usize,
        current: u8,
        new: u8,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u8, u8>;
    fn load_u32(&self, off: usize, order: Ordering) -> u32;
    fn store_u32(&self, off: usize, val: u32, order: Ordering);
    fn compare_exchange_u32(
        &self,
        off: usize,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32>;
    fn fetch_add_u32(&self, off: usize, val: u32, order: Ordering) -> u32;
    fn load_u64(&self, off: usize, order: Ordering) -> u64;
    fn store_u64(&self, off: usize, val: u64, order: Ordering);
}

fn in_bounds(off: usize, width: usize, size: usize) -> bool {
    off % width == 0 && off.checked_add(width).is_some_and(|end| end <= size)
}

/// A zero-filled page buffer on the heap, in safe code: tests, fuzzing, and anything that wants to
/// play Xen's side of the protocol.
#[derive(Debug)]
pub struct HeapPage {
    words: Box<[AtomicU64]>,
}

impl HeapPage {
    /// `size` is rounded up to a multiple of 8 bytes.
    pub fn new(size: usize) -> Self {
        let words = (0..size.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
        HeapPage { words }
    }

    fn word(&self, off: usize, width: usize) -> Option<(&AtomicU64, u32)> {
        if !in_bounds(off, width, self.size()) {
            return None;
        }
        // Little-endian byte order inside each word, as on x86.
        Some((&self.words[off / 8], ((off % 8) * 8) as u32))
    }

    fn update(&self, off: usize, width: usize, order: Ordering, f: impl Fn(u64) -> u64) -> Option<u64> {
        let (w, shift) = self.word(off, width)?;
        let mask = if width == 8 { u64::MAX } else { ((1u64 << (width * 8)) - 1) << shift };
        let old = w
            .fetch_update(order, Ordering::Relaxed, |cur| {
                let field = (cur & mask) >> shift;
                Some((cur & !mask) | ((f(field) << shift) & mask))
            })
            .unwrap_or_else(|v| v);
        Some((old & mask) >> shift)
    }

    fn cas(
        &self,
        off: usize,
        width: usize,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        let Some((w, shift)) = self.word(off, width) else { return Err(0) };
        let mask = if width == 8 { u64::MAX } else { ((1u64 << (width * 8)) - 1) << shift };
        let mut cur = w.load(failure);
        loop {
            let field = (cur & mask) >> shift;
            if field != current {
                return Err(field);
            }
            let next = (cur & !mask) | ((new << shift) & mask);
            match w.compare_exchange_weak(cur, next, success, failure) {
                Ok(_) => return Ok(field),
                Err(actual) => cur = actual,
            }
        }
    }

    fn load(&self, off: usize, width: usize, order: Ordering) -> u64 {
        match self.word(off, width) {
            Some((w, shift)) => {
                let v = w.load(order) >> shift;
                if width == 8 {
                    v
                } else {
                    v & ((1u64 << (width * 8)) - 1)
                }
            }
            None => 0,
        }
    }
}

impl SharedPage for HeapPage {
    fn size(&self) -> usize {
        self.words.len() * 8
    }
    fn load_u8(&self, off: usize, order: Ordering) -> u8 {
        self.load(off, 1, order) as u8
    }
    fn store_u8(&self, off: usize, val: u8, order: Ordering) {
        self.update(off, 1, order, |_| u64::from(val));
    }
    fn compare_exchange_u8(
        &self,
        off: usize,
        current: u8,
        new: u8,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u8, u8> {
        self.cas(off, 1, current.into(), new.into(), success, failure).map(|v| v as u8).map_err(|v| v as u8)
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.load(off, 4, order) as u32
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        self.update(off, 4, order, |_| u64::from(val));
    }
    fn compare_exchange_u32(
        &self,
        off: usize,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32> {
        self.cas(off, 4, current.into(), new.into(), success, failure).map(|v| v as u32).map_err(|v| v as u32)
    }
    fn fetch_add_u32(&self, off: usize, val: u32, order: Ordering) -> u32 {
        self.update(off, 4, order, |cur| u64::from((cur as u32).wrapping_add(val))).unwrap_or(0) as u32
    }
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.load(off, 8, order)
    }
    fn store_u64(&self, off: usize, val: u64, order: Ordering) {
        self.update(off, 8, order, |_| val);
    }
}

/// Pages mapped from Xen (e.g. by `xenforeignmemory_map_resource`), seen through a raw pointer.
/// The mapping itself is owned elsewhere; this is only the accessor.
#[derive(Debug)]
pub struct MappedPage {
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: MappedPage is only a pointer into memory that every thread may access; all accesses go
// through atomics, so sharing or sending it between threads cannot create a data race.
unsafe impl Send for MappedPage {}
// SAFETY: as above.
unsafe impl Sync for MappedPage {}

impl MappedPage {
    /// # Safety
    /// `base` must be 8-byte aligned and valid for reads and writes of `size` bytes for the whole
    /// life of the returned value (the mapping must outlive it), and the memory must only ever be
    /// accessed atomically or by another agent (Xen, the guest) outside this process's Rust code.
    pub unsafe fn new(base: NonNull<u8>, size: usize) -> Self {
        MappedPage { base, size }
    }

    fn ptr(&self, off: usize, width: usize) -> Option<*mut u8> {
        if !in_bounds(off, width, self.size) {
            return None;
        }
        // SAFETY: off + width <= size, so the result stays inside the mapping given to `new`.
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    fn u8_at(&self, off: usize) -> Option<&AtomicU8> {
        // SAFETY: the pointer is in bounds (checked by `ptr`), valid for the lifetime of `self`
        // (contract of `new`), and only accessed atomically; u8 needs no alignment.
        self.ptr(off, 1).map(|p| unsafe { AtomicU8::from_ptr(p) })
    }
    fn u32_at(&self, off: usize) -> Option<&AtomicU32> {
        // SAFETY: in bounds and 4-aligned (offset checked by `ptr`, base 8-aligned per `new`),
        // valid for the lifetime of `self`, only accessed atomically.
        self.ptr(off, 4).map(|p| unsafe { AtomicU32::from_ptr(p.cast()) })
    }
    fn u64_at(&self, off: usize) -> Option<&AtomicU64> {
        // SAFETY: in bounds and 8-aligned (offset checked by `ptr`, base 8-aligned per `new`),
        // valid for the lifetime of `self`, only accessed atomically.
        self.ptr(off, 8).map(|p| unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

impl SharedPage for MappedPage {
    fn size(&self) -> usize {
        self.size
    }
    fn load_u8(&self, off: usize, order: Ordering) -> u8 {
        self.u8_at(off).map_or(0, |a| a.load(order))
    }
    fn store_u8(&self, off: usize, val: u8, order: Ordering) {
        if let Some(a) = self.u8_at(off) {
            a.store(val, order);
        }
    }
    fn compare_exchange_u8(
        &self,
        off: usize,
        current: u8,
        new: u8,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u8, u8> {
        self.u8_at(off).map_or(Err(0), |a| a.compare_exchange(current, new, success, failure))
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.u32_at(off).map_or(0, |a| a.load(order))
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        if let Some(a) = self.u32_at(off) {
            a.store(val, order);
        }
    }
    fn compare_exchange_u32(
        &self,
        off: usize,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32> {
        self.u32_at(off).map_or(Err(0), |a| a.compare_exchange(current, new, success, failure))
    }
    fn fetch_add_u32(&self, off: usize, val: u32, order: Ordering) -> u32 {
        self.u32_at(off).map_or(0, |a| a.fetch_add(val, order))
    }
    fn load_u64(&self, off: usize, order: Ordering) -> u64 {
        self.u64_at(off).map_or(0, |a| a.load(order))
    }
    fn store_u64(&self, off: usize, val: u64, order: Ordering) {
        if let Some(a) = self.u64_at(off) {
            a.store(val, order);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::SeqCst;

    fn exercise(p: &dyn SharedPage) {
        p.store_u64(8, 0x1122_3344_5566_7788, SeqCst);
        assert_eq!(p.load_u8(8, SeqCst), 0x88);
        assert_eq!(p.load_u8(15, SeqCst), 0x11);
        assert_eq!(p.load_u32(12, SeqCst), 0x1122_3344);
        p.store_u8(9, 0xaa, SeqCst);
        assert_eq!(p.load_u64(8, SeqCst), 0x1122_3344_5566_aa88);
        p.store_u32(12, 0xdead_beef, SeqCst);
        assert_eq!(p.load_u64(8, SeqCst), 0xdead_beef_5566_aa88);
        assert_eq!(p.fetch_add_u32(12, 1, SeqCst), 0xdead_beef);
        assert_eq!(p.load_u32(12, SeqCst), 0xdead_bef0);
        p.store_u32(0, u32::MAX, SeqCst);
        assert_eq!(p.fetch_add_u32(0, 2, SeqCst), u32::MAX);
        assert_eq!(p.load_u32(0, SeqCst), 1);
        assert_eq!(p.compare_exchange_u8(9, 0xaa, 0x55, SeqCst, SeqCst), Ok(0xaa));
        assert_eq!(p.compare_exchange_u8(9, 0xaa, 0x66, SeqCst, SeqCst), Err(0x55));
        assert_eq!(p.compare_exchange_u32(4, 0, 7, SeqCst, SeqCst), Ok(0));
        assert_eq!(p.compare_exchange_u32(4, 0, 9, SeqCst, SeqCst), Err(7));
        assert_eq!(p.load_u32(4, SeqCst), 7);
        // Out of range and misaligned: reads 0, writes ignored, no panic.
        let size = p.size();
        assert_eq!(p.load_u64(size, SeqCst), 0);
        assert_eq!(p.load_u32(size - 2, SeqCst), 0);
        assert_eq!(p.load_u32(2, SeqCst), 0);
        assert_eq!(p.load_u8(usize::MAX, SeqCst), 0);
        p.store_u64(usize::MAX - 3, 1, SeqCst);
        p.store_u32(size, 1, SeqCst);
        assert_eq!(p.fetch_add_u32(size, 1, SeqCst), 0);
        assert!(p.compare_exchange_u8(size, 0, 1, SeqCst, SeqCst).is_err());
    }

    #[test]
    fn heap_page_accessors() {
        let p = HeapPage::new(4096);
        assert_eq!(p.size(), 4096);
        exercise(&p);
    }

    #[test]
    fn mapped_page_accessors() {
        let mut backing = vec![0u64; 512];
        let base = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
        {
            // SAFETY: `backing` is 8-aligned, 4096 bytes, outlives `p` (this block), and is not
            // touched while `p` is alive.
            let p = unsafe { MappedPage::new(base, 4096) };
            exercise(&p);
        }
        assert_eq!(backing[1], 0xdead_bef0_5566_5588);
    }
}
