//! The legacy ACPI hotplug register blocks hvmloader's DSDT (libacpi, `--dm-version qemu-xen`)
//! reads: the CPU present bitmap at 0xAF00 (`PRST`, GPE0 bit 2) and the PCI hotplug registers at
//! 0xAE00 (`PCIU`, `PCID`, `B0EJ`, `B0RM`, GPE0 bit 1). Raising the GPE is the caller's job
//! (through [`super::Piix4Pm::set_gpe_status`]) so this block stays a plain register file.

use crate::bus::{AccessRules, IoResult, RegionId};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

/// The CPU present bitmap: byte `n / 8`, bit `n % 8` set while vCPU `n` is present. Reads past
/// the last vCPU return 0; writes are ignored (the legacy interface has no writable bits; QEMU's
/// switch to its newer CPU hotplug interface does not exist on Xen).
#[derive(Debug)]
pub struct CpuHotplugBitmap {
    bits: [u8; Self::LEN as usize],
    max_cpus: u32,
    boot_cpus: u32,
}

impl CpuHotplugBitmap {
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0xaf00;
    /// QEMU's legacy region is 32 bytes; the DSDT reads the first 16 (128 vCPUs).
    pub const LEN: u64 = 32;
    /// Any width, delivered as bytes (seed 001: the guest's DWORD read must see 4 real bytes).
    pub const RULES: AccessRules = AccessRules::BYTES;
    /// GPE0 status bit the DSDT's `_E02` handles.
    pub const GPE_BIT: u8 = 2;

    /// `boot_cpus` of `max_cpus` vCPUs are present at power-on.
    pub fn new(boot_cpus: u32, max_cpus: u32) -> Self {
        let max_cpus = max_cpus.min(Self::LEN as u32 * 8);
        let mut s = CpuHotplugBitmap { bits: [0; Self::LEN as usize], max_cpus, boot_cpus };
        s.reset();
        s
    }

    /// Power-on state: the boot vCPUs present (hot-added vCPUs are gone after a reboot, as with
    /// QEMU, whose DSDT then sees them absent until libxl adds them again).
    pub fn reset(&mut self) {
        self.bits = [0; Self::LEN as usize];
        for n in 0..self.boot_cpus.min(self.max_cpus) {
            self.bits[(n / 8) as usize] |= 1 << (n % 8);
        }
    }

    /// Marks vCPU `n` present. Returns true if that changed the bitmap (raise the GPE then);
    /// false if it was present already or `n` is beyond the maximum.
    pub fn plug(&mut self, n: u32) -> bool {
        if n >= self.max_cpus {
            return false;
        }
        let (byte, bit) = ((n / 8) as usize, 1u8 << (n % 8));
        let was = self.bits[byte] & bit != 0;
        self.bits[byte] |= bit;
        !was
    }

