//! MachineConfig: one typed description of a VM, whichever front end (the `hvmdm kvm` CLI, or later
//! libxl's QEMU-style argv) built it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("bad size {0:?}: expected a number with an optional K/M/G suffix (plain numbers are MiB)")]
    BadSize(String),
    #[error("memory size {0} MiB is out of range: hvmdm needs 16 MiB .. 1 TiB")]
    MemoryRange(u64),
    #[error("--smp {0} is out of range: 1..=255 vCPUs")]
    SmpRange(u32),
    #[error("bad --disk {0:?}: {1}")]
    BadDisk(String, String),
    #[error("too many --disk options: {0}")]
    TooManyDisks(String),
    #[error("bad --serial {0:?}: expected stdio, file:PATH, pty or none")]
    BadSerial(String),
    #[error("{what} {path:?} not found{hint}")]
    Missing { what: &'static str, path: PathBuf, hint: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareConfig {
    /// A legacy BIOS image mapped at the top of 4 GiB with its last 128 KiB aliased below 1 MiB.
    Bios(PathBuf),
    /// Split OVMF: read-only CODE at the top of 4 GiB, a private copy of VARS just below it.
    OvmfSplit { code: PathBuf, vars_template: PathBuf },
    /// Xen: the hypervisor's toolstack loads hvmloader and the firmware; the device model maps none.
    Hvmloader,
}

