//! An in-process stand-in for Xen implementing [`DeviceModelOps`], [`EventChannels`] and
//! [`ForeignMemory`]: heap pages for the ioreq and buffered pages, a port table, a small guest
//! RAM, and a log of every call in order. Test code plays Xen's side with the `post_*` helpers.
//! Like Xen, it publishes each vCPU's `vp_eport` only when the server is enabled.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::dm::{BufioreqMode, DeviceModelOps, Domid, EvtchnPort, IoreqServerInfo, IoservId, ShutdownReason};
use crate::error::XenError;
use crate::evtchn::EventChannels;
use crate::foreign::{ForeignMemory, GuestMapping, ResourceMapping};
use crate::ioreq::{HeapPage, PciSbdf, SharedPage};
use crate::sys::ioreq::*;

/// Guest-side port Xen allocates for vCPU `v`'s ioreq channel in the fake.
pub const fn fake_vp_eport(vcpu: u32) -> EvtchnPort {
    100 + vcpu
}
/// Guest-side port of the buffered channel in the fake.
pub const FAKE_BUF_EPORT: EvtchnPort = 99;
/// First local port the fake hands out.
pub const FAKE_FIRST_LOCAL_PORT: EvtchnPort = 10;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    CreateServer { domid: Domid, bufioreq: BufioreqMode },
    GetInfo { id: IoservId },
    MapResource { type_: u32, id: u32, frame: u64, nr: u64 },
    UnmapResource,
    SetState { id: IoservId, enabled: bool },
    Bind { remote: EvtchnPort, local: EvtchnPort },
    Unbind(EvtchnPort),
    Notify(EvtchnPort),
    Unmask(EvtchnPort),
    MapIoRange { is_mmio: bool, start: u64, end: u64 },
    UnmapIoRange { is_mmio: bool, start: u64, end: u64 },
    MapPcidev(PciSbdf),
    UnmapPcidev(PciSbdf),
    Destroy { id: IoservId },
    PciIntx { sbdf: PciSbdf, intx: u8, level: bool },
    IsaIrq { irq: u8, level: bool },
    LinkRoute { link: u8, irq: u8 },
    Msi { addr: u64, data: u32 },
    ModifiedMemory { first_pfn: u64, nr: u32 },
    Shutdown(ShutdownReason),
    SetParam { index: u32, value: u64 },
    Restrict(&'static str),
    MapGuest { pfns: Vec<u64>, writable: bool },
    UnmapGuest,
}

#[derive(Debug, Default)]
struct State {
    enabled: bool,
    /// local → remote
    bound: HashMap<EvtchnPort, EvtchnPort>,
    next_local: EvtchnPort,
    pending: VecDeque<EvtchnPort>,
    /// op → (calls still to let through, errno)
    fail: HashMap<&'static str, (u32, i32)>,
}

/// The ordered call log, shared between the fake and its mappings.
#[derive(Debug, Default, Clone)]
struct CallLog(Arc<Mutex<Vec<FakeCall>>>);

impl CallLog {
    fn lock(&self) -> MutexGuard<'_, Vec<FakeCall>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn push(&self, c: FakeCall) {
        self.lock().push(c);
    }
}

/// See the module documentation. Share it as `Arc<FakeXen>` for all three roles.
#[derive(Debug)]
pub struct FakeXen {
    state: Mutex<State>,
    /// Shared with the mappings so that their drop is recorded too.
    log: CallLog,
    nr_vcpus: u32,
    id: IoservId,
    ioreq_page: Arc<HeapPage>,
    buf_page: Arc<HeapPage>,
    ram: Arc<Mutex<Vec<u8>>>,
}

