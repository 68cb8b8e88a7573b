//! The hvmdm device graph: everything a guest's firmware and OS see, independent of the
//! hypervisor backend. A KVM exit and a Xen ioreq both become an access on a [`bus::Bus`].
//!
//! Backends provide three services to devices through small traits: guest memory for DMA
//! ([`mem::GuestRam`]), interrupt lines ([`irq::IrqSink`]) and system events such as reset and
//! power-off ([`platform::PlatformControl`]).
#![forbid(unsafe_code)]

pub mod bus;
pub mod chipset;
pub mod fw_cfg;
pub mod irq;
pub mod mem;
pub mod pci;
pub mod platform;
pub mod ratelimit;
pub mod serial;
pub mod snapshot;
pub mod storage;
#[cfg(test)]
mod testutil;
pub mod topology;
