//! The ioreq server over the [`DeviceModelOps`], [`EventChannels`] and [`ForeignMemory`] traits
//! (specs/xen-interfaces.md §4.1, §4.3, §4.5): set up exactly as QEMU does, serve one event
//! channel wake-up at a time, tear down in reverse order. Generic so that it runs against
//! [`crate::fake::FakeXen`] in unit tests and against libxen with the `xen-libs` feature.
//!
//! Not here yet: the legacy gfn-mapped fallback (only the resource mapping is supported, which
//! every Xen ≥ 4.12 provides), asynchronous completion of slow requests (each request is answered
//! before `on_event` returns), and the 100 ms buffered-ring timer (the caller re-invokes
//! `on_event` for the buffered port while [`DrainStats::more`] is set).

use std::sync::Arc;

use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::warn_limited;

use crate::dm::{BufioreqMode, DeviceModelOps, Domid, EvtchnPort, IoservId};
use crate::error::XenError;
use crate::evtchn::EventChannels;
use crate::foreign::{ForeignMemory, ResourceMapping};
use crate::ioreq::{
    complete, fetch, process, BufferedRing, DrainStats, Invalid, IoreqError, IoreqHandler, IoreqSlot,
    Outcome, PciSbdf,
};
use crate::sys::ioreq::{
    xenmem_resource_ioreq_server_frame_ioreq, IOREQ_SLOTS_PER_PAGE, XENMEM_RESOURCE_IOREQ_SERVER,
    XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
};

/// Frame indexes inside our resource mapping (mapped from frame 0 = the buffered page).
const BUF_FRAME: usize = 0;
const IOREQ_FRAME: usize = 1;
const NR_FRAMES: u64 = 2;

/// What one [`IoreqServer::on_event`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// A request of `vcpu` was executed, answered and its port notified.
    Completed { vcpu: u32 },
    /// A malformed request of `vcpu` was answered with the defined reply (all-ones for reads)
    /// without reaching any device.
    Refused { vcpu: u32, reason: Invalid },
    /// The slot was not READY (spurious wake-up); nothing answered.
    Spurious { vcpu: u32 },
    /// The slot left INPROCESS while we worked: Xen or the guest misbehaves. Not answered; QEMU
    /// destroys the domain in this case, the caller decides.
    StateChanged { vcpu: u32, state: u8 },
    /// The buffered port fired and the ring was drained.
    Buffered(DrainStats),
    /// Not one of our ports: ignored (logged once).
    UnknownPort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Range { is_mmio: bool, start: u64, end: u64 },
    Pci(PciSbdf),
}

/// A running ioreq server. Dropping it tears it down (see [`IoreqServer::teardown`]).
pub struct IoreqServer<D: DeviceModelOps, E: EventChannels, F: ForeignMemory> {
    dm: Arc<D>,
    evtchn: Arc<E>,
    fmem: Arc<F>,
    domid: Domid,
    id: IoservId,
    pages: Option<F::Resource>,
    enabled: bool,
    /// Local port of vCPU i at index i.
    vcpu_ports: Vec<EvtchnPort>,
    buf_port: Option<EvtchnPort>,
    /// What we asked Xen to forward, in registration order (undone in reverse).
    claims: Vec<Claim>,
    time_offset: Option<u64>,
    on_invalidate: Option<Box<dyn FnMut() + Send>>,
    destroyed: bool,
}

impl<D: DeviceModelOps, E: EventChannels, F: ForeignMemory> std::fmt::Debug for IoreqServer<D, E, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoreqServer")
            .field("domid", &self.domid)
            .field("id", &self.id)
            .field("vcpu_ports", &self.vcpu_ports)
            .field("buf_port", &self.buf_port)
            .finish_non_exhaustive()
    }
}

