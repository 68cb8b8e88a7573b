//! Guest accesses from the ioreq server into the machine: PIO and MMIO go through the same buses
//! (and so the same access rules) as on KVM, PCI_CONFIG requests straight to the PCI root.

use std::sync::Arc;

use hvmdm_devices::warn_limited;
use hvmdm_xen::ioreq::{IoreqHandler, PciSbdf};

use crate::machine::Machine;

/// One per serving thread (the loop's, for buffered writes, and each vCPU worker's).
pub struct MachineIo {
    pub machine: Arc<Machine>,
}

impl IoreqHandler for MachineIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.machine.pio.read_sync(u64::from(port), data);
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.machine.pio.write_sync(u64::from(port), data);
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.machine.mmio.read_sync(addr, data);
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.machine.mmio.write_sync(addr, data);
    }

    fn pci_config_read(&mut self, sbdf: PciSbdf, reg: u16, data: &mut [u8]) {
        data.fill(0xff);
        if sbdf.segment() != 0 {
            warn_limited!("pci-cfg-segment", "PCI config read of segment {} refused", sbdf.segment());
            return;
        }
        let devfn = (sbdf.device() << 3) | sbdf.function();
        let v = self.machine.pci_config_read(sbdf.bus(), devfn, reg, data.len() as u8);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn pci_config_write(&mut self, sbdf: PciSbdf, reg: u16, data: &[u8]) {
        if sbdf.segment() != 0 {
            warn_limited!("pci-cfg-segment", "PCI config write to segment {} dropped", sbdf.segment());
            return;
        }
        let devfn = (sbdf.device() << 3) | sbdf.function();
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.machine.pci_config_write(sbdf.bus(), devfn, reg, n as u8, u32::from_le_bytes(b));
    }
}