impl FirmwareConfig {
    pub fn is_ovmf(&self) -> bool {
        match self {
            FirmwareConfig::OvmfSplit { .. } => true,
            FirmwareConfig::Bios(p) => p.to_string_lossy().to_ascii_lowercase().contains("ovmf"),
            FirmwareConfig::Hvmloader => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskInterface {
    Ide,
    /// A port of the ICH9 AHCI controller (created when any disk uses it).
    Ahci,
}

/// What the guest sees in a drive slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMedia {
    Disk,
    /// An ATAPI CD-ROM drive (read-only medium; `path` empty = no medium).
    Cdrom,
}
/// Ports of the AHCI controller.
pub const AHCI_PORTS: usize = 6;
/// Drive positions on the two IDE channels.
pub const IDE_POSITIONS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image; empty for a CD-ROM drive without a medium (see [`DiskConfig::has_medium`]).
    pub path: PathBuf,
    pub interface: DiskInterface,
    pub readonly: bool,
    /// Image format, always explicit (`format=`, default raw): never probed.
    pub format: hvmdm_devices::storage::ImageFormat,
    /// IDE position 0..=3 (primary master, primary slave, secondary master, secondary slave), or
    /// AHCI port 0..=5; None = the next one of that interface in order of appearance.
    pub index: Option<u8>,
    /// The id QMP names the drive by (`ide0-hd0` style when none was given).
    pub id: Option<String>,
    pub media: DiskMedia,
    /// The drive's write cache at power-on (`cache=writeback`, the default); `cache=writethrough`
    /// turns it off, so every write is flushed to the image before it completes.
    pub write_cache: bool,
}

impl DiskConfig {
    pub fn is_cdrom(&self) -> bool {
        self.media == DiskMedia::Cdrom
    }
    /// False only for an empty CD-ROM drive.
    pub fn has_medium(&self) -> bool {
        !self.path.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    Stdio,
    File(PathBuf),
    Pty,
    None,
}

#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub memory: u64,
    pub smp: u32,
    pub firmware: FirmwareConfig,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub disks: Vec<DiskConfig>,
    pub serial: SerialConfig,
    pub firmware_log: Option<PathBuf>,
    /// QEMU-style boot order letters ("c" disk, "d" CD, "n" network).
    pub boot_order: String,
    /// The vCPU maximum (hot-pluggable up to it); `smp` vCPUs are present at power-on.
    pub max_cpus: u32,
    /// Xen mode: the hypervisor emulates the LAPIC/IOAPIC/PIC/PIT/HPET, the PM timer, PM1 status
    /// and CMOS 0..13, and hvmloader builds the ACPI tables; the machine leaves those out.
    pub xen: bool,
}

/// Parses "512M", "2G", "65536K", or a plain number of MiB (QEMU's convention) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1u64 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1u64 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1u64 << 40),
        Some(c) if c.is_ascii_digit() => (t, 1u64 << 20),
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

pub fn check_memory(bytes: u64) -> Result<u64, ConfigError> {
    let mib = bytes >> 20;
    if !(16..=1 << 20).contains(&mib) || bytes % (1 << 20) != 0 {
        return Err(ConfigError::MemoryRange(mib));
    }
    Ok(bytes)
}

pub fn check_smp(n: u32) -> Result<u32, ConfigError> {
    if !(1..=255).contains(&n) {
        return Err(ConfigError::SmpRange(n));
    }
    Ok(n)
}

/// `file=PATH[,if=ide|ahci][,readonly=on|off][,format=raw|qcow2][,media=disk|cdrom]`
/// `[,cache=writeback|writethrough]`; a CD-ROM
/// drive (IDE or AHCI) may leave out `file=` to start empty, and is always read-only.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |why: &str| ConfigError::BadDisk(s.to_string(), why.to_string());
    let mut path = None;
    let mut interface = DiskInterface::Ide;
    let mut readonly = false;
    let mut format = hvmdm_devices::storage::ImageFormat::Raw;
    let mut media = DiskMedia::Disk;
    let mut write_cache = true;
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| bad("expected key=value"))?;
        match k {
            "file" => path = Some(PathBuf::from(v)),
            "if" => match v {
                "ide" => interface = DiskInterface::Ide,
                "ahci" => interface = DiskInterface::Ahci,
                other => return Err(bad(&format!("interface {other} is not supported (ide or ahci)"))),
            },
            "readonly" => {
                readonly = match v {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad("readonly must be on or off")),
                }
            }
            "format" => format = v.parse().map_err(|e: String| bad(&e))?,
            "media" => {
                media = match v {
                    "disk" => DiskMedia::Disk,
                    "cdrom" => DiskMedia::Cdrom,
                    _ => return Err(bad(&format!("media {v}: expected disk or cdrom"))),
                }
            }
            "cache" => {
                write_cache = match v {
                    "writeback" => true,
                    "writethrough" => false,
                    // O_DIRECT host I/O and ignored flushes are not implemented: say so.
                    _ => return Err(bad(&format!("cache={v}: only writeback and writethrough"))),
                }
            }
            other => return Err(bad(&format!("unknown key {other}"))),
        }
    }
    if media == DiskMedia::Cdrom {
        readonly = true;
        if path.is_none() {
            return Ok(DiskConfig {
                path: PathBuf::new(),
                format,
                interface,
                readonly,
                index: None,
                id: None,
                media,
                write_cache,
            });
        }
    }
    let path = path.ok_or_else(|| bad("file= is required"))?;
    if !path.is_file() {
        let what = if media == DiskMedia::Cdrom { "CD-ROM image" } else { "disk image" };
        return Err(ConfigError::Missing { what, path, hint: String::new() });
    }
    Ok(DiskConfig { path, interface, readonly, format, index: None, id: None, media, write_cache })
}

/// At most [`IDE_POSITIONS`] IDE and [`AHCI_PORTS`] AHCI disks.
pub fn check_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (interface, max, what) in [
        (DiskInterface::Ide, IDE_POSITIONS, "IDE disks (2 channels x master/slave)"),
        (DiskInterface::Ahci, AHCI_PORTS, "AHCI disks (one per port)"),
    ] {
        let n = disks.iter().filter(|d| d.interface == interface).count();
        if n > max {
            return Err(ConfigError::TooManyDisks(format!("{n} {what}: at most {max}")));
        }
    }
    Ok(())
}

pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    Ok(match s {
        "stdio" => SerialConfig::Stdio,
        "pty" => SerialConfig::Pty,
        "none" => SerialConfig::None,
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => SerialConfig::File(PathBuf::from(p)),
            _ => return Err(ConfigError::BadSerial(s.to_string())),
        },
    })
}

