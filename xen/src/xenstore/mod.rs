//! Pure-Rust xenstore client (wire protocol of Xen's `io/xs_wire.h`) over xenstored's unix
//! socket or the `/dev/xen/xenbus` character device.

mod client;
#[cfg(test)]
mod fake;
mod transport;
pub mod wire;

pub use client::{Access, Client, Perm, Transaction, WatchEvent, XenStore, XsError, DEFAULT_TX_RETRIES};
pub use transport::{Transport, DEFAULT_SOCKET, XENBUS_DEVICE};
pub use wire::{Errno, MsgType, XENSTORE_PAYLOAD_MAX};
