//! Builds the device graph from a MachineConfig; shared by both backends.
//! (Temporary minimal graph while the device modules land.)

use std::sync::{Arc, Mutex};

use hvmdm_devices::bus::{AccessRules, Bus, BusDevice, BusError, IoResult, RegionId};
use hvmdm_devices::irq::IrqSink;
use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::platform::{PlatformControl, ShadowControl};
use hvmdm_devices::topology::Topology;
use thiserror::Error;

use crate::config::MachineConfig;

#[derive(Debug, Error)]
pub enum MachineError {
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
}

/// What a backend gives the machine.
pub struct MachineEnv {
    pub mem: Arc<dyn GuestRam>,
    pub irq: Arc<dyn IrqSink>,
    pub platform: Arc<dyn PlatformControl>,
    pub shadow: Arc<dyn ShadowControl>,
    pub ram_below_4g: u64,
    pub ram_above_4g: u64,
    pub topology: Topology,
}

pub struct Machine {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

struct Dbg;
impl BusDevice for Dbg {
    fn read(&mut self, _r: RegionId, _o: u64, d: &mut [u8]) -> IoResult {
        d.fill(0xe9);
        IoResult::Done
    }
    fn write(&mut self, _r: RegionId, _o: u64, d: &[u8]) -> IoResult {
        use std::io::Write;
        let _ = std::io::stderr().write_all(d);
        IoResult::Done
    }
}

impl Machine {
    pub fn build(_cfg: &MachineConfig, _env: MachineEnv) -> Result<Machine, MachineError> {
        let pio = Arc::new(Bus::new("pio"));
        let mmio = Arc::new(Bus::new("mmio"));
        pio.insert(0x402, 1, AccessRules::BYTE_ONLY, Arc::new(Mutex::new(Dbg)), 0)?;
        Ok(Machine { pio, mmio })
    }
    pub fn reset(&self) {}
    pub fn shutdown(&self) {}
}
