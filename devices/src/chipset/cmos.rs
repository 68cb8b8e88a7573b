//! MC146818 RTC + 128 bytes of CMOS at ports 0x70 (index) / 0x71 (data).
//!
//! Time is not stored: every read of a time register is computed from the host wall clock (UTC)
//! plus an offset, which guest writes to the time registers adjust. Update-ended and alarm
//! events are evaluated lazily (on status C reads and on [`Cmos::tick`], which the machine drives
//! from [`Cmos::spawn_ticker`]). The periodic interrupt (PIE, rate select in status A) works the
//! same way: PF is set when a period boundary of the wall clock has passed, and the ticker wakes
//! at period boundaries while PIE is enabled (SeaBIOS's INT 15h/86h wait counts these).
//!
//! Xen mode: the hypervisor emulates indexes 0..13 (`RTC_CMOS_SIZE` in `hvm/rtc.c`) and only
//! forwards index writes >= 14 and data accesses while its index is >= 14; so we serve NVRAM
//! (14..127) only, and reads of 0..13 return 0xff.

use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{host_wall_clock, ChipsetError, ClockFn};
use crate::bus::{AccessRules, IoResult, RegionId};
use crate::irq::IsaIrq;
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

const REG_SEC: usize = 0x00;
const REG_SEC_ALARM: usize = 0x01;
const REG_MIN: usize = 0x02;
const REG_MIN_ALARM: usize = 0x03;
const REG_HOUR: usize = 0x04;
const REG_HOUR_ALARM: usize = 0x05;
const REG_WDAY: usize = 0x06;
const REG_MDAY: usize = 0x07;
const REG_MON: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
/// DV2..0 = 010: the 32.768 kHz time base, the only divider with which the clock runs.
const A_DIV_MASK: u8 = 0x70;
const A_DIV_NORMAL: u8 = 0x20;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_FLAGS: u8 = 0x70;
const D_VRT: u8 = 0x80;

/// Power-on values of status A (32.768 kHz divider, rate 1024 Hz) and B (24h, BCD), as QEMU.
const A_RESET: u8 = 0x26;
const B_RESET: u8 = 0x02;

/// UIP is set this long before the seconds roll over (datasheet: 244 us before the update).
const UIP_WINDOW_NS: u32 = 244_000;
/// Upper bound on seconds scanned for alarm matches after a long gap between evaluations.
const MAX_ALARM_SCAN: i64 = 86_400;

/// What the machine knows about the platform, written into CMOS the way QEMU's `pc_cmos_init`
/// does (all multi-byte values little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmosConfig {
    /// Guest RAM below 4 GiB, in bytes.
    pub ram_below_4g: u64,
    /// Guest RAM above 4 GiB, in bytes.
    pub ram_above_4g: u64,
    /// Boot CPU count (CMOS 0x5f = count - 1, or 0 if it does not fit).
    pub cpus: u32,
    /// QEMU `-boot order=` string: up to 3 of `a`/`b` (floppy), `c` (disk), `d` (CD), `n` (net).
    pub boot_order: String,
    /// Xen mode: the hypervisor owns indexes 0..13.
    pub xen: bool,
}

impl Default for CmosConfig {
    fn default() -> Self {
        CmosConfig { ram_below_4g: 0, ram_above_4g: 0, cpus: 1, boot_order: "cd".into(), xen: false }
    }
}

/// Broken-down guest time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    sec: i64,
    min: i64,
    hour: i64,
    /// 1 = Sunday .. 7 = Saturday (as the RTC counts).
    wday: i64,
    mday: i64,
    mon: i64,
    year: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Tm {
    fn from_unix(secs: i64) -> Tm {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, mon, mday) = civil_from_days(days);
        // 1970-01-01 was a Thursday (wday 5 with Sunday = 1).
        let wday = (days + 4).rem_euclid(7) + 1;
        Tm { sec: rem % 60, min: (rem / 60) % 60, hour: rem / 3600, wday, mday, mon, year }
    }

    /// Seconds since the epoch; out-of-range fields (guest garbage) are clamped, never panic.
    fn to_unix(self) -> i64 {
        let mon = self.mon.clamp(1, 12);
        let mday = self.mday.clamp(1, 31);
        let days = days_from_civil(self.year.clamp(0, 9999), mon, mday);
        days * 86_400 + self.hour.clamp(0, 23) * 3600 + self.min.clamp(0, 59) * 60 + self.sec.clamp(0, 59)
    }
}

/// Converts a QEMU boot order string into CMOS bytes 0x3d and 0x38 (`set_boot_dev`).
pub(super) fn boot_order_bytes(order: &str) -> Result<(u8, u8), ChipsetError> {
    if order.len() > 3 {
        return Err(ChipsetError::BootOrderTooLong(order.to_string()));
    }
    let mut nib = [0u8; 3];
    for (i, c) in order.chars().enumerate() {
        nib[i] = match c {
            'a' | 'b' => 0x01,
            'c' => 0x02,
            'd' => 0x03,
            'n' => 0x04,
            dev => return Err(ChipsetError::BadBootDevice { order: order.to_string(), dev }),
        };
    }
    // 0x38 low nibble 0 = "floppy boot signature check" enabled (QEMU's default fd_bootchk).
    Ok((nib[1] << 4 | nib[0], nib[2] << 4))
}

