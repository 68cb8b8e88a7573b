//! vCPU threads: CPUID from KVM_GET_SUPPORTED_CPUID patched with our topology, the exit loop that
//! feeds PIO/MMIO exits to the device buses, and in-process reset (each vCPU restores the state it
//! had at creation, which is KVM's power-on state).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use hvmdm_devices::bus::Bus;
use hvmdm_devices::topology::Topology;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use thiserror::Error;

use super::VmEvent;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("vCPU {cpu}: {what}: {err}")]
    Ioctl { cpu: u32, what: &'static str, err: kvm_ioctls::Error },
}

/// What the control thread asks of the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    Exit,
}

pub struct ControlState {
    pub request: Request,
    /// Bumped for every reset; a vCPU that wakes to a new generation restores its power-on state.
    pub generation: u64,
    pub parked: u32,
}

pub struct VcpuControl {
    pub state: Mutex<ControlState>,
    pub cv: Condvar,
}

impl VcpuControl {
    pub fn new() -> Arc<Self> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState { request: Request::Run, generation: 0, parked: 0 }),
            cv: Condvar::new(),
        })
    }
}

/// Builds the CPUID table for CPU `index`.
pub fn cpuid_for(kvm: &Kvm, topo: &Topology, index: u32) -> Result<CpuId, VcpuError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VcpuError::SupportedCpuid)?;
    let apic_id = topo.apic_id(index);
    let per_pkg = topo.cores_per_socket * topo.threads_per_core;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((per_pkg.min(255)) << 16);
                // Hypervisor present.
                e.ecx |= 1 << 31;
                if per_pkg > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package - 1 in 31:26; threads sharing the cache - 1 in 25:14.
                let cache_level = (e.eax >> 5) & 7;
                let sharing = if cache_level >= 3 { per_pkg } else { topo.threads_per_core };
                e.eax = (e.eax & 0x3fff)
                    | ((topo.cores_per_socket.max(1) - 1) << 26)
                    | ((sharing.max(1) - 1) << 14);
            }
            0xb | 0x1f => {
                let (shift, count, ty) = match e.index {
                    0 => (topo.smt_shift(), topo.threads_per_core, 1),
                    1 => (topo.core_shift(), per_pkg, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (ty << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0x8000_0008 => {
                // Number of cores - 1 (AMD).
                e.ecx = (e.ecx & !0xff) | (per_pkg.max(1) - 1);
            }
            0x8000_001e => {
                e.eax = apic_id;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The vCPU's state right after creation = x86 power-on state.
pub struct InitialState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: Option<kvm_vcpu_events>,
    msrs: Vec<kvm_msr_entry>,
}

impl InitialState {
    pub fn capture(vcpu: &VcpuFd, cpu: u32, msr_indices: &[u32]) -> Result<Self, VcpuError> {
        let io = |what: &'static str| move |err| VcpuError::Ioctl { cpu, what, err };
        let mut msrs = Vec::new();
        for &index in msr_indices {
            let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]) else {
                continue;
            };
            if matches!(vcpu.get_msrs(&mut m), Ok(1)) {
                msrs.push(m.as_slice()[0]);
            }
        }
        Ok(InitialState {
            regs: vcpu.get_regs().map_err(io("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(io("KVM_GET_FPU"))?,
            lapic: vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().ok(),
            msrs,
        })
    }

    pub fn restore(&self, vcpu: &VcpuFd, cpu: u32) -> Result<(), VcpuError> {
        let io = |what: &'static str| move |err| VcpuError::Ioctl { cpu, what, err };
        vcpu.set_sregs(&self.sregs).map_err(io("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(io("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(io("KVM_SET_FPU"))?;
        for m in &self.msrs {
            // Some MSRs refuse their own power-on value once others changed; those are not essential.
            if let Ok(one) = Msrs::from_entries(&[*m]) {
                let _ = vcpu.set_msrs(&one);
            }
        }
        vcpu.set_lapic(&self.lapic).map_err(io("KVM_SET_LAPIC"))?;
        if let Some(ev) = &self.events {
            let _ = vcpu.set_vcpu_events(ev);
        }
        vcpu.set_mp_state(self.mp_state).map_err(io("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
}

pub struct VcpuThread {
    pub index: u32,
    pub vcpu: VcpuFd,
    pub initial: InitialState,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub events: Sender<VmEvent>,
}

impl VcpuThread {
    pub fn run(mut self) {
        let mut generation = 0;
        loop {
            {
                let mut st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.request != Request::Run {
                    st.parked += 1;
                    self.control.cv.notify_all();
                    while st.request == Request::Pause {
                        st = self.control.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.parked -= 1;
                    if st.request == Request::Exit {
                        return;
                    }
                }
                if st.generation != generation {
                    generation = st.generation;
                    drop(st);
                    if let Err(e) = self.initial.restore(&self.vcpu, self.index) {
                        let _ = self.events.send(VmEvent::Fatal(format!("reset: {e}")));
                        return;
                    }
                }
            }
            if !self.run_once() {
                return;
            }
        }
    }

    /// One KVM_RUN and its exit; false when the thread must stop.
    fn run_once(&mut self) -> bool {
        // Port I/O is handled after the exit's borrow of the run area ends: kvm-ioctls flattens a
        // `rep ins/outs` into one size*count slice, and the bus needs the real access size.
        let mut pio: Option<bool> = None;
        let keep_going = match self.vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(..) => {
                    pio = Some(false);
                    true
                }
                VcpuExit::IoOut(..) => {
                    pio = Some(true);
                    true
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read_sync(addr, data);
                    true
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write_sync(addr, data);
                    true
                }
                VcpuExit::Hlt => {
                    // Only reached without an in-kernel LAPIC; treat as a stop.
                    let _ = self.events.send(VmEvent::Fatal(format!("vCPU {} halted", self.index)));
                    false
                }
                VcpuExit::Shutdown => {
                    log::info!("vCPU {}: triple fault, resetting the guest", self.index);
                    let _ = self.events.send(VmEvent::System(hvmdm_devices::platform::SystemEvent::Reset));
                    self.wait_for_control();
                    true
                }
                VcpuExit::SystemEvent(ty, _) => {
                    use hvmdm_devices::platform::SystemEvent;
                    let ev = if ty == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        SystemEvent::Reset
                    } else {
                        SystemEvent::PowerOff
                    };
                    let _ = self.events.send(VmEvent::System(ev));
                    self.wait_for_control();
                    true
                }
                VcpuExit::Intr => true,
                VcpuExit::InternalError => {
                    let regs = self.vcpu.get_regs().ok();
                    let sregs = self.vcpu.get_sregs().ok();
                    let _ = self.events.send(VmEvent::Fatal(format!(
                        "vCPU {}: KVM internal error (rip {:#x?}, cs base {:#x?})",
                        self.index,
                        regs.map(|r| r.rip),
                        sregs.map(|s| s.cs.base)
                    )));
                    false
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    let _ = self.events.send(VmEvent::Fatal(format!(
                        "vCPU {}: VM entry failed, reason {reason:#x} on host cpu {cpu}",
                        self.index
                    )));
                    false
                }
                other => {
                    log::warn!("vCPU {}: unhandled exit {:?}", self.index, other);
                    true
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => true,
            Err(e) => {
                let _ = self.events.send(VmEvent::Fatal(format!("vCPU {}: KVM_RUN: {e}", self.index)));
                false
            }
        };
        if let Some(is_out) = pio {
            self.port_io(is_out);
        }
        keep_going
    }

    /// Serves a KVM_EXIT_IO of `count` accesses of `size` bytes each (count > 1 for rep ins/outs).
    fn port_io(&mut self, is_out: bool) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the active member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let (size, count, port) = (io.size as usize, io.count as usize, io.port as u64);
        let total = size * count;
        if size == 0 || size > 4 || total > 4096 || io.data_offset as usize + total > 4096 * 2 {
            log::error!("vCPU {}: malformed KVM_EXIT_IO (size {size}, count {count})", self.index);
            return;
        }
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM places the `size * count` data bytes at `data_offset` inside the vCPU's
        // mmap'd run area (at least one page plus the PIO page); bounds were checked above, and no
        // other reference to that area is alive here.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), total) };
        for chunk in data.chunks_mut(size) {
            if is_out {
                self.pio.write_sync(port, chunk);
            } else {
                self.pio.read_sync(port, chunk);
            }
        }
    }

    /// After reporting a reset/poweroff from the exit itself, wait until the control thread has acted,
    /// so this vCPU does not re-enter a guest that is being torn down.
    fn wait_for_control(&self) {
        let st = self.control.state.lock().unwrap_or_else(|p| p.into_inner());
        let gen = st.generation;
        let _unused = self
            .control
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(5), |s| {
                s.request == Request::Run && s.generation == gen
            })
            .unwrap_or_else(|p| p.into_inner());
    }
}
