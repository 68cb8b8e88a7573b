//! A type-0 PCI configuration space (256 bytes) with per-byte write masks, BARs that map
//! themselves on the right [`Bus`] and an INTx line that honours the command register.
//!
//! Values set with the `init_*` helpers are the power-on state that [`ConfigSpace::reset`]
//! restores; `set_*` helpers change the current state only.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use crate::bus::{AccessRules, Bus, RegionId, SharedDevice};
use crate::irq::IrqSink;
use crate::warn_limited;

use super::{PciError, PciIntx};

pub const CONFIG_SPACE_SIZE: usize = 256;

pub const PCI_VENDOR_ID: u16 = 0x00;
pub const PCI_DEVICE_ID: u16 = 0x02;
pub const PCI_COMMAND: u16 = 0x04;
pub const PCI_STATUS: u16 = 0x06;
pub const PCI_REVISION_ID: u16 = 0x08;
pub const PCI_CLASS_PROG: u16 = 0x09;
pub const PCI_CACHE_LINE_SIZE: u16 = 0x0c;
pub const PCI_LATENCY_TIMER: u16 = 0x0d;
pub const PCI_HEADER_TYPE: u16 = 0x0e;
pub const PCI_BAR0: u16 = 0x10;
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const PCI_SUBSYSTEM_ID: u16 = 0x2e;
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
pub const PCI_INTERRUPT_LINE: u16 = 0x3c;
pub const PCI_INTERRUPT_PIN: u16 = 0x3d;

pub const PCI_COMMAND_IO: u16 = 1 << 0;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const PCI_COMMAND_PARITY: u16 = 1 << 6;
pub const PCI_COMMAND_SERR: u16 = 1 << 8;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

pub const PCI_STATUS_INTERRUPT: u16 = 1 << 3;
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
pub const PCI_STATUS_FAST_BACK: u16 = 1 << 7;
pub const PCI_STATUS_DEVSEL_MEDIUM: u16 = 1 << 9;
/// Error bits the guest clears by writing 1 (master data parity, target/master aborts, SERR, parity).
pub const PCI_STATUS_W1C: u16 = 0xf900;

pub const PCI_CAP_ID_MSI: u8 = 0x05;
/// MSI message control: enable, and "64-bit address capable".
pub const PCI_MSI_FLAGS_ENABLE: u16 = 1 << 0;
pub const PCI_MSI_FLAGS_64BIT: u16 = 1 << 7;
/// Size of a 64-bit MSI capability without per-vector masking.
pub const PCI_MSI_CAP_LEN_64: u8 = 14;

/// Header type bit 7: the device has functions other than 0.
pub const PCI_HEADER_MULTI_FUNCTION: u8 = 0x80;

/// QEMU's default subsystem IDs (Red Hat / QEMU), which SeaBIOS and guests are used to.
pub const DEFAULT_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
pub const DEFAULT_SUBSYSTEM_ID: u16 = 0x1100;

/// Largest guest-physical address a 64-bit BAR may decode at (exclusive); above it the BAR is
/// treated as unprogrammed (e.g. all-ones while being sized).
const MAX_MMIO64_END: u64 = 1 << 52;

/// Identity of a function, written into the header at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// 24-bit class code: base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    pub header_type: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 = none, 1 = INTA# .. 4 = INTD#.
    pub interrupt_pin: u8,
}

/// The PIO and MMIO buses BARs map onto.
#[derive(Clone, Debug)]
pub struct PciBuses {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// The device region that serves a BAR (or another chipset-decoded window such as PMBA).
#[derive(Clone)]
pub struct RegionTarget {
    pub dev: SharedDevice,
    pub region: RegionId,
    pub rules: AccessRules,
}

impl RegionTarget {
    pub fn new(dev: SharedDevice, region: RegionId, rules: AccessRules) -> Self {
        RegionTarget { dev, region, rules }
    }
}

impl std::fmt::Debug for RegionTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegionTarget(region {}, {:?})", self.region, self.rules)
    }
}

/// A window of `len` bytes that is placed on one bus at a guest-chosen address, or nowhere.
/// Overlaps are logged and leave the window unmapped; the next update retries.
pub struct Window {
    name: &'static str,
    bus: Arc<Bus>,
    target: RegionTarget,
    len: u64,
    mapped: Option<u64>,
}

impl Window {
    pub fn new(name: &'static str, bus: Arc<Bus>, target: RegionTarget, len: u64) -> Self {
        Window { name, bus, target, len, mapped: None }
    }

    /// Where the window currently decodes.
    pub fn mapped(&self) -> Option<u64> {
        self.mapped
    }

    pub fn unmap(&mut self) {
        if let Some(base) = self.mapped.take() {
            self.bus.remove(base);
            log::debug!("{}: unmapped {:#x}+{:#x} from {}", self.name, base, self.len, self.bus.name());
        }
    }

