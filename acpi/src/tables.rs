//! Static tables (FACS, FADT, MADT, RSDT, XSDT, RSDP) and the assembly of the `etc/acpi/tables`
//! blob with its loader script.
//!
//! Every checksum byte is left 0 in the blobs: SeaBIOS subtracts the computed sum from the byte,
//! OVMF overwrites it, and the two agree only if it starts at 0.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::Aml;

use crate::linker::{AllocZone, Linker};
use crate::{
    padded_len, AcpiBlobs, BuildError, OemIds, PlatformDesc, LOADER_ALIGN, LOADER_MAX_SIZE, RSDP_FILE,
    RSDP_MAX_SIZE, TABLES_ALIGN, TABLES_FILE, TABLES_MAX_SIZE,
};

/// Standard table header length.
pub const HEADER_LEN: usize = 36;
/// Offset of the checksum byte in a table header.
pub const CHECKSUM_OFFSET: usize = 9;

/// FADT field offsets (ACPI 6.x layout).
pub const FADT_FIRMWARE_CTRL: usize = 36;
pub const FADT_DSDT: usize = 40;
pub const FADT_RESET_REG: usize = 116;
pub const FADT_RESET_VALUE: usize = 128;
pub const FADT_X_FIRMWARE_CTRL: usize = 132;
pub const FADT_X_DSDT: usize = 140;
/// FADT revision emitted: 6 (ACPI 6.x, 276 bytes), the layout cloud-hypervisor uses.
pub const FADT_REVISION: u8 = 6;

/// RSDP field offsets.
pub const RSDP_CHECKSUM: usize = 8;
pub const RSDP_RSDT: usize = 16;
pub const RSDP_XSDT: usize = 24;
pub const RSDP_EXT_CHECKSUM: usize = 32;
pub const RSDP_LEN: usize = 36;

/// A 36-byte header with length 36 and checksum 0.
pub fn header(signature: &[u8; 4], revision: u8, oem: &OemIds) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(signature);
    h.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h.push(revision);
    h.push(0);
    h.extend_from_slice(&oem.oem_id);
    h.extend_from_slice(&oem.oem_table_id);
    h.extend_from_slice(&oem.oem_revision.to_le_bytes());
    h.extend_from_slice(&oem.creator_id);
    h.extend_from_slice(&oem.creator_revision.to_le_bytes());
    h
}

/// Stores the table's length into its header.
pub fn set_len(t: &mut [u8]) {
    let len = t.len() as u32;
    if t.len() >= 8 {
        t[4..8].copy_from_slice(&len.to_le_bytes());
    }
}

/// 8-bit sum of `b`.
pub fn sum8(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

pub fn facs() -> Vec<u8> {
    let mut v = Vec::new();
    acpi_tables::facs::FACS::new().to_aml_bytes(&mut v);
    v
}

fn io_gas(width_bits: u8, access: AccessSize, port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, width_bits, 0, access, u64::from(port))
}

