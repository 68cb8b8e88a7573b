//! The ioreq server against FakeXen playing Xen's side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use hvmdm_devices::mem::TestRam;

use super::*;
use crate::dm::{IoreqServerInfo, ShutdownReason};
use crate::fake::{fake_vp_eport, FakeCall, FakeXen, FAKE_BUF_EPORT, FAKE_FIRST_LOCAL_PORT};
use crate::ioreq::{IoreqHandler, PciSbdf, SharedPage};
use crate::sys::ioreq::*;

const DOM: Domid = 7;
type Srv = IoreqServer<FakeXen, FakeXen, FakeXen>;

fn start(fake: &Arc<FakeXen>, vcpus: u32) -> Result<Srv, XenError> {
    IoreqServer::start(fake.clone(), fake.clone(), fake.clone(), DOM, vcpus)
}

/// Byte-wide port registers; unclaimed reads are all-ones.
#[derive(Default)]
struct Ports {
    regs: HashMap<u16, u8>,
    writes: Vec<(u16, Vec<u8>)>,
    reads: usize,
}

impl IoreqHandler for Ports {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.reads += 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(&port.wrapping_add(i as u16)).copied().unwrap_or(0xff);
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.writes.push((port, data.to_vec()));
        for (i, &b) in data.iter().enumerate() {
            self.regs.insert(port.wrapping_add(i as u16), b);
        }
    }
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    fn pci_config_read(&mut self, _: PciSbdf, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pci_config_write(&mut self, _: PciSbdf, _: u16, _: &[u8]) {}
}

fn pio(port: u64, size: u32, read: bool, data: u64) -> IoreqRaw {
    IoreqRaw {
        addr: port,
        data,
        count: 1,
        size,
        type_: IOREQ_TYPE_PIO,
        flags: if read { IOREQ_FLAG_DIR_READ } else { 0 },
        ..IoreqRaw::default()
    }
}

#[test]
fn setup_follows_the_spec_order() {
    let fake = Arc::new(FakeXen::new(2, 0));
    // Before enable Xen has published nothing: reading vp_eport then would bind port 0.
    assert_eq!(crate::ioreq::IoreqSlot::new(fake.ioreq_page(), 0).unwrap().vp_eport(), 0);
    let srv = start(&fake, 2).unwrap();
    let l = FAKE_FIRST_LOCAL_PORT;
    assert_eq!(
        fake.calls(),
        vec![
            FakeCall::CreateServer { domid: DOM, bufioreq: BufioreqMode::Atomic },
            FakeCall::MapResource { type_: XENMEM_RESOURCE_IOREQ_SERVER, id: 3, frame: 0, nr: 2 },
            FakeCall::GetInfo { id: 3 },
            FakeCall::SetState { id: 3, enabled: true },
            FakeCall::Bind { remote: fake_vp_eport(0), local: l },
            FakeCall::Bind { remote: fake_vp_eport(1), local: l + 1 },
            FakeCall::Bind { remote: FAKE_BUF_EPORT, local: l + 2 },
        ]
    );
    assert_eq!(srv.id(), 3);
    assert_eq!(srv.domid(), DOM);
    assert_eq!(srv.vcpu_port(0), Some(l));
    assert_eq!(srv.vcpu_port(1), Some(l + 1));
    assert_eq!(srv.vcpu_port(2), None);
    assert_eq!(srv.buffered_port(), Some(l + 2));
}

/// A device-model handle whose enable does nothing, as if the server were never enabled before
/// the ports are read: setup must notice (port 0) and undo everything.
struct NeverEnables(Arc<FakeXen>);

