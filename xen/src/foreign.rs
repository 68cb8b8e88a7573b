//! Foreign memory (`libxenforeignmemory`): the ioreq server's pages (mapped as a resource) and
//! guest RAM for DMA. Unmapping is dropping the mapping.

use crate::dm::Domid;
use crate::error::XenError;
use crate::ioreq::SharedPage;
use crate::sys::ioreq::XEN_PAGE_SIZE;

/// A mapped resource (e.g. an ioreq server's buffered page + ioreq page), one
/// [`SharedPage`] view per 4 KiB frame. Unmapped on drop.
pub trait ResourceMapping {
    type Page: SharedPage;
    fn nr_frames(&self) -> usize;
    /// Frame `n` counted from the first mapped frame.
    fn frame(&self, n: usize) -> Option<&Self::Page>;
}

/// Guest frames mapped into this process. Offsets count from the first page; pages that failed
/// to map (holes, MMIO) refuse every access. Unmapped on drop.
pub trait GuestMapping {
    fn nr_pages(&self) -> usize;
    /// Whether page `n` mapped.
    fn page_ok(&self, n: usize) -> bool;
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), XenError>;
    fn write(&self, offset: usize, buf: &[u8]) -> Result<(), XenError>;

    /// True if `offset..offset+len` lies in mapped pages.
    fn range_ok(&self, offset: usize, len: usize) -> bool {
        let Some(end) = offset.checked_add(len) else { return false };
        if end > self.nr_pages() * XEN_PAGE_SIZE {
            return false;
        }
        if len == 0 {
            return true;
        }
        (offset / XEN_PAGE_SIZE..=(end - 1) / XEN_PAGE_SIZE).all(|p| self.page_ok(p))
    }
}

pub trait ForeignMemory {
    type Resource: ResourceMapping;
    type Guest: GuestMapping;
    /// `xenforeignmemory_map_resource`, read/write, letting the kernel choose the address.
    fn map_resource(
        &self,
        domid: Domid,
        type_: u32,
        id: u32,
        frame: u64,
        nr_frames: u64,
    ) -> Result<Self::Resource, XenError>;
    /// Maps guest frames `pfns` contiguously. Individual pages may fail (see
    /// [`GuestMapping::page_ok`]); the call fails only if nothing could be set up.
    fn map_guest(&self, domid: Domid, pfns: &[u64], writable: bool) -> Result<Self::Guest, XenError>;
    fn restrict(&self, domid: Domid) -> Result<(), XenError>;
}

#[cfg(feature = "xen-libs")]
pub use real::{XenForeignMemory, XenGuestMapping, XenResourceMapping};

#[cfg(feature = "xen-libs")]
mod real {
    use std::ffi::{c_int, c_void};
    use std::ptr::{self, NonNull};
    use std::sync::Arc;

    use super::*;
    use crate::ioreq::MappedPage;
    use crate::sys::bindings as b;

    #[derive(Debug)]
    struct Handle(NonNull<b::xenforeignmemory_handle>);