    /// Moves the window to `want` (None = unmapped).
    pub fn set(&mut self, want: Option<u64>) {
        if self.mapped == want {
            return;
        }
        self.unmap();
        self.map(want);
    }

    /// Maps at `want` if currently unmapped (second half of a two-pass update).
    fn map(&mut self, want: Option<u64>) {
        let Some(base) = want else { return };
        if self.mapped.is_some() {
            return;
        }
        let t = &self.target;
        match self.bus.insert(base, self.len, t.rules, t.dev.clone(), t.region) {
            Ok(()) => {
                self.mapped = Some(base);
                log::debug!("{}: mapped {:#x}+{:#x} on {}", self.name, base, self.len, self.bus.name());
            }
            Err(e) => {
                warn_limited!(
                    format!("pci-map-{}-{base:x}", self.name),
                    "{}: cannot map {:#x}+{:#x}: {e}; left unmapped",
                    self.name,
                    base,
                    self.len
                );
            }
        }
    }
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Window({}, {:#x} bytes on {}, at {:x?})",
            self.name,
            self.len,
            self.bus.name(),
            self.mapped
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32 {
        prefetchable: bool,
    },
    /// Occupies this BAR and the next one (high dword).
    Mem64 {
        prefetchable: bool,
    },
}

#[derive(Debug)]
struct Bar {
    kind: BarKind,
    size: u64,
    window: Window,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MsiState {
    /// MSI enable bit of the message control register.
    enabled: bool,
    /// Bus-master enable: an MSI is a memory write, so it needs it like DMA does.
    master: bool,
    addr: u64,
    data: u16,
}

/// A function's 64-bit, single-vector MSI as its device sees it. Cloneable; the [`ConfigSpace`]
/// the capability was added to keeps it in step with guest config writes, the device calls
/// [`PciMsi::signal`]. While MSI is enabled the function's INTx line is held deasserted.
#[derive(Clone)]
pub struct PciMsi {
    sink: Arc<dyn IrqSink>,
    state: Arc<Mutex<MsiState>>,
}

impl std::fmt::Debug for PciMsi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciMsi({:?})", *self.lock())
    }
}

impl PciMsi {
    pub fn new(sink: Arc<dyn IrqSink>) -> Self {
        PciMsi { sink, state: Arc::new(Mutex::new(MsiState::default())) }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, MsiState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The guest turned MSI on: interrupts go through [`Self::signal`], not INTx.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }
    /// Sends the programmed message if MSI and bus mastering are enabled; returns whether it did.
    pub fn signal(&self) -> bool {
        let s = *self.lock();
        if s.enabled && s.master {
            self.sink.signal_msi(s.addr, u32::from(s.data));
            true
        } else {
            false
        }
    }
}

/// Shared mirror of the command register, for the device that serves the BARs (e.g. to check
/// bus-master enable before DMA) without locking the PCI side.
pub type CommandWatch = Arc<AtomicU16>;

pub struct ConfigSpace {
    name: &'static str,
    data: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    w1cmask: [u8; CONFIG_SPACE_SIZE],
    reset_data: [u8; CONFIG_SPACE_SIZE],
    reset_wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; 6],
    intx: Option<PciIntx>,
    command_watch: CommandWatch,
    /// Offset of the MSI capability and the handle it drives.
    msi: Option<(u16, PciMsi)>,
    /// (offset, length) of each capability, in list order.
    caps: Vec<(u16, u16)>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("name", &self.name)
            .field("id", &format_args!("{:04x}:{:04x}", self.word(0), self.word(2)))
            .field("bars", &self.bars)
            .finish()
    }
}

