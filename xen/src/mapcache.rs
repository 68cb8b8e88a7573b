//! Guest RAM for DMA over foreign mappings (specs/xen-interfaces.md §4.6): a cache of 1 MiB
//! buckets of guest frames mapped on demand with [`ForeignMemory::map_guest`], as QEMU's
//! `xen-mapcache.c` does, exposed to the devices as [`GuestRam`].
//!
//! Differences from QEMU, on purpose:
//! - Every access copies under the cache lock and never hands out pointers, so there are no
//!   "locked" entries: INVALIDATE ([`MapCache::invalidate`]) drops every mapping at once.
//! - The cache is bounded by a bucket count ([`DEFAULT_MAX_BUCKETS`] = 1 GiB of address space).
//!   When a new bucket is needed and the cache is full, the least recently used bucket is
//!   unmapped. An access never evicts its own buckets unless it spans more buckets than the
//!   bound, in which case they are remapped as it goes.
//! - A bucket near the end of a RAM region maps only the frames inside the region.
//!
//! Whole-range checks: an access is first checked against the RAM layout
//! (`[0, ram_below_4g) ∪ [4 GiB, 4 GiB + ram_above_4g)`), then every bucket it touches is mapped
//! and its pages checked, and only then are bytes copied, so a refused access has no side effect
//! (neither guest memory nor the caller's buffer changes). The one exception: an access spanning
//! more buckets than the bound, whose buckets had to be remapped between the check and the copy
//! and now fail (the guest changed its p2m meanwhile); that is logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hvmdm_devices::mem::{GuestMemError, GuestRam};
use hvmdm_devices::warn_limited;

use crate::dm::{DeviceModelOps, Domid};
use crate::foreign::{ForeignMemory, GuestMapping};
use crate::sys::ioreq::XEN_PAGE_SIZE;

/// log2 of the bucket size (1 MiB, QEMU's `MCACHE_BUCKET_SHIFT` on 64-bit hosts).
pub const BUCKET_SHIFT: u32 = 20;
pub const BUCKET_SIZE: u64 = 1 << BUCKET_SHIFT;
/// Frames per bucket.
pub const BUCKET_PAGES: u64 = BUCKET_SIZE / XEN_PAGE_SIZE as u64;
/// Default bound on mapped buckets: 1 GiB of address space.
pub const DEFAULT_MAX_BUCKETS: usize = 1024;

const PAGE_SHIFT: u32 = 12;
const GIB4: u64 = 1 << 32;

/// Counters for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapCacheStats {
    /// Buckets currently mapped.
    pub buckets: usize,
    /// `map_guest` calls that succeeded since creation.
    pub maps: u64,
    /// `map_guest` calls that failed.
    pub map_failures: u64,
    /// Buckets unmapped to make room (LRU).
    pub evictions: u64,
    /// [`MapCache::invalidate`] calls.
    pub invalidations: u64,
}

struct Bucket<G> {
    map: G,
    /// Value of the access counter when last used (LRU).
    last_used: u64,
}

struct Inner<G> {
    buckets: HashMap<u64, Bucket<G>>,
    /// Access counter; every access stamps the buckets it uses.
    tick: u64,
    stats: MapCacheStats,
}

/// One piece of an access inside a single bucket.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bucket: u64,
    /// Offset in the bucket.
    offset: usize,
    /// Offset in the caller's buffer.
    buf_offset: usize,
    len: usize,
}

/// See the module documentation.
pub struct MapCache<D: DeviceModelOps, F: ForeignMemory> {
    dm: Arc<D>,
    fmem: Arc<F>,
    domid: Domid,
    /// RAM regions as half-open `[start, end)` guest-physical ranges, sorted, non-adjacent.
    regions: Vec<(u64, u64)>,
    max_buckets: usize,
    dirty_log: AtomicBool,
    inner: Mutex<Inner<F::Guest>>,
}