    pub fn is_present(&self, n: u32) -> bool {
        n < self.max_cpus && self.bits[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    /// Present vCPU indexes, ascending.
    pub fn present(&self) -> Vec<u32> {
        (0..self.max_cpus).filter(|&n| self.is_present(n)).collect()
    }
}

impl crate::bus::BusDevice for CpuHotplugBitmap {
    fn read(&mut self, _region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        data.fill(0);
        if let (Some(b), Some(v)) = (data.first_mut(), self.bits.get(offset as usize)) {
            *b = *v;
        }
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, offset: u64, _data: &[u8]) -> IoResult {
        warn_limited!("cpu-hotplug-write", "CPU hotplug bitmap: write at +{offset:#x} ignored (read-only)");
        IoResult::Done
    }
}

/// The legacy PCI hotplug block of bus 0 (4 DWORD registers).
#[derive(Debug)]
pub struct PciHotplug {
    /// Slots with a device inserted since the guest last looked (`PCIU`).
    up: u32,
    /// Slots whose device should be removed (`PCID`).
    down: u32,
    /// Slots occupied by built-in devices that can never be ejected.
    fixed: u32,
    /// Slots that currently hold a hot-pluggable device.
    plugged: u32,
    /// Slots the guest asked to eject, for the machine to act on.
    ejected: u32,
}

impl PciHotplug {
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0xae00;
    pub const LEN: u64 = 0x10;
    pub const RULES: AccessRules = AccessRules::new(1, 4, 4, 4);
    pub const GPE_BIT: u8 = 1;

    const PCIU: u64 = 0x0;
    const PCID: u64 = 0x4;
    const B0EJ: u64 = 0x8;
    const B0RM: u64 = 0xc;

    /// `fixed_slots`: bit n set when slot n holds a built-in device (slot 0 is always fixed).
    pub fn new(fixed_slots: u32) -> Self {
        PciHotplug { up: 0, down: 0, fixed: fixed_slots | 1, plugged: 0, ejected: 0 }
    }

    pub fn reset(&mut self) {
        self.up = 0;
        self.down = 0;
        self.ejected = 0;
    }

    /// A device was hot-added in `slot`; returns true if the GPE should be raised.
    pub fn plug(&mut self, slot: u8) -> bool {
        let Some(bit) = self.free_slot_bit(slot) else { return false };
        self.plugged |= bit;
        self.up |= bit;
        self.down &= !bit;
        true
    }

    /// Asks the guest to release the device in `slot`; returns true if the GPE should be raised.
    pub fn request_unplug(&mut self, slot: u8) -> bool {
        let Some(bit) = self.free_slot_bit(slot) else { return false };
        if self.plugged & bit == 0 {
            return false;
        }
        self.down |= bit;
        self.up &= !bit;
        true
    }

    /// Slots the guest ejected since the last call (the machine removes those devices).
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.ejected)
    }

    fn free_slot_bit(&self, slot: u8) -> Option<u32> {
        let bit = 1u32.checked_shl(u32::from(slot))?;
        (slot < 32 && self.fixed & bit == 0).then_some(bit)
    }
}

impl crate::bus::BusDevice for PciHotplug {
    fn read(&mut self, _region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let v = match offset {
            Self::PCIU => self.up,
            Self::PCID => self.down,
            // Every slot without a built-in device may take a hot-plugged one.
            Self::B0RM => !self.fixed,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        if offset == Self::B0EJ {
            let ej = v & self.plugged & !self.fixed;
            if ej != v {
                warn_limited!(
                    "pcihp-eject",
                    "PCI hotplug: eject of non-removable slots {:#x} ignored",
                    v & !ej
                );
            }
            self.plugged &= !ej;
            self.down &= !ej;
            self.ejected |= ej;
        }
        IoResult::Done
    }
}

/// Section "cpu-hotplug", version 1: the present bitmap (hot-added vCPUs survive a restore).
impl Snapshot for CpuHotplugBitmap {
    fn section(&self) -> &'static str {
        "cpu-hotplug"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_raw(&self.bits);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        let bits: [u8; Self::LEN as usize] = r.get_array()?;
        // Bits beyond this machine's maximum mean the stream belongs to another configuration.
        for n in self.max_cpus..Self::LEN as u32 * 8 {
            if bits[(n / 8) as usize] & (1 << (n % 8)) != 0 {
                return Err(r.bad(format!("vCPU {n} present but the maximum is {}", self.max_cpus)));
            }
        }
        Ok(PendingState::new(bits))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        self.bits = state.downcast(self.section())?;
        Ok(())
    }
}

