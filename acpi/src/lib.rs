//! ACPI tables for the PC (i440FX/PIIX3/PIIX4-PM) machine, the QEMU linker/loader script that
//! SeaBIOS and OVMF replay (`etc/table-loader`), and a verifier that replays a script with each
//! firmware's rules.
//!
//! Usage: fill a [`PlatformDesc`] (after the firmware has programmed the PM base) and call
//! [`build`]; serve [`AcpiBlobs::tables`] as `etc/acpi/tables`, [`AcpiBlobs::rsdp`] as
//! `etc/acpi/rsdp` and [`AcpiBlobs::loader`] as `etc/table-loader`. Blob sizes are padded
//! (tables to 128 KiB, loader to 4 KiB) so a rebuild at the first fw_cfg select after reset keeps
//! the size the firmware read from the directory earlier (seed 000).

pub mod amlx;
pub mod dsdt;
pub mod linker;
pub mod seabios_dsdt;
pub mod tables;
pub mod verify;

#[cfg(test)]
mod acpica_tests;

use thiserror::Error;

pub use linker::{AllocZone, Linker, LinkerError, LoaderCommand};
pub use verify::{verify, Firmware, InstalledTable, VerifyError, VerifyReport};

/// fw_cfg file names.
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_FILE: &str = "etc/table-loader";

/// `etc/acpi/tables` is padded to a multiple of this (QEMU's `ACPI_BUILD_TABLE_SIZE`).
pub const TABLES_ALIGN: usize = 0x20000;
/// `etc/table-loader` is padded to a multiple of this (QEMU's `ACPI_BUILD_ALIGN_SIZE`).
pub const LOADER_ALIGN: usize = 0x1000;
/// Maximum sizes of the three blobs (QEMU's resizable-blob maxima); `build` fails beyond them.
pub const TABLES_MAX_SIZE: usize = 0x20_0000;
pub const LOADER_MAX_SIZE: usize = 0x1_0000;
pub const RSDP_MAX_SIZE: usize = 0x1000;

/// One possible vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuDesc {
    /// Local APIC ID (x2APIC ID if ≥ 255).
    pub apic_id: u32,
    /// Plugged now (MADT entry enabled, `_STA` 0xF); otherwise a hot-pluggable slot.
    pub present: bool,
}

/// The I/O APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicDesc {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

/// A 16550 UART on the ISA bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialDesc {
    pub base: u16,
    pub irq: u8,
}

/// OEM identification written into every table header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OemIds {
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: [u8; 4],
    pub creator_revision: u32,
}

impl Default for OemIds {
    fn default() -> Self {
        OemIds {
            oem_id: *b"HVMDM ",
            oem_table_id: *b"HVMDMPC ",
            oem_revision: 1,
            creator_id: *b"HVMD",
            creator_revision: 1,
        }
    }
}

/// Everything the tables describe. No dependency on the machine: the machine fills this in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformDesc {
    /// Possible vCPUs in ACPI processor-UID order (UID = index).
    pub cpus: Vec<CpuDesc>,
    /// PIIX4 PM I/O base as the firmware programmed it (PMBA; SeaBIOS 0x600, OVMF 0xB000).
    pub pm_io_base: u16,
    pub gpe0_base: u16,
    pub gpe0_len: u8,
    pub sci_irq: u8,
    pub smi_cmd: u16,
    pub acpi_enable: u8,
    pub acpi_disable: u8,
    /// FADT RESET_REG in system I/O space: (port, value). PIIX3 RCR: (0xCF9, 0x06).
    pub reset_reg: Option<(u16, u8)>,
    pub ioapic: IoApicDesc,
    pub lapic_address: u32,
    /// Inclusive I/O windows forwarded to PCI (\_SB.PCI0._CRS).
    pub pci_io_windows: Vec<(u16, u16)>,
    /// Legacy VGA window 0xA0000-0xBFFFF in PCI0._CRS (QEMU has it).
    pub pci_vga_window: bool,
    /// Inclusive 32-bit MMIO window (start = below-4G RAM end or a given start, end 0xFEBFFFFF).
    pub pci_mmio32: (u32, u32),
    /// Optional inclusive 64-bit MMIO window.
    pub pci_mmio64: Option<(u64, u64)>,
    /// ISA IRQs the PCI link devices may use (PIIX3 PIRQ routing; QEMU: 5, 10, 11).
    pub pci_link_irqs: Vec<u8>,
    /// Emit MADT level/active-high Interrupt Source Overrides for `pci_link_irqs` (QEMU does).
    pub pci_link_irq_overrides: bool,
    /// fw_cfg DMA present: FWCF _CRS covers 0x510-0x51B instead of 0x510-0x511.
    pub fw_cfg_dma: bool,
    pub serial: Vec<SerialDesc>,
    pub rtc: bool,
    /// i8042 keyboard (PNP0303) and PS/2 mouse (PNP0F13).
    pub ps2: bool,
    pub s3: bool,
    pub s4: bool,
    pub oem: OemIds,
}

