//! PIIX4 power management I/O (function 00:01.3's I/O side): the PM1a event/control block and the
//! ACPI PM timer at the firmware-programmed PMBA, GPE0 at 0xafe0 and the APM ports 0xb2/0xb3.
//! The SCI is ISA IRQ 9, level.
//!
//! The PCI function (config space, PMBA at 0x40, PMREGMISC at 0x80) belongs to the PCI code; it
//! inserts/removes region [`Piix4Pm::REGION_PM`] when the guest programs and enables PMBA.
//!
//! Xen mode: after hvmloader sets `HVM_PARAM_ACPI_IOPORTS_LOCATION`, Xen emulates PM1a_STS/EN
//! (+0..+3) and the PM timer (+8..+11) itself; we serve only PM1a_CNT (+4..+5), and every other
//! offset of the block reads 0xff and ignores writes.
//!
//! Not modelled: SMI (there is no SMM; 0xb2 values other than 0xf0/0xf1 are just stored), S4
//! (SLP_TYP 2 is ignored, like every type other than 0 and 1), GLBCTL at +0x28, and the PM timer
//! overflow *interrupt* is only evaluated lazily (on accesses and on [`Piix4Pm::tick`]); no OS we
//! target enables TMR_EN.

use std::sync::Arc;

use super::{host_monotonic_clock, ClockFn};
use crate::bus::{AccessRules, IoResult, RegionId};
use crate::irq::IsaIrq;
use crate::platform::{PlatformControl, SystemEvent};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

// PM1a_STS / PM1a_EN bits.
pub const PM1_TMR: u16 = 1 << 0;
pub const PM1_GBL: u16 = 1 << 5;
pub const PM1_PWRBTN: u16 = 1 << 8;
pub const PM1_RTC: u16 = 1 << 10;
pub const PM1_WAK: u16 = 1 << 15;
/// Events that assert the SCI when both status and enable bits are set.
const PM1_SCI_EVENTS: u16 = PM1_TMR | PM1_GBL | PM1_PWRBTN | PM1_RTC;

// PM1a_CNT bits.
pub const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_TYP_SHIFT: u16 = 10;
const CNT_SLP_EN: u16 = 1 << 13;

/// APM control values (FADT ACPI_ENABLE / ACPI_DISABLE).
pub const APM_ACPI_ENABLE: u8 = 0xf1;
pub const APM_ACPI_DISABLE: u8 = 0xf0;

/// ACPI PM timer frequency (`PM_TIMER_FREQUENCY`).
pub const PM_TIMER_HZ: u128 = 3_579_545;

const OFF_STS: u64 = 0;
const OFF_EN: u64 = 2;
const OFF_CNT: u64 = 4;
const OFF_TMR: u64 = 8;

/// The PIIX4 PM I/O device (three regions; see the `REGION_*` constants).
pub struct Piix4Pm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    apmc: u8,
    apms: u8,
    xen: bool,
    sci_en_at_reset: bool,
    sci: IsaIrq,
    sci_level: bool,
    platform: Arc<dyn PlatformControl>,
    clock: ClockFn,
    /// `ticks >> 23` at the last timer evaluation; a change means bit 23 toggled.
    tmr_epoch: u64,
}

impl std::fmt::Debug for Piix4Pm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piix4Pm")
            .field("pm1_sts", &self.pm1_sts)
            .field("pm1_en", &self.pm1_en)
            .field("pm1_cnt", &self.pm1_cnt)
            .field("gpe_sts", &self.gpe_sts)
            .field("gpe_en", &self.gpe_en)
            .finish()
    }
}

/// Value and byte mask of the part of an access (`off`, `data`) that falls into the register at
/// `reg_off` of `reg_len` bytes, in the register's own bit positions.
fn slice_write(reg_off: u64, reg_len: u64, off: u64, data: &[u8]) -> Option<(u32, u32)> {
    let (mut val, mut mask) = (0u32, 0u32);
    for (i, b) in data.iter().enumerate() {
        let a = off + i as u64;
        if a >= reg_off && a < reg_off + reg_len {
            let sh = (a - reg_off) * 8;
            val |= u32::from(*b) << sh;
            mask |= 0xff << sh;
        }
    }
    (mask != 0).then_some((val, mask))
}

