//! PCI for an i440FX/PIIX3 PC: configuration spaces with BARs ([`ConfigSpace`]), the bus-0 function
//! table ([`PciRoot`]), configuration mechanism #1 plus the PIIX3 reset control register at
//! 0xCF8..0xCFF ([`PciConfigIo`]), INTx lines ([`PciIntx`]) and the chipset functions hvmloader,
//! SeaBIOS and OVMF expect (00:00.0 host bridge, 00:01.0 ISA, 00:01.1 IDE, 00:01.3 PM).
//!
//! Config access is dword-granular with byte enables ([`PciFunction`]), so a Xen
//! IOREQ_TYPE_PCI_CONFIG (SBDF + reg + size) goes through [`PciRoot::config_read`] /
//! [`PciRoot::config_write`] exactly like a CF8/CFC access does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::bus::{AccessRules, BusDevice, IoResult, RegionId};
use crate::irq::IrqSink;
use crate::platform::{PlatformControl, SystemEvent};
use crate::warn_limited;

mod config;
mod i440fx;
mod piix;

pub use config::*;
pub use i440fx::*;
pub use piix::*;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR index {0} out of range")]
    BadBarIndex(usize),
    #[error("BAR size {0:#x} invalid")]
    BadBarSize(u64),
    #[error("BAR {0} already registered")]
    BarInUse(usize),
    #[error("devfn {0:#04x} already populated")]
    DevfnInUse(u8),
    #[error("capability at {0:#04x} does not fit the device-specific area")]
    BadCapability(u8),
}

/// One PCI function's configuration space, as the config mechanism sees it.
pub trait PciFunction: Send {
    /// Reads the dword at `reg` (dword-aligned; low bits are ignored; 0..256).
    fn config_read(&mut self, reg: u16) -> u32;
    /// Writes the bytes of `value` enabled in `byte_mask` (bit i = byte `reg + i`).
    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8);
    /// Power-on state (unmaps BARs and windows, reports chipset state to the backend).
    fn reset(&mut self);
}

pub type SharedPciFunction = Arc<Mutex<dyn PciFunction>>;

/// devfn of `slot` (0..31), `func` (0..7).
pub const fn devfn(slot: u8, func: u8) -> u8 {
    (slot & 0x1f) << 3 | (func & 7)
}

pub const DEVFN_HOST_BRIDGE: u8 = devfn(0, 0);
pub const DEVFN_PIIX3_ISA: u8 = devfn(1, 0);
pub const DEVFN_PIIX3_IDE: u8 = devfn(1, 1);
pub const DEVFN_PIIX4_PM: u8 = devfn(1, 3);

#[derive(Debug, Clone, Copy)]
struct IntxState {
    level: bool,
    disabled: bool,
    /// What the sink was last told.
    line: bool,
}

/// The INTx line of one function: `pin` 0 = INTA# of device `slot` on bus 0. Cloneable; the
/// device raises it, its [`ConfigSpace`] gates it with the command register's INTx-disable bit.
/// The sink is only called when the effective line changes.
#[derive(Clone)]
pub struct PciIntx {
    sink: Arc<dyn IrqSink>,
    slot: u8,
    pin: u8,
    state: Arc<Mutex<IntxState>>,
}

impl std::fmt::Debug for PciIntx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciIntx(slot {}, pin {})", self.slot, self.pin)
    }
}

impl PciIntx {
    pub fn new(sink: Arc<dyn IrqSink>, slot: u8, pin: u8) -> Self {
        let state = IntxState { level: false, disabled: false, line: false };
        PciIntx { sink, slot, pin: pin & 3, state: Arc::new(Mutex::new(state)) }
    }
    pub fn slot(&self) -> u8 {
        self.slot
    }
    pub fn pin(&self) -> u8 {
        self.pin
    }
    /// The device's interrupt condition.
    pub fn set_level(&self, level: bool) {
        self.update(|s| s.level = level);
    }
    /// The device's interrupt condition as last set (PCI status bit 3).
    pub fn level(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).level
    }
    /// Command register INTx-disable (set by [`ConfigSpace`]).
    pub fn set_disabled(&self, disabled: bool) {
        self.update(|s| s.disabled = disabled);
    }
    fn update(&self, f: impl FnOnce(&mut IntxState)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        let line = s.level && !s.disabled;
        if line != s.line {
            s.line = line;
            // Called under the lock so concurrent updates reach the sink in order.
            self.sink.set_pci_intx(self.slot, self.pin, line);
        }
    }
}