/// Section "pci-hotplug", version 1: up/down/plugged/ejected slot masks.
impl Snapshot for PciHotplug {
    fn section(&self) -> &'static str {
        "pci-hotplug"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        for v in [self.up, self.down, self.plugged, self.ejected] {
            w.put_u32(v);
        }
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        let v = [r.get_u32()?, r.get_u32()?, r.get_u32()?, r.get_u32()?];
        if v.iter().any(|m| m & self.fixed != 0) {
            return Err(r.bad("built-in slot marked hot-plugged"));
        }
        Ok(PendingState::new(v))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let [up, down, plugged, ejected]: [u32; 4] = state.downcast(self.section())?;
        (self.up, self.down, self.plugged, self.ejected) = (up, down, plugged, ejected);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn cpu_bitmap_reports_boot_cpus_and_plugs() {
        let bus = Bus::new("pio");
        let d = Arc::new(Mutex::new(CpuHotplugBitmap::new(2, 12)));
        bus.insert(CpuHotplugBitmap::BASE, CpuHotplugBitmap::LEN, CpuHotplugBitmap::RULES, d.clone(), 0)
            .unwrap();
        let mut v = [0u8; 4];
        bus.read_sync(0xaf00, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0b11);
        assert!(d.lock().unwrap().plug(9));
        assert!(!d.lock().unwrap().plug(9));
        assert!(!d.lock().unwrap().plug(12), "beyond max_cpus");
        bus.read_sync(0xaf00, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0b10_0000_0011);
        assert_eq!(d.lock().unwrap().present(), vec![0, 1, 9]);
        bus.write_sync(0xaf00, &[0]);
        bus.read_sync(0xaf1f, &mut v[..1]);
        assert_eq!(v[0], 0);
        d.lock().unwrap().reset();
        assert_eq!(d.lock().unwrap().present(), vec![0, 1]);
    }

    #[test]
    fn snapshots_round_trip_and_refuse_foreign_state() {
        let mut a = CpuHotplugBitmap::new(1, 8);
        a.plug(5);
        let mut w = SectionWriter::new();
        a.save(&mut w);
        let mut b = CpuHotplugBitmap::new(1, 8);
        b.load(1, &mut SectionReader::new("cpu-hotplug", w.as_bytes())).unwrap();
        assert_eq!(b.present(), vec![0, 5]);
        let mut small = CpuHotplugBitmap::new(1, 4);
        assert!(small.load(1, &mut SectionReader::new("cpu-hotplug", w.as_bytes())).is_err());
        assert_eq!(small.present(), vec![0], "refused state leaves the device alone");

        let mut p = PciHotplug::new(0b111);
        p.plug(4);
        let mut w = SectionWriter::new();
        p.save(&mut w);
        let mut q = PciHotplug::new(0b111);
        q.load(1, &mut SectionReader::new("pci-hotplug", w.as_bytes())).unwrap();
        assert!(q.request_unplug(4));
        let mut strict = PciHotplug::new(0b1_0111);
        assert!(strict.load(1, &mut SectionReader::new("pci-hotplug", w.as_bytes())).is_err());
    }

    #[test]
    fn pci_hotplug_registers() {
        let bus = Bus::new("pio");
        let d = Arc::new(Mutex::new(PciHotplug::new(0b11)));
        bus.insert(PciHotplug::BASE, PciHotplug::LEN, PciHotplug::RULES, d.clone(), 0).unwrap();
        let rd = |off: u64| {
            let mut v = [0u8; 4];
            bus.read_sync(0xae00 + off, &mut v);
            u32::from_le_bytes(v)
        };
        assert_eq!(rd(0xc), !0b11);
        assert!(!d.lock().unwrap().plug(1), "built-in slot");
        assert!(!d.lock().unwrap().plug(40), "no such slot");
        assert!(d.lock().unwrap().plug(5));
        assert_eq!(rd(0), 1 << 5);
        assert!(d.lock().unwrap().request_unplug(5));
        assert_eq!((rd(0), rd(4)), (0, 1 << 5));
        // Guest ejects slot 5 and (wrongly) slot 1.
        bus.write_sync(0xae08, &((1u32 << 5) | 2).to_le_bytes());
        assert_eq!(d.lock().unwrap().take_ejected(), 1 << 5);
        assert_eq!(rd(4), 0);
        assert!(!d.lock().unwrap().request_unplug(5), "already gone");
    }
}
