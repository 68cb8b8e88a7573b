//! PC chipset I/O devices that are not PCI functions themselves: the MC146818 RTC/CMOS, the
//! i8042 keyboard controller, the PIIX4 power-management I/O blocks (PM1/PM timer, GPE0, APM),
//! port 0x92, the firmware debug console and the POST code port.
//!
//! Every device is a [`BusDevice`](crate::bus::BusDevice); each documents the regions the machine
//! must insert (region id, base port, length, [`AccessRules`](crate::bus::AccessRules)) as
//! associated constants, so the machine assembly does not have to repeat the numbers.
//!
//! Backend notes: on Xen the hypervisor emulates the RTC (CMOS indexes 0..13), the PM timer and
//! PM1a_STS/EN and port 0xE9 itself, so [`Cmos`] and [`Piix4Pm`] have a Xen mode that serves only
//! what Xen forwards.

mod cmos;
mod hotplug;
mod i8042;
mod misc;
mod pm;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

pub use cmos::{Cmos, CmosConfig};
pub use hotplug::{CpuHotplugBitmap, PciHotplug};
pub use i8042::I8042;
pub use misc::{DebugCon, PostCode, ResetPort92};
pub use pm::Piix4Pm;

/// Errors of the chipset configuration API (never of guest accesses).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChipsetError {
    #[error("boot order {0:?}: at most 3 devices on a PC")]
    BootOrderTooLong(String),
    #[error("boot order {order:?}: unknown boot device {dev:?} (use a, b, c, d or n)")]
    BadBootDevice { order: String, dev: char },
}

/// A clock returning a duration since some fixed origin. Injected so tests control time.
/// For the RTC the origin is the Unix epoch (UTC); for the PM timer any fixed point.
pub type ClockFn = Arc<dyn Fn() -> Duration + Send + Sync>;

/// Host wall-clock time since the Unix epoch (UTC).
pub fn host_wall_clock() -> ClockFn {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// Host monotonic clock, counted from the moment this function was called.
pub fn host_monotonic_clock() -> ClockFn {
    let origin = Instant::now();
    Arc::new(move || origin.elapsed())
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::ClockFn;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A clock tests move by hand (nanoseconds since origin).
    #[derive(Clone, Default)]
    pub struct FakeClock(pub Arc<AtomicU64>);

    impl FakeClock {
        pub fn at(d: Duration) -> Self {
            let c = FakeClock::default();
            c.set(d);
            c
        }
        pub fn set(&self, d: Duration) {
            self.0.store(d.as_nanos() as u64, Ordering::SeqCst);
        }
        pub fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
        pub fn clock(&self) -> ClockFn {
            let a = self.0.clone();
            Arc::new(move || Duration::from_nanos(a.load(Ordering::SeqCst)))
        }
    }
}
