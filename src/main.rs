//! hvmdm: a Xen HVM device model (qemu-xen drop-in) whose device graph also runs on KVM.

mod acpi_glue;
mod chardev;
mod config;
mod kvm;
mod machine;
mod xen;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use config::MachineConfig;

#[derive(Parser)]
#[command(name = "hvmdm", version, about = "Xen HVM device model with a KVM backend")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a guest on KVM with hvmdm's device graph.
    Kvm(Box<KvmArgs>),
    /// Serve a Xen HVM domain as its device model. libxl runs hvmdm with QEMU's options
    /// (`hvmdm -xen-domid N ...`); `hvmdm xen -xen-domid N ...` is the same.
    Xen {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Args)]
struct KvmArgs {
    /// seabios, ovmf, or a path to a firmware image.
    #[arg(long, default_value = "seabios")]
    firmware: String,
    /// Guest RAM (K/M/G suffix; plain numbers are MiB).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// Linux kernel for direct boot (through fw_cfg).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for direct boot.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line for direct boot.
    #[arg(long, default_value = "")]
    append: String,
    /// file=PATH[,if=ide|ahci][,readonly=on][,format=raw|qcow2][,media=disk|cdrom]
    /// [,cache=writeback|writethrough]; repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// stdio, file:PATH, pty or none (COM1).
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Save the firmware debug-port output (0x402) to this file.
    #[arg(long)]
    firmware_log: Option<PathBuf>,
    /// Boot order letters as QEMU's -boot order= (c = disk, d = CD-ROM, n = network).
    #[arg(long, default_value = "c")]
    boot: String,
    /// Run even on a software-only KVM (kvm_pvm), which cannot run OVMF or Linux.
    #[arg(long)]
    allow_software_kvm: bool,
}

fn machine_config(a: &KvmArgs) -> Result<MachineConfig> {
    let memory = config::check_memory(config::parse_size(&a.memory)?)?;
    let smp = config::check_smp(a.smp)?;
    let firmware = config::resolve_firmware(&a.firmware)?;
    for (what, p) in [("kernel", &a.kernel), ("initrd", &a.initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                bail!("{what} {} not found", p.display());
            }
        }
    }
    if a.initrd.is_some() && a.kernel.is_none() {
        bail!("--initrd needs --kernel");
    }
    let disks = a.disk.iter().map(|d| config::parse_disk(d)).collect::<Result<Vec<_>, _>>()?;
    config::check_disks(&disks)?;
    Ok(MachineConfig {
        memory,
        smp,
        firmware,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        disks,
        serial: config::parse_serial(&a.serial)?,
        firmware_log: a.firmware_log.clone(),
        boot_order: a.boot.clone(),
        max_cpus: smp,
        xen: false,
    })
}

fn run() -> Result<i32> {
    // libxl execs the device model with QEMU's argv: the first argument is an option, not a
    // subcommand.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| {
        a.to_string_lossy().starts_with('-') && a != "-h" && a != "--help" && a != "-V" && a != "--version"
    }) {
        return xen::run(argv[1..].to_vec()).context("Xen backend");
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kvm(a) => {
            let cfg = machine_config(&a)?;
            let opts = kvm::KvmOptions { allow_software_kvm: a.allow_software_kvm };
            kvm::run(&cfg, &opts).context("KVM backend")
        }
        Cmd::Xen { args } => xen::run(args).context("Xen backend"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,firmware=off")).init();
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("hvmdm: {e:#}");
            ExitCode::from(1)
        }
    }
}
