//! Parser for the QEMU-style command line libxl 4.17 builds for a qemu-xen HVM device model
//! (`libxl__build_device_model_args_new`, non-stubdom).
//!
//! Every option is either understood and recorded in [`DmArgs`] or rejected with an [`ArgvError`]
//! naming it; nothing is silently dropped. Parameter lists follow QemuOpts rules: elements are
//! separated by `,`, a doubled `,,` is a literal comma, the first element may be the option's
//! implied key (e.g. `-machine xenfv`, `-device ide-cd,...`), a bare `name` means `name=on`.
//!
//! Policy decisions (what hvmdm can actually emulate) stay with the machine assembly; this parser
//! rejects only what is malformed, unknown, or a feature no hvmdm build will have (SPICE, COLO,
//! qemu-xen-traditional syntax, migration transports other than `fd:`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// Errors while parsing the device-model argv. Each names the offending option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    #[error("unknown option {0}")]
    UnknownOption(String),
    #[error("option {0} requires an argument")]
    MissingArgument(String),
    #[error("option {option} is not supported: {reason}")]
    Unsupported { option: String, reason: String },
    #[error("option {option}: invalid value {value:?}: {reason}")]
    InvalidValue { option: String, value: String, reason: String },
    #[error("option {option}: unknown parameter '{param}'")]
    UnknownParameter { option: String, param: String },
    #[error("option {option}: missing parameter '{param}'")]
    MissingParameter { option: String, param: String },
    #[error("option {option}: {reason}")]
    Reference { option: String, reason: String },
    #[error("unexpected argument {0:?} (hvmdm takes disk images only via -drive)")]
    Positional(String),
    #[error("argument {0} is not valid UTF-8")]
    NotUtf8(usize),
}

type Result<T> = std::result::Result<T, ArgvError>;

/// Highest vCPU count of an HVM guest (Xen's HVM_MAX_VCPUS).
pub const MAX_VCPUS: u32 = 128;
/// Xen's DOMID_FIRST_RESERVED: domids at or above are not real guests.
pub const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

/// Everything the device-model argv asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmArgs {
    /// `-xen-domid N`.
    pub domid: Option<u32>,
    /// `-xen-attach`: attach to an existing domain (the only mode hvmdm has anyway).
    pub xen_attach: bool,
    /// `-xen-domid-restrict` (dm_restrict=1): restrict Xen handles to `domid`.
    pub xen_domid_restrict: bool,
    /// `-no-shutdown`: guest poweroff is reported to Xen, the process stays.
    pub no_shutdown: bool,
    /// `-S`: start in `prelaunch`, wait for QMP `cont`.
    pub start_paused: bool,
    pub nodefaults: bool,
    pub no_user_config: bool,
    /// `-name`.
    pub name: Option<String>,
    /// `-m`, guest RAM in MiB (libxl passes RAM excluding VRAM).
    pub memory_mib: Option<u64>,
    /// `-smp`: vCPUs online at start (defaults to 1).
    pub vcpus: u32,
    /// `-smp ...,maxcpus=`: vCPUs the guest may ever have (defaults to `vcpus`).
    pub max_vcpus: u32,
    /// `-machine` / `-M`.
    pub machine: Option<Machine>,
    /// QMP monitors (`-chardev socket,...` + `-mon ...,mode=control`).
    pub qmp: Vec<QmpSocket>,
    /// Character devices not used by a monitor or serial port (libxl `channel=`).
    pub channels: Vec<Chardev>,
    /// `-serial`, in order (COM1 first).
    pub serials: Vec<Serial>,
    pub vnc: Vnc,
    /// `-display` values in order (libxl: `none`, then maybe `sdl`).
    pub displays: Vec<String>,
    pub nographic: bool,
    /// `-k`.
    pub keymap: Option<String>,
    /// `-boot`.
    pub boot: Option<Boot>,
    /// `-kernel`/`-initrd`/`-append` (direct kernel boot).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Emulated disks resolved from `-drive` (+ `-device ide-hd|ide-cd|scsi-hd`).
    pub disks: Vec<Disk>,
    /// `-device ahci,id=...` controller id.
    pub ahci: Option<String>,
    /// `-device lsi53c895a` present.
    pub scsi_controller: bool,
    /// `-device cirrus-vga|VGA|qxl-vga`.
    pub vga: Option<Vga>,
    /// Emulated NICs (`-device <model>,netdev=...` + `-netdev type=tap,...`).
    pub nics: Vec<Nic>,
    /// `-net none`.
    pub net_none: bool,
    /// `-usb`.
    pub usb: bool,
    /// `-usbdevice X`.
    pub usb_devices: Vec<String>,
    /// `-soundhw X`.
    pub soundhw: Vec<String>,
    /// `-no-acpi` clears it.
    pub acpi: bool,
    /// `-device xen-pvdevice,device-id=N`.
    pub xen_pvdevice: Option<u16>,
    /// Other accepted `-device`s (USB controllers/devices, sound).
    pub devices: Vec<DeviceArg>,
    /// `-global driver.prop=value`.
    pub globals: Vec<GlobalProp>,
    /// `-incoming fd:N`.
    pub incoming_fd: Option<RawFd>,
    /// `-runas`.
    pub runas: Option<RunAs>,
    /// `-chroot`.
    pub chroot: Option<PathBuf>,
    /// `-sandbox` value (raw parameter list; first element `on`/`off`).
    pub sandbox: Option<Sandbox>,
    /// Options accepted but without effect on hvmdm (e.g. `-trace`), recorded for the log.
    pub ignored: Vec<IgnoredOption>,
}