/// Bus 0: functions indexed by devfn. Absent functions, other buses and offsets beyond 0xff read
/// all-ones and ignore writes.
#[derive(Default)]
pub struct PciRoot {
    functions: BTreeMap<u8, SharedPciFunction>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciRoot({:02x?})", self.functions.keys().collect::<Vec<_>>())
    }
}

impl PciRoot {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, devfn: u8, f: SharedPciFunction) -> Result<(), PciError> {
        if self.functions.contains_key(&devfn) {
            return Err(PciError::DevfnInUse(devfn));
        }
        self.functions.insert(devfn, f);
        Ok(())
    }

    /// Removes a function (hot-unplug); it is reset first so its BARs stop decoding.
    pub fn remove(&mut self, devfn: u8) -> Option<SharedPciFunction> {
        let f = self.functions.remove(&devfn)?;
        f.lock().unwrap_or_else(|p| p.into_inner()).reset();
        Some(f)
    }

    /// Populated devfns, ascending (for Xen's map_pcidev).
    pub fn devfns(&self) -> Vec<u8> {
        self.functions.keys().copied().collect()
    }

    pub fn get(&self, devfn: u8) -> Option<SharedPciFunction> {
        self.functions.get(&devfn).cloned()
    }

    /// Splits an access of `size` bytes at `offset` into (dword, shift, byte mask), or None if it
    /// is not a 1/2/4-byte access inside one dword of the 256-byte space.
    fn decode(bus: u8, offset: u16, size: u8) -> Option<(u16, u32, u8)> {
        let shift = (offset & 3) as u32;
        if bus != 0 || offset >= 0x100 || !matches!(size, 1 | 2 | 4) || shift + size as u32 > 4 {
            return None;
        }
        let mask = (((1u16 << size) - 1) << shift) as u8;
        Some((offset & !3, shift * 8, mask))
    }

    /// Config read of `size` (1, 2, 4) bytes at `offset`.
    pub fn config_read(&self, bus: u8, devfn: u8, offset: u16, size: u8) -> u32 {
        let all_ones = if size >= 4 { u32::MAX } else { (1u32 << (8 * size as u32)) - 1 };
        let Some((reg, shift, _)) = Self::decode(bus, offset, size) else {
            if bus == 0 {
                warn_limited!(
                    format!("pci-cfg-bad-{offset:x}-{size}"),
                    "pci: config read of {size} bytes at {offset:#x} rejected"
                );
            }
            return all_ones;
        };
        let Some(f) = self.functions.get(&devfn) else { return all_ones };
        let v = f.lock().unwrap_or_else(|p| p.into_inner()).config_read(reg);
        (v >> shift) & all_ones
    }

    /// Config write of `size` (1, 2, 4) bytes at `offset`.
    pub fn config_write(&self, bus: u8, devfn: u8, offset: u16, size: u8, value: u32) {
        let Some((reg, shift, mask)) = Self::decode(bus, offset, size) else {
            if bus == 0 {
                warn_limited!(
                    format!("pci-cfg-bad-{offset:x}-{size}"),
                    "pci: config write of {size} bytes at {offset:#x} dropped"
                );
            }
            return;
        };
        let Some(f) = self.functions.get(&devfn) else { return };
        f.lock().unwrap_or_else(|p| p.into_inner()).config_write(reg, value << shift, mask);
    }

    /// Resets every function.
    pub fn reset(&self) {
        for f in self.functions.values() {
            f.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }
}

pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// CONFIG_ADDRESS bits that exist: enable, bus, device, function, register (dword).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// PIIX3 RCR: bit 1 SYS_RST (stored), bit 2 RST_CPU (resets).
const RCR_SYS_RST: u8 = 1 << 1;
const RCR_RST_CPU: u8 = 1 << 2;

/// Ports 0xCF8..0xCFF: CONFIG_ADDRESS (dword at 0xCF8), CONFIG_DATA (0xCFC..0xCFF, 1/2/4 bytes)
/// and the PIIX3 Reset Control Register (byte at 0xCF9). The chipset decodes by width, so this is
/// one region and the handler looks at offset and size.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    platform: Arc<dyn PlatformControl>,
    address: u32,
    rcr: u8,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciConfigIo(address {:#x}, rcr {:#x})", self.address, self.rcr)
    }
}

