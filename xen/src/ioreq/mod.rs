//! The guest-facing half of the ioreq server, free of libxen calls: decoding and answering the
//! per-vCPU slots ([`slot`]), executing requests against the device model ([`process`]), and the
//! buffered ring ([`ring`]), all over the [`page::SharedPage`] abstraction so they are unit
//! tested against fake pages.
//!
//! Per wake-up of vCPU `v` the server loop does:
//! ```text
//! slot = IoreqSlot::new(&ioreq_page, v)
//! drain the buffered ring (BufferedRing::drain, process() each entry)
//! match fetch(&slot):
//!   Ok(req)                     => out = process(&req, devices, ram);
//!                                  (Invalidate: drop idle mappings; TimeOffset: record)
//!                                  complete(&slot, out.reply(&req))
//!   Err(Invalid { reply, .. })  => warn_limited!; complete(&slot, reply)
//!   Err(NotReady(_))            => spurious, nothing
//! notify the vCPU's local event channel port
//! ```

pub mod page;
pub mod process;
pub mod ring;
pub mod slot;

pub use page::{HeapPage, MappedPage, SharedPage};
pub use process::{process, IoreqHandler, Outcome, PciSbdf};
pub use ring::{BufferedRing, DrainStats, RingError};
pub use slot::{
    all_ones, complete, fetch, Invalid, Ioreq, IoreqError, IoreqSlot, IoreqType, IOREQ_MAX_COUNT,
};

#[cfg(test)]
mod tests;
