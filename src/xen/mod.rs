//! The Xen backend: hvmdm started by libxl in place of qemu-xen (`-xen-domid N ...`).
//!
//! One thread serves everything, like QEMU's main loop: the ioreq server's event channel (guest
//! I/O), the QMP sockets (libxl and xentop), and SIGHUP/SIGTERM (libxl's destroy). Order of
//! setup follows specs/xen-interfaces.md §4.1: machine built, ioreq server created and enabled,
//! ranges and PCI functions claimed, optional device state loaded, then `running` in xenstore.
//!
//! Not here yet (issue 3 notes): asynchronous disk I/O (a slow disk request holds up the other
//! vCPUs' ioreqs), the Xen platform device and PV backends (issue 4/unplug), S3.

pub mod config;
pub mod handler;
pub mod qmp;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hvmdm_devices::bus::BusListener;
use hvmdm_devices::topology::Topology;
use hvmdm_toolstack::argv::{DmArgs, SocketEndpoint};
use hvmdm_toolstack::qmp::commands::{DmControl, XenQmp};
use hvmdm_toolstack::qmp::server::{QmpListener, QmpServer};
use hvmdm_xen::dm::XenDeviceModel;
use hvmdm_xen::dm::{DeviceModelOps, Domid, IoservId};
use hvmdm_xen::evtchn::EventChannels;
use hvmdm_xen::evtchn::XenEventChannels;
use hvmdm_xen::foreign::XenForeignMemory;
use hvmdm_xen::hvmparam::XenCall;
use hvmdm_xen::ioreq::PciSbdf;
use hvmdm_xen::mapcache::MapCache;
use hvmdm_xen::platform::{XenIrq, XenPlatform};
use hvmdm_xen::server::{Event, EventOutcome, IoreqServer, VcpuWorkers, WorkerReport};
use hvmdm_xen::xenstore::{Client as XsClient, XenStore};

use crate::machine::{Machine, MachineEnv};

type Dm = XenDeviceModel;
type Ram = MapCache<XenDeviceModel, XenForeignMemory>;

/// How often the buffered ring is drained while it had work (QEMU's 100 ms timer).
const BUFFERED_POLL: Duration = Duration::from_millis(100);

/// Forwards bus regions to the ioreq server: Xen only sends us accesses to claimed ranges.
/// Called synchronously from inside a guest config-space write (BAR or PM base programmed), so
/// the range is claimed before the vCPU that moved it runs again.
struct RangeClaims {
    dm: Arc<Dm>,
    domid: Domid,
    id: IoservId,
    is_mmio: bool,
}

impl BusListener for RangeClaims {
    fn region_added(&self, base: u64, len: u64) {
        let end = base.saturating_add(len - 1);
        if let Err(e) = self.dm.map_io_range(self.domid, self.id, self.is_mmio, base, end) {
            log::error!("claiming {} {base:#x}-{end:#x}: {e}", if self.is_mmio { "MMIO" } else { "ports" });
        }
    }
    fn region_removed(&self, base: u64, len: u64) {
        let end = base.saturating_add(len - 1);
        if let Err(e) = self.dm.unmap_io_range(self.domid, self.id, self.is_mmio, base, end) {
            log::warn!("releasing {} {base:#x}-{end:#x}: {e}", if self.is_mmio { "MMIO" } else { "ports" });
        }
    }
}

