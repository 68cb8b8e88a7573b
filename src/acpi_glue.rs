//! Wires the ACPI tables into fw_cfg (filled in when the acpi crate lands).

use std::sync::{Arc, Mutex};

use hvmdm_devices::fw_cfg::FwCfg;
use hvmdm_devices::pci::Piix4Pm;

use crate::machine::{MachineEnv, MachineError};

pub fn install(_fw: &mut FwCfg, _pm_fn: Arc<Mutex<Piix4Pm>>, _env: &MachineEnv) -> Result<(), MachineError> {
    Ok(())
}