pub const SEABIOS_DEFAULT: &str = "/usr/share/seabios/bios-256k.bin";
pub const OVMF_CODE_DEFAULT: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_DEFAULT: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// `seabios`, `ovmf` or a path to a BIOS/OVMF image.
pub fn resolve_firmware(s: &str) -> Result<FirmwareConfig, ConfigError> {
    let need = |what: &'static str, p: &str, pkg: &str| -> Result<PathBuf, ConfigError> {
        let path = PathBuf::from(p);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ConfigError::Missing {
                what,
                path,
                hint: format!(" (install Debian's {pkg} package: apt-get install {pkg})"),
            })
        }
    };
    match s {
        "seabios" => Ok(FirmwareConfig::Bios(need("SeaBIOS image", SEABIOS_DEFAULT, "seabios")?)),
        "ovmf" => Ok(FirmwareConfig::OvmfSplit {
            code: need("OVMF code image", OVMF_CODE_DEFAULT, "ovmf")?,
            vars_template: need("OVMF variable store template", OVMF_VARS_DEFAULT, "ovmf")?,
        }),
        path => Ok(FirmwareConfig::Bios(need("firmware image", path, "seabios or ovmf")?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("128").unwrap(), 128 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(check_memory(8 << 20).is_err());
        assert!(check_memory(512 << 20).is_ok());
        assert!(check_smp(0).is_err());
        assert!(check_smp(256).is_err());
    }

    #[test]
    fn disk_and_serial() {
        assert!(parse_disk("if=ide").is_err());
        assert!(parse_disk("file=/nonexistent/x.img").is_err());
        let e = parse_disk("file=/etc/hostname,if=scsi").unwrap_err().to_string();
        assert!(e.contains("scsi"), "{e}");
        let d = parse_disk("file=/etc/hostname,if=ide,readonly=on").unwrap();
        assert!(d.readonly);
        assert_eq!(d.format, hvmdm_devices::storage::ImageFormat::Raw);
        let d = parse_disk("file=/etc/hostname,format=qcow2").unwrap();
        assert_eq!(d.format, hvmdm_devices::storage::ImageFormat::Qcow2);
        let e = parse_disk("file=/etc/hostname,format=vmdk").unwrap_err().to_string();
        assert!(e.contains("vmdk"), "{e}");
        assert!(!d.is_cdrom());
        let cd = parse_disk("file=/etc/hostname,if=ide,media=cdrom").unwrap();
        assert!(cd.is_cdrom() && cd.readonly && cd.has_medium());
        let empty = parse_disk("media=cdrom").unwrap();
        assert!(empty.is_cdrom() && !empty.has_medium());
        assert!(parse_disk("media=floppy").is_err());
        // cache=: the write cache at power-on; host-side modes we do not implement are refused.
        assert!(parse_disk("file=/etc/hostname").unwrap().write_cache);
        assert!(parse_disk("file=/etc/hostname,cache=writeback").unwrap().write_cache);
        assert!(!parse_disk("file=/etc/hostname,cache=writethrough").unwrap().write_cache);
        let e = parse_disk("file=/etc/hostname,cache=none").unwrap_err().to_string();
        assert!(e.contains("cache=none"), "{e}");
        assert!(parse_disk("if=ide,media=disk").is_err());
        let e = parse_disk("file=/nonexistent/x.iso,media=cdrom").unwrap_err().to_string();
        assert!(e.contains("CD-ROM image"), "{e}");
        let a = parse_disk("file=/etc/hostname,if=ahci").unwrap();
        assert_eq!((a.interface, a.index), (DiskInterface::Ahci, None));
        let acd = parse_disk("file=/etc/hostname,if=ahci,media=cdrom").unwrap();
        assert!(acd.is_cdrom() && acd.readonly && acd.has_medium() && acd.interface == DiskInterface::Ahci);
        let acd = parse_disk("if=ahci,media=cdrom").unwrap();
        assert!(acd.is_cdrom() && !acd.has_medium() && acd.interface == DiskInterface::Ahci);
        let mut many = vec![a.clone(); 6];
        many.extend(vec![d.clone(); 4]);
        assert!(check_disks(&many).is_ok());
        many.push(a);
        assert!(check_disks(&many).unwrap_err().to_string().contains("AHCI"));
        many.truncate(10);
        many.push(d);
        assert!(check_disks(&many).unwrap_err().to_string().contains("IDE"));
        assert_eq!(parse_serial("file:/tmp/x").unwrap(), SerialConfig::File("/tmp/x".into()));
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn missing_firmware_names_package() {
        let e = resolve_firmware("/nonexistent/bios.bin").unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
