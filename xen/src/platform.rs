//! The devices' view of the platform on Xen (specs/xen-interfaces.md §4.1 item 8, §7.2):
//! interrupt lines become `set_isa_irq_level` / `set_pci_intx_level` / `set_pci_link_route`
//! device-model calls ([`XenIrq`]), and reset / power-off requests become
//! `xendevicemodel_shutdown` ([`XenPlatform`]); MSIs become `xendevicemodel_inject_msi`. Xen's virtual PIC/IOAPIC does the OR-ing of
//! routed PCI INTx with ISA lines, so no routing happens here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hvmdm_devices::irq::IrqSink;
use hvmdm_devices::platform::{PamAttr, PlatformControl, ShadowControl, SystemEvent};
use hvmdm_devices::warn_limited;

use crate::dm::{DeviceModelOps, Domid, ShutdownReason};
use crate::error::XenError;
use crate::hvmparam::{HvmParams, ACPI_S_STATE};
use crate::ioreq::PciSbdf;
use crate::sys::ioreq::xen_dmop_pci_sbdf;

const ISA_IRQS: usize = 16;
const PCI_SLOTS: usize = 32;
const INTX_PINS: usize = 4;
const PCI_LINKS: u8 = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Last level Xen was told, per line.
#[derive(Debug, Default)]
struct Levels {
    isa: [bool; ISA_IRQS],
    intx: [[bool; INTX_PINS]; PCI_SLOTS],
}

/// [`IrqSink`] over the device-model interface. Only level *changes* reach Xen (each call is a
/// hypercall); a pulse (true, false) on a low line is two changes, so both are sent. A call
/// that fails leaves the recorded level unchanged, so the next request for that level retries.
/// The lock is held across the call so that Xen sees the levels in the order they were set.
pub struct XenIrq<D: DeviceModelOps> {
    dm: Arc<D>,
    domid: Domid,
    levels: Mutex<Levels>,
}

impl<D: DeviceModelOps> std::fmt::Debug for XenIrq<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenIrq").field("domid", &self.domid).finish_non_exhaustive()
    }
}

impl<D: DeviceModelOps> XenIrq<D> {
    pub fn new(dm: Arc<D>, domid: Domid) -> Self {
        XenIrq { dm, domid, levels: Mutex::new(Levels::default()) }
    }

    /// The level Xen was last told for ISA `irq` (false for out-of-range lines).
    pub fn isa_level(&self, irq: u8) -> bool {
        lock(&self.levels).isa.get(usize::from(irq)).copied().unwrap_or(false)
    }

    /// The level Xen was last told for INTx `pin` of bus-0 device `slot`.
    pub fn intx_level(&self, slot: u8, pin: u8) -> bool {
        lock(&self.levels)
            .intx
            .get(usize::from(slot))
            .and_then(|p| p.get(usize::from(pin)))
            .copied()
            .unwrap_or(false)
    }
}

