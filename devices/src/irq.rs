//! Interrupt lines as devices see them. On KVM the backend drives the in-kernel PIC/IOAPIC; on Xen
//! it calls set_isa_irq_level / set_pci_intx_level / set_pci_link_route. Levels from several
//! sources on one line are OR-ed by the backend, not by devices.

use std::sync::Arc;

pub trait IrqSink: Send + Sync {
    /// Drives ISA IRQ `irq` (0..15) to `level`. Edge-triggered ISA devices pulse (true, false).
    fn set_isa_irq(&self, irq: u8, level: bool);
    /// Drives PCI INTx `pin` (0 = INTA#) of device `slot` on bus 0 to `level`.
    fn set_pci_intx(&self, slot: u8, pin: u8, level: bool);
    /// PIIX3 PIRQ routing changed: `link` (0..3 = PIRQA..D) now routes to ISA `irq`, or nowhere.
    fn set_pci_link_route(&self, link: u8, irq: Option<u8>);
    /// Delivers one message-signalled interrupt: the guest-programmed MSI address and data of a
    /// function whose MSI capability is enabled (KVM_SIGNAL_MSI / xendevicemodel_inject_msi).
    /// Sinks without MSI support drop it with a warning.
    fn signal_msi(&self, addr: u64, data: u32) {
        crate::warn_limited!("irq-no-msi", "MSI {addr:#x}/{data:#x} dropped: this platform has no MSI path");
    }
}

/// One ISA interrupt line bound to a sink, handed to a device.
#[derive(Clone)]
pub struct IsaIrq {
    sink: Arc<dyn IrqSink>,
    irq: u8,
}

impl IsaIrq {
    pub fn new(sink: Arc<dyn IrqSink>, irq: u8) -> Self {
        IsaIrq { sink, irq }
    }
    pub fn set_level(&self, level: bool) {
        self.sink.set_isa_irq(self.irq, level);
    }
    /// An edge for edge-triggered ISA devices.
    pub fn pulse(&self) {
        self.sink.set_isa_irq(self.irq, true);
        self.sink.set_isa_irq(self.irq, false);
    }
    pub fn number(&self) -> u8 {
        self.irq
    }
}

impl std::fmt::Debug for IsaIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IsaIrq({})", self.irq)
    }
}

/// Records every call; for unit tests.
#[derive(Default, Debug)]
pub struct RecordingIrqSink {
    pub events: std::sync::Mutex<Vec<IrqEvent>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqEvent {
    Isa(u8, bool),
    Intx(u8, u8, bool),
    Route(u8, Option<u8>),
    Msi(u64, u32),
}

impl RecordingIrqSink {
    pub fn take(&self) -> Vec<IrqEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// Current level of an ISA line, from the recorded history.
    pub fn isa_level(&self, irq: u8) -> bool {
        let ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.iter()
            .rev()
            .find_map(|e| match e {
                IrqEvent::Isa(i, l) if *i == irq => Some(*l),
                _ => None,
            })
            .unwrap_or(false)
    }
}

impl IrqSink for RecordingIrqSink {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(IrqEvent::Isa(irq, level));
    }
    fn set_pci_intx(&self, slot: u8, pin: u8, level: bool) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(IrqEvent::Intx(slot, pin, level));
    }
    fn set_pci_link_route(&self, link: u8, irq: Option<u8>) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(IrqEvent::Route(link, irq));
    }
    fn signal_msi(&self, addr: u64, data: u32) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(IrqEvent::Msi(addr, data));
    }
}
