//! The DSDT of the PC machine.
//!
//! Namespace (every reference points backwards, so no load-order questions arise):
//! ```text
//! \_SB.PCI0            PNP0A03, _CRS: bus 0-FF, 0xCF8/8 consumer, I/O + MMIO windows
//! \_SB.PCI0.ISA        _ADR 0x00010000, OperationRegion P40C (PCI_Config 0x60, 4): PIRQRC[A-D]
//! \_SB.PCI0.ISA.RTC    PNP0B00  0x70/8 IRQ8
//! \_SB.PCI0.ISA.KBD    PNP0303  0x60, 0x64, IRQ1
//! \_SB.PCI0.ISA.MOU    PNP0F13  IRQ12
//! \_SB.PCI0.ISA.COMn   PNP0501  _UID n
//! \_SB.PCI0.ISA.FWCF   QEMU0002 _STA 0xB, 0x510/2 or /0xC with DMA
//! \_SB.PRQ0..PRQ3      Field on P40C; IQST/IQCR helpers; LNKA-LNKD (PNP0C0F), LNKS (SCI)
//! \_SB.PCI0._PRT       static 128-entry package, (slot + pin) & 3 -> LNKD/LNKA/LNKB/LNKC,
//!                      slot 1 INTA -> LNKS (QEMU's PIIX table)
//! \_SB.Cxxx            ACPI0007 per possible CPU, _UID = index, _MAT, _STA
//! \_S3 \_S4 \_S5       sleep packages; \_GPE with _HID ACPI0006
//! ```
//!
//! The DSDT is also scanned by SeaBIOS's small AML parser (it looks for PNP0303 before
//! enabling the PS/2 keyboard), so only constructs that parser understands appear outside
//! methods and buffers: no QWORD integers, no `External`, no `If` at object level.

use acpi_tables::aml::{self, Path};

use crate::amlx::*;
use crate::{tables, PlatformDesc};

/// DSDT revision 2: 64-bit integers.
pub const DSDT_REVISION: u8 = 2;

/// Names of the four PIIX PCI link devices, indexed by (slot + pin) & 3.
const PRT_LINKS: [&str; 4] = ["LNKD", "LNKA", "LNKB", "LNKC"];

/// PCI0 `_CRS`.
fn pci0_crs(desc: &PlatformDesc) -> Raw {
    let mut r = vec![raw(&aml::AddressSpace::<u16>::new_bus_number(0, 0xff)), io(0x0cf8, 0x0cf8, 1, 8)];
    for &(a, b) in &desc.pci_io_windows {
        r.push(raw(&aml::AddressSpace::<u16>::new_io(a, b, None)));
    }
    if desc.pci_vga_window {
        r.push(raw(&aml::AddressSpace::<u32>::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            0x000a_0000,
            0x000b_ffff,
            None,
        )));
    }
    let (a, b) = desc.pci_mmio32;
    r.push(raw(&aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        a,
        b,
        None,
    )));
    if let Some((a, b)) = desc.pci_mmio64 {
        r.push(raw(&aml::AddressSpace::<u64>::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            a,
            b,
            None,
        )));
    }
    resource_template(&r)
}

fn isa_devices(desc: &PlatformDesc) -> Vec<Raw> {
    let mut v = vec![
        name_int("_ADR", 0x0001_0000),
        raw(&aml::OpRegion::new(Path::new("P40C"), aml::OpRegionSpace::PCIConfig, &0x60u8, &0x04u8)),
    ];
    if desc.rtc {
        v.push(device(
            "RTC_",
            &[
                hid_eisa("PNP0B00"),
                name("_CRS", &resource_template(&[io(0x70, 0x70, 1, 8), irq_no_flags(8)])),
            ],
        ));
    }
    if desc.ps2 {
        v.push(device(
            "KBD_",
            &[
                hid_eisa("PNP0303"),
                name_int("_STA", 0xf),
                name(
                    "_CRS",
                    &resource_template(&[io(0x60, 0x60, 1, 1), io(0x64, 0x64, 1, 1), irq_no_flags(1)]),
                ),
            ],
        ));
        v.push(device(
            "MOU_",
            &[
                hid_eisa("PNP0F13"),
                name_int("_STA", 0xf),
                name("_CRS", &resource_template(&[irq_no_flags(12)])),
            ],
        ));
    }
    for (i, s) in desc.serial.iter().enumerate().take(4) {
        v.push(device(
            &format!("COM{}", i + 1),
            &[
                hid_eisa("PNP0501"),
                name_int("_UID", i as u64 + 1),
                name_int("_STA", 0xf),
                name("_CRS", &resource_template(&[io(s.base, s.base, 1, 8), irq_no_flags(s.irq)])),
            ],
        ));
    }
    let fwcf_len = if desc.fw_cfg_dma { 0x0c } else { 0x02 };
    v.push(device(
        "FWCF",
        &[
            hid_str("QEMU0002"),
            name_int("_STA", 0xb),
            name("_CRS", &resource_template(&[io(0x510, 0x510, 1, fwcf_len)])),
        ],
    ));
    v
}

