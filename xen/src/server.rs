//! The ioreq server over the [`DeviceModelOps`], [`EventChannels`] and [`ForeignMemory`] traits
//! (specs/xen-interfaces.md §4.1, §4.3, §4.5): set up exactly as QEMU does, serve one event
//! channel wake-up at a time, tear down in reverse order. Generic so that it runs against
//! [`crate::fake::FakeXen`] in unit tests and against libxen with the `xen-libs` feature.
//!
//! Serving is split in two so that slow device work never holds up other vCPUs:
//! [`IoreqServer::take_event`] (on the event-loop thread) unmasks the port, drains the buffered
//! ring, fetches and validates the vCPU's request and hands back a [`Fetched`] request; that can
//! move to another thread (e.g. a [`VcpuWorkers`] worker of that vCPU), and answering it
//! ([`Fetched::finish`]) writes the slot and notifies the vCPU from there. Refused, spurious and
//! buffered events are answered inline. [`IoreqServer::on_event`] is the synchronous composition
//! of both halves.
//!
//! Not here yet: the legacy gfn-mapped fallback (only the resource mapping is supported, which
//! every Xen ≥ 4.12 provides) and the 100 ms buffered-ring timer (the caller re-invokes
//! `on_event` for the buffered port while [`DrainStats::more`] is set).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::warn_limited;

use crate::dm::{BufioreqMode, DeviceModelOps, Domid, EvtchnPort, IoservId};
use crate::error::XenError;
use crate::evtchn::EventChannels;
use crate::foreign::{ForeignMemory, ResourceMapping};
use crate::ioreq::{
    all_ones, complete, fetch, process, BufferedRing, DrainStats, Invalid, Ioreq, IoreqError, IoreqHandler,
    IoreqSlot, Outcome, PciSbdf,
};
use crate::sys::ioreq::{
    xenmem_resource_ioreq_server_frame_ioreq, IOREQ_SLOTS_PER_PAGE, STATE_IOREQ_READY,
    XENMEM_RESOURCE_IOREQ_SERVER, XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
};

/// Frame indexes inside our resource mapping (mapped from frame 0 = the buffered page).
const BUF_FRAME: usize = 0;
const IOREQ_FRAME: usize = 1;
const NR_FRAMES: u64 = 2;

/// What one [`IoreqServer::on_event`] (or an answered [`Fetched`]) did.
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
    /// destroys the domain in this case, the caller decides. Also reported (state READY, slot
    /// left alone) when a vCPU posts a new request while its previous one is still in flight.
    StateChanged { vcpu: u32, state: u8 },
    /// The buffered port fired and the ring was drained.
    Buffered(DrainStats),
    /// Not one of our ports: ignored (logged once).
    UnknownPort,
}

/// What [`IoreqServer::take_event`] found.
#[derive(Debug)]
pub enum Event<R: ResourceMapping, E: EventChannels> {
    /// A validated request, fetched and marked INPROCESS: execute it (on any thread) and answer
    /// it through [`Fetched`].
    Request(Fetched<R, E>),
    /// Everything was handled inline (buffered drain, refused request, spurious wake-up, unknown
    /// port, misbehaving slot).
    Done(EventOutcome),
}

/// State shared between the server and its in-flight requests (which may live on other threads).
struct Shared {
    id: IoservId,
    /// False once teardown started: answers no longer notify (the ports are being unbound).
    alive: AtomicBool,
    /// One flag per vCPU: a fetched request not yet answered. The slot itself is INPROCESS then,
    /// so a new READY means Xen or the guest broke the protocol.
    busy: Box<[AtomicBool]>,
    time_offset: Mutex<Option<u64>>,
    on_invalidate: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

/// Poison only means a panic elsewhere while holding it; the data (an Option) stays usable.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fetched, validated request of one vCPU, owning what is needed to answer it: cheap to move
/// to another thread (`Send` whenever the mapping and event channels are `Send + Sync`, which
/// the real and fake ones are).
///
/// Answer it exactly once with [`Fetched::finish`] (or [`Fetched::run`], [`Fetched::complete`]).
/// Dropping it unanswered still answers the slot with the defined reply for a request that
/// reached nothing (all-ones for a plain read, the request's data otherwise) and logs an error,
/// so the vCPU is never left hanging.
pub struct Fetched<R: ResourceMapping, E: EventChannels> {
    req: Ioreq,
    pages: Arc<R>,
    evtchn: Arc<E>,
    shared: Arc<Shared>,
    vcpu: u32,
    port: EvtchnPort,
    answered: bool,
}

impl<R: ResourceMapping, E: EventChannels> std::fmt::Debug for Fetched<R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("vcpu", &self.vcpu)
            .field("port", &self.port)
            .field("req", &self.req)
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

impl<R: ResourceMapping, E: EventChannels> Fetched<R, E> {
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// The validated private copy of the request.
    pub fn request(&self) -> &Ioreq {
        &self.req
    }