impl PlatformDesc {
    /// The PC defaults (QEMU pc-i440fx values): PM base as given, 32-bit PCI hole from
    /// `mmio32_start` to 0xFEBFFFFF, COM1, RTC, PS/2, DMA-capable fw_cfg, S3/S4 off.
    pub fn pc(cpus: Vec<CpuDesc>, pm_io_base: u16, mmio32_start: u32) -> Self {
        PlatformDesc {
            cpus,
            pm_io_base,
            gpe0_base: 0xAFE0,
            gpe0_len: 4,
            sci_irq: 9,
            smi_cmd: 0xB2,
            acpi_enable: 0xF1,
            acpi_disable: 0xF0,
            reset_reg: Some((0xCF9, 0x06)),
            ioapic: IoApicDesc { id: 0, address: 0xFEC0_0000, gsi_base: 0 },
            lapic_address: 0xFEE0_0000,
            pci_io_windows: vec![(0x0000, 0x0CF7), (0x0D00, 0xFFFF)],
            pci_vga_window: true,
            pci_mmio32: (mmio32_start, 0xFEBF_FFFF),
            pci_mmio64: None,
            pci_link_irqs: vec![5, 10, 11],
            pci_link_irq_overrides: true,
            fw_cfg_dma: true,
            serial: vec![SerialDesc { base: 0x3F8, irq: 4 }],
            rtc: true,
            ps2: true,
            s3: false,
            s4: false,
            oem: OemIds::default(),
        }
    }

    /// `n` possible CPUs with APIC IDs 0..n, the first `present` of them plugged.
    pub fn simple_cpus(n: u32, present: u32) -> Vec<CpuDesc> {
        (0..n).map(|i| CpuDesc { apic_id: i, present: i < present }).collect()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("no CPUs described")]
    NoCpus,
    #[error("APIC ID {0} appears twice")]
    DuplicateApicId(u32),
    #[error("{0} possible CPUs exceed the supported 4096")]
    TooManyCpus(usize),
    #[error("PCI window {0:#x}-{1:#x} is empty or reversed")]
    BadWindow(u64, u64),
    #[error("{what} is {size:#x} bytes, above the {max:#x} maximum")]
    TooLarge { what: &'static str, size: usize, max: usize },
    #[error("linker: {0}")]
    Linker(#[from] LinkerError),
}

/// The three fw_cfg blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiBlobs {
    /// `etc/acpi/tables`, zero-padded to a multiple of [`TABLES_ALIGN`].
    pub tables: Vec<u8>,
    /// `etc/acpi/rsdp` (36 bytes).
    pub rsdp: Vec<u8>,
    /// `etc/table-loader`, zero-padded to a multiple of [`LOADER_ALIGN`].
    pub loader: Vec<u8>,
    /// Bytes of `tables` actually used by tables (the rest is padding).
    pub tables_used: usize,
    /// Bytes of `loader` actually used by commands.
    pub loader_used: usize,
    /// Offsets of each table inside `tables`, by signature, in blob order.
    pub table_offsets: Vec<([u8; 4], usize)>,
}

/// Builds the tables, RSDP and loader script for `desc`.
pub fn build(desc: &PlatformDesc) -> Result<AcpiBlobs, BuildError> {
    tables::build(desc)
}

/// Rounds `len` up to a nonzero multiple of `align`.
pub(crate) fn padded_len(len: usize, align: usize) -> usize {
    len.div_ceil(align).max(1) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_rejects_bad_descriptions() {
        let ok = PlatformDesc::pc(PlatformDesc::simple_cpus(2, 2), 0x600, 0x8000_0000);
        let mut d = ok.clone();
        d.cpus.clear();
        assert_eq!(build(&d), Err(BuildError::NoCpus));
        let mut d = ok.clone();
        d.cpus[1].apic_id = 0;
        assert_eq!(build(&d), Err(BuildError::DuplicateApicId(0)));
        let mut d = ok.clone();
        d.cpus = PlatformDesc::simple_cpus(4097, 1);
        assert_eq!(build(&d), Err(BuildError::TooManyCpus(4097)));
        let mut d = ok.clone();
        d.pci_mmio32 = (0xfec0_0000, 0x8000_0000);
        assert!(matches!(build(&d), Err(BuildError::BadWindow(..))));
        let mut d = ok;
        d.pci_mmio64 = Some((2, 1));
        assert!(matches!(build(&d), Err(BuildError::BadWindow(..))));
    }

    #[test]
    fn sizes_and_limits() {
        let b = build(&PlatformDesc::pc(PlatformDesc::simple_cpus(4096, 1), 0x600, 0x8000_0000)).unwrap();
        assert!(b.tables.len() <= TABLES_MAX_SIZE && b.tables.len() % TABLES_ALIGN == 0);
        assert!(b.loader.len() <= LOADER_MAX_SIZE && b.loader.len() == LOADER_ALIGN);
        assert_eq!(b.rsdp.len(), 36);
        assert_eq!(padded_len(0, 16), 16);
        assert_eq!(padded_len(17, 16), 32);
        for fw in [Firmware::SeaBios, Firmware::Ovmf] {
            let files = |n: &str| match n {
                TABLES_FILE => Some(b.tables.clone()),
                RSDP_FILE => Some(b.rsdp.clone()),
                _ => None,
            };
            verify(&b.loader, &files, fw).unwrap();
        }
    }
}