/// `hvmdm -xen-domid N ...` as libxl runs it. Returns the exit code.
pub fn run(argv: Vec<OsString>) -> Result<i32> {
    let args = DmArgs::parse(argv).context("command line")?;
    let (cfg, opts) = config::from_dm_args(&args)?;
    for n in &opts.notes {
        log::warn!("{n}");
    }
    for i in &args.ignored {
        log::info!("option {} accepted without effect", i.option);
    }
    let domid = Domid::try_from(opts.domid).context("-xen-domid out of range")?;
    log::info!(
        "serving domain {domid}{}: {} MiB, {}/{} vCPUs, {} disk(s)",
        opts.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
        cfg.memory >> 20,
        cfg.smp,
        cfg.max_cpus,
        cfg.disks.len()
    );

    // Signals become readable events on the loop (blocked before any thread starts, so every
    // thread inherits the mask and only the signalfd sees them).
    let sigfd = signals::block_and_open(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT])?;

    let dm = Arc::new(XenDeviceModel::open().context("opening libxendevicemodel")?);
    let evtchn = Arc::new(XenEventChannels::open().context("opening libxenevtchn")?);
    let fmem = Arc::new(XenForeignMemory::open().context("opening libxenforeignmemory")?);

    let ram: Arc<Ram> =
        Arc::new(MapCache::new(dm.clone(), fmem.clone(), domid, opts.ram_below_4g, opts.ram_above_4g));
    let mut platform = XenPlatform::new(dm.clone(), domid);
    if !opts.restrict {
        // ACPI S3 needs HVMOP_set_param on an unrestrictable privcmd handle: not when restricted.
        match XenCall::open() {
            Ok(xc) => platform = platform.with_s3(Arc::new(xc)),
            Err(e) => log::warn!("ACPI S3 unavailable: {e}"),
        }
    }
    let platform = Arc::new(platform);
    let irq = Arc::new(XenIrq::new(dm.clone(), domid));
    let machine = Machine::build(
        &cfg,
        MachineEnv {
            mem: ram.clone(),
            irq,
            platform: platform.clone(),
            shadow: platform.clone(),
            ram_below_4g: opts.ram_below_4g,
            ram_above_4g: opts.ram_above_4g,
            topology: Topology::flat(cfg.smp, cfg.max_cpus),
        },
    )
    .context("building the machine")?;
    let machine = Arc::new(machine);

    if let Some(fd) = opts.incoming_fd {
        // SAFETY: libxl opened this fd for us (`-incoming fd:N`) and nothing else owns it.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        qmp::load_state(&machine, file)
            .map_err(anyhow::Error::msg)
            .context("-incoming: loading device state")?;
        log::info!("device state restored from fd {fd}");
    }
    // Device state (if any) is loaded: run unless `-S` asked to wait for `cont`.
    let run_state = if opts.start_paused { qmp::RunState::Prelaunch } else { qmp::RunState::Running };

    let mut server = IoreqServer::start(dm.clone(), evtchn.clone(), fmem.clone(), domid, opts.max_vcpus)
        .context("starting the ioreq server")?;
    let r2 = ram.clone();
    server.set_invalidate_hook(Box::new(move || r2.invalidate()));
    for (bus, is_mmio) in [(&machine.pio, false), (&machine.mmio, true)] {
        bus.set_listener(Arc::new(RangeClaims { dm: dm.clone(), domid, id: server.id(), is_mmio }));
    }
    for devfn in machine.pci_devfns() {
        server
            .register_pci(PciSbdf(u32::from(devfn)))
            .with_context(|| format!("claiming PCI 00:{:02x}.{}", devfn >> 3, devfn & 7))?;
    }
    set_nonblocking(evtchn.fd())?;

    // A restricted device model keeps no xenstore connection: ours is a dom0 socket that
    // xentoolcore cannot restrict, and libxl learns readiness over QMP (`-S` + query-status) then.
    let mut xs = if opts.restrict { None } else { Some(XsClient::open().context("connecting to xenstore")?) };

    let mut dispatcher =
        XenQmp::new(qmp::Control::new(&machine, platform.clone(), run_state, ram.clone(), &cfg, &opts));
    let mut monitors = Vec::new();
    for q in &opts.qmp {
        let l = match &q.endpoint {
            SocketEndpoint::Path(p) => {
                QmpListener::bind(p).with_context(|| format!("QMP socket {}", p.display()))?
            }
            SocketEndpoint::Fd(fd) => {
                QmpListener::from_inherited_fd(*fd).with_context(|| format!("QMP fd {fd}"))?
            }
        };
        monitors.push(QmpServer::new(l, dispatcher.version()));
    }

    deprivilege(&dm, &evtchn, &fmem, domid, &opts)?;

    log::info!("ready: ioreq server {} for domain {domid}", server.id());

    // Buffered (posted) writes run on this thread; each vCPU's synchronous requests on its own
    // worker, so one vCPU's slow disk request does not hold up another vCPU's I/O.
    let mut handler = handler::MachineIo { machine: machine.clone() };
    let m2 = machine.clone();
    let p2 = platform.clone();
    let mut workers = VcpuWorkers::with_handler(
        opts.max_vcpus,
        move |_vcpu| handler::MachineIo { machine: m2.clone() },
        ram.clone(),
    )
    .with_after_answer(Arc::new(move || p2.enter_pending_suspend()));
    let inline = opts.max_vcpus == 1;
    let mut buffered_due: Option<Instant> = None;
    let mut announced_running = false;
    loop {
        // `running` in xenstore once the VM runs: at once, or after QMP `cont` with `-S`.
        if !announced_running && dispatcher.ctl().run_state() == qmp::RunState::Running {
            record_running(&mut xs, domid)?;
            announced_running = true;
        }
        let mut fds = vec![
            libc::pollfd { fd: sigfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: evtchn.fd(), events: libc::POLLIN, revents: 0 },
        ];
        for m in &monitors {
            fds.push(libc::pollfd { fd: m.listener_fd(), events: libc::POLLIN, revents: 0 });
            if let Some(fd) = m.connection_fd() {
                let ev = libc::POLLIN | if m.wants_write() { libc::POLLOUT } else { 0 };
                fds.push(libc::pollfd { fd, events: ev, revents: 0 });
            }
        }
        let timeout =
            buffered_due.map_or(-1, |t| t.saturating_duration_since(Instant::now()).as_millis() as i32);
        // SAFETY: `fds` is a live, correctly sized array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll: {e}");
        }
        if fds[0].revents != 0 {
            let sig = signals::read(&sigfd);
            log::info!("signal {sig}: stopping");
            break;
        }
        if fds[1].revents != 0 || buffered_due.is_some_and(|t| t <= Instant::now()) {
            buffered_due = None;
            if fds[1].revents == 0 {
                if let Some(p) = server.buffered_port() {
                    if let EventOutcome::Buffered(s) = server.on_event(p, &mut handler, &*ram)? {
                        if s.more {
                            buffered_due = Some(Instant::now() + BUFFERED_POLL);
                        }
                    }
                }
            }
            while let Some(ev) = server.take_pending(&mut handler, &*ram)? {
                let out = match ev {
                    // With one vCPU there is no other vCPU to hold up: serve inline and save
                    // the two thread hand-offs per request.
                    Event::Request(f) if inline => f.run(&mut handler, &*ram)?,
                    Event::Request(f) => {
                        workers.dispatch(f);
                        continue;
                    }
                    Event::Done(out) => out,
                };
                match out {
                    EventOutcome::Buffered(s) if s.more => {
                        buffered_due = Some(Instant::now() + BUFFERED_POLL)
                    }
                    EventOutcome::StateChanged { vcpu, state } => slot_moved(vcpu, state),
                    _ => {}
                }
            }
        }
        // Requests served on this thread (inline, buffered, or run here because no worker could
        // take one) have all been answered by now; workers use their after-answer hook.
        platform.enter_pending_suspend();
        for r in workers.reports() {
            match r {
                WorkerReport::StateChanged { vcpu, state } => slot_moved(vcpu, state),
                other => log::error!("ioreq worker: {other:?}"),
            }
        }
        for m in monitors.iter_mut() {
            if let Err(e) = m.service(&mut dispatcher) {
                log::warn!("QMP listener: {e}");
            }
        }
    }

    drop(dispatcher);
    workers.shutdown();
    server.teardown();
    machine.shutdown();
    Ok(0)
}