impl FakeXen {
    /// A domain with `nr_vcpus` vCPUs and `ram_pages` pages of guest RAM (for `map_guest`).
    pub fn new(nr_vcpus: u32, ram_pages: usize) -> Self {
        FakeXen {
            state: Mutex::new(State { next_local: FAKE_FIRST_LOCAL_PORT, ..State::default() }),
            log: CallLog::default(),
            nr_vcpus,
            id: 3,
            ioreq_page: Arc::new(HeapPage::new(XEN_PAGE_SIZE)),
            buf_page: Arc::new(HeapPage::new(XEN_PAGE_SIZE)),
            ram: Arc::new(Mutex::new(vec![0; ram_pages * XEN_PAGE_SIZE])),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, call: FakeCall) {
        self.log.push(call);
    }

    /// `check(op)`, then records `call` on success: the shape of most fake operations.
    fn checked(&self, op: &'static str, call: FakeCall) -> Result<(), XenError> {
        self.check(op)?;
        self.record(call);
        Ok(())
    }

    /// Fails with `errno` if a failure was armed for `op`.
    fn check(&self, op: &'static str) -> Result<(), XenError> {
        let mut st = self.st();
        match st.fail.get_mut(op) {
            Some((0, errno)) => {
                let errno = *errno;
                st.fail.remove(op);
                Err(XenError::Call { call: op, errno })
            }
            Some((skip, _)) => {
                *skip -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The next call of `op` (the trait method's name) fails with `errno`.
    pub fn fail_next(&self, op: &'static str, errno: i32) {
        self.fail_after(op, 0, errno);
    }

    /// Lets `skip` calls of `op` succeed, then fails the next one with `errno`.
    pub fn fail_after(&self, op: &'static str, skip: u32, errno: i32) {
        self.st().fail.insert(op, (skip, errno));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.log.lock().clone()
    }

    pub fn clear_calls(&self) {
        self.log.lock().clear();
    }

    pub fn ioreq_page(&self) -> &HeapPage {
        &self.ioreq_page
    }
    pub fn buf_page(&self) -> &HeapPage {
        &self.buf_page
    }

    /// Local port bound to guest port `remote`.
    pub fn local_port_of(&self, remote: EvtchnPort) -> Option<EvtchnPort> {
        self.st().bound.iter().find(|(_, &r)| r == remote).map(|(&l, _)| l)
    }

    /// Raises `local` as if its remote end notified.
    pub fn raise(&self, local: EvtchnPort) {
        self.st().pending.push_back(local);
    }

    /// Xen's `ioreq_send`: writes `raw` into `vcpu`'s slot (state NONE), then READY (release),
    /// then fires the vCPU's channel. Returns the local port raised.
    pub fn post_ioreq(&self, vcpu: u32, raw: &IoreqRaw) -> Option<EvtchnPort> {
        let p = &*self.ioreq_page;
        let b = vcpu as usize * IOREQ_SIZE;
        p.store_u64(b + IOREQ_OFF_ADDR, raw.addr, Ordering::Relaxed);
        p.store_u64(b + IOREQ_OFF_DATA, raw.data, Ordering::Relaxed);
        p.store_u32(b + IOREQ_OFF_COUNT, raw.count, Ordering::Relaxed);
        p.store_u32(b + IOREQ_OFF_SIZE, raw.size, Ordering::Relaxed);
        p.store_u8(b + IOREQ_OFF_TYPE, raw.type_, Ordering::Relaxed);
        p.store_u8(b + IOREQ_OFF_FLAGS, raw.flags & !IOREQ_FLAG_STATE_MASK, Ordering::Relaxed);
        p.store_u8(
            b + IOREQ_OFF_FLAGS,
            (raw.flags & !IOREQ_FLAG_STATE_MASK) | STATE_IOREQ_READY,
            Ordering::Release,
        );
        let local = self.local_port_of(fake_vp_eport(vcpu))?;
        self.raise(local);
        Some(local)
    }

    /// State and data of `vcpu`'s slot (what Xen reads back after IORESP_READY).
    pub fn slot_result(&self, vcpu: u32) -> (u8, u64) {
        let b = vcpu as usize * IOREQ_SIZE;
        let flags = self.ioreq_page.load_u8(b + IOREQ_OFF_FLAGS, Ordering::Acquire);
        (flags & IOREQ_FLAG_STATE_MASK, self.ioreq_page.load_u64(b + IOREQ_OFF_DATA, Ordering::Relaxed))
    }

    /// Xen's `ioreq_send_buffered` for a write of `size` (1/2/4/8) bytes: one slot, or two for
    /// 8 bytes, then advance write_pointer and fire the buffered channel.
    pub fn post_buffered(&self, type_: u8, addr: u32, size: u32, data: u64) -> Option<EvtchnPort> {
        let p = &*self.buf_page;
        let size_field = match size {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        let word0 =
            u32::from(type_) | (size_field << BUF_IOREQ_SIZE_SHIFT) | ((addr & BUF_IOREQ_ADDR_MASK) << 12);
        let wr = p.load_u32(BUFIOREQ_OFF_WRITE_POINTER, Ordering::Relaxed);
        let slot = |ptr: u32| BUFIOREQ_OFF_SLOTS + (ptr % IOREQ_BUFFER_SLOT_NUM) as usize * BUF_IOREQ_SIZE;
        p.store_u32(slot(wr), word0, Ordering::Relaxed);
        p.store_u32(slot(wr) + 4, data as u32, Ordering::Relaxed);
        let mut used = 1;
        if size == 8 {
            // Free-running pointers: wrap like Xen's unsigned arithmetic.
            p.store_u32(slot(wr.wrapping_add(1)), word0, Ordering::Relaxed);
            p.store_u32(slot(wr.wrapping_add(1)) + 4, (data >> 32) as u32, Ordering::Relaxed);
            used = 2;
        }
        p.store_u32(BUFIOREQ_OFF_WRITE_POINTER, wr.wrapping_add(used), Ordering::Release);
        let local = self.local_port_of(FAKE_BUF_EPORT)?;
        self.raise(local);
        Some(local)
    }

    /// Bytes of fake guest RAM.
    pub fn ram(&self, gpa: usize, len: usize) -> Vec<u8> {
        let r = self.ram.lock().unwrap_or_else(|p| p.into_inner());
        r.get(gpa..gpa + len).map(<[u8]>::to_vec).unwrap_or_default()
    }
}

impl crate::hvmparam::HvmParams for FakeXen {
    fn set_param(&self, _: Domid, index: u32, value: u64) -> Result<(), XenError> {
        self.checked("set_param", FakeCall::SetParam { index, value })
    }
}

impl DeviceModelOps for FakeXen {
    fn create_ioreq_server(&self, domid: Domid, bufioreq: BufioreqMode) -> Result<IoservId, XenError> {
        self.check("create_ioreq_server")?;
        self.record(FakeCall::CreateServer { domid, bufioreq });
        Ok(self.id)
    }
    fn get_ioreq_server_info(&self, _domid: Domid, id: IoservId) -> Result<IoreqServerInfo, XenError> {
        self.check("get_ioreq_server_info")?;
        self.record(FakeCall::GetInfo { id });
        Ok(IoreqServerInfo { bufioreq_port: FAKE_BUF_EPORT })
    }
    fn map_io_range(
        &self,
        _: Domid,
        _: IoservId,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError> {
        self.checked("map_io_range", FakeCall::MapIoRange { is_mmio, start, end })
    }
    fn unmap_io_range(
        &self,
        _: Domid,
        _: IoservId,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError> {
        self.checked("unmap_io_range", FakeCall::UnmapIoRange { is_mmio, start, end })
    }
    fn map_pcidev(&self, _: Domid, _: IoservId, sbdf: PciSbdf) -> Result<(), XenError> {
        self.checked("map_pcidev", FakeCall::MapPcidev(sbdf))
    }
    fn unmap_pcidev(&self, _: Domid, _: IoservId, sbdf: PciSbdf) -> Result<(), XenError> {
        self.checked("unmap_pcidev", FakeCall::UnmapPcidev(sbdf))
    }
    fn set_ioreq_server_state(&self, _: Domid, id: IoservId, enabled: bool) -> Result<(), XenError> {
        self.check("set_ioreq_server_state")?;
        self.record(FakeCall::SetState { id, enabled });
        self.st().enabled = enabled;
        if enabled {
            // Xen's ioreq_server_update_evtchn: publish the ports only now.
            for v in 0..self.nr_vcpus.min(IOREQ_SLOTS_PER_PAGE as u32) {
                self.ioreq_page.store_u32(
                    v as usize * IOREQ_SIZE + IOREQ_OFF_VP_EPORT,
                    fake_vp_eport(v),
                    Ordering::Release,
                );
            }
        }
        Ok(())
    }
    fn destroy_ioreq_server(&self, _: Domid, id: IoservId) -> Result<(), XenError> {
        self.checked("destroy_ioreq_server", FakeCall::Destroy { id })
    }
    fn set_pci_intx_level(&self, _: Domid, sbdf: PciSbdf, intx: u8, level: bool) -> Result<(), XenError> {
        self.checked("set_pci_intx_level", FakeCall::PciIntx { sbdf, intx, level })
    }
    fn set_isa_irq_level(&self, _: Domid, irq: u8, level: bool) -> Result<(), XenError> {
        self.checked("set_isa_irq_level", FakeCall::IsaIrq { irq, level })
    }
    fn set_pci_link_route(&self, _: Domid, link: u8, irq: u8) -> Result<(), XenError> {
        self.checked("set_pci_link_route", FakeCall::LinkRoute { link, irq })
    }
    fn inject_msi(&self, _: Domid, addr: u64, data: u32) -> Result<(), XenError> {
        self.checked("inject_msi", FakeCall::Msi { addr, data })
    }
    fn modified_memory(&self, _: Domid, first_pfn: u64, nr: u32) -> Result<(), XenError> {
        self.checked("modified_memory", FakeCall::ModifiedMemory { first_pfn, nr })
    }
    fn shutdown(&self, _: Domid, reason: ShutdownReason) -> Result<(), XenError> {
        self.checked("shutdown", FakeCall::Shutdown(reason))
    }
    fn nr_vcpus(&self, _: Domid) -> Result<u32, XenError> {
        self.check("nr_vcpus")?;
        Ok(self.nr_vcpus)
    }
    fn restrict(&self, _: Domid) -> Result<(), XenError> {
        self.checked("restrict", FakeCall::Restrict("devicemodel"))
    }
}

impl EventChannels for FakeXen {
    fn bind_interdomain(&self, _: Domid, remote_port: EvtchnPort) -> Result<EvtchnPort, XenError> {
        self.check("bind_interdomain")?;
        let mut st = self.st();
        // Xen refuses a port that is not an unbound channel offered to us.
        let known = remote_port == FAKE_BUF_EPORT
            || (remote_port >= fake_vp_eport(0) && remote_port < fake_vp_eport(self.nr_vcpus));
        if !known || st.bound.values().any(|&r| r == remote_port) {
            return Err(XenError::Call { call: "bind_interdomain", errno: libc::EINVAL });
        }
        let local = st.next_local;
        st.next_local += 1;
        st.bound.insert(local, remote_port);
        drop(st);
        self.record(FakeCall::Bind { remote: remote_port, local });
        Ok(local)
    }
    fn unbind(&self, port: EvtchnPort) -> Result<(), XenError> {
        self.check("unbind")?;
        self.record(FakeCall::Unbind(port));
        match self.st().bound.remove(&port) {
            Some(_) => Ok(()),
            None => Err(XenError::Call { call: "unbind", errno: libc::EINVAL }),
        }
    }
    fn notify(&self, port: EvtchnPort) -> Result<(), XenError> {
        self.checked("notify", FakeCall::Notify(port))
    }
    fn pending(&self) -> Result<Option<EvtchnPort>, XenError> {
        self.check("pending")?;
        Ok(self.st().pending.pop_front())
    }
    fn unmask(&self, port: EvtchnPort) -> Result<(), XenError> {
        self.checked("unmask", FakeCall::Unmask(port))
    }
    fn fd(&self) -> RawFd {
        -1
    }
    fn restrict(&self, _: Domid) -> Result<(), XenError> {
        self.checked("evtchn_restrict", FakeCall::Restrict("evtchn"))
    }
}

/// The fake's resource mapping: frame 0 the buffered page, frame 1 the ioreq page.
#[derive(Debug)]
pub struct FakeResource {
    frames: Vec<Arc<HeapPage>>,
    log: CallLog,
}

impl ResourceMapping for FakeResource {
    type Page = HeapPage;
    fn nr_frames(&self) -> usize {
        self.frames.len()
    }
    fn frame(&self, n: usize) -> Option<&HeapPage> {
        self.frames.get(n).map(|p| &**p)
    }
}

impl Drop for FakeResource {
    fn drop(&mut self) {
        self.log.push(FakeCall::UnmapResource);
    }
}

/// Guest pages of the fake's RAM.
#[derive(Debug)]
pub struct FakeGuestMapping {
    ram: Arc<Mutex<Vec<u8>>>,
    pfns: Vec<u64>,
    ok: Vec<bool>,
    writable: bool,
    log: CallLog,
}

impl FakeGuestMapping {
    fn gpa(&self, offset: usize) -> usize {
        let page = offset / XEN_PAGE_SIZE;
        self.pfns[page] as usize * XEN_PAGE_SIZE + offset % XEN_PAGE_SIZE
    }
}

impl GuestMapping for FakeGuestMapping {
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
        let ram = self.ram.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ram[self.gpa(offset + i)];
        }
        Ok(())
    }
    fn write(&self, offset: usize, buf: &[u8]) -> Result<(), XenError> {
        if !self.writable || !self.range_ok(offset, buf.len()) {
            return Err(XenError::GuestAccess { offset, len: buf.len() });
        }
        let mut ram = self.ram.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &b) in buf.iter().enumerate() {
            let gpa = self.gpa(offset + i);
            ram[gpa] = b;
        }
        Ok(())
    }
}

impl Drop for FakeGuestMapping {
    fn drop(&mut self) {
        self.log.push(FakeCall::UnmapGuest);
    }
}

impl ForeignMemory for FakeXen {
    type Resource = FakeResource;
    type Guest = FakeGuestMapping;

    fn map_resource(
        &self,
        _: Domid,
        type_: u32,
        id: u32,
        frame: u64,
        nr: u64,
    ) -> Result<FakeResource, XenError> {
        self.check("map_resource")?;
        self.record(FakeCall::MapResource { type_, id, frame, nr });
        if type_ != XENMEM_RESOURCE_IOREQ_SERVER || id != u32::from(self.id) {
            return Err(XenError::Call { call: "map_resource", errno: libc::ENOENT });
        }
        // Frame 0 = buffered page, frame 1 = the ioreq page; nothing else exists.
        let all = [self.buf_page.clone(), self.ioreq_page.clone()];
        let start = usize::try_from(frame).unwrap_or(usize::MAX);
        let end = usize::try_from(frame.saturating_add(nr)).unwrap_or(usize::MAX);
        let frames =
            all.get(start..end).ok_or(XenError::Call { call: "map_resource", errno: libc::EINVAL })?;
        Ok(FakeResource { frames: frames.to_vec(), log: self.log.clone() })
    }

    fn map_guest(&self, _: Domid, pfns: &[u64], writable: bool) -> Result<FakeGuestMapping, XenError> {
        self.check("map_guest")?;
        self.record(FakeCall::MapGuest { pfns: pfns.to_vec(), writable });
        if pfns.is_empty() {
            return Err(XenError::Call { call: "map_guest", errno: libc::EINVAL });
        }
        let ram_pages = self.ram.lock().unwrap_or_else(|p| p.into_inner()).len() / XEN_PAGE_SIZE;
        let ok = pfns.iter().map(|&p| usize::try_from(p).is_ok_and(|p| p < ram_pages)).collect();
        Ok(FakeGuestMapping {
            ram: self.ram.clone(),
            pfns: pfns.to_vec(),
            ok,
            writable,
            log: self.log.clone(),
        })
    }

    fn restrict(&self, _: Domid) -> Result<(), XenError> {
        self.checked("fmem_restrict", FakeCall::Restrict("foreignmemory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mapping_reads_writes_and_refuses_holes() {
        let fake = FakeXen::new(1, 4);
        let m = fake.map_guest(1, &[2, 9, 0], true).unwrap();
        assert_eq!(m.nr_pages(), 3);
        assert!(m.page_ok(0) && !m.page_ok(1) && m.page_ok(2) && !m.page_ok(3));
        m.write(5, &[1, 2, 3]).unwrap();
        assert_eq!(fake.ram(2 * XEN_PAGE_SIZE + 5, 3), vec![1, 2, 3]);
        let mut b = [0u8; 3];
        m.read(5, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        // Crossing into the hole, inside the hole, past the end, overflowing offsets.
        assert!(m.read(XEN_PAGE_SIZE - 1, &mut b).is_err());
        assert!(m.write(XEN_PAGE_SIZE + 1, &[0]).is_err());
        assert!(m.read(3 * XEN_PAGE_SIZE, &mut b).is_err());
        assert!(m.read(usize::MAX, &mut b).is_err());
        m.write(2 * XEN_PAGE_SIZE, &[7]).unwrap();
        assert_eq!(fake.ram(0, 1), vec![7]);
        let ro = fake.map_guest(1, &[0], false).unwrap();
        assert!(ro.write(0, &[1]).is_err());
        drop((m, ro));
        assert_eq!(fake.calls().iter().filter(|c| **c == FakeCall::UnmapGuest).count(), 2);
    }

    #[test]
    fn armed_failure_fires_once() {
        let fake = FakeXen::new(1, 0);
        fake.fail_next("inject_msi", libc::EPERM);
        let e = fake.inject_msi(1, 0xfee0_0000, 0x41).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EPERM));
        fake.inject_msi(1, 0xfee0_0000, 0x41).unwrap();
        assert_eq!(fake.calls(), vec![FakeCall::Msi { addr: 0xfee0_0000, data: 0x41 }]);
    }
}
