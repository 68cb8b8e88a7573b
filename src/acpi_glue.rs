//! Wires the ACPI tables into fw_cfg: the three blobs are registered at their padded sizes and
//! rebuilt on the first select after every reset, from the PM base the firmware programmed by then
//! (SeaBIOS moves it to 0x600, OVMF uses 0xB000). Padding keeps the size the firmware read from the
//! directory equal to what it downloads (seed 000).

use std::sync::{Arc, Mutex};

use hvmdm_acpi::{self as acpi, CpuDesc, PlatformDesc};
use hvmdm_devices::fw_cfg::{FileOpts, FwCfg};
use hvmdm_devices::pci::Piix4Pm;
use hvmdm_devices::topology::Topology;

use crate::machine::{MachineEnv, MachineError};

/// PM base assumed before the firmware programs PMBA (hvmloader's and OVMF's value).
const DEFAULT_PM_BASE: u16 = 0xB000;

#[derive(Clone)]
struct Inputs {
    topology: Topology,
    mmio32_start: u32,
}

fn describe(inp: &Inputs, pm_base: u16) -> PlatformDesc {
    let t = &inp.topology;
    let cpus = (0..t.max_cpus).map(|i| CpuDesc { apic_id: t.apic_id(i), present: i < t.boot_cpus }).collect();
    PlatformDesc::pc(cpus, pm_base, inp.mmio32_start)
}

fn build(inp: &Inputs, pm_base: u16) -> Result<acpi::AcpiBlobs, acpi::BuildError> {
    let blobs = acpi::build(&describe(inp, pm_base))?;
    // Cheap self-check: replay the script the way both firmwares will.
    let files = |name: &str| -> Option<Vec<u8>> {
        match name {
            acpi::TABLES_FILE => Some(blobs.tables.clone()),
            acpi::RSDP_FILE => Some(blobs.rsdp.clone()),
            acpi::LOADER_FILE => Some(blobs.loader.clone()),
            _ => None,
        }
    };
    for fw in [acpi::Firmware::SeaBios, acpi::Firmware::Ovmf] {
        if let Err(e) = acpi::verify(&blobs.loader, &files, fw) {
            log::error!("generated ACPI tables fail the {fw:?} replay: {e}");
        }
    }
    Ok(blobs)
}

pub fn install(fw: &mut FwCfg, pm_fn: Arc<Mutex<Piix4Pm>>, env: &MachineEnv) -> Result<(), MachineError> {
    let inp = Inputs {
        topology: env.topology,
        mmio32_start: u32::try_from(env.ram_below_4g).unwrap_or(0xC000_0000).max(0x8000_0000),
    };
    let first = build(&inp, DEFAULT_PM_BASE).map_err(|e| MachineError::Acpi(e.to_string()))?;
    fw.add_file(acpi::TABLES_FILE, first.tables, FileOpts::read_only(acpi::TABLES_MAX_SIZE))?;
    fw.add_file(acpi::LOADER_FILE, first.loader, FileOpts::read_only(acpi::LOADER_MAX_SIZE))?;
    fw.add_file(acpi::RSDP_FILE, first.rsdp, FileOpts::read_only(acpi::RSDP_MAX_SIZE))?;
    let hook = Box::new(move || {
        let pm_base = pm_fn.lock().unwrap_or_else(|p| p.into_inner()).pm_base().unwrap_or(DEFAULT_PM_BASE);
        match build(&inp, pm_base) {
            Ok(b) => {
                log::debug!("ACPI tables rebuilt for PM base {pm_base:#x}");
                vec![
                    (acpi::TABLES_FILE.to_string(), b.tables),
                    (acpi::LOADER_FILE.to_string(), b.loader),
                    (acpi::RSDP_FILE.to_string(), b.rsdp),
                ]
            }
            Err(e) => {
                log::error!("ACPI rebuild failed ({e}); keeping the previous tables");
                Vec::new()
            }
        }
    });
    fw.set_lazy_group(&[acpi::TABLES_FILE, acpi::LOADER_FILE, acpi::RSDP_FILE], hook)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_for_any_pm_base_keeps_sizes() {
        for cpus in [1, 2, 8, 64] {
            let inp = Inputs { topology: Topology::flat(cpus, cpus), mmio32_start: 0x8000_0000 };
            let a = build(&inp, 0xB000).unwrap();
            let b = build(&inp, 0x600).unwrap();
            assert_eq!(a.tables.len(), b.tables.len());
            assert_eq!(a.loader.len(), b.loader.len());
            assert_eq!(a.rsdp.len(), b.rsdp.len());
            assert_ne!(a.tables, b.tables, "PM base must reach the FADT");
        }
    }
}
