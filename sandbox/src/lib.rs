//! Deprivileging of the device model once setup is done (`dm_restrict=1` in libxl terms).
//!
//! libxl starts a restricted DM with `-xen-domid-restrict -chroot /var/run/xen/qemu-root-<domid>
//! -runas <uid>:<gid>` (the chroot directory is empty, mode 0000, created by libxl). After all
//! Xen handles, disk images, taps and QMP sockets are open, the machine calls
//! `xentoolcore_restrict_all(domid)` (xen crate) and then [`apply`], which performs, in order:
//!
//! 1. resolve the `-runas` user (before chroot: `/etc/passwd` and NSS vanish afterwards);
//! 2. rlimits: `RLIMIT_CORE` 0 (no guest memory in core files), `RLIMIT_NOFILE` capped at
//!    [`Policy::nofile_limit`]. `RLIMIT_FSIZE` is deliberately left alone: disk images grow
//!    (libxl's own pre-exec hook may already have set it);
//! 3. `chroot` + `chdir("/")`;
//! 4. `setgroups(0)`, `setgid`, `setuid`, then a check that all real/effective/saved ids changed
//!    and that `setuid(0)` now fails. Supplementary groups are always dropped (QEMU calls
//!    `initgroups` for a named user, but after its chroot `/etc/group` is gone, so the effective
//!    result is the same);
//! 5. `PR_SET_NO_NEW_PRIVS`;
//! 6. the seccomp filter ([`seccomp`]), on all threads.
//!
//! The id changes go through glibc, which applies them to every thread of the process.

pub mod runas;
pub mod seccomp;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use runas::{Credentials, RunAs};
pub use seccomp::SeccompLevel;

/// Default cap for `RLIMIT_NOFILE`: ample for disks, taps, event channels and QMP clients.
pub const DEFAULT_NOFILE_LIMIT: u64 = 4096;

/// Errors from [`apply`] and [`RunAs`]; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid -runas value {0:?}: expected a user name or <uid>:<gid>")]
    InvalidRunAs(String),
    #[error("-runas user {0:?} not found in the password database")]
    UnknownUser(String),
    #[error("getpwnam_r({user:?}) failed: {source}")]
    UserLookup { user: String, source: io::Error },
    #[error("setrlimit({resource}) failed: {source}")]
    Rlimit { resource: &'static str, source: io::Error },
    #[error("chroot path {0:?} contains a NUL byte")]
    ChrootPath(PathBuf),
    #[error("chroot({path:?}) failed: {source}")]
    Chroot { path: PathBuf, source: io::Error },
    #[error("chdir(\"/\") after chroot failed: {0}")]
    Chdir(io::Error),
    #[error("setgroups(0, NULL) failed: {0}")]
    SetGroups(io::Error),
    #[error("setgid({gid}) failed: {source}")]
    SetGid { gid: u32, source: io::Error },
    #[error("setuid({uid}) failed: {source}")]
    SetUid { uid: u32, source: io::Error },
    #[error("ids after dropping privileges are uid {ruid}/{euid}/{suid} gid {rgid}/{egid}/{sgid}, wanted {want_uid}:{want_gid}")]
    IdsMismatch {
        ruid: u32,
        euid: u32,
        suid: u32,
        rgid: u32,
        egid: u32,
        sgid: u32,
        want_uid: u32,
        want_gid: u32,
    },
    #[error("privilege drop to uid {0} is reversible: setuid(0) still succeeds")]
    RootRegained(u32),
    #[error("prctl(PR_SET_NO_NEW_PRIVS) failed: {0}")]
    NoNewPrivs(io::Error),
    #[error("building the seccomp filter failed: {0}")]
    SeccompBuild(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter failed: {0}")]
    SeccompInstall(#[source] seccompiler::Error),
}

/// What to restrict. `Default` restricts nothing except setting `PR_SET_NO_NEW_PRIVS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `-chroot <dir>`.
    pub chroot: Option<PathBuf>,
    /// `-runas <user>` / `-runas <uid>:<gid>`.
    pub runas: Option<RunAs>,
    /// Apply `RLIMIT_CORE`=0 and cap `RLIMIT_NOFILE`.
    pub rlimits: bool,
    /// Cap for `RLIMIT_NOFILE` (soft and hard) when `rlimits` is set; never raises the limit.
    pub nofile_limit: u64,
    /// Seccomp filter, if any.
    pub seccomp: Option<SeccompLevel>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            chroot: None,
            runas: None,
            rlimits: false,
            nofile_limit: DEFAULT_NOFILE_LIMIT,
            seccomp: None,
        }
    }
}

