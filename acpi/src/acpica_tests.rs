//! Cross-checks with ACPICA's own tools (Debian `acpica-tools`): `iasl` disassembles and
//! recompiles the DSDT, `acpiexec` loads all tables the way Linux's ACPICA does and evaluates
//! the methods Linux calls (PCI links, _CRS, _STA, _MAT, sleep packages). Skipped (with a note)
//! when the tools are not installed; `.ci/run` should `apt-get install acpica-tools`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tables::sum8;
use crate::{build, CpuDesc, PlatformDesc};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("-h").output().is_ok()
}

fn workdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvmdm-acpi-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes each table with its checksum filled in (as the firmware would leave it).
fn write_tables(desc: &PlatformDesc, dir: &Path) -> Vec<PathBuf> {
    let b = build(desc).unwrap();
    let mut out = Vec::new();
    for (sig, off) in &b.table_offsets {
        if sig == b"RSDT" || sig == b"XSDT" {
            continue;
        }
        let len = u32::from_le_bytes(b.tables[off + 4..off + 8].try_into().unwrap()) as usize;
        let mut t = b.tables[*off..off + len].to_vec();
        if sig != b"FACS" {
            t[9] = 0u8.wrapping_sub(sum8(&t));
        }
        let p = dir.join(format!("{}.dat", String::from_utf8_lossy(sig).to_lowercase()));
        std::fs::write(&p, t).unwrap();
        out.push(p);
    }
    out
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn configs() -> Vec<(&'static str, PlatformDesc)> {
    let mut v = Vec::new();
    v.push(("one", PlatformDesc::pc(PlatformDesc::simple_cpus(1, 1), 0x600, 0x8000_0000)));
    let mut d = PlatformDesc::pc(PlatformDesc::simple_cpus(255, 100), 0xb000, 0xc000_0000);
    d.s3 = true;
    d.s4 = true;
    d.fw_cfg_dma = false;
    d.pci_mmio64 = Some((0x80_0000_0000, 0x8f_ffff_ffff));
    v.push(("many", d));
    let mut d = PlatformDesc::pc(PlatformDesc::simple_cpus(3, 3), 0x600, 0x8000_0000);
    d.cpus.push(CpuDesc { apic_id: 300, present: false });
    v.push(("x2apic", d));
    v
}

#[test]
fn iasl_round_trips_the_dsdt() {
    if !have("iasl") {
        eprintln!("SKIPPED: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    for (tag, desc) in configs() {
        let dir = workdir(&format!("iasl-{tag}"));
        write_tables(&desc, &dir);
        let dis = run(Command::new("iasl").current_dir(&dir).args(["-d", "dsdt.dat"]));
        assert!(dir.join("dsdt.dsl").exists(), "{tag}: iasl -d failed:\n{dis}");
        let asl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for must in ["Device (KBD)", "EisaId (\"PNP0303\")", "Device (LNKS)", "Name (_PRT, Package (0x80)"] {
            assert!(asl.contains(must), "{tag}: {must} missing");
        }
        let comp = run(Command::new("iasl").current_dir(&dir).args(["-p", "again", "dsdt.dsl"]));
        assert!(comp.contains("0 Errors, 0 Warnings, 0 Remarks"), "{tag}: recompilation:\n{comp}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn acpiexec_loads_tables_and_evaluates_methods() {
    if !have("acpiexec") {
        eprintln!("SKIPPED: acpiexec not installed (apt-get install acpica-tools)");
        return;
    }
    for (tag, desc) in configs() {
        let dir = workdir(&format!("exec-{tag}"));
        let files = write_tables(&desc, &dir);
        let last = desc.cpus.len() - 1;
        let mut batch = vec![
            r"Evaluate \_SB.PCI0._CRS".to_string(),
            r"Evaluate \_SB.PCI0.ISA.FWCF._CRS".into(),
            r"Evaluate \_SB.LNKA._PRS".into(),
            r"Evaluate \_SB.LNKB._SRS (89 06 00 09 01 0b 00 00 00 79 00)".into(),
            r"Evaluate \_SB.LNKB._CRS".into(),
            r"Evaluate \_SB.LNKB._STA".into(),
            r"Evaluate \_SB.LNKC._DIS".into(),
            r"Evaluate \_SB.LNKC._STA".into(),
            r"Evaluate \_SB.LNKS._CRS".into(),
            format!(r"Evaluate \_SB.C{last:03X}._MAT"),
            format!(r"Evaluate \_SB.C{last:03X}._STA"),
            r"Evaluate \_S5".into(),
        ];
        if desc.s3 {
            batch.push(r"Evaluate \_S3".into());
        }
        let out =
            run(Command::new("acpiexec").current_dir(&dir).arg("-b").arg(batch.join("; ")).args(&files));
        // acpiexec's built-in hardware self-tests poke PM2_CNT and GPE numbers this platform
        // does not have ("Unexpected AE_BAD_ADDRESS from AcpiWriteBitRegister (aetests-...)");
        // those lines are about the test harness, not the tables.
        let bad: Vec<&str> = out
            .lines()
            .filter(|l| !l.contains("(aetests-"))
            .filter(|l| {
                ["Error", "Warning", "Exception", "Firmware Bug", "failed"].iter().any(|k| l.contains(k))
            })
            .collect();
        assert!(bad.is_empty(), "{tag}: ACPICA complained:\n{}\n---\n{out}", bad.join("\n"));
        // _SRS then _CRS reads back IRQ 11 through the PIIX3 PIRQRC field.
        assert!(out.contains("89 06 00 09 01 0B 00 00 00 79 00"), "{tag}: LNKB _CRS after _SRS:\n{out}");
        assert!(out.contains("[Integer] = 0000000000000009"), "{tag}: disabled link _STA");
        assert!(!out.contains("No such object") && !out.contains("AE_NOT_FOUND"), "{tag}:\n{out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