impl<D: DeviceModelOps, F: ForeignMemory> std::fmt::Debug for MapCache<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapCache")
            .field("domid", &self.domid)
            .field("regions", &self.regions)
            .field("max_buckets", &self.max_buckets)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<D: DeviceModelOps, F: ForeignMemory> MapCache<D, F> {
    /// Guest RAM of `domid`: `ram_below_4g` bytes from 0 (clamped to 4 GiB) and `ram_above_4g`
    /// bytes from 4 GiB (clamped to the 64-bit address space). Holes inside these ranges (the VGA
    /// hole 0xA0000-0xBFFFF, ballooned-out pages) are found when their frames fail to map.
    pub fn new(dm: Arc<D>, fmem: Arc<F>, domid: Domid, ram_below_4g: u64, ram_above_4g: u64) -> Self {
        let below = ram_below_4g.min(GIB4);
        let above_end = GIB4.saturating_add(ram_above_4g);
        let mut regions: Vec<(u64, u64)> = Vec::with_capacity(2);
        if below > 0 {
            regions.push((0, below));
        }
        if above_end > GIB4 {
            match regions.last_mut() {
                // RAM reaching exactly 4 GiB continues above: one region.
                Some(last) if last.1 == GIB4 => last.1 = above_end,
                _ => regions.push((GIB4, above_end)),
            }
        }
        MapCache {
            dm,
            fmem,
            domid,
            regions,
            max_buckets: DEFAULT_MAX_BUCKETS,
            dirty_log: AtomicBool::new(false),
            inner: Mutex::new(Inner { buckets: HashMap::new(), tick: 0, stats: MapCacheStats::default() }),
        }
    }

    /// Changes the bound on mapped buckets (at least 1). Excess buckets go at the next miss.
    pub fn with_max_buckets(mut self, max: usize) -> Self {
        self.max_buckets = max.max(1);
        self
    }

    pub fn domid(&self) -> Domid {
        self.domid
    }

    /// Drops every mapping (INVALIDATE ioreq: the guest changed its p2m). Accesses copy under the
    /// lock and keep no mapping, so all of them are idle here.
    pub fn invalidate(&self) {
        let mut inner = self.lock();
        inner.buckets.clear();
        inner.stats.invalidations += 1;
    }

    /// While on, every successful write reports the frames it touched with
    /// `modified_memory` (global dirty logging for live migration).
    pub fn set_dirty_log(&self, on: bool) {
        self.dirty_log.store(on, Ordering::Relaxed);
    }

    pub fn dirty_log(&self) -> bool {
        self.dirty_log.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> MapCacheStats {
        let inner = self.lock();
        MapCacheStats { buckets: inner.buckets.len(), ..inner.stats }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<F::Guest>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The region holding all of `gpa..gpa+len` (len > 0), if any.
    fn region_of(&self, gpa: u64, len: usize) -> Option<(u64, u64)> {
        let end = gpa.checked_add(u64::try_from(len).ok()?)?;
        self.regions.iter().copied().find(|&(s, e)| gpa >= s && end <= e)
    }

    /// Splits `gpa..gpa+len` (validated to lie in one region) at bucket boundaries.
    fn chunks(gpa: u64, len: usize) -> impl Iterator<Item = Chunk> {
        let mut pos = 0usize;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            // No overflow: the caller checked gpa + len fits in u64.
            let addr = gpa + pos as u64;
            let bucket = addr >> BUCKET_SHIFT;
            let offset = (addr & (BUCKET_SIZE - 1)) as usize;
            let n = (len - pos).min(BUCKET_SIZE as usize - offset);
            let c = Chunk { bucket, offset, buf_offset: pos, len: n };
            pos += n;
            Some(c)
        })
    }

    /// Returns bucket `idx`, mapping it if needed (evicting the LRU bucket when full), stamped
    /// with the current tick. `region_end` limits the frames mapped. None if mapping failed.
    fn bucket<'a>(&self, inner: &'a mut Inner<F::Guest>, idx: u64, region_end: u64) -> Option<&'a F::Guest> {
        let tick = inner.tick;
        if !inner.buckets.contains_key(&idx) {
            let first_pfn = idx << (BUCKET_SHIFT - PAGE_SHIFT);
            let bucket_end = (idx + 1).saturating_mul(BUCKET_SIZE);
            let end_pfn = bucket_end.min(region_end).div_ceil(XEN_PAGE_SIZE as u64);
            let pfns: Vec<u64> = (first_pfn..end_pfn.max(first_pfn + 1)).collect();
            debug_assert!(pfns.len() as u64 <= BUCKET_PAGES);
            let map = match self.fmem.map_guest(self.domid, &pfns, true) {
                Ok(m) => m,
                Err(e) => {
                    inner.stats.map_failures += 1;
                    warn_limited!(
                        "mapcache-map",
                        "map cache: mapping guest frames {first_pfn:#x}+{} of domain {} failed: {e}",
                        pfns.len(),
                        self.domid
                    );
                    return None;
                }
            };
            while inner.buckets.len() >= self.max_buckets {
                let Some(lru) = inner.buckets.iter().min_by_key(|(_, b)| b.last_used).map(|(&k, _)| k) else {
                    break;
                };
                inner.buckets.remove(&lru);
                inner.stats.evictions += 1;
            }
            inner.stats.maps += 1;
            inner.buckets.insert(idx, Bucket { map, last_used: tick });
        }
        let b = inner.buckets.get_mut(&idx)?;
        b.last_used = tick;
        Some(&b.map)
    }

    /// Checks the whole access, then runs `copy` on each chunk. Returns false (nothing copied,
    /// except in the over-bound remap case described in the module docs) if any byte is not
    /// accessible guest RAM.
    fn access(
        &self,
        gpa: u64,
        len: usize,
        what: &'static str,
        mut copy: impl FnMut(&F::Guest, Chunk) -> bool,
    ) -> Result<(), GuestMemError> {
        let err = GuestMemError::OutOfRange { gpa, len };
        if len == 0 {
            return Ok(());
        }
        let Some((_, region_end)) = self.region_of(gpa, len) else {
            warn_limited!(
                format!("mapcache-range-{what}"),
                "map cache: guest {what} at {gpa:#x}+{len:#x} is outside guest RAM, refused"
            );
            return Err(err);
        };
        let mut inner = self.lock();
        inner.tick += 1;
        for c in Self::chunks(gpa, len) {
            let ok =
                self.bucket(&mut inner, c.bucket, region_end).is_some_and(|m| m.range_ok(c.offset, c.len));
            if !ok {
                warn_limited!(
                    format!("mapcache-hole-{what}"),
                    "map cache: guest {what} at {gpa:#x}+{len:#x} touches frames that are not mapped \
                     (hole or ballooned out), refused"
                );
                return Err(err);
            }
        }
        for c in Self::chunks(gpa, len) {
            let ok = self.bucket(&mut inner, c.bucket, region_end).is_some_and(|m| copy(m, c));
            if !ok {
                // Only reachable when the access spans more buckets than the bound and a bucket
                // remapped differently between the check and the copy.
                warn_limited!(
                    "mapcache-partial",
                    "map cache: guest {what} at {gpa:#x}+{len:#x} failed part way (guest memory \
                     changed during a very large access)"
                );
                return Err(err);
            }
        }
        Ok(())
    }

    /// Reports `gpa..gpa+len` (len > 0, inside RAM) as modified.
    fn report_dirty(&self, gpa: u64, len: usize) {
        let first = gpa >> PAGE_SHIFT;
        let last = (gpa + (len as u64 - 1)) >> PAGE_SHIFT;
        let mut pfn = first;
        while pfn <= last {
            let nr = u32::try_from(last - pfn + 1).unwrap_or(u32::MAX);
            if let Err(e) = self.dm.modified_memory(self.domid, pfn, nr) {
                warn_limited!(
                    "mapcache-modified-memory",
                    "map cache: modified_memory({pfn:#x}, {nr}) for domain {} failed: {e}",
                    self.domid
                );
            }
            pfn += u64::from(nr);
        }
    }
}