impl<D: DeviceModelOps, E: EventChannels, F: ForeignMemory> IoreqServer<D, E, F> {
    /// Creates and starts a server for `domid` serving vCPUs `0..max_vcpus` (the domain's
    /// maximum, not the online count: hot-plugged vCPUs need their port bound already).
    ///
    /// Order (specs §4.1): create (BUFIOREQ_ATOMIC); map the resource frames (buffered page, then
    /// the ioreq page); read the buffered port; enable; only then read each vCPU's `vp_eport`
    /// (Xen writes them on enable) and bind it; bind the buffered port. On failure everything
    /// done so far is undone in reverse order.
    pub fn start(
        dm: Arc<D>,
        evtchn: Arc<E>,
        fmem: Arc<F>,
        domid: Domid,
        max_vcpus: u32,
    ) -> Result<Self, XenError> {
        if max_vcpus == 0 || max_vcpus as usize > IOREQ_SLOTS_PER_PAGE {
            return Err(XenError::TooManyVcpus(max_vcpus));
        }
        let id = dm.create_ioreq_server(domid, BufioreqMode::Atomic)?;
        // From here on, dropping `srv` on an error path undoes what was done.
        let mut srv = IoreqServer {
            dm,
            evtchn,
            fmem,
            domid,
            id,
            pages: None,
            enabled: false,
            vcpu_ports: Vec::with_capacity(max_vcpus as usize),
            buf_port: None,
            claims: Vec::new(),
            time_offset: None,
            on_invalidate: None,
            destroyed: false,
        };
        debug_assert_eq!(XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ, BUF_FRAME as u64);
        debug_assert_eq!(xenmem_resource_ioreq_server_frame_ioreq(0), IOREQ_FRAME as u64);
        let pages = srv.fmem.map_resource(
            domid,
            XENMEM_RESOURCE_IOREQ_SERVER,
            id.into(),
            XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
            NR_FRAMES,
        )?;
        for n in [BUF_FRAME, IOREQ_FRAME] {
            if pages.frame(n).is_none() {
                return Err(XenError::MissingFrame(n));
            }
        }
        srv.pages = Some(pages);
        let info = srv.dm.get_ioreq_server_info(domid, id)?;
        srv.dm.set_ioreq_server_state(domid, id, true)?;
        srv.enabled = true;
        for vcpu in 0..max_vcpus {
            let remote = {
                let page = srv.ioreq_page()?;
                IoreqSlot::new(page, vcpu).ok_or(XenError::TooManyVcpus(max_vcpus))?.vp_eport()
            };
            // Port 0 is never allocated: Xen has not published this vCPU's channel.
            if remote == 0 {
                return Err(XenError::NoVpEport { vcpu });
            }
            let local = srv.evtchn.bind_interdomain(domid, remote)?;
            srv.vcpu_ports.push(local);
        }
        srv.buf_port = Some(srv.evtchn.bind_interdomain(domid, info.bufioreq_port)?);
        log::info!(
            "ioreq server {id} for domain {domid}: {max_vcpus} vCPU ports {:?}, buffered port {:?}",
            srv.vcpu_ports,
            srv.buf_port
        );
        Ok(srv)
    }

    fn ioreq_page(&self) -> Result<&<F::Resource as ResourceMapping>::Page, XenError> {
        self.pages.as_ref().and_then(|p| p.frame(IOREQ_FRAME)).ok_or(XenError::MissingFrame(IOREQ_FRAME))
    }

    pub fn id(&self) -> IoservId {
        self.id
    }
    pub fn domid(&self) -> Domid {
        self.domid
    }
    /// Local port of `vcpu`.
    pub fn vcpu_port(&self, vcpu: u32) -> Option<EvtchnPort> {
        self.vcpu_ports.get(vcpu as usize).copied()
    }
    /// Local port of the buffered ring.
    pub fn buffered_port(&self) -> Option<EvtchnPort> {
        self.buf_port
    }
    /// The latest RTC offset Xen reported (TIMEOFFSET), in seconds.
    pub fn time_offset(&self) -> Option<u64> {
        self.time_offset
    }
    /// Called on INVALIDATE before the vCPU is answered: drop every idle guest-memory mapping.
    pub fn set_invalidate_hook(&mut self, hook: Box<dyn FnMut() + Send>) {
        self.on_invalidate = Some(hook);
    }
    /// The device-model handle, e.g. for IRQ injection.
    pub fn dm(&self) -> &Arc<D> {
        &self.dm
    }

