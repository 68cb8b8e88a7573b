//! Device-model operations (`libxendevicemodel`): the ioreq server's life cycle, what it
//! intercepts, and the calls a device model makes into Xen at run time (IRQs, MSIs, dirty
//! memory, shutdown).

use crate::error::XenError;
use crate::ioreq::PciSbdf;
use crate::sys::ioreq::{
    HVM_IOREQSRV_BUFIOREQ_ATOMIC, HVM_IOREQSRV_BUFIOREQ_LEGACY, HVM_IOREQSRV_BUFIOREQ_OFF, SHUTDOWN_CRASH,
    SHUTDOWN_POWEROFF, SHUTDOWN_REBOOT, SHUTDOWN_SUSPEND,
};

pub type Domid = u16;
pub type IoservId = u16;
pub type EvtchnPort = u32;

/// How Xen may post write-only requests (`handle_bufioreq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufioreqMode {
    Off,
    Legacy,
    /// Read pointer updated atomically so Xen can rebase both pointers (what hvmdm uses).
    Atomic,
}

impl BufioreqMode {
    pub fn raw(self) -> i32 {
        match self {
            BufioreqMode::Off => HVM_IOREQSRV_BUFIOREQ_OFF,
            BufioreqMode::Legacy => HVM_IOREQSRV_BUFIOREQ_LEGACY,
            BufioreqMode::Atomic => HVM_IOREQSRV_BUFIOREQ_ATOMIC,
        }
    }
}

/// `xendevicemodel_shutdown` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    Poweroff,
    Reboot,
    Suspend,
    Crash,
}

impl ShutdownReason {
    pub fn raw(self) -> u32 {
        match self {
            ShutdownReason::Poweroff => SHUTDOWN_POWEROFF,
            ShutdownReason::Reboot => SHUTDOWN_REBOOT,
            ShutdownReason::Suspend => SHUTDOWN_SUSPEND,
            ShutdownReason::Crash => SHUTDOWN_CRASH,
        }
    }
}

/// What `get_ioreq_server_info` reports when the pages are mapped as a resource (no gfns asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoreqServerInfo {
    /// The guest-side port of the buffered-ioreq event channel (bind it interdomain).
    pub bufioreq_port: EvtchnPort,
}

