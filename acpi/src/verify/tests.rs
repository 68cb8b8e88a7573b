use super::*;
use crate::linker::{LoaderCommand, LOADER_CMD_SIZE};
use crate::{
    build, AcpiBlobs, CpuDesc, PlatformDesc, LOADER_ALIGN, LOADER_FILE, RSDP_FILE, TABLES_ALIGN, TABLES_FILE,
};

const FWS: [Firmware; 2] = [Firmware::SeaBios, Firmware::Ovmf];

fn files(b: &AcpiBlobs) -> impl Fn(&str) -> Option<Vec<u8>> + '_ {
    move |name| match name {
        TABLES_FILE => Some(b.tables.clone()),
        RSDP_FILE => Some(b.rsdp.clone()),
        LOADER_FILE => Some(b.loader.clone()),
        _ => None,
    }
}

fn run(b: &AcpiBlobs, fw: Firmware) -> Result<VerifyReport, VerifyError> {
    verify(&b.loader, &files(b), fw)
}

/// Every 3rd CPU absent (but the first), APIC IDs sparse when `sparse`.
fn cpus(n: u32, sparse: bool) -> Vec<CpuDesc> {
    (0..n)
        .map(|i| CpuDesc { apic_id: if sparse { i * 2 } else { i }, present: i == 0 || i % 3 != 2 })
        .collect()
}

fn desc(n: u32) -> PlatformDesc {
    PlatformDesc::pc(cpus(n, false), 0x600, 0x8000_0000)
}

fn cmd_index(b: &AcpiBlobs, pred: impl Fn(&LoaderCommand) -> bool) -> usize {
    crate::linker::decode_script(&b.loader).iter().position(pred).unwrap()
}