impl<D, F> GuestRam for MapCache<D, F>
where
    D: DeviceModelOps + Send + Sync,
    F: ForeignMemory + Send + Sync,
    F::Guest: Send,
{
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len();
        self.access(gpa, len, "read", |m, c| {
            m.read(c.offset, &mut buf[c.buf_offset..c.buf_offset + c.len]).is_ok()
        })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        self.access(gpa, buf.len(), "write", |m, c| {
            m.write(c.offset, &buf[c.buf_offset..c.buf_offset + c.len]).is_ok()
        })?;
        if !buf.is_empty() && self.dirty_log() {
            self.report_dirty(gpa, buf.len());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeCall, FakeXen};

    const MIB: u64 = 1 << 20;

    fn cache(fake: &Arc<FakeXen>, below: u64, above: u64) -> MapCache<FakeXen, FakeXen> {
        MapCache::new(fake.clone(), fake.clone(), 7, below, above)
    }

    fn map_calls(fake: &FakeXen) -> Vec<Vec<u64>> {
        fake.calls()
            .into_iter()
            .filter_map(|c| match c {
                FakeCall::MapGuest { pfns, writable } => {
                    assert!(writable);
                    Some(pfns)
                }
                _ => None,
            })
            .collect()
    }

    fn is_send_sync<T: Send + Sync>() {}

    #[test]
    fn is_guest_ram() {
        is_send_sync::<MapCache<FakeXen, FakeXen>>();
        let fake = Arc::new(FakeXen::new(1, 1024));
        let _: Arc<dyn GuestRam> = Arc::new(cache(&fake, 4 * MIB, 0));
    }

    /// The real libxen types make a `GuestRam` too (compile-time check).
    #[cfg(feature = "xen-libs")]
    #[test]
    fn real_types_are_guest_ram() {
        fn is_guest_ram<T: GuestRam>() {}
        is_guest_ram::<MapCache<crate::dm::XenDeviceModel, crate::foreign::XenForeignMemory>>();
    }

    #[test]
    fn round_trip_across_bucket_boundary() {
        // 3 MiB of fake RAM, all below 4 GiB.
        let fake = Arc::new(FakeXen::new(1, 768));
        let mc = cache(&fake, 3 * MIB, 0);
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let gpa = MIB - 100;
        mc.write(gpa, &data).unwrap();
        assert_eq!(fake.ram(gpa as usize, data.len()), data);
        let mut back = vec![0u8; data.len()];
        mc.read(gpa, &mut back).unwrap();
        assert_eq!(back, data);
        // Two buckets, each mapped once with its 256 frames.
        let maps = map_calls(&fake);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0], (0..256).collect::<Vec<u64>>());
        assert_eq!(maps[1], (256..512).collect::<Vec<u64>>());
        let s = mc.stats();
        assert_eq!((s.buckets, s.maps), (2, 2));
        // A 2 MiB+ access over three buckets (one new).
        let big = vec![0xa5u8; 2 * MIB as usize + 10];
        mc.write(MIB / 2, &big).unwrap();
        assert_eq!(fake.ram(MIB as usize / 2, big.len()), big);
        assert_eq!(mc.stats().maps, 3);
        // Typed helpers go through read/write.
        mc.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(mc.read_u32(0x1000).unwrap(), 0xdead_beef);
    }

    #[test]
    fn last_bucket_maps_only_frames_inside_ram() {
        let fake = Arc::new(FakeXen::new(1, 512));
        // 1 MiB + 8 KiB + 1 byte: the second bucket maps 3 frames.
        let mc = cache(&fake, MIB + 2 * 4096 + 1, 0);
        mc.write(MIB + 2 * 4096, &[1]).unwrap();
        assert_eq!(map_calls(&fake), vec![vec![256, 257, 258]]);
        assert!(mc.write(MIB + 2 * 4096 + 1, &[1]).is_err());
    }

    #[test]
    fn above_4g() {
        // Fake RAM is flat from gpa 0, so frames above 4 GiB never map in the fake; what must
        // hold is that the right frames are asked for and that failures are refused cleanly.
        let fake = Arc::new(FakeXen::new(1, 256));
        let mc = cache(&fake, MIB, 2 * MIB);
        let mut b = [0u8; 4];
        let e = mc.read(GIB4 + MIB - 2, &mut b).unwrap_err();
        assert_eq!(e, GuestMemError::OutOfRange { gpa: GIB4 + MIB - 2, len: 4 });
        let maps = map_calls(&fake);
        assert_eq!(maps.len(), 1, "refused at the first bucket without mapping the second");
        assert_eq!(maps[0].first(), Some(&(GIB4 >> 12)));
        assert_eq!(maps[0].len(), 256);
        // Beyond the region: refused without any map call.
        fake.clear_calls();
        assert!(mc.read(GIB4 + 2 * MIB - 2, &mut b).is_err());
        assert!(mc.read(GIB4 - 2, &mut b).is_err());
        assert!(map_calls(&fake).is_empty());
    }

    #[test]
    fn above_4g_round_trip() {
        // RAM up to exactly 4 GiB merges with the region above; use a region below 4G
        // ending at 4 GiB to exercise the merge, with fake RAM only at the bottom.
        let fake = Arc::new(FakeXen::new(1, 256));
        let mc = cache(&fake, 8 * GIB4, 16 * MIB);
        assert_eq!(mc.regions, vec![(0, GIB4 + 16 * MIB)]);
        // A range crossing 4 GiB is inside the merged region (the fake refuses the frames).
        assert!(mc.read(GIB4 - 2, &mut [0u8; 4]).is_err());
        mc.write(10, &[9, 8]).unwrap();
        assert_eq!(fake.ram(10, 2), vec![9, 8]);
    }

    #[test]
    fn holes_and_bad_ranges_refused_without_side_effects() {
        // Fake RAM: 1 MiB + 16 KiB; layout claims 2 MiB, so frames 260.. fail to map (a hole).
        let fake = Arc::new(FakeXen::new(1, 260));
        let mc = cache(&fake, 2 * MIB, 0);
        let gpa = MIB + 4 * 4096 - 8;
        // A write straddling into the hole must not change the mapped part.
        mc.write(MIB - 8, &[0x11; 8]).unwrap();
        let before = fake.ram(gpa as usize, 8);
        let e = mc.write(gpa, &[0xff; 16]).unwrap_err();
        assert_eq!(e, GuestMemError::OutOfRange { gpa, len: 16 });
        assert_eq!(fake.ram(gpa as usize, 8), before);
        // Spanning two buckets where the second is the hole: the first bucket untouched.
        assert!(mc.write(MIB - 8, &vec![0x22; MIB as usize]).is_err());
        assert_eq!(fake.ram(MIB as usize - 8, 8), vec![0x11; 8]);
        // A failed read leaves the caller's buffer alone.
        let mut buf = [0x5a; 16];
        assert!(mc.read(gpa, &mut buf).is_err());
        assert_eq!(buf, [0x5a; 16]);
        // Outside the layout, wrapping, huge.
        assert!(mc.read(2 * MIB, &mut [0u8; 1]).is_err());
        assert!(mc.read(u64::MAX, &mut [0u8; 2]).is_err());
        assert!(mc.read(u64::MAX - 1, &mut [0u8; 1]).is_err());
        assert!(mc.write(2 * MIB - 1, &[0, 0]).is_err());
        // Zero-length accesses succeed anywhere and map nothing.
        fake.clear_calls();
        mc.read(u64::MAX, &mut []).unwrap();
        mc.write(0x1234_5678_9000, &[]).unwrap();
        assert!(map_calls(&fake).is_empty());
    }

    #[test]
    fn map_failure_is_out_of_range_and_retried() {
        let fake = Arc::new(FakeXen::new(1, 256));
        let mc = cache(&fake, MIB, 0);
        fake.fail_next("map_guest", libc::ENOMEM);
        assert!(mc.read(0, &mut [0u8; 4]).is_err());
        assert_eq!(mc.stats().map_failures, 1);
        assert_eq!(mc.stats().buckets, 0);
        mc.read(0, &mut [0u8; 4]).unwrap();
        assert_eq!(mc.stats().buckets, 1);
    }

    #[test]
    fn invalidate_drops_and_remaps() {
        let fake = Arc::new(FakeXen::new(1, 512));
        let mc = cache(&fake, 2 * MIB, 0);
        mc.write(0, &[1]).unwrap();
        mc.write(MIB, &[2]).unwrap();
        mc.write(5, &[3]).unwrap();
        assert_eq!(mc.stats().maps, 2);
        fake.clear_calls();
        mc.invalidate();
        let unmaps = fake.calls().iter().filter(|c| **c == FakeCall::UnmapGuest).count();
        assert_eq!(unmaps, 2);
        assert_eq!(mc.stats().buckets, 0);
        assert_eq!(mc.stats().invalidations, 1);
        let mut b = [0u8; 1];
        mc.read(MIB, &mut b).unwrap();
        assert_eq!(b, [2]);
        assert_eq!(map_calls(&fake).len(), 1);
    }

    #[test]
    fn dirty_log_reports_written_frames() {
        let fake = Arc::new(FakeXen::new(1, 512));
        let mc = cache(&fake, 2 * MIB, 0);
        mc.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        let dirty = |f: &FakeXen| {
            f.calls()
                .into_iter()
                .filter_map(|c| match c {
                    FakeCall::ModifiedMemory { first_pfn, nr } => Some((first_pfn, nr)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert!(dirty(&fake).is_empty(), "off by default");
        mc.set_dirty_log(true);
        assert!(mc.dirty_log());
        mc.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        mc.write(MIB - 1, &[0; 4097]).unwrap();
        mc.read(0, &mut [0u8; 8]).unwrap();
        // A refused write reports nothing.
        assert!(mc.write(2 * MIB - 1, &[0, 0]).is_err());
        assert_eq!(dirty(&fake), vec![(1, 2), (255, 2)]);
        // Errors are logged, not returned.
        fake.fail_next("modified_memory", libc::EPERM);
        mc.write(0, &[1]).unwrap();
        mc.set_dirty_log(false);
        fake.clear_calls();
        mc.write(0, &[1]).unwrap();
        assert!(dirty(&fake).is_empty());
    }

    #[test]
    fn cache_is_bounded_lru() {
        let fake = Arc::new(FakeXen::new(1, 8 * 256));
        let mc = cache(&fake, 8 * MIB, 0).with_max_buckets(3);
        for i in 0..3 {
            mc.write(i * MIB, &[i as u8]).unwrap();
        }
        // Touch bucket 0 so bucket 1 is the LRU.
        mc.read(0, &mut [0u8]).unwrap();
        mc.write(3 * MIB, &[3]).unwrap();
        let s = mc.stats();
        assert_eq!((s.buckets, s.maps, s.evictions), (3, 4, 1));
        fake.clear_calls();
        // Bucket 0 is still mapped, bucket 1 was evicted.
        mc.read(0, &mut [0u8]).unwrap();
        assert!(map_calls(&fake).is_empty());
        let mut b = [0u8];
        mc.read(MIB, &mut b).unwrap();
        assert_eq!(b, [1]);
        assert_eq!(map_calls(&fake), vec![(256..512).collect::<Vec<u64>>()]);
        // An access over more buckets than the bound still works (remapping as it goes).
        let big: Vec<u8> = (0..5 * MIB as usize).map(|i| (i % 251) as u8).collect();
        mc.write(MIB / 2, &big).unwrap();
        let mut back = vec![0u8; big.len()];
        mc.read(MIB / 2, &mut back).unwrap();
        assert_eq!(back, big);
        assert!(mc.stats().buckets <= 3);
    }
}