impl DeviceModelOps for NeverEnables {
    fn create_ioreq_server(&self, d: Domid, m: BufioreqMode) -> Result<IoservId, XenError> {
        self.0.create_ioreq_server(d, m)
    }
    fn get_ioreq_server_info(&self, d: Domid, id: IoservId) -> Result<IoreqServerInfo, XenError> {
        self.0.get_ioreq_server_info(d, id)
    }
    fn map_io_range(&self, d: Domid, id: IoservId, m: bool, s: u64, e: u64) -> Result<(), XenError> {
        self.0.map_io_range(d, id, m, s, e)
    }
    fn unmap_io_range(&self, d: Domid, id: IoservId, m: bool, s: u64, e: u64) -> Result<(), XenError> {
        self.0.unmap_io_range(d, id, m, s, e)
    }
    fn map_pcidev(&self, d: Domid, id: IoservId, s: PciSbdf) -> Result<(), XenError> {
        self.0.map_pcidev(d, id, s)
    }
    fn unmap_pcidev(&self, d: Domid, id: IoservId, s: PciSbdf) -> Result<(), XenError> {
        self.0.unmap_pcidev(d, id, s)
    }
    fn set_ioreq_server_state(&self, _: Domid, _: IoservId, _: bool) -> Result<(), XenError> {
        Ok(())
    }
    fn destroy_ioreq_server(&self, d: Domid, id: IoservId) -> Result<(), XenError> {
        self.0.destroy_ioreq_server(d, id)
    }
    fn set_pci_intx_level(&self, d: Domid, s: PciSbdf, i: u8, l: bool) -> Result<(), XenError> {
        self.0.set_pci_intx_level(d, s, i, l)
    }
    fn set_isa_irq_level(&self, d: Domid, irq: u8, l: bool) -> Result<(), XenError> {
        self.0.set_isa_irq_level(d, irq, l)
    }
    fn set_pci_link_route(&self, d: Domid, link: u8, irq: u8) -> Result<(), XenError> {
        self.0.set_pci_link_route(d, link, irq)
    }
    fn inject_msi(&self, d: Domid, a: u64, v: u32) -> Result<(), XenError> {
        self.0.inject_msi(d, a, v)
    }
    fn modified_memory(&self, d: Domid, p: u64, n: u32) -> Result<(), XenError> {
        self.0.modified_memory(d, p, n)
    }
    fn shutdown(&self, d: Domid, r: ShutdownReason) -> Result<(), XenError> {
        self.0.shutdown(d, r)
    }
    fn nr_vcpus(&self, d: Domid) -> Result<u32, XenError> {
        self.0.nr_vcpus(d)
    }
    fn restrict(&self, d: Domid) -> Result<(), XenError> {
        DeviceModelOps::restrict(&*self.0, d)
    }
}

#[test]
fn reading_vp_eport_without_enable_fails_and_rolls_back() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let err = IoreqServer::start(Arc::new(NeverEnables(fake.clone())), fake.clone(), fake.clone(), DOM, 1)
        .unwrap_err();
    assert_eq!(err, XenError::NoVpEport { vcpu: 0 });
    let calls = fake.calls();
    assert!(!calls.iter().any(|c| matches!(c, FakeCall::Bind { .. })), "{calls:?}");
    assert_eq!(&calls[calls.len() - 2..], &[FakeCall::UnmapResource, FakeCall::Destroy { id: 3 }]);
}

#[test]
fn failed_bind_undoes_setup_in_reverse() {
    let fake = Arc::new(FakeXen::new(2, 0));
    // vCPU 0 binds, vCPU 1 fails.
    fake.fail_after("bind_interdomain", 1, libc::ENOMEM);
    let srv_err = start(&fake, 2).unwrap_err();
    assert_eq!(srv_err.errno(), Some(libc::ENOMEM));
    assert_eq!(
        fake.calls(),
        vec![
            FakeCall::CreateServer { domid: DOM, bufioreq: BufioreqMode::Atomic },
            FakeCall::MapResource { type_: 0, id: 3, frame: 0, nr: 2 },
            FakeCall::GetInfo { id: 3 },
            FakeCall::SetState { id: 3, enabled: true },
            FakeCall::Bind { remote: fake_vp_eport(0), local: FAKE_FIRST_LOCAL_PORT },
            FakeCall::Unbind(FAKE_FIRST_LOCAL_PORT),
            FakeCall::SetState { id: 3, enabled: false },
            FakeCall::UnmapResource,
            FakeCall::Destroy { id: 3 },
        ]
    );
}

#[test]
fn bad_vcpu_counts_are_refused_before_any_call() {
    let fake = Arc::new(FakeXen::new(1, 0));
    assert_eq!(start(&fake, 0).unwrap_err(), XenError::TooManyVcpus(0));
    assert_eq!(start(&fake, 129).unwrap_err(), XenError::TooManyVcpus(129));
    assert!(fake.calls().is_empty());
}