#[test]
fn accepts_every_configuration_on_both_firmwares() {
    for n in [1u32, 2, 4, 8, 64, 255] {
        for sparse in [false, true] {
            if sparse && n * 2 > 254 {
                continue;
            }
            for pm in [0x600u16, 0xb000] {
                for dma in [false, true] {
                    for s3 in [false, true] {
                        let mut d = PlatformDesc::pc(cpus(n, sparse), pm, 0x8000_0000);
                        d.fw_cfg_dma = dma;
                        d.s3 = s3;
                        d.s4 = s3;
                        let b = build(&d).unwrap();
                        assert_eq!(b.tables.len() % TABLES_ALIGN, 0);
                        assert_eq!(b.loader.len() % LOADER_ALIGN, 0);
                        for fw in FWS {
                            let r = run(&b, fw).unwrap_or_else(|e| panic!("n={n} pm={pm:#x} {fw:?}: {e}"));
                            for sig in ["FACP", "DSDT", "FACS", "APIC"] {
                                assert!(r.has(sig), "{fw:?} lacks {sig}: {:?}", r.tables);
                            }
                            assert_eq!(r.tables.iter().filter(|t| t.signature == "FACP").count(), 1);
                            if fw == Firmware::SeaBios {
                                let a = r.rsdp_address.unwrap();
                                assert!((0xf0000..0x100000).contains(&a) && a % 16 == 0);
                            } else {
                                // OVMF never installs QEMU's RSDT/XSDT.
                                assert!(!r.has("RSDT") && !r.has("XSDT"));
                                assert_eq!(r.tables.len(), 4);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn x2apic_ids_are_accepted() {
    let mut d = desc(4);
    d.cpus.push(CpuDesc { apic_id: 300, present: true });
    let b = build(&d).unwrap();
    for fw in FWS {
        run(&b, fw).unwrap();
    }
    let m = &b.tables[madt_off(&b)..];
    // Type 9 entry for APIC ID 300 with UID 4, and an x2APIC NMI entry.
    let len = u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize;
    let entries = madt_entries(&m[..len]);
    assert!(entries
        .iter()
        .any(|e| e[0] == 9 && e[4..8] == 300u32.to_le_bytes() && e[12..16] == 4u32.to_le_bytes()));
    assert!(entries.iter().any(|e| e[0] == 0x0a));
}

fn madt_off(b: &AcpiBlobs) -> usize {
    b.table_offsets.iter().find(|(s, _)| s == b"APIC").unwrap().1
}

fn madt_entries(m: &[u8]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut o = 44;
    while o < m.len() {
        let l = m[o + 1] as usize;
        v.push(m[o..o + l].to_vec());
        o += l;
    }
    v
}

#[test]
fn madt_matches_apic_ids() {
    let d = PlatformDesc::pc(cpus(12, true), 0xb000, 0xc000_0000);
    let b = build(&d).unwrap();
    let off = madt_off(&b);
    let m = &b.tables[off..];
    let len = u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize;
    let m = &m[..len];
    assert_eq!(&m[36..40], &0xfee0_0000u32.to_le_bytes());
    assert_eq!(&m[40..44], &1u32.to_le_bytes(), "PCAT_COMPAT");
    let e = madt_entries(m);
    let lapics: Vec<_> = e.iter().filter(|e| e[0] == 0).collect();
    assert_eq!(lapics.len(), 12);
    for (i, (l, c)) in lapics.iter().zip(&d.cpus).enumerate() {
        assert_eq!(l[2] as usize, i, "UID");
        assert_eq!(u32::from(l[3]), c.apic_id);
        assert_eq!(l[4] & 1 == 1, c.present);
    }
    let ioapic = e.iter().find(|e| e[0] == 1).unwrap();
    assert_eq!(&ioapic[4..8], &0xfec0_0000u32.to_le_bytes());
    let isos: Vec<(u8, u32, u16)> = e
        .iter()
        .filter(|e| e[0] == 2)
        .map(|e| (e[3], u32::from_le_bytes(e[4..8].try_into().unwrap()), u16::from_le_bytes([e[8], e[9]])))
        .collect();
    assert_eq!(isos, vec![(0, 2, 0), (5, 5, 0xd), (9, 9, 0xd), (10, 10, 0xd), (11, 11, 0xd)]);
    assert!(e.iter().any(|e| e == &vec![4, 6, 0xff, 0, 0, 1]), "LINT1 NMI");
}

#[test]
fn fadt_fields_after_loading() {
    let b = build(&PlatformDesc::pc(cpus(2, false), 0xb000, 0x8000_0000)).unwrap();
    let r = run(&b, Firmware::SeaBios).unwrap();
    let f = r.tables.iter().find(|t| t.signature == "FACP").unwrap();
    assert_eq!(f.length, 276);
    let off = b.table_offsets.iter().find(|(s, _)| s == b"FACP").unwrap().1;
    let t = &b.tables[off..off + 276];
    assert_eq!(t[8], 6, "revision");
    let u32at = |o: usize| u32::from_le_bytes(t[o..o + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([t[46], t[47]]), 9, "SCI_INT");
    assert_eq!(u32at(48), 0xb2);
    assert_eq!((t[52], t[53]), (0xf1, 0xf0));
    assert_eq!(u32at(56), 0xb000, "PM1a_EVT");
    assert_eq!(u32at(64), 0xb004, "PM1a_CNT");
    assert_eq!(u32at(76), 0xb008, "PM_TMR");
    assert_eq!(u32at(80), 0xafe0, "GPE0");
    assert_eq!((t[88], t[89], t[91], t[92]), (4, 2, 4, 4));
    assert_eq!(u16::from_le_bytes([t[109], t[110]]), 3, "IAPC_BOOT_ARCH legacy + 8042");
    let flags = u32at(112);
    assert_eq!(flags & (1 << 4), 0, "fixed power button");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // RESET_REG: SystemIO, 8 bits, byte access, 0xCF9, value 6 (SeaBIOS needs width 8, offset 0).
    assert_eq!(&t[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64::from_le_bytes(t[120..128].try_into().unwrap()), 0xcf9);
    assert_eq!(t[128], 6);
    // X_FIRMWARE_CTRL stays zero.
    assert_eq!(&t[132..140], &[0; 8]);
    // Checksum bytes are zero in the blob.
    for (_, o) in &b.table_offsets {
        if &b.tables[*o..*o + 4] != b"FACS" {
            assert_eq!(b.tables[o + 9], 0);
        }
    }
    assert_eq!(b.rsdp[8], 0);
    assert_eq!(b.rsdp[32], 0);
    assert_eq!(b.rsdp[15], 2);
}

#[test]
fn padding_is_stable_across_pm_base_and_cpu_growth() {
    let a = build(&PlatformDesc::pc(cpus(4, false), 0xb000, 0x8000_0000)).unwrap();
    let b = build(&PlatformDesc::pc(cpus(4, false), 0x600, 0x8000_0000)).unwrap();
    assert_eq!(a.tables.len(), b.tables.len());
    assert_eq!(a.loader.len(), b.loader.len());
    assert_eq!(a.tables_used, b.tables_used);
    let c = build(&PlatformDesc::pc(cpus(255, false), 0x600, 0x8000_0000)).unwrap();
    assert!(c.tables_used > a.tables_used);
    assert_eq!(c.tables.len(), a.tables.len());
    assert_eq!(c.loader.len(), a.loader.len());
}

/// Seed 000: the firmware read the directory before the rebuild.
#[test]
fn seed_000_stale_directory_size() {
    let before = build(&desc(1)).unwrap();
    let after = build(&desc(64)).unwrap();
    // Padding absorbs the growth: the stale size equals the new one and both firmwares are fine.
    assert!(after.tables_used > before.tables_used);
    assert_eq!(before.tables.len(), after.tables.len());
    let stale_padded = |n: &str| match n {
        TABLES_FILE => Some(after.tables[..before.tables.len()].to_vec()),
        _ => files(&after)(n),
    };
    for fw in FWS {
        verify(&after.loader, &stale_padded, fw).unwrap();
    }
    // Without padding, the firmware downloads only the old number of bytes of the new blob.
    let stale = |n: &str| match n {
        TABLES_FILE => Some(after.tables[..before.tables_used].to_vec()),
        _ => files(&after)(n),
    };
    let e = verify(&after.loader, &stale, Firmware::Ovmf).unwrap_err();
    let VerifyError::Loader { message, .. } = &e else { panic!("{e}") };
    assert!(
        message.contains("invalid checksum range") || message.contains("invalid pointer"),
        "unexpected OVMF message: {message}"
    );
    let e = verify(&after.loader, &stale, Firmware::SeaBios).unwrap_err();
    assert!(e.to_string().contains("internal error"), "{e}");
    // A stale loader size (OVMF reads the size before selecting): the script is cut short.
    // With the RSDP's extended checksum cut off, SeaBIOS finds no RSDP.
    let short = &after.loader[..after.loader_used - LOADER_CMD_SIZE];
    let e = verify(short, &files(&after), Firmware::SeaBios).unwrap_err();
    assert!(e.to_string().contains("no valid RSDP"), "{e}");
    // With the table checksums cut off, OVMF installs nothing useful.
    let short = &after.loader[..(after.loader_used / LOADER_CMD_SIZE / 2) * LOADER_CMD_SIZE];
    let e = verify(short, &files(&after), Firmware::Ovmf).unwrap_err();
    assert!(matches!(e, VerifyError::Tables { .. }), "{e}");
}

#[test]
fn rejects_wrong_script_size() {
    let b = build(&desc(2)).unwrap();
    let cut = &b.loader[..b.loader.len() - 1];
    for fw in FWS {
        let e = verify(cut, &files(&b), fw).unwrap_err();
        assert!(matches!(e, VerifyError::Loader { index: None, .. }));
    }
    let e = verify(cut, &files(&b), Firmware::Ovmf).unwrap_err();
    assert!(e.to_string().contains("\"etc/table-loader\" has invalid size"), "{e}");
}

#[test]
fn rejects_checksum_range_past_end() {
    let mut b = build(&desc(2)).unwrap();
    let i = cmd_index(&b, |c| matches!(c, LoaderCommand::AddChecksum { .. }));
    let at = i * LOADER_CMD_SIZE + 68;
    b.loader[at..at + 4].copy_from_slice(&(b.tables.len() as u32).to_le_bytes());
    let e = run(&b, Firmware::Ovmf).unwrap_err();
    assert!(
        e.to_string().contains("ProcessCmdAddChecksum: invalid checksum range in \"etc/acpi/tables\""),
        "{e}"
    );
    let e = run(&b, Firmware::SeaBios).unwrap_err();
    assert!(e.to_string().contains("internal error"), "{e}");
}

#[test]
fn rejects_pointer_value_past_pointee() {
    let mut b = build(&desc(2)).unwrap();
    // The FADT's DSDT field holds a relative offset; make it point past the tables blob.
    let off = b.table_offsets.iter().find(|(s, _)| s == b"FACP").unwrap().1 + 40;
    let bad = b.tables.len() as u32;
    b.tables[off..off + 4].copy_from_slice(&bad.to_le_bytes());
    let e = run(&b, Firmware::Ovmf).unwrap_err();
    assert!(e.to_string().contains("invalid pointer value in \"etc/acpi/tables\""), "{e}");
    // SeaBIOS does not range-check; the broken FADT shows up when the tables are read.
    let e = run(&b, Firmware::SeaBios).unwrap_err();
    assert!(matches!(e, VerifyError::Tables { .. }), "{e}");
}

#[test]
fn rejects_oversized_table_and_bad_checksum() {
    // A table whose Length runs past the blob: OVMF's header probe fails, the MADT is not
    // installed; SeaBIOS's checksum command runs past the end.
    let mut b = build(&desc(2)).unwrap();
    let off = madt_off(&b);
    let huge = (b.tables.len() - off + 1) as u32;
    b.tables[off + 4..off + 8].copy_from_slice(&huge.to_le_bytes());
    for fw in FWS {
        assert!(run(&b, fw).is_err(), "{fw:?} accepted an oversized MADT");
    }
    // A table byte changed after the checksum was computed (no checksum command covers it).
    let mut b = build(&desc(2)).unwrap();
    let mo = madt_off(&b);
    let i = cmd_index(&b, |c| matches!(c, LoaderCommand::AddChecksum { start, .. } if *start as usize == mo));
    b.loader[i * LOADER_CMD_SIZE..i * LOADER_CMD_SIZE + 4].copy_from_slice(&0u32.to_le_bytes());
    b.tables[mo + 9] = 0x55;
    let e = run(&b, Firmware::Ovmf).unwrap_err();
    assert!(e.to_string().contains("expected exactly one APIC"), "{e}");
    let e = run(&b, Firmware::SeaBios).unwrap_err();
    assert!(e.to_string().contains("Incorrect checksum in table [APIC]"), "{e}");
}

#[test]
fn firmware_specific_allocate_rules() {
    let b = build(&desc(2)).unwrap();
    // Alignment 8192: OVMF refuses, SeaBIOS accepts.
    let mut l = b.loader.clone();
    l[60..64].copy_from_slice(&8192u32.to_le_bytes());
    assert!(verify(&l, &files(&b), Firmware::Ovmf)
        .unwrap_err()
        .to_string()
        .contains("unsupported alignment 0x2000"));
    verify(&l, &files(&b), Firmware::SeaBios).unwrap();
    // Non-power-of-two alignment: SeaBIOS internal error.
    l[60..64].copy_from_slice(&48u32.to_le_bytes());
    assert!(verify(&l, &files(&b), Firmware::SeaBios).is_err());
    // Duplicate ALLOCATE.
    let mut l = b.loader.clone();
    let first: Vec<u8> = l[..128].to_vec();
    l[128..256].copy_from_slice(&first);
    assert!(verify(&l, &files(&b), Firmware::Ovmf).unwrap_err().to_string().contains("duplicated file"));
    // Missing file: OVMF fails, SeaBIOS skips silently and then fails on the uses.
    let none = |_: &str| None;
    assert!(verify(&b.loader, &none, Firmware::Ovmf).unwrap_err().to_string().contains("Not Found"));
    let e = verify(&b.loader, &none, Firmware::SeaBios).unwrap_err();
    assert!(e.to_string().contains("not loaded"), "{e}");
    // Unterminated name.
    let mut l = b.loader.clone();
    l[4..60].fill(b'a');
    assert!(verify(&l, &files(&b), Firmware::Ovmf).unwrap_err().to_string().contains("malformed file name"));
    // Zero padding commands are skipped by both.
    let mut l = b.loader[..b.loader_used].to_vec();
    l.extend_from_slice(&[0u8; 128 * 3]);
    for fw in FWS {
        verify(&l, &files(&b), fw).unwrap();
    }
}

#[test]
fn write_pointer_rules() {
    let b = build(&desc(2)).unwrap();
    let mut linker = crate::Linker::new();
    linker.allocate(TABLES_FILE, 64, crate::AllocZone::High).unwrap();
    linker.write_pointer("etc/vmgenid_addr", 0, 8, TABLES_FILE, 40).unwrap();
    let mut script = b.loader[..b.loader_used].to_vec();
    // Append just the WRITE_POINTER.
    script.extend_from_slice(&linker.to_bytes()[128..256]);
    let with_addr = |n: &str| if n == "etc/vmgenid_addr" { Some(vec![0; 8]) } else { files(&b)(n) };
    for fw in FWS {
        let r = verify(&script, &with_addr, fw).unwrap();
        let w = &r.write_pointers[0];
        let base = r.blobs.iter().find(|x| x.0 == TABLES_FILE).unwrap().1;
        assert_eq!((w.file.as_str(), w.offset, w.size, w.value), ("etc/vmgenid_addr", 0, 8, base + 40));
    }
    // Destination file too small / unknown.
    let small = |n: &str| if n == "etc/vmgenid_addr" { Some(vec![0; 4]) } else { files(&b)(n) };
    assert!(verify(&script, &small, Firmware::Ovmf)
        .unwrap_err()
        .to_string()
        .contains("invalid pointer location"));
    assert!(verify(&script, &files(&b), Firmware::Ovmf)
        .unwrap_err()
        .to_string()
        .contains("invalid fw_cfg file"));
    assert!(verify(&script, &small, Firmware::SeaBios).is_err());
}

#[test]
fn too_many_tables_for_ovmf() {
    // 129 distinct table targets: OVMF installs at most 128.
    let mut linker = crate::Linker::new();
    linker.allocate("t", 64, crate::AllocZone::High).unwrap();
    let mut blob = Vec::new();
    for i in 0..129u32 {
        let mut t = crate::tables::header(b"SSDT", 1, &crate::OemIds::default());
        t[9] = 0u8.wrapping_sub(crate::tables::sum8(&t));
        let off = blob.len() as u32;
        blob.extend_from_slice(&t);
        linker.allocate(&format!("p{i}"), 8, crate::AllocZone::High).unwrap();
        linker.add_pointer(&format!("p{i}"), 0, 4, "t").unwrap();
        let _ = off;
    }
    let blob2 = blob.clone();
    let f = move |n: &str| -> Option<Vec<u8>> {
        if n == "t" {
            Some(blob2.clone())
        } else {
            let i: u32 = n.strip_prefix('p')?.parse().ok()?;
            Some((i * 36).to_le_bytes().to_vec())
        }
    };
    let e = verify(&linker.to_bytes(), &f, Firmware::Ovmf).unwrap_err();
    assert!(e.to_string().contains("can't install more than 128 tables"), "{e}");
}