/// The device-model operations hvmdm uses. Ranges are inclusive, as in Xen.
pub trait DeviceModelOps {
    fn create_ioreq_server(&self, domid: Domid, bufioreq: BufioreqMode) -> Result<IoservId, XenError>;
    /// Asks without gfns (`XEN_DMOP_no_gfns`): the pages are mapped with `map_resource`.
    fn get_ioreq_server_info(&self, domid: Domid, id: IoservId) -> Result<IoreqServerInfo, XenError>;
    fn map_io_range(
        &self,
        domid: Domid,
        id: IoservId,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError>;
    fn unmap_io_range(
        &self,
        domid: Domid,
        id: IoservId,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError>;
    fn map_pcidev(&self, domid: Domid, id: IoservId, sbdf: PciSbdf) -> Result<(), XenError>;
    fn unmap_pcidev(&self, domid: Domid, id: IoservId, sbdf: PciSbdf) -> Result<(), XenError>;
    fn set_ioreq_server_state(&self, domid: Domid, id: IoservId, enabled: bool) -> Result<(), XenError>;
    fn destroy_ioreq_server(&self, domid: Domid, id: IoservId) -> Result<(), XenError>;
    /// `intx` 0..3 = INTA..INTD.
    fn set_pci_intx_level(&self, domid: Domid, sbdf: PciSbdf, intx: u8, level: bool) -> Result<(), XenError>;
    fn set_isa_irq_level(&self, domid: Domid, irq: u8, level: bool) -> Result<(), XenError>;
    /// `irq` 0 disables the link (PIIX3 PIRQ register bit 7 set).
    fn set_pci_link_route(&self, domid: Domid, link: u8, irq: u8) -> Result<(), XenError>;
    fn inject_msi(&self, domid: Domid, addr: u64, data: u32) -> Result<(), XenError>;
    fn modified_memory(&self, domid: Domid, first_pfn: u64, nr: u32) -> Result<(), XenError>;
    fn shutdown(&self, domid: Domid, reason: ShutdownReason) -> Result<(), XenError>;
    fn nr_vcpus(&self, domid: Domid) -> Result<u32, XenError>;
    /// Limits this handle to `domid` (deprivileging).
    fn restrict(&self, domid: Domid) -> Result<(), XenError>;
}

#[cfg(feature = "xen-libs")]
pub use real::XenDeviceModel;

#[cfg(feature = "xen-libs")]
mod real {
    use std::ffi::c_int;
    use std::ptr::{self, NonNull};

    use super::*;
    use crate::sys::bindings as b;

    /// An open `xendevicemodel_handle`, closed on drop.
    #[derive(Debug)]
    pub struct XenDeviceModel {
        h: NonNull<b::xendevicemodel_handle>,
    }

    // SAFETY: the handle is an fd on /dev/xen/privcmd plus immutable state; every operation is one
    // ioctl with per-call buffers (xencall's buffer cache takes its own lock), so the handle may
    // move between threads and be used from several at once.
    unsafe impl Send for XenDeviceModel {}
    // SAFETY: as above.
    unsafe impl Sync for XenDeviceModel {}

    fn check(call: &'static str, rc: c_int) -> Result<(), XenError> {
        if rc < 0 {
            Err(XenError::last_os(call))
        } else {
            Ok(())
        }
    }

    impl XenDeviceModel {
        pub fn open() -> Result<Self, XenError> {
            // SAFETY: a null logger selects the library's default; no pointers are retained.
            let h = unsafe { b::xendevicemodel_open(ptr::null_mut(), 0) };
            NonNull::new(h)
                .map(|h| XenDeviceModel { h })
                .ok_or_else(|| XenError::last_os("xendevicemodel_open"))
        }

        fn h(&self) -> *mut b::xendevicemodel_handle {
            self.h.as_ptr()
        }
    }

    impl Drop for XenDeviceModel {
        fn drop(&mut self) {
            // SAFETY: the handle came from xendevicemodel_open and is closed exactly once, here.
            if unsafe { b::xendevicemodel_close(self.h()) } < 0 {
                log::warn!("{}", XenError::last_os("xendevicemodel_close"));
            }
        }
    }

    impl DeviceModelOps for XenDeviceModel {
        fn create_ioreq_server(&self, domid: Domid, bufioreq: BufioreqMode) -> Result<IoservId, XenError> {
            let mut id: b::ioservid_t = 0;
            // SAFETY: valid handle; `id` is a live local the library writes once.
            let rc =
                unsafe { b::xendevicemodel_create_ioreq_server(self.h(), domid, bufioreq.raw(), &mut id) };
            check("xendevicemodel_create_ioreq_server", rc).map(|()| id)
        }

        fn get_ioreq_server_info(&self, domid: Domid, id: IoservId) -> Result<IoreqServerInfo, XenError> {
            let mut port: b::evtchn_port_t = 0;
            // SAFETY: valid handle; null gfn pointers are allowed (they request XEN_DMOP_no_gfns);
            // `port` is a live local.
            let rc = unsafe {
                b::xendevicemodel_get_ioreq_server_info(
                    self.h(),
                    domid,
                    id,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    &mut port,
                )
            };
            check("xendevicemodel_get_ioreq_server_info", rc)
                .map(|()| IoreqServerInfo { bufioreq_port: port })
        }

        fn map_io_range(
            &self,
            domid: Domid,
            id: IoservId,
            is_mmio: bool,
            start: u64,
            end: u64,
        ) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe {
                b::xendevicemodel_map_io_range_to_ioreq_server(
                    self.h(),
                    domid,
                    id,
                    is_mmio.into(),
                    start,
                    end,
                )
            };
            check("xendevicemodel_map_io_range_to_ioreq_server", rc)
        }

        fn unmap_io_range(
            &self,
            domid: Domid,
            id: IoservId,
            is_mmio: bool,
            start: u64,
            end: u64,
        ) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe {
                b::xendevicemodel_unmap_io_range_from_ioreq_server(
                    self.h(),
                    domid,
                    id,
                    is_mmio.into(),
                    start,
                    end,
                )
            };
            check("xendevicemodel_unmap_io_range_from_ioreq_server", rc)
        }

        fn map_pcidev(&self, domid: Domid, id: IoservId, s: PciSbdf) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe {
                b::xendevicemodel_map_pcidev_to_ioreq_server(
                    self.h(),
                    domid,
                    id,
                    s.segment(),
                    s.bus(),
                    s.device(),
                    s.function(),
                )
            };
            check("xendevicemodel_map_pcidev_to_ioreq_server", rc)
        }

