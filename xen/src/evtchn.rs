//! Event channels (`libxenevtchn`): the ioreq server's doorbells.

use std::os::fd::RawFd;

use crate::dm::{Domid, EvtchnPort};
use crate::error::XenError;

pub trait EventChannels {
    /// Binds the guest's unbound port `remote_port` (allocated by Xen with this domain as the
    /// remote end); returns the local port.
    fn bind_interdomain(&self, domid: Domid, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError>;
    fn unbind(&self, port: EvtchnPort) -> Result<(), XenError>;
    fn notify(&self, port: EvtchnPort) -> Result<(), XenError>;
    /// The next fired port (masked until `unmask`), or None when nothing is pending. Only call it
    /// once `fd()` polled readable: on Linux the underlying read may block otherwise.
    fn pending(&self) -> Result<Option<EvtchnPort>, XenError>;
    fn unmask(&self, port: EvtchnPort) -> Result<(), XenError>;
    /// Readable when a port fired (register it with the event loop).
    fn fd(&self) -> RawFd;
    fn restrict(&self, domid: Domid) -> Result<(), XenError>;
}

#[cfg(feature = "xen-libs")]
pub use real::XenEventChannels;

#[cfg(feature = "xen-libs")]
mod real {
    use std::ptr::{self, NonNull};

    use super::*;
    use crate::sys::bindings as b;

    /// An open `xenevtchn_handle`, closed on drop (which also unbinds its ports).
    #[derive(Debug)]
    pub struct XenEventChannels {
        h: NonNull<b::xenevtchn_handle>,
    }

    // SAFETY: the handle is an fd on /dev/xen/evtchn; each call is one ioctl, read or write on it,
    // so moving it between threads and sharing it is sound. (Two threads calling `pending` would
    // race for events, which is a logic problem the single event loop avoids, not a memory one.)
    unsafe impl Send for XenEventChannels {}
    // SAFETY: as above.
    unsafe impl Sync for XenEventChannels {}

    fn check(call: &'static str, rc: std::ffi::c_int) -> Result<(), XenError> {
        if rc < 0 {
            Err(XenError::last_os(call))
        } else {
            Ok(())
        }
    }

    impl XenEventChannels {
        pub fn open() -> Result<Self, XenError> {
            // SAFETY: a null logger selects the default; no pointers are retained.
            let h = unsafe { b::xenevtchn_open(ptr::null_mut(), 0) };
            NonNull::new(h).map(|h| XenEventChannels { h }).ok_or_else(|| XenError::last_os("xenevtchn_open"))
        }

        fn h(&self) -> *mut b::xenevtchn_handle {
            self.h.as_ptr()
        }
    }

    impl Drop for XenEventChannels {
        fn drop(&mut self) {
            // SAFETY: the handle came from xenevtchn_open and is closed exactly once, here.
            if unsafe { b::xenevtchn_close(self.h()) } < 0 {
                log::warn!("{}", XenError::last_os("xenevtchn_close"));
            }
        }
    }

    impl EventChannels for XenEventChannels {
        fn bind_interdomain(&self, domid: Domid, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xenevtchn_bind_interdomain(self.h(), domid.into(), remote_port) };
            check("xenevtchn_bind_interdomain", rc).map(|()| rc as EvtchnPort)
        }

        fn unbind(&self, port: EvtchnPort) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            check("xenevtchn_unbind", unsafe { b::xenevtchn_unbind(self.h(), port) })
        }

        fn notify(&self, port: EvtchnPort) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            check("xenevtchn_notify", unsafe { b::xenevtchn_notify(self.h(), port) })
        }

        fn pending(&self) -> Result<Option<EvtchnPort>, XenError> {
            // SAFETY: valid handle.
            let rc = unsafe { b::xenevtchn_pending(self.h()) };
            if rc >= 0 {
                return Ok(Some(rc as EvtchnPort));
            }
            match XenError::last_os("xenevtchn_pending") {
                e if e.errno() == Some(libc::EAGAIN) => Ok(None),
                e => Err(e),
            }
        }

        fn unmask(&self, port: EvtchnPort) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            check("xenevtchn_unmask", unsafe { b::xenevtchn_unmask(self.h(), port) })
        }

        fn fd(&self) -> RawFd {
            // SAFETY: valid handle; the fd stays owned by the handle.
            unsafe { b::xenevtchn_fd(self.h()) }
        }

        fn restrict(&self, domid: Domid) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            check("xenevtchn_restrict", unsafe { b::xenevtchn_restrict(self.h(), domid) })
        }
    }
}