impl Piix4Pm {
    /// Region 0: the 64-byte PM I/O block at PMBA (SeaBIOS 0x600, OVMF and hvmloader 0xb000),
    /// mapped by the PCI PM function. One region holds 16-bit PM1 registers and the 32-bit timer,
    /// so it accepts any aligned 1, 2 or 4-byte access and decodes bytes itself: partial reads
    /// return the addressed bytes, partial writes merge (STS is write-1-to-clear per byte).
    /// This is a superset of QEMU's rules (PM1 valid 1-2 impl 2, timer valid 1-4 impl 4).
    pub const REGION_PM: RegionId = 0;
    pub const PM_LEN: u64 = 64;
    pub const PM_RULES: AccessRules = AccessRules::DWORD_ANY;
    /// Region 1: GPE0 at 0xafe0, 4 bytes (STS 0xafe0-1, EN 0xafe2-3), split into bytes.
    pub const REGION_GPE0: RegionId = 1;
    pub const GPE0_BASE: u64 = 0xafe0;
    pub const GPE0_LEN: u64 = 4;
    pub const GPE0_RULES: AccessRules = AccessRules::BYTES;
    /// Region 2: APM control 0xb2 and status (scratch) 0xb3, byte registers.
    pub const REGION_APM: RegionId = 2;
    pub const APM_BASE: u64 = 0xb2;
    pub const APM_LEN: u64 = 2;
    pub const APM_RULES: AccessRules = AccessRules::BYTES;
    /// The SCI.
    pub const SCI_IRQ: u8 = 9;

    /// `sci` is ISA IRQ 9 (level); `platform` receives power-off/suspend requests. `xen`
    /// selects Xen mode (see the module docs). Uses the host monotonic clock for the PM timer.
    pub fn new(sci: IsaIrq, platform: Arc<dyn PlatformControl>, xen: bool) -> Self {
        Self::with_clock(sci, platform, xen, host_monotonic_clock())
    }

    /// As [`Piix4Pm::new`] with an injected monotonic clock.
    pub fn with_clock(sci: IsaIrq, platform: Arc<dyn PlatformControl>, xen: bool, clock: ClockFn) -> Self {
        let mut pm = Piix4Pm {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            gpe_sts: 0,
            gpe_en: 0,
            apmc: 0,
            apms: 0,
            xen,
            sci_en_at_reset: false,
            sci,
            sci_level: false,
            platform,
            clock,
            tmr_epoch: 0,
        };
        pm.reset();
        pm
    }

    /// Makes SCI_EN come up set after reset (QEMU's "ACPI only" machines, whose FADT has
    /// SMI_CMD = 0). Default off: firmware or the OS enables ACPI through 0xb2.
    pub fn set_sci_enabled_at_reset(&mut self, on: bool) {
        self.sci_en_at_reset = on;
        if on {
            self.pm1_cnt |= CNT_SCI_EN;
        }
    }

    /// Power-on state: all status/enable/control bits clear (SCI_EN per
    /// [`Piix4Pm::set_sci_enabled_at_reset`]), SCI lowered. The timer keeps counting.
    pub fn reset(&mut self) {
        self.pm1_sts = 0;
        self.pm1_en = 0;
        self.pm1_cnt = if self.sci_en_at_reset { CNT_SCI_EN } else { 0 };
        self.gpe_sts = 0;
        self.gpe_en = 0;
        self.apmc = 0;
        self.apms = 0;
        self.tmr_epoch = self.ticks() >> 23;
        self.update_sci();
    }

    /// Whether the OS/firmware has enabled ACPI mode (PM1a_CNT.SCI_EN).
    pub fn sci_enabled(&self) -> bool {
        self.pm1_cnt & CNT_SCI_EN != 0
    }

    /// The power button was pressed: sets PWRBTN_STS and raises the SCI if PWRBTN_EN.
    /// In Xen mode PM1a_STS is Xen's (use `xl trigger <dom> power`), so this only logs.
    pub fn press_power_button(&mut self) {
        if self.xen {
            log::warn!("pm: power button under Xen is the hypervisor's (xl trigger power); ignored");
            return;
        }
        self.pm1_sts |= PM1_PWRBTN;
        self.update_sci();
    }

