//! PIO and MMIO dispatch with per-region access rules.
//!
//! Every region declares the access sizes the guest may use (`valid`) and the sizes its handler
//! implements (`impl`), plus whether unaligned guest accesses are allowed. The bus then:
//! - rejects invalid accesses (reads return all-ones, writes are dropped, one rate-limited warning);
//! - splits a valid access wider than the handler implements into implemented-size pieces, in
//!   ascending address order, little-endian (byte `i` of the data is the byte at `addr + i`);
//! - widens an access narrower than the handler implements to the smallest implemented size
//!   (reads extract the requested bytes; writes carry zeroes in the other byte lanes, as QEMU does);
//! - supports deferred completion: a handler may return [`IoResult::Defer`] and finish later.
//!
//! The same rules apply whichever backend delivered the access (seed 001: QEMU's KVM and TCG paths
//! disagreed about exactly this and a guest's mode switch was silently lost).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use thiserror::Error;

use crate::warn_limited;

/// Which of a device's regions an access hit (the device chooses the numbers).
pub type RegionId = usize;

/// Access rules of one region. Sizes are powers of two in 1..=8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessRules {
    pub valid_min: u8,
    pub valid_max: u8,
    pub impl_min: u8,
    pub impl_max: u8,
    /// Whether the guest may issue accesses not aligned to their size.
    pub unaligned: bool,
}

impl AccessRules {
    /// Guest may use `valid_min..=valid_max`, handler implements `impl_min..=impl_max`, aligned only.
    pub const fn new(valid_min: u8, valid_max: u8, impl_min: u8, impl_max: u8) -> Self {
        AccessRules { valid_min, valid_max, impl_min, impl_max, unaligned: false }
    }
    /// Any size 1..4, delivered as is.
    pub const DWORD_ANY: AccessRules = AccessRules::new(1, 4, 1, 4);
    /// Any size 1..4, delivered as single bytes (seed 001's CPU hotplug block).
    pub const BYTES: AccessRules = AccessRules::new(1, 4, 1, 1);
    /// Byte accesses only.
    pub const BYTE_ONLY: AccessRules = AccessRules::new(1, 1, 1, 1);
    pub const fn allow_unaligned(mut self) -> Self {
        self.unaligned = true;
        self
    }
    fn is_valid(&self, addr: u64, size: usize) -> bool {
        size.is_power_of_two()
            && size >= self.valid_min as usize
            && size <= self.valid_max as usize
            && (self.unaligned || addr % size as u64 == 0)
    }
}

/// A handler's answer to one access.
#[derive(Debug)]
pub enum IoResult {
    /// Finished; for reads the data buffer holds the value.
    Done,
    /// Will finish later through the paired [`Completion`]; for reads the value comes from it.
    Defer(Deferred),
}

/// A device on a bus. `offset` is relative to the start of the region `region`; `data.len()` is
/// always one of the region's implemented sizes.
pub trait BusDevice: Send {
    fn read(&mut self, region: RegionId, offset: u64, data: &mut [u8]) -> IoResult;
    fn write(&mut self, region: RegionId, offset: u64, data: &[u8]) -> IoResult;
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Default)]
struct DeferredState {
    done: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct DeferredInner {
    state: Mutex<DeferredState>,
    cv: Condvar,
}

/// The waiting side of a deferred access (held by the backend).
#[derive(Debug)]
pub struct Deferred(Arc<DeferredInner>);

/// The completing side of a deferred access (held by the device or its worker).
#[derive(Debug)]
pub struct Completion(Arc<DeferredInner>);

/// A new deferred access: give the [`Completion`] to whoever finishes the work and return
/// `IoResult::Defer(deferred)`.
pub fn deferred() -> (Deferred, Completion) {
    let inner = Arc::new(DeferredInner::default());
    (Deferred(inner.clone()), Completion(inner))
}

impl Completion {
    /// Finishes the access; `data` is the read value (ignored for writes).
    pub fn complete(self, data: &[u8]) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.done = Some(data.to_vec());
        self.0.cv.notify_all();
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // A completion dropped without completing (device reset, worker died) must not hang the
        // vCPU: finish as a failed read (all-ones).
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.done.is_none() {
            st.done = Some(vec![0xff; 8]);
            self.0.cv.notify_all();
        }
    }
}