impl ConfigSpace {
    /// A header with the standard writable fields (command, cache line, latency timer, interrupt
    /// line), write-1-to-clear status error bits, and a device-specific area 0x40..0xff that is
    /// plain read/write storage until the function narrows it (as QEMU does).
    pub fn new(name: &'static str, h: PciHeader) -> Self {
        let mut cs = ConfigSpace {
            name,
            data: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            w1cmask: [0; CONFIG_SPACE_SIZE],
            reset_data: [0; CONFIG_SPACE_SIZE],
            reset_wmask: [0; CONFIG_SPACE_SIZE],
            bars: Default::default(),
            intx: None,
            command_watch: Arc::new(AtomicU16::new(0)),
            msi: None,
            caps: Vec::new(),
        };
        cs.init_word(PCI_VENDOR_ID, h.vendor_id);
        cs.init_word(PCI_DEVICE_ID, h.device_id);
        cs.init_byte(PCI_REVISION_ID, h.revision);
        cs.init_byte(PCI_CLASS_PROG, h.class_code as u8);
        cs.init_word(PCI_CLASS_PROG + 1, (h.class_code >> 8) as u16);
        cs.init_byte(PCI_HEADER_TYPE, h.header_type);
        cs.init_word(PCI_SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        cs.init_word(PCI_SUBSYSTEM_ID, h.subsystem_id);
        cs.init_byte(PCI_INTERRUPT_PIN, h.interrupt_pin);
        let cmd = PCI_COMMAND_IO
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_PARITY
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE;
        cs.init_wmask_word(PCI_COMMAND, cmd);
        cs.w1cmask[PCI_STATUS as usize] = PCI_STATUS_W1C as u8;
        cs.w1cmask[PCI_STATUS as usize + 1] = (PCI_STATUS_W1C >> 8) as u8;
        cs.init_wmask(PCI_CACHE_LINE_SIZE, 0xff);
        cs.init_wmask(PCI_LATENCY_TIMER, 0xff);
        cs.init_wmask(PCI_INTERRUPT_LINE, 0xff);
        for off in 0x40..CONFIG_SPACE_SIZE as u16 {
            cs.init_wmask(off, 0xff);
        }
        cs
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    // ---- construction-time (power-on) state ----

    pub fn init_byte(&mut self, off: u16, v: u8) {
        if let Some(i) = idx(off, 1) {
            self.data[i] = v;
            self.reset_data[i] = v;
        }
    }
    pub fn init_word(&mut self, off: u16, v: u16) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.init_byte(off.wrapping_add(i as u16), b);
        }
    }
    pub fn init_dword(&mut self, off: u16, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.init_byte(off.wrapping_add(i as u16), b);
        }
    }
    /// Which bits of byte `off` the guest may write (power-on value; see [`Self::set_wmask`]).
    pub fn init_wmask(&mut self, off: u16, m: u8) {
        if let Some(i) = idx(off, 1) {
            self.wmask[i] = m;
            self.reset_wmask[i] = m;
        }
    }
    pub fn init_wmask_word(&mut self, off: u16, m: u16) {
        for (i, b) in m.to_le_bytes().into_iter().enumerate() {
            self.init_wmask(off.wrapping_add(i as u16), b);
        }
    }
    pub fn init_wmask_dword(&mut self, off: u16, m: u32) {
        for (i, b) in m.to_le_bytes().into_iter().enumerate() {
            self.init_wmask(off.wrapping_add(i as u16), b);
        }
    }
    /// Bits of byte `off` that a guest write of 1 clears (status-style).
    pub fn init_w1c(&mut self, off: u16, m: u8) {
        if let Some(i) = idx(off, 1) {
            self.w1cmask[i] = m;
        }
    }

    /// Links a read-only capability of `len` bytes with `id` at `off` (dword aligned, inside
    /// 0x40..0xff, not overlapping another one) at the end of the capability list and sets the
    /// status bit that announces the list. The body stays read-only until the caller opens bits
    /// with `init_wmask*`.
    pub fn add_capability(&mut self, id: u8, off: u8, len: u8) -> Result<(), PciError> {
        let (o, end) = (u16::from(off), u16::from(off) + u16::from(len));
        let overlaps = self.caps.iter().any(|&(c, l)| c < end && o < c + l);
        if off < 0x40 || off & 3 != 0 || len < 2 || end > CONFIG_SPACE_SIZE as u16 || overlaps {
            return Err(PciError::BadCapability(off));
        }
        for i in o..end {
            self.init_byte(i, 0);
            self.init_wmask(i, 0);
        }
        self.init_byte(o, id);
        let link = self.caps.last().map_or(PCI_CAPABILITY_LIST, |&(c, _)| c + 1);
        self.init_byte(link, off);
        self.caps.push((o, u16::from(len)));
        let st = self.word(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.init_word(PCI_STATUS, st);
        Ok(())
    }

    /// Adds a 64-bit MSI capability with one vector and no masking at `off` (guest-writable:
    /// enable, address, data), driving `msi`.
    pub fn add_msi(&mut self, off: u8, msi: PciMsi) -> Result<(), PciError> {
        self.add_capability(PCI_CAP_ID_MSI, off, PCI_MSI_CAP_LEN_64)?;
        let o = u16::from(off);
        self.init_word(o + 2, PCI_MSI_FLAGS_64BIT);
        self.init_wmask_word(o + 2, PCI_MSI_FLAGS_ENABLE);
        self.init_wmask_dword(o + 4, 0xffff_fffc);
        self.init_wmask_dword(o + 8, 0xffff_ffff);
        self.init_wmask_word(o + 12, 0xffff);
        self.msi = Some((o, msi));
        self.refresh_msi();
        Ok(())
    }

    /// Brings the MSI handle and the INTx gate in line with the registers: MSI enabled turns
    /// INTx off (PCI 3.0 §6.8.1.3), like the command register's INTx-disable bit does.
    fn refresh_msi(&mut self) {
        let cmd = self.command();
        let mut msi_on = false;
        if let Some((o, msi)) = &self.msi {
            let o = *o;
            let st = MsiState {
                enabled: self.word(o + 2) & PCI_MSI_FLAGS_ENABLE != 0,
                master: cmd & PCI_COMMAND_MASTER != 0,
                addr: u64::from(self.dword(o + 4)) | (u64::from(self.dword(o + 8)) << 32),
                data: self.word(o + 12),
            };
            msi_on = st.enabled;
            *msi.lock() = st;
        }
        if let Some(intx) = &self.intx {
            intx.set_disabled(cmd & PCI_COMMAND_INTX_DISABLE != 0 || msi_on);
        }
    }

    /// Registers BAR `index` (0..=5) of `size` bytes served by `target`. A 64-bit BAR also takes
    /// `index + 1`. Sizes: power of two, I/O 4..=64 KiB, memory >= 16 (32-bit <= 2 GiB).
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        target: RegionTarget,
        buses: &PciBuses,
    ) -> Result<(), PciError> {
        let slots = if matches!(kind, BarKind::Mem64 { .. }) { 2 } else { 1 };
        if index + slots > 6 {
            return Err(PciError::BadBarIndex(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 0x1_0000),
            BarKind::Mem32 { .. } => (16, 1 << 31),
            BarKind::Mem64 { .. } => (16, 1 << 62),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BadBarSize(size));
        }
        if self.bars[index..index + slots].iter().any(Option::is_some) || self.is_bar_high_half(index) {
            return Err(PciError::BarInUse(index));
        }
        let off = PCI_BAR0 + 4 * index as u16;
        let mask = !(size - 1);
        let (bus, low_ro, low_mask) = match kind {
            BarKind::Io => (buses.pio.clone(), 0x1, mask as u32 & !0x3),
            BarKind::Mem32 { prefetchable } => {
                (buses.mmio.clone(), (prefetchable as u32) << 3, mask as u32 & !0xf)
            }
            BarKind::Mem64 { prefetchable } => {
                (buses.mmio.clone(), 0x4 | (prefetchable as u32) << 3, mask as u32 & !0xf)
            }
        };
        self.init_dword(off, low_ro);
        self.init_wmask_dword(off, low_mask);
        if slots == 2 {
            self.init_dword(off + 4, 0);
            self.init_wmask_dword(off + 4, (mask >> 32) as u32);
        }
        let window = Window::new(self.name, bus, target, size);
        self.bars[index] = Some(Bar { kind, size, window });
        Ok(())
    }

    fn is_bar_high_half(&self, index: usize) -> bool {
        index > 0 && matches!(&self.bars[index - 1], Some(b) if matches!(b.kind, BarKind::Mem64 { .. }))
    }

    /// Attaches the function's INTx line; INTx-disable and status bit 3 then follow it.
    pub fn attach_intx(&mut self, intx: PciIntx) {
        self.intx = Some(intx);
        self.refresh_msi();
    }

    pub fn command_watch(&self) -> CommandWatch {
        self.command_watch.clone()
    }

    // ---- runtime access ----

    pub fn byte(&self, off: u16) -> u8 {
        idx(off, 1).map_or(0xff, |i| self.data[i])
    }
    pub fn word(&self, off: u16) -> u16 {
        u16::from_le_bytes([self.byte(off), self.byte(off.wrapping_add(1))])
    }
    pub fn dword(&self, off: u16) -> u32 {
        let b = |i: u16| self.byte(off.wrapping_add(i));
        u32::from_le_bytes([b(0), b(1), b(2), b(3)])
    }
    pub fn command(&self) -> u16 {
        self.word(PCI_COMMAND)
    }
    /// Device-side update of a register (bypasses write masks; not part of the reset state).
    pub fn set_byte(&mut self, off: u16, v: u8) {
        if let Some(i) = idx(off, 1) {
            self.data[i] = v;
        }
    }
    /// Device-side change of the guest write mask (e.g. lock bits); reset restores the init mask.
    pub fn set_wmask(&mut self, off: u16, m: u8) {
        if let Some(i) = idx(off, 1) {
            self.wmask[i] = m;
        }
    }

    /// Guest read of the dword at `reg` (low two bits ignored; beyond 0xff reads all-ones).
    pub fn read(&self, reg: u16) -> u32 {
        let reg = reg & !3;
        if idx(reg, 4).is_none() {
            return u32::MAX;
        }
        let mut v = self.dword(reg);
        if reg == PCI_COMMAND {
            // Interrupt status reflects the device's line, whether or not INTx is disabled.
            let pending = self.intx.as_ref().is_some_and(PciIntx::level);
            v = (v & !((PCI_STATUS_INTERRUPT as u32) << 16)) | ((pending as u32) << 19);
        }
        v
    }

    /// Guest write of the bytes of `value` enabled in `byte_mask` (bit i = byte `reg + i`).
    /// Returns the dword as it was before, so functions can act on changed registers.
    pub fn write(&mut self, reg: u16, value: u32, byte_mask: u8) -> u32 {
        let reg = reg & !3;
        let Some(base) = idx(reg, 4) else {
            warn_limited!(
                format!("pci-cfg-oob-{}", self.name),
                "{}: config write beyond 256 bytes at {reg:#x} ignored",
                self.name
            );
            return u32::MAX;
        };
        let old = self.dword(reg);
        for i in 0..4 {
            if byte_mask & (1 << i) == 0 {
                continue;
            }
            let v = (value >> (8 * i)) as u8;
            let (w, c) = (self.wmask[base + i], self.w1cmask[base + i]);
            let d = &mut self.data[base + i];
            *d = (*d & !w) | (v & w);
            *d &= !(v & c);
        }
        let cmd_touched = reg == PCI_COMMAND && byte_mask & 0x3 != 0;
        if cmd_touched {
            let cmd = self.command();
            self.command_watch.store(cmd, Ordering::Release);
        }
        let msi_touched = self.msi.as_ref().is_some_and(|(o, _)| (*o & !3..*o + 16).contains(&reg));
        if cmd_touched || msi_touched {
            self.refresh_msi();
        }
        if cmd_touched || (PCI_BAR0..PCI_BAR0 + 24).contains(&reg) {
            self.update_bars();
        }
        old
    }

    /// Address BAR `index` decodes at now (None when decode is off or the address is not sane).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?.as_ref()?;
        let off = PCI_BAR0 + 4 * index as u16;
        let low = self.dword(off) as u64;
        let cmd = self.command();
        let (addr, last_limit, decode) = match bar.kind {
            BarKind::Io => (low & !0x3, 0xffff, cmd & PCI_COMMAND_IO != 0),
            BarKind::Mem32 { .. } => (low & !0xf, u32::MAX as u64, cmd & PCI_COMMAND_MEMORY != 0),
            BarKind::Mem64 { .. } => {
                let high = self.dword(off + 4) as u64;
                ((high << 32) | (low & !0xf), MAX_MMIO64_END - 1, cmd & PCI_COMMAND_MEMORY != 0)
            }
        };
        // 0 means unprogrammed, and an end at or beyond the decode limit is what sizing leaves
        // behind (all-ones), so neither decodes (QEMU's rule too).
        let last = addr.checked_add(bar.size - 1)?;
        (decode && addr != 0 && last < last_limit).then_some(addr)
    }

    /// Where BAR `index` is actually mapped on its bus.
    pub fn bar_mapped(&self, index: usize) -> Option<u64> {
        self.bars.get(index)?.as_ref()?.window.mapped()
    }

    fn update_bars(&mut self) {
        let want: Vec<Option<u64>> = (0..6).map(|i| self.bar_address(i)).collect();
        // Unmap everything that moves first, so two BARs swapping places do not collide.
        for (bar, want) in self.bars.iter_mut().zip(&want) {
            if let Some(bar) = bar {
                if bar.window.mapped() != *want {
                    bar.window.unmap();
                }
            }
        }
        for (bar, want) in self.bars.iter_mut().zip(&want) {
            if let Some(bar) = bar {
                bar.window.map(*want);
            }
        }
    }

    /// Power-on state: registers and masks restored, BARs unmapped, INTx deasserted.
    pub fn reset(&mut self) {
        for bar in self.bars.iter_mut().flatten() {
            bar.window.unmap();
        }
        self.data = self.reset_data;
        self.wmask = self.reset_wmask;
        let cmd = self.command();
        self.command_watch.store(cmd, Ordering::Release);
        if let Some(intx) = &self.intx {
            intx.set_level(false);
        }
        self.refresh_msi();
        self.update_bars();
    }
}

