//! HVM parameters a device model sets outside the dm-op interface. Only one today:
//! `HVM_PARAM_ACPI_S_STATE` (3 when the guest enters ACPI S3, 0 to wake it), which QEMU sets with
//! `xc_hvm_param_set`. hvmdm has no libxenctrl: the `HVMOP_set_param` hypercall goes through
//! libxencall, one of Xen's stable libraries, with the argument in a hypercall-safe buffer.
//!
//! The privcmd fd behind xencall cannot be restricted to one domain, so a restricted device model
//! (`-xen-domid-restrict`) does not open it and S3 is unavailable there (QEMU's restricted mode
//! loses it too: its libxenctrl handle is not restricted either and XSM refuses the call).

use crate::dm::Domid;
use crate::error::XenError;

/// `HVM_PARAM_ACPI_S_STATE` (xen/hvm/params.h).
pub const ACPI_S_STATE: u32 = crate::sys::ioreq::HVM_PARAM_ACPI_S_STATE;

pub trait HvmParams: Send + Sync {
    fn set_param(&self, domid: Domid, index: u32, value: u64) -> Result<(), XenError>;
}

#[cfg(feature = "xen-libs")]
pub use real::XenCall;

#[cfg(feature = "xen-libs")]
mod real {
    use std::ptr::{self, NonNull};

    use super::*;
    use crate::sys::bindings as b;

    /// An open `xencall_handle`, closed on drop.
    #[derive(Debug)]
    pub struct XenCall {
        h: NonNull<b::xencall_handle>,
    }

    // SAFETY: the handle is an fd on the privcmd device plus a buffer cache that libxencall
    // guards with its own lock, so it may be used from any thread.
    unsafe impl Send for XenCall {}
    // SAFETY: as above.
    unsafe impl Sync for XenCall {}

    impl XenCall {
        pub fn open() -> Result<Self, XenError> {
            // SAFETY: a null logger selects the library's default; no pointers are retained.
            let h = unsafe { b::xencall_open(ptr::null_mut(), 0) };
            NonNull::new(h).map(|h| XenCall { h }).ok_or_else(|| XenError::last_os("xencall_open"))
        }
    }

    impl Drop for XenCall {
        fn drop(&mut self) {
            // SAFETY: the handle came from xencall_open and is closed exactly once, here.
            if unsafe { b::xencall_close(self.h.as_ptr()) } < 0 {
                log::warn!("{}", XenError::last_os("xencall_close"));
            }
        }
    }

    impl HvmParams for XenCall {
        fn set_param(&self, domid: Domid, index: u32, value: u64) -> Result<(), XenError> {
            let size = std::mem::size_of::<b::xen_hvm_param>();
            // SAFETY: valid handle; the library returns a buffer of at least `size` bytes (or
            // null) that only we use until it is freed below.
            let buf = unsafe { b::xencall_alloc_buffer(self.h.as_ptr(), size) }.cast::<b::xen_hvm_param>();
            if buf.is_null() {
                return Err(XenError::last_os("xencall_alloc_buffer"));
            }
            let arg = b::xen_hvm_param { domid, pad: 0, index, value };
            // SAFETY: `buf` is a live, suitably aligned (page-backed) buffer of `size` bytes;
            // the hypercall reads it while it is alive, and it is freed exactly once afterwards.
            unsafe {
                buf.write(arg);
                let rc = b::xencall2(
                    self.h.as_ptr(),
                    b::__HYPERVISOR_hvm_op,
                    u64::from(b::HVMOP_set_param),
                    buf as u64,
                );
                let r = if rc < 0 { Err(XenError::last_os("HVMOP_set_param")) } else { Ok(()) };
                b::xencall_free_buffer(self.h.as_ptr(), buf.cast());
                r
            }
        }
    }
}