    /// Claims config cycles of one PCI function (Xen answers unclaimed ones itself).
    pub fn register_pci(&mut self, sbdf: PciSbdf) -> Result<(), XenError> {
        self.dm.map_pcidev(self.domid, self.id, sbdf)?;
        self.claims.push(Claim::Pci(sbdf));
        Ok(())
    }

    pub fn unregister_pci(&mut self, sbdf: PciSbdf) -> Result<(), XenError> {
        self.dm.unmap_pcidev(self.domid, self.id, sbdf)?;
        self.claims.retain(|&c| c != Claim::Pci(sbdf));
        Ok(())
    }

    /// Claims the inclusive range `start..=end` of ports (`is_mmio` false) or guest-physical
    /// addresses (true), e.g. a BAR as the guest programs it.
    pub fn map_io_range(&mut self, is_mmio: bool, start: u64, end: u64) -> Result<(), XenError> {
        if start > end {
            return Err(XenError::InvalidRange { start, end });
        }
        self.dm.map_io_range(self.domid, self.id, is_mmio, start, end)?;
        self.claims.push(Claim::Range { is_mmio, start, end });
        Ok(())
    }

    pub fn unmap_io_range(&mut self, is_mmio: bool, start: u64, end: u64) -> Result<(), XenError> {
        if start > end {
            return Err(XenError::InvalidRange { start, end });
        }
        self.dm.unmap_io_range(self.domid, self.id, is_mmio, start, end)?;
        let claim = Claim::Range { is_mmio, start, end };
        if let Some(i) = self.claims.iter().rposition(|&c| c == claim) {
            self.claims.remove(i);
        }
        Ok(())
    }