/// Index of `off` in the config array if `len` bytes from it fit.
fn idx(off: u16, len: usize) -> Option<usize> {
    let i = off as usize;
    (i + len <= CONFIG_SPACE_SIZE).then_some(i)
}

// ---- save/restore ----

/// A config space decoded from a device-state stream, validated against the space it goes into.
#[derive(Debug, Clone)]
pub struct ConfigSpaceState {
    data: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
}

impl ConfigSpaceState {
    pub fn byte(&self, off: u16) -> u8 {
        idx(off, 1).map_or(0xff, |i| self.data[i])
    }
}

impl ConfigSpace {
    /// Writes the 256 register bytes and the current write masks (devices narrow masks at run
    /// time, e.g. the i440FX SMRAM lock). BAR mappings follow from the registers on restore.
    pub fn save_state(&self, w: &mut crate::snapshot::SectionWriter) {
        w.put_raw(&self.data);
        w.put_raw(&self.wmask);
    }

    /// Reads what [`Self::save_state`] wrote and checks it could have come from a guest driving
    /// this function: bits no guest write can change (identity, BAR type bits, hard-wired bits)
    /// must hold their power-on values, and masks may only be narrower than at power-on.
    pub fn decode_state(
        &self,
        r: &mut crate::snapshot::SectionReader<'_>,
    ) -> Result<ConfigSpaceState, crate::snapshot::SnapshotError> {
        let data = r.get_array::<CONFIG_SPACE_SIZE>()?;
        let wmask = r.get_array::<CONFIG_SPACE_SIZE>()?;
        for i in 0..CONFIG_SPACE_SIZE {
            let fixed = !(self.reset_wmask[i] | self.w1cmask[i]);
            if (data[i] ^ self.reset_data[i]) & fixed != 0 {
                return Err(r.bad(format!(
                    "{}: read-only config byte {i:#04x} is {:#04x}, expected {:#04x}",
                    self.name, data[i], self.reset_data[i]
                )));
            }
            if wmask[i] & !self.reset_wmask[i] != 0 {
                return Err(r.bad(format!("{}: write mask of config byte {i:#04x} widened", self.name)));
            }
        }
        Ok(ConfigSpaceState { data, wmask })
    }