    /// Sets GPE0_STS bit `bit` (0..15), e.g. bit 1 PCI hotplug, bit 2 CPU hotplug, and raises
    /// the SCI if enabled in GPE0_EN. Out-of-range bits are ignored.
    pub fn set_gpe_status(&mut self, bit: u8) {
        if bit < 16 {
            self.gpe_sts |= 1 << bit;
            self.update_sci();
        } else {
            log::warn!("pm: GPE0 bit {bit} does not exist");
        }
    }

    /// Marks a resume from S3: sets WAK_STS (call after the wake-up reset).
    pub fn notify_wakeup(&mut self) {
        if !self.xen {
            self.pm1_sts |= PM1_WAK;
        }
    }

    /// Re-evaluates TMR_STS (bit 23 of the PM timer toggled) and the SCI. Accesses do this
    /// anyway; the machine may call it periodically if a guest relies on TMR_EN interrupts.
    pub fn tick(&mut self) {
        self.refresh_timer_status();
        self.update_sci();
    }

    fn ticks(&self) -> u64 {
        let ns = (self.clock)().as_nanos();
        (ns * PM_TIMER_HZ / 1_000_000_000) as u64
    }

    /// The 24-bit PM timer value.
    pub fn timer(&self) -> u32 {
        (self.ticks() & 0x00ff_ffff) as u32
    }

    fn refresh_timer_status(&mut self) {
        if self.xen {
            return;
        }
        let epoch = self.ticks() >> 23;
        if epoch != self.tmr_epoch {
            self.tmr_epoch = epoch;
            self.pm1_sts |= PM1_TMR;
        }
    }

    fn update_sci(&mut self) {
        let pm1 = !self.xen && self.pm1_sts & self.pm1_en & PM1_SCI_EVENTS != 0;
        let level = pm1 || self.gpe_sts & self.gpe_en != 0;
        if level != self.sci_level {
            self.sci_level = level;
            self.sci.set_level(level);
        }
    }

    fn write_cnt(&mut self, val: u16, mask: u16) {
        let new = (self.pm1_cnt & !mask) | (val & mask);
        // SLP_EN is write-only: act on it, never store it.
        self.pm1_cnt = new & !CNT_SLP_EN;
        if val & mask & CNT_SLP_EN != 0 {
            match (new >> CNT_SLP_TYP_SHIFT) & 7 {
                0 => {
                    log::info!("pm: guest entered S5; requesting power off");
                    self.platform.request(SystemEvent::PowerOff);
                }
                1 => {
                    log::info!("pm: guest entered S3; requesting suspend");
                    self.platform.request(SystemEvent::Suspend);
                }
                t => warn_limited!(format!("pm-slp-typ-{t}"), "pm: unsupported sleep type {t} ignored"),
            }
        }
    }

    fn pm_read_byte(&self, off: u64) -> u8 {
        if self.xen && !(OFF_CNT..OFF_CNT + 2).contains(&off) {
            return 0xff;
        }
        let (reg, base) = match off {
            0..=1 => (u32::from(self.pm1_sts), OFF_STS),
            2..=3 => (u32::from(self.pm1_en), OFF_EN),
            4..=5 => (u32::from(self.pm1_cnt), OFF_CNT),
            8..=11 => (self.timer(), OFF_TMR),
            _ => return 0,
        };
        (reg >> ((off - base) * 8)) as u8
    }

