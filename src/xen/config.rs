//! libxl's argv (parsed by `hvmdm_toolstack::argv::DmArgs`) → the same [`MachineConfig`] the
//! `hvmdm kvm` CLI builds, plus what only the Xen backend needs. Everything the guest would miss
//! is either built, or refused with a message naming the option; options that only change how the
//! host side looks (VNC off, -name, -nodefaults, ...) are accepted.

use std::os::fd::RawFd;
use std::path::PathBuf;

use hvmdm_devices::storage::ImageFormat;
use hvmdm_toolstack::argv::{
    self, ChardevBackend, DiskInterface as ArgDiskIf, DmArgs, Media, QmpSocket, RunAs, Serial, Vnc,
};
use thiserror::Error;

use crate::config::{DiskConfig, DiskInterface, DiskMedia, FirmwareConfig, MachineConfig, SerialConfig};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum XenConfigError {
    #[error("-xen-domid is required in Xen mode")]
    NoDomid,
    #[error("-m is required in Xen mode (libxl always passes it)")]
    NoMemory,
    #[error("-m {0}: guest RAM must be 16 MiB .. 1 TiB")]
    Memory(u64),
    #[error("{option}: {why}")]
    Unsupported { option: String, why: String },
}

fn unsupported(option: impl Into<String>, why: impl Into<String>) -> XenConfigError {
    XenConfigError::Unsupported { option: option.into(), why: why.into() }
}

/// What the Xen backend needs beyond the machine itself.
#[derive(Debug, Clone)]
pub struct XenOpts {
    pub domid: u32,
    pub max_vcpus: u32,
    pub qmp: Vec<QmpSocket>,
    /// `-S`: start in `prelaunch` until QMP `cont`.
    pub start_paused: bool,
    /// `-incoming fd:N`: device state to load before serving.
    pub incoming_fd: Option<RawFd>,
    pub restrict: bool,
    pub chroot: Option<PathBuf>,
    pub runas: Option<RunAs>,
    /// Seccomp filter after setup (default on; `-sandbox off` turns it off).
    pub seccomp: bool,
    pub name: Option<String>,
    pub ram_below_4g: u64,
    pub ram_above_4g: u64,
    /// QMP ids of the drives, in MachineConfig order (for query-block).
    pub drive_ids: Vec<String>,
    /// Notes for the log: options accepted without effect.
    pub notes: Vec<String>,
}

/// Xen's default top of low RAM (`HVM_BELOW_4G_RAM_END`): the MMIO hole starts here.
pub const HVM_BELOW_4G_RAM_END: u64 = 0xF000_0000;

