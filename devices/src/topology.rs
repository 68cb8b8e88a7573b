//! CPU identity. Every place the guest can read an APIC ID (CPUID, the LAPIC ID register via the
//! vCPU id, MADT, fw_cfg, the CPU hotplug interface) derives it from [`Topology::apic_id`], so they
//! cannot disagree (seed 003).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// vCPUs that exist at power-on.
    pub boot_cpus: u32,
    /// vCPUs that may ever exist (hotplug later).
    pub max_cpus: u32,
    pub cores_per_socket: u32,
    pub threads_per_core: u32,
}

impl Topology {
    /// `n` single-core sockets, as QEMU's plain `-smp n`.
    pub fn flat(boot: u32, max: u32) -> Self {
        Topology { boot_cpus: boot, max_cpus: max.max(boot), cores_per_socket: 1, threads_per_core: 1 }
    }

    fn bits(n: u32) -> u32 {
        if n <= 1 {
            0
        } else {
            32 - (n - 1).leading_zeros()
        }
    }

    /// Width of the SMT and core fields of an x2APIC ID (CPUID leaf 0xB shifts).
    pub fn smt_shift(&self) -> u32 {
        Self::bits(self.threads_per_core)
    }
    pub fn core_shift(&self) -> u32 {
        self.smt_shift() + Self::bits(self.cores_per_socket)
    }

    /// APIC ID of CPU index `i` (0-based). With non-power-of-two cores/threads, IDs are sparse.
    pub fn apic_id(&self, i: u32) -> u32 {
        let tpc = self.threads_per_core.max(1);
        let cps = self.cores_per_socket.max(1);
        let thread = i % tpc;
        let core = (i / tpc) % cps;
        let socket = i / (tpc * cps);
        (socket << self.core_shift()) | (core << self.smt_shift()) | thread
    }

    /// One past the highest APIC ID of any possible CPU (fw_cfg MAX_CPUS on x86).
    pub fn apic_id_limit(&self) -> u32 {
        if self.max_cpus == 0 {
            0
        } else {
            self.apic_id(self.max_cpus - 1) + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_ids_are_indices() {
        let t = Topology::flat(2, 4);
        assert_eq!((0..4).map(|i| t.apic_id(i)).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(t.apic_id_limit(), 4);
    }

    #[test]
    fn three_cores_give_sparse_ids() {
        let t = Topology { boot_cpus: 6, max_cpus: 6, cores_per_socket: 3, threads_per_core: 1 };
        assert_eq!((0..6).map(|i| t.apic_id(i)).collect::<Vec<_>>(), vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(t.apic_id_limit(), 7);
    }
}
