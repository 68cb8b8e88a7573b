//! Xen backend: libxen FFI, ioreq server, xenstore (later issue; builds and is wired into the layout).
//!
//! The libxen wrappers sit behind narrow traits ([`dm::DeviceModelOps`],
//! [`evtchn::EventChannels`], [`foreign::ForeignMemory`]) so that [`server::IoreqServer`] runs
//! against [`fake::FakeXen`] in tests; the real implementations exist only with the `xen-libs`
//! feature.

pub mod dm;
pub mod error;
pub mod evtchn;
pub mod fake;
pub mod foreign;
pub mod hvmparam;
pub mod ioreq;
pub mod mapcache;
pub mod platform;
pub mod server;
pub mod sys;
pub mod xenstore;

pub use error::XenError;
pub use mapcache::{MapCache, MapCacheStats};
pub use platform::{XenIrq, XenPlatform};
pub use server::{EventOutcome, IoreqServer};
