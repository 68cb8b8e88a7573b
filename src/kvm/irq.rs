//! Interrupt delivery on KVM: ISA IRQs and PCI INTx (through the PIIX3 PIRQ routing the guest
//! programmed) become KVM_IRQ_LINE calls on the in-kernel PIC + IOAPIC. Several sources on one line
//! are OR-ed here, so devices only ever report their own level.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hvmdm_devices::irq::IrqSink;
use hvmdm_devices::warn_limited;
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

#[derive(Default)]
struct Lines {
    isa: [bool; 16],
    intx: HashMap<(u8, u8), bool>,
    routes: [Option<u8>; 4],
    driven: [bool; 16],
}

pub struct KvmIrqSink {
    vm: Arc<VmFd>,
    lines: Mutex<Lines>,
}

/// PIIX3 swizzle: device `slot`, pin `pin` (0 = INTA#) uses PIRQ link (slot + pin) & 3.
pub fn pirq_link(slot: u8, pin: u8) -> u8 {
    (slot.wrapping_add(pin)) & 3
}

impl KvmIrqSink {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmIrqSink { vm, lines: Mutex::new(Lines::default()) }
    }

    fn update(&self, l: &mut Lines) {
        let mut want = l.isa;
        for (&(slot, pin), &lvl) in &l.intx {
            if lvl {
                if let Some(irq) = l.routes[pirq_link(slot, pin) as usize] {
                    if let Some(w) = want.get_mut(irq as usize) {
                        *w = true;
                    }
                }
            }
        }
        for (irq, &level) in want.iter().enumerate() {
            if level != l.driven[irq] {
                l.driven[irq] = level;
                if let Err(e) = self.vm.set_irq_line(irq as u32, level) {
                    log::error!("KVM_IRQ_LINE {irq}: {e}");
                }
            }
        }
    }

    /// After an in-kernel irqchip reset all lines are low.
    pub fn reset(&self) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.driven = [false; 16];
        self.update(&mut l);
    }
}

impl IrqSink for KvmIrqSink {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = l.isa.get_mut(irq as usize) else { return };
        *slot = level;
        self.update(&mut l);
    }

    fn set_pci_intx(&self, slot: u8, pin: u8, level: bool) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.intx.insert((slot, pin & 3), level);
        self.update(&mut l);
    }

    fn set_pci_link_route(&self, link: u8, irq: Option<u8>) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = l.routes.get_mut(link as usize) {
            *r = irq.filter(|i| *i < 16);
        }
        self.update(&mut l);
    }

    /// KVM_SIGNAL_MSI: the in-kernel LAPICs take the message like a memory write to 0xFEExxxxx.
    fn signal_msi(&self, addr: u64, data: u32) {
        let msi =
            kvm_msi { address_lo: addr as u32, address_hi: (addr >> 32) as u32, data, ..Default::default() };
        match self.vm.signal_msi(msi) {
            // 0: the guest masked the vector / no destination; like real hardware, dropped.
            Ok(_) => {}
            Err(e) => warn_limited!("kvm-msi", "KVM_SIGNAL_MSI {addr:#x}/{data:#x}: {e}"),
        }
    }
}