#[test]
fn pio_write_then_read_round_trip() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let ram = TestRam::new(0x1000);
    let mut dev = Ports::default();
    fake.clear_calls();

    let port = fake.post_ioreq(1, &pio(0x510, 2, false, 0xdead_beef)).unwrap();
    assert_eq!(port, srv.vcpu_port(1).unwrap());
    assert_eq!(srv.handle_pending(&mut dev, &ram).unwrap(), Some(EventOutcome::Completed { vcpu: 1 }));
    // Write data masked to the access size before reaching the device.
    assert_eq!(dev.writes, vec![(0x510, vec![0xef, 0xbe])]);
    assert_eq!(fake.slot_result(1).0, STATE_IORESP_READY);
    assert_eq!(fake.calls(), vec![FakeCall::Unmask(port), FakeCall::Notify(port)]);

    fake.post_ioreq(1, &pio(0x510, 4, true, 0)).unwrap();
    assert_eq!(srv.handle_pending(&mut dev, &ram).unwrap(), Some(EventOutcome::Completed { vcpu: 1 }));
    // 0x512/0x513 are unclaimed: all-ones.
    assert_eq!(fake.slot_result(1), (STATE_IORESP_READY, 0xffff_beef));
    assert_eq!(srv.handle_pending(&mut dev, &ram).unwrap(), None);
}

#[test]
fn buffered_writes_are_drained() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let ram = TestRam::new(0x1000);
    let mut dev = Ports::default();
    fake.clear_calls();

    let bport = fake.post_buffered(IOREQ_TYPE_PIO, 0x3f8, 1, 0x41).unwrap();
    fake.post_buffered(IOREQ_TYPE_TIMEOFFSET, 0, 8, 0x1_0000_0002).unwrap();
    assert_eq!(bport, srv.buffered_port().unwrap());
    let out = srv.on_event(bport, &mut dev, &ram).unwrap();
    let EventOutcome::Buffered(stats) = out else { panic!("{out:?}") };
    assert_eq!((stats.delivered, stats.dropped, stats.more, stats.resynced), (2, 0, false, false));
    assert_eq!(dev.writes, vec![(0x3f8, vec![0x41])]);
    assert_eq!(srv.time_offset(), Some(0x1_0000_0002));
    assert_eq!(fake.buf_page().load_u32(BUFIOREQ_OFF_READ_POINTER, Ordering::SeqCst), 3);
    // Unmasked once empty; nothing answered synchronously.
    assert_eq!(fake.calls(), vec![FakeCall::Unmask(bport)]);
}

#[test]
fn buffered_ring_drained_before_a_synchronous_request() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let ram = TestRam::new(0x1000);
    let mut dev = Ports::default();
    fake.post_buffered(IOREQ_TYPE_PIO, 0x80, 1, 0x11).unwrap();
    fake.post_ioreq(0, &pio(0x80, 1, true, 0)).unwrap();
    let vport = srv.vcpu_port(0).unwrap();
    // The vCPU event comes first; the posted write must still be seen by the read.
    assert_eq!(srv.on_event(vport, &mut dev, &ram).unwrap(), EventOutcome::Completed { vcpu: 0 });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0x11));
}

#[test]
fn garbage_slot_gets_the_defined_reply() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let ram = TestRam::new(0x1000);
    let mut dev = Ports::default();
    let port = srv.vcpu_port(0).unwrap();

    let bad_type = IoreqRaw { type_: 0x55, ..pio(0x60, 4, true, 0x1234) };
    fake.post_ioreq(0, &bad_type).unwrap();
    fake.clear_calls();
    let out = srv.on_event(port, &mut dev, &ram).unwrap();
    assert_eq!(out, EventOutcome::Refused { vcpu: 0, reason: crate::ioreq::Invalid::Type(0x55) });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xffff_ffff));
    assert_eq!(fake.calls(), vec![FakeCall::Unmask(port), FakeCall::Notify(port)]);

    fake.post_ioreq(0, &pio(0x60, 3, true, 0)).unwrap();
    let out = srv.on_event(port, &mut dev, &ram).unwrap();
    assert_eq!(out, EventOutcome::Refused { vcpu: 0, reason: crate::ioreq::Invalid::Size(3) });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xff_ffff));

    // A port range running past 0xffff: write refused, data echoed back.
    fake.post_ioreq(0, &pio(0xffff, 2, false, 0x77)).unwrap();
    let out = srv.on_event(port, &mut dev, &ram).unwrap();
    assert_eq!(out, EventOutcome::Refused { vcpu: 0, reason: crate::ioreq::Invalid::Span });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0x77));
    assert!(dev.writes.is_empty() && dev.reads == 0);
}