/// FADT with FIRMWARE_CTRL = `facs_off`, DSDT = X_DSDT = `dsdt_off` (relative offsets in the
/// tables blob; the loader relocates them). X_FIRMWARE_CTRL stays 0: ACPI says it and
/// FIRMWARE_CTRL must not both be set, and QEMU patches only the 32-bit field too.
pub fn fadt(desc: &PlatformDesc, facs_off: u32, dsdt_off: u32) -> Vec<u8> {
    let oem = &desc.oem;
    let mut b = FADTBuilder::new(oem.oem_id, oem.oem_table_id, oem.oem_revision);
    b.major_version = FADT_REVISION;
    b.fadt_minor_version = 0;
    b.creator_id = oem.creator_id;
    b.creator_revision = oem.creator_revision.to_le_bytes();
    b.firmware_ctrl = facs_off.into();
    b.dsdt = dsdt_off.into();
    b.x_dsdt = u64::from(dsdt_off).into();
    b.sci_int = u16::from(desc.sci_irq).into();
    b.smi_cmd = u32::from(desc.smi_cmd).into();
    b.acpi_enable = desc.acpi_enable;
    b.acpi_disable = desc.acpi_disable;
    let pm = desc.pm_io_base;
    b.pm1a_evt_blk = u32::from(pm).into();
    b.pm1a_cnt_blk = u32::from(pm.wrapping_add(4)).into();
    b.pm_tmr_blk = u32::from(pm.wrapping_add(8)).into();
    b.gpe0_blk = u32::from(desc.gpe0_base).into();
    b.pm1_evt_len = 4;
    b.pm1_cnt_len = 2;
    b.pm_tmr_len = 4;
    b.gpe0_blk_len = desc.gpe0_len;
    // No C2/C3.
    b.p_lvl2_lat = 0x0fffu16.into();
    b.p_lvl3_lat = 0x0fffu16.into();
    b.century = 0x32;
    // IAPC_BOOT_ARCH: LEGACY_DEVICES | 8042. With FADT revision >= 2 Linux treats a clear 8042
    // bit as "no i8042" and would skip the PS/2 controller.
    b.iapc_boot_arch = (if desc.ps2 { 0x0003u16 } else { 0x0001 }).into();
    // The same 32/64-bit pairs ACPICA would synthesise; widths match the legacy lengths so
    // ACPICA reports no "32/64X length mismatch".
    b.x_pm1a_evt_blk = io_gas(32, AccessSize::Undefined, pm);
    b.x_pm1a_cnt_blk = io_gas(16, AccessSize::Undefined, pm.wrapping_add(4));
    b.x_pm_tmr_blk = io_gas(32, AccessSize::Undefined, pm.wrapping_add(8));
    b.x_gpe0_blk = io_gas(desc.gpe0_len.saturating_mul(8), AccessSize::Undefined, desc.gpe0_base);
    let mut b = b
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::RtcS4)
        .flag(Flags::UsePlatformClock);
    if desc.cpus.len() > 8 {
        b = b.flag(Flags::ForceApicClusterModel);
    }
    if let Some((port, value)) = desc.reset_reg {
        b.reset_reg = io_gas(8, AccessSize::ByteAccess, port);
        b.reset_value = value;
        b = b.flag(Flags::ResetRegSup);
    }
    let mut v = Vec::new();
    b.finalize().to_aml_bytes(&mut v);
    v[CHECKSUM_OFFSET] = 0;
    v
}