/// The RTC/CMOS device. One region (see [`Cmos::REGION`]).
pub struct Cmos {
    data: [u8; 128],
    index: u8,
    /// Guest time minus host time, in seconds.
    offset: i64,
    xen: bool,
    irq: Option<IsaIrq>,
    irq_level: bool,
    clock: ClockFn,
    /// Last guest second for which update/alarm events were evaluated (None: clock stopped).
    last_sec: Option<i64>,
    /// Index of the last periodic-interrupt period seen (None: periodic source off).
    last_period: Option<u128>,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos").field("index", &self.index).field("offset", &self.offset).finish()
    }
}

impl Cmos {
    /// Region 0: ports 0x70 (index, write-only; reads 0xff) and 0x71 (data). Byte-wide device;
    /// wider accesses are split into bytes as on the ISA bus.
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0x70;
    pub const LEN: u64 = 2;
    pub const RULES: AccessRules = AccessRules::BYTES;
    /// The RTC interrupt.
    pub const IRQ: u8 = 8;

    /// A CMOS with platform bytes from `cfg`, clocked by the host wall clock. `irq` is ISA IRQ 8
    /// (unused in Xen mode, where the hypervisor owns the RTC).
    pub fn new(cfg: &CmosConfig, irq: Option<IsaIrq>) -> Result<Cmos, ChipsetError> {
        Self::with_clock(cfg, irq, host_wall_clock())
    }

    /// As [`Cmos::new`] with an injected wall clock (duration since the Unix epoch, UTC).
    pub fn with_clock(cfg: &CmosConfig, irq: Option<IsaIrq>, clock: ClockFn) -> Result<Cmos, ChipsetError> {
        let mut c = Cmos {
            data: [0; 128],
            index: 0,
            offset: 0,
            xen: cfg.xen,
            irq,
            irq_level: false,
            clock,
            last_sec: None,
            last_period: None,
        };
        c.apply_config(cfg)?;
        c.reset_status();
        Ok(c)
    }

    /// (Re)writes the platform bytes: memory sizes, CPU count, equipment, century, boot order.
    pub fn apply_config(&mut self, cfg: &CmosConfig) -> Result<(), ChipsetError> {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let (b3d, b38) = boot_order_bytes(&cfg.boot_order)?;
        let below = cfg.ram_below_4g;
        let base_kib = (below / KIB).min(640);
        let ext_kib = (below.saturating_sub(MIB) / KIB).min(65535);
        let mid_64k = (below.saturating_sub(16 * MIB) / (64 * KIB)).min(65535);
        // 24 bits of 64 KiB units: up to 1 TiB above 4 GiB.
        let high_64k = (cfg.ram_above_4g / (64 * KIB)).min(0xff_ffff);
        let d = &mut self.data;
        d[0x10] = 0; // no floppy drives
        d[0x14] = 0x06; // equipment: FPU present, PS/2 mouse present, no floppy
        d[0x15..=0x16].copy_from_slice(&(base_kib as u16).to_le_bytes());
        d[0x17..=0x18].copy_from_slice(&(ext_kib as u16).to_le_bytes());
        d[0x30..=0x31].copy_from_slice(&(ext_kib as u16).to_le_bytes());
        d[0x34..=0x35].copy_from_slice(&(mid_64k as u16).to_le_bytes());
        d[0x5b..=0x5d].copy_from_slice(&(high_64k as u32).to_le_bytes()[..3]);
        // Counts that do not fit make firmware fall back to fw_cfg NB_CPUS (as QEMU).
        d[0x5f] = if cfg.cpus == 0 || cfg.cpus > 0xff { 0 } else { (cfg.cpus - 1) as u8 };
        d[REG_CENTURY] = 0x20;
        d[0x3d] = b3d;
        d[0x38] = b38;
        self.xen = cfg.xen;
        Ok(())
    }

    /// Changes only the boot order (e.g. QEMU's `-boot once=` applied at reboot).
    pub fn set_boot_order(&mut self, order: &str) -> Result<(), ChipsetError> {
        let (b3d, b38) = boot_order_bytes(order)?;
        self.data[0x3d] = b3d;
        self.data[0x38] = (self.data[0x38] & 0x0f) | (b38 & 0xf0);
        Ok(())
    }

    /// Raw byte of the CMOS array (NVRAM/platform bytes; time registers hold latched values only).
    pub fn nvram(&self, index: u8) -> u8 {
        self.data[usize::from(index & 0x7f)]
    }

    /// Sets a raw NVRAM byte (machine use, e.g. extra platform bytes). Indexes < 14 are refused:
    /// those are RTC registers.
    pub fn set_nvram(&mut self, index: u8, val: u8) {
        let i = usize::from(index & 0x7f);
        if i >= 14 {
            self.data[i] = val;
        }
    }

    /// Guest time minus host time in seconds (e.g. to start the guest in local time).
    pub fn offset_seconds(&self) -> i64 {
        self.offset
    }
    pub fn set_offset_seconds(&mut self, offset: i64) {
        self.offset = offset;
        self.last_sec = None;
    }

    /// Power-on reset: status registers back to their defaults, interrupt lowered. NVRAM,
    /// platform bytes, alarms and the guest's clock offset survive (battery-backed).
    pub fn reset(&mut self) {
        self.reset_status();
    }