impl PciConfigIo {
    /// Region id of 0xCF8..0xCFF.
    pub const REGION: RegionId = 0;
    /// 1..4 bytes, delivered as is, naturally aligned (unaligned accesses are rejected by the bus).
    pub const RULES: AccessRules = AccessRules::DWORD_ANY;

    pub fn new(root: Arc<Mutex<PciRoot>>, platform: Arc<dyn PlatformControl>) -> Self {
        PciConfigIo { root, platform, address: 0, rcr: 0 }
    }

    /// The latched CONFIG_ADDRESS.
    pub fn config_address(&self) -> u32 {
        self.address
    }

    /// Clears CONFIG_ADDRESS and the RCR. (The functions are reset through [`PciRoot::reset`].)
    pub fn reset(&mut self) {
        self.address = 0;
        self.rcr = 0;
    }

    /// (bus, devfn, register) addressed by CONFIG_ADDRESS, if enabled.
    fn target(&self) -> Option<(u8, u8, u16)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then_some(((a >> 16) as u8, (a >> 8) as u8, (a & 0xfc) as u16))
    }

    fn root(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let size = data.len();
        let v: u32 = match (offset, size) {
            (0, 4) => self.address,
            (1, 1) => self.rcr as u32,
            (4..=7, 1 | 2 | 4) => match self.target() {
                Some((bus, devfn, reg)) => {
                    self.root().config_read(bus, devfn, reg | (offset as u16 - 4), size as u8)
                }
                None => u32::MAX,
            },
            _ => {
                // Byte/word accesses to 0xCF8/0xCFA go nowhere on a PIIX3 system.
                warn_limited!(
                    format!("pci-cf8-{offset}-{size}"),
                    "pci: {size}-byte read at {:#x} unclaimed",
                    PCI_CONFIG_IO_BASE + offset
                );
                u32::MAX
            }
        };
        let bytes = v.to_le_bytes();
        let n = size.min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let size = data.len();
        let mut b = [0u8; 4];
        let n = size.min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match (offset, size) {
            (0, 4) => self.address = v & CONFIG_ADDRESS_MASK,
            (1, 1) => {
                let v = v as u8;
                if v & RCR_RST_CPU != 0 {
                    log::info!("pci: reset requested through 0xcf9 ({v:#x})");
                    self.platform.request(SystemEvent::Reset);
                } else {
                    self.rcr = v & RCR_SYS_RST;
                }
            }
            (4..=7, 1 | 2 | 4) => {
                if let Some((bus, devfn, reg)) = self.target() {
                    self.root().config_write(bus, devfn, reg | (offset as u16 - 4), size as u8, v);
                }
            }
            _ => {
                warn_limited!(
                    format!("pci-cf8-w-{offset}-{size}"),
                    "pci: {size}-byte write of {v:#x} at {:#x} ignored",
                    PCI_CONFIG_IO_BASE + offset
                );
            }
        }
        IoResult::Done
    }
}

/// Section "pci-config-io", version 1: the CONFIG_ADDRESS latch and the RCR. The functions
/// behind it have their own sections.
impl crate::snapshot::Snapshot for PciConfigIo {
    fn section(&self) -> &'static str {
        "pci-config-io"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut crate::snapshot::SectionWriter) {
        w.put_u32(self.address);
        w.put_u8(self.rcr);
    }
    fn decode(
        &self,
        version: u32,
        r: &mut crate::snapshot::SectionReader<'_>,
    ) -> Result<crate::snapshot::PendingState, crate::snapshot::SnapshotError> {
        crate::snapshot::check_version(r, version, 1)?;
        let address = r.get_u32()?;
        let rcr = r.get_u8()?;
        if address & !CONFIG_ADDRESS_MASK != 0 || rcr & !RCR_SYS_RST != 0 {
            return Err(r.bad(format!("CONFIG_ADDRESS {address:#x} / RCR {rcr:#x}")));
        }
        Ok(crate::snapshot::PendingState::new((address, rcr)))
    }
    fn apply(&mut self, state: crate::snapshot::PendingState) -> Result<(), crate::snapshot::SnapshotError> {
        (self.address, self.rcr) = state.downcast(self.section())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
