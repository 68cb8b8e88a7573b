//! Errors of the libxen wrappers and the ioreq server.

use thiserror::Error;

/// A failed call into Xen's libraries (carrying the `errno` they set) or a setup invariant that
/// does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum XenError {
    /// A library call returned failure; `errno` is what it left in `errno`.
    #[error("{call} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Call { call: &'static str, errno: i32 },
    /// Xen did not publish a vCPU's event channel in the ioreq page (the server must be enabled
    /// before `vp_eport` is read).
    #[error("vCPU {vcpu}: no event channel published in the ioreq page")]
    NoVpEport { vcpu: u32 },
    /// More vCPUs than the synchronous ioreq page has slots for.
    #[error("{0} vCPUs requested, one ioreq page serves at most 128")]
    TooManyVcpus(u32),
    /// The mapped ioreq-server resource lacks a frame the protocol needs.
    #[error("ioreq server resource mapping has no frame {0}")]
    MissingFrame(usize),
    /// A range with `start > end` (ranges are inclusive).
    #[error("invalid range {start:#x}..={end:#x}")]
    InvalidRange { start: u64, end: u64 },
    /// An access to a guest mapping outside it or to a page that failed to map.
    #[error("guest mapping access at offset {offset:#x} (+{len}) is outside the mapped pages")]
    GuestAccess { offset: usize, len: usize },
}

impl XenError {
    /// The OS error number, for `Call` errors.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// A `Call` error from the current thread's `errno` (read right after the failing call).
    #[cfg(feature = "xen-libs")]
    pub(crate) fn last_os(call: &'static str) -> Self {
        // errno 0 would read "Success"; EIO is the honest "the library failed without saying why".
        let errno = std::io::Error::last_os_error().raw_os_error().filter(|&e| e != 0).unwrap_or(libc::EIO);
        XenError::Call { call, errno }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_names_the_call_and_errno() {
        let e = XenError::Call { call: "xenevtchn_notify", errno: libc::EINVAL };
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let s = e.to_string();
        assert!(s.starts_with("xenevtchn_notify failed: "), "{s}");
        assert!(s.contains("Invalid argument"), "{s}");
        assert_eq!(XenError::NoVpEport { vcpu: 1 }.errno(), None);
    }
}