impl<D: DeviceModelOps + Send + Sync> IrqSink for XenIrq<D> {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        let mut l = lock(&self.levels);
        let Some(cur) = l.isa.get_mut(usize::from(irq)) else {
            warn_limited!("xen-irq-isa-range", "ISA IRQ {irq} does not exist (0..15), ignored");
            return;
        };
        if *cur == level {
            return;
        }
        match self.dm.set_isa_irq_level(self.domid, irq, level) {
            Ok(()) => *cur = level,
            Err(e) => warn_limited!(
                format!("xen-irq-isa-{irq}"),
                "set_isa_irq_level({irq}, {level}) for domain {} failed: {e}",
                self.domid
            ),
        }
    }

    fn set_pci_intx(&self, slot: u8, pin: u8, level: bool) {
        let mut l = lock(&self.levels);
        let Some(cur) = l.intx.get_mut(usize::from(slot)).and_then(|p| p.get_mut(usize::from(pin))) else {
            warn_limited!(
                "xen-irq-intx-range",
                "PCI INTx slot {slot} pin {pin} does not exist (slot 0..31, pin 0..3), ignored"
            );
            return;
        };
        if *cur == level {
            return;
        }
        // Bus 0 function 0: Xen only looks at the device number for INTx routing.
        let sbdf = PciSbdf(xen_dmop_pci_sbdf(0, 0, slot, 0));
        match self.dm.set_pci_intx_level(self.domid, sbdf, pin, level) {
            Ok(()) => *cur = level,
            Err(e) => warn_limited!(
                format!("xen-irq-intx-{slot}-{pin}"),
                "set_pci_intx_level(00:{slot:02x}.0, INT{}, {level}) for domain {} failed: {e}",
                char::from(b'A' + pin),
                self.domid
            ),
        }
    }

    fn set_pci_link_route(&self, link: u8, irq: Option<u8>) {
        if link >= PCI_LINKS {
            warn_limited!("xen-irq-link-range", "PCI link {link} does not exist (0..3), ignored");
            return;
        }
        // Xen takes irq 0 as "not routed" (QEMU passes 0 when the PIRQ register's bit 7 is set).
        let raw = match irq {
            None => 0,
            Some(i) if usize::from(i) < ISA_IRQS => i,
            Some(i) => {
                warn_limited!(
                    "xen-irq-link-irq",
                    "PCI link {link} routed to IRQ {i}, not an ISA IRQ: treated as not routed"
                );
                0
            }
        };
        if let Err(e) = self.dm.set_pci_link_route(self.domid, link, raw) {
            warn_limited!(
                format!("xen-irq-link-{link}"),
                "set_pci_link_route({link}, {raw}) for domain {} failed: {e}",
                self.domid
            );
        }
    }

    /// xendevicemodel_inject_msi: Xen's vLAPIC/vMSI takes the message as the guest programmed it.
    fn signal_msi(&self, addr: u64, data: u32) {
        if let Err(e) = self.dm.inject_msi(self.domid, addr, data) {
            warn_limited!(
                "xen-msi",
                "inject_msi({addr:#x}, {data:#x}) for domain {} failed: {e}",
                self.domid
            );
        }
    }
}

/// Called with every request the guest makes (from the vCPU-serving thread).
pub type EventCallback = Box<dyn Fn(SystemEvent) + Send + Sync>;

/// [`PlatformControl`] and [`ShadowControl`] on Xen.
///
/// - Reset → `shutdown(Reboot)`, PowerOff → `shutdown(Poweroff)`; the call is made right away,
///   i.e. while the vCPU's request is still in process, which is also when QEMU makes it (before
///   responding). libxl then destroys or restarts the domain and this process with it. Only the
///   first successful shutdown is sent: Xen keeps the first reason anyway, and a guest hammering
///   0xCF9 must not cause a hypercall per write.
/// - Suspend (ACPI S3) sets `HVM_PARAM_ACPI_S_STATE` = 3 through [`HvmParams`] (given with
///   [`XenPlatform::with_s3`]) once the request is answered ([`XenPlatform::enter_pending_suspend`]): Xen pauses the domain and resets its vCPUs to the reset vector,
///   and the firmware's resume path runs once [`XenPlatform::wakeup`] sets it back to 0 (QMP
///   `system_wakeup`, `xl trigger <d> s3resume`). Without [`HvmParams`] (restricted mode) the
///   request is logged and ignored, and the guest's sleep write has no effect.
/// - PAM: no-op. Xen owns guest RAM (0xC0000-0xFFFFF is plain RAM the toolstack populated) and
///   qemu-xen ignores PAM as well.
///
/// Every request is queued for the main loop ([`XenPlatform::take_events`]) and passed to the
/// optional callback.
pub struct XenPlatform<D: DeviceModelOps> {
    dm: Arc<D>,
    domid: Domid,
    callback: Option<EventCallback>,
    events: Mutex<Vec<SystemEvent>>,
    shutdown_sent: Mutex<Option<ShutdownReason>>,
    params: Option<Arc<dyn HvmParams>>,
    suspended: AtomicBool,
    suspend_pending: AtomicBool,
}

/// Bound on queued, untaken events: a guest can request resets in a loop.
const MAX_QUEUED_EVENTS: usize = 64;

impl<D: DeviceModelOps> std::fmt::Debug for XenPlatform<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenPlatform")
            .field("domid", &self.domid)
            .field("shutdown_sent", &*lock(&self.shutdown_sent))
            .finish_non_exhaustive()
    }
}

impl<D: DeviceModelOps> XenPlatform<D> {
    pub fn new(dm: Arc<D>, domid: Domid) -> Self {
        XenPlatform {
            dm,
            domid,
            callback: None,
            events: Mutex::new(Vec::new()),
            shutdown_sent: Mutex::new(None),
            params: None,
            suspended: AtomicBool::new(false),
            suspend_pending: AtomicBool::new(false),
        }
    }