        fn unmap_pcidev(&self, domid: Domid, id: IoservId, s: PciSbdf) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe {
                b::xendevicemodel_unmap_pcidev_from_ioreq_server(
                    self.h(),
                    domid,
                    id,
                    s.segment(),
                    s.bus(),
                    s.device(),
                    s.function(),
                )
            };
            check("xendevicemodel_unmap_pcidev_from_ioreq_server", rc)
        }

        fn set_ioreq_server_state(&self, domid: Domid, id: IoservId, enabled: bool) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_set_ioreq_server_state(self.h(), domid, id, enabled.into()) };
            check("xendevicemodel_set_ioreq_server_state", rc)
        }

        fn destroy_ioreq_server(&self, domid: Domid, id: IoservId) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_destroy_ioreq_server(self.h(), domid, id) };
            check("xendevicemodel_destroy_ioreq_server", rc)
        }

        fn set_pci_intx_level(
            &self,
            domid: Domid,
            s: PciSbdf,
            intx: u8,
            level: bool,
        ) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe {
                b::xendevicemodel_set_pci_intx_level(
                    self.h(),
                    domid,
                    s.segment(),
                    s.bus(),
                    s.device(),
                    intx,
                    level.into(),
                )
            };
            check("xendevicemodel_set_pci_intx_level", rc)
        }

        fn set_isa_irq_level(&self, domid: Domid, irq: u8, level: bool) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_set_isa_irq_level(self.h(), domid, irq, level.into()) };
            check("xendevicemodel_set_isa_irq_level", rc)
        }

        fn set_pci_link_route(&self, domid: Domid, link: u8, irq: u8) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_set_pci_link_route(self.h(), domid, link, irq) };
            check("xendevicemodel_set_pci_link_route", rc)
        }

        fn inject_msi(&self, domid: Domid, addr: u64, data: u32) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_inject_msi(self.h(), domid, addr, data) };
            check("xendevicemodel_inject_msi", rc)
        }

        fn modified_memory(&self, domid: Domid, first_pfn: u64, nr: u32) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_modified_memory(self.h(), domid, first_pfn, nr) };
            check("xendevicemodel_modified_memory", rc)
        }

        fn shutdown(&self, domid: Domid, reason: ShutdownReason) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar arguments only.
            let rc = unsafe { b::xendevicemodel_shutdown(self.h(), domid, reason.raw()) };
            check("xendevicemodel_shutdown", rc)
        }

        fn nr_vcpus(&self, domid: Domid) -> Result<u32, XenError> {
            let mut n: std::ffi::c_uint = 0;
            // SAFETY: valid handle; `n` is a live local the library writes once.
            let rc = unsafe { b::xendevicemodel_nr_vcpus(self.h(), domid, &mut n) };
            check("xendevicemodel_nr_vcpus", rc).map(|()| n)
        }

        fn restrict(&self, domid: Domid) -> Result<(), XenError> {
            // SAFETY: valid handle, scalar argument only.
            let rc = unsafe { b::xendevicemodel_restrict(self.h(), domid) };
            check("xendevicemodel_restrict", rc)
        }
    }
}