pub fn from_dm_args(a: &DmArgs) -> Result<(MachineConfig, XenOpts), XenConfigError> {
    let domid = a.domid.ok_or(XenConfigError::NoDomid)?;
    let mib = a.memory_mib.ok_or(XenConfigError::NoMemory)?;
    if !(16..=(1 << 20)).contains(&mib) {
        return Err(XenConfigError::Memory(mib));
    }
    let memory = mib << 20;
    let below_limit = a
        .machine
        .as_ref()
        .and_then(|m| m.max_ram_below_4g)
        .map_or(HVM_BELOW_4G_RAM_END, |v| v.min(HVM_BELOW_4G_RAM_END));
    let ram_below_4g = memory.min(below_limit);
    let ram_above_4g = memory - ram_below_4g;
    let mut notes = Vec::new();

    if a.xen_attach {
        return Err(unsupported("-xen-attach", "PV-domain attach mode is not supported"));
    }
    if a.kernel.is_some() {
        return Err(unsupported("-kernel", "direct kernel boot under Xen is not supported yet"));
    }
    if let Some(m) = &a.machine {
        if m.igd_passthru {
            return Err(unsupported("-machine igd-passthru=on", "graphics passthrough is not supported"));
        }
        if m.xen_platform_pci() {
            notes.push(
                "-machine xenfv: the Xen platform device (00:02.0) is not implemented yet; \
                 slot 2 stays free for it, guests use the emulated disks"
                    .into(),
            );
        }
    }

    let mut disks = Vec::new();
    let mut drive_ids = Vec::new();
    for (n, d) in a.disks.iter().enumerate() {
        // hdtype=ahci: `-device ide-hd,bus=ahci0.<port>` on libxl's `-device ahci,id=ahci0`.
        // (QEMU would give the controller the slot after the VGA and NICs; hvmdm puts it at
        // 00:03.0, see machine::AHCI_SLOT.)
        let (interface, index) = match d.interface {
            ArgDiskIf::Ide { index } => (DiskInterface::Ide, index),
            ArgDiskIf::Ahci { port } if d.media == Media::Disk => (DiskInterface::Ahci, port),
            ArgDiskIf::Ahci { port } => {
                return Err(unsupported(
                    format!("CD-ROM on AHCI port {port}"),
                    "libxl puts CD-ROM drives on IDE even with hdtype=ahci, so it never asks for this",
                ))
            }
            ArgDiskIf::Scsi { .. } => {
                return Err(unsupported("SCSI disk (-device lsi53c895a)", "SCSI is not implemented"))
            }
        };
        let cdrom = d.media == Media::Cdrom;
        // libxl's CD-ROM drives come with or without `file=` (an empty drive); disks need one.
        let path = match (&d.path, cdrom) {
            (Some(p), _) => p.clone(),
            (None, true) => PathBuf::new(),
            (None, false) => return Err(unsupported(format!("-drive #{n}"), "a disk needs file=")),
        };
        let format = match d.format {
            None | Some(argv::DiskFormat::Raw) => ImageFormat::Raw,
            Some(argv::DiskFormat::Qcow2) => ImageFormat::Qcow2,
            Some(f) => {
                return Err(unsupported(
                    format!("-drive format={}", format!("{f:?}").to_lowercase()),
                    "only raw and qcow2 images are supported",
                ))
            }
        };
        if interface == DiskInterface::Ide && index > 3 {
            return Err(unsupported(format!("-drive index={index}"), "IDE has indexes 0..3"));
        }
        let kind = if cdrom { "cd" } else { "hd" };
        let default_id = match interface {
            DiskInterface::Ide => format!("ide{}-{kind}{}", index / 2, index % 2),
            DiskInterface::Ahci => format!("ahcidisk-{index}"),
        };
        drive_ids.push(d.id.clone().unwrap_or(default_id));
        disks.push(DiskConfig {
            path,
            interface,
            readonly: d.readonly || cdrom,
            format,
            index: Some(index),
            id: d.id.clone(),
            media: if cdrom { DiskMedia::Cdrom } else { DiskMedia::Disk },
            // libxl passes cache=writeback; the write-through modes start with the cache off.
            write_cache: !matches!(d.cache.as_deref(), Some("writethrough" | "directsync")),
        });
    }

    let serial = match a.serials.as_slice() {
        [] => SerialConfig::None,
        [first, rest @ ..] => {
            if !rest.is_empty() {
                notes.push(format!("{} extra -serial option(s) ignored: only COM1 exists", rest.len()));
            }
            match first {
                Serial::Pty => SerialConfig::Pty,
                Serial::None | Serial::Null => SerialConfig::None,
                Serial::File(p) => SerialConfig::File(p.clone()),
                Serial::Stdio => SerialConfig::Stdio,
                Serial::Chardev(id) => match a.channels.iter().find(|c| &c.id == id).map(|c| &c.backend) {
                    Some(ChardevBackend::Pty) => SerialConfig::Pty,
                    Some(ChardevBackend::Null) => SerialConfig::None,
                    Some(ChardevBackend::File(p)) => SerialConfig::File(p.clone()),
                    _ => {
                        return Err(unsupported(
                            format!("-serial chardev:{id}"),
                            "only pty/null/file chardevs",
                        ))
                    }
                },
                other => {
                    return Err(unsupported(format!("-serial {other:?}"), "use pty, file:, null or none"))
                }
            }
        }
    };

    if let Some(v) = &a.vga {
        notes.push(format!(
            "-device {:?} VGA: not implemented yet, the guest has no display adapter",
            v.model
        ));
    }
    if !a.nics.is_empty() {
        notes.push(format!(
            "{} emulated NIC(s) not implemented yet: left out (PV vifs are unaffected)",
            a.nics.len()
        ));
    }
    if matches!(a.vnc, Vnc::Listen { .. }) {
        notes.push("-vnc: no display adapter, so no VNC server (query-vnc reports disabled)".into());
    }
    if a.usb || !a.usb_devices.is_empty() {
        notes.push("USB controllers/devices not implemented: left out".into());
    }
    if !a.soundhw.is_empty() || !a.devices.is_empty() {
        notes.push(format!(
            "{} -device/-soundhw item(s) not implemented: left out",
            a.soundhw.len() + a.devices.len()
        ));
    }
    if !a.acpi {
        notes.push("-no-acpi: hvmloader decides about ACPI tables on Xen; PM registers stay".into());
    }

    let boot_order = a.boot.as_ref().map_or_else(|| "cda".to_string(), |b| b.order.clone());
    // CMOS holds at most three boot devices; libxl's default "cda" fits.
    let boot_order: String = boot_order.chars().filter(|c| "acdn".contains(*c)).take(3).collect();

    let cfg = MachineConfig {
        memory,
        smp: a.vcpus.max(1),
        firmware: FirmwareConfig::Hvmloader,
        kernel: None,
        initrd: None,
        append: String::new(),
        disks,
        serial,
        firmware_log: None,
        boot_order: if boot_order.is_empty() { "c".into() } else { boot_order },
        max_cpus: a.max_vcpus.max(a.vcpus).max(1),
        xen: true,
    };
    let opts = XenOpts {
        domid,
        max_vcpus: cfg.max_cpus,
        qmp: a.qmp.clone(),
        start_paused: a.start_paused,
        incoming_fd: a.incoming_fd,
        restrict: a.xen_domid_restrict,
        chroot: a.chroot.clone(),
        runas: a.runas.clone(),
        seccomp: a.sandbox.as_ref().is_none_or(|s| s.enable),
        name: a.name.clone(),
        ram_below_4g,
        ram_above_4g,
        drive_ids,
        notes,
    };
    Ok((cfg, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(MachineConfig, XenOpts), XenConfigError> {
        from_dm_args(&DmArgs::parse(s.split_whitespace()).unwrap())
    }

    /// The spec's complete libxl example (§1.4) minus the CD-ROM, plus `-serial pty`.
    const LIBXL: &str = "-xen-domid 5 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-5,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-5,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control -nodefaults -no-user-config -name vm1 \
        -vnc 127.0.0.1:0,to=99 -display none -serial pty -device cirrus-vga,vgamem_mb=8 \
        -boot order=cda -smp 2,maxcpus=4 \
        -device rtl8139,id=nic0,netdev=net0,mac=00:16:3e:12:34:56 \
        -netdev type=tap,id=net0,ifname=vif5.0-emu,br=xenbr0,script=no,downscript=no \
        -machine xenfv,suppress-vmdesc=on -m 1016 \
        -drive file=/var/lib/xen/images/vm1.img,if=ide,index=0,media=disk,format=raw,cache=writeback";

    #[test]
    fn libxl_example_becomes_a_xen_machine() {
        let (cfg, o) = parse(LIBXL).unwrap();
        assert!(cfg.xen);
        assert_eq!(cfg.firmware, FirmwareConfig::Hvmloader);
        assert_eq!((cfg.memory, cfg.smp, cfg.max_cpus), (1016 << 20, 2, 4));
        assert_eq!((o.domid, o.max_vcpus, o.ram_below_4g, o.ram_above_4g), (5, 4, 1016 << 20, 0));
        assert_eq!(cfg.serial, SerialConfig::Pty);
        assert_eq!(cfg.boot_order, "cda");
        assert_eq!(cfg.disks.len(), 1);
        assert_eq!(cfg.disks[0].index, Some(0));
        assert!(!cfg.disks[0].readonly);
        assert_eq!(o.qmp.len(), 2);
        assert!(o.notes.iter().any(|n| n.contains("VGA")));
        assert!(o.notes.iter().any(|n| n.contains("NIC")));
    }

    #[test]
    fn big_guest_splits_ram_at_the_hole_or_max_ram_below_4g() {
        let (_, o) = parse("-xen-domid 1 -m 8192 -machine xenfv").unwrap();
        assert_eq!(
            (o.ram_below_4g, o.ram_above_4g),
            (HVM_BELOW_4G_RAM_END, (8192 << 20) - HVM_BELOW_4G_RAM_END)
        );
        let (_, o) = parse("-xen-domid 1 -m 8192 -machine xenfv,max-ram-below-4g=2147483648").unwrap();
        assert_eq!(o.ram_below_4g, 2 << 30);
    }

    #[test]
    fn hdtype_ahci_disks_map_to_ports() {
        let (cfg, o) = parse(
            "-xen-domid 1 -m 512 -device ahci,id=ahci0 \
             -drive file=/a,if=none,id=ahcidisk-0,format=raw,cache=writeback \
             -device ide-hd,bus=ahci0.0,unit=0,drive=ahcidisk-0 \
             -drive file=/b,if=none,id=ahcidisk-3,format=raw,cache=writethrough \
             -device ide-hd,bus=ahci0.3,unit=0,drive=ahcidisk-3",
        )
        .unwrap();
        // cache=writethrough: the drive starts with its write cache off.
        assert_eq!(cfg.disks.iter().map(|d| d.write_cache).collect::<Vec<_>>(), vec![true, false]);
        let got: Vec<_> = cfg.disks.iter().map(|d| (d.path.clone(), d.interface, d.index)).collect();
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/a"), DiskInterface::Ahci, Some(0)),
                (PathBuf::from("/b"), DiskInterface::Ahci, Some(3)),
            ]
        );
        assert_eq!(o.drive_ids, vec!["ahcidisk-0", "ahcidisk-3"]);
        // libxl never puts a CD on AHCI; a hand-made command line that does is refused.
        let e = parse(
            "-xen-domid 1 -m 512 -device ahci,id=ahci0 \
             -drive file=/i.iso,if=none,id=ahcicd-1,format=raw \
             -device ide-cd,bus=ahci0.1,unit=0,drive=ahcicd-1",
        );
        assert!(
            matches!(e, Err(XenConfigError::Unsupported { ref option, ref why }) if option.contains("CD-ROM on AHCI") && why.contains("libxl")),
            "{e:?}"
        );
    }

    #[test]
    fn refusals_name_the_option() {
        let e = parse("-xen-domid 1 -m 512 -drive file=/x.vhdx,if=ide,index=0,media=disk,format=vhdx");
        assert!(
            matches!(e, Err(XenConfigError::Unsupported { ref option, .. }) if option.contains("vhdx")),
            "{e:?}"
        );
        let (cfg, _) =
            parse("-xen-domid 1 -m 512 -drive file=/x.qcow2,if=ide,index=0,media=disk,format=qcow2").unwrap();
        assert_eq!(cfg.disks[0].format, ImageFormat::Qcow2);
        assert_eq!(parse("-m 512").err(), Some(XenConfigError::NoDomid));
        assert_eq!(parse("-xen-domid 3").err(), Some(XenConfigError::NoMemory));
        let e = parse("-xen-domid 1 -m 512 -drive if=none,readonly=on,id=ide-5632,file=/i.iso,format=vhdx -device ide-cd,id=ide-5632,drive=ide-5632,bus=ide.1,unit=0");
        assert!(matches!(e, Err(XenConfigError::Unsupported { .. })), "{e:?}");
    }

    #[test]
    fn cdrom_drives_with_and_without_media() {
        // libxl's form (spec §1.3): hdc with an ISO, hdd empty.
        let (cfg, o) = parse(
            "-xen-domid 1 -m 512 \
             -drive if=none,readonly=on,id=ide-5632,file=/i.iso,format=raw \
             -device ide-cd,id=ide-5632,drive=ide-5632,bus=ide.1,unit=0 \
             -drive if=none,readonly=on,id=ide-5696 \
             -device ide-cd,id=ide-5696,drive=ide-5696,bus=ide.1,unit=1",
        )
        .unwrap();
        assert_eq!(cfg.disks.len(), 2);
        let (a, b) = (&cfg.disks[0], &cfg.disks[1]);
        assert!(a.is_cdrom() && a.readonly && a.has_medium());
        assert_eq!((a.path.to_str(), a.index, a.id.as_deref()), (Some("/i.iso"), Some(2), Some("ide-5632")));
        assert!(b.is_cdrom() && !b.has_medium());
        assert_eq!(b.index, Some(3));
        assert_eq!(o.drive_ids, ["ide-5632", "ide-5696"]);
    }
}