    fn pm_read(&mut self, off: u64, data: &mut [u8]) {
        self.refresh_timer_status();
        self.update_sci();
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.pm_read_byte(off + i as u64);
        }
    }

    fn pm_write(&mut self, off: u64, data: &[u8]) {
        self.refresh_timer_status();
        if !self.xen {
            if let Some((v, m)) = slice_write(OFF_STS, 2, off, data) {
                self.pm1_sts &= !((v & m) as u16);
            }
            if let Some((v, m)) = slice_write(OFF_EN, 2, off, data) {
                self.pm1_en = (self.pm1_en & !(m as u16)) | (v & m) as u16;
            }
        }
        if let Some((v, m)) = slice_write(OFF_CNT, 2, off, data) {
            self.write_cnt(v as u16, m as u16);
        }
        // The timer and the rest of the block are read-only / unimplemented: writes dropped.
        self.update_sci();
    }

    fn gpe_read(&self, off: u64) -> u8 {
        match off {
            0 => self.gpe_sts as u8,
            1 => (self.gpe_sts >> 8) as u8,
            2 => self.gpe_en as u8,
            3 => (self.gpe_en >> 8) as u8,
            _ => 0xff,
        }
    }

    fn gpe_write(&mut self, off: u64, v: u8) {
        let v16 = u16::from(v);
        match off {
            0 => self.gpe_sts &= !v16,
            1 => self.gpe_sts &= !(v16 << 8),
            2 => self.gpe_en = (self.gpe_en & 0xff00) | v16,
            3 => self.gpe_en = (self.gpe_en & 0x00ff) | v16 << 8,
            _ => {}
        }
        self.update_sci();
    }

    fn apm_write(&mut self, off: u64, v: u8) {
        match off {
            0 => {
                self.apmc = v;
                match v {
                    APM_ACPI_ENABLE => self.pm1_cnt |= CNT_SCI_EN,
                    APM_ACPI_DISABLE => self.pm1_cnt &= !CNT_SCI_EN,
                    // Would be an SMI on hardware with SMM; we have none.
                    _ => log::debug!("pm: APM control {v:#x} (no SMM)"),
                }
            }
            1 => self.apms = v,
            _ => {}
        }
    }
}

impl crate::bus::BusDevice for Piix4Pm {
    fn read(&mut self, region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        match region {
            Self::REGION_PM => self.pm_read(offset, data),
            Self::REGION_GPE0 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.gpe_read(offset + i as u64);
                }
            }
            Self::REGION_APM => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = match offset + i as u64 {
                        0 => self.apmc,
                        1 => self.apms,
                        _ => 0xff,
                    };
                }
            }
            _ => data.fill(0xff),
        }
        IoResult::Done
    }

    fn write(&mut self, region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        match region {
            Self::REGION_PM => self.pm_write(offset, data),
            Self::REGION_GPE0 => {
                for (i, &b) in data.iter().enumerate() {
                    self.gpe_write(offset + i as u64, b);
                }
            }
            Self::REGION_APM => {
                for (i, &b) in data.iter().enumerate() {
                    self.apm_write(offset + i as u64, b);
                }
            }
            _ => {}
        }
        IoResult::Done
    }
}

/// Saved PM I/O state (section "pm-io", version 1): PM1 status/enable/control, GPE0 and the APM
/// registers. The PM timer is not saved: it runs from the host monotonic clock, so after restore
/// it continues from a different value (a jump, as after any long pause; under Xen the timer is
/// the hypervisor's anyway). TMR_STS tracking restarts from the current timer; the SCI level is
/// recomputed and driven.
struct PmState {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    apmc: u8,
    apms: u8,
}

impl Snapshot for Piix4Pm {
    fn section(&self) -> &'static str {
        "pm-io"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_bool(self.xen);
        for v in [self.pm1_sts, self.pm1_en, self.pm1_cnt, self.gpe_sts, self.gpe_en] {
            w.put_u16(v);
        }
        w.put_u8(self.apmc);
        w.put_u8(self.apms);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        let xen = r.get_bool()?;
        let st = PmState {
            pm1_sts: r.get_u16()?,
            pm1_en: r.get_u16()?,
            pm1_cnt: r.get_u16()?,
            gpe_sts: r.get_u16()?,
            gpe_en: r.get_u16()?,
            apmc: r.get_u8()?,
            apms: r.get_u8()?,
        };
        if xen != self.xen {
            return Err(r.bad("saved in the other PM mode (Xen vs. emulated)"));
        }
        // SLP_EN is write-only and never stored.
        if st.pm1_cnt & CNT_SLP_EN != 0 {
            return Err(r.bad(format!("PM1a_CNT {:#x} has SLP_EN", st.pm1_cnt)));
        }
        Ok(PendingState::new(st))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: PmState = state.downcast(self.section())?;
        self.pm1_sts = st.pm1_sts;
        self.pm1_en = st.pm1_en;
        self.pm1_cnt = st.pm1_cnt;
        self.gpe_sts = st.gpe_sts;
        self.gpe_en = st.gpe_en;
        self.apmc = st.apmc;
        self.apms = st.apms;
        self.tmr_epoch = self.ticks() >> 23;
        self.update_sci();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::chipset::test_util::FakeClock;
    use crate::irq::RecordingIrqSink;
    use crate::platform::RecordingPlatform;
    use std::sync::Mutex;
    use std::time::Duration;

