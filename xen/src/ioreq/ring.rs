//! The buffered ioreq ring (specs §4.5): write-only requests Xen posts without waiting, 511
//! 8-byte slots, an 8-byte value taking two consecutive slots, pointers free-running and
//! rebased by Xen in ATOMIC mode.

use std::sync::atomic::Ordering;

use hvmdm_devices::warn_limited;
use thiserror::Error;

use super::page::SharedPage;
use super::slot::{Ioreq, IoreqType};
use crate::sys::ioreq::*;

/// Re-reads tolerated per drain when Xen rebases the pointers under us.
const MAX_REBASE_RETRIES: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RingError {
    #[error("buffered ioreq page is {0} bytes, needs 4096")]
    PageTooSmall(usize),
}

/// What one [`BufferedRing::drain`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainStats {
    /// Requests handed to the callback.
    pub delivered: u32,
    /// Slots consumed but not delivered (reads, unknown types).
    pub dropped: u32,
    /// The per-call bound stopped the drain with entries left: drain again (re-arm the timer).
    pub more: bool,
    /// The pointers were inconsistent and the ring was resynchronised (entries discarded).
    pub resynced: bool,
}

/// Consumer side of the buffered ring.
#[derive(Debug)]
pub struct BufferedRing<'a, P: SharedPage + ?Sized> {
    page: &'a P,
    resyncs: u64,
}

impl<'a, P: SharedPage + ?Sized> BufferedRing<'a, P> {
    pub fn new(page: &'a P) -> Result<Self, RingError> {
        if page.size() < XEN_PAGE_SIZE {
            return Err(RingError::PageTooSmall(page.size()));
        }
        Ok(BufferedRing { page, resyncs: 0 })
    }

    /// Times the ring was found corrupt and resynchronised.
    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    fn slot(&self, ptr: u32) -> (u32, u32) {
        let off = BUFIOREQ_OFF_SLOTS + (ptr % IOREQ_BUFFER_SLOT_NUM) as usize * BUF_IOREQ_SIZE;
        (self.page.load_u32(off, Ordering::Relaxed), self.page.load_u32(off + 4, Ordering::Relaxed))
    }

    /// Consumes up to one ring's worth of entries, calling `f` with each as a count-1, non-pointer
    /// write. Never blocks or loops unboundedly: at most 511 slots and a few pointer re-reads.
    pub fn drain(&mut self, mut f: impl FnMut(&Ioreq)) -> DrainStats {
        let mut stats = DrainStats::default();
        let mut consumed = 0u32;
        let mut retries = 0u32;
        loop {
            // Acquire pairs with Xen's wmb before it advances write_pointer.
            let rd = self.page.load_u32(BUFIOREQ_OFF_READ_POINTER, Ordering::Acquire);
            let wr = self.page.load_u32(BUFIOREQ_OFF_WRITE_POINTER, Ordering::Acquire);
            if self.page.load_u32(BUFIOREQ_OFF_READ_POINTER, Ordering::Acquire) != rd {
                // Xen rebased both pointers between our loads.
                retries += 1;
                if retries > MAX_REBASE_RETRIES {
                    stats.more = true;
                    return stats;
                }
                continue;
            }
            if rd == wr {
                return stats;
            }
            if rd > wr || wr - rd > IOREQ_BUFFER_SLOT_NUM {
                self.resync(rd, wr, "pointers out of range");
                stats.resynced = true;
                return stats;
            }
            if consumed >= IOREQ_BUFFER_SLOT_NUM {
                stats.more = true;
                return stats;
            }
            let (w0, lo) = self.slot(rd);
            let size = 1u32 << ((w0 >> BUF_IOREQ_SIZE_SHIFT) & BUF_IOREQ_SIZE_MASK);
            let mut data = u64::from(lo);
            let mut used = 1;
            if size == 8 {
                if wr - rd < 2 {
                    // Xen publishes both halves before moving write_pointer, so a lone half is
                    // corruption, not a race.
                    self.resync(rd, wr, "8-byte entry missing its second slot");
                    stats.resynced = true;
                    return stats;
                }
                let (_, hi) = self.slot(rd.wrapping_add(1));
                data |= u64::from(hi) << 32;
                used = 2;
            }
            let ty = (w0 & BUF_IOREQ_TYPE_MASK) as u8;
            let dir_read = (w0 >> BUF_IOREQ_DIR_SHIFT) & 1 != 0;
            let ty = match IoreqType::from_raw(ty) {
                Some(t @ (IoreqType::Pio | IoreqType::Copy | IoreqType::TimeOffset)) if !dir_read => Some(t),
                _ => None,
            };
            match ty {
                Some(ty) => {
                    let req = Ioreq {
                        ty,
                        addr: u64::from((w0 >> BUF_IOREQ_ADDR_SHIFT) & BUF_IOREQ_ADDR_MASK),
                        data,
                        count: 1,
                        // A 20-bit address plus at most 8 bytes cannot wrap; PIO ports are
                        // limited to 16 bits below.
                        size,
                        dir_read: false,
                        df: false,
                        data_is_ptr: false,
                    };
                    if req.ty == IoreqType::Pio && req.addr + u64::from(size) > 0x1_0000 {
                        stats.dropped += 1;
                        warn_limited!(
                            "bufioreq-port",
                            "buffered ioreq: port {:#x} out of range, dropped",
                            req.addr
                        );
                    } else if req.ty == IoreqType::Pio && size > 4 {
                        // Ports take 1, 2 or 4 bytes (found by the ioreq fuzzer).
                        stats.dropped += 1;
                        warn_limited!("bufioreq-pio-size", "buffered ioreq: {size}-byte port write, dropped");
                    } else {
                        stats.delivered += 1;
                        f(&req);
                    }
                }
                None => {
                    stats.dropped += 1;
                    warn_limited!(
                        "bufioreq-type",
                        "buffered ioreq: type/dir word {w0:#x} not a posted write, dropped"
                    );
                }
            }
            // Atomic add, not a store: in ATOMIC mode Xen may rebase read_pointer concurrently.
            self.page.fetch_add_u32(BUFIOREQ_OFF_READ_POINTER, used, Ordering::Release);
            consumed += used;
        }
    }

    /// Discards everything up to `wr` (compare-and-swap so a concurrent Xen rebase wins).
    fn resync(&mut self, rd: u32, wr: u32, why: &str) {
        self.resyncs += 1;
        warn_limited!(
            "bufioreq-corrupt",
            "buffered ioreq ring corrupt ({why}: read {rd:#x}, write {wr:#x}); discarding pending entries"
        );
        let _ = self.page.compare_exchange_u32(
            BUFIOREQ_OFF_READ_POINTER,
            rd,
            wr,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}
