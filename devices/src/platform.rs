//! System-level requests devices make of the backend (reset, power off, sleep) and the hooks the
//! backend gives devices for things that change guest memory layout (PAM shadowing).

use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// 0xCF9 / port 0x92 / i8042 0xFE / ACPI reset register: reboot the guest.
    Reset,
    /// ACPI S5 (SLP_TYP 0 + SLP_EN): power off.
    PowerOff,
    /// ACPI S3 request.
    Suspend,
}

pub trait PlatformControl: Send + Sync {
    fn request(&self, event: SystemEvent);
}

/// PAM attribute of one segment of 0xC0000..0xFFFFF (i440FX PAM nibble, bits RE=0, WE=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PamAttr {
    /// Reads come from RAM (else from ROM/PCI).
    pub read_ram: bool,
    /// Writes go to RAM (else to ROM/PCI, i.e. dropped).
    pub write_ram: bool,
}

/// The backend maps 0xC0000..0xFFFFF according to PAM. Segments: index 0 = 0xF0000..0xFFFFF
/// (64 KiB), indices 1..=12 = 16 KiB segments from 0xC0000 upwards.
pub trait ShadowControl: Send + Sync {
    fn set_pam(&self, segment: usize, attr: PamAttr);
}

/// Start and length of PAM segment `i` (see [`ShadowControl`]).
pub fn pam_segment(i: usize) -> (u64, u64) {
    if i == 0 {
        (0xF0000, 0x10000)
    } else {
        (0xC0000 + (i as u64 - 1) * 0x4000, 0x4000)
    }
}

/// Records requests; for unit tests.
#[derive(Default, Debug)]
pub struct RecordingPlatform {
    pub events: Mutex<Vec<SystemEvent>>,
    pub pam: Mutex<Vec<(usize, PamAttr)>>,
}

impl PlatformControl for RecordingPlatform {
    fn request(&self, event: SystemEvent) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

impl ShadowControl for RecordingPlatform {
    fn set_pam(&self, segment: usize, attr: PamAttr) {
        self.pam.lock().unwrap_or_else(|p| p.into_inner()).push((segment, attr));
    }
}