#[test]
fn spurious_wakeup_answers_nothing() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let mut dev = Ports::default();
    let port = srv.vcpu_port(0).unwrap();
    fake.clear_calls();
    let out = srv.on_event(port, &mut dev, &TestRam::new(0)).unwrap();
    assert_eq!(out, EventOutcome::Spurious { vcpu: 0 });
    assert_eq!(fake.calls(), vec![FakeCall::Unmask(port)]);
    assert_eq!(fake.slot_result(0).0, STATE_IOREQ_NONE);
}

#[test]
fn unknown_port_is_ignored() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let mut dev = Ports::default();
    fake.post_ioreq(0, &pio(0x60, 1, true, 0)).unwrap();
    fake.clear_calls();
    for _ in 0..3 {
        assert_eq!(srv.on_event(4242, &mut dev, &TestRam::new(0)).unwrap(), EventOutcome::UnknownPort);
    }
    assert!(fake.calls().is_empty());
    assert_eq!(dev.reads, 0);
    // The real vCPU request is still pending and untouched.
    assert_eq!(fake.slot_result(0).0, STATE_IOREQ_READY);
}

#[test]
fn invalidate_runs_the_hook_before_answering() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let seen = Arc::new(AtomicU8::new(0xee));
    let (f, s) = (fake.clone(), seen.clone());
    srv.set_invalidate_hook(Box::new(move || s.store(f.slot_result(0).0, Ordering::SeqCst)));
    let inv =
        IoreqRaw { addr: 0, data: !0, count: 1, size: 4, type_: IOREQ_TYPE_INVALIDATE, ..Default::default() };
    fake.post_ioreq(0, &inv).unwrap();
    let mut dev = Ports::default();
    assert_eq!(
        srv.handle_pending(&mut dev, &TestRam::new(0)).unwrap(),
        Some(EventOutcome::Completed { vcpu: 0 })
    );
    assert_eq!(seen.load(Ordering::SeqCst), STATE_IOREQ_INPROCESS);
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, !0));
}

#[test]
fn state_flapping_under_us_is_reported_not_answered() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let port = srv.vcpu_port(0).unwrap();
    fake.post_ioreq(0, &pio(0x70, 1, false, 5)).unwrap();
    // The device resets the slot to NONE while handling the write (a hostile peer would).
    struct Flapper(Arc<FakeXen>);
    impl IoreqHandler for Flapper {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, _: u16, _: &[u8]) {
            self.0.ioreq_page().store_u8(IOREQ_OFF_FLAGS, STATE_IOREQ_NONE, Ordering::SeqCst);
        }
        fn mmio_read(&mut self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&mut self, _: u64, _: &[u8]) {}
        fn pci_config_read(&mut self, _: PciSbdf, _: u16, _: &mut [u8]) {}
        fn pci_config_write(&mut self, _: PciSbdf, _: u16, _: &[u8]) {}
    }
    fake.clear_calls();
    let out = srv.on_event(port, &mut Flapper(fake.clone()), &TestRam::new(0)).unwrap();
    assert_eq!(out, EventOutcome::StateChanged { vcpu: 0, state: STATE_IOREQ_NONE });
    assert!(!fake.calls().contains(&FakeCall::Notify(port)));
}