    const PMBA: u64 = 0xb000;

    struct Rig {
        bus: Bus,
        pm: Arc<Mutex<Piix4Pm>>,
        sink: Arc<RecordingIrqSink>,
        plat: Arc<RecordingPlatform>,
        clock: FakeClock,
    }

    fn rig(xen: bool) -> Rig {
        let sink = Arc::new(RecordingIrqSink::default());
        let plat = Arc::new(RecordingPlatform::default());
        let clock = FakeClock::at(Duration::from_secs(1000));
        let pm = Arc::new(Mutex::new(Piix4Pm::with_clock(
            IsaIrq::new(sink.clone(), 9),
            plat.clone(),
            xen,
            clock.clock(),
        )));
        let bus = Bus::new("pio");
        bus.insert(PMBA, Piix4Pm::PM_LEN, Piix4Pm::PM_RULES, pm.clone(), Piix4Pm::REGION_PM).unwrap();
        bus.insert(
            Piix4Pm::GPE0_BASE,
            Piix4Pm::GPE0_LEN,
            Piix4Pm::GPE0_RULES,
            pm.clone(),
            Piix4Pm::REGION_GPE0,
        )
        .unwrap();
        bus.insert(Piix4Pm::APM_BASE, Piix4Pm::APM_LEN, Piix4Pm::APM_RULES, pm.clone(), Piix4Pm::REGION_APM)
            .unwrap();
        Rig { bus, pm, sink, plat, clock }
    }

    impl Rig {
        fn r16(&self, a: u64) -> u16 {
            let mut d = [0u8; 2];
            self.bus.read_sync(a, &mut d);
            u16::from_le_bytes(d)
        }
        fn r32(&self, a: u64) -> u32 {
            let mut d = [0u8; 4];
            self.bus.read_sync(a, &mut d);
            u32::from_le_bytes(d)
        }
        fn w16(&self, a: u64, v: u16) {
            self.bus.write_sync(a, &v.to_le_bytes());
        }
    }

    #[test]
    fn sci_en_via_apm_like_hvmloader() {
        let r = rig(false);
        assert_eq!(r.r16(PMBA + 4) & CNT_SCI_EN, 0);
        r.bus.write_sync(0xb2, &[APM_ACPI_ENABLE]);
        assert_eq!(r.r16(PMBA + 4) & CNT_SCI_EN, 1);
        assert!(r.pm.lock().unwrap().sci_enabled());
        let mut d = [0u8];
        r.bus.read_sync(0xb2, &mut d);
        assert_eq!(d[0], 0xf1);
        r.bus.write_sync(0xb3, &[0x5a]);
        r.bus.read_sync(0xb3, &mut d);
        assert_eq!(d[0], 0x5a);
        r.bus.write_sync(0xb2, &[APM_ACPI_DISABLE]);
        assert!(!r.pm.lock().unwrap().sci_enabled());
        // Reset clears SCI_EN again; the option keeps it set.
        r.bus.write_sync(0xb2, &[APM_ACPI_ENABLE]);
        r.pm.lock().unwrap().reset();
        assert!(!r.pm.lock().unwrap().sci_enabled());
        r.pm.lock().unwrap().set_sci_enabled_at_reset(true);
        r.pm.lock().unwrap().reset();
        assert!(r.pm.lock().unwrap().sci_enabled());
    }