    fn reset_status(&mut self) {
        self.index = 0;
        self.data[REG_A] = A_RESET;
        self.data[REG_B] = B_RESET;
        self.data[REG_C] = 0;
        self.data[REG_D] = D_VRT;
        self.last_sec = None;
        self.last_period = None;
        self.set_irq(false);
    }

    fn now(&self) -> (i64, u32) {
        let d = (self.clock)();
        let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2);
        (secs.saturating_add(self.offset), d.subsec_nanos())
    }

    fn clock_running(&self) -> bool {
        self.data[REG_B] & B_SET == 0 && self.data[REG_A] & A_DIV_MASK == A_DIV_NORMAL
    }

    fn enc_with(b: u8, v: i64) -> u8 {
        let v = v.clamp(0, 99) as u8;
        if b & B_DM_BINARY == 0 {
            (v / 10) << 4 | (v % 10)
        } else {
            v
        }
    }

    fn dec_with(b: u8, v: u8) -> i64 {
        if b & B_DM_BINARY == 0 {
            i64::from(v >> 4) * 10 + i64::from(v & 0x0f)
        } else {
            i64::from(v)
        }
    }

    fn enc_hour_with(b: u8, h: i64) -> u8 {
        if b & B_24H != 0 {
            Self::enc_with(b, h)
        } else {
            let pm = if h >= 12 { 0x80 } else { 0 };
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            Self::enc_with(b, h12) | pm
        }
    }

    fn dec_hour_with(b: u8, v: u8) -> i64 {
        if b & B_24H != 0 {
            Self::dec_with(b, v)
        } else {
            let h = Self::dec_with(b, v & 0x7f) % 12;
            h + if v & 0x80 != 0 { 12 } else { 0 }
        }
    }

    /// Encoded value of time register `reg` for broken-down time `tm` in the mode of status B `b`.
    fn encode_field(b: u8, tm: &Tm, reg: usize) -> u8 {
        match reg {
            REG_SEC => Self::enc_with(b, tm.sec),
            REG_MIN => Self::enc_with(b, tm.min),
            REG_HOUR => Self::enc_hour_with(b, tm.hour),
            REG_WDAY => Self::enc_with(b, tm.wday),
            REG_MDAY => Self::enc_with(b, tm.mday),
            REG_MON => Self::enc_with(b, tm.mon),
            REG_YEAR => Self::enc_with(b, tm.year.rem_euclid(100)),
            REG_CENTURY => Self::enc_with(b, tm.year.div_euclid(100)),
            _ => 0,
        }
    }

    /// Applies a guest write of encoded `v` to field `reg` of `tm`.
    fn decode_field(b: u8, tm: &mut Tm, reg: usize, v: u8) {
        match reg {
            REG_SEC => tm.sec = Self::dec_with(b, v),
            REG_MIN => tm.min = Self::dec_with(b, v),
            REG_HOUR => tm.hour = Self::dec_hour_with(b, v),
            // The day of week is derived from the date; a guest cannot set it independently.
            REG_WDAY => {}
            REG_MDAY => tm.mday = Self::dec_with(b, v),
            REG_MON => tm.mon = Self::dec_with(b, v),
            REG_YEAR => tm.year = tm.year.div_euclid(100) * 100 + Self::dec_with(b, v),
            REG_CENTURY => {
                let c = Self::dec_with(b, v);
                // Nonsense centuries (0, 0xff...) keep the current one rather than jump eras.
                if (19..=99).contains(&c) {
                    tm.year = c * 100 + tm.year.rem_euclid(100);
                }
            }
            _ => {}
        }
    }

    fn is_time_reg(&self, reg: usize) -> bool {
        matches!(reg, REG_SEC | REG_MIN | REG_HOUR | REG_WDAY | REG_MDAY | REG_MON | REG_YEAR)
            || (reg == REG_CENTURY && !self.xen)
    }

    fn set_guest_time(&mut self, tm: Tm) {
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(0);
        self.offset = tm.to_unix() - host;
        // New time base: no update/alarm events for the jump itself.
        self.last_sec = None;
    }

    /// Copies the current time into the time registers (status B SET rising edge).
    fn latch_time(&mut self, b: u8) {
        let tm = Tm::from_unix(self.now().0);
        for reg in [REG_SEC, REG_MIN, REG_HOUR, REG_WDAY, REG_MDAY, REG_MON, REG_YEAR, REG_CENTURY] {
            if self.is_time_reg(reg) {
                self.data[reg] = Self::encode_field(b, &tm, reg);
            }
        }
    }

    /// Sets the clock from the latched registers (status B SET falling edge), decoding them in the
    /// mode `b` that was in force while they were written.
    fn commit_time(&mut self, b: u8) {
        let mut tm = Tm::from_unix(self.now().0);
        for reg in [REG_CENTURY, REG_YEAR, REG_MON, REG_MDAY, REG_HOUR, REG_MIN, REG_SEC] {
            if self.is_time_reg(reg) {
                let v = self.data[reg];
                Self::decode_field(b, &mut tm, reg, v);
            }
        }
        self.set_guest_time(tm);
    }

    fn set_irq(&mut self, level: bool) {
        if level != self.irq_level {
            self.irq_level = level;
            if let Some(irq) = &self.irq {
                irq.set_level(level);
            }
        }
    }

    fn update_irq(&mut self) {
        if self.data[REG_C] & self.data[REG_B] & C_FLAGS != 0 {
            self.data[REG_C] |= C_IRQF;
        }
        let level = self.data[REG_C] & C_IRQF != 0 && !self.xen;
        self.set_irq(level);
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let b = self.data[REG_B];
        let tm = Tm::from_unix(secs);
        [(REG_SEC_ALARM, REG_SEC), (REG_MIN_ALARM, REG_MIN), (REG_HOUR_ALARM, REG_HOUR)].iter().all(
            |&(alarm, reg)| {
                let a = self.data[alarm];
                a & 0xc0 == 0xc0 || a == Self::encode_field(b, &tm, reg)
            },
        )
    }

    /// Periodic interrupt period from the rate select bits, if the divider runs.
    fn period_ns(&self) -> Option<u128> {
        if self.data[REG_A] & A_DIV_MASK != A_DIV_NORMAL {
            return None;
        }
        let rate = match self.data[REG_A] & 0x0f {
            0 => return None,
            // Rates 1 and 2 are aliases of 8 and 9 with the 32.768 kHz time base.
            r @ 1..=2 => r + 7,
            r => r,
        };
        Some((1u128 << (rate - 1)) * 1_000_000_000 / 32_768)
    }

    fn tick_periodic(&mut self) {
        let Some(period) = self.period_ns() else {
            self.last_period = None;
            return;
        };
        let idx = (self.clock)().as_nanos() / period;
        if self.last_period.is_some_and(|l| l != idx) {
            self.data[REG_C] |= C_PF;
        }
        self.last_period = Some(idx);
    }

    /// Evaluates update-ended, alarm and periodic events that happened since the last
    /// evaluation and updates IRQ 8. Called on status C reads and by the ticker; harmless to
    /// call any time.
    pub fn tick(&mut self) {
        if self.xen {
            return;
        }
        self.tick_periodic();
        if !self.clock_running() {
            self.last_sec = None;
            self.update_irq();
            return;
        }
        let now = self.now().0;
        match self.last_sec {
            Some(last) if now > last => {
                self.data[REG_C] |= C_UF;
                let first = (last + 1).max(now - MAX_ALARM_SCAN + 1);
                if (first..=now).any(|s| self.alarm_matches(s)) {
                    self.data[REG_C] |= C_AF;
                }
                self.last_sec = Some(now);
            }
            Some(last) if now == last => {}
            _ => self.last_sec = Some(now),
        }
        self.update_irq();
    }

    /// How long until the next event can happen: the next second boundary, or the next
    /// periodic-interrupt boundary while PIE is enabled.
    pub fn next_tick_delay(&self) -> Duration {
        let ns = self.now().1;
        let to_second = Duration::from_nanos(u64::from(1_000_000_000 - ns.min(999_999_999)));
        match self.period_ns() {
            Some(p) if self.data[REG_B] & B_PIE != 0 => {
                let now = (self.clock)().as_nanos();
                let to_period = p - now % p;
                to_second.min(Duration::from_nanos(u64::try_from(to_period).unwrap_or(u64::MAX)))
            }
            _ => to_second,
        }
    }

    /// Starts a thread that calls [`Cmos::tick`] after every second boundary, so UIE/AIE
    /// interrupts are delivered without guest polling. It exits when the device is dropped.
    pub fn spawn_ticker(dev: &Arc<Mutex<Cmos>>) -> std::io::Result<JoinHandle<()>> {
        let weak: Weak<Mutex<Cmos>> = Arc::downgrade(dev);
        std::thread::Builder::new().name("rtc-ticker".into()).spawn(move || loop {
            let Some(dev) = weak.upgrade() else { return };
            let delay = {
                let mut c = dev.lock().unwrap_or_else(|p| p.into_inner());
                c.tick();
                if c.xen {
                    return;
                }
                c.next_tick_delay()
            };
            drop(dev);
            // A little past the boundary, so the evaluation sees it crossed.
            std::thread::sleep(delay + Duration::from_micros(20));
        })
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        if self.xen && reg < 14 {
            warn_limited!("cmos-xen-rtc-read", "cmos: read of RTC index {reg:#x} reached the DM in Xen mode");
            return 0xff;
        }
        if self.is_time_reg(reg) {
            if self.data[REG_B] & B_SET != 0 {
                return self.data[reg];
            }
            let tm = Tm::from_unix(self.now().0);
            return Self::encode_field(self.data[REG_B], &tm, reg);
        }
        match reg {
            REG_A => {
                let (_, ns) = self.now();
                let uip = self.clock_running() && ns >= 1_000_000_000 - UIP_WINDOW_NS;
                (self.data[REG_A] & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                self.tick();
                let v = self.data[REG_C];
                self.data[REG_C] = 0;
                self.set_irq(false);
                v
            }
            REG_D => D_VRT,
            _ => self.data[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        if self.xen && reg < 14 {
            warn_limited!(
                "cmos-xen-rtc-write",
                "cmos: write of RTC index {reg:#x} reached the DM in Xen mode"
            );
            return;
        }
        if self.is_time_reg(reg) {
            if self.data[REG_B] & B_SET != 0 {
                self.data[reg] = v;
            } else {
                let b = self.data[REG_B];
                let mut tm = Tm::from_unix(self.now().0);
                Self::decode_field(b, &mut tm, reg, v);
                self.set_guest_time(tm);
            }
            return;
        }
        match reg {
            REG_A => {
                self.data[REG_A] = v & !A_UIP;
                if !self.clock_running() {
                    self.last_sec = None;
                }
            }
            REG_B => {
                let old = self.data[REG_B];
                let mut v = v;
                if v & B_SET != 0 {
                    // Setting SET aborts update cycles and disables update interrupts.
                    v &= !B_UIE;
                    if old & B_SET == 0 {
                        self.latch_time(v);
                    }
                } else if old & B_SET != 0 {
                    self.commit_time(old);
                }
                self.data[REG_B] = v;
                self.update_irq();
            }
            REG_C | REG_D => {}
            _ => self.data[reg] = v,
        }
    }
}

impl crate::bus::BusDevice for Cmos {
    fn read(&mut self, _region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let v = match offset {
            // The index register is write-only.
            0 => 0xff,
            1 => {
                let reg = usize::from(self.index);
                self.read_reg(reg)
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let Some(&v) = data.first() else { return IoResult::Done };
        match offset {
            // Bit 7 is the NMI mask on real hardware; the index is 7 bits.
            0 => self.index = v & 0x7f,
            1 => {
                let reg = usize::from(self.index);
                self.write_reg(reg, v);
            }
            _ => {}
        }
        IoResult::Done
    }
}

/// Saved CMOS state (section "cmos", version 1): the 128 bytes (NVRAM and RTC registers as
/// stored), the index latch, and the guest's RTC offset from the host wall clock. The clock itself
/// is not saved: after restore the RTC keeps the same offset from host UTC, so the guest sees the
/// wall-clock time that passed while it was saved (like QEMU's `-rtc base=utc,clock=host`).
/// Tick bookkeeping restarts; the IRQ 8 level follows REG_C.IRQF.
struct CmosState {
    data: [u8; 128],
    index: u8,
    offset: i64,
}

impl Snapshot for Cmos {
    fn section(&self) -> &'static str {
        "cmos"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_bool(self.xen);
        w.put_raw(&self.data);
        w.put_u8(self.index);
        w.put_i64(self.offset);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        let xen = r.get_bool()?;
        let data = r.get_array::<128>()?;
        let index = r.get_u8()?;
        let offset = r.get_i64()?;
        if xen != self.xen {
            return Err(r.bad("saved in the other RTC mode (Xen vs. emulated)"));
        }
        if index > 0x7f {
            return Err(r.bad(format!("index {index:#x}")));
        }
        // Keeps now() + offset far from overflow (±1e15 s is ±30 million years).
        if !(-1_000_000_000_000_000..=1_000_000_000_000_000).contains(&offset) {
            return Err(r.bad(format!("RTC offset {offset}")));
        }
        Ok(PendingState::new(CmosState { data, index, offset }))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: CmosState = state.downcast(self.section())?;
        self.data = st.data;
        self.index = st.index;
        self.offset = st.offset;
        self.last_sec = None;
        self.last_period = None;
        self.update_irq();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::chipset::test_util::FakeClock;
    use crate::irq::RecordingIrqSink;

    const B_AIE: u8 = 0x20;
    // 2024-02-29 23:59:58 UTC, a Thursday.
    const T0: u64 = 1_709_251_198;

    fn cfg(below: u64, above: u64) -> CmosConfig {
        CmosConfig { ram_below_4g: below, ram_above_4g: above, cpus: 4, boot_order: "cd".into(), xen: false }
    }

    fn dev(clock: &FakeClock, sink: &Arc<RecordingIrqSink>) -> Cmos {
        let irq = IsaIrq::new(sink.clone(), 8);
        Cmos::with_clock(&cfg(512 << 20, 0), Some(irq), clock.clock()).unwrap()
    }

    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, 0, &[reg]);
        let mut d = [0u8];
        c.read(0, 1, &mut d);
        d[0]
    }

    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, 0, &[reg]);
        c.write(0, 1, &[v]);
    }

    #[test]
    fn calendar_roundtrip() {
        for secs in [0i64, 951_782_400, 1_709_251_198, 4_102_444_800, 253_402_300_799] {
            let tm = Tm::from_unix(secs);
            assert_eq!(tm.to_unix(), secs, "{tm:?}");
        }
        let tm = Tm::from_unix(T0 as i64);
        assert_eq!((tm.year, tm.mon, tm.mday, tm.hour, tm.min, tm.sec), (2024, 2, 29, 23, 59, 58));
        assert_eq!(tm.wday, 5); // Thursday
    }

    #[test]
    fn memory_bytes_512m() {
        let c = Cmos::with_clock(&cfg(512 << 20, 0), None, FakeClock::default().clock()).unwrap();
        assert_eq!((c.nvram(0x15), c.nvram(0x16)), (0x80, 0x02)); // 640
                                                                  // (512 - 1) MiB in KiB = 523264 -> capped at 65535.
        assert_eq!((c.nvram(0x17), c.nvram(0x18)), (0xff, 0xff));
        assert_eq!((c.nvram(0x30), c.nvram(0x31)), (0xff, 0xff));
        // (512 - 16) MiB / 64 KiB = 7936 = 0x1f00.
        assert_eq!((c.nvram(0x34), c.nvram(0x35)), (0x00, 0x1f));
        assert_eq!((c.nvram(0x5b), c.nvram(0x5c), c.nvram(0x5d)), (0, 0, 0));
        assert_eq!(c.nvram(0x5f), 3);
        assert_eq!(c.nvram(0x14), 0x06);
        assert_eq!(c.nvram(0x10), 0);
        assert_eq!(c.nvram(0x32), 0x20);
        assert_eq!((c.nvram(0x3d), c.nvram(0x38)), (0x32, 0x00));
    }

    #[test]
    fn memory_bytes_6g_and_small() {
        // 6 GiB guest: 3 GiB below the hole, 3 GiB above 4 GiB.
        let c = Cmos::with_clock(&cfg(3 << 30, 3 << 30), None, FakeClock::default().clock()).unwrap();
        // (3 GiB - 16 MiB) / 64 KiB = 48896 = 0xbf00.
        assert_eq!((c.nvram(0x34), c.nvram(0x35)), (0x00, 0xbf));
        // 3 GiB / 64 KiB = 49152 = 0x00c000.
        assert_eq!((c.nvram(0x5b), c.nvram(0x5c), c.nvram(0x5d)), (0x00, 0xc0, 0x00));
        // 8 MiB guest: ext = 7 MiB = 7168 KiB; nothing above 16 MiB.
        let c = Cmos::with_clock(&cfg(8 << 20, 0), None, FakeClock::default().clock()).unwrap();
        assert_eq!(u16::from_le_bytes([c.nvram(0x30), c.nvram(0x31)]), 7168);
        assert_eq!((c.nvram(0x34), c.nvram(0x35)), (0, 0));
        // SeaBIOS' fallback formula gives the size back.
        let ram = (u32::from(c.nvram(0x30)) << 10 | u32::from(c.nvram(0x31)) << 18) + (1 << 20);
        assert_eq!(ram, 8 << 20);
    }

    #[test]
    fn boot_order_encoding_and_errors() {
        assert_eq!(boot_order_bytes("c").unwrap(), (0x02, 0x00));
        assert_eq!(boot_order_bytes("dcn").unwrap(), (0x23, 0x40));
        assert_eq!(boot_order_bytes("").unwrap(), (0x00, 0x00));
        assert!(matches!(boot_order_bytes("cdna"), Err(ChipsetError::BootOrderTooLong(_))));
        assert!(matches!(boot_order_bytes("cx"), Err(ChipsetError::BadBootDevice { dev: 'x', .. })));
        let mut c = Cmos::with_clock(&cfg(1 << 30, 0), None, FakeClock::default().clock()).unwrap();
        c.set_boot_order("n").unwrap();
        assert_eq!(c.nvram(0x3d), 0x04);
        let mut bad = cfg(1 << 30, 0);
        bad.cpus = 300;
        assert_eq!(Cmos::with_clock(&bad, None, FakeClock::default().clock()).unwrap().nvram(0x5f), 0);
    }

    #[test]
    fn bcd_and_binary_clock_reads() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        // Defaults: BCD, 24h.
        assert_eq!(rd(&mut c, 0x0b), 0x02);
        assert_eq!(rd(&mut c, 0x00), 0x58);
        assert_eq!(rd(&mut c, 0x02), 0x59);
        assert_eq!(rd(&mut c, 0x04), 0x23);
        assert_eq!(rd(&mut c, 0x06), 0x05);
        assert_eq!(rd(&mut c, 0x07), 0x29);
        assert_eq!(rd(&mut c, 0x08), 0x02);
        assert_eq!(rd(&mut c, 0x09), 0x24);
        assert_eq!(rd(&mut c, 0x32), 0x20);
        // Binary, 12h: 23h -> 11 PM.
        wr(&mut c, 0x0b, B_DM_BINARY);
        assert_eq!(rd(&mut c, 0x00), 58);
        assert_eq!(rd(&mut c, 0x04), 0x80 | 11);
        assert_eq!(rd(&mut c, 0x09), 24);
        assert_eq!(rd(&mut c, 0x32), 20);
        // Two seconds later it is March 1st.
        clock.advance(Duration::from_secs(2));
        assert_eq!((rd(&mut c, 0x07), rd(&mut c, 0x08), rd(&mut c, 0x04)), (1, 3, 12));
        assert_eq!(rd(&mut c, 0x0d), 0x80);
    }

    #[test]
    fn uip_window() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        assert_eq!(rd(&mut c, 0x0a), 0x26);
        clock.advance(Duration::from_nanos(999_900_000));
        assert_eq!(rd(&mut c, 0x0a), 0xa6);
        // Writes cannot set UIP.
        wr(&mut c, 0x0a, 0xa6);
        clock.advance(Duration::from_millis(1));
        assert_eq!(rd(&mut c, 0x0a), 0x26);
    }

    #[test]
    fn guest_sets_time_with_set_bit_and_directly() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        // Linux-style: SET, write BCD 2030-06-15 12:34:56, clear SET.
        wr(&mut c, 0x0b, 0x82);
        assert_eq!(rd(&mut c, 0x00), 0x58, "latched");
        for (r, v) in [(0, 0x56), (2, 0x34), (4, 0x12), (7, 0x15), (8, 0x06), (9, 0x30)] {
            wr(&mut c, r, v);
        }
        clock.advance(Duration::from_secs(5));
        assert_eq!(rd(&mut c, 0x00), 0x56, "frozen while SET");
        wr(&mut c, 0x0b, 0x02);
        clock.advance(Duration::from_secs(3));
        assert_eq!(rd(&mut c, 0x00), 0x59);
        assert_eq!((rd(&mut c, 0x09), rd(&mut c, 0x08), rd(&mut c, 0x07)), (0x30, 0x06, 0x15));
        assert_eq!(rd(&mut c, 0x06), 0x7); // 2030-06-15 is a Saturday
                                           // Direct write of minutes without SET.
        wr(&mut c, 0x02, 0x00);
        assert_eq!((rd(&mut c, 0x04), rd(&mut c, 0x02), rd(&mut c, 0x00)), (0x12, 0x00, 0x59));
        // The offset survives reset.
        let off = c.offset_seconds();
        c.reset();
        assert_eq!(c.offset_seconds(), off);
        // Garbage values do not panic.
        for r in [0u8, 2, 4, 7, 8, 9, 0x32] {
            wr(&mut c, r, 0xff);
        }
        let _ = rd(&mut c, 0);
    }

    #[test]
    fn status_c_clear_on_read_and_uie_irq() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        assert_eq!(rd(&mut c, 0x0c), 0);
        // Alarm at 12:00:00, out of the way (the default 00:00:00 would match at midnight).
        wr(&mut c, 0x05, 0x12);
        // Rate 0: no periodic flag in the way.
        wr(&mut c, 0x0a, 0x20);
        wr(&mut c, 0x0b, 0x02 | B_UIE);
        c.tick();
        assert!(!sink.isa_level(8));
        clock.advance(Duration::from_secs(1));
        c.tick();
        assert!(sink.isa_level(8));
        assert_eq!(rd(&mut c, 0x0c), C_IRQF | C_UF);
        assert!(!sink.isa_level(8));
        assert_eq!(rd(&mut c, 0x0c), 0, "cleared by the read");
        // Without UIE the flag is set but no interrupt.
        wr(&mut c, 0x0b, 0x02);
        clock.advance(Duration::from_secs(1));
        c.tick();
        assert!(!sink.isa_level(8));
        assert_eq!(rd(&mut c, 0x0c), C_UF);
    }

    #[test]
    fn alarm_interrupt() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        // Alarm at 00:00:05 (BCD), hours/minutes/seconds.
        wr(&mut c, 0x01, 0x05);
        wr(&mut c, 0x03, 0x00);
        wr(&mut c, 0x05, 0x00);
        wr(&mut c, 0x0b, 0x02 | B_AIE);
        c.tick();
        clock.advance(Duration::from_secs(3)); // 00:00:01
        c.tick();
        assert!(!sink.isa_level(8));
        clock.advance(Duration::from_secs(5)); // 00:00:06, passed 00:00:05
        c.tick();
        assert!(sink.isa_level(8));
        let v = rd(&mut c, 0x0c);
        assert_eq!(v & (C_IRQF | C_AF), C_IRQF | C_AF);
        // Don't-care alarm fires every second.
        wr(&mut c, 0x01, 0xff);
        wr(&mut c, 0x03, 0xc0);
        wr(&mut c, 0x05, 0xc0);
        clock.advance(Duration::from_secs(1));
        c.tick();
        assert!(sink.isa_level(8));
        c.reset();
        assert!(!sink.isa_level(8));
        assert_eq!(rd(&mut c, 0x0b), 0x02);
    }

    #[test]
    fn periodic_interrupt() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        wr(&mut c, 0x05, 0x12); // alarm out of the way
                                // SeaBIOS: 1024 Hz (rate 6), PIE on.
        wr(&mut c, 0x0a, 0x26);
        wr(&mut c, 0x0b, 0x02 | B_PIE);
        c.tick();
        assert!(!sink.isa_level(8));
        let d = c.next_tick_delay();
        assert!(d <= Duration::from_nanos(976_563) && d > Duration::ZERO, "{d:?}");
        clock.advance(Duration::from_micros(980));
        c.tick();
        assert!(sink.isa_level(8));
        assert_eq!(rd(&mut c, 0x0c) & (C_IRQF | C_PF), C_IRQF | C_PF);
        assert!(!sink.isa_level(8));
        // Rate 0 stops the periodic source.
        wr(&mut c, 0x0a, 0x20);
        clock.advance(Duration::from_millis(5));
        c.tick();
        assert_eq!(rd(&mut c, 0x0c) & C_PF, 0);
    }

    #[test]
    fn nvram_index_nmi_bit_and_reset() {
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut c = dev(&clock, &sink);
        wr(&mut c, 0x0f | 0x80, 0xfe);
        assert_eq!(rd(&mut c, 0x0f), 0xfe);
        wr(&mut c, 0x7f, 0x5a);
        assert_eq!(rd(&mut c, 0x7f), 0x5a);
        wr(&mut c, 0x0a, 0x70); // divider reset: clock stops, no UIP
        wr(&mut c, 0x0d, 0x00);
        assert_eq!(rd(&mut c, 0x0d), 0x80);
        c.reset();
        assert_eq!(rd(&mut c, 0x0f), 0xfe);
        assert_eq!(rd(&mut c, 0x7f), 0x5a);
        assert_eq!(rd(&mut c, 0x15), 0x80);
        assert_eq!(rd(&mut c, 0x0a), 0x26);
        // The index port reads 0xff.
        let mut d = [0u8];
        c.read(0, 0, &mut d);
        assert_eq!(d[0], 0xff);
    }

    #[test]
    fn xen_mode_serves_only_nvram() {
        let mut x = cfg(1 << 30, 0);
        x.xen = true;
        let sink = Arc::new(RecordingIrqSink::default());
        let irq = IsaIrq::new(sink.clone(), 8);
        let mut c = Cmos::with_clock(&x, Some(irq), FakeClock::at(Duration::from_secs(T0)).clock()).unwrap();
        for r in 0..14u8 {
            assert_eq!(rd(&mut c, r), 0xff, "index {r}");
            wr(&mut c, r, 0);
        }
        assert_eq!(rd(&mut c, 0x32), 0x20, "century is plain NVRAM under Xen");
        assert_eq!(rd(&mut c, 0x3d), 0x32);
        wr(&mut c, 0x40, 0x11);
        assert_eq!(rd(&mut c, 0x40), 0x11);
        c.tick();
        assert!(sink.take().is_empty());
    }

    #[test]
    fn through_a_bus_word_access_splits() {
        let bus = Bus::new("pio");
        let clock = FakeClock::at(Duration::from_secs(T0));
        let sink = Arc::new(RecordingIrqSink::default());
        let c = Arc::new(Mutex::new(dev(&clock, &sink)));
        bus.insert(Cmos::BASE, Cmos::LEN, Cmos::RULES, c.clone(), Cmos::REGION).unwrap();
        // outw 0x70 = index 0x40, data 0x99 (as an ISA bus splits it).
        bus.write_sync(0x70, &[0x40, 0x99]);
        assert_eq!(c.lock().unwrap().nvram(0x40), 0x99);
        let mut d = [0u8];
        bus.read_sync(0x71, &mut d);
        assert_eq!(d[0], 0x99);
    }

    #[test]
    fn ticker_thread_exits_when_dropped() {
        let sink = Arc::new(RecordingIrqSink::default());
        let c = Arc::new(Mutex::new(
            Cmos::with_clock(&cfg(1 << 30, 0), Some(IsaIrq::new(sink, 8)), host_wall_clock()).unwrap(),
        ));
        let h = Cmos::spawn_ticker(&c).unwrap();
        drop(c);
        h.join().unwrap();
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::chipset::test_util::FakeClock;
    use crate::irq::RecordingIrqSink;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    fn dev(clock: &FakeClock, sink: &Arc<RecordingIrqSink>, xen: bool) -> Cmos {
        let cfg = CmosConfig { ram_below_4g: 256 << 20, xen, ..Default::default() };
        Cmos::with_clock(&cfg, Some(IsaIrq::new(sink.clone(), 8)), clock.clock()).unwrap()
    }
    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, 0, &[reg]);
        let mut d = [0u8];
        c.read(0, 1, &mut d);
        d[0]
    }
    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, 0, &[reg]);
        c.write(0, 1, &[v]);
    }

    #[test]
    fn roundtrip_nvram_time_offset_and_irq() {
        let clock = FakeClock::at(Duration::from_secs(1_000_000));
        let sink = Arc::new(RecordingIrqSink::default());
        let mut a = dev(&clock, &sink, false);
        wr(&mut a, 0x40, 0x5a);
        wr(&mut a, REG_B as u8, 0x02 | 0x04); // 24h, binary
        wr(&mut a, REG_HOUR as u8, 13); // guest sets its own time
        wr(&mut a, REG_B as u8, 0x02 | 0x04 | B_UIE);
        clock.advance(Duration::from_secs(1));
        a.tick();
        clock.advance(Duration::from_secs(1));
        a.tick();
        assert!(sink.isa_level(8));
        a.write(0, 0, &[0x40]);
        let blob = payload(&a);

        let sink2 = Arc::new(RecordingIrqSink::default());
        let mut b = dev(&clock, &sink2, false);
        load(&mut b, &blob).unwrap();
        assert!(sink2.isa_level(8), "pending RTC interrupt re-asserted");
        // Index latch restored: a data read hits 0x40.
        let mut d = [0u8];
        b.read(0, 1, &mut d);
        assert_eq!(d[0], 0x5a);
        assert_eq!(rd(&mut b, REG_HOUR as u8), 13);
        assert_eq!(b.offset_seconds(), a.offset_seconds());
        assert_eq!(rd(&mut b, REG_C as u8) & (C_IRQF | C_UF), C_IRQF | C_UF);
        assert!(!sink2.isa_level(8));
    }

    #[test]
    fn bad_payloads() {
        let clock = FakeClock::default();
        let sink = Arc::new(RecordingIrqSink::default());
        let a = dev(&clock, &sink, false);
        let good = payload(&a);
        let mut b = dev(&clock, &sink, false);
        b.set_nvram(0x40, 0x11);
        assert_prefixes_fail(&b, &good);
        let mut bad = good.clone();
        bad[129] = 0x80; // index
        assert!(load(&mut b, &bad).is_err());
        let mut bad = good.clone();
        bad[130..138].copy_from_slice(&i64::MIN.to_le_bytes());
        assert!(load(&mut b, &bad).is_err());
        let mut x = dev(&clock, &sink, true);
        assert!(load(&mut x, &good).is_err(), "xen mode mismatch");
        assert_eq!(b.nvram(0x40), 0x11);
    }
}