fn pci0(desc: &PlatformDesc) -> Raw {
    device(
        "PCI0",
        &[
            hid_eisa("PNP0A03"),
            name_int("_UID", 0),
            name("_CRS", &pci0_crs(desc)),
            device("ISA_", &isa_devices(desc)),
        ],
    )
}

/// `IQST(reg)`: link status from a PIRQRC value (bit 7 = routing disabled).
fn iqst() -> Raw {
    method(
        "IQST",
        1,
        false,
        &[
            raw(&aml::If::new(&aml::And::new(&aml::ZERO, &0x80u8, &aml::Arg(0)), vec![&ret(&0x09u8)])),
            ret(&0x0bu8),
        ],
    )
}

/// `IQCR(reg)`: current resources of a link from its PIRQRC value. Uses a local buffer and
/// `Index` rather than named fields so nothing is created in the namespace per call.
fn iqcr() -> Raw {
    let byte5 = aml::Index::new(&aml::ZERO, &aml::Local(0), &5u8);
    let irq = aml::And::new(&aml::ZERO, &aml::Arg(0), &0x0fu8);
    method(
        "IQCR",
        1,
        false,
        &[
            store(&resource_template(&[ext_irq(true, false, true, &[0])]), &aml::Local(0)),
            raw(&aml::If::new(&aml::LessThan::new(&aml::Arg(0), &0x80u8), vec![&store(&irq, &byte5)])),
            ret(&aml::Local(0)),
        ],
    )
}

fn link_dev(name_: &str, uid: u8, reg: &str, irqs: &[u32]) -> Raw {
    let reg_path = Path::new(reg);
    device(
        name_,
        &[
            hid_eisa("PNP0C0F"),
            name_int("_UID", uid.into()),
            name("_PRS", &resource_template(&[ext_irq(true, false, true, irqs)])),
            method("_STA", 0, false, &[ret(&aml::MethodCall::new(Path::new("IQST"), vec![&reg_path]))]),
            method("_DIS", 0, false, &[raw(&aml::Or::new(&reg_path, &reg_path, &0x80u8))]),
            method("_CRS", 0, false, &[ret(&aml::MethodCall::new(Path::new("IQCR"), vec![&reg_path]))]),
            // The IRQ number is byte 5 of the Extended Interrupt descriptor (IRQs < 16).
            method(
                "_SRS",
                1,
                false,
                &[store(&aml::DeRefOf::new(&aml::Index::new(&aml::ZERO, &aml::Arg(0), &5u8)), &reg_path)],
            ),
        ],
    )
}