#[test]
fn registrations_pass_through_and_teardown_reverses_everything() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let isa = PciSbdf(xen_dmop_pci_sbdf(0, 0, 1, 0));
    let ide = PciSbdf(xen_dmop_pci_sbdf(0, 0, 1, 1));
    srv.map_io_range(false, 0x3f8, 0x3ff).unwrap();
    srv.register_pci(isa).unwrap();
    srv.map_io_range(true, 0xf000_0000, 0xf000_0fff).unwrap();
    srv.register_pci(ide).unwrap();
    assert_eq!(srv.map_io_range(true, 2, 1).unwrap_err(), XenError::InvalidRange { start: 2, end: 1 });
    // A BAR moving: unmap the old range (no longer undone at teardown), map the new one.
    srv.unmap_io_range(true, 0xf000_0000, 0xf000_0fff).unwrap();
    srv.map_io_range(true, 0xf100_0000, 0xf100_0fff).unwrap();
    fake.clear_calls();
    drop(srv);
    let l = FAKE_FIRST_LOCAL_PORT;
    assert_eq!(
        fake.calls(),
        vec![
            FakeCall::UnmapIoRange { is_mmio: true, start: 0xf100_0000, end: 0xf100_0fff },
            FakeCall::UnmapPcidev(ide),
            FakeCall::UnmapPcidev(isa),
            FakeCall::UnmapIoRange { is_mmio: false, start: 0x3f8, end: 0x3ff },
            FakeCall::Unbind(l + 2),
            FakeCall::Unbind(l + 1),
            FakeCall::Unbind(l),
            FakeCall::SetState { id: 3, enabled: false },
            FakeCall::UnmapResource,
            FakeCall::Destroy { id: 3 },
        ]
    );
}

#[test]
fn teardown_is_idempotent_and_survives_errors() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    fake.fail_next("set_ioreq_server_state", libc::ESRCH);
    fake.clear_calls();
    srv.teardown();
    let after_first = fake.calls();
    // The failed disable is not recorded by the fake, but the rest still ran.
    assert_eq!(
        after_first,
        vec![
            FakeCall::Unbind(FAKE_FIRST_LOCAL_PORT + 1),
            FakeCall::Unbind(FAKE_FIRST_LOCAL_PORT),
            FakeCall::UnmapResource,
            FakeCall::Destroy { id: 3 },
        ]
    );
    drop(srv);
    assert_eq!(fake.calls(), after_first);
}

// ---- Asynchronous completion: take_event + Fetched + VcpuWorkers ----

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fake::FakeResource;
use crate::ioreq::{process, Ioreq, IoreqType, Outcome};

type Req = Fetched<FakeResource, FakeXen>;
type Workers = VcpuWorkers<FakeResource, FakeXen>;

#[test]
fn fetched_requests_and_workers_are_send() {
    fn send<T: Send + 'static>() {}
    send::<Req>();
    send::<Workers>();
    #[cfg(feature = "xen-libs")]
    {
        use crate::evtchn::XenEventChannels;
        use crate::foreign::XenResourceMapping;
        send::<Fetched<XenResourceMapping, XenEventChannels>>();
        send::<VcpuWorkers<XenResourceMapping, XenEventChannels>>();
    }
}

/// Polls `cond` for up to 5 s (workers run on other threads).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn take(srv: &mut Srv, dev: &mut Ports) -> Req {
    match srv.take_pending(dev, &TestRam::new(0)).unwrap() {
        Some(Event::Request(f)) => f,
        other => panic!("expected a request, got {other:?}"),
    }
}

/// An executor for which a read of port 0x1f0 (the "disk") blocks until `gate` releases it and
/// reports on `started` when it begins; every other read answers 0x42.
fn slow_disk_exec(started: mpsc::Sender<u32>, gate: mpsc::Receiver<u64>) -> IoreqExec {
    let started = Mutex::new(started);
    let gate = Mutex::new(gate);
    Arc::new(move |vcpu, req: &Ioreq| {
        if req.ty == IoreqType::Pio && req.addr == 0x1f0 {
            started.lock().unwrap().send(vcpu).unwrap();
            let v = gate.lock().unwrap().recv_timeout(Duration::from_secs(10)).unwrap_or(0xdead);
            return Outcome::Reply(v);
        }
        Outcome::Reply(0x42)
    })
}