impl Deferred {
    /// Blocks until completed; returns the read data.
    pub fn wait(self) -> Vec<u8> {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = st.done.take() {
                return d;
            }
            st = self.0.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
    /// Non-blocking check.
    pub fn try_take(&self) -> Option<Vec<u8>> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner()).done.take()
    }
}

/// The bus's answer to an access.
#[derive(Debug)]
pub enum Outcome {
    Done,
    /// Only returned when the access mapped to exactly one handler call that deferred. For reads,
    /// the backend copies the completion data (truncated to the access size) into its buffer.
    Pending(Deferred),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{bus}: region {base:#x}+{len:#x} overlaps an existing region at {other:#x}")]
    Overlap { bus: &'static str, base: u64, len: u64, other: u64 },
    #[error("{bus}: empty or wrapping region {base:#x}+{len:#x}")]
    BadRange { bus: &'static str, base: u64, len: u64 },
}

#[derive(Clone)]
struct Region {
    len: u64,
    rules: AccessRules,
    dev: SharedDevice,
    id: RegionId,
}

/// Told about every region added to or removed from a bus (the Xen backend forwards this to
/// `map_io_range_to_ioreq_server`, because Xen only sends us accesses to ranges we claimed).
pub trait BusListener: Send + Sync {
    fn region_added(&self, base: u64, len: u64);
    fn region_removed(&self, base: u64, len: u64);
}

/// One address space (port I/O or MMIO).
pub struct Bus {
    name: &'static str,
    regions: RwLock<BTreeMap<u64, Region>>,
    listener: RwLock<Option<Arc<dyn BusListener>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.regions.read().unwrap_or_else(|p| p.into_inner());
        let v: Vec<_> = r.iter().map(|(b, r)| (*b, r.len)).collect();
        write!(f, "Bus({}, {:x?})", self.name, v)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Bus { name, regions: RwLock::new(BTreeMap::new()), listener: RwLock::new(None) }
    }

    /// Installs the listener and replays the regions that exist already (as additions).
    pub fn set_listener(&self, l: Arc<dyn BusListener>) {
        let existing = self.regions();
        *self.listener.write().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
        for (base, len) in existing {
            l.region_added(base, len);
        }
    }

    fn listener(&self) -> Option<Arc<dyn BusListener>> {
        self.listener.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every region as (base, len), in address order.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let map = self.regions.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(b, r)| (*b, r.len)).collect()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Adds a region. Regions never overlap.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        rules: AccessRules,
        dev: SharedDevice,
        id: RegionId,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange { bus: self.name, base, len });
        };
        let mut map = self.regions.write().unwrap_or_else(|p| p.into_inner());
        if let Some((&b, r)) = map.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { bus: self.name, base, len, other: b });
            }
        }
        map.insert(base, Region { len, rules, dev, id });
        drop(map);
        if let Some(l) = self.listener() {
            l.region_added(base, len);
        }
        Ok(())
    }

    /// Removes the region starting at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let removed = self.regions.write().unwrap_or_else(|p| p.into_inner()).remove(&base);
        match removed {
            Some(r) => {
                if let Some(l) = self.listener() {
                    l.region_removed(base, r.len);
                }
                true
            }
            None => false,
        }
    }

    /// Whether some region covers `addr`.
    pub fn is_claimed(&self, addr: u64) -> bool {
        self.lookup(addr).is_some()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, Region)> {
        let map = self.regions.read().unwrap_or_else(|p| p.into_inner());
        let (&b, r) = map.range(..=addr).next_back()?;
        if addr - b < r.len {
            Some((b, r.clone()))
        } else {
            None
        }
    }

    /// Guest read of `data.len()` bytes at `addr`. On `Outcome::Done`, `data` holds the value.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Outcome {
        self.access(Dir::Read, addr, data, true)
    }

    /// Guest write of `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Outcome {
        if data.is_empty() || data.len() > 8 {
            warn_limited!(
                format!("{}-size-{}", self.name, data.len()),
                "{}: write of size {} at {addr:#x} rejected",
                self.name,
                data.len()
            );
            return Outcome::Done;
        }
        let mut buf = [0u8; 8];
        buf[..data.len()].copy_from_slice(data);
        self.access(Dir::Write, addr, &mut buf[..data.len()], true)
    }

    /// Read that waits for deferred completion; convenience for tests and simple backends.
    pub fn read_sync(&self, addr: u64, data: &mut [u8]) {
        if let Outcome::Pending(d) = self.read(addr, data) {
            let v = d.wait();
            let n = data.len().min(v.len());
            data[..n].copy_from_slice(&v[..n]);
        }
    }

    /// Write that waits for deferred completion.
    pub fn write_sync(&self, addr: u64, data: &[u8]) {
        if let Outcome::Pending(d) = self.write(addr, data) {
            d.wait();
        }
    }

    /// `check_valid` is false for the pieces of an access that straddles region boundaries: the
    /// rules judge whole accesses, and each piece is delivered with the implemented sizes.
    fn access(&self, dir: Dir, addr: u64, data: &mut [u8], check_valid: bool) -> Outcome {
        let size = data.len();
        if size == 0 || size > 8 {
            warn_limited!(
                format!("{}-size-{size}", self.name),
                "{}: access of size {size} at {addr:#x} rejected",
                self.name
            );
            self.reject(dir, data);
            return Outcome::Done;
        }
        let Some((base, region)) = self.lookup(addr) else {
            warn_limited!(
                format!("{}-unclaimed-{addr:x}", self.name),
                "{}: unclaimed {} of size {size} at {addr:#x}",
                self.name,
                if dir == Dir::Read { "read" } else { "write" }
            );
            self.reject(dir, data);
            return Outcome::Done;
        };
        // `base + len` cannot overflow: insert() refused wrapping regions.
        let end = base + region.len;
        let in_region = (end - addr).min(size as u64) as usize;
        if in_region < size {
            // Straddles the region end: hardware routes each part to whoever decodes it. This
            // region gets its part (each byte exactly once), the rest is a new access.
            self.dispatch(&region, base, dir, addr, &mut data[..in_region]);
            match addr.checked_add(in_region as u64) {
                Some(next) => {
                    let out = self.access(dir, next, &mut data[in_region..], false);
                    Self::finish_sync(out, dir, &mut data[in_region..]);
                }
                None => self.reject(dir, &mut data[in_region..]),
            }
            return Outcome::Done;
        }
        let rules = region.rules;
        if check_valid && !rules.is_valid(addr, size) {
            warn_limited!(
                format!("{}-invalid-{addr:x}-{size}", self.name),
                "{}: {}-byte {} at {addr:#x} violates the region's access rules {:?}; rejected",
                self.name,
                size,
                if dir == Dir::Read { "read" } else { "write" },
                rules
            );
            self.reject(dir, data);
            return Outcome::Done;
        }
        // Fast path: exactly one implemented access.
        if size >= rules.impl_min as usize && size <= rules.impl_max as usize && addr % size as u64 == 0 {
            return self.call(&region, dir, addr - base, data);
        }
        self.dispatch(&region, base, dir, addr, data);
        Outcome::Done
    }

    /// Delivers `data` (inside one region) as implemented-size pieces, ascending, waiting for any
    /// deferred piece: split when wider than implemented, widen when narrower.
    fn dispatch(&self, region: &Region, base: u64, dir: Dir, addr: u64, data: &mut [u8]) {
        let rules = region.rules;
        let size = data.len();
        let end = base + region.len;
        let mut pos = 0usize;
        while pos < size {
            let a = addr + pos as u64;
            let rem = size - pos;
            let mut chunk = 0usize;
            let mut s = rules.impl_max as usize;
            while s >= rules.impl_min as usize && s >= 1 {
                if s <= rem && a % s as u64 == 0 {
                    chunk = s;
                    break;
                }
                s /= 2;
            }
            if chunk > 0 {
                let out = self.call(region, dir, a - base, &mut data[pos..pos + chunk]);
                Self::finish_sync(out, dir, &mut data[pos..pos + chunk]);
                pos += chunk;
                continue;
            }
            // Widen to impl_min around `a`.
            let w = rules.impl_min as usize;
            let wa = a & !(w as u64 - 1);
            if wa < base || wa.checked_add(w as u64).is_none_or(|e| e > end) {
                self.reject(dir, &mut data[pos..]);
                return;
            }
            let skip = (a - wa) as usize;
            let n = (w - skip).min(rem);
            let mut tmp = [0u8; 8];
            if dir == Dir::Write {
                tmp[skip..skip + n].copy_from_slice(&data[pos..pos + n]);
            }
            let out = self.call(region, dir, wa - base, &mut tmp[..w]);
            Self::finish_sync(out, dir, &mut tmp[..w]);
            if dir == Dir::Read {
                data[pos..pos + n].copy_from_slice(&tmp[skip..skip + n]);
            }
            pos += n;
        }
    }

    fn finish_sync(out: Outcome, dir: Dir, data: &mut [u8]) {
        if let Outcome::Pending(d) = out {
            let v = d.wait();
            if dir == Dir::Read {
                let n = data.len().min(v.len());
                data[..n].copy_from_slice(&v[..n]);
            }
        }
    }

    fn call(&self, region: &Region, dir: Dir, offset: u64, data: &mut [u8]) -> Outcome {
        let mut dev = region.dev.lock().unwrap_or_else(|p| p.into_inner());
        let r = match dir {
            Dir::Read => dev.read(region.id, offset, data),
            Dir::Write => dev.write(region.id, offset, data),
        };
        match r {
            IoResult::Done => Outcome::Done,
            IoResult::Defer(d) => Outcome::Pending(d),
        }
    }

    fn reject(&self, dir: Dir, data: &mut [u8]) {
        if dir == Dir::Read {
            data.fill(0xff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs every call it receives; reads return a byte pattern derived from the offset.
    struct Probe {
        calls: Vec<(char, u64, Vec<u8>)>,
        mem: Vec<u8>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.mem[offset as usize + i];
            }
            self.calls.push(('r', offset, data.to_vec()));
            IoResult::Done
        }
        fn write(&mut self, _r: RegionId, offset: u64, data: &[u8]) -> IoResult {
            for (i, b) in data.iter().enumerate() {
                self.mem[offset as usize + i] = *b;
            }
            self.calls.push(('w', offset, data.to_vec()));
            IoResult::Done
        }
    }

    fn setup(rules: AccessRules) -> (Bus, Arc<Mutex<Probe>>) {
        let bus = Bus::new("test");
        let p = Arc::new(Mutex::new(Probe { calls: vec![], mem: vec![0; 64] }));
        for i in 0..64 {
            p.lock().unwrap().mem[i] = i as u8 + 0x10;
        }
        bus.insert(0x100, 32, rules, p.clone(), 0).unwrap();
        (bus, p)
    }

    #[derive(Default)]
    struct Listen(Mutex<Vec<(bool, u64, u64)>>);
    impl BusListener for Listen {
        fn region_added(&self, base: u64, len: u64) {
            self.0.lock().unwrap().push((true, base, len));
        }
        fn region_removed(&self, base: u64, len: u64) {
            self.0.lock().unwrap().push((false, base, len));
        }
    }

    #[test]
    fn listener_sees_existing_added_and_removed_regions() {
        let (bus, p) = setup(AccessRules::BYTES);
        let l = Arc::new(Listen::default());
        bus.set_listener(l.clone());
        bus.insert(0x200, 8, AccessRules::BYTES, p.clone(), 1).unwrap();
        // A refused insert is not reported.
        assert!(bus.insert(0x204, 8, AccessRules::BYTES, p, 1).is_err());
        assert!(bus.remove(0x100));
        assert!(!bus.remove(0x100));
        assert_eq!(*l.0.lock().unwrap(), vec![(true, 0x100, 32), (true, 0x200, 8), (false, 0x100, 32)]);
        assert_eq!(bus.regions(), vec![(0x200, 8)]);
    }

    #[test]
    fn seed001_valid_1_to_4_impl_1_splits_dword_into_ascending_bytes() {
        let (bus, p) = setup(AccessRules::BYTES);
        bus.write_sync(0x100, &0x1122_3344u32.to_le_bytes());
        let calls = p.lock().unwrap().calls.clone();
        assert_eq!(
            calls,
            vec![('w', 0, vec![0x44]), ('w', 1, vec![0x33]), ('w', 2, vec![0x22]), ('w', 3, vec![0x11])]
        );
        // And a DWORD read merges four byte reads little-endian: not 0, not all-ones.
        let mut d = [0u8; 4];
        bus.read_sync(0x100, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1122_3344);
        assert_eq!(p.lock().unwrap().calls.len(), 8);
    }

    #[test]
    fn rejects_invalid_size_reads_all_ones_and_drops_writes() {
        let (bus, p) = setup(AccessRules::new(2, 2, 2, 2));
        let mut d = [0u8; 1];
        bus.read_sync(0x100, &mut d);
        assert_eq!(d, [0xff]);
        bus.write_sync(0x100, &[0x55]);
        let mut q = [0u8; 4];
        bus.read_sync(0x100, &mut q);
        assert_eq!(q, [0xff; 4]);
        assert!(p.lock().unwrap().calls.is_empty());
    }

    #[test]
    fn rejects_unaligned_unless_allowed() {
        let (bus, p) = setup(AccessRules::DWORD_ANY);
        let mut d = [0u8; 2];
        bus.read_sync(0x101, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert!(p.lock().unwrap().calls.is_empty());
        let (bus, p) = setup(AccessRules::new(1, 4, 1, 4).allow_unaligned());
        bus.read_sync(0x101, &mut d);
        assert_eq!(d, [0x11, 0x12]);
        // Unaligned 2-byte at offset 1 is delivered as two aligned 1-byte pieces.
        assert_eq!(p.lock().unwrap().calls.len(), 2);
    }

    #[test]
    fn splits_qword_into_dwords_and_merges() {
        let (bus, p) = setup(AccessRules::new(1, 8, 1, 4));
        let mut d = [0u8; 8];
        bus.read_sync(0x108, &mut d);
        assert_eq!(d, [0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f]);
        let calls = p.lock().unwrap().calls.clone();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].1, calls[1].1), (8, 12));
    }

    #[test]
    fn widens_narrow_access_to_impl_min() {
        let (bus, p) = setup(AccessRules::new(1, 4, 4, 4));
        let mut d = [0u8; 1];
        bus.read_sync(0x106, &mut d);
        assert_eq!(d, [0x16]);
        bus.write_sync(0x105, &[0xAA]);
        let calls = p.lock().unwrap().calls.clone();
        assert_eq!(calls[0], ('r', 4, vec![0x14, 0x15, 0x16, 0x17]));
        assert_eq!(calls[1], ('w', 4, vec![0, 0xAA, 0, 0]));
    }

    #[test]
    fn unclaimed_reads_all_ones() {
        let (bus, _) = setup(AccessRules::DWORD_ANY);
        let mut d = [0u8; 4];
        bus.read_sync(0x2000, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut z = [0u8; 0];
        assert!(matches!(bus.read(0x100, &mut z), Outcome::Done));
        let mut big = [0u8; 16];
        bus.read_sync(0x100, &mut big);
        assert_eq!(big, [0xff; 16]);
    }

    #[test]
    fn overlap_is_refused() {
        let (bus, p) = setup(AccessRules::DWORD_ANY);
        assert!(bus.insert(0x11f, 1, AccessRules::DWORD_ANY, p.clone(), 1).is_err());
        assert!(bus.insert(0xf0, 0x11, AccessRules::DWORD_ANY, p.clone(), 1).is_err());
        assert!(bus.insert(0x120, 1, AccessRules::DWORD_ANY, p.clone(), 1).is_ok());
        assert!(bus.insert(0x10, 0, AccessRules::DWORD_ANY, p.clone(), 1).is_err());
        assert!(bus.remove(0x120));
        assert!(!bus.is_claimed(0x120));
    }

    #[test]
    fn straddling_access_goes_byte_by_byte() {
        let (bus, _) = setup(AccessRules::new(1, 4, 1, 4).allow_unaligned());
        let mut d = [0u8; 4];
        bus.read_sync(0x11e, &mut d);
        assert_eq!(d, [0x2e, 0x2f, 0xff, 0xff]);
    }

    #[test]
    fn fuzz_finding_nine_byte_write_is_rejected() {
        let (bus, p) = setup(AccessRules::new(1, 8, 1, 8));
        bus.write_sync(0x100, &[1; 9]);
        assert!(p.lock().unwrap().calls.is_empty());
    }

    #[test]
    fn fuzz_finding_straddle_delivers_each_byte_once() {
        let bus = Bus::new("t");
        let p = Arc::new(Mutex::new(Probe { calls: vec![], mem: (0..64).collect() }));
        bus.insert(0x100, 4, AccessRules::new(1, 4, 2, 4), p.clone(), 0).unwrap();
        let mut d = [0u8; 4];
        bus.read_sync(0x102, &mut d);
        assert_eq!(d, [2, 3, 0xff, 0xff]);
        bus.write_sync(0x102, &[0xa1, 0xa2, 0xa3, 0xa4]);
        let calls = p.lock().unwrap().calls.clone();
        assert_eq!(calls, vec![('r', 2, vec![2, 3]), ('w', 2, vec![0xa1, 0xa2])]);
    }

    #[test]
    fn fuzz_finding_top_of_address_space_does_not_overflow() {
        let bus = Bus::new("t");
        let p = Arc::new(Mutex::new(Probe { calls: vec![], mem: vec![0x5a; 64] }));
        bus.insert(u64::MAX - 6, 1, AccessRules::new(1, 8, 1, 8).allow_unaligned(), p.clone(), 0).unwrap();
        let mut d = [0u8; 8];
        bus.read_sync(u64::MAX - 6, &mut d);
        assert_eq!(d, [0x5a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let bus = Bus::new("t");
        bus.insert(u64::MAX - 7, 7, AccessRules::new(1, 8, 8, 8), p.clone(), 0).unwrap();
        let mut one = [0u8; 1];
        bus.read_sync(u64::MAX - 7, &mut one);
        assert_eq!(one, [0xff]);
    }

    struct Slow {
        pending: Option<Completion>,
    }
    impl BusDevice for Slow {
        fn read(&mut self, _r: RegionId, _o: u64, _d: &mut [u8]) -> IoResult {
            let (d, c) = deferred();
            self.pending = Some(c);
            IoResult::Defer(d)
        }
        fn write(&mut self, _r: RegionId, _o: u64, _d: &[u8]) -> IoResult {
            IoResult::Done
        }
    }

    #[test]
    fn deferred_completion_from_another_thread() {
        let bus = Bus::new("t");
        let s = Arc::new(Mutex::new(Slow { pending: None }));
        bus.insert(0, 4, AccessRules::DWORD_ANY, s.clone(), 0).unwrap();
        let mut d = [0u8; 4];
        let Outcome::Pending(p) = bus.read(0, &mut d) else { panic!("expected deferral") };
        assert!(p.try_take().is_none());
        let c = s.lock().unwrap().pending.take().unwrap();
        let t = std::thread::spawn(move || c.complete(&[1, 2, 3, 4]));
        assert_eq!(p.wait(), vec![1, 2, 3, 4]);
        t.join().unwrap();
        // A dropped completion finishes the access as all-ones instead of hanging.
        let Outcome::Pending(p) = bus.read(0, &mut d) else { panic!() };
        drop(s.lock().unwrap().pending.take());
        assert_eq!(&p.wait()[..4], &[0xff; 4]);
    }
}
