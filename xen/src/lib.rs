//! Xen backend: libxen FFI, ioreq server, xenstore (later issue; builds and is wired into the layout).

pub mod ioreq;
pub mod sys;
pub mod xenstore;
