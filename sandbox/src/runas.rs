//! `-runas` parsing and user-name resolution.
//!
//! QEMU accepts either a user name or `<uid>:<gid>` (libxl passes the latter for per-domain
//! uids, e.g. `-runas 131091:131072`). A user name cannot contain `:` in the password database,
//! so the colon decides the form.

use std::ffi::{CStr, CString};
use std::io;

use crate::SandboxError;

/// Target identity given with `-runas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// A user name, looked up with `getpwnam_r` (uid and primary gid).
    User(String),
    /// Numeric ids, used as given.
    Ids { uid: u32, gid: u32 },
}

/// Ids resolved from a [`RunAs`], ready for `setgid`/`setuid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Parses a `-runas` argument: `name` or `uid:gid`.
    ///
    /// Ids are decimal or `0x` hex. `4294967295` (`(uid_t)-1`) is refused: the kernel treats it
    /// as "leave unchanged", which would silently keep root.
    pub fn parse(s: &str) -> Result<RunAs, SandboxError> {
        let bad = || SandboxError::InvalidRunAs(s.to_string());
        if s.is_empty() || s.contains('\0') {
            return Err(bad());
        }
        match s.split_once(':') {
            None => Ok(RunAs::User(s.to_string())),
            Some((u, g)) => {
                let uid = parse_id(u).ok_or_else(bad)?;
                let gid = parse_id(g).ok_or_else(bad)?;
                Ok(RunAs::Ids { uid, gid })
            }
        }
    }

    /// Resolves to numeric ids. Must run before `chroot`, since `/etc/passwd` (and any NSS
    /// module) is gone afterwards.
    pub fn resolve(&self) -> Result<Credentials, SandboxError> {
        match self {
            RunAs::Ids { uid, gid } => Ok(Credentials { uid: *uid, gid: *gid }),
            RunAs::User(name) => lookup_user(name),
        }
    }
}

fn parse_id(s: &str) -> Option<u32> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(hex, 16).ok()?
    } else {
        // `u32::from_str` accepts a leading '+'; QEMU's strtoul does too, but libxl never
        // emits one and a strict parser gives clearer errors.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u32>().ok()?
    };
    (v != u32::MAX).then_some(v)
}

fn lookup_user(name: &str) -> Result<Credentials, SandboxError> {
    let cname = CString::new(name).map_err(|_| SandboxError::InvalidRunAs(name.to_string()))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hint = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
    let mut len = usize::try_from(hint).ok().filter(|&n| n > 0).unwrap_or(1024);
    loop {
        let mut buf = vec![0u8; len];
        // SAFETY: an all-zero passwd is a valid value (pointers null, ints 0); getpwnam_r
        // overwrites it on success.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; `buf` outlives every use of the string
        // pointers stored in `pwd` (we only copy out the numeric ids below).
        let rc = unsafe {
            libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result)
        };
        if rc == libc::ERANGE && len < (1 << 20) {
            len *= 4;
            continue;
        }
        if rc != 0 {
            return Err(SandboxError::UserLookup {
                user: name.to_string(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(SandboxError::UnknownUser(name.to_string()));
        }
        if !pwd.pw_name.is_null() {
            // SAFETY: pw_name points into `buf`, NUL-terminated by getpwnam_r.
            let got = unsafe { CStr::from_ptr(pwd.pw_name) };
            log::debug!("runas: user {:?} is uid {} gid {}", got, pwd.pw_uid, pwd.pw_gid);
        }
        return Ok(Credentials { uid: pwd.pw_uid, gid: pwd.pw_gid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(RunAs::parse("nobody").unwrap(), RunAs::User("nobody".into()));
        assert_eq!(RunAs::parse("xen-qemuuser-5").unwrap(), RunAs::User("xen-qemuuser-5".into()));
        assert_eq!(RunAs::parse("131091:131072").unwrap(), RunAs::Ids { uid: 131091, gid: 131072 });
        assert_eq!(RunAs::parse("0:0").unwrap(), RunAs::Ids { uid: 0, gid: 0 });
        assert_eq!(RunAs::parse("0x10:0X20").unwrap(), RunAs::Ids { uid: 16, gid: 32 });
        assert_eq!(
            RunAs::parse("4294967294:4294967294").unwrap(),
            RunAs::Ids { uid: u32::MAX - 1, gid: u32::MAX - 1 }
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "",
            ":",
            "1:",
            ":1",
            "a:b",
            "1:2:3",
            "-1:0",
            "+1:0",
            " 1:0",
            "1 :0",
            "4294967295:0",
            "0:4294967295",
            "0xffffffff:0",
            "4294967296:0",
            "0x:0",
            "0xg:0",
            "nul\0user",
        ] {
            match RunAs::parse(bad) {
                Err(SandboxError::InvalidRunAs(s)) => assert_eq!(s, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn resolve_ids_is_identity() {
        let c = RunAs::Ids { uid: 7, gid: 9 }.resolve().unwrap();
        assert_eq!(c, Credentials { uid: 7, gid: 9 });
    }

    #[test]
    fn resolve_root_user() {
        // root is uid 0 / gid 0 in every passwd database.
        let c = RunAs::User("root".into()).resolve().unwrap();
        assert_eq!(c, Credentials { uid: 0, gid: 0 });
    }

    #[test]
    fn resolve_unknown_user() {
        match RunAs::User("hvmdm-no-such-user-xyz".into()).resolve() {
            Err(SandboxError::UnknownUser(u)) => assert_eq!(u, "hvmdm-no-such-user-xyz"),
            other => panic!("unexpected {other:?}"),
        }
        // A name that cannot be passed to C at all.
        assert!(matches!(RunAs::User("a\0b".into()).resolve(), Err(SandboxError::InvalidRunAs(_))));
    }
}
