//! The ioreq ABI shared between Xen and a device model (`xen/hvm/ioreq.h`, `xen/memory.h`,
//! `xen/hvm/hvm_op.h`, `xen/hvm/params.h` of Xen 4.17), written by hand so that the C bitfields
//! become explicit masks. The layouts are pinned by tests against the offsets gcc reports
//! (specs/xen-interfaces.md §4.2) and against the bindgen output in [`super::bindings`].

/// `IOREQ_READ` / `IOREQ_WRITE` (the `dir` bit).
pub const IOREQ_READ: u8 = 1;
pub const IOREQ_WRITE: u8 = 0;

pub const STATE_IOREQ_NONE: u8 = 0;
pub const STATE_IOREQ_READY: u8 = 1;
pub const STATE_IOREQ_INPROCESS: u8 = 2;
pub const STATE_IORESP_READY: u8 = 3;

pub const IOREQ_TYPE_PIO: u8 = 0;
pub const IOREQ_TYPE_COPY: u8 = 1;
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;

/// `handle_bufioreq` values for `xendevicemodel_create_ioreq_server`.
pub const HVM_IOREQSRV_BUFIOREQ_OFF: i32 = 0;
pub const HVM_IOREQSRV_BUFIOREQ_LEGACY: i32 = 1;
pub const HVM_IOREQSRV_BUFIOREQ_ATOMIC: i32 = 2;

/// `xenforeignmemory_map_resource` type and frame ids for an ioreq server.
pub const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ: u64 = 0;
/// Frame of the `n`th synchronous ioreq page (128 vCPU slots per page).
pub const fn xenmem_resource_ioreq_server_frame_ioreq(n: u64) -> u64 {
    1 + n
}

pub const HVM_PARAM_IOREQ_PFN: u32 = 5;
pub const HVM_PARAM_BUFIOREQ_PFN: u32 = 6;
pub const HVM_PARAM_ACPI_S_STATE: u32 = 14;
pub const HVM_PARAM_BUFIOREQ_EVTCHN: u32 = 26;
pub const HVM_PARAM_IOREQ_SERVER_PFN: u32 = 32;
pub const HVM_PARAM_NR_IOREQ_SERVER_PAGES: u32 = 33;

/// `xendevicemodel_shutdown` reasons (`xen/sched.h`).
pub const SHUTDOWN_POWEROFF: u32 = 0;
pub const SHUTDOWN_REBOOT: u32 = 1;
pub const SHUTDOWN_SUSPEND: u32 = 2;
pub const SHUTDOWN_CRASH: u32 = 3;

pub const XEN_PAGE_SIZE: usize = 4096;

/// `struct ioreq` (`ioreq_t`), 32 bytes. `flags` holds the C bitfields `state:4, data_is_ptr:1,
/// dir:1, df:1, _pad1:1`; use the `IOREQ_FLAG_*` masks.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoreqRaw {
    pub addr: u64,
    pub data: u64,
    pub count: u32,
    pub size: u32,
    pub vp_eport: u32,
    pub _pad0: u16,
    pub flags: u8,
    pub type_: u8,
}

pub const IOREQ_FLAG_STATE_MASK: u8 = 0x0f;
pub const IOREQ_FLAG_DATA_IS_PTR: u8 = 1 << 4;
pub const IOREQ_FLAG_DIR_READ: u8 = 1 << 5;
pub const IOREQ_FLAG_DF: u8 = 1 << 6;

/// Byte offsets inside one `ioreq_t` slot.
pub const IOREQ_OFF_ADDR: usize = 0;
pub const IOREQ_OFF_DATA: usize = 8;
pub const IOREQ_OFF_COUNT: usize = 16;
pub const IOREQ_OFF_SIZE: usize = 20;
pub const IOREQ_OFF_VP_EPORT: usize = 24;
pub const IOREQ_OFF_FLAGS: usize = 30;
pub const IOREQ_OFF_TYPE: usize = 31;
pub const IOREQ_SIZE: usize = 32;
/// vCPU slots in one 4 KiB `shared_iopage` (indexed by vcpu_id).
pub const IOREQ_SLOTS_PER_PAGE: usize = XEN_PAGE_SIZE / IOREQ_SIZE;

/// `struct shared_iopage` as mapped: one page of per-vCPU slots.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SharedIopage {
    pub vcpu_ioreq: [IoreqRaw; IOREQ_SLOTS_PER_PAGE],
}

