//! Raw FFI to Xen's stable libraries (xendevicemodel, xenforeignmemory, xenevtchn, xengnttab,
//! xentoolcore) and the ioreq ABI.
//!
//! [`bindings`] is bindgen output committed to the tree (regenerate with `xen/bindgen/generate.sh`;
//! no libclang at build time). [`ioreq`] restates the ioreq structures by hand with the C bitfields
//! as explicit masks, which is what the ioreq decoder uses; tests pin both against each other and
//! against the offsets gcc reports.
//!
//! Declaring the functions does not link anything: the libraries are linked only with the cargo
//! feature `xen-libs` (see `xen/build.rs`). Until then nothing may call into [`bindings`].

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    reason = "bindgen output, regenerated rather than edited"
)]
pub mod bindings;
pub mod ioreq;

#[cfg(test)]
mod tests {
    use super::bindings as b;
    use super::ioreq as h;
    use std::mem::{offset_of, size_of};

    #[test]
    fn bindgen_layouts_agree_with_hand_written() {
        assert_eq!(size_of::<b::ioreq>(), size_of::<h::IoreqRaw>());
        assert_eq!(offset_of!(b::ioreq, vp_eport), h::IOREQ_OFF_VP_EPORT);
        assert_eq!(offset_of!(b::ioreq, type_), h::IOREQ_OFF_TYPE);
        assert_eq!(size_of::<b::buf_ioreq>(), size_of::<h::BufIoreqRaw>());
        assert_eq!(size_of::<b::buffered_iopage>(), h::XEN_PAGE_SIZE);
        assert_eq!(size_of::<b::shared_iopage>(), h::IOREQ_SIZE);
    }

    #[test]
    fn bindgen_bitfields_agree_with_masks() {
        let mut r =
            b::ioreq { addr: 0, data: 0, count: 0, size: 0, vp_eport: 0, _pad0: 0, ..Default::default() };
        r.set_state(h::STATE_IORESP_READY);
        r.set_data_is_ptr(1);
        r.set_dir(1);
        r.set_df(1);
        // SAFETY: both are plain-old-data repr(C) structs of the same size (asserted above), every
        // bit pattern is valid for IoreqRaw.
        let raw: h::IoreqRaw = unsafe { std::mem::transmute(r) };
        assert_eq!(
            raw.flags,
            h::STATE_IORESP_READY | h::IOREQ_FLAG_DATA_IS_PTR | h::IOREQ_FLAG_DIR_READ | h::IOREQ_FLAG_DF
        );

        let mut bq = b::buf_ioreq { type_: h::IOREQ_TYPE_COPY, data: 0x1234_5678, ..Default::default() };
        bq.set_dir(1);
        bq.set_size(3);
        bq.set_addr(0xa_bcde);
        // SAFETY: as above, 8-byte POD structs.
        let raw: h::BufIoreqRaw = unsafe { std::mem::transmute(bq) };
        assert_eq!(raw.word0 & h::BUF_IOREQ_TYPE_MASK, u32::from(h::IOREQ_TYPE_COPY));
        assert_eq!((raw.word0 >> h::BUF_IOREQ_DIR_SHIFT) & 1, 1);
        assert_eq!((raw.word0 >> h::BUF_IOREQ_SIZE_SHIFT) & h::BUF_IOREQ_SIZE_MASK, 3);
        assert_eq!((raw.word0 >> h::BUF_IOREQ_ADDR_SHIFT) & h::BUF_IOREQ_ADDR_MASK, 0xa_bcde);
        assert_eq!(raw.data, 0x1234_5678);
    }

