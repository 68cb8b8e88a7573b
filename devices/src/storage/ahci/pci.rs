//! The ICH9 AHCI PCI function: identity, BAR4 (index/data pair) and BAR5 (ABAR), the MSI
//! capability at 0x80 and the SATA capability at 0xA8 (where QEMU's ich9-ahci has them).

use crate::pci::{
    BarKind, CommandWatch, ConfigSpace, ConfigSpaceState, PciBuses, PciError, PciFunction, PciHeader,
    PciIntx, PciMsi, RegionTarget, DEFAULT_SUBSYSTEM_ID, DEFAULT_SUBSYSTEM_VENDOR_ID,
};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};

use super::{ABAR_SIZE, IDP_SIZE};

pub const AHCI_IDP_BAR: usize = 4;
pub const AHCI_ABAR_BAR: usize = 5;
pub const AHCI_MSI_CAP: u8 = 0x80;
pub const AHCI_SATA_CAP: u8 = 0xa8;
const PCI_CAP_ID_SATA: u8 = 0x12;

/// PCI side of the controller; the registers behind the BARs are [`super::AhciController`]'s.
pub struct Ich9Ahci {
    cs: ConfigSpace,
}

impl std::fmt::Debug for Ich9Ahci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ich9Ahci({:?})", self.cs)
    }
}

impl Ich9Ahci {
    /// `abar` serves BAR5 (memory, [`ABAR_SIZE`]), `idp` BAR4 (I/O, [`IDP_SIZE`]); `intx` is
    /// the function's INTA# and `msi` the handle its MSI capability drives (give clones of both
    /// to the controller with [`super::AhciController::connect_pci`]).
    pub fn new(
        buses: &PciBuses,
        abar: RegionTarget,
        idp: RegionTarget,
        intx: PciIntx,
        msi: PciMsi,
    ) -> Result<Self, PciError> {
        let mut cs = ConfigSpace::new(
            "ich9-ahci",
            PciHeader {
                vendor_id: 0x8086,
                device_id: 0x2922,
                revision: 2,
                class_code: 0x01_06_01,
                header_type: 0,
                subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
                subsystem_id: DEFAULT_SUBSYSTEM_ID,
                interrupt_pin: 1,
            },
        );
        cs.add_bar(AHCI_IDP_BAR, BarKind::Io, IDP_SIZE, idp, buses)?;
        cs.add_bar(AHCI_ABAR_BAR, BarKind::Mem32 { prefetchable: false }, ABAR_SIZE, abar, buses)?;
        cs.attach_intx(intx);
        cs.add_msi(AHCI_MSI_CAP, msi)?;
        cs.add_capability(PCI_CAP_ID_SATA, AHCI_SATA_CAP, 8)?;
        let sata = u16::from(AHCI_SATA_CAP);
        cs.init_word(sata + 2, 0x0010); // revision 1.0
                                        // BARLOC 8 (BAR4), BAROFST 4 dwords: the index register at BAR4 + 0x10.
        cs.init_dword(sata + 4, 0x48);
        Ok(Ich9Ahci { cs })
    }

    pub fn config_space(&self) -> &ConfigSpace {
        &self.cs
    }

    /// Live view of the command register (bus-master enable gates the controller's DMA).
    pub fn command_watch(&self) -> CommandWatch {
        self.cs.command_watch()
    }

    /// Where the ABAR decodes now.
    pub fn abar(&self) -> Option<u64> {
        self.cs.bar_mapped(AHCI_ABAR_BAR)
    }
}

impl PciFunction for Ich9Ahci {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cs.read(reg)
    }
    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8) {
        self.cs.write(reg, value, byte_mask);
    }
    fn reset(&mut self) {
        self.cs.reset();
    }
}

/// Section "ich9-ahci": the config space. Restore maps the BARs where the saved registers put
/// them and brings MSI/INTx gating in line. (The HBA state is the "ahci" section.)
impl Snapshot for Ich9Ahci {
    fn section(&self) -> &'static str {
        "ich9-ahci"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        self.cs.save_state(w);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        Ok(PendingState::new(self.cs.decode_state(r)?))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: ConfigSpaceState = state.downcast(self.cs.name())?;
        self.cs.apply_state(&st);
        Ok(())
    }
}
