//! The synchronous per-vCPU ioreq slot: READY → INPROCESS → IORESP_READY (specs §4.3).
//!
//! The slot lives in memory shared with Xen and must be treated as hostile (XSA-197/199): [`fetch`]
//! loads every field exactly once into an [`Ioreq`], validates the copy, and nothing afterwards
//! reads the slot again except the state byte in [`complete`].

use std::sync::atomic::Ordering;

use thiserror::Error;

use super::page::SharedPage;
use crate::sys::ioreq::*;

/// Upper bound on `count`. Xen clips repeated accesses so the RAM side stays within one page, so
/// legitimate requests are far smaller; the bound only caps the work one request can cause.
pub const IOREQ_MAX_COUNT: u32 = 1 << 16;

/// One vCPU's slot in the shared ioreq page.
#[derive(Debug)]
pub struct IoreqSlot<'a, P: SharedPage + ?Sized> {
    page: &'a P,
    base: usize,
    vcpu: u32,
}

impl<'a, P: SharedPage + ?Sized> IoreqSlot<'a, P> {
    /// The slot of `vcpu` (slots are indexed by vcpu_id, 128 per page). None if the page is too
    /// small to hold it.
    pub fn new(page: &'a P, vcpu: u32) -> Option<Self> {
        let base = usize::try_from(vcpu).ok()?.checked_mul(IOREQ_SIZE)?;
        (base.checked_add(IOREQ_SIZE)? <= page.size()).then_some(IoreqSlot { page, base, vcpu })
    }

    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// Current state (STATE_*), e.g. to tell a spurious wake-up from a request.
    pub fn state(&self) -> u8 {
        self.page.load_u8(self.base + IOREQ_OFF_FLAGS, Ordering::Acquire) & IOREQ_FLAG_STATE_MASK
    }

    /// The guest-side event channel Xen publishes once the server is enabled.
    pub fn vp_eport(&self) -> u32 {
        self.page.load_u32(self.base + IOREQ_OFF_VP_EPORT, Ordering::Acquire)
    }
}

/// Request type, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoreqType {
    Pio,
    /// MMIO (`IOREQ_TYPE_COPY`).
    Copy,
    PciConfig,
    TimeOffset,
    Invalidate,
}

impl IoreqType {
    pub fn from_raw(t: u8) -> Option<Self> {
        Some(match t {
            IOREQ_TYPE_PIO => IoreqType::Pio,
            IOREQ_TYPE_COPY => IoreqType::Copy,
            IOREQ_TYPE_PCI_CONFIG => IoreqType::PciConfig,
            IOREQ_TYPE_TIMEOFFSET => IoreqType::TimeOffset,
            IOREQ_TYPE_INVALIDATE => IoreqType::Invalidate,
            _ => return None,
        })
    }
}

