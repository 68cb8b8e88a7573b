//! The KVM backend: one VM with an in-kernel irqchip and PIT, guest RAM through vm-memory, firmware
//! at the top of 4 GiB, vCPU threads whose PIO/MMIO exits go to the same device buses the Xen
//! backend will use. Reset reboots the guest in-process; S5 ends the process with status 0.

pub mod irq;
pub mod memory;
pub mod vcpu;

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hvmdm_devices::bus::AccessRules;
use hvmdm_devices::platform::{PlatformControl, SystemEvent};
use hvmdm_devices::topology::Topology;
use kvm_bindings::{kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::config::{FirmwareConfig, MachineConfig};
use crate::machine::{Machine, MachineEnv, MachineError};
use memory::{FirmwareImages, KvmMemory, MemoryError, RomSink, ShadowMmio, SHADOW_BASE, SHADOW_LEN};
use vcpu::{InitialState, Request, VcpuControl, VcpuError, VcpuThread};

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("no /dev/kvm: load kvm_intel or kvm_amd on a host with hardware virtualisation, or run the guest through lane K (tests/lanes/run-lane-k.sh)")]
    NoDevice,
    #[error("/dev/kvm is the software-only PVM KVM (kvm_pvm), which cannot run firmware or Linux; run through lane K (tests/lanes/run-lane-k.sh), or pass --allow-software-kvm to try anyway")]
    SoftwareKvm,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM setup ({what}): {err}")]
    Setup { what: &'static str, err: kvm_ioctls::Error },
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("the KVM backend needs a firmware image (SeaBIOS or OVMF); hvmloader is Xen's")]
    NoFirmware,
    #[error("reading {path}: {err}")]
    Firmware { path: String, err: std::io::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Four pages KVM uses itself on VMX hosts (identity map + TSS): reserved in the e820 map.
pub const KVM_PRIVATE_PAGES: u64 = 0xfeff_c000;

/// What the control thread hears from devices and vCPUs.
#[derive(Debug)]
pub enum VmEvent {
    System(SystemEvent),
    Fatal(String),
}

struct ChannelPlatform(Mutex<Sender<VmEvent>>);

impl PlatformControl for ChannelPlatform {
    fn request(&self, event: SystemEvent) {
        let tx = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(VmEvent::System(event));
    }
}

fn read_file(p: &Path) -> Result<Vec<u8>, KvmError> {
    std::fs::read(p).map_err(|err| KvmError::Firmware { path: p.display().to_string(), err })
}

/// Checks that /dev/kvm exists and is a hardware KVM.
pub fn check_kvm(allow_software: bool) -> Result<(), KvmError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmError::NoDevice);
    }
    if Path::new("/sys/module/kvm_pvm").exists() && !allow_software {
        return Err(KvmError::SoftwareKvm);
    }
    Ok(())
}

pub struct KvmOptions {
    pub allow_software_kvm: bool,
}

fn setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |err| KvmError::Setup { what, err }
}