#[test]
fn slow_request_of_one_vcpu_does_not_block_another() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let (p0, p1) = (srv.vcpu_port(0).unwrap(), srv.vcpu_port(1).unwrap());
    let (started_tx, started) = mpsc::channel();
    let (gate, gate_rx) = mpsc::channel();
    let mut workers = Workers::new(2, slow_disk_exec(started_tx, gate_rx));
    let mut dev = Ports::default();
    fake.clear_calls();

    fake.post_ioreq(0, &pio(0x1f0, 2, true, 0)).unwrap();
    let f0 = take(&mut srv, &mut dev);
    assert_eq!((f0.vcpu(), f0.request().addr), (0, 0x1f0));
    assert!(srv.in_flight(0));
    workers.dispatch(f0);
    assert_eq!(started.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
    assert!(workers.busy(0));

    // vCPU 1 is served to completion while vCPU 0's request is still blocked in its device.
    fake.post_ioreq(1, &pio(0x60, 1, true, 0)).unwrap();
    let f1 = take(&mut srv, &mut dev);
    workers.dispatch(f1);
    wait_for("vCPU 1's answer", || fake.slot_result(1).0 == STATE_IORESP_READY);
    assert_eq!(fake.slot_result(1), (STATE_IORESP_READY, 0x42));
    assert_eq!(fake.slot_result(0).0, STATE_IOREQ_INPROCESS);
    wait_for("vCPU 1's notify", || fake.calls().contains(&FakeCall::Notify(p1)));
    assert!(!fake.calls().contains(&FakeCall::Notify(p0)));
    assert!(srv.in_flight(0) && !srv.in_flight(1));
    // A re-fired vCPU 0 port meanwhile is spurious: the slot is ours (INPROCESS).
    fake.raise(p0);
    assert!(matches!(
        srv.take_pending(&mut dev, &TestRam::new(0)).unwrap(),
        Some(Event::Done(EventOutcome::Spurious { vcpu: 0 }))
    ));

    gate.send(0xabcd).unwrap();
    wait_for("vCPU 0's answer", || fake.slot_result(0).0 == STATE_IORESP_READY);
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xabcd));
    wait_for("vCPU 0's notify", || fake.calls().contains(&FakeCall::Notify(p0)));
    wait_for("both counted", || workers.completed() == 2);
    assert!(!srv.in_flight(0) && !workers.busy(0));
    let calls = fake.calls();
    let pos = |c: FakeCall| calls.iter().position(|x| *x == c).unwrap();
    assert!(pos(FakeCall::Notify(p1)) < pos(FakeCall::Notify(p0)), "{calls:?}");
    assert!(workers.reports().is_empty());
    workers.shutdown();
}

#[test]
fn dropped_request_still_answers_the_vcpu() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let port = srv.vcpu_port(0).unwrap();
    let mut dev = Ports::default();

    fake.post_ioreq(0, &pio(0x71, 2, true, 0x1234)).unwrap();
    let f = take(&mut srv, &mut dev);
    fake.clear_calls();
    drop(f);
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xffff));
    assert_eq!(fake.calls(), vec![FakeCall::Notify(port)]);
    assert!(!srv.in_flight(0));

    // A write keeps its data; abandon() is the explicit form.
    fake.post_ioreq(0, &pio(0x71, 1, false, 0x5)).unwrap();
    let f = take(&mut srv, &mut dev);
    assert_eq!(f.abandon().unwrap(), EventOutcome::Completed { vcpu: 0 });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0x5));
    assert!(dev.writes.is_empty() && dev.reads == 0);
}

/// Ports behind a lock, shared by the event loop (buffered writes) and the workers.
#[derive(Clone, Default)]
struct SharedPorts(Arc<Mutex<Ports>>);

impl IoreqHandler for SharedPorts {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.0.lock().unwrap().pio_read(port, data)
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.0.lock().unwrap().pio_write(port, data)
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.0.lock().unwrap().mmio_read(addr, data)
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.0.lock().unwrap().mmio_write(addr, data)
    }
    fn pci_config_read(&mut self, s: PciSbdf, reg: u16, data: &mut [u8]) {
        self.0.lock().unwrap().pci_config_read(s, reg, data)
    }
    fn pci_config_write(&mut self, s: PciSbdf, reg: u16, data: &[u8]) {
        self.0.lock().unwrap().pci_config_write(s, reg, data)
    }
}