    /// Enables ACPI S3: suspend and wake-up set `HVM_PARAM_ACPI_S_STATE` through `params`.
    pub fn with_s3(mut self, params: Arc<dyn HvmParams>) -> Self {
        self.params = Some(params);
        self
    }

    /// Whether the guest can be suspended (and so woken): S3 was enabled.
    pub fn can_suspend(&self) -> bool {
        self.params.is_some()
    }

    /// Whether the guest is in S3 (Xen holds the domain until [`XenPlatform::wakeup`]).
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// Leaves S3: `HVM_PARAM_ACPI_S_STATE` = 0, so Xen lets the vCPUs run from the reset
    /// vector into the firmware's resume path. Returns false if the guest was not suspended.
    pub fn wakeup(&self) -> Result<bool, XenError> {
        let Some(p) = &self.params else { return Ok(false) };
        if !self.suspended.load(Ordering::Acquire) {
            return Ok(false);
        }
        p.set_param(self.domid, ACPI_S_STATE, 0)?;
        self.suspended.store(false, Ordering::Release);
        log::info!("domain {}: woken from ACPI S3", self.domid);
        Ok(true)
    }

    /// Enters S3 if the guest asked for it. Call once the request that asked has been
    /// answered (QEMU sets the parameter from its main loop after the ioreq completed, so the
    /// vCPU Xen resets has no request in flight).
    pub fn enter_pending_suspend(&self) {
        if self.suspend_pending.swap(false, Ordering::AcqRel) {
            self.suspend();
        }
    }

    fn suspend(&self) {
        let Some(p) = &self.params else {
            warn_limited!(
                "xen-platform-s3",
                "domain {}: guest requested ACPI S3, unavailable in restricted mode; ignored",
                self.domid
            );
            return;
        };
        if self.suspended.load(Ordering::Acquire) {
            return;
        }
        match p.set_param(self.domid, ACPI_S_STATE, 3) {
            Ok(()) => {
                self.suspended.store(true, Ordering::Release);
                log::info!("domain {}: guest entered ACPI S3", self.domid);
            }
            Err(e) => warn_limited!(
                "xen-platform-s3",
                "domain {}: setting HVM_PARAM_ACPI_S_STATE=3 failed: {e}",
                self.domid
            ),
        }
    }

    /// Like [`XenPlatform::new`], also calling `callback` with every request (e.g. to wake the
    /// main loop).
    pub fn with_callback(dm: Arc<D>, domid: Domid, callback: EventCallback) -> Self {
        XenPlatform { callback: Some(callback), ..Self::new(dm, domid) }
    }

    /// Requests since the last call, oldest first (at most 64 are kept; repeats beyond that are
    /// dropped).
    pub fn take_events(&self) -> Vec<SystemEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// The shutdown reason sent to Xen, if any.
    pub fn shutdown_sent(&self) -> Option<ShutdownReason> {
        *lock(&self.shutdown_sent)
    }

    fn shutdown(&self, reason: ShutdownReason) {
        let mut sent = lock(&self.shutdown_sent);
        if let Some(first) = *sent {
            log::debug!(
                "domain {}: {reason:?} requested after {first:?}; Xen already shutting down",
                self.domid
            );
            return;
        }
        match self.dm.shutdown(self.domid, reason) {
            Ok(()) => {
                log::info!("domain {}: guest requested {reason:?}", self.domid);
                *sent = Some(reason);
            }
            Err(e) => warn_limited!(
                "xen-platform-shutdown",
                "domain {}: shutdown({reason:?}) failed: {e}",
                self.domid
            ),
        }
    }
}

impl<D: DeviceModelOps + Send + Sync> PlatformControl for XenPlatform<D> {
    fn request(&self, event: SystemEvent) {
        match event {
            SystemEvent::Reset => self.shutdown(ShutdownReason::Reboot),
            SystemEvent::PowerOff => self.shutdown(ShutdownReason::Poweroff),
            SystemEvent::Suspend => self.suspend_pending.store(true, Ordering::Release),
        }
        {
            let mut q = lock(&self.events);
            if q.len() < MAX_QUEUED_EVENTS {
                q.push(event);
            }
        }
        if let Some(cb) = &self.callback {
            cb(event);
        }
    }
}