    /// Executes the request with [`process`] and answers it.
    pub fn run<H: IoreqHandler + ?Sized>(
        self,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<EventOutcome, XenError> {
        let out = process(&self.req, handler, ram);
        self.finish(out)
    }

    /// Answers with the result of [`process`]: records a TIMEOFFSET, runs the invalidate hook
    /// before answering an INVALIDATE (mappings must be gone before the vCPU resumes), then
    /// writes the reply (release) and notifies the vCPU.
    pub fn finish(mut self, out: Outcome) -> Result<EventOutcome, XenError> {
        match out {
            Outcome::TimeOffset(secs) => *lock(&self.shared.time_offset) = Some(secs),
            Outcome::Invalidate => {
                if let Some(hook) = lock(&self.shared.on_invalidate).as_mut() {
                    hook();
                }
            }
            Outcome::Reply(_) => {}
        }
        let reply = out.reply(&self.req);
        self.answer(reply)
    }

    /// Answers with `data` as is (no TIMEOFFSET/INVALIDATE side work).
    pub fn complete(mut self, data: u64) -> Result<EventOutcome, XenError> {
        self.answer(data)
    }

    /// Answers with the reply of a request that reached nothing (all-ones for a plain read, the
    /// request's data otherwise), e.g. when the device model is stopping.
    pub fn abandon(mut self) -> Result<EventOutcome, XenError> {
        let reply = self.fallback_reply();
        self.answer(reply)
    }

    fn fallback_reply(&self) -> u64 {
        if self.req.dir_read && !self.req.data_is_ptr {
            all_ones(self.req.size)
        } else {
            self.req.data
        }
    }

    /// The slot write and notification; runs at most once per fetched request.
    fn answer(&mut self, data: u64) -> Result<EventOutcome, XenError> {
        let vcpu = self.vcpu;
        if std::mem::replace(&mut self.answered, true) {
            return Ok(EventOutcome::Completed { vcpu });
        }
        answer_slot(&*self.pages, &*self.evtchn, &self.shared, vcpu, self.port, data)
    }
}

/// Answers `vcpu`'s INPROCESS slot with `data` and notifies `port` (specs §4.3 steps 5-8).
fn answer_slot<R: ResourceMapping, E: EventChannels>(
    pages: &R,
    evtchn: &E,
    shared: &Shared,
    vcpu: u32,
    port: EvtchnPort,
    data: u64,
) -> Result<EventOutcome, XenError> {
    // Cleared before the slot says IORESP_READY: from then on Xen may post the vCPU's next
    // request, which must not be taken for a second one in flight.
    if let Some(b) = shared.busy.get(vcpu as usize) {
        b.store(false, Ordering::SeqCst);
    }
    let page = pages.frame(IOREQ_FRAME).ok_or(XenError::MissingFrame(IOREQ_FRAME))?;
    let slot = IoreqSlot::new(page, vcpu).ok_or(XenError::TooManyVcpus(vcpu + 1))?;
    match complete(&slot, data) {
        Ok(()) => {
            if !shared.alive.load(Ordering::SeqCst) {
                // Teardown already unbound (or is unbinding) the port: answering this late is
                // the caller's ordering bug, and notifying now would hit a stale port.
                log::warn!("ioreq server {}: vCPU {vcpu} answered after teardown, not notified", shared.id);
                return Ok(EventOutcome::Completed { vcpu });
            }
            evtchn.notify(port)?;
            Ok(EventOutcome::Completed { vcpu })
        }
        Err(e) => {
            let state = match e {
                IoreqError::StateChanged(s) | IoreqError::NotReady(s) => s,
                IoreqError::Invalid { .. } => 0,
            };
            log::error!("ioreq server {}: vCPU {vcpu} slot changed state to {state} under us", shared.id);
            Ok(EventOutcome::StateChanged { vcpu, state })
        }
    }
}

impl<R: ResourceMapping, E: EventChannels> Drop for Fetched<R, E> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        log::error!(
            "ioreq server {}: vCPU {} request dropped unanswered ({:?}); answering with the default reply",
            self.shared.id,
            self.vcpu,
            self.req.ty
        );
        let reply = self.fallback_reply();
        if let Err(e) = self.answer(reply) {
            log::error!("ioreq server {}: vCPU {}: {e}", self.shared.id, self.vcpu);
        }
    }
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
    /// Shared with every in-flight [`Fetched`], so the pages stay mapped until all are answered.
    pages: Option<Arc<F::Resource>>,
    enabled: bool,
    /// Local port of vCPU i at index i.
    vcpu_ports: Vec<EvtchnPort>,
    buf_port: Option<EvtchnPort>,
    /// What we asked Xen to forward, in registration order (undone in reverse).
    claims: Vec<Claim>,
    shared: Arc<Shared>,
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
            shared: Arc::new(Shared {
                id,
                alive: AtomicBool::new(true),
                busy: (0..max_vcpus).map(|_| AtomicBool::new(false)).collect(),
                time_offset: Mutex::new(None),
                on_invalidate: Mutex::new(None),
            }),
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
        srv.pages = Some(Arc::new(pages));
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
        *lock(&self.shared.time_offset)
    }
    /// Called on INVALIDATE before the vCPU is answered: drop every idle guest-memory mapping.
    /// Runs on whichever thread answers the request (serialised by a lock).
    pub fn set_invalidate_hook(&mut self, hook: Box<dyn FnMut() + Send>) {
        *lock(&self.shared.on_invalidate) = Some(hook);
    }
    /// Whether `vcpu` has a fetched request not yet answered.
    pub fn in_flight(&self, vcpu: u32) -> bool {
        self.shared.busy.get(vcpu as usize).is_some_and(|b| b.load(Ordering::SeqCst))
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
    /// serves it synchronously. None if nothing was pending.
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

    /// Serves one fired port synchronously (specs §4.3): [`IoreqServer::take_event`], then
    /// execute and answer a fetched request right here.
    pub fn on_event<H: IoreqHandler + ?Sized>(
        &mut self,
        port: EvtchnPort,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<EventOutcome, XenError> {
        match self.take_event(port, handler, ram)? {
            Event::Request(f) => f.run(handler, ram),
            Event::Done(out) => Ok(out),
        }
    }

    /// Takes the next pending port from the event channel (after its fd polled readable) and
    /// runs [`IoreqServer::take_event`] on it. None if nothing was pending.
    pub fn take_pending<H: IoreqHandler + ?Sized>(
        &mut self,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<Option<Event<F::Resource, E>>, XenError> {
        match self.evtchn.pending()? {
            Some(port) => self.take_event(port, handler, ram).map(Some),
            None => Ok(None),
        }
    }

    /// The fetch half of serving one fired port. For a vCPU port: unmask it, drain the buffered
    /// ring with `handler` (posted writes issued before the request run before it, as in QEMU),
    /// then fetch and validate the vCPU's slot. A valid request comes back as
    /// [`Event::Request`] for the caller to execute wherever it likes; a refused one is answered
    /// here with its defined reply. For the buffered port: drain the ring, unmask once empty.
    pub fn take_event<H: IoreqHandler + ?Sized>(
        &mut self,
        port: EvtchnPort,
        handler: &mut H,
        ram: &dyn GuestRam,
    ) -> Result<Event<F::Resource, E>, XenError> {
        if self.buf_port == Some(port) {
            let stats = self.drain_buffered(handler, ram)?;
            if !stats.more {
                self.evtchn.unmask(port)?;
            }
            return Ok(Event::Done(EventOutcome::Buffered(stats)));
        }
        let Some(vcpu) = self.vcpu_ports.iter().position(|&p| p == port) else {
            warn_limited!(
                "ioreq-unknown-port",
                "ioreq server {}: event on unknown port {port}, ignored",
                self.id
            );
            return Ok(Event::Done(EventOutcome::UnknownPort));
        };
        let vcpu = vcpu as u32;
        self.evtchn.unmask(port)?;
        // Posted writes were issued before this request: run them first (as QEMU does).
        self.drain_buffered(handler, ram)?;

        let pages = self.pages.clone().ok_or(XenError::MissingFrame(IOREQ_FRAME))?;
        let page = pages.frame(IOREQ_FRAME).ok_or(XenError::MissingFrame(IOREQ_FRAME))?;
        let slot = IoreqSlot::new(page, vcpu).ok_or(XenError::TooManyVcpus(vcpu + 1))?;
        let busy = self.shared.busy.get(vcpu as usize).ok_or(XenError::TooManyVcpus(vcpu + 1))?;
        if busy.load(Ordering::SeqCst) {
            // Our request is still in process, so the slot is INPROCESS: anything else is Xen or
            // the guest breaking the protocol. Leave the slot to the pending answer.
            let state = slot.state();
            if state == STATE_IOREQ_READY {
                log::error!(
                    "ioreq server {}: vCPU {vcpu} posted a request while its previous one is in flight",
                    self.id
                );
                return Ok(Event::Done(EventOutcome::StateChanged { vcpu, state }));
            }
            return Ok(Event::Done(EventOutcome::Spurious { vcpu }));
        }
        match fetch(&slot) {
            Ok(req) => {
                busy.store(true, Ordering::SeqCst);
                Ok(Event::Request(Fetched {
                    req,
                    pages,
                    evtchn: self.evtchn.clone(),
                    shared: self.shared.clone(),
                    vcpu,
                    port,
                    answered: false,
                }))
            }
            Err(IoreqError::Invalid { reason, ty, addr, size, count, reply }) => {
                warn_limited!(
                    format!("ioreq-invalid-{reason:?}"),
                    "vCPU {vcpu}: refused ioreq ({reason}: type {ty}, addr {addr:#x}, size {size}, count {count})"
                );
                Ok(Event::Done(match answer_slot(&*pages, &*self.evtchn, &self.shared, vcpu, port, reply)? {
                    EventOutcome::Completed { vcpu } => EventOutcome::Refused { vcpu, reason },
                    other => other,
                }))
            }
            Err(IoreqError::NotReady(_)) => Ok(Event::Done(EventOutcome::Spurious { vcpu })),
            Err(IoreqError::StateChanged(state)) => {
                Ok(Event::Done(EventOutcome::StateChanged { vcpu, state }))
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
            *lock(&self.shared.time_offset) = time_offset;
        }
        Ok(stats)
    }

    /// Stops the server in reverse setup order: unmap the PCI functions and ranges registered
    /// (newest first),
    /// unbind the buffered port then the vCPU ports, disable, unmap the pages, destroy. Errors
    /// are logged and teardown continues (the domain may already be gone). Idempotent; also run
    /// by Drop.
    ///
    /// With asynchronous execution, stop dispatching and answer every [`Fetched`] first (e.g.
    /// [`VcpuWorkers::shutdown`]): a request answered after this point is written to the slot
    /// but not notified, and the pages stay mapped until the last [`Fetched`] is gone.
    pub fn teardown(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        self.shared.alive.store(false, Ordering::SeqCst);
        let in_flight = self.shared.busy.iter().filter(|b| b.load(Ordering::SeqCst)).count();
        if in_flight > 0 {
            log::warn!("ioreq server {}: teardown with {in_flight} request(s) still in flight", self.id);
        }
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

/// Executes one validated request of a vCPU (the first argument) against the device model.
/// Runs on that vCPU's worker thread, concurrently with other vCPUs' requests.
pub type IoreqExec = Arc<dyn Fn(u32, &Ioreq) -> Outcome + Send + Sync>;

/// Something a worker could not settle normally; the vCPU was still answered unless
/// [`WorkerReport::Failed`] says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerReport {
    /// The slot left INPROCESS while the request ran; not answered (QEMU destroys the domain).
    StateChanged { vcpu: u32, state: u8 },
    /// Answering failed (e.g. the notify call).
    Failed { vcpu: u32, error: XenError },
    /// The executor panicked; the vCPU got the default reply (all-ones for a plain read).
    Panicked { vcpu: u32 },
}

/// Reports kept until the event loop reads them; more are logged and dropped.
const REPORT_QUEUE: usize = 256;

struct Worker<R: ResourceMapping, E: EventChannels> {
    tx: Sender<Fetched<R, E>>,
    /// Set while a request of this vCPU is queued or running (Xen sends one at a time).
    busy: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// What every worker shares.
struct WorkerCtx {
    exec: IoreqExec,
    reports: SyncSender<WorkerReport>,
    completed: AtomicU64,
    /// Run after each answer (work that must wait until the vCPU has its reply, e.g. S3).
    after_answer: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl WorkerCtx {
    fn report(&self, r: WorkerReport) {
        match self.reports.try_send(r) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(r)) => log::error!("ioreq worker report dropped (queue full): {r:?}"),
        }
    }

    /// Executes and answers one request; a panicking executor still gets the vCPU answered.
    fn execute<R: ResourceMapping, E: EventChannels>(&self, f: Fetched<R, E>, busy: Option<&AtomicBool>) {
        let vcpu = f.vcpu();
        let req = *f.request();
        let out = catch_unwind(AssertUnwindSafe(|| (self.exec)(vcpu, &req)));
        // Cleared before answering: once answered, Xen may send this vCPU's next request.
        if let Some(b) = busy {
            b.store(false, Ordering::SeqCst);
        }
        let result = match out {
            Ok(out) => f.finish(out),
            Err(_) => {
                log::error!(
                    "vCPU {vcpu}: device model panicked executing {req:?}; answering with the default"
                );
                self.report(WorkerReport::Panicked { vcpu });
                f.abandon()
            }
        };
        if let Some(hook) = &self.after_answer {
            hook();
        }
        match result {
            Ok(EventOutcome::Completed { .. }) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(EventOutcome::StateChanged { vcpu, state }) => {
                self.report(WorkerReport::StateChanged { vcpu, state })
            }
            Ok(other) => log::debug!("vCPU {vcpu}: unexpected outcome {other:?}"),
            Err(error) => {
                log::error!("vCPU {vcpu}: answering the ioreq failed: {error}");
                self.report(WorkerReport::Failed { vcpu, error });
            }
        }
    }
}

/// One worker thread per vCPU (spawned on its first request), so a slow request of one vCPU
/// (disk I/O inside a device) never delays another vCPU's. Each worker runs its vCPU's requests
/// in arrival order; Xen sends a vCPU's next request only after the previous one was answered.
///
/// Shut it down ([`VcpuWorkers::shutdown`], also run by Drop) *before* tearing the server
/// down: it stops accepting requests, lets every worker finish and answer what it holds, and
/// joins them.
pub struct VcpuWorkers<R, E>
where
    R: ResourceMapping + Send + Sync + 'static,
    E: EventChannels + Send + Sync + 'static,
{
    ctx: Arc<WorkerCtx>,
    workers: Vec<Option<Worker<R, E>>>,
    reports: Receiver<WorkerReport>,
    stopped: bool,
}

impl<R, E> std::fmt::Debug for VcpuWorkers<R, E>
where
    R: ResourceMapping + Send + Sync + 'static,
    E: EventChannels + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuWorkers")
            .field("vcpus", &self.workers.len())
            .field("running", &self.workers.iter().flatten().count())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl<R, E> VcpuWorkers<R, E>
where
    R: ResourceMapping + Send + Sync + 'static,
    E: EventChannels + Send + Sync + 'static,
{
    /// Workers for vCPUs `0..max_vcpus` running `exec`. No thread starts before the first
    /// request of its vCPU.
    pub fn new(max_vcpus: u32, exec: IoreqExec) -> Self {
        let (tx, reports) = mpsc::sync_channel(REPORT_QUEUE);
        let n = (max_vcpus as usize).min(IOREQ_SLOTS_PER_PAGE);
        VcpuWorkers {
            ctx: Arc::new(WorkerCtx { exec, reports: tx, completed: AtomicU64::new(0), after_answer: None }),
            workers: (0..n).map(|_| None).collect(),
            reports,
            stopped: false,
        }
    }

    /// Runs `hook` on the worker after each request is answered. Set it before the first
    /// dispatch (later calls are ignored with a log line: running workers share the context).
    pub fn with_after_answer(mut self, hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        match Arc::get_mut(&mut self.ctx) {
            Some(ctx) => ctx.after_answer = Some(hook),
            None => log::error!("ioreq workers already running: after-answer hook not installed"),
        }
        self
    }

    /// Workers executing with [`process`] through a handler made per request by
    /// `make_handler(vcpu)` (e.g. a thin wrapper around an `Arc` of the machine).
    pub fn with_handler<H, M>(max_vcpus: u32, make_handler: M, ram: Arc<dyn GuestRam>) -> Self
    where
        H: IoreqHandler,
        M: Fn(u32) -> H + Send + Sync + 'static,
    {
        Self::new(max_vcpus, Arc::new(move |vcpu, req| process(req, &mut make_handler(vcpu), &*ram)))
    }

    /// Hands `f` to its vCPU's worker and returns at once. Never loses a request: if no worker
    /// can take it (spawn failure, vCPU out of range) it runs here; after shutdown it is
    /// answered with the default reply.
    pub fn dispatch(&mut self, f: Fetched<R, E>) {
        let vcpu = f.vcpu();
        if self.stopped {
            log::warn!("vCPU {vcpu}: ioreq arrived after the workers stopped; answered with the default");
            if let Err(e) = f.abandon() {
                log::error!("vCPU {vcpu}: {e}");
            }
            return;
        }
        let Some(entry) = self.workers.get_mut(vcpu as usize) else {
            log::error!("vCPU {vcpu}: no worker slot; executing on the event loop");
            self.ctx.execute(f, None);
            return;
        };
        // A worker whose thread is gone (cannot happen short of a bug) is replaced.
        if entry.as_ref().is_some_and(|w| w.thread.is_finished()) {
            if let Some(w) = entry.take() {
                log::error!("vCPU {vcpu}: ioreq worker exited unexpectedly; restarting it");
                drop(w.tx);
                let _ = w.thread.join();
            }
        }
        if entry.is_none() {
            match spawn_worker(vcpu, self.ctx.clone()) {
                Ok(w) => *entry = Some(w),
                Err(e) => {
                    log::error!(
                        "vCPU {vcpu}: cannot start an ioreq worker ({e}); executing on the event loop"
                    );
                    self.ctx.execute(f, None);
                    return;
                }
            }
        }
        let Some(w) = entry.as_ref() else { return };
        if w.busy.swap(true, Ordering::SeqCst) {
            // Xen never does this (the slot guard in take_event catches a misbehaving peer);
            // the request still queues behind the running one.
            warn_limited!(
                format!("ioreq-vcpu-busy-{vcpu}"),
                "vCPU {vcpu}: a second ioreq was dispatched while one is in flight; queued"
            );
        }
        if let Err(mpsc::SendError(f)) = w.tx.send(f) {
            // Only if the thread died between the check above and now.
            log::error!("vCPU {vcpu}: ioreq worker gone; executing on the event loop");
            self.ctx.execute(f, Some(&w.busy));
        }
    }

    /// Whether `vcpu` has a request queued or running on its worker.
    pub fn busy(&self, vcpu: u32) -> bool {
        self.workers
            .get(vcpu as usize)
            .and_then(Option::as_ref)
            .is_some_and(|w| w.busy.load(Ordering::SeqCst))
    }

    /// Requests answered normally so far (statistics, tests).
    pub fn completed(&self) -> u64 {
        self.ctx.completed.load(Ordering::Relaxed)
    }

    /// Abnormal results since the last call (StateChanged, failed answers, panics), without
    /// blocking. The workers have already logged them.
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.reports.try_iter().collect()
    }

    /// Stops accepting requests, waits for each worker to answer what it holds, and joins them.
    /// Blocks as long as the slowest in-flight request takes. Idempotent; also run by Drop.
    pub fn shutdown(&mut self) {
        self.stopped = true;
        let workers: Vec<Worker<R, E>> = self.workers.iter_mut().filter_map(Option::take).collect();
        let mut threads = Vec::with_capacity(workers.len());
        // Close every queue first so all workers wind down in parallel.
        for w in workers {
            drop(w.tx);
            threads.push(w.thread);
        }
        for t in threads {
            if t.join().is_err() {
                log::error!("an ioreq worker thread panicked");
            }
        }
    }
}

impl<R, E> Drop for VcpuWorkers<R, E>
where
    R: ResourceMapping + Send + Sync + 'static,
    E: EventChannels + Send + Sync + 'static,
{
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn_worker<R, E>(vcpu: u32, ctx: Arc<WorkerCtx>) -> std::io::Result<Worker<R, E>>
where
    R: ResourceMapping + Send + Sync + 'static,
    E: EventChannels + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::channel::<Fetched<R, E>>();
    let busy = Arc::new(AtomicBool::new(false));
    let b = busy.clone();
    let thread = std::thread::Builder::new().name(format!("ioreq-vcpu{vcpu}")).spawn(move || {
        // Ends when the queue closes (shutdown) after every queued request was answered.
        while let Ok(f) = rx.recv() {
            ctx.execute(f, Some(&b));
        }
    })?;
    Ok(Worker { tx, busy, thread })
}

#[cfg(test)]
mod tests;