#[test]
fn buffered_writes_run_before_the_dispatched_request() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let dev = SharedPorts::default();
    let d = dev.clone();
    let mut workers = Workers::with_handler(2, move |_| d.clone(), Arc::new(TestRam::new(0x1000)));
    let mut loop_dev = dev.clone();
    fake.post_buffered(IOREQ_TYPE_PIO, 0x80, 1, 0x11).unwrap();
    fake.post_buffered(IOREQ_TYPE_PIO, 0x81, 1, 0x22).unwrap();
    fake.post_ioreq(1, &pio(0x80, 2, true, 0)).unwrap();
    let vport = srv.vcpu_port(1).unwrap();
    // The vCPU's port is handled first: the ring is drained before the request is handed out.
    let Event::Request(f) = srv.take_event(vport, &mut loop_dev, &TestRam::new(0)).unwrap() else {
        panic!("expected a request")
    };
    assert_eq!(dev.0.lock().unwrap().writes, vec![(0x80, vec![0x11]), (0x81, vec![0x22])]);
    workers.dispatch(f);
    wait_for("the answer", || fake.slot_result(1).0 == STATE_IORESP_READY);
    assert_eq!(fake.slot_result(1), (STATE_IORESP_READY, 0x2211));
    // The buffered port fired too; its ring is already empty.
    let bport = srv.buffered_port().unwrap();
    let out = srv.on_event(bport, &mut loop_dev, &TestRam::new(0)).unwrap();
    assert!(matches!(out, EventOutcome::Buffered(s) if s.delivered == 0), "{out:?}");
}

#[test]
fn shutdown_waits_for_a_busy_worker_then_teardown() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let p0 = srv.vcpu_port(0).unwrap();
    let (started_tx, started) = mpsc::channel();
    let (gate, gate_rx) = mpsc::channel();
    let mut workers = Workers::new(2, slow_disk_exec(started_tx, gate_rx));
    let mut dev = Ports::default();
    fake.post_ioreq(0, &pio(0x1f0, 4, true, 0)).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    started.recv_timeout(Duration::from_secs(5)).unwrap();

    // Order: stop dispatching and join the workers (in-flight work finishes and is answered),
    // then tear the server down.
    let stopper = std::thread::spawn(move || {
        workers.shutdown();
        workers
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!stopper.is_finished(), "shutdown must wait for the in-flight request");
    gate.send(7).unwrap();
    let mut workers = stopper.join().unwrap();
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 7));
    srv.teardown();
    let calls = fake.calls();
    let notify = calls.iter().position(|c| *c == FakeCall::Notify(p0)).unwrap();
    let unbind = calls.iter().position(|c| *c == FakeCall::Unbind(p0)).unwrap();
    assert!(notify < unbind, "{calls:?}");
    assert_eq!(calls.last(), Some(&FakeCall::Destroy { id: 3 }));
    // A request dispatched after shutdown is not lost: it gets the default answer.
    let mut srv = start(&fake, 2).unwrap();
    fake.post_ioreq(1, &pio(0x1f0, 1, true, 0)).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    assert_eq!(fake.slot_result(1), (STATE_IORESP_READY, 0xff));
    assert!(started.try_recv().is_err());
}

#[test]
fn answer_after_teardown_writes_the_slot_but_does_not_notify() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let mut dev = Ports::default();
    fake.post_ioreq(0, &pio(0x70, 1, true, 0)).unwrap();
    let f = take(&mut srv, &mut dev);
    fake.clear_calls();
    srv.teardown();
    // The pages stay mapped while the request is alive.
    assert!(!fake.calls().contains(&FakeCall::UnmapResource));
    assert_eq!(f.complete(0x9).unwrap(), EventOutcome::Completed { vcpu: 0 });
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0x9));
    let calls = fake.calls();
    assert!(!calls.iter().any(|c| matches!(c, FakeCall::Notify(_))), "{calls:?}");
    assert_eq!(calls.last(), Some(&FakeCall::UnmapResource));
}