    /// Takes the next pending port from the event channel (after its fd polled readable) and
    /// serves it. None if nothing was pending.
    pub fn handle_pending<H: IoreqHandler + ?Sized>(
        &mut self,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<Option<EventOutcome>, XenError> {
        match self.evtchn.pending()? {
            Some(port) => self.on_event(port, handler, ram).map(Some),
            None => Ok(None),
        }
    }

    /// Serves one fired port (specs §4.3): for a vCPU port, unmask it, drain the buffered ring
    /// first, then fetch, execute, answer and notify the vCPU's slot; for the buffered port,
    /// drain the ring and unmask once it is empty.
    pub fn on_event<H: IoreqHandler + ?Sized>(
        &mut self,
        port: EvtchnPort,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<EventOutcome, XenError> {
        if self.buf_port == Some(port) {
            let stats = self.drain_buffered(handler, ram)?;
            if !stats.more {
                self.evtchn.unmask(port)?;
            }
            return Ok(EventOutcome::Buffered(stats));
        }
        let Some(vcpu) = self.vcpu_ports.iter().position(|&p| p == port) else {
            warn_limited!(
                "ioreq-unknown-port",
                "ioreq server {}: event on unknown port {port}, ignored",
                self.id
            );
            return Ok(EventOutcome::UnknownPort);
        };
        let vcpu = vcpu as u32;
        self.evtchn.unmask(port)?;
        // Posted writes were issued before this request: run them first (as QEMU does).
        self.drain_buffered(handler, ram)?;

        let pages = self.pages.as_ref().ok_or(XenError::MissingFrame(IOREQ_FRAME))?;
        let page = pages.frame(IOREQ_FRAME).ok_or(XenError::MissingFrame(IOREQ_FRAME))?;
        let slot = IoreqSlot::new(page, vcpu).ok_or(XenError::TooManyVcpus(vcpu + 1))?;
        let (reply, outcome) = match fetch(&slot) {
            Ok(req) => {
                let out = process(&req, handler, ram);
                match out {
                    Outcome::TimeOffset(secs) => self.time_offset = Some(secs),
                    Outcome::Invalidate => {
                        if let Some(hook) = self.on_invalidate.as_mut() {
                            hook();
                        }
                    }
                    Outcome::Reply(_) => {}
                }
                (out.reply(&req), EventOutcome::Completed { vcpu })
            }
            Err(IoreqError::Invalid { reason, ty, addr, size, count, reply }) => {
                warn_limited!(
                    format!("ioreq-invalid-{reason:?}"),
                    "vCPU {vcpu}: refused ioreq ({reason}: type {ty}, addr {addr:#x}, size {size}, count {count})"
                );
                (reply, EventOutcome::Refused { vcpu, reason })
            }
            Err(IoreqError::NotReady(_)) => return Ok(EventOutcome::Spurious { vcpu }),
            Err(IoreqError::StateChanged(state)) => return Ok(EventOutcome::StateChanged { vcpu, state }),
        };
        match complete(&slot, reply) {
            Ok(()) => {
                self.evtchn.notify(port)?;
                Ok(outcome)
            }
            Err(e) => {
                let state = match e {
                    IoreqError::StateChanged(s) | IoreqError::NotReady(s) => s,
                    IoreqError::Invalid { .. } => 0,
                };
                log::error!("ioreq server {}: vCPU {vcpu} slot changed state to {state} under us", self.id);
                Ok(EventOutcome::StateChanged { vcpu, state })
            }
        }
    }

    /// Drains the buffered ring once (bounded to one ring's worth).
    pub fn drain_buffered<H: IoreqHandler + ?Sized>(
        &mut self,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<DrainStats, XenError> {
        let pages = self.pages.as_ref().ok_or(XenError::MissingFrame(BUF_FRAME))?;
        let page = pages.frame(BUF_FRAME).ok_or(XenError::MissingFrame(BUF_FRAME))?;
        let Ok(mut ring) = BufferedRing::new(page) else { return Err(XenError::MissingFrame(BUF_FRAME)) };
        let mut time_offset = None;
        let stats = ring.drain(|req| {
            if let Outcome::TimeOffset(secs) = process(req, handler, ram) {
                time_offset = Some(secs);
            }
        });
        if time_offset.is_some() {
            self.time_offset = time_offset;
        }
        Ok(stats)
    }

    /// Stops the server in reverse setup order: unmap the PCI functions and ranges registered
    /// (newest first),
    /// unbind the buffered port then the vCPU ports, disable, unmap the pages, destroy. Errors
    /// are logged and teardown continues (the domain may already be gone). Idempotent; also run
    /// by Drop.
    pub fn teardown(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        let (domid, id) = (self.domid, self.id);
        let log_err = |r: Result<(), XenError>| {
            if let Err(e) = r {
                log::warn!("ioreq server {id} teardown: {e}");
            }
        };
        while let Some(claim) = self.claims.pop() {
            log_err(match claim {
                Claim::Pci(sbdf) => self.dm.unmap_pcidev(domid, id, sbdf),
                Claim::Range { is_mmio, start, end } => {
                    self.dm.unmap_io_range(domid, id, is_mmio, start, end)
                }
            });
        }
        if let Some(p) = self.buf_port.take() {
            log_err(self.evtchn.unbind(p));
        }
        while let Some(p) = self.vcpu_ports.pop() {
            log_err(self.evtchn.unbind(p));
        }
        if std::mem::take(&mut self.enabled) {
            log_err(self.dm.set_ioreq_server_state(domid, id, false));
        }
        drop(self.pages.take());
        log_err(self.dm.destroy_ioreq_server(domid, id));
    }
}

impl<D: DeviceModelOps, E: EventChannels, F: ForeignMemory> Drop for IoreqServer<D, E, F> {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests;