    /// Installs a decoded state with the effects of the guest writes that produced it: the
    /// command mirror and INTx-disable follow the command register and the BARs are (re)mapped.
    /// The INTx level is the device's to restore.
    pub fn apply_state(&mut self, st: &ConfigSpaceState) {
        self.data = st.data;
        self.wmask = st.wmask;
        let cmd = self.command();
        self.command_watch.store(cmd, Ordering::Release);
        self.refresh_msi();
        self.update_bars();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusDevice, IoResult};
    use crate::irq::{IrqEvent, RecordingIrqSink};
    use std::sync::Mutex;

    /// Records accesses; reads return 0x5a.
    #[derive(Default)]
    pub(crate) struct Probe {
        pub calls: Vec<(RegionId, char, u64, usize)>,
    }
    impl BusDevice for Probe {
        fn read(&mut self, r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
            data.fill(0x5a);
            self.calls.push((r, 'r', offset, data.len()));
            IoResult::Done
        }
        fn write(&mut self, r: RegionId, offset: u64, data: &[u8]) -> IoResult {
            self.calls.push((r, 'w', offset, data.len()));
            IoResult::Done
        }
    }

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision: 1,
            class_code: 0x020000,
            header_type: 0,
            subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
            subsystem_id: DEFAULT_SUBSYSTEM_ID,
            interrupt_pin: 1,
        }
    }

    fn setup() -> (ConfigSpace, PciBuses, Arc<Mutex<Probe>>) {
        let buses = PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) };
        let probe = Arc::new(Mutex::new(Probe::default()));
        let t = |r| RegionTarget::new(probe.clone(), r, AccessRules::DWORD_ANY);
        let mut cs = ConfigSpace::new("test", header());
        cs.add_bar(0, BarKind::Io, 0x20, t(0), &buses).unwrap();
        cs.add_bar(1, BarKind::Mem32 { prefetchable: false }, 0x1000, t(1), &buses).unwrap();
        cs.add_bar(2, BarKind::Mem64 { prefetchable: true }, 0x4000, t(2), &buses).unwrap();
        (cs, buses, probe)
    }

    #[test]
    fn header_fields() {
        let (cs, _, _) = setup();
        assert_eq!(cs.read(0), 0x5678_1234);
        assert_eq!(cs.read(8), 0x0200_0001);
        assert_eq!(cs.read(0x2c), 0x1100_1af4);
        assert_eq!(cs.read(0x3c), 0x0000_0100);
        assert_eq!(cs.read(0x100), u32::MAX);
    }

    #[test]
    fn read_only_fields_ignore_writes_and_masks_apply() {
        let (mut cs, _, _) = setup();
        cs.write(0, 0xffff_ffff, 0xf);
        assert_eq!(cs.read(0), 0x5678_1234);
        cs.write(0x3c, 0xffff_ff0b, 0x1);
        assert_eq!(cs.read(0x3c) & 0xffff, 0x010b);
        // Byte enables: only byte 2 of the dword at 0x40 changes.
        cs.write(0x40, 0xaabb_ccdd, 0x4);
        assert_eq!(cs.read(0x40), 0x00bb_0000);
        // Command: reserved bits stay 0.
        cs.write(4, 0xffff, 0x3);
        assert_eq!(cs.command(), 0x0547);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let (mut cs, _, _) = setup();
        cs.set_byte(7, 0xf9);
        cs.write(4, 0x0800_0000, 0xc); // clear bit 11 only
        assert_eq!(cs.word(PCI_STATUS), 0xf100);
        cs.write(4, 0x0000_0003, 0x3); // command write leaves status alone
        assert_eq!(cs.word(PCI_STATUS), 0xf100);
        cs.write(4, 0xffff_0000, 0xc);
        assert_eq!(cs.word(PCI_STATUS), 0);
    }

    #[test]
    fn bar_sizing_each_kind() {
        let (mut cs, _, _) = setup();
        for reg in (0x10..0x28).step_by(4) {
            cs.write(reg, u32::MAX, 0xf);
        }
        assert_eq!(cs.read(0x10), 0xffff_ffe1, "I/O 32 bytes");
        assert_eq!(cs.read(0x14), 0xffff_f000, "mem32 4 KiB");
        assert_eq!(cs.read(0x18), 0xffff_c00c, "mem64 prefetchable 16 KiB low");
        assert_eq!(cs.read(0x1c), 0xffff_ffff, "mem64 high");
        assert_eq!(cs.read(0x20), 0, "unimplemented BAR");
        // All-ones while decode is on maps nothing.
        cs.write(4, 3, 0x3);
        assert!((0..6).all(|i| cs.bar_mapped(i).is_none()));
    }

    #[test]
    fn bar_maps_only_with_decode_and_moves() {
        let (mut cs, buses, probe) = setup();
        cs.write(0x10, 0xc000, 0xf);
        cs.write(0x14, 0xfeb0_0000, 0xf);
        assert!(!buses.pio.is_claimed(0xc000));
        let mut d = [0u8; 4];
        buses.pio.read_sync(0xc004, &mut d);
        assert_eq!(d, [0xff; 4], "no decode before the command bit");
        assert!(probe.lock().unwrap().calls.is_empty());
        cs.write(4, PCI_COMMAND_IO as u32, 0x3);
        buses.pio.read_sync(0xc004, &mut d);
        assert_eq!(d, [0x5a; 4]);
        assert_eq!(probe.lock().unwrap().calls, vec![(0, 'r', 4, 4)]);
        assert!(!buses.mmio.is_claimed(0xfeb0_0000), "memory decode still off");
        cs.write(4, (PCI_COMMAND_IO | PCI_COMMAND_MEMORY) as u32, 0x3);
        buses.mmio.write_sync(0xfeb0_0010, &[1, 2, 3, 4]);
        assert_eq!(probe.lock().unwrap().calls[1], (1, 'w', 0x10, 4));
        // Move the I/O BAR.
        cs.write(0x10, 0xd000, 0xf);
        assert!(!buses.pio.is_claimed(0xc000));
        assert!(buses.pio.is_claimed(0xd01f));
        // Decode off: nothing reaches the probe.
        cs.write(4, 0, 0x3);
        probe.lock().unwrap().calls.clear();
        buses.pio.read_sync(0xd000, &mut d);
        buses.mmio.read_sync(0xfeb0_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert!(probe.lock().unwrap().calls.is_empty());
    }

    #[test]
    fn bar64_maps_above_4g_and_reset_unmaps() {
        let (mut cs, buses, _) = setup();
        cs.write(0x18, 0x8000_0000, 0xf);
        cs.write(0x1c, 0x2, 0xf);
        cs.write(4, PCI_COMMAND_MEMORY as u32, 0x3);
        assert_eq!(cs.bar_mapped(2), Some(0x2_8000_0000));
        assert!(buses.mmio.is_claimed(0x2_8000_3fff));
        cs.reset();
        assert!(!buses.mmio.is_claimed(0x2_8000_0000));
        assert_eq!(cs.read(0x18), 0xc);
        assert_eq!(cs.command(), 0);
    }

    #[test]
    fn overlap_is_logged_not_fatal_and_retried() {
        let (mut cs, buses, probe) = setup();
        let other = Arc::new(Mutex::new(Probe::default()));
        buses.pio.insert(0xc010, 4, AccessRules::DWORD_ANY, other, 0).unwrap();
        cs.write(0x10, 0xc000, 0xf);
        cs.write(4, 1, 0x3);
        assert_eq!(cs.bar_mapped(0), None);
        assert!(buses.pio.remove(0xc010));
        cs.write(4, 1, 0x3);
        assert_eq!(cs.bar_mapped(0), Some(0xc000));
        let mut d = [0u8; 1];
        buses.pio.read_sync(0xc010, &mut d);
        assert_eq!(probe.lock().unwrap().calls.len(), 1);
    }

    #[test]
    fn bad_bar_registration_is_an_error() {
        let (mut cs, buses, probe) = setup();
        let t = RegionTarget::new(probe, 9, AccessRules::DWORD_ANY);
        assert_eq!(cs.add_bar(3, BarKind::Io, 4, t.clone(), &buses), Err(PciError::BarInUse(3)));
        assert_eq!(cs.add_bar(4, BarKind::Io, 3, t.clone(), &buses), Err(PciError::BadBarSize(3)));
        let m64 = BarKind::Mem64 { prefetchable: false };
        assert_eq!(cs.add_bar(5, m64, 16, t.clone(), &buses), Err(PciError::BadBarIndex(5)));
        assert!(cs.add_bar(4, m64, 1 << 33, t, &buses).is_ok());
        cs.write(0x20, u32::MAX, 0xf);
        cs.write(0x24, u32::MAX, 0xf);
        assert_eq!((cs.read(0x20), cs.read(0x24)), (0x4, 0xffff_fffe));
    }

    #[test]
    fn intx_follows_disable_bit_and_status() {
        let sink = Arc::new(RecordingIrqSink::default());
        let (mut cs, _, _) = setup();
        let intx = PciIntx::new(sink.clone(), 3, 0);
        cs.attach_intx(intx.clone());
        intx.set_level(true);
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
        assert_ne!(cs.read(4) & (1 << 19), 0);
        cs.write(4, PCI_COMMAND_INTX_DISABLE as u32, 0x3);
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, false)]);
        assert_ne!(cs.read(4) & (1 << 19), 0, "status still shows the pending interrupt");
        cs.write(4, 0, 0x3);
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
        cs.reset();
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, false)]);
        assert_eq!(cs.read(4), 0);
    }

    #[test]
    fn out_of_range_writes_are_ignored() {
        let (mut cs, _, _) = setup();
        assert_eq!(cs.write(0x100, 0, 0xf), u32::MAX);
        assert_eq!(cs.write(0xfff, 0, 0xf), u32::MAX);
        assert_eq!(cs.read(0xfffc), u32::MAX);
    }

    #[test]
    fn capability_list_and_msi() {
        let sink = Arc::new(RecordingIrqSink::default());
        let (mut cs, _, _) = setup();
        let intx = PciIntx::new(sink.clone(), 3, 0);
        cs.attach_intx(intx.clone());
        let msi = PciMsi::new(sink.clone());
        cs.add_msi(0x80, msi.clone()).unwrap();
        cs.add_capability(0x12, 0xa8, 8).unwrap();
        assert_eq!(cs.add_capability(0x09, 0x84, 4), Err(PciError::BadCapability(0x84)), "overlap");
        assert_eq!(cs.add_capability(0x09, 0x3c, 4), Err(PciError::BadCapability(0x3c)));
        assert_eq!(cs.add_capability(0x09, 0xfe, 4), Err(PciError::BadCapability(0xfe)));
        assert_ne!(cs.read(4) & (u32::from(PCI_STATUS_CAP_LIST) << 16), 0);
        assert_eq!(cs.read(0x34), 0x80);
        assert_eq!(cs.read(0x80), 0x0080_a805, "MSI id, next 0xa8, 64-bit, disabled");
        assert_eq!(cs.read(0xa8) & 0xffff, 0x0012, "last in the list");
        // Read-only parts ignore writes; the rest of 0x40..0xff stays plain storage.
        cs.write(0x80, 0xffff_ffff, 0xf);
        assert_eq!(cs.read(0x80), 0x0081_a805);
        cs.write(0x80, 0, 0xf);
        cs.write(0x84, 0xfee0_0003, 0xf);
        cs.write(0x88, 0x1, 0xf);
        cs.write(0x8c, 0xdead_0041, 0x3);
        assert_eq!((cs.read(0x84), cs.read(0x88), cs.read(0x8c)), (0xfee0_0000, 1, 0x41));
        cs.write(0xa8, u32::MAX, 0xf);
        assert_eq!(cs.read(0xa8) & 0xffff, 0x0012);
        cs.write(0x40, 0x1234, 0xf);
        assert_eq!(cs.read(0x40), 0x1234);

        // Disabled: nothing sent, INTx works.
        assert!(!msi.enabled() && !msi.signal());
        intx.set_level(true);
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
        // Enabled without bus mastering: INTx is off, the message is held back.
        cs.write(0x80, 1 << 16, 0x4);
        assert!(msi.enabled());
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, false)]);
        assert!(!msi.signal());
        cs.write(4, PCI_COMMAND_MASTER as u32, 0x3);
        assert!(msi.signal());
        assert_eq!(sink.take(), vec![IrqEvent::Msi(0x1_fee0_0000, 0x41)]);
        // Disabling MSI gives the pending INTx level back; reset clears everything.
        cs.write(0x80, 0, 0x4);
        assert_eq!(sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
        cs.write(0x80, 1 << 16, 0x4);
        sink.take();
        cs.reset();
        assert!(!msi.enabled());
        assert_eq!(cs.read(0x84), 0);
        assert_eq!(cs.read(0x34), 0x80);
    }

    #[test]
    fn msi_state_survives_save_restore() {
        let sink = Arc::new(RecordingIrqSink::default());
        let (mut a, _, _) = setup();
        let ma = PciMsi::new(sink.clone());
        a.add_msi(0x80, ma).unwrap();
        a.write(4, PCI_COMMAND_MASTER as u32, 0x3);
        a.write(0x84, 0xfee0_1000, 0xf);
        a.write(0x8c, 0x51, 0xf);
        a.write(0x80, 1 << 16, 0x4);
        let mut w = crate::snapshot::SectionWriter::new();
        a.save_state(&mut w);
        let (mut b, _, _) = setup();
        let mb = PciMsi::new(sink.clone());
        b.add_msi(0x80, mb.clone()).unwrap();
        let mut r = crate::snapshot::SectionReader::new("t", w.as_bytes());
        let st = b.decode_state(&mut r).unwrap();
        b.apply_state(&st);
        assert!(mb.signal());
        assert_eq!(sink.take(), vec![IrqEvent::Msi(0xfee0_1000, 0x51)]);
    }
}