/// The links, their register field and helpers, all in \_SB.
fn links(desc: &PlatformDesc) -> Vec<Raw> {
    let irqs: Vec<u32> = desc.pci_link_irqs.iter().map(|&i| u32::from(i)).collect();
    let field = raw(&aml::Field::new(
        Path::new("PCI0.ISA_.P40C"),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            aml::FieldEntry::Named(*b"PRQ0", 8),
            aml::FieldEntry::Named(*b"PRQ1", 8),
            aml::FieldEntry::Named(*b"PRQ2", 8),
            aml::FieldEntry::Named(*b"PRQ3", 8),
        ],
    ));
    let sci = [u32::from(desc.sci_irq)];
    // The SCI link only overrides polarity to match the MADT; it cannot be changed.
    let lnks = device(
        "LNKS",
        &[
            hid_eisa("PNP0C0F"),
            name_int("_UID", 4),
            name("_PRS", &resource_template(&[ext_irq(true, false, true, &sci)])),
            method("_STA", 0, false, &[ret(&0x0bu8)]),
            method("_DIS", 0, false, &[]),
            method("_CRS", 0, false, &[ret(&Path::new("_PRS"))]),
            method("_SRS", 1, false, &[]),
        ],
    );
    vec![
        field,
        iqst(),
        iqcr(),
        link_dev("LNKA", 0, "PRQ0", &irqs),
        link_dev("LNKB", 1, "PRQ1", &irqs),
        link_dev("LNKC", 2, "PRQ2", &irqs),
        link_dev("LNKD", 3, "PRQ3", &irqs),
        lnks,
    ]
}

/// Link name for `slot`/`pin` (pin 0 = INTA), as QEMU's PIIX `_PRT` computes it.
pub fn prt_link(slot: u8, pin: u8) -> &'static str {
    if slot == 1 && pin == 0 {
        return "LNKS";
    }
    PRT_LINKS[usize::from((slot + pin) & 3)]
}

fn prt() -> Raw {
    let mut entries = Vec::with_capacity(128);
    for slot in 0u8..32 {
        for pin in 0u8..4 {
            let link = Path::new(&format!("\\_SB_.{}", prt_link(slot, pin)));
            entries.push(package(&[
                raw(&((u32::from(slot) << 16) | 0xffff)),
                raw(&pin),
                raw(&link),
                raw(&aml::ZERO),
            ]));
        }
    }
    name("_PRT", &package(&entries))
}

fn cpus(desc: &PlatformDesc) -> Vec<Raw> {
    desc.cpus
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mat = tables::madt_cpu_entry(i as u32, c.apic_id, true);
            device(
                &format!("C{:03X}", i),
                &[
                    hid_str("ACPI0007"),
                    name_int("_UID", i as u64),
                    method("_STA", 0, false, &[ret(&(if c.present { 0x0fu8 } else { 0x00 }))]),
                    name("_MAT", &aml::BufferData::new(mat)),
                ],
            )
        })
        .collect()
}

fn sleep_pkg(name_: &str, typ: u8) -> Raw {
    name(name_, &package(&[raw(&typ), raw(&typ), raw(&aml::ZERO), raw(&aml::ZERO)]))
}

/// The complete DSDT (header included, checksum 0).
pub fn dsdt(desc: &PlatformDesc) -> Vec<u8> {
    let mut body = Vec::new();
    let mut add = |r: Raw| body.extend_from_slice(&r.0);
    add(scope("\\_SB_", &[pci0(desc)]));
    add(scope("\\_SB_", &links(desc)));
    add(scope("\\_SB_.PCI0", &[prt()]));
    add(scope("\\_SB_", &cpus(desc)));
    if desc.s3 {
        add(sleep_pkg("\\_S3_", 1));
    }
    if desc.s4 {
        add(sleep_pkg("\\_S4_", 2));
    }
    // PIIX4: SLP_TYP 0 is soft-off.
    add(sleep_pkg("\\_S5_", 0));
    add(scope("\\_GPE", &[hid_str("ACPI0006")]));
    definition_block(b"DSDT", DSDT_REVISION, &desc.oem, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prt_mapping_matches_piix() {
        // PIIX3 routes slot s pin p to PIRQ[(s + p - 1) & 3]; LNKA..D read PIRQRC A..D.
        for slot in 2u8..32 {
            for pin in 0u8..4 {
                let pirq = (slot + pin + 3) & 3;
                assert_eq!(prt_link(slot, pin), ["LNKA", "LNKB", "LNKC", "LNKD"][pirq as usize]);
            }
        }
        assert_eq!(prt_link(1, 0), "LNKS");
        assert_eq!(prt_link(1, 1), "LNKB");
        assert_eq!(prt_link(0, 0), "LNKD");
    }
}