impl Policy {
    /// The policy for a libxl `dm_restrict=1` command line: the given chroot/runas, rlimits and
    /// an `EPERM` seccomp filter.
    pub fn restricted(chroot: Option<PathBuf>, runas: Option<RunAs>) -> Self {
        Policy { chroot, runas, rlimits: true, seccomp: Some(SeccompLevel::Errno), ..Policy::default() }
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub credentials: Option<Credentials>,
    pub chroot: Option<PathBuf>,
    /// The `RLIMIT_NOFILE` now in force, if rlimits were applied.
    pub nofile_limit: Option<u64>,
    pub seccomp: Option<SeccompLevel>,
}

/// Applies `policy` to the whole process (see the crate docs for the order). Irreversible; on
/// error the process is partly restricted and should exit.
pub fn apply(policy: &Policy) -> Result<Applied, SandboxError> {
    let credentials = policy.runas.as_ref().map(RunAs::resolve).transpose()?;

    let nofile_limit = if policy.rlimits { Some(apply_rlimits(policy.nofile_limit)?) } else { None };

    if let Some(dir) = &policy.chroot {
        enter_chroot(dir)?;
    }

    if let Some(c) = credentials {
        drop_privileges(c)?;
    }

    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(io::Error::last_os_error()));
    }

    if let Some(level) = policy.seccomp {
        seccomp::install(level)?;
    }

    log::info!(
        "sandbox: chroot {:?}, ids {:?}, nofile {:?}, seccomp {:?}",
        policy.chroot,
        credentials,
        nofile_limit,
        policy.seccomp
    );
    Ok(Applied { credentials, chroot: policy.chroot.clone(), nofile_limit, seccomp: policy.seccomp })
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    value: libc::rlim_t,
) -> Result<(), SandboxError> {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(SandboxError::Rlimit { resource: name, source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Returns the `RLIMIT_NOFILE` value set.
fn apply_rlimits(nofile_cap: u64) -> Result<u64, SandboxError> {
    set_rlimit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;

    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `cur` is valid writable memory for one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(SandboxError::Rlimit { resource: "RLIMIT_NOFILE", source: io::Error::last_os_error() });
    }
    // Lowering never closes fds that are already open; it only bounds what a compromised DM
    // could accumulate. Never raise: the toolstack may have chosen less.
    let nofile = cur.rlim_max.min(nofile_cap);
    set_rlimit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", nofile)?;
    Ok(nofile)
}

fn enter_chroot(dir: &Path) -> Result<(), SandboxError> {
    let c =
        CString::new(dir.as_os_str().as_bytes()).map_err(|_| SandboxError::ChrootPath(dir.to_path_buf()))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::chroot(c.as_ptr()) } != 0 {
        return Err(SandboxError::Chroot { path: dir.to_path_buf(), source: io::Error::last_os_error() });
    }
    // Without this the old cwd stays reachable outside the new root.
    // SAFETY: static NUL-terminated path.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(SandboxError::Chdir(io::Error::last_os_error()));
    }
    Ok(())
}

fn current_ids() -> ([u32; 3], [u32; 3]) {
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: all pointers refer to live locals; these calls cannot fail with valid pointers.
    unsafe {
        libc::getresuid(&mut ru, &mut eu, &mut su);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
    }
    ([ru, eu, su], [rg, eg, sg])
}

fn drop_privileges(c: Credentials) -> Result<(), SandboxError> {
    let (uids, gids) = current_ids();
    if uids != [0; 3] && uids == [c.uid; 3] && gids == [c.gid; 3] {
        // Unprivileged run already as the target (development use): nothing to drop, and
        // setgroups would fail with EPERM.
        log::debug!("runas: already uid {} gid {}", c.uid, c.gid);
        return Ok(());
    }
    // SAFETY: setgroups with size 0 does not read the list pointer.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(SandboxError::SetGroups(io::Error::last_os_error()));
    }
    // gid first: after setuid we no longer may change it.
    // SAFETY: plain id argument.
    if unsafe { libc::setgid(c.gid) } != 0 {
        return Err(SandboxError::SetGid { gid: c.gid, source: io::Error::last_os_error() });
    }
    // SAFETY: plain id argument.
    if unsafe { libc::setuid(c.uid) } != 0 {
        return Err(SandboxError::SetUid { uid: c.uid, source: io::Error::last_os_error() });
    }
    let (uids, gids) = current_ids();
    if uids != [c.uid; 3] || gids != [c.gid; 3] {
        return Err(SandboxError::IdsMismatch {
            ruid: uids[0],
            euid: uids[1],
            suid: uids[2],
            rgid: gids[0],
            egid: gids[1],
            sgid: gids[2],
            want_uid: c.uid,
            want_gid: c.gid,
        });
    }
    // SAFETY: plain id argument; success here means the drop failed, reported below.
    if c.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(SandboxError::RootRegained(c.uid));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