/// A validated private copy of one request. Invariants established by [`Ioreq::validate`]:
/// `size` is a supported width for `ty`, `1 <= count <= IOREQ_MAX_COUNT`, no address range the
/// request walks wraps around, PIO ports fit in 16 bits, write data is masked to `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ioreq {
    pub ty: IoreqType,
    pub addr: u64,
    pub data: u64,
    pub count: u32,
    pub size: u32,
    /// true = read (device → guest).
    pub dir_read: bool,
    pub df: bool,
    pub data_is_ptr: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Invalid {
    #[error("unknown type {0}")]
    Type(u8),
    #[error("bad size {0}")]
    Size(u32),
    #[error("bad count {0}")]
    Count(u32),
    #[error("address range wraps or exceeds the address space")]
    Span,
    #[error("data_is_ptr not allowed for this type")]
    Pointer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IoreqError {
    /// Nothing to do (spurious event): the slot is untouched.
    #[error("slot not ready (state {0})")]
    NotReady(u8),
    /// The request is malformed. The slot is now INPROCESS and the caller must still answer it
    /// with `complete(slot, reply)` so the vCPU does not hang.
    #[error("invalid ioreq: {reason} (type {ty}, addr {addr:#x}, size {size}, count {count})")]
    Invalid { reason: Invalid, ty: u8, addr: u64, size: u32, count: u32, reply: u64 },
    /// The state changed under us (only a misbehaving peer does that); the slot was not answered.
    #[error("slot state changed to {0} while the request was in process")]
    StateChanged(u8),
}

/// Value of `size` bytes of all-ones (what a read of nothing returns).
pub fn all_ones(size: u32) -> u64 {
    match size {
        1..=7 => (1u64 << (size * 8)) - 1,
        _ => u64::MAX,
    }
}

/// `base ± i*size`, the address of repetition `i`. Validation guarantees no wrap for the
/// requests we execute; wrapping arithmetic keeps this total anyway.
pub(crate) fn step(base: u64, i: u32, size: u32, df: bool) -> u64 {
    let off = u64::from(i).wrapping_mul(u64::from(size));
    if df {
        base.wrapping_sub(off)
    } else {
        base.wrapping_add(off)
    }
}

/// True if every byte of the `count` accesses of `size` bytes starting at `base` and stepping
/// by ±`size` lies in `0..=limit` without wrapping.
fn span_ok(base: u64, count: u32, size: u32, df: bool, limit: u64) -> bool {
    let size = u64::from(size);
    let back = u64::from(count.saturating_sub(1)) * size;
    // With df the accesses go down from `base`, so `base` holds the highest access.
    let highest = if df { base.checked_sub(back).map(|_| base) } else { base.checked_add(back) };
    highest.and_then(|h| h.checked_add(size.saturating_sub(1))).is_some_and(|end| end <= limit)
}

impl Ioreq {
    /// Validates and normalises a raw copy.
    pub fn validate(raw: &IoreqRaw) -> Result<Ioreq, Invalid> {
        let ty = IoreqType::from_raw(raw.type_).ok_or(Invalid::Type(raw.type_))?;
        let mut req = Ioreq {
            ty,
            addr: raw.addr,
            data: raw.data,
            count: raw.count,
            size: raw.size,
            dir_read: raw.flags & IOREQ_FLAG_DIR_READ != 0,
            df: raw.flags & IOREQ_FLAG_DF != 0,
            data_is_ptr: raw.flags & IOREQ_FLAG_DATA_IS_PTR != 0,
        };
        match ty {
            // Carry no access: only the value matters (and is not trusted for anything).
            IoreqType::TimeOffset | IoreqType::Invalidate => {
                req.count = 1;
                req.data_is_ptr = false;
                return Ok(req);
            }
            IoreqType::Pio | IoreqType::PciConfig if !matches!(req.size, 1 | 2 | 4) => {
                return Err(Invalid::Size(req.size))
            }
            IoreqType::Copy if !matches!(req.size, 1 | 2 | 4 | 8) => return Err(Invalid::Size(req.size)),
            _ => {}
        }
        if req.count == 0 || req.count > IOREQ_MAX_COUNT {
            return Err(Invalid::Count(req.count));
        }
        match ty {
            IoreqType::PciConfig => {
                if req.count != 1 {
                    return Err(Invalid::Count(req.count));
                }
                if req.data_is_ptr {
                    return Err(Invalid::Pointer);
                }
                // Register offset (low 32 bits) within the 4 KiB extended config space.
                let reg = req.addr & 0xffff_ffff;
                if reg + u64::from(req.size) > 0x1000 {
                    return Err(Invalid::Span);
                }
            }
            IoreqType::Pio => {
                // Without a pointer the port is accessed once whatever `count` says (QEMU does
                // the same); with one it is accessed `count` times at the same port.
                if !span_ok(req.addr, 1, req.size, false, 0xffff) {
                    return Err(Invalid::Span);
                }
            }
            IoreqType::Copy => {
                if !span_ok(req.addr, req.count, req.size, req.df, u64::MAX) {
                    return Err(Invalid::Span);
                }
            }
            IoreqType::TimeOffset | IoreqType::Invalidate => {}
        }
        if req.data_is_ptr {
            if !span_ok(req.data, req.count, req.size, req.df, u64::MAX) {
                return Err(Invalid::Span);
            }
        } else if !req.dir_read {
            req.data &= all_ones(req.size);
        }
        Ok(req)
    }

    /// The reply to write back for a refused request: all-ones for a plain read, the original
    /// value otherwise (Xen ignores `data` for writes and pointer requests).
    fn refusal_reply(raw: &IoreqRaw) -> u64 {
        let read = raw.flags & IOREQ_FLAG_DIR_READ != 0;
        let ptr = raw.flags & IOREQ_FLAG_DATA_IS_PTR != 0;
        if read && !ptr {
            all_ones(raw.size)
        } else {
            raw.data
        }
    }
}

/// Takes the request out of a READY slot: acquire-load the state, copy every field once, mark the
/// slot INPROCESS, then validate the copy.
pub fn fetch<P: SharedPage + ?Sized>(slot: &IoreqSlot<'_, P>) -> Result<Ioreq, IoreqError> {
    let p = slot.page;
    let b = slot.base;
    // Acquire pairs with Xen's write barrier before it sets READY: seeing READY means the rest of
    // the slot is written. The bitfields sharing the state byte are read in this same load.
    let flags = p.load_u8(b + IOREQ_OFF_FLAGS, Ordering::Acquire);
    let state = flags & IOREQ_FLAG_STATE_MASK;
    if state != STATE_IOREQ_READY {
        return Err(IoreqError::NotReady(state));
    }
    let raw = IoreqRaw {
        addr: p.load_u64(b + IOREQ_OFF_ADDR, Ordering::Relaxed),
        data: p.load_u64(b + IOREQ_OFF_DATA, Ordering::Relaxed),
        count: p.load_u32(b + IOREQ_OFF_COUNT, Ordering::Relaxed),
        size: p.load_u32(b + IOREQ_OFF_SIZE, Ordering::Relaxed),
        vp_eport: 0,
        _pad0: 0,
        flags,
        type_: p.load_u8(b + IOREQ_OFF_TYPE, Ordering::Relaxed),
    };
    // Written from our snapshot of the byte, so the decision below can never see other bits.
    p.store_u8(
        b + IOREQ_OFF_FLAGS,
        (flags & !IOREQ_FLAG_STATE_MASK) | STATE_IOREQ_INPROCESS,
        Ordering::Relaxed,
    );
    Ioreq::validate(&raw).map_err(|reason| IoreqError::Invalid {
        reason,
        ty: raw.type_,
        addr: raw.addr,
        size: raw.size,
        count: raw.count,
        reply: Ioreq::refusal_reply(&raw),
    })
}

/// Answers an INPROCESS slot: store `data`, then (release, Xen's "update contents then state")
/// set IORESP_READY. The caller then notifies the vCPU's event channel. If the slot is no longer
/// INPROCESS it is left alone and `StateChanged` returned (QEMU shuts the domain down then).
pub fn complete<P: SharedPage + ?Sized>(slot: &IoreqSlot<'_, P>, data: u64) -> Result<(), IoreqError> {
    let p = slot.page;
    let b = slot.base;
    let flags = p.load_u8(b + IOREQ_OFF_FLAGS, Ordering::Relaxed);
    if flags & IOREQ_FLAG_STATE_MASK != STATE_IOREQ_INPROCESS {
        return Err(IoreqError::StateChanged(flags & IOREQ_FLAG_STATE_MASK));
    }
    p.store_u64(b + IOREQ_OFF_DATA, data, Ordering::Relaxed);
    let done = (flags & !IOREQ_FLAG_STATE_MASK) | STATE_IORESP_READY;
    p.compare_exchange_u8(b + IOREQ_OFF_FLAGS, flags, done, Ordering::Release, Ordering::Relaxed)
        .map(|_| ())
        .map_err(|now| IoreqError::StateChanged(now & IOREQ_FLAG_STATE_MASK))
}