impl<D: DeviceModelOps + Send + Sync> ShadowControl for XenPlatform<D> {
    fn set_pam(&self, segment: usize, attr: PamAttr) {
        // Xen owns the RAM behind 0xC0000-0xFFFFF; like qemu-xen we leave it as it is.
        log::trace!("domain {}: PAM segment {segment} -> {attr:?} (ignored on Xen)", self.domid);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::fake::{FakeCall, FakeXen};

    fn fake() -> Arc<FakeXen> {
        Arc::new(FakeXen::new(1, 0))
    }

    #[test]
    fn isa_levels_forward_changes_only() {
        let f = fake();
        let irq = XenIrq::new(f.clone(), 5);
        let _: Arc<dyn IrqSink> = Arc::new(XenIrq::new(f.clone(), 5));
        irq.set_isa_irq(9, true);
        irq.set_isa_irq(9, true);
        irq.set_isa_irq(9, false);
        irq.set_isa_irq(9, false);
        irq.set_isa_irq(4, false);
        // A pulse on a low line: two calls.
        irq.set_isa_irq(1, true);
        irq.set_isa_irq(1, false);
        assert_eq!(
            f.calls(),
            vec![
                FakeCall::IsaIrq { irq: 9, level: true },
                FakeCall::IsaIrq { irq: 9, level: false },
                FakeCall::IsaIrq { irq: 1, level: true },
                FakeCall::IsaIrq { irq: 1, level: false },
            ]
        );
        // Out of range: ignored.
        f.clear_calls();
        irq.set_isa_irq(16, true);
        irq.set_isa_irq(255, true);
        assert!(f.calls().is_empty());
        assert!(!irq.isa_level(255));
    }

    #[test]
    fn failed_call_is_retried_on_next_request() {
        let f = fake();
        let irq = XenIrq::new(f.clone(), 5);
        f.fail_next("set_isa_irq_level", libc::EIO);
        irq.set_isa_irq(3, true);
        assert!(!irq.isa_level(3));
        irq.set_isa_irq(3, true);
        assert!(irq.isa_level(3));
        assert_eq!(f.calls(), vec![FakeCall::IsaIrq { irq: 3, level: true }]);
    }

    #[test]
    fn intx_uses_bus0_function0_and_tracks_per_pin() {
        let f = fake();
        let irq = XenIrq::new(f.clone(), 5);
        irq.set_pci_intx(3, 0, true);
        irq.set_pci_intx(3, 1, true);
        irq.set_pci_intx(3, 0, true);
        irq.set_pci_intx(4, 0, true);
        irq.set_pci_intx(3, 0, false);
        irq.set_pci_intx(32, 0, true);
        irq.set_pci_intx(3, 4, true);
        let s = |slot: u8| PciSbdf(u32::from(slot) << 3);
        assert_eq!(
            f.calls(),
            vec![
                FakeCall::PciIntx { sbdf: s(3), intx: 0, level: true },
                FakeCall::PciIntx { sbdf: s(3), intx: 1, level: true },
                FakeCall::PciIntx { sbdf: s(4), intx: 0, level: true },
                FakeCall::PciIntx { sbdf: s(3), intx: 0, level: false },
            ]
        );
        assert!(irq.intx_level(3, 1) && !irq.intx_level(3, 0) && !irq.intx_level(40, 9));
        let sb = s(3);
        assert_eq!((sb.segment(), sb.bus(), sb.device(), sb.function()), (0, 0, 3, 0));
    }

    #[test]
    fn msi_is_injected_and_failures_are_logged() {
        let f = fake();
        let irq = XenIrq::new(f.clone(), 5);
        irq.signal_msi(0xfee0_1000, 0x4031);
        assert_eq!(f.calls(), vec![FakeCall::Msi { addr: 0xfee0_1000, data: 0x4031 }]);
        f.clear_calls();
        f.fail_next("inject_msi", libc::EINVAL);
        irq.signal_msi(0xfee0_0000, 0x30);
        irq.signal_msi(0xfee0_0000, 0x30);
        assert_eq!(f.calls(), vec![FakeCall::Msi { addr: 0xfee0_0000, data: 0x30 }]);
    }

    #[test]
    fn link_routes() {
        let f = fake();
        let irq = XenIrq::new(f.clone(), 5);
        irq.set_pci_link_route(0, Some(11));
        irq.set_pci_link_route(0, Some(11));
        irq.set_pci_link_route(3, None);
        irq.set_pci_link_route(1, Some(200));
        irq.set_pci_link_route(4, Some(5));
        f.fail_next("set_pci_link_route", libc::EINVAL);
        irq.set_pci_link_route(2, Some(10));
        assert_eq!(
            f.calls(),
            vec![
                FakeCall::LinkRoute { link: 0, irq: 11 },
                FakeCall::LinkRoute { link: 0, irq: 11 },
                FakeCall::LinkRoute { link: 3, irq: 0 },
                FakeCall::LinkRoute { link: 1, irq: 0 },
            ]
        );
    }

    #[test]
    fn reset_and_poweroff_shut_down_once() {
        let f = fake();
        let p = XenPlatform::new(f.clone(), 5);
        let _: Arc<dyn PlatformControl> = Arc::new(XenPlatform::new(f.clone(), 5));
        p.request(SystemEvent::Reset);
        p.request(SystemEvent::Reset);
        p.request(SystemEvent::PowerOff);
        assert_eq!(f.calls(), vec![FakeCall::Shutdown(ShutdownReason::Reboot)]);
        assert_eq!(p.shutdown_sent(), Some(ShutdownReason::Reboot));
        assert_eq!(p.take_events(), vec![SystemEvent::Reset, SystemEvent::Reset, SystemEvent::PowerOff]);
        assert!(p.take_events().is_empty());

        let f = fake();
        let p = XenPlatform::new(f.clone(), 5);
        f.fail_next("shutdown", libc::ESRCH);
        p.request(SystemEvent::PowerOff);
        assert_eq!(p.shutdown_sent(), None);
        p.request(SystemEvent::PowerOff);
        assert_eq!(f.calls(), vec![FakeCall::Shutdown(ShutdownReason::Poweroff)]);
        assert_eq!(p.shutdown_sent(), Some(ShutdownReason::Poweroff));
    }

    /// S3: the parameter is set only once the request was answered, wake-up clears it, and a
    /// failed call leaves the guest running (and wakeable never).
    #[test]
    fn s3_sets_the_acpi_s_state_param_after_the_answer() {
        let f = fake();
        let p = XenPlatform::new(f.clone(), 5).with_s3(f.clone());
        assert!(p.can_suspend());
        assert_eq!(p.wakeup(), Ok(false), "not suspended");
        p.request(SystemEvent::Suspend);
        assert!(f.calls().is_empty(), "nothing before the vCPU has its answer");
        assert!(!p.is_suspended());
        p.enter_pending_suspend();
        p.enter_pending_suspend();
        assert!(p.is_suspended());
        assert_eq!(f.calls(), vec![FakeCall::SetParam { index: ACPI_S_STATE, value: 3 }]);
        // A second sleep write while suspended changes nothing.
        p.request(SystemEvent::Suspend);
        p.enter_pending_suspend();
        assert_eq!(f.calls().len(), 1);
        f.fail_next("set_param", libc::EPERM);
        assert!(p.wakeup().is_err());
        assert!(p.is_suspended(), "still asleep after a failed wake-up");
        assert_eq!(p.wakeup(), Ok(true));
        assert!(!p.is_suspended());
        assert_eq!(f.calls().last(), Some(&FakeCall::SetParam { index: ACPI_S_STATE, value: 0 }));

        f.clear_calls();
        f.fail_next("set_param", libc::EPERM);
        p.request(SystemEvent::Suspend);
        p.enter_pending_suspend();
        assert!(!p.is_suspended());
        assert!(f.calls().is_empty());
    }

    #[test]
    fn suspend_and_pam_make_no_xen_calls() {
        let f = fake();
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        let p = XenPlatform::with_callback(
            f.clone(),
            5,
            Box::new(move |e| {
                assert_eq!(e, SystemEvent::Suspend);
                s2.fetch_add(1, Ordering::Relaxed);
            }),
        );
        p.request(SystemEvent::Suspend);
        p.set_pam(0, PamAttr { read_ram: true, write_ram: true });
        assert!(f.calls().is_empty());
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        assert_eq!(p.take_events(), vec![SystemEvent::Suspend]);
        assert_eq!(p.shutdown_sent(), None);
    }

    #[test]
    fn event_queue_is_bounded() {
        let f = fake();
        let p = XenPlatform::new(f.clone(), 5);
        for _ in 0..1000 {
            p.request(SystemEvent::Reset);
        }
        assert_eq!(p.take_events().len(), MAX_QUEUED_EVENTS);
        assert_eq!(f.calls().len(), 1);
    }
}