    #[test]
    fn bindgen_constants_agree_with_hand_written() {
        assert_eq!(b::STATE_IOREQ_NONE, u32::from(h::STATE_IOREQ_NONE));
        assert_eq!(b::STATE_IOREQ_READY, u32::from(h::STATE_IOREQ_READY));
        assert_eq!(b::STATE_IOREQ_INPROCESS, u32::from(h::STATE_IOREQ_INPROCESS));
        assert_eq!(b::STATE_IORESP_READY, u32::from(h::STATE_IORESP_READY));
        assert_eq!(b::IOREQ_TYPE_PIO, u32::from(h::IOREQ_TYPE_PIO));
        assert_eq!(b::IOREQ_TYPE_COPY, u32::from(h::IOREQ_TYPE_COPY));
        assert_eq!(b::IOREQ_TYPE_PCI_CONFIG, u32::from(h::IOREQ_TYPE_PCI_CONFIG));
        assert_eq!(b::IOREQ_TYPE_TIMEOFFSET, u32::from(h::IOREQ_TYPE_TIMEOFFSET));
        assert_eq!(b::IOREQ_TYPE_INVALIDATE, u32::from(h::IOREQ_TYPE_INVALIDATE));
        assert_eq!(b::IOREQ_READ, u32::from(h::IOREQ_READ));
        assert_eq!(b::IOREQ_WRITE, u32::from(h::IOREQ_WRITE));
        assert_eq!(b::IOREQ_BUFFER_SLOT_NUM, h::IOREQ_BUFFER_SLOT_NUM);
        assert_eq!(b::HVM_IOREQSRV_BUFIOREQ_ATOMIC as i32, h::HVM_IOREQSRV_BUFIOREQ_ATOMIC);
        assert_eq!(b::HVM_IOREQSRV_BUFIOREQ_LEGACY as i32, h::HVM_IOREQSRV_BUFIOREQ_LEGACY);
        assert_eq!(b::HVM_IOREQSRV_BUFIOREQ_OFF as i32, h::HVM_IOREQSRV_BUFIOREQ_OFF);
        assert_eq!(b::XENMEM_resource_ioreq_server, h::XENMEM_RESOURCE_IOREQ_SERVER);
        assert_eq!(
            u64::from(b::XENMEM_resource_ioreq_server_frame_bufioreq),
            h::XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ
        );
        assert_eq!(b::HVM_PARAM_ACPI_S_STATE, h::HVM_PARAM_ACPI_S_STATE);
        assert_eq!(b::HVM_PARAM_BUFIOREQ_EVTCHN, h::HVM_PARAM_BUFIOREQ_EVTCHN);
        assert_eq!(b::HVM_PARAM_IOREQ_PFN, h::HVM_PARAM_IOREQ_PFN);
        assert_eq!(b::HVM_PARAM_BUFIOREQ_PFN, h::HVM_PARAM_BUFIOREQ_PFN);
        assert_eq!(b::HVM_PARAM_IOREQ_SERVER_PFN, h::HVM_PARAM_IOREQ_SERVER_PFN);
        assert_eq!(b::HVM_PARAM_NR_IOREQ_SERVER_PAGES, h::HVM_PARAM_NR_IOREQ_SERVER_PAGES);
        assert_eq!(b::SHUTDOWN_poweroff, h::SHUTDOWN_POWEROFF);
        assert_eq!(b::SHUTDOWN_reboot, h::SHUTDOWN_REBOOT);
        assert_eq!(b::SHUTDOWN_suspend, h::SHUTDOWN_SUSPEND);
        assert_eq!(b::SHUTDOWN_crash, h::SHUTDOWN_CRASH);
    }

    /// With the libraries linked, every declared symbol must resolve (catches a missing library in
    /// build.rs). Only built with `--features xen-libs`.
    #[cfg(feature = "xen-libs")]
    #[test]
    fn symbols_resolve_when_linked() {
        let fns: [usize; 6] = [
            b::xendevicemodel_open as *const () as usize,
            b::xenforeignmemory_map_resource as *const () as usize,
            b::xenevtchn_bind_interdomain as *const () as usize,
            b::xengnttab_open as *const () as usize,
            b::xentoolcore_restrict_all as *const () as usize,
            b::xendevicemodel_set_pci_link_route as *const () as usize,
        ];
        assert!(fns.iter().all(|&f| f != 0));
    }
}