/// Runs the VM until the guest powers off (Ok(0)) or something fatal happens.
pub fn run(cfg: &MachineConfig, opts: &KvmOptions) -> Result<i32, KvmError> {
    check_kvm(opts.allow_software_kvm)?;
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (kvm_ioctls::Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    let vm = Arc::new(kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?);
    // VMX needs these private pages (SVM ignores them); placed where QEMU puts them, below the
    // 16 MiB firmware window, and reserved in the e820 map (KVM_PRIVATE_PAGES).
    vm.set_identity_map_address(KVM_PRIVATE_PAGES).map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(KVM_PRIVATE_PAGES as usize + 0x1000).map_err(setup("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
        .map_err(setup("KVM_CREATE_PIT2"))?;

    let fw = match &cfg.firmware {
        FirmwareConfig::Bios(p) => FirmwareImages { code: read_file(p)?, vars: None },
        // A private in-memory copy of the VARS template: without a CFI flash device OVMF finds RAM
        // there and keeps its variables in memory (not persistent across runs).
        FirmwareConfig::OvmfSplit { code, vars_template } => {
            FirmwareImages { code: read_file(code)?, vars: Some(read_file(vars_template)?) }
        }
        FirmwareConfig::Hvmloader => return Err(KvmError::NoFirmware),
    };
    let mem = KvmMemory::new(vm.clone(), cfg.memory, &fw)?;
    let (tx, rx) = channel();
    let platform = Arc::new(ChannelPlatform(Mutex::new(tx.clone())));
    let irq = Arc::new(irq::KvmIrqSink::new(vm.clone()));
    let topology = Topology::flat(cfg.smp, cfg.smp);
    let machine = Machine::build(
        cfg,
        MachineEnv {
            mem: mem.clone(),
            irq: irq.clone(),
            platform: platform.clone(),
            shadow: mem.clone(),
            ram_below_4g: mem.layout.below_4g,
            ram_above_4g: mem.layout.above_4g,
            topology,
        },
    )?;
    let any = AccessRules::new(1, 8, 1, 8).allow_unaligned();
    let shadow = Arc::new(Mutex::new(ShadowMmio { mem: mem.clone() }));
    machine.mmio.insert(SHADOW_BASE, SHADOW_LEN, any, shadow, 0).map_err(MachineError::Bus)?;
    let rom_base = mem.rom_base();
    machine
        .mmio
        .insert(rom_base, memory::FOUR_GIB - rom_base, any, Arc::new(Mutex::new(RomSink)), 0)
        .map_err(MachineError::Bus)?;

    let mut chip_state = Vec::new();
    for chip_id in 0..3 {
        let mut c = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(setup("KVM_GET_IRQCHIP"))?;
        chip_state.push(c);
    }
    let pit_state = vm.get_pit2().map_err(setup("KVM_GET_PIT2"))?;

    vcpu::install_kick_handler().map_err(KvmError::Signal)?;
    let msr_list = kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default();
    let control = VcpuControl::new();
    let mut threads = Vec::new();
    for i in 0..cfg.smp {
        let id = topology.apic_id(i);
        let vcpu = vm.create_vcpu(id as u64).map_err(setup("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu::cpuid_for(&kvm, &topology, i)?;
        vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        let initial = InitialState::capture(&vcpu, i, &msr_list)?;
        let t = VcpuThread {
            index: i,
            vcpu,
            initial,
            pio: machine.pio.clone(),
            mmio: machine.mmio.clone(),
            control: control.clone(),
            events: tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || t.run())
            .map_err(KvmError::Thread)?;
        threads.push(h);
    }
    log::info!(
        "KVM VM running: {} MiB RAM ({} MiB below 4G), {} vCPU(s), firmware {} KiB at {:#x}",
        cfg.memory >> 20,
        mem.layout.below_4g >> 20,
        cfg.smp,
        fw.code.len() >> 10,
        rom_base
    );
    if let Some(p) = &machine.pty_path {
        log::info!("serial0 is {p}");
    }
    let ctl = Control { vm: &vm, control: &control, threads: &threads, chip_state, pit_state };
    let status = control_loop(&rx, &ctl, &machine, &mem, &irq);
    ctl.stop_all();
    Ok(status)
}

struct Control<'a> {
    vm: &'a VmFd,
    control: &'a Arc<VcpuControl>,
    threads: &'a [std::thread::JoinHandle<()>],
    chip_state: Vec<kvm_irqchip>,
    pit_state: kvm_pit_state2,
}

impl Control<'_> {
    fn kick_all(&self) {
        for t in self.threads {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined; sending it
            // our kick signal (with a no-op handler installed) only interrupts KVM_RUN.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal());
            }
        }
    }

    fn pause_all(&self) {
        let mut st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        st.request = Request::Pause;
        self.control.cv.notify_all();
        let n = self.threads.iter().filter(|t| !t.is_finished()).count() as u32;
        while st.parked < n {
            drop(st);
            self.kick_all();
            st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
            let (g, _) = self
                .control
                .cv
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
            st = g;
        }
    }

    fn resume_all(&self, new_generation: bool) {
        let mut st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        if new_generation {
            st.generation += 1;
        }
        st.request = Request::Run;
        self.control.cv.notify_all();
    }

    fn stop_all(&self) {
        let mut st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        st.request = Request::Exit;
        self.control.cv.notify_all();
        drop(st);
        self.kick_all();
    }

    fn reset_irqchips(&self) {
        for c in &self.chip_state {
            if let Err(e) = self.vm.set_irqchip(c) {
                log::error!("KVM_SET_IRQCHIP {}: {e}", c.chip_id);
            }
        }
        if let Err(e) = self.vm.set_pit2(&self.pit_state) {
            log::error!("KVM_SET_PIT2: {e}");
        }
    }
}

fn control_loop(
    rx: &Receiver<VmEvent>,
    ctl: &Control<'_>,
    machine: &Machine,
    mem: &KvmMemory,
    irq: &irq::KvmIrqSink,
) -> i32 {
    loop {
        let ev = match rx.recv() {
            Ok(ev) => ev,
            Err(_) => return 1,
        };
        match ev {
            VmEvent::System(SystemEvent::PowerOff) => {
                log::info!("guest powered off");
                ctl.pause_all();
                machine.shutdown();
                return 0;
            }
            VmEvent::System(SystemEvent::Reset) => {
                log::info!("guest reset: rebooting in-process");
                ctl.pause_all();
                // Devices first (PAM back to ROM, fw_cfg re-arms the ACPI rebuild), then the
                // in-kernel irqchip/PIT, then each vCPU restores its power-on state as it resumes.
                // The firmware ROM is mapped read-only, so it needs no reload.
                machine.reset();
                mem.reset_shadow();
                ctl.reset_irqchips();
                irq.reset();
                // Drain requests raised while pausing (e.g. several vCPUs hitting the reset port).
                while let Ok(VmEvent::System(SystemEvent::Reset)) = rx.try_recv() {}
                ctl.resume_all(true);
            }
            VmEvent::System(SystemEvent::Suspend) => {
                log::warn!(
                    "guest requested S3 suspend, which hvmdm's KVM backend does not support yet; ignoring"
                );
            }
            VmEvent::Fatal(msg) => {
                log::error!("{msg}");
                ctl.pause_all_quick();
                machine.shutdown();
                return 1;
            }
        }
    }
}

impl Control<'_> {
    /// Pausing after a fatal error must not wait for the failed thread.
    fn pause_all_quick(&self) {
        let mut st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        st.request = Request::Pause;
        self.control.cv.notify_all();
        drop(st);
        self.kick_all();
    }
}
