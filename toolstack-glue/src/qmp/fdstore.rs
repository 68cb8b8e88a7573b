//! File descriptors handed over QMP with SCM_RIGHTS: QEMU's fd sets (`add-fd`, `remove-fd`,
//! `query-fdsets`, `/dev/fdset/N` paths) and named fds (`getfd`, `closefd`).
//!
//! Unlike QEMU, named fds are process-global rather than per monitor, so the machine can look
//! them up from any dispatcher call; libxl does not use them.

use super::QmpError;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Upper bound on descriptors held at once, so a client cannot exhaust the process's fd table.
pub const MAX_STORED_FDS: usize = 64;

struct Entry {
    fd: OwnedFd,
    opaque: Option<String>,
}

#[derive(Default)]
pub struct FdStore {
    sets: BTreeMap<i64, Vec<Entry>>,
    named: HashMap<String, OwnedFd>,
}

impl FdStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn count(&self) -> usize {
        self.sets.values().map(Vec::len).sum::<usize>() + self.named.len()
    }

    fn check_room(&self) -> Result<(), QmpError> {
        if self.count() >= MAX_STORED_FDS {
            return Err(QmpError::generic(format!("Too many file descriptors (limit {MAX_STORED_FDS})")));
        }
        Ok(())
    }

    /// `add-fd`: stores `fd` in set `fdset_id` (created if needed) or in the lowest free set id.
    /// Returns `(fdset-id, fd)` as the reply reports them.
    pub fn add(
        &mut self,
        fdset_id: Option<i64>,
        fd: OwnedFd,
        opaque: Option<String>,
    ) -> Result<(i64, RawFd), QmpError> {
        self.check_room()?;
        let id = match fdset_id {
            Some(id) if id < 0 => {
                return Err(QmpError::invalid_parameter_value("fdset-id", "a non-negative value"))
            }
            Some(id) => id,
            None => {
                let mut id = 0;
                while self.sets.contains_key(&id) {
                    id += 1;
                }
                id
            }
        };
        let raw = fd.as_raw_fd();
        self.sets.entry(id).or_default().push(Entry { fd, opaque });
        Ok((id, raw))
    }

    /// `remove-fd`: closes one fd of a set, or the whole set.
    pub fn remove(&mut self, fdset_id: i64, fd: Option<i64>) -> Result<(), QmpError> {
        let not_found = || {
            let name = match fd {
                Some(fd) => format!("fdset-id:{fdset_id}, fd:{fd}"),
                None => format!("fdset-id:{fdset_id}"),
            };
            QmpError::generic(format!("File descriptor named '{name}' not found"))
        };
        let set = self.sets.get_mut(&fdset_id).ok_or_else(not_found)?;
        match fd {
            None => {
                self.sets.remove(&fdset_id);
            }
            Some(fd) => {
                let pos = set.iter().position(|e| i64::from(e.fd.as_raw_fd()) == fd).ok_or_else(not_found)?;
                set.remove(pos);
                if set.is_empty() {
                    self.sets.remove(&fdset_id);
                }
            }
        }
        Ok(())
    }

    /// `query-fdsets` reply.
    pub fn query(&self) -> Value {
        Value::Array(
            self.sets
                .iter()
                .map(|(id, fds)| {
                    let fds: Vec<Value> = fds
                        .iter()
                        .map(|e| match &e.opaque {
                            Some(o) => json!({"fd": e.fd.as_raw_fd(), "opaque": o}),
                            None => json!({"fd": e.fd.as_raw_fd()}),
                        })
                        .collect();
                    json!({"fdset-id": id, "fds": fds})
                })
                .collect(),
        )
    }

    /// The descriptors of one set, with their `opaque` strings.
    pub fn fdset(&self, fdset_id: i64) -> impl Iterator<Item = (BorrowedFd<'_>, Option<&str>)> {
        self.sets.get(&fdset_id).into_iter().flatten().map(|e| (e.fd.as_fd(), e.opaque.as_deref()))
    }

    /// Resolves a `/dev/fdset/N` filename (as in `xen-save-devices-state`) to a duplicate of the
    /// set's first descriptor.
    pub fn open_fdset_path(&self, path: &str) -> Result<OwnedFd, QmpError> {
        let id: i64 = path
            .strip_prefix("/dev/fdset/")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| QmpError::generic(format!("'{path}' is not a /dev/fdset/N path")))?;
        let (fd, _) = self
            .fdset(id)
            .next()
            .ok_or_else(|| QmpError::generic(format!("File descriptor named 'fdset-id:{id}' not found")))?;
        fd.try_clone_to_owned().map_err(|e| QmpError::generic(format!("Could not dup fdset {id}: {e}")))
    }

    /// `getfd`: stores (replacing) a named descriptor.
    pub fn set_named(&mut self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::invalid_parameter_value("fdname", "a name not starting with a digit"));
        }
        if !self.named.contains_key(name) {
            self.check_room()?;
        }
        self.named.insert(name.to_string(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn close_named(&mut self, name: &str) -> Result<(), QmpError> {
        self.named
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Takes a named descriptor for a device that consumes it.
    pub fn take_named(&mut self, name: &str) -> Option<OwnedFd> {
        self.named.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn fd() -> OwnedFd {
        UnixStream::pair().unwrap().0.into()
    }

    #[test]
    fn fdsets() {
        let mut s = FdStore::new();
        let (a, ra) = s.add(None, fd(), None).unwrap();
        assert_eq!(a, 0);
        let (b, _) = s.add(None, fd(), Some("raw:/x".into())).unwrap();
        assert_eq!(b, 1);
        assert_eq!(s.add(Some(0), fd(), None).unwrap().0, 0);
        assert_eq!(
            s.add(Some(-1), fd(), None).unwrap_err().desc,
            "Parameter 'fdset-id' expects a non-negative value"
        );
        let q = s.query();
        assert_eq!(q[0]["fdset-id"], 0);
        assert_eq!(q[0]["fds"].as_array().unwrap().len(), 2);
        assert_eq!(q[1]["fds"][0]["opaque"], "raw:/x");
        let dup = s.open_fdset_path("/dev/fdset/1").unwrap();
        assert_ne!(dup.as_raw_fd(), q[1]["fds"][0]["fd"].as_i64().unwrap() as RawFd);
        assert!(s.open_fdset_path("/dev/fdset/9").is_err());
        assert!(s.open_fdset_path("/tmp/x").is_err());
        s.remove(0, Some(ra.into())).unwrap();
        assert_eq!(
            s.remove(0, Some(9999)).unwrap_err().desc,
            "File descriptor named 'fdset-id:0, fd:9999' not found"
        );
        s.remove(0, None).unwrap();
        assert_eq!(s.remove(0, None).unwrap_err().desc, "File descriptor named 'fdset-id:0' not found");
        // Lowest free id is reused.
        assert_eq!(s.add(None, fd(), None).unwrap().0, 0);
    }

    #[test]
    fn named_and_limit() {
        let mut s = FdStore::new();
        s.set_named("save", fd()).unwrap();
        assert!(s.set_named("1x", fd()).is_err());
        s.close_named("save").unwrap();
        assert_eq!(s.close_named("save").unwrap_err().desc, "File descriptor named 'save' not found");
        for _ in 0..MAX_STORED_FDS {
            s.add(Some(3), fd(), None).unwrap();
        }
        assert!(s.add(None, fd(), None).unwrap_err().desc.contains("Too many"));
        assert!(s.set_named("n", fd()).is_err());
    }
}