/// `running` in `/local/domain/0/device-model/<domid>/state`: what libxl waits for (60 s).
/// Without a xenstore connection (restricted mode) libxl learns it over QMP instead.
fn record_running(xs: &mut Option<XsClient>, domid: Domid) -> Result<()> {
    let Some(c) = xs.as_mut() else { return Ok(()) };
    let path = format!("/local/domain/0/device-model/{domid}/state");
    c.write(&path, b"running").with_context(|| format!("writing {path}"))
}

/// Xen or the guest broke the ioreq protocol (QEMU destroys the domain here; we log it).
fn slot_moved(vcpu: u32, state: u8) {
    log::error!("vCPU {vcpu}: ioreq slot moved to state {state} while in process");
}

fn deprivilege(
    dm: &Arc<Dm>,
    evtchn: &Arc<XenEventChannels>,
    fmem: &Arc<XenForeignMemory>,
    domid: Domid,
    opts: &config::XenOpts,
) -> Result<()> {
    use hvmdm_sandbox::{Policy, RunAs as SbRunAs, SeccompLevel};
    use hvmdm_toolstack::argv::RunAs;
    use hvmdm_xen::foreign::ForeignMemory;
    if opts.restrict {
        // `-xen-domid-restrict`: every Xen handle may only act on this domain from now on.
        dm.restrict(domid).context("restricting the device-model handle")?;
        evtchn.restrict(domid).context("restricting the event-channel handle")?;
        fmem.restrict(domid).context("restricting the foreign-memory handle")?;
    }
    let policy = Policy {
        chroot: opts.chroot.clone(),
        runas: opts.runas.as_ref().map(|r| match r {
            RunAs::User(u) => SbRunAs::User(u.clone()),
            RunAs::Ids { uid, gid } => SbRunAs::Ids { uid: *uid, gid: *gid },
        }),
        rlimits: true,
        seccomp: opts.seccomp.then_some(SeccompLevel::Errno),
        ..Policy::default()
    };
    let applied = hvmdm_sandbox::apply(&policy).context("deprivileging")?;
    log::info!(
        "deprivileged: xen handles {}, chroot {:?}, user {:?}, seccomp {:?}",
        if opts.restrict { "restricted to the domain" } else { "unrestricted" },
        applied.chroot,
        applied.credentials,
        applied.seccomp
    );
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own through the event-channel handle; no pointers involved.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        bail!("event channel fd: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

mod signals {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use anyhow::{bail, Result};

    pub fn block_and_open(sigs: &[libc::c_int]) -> Result<OwnedFd> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for all calls below.
        unsafe {
            libc::sigemptyset(&mut set);
            for &s in sigs {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: valid set pointer; the old mask is not needed.
        if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
            bail!("pthread_sigmask failed");
        }
        // SAFETY: valid set pointer; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            bail!("signalfd: {}", std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The number of the signal that made the fd readable (0 if none could be read).
    pub fn read(fd: &OwnedFd) -> u32 {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `len` bytes into `info`, which is `len` bytes long.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), len) };
        if n as usize == len {
            info.ssi_signo
        } else {
            0
        }
    }
}
