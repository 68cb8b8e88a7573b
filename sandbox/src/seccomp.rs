//! Seccomp allow-list for the running device-model loop.
//!
//! Everything the DM opens (Xen handles, disk images, taps, QMP sockets) is opened during setup,
//! so the running loop only needs I/O on existing fds, memory management, threads, time and
//! signals. The filter is installed on every thread (TSYNC).
//!
//! Decisions worth knowing:
//! * `ioctl` is allowed with any request: the Xen drivers (privcmd `'P'`, evtchn `'E'`,
//!   gntdev `'G'`), tap, block devices and Rust's own `FIONBIO` all need it, and the numbers
//!   differ per kernel build. stdin is `/dev/null` under libxl, so TTY ioctls have no target.
//! * `openat`/`open` are refused: nothing is opened after setup (cdrom change arrives as an fd
//!   over QMP `add-fd`). The forbidden-syscall tests rely on this.
//! * `clone` is allowed only with `CLONE_THREAD` (threads, not processes). `clone3` passes its
//!   flags in memory, which BPF cannot read, so a second filter makes it fail with `ENOSYS`;
//!   glibc (>= 2.34) then falls back to `clone`, which the first filter checks.
//! * `tgkill` only towards our own thread group (thread kicks, `abort()`).
//! * `prctl` only for `PR_SET_NAME` (Rust names threads with it).
//! * `sched_getaffinity`: glibc's malloc calls it lazily to size its arenas when a new thread
//!   first allocates; refusing it would kill the process under [`SeccompLevel::Kill`].
//! * `fallocate`: discard / write-zeroes on disk images.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::SandboxError;

/// What happens to a syscall outside the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompLevel {
    /// Fail the call with `EPERM` (default: a missed syscall degrades one feature, not the guest).
    Errno,
    /// Kill the whole process with `SIGSYS`.
    Kill,
}

/// Syscalls allowed without argument checks: (libc constant name, number).
pub fn plain_allow_list() -> Vec<(&'static str, i64)> {
    // Names keep the `SYS_` prefix of the libc constant they come from.
    macro_rules! sys {
        ($($name:ident),* $(,)?) => { vec![$((stringify!($name), libc::$name)),*] };
    }
    #[allow(unused_mut)]
    let mut list = sys![
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_lseek,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_close,
        SYS_fcntl,
        SYS_ioctl,
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_madvise,
        SYS_mremap,
        SYS_brk,
        SYS_futex,
        SYS_ppoll,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_epoll_ctl,
        SYS_epoll_create1,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_accept4,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_getsockopt,
        SYS_shutdown,
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_getrandom,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_rt_sigaction,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_set_robust_list,
        SYS_rseq,
        // clone3 is "allowed" here only so that the ENOSYS filter decides its fate (see
        // build_filters); under Kill it must not reach the default action.
        SYS_clone3,
        SYS_statx,
        SYS_fstat,
        SYS_newfstatat,
    ];
    // Legacy calls that only exist on x86_64 (aarch64 has just the p*/pwait variants).
    #[cfg(target_arch = "x86_64")]
    list.extend(sys![SYS_poll, SYS_epoll_wait]);
    list
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SandboxError::SeccompBuild)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<Vec<SeccompRule>, SandboxError> {
    Ok(vec![SeccompRule::new(conds).map_err(SandboxError::SeccompBuild)?])
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::SeccompBuild)
}

/// Builds the BPF programs in installation order: the `clone3` → `ENOSYS` filter, then the
/// allow-list. The kernel evaluates every installed filter and keeps the most restrictive
/// verdict, so `clone3` (allowed by the allow-list) ends up `ENOSYS` while every other verdict
/// comes from the allow-list. The allow-list goes last because installing a filter calls
/// `prctl(PR_SET_NO_NEW_PRIVS)`, which the allow-list refuses.
pub fn build_filters(level: SeccompLevel) -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        plain_allow_list().into_iter().map(|(_, nr)| (nr, Vec::new())).collect();

    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?);
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(libc::SYS_tgkill, rule(vec![cond(0, SeccompCmpOp::Eq, pid)?])?);
    rules.insert(libc::SYS_prctl, rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?);

    let mismatch = match level {
        SeccompLevel::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompLevel::Kill => SeccompAction::KillProcess,
    };
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(SandboxError::SeccompBuild)?;

    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    let no_clone3 =
        SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)
            .map_err(SandboxError::SeccompBuild)?;

    Ok(vec![
        BpfProgram::try_from(no_clone3).map_err(SandboxError::SeccompBuild)?,
        BpfProgram::try_from(allow).map_err(SandboxError::SeccompBuild)?,
    ])
}

/// Builds and installs the filters on all threads of the process. Sets `PR_SET_NO_NEW_PRIVS`
/// (seccompiler does it too; needed for unprivileged filter installation).
pub fn install(level: SeccompLevel) -> Result<(), SandboxError> {
    let progs = build_filters(level)?;
    for prog in &progs {
        seccompiler::apply_filter_all_threads(prog).map_err(SandboxError::SeccompInstall)?;
    }
    log::info!("seccomp: {} syscalls allowed, others {:?}", plain_allow_list().len() + 3, level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_has_no_dangerous_entries() {
        let list = plain_allow_list();
        let nrs: Vec<i64> = list.iter().map(|&(_, nr)| nr).collect();
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_chroot,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_clone,
            libc::SYS_tgkill,
            libc::SYS_prctl,
        ] {
            assert!(!nrs.contains(&forbidden), "syscall {forbidden} must not be unconditionally allowed");
        }
        let mut sorted = nrs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), nrs.len(), "duplicate entries");
    }

    #[test]
    fn filters_build_for_both_levels() {
        for level in [SeccompLevel::Errno, SeccompLevel::Kill] {
            let progs = build_filters(level).unwrap();
            assert_eq!(progs.len(), 2);
            assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
        }
    }
}