/// `struct buf_ioreq` (`buf_ioreq_t`), 8 bytes. `word0` holds `type:8, pad:1, dir:1, size:2,
/// addr:20`; use the `BUF_IOREQ_*` masks.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BufIoreqRaw {
    pub word0: u32,
    pub data: u32,
}

pub const BUF_IOREQ_TYPE_MASK: u32 = 0xff;
pub const BUF_IOREQ_DIR_SHIFT: u32 = 9;
pub const BUF_IOREQ_SIZE_SHIFT: u32 = 10;
pub const BUF_IOREQ_SIZE_MASK: u32 = 0x3;
pub const BUF_IOREQ_ADDR_SHIFT: u32 = 12;
pub const BUF_IOREQ_ADDR_MASK: u32 = 0xf_ffff;

pub const IOREQ_BUFFER_SLOT_NUM: u32 = 511;
pub const BUFIOREQ_OFF_READ_POINTER: usize = 0;
pub const BUFIOREQ_OFF_WRITE_POINTER: usize = 4;
pub const BUFIOREQ_OFF_SLOTS: usize = 8;
pub const BUF_IOREQ_SIZE: usize = 8;

/// `struct buffered_iopage`, exactly one page.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BufferedIopage {
    pub read_pointer: u32,
    pub write_pointer: u32,
    pub buf_ioreq: [BufIoreqRaw; IOREQ_BUFFER_SLOT_NUM as usize],
}

/// PCI SBDF encoding used by `IOREQ_TYPE_PCI_CONFIG` addresses (`addr >> 32`) and
/// `XEN_DMOP_PCI_SBDF`: segment 31..16, bus 15..8, device 7..3, function 2..0.
pub const fn xen_dmop_pci_sbdf(seg: u16, bus: u8, dev: u8, func: u8) -> u32 {
    ((seg as u32) << 16) | ((bus as u32) << 8) | (((dev as u32) & 0x1f) << 3) | ((func as u32) & 7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ioreq_layout_matches_gcc() {
        assert_eq!(size_of::<IoreqRaw>(), 32);
        assert_eq!(offset_of!(IoreqRaw, addr), IOREQ_OFF_ADDR);
        assert_eq!(offset_of!(IoreqRaw, data), IOREQ_OFF_DATA);
        assert_eq!(offset_of!(IoreqRaw, count), IOREQ_OFF_COUNT);
        assert_eq!(offset_of!(IoreqRaw, size), IOREQ_OFF_SIZE);
        assert_eq!(offset_of!(IoreqRaw, vp_eport), IOREQ_OFF_VP_EPORT);
        assert_eq!(offset_of!(IoreqRaw, _pad0), 28);
        assert_eq!(offset_of!(IoreqRaw, flags), IOREQ_OFF_FLAGS);
        assert_eq!(offset_of!(IoreqRaw, type_), IOREQ_OFF_TYPE);
        assert_eq!(size_of::<SharedIopage>(), XEN_PAGE_SIZE);
        assert_eq!(IOREQ_SLOTS_PER_PAGE, 128);
    }

    #[test]
    fn buffered_layout_matches_gcc() {
        assert_eq!(size_of::<BufIoreqRaw>(), BUF_IOREQ_SIZE);
        assert_eq!(size_of::<BufferedIopage>(), XEN_PAGE_SIZE);
        assert_eq!(offset_of!(BufferedIopage, read_pointer), BUFIOREQ_OFF_READ_POINTER);
        assert_eq!(offset_of!(BufferedIopage, write_pointer), BUFIOREQ_OFF_WRITE_POINTER);
        assert_eq!(offset_of!(BufferedIopage, buf_ioreq), BUFIOREQ_OFF_SLOTS);
    }

    #[test]
    fn masks_cover_the_bitfields() {
        // state:4 | data_is_ptr:1 | dir:1 | df:1 | pad:1, LSB first (gcc on x86).
        assert_eq!(
            IOREQ_FLAG_STATE_MASK | IOREQ_FLAG_DATA_IS_PTR | IOREQ_FLAG_DIR_READ | IOREQ_FLAG_DF,
            0x7f
        );
        // type:8 | pad:1 | dir:1 | size:2 | addr:20 == 32 bits.
        assert_eq!(BUF_IOREQ_ADDR_SHIFT + BUF_IOREQ_ADDR_MASK.count_ones(), 32);
        assert_eq!(xen_dmop_pci_sbdf(1, 2, 3, 4), 0x0001_021c);
        assert_eq!(xenmem_resource_ioreq_server_frame_ioreq(0), 1);
    }
}