#[test]
fn new_request_while_one_is_in_flight_is_flagged_not_fetched() {
    let fake = Arc::new(FakeXen::new(1, 0));
    let mut srv = start(&fake, 1).unwrap();
    let mut dev = Ports::default();
    fake.post_ioreq(0, &pio(0x70, 1, true, 0)).unwrap();
    let f = take(&mut srv, &mut dev);
    // A hostile peer rewrites the slot to READY while we hold the request.
    fake.post_ioreq(0, &pio(0x71, 1, false, 3)).unwrap();
    let out = srv.take_pending(&mut dev, &TestRam::new(0)).unwrap();
    assert!(
        matches!(out, Some(Event::Done(EventOutcome::StateChanged { vcpu: 0, state: STATE_IOREQ_READY }))),
        "{out:?}"
    );
    assert_eq!(fake.slot_result(0).0, STATE_IOREQ_READY);
    // Our answer then finds the slot moved and leaves it alone.
    fake.clear_calls();
    assert_eq!(f.complete(1).unwrap(), EventOutcome::StateChanged { vcpu: 0, state: STATE_IOREQ_READY });
    assert!(fake.calls().is_empty());
    assert!(dev.writes.is_empty());
}

#[test]
fn worker_side_effects_and_reports() {
    let fake = Arc::new(FakeXen::new(2, 0));
    let mut srv = start(&fake, 2).unwrap();
    let seen = Arc::new(AtomicU8::new(0xee));
    let (f2, s) = (fake.clone(), seen.clone());
    srv.set_invalidate_hook(Box::new(move || s.store(f2.slot_result(1).0, Ordering::SeqCst)));
    let exec: IoreqExec = Arc::new(|vcpu, req: &Ioreq| {
        if req.ty == IoreqType::Pio && req.addr == 0xbad {
            panic!("device bug on vCPU {vcpu}");
        }
        process(req, &mut Ports::default(), &TestRam::new(0))
    });
    let mut workers = Workers::new(2, exec);
    let mut dev = Ports::default();

    // INVALIDATE: the hook runs on the worker while the slot is still INPROCESS.
    let inv =
        IoreqRaw { addr: 0, data: !0, count: 1, size: 4, type_: IOREQ_TYPE_INVALIDATE, ..Default::default() };
    fake.post_ioreq(1, &inv).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    wait_for("invalidate answer", || fake.slot_result(1).0 == STATE_IORESP_READY);
    assert_eq!(seen.load(Ordering::SeqCst), STATE_IOREQ_INPROCESS);
    assert_eq!(fake.slot_result(1), (STATE_IORESP_READY, !0));

    // A synchronous TIMEOFFSET is recorded in the server.
    let to = IoreqRaw { data: 77, count: 1, size: 8, type_: IOREQ_TYPE_TIMEOFFSET, ..Default::default() };
    fake.post_ioreq(0, &to).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    wait_for("timeoffset answer", || fake.slot_result(0).0 == STATE_IORESP_READY);
    assert_eq!(srv.time_offset(), Some(77));

    // A panicking device still gets the vCPU answered, is reported, and the worker survives.
    fake.post_ioreq(0, &pio(0xbad, 2, true, 0)).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    wait_for("panic answer", || fake.slot_result(0).0 == STATE_IORESP_READY);
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xffff));
    wait_for("report", || !workers.busy(0));
    assert_eq!(workers.reports(), vec![WorkerReport::Panicked { vcpu: 0 }]);
    fake.post_ioreq(0, &pio(0x60, 1, true, 0)).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    wait_for("answer after panic", || fake.slot_result(0).0 == STATE_IORESP_READY);
    assert_eq!(fake.slot_result(0), (STATE_IORESP_READY, 0xff));

    // A failed notify is reported, not lost.
    fake.fail_next("notify", libc::EIO);
    fake.post_ioreq(1, &pio(0x60, 1, true, 0)).unwrap();
    workers.dispatch(take(&mut srv, &mut dev));
    let mut reports = Vec::new();
    wait_for("failure report", || {
        reports.extend(workers.reports());
        !reports.is_empty()
    });
    assert!(
        matches!(&reports[..], [WorkerReport::Failed { vcpu: 1, error }] if error.errno() == Some(libc::EIO)),
        "{reports:?}"
    );
    assert_eq!(fake.slot_result(1).0, STATE_IORESP_READY);
    workers.shutdown();
    srv.teardown();
}