/// MADT. The crate's MADT cannot set PCAT_COMPAT nor add overrides/NMI/x2APIC entries, so it is
/// written here.
pub fn madt(desc: &PlatformDesc) -> Vec<u8> {
    let x2apic = desc.cpus.iter().any(|c| c.apic_id >= 255);
    let mut t = header(b"APIC", if x2apic { 3 } else { 1 }, &desc.oem);
    t.extend_from_slice(&desc.lapic_address.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present
    for (uid, cpu) in desc.cpus.iter().enumerate() {
        t.extend_from_slice(&madt_cpu_entry(uid as u32, cpu.apic_id, cpu.present));
    }
    let io = &desc.ioapic;
    t.extend_from_slice(&[1, 12, io.id, 0]);
    t.extend_from_slice(&io.address.to_le_bytes());
    t.extend_from_slice(&io.gsi_base.to_le_bytes());
    let mut iso = |src: u8, gsi: u32, flags: u16| {
        t.extend_from_slice(&[2, 10, 0, src]);
        t.extend_from_slice(&gsi.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
    };
    // PIT IRQ0 is wired to IOAPIC pin 2.
    iso(0, 2, 0);
    // Level-triggered, active-high (PIIX IRQs are inverted to the IOAPIC as active-high).
    let mut level_irqs = vec![desc.sci_irq];
    if desc.pci_link_irq_overrides {
        level_irqs.extend(desc.pci_link_irqs.iter().copied());
    }
    level_irqs.sort_unstable();
    level_irqs.dedup();
    for irq in level_irqs {
        iso(irq, u32::from(irq), 0x000d);
    }
    // LINT1 is NMI on every processor.
    if desc.cpus.iter().any(|c| c.apic_id < 255) {
        t.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    }
    if x2apic {
        t.extend_from_slice(&[0x0a, 12, 0, 0]);
        t.extend_from_slice(&u32::MAX.to_le_bytes());
        t.extend_from_slice(&[1, 0, 0, 0]);
    }
    set_len(&mut t);
    t
}

/// The MADT entry of one CPU: Local APIC (type 0) for APIC IDs < 255 and UIDs < 255,
/// otherwise Local x2APIC (type 9). Also used for `_MAT` (with `enabled` forced on).
pub fn madt_cpu_entry(uid: u32, apic_id: u32, enabled: bool) -> Vec<u8> {
    let flags = u32::from(enabled);
    if apic_id < 255 && uid < 255 {
        let mut e = vec![0, 8, uid as u8, apic_id as u8];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    } else {
        let mut e = vec![9, 16, 0, 0];
        e.extend_from_slice(&apic_id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&uid.to_le_bytes());
        e
    }
}

/// RSDP revision 2: RSDT address (for ACPI 1.0 readers and SeaBIOS) and XSDT address (ACPI 2.0+
/// OSes use it; the FADT is revision 6). Both are relocated by the loader.
pub fn rsdp(oem: &OemIds, rsdt_off: u32, xsdt_off: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(&oem.oem_id);
    r.push(2);
    r.extend_from_slice(&rsdt_off.to_le_bytes());
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&u64::from(xsdt_off).to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r
}

/// The tables blob under construction plus its script.
struct Builder {
    blob: Vec<u8>,
    linker: Linker,
    offsets: Vec<([u8; 4], usize)>,
}

impl Builder {
    fn offset(&self) -> Result<u32, BuildError> {
        u32::try_from(self.blob.len()).map_err(|_| BuildError::TooLarge {
            what: TABLES_FILE,
            size: self.blob.len(),
            max: TABLES_MAX_SIZE,
        })
    }

    /// Appends a table; returns its offset.
    fn push(&mut self, table: &[u8]) -> Result<u32, BuildError> {
        let off = self.offset()?;
        let mut sig = [0u8; 4];
        sig.copy_from_slice(&table[..4]);
        self.offsets.push((sig, off as usize));
        self.blob.extend_from_slice(table);
        Ok(off)
    }

    /// A pointer field at `table_off + field` of `size` bytes into the tables blob.
    fn pointer(&mut self, table_off: u32, field: usize, size: u8) -> Result<(), BuildError> {
        self.linker.add_pointer(TABLES_FILE, table_off + field as u32, size, TABLES_FILE)?;
        Ok(())
    }

    fn checksum(&mut self, table_off: u32) -> Result<(), BuildError> {
        let start = table_off as usize;
        let len = self.blob.len() - start;
        self.blob[start + CHECKSUM_OFFSET] = 0;
        self.linker.add_checksum(TABLES_FILE, table_off, len as u32, table_off + CHECKSUM_OFFSET as u32)?;
        Ok(())
    }
}

fn validate(desc: &PlatformDesc) -> Result<(), BuildError> {
    if desc.cpus.is_empty() {
        return Err(BuildError::NoCpus);
    }
    if desc.cpus.len() > 4096 {
        return Err(BuildError::TooManyCpus(desc.cpus.len()));
    }
    let mut ids: Vec<u32> = desc.cpus.iter().map(|c| c.apic_id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(BuildError::DuplicateApicId(w[0]));
    }
    for &(a, b) in &desc.pci_io_windows {
        if a > b {
            return Err(BuildError::BadWindow(a.into(), b.into()));
        }
    }
    let (a, b) = desc.pci_mmio32;
    if a > b {
        return Err(BuildError::BadWindow(a.into(), b.into()));
    }
    if let Some((a, b)) = desc.pci_mmio64 {
        if a > b {
            return Err(BuildError::BadWindow(a, b));
        }
    }
    Ok(())
}

pub fn build(desc: &PlatformDesc) -> Result<AcpiBlobs, BuildError> {
    validate(desc)?;
    let mut b = Builder { blob: Vec::new(), linker: Linker::new(), offsets: Vec::new() };
    // Align 64 for the FACS, which sits first.
    b.linker.allocate(TABLES_FILE, 64, AllocZone::High)?;
    // FSEG so SeaBIOS's RSDP scan finds it.
    b.linker.allocate(RSDP_FILE, 16, AllocZone::FSeg)?;

    let facs_off = b.push(&facs())?;

    let dsdt_off = b.push(&crate::dsdt::dsdt(desc))?;
    b.checksum(dsdt_off)?;

    let fadt_off = b.push(&fadt(desc, facs_off, dsdt_off))?;
    b.pointer(fadt_off, FADT_FIRMWARE_CTRL, 4)?;
    b.pointer(fadt_off, FADT_DSDT, 4)?;
    b.pointer(fadt_off, FADT_X_DSDT, 8)?;
    b.checksum(fadt_off)?;

    let madt_off = b.push(&madt(desc))?;
    b.checksum(madt_off)?;

    let entries = [fadt_off, madt_off];

    let mut rsdt = header(b"RSDT", 1, &desc.oem);
    for e in entries {
        rsdt.extend_from_slice(&e.to_le_bytes());
    }
    set_len(&mut rsdt);
    let rsdt_off = b.push(&rsdt)?;
    for i in 0..entries.len() {
        b.pointer(rsdt_off, HEADER_LEN + 4 * i, 4)?;
    }
    b.checksum(rsdt_off)?;

    let mut xsdt = header(b"XSDT", 1, &desc.oem);
    for e in entries {
        xsdt.extend_from_slice(&u64::from(e).to_le_bytes());
    }
    set_len(&mut xsdt);
    let xsdt_off = b.push(&xsdt)?;
    for i in 0..entries.len() {
        b.pointer(xsdt_off, HEADER_LEN + 8 * i, 8)?;
    }
    b.checksum(xsdt_off)?;

    let rsdp = rsdp(&desc.oem, rsdt_off, xsdt_off);
    b.linker.add_pointer(RSDP_FILE, RSDP_RSDT as u32, 4, TABLES_FILE)?;
    b.linker.add_pointer(RSDP_FILE, RSDP_XSDT as u32, 8, TABLES_FILE)?;
    b.linker.add_checksum(RSDP_FILE, 0, 20, RSDP_CHECKSUM as u32)?;
    b.linker.add_checksum(RSDP_FILE, 0, RSDP_LEN as u32, RSDP_EXT_CHECKSUM as u32)?;

    let tables_used = b.blob.len();
    let mut tables = b.blob;
    tables.resize(padded_len(tables_used, TABLES_ALIGN), 0);
    if tables.len() > TABLES_MAX_SIZE {
        return Err(BuildError::TooLarge { what: TABLES_FILE, size: tables.len(), max: TABLES_MAX_SIZE });
    }
    let mut loader = b.linker.to_bytes();
    let loader_used = loader.len();
    // Zero padding decodes as command 0, which SeaBIOS skips silently and OVMF skips with a
    // DEBUG_VERBOSE line only.
    loader.resize(padded_len(loader_used, LOADER_ALIGN), 0);
    if loader.len() > LOADER_MAX_SIZE {
        return Err(BuildError::TooLarge {
            what: crate::LOADER_FILE,
            size: loader.len(),
            max: LOADER_MAX_SIZE,
        });
    }
    debug_assert!(rsdp.len() <= RSDP_MAX_SIZE);
    log::debug!(
        "acpi: built {} bytes of tables ({} padded), {} loader commands, PM base {:#x}",
        tables_used,
        tables.len(),
        loader_used / crate::linker::LOADER_CMD_SIZE,
        desc.pm_io_base
    );
    Ok(AcpiBlobs { tables, rsdp, loader, tables_used, loader_used, table_offsets: b.offsets })
}