    // SAFETY: the handle is an fd on /dev/xen/privcmd; map/unmap are mmap/ioctl/munmap calls with
    // no shared mutable library state, so it may be moved and shared between threads.
    unsafe impl Send for Handle {}
    // SAFETY: as above.
    unsafe impl Sync for Handle {}

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: from xenforeignmemory_open, closed exactly once; every mapping holds an Arc
            // to this handle, so none outlives it.
            if unsafe { b::xenforeignmemory_close(self.0.as_ptr()) } < 0 {
                log::warn!("{}", XenError::last_os("xenforeignmemory_close"));
            }
        }
    }

    /// An open `xenforeignmemory_handle`, closed when it and all its mappings are dropped.
    #[derive(Debug, Clone)]
    pub struct XenForeignMemory {
        h: Arc<Handle>,
    }

    impl XenForeignMemory {
        pub fn open() -> Result<Self, XenError> {
            // SAFETY: a null logger selects the default; no pointers are retained.
            let h = unsafe { b::xenforeignmemory_open(ptr::null_mut(), 0) };
            NonNull::new(h)
                .map(|h| XenForeignMemory { h: Arc::new(Handle(h)) })
                .ok_or_else(|| XenError::last_os("xenforeignmemory_open"))
        }
    }

    /// A mapped resource; frames are [`MappedPage`] views into it.
    #[derive(Debug)]
    pub struct XenResourceMapping {
        h: Arc<Handle>,
        res: NonNull<b::xenforeignmemory_resource_handle>,
        frames: Vec<MappedPage>,
    }

    // SAFETY: the resource handle is only passed back to unmap_resource on drop; the frames are
    // accessed only atomically (MappedPage), so the mapping can move and be shared across threads.
    unsafe impl Send for XenResourceMapping {}
    // SAFETY: as above.
    unsafe impl Sync for XenResourceMapping {}

    impl ResourceMapping for XenResourceMapping {
        type Page = MappedPage;
        fn nr_frames(&self) -> usize {
            self.frames.len()
        }
        fn frame(&self, n: usize) -> Option<&MappedPage> {
            self.frames.get(n)
        }
    }

    impl Drop for XenResourceMapping {
        fn drop(&mut self) {
            // The views point into the mapping: drop them first.
            self.frames.clear();
            // SAFETY: `res` came from map_resource on this handle (kept alive by the Arc) and is
            // unmapped exactly once, here; no view into it remains.
            if unsafe { b::xenforeignmemory_unmap_resource(self.h.0.as_ptr(), self.res.as_ptr()) } < 0 {
                log::warn!("{}", XenError::last_os("xenforeignmemory_unmap_resource"));
            }
        }
    }

    /// Guest pages mapped contiguously.
    #[derive(Debug)]
    pub struct XenGuestMapping {
        h: Arc<Handle>,
        base: NonNull<u8>,
        ok: Vec<bool>,
        writable: bool,
    }

    // SAFETY: the mapping is process memory shared with the guest; it is only accessed through
    // volatile byte copies, so moving or sharing it between threads adds no data race in Rust.
    unsafe impl Send for XenGuestMapping {}
    // SAFETY: as above.
    unsafe impl Sync for XenGuestMapping {}

    impl GuestMapping for XenGuestMapping {
        fn nr_pages(&self) -> usize {
            self.ok.len()
        }
        fn page_ok(&self, n: usize) -> bool {
            self.ok.get(n).copied().unwrap_or(false)
        }
        fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), XenError> {
            if !self.range_ok(offset, buf.len()) {
                return Err(XenError::GuestAccess { offset, len: buf.len() });
            }
            for (i, b) in buf.iter_mut().enumerate() {
                // SAFETY: offset + i is inside a page that mapped (range_ok). The guest may write
                // it concurrently, so it is read volatile, never through a Rust reference.
                *b = unsafe { ptr::read_volatile(self.base.as_ptr().add(offset + i)) };
            }
            Ok(())
        }
        fn write(&self, offset: usize, buf: &[u8]) -> Result<(), XenError> {
            // A store to a PROT_READ mapping would fault: refuse it instead.
            if !self.writable || !self.range_ok(offset, buf.len()) {
                return Err(XenError::GuestAccess { offset, len: buf.len() });
            }
            for (i, &b) in buf.iter().enumerate() {
                // SAFETY: as in `read`, and the pages were mapped PROT_WRITE (checked above).
                unsafe { ptr::write_volatile(self.base.as_ptr().add(offset + i), b) };
            }
            Ok(())
        }
    }

    impl Drop for XenGuestMapping {
        fn drop(&mut self) {
            // SAFETY: `base` and the page count are exactly what xenforeignmemory_map returned on
            // this handle (alive through the Arc); unmapped once, and no reference into it exists.
            let rc = unsafe {
                b::xenforeignmemory_unmap(self.h.0.as_ptr(), self.base.as_ptr().cast(), self.ok.len())
            };
            if rc < 0 {
                log::warn!("{}", XenError::last_os("xenforeignmemory_unmap"));
            }
        }
    }

    impl ForeignMemory for XenForeignMemory {
        type Resource = XenResourceMapping;
        type Guest = XenGuestMapping;

        fn map_resource(
            &self,
            domid: Domid,
            type_: u32,
            id: u32,
            frame: u64,
            nr_frames: u64,
        ) -> Result<XenResourceMapping, XenError> {
            let nr = usize::try_from(nr_frames)
                .ok()
                .filter(|&n| n > 0 && n.checked_mul(XEN_PAGE_SIZE).is_some())
                .ok_or(XenError::Call { call: "xenforeignmemory_map_resource", errno: libc::EINVAL })?;
            let mut addr: *mut c_void = ptr::null_mut();
            // SAFETY: valid handle; `addr` is a live local (null = kernel chooses the address);
            // the library writes the mapping's address there.
            let res = unsafe {
                b::xenforeignmemory_map_resource(
                    self.h.0.as_ptr(),
                    domid,
                    type_,
                    id,
                    frame as _,
                    nr_frames as _,
                    &mut addr,
                    libc::PROT_READ | libc::PROT_WRITE,
                    0,
                )
            };
            let res = NonNull::new(res).ok_or_else(|| XenError::last_os("xenforeignmemory_map_resource"))?;
            let mut mapping = XenResourceMapping { h: self.h.clone(), res, frames: Vec::with_capacity(nr) };
            let Some(base) = NonNull::new(addr.cast::<u8>()) else {
                // Dropping `mapping` unmaps the resource.
                return Err(XenError::Call { call: "xenforeignmemory_map_resource", errno: libc::EFAULT });
            };
            for n in 0..nr {
                // SAFETY: the mapping is nr page-aligned frames from `base`, readable and writable,
                // valid until unmap_resource in Drop, which first drops these views; Xen's pages are
                // only accessed atomically through MappedPage.
                let page = unsafe { MappedPage::new(base.add(n * XEN_PAGE_SIZE), XEN_PAGE_SIZE) };
                mapping.frames.push(page);
            }
            Ok(mapping)
        }

        fn map_guest(&self, domid: Domid, pfns: &[u64], writable: bool) -> Result<XenGuestMapping, XenError> {
            if pfns.is_empty() {
                return Err(XenError::Call { call: "xenforeignmemory_map", errno: libc::EINVAL });
            }
            let arr: Vec<b::xen_pfn_t> = pfns.iter().map(|&p| p as b::xen_pfn_t).collect();
            let mut err: Vec<c_int> = vec![0; pfns.len()];
            let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
            // SAFETY: valid handle; `arr` and `err` are live arrays of `pfns.len()` entries the
            // library reads and writes during the call only.
            let addr = unsafe {
                b::xenforeignmemory_map(
                    self.h.0.as_ptr(),
                    domid.into(),
                    prot,
                    pfns.len(),
                    arr.as_ptr(),
                    err.as_mut_ptr(),
                )
            };
            let base =
                NonNull::new(addr.cast::<u8>()).ok_or_else(|| XenError::last_os("xenforeignmemory_map"))?;
            Ok(XenGuestMapping {
                h: self.h.clone(),
                base,
                ok: err.iter().map(|&e| e == 0).collect(),
                writable,
            })
        }

        fn restrict(&self, domid: Domid) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            let rc = unsafe { b::xenforeignmemory_restrict(self.h.0.as_ptr(), domid) };
            if rc < 0 {
                Err(XenError::last_os("xenforeignmemory_restrict"))
            } else {
                Ok(())
            }
        }
    }
}

/// The real wrappers on whatever host runs the tests: without Xen (no /dev/xen) every open fails
/// with an errno instead of crashing; under Xen dom0 they open and close cleanly.
#[cfg(all(test, feature = "xen-libs"))]
mod real_tests {
    use crate::dm::XenDeviceModel;
    use crate::evtchn::XenEventChannels;
    use crate::foreign::XenForeignMemory;

    fn ok_or_errno<T>(r: Result<T, crate::XenError>) {
        if let Err(e) = r {
            assert!(e.errno().is_some_and(|n| n > 0), "{e}");
        }
    }

    #[test]
    fn handles_open_or_fail_with_errno() {
        ok_or_errno(XenDeviceModel::open());
        ok_or_errno(XenEventChannels::open());
        ok_or_errno(XenForeignMemory::open());
    }
}