    #[test]
    fn s5_and_s3_via_pm1a_cnt() {
        let r = rig(false);
        r.w16(PMBA + 4, CNT_SCI_EN);
        r.w16(PMBA + 4, CNT_SLP_EN | 1 << 10 | CNT_SCI_EN);
        assert_eq!(*r.plat.events.lock().unwrap(), vec![SystemEvent::Suspend]);
        // SLP_EN is not stored; SLP_TYP is.
        assert_eq!(r.r16(PMBA + 4), 1 << 10 | CNT_SCI_EN);
        r.w16(PMBA + 4, 2 << 10 | CNT_SLP_EN | CNT_SCI_EN); // S4: ignored
        assert_eq!(r.plat.events.lock().unwrap().len(), 1);
        r.w16(PMBA + 4, CNT_SLP_EN | CNT_SCI_EN);
        assert_eq!(r.plat.events.lock().unwrap().last(), Some(&SystemEvent::PowerOff));
        // A byte write of the high half carries SLP_TYP and SLP_EN together.
        r.bus.write_sync(PMBA + 5, &[0x20]);
        assert_eq!(r.plat.events.lock().unwrap().len(), 3);
        // The low byte kept SCI_EN.
        assert_eq!(r.r16(PMBA + 4) & CNT_SCI_EN, CNT_SCI_EN);
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled() {
        let r = rig(false);
        r.pm.lock().unwrap().press_power_button();
        assert_eq!(r.r16(PMBA) & PM1_PWRBTN, PM1_PWRBTN);
        assert!(!r.sink.isa_level(9));
        r.w16(PMBA + 2, PM1_PWRBTN);
        assert!(r.sink.isa_level(9));
        assert_eq!(r.r16(PMBA + 2), PM1_PWRBTN);
        // Write-1-to-clear: writing 0 keeps it, writing the bit clears it and lowers the SCI.
        r.w16(PMBA, 0);
        assert!(r.sink.isa_level(9));
        r.w16(PMBA, PM1_PWRBTN);
        assert_eq!(r.r16(PMBA) & PM1_PWRBTN, 0);
        assert!(!r.sink.isa_level(9));
        // Byte write to EN's low half keeps the high half.
        r.bus.write_sync(PMBA + 2, &[0x01]);
        assert_eq!(r.r16(PMBA + 2), PM1_PWRBTN | PM1_TMR);
    }

    #[test]
    fn gpe0_dword_access_is_split_into_bytes() {
        let r = rig(false);
        r.pm.lock().unwrap().set_gpe_status(2);
        r.pm.lock().unwrap().set_gpe_status(9);
        assert!(!r.sink.isa_level(9));
        // One DWORD write: STS bytes 0 (W1C nothing), EN = 0x0004.
        r.bus.write_sync(0xafe0, &0x0004_0000u32.to_le_bytes());
        assert!(r.sink.isa_level(9));
        assert_eq!(r.r32(0xafe0), 0x0004_0204);
        // Clear bit 2 with a byte write; bit 9 remains but is not enabled.
        r.bus.write_sync(0xafe0, &[0x04]);
        assert!(!r.sink.isa_level(9));
        assert_eq!(r.r16(0xafe0), 0x0200);
        r.w16(0xafe2, 0x0200);
        assert!(r.sink.isa_level(9));
        r.pm.lock().unwrap().set_gpe_status(200); // ignored, no panic
        r.pm.lock().unwrap().reset();
        assert!(!r.sink.isa_level(9));
        assert_eq!(r.r32(0xafe0), 0);
    }

    #[test]
    fn timer_is_24bit_monotonic_and_sets_tmr_sts() {
        let r = rig(false);
        let t0 = r.r32(PMBA + 8);
        assert!(t0 <= 0x00ff_ffff);
        r.clock.advance(Duration::from_millis(1));
        let t1 = r.r32(PMBA + 8);
        // 1 ms = 3579.545 ticks.
        assert_eq!(t1.wrapping_sub(t0) & 0x00ff_ffff, 3579, "{t0} {t1}");
        // Byte and word reads see the same counter.
        let lo = r.r16(PMBA + 8);
        assert_eq!(lo, t1 as u16);
        // Crossing a bit-23 boundary sets TMR_STS; with TMR_EN the SCI fires.
        r.w16(PMBA, PM1_TMR);
        r.w16(PMBA + 2, PM1_TMR);
        r.clock.advance(Duration::from_secs(3));
        assert_eq!(r.r16(PMBA) & PM1_TMR, PM1_TMR);
        assert!(r.sink.isa_level(9));
        r.w16(PMBA, PM1_TMR);
        assert!(!r.sink.isa_level(9));
        // Wraps at 24 bits and never exceeds it.
        for _ in 0..10 {
            r.clock.advance(Duration::from_millis(1234));
            assert!(r.r32(PMBA + 8) <= 0x00ff_ffff);
        }
        // Writes to the timer are ignored; unknown offsets read 0.
        r.bus.write_sync(PMBA + 8, &0u32.to_le_bytes());
        assert_eq!(r.r32(PMBA + 0x20), 0);
        // Unaligned access is rejected by the rules: all-ones.
        let mut d = [0u8; 2];
        r.bus.read_sync(PMBA + 1, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn xen_mode_serves_only_pm1a_cnt() {
        let r = rig(true);
        assert_eq!(r.r16(PMBA), 0xffff);
        assert_eq!(r.r16(PMBA + 2), 0xffff);
        assert_eq!(r.r32(PMBA + 8), 0xffff_ffff);
        assert_eq!(r.r16(PMBA + 4), 0);
        r.bus.write_sync(0xb2, &[APM_ACPI_ENABLE]);
        assert_eq!(r.r16(PMBA + 4), 1);
        r.w16(PMBA + 2, 0xffff);
        r.pm.lock().unwrap().press_power_button();
        assert!(!r.sink.isa_level(9));
        // GPE0 is still ours under Xen.
        r.w16(0xafe2, 0x0004);
        r.pm.lock().unwrap().set_gpe_status(2);
        assert!(r.sink.isa_level(9));
        r.w16(PMBA + 4, CNT_SLP_EN | CNT_SCI_EN);
        assert_eq!(*r.plat.events.lock().unwrap(), vec![SystemEvent::PowerOff]);
    }

    #[test]
    fn unknown_region_reads_all_ones() {
        let r = rig(false);
        let mut d = [0u8; 2];
        r.pm.lock().unwrap().read(9, 0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        r.pm.lock().unwrap().write(9, 0, &d);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::chipset::test_util::FakeClock;
    use crate::irq::RecordingIrqSink;
    use crate::platform::RecordingPlatform;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    fn dev(xen: bool) -> (Piix4Pm, Arc<RecordingIrqSink>, Arc<RecordingPlatform>) {
        let sink = Arc::new(RecordingIrqSink::default());
        let p = Arc::new(RecordingPlatform::default());
        let clock = FakeClock::default().clock();
        (Piix4Pm::with_clock(IsaIrq::new(sink.clone(), 9), p.clone(), xen, clock), sink, p)
    }
    fn rd(d: &mut Piix4Pm, region: RegionId, off: u64, n: usize) -> u32 {
        let mut b = [0u8; 4];
        d.read(region, off, &mut b[..n]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn roundtrip_registers_and_sci() {
        let (mut a, _, _) = dev(false);
        a.write(Piix4Pm::REGION_APM, 0, &[APM_ACPI_ENABLE]);
        a.write(Piix4Pm::REGION_APM, 1, &[0x5a]);
        a.write(Piix4Pm::REGION_PM, OFF_EN, &PM1_PWRBTN.to_le_bytes());
        a.write(Piix4Pm::REGION_GPE0, 2, &[0x02]);
        a.set_gpe_status(1);
        a.press_power_button();
        let blob = payload(&a);

        let (mut b, sink, p) = dev(false);
        sink.take();
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        assert!(sink.isa_level(9), "SCI re-asserted");
        assert!(b.sci_enabled());
        assert_eq!(rd(&mut b, Piix4Pm::REGION_APM, 0, 2), 0x5af1);
        assert_eq!(rd(&mut b, Piix4Pm::REGION_PM, OFF_STS, 2) as u16 & PM1_PWRBTN, PM1_PWRBTN);
        assert_eq!(rd(&mut b, Piix4Pm::REGION_GPE0, 0, 4), 0x0002_0002);
        b.write(Piix4Pm::REGION_PM, OFF_STS, &PM1_PWRBTN.to_le_bytes());
        b.write(Piix4Pm::REGION_GPE0, 0, &[0x02]);
        assert!(!sink.isa_level(9));
        assert!(p.events.lock().unwrap().is_empty());
    }

    #[test]
    fn bad_values_rejected() {
        let (a, _, _) = dev(false);
        let good = payload(&a);
        let mut bad = good.clone();
        bad[5..7].copy_from_slice(&CNT_SLP_EN.to_le_bytes());
        let (mut b, _, _) = dev(false);
        assert!(load(&mut b, &bad).is_err());
        let (mut x, _, _) = dev(true);
        assert!(load(&mut x, &good).is_err());
    }
}