impl Default for DmArgs {
    fn default() -> Self {
        Self {
            domid: None,
            xen_attach: false,
            xen_domid_restrict: false,
            no_shutdown: false,
            start_paused: false,
            nodefaults: false,
            no_user_config: false,
            name: None,
            memory_mib: None,
            vcpus: 1,
            max_vcpus: 1,
            machine: None,
            qmp: Vec::new(),
            channels: Vec::new(),
            serials: Vec::new(),
            vnc: Vnc::Default,
            displays: Vec::new(),
            nographic: false,
            keymap: None,
            boot: None,
            kernel: None,
            initrd: None,
            append: None,
            disks: Vec::new(),
            ahci: None,
            scsi_controller: false,
            vga: None,
            nics: Vec::new(),
            net_none: false,
            usb: false,
            usb_devices: Vec::new(),
            soundhw: Vec::new(),
            acpi: true,
            xen_pvdevice: None,
            devices: Vec::new(),
            globals: Vec::new(),
            incoming_fd: None,
            runas: None,
            chroot: None,
            sandbox: None,
            ignored: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// `xenfv`: i440FX + PIIX3 with the Xen platform device (xen_platform_pci=1).
    Xenfv,
    /// `pc,accel=xen`: the same without the Xen platform device.
    PcXen,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub kind: MachineType,
    pub suppress_vmdesc: bool,
    /// `max-ram-below-4g=` in bytes (xl `mmio_hole`).
    pub max_ram_below_4g: Option<u64>,
    pub igd_passthru: bool,
}

impl Machine {
    /// Whether the Xen platform PCI device (5853:0001) belongs in the guest.
    pub fn xen_platform_pci(&self) -> bool {
        self.kind == MachineType::Xenfv
    }
}

/// Where a socket chardev listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketEndpoint {
    /// `path=`: bind (after unlinking a stale socket) and listen.
    Path(PathBuf),
    /// `fd=`: an already bound and listening AF_UNIX socket inherited from libxl.
    Fd(RawFd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    Socket { endpoint: SocketEndpoint, server: bool, wait: bool },
    Pty,
    Null,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chardev {
    pub id: String,
    pub backend: ChardevBackend,
}

/// A QMP monitor socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSocket {
    /// The chardev id (`libxl-cmd`, `libxenstat-cmd`).
    pub chardev_id: String,
    pub endpoint: SocketEndpoint,
    pub wait: bool,
    pub pretty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// A new pty; its name is reported by `query-chardev` as `pty:<path>`.
    Pty,
    None,
    Null,
    Stdio,
    File(PathBuf),
    /// A host device such as `/dev/ttyS0`.
    HostDevice(PathBuf),
    Unix {
        path: PathBuf,
        server: bool,
        wait: bool,
    },
    /// `chardev:<id>`: one of `channels`.
    Chardev(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vnc {
    /// No `-vnc` option.
    Default,
    /// `-vnc none`.
    Disabled,
    /// `-vnc <host>:<display>[,to=N][,password=on]`.
    Listen { host: String, display: u32, to: Option<u32>, password: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// Device letters: `c` disk, `d` cdrom, `n`.. network, `a`/`b` floppy.
    pub order: String,
    pub once: Option<String>,
    pub menu: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow,
    Qcow2,
    Vpc,
    Vhdx,
    Qed,
    HostDevice,
}

impl DiskFormat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => Self::Raw,
            "qcow" => Self::Qcow,
            "qcow2" => Self::Qcow2,
            "vpc" => Self::Vpc,
            "vhdx" => Self::Vhdx,
            "qed" => Self::Qed,
            "host_device" => Self::HostDevice,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Disk,
    Cdrom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskInterface {
    /// PIIX IDE; `index` 0..=3 = primary master, primary slave, secondary master, secondary slave.
    Ide { index: u8 },
    /// AHCI port 0..=5 (unit 0).
    Ahci { port: u8 },
    /// LSI SCSI target id.
    Scsi { scsi_id: u8 },
}

impl DiskInterface {
    /// IDE channel / AHCI port / SCSI target.
    pub fn bus(&self) -> u8 {
        match *self {
            Self::Ide { index } => index / 2,
            Self::Ahci { port } => port,
            Self::Scsi { scsi_id } => scsi_id,
        }
    }
    /// Master (0) or slave (1) on IDE; always 0 elsewhere.
    pub fn unit(&self) -> u8 {
        match *self {
            Self::Ide { index } => index % 2,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub interface: DiskInterface,
    pub media: Media,
    /// None for an empty CD-ROM drive.
    pub path: Option<PathBuf>,
    pub format: Option<DiskFormat>,
    pub readonly: bool,
    pub cache: Option<String>,
    /// The id QMP uses for this drive (`ide-<dev_number>` for CD-ROMs, the drive id otherwise).
    pub id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VgaModel {
    Cirrus,
    Std,
    Qxl,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vga {
    pub model: VgaModel,
    /// `vgamem_mb` / `vram_size_mb`.
    pub vram_mb: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub model: String,
    pub id: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub netdev_id: String,
    /// Tap interface name (`vif<domid>.<devid>-emu`).
    pub ifname: Option<String>,
    pub bridge: Option<String>,
    pub script: Option<String>,
    pub downscript: Option<String>,
}

/// A `-device` kept as given (USB and sound devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceArg {
    pub driver: String,
    pub props: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalProp {
    pub driver: String,
    pub property: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    User(String),
    Ids { uid: u32, gid: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub enable: bool,
    pub params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredOption {
    pub option: String,
    pub value: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// QemuOpts-style parameter lists

struct Opts {
    option: String,
    pairs: Vec<(String, String)>,
}

impl Opts {
    /// Splits `value`; `implied` names the key of a leading element without `=`.
    fn parse(option: &str, value: &str, implied: Option<&str>) -> Result<Self> {
        let mut elems = Vec::new();
        let mut cur = String::new();
        let mut chars = value.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    elems.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        elems.push(cur);
        let mut pairs = Vec::with_capacity(elems.len());
        for (i, e) in elems.into_iter().enumerate() {
            match e.split_once('=') {
                Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
                None if i == 0 && implied.is_some() => {
                    pairs.push((implied.unwrap_or_default().to_string(), e));
                }
                None if e.is_empty() => {
                    // A trailing comma is tolerated by QemuOpts; a hole in the middle is not.
                    if i == 0 {
                        return Err(invalid(option, value, "empty parameter list"));
                    }
                }
                None => pairs.push((e, "on".to_string())),
            }
        }
        Ok(Self { option: option.to_string(), pairs })
    }

    /// Removes and returns the last value of `key` (QemuOpts: the last one wins).
    fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.pairs.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }

    fn take_required(&mut self, key: &str) -> Result<String> {
        self.take(key).ok_or_else(|| ArgvError::MissingParameter {
            option: self.option.clone(),
            param: key.to_string(),
        })
    }

    fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => parse_bool(&v)
                .map(Some)
                .ok_or_else(|| invalid(&self.option, &v, &format!("'{key}' expects on/off"))),
        }
    }

    fn take_num<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => parse_int::<T>(&v)
                .map(Some)
                .ok_or_else(|| invalid(&self.option, &v, &format!("'{key}' expects a number"))),
        }
    }

    /// Errors on the first parameter nobody consumed.
    fn finish(self) -> Result<()> {
        match self.pairs.into_iter().next() {
            None => Ok(()),
            Some((param, _)) => Err(ArgvError::UnknownParameter { option: self.option, param }),
        }
    }
}

fn invalid(option: &str, value: &str, reason: &str) -> ArgvError {
    ArgvError::InvalidValue {
        option: option.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Decimal or 0x-prefixed hexadecimal.
fn parse_int<T: std::str::FromStr>(v: &str) -> Option<T> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let n = u64::from_str_radix(hex, 16).ok()?;
        n.to_string().parse().ok()
    } else {
        v.parse().ok()
    }
}

/// A size with optional K/M/G/T suffix (binary units); `default_shift` applies without one.
fn parse_size(v: &str, default_shift: u32) -> Option<u64> {
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (&v[..i], shift)
        }
        _ => (v, default_shift),
    };
    let n: u64 = parse_int(digits)?;
    n.checked_mul(1u64.checked_shl(shift)?)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn non_empty(option: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        Err(invalid(option, v, "must not be empty"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The parser

/// Options taking no argument.
const FLAGS: &[&str] = &[
    "-no-shutdown",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-S",
    "-usb",
    "-no-acpi",
    "-xen-attach",
    "-xen-domid-restrict",
];

/// Options taking one argument.
const WITH_ARG: &[&str] = &[
    "-xen-domid",
    "-chardev",
    "-mon",
    "-name",
    "-vnc",
    "-display",
    "-k",
    "-kernel",
    "-initrd",
    "-append",
    "-device",
    "-serial",
    "-spice",
    "-boot",
    "-usbdevice",
    "-soundhw",
    "-smp",
    "-netdev",
    "-net",
    "-object",
    "-chroot",
    "-incoming",
    "-machine",
    "-M",
    "-m",
    "-drive",
    "-runas",
    "-sandbox",
    "-trace",
    "-global",
    "-vcpus",
    "-vcpu_avail",
    "-vcpu",
];

/// A `-drive if=none` waiting for the `-device` that attaches it.
struct PendingDrive {
    path: Option<PathBuf>,
    format: Option<DiskFormat>,
    readonly: bool,
    cache: Option<String>,
    media: Option<Media>,
    used: bool,
}

struct Netdev {
    ifname: Option<String>,
    bridge: Option<String>,
    script: Option<String>,
    downscript: Option<String>,
    used: bool,
}

#[derive(Default)]
struct Parser {
    args: DmArgs,
    chardevs: Vec<(Chardev, bool)>,
    mons: Vec<(String, bool)>,
    drives: HashMap<String, PendingDrive>,
    drive_order: Vec<String>,
    netdevs: HashMap<String, Netdev>,
    netdev_order: Vec<String>,
    /// `-device` disk frontends, resolved against `drives` at the end.
    disk_frontends: Vec<DiskFrontend>,
    nic_frontends: Vec<NicFrontend>,
}

/// `-device <nic model>`: (model, id, mac, netdev id).
type NicFrontend = (String, Option<String>, Option<[u8; 6]>, String);

struct DiskFrontend {
    driver: String,
    drive: String,
    interface: DiskInterface,
    id: Option<String>,
    ahci_bus: Option<String>,
}

impl DmArgs {
    /// Parses the arguments after argv[0].
    pub fn parse<I, S>(argv: I) -> Result<DmArgs>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut strs = Vec::new();
        for (i, a) in argv.into_iter().enumerate() {
            strs.push(a.as_ref().to_str().ok_or(ArgvError::NotUtf8(i + 1))?.to_string());
        }
        let mut p = Parser::default();
        let mut it = strs.into_iter();
        while let Some(arg) = it.next() {
            if !arg.starts_with('-') || arg == "-" {
                return Err(ArgvError::Positional(arg));
            }
            // QEMU accepts `--opt` as `-opt`.
            let opt = if arg.starts_with("--") { arg[1..].to_string() } else { arg.clone() };
            if FLAGS.contains(&opt.as_str()) {
                p.flag(&opt);
            } else if WITH_ARG.contains(&opt.as_str()) {
                let value = it.next().ok_or_else(|| ArgvError::MissingArgument(opt.clone()))?;
                p.option(&opt, &value)?;
            } else {
                return Err(ArgvError::UnknownOption(arg));
            }
        }
        p.finish()
    }
}

impl Parser {
    fn flag(&mut self, opt: &str) {
        let a = &mut self.args;
        match opt {
            "-no-shutdown" => a.no_shutdown = true,
            "-nodefaults" => a.nodefaults = true,
            "-no-user-config" => a.no_user_config = true,
            "-nographic" => a.nographic = true,
            "-S" => a.start_paused = true,
            "-usb" => a.usb = true,
            "-no-acpi" => a.acpi = false,
            "-xen-attach" => a.xen_attach = true,
            "-xen-domid-restrict" => a.xen_domid_restrict = true,
            _ => {}
        }
    }

    fn option(&mut self, opt: &str, v: &str) -> Result<()> {
        match opt {
            "-xen-domid" => {
                let id: u32 = parse_int(v).ok_or_else(|| invalid(opt, v, "expects a domain id"))?;
                if id == 0 || id >= DOMID_FIRST_RESERVED {
                    return Err(invalid(opt, v, "not a guest domain id"));
                }
                self.args.domid = Some(id);
            }
            "-chardev" => self.chardev(opt, v)?,
            "-mon" => {
                let mut o = Opts::parse(opt, v, Some("chardev"))?;
                let chardev = o.take_required("chardev")?;
                let mode = o.take("mode").unwrap_or_else(|| "readline".to_string());
                let pretty = o.take_bool("pretty")?.unwrap_or(false);
                o.finish()?;
                if mode != "control" {
                    return Err(ArgvError::Unsupported {
                        option: opt.to_string(),
                        reason: format!("mode={mode} (only the QMP mode=control monitor exists)"),
                    });
                }
                self.mons.push((chardev, pretty));
            }
            "-name" => {
                let mut o = Opts::parse(opt, v, Some("guest"))?;
                let name = o.take_required("guest")?;
                // Thread naming and process title only matter to QEMU's own diagnostics.
                o.take("process");
                o.take("debug-threads");
                o.finish()?;
                self.args.name = Some(name);
            }
            "-vnc" => self.vnc(opt, v)?,
            "-display" => {
                let mut o = Opts::parse(opt, v, Some("type"))?;
                let ty = o.take_required("type")?;
                if !["none", "sdl", "gtk", "curses", "egl-headless"].contains(&ty.as_str()) {
                    return Err(invalid(opt, v, "unknown display type"));
                }
                // Display sub-options (gl=, window-close=...) have no effect without a display.
                o.pairs.clear();
                self.args.displays.push(ty);
            }
            "-k" => {
                non_empty(opt, v)?;
                self.args.keymap = Some(v.to_string());
            }
            "-kernel" => {
                non_empty(opt, v)?;
                self.args.kernel = Some(v.into());
            }
            "-initrd" => {
                non_empty(opt, v)?;
                self.args.initrd = Some(v.into());
            }
            "-append" => self.args.append = Some(v.to_string()),
            "-device" => self.device(opt, v)?,
            "-serial" => self.serial(opt, v)?,
            "-spice" => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: "SPICE is not implemented".to_string(),
                })
            }
            "-boot" => {
                let mut o = Opts::parse(opt, v, Some("order"))?;
                let order = o.take("order").unwrap_or_else(|| "cad".to_string());
                let once = o.take("once");
                let menu = o.take_bool("menu")?;
                o.take("splash");
                o.take("splash-time");
                o.take("reboot-timeout");
                o.take("strict");
                o.finish()?;
                for (i, c) in order.char_indices() {
                    if !('a'..='p').contains(&c) || order[..i].contains(c) {
                        return Err(invalid(opt, v, &format!("bad boot device '{c}'")));
                    }
                }
                self.args.boot = Some(Boot { order, once, menu });
            }
            "-usbdevice" => {
                non_empty(opt, v)?;
                self.args.usb_devices.push(v.to_string());
            }
            "-soundhw" => {
                non_empty(opt, v)?;
                self.args.soundhw.push(v.to_string());
            }
            "-smp" => {
                let mut o = Opts::parse(opt, v, Some("cpus"))?;
                let cpus: Option<u32> = o.take_num("cpus")?;
                let maxcpus: Option<u32> = o.take_num("maxcpus")?;
                // libxl assumes one core and one thread per socket; accept only that topology.
                for key in ["sockets", "cores", "threads", "dies"] {
                    if let Some(n) = o.take_num::<u32>(key)? {
                        if key != "sockets" && n != 1 {
                            return Err(invalid(opt, v, &format!("{key}={n}: only 1 is supported")));
                        }
                    }
                }
                o.finish()?;
                let max = maxcpus.or(cpus).unwrap_or(1);
                let cpus = cpus.unwrap_or(max);
                if cpus == 0 || max == 0 || cpus > max || max > MAX_VCPUS {
                    return Err(invalid(opt, v, &format!("need 1 <= cpus <= maxcpus <= {MAX_VCPUS}")));
                }
                self.args.vcpus = cpus;
                self.args.max_vcpus = max;
            }
            "-netdev" => self.netdev(opt, v)?,
            "-net" => {
                if v != "none" {
                    return Err(ArgvError::Unsupported {
                        option: opt.to_string(),
                        reason: format!("legacy '-net {v}' (use -netdev + -device)"),
                    });
                }
                self.args.net_none = true;
            }
            "-object" => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("'{v}' (COLO filters and QOM objects are not implemented)"),
                })
            }
            "-chroot" => {
                non_empty(opt, v)?;
                self.args.chroot = Some(v.into());
            }
            "-incoming" => {
                let fd = v.strip_prefix("fd:").ok_or_else(|| ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("'{v}' (only fd:N is supported)"),
                })?;
                let fd: RawFd = parse_int(fd).filter(|n| *n >= 0).ok_or_else(|| invalid(opt, v, "bad fd"))?;
                self.args.incoming_fd = Some(fd);
            }
            "-machine" | "-M" => self.machine(opt, v)?,
            "-m" => {
                let mut o = Opts::parse(opt, v, Some("size"))?;
                let size = o.take_required("size")?;
                o.finish()?;
                let bytes = parse_size(&size, 20).ok_or_else(|| invalid(opt, v, "bad memory size"))?;
                if bytes == 0 || bytes % (1 << 20) != 0 {
                    return Err(invalid(opt, v, "memory must be a non-zero multiple of 1 MiB"));
                }
                self.args.memory_mib = Some(bytes >> 20);
            }
            "-drive" => self.drive(opt, v)?,
            "-runas" => {
                non_empty(opt, v)?;
                let runas = match v.split_once(':') {
                    Some((u, g)) => {
                        let uid = parse_int(u).ok_or_else(|| invalid(opt, v, "bad uid"))?;
                        let gid = parse_int(g).ok_or_else(|| invalid(opt, v, "bad gid"))?;
                        RunAs::Ids { uid, gid }
                    }
                    None => RunAs::User(v.to_string()),
                };
                self.args.runas = Some(runas);
            }
            "-sandbox" => {
                let mut o = Opts::parse(opt, v, Some("enable"))?;
                let enable = o.take_bool("enable")?.ok_or_else(|| invalid(opt, v, "expects on|off"))?;
                let mut params = Vec::new();
                for key in ["obsolete", "elevateprivileges", "spawn", "resourcecontrol"] {
                    if let Some(val) = o.take(key) {
                        if !["allow", "deny", "children"].contains(&val.as_str()) {
                            return Err(invalid(opt, v, &format!("{key}={val}")));
                        }
                        params.push((key.to_string(), val));
                    }
                }
                o.finish()?;
                self.args.sandbox = Some(Sandbox { enable, params });
            }
            "-trace" => {
                // Trace events are QEMU internals; the option is harmless to ignore.
                self.args.ignored.push(IgnoredOption { option: opt.to_string(), value: Some(v.to_string()) });
            }
            "-global" => {
                let (lhs, value) =
                    v.split_once('=').ok_or_else(|| invalid(opt, v, "expects driver.property=value"))?;
                let (driver, property) =
                    lhs.split_once('.').ok_or_else(|| invalid(opt, v, "expects driver.property=value"))?;
                if driver.is_empty() || property.is_empty() {
                    return Err(invalid(opt, v, "expects driver.property=value"));
                }
                self.args.globals.push(GlobalProp {
                    driver: driver.to_string(),
                    property: property.to_string(),
                    value: value.to_string(),
                });
            }
            "-vcpus" | "-vcpu_avail" | "-vcpu" => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: "qemu-xen-traditional syntax; use device_model_version=\"qemu-xen\" (-smp)"
                        .to_string(),
                })
            }
            _ => return Err(ArgvError::UnknownOption(opt.to_string())),
        }
        Ok(())
    }

    fn socket_endpoint(o: &mut Opts, v: &str) -> Result<SocketEndpoint> {
        match (o.take("path"), o.take("fd")) {
            (Some(p), None) => {
                non_empty(&o.option, &p)?;
                Ok(SocketEndpoint::Path(p.into()))
            }
            (None, Some(fd)) => {
                let fd: RawFd =
                    parse_int(&fd).filter(|n| *n >= 0).ok_or_else(|| invalid(&o.option, v, "bad fd="))?;
                Ok(SocketEndpoint::Fd(fd))
            }
            (Some(_), Some(_)) => Err(invalid(&o.option, v, "path= and fd= are exclusive")),
            (None, None) => Err(invalid(&o.option, v, "socket needs path= or fd= (TCP is not supported)")),
        }
    }

    /// `server`/`wait` with QEMU's legacy spellings (`server`, `nowait`).
    fn server_wait(o: &mut Opts) -> Result<(bool, bool)> {
        let server = o.take_bool("server")?.unwrap_or(false);
        let mut wait = o.take_bool("wait")?.unwrap_or(true);
        if o.take("nowait").is_some() {
            wait = false;
        }
        Ok((server, wait))
    }

    fn chardev(&mut self, opt: &str, v: &str) -> Result<()> {
        let mut o = Opts::parse(opt, v, Some("backend"))?;
        let backend = o.take_required("backend")?;
        let id = o.take_required("id")?;
        non_empty(opt, &id)?;
        let backend = match backend.as_str() {
            "socket" => {
                let endpoint = Self::socket_endpoint(&mut o, v)?;
                let (server, wait) = Self::server_wait(&mut o)?;
                ChardevBackend::Socket { endpoint, server, wait }
            }
            "pty" => ChardevBackend::Pty,
            "null" => ChardevBackend::Null,
            "file" => {
                let p = o.take_required("path")?;
                non_empty(opt, &p)?;
                ChardevBackend::File(p.into())
            }
            other => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("chardev backend '{other}'"),
                })
            }
        };
        // Logging and mux are QEMU chardev front-end details with no effect on these backends.
        o.take("logfile");
        o.take("logappend");
        o.finish()?;
        if self.chardevs.iter().any(|(c, _)| c.id == id) {
            return Err(invalid(opt, v, &format!("duplicate chardev id '{id}'")));
        }
        self.chardevs.push((Chardev { id, backend }, false));
        Ok(())
    }

    fn vnc(&mut self, opt: &str, v: &str) -> Result<()> {
        if v == "none" {
            self.args.vnc = Vnc::Disabled;
            return Ok(());
        }
        let mut o = Opts::parse(opt, v, Some("vnc"))?;
        let addr = o.take_required("vnc")?;
        let to = o.take_num("to")?;
        let password = o.take_bool("password")?.unwrap_or(false);
        o.finish()?;
        let (host, display) = addr.rsplit_once(':').ok_or_else(|| invalid(opt, v, "expects host:display"))?;
        let display = parse_int(display).ok_or_else(|| invalid(opt, v, "bad display number"))?;
        self.args.vnc = Vnc::Listen { host: host.to_string(), display, to, password };
        Ok(())
    }

    fn serial(&mut self, opt: &str, v: &str) -> Result<()> {
        let s = match v {
            "pty" => Serial::Pty,
            "none" => Serial::None,
            "null" => Serial::Null,
            "stdio" => Serial::Stdio,
            _ => {
                if let Some(p) = v.strip_prefix("file:") {
                    non_empty(opt, p)?;
                    Serial::File(p.into())
                } else if let Some(id) = v.strip_prefix("chardev:") {
                    non_empty(opt, id)?;
                    Serial::Chardev(id.to_string())
                } else if let Some(rest) = v.strip_prefix("unix:") {
                    let mut o = Opts::parse(opt, rest, Some("path"))?;
                    let path = o.take_required("path")?;
                    non_empty(opt, &path)?;
                    let (server, wait) = Self::server_wait(&mut o)?;
                    o.finish()?;
                    Serial::Unix { path: path.into(), server, wait }
                } else if v.starts_with("/dev/") {
                    Serial::HostDevice(v.into())
                } else {
                    return Err(ArgvError::Unsupported {
                        option: opt.to_string(),
                        reason: format!("serial backend '{v}'"),
                    });
                }
            }
        };
        self.args.serials.push(s);
        Ok(())
    }

    fn machine(&mut self, opt: &str, v: &str) -> Result<()> {
        let mut o = Opts::parse(opt, v, Some("type"))?;
        let ty = o.take_required("type")?;
        let accel = o.take("accel");
        let kind = match (ty.as_str(), accel.as_deref()) {
            ("xenfv", None | Some("xen")) => MachineType::Xenfv,
            ("pc", Some("xen")) => MachineType::PcXen,
            _ => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("machine '{v}' (expected xenfv or pc,accel=xen)"),
                })
            }
        };
        let suppress_vmdesc = o.take_bool("suppress-vmdesc")?.unwrap_or(false);
        let max_ram_below_4g = match o.take("max-ram-below-4g") {
            None => None,
            Some(s) => Some(parse_size(&s, 0).ok_or_else(|| invalid(opt, v, "bad max-ram-below-4g"))?),
        };
        let igd_passthru = o.take_bool("igd-passthru")?.unwrap_or(false);
        o.finish()?;
        self.args.machine = Some(Machine { kind, suppress_vmdesc, max_ram_below_4g, igd_passthru });
        Ok(())
    }

    fn drive(&mut self, opt: &str, v: &str) -> Result<()> {
        let mut o = Opts::parse(opt, v, None)?;
        let path = o.take("file").map(PathBuf::from);
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(opt, v, "empty file="));
        }
        let iface = o.take("if").unwrap_or_else(|| "ide".to_string());
        let index: Option<u8> = o.take_num("index")?;
        let bus: Option<u8> = o.take_num("bus")?;
        let unit: Option<u8> = o.take_num("unit")?;
        let media = match o.take("media").as_deref() {
            None => None,
            Some("disk") => Some(Media::Disk),
            Some("cdrom") => Some(Media::Cdrom),
            Some(m) => return Err(invalid(opt, v, &format!("media={m}"))),
        };
        let format = match o.take("format") {
            None => None,
            Some(f) => Some(DiskFormat::parse(&f).ok_or_else(|| invalid(opt, v, &format!("format={f}")))?),
        };
        let cache = o.take("cache");
        if let Some(c) = &cache {
            if !["writeback", "writethrough", "none", "directsync", "unsafe"].contains(&c.as_str()) {
                return Err(invalid(opt, v, &format!("cache={c}")));
            }
        }
        let readonly = o.take_bool("readonly")?.unwrap_or(false);
        let id = o.take("id");
        o.finish()?;
        match iface.as_str() {
            "ide" => {
                let index = match (index, bus, unit) {
                    (Some(i), None, None) => i,
                    (None, b, u) => b.unwrap_or(0).saturating_mul(2).saturating_add(u.unwrap_or(0)),
                    _ => return Err(invalid(opt, v, "index= excludes bus=/unit=")),
                };
                if index > 3 || unit.is_some_and(|u| u > 1) {
                    return Err(invalid(opt, v, "IDE has 4 positions (index 0-3)"));
                }
                if media.is_none() && path.is_none() {
                    return Err(invalid(opt, v, "an IDE hard disk needs file="));
                }
                let media = media.unwrap_or(Media::Disk);
                self.args.disks.push(Disk {
                    interface: DiskInterface::Ide { index },
                    media,
                    path,
                    format,
                    readonly: readonly || media == Media::Cdrom,
                    cache,
                    id,
                });
            }
            "none" => {
                let id = id.ok_or_else(|| ArgvError::MissingParameter {
                    option: opt.to_string(),
                    param: "id".to_string(),
                })?;
                if index.is_some() || bus.is_some() || unit.is_some() {
                    return Err(invalid(opt, v, "if=none takes its position from -device"));
                }
                if self.drives.contains_key(&id) {
                    return Err(invalid(opt, v, &format!("duplicate drive id '{id}'")));
                }
                self.drive_order.push(id.clone());
                self.drives.insert(id, PendingDrive { path, format, readonly, cache, media, used: false });
            }
            other => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("drive interface if={other}"),
                })
            }
        }
        Ok(())
    }

    fn netdev(&mut self, opt: &str, v: &str) -> Result<()> {
        let mut o = Opts::parse(opt, v, Some("type"))?;
        let ty = o.take_required("type")?;
        if ty != "tap" {
            return Err(ArgvError::Unsupported {
                option: opt.to_string(),
                reason: format!("netdev type '{ty}'"),
            });
        }
        let id = o.take_required("id")?;
        let nd = Netdev {
            ifname: o.take("ifname"),
            bridge: o.take("br"),
            script: o.take("script"),
            downscript: o.take("downscript"),
            used: false,
        };
        o.finish()?;
        if self.netdevs.contains_key(&id) {
            return Err(invalid(opt, v, &format!("duplicate netdev id '{id}'")));
        }
        self.netdev_order.push(id.clone());
        self.netdevs.insert(id, nd);
        Ok(())
    }

    fn device(&mut self, opt: &str, v: &str) -> Result<()> {
        const NICS: &[&str] = &[
            "rtl8139",
            "e1000",
            "e1000e",
            "ne2k_pci",
            "pcnet",
            "i82551",
            "i82557b",
            "i82559er",
            "virtio-net-pci",
            "vmxnet3",
        ];
        const USB: &[&str] = &[
            "piix3-usb-uhci",
            "ich9-usb-ehci1",
            "ich9-usb-uhci1",
            "ich9-usb-uhci2",
            "ich9-usb-uhci3",
            "nec-usb-xhci",
            "usb-tablet",
            "usb-mouse",
            "usb-kbd",
            "usb-redir",
        ];
        const SOUND: &[&str] =
            &["intel-hda", "hda-duplex", "hda-output", "AC97", "ES1370", "sb16", "cs4231a"];

        let mut o = Opts::parse(opt, v, Some("driver"))?;
        let driver = o.take_required("driver")?;
        match driver.as_str() {
            "cirrus-vga" | "VGA" => {
                let vram_mb = o.take_num("vgamem_mb")?;
                o.finish()?;
                let model = if driver == "VGA" { VgaModel::Std } else { VgaModel::Cirrus };
                self.args.vga = Some(Vga { model, vram_mb });
            }
            "qxl-vga" => {
                let vram_mb = o.take_num("vram_size_mb")?;
                let _: Option<u32> = o.take_num("ram_size_mb")?;
                o.finish()?;
                self.args.vga = Some(Vga { model: VgaModel::Qxl, vram_mb });
            }
            "lsi53c895a" => {
                o.take("id");
                o.finish()?;
                self.args.scsi_controller = true;
            }
            "ahci" => {
                let id = o.take_required("id")?;
                o.finish()?;
                self.args.ahci = Some(id);
            }
            "xen-pvdevice" => {
                let id: u16 = o.take_num("device-id")?.ok_or_else(|| ArgvError::MissingParameter {
                    option: opt.to_string(),
                    param: "device-id".to_string(),
                })?;
                o.finish()?;
                self.args.xen_pvdevice = Some(id);
            }
            "ide-hd" | "ide-cd" => {
                let drive = o.take_required("drive")?;
                let id = o.take("id");
                let bus = o.take_required("bus")?;
                let unit: u8 = o.take_num("unit")?.unwrap_or(0);
                o.finish()?;
                let (interface, ahci_bus) = if let Some(n) = bus.strip_prefix("ide.") {
                    let n: u8 =
                        parse_int(n).filter(|n| *n <= 1).ok_or_else(|| invalid(opt, v, "bus=ide.0|ide.1"))?;
                    if unit > 1 {
                        return Err(invalid(opt, v, "unit must be 0 or 1"));
                    }
                    (DiskInterface::Ide { index: n * 2 + unit }, None)
                } else if let Some((ctrl, port)) = bus.rsplit_once('.') {
                    let port: u8 =
                        parse_int(port).filter(|p| *p < 6).ok_or_else(|| invalid(opt, v, "AHCI port 0-5"))?;
                    if unit != 0 {
                        return Err(invalid(opt, v, "AHCI ports have unit 0 only"));
                    }
                    (DiskInterface::Ahci { port }, Some(ctrl.to_string()))
                } else {
                    return Err(invalid(opt, v, "bad bus="));
                };
                self.disk_frontends.push(DiskFrontend { driver, drive, interface, id, ahci_bus });
            }
            "scsi-hd" => {
                let drive = o.take_required("drive")?;
                let scsi_id: u8 = o.take_num("scsi-id")?.unwrap_or(0);
                let id = o.take("id");
                o.finish()?;
                if scsi_id > 15 {
                    return Err(invalid(opt, v, "scsi-id 0-15"));
                }
                let interface = DiskInterface::Scsi { scsi_id };
                self.disk_frontends.push(DiskFrontend { driver, drive, interface, id, ahci_bus: None });
            }
            d if NICS.contains(&d) => {
                let id = o.take("id");
                let netdev = o.take_required("netdev")?;
                let mac = match o.take("mac") {
                    None => None,
                    Some(m) => Some(parse_mac(&m).ok_or_else(|| invalid(opt, v, "bad mac="))?),
                };
                o.finish()?;
                self.nic_frontends.push((driver, id, mac, netdev));
            }
            d if USB.contains(&d) || SOUND.contains(&d) => {
                self.args.devices.push(DeviceArg { driver, props: o.pairs });
            }
            _ => {
                return Err(ArgvError::Unsupported {
                    option: opt.to_string(),
                    reason: format!("device driver '{driver}'"),
                })
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<DmArgs> {
        // Monitors: each -mon names a socket server chardev.
        for (chardev, pretty) in std::mem::take(&mut self.mons) {
            let entry = self.chardevs.iter_mut().find(|(c, _)| c.id == chardev).ok_or_else(|| {
                ArgvError::Reference {
                    option: "-mon".into(),
                    reason: format!("no -chardev with id '{chardev}'"),
                }
            })?;
            if entry.1 {
                return Err(ArgvError::Reference {
                    option: "-mon".into(),
                    reason: format!("chardev '{chardev}' is used twice"),
                });
            }
            entry.1 = true;
            match &entry.0.backend {
                ChardevBackend::Socket { endpoint, server: true, wait } => self.args.qmp.push(QmpSocket {
                    chardev_id: chardev,
                    endpoint: endpoint.clone(),
                    wait: *wait,
                    pretty,
                }),
                _ => {
                    return Err(ArgvError::Unsupported {
                        option: "-mon".into(),
                        reason: format!("chardev '{chardev}' is not a listening socket (server=on)"),
                    })
                }
            }
        }
        // Serial ports may name a chardev; it stays in `channels` for the machine to resolve.
        for s in &self.args.serials {
            if let Serial::Chardev(id) = s {
                if !self.chardevs.iter().any(|(c, used)| &c.id == id && !used) {
                    return Err(ArgvError::Reference {
                        option: "-serial".into(),
                        reason: format!("no -chardev with id '{id}' (or it is a monitor)"),
                    });
                }
            }
        }
        self.args.channels = self.chardevs.iter().filter(|(_, used)| !used).map(|(c, _)| c.clone()).collect();

        // Disk frontends.
        for f in std::mem::take(&mut self.disk_frontends) {
            let opt = format!("-device {}", f.driver);
            let d = self.drives.get_mut(&f.drive).ok_or_else(|| ArgvError::Reference {
                option: opt.clone(),
                reason: format!("no -drive if=none with id '{}'", f.drive),
            })?;
            if d.used {
                return Err(ArgvError::Reference {
                    option: opt,
                    reason: format!("drive '{}' is attached twice", f.drive),
                });
            }
            d.used = true;
            if let Some(ctrl) = &f.ahci_bus {
                if self.args.ahci.as_deref() != Some(ctrl.as_str()) {
                    return Err(ArgvError::Reference {
                        option: opt,
                        reason: format!("bus '{ctrl}' is not an -device ahci controller"),
                    });
                }
            }
            if matches!(f.interface, DiskInterface::Scsi { .. }) && !self.args.scsi_controller {
                return Err(ArgvError::Reference { option: opt, reason: "no -device lsi53c895a".into() });
            }
            let media = if f.driver == "ide-cd" { Media::Cdrom } else { Media::Disk };
            if d.media.is_some_and(|m| m != media) {
                return Err(ArgvError::Reference {
                    option: opt,
                    reason: format!("drive '{}' media= does not match {}", f.drive, f.driver),
                });
            }
            if media == Media::Disk && d.path.is_none() {
                return Err(ArgvError::Reference {
                    option: opt,
                    reason: format!("drive '{}' has no file=", f.drive),
                });
            }
            self.args.disks.push(Disk {
                interface: f.interface,
                media,
                path: d.path.clone(),
                format: d.format,
                readonly: d.readonly || media == Media::Cdrom,
                cache: d.cache.clone(),
                id: f.id.or(Some(f.drive)),
            });
        }
        for id in &self.drive_order {
            if self.drives.get(id).is_some_and(|d| !d.used) {
                return Err(ArgvError::Reference {
                    option: "-drive".into(),
                    reason: format!("drive '{id}' (if=none) is not attached by any -device"),
                });
            }
        }
        // Positions must be unique per controller.
        for (i, a) in self.args.disks.iter().enumerate() {
            if self.args.disks[..i].iter().any(|b| b.interface == a.interface) {
                return Err(ArgvError::Reference {
                    option: "-drive".into(),
                    reason: format!("two disks at {:?}", a.interface),
                });
            }
        }

        // NICs.
        for (model, id, mac, netdev_id) in std::mem::take(&mut self.nic_frontends) {
            let nd = self.netdevs.get_mut(&netdev_id).ok_or_else(|| ArgvError::Reference {
                option: format!("-device {model}"),
                reason: format!("no -netdev with id '{netdev_id}'"),
            })?;
            if nd.used {
                return Err(ArgvError::Reference {
                    option: format!("-device {model}"),
                    reason: format!("netdev '{netdev_id}' is used twice"),
                });
            }
            nd.used = true;
            self.args.nics.push(Nic {
                model,
                id,
                mac,
                netdev_id,
                ifname: nd.ifname.clone(),
                bridge: nd.bridge.clone(),
                script: nd.script.clone(),
                downscript: nd.downscript.clone(),
            });
        }
        for id in &self.netdev_order {
            if self.netdevs.get(id).is_some_and(|n| !n.used) {
                return Err(ArgvError::Reference {
                    option: "-netdev".into(),
                    reason: format!("netdev '{id}' is not used by any NIC -device"),
                });
            }
        }
        if self.args.net_none && !self.args.nics.is_empty() {
            return Err(ArgvError::Reference { option: "-net".into(), reason: "-net none with NICs".into() });
        }
        if self.args.xen_domid_restrict && self.args.domid.is_none() {
            return Err(ArgvError::Reference {
                option: "-xen-domid-restrict".into(),
                reason: "needs -xen-domid".into(),
            });
        }
        Ok(self.args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn parse(s: &str) -> Result<DmArgs> {
        DmArgs::parse(args(s))
    }

    /// What libxl 4.17 passed in lane X (specs/test-lanes.md).
    const LANE_X: &str = "-xen-domid 1 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-1,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-1,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control -nodefaults -no-user-config -name NAME -vnc none \
        -display none -serial pty -nographic -boot order=c -net none \
        -machine xenfv,suppress-vmdesc=on -m 128";

    #[test]
    fn lane_x_command_line() {
        let a = parse(LANE_X).unwrap();
        assert_eq!(a.domid, Some(1));
        assert!(a.no_shutdown && a.nodefaults && a.no_user_config && a.nographic && a.net_none);
        assert!(!a.start_paused);
        assert_eq!(a.name.as_deref(), Some("NAME"));
        assert_eq!(a.memory_mib, Some(128));
        assert_eq!((a.vcpus, a.max_vcpus), (1, 1));
        assert_eq!(
            a.qmp,
            vec![
                QmpSocket {
                    chardev_id: "libxl-cmd".into(),
                    endpoint: SocketEndpoint::Path("/var/run/xen/qmp-libxl-1".into()),
                    wait: false,
                    pretty: false
                },
                QmpSocket {
                    chardev_id: "libxenstat-cmd".into(),
                    endpoint: SocketEndpoint::Path("/var/run/xen/qmp-libxenstat-1".into()),
                    wait: false,
                    pretty: false
                },
            ]
        );
        assert!(a.channels.is_empty());
        assert_eq!(a.serials, vec![Serial::Pty]);
        assert_eq!(a.vnc, Vnc::Disabled);
        assert_eq!(a.displays, vec!["none".to_string()]);
        assert_eq!(a.boot, Some(Boot { order: "c".into(), once: None, menu: None }));
        let m = a.machine.unwrap();
        assert_eq!(m.kind, MachineType::Xenfv);
        assert!(m.suppress_vmdesc && m.xen_platform_pci());
        assert!(a.disks.is_empty() && a.nics.is_empty());
        assert!(a.acpi);
    }

    const FULL_EXAMPLE: &str = "-xen-domid 5 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-5,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-5,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control -nodefaults -no-user-config -name vm1 \
        -vnc 127.0.0.1:0,to=99 -display none -device cirrus-vga,vgamem_mb=8 -boot order=cda \
        -smp 2,maxcpus=4 -device rtl8139,id=nic0,netdev=net0,mac=00:16:3e:12:34:56 \
        -netdev type=tap,id=net0,ifname=vif5.0-emu,br=xenbr0,script=no,downscript=no \
        -machine xenfv,suppress-vmdesc=on -m 1016 \
        -drive file=/var/lib/xen/images/vm1.img,if=ide,index=0,media=disk,format=raw,cache=writeback \
        -drive if=none,readonly=on,id=ide-5632,file=/srv/iso/inst.iso,format=raw \
        -device ide-cd,id=ide-5632,drive=ide-5632,bus=ide.1,unit=0";

    #[test]
    fn spec_complete_example() {
        let a = parse(FULL_EXAMPLE).unwrap();
        assert_eq!(a.domid, Some(5));
        assert_eq!(a.name.as_deref(), Some("vm1"));
        assert_eq!(
            a.vnc,
            Vnc::Listen { host: "127.0.0.1".into(), display: 0, to: Some(99), password: false }
        );
        assert_eq!(a.vga, Some(Vga { model: VgaModel::Cirrus, vram_mb: Some(8) }));
        assert_eq!(a.boot.as_ref().unwrap().order, "cda");
        assert_eq!((a.vcpus, a.max_vcpus), (2, 4));
        assert_eq!(a.memory_mib, Some(1016));
        assert_eq!(
            a.nics,
            vec![Nic {
                model: "rtl8139".into(),
                id: Some("nic0".into()),
                mac: Some([0x00, 0x16, 0x3e, 0x12, 0x34, 0x56]),
                netdev_id: "net0".into(),
                ifname: Some("vif5.0-emu".into()),
                bridge: Some("xenbr0".into()),
                script: Some("no".into()),
                downscript: Some("no".into()),
            }]
        );
        assert_eq!(
            a.disks,
            vec![
                Disk {
                    interface: DiskInterface::Ide { index: 0 },
                    media: Media::Disk,
                    path: Some("/var/lib/xen/images/vm1.img".into()),
                    format: Some(DiskFormat::Raw),
                    readonly: false,
                    cache: Some("writeback".into()),
                    id: None,
                },
                Disk {
                    interface: DiskInterface::Ide { index: 2 },
                    media: Media::Cdrom,
                    path: Some("/srv/iso/inst.iso".into()),
                    format: Some(DiskFormat::Raw),
                    readonly: true,
                    cache: None,
                    id: Some("ide-5632".into()),
                },
            ]
        );
        assert_eq!((a.disks[1].interface.bus(), a.disks[1].interface.unit()), (1, 0));
    }

    #[test]
    fn restricted_variant() {
        let s = FULL_EXAMPLE.replace("path=/var/run/xen/qmp-libxl-5", "fd=19")
            + " -xen-domid-restrict -chroot /var/run/xen/qemu-root-5 -runas 131091:131072 -S";
        let a = parse(&s).unwrap();
        assert!(a.start_paused && a.xen_domid_restrict);
        assert_eq!(a.qmp[0].endpoint, SocketEndpoint::Fd(19));
        assert_eq!(a.chroot, Some("/var/run/xen/qemu-root-5".into()));
        assert_eq!(a.runas, Some(RunAs::Ids { uid: 131091, gid: 131072 }));
        let a = parse("-xen-domid 3 -runas xen-qemuuser-shared").unwrap();
        assert_eq!(a.runas, Some(RunAs::User("xen-qemuuser-shared".into())));
        let e = DmArgs::parse(["-runas", ""]).unwrap_err();
        assert!(e.to_string().contains("-runas"), "{e}");
    }

    #[test]
    fn disk_forms() {
        // AHCI disk.
        let a = parse(
            "-device ahci,id=ahci0 -drive file=/d.qcow2,if=none,id=ahcidisk-1,format=qcow2,cache=writeback \
             -device ide-hd,bus=ahci0.1,unit=0,drive=ahcidisk-1",
        )
        .unwrap();
        assert_eq!(a.ahci.as_deref(), Some("ahci0"));
        assert_eq!(a.disks.len(), 1);
        assert_eq!(a.disks[0].interface, DiskInterface::Ahci { port: 1 });
        assert_eq!(a.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(a.disks[0].media, Media::Disk);
        assert!(!a.disks[0].readonly);

        // Empty CD-ROM.
        let a = parse(
            "-drive if=none,readonly=on,id=ide-5696 -device ide-cd,id=ide-5696,drive=ide-5696,bus=ide.1,unit=1",
        )
        .unwrap();
        let d = &a.disks[0];
        assert_eq!(d.interface, DiskInterface::Ide { index: 3 });
        assert_eq!((d.media, d.path.clone(), d.readonly), (Media::Cdrom, None, true));
        assert_eq!(d.id.as_deref(), Some("ide-5696"));

        // IDE hdb, qcow2; legacy if=ide,media=cdrom; SCSI.
        let a = parse(
            "-drive file=/b.img,if=ide,index=1,media=disk,format=qcow2,cache=writeback \
             -drive if=ide,index=2,media=cdrom -device lsi53c895a \
             -drive file=/s.img,id=scsi0-hd0,format=raw,if=none,readonly=off,cache=writeback \
             -device scsi-hd,drive=scsi0-hd0,scsi-id=0",
        )
        .unwrap();
        assert_eq!(a.disks[0].interface, DiskInterface::Ide { index: 1 });
        assert_eq!((a.disks[0].interface.bus(), a.disks[0].interface.unit()), (0, 1));
        assert_eq!(a.disks[1].media, Media::Cdrom);
        assert!(a.disks[1].readonly && a.disks[1].path.is_none());
        assert_eq!(a.disks[2].interface, DiskInterface::Scsi { scsi_id: 0 });

        // A comma in a path is written doubled.
        let a = parse("-drive file=/x,,y.img,if=ide,index=0,media=disk,format=raw").unwrap();
        assert_eq!(a.disks[0].path, Some("/x,y.img".into()));
        // All formats libxl knows.
        for f in ["raw", "qcow", "qcow2", "vpc", "vhdx", "qed"] {
            let a = parse(&format!("-drive file=/a,if=ide,index=0,format={f}")).unwrap();
            assert!(a.disks[0].format.is_some());
        }
    }

    #[test]
    fn disk_errors_name_the_option() {
        for (s, needle) in [
            ("-drive file=/a,if=ide,index=4", "-drive"),
            ("-drive file=/a,if=virtio", "-drive"),
            ("-drive file=/a,if=ide,index=0,format=vmdk", "-drive"),
            ("-drive file=/a,if=ide,index=0,bogus=1", "bogus"),
            ("-drive file=/a,if=none,id=x", "-drive"),
            ("-device ide-cd,id=c,drive=nope,bus=ide.0,unit=0", "-device ide-cd"),
            ("-drive file=/a,if=none,id=d -device ide-hd,bus=ahci0.0,unit=0,drive=d", "ahci0"),
            ("-drive file=/a,if=ide,index=0 -drive file=/b,if=ide,bus=0,unit=0", "two disks"),
            ("-drive file=/a,if=none,id=s -device scsi-hd,drive=s,scsi-id=0", "lsi53c895a"),
            ("-drive if=ide,index=0", "file="),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn other_accepted_options() {
        let a = parse(
            "-xen-domid 7 -xen-attach -k en-us -usb -usbdevice tablet -soundhw hda -no-acpi \
             -device piix3-usb-uhci,id=usb -device intel-hda -device hda-duplex \
             -device VGA,vgamem_mb=16 -device xen-pvdevice,device-id=0xc000 \
             -global PIIX4_PM.disable_s3=1 -trace events=/tmp/ev -sandbox on,obsolete=deny \
             -incoming fd:12 -kernel /k -initrd /i -append console=ttyS0,,115200 \
             -machine pc,accel=xen,suppress-vmdesc=on,max-ram-below-4g=3G,igd-passthru=on \
             -display none -display sdl -serial file:/tmp/s -serial null -m 2G \
             -chardev pty,id=libxl-channel0 -smp 4 --name x,debug-threads=on",
        )
        .unwrap();
        assert!(a.xen_attach && a.usb && !a.acpi);
        assert_eq!(a.keymap.as_deref(), Some("en-us"));
        assert_eq!(a.usb_devices, vec!["tablet".to_string()]);
        assert_eq!(a.soundhw, vec!["hda".to_string()]);
        assert_eq!(a.devices.len(), 3);
        assert_eq!(a.devices[0].props, vec![("id".to_string(), "usb".to_string())]);
        assert_eq!(a.vga, Some(Vga { model: VgaModel::Std, vram_mb: Some(16) }));
        assert_eq!(a.xen_pvdevice, Some(0xc000));
        assert_eq!(
            a.globals,
            vec![GlobalProp { driver: "PIIX4_PM".into(), property: "disable_s3".into(), value: "1".into() }]
        );
        assert_eq!(a.ignored[0].option, "-trace");
        assert_eq!(
            a.sandbox,
            Some(Sandbox { enable: true, params: vec![("obsolete".into(), "deny".into())] })
        );
        assert_eq!(a.incoming_fd, Some(12));
        assert_eq!(a.append.as_deref(), Some("console=ttyS0,,115200"));
        let m = a.machine.unwrap();
        assert_eq!(m.kind, MachineType::PcXen);
        assert!(!m.xen_platform_pci() && m.igd_passthru);
        assert_eq!(m.max_ram_below_4g, Some(3 << 30));
        assert_eq!(a.displays, vec!["none".to_string(), "sdl".to_string()]);
        assert_eq!(a.serials, vec![Serial::File("/tmp/s".into()), Serial::Null]);
        assert_eq!(a.memory_mib, Some(2048));
        assert_eq!(a.channels, vec![Chardev { id: "libxl-channel0".into(), backend: ChardevBackend::Pty }]);
        assert_eq!((a.vcpus, a.max_vcpus), (4, 4));
        assert_eq!(a.name.as_deref(), Some("x"));

        let a = parse(
            "-vnc 0.0.0.0:3,password=on,to=99 -serial chardev:ch -chardev socket,id=ch,path=/s,server,nowait",
        )
        .unwrap();
        assert_eq!(a.vnc, Vnc::Listen { host: "0.0.0.0".into(), display: 3, to: Some(99), password: true });
        assert_eq!(a.serials, vec![Serial::Chardev("ch".into())]);
        assert_eq!(
            a.channels[0].backend,
            ChardevBackend::Socket { endpoint: SocketEndpoint::Path("/s".into()), server: true, wait: false }
        );
    }

    #[test]
    fn rejected_options_name_themselves() {
        for (s, needle) in [
            ("-enable-kvm", "-enable-kvm"),
            ("-spice port=6000", "-spice"),
            ("-vcpus 2", "-vcpus"),
            ("-vcpu_avail 3", "-vcpu_avail"),
            ("-vcpu 1", "-vcpu"),
            ("-object filter-mirror,id=m", "-object"),
            ("-incoming tcp:0:4444", "-incoming"),
            ("-incoming fd:x", "-incoming"),
            ("-net nic,model=rtl8139", "-net"),
            ("-netdev user,id=n", "-netdev"),
            ("-netdev type=tap,id=n", "-netdev"),
            ("-device rtl8139,netdev=nope", "-device rtl8139"),
            ("-device virtio-blk-pci", "-device"),
            ("-device ahci,id=a,x=1", "'x'"),
            ("-machine q35", "-machine"),
            ("-machine xenfv,foo=bar", "'foo'"),
            ("-m 0", "-m"),
            ("-m 1.5", "-m"),
            ("-m 1536K", "-m"),
            ("-smp 4,maxcpus=2", "-smp"),
            ("-smp 0", "-smp"),
            ("-smp 2,cores=2", "-smp"),
            ("-smp 200", "-smp"),
            ("-xen-domid 0", "-xen-domid"),
            ("-xen-domid 32752", "-xen-domid"),
            ("-xen-domid abc", "-xen-domid"),
            ("-xen-domid", "-xen-domid"),
            ("-serial tcp:127.0.0.1:4555", "-serial"),
            ("-chardev socket,id=c,host=1.2.3.4,port=5", "-chardev"),
            ("-chardev spicevmc,id=c", "-chardev"),
            ("-chardev pty,id=a -chardev pty,id=a", "duplicate"),
            ("-chardev pty,id=c -mon chardev=c,mode=control", "-mon"),
            ("-chardev socket,id=c,path=/s,server=on -mon chardev=c,mode=readline", "-mon"),
            ("-mon chardev=missing,mode=control", "-mon"),
            ("-chardev socket,id=c,path=/s,server=off,wait=off -mon chardev=c,mode=control", "-mon"),
            ("-chardev socket,id=c,path=/s,fd=3,server=on", "-chardev"),
            ("-chardev socket,id=c,path=/s,server=maybe", "-chardev"),
            ("-vnc 127.0.0.1", "-vnc"),
            ("-vnc :1,websocket=on", "'websocket'"),
            ("-display cocoa", "-display"),
            ("-boot order=cc", "-boot"),
            ("-boot order=z", "-boot"),
            ("-runas 1:x", "-runas"),
            ("-sandbox maybe", "-sandbox"),
            ("-global nodot=1", "-global"),
            ("-device xen-pvdevice", "device-id"),
            ("-device rtl8139,netdev=n,mac=zz:16:3e:12:34:56 -netdev tap,id=n", "-device"),
            ("/some/image.img", "/some/image.img"),
            ("-xen-domid-restrict", "-xen-domid-restrict"),
            ("-net none -device e1000,netdev=n -netdev tap,id=n", "-net"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn non_utf8_is_rejected() {
        use std::os::unix::ffi::OsStrExt;
        let bad = OsStr::from_bytes(b"\xff");
        let e = DmArgs::parse([OsStr::new("-name"), bad]).unwrap_err();
        assert_eq!(e, ArgvError::NotUtf8(2));
    }

    #[test]
    fn device_model_args_pass_through_after_machine() {
        // device_model_args(_hvm) items land between other options verbatim.
        let s = LANE_X.replace("-m 128", "-trace enable=xen* -global isa-serial.x=1 -m 128");
        let a = parse(&s).unwrap();
        assert_eq!(a.ignored.len(), 1);
        assert_eq!(a.globals.len(), 1);
    }
}
