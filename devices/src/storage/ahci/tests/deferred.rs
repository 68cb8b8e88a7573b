//! Deferred completion: image I/O runs on the port's worker while the HBA keeps answering.

use std::sync::Condvar;
use std::time::{Duration, Instant};

use super::cd::{cd_image, cd_pattern, read10};
use super::*;
use crate::storage::aio::IoEngine;
use crate::storage::atapi::{CdConfig, CD_BLOCK_SIZE};
use crate::storage::image::BlockError;

/// An image whose requests wait at a gate the test opens; it remembers which threads came.
struct Gate {
    img: MemImage,
    /// (open, names of the threads that reached the image in order, fail with EIO)
    st: Mutex<(bool, Vec<String>, bool)>,
    cv: Condvar,
}

impl Gate {
    fn new(bytes: Vec<u8>, read_only: bool) -> Arc<Self> {
        Arc::new(Gate { img: MemImage::new(bytes, read_only), st: Mutex::default(), cv: Condvar::new() })
    }
    fn pass(&self) -> Result<(), BlockError> {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        let mut st = self.st.lock().unwrap();
        st.1.push(name);
        self.cv.notify_all();
        while !st.0 {
            st = self.cv.wait(st).unwrap();
        }
        match st.2 {
            true => Err(BlockError::Io { offset: 0, len: 0, source: std::io::Error::other("EIO") }),
            false => Ok(()),
        }
    }
    fn break_it(&self) {
        self.st.lock().unwrap().2 = true;
    }
    /// The threads of the first `n` requests, once that many arrived (at most 10 s).
    fn arrived(&self, n: usize) -> Vec<String> {
        let until = Instant::now() + Duration::from_secs(10);
        let mut st = self.st.lock().unwrap();
        while st.1.len() < n {
            let left = until.checked_duration_since(Instant::now()).expect("the job never reached the image");
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
        st.1[..n].to_vec()
    }
    fn open(&self, open: bool) {
        self.st.lock().unwrap().0 = open;
        self.cv.notify_all();
    }
}

impl BlockBackend for Gate {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.pass()?;
        self.img.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.pass()?;
        self.img.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.pass()?;
        self.img.flush()
    }
    fn len(&self) -> u64 {
        self.img.len()
    }
    fn is_read_only(&self) -> bool {
        self.img.is_read_only()
    }
}

/// Opens the gate when the test ends (also by a failed assertion), so the engines' joins
/// cannot hang. Bind it after the rig.
struct Release(Arc<Gate>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.open(true);
    }
}

/// Port 0: a gated disk (or CD-ROM drive), port 1: a plain disk; both started.
fn gated(cd: bool) -> (Rig, Arc<Gate>) {
    let g = if cd { Gate::new(cd_pattern(), true) } else { Gate::new(pattern(DISK_SECTORS * 512), false) };
    let dev: Arc<dyn BlockBackend> = g.clone();
    let mut r = Rig::with(|c, img| {
        if cd {
            c.attach_cdrom(0, Some(dev), CdConfig::default()).unwrap();
        } else {
            c.attach_disk(0, dev).unwrap();
        }
        c.attach_disk(1, img).unwrap();
    });
    r.start(0);
    r.start(1);
    r.sink.take();
    (r, g)
}

impl Rig {
    /// Port register write that waits for nothing.
    fn raw_pw(&self, port: u64, reg: u64, v: u32) {
        self.c().write(REGION_ABAR, 0x100 + port * 0x80 + reg, &v.to_le_bytes());
    }
    fn raw_pr(&self, port: u64, reg: u64) -> u32 {
        self.raw_r(0x100 + port * 0x80 + reg)
    }
    fn drain_port(&self, port: usize) {
        let e = self.c().engines[port].clone();
        e.drain();
    }
    /// Copies all of guest RAM from `other` (a restore finds the command lists in RAM).
    fn copy_ram(&self, other: &Rig) {
        self.mem.write(0, &other.guest(0, RAM)).unwrap();
    }
}

/// Port 1 runs a DMA read to completion (interrupt and all) while port 0 is stuck.
fn other_port_works(r: &Rig) {
    let buf = BUF + 0x40000;
    r.build_at(1, 0, h2d(ata::READ_DMA_EXT, 7, 1), &[(buf, 512, true)], 0);
    r.raw_pw(1, PX_CI, 1);
    r.drain_port(1);
    assert_eq!((r.raw_pr(1, PX_CI), r.raw_pr(1, PX_IS)), (0, pxis::DHRS | pxis::DPS));
    assert_eq!(r.guest(buf, 512), &pattern(DISK_SECTORS * 512)[7 * 512..8 * 512]);
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    r.raw_pw(1, PX_IS, u32::MAX);
    r.c().write(REGION_ABAR, HBA_IS, &u32::MAX.to_le_bytes());
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, false)]);
}

#[test]
fn dma_read_in_flight_leaves_the_hba_responsive() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    let prds = [(BUF, 0x10000, false), (BUF + 0x20000, 0x1000, true)];
    r.build(0, h2d(ata::READ_DMA_EXT, 3, 136), &prds, false);
    r.raw_pw(0, PX_CI, 1);
    assert_eq!(g.arrived(1), ["hvmdm-io-ahci0"], "the image is read on the port's worker");
    let t = Instant::now();
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_TFD), r.raw_pr(0, PX_IS)), (1, 0xd0, 0));
    assert!(r.sink.take().is_empty());
    assert!(r.c().io_busy());
    // A second command waits behind the busy slot.
    r.build(1, h2d(ata::READ_DMA_EXT, 0, 1), &[(BUF + 0x30000, 512, false)], false);
    r.raw_pw(0, PX_CI, 2);
    assert_eq!(r.raw_pr(0, PX_CI), 3);
    other_port_works(&r);
    assert!(t.elapsed() < Duration::from_secs(5));
    g.open(true);
    r.drain();
    assert!(!r.c().io_busy());
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (0, pxis::DHRS | pxis::DPS, 0x50));
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    assert_eq!((r.prdbc(0), r.prdbc(1)), (136 * 512, 512));
    let want = pattern(DISK_SECTORS * 512);
    assert_eq!(r.guest(BUF, 0x10000), &want[3 * 512..131 * 512]);
    assert_eq!(r.guest(BUF + 0x20000, 0x1000), &want[131 * 512..139 * 512]);
    assert_eq!(r.guest(BUF + 0x30000, 512), &want[..512]);
    assert_eq!(&r.fis(cmd::RX_RFIS, 4), &[0x34, 0x40, 0x50, 0]);
}

#[test]
fn ncq_tags_in_flight_keep_sact_and_complete_in_order() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    r.mem.write(BUF + 0x2000, &[0x5a; 1024]).unwrap();
    r.build(0, ncq(false, 0, 10, 2), &[(BUF, 1024, false)], false);
    r.build(5, ncq(true, 5, 300, 2), &[(BUF + 0x2000, 1024, false)], true);
    r.raw_pw(0, PX_SACT, 0x21);
    r.raw_pw(0, PX_CI, 0x21);
    g.arrived(1);
    // Both accepted (PxCI clear), both outstanding (PxSACT), the port not busy.
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_SACT)), (0, 0x21));
    assert_eq!((r.raw_pr(0, PX_TFD) & 0x80, r.raw_pr(0, PX_IS)), (0, 0));
    assert_eq!(r.fis(cmd::RX_DSFIS, 5)[4], 5, "DMA Setup FIS of the last tag issued");
    other_port_works(&r);
    g.open(true);
    r.drain();
    assert_eq!((r.pr(0, PX_SACT), r.pr(0, PX_IS)), (0, pxis::SDBS));
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    let sdb = r.fis(cmd::RX_SDBFIS, 8);
    assert_eq!(u32::from_le_bytes([sdb[4], sdb[5], sdb[6], sdb[7]]), 1 << 5, "tag 5 completed last");
    assert_eq!(r.guest(BUF, 1024), &pattern(DISK_SECTORS * 512)[10 * 512..12 * 512]);
    assert_eq!(&g.img.contents()[300 * 512..302 * 512], &[0x5a; 1024][..]);
}

#[test]
fn atapi_reads_complete_deferred() {
    let (mut r, g) = gated(true);
    let _release = Release(g.clone());
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST | pxcmd::ATAPI);
    // DMA.
    r.packet(0, &read10(5, 2), true, &[(BUF, 4096, false)]);
    r.raw_pw(0, PX_CI, 1);
    assert_eq!(g.arrived(1), ["hvmdm-io-ahci0"]);
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_TFD), r.raw_pr(0, PX_IS)), (1, 0xd0, 0));
    other_port_works(&r);
    g.open(true);
    r.drain();
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (0, pxis::DHRS, 0x50));
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    assert_eq!(r.prdbc(0), 4096);
    assert_eq!(r.guest(BUF, 4096), &cd_pattern()[5 * CD_BLOCK_SIZE..7 * CD_BLOCK_SIZE]);
    // PIO: a PIO Setup FIS before the final D2H.
    g.open(false);
    r.pw(0, PX_IS, u32::MAX);
    r.packet(1, &read10(9, 1), false, &[(BUF + 0x8000, 2048, false)]);
    r.raw_pw(0, PX_CI, 2);
    g.arrived(2);
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_TFD)), (2, 0xd0));
    g.open(true);
    r.drain();
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (0, pxis::DHRS | pxis::PSS));
    assert_eq!(r.guest(BUF + 0x8000, 2048), &cd_pattern()[9 * CD_BLOCK_SIZE..10 * CD_BLOCK_SIZE]);
}

#[test]
fn stop_and_comreset_make_completions_stale() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    // PxCMD.ST cleared during a DMA write.
    r.mem.write(BUF, &[0x77; 512]).unwrap();
    r.build(0, h2d(ata::WRITE_DMA_EXT, 30, 1), &[(BUF, 512, true)], true);
    r.raw_pw(0, PX_CI, 1);
    g.arrived(1);
    r.raw_pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
    assert_eq!(r.raw_pr(0, PX_CI), 0);
    g.open(true);
    r.drain();
    // Nothing completed: no interrupt, no PRDBC, the device still reads busy (CLO or a
    // COMRESET recovers it, as on hardware). The host write itself finished.
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD), r.prdbc(0)), (0, 0xd0, 0xdead_beef));
    assert!(r.sink.take().is_empty());
    assert_eq!(&g.img.contents()[30 * 512..31 * 512], &[0x77; 512][..]);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::CLO);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    r.build(0, h2d(ata::READ_DMA_EXT, 30, 1), &[(BUF + 0x1000, 512, true)], false);
    r.issue(0);
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD)), (pxis::DHRS | pxis::DPS, 0x50));
    assert_eq!(r.guest(BUF + 0x1000, 512), vec![0x77; 512]);
    r.pw(0, PX_IS, u32::MAX);
    r.w(HBA_IS, u32::MAX);
    r.sink.take();
    // COMRESET during an NCQ read: the device forgets the command.
    g.open(false);
    r.build(2, ncq(false, 2, 40, 1), &[(BUF + 0x2000, 512, false)], false);
    r.raw_pw(0, PX_SACT, 4);
    r.raw_pw(0, PX_CI, 4);
    g.arrived(3);
    r.raw_pw(0, PX_SCTL, 0x301);
    assert_eq!((r.raw_pr(0, PX_SACT), r.raw_pr(0, PX_TFD)), (0, 0x7f));
    r.raw_pw(0, PX_SCTL, 0x300);
    assert_eq!((r.raw_pr(0, PX_TFD), r.raw_pr(0, PX_SIG)), (0x150, SIG_ATA));
    g.open(true);
    r.drain();
    assert_eq!((r.pr(0, PX_SACT), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (0, 0, 0x150));
    assert!(r.sink.take().is_empty());
    // The port works again.
    r.pw(0, PX_SACT, 4);
    r.pw(0, PX_CI, 4);
    assert_eq!((r.pr(0, PX_SACT), r.pr(0, PX_IS)), (0, pxis::SDBS));
    assert_eq!(r.guest(BUF + 0x2000, 512), &pattern(DISK_SECTORS * 512)[40 * 512..41 * 512]);
}

#[test]
fn hba_reset_during_a_job_makes_it_stale() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    r.build(0, ncq(false, 0, 1, 1), &[(BUF, 512, false)], false);
    r.raw_pw(0, PX_SACT, 1);
    r.raw_pw(0, PX_CI, 1);
    g.arrived(1);
    r.c().write(REGION_ABAR, HBA_GHC, &GHC_HR.to_le_bytes());
    assert_eq!((r.raw_pr(0, PX_SACT), r.raw_pr(0, PX_CMD)), (0, pxcmd::POD));
    assert!(!r.c().io_busy());
    g.open(true);
    r.drain();
    assert_eq!((r.pr(0, PX_IS), r.r(HBA_IS), r.pr(0, PX_CLB)), (0, 0, 0));
    assert!(r.sink.take().is_empty());
    assert_eq!(r.prdbc(0), 0xdead_beef);
    // Set up again, it works.
    r.start(0);
    r.build(0, h2d(ata::READ_DMA, 4, 1), &[(BUF, 512, false)], false);
    r.issue(0);
    assert_eq!(r.pr(0, PX_IS), pxis::DHRS);
    assert_eq!(r.guest(BUF, 512), &pattern(DISK_SECTORS * 512)[4 * 512..5 * 512]);
}

/// A save taken while jobs are in flight (the save cannot wait under the lock) records them;
/// the restored controller re-issues them and they complete there.
#[test]
fn snapshot_with_jobs_in_flight_reissues_them() {
    type Setup = fn(&Rig);
    type Check = fn(&mut Rig);
    let cases: [(&str, bool, Setup, Check); 4] = [
        (
            "dma read",
            false,
            |r| {
                r.build(0, h2d(ata::READ_DMA_EXT, 50, 2), &[(BUF, 1024, true)], false);
                r.raw_pw(0, PX_CI, 1);
            },
            |r| {
                assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (0, pxis::DHRS | pxis::DPS));
                assert_eq!(r.guest(BUF, 1024), &pattern(DISK_SECTORS * 512)[50 * 512..52 * 512]);
            },
        ),
        (
            "ncq write",
            false,
            |r| {
                r.mem.write(BUF + 0x2000, &[0x3c; 1024]).unwrap();
                r.build(3, ncq(true, 3, 70, 2), &[(BUF + 0x2000, 1024, false)], true);
                r.raw_pw(0, PX_SACT, 8);
                r.raw_pw(0, PX_CI, 8);
            },
            |r| {
                assert_eq!((r.pr(0, PX_SACT), r.pr(0, PX_IS)), (0, pxis::SDBS));
                assert_eq!(&r.img.contents()[70 * 512..72 * 512], &[0x3c; 1024][..]);
            },
        ),
        (
            "flush",
            false,
            |r| {
                r.build(0, h2d(ata::FLUSH_CACHE_EXT, 0, 0), &[], false);
                r.raw_pw(0, PX_CI, 1);
            },
            |r| assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (0, pxis::DHRS, 0x50)),
        ),
        (
            "atapi read",
            true,
            |r| {
                r.packet(0, &read10(3, 1), true, &[(BUF, 2048, false)]);
                r.raw_pw(0, PX_CI, 1);
            },
            |r| {
                assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (0, pxis::DHRS));
                assert_eq!(r.guest(BUF, 2048), &cd_pattern()[3 * CD_BLOCK_SIZE..4 * CD_BLOCK_SIZE]);
            },
        ),
    ];
    for (name, cd, setup, check) in cases {
        let (mut a, g) = gated(cd);
        let _release = Release(g.clone());
        setup(&a);
        g.arrived(1);
        let blob = payload(&*a.c());
        assert!(a.c().io_busy(), "{name}: still in flight after the save");
        let mut b = Rig::with(|c, img| {
            if cd {
                c.attach_cdrom(0, Some(cd_image()), CdConfig::default()).unwrap();
            } else {
                c.attach_disk(0, img.clone()).unwrap();
            }
            c.attach_disk(1, img).unwrap();
        });
        b.copy_ram(&a);
        assert_prefixes_fail(&*b.c(), &blob);
        load(&mut *b.c(), &blob).unwrap();
        b.drain();
        assert_eq!(
            b.sink.take(),
            vec![IrqEvent::Intx(3, 0, true)],
            "{name}: the re-issued command interrupts"
        );
        check(&mut b);
        // The source completes on its own once its image answers.
        g.open(true);
        a.drain();
        assert_ne!(a.pr(0, PX_IS), 0, "{name}: source completion");
    }
    // A command in flight that does not fit the device is refused.
    let (a, g) = gated(false);
    let _release = Release(g.clone());
    a.build(0, h2d(ata::READ_DMA_EXT, 50, 2), &[(BUF, 1024, true)], false);
    a.raw_pw(0, PX_CI, 1);
    g.arrived(1);
    let blob = payload(&*a.c());
    let small = Rig::with(|c, img| {
        c.attach_disk(0, Arc::new(MemImage::new(vec![0; 16 * 512], false))).unwrap();
        c.attach_disk(1, img).unwrap();
    });
    assert!(load(&mut *small.c(), &blob).is_err(), "transfer past the end of this disk");
}

#[test]
fn a_stuck_image_cannot_grow_the_queue() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    r.build(0, h2d(ata::READ_DMA_EXT, 0, 1), &[(BUF, 512, false)], false);
    // Each stop orphans the command in flight; the next start and issue queues another job.
    for i in 0..io::MAX_QUEUED_JOBS {
        r.raw_pw(0, PX_CI, 1);
        if i == 0 {
            g.arrived(1);
        }
        assert_eq!(r.raw_pr(0, PX_TFD), 0xd0, "command {i}");
        r.raw_pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
        r.raw_pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    }
    r.raw_pw(0, PX_CI, 1);
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_TFD)), (0, 0x451), "refused: ABRT");
    assert_eq!(r.raw_pr(0, PX_IS), pxis::TFES | pxis::DHRS);
    g.open(true);
    r.drain();
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
    r.pw(0, PX_IS, u32::MAX);
    r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    r.issue(0);
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD)), (pxis::DHRS, 0x50));
}

#[test]
fn manual_engines_hold_jobs_until_drained() {
    let mut r = Rig::new();
    r.start(0);
    let manual =
        || -> [Arc<IoEngine>; NUM_PORTS] { std::array::from_fn(|_| Arc::new(IoEngine::manual("m"))) };
    r.c().set_io_engines(manual()).unwrap();
    r.build(0, h2d(ata::READ_DMA_EXT, 6, 1), &[(BUF, 512, false)], false);
    r.raw_pw(0, PX_CI, 1);
    assert_eq!((r.raw_pr(0, PX_CI), r.raw_pr(0, PX_TFD)), (1, 0xd0));
    assert!(matches!(r.c().set_io_engines(manual()), Err(AhciError::Busy)));
    r.drain();
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS)), (0, pxis::DHRS));
    assert_eq!(r.guest(BUF, 512), &pattern(DISK_SECTORS * 512)[6 * 512..7 * 512]);
}

/// Host I/O errors inside jobs end as the ATA/ATAPI errors a drive reports, with the interrupt.
#[test]
fn host_errors_in_jobs_end_in_ata_errors() {
    let (mut r, g) = gated(false);
    let _release = Release(g.clone());
    g.open(true);
    g.break_it();
    let restart = |r: &mut Rig| {
        r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD);
        r.pw(0, PX_IS, u32::MAX);
        r.pw(0, PX_CMD, pxcmd::FRE | pxcmd::SUD | pxcmd::ST);
    };
    r.build(0, h2d(ata::READ_DMA_EXT, 0, 1), &[(BUF, 512, false)], false);
    r.issue(0);
    assert_eq!((r.pr(0, PX_CI), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (0, pxis::TFES | pxis::DHRS, 0x451));
    restart(&mut r);
    r.build(0, h2d(ata::FLUSH_CACHE, 0, 0), &[], false);
    r.issue(0);
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD)), (pxis::TFES | pxis::DHRS, 0x451));
    restart(&mut r);
    r.build(1, ncq(true, 1, 9, 1), &[(BUF, 512, false)], true);
    r.pw(0, PX_SACT, 2);
    r.pw(0, PX_CI, 2);
    assert_eq!((r.pr(0, PX_SACT), r.pr(0, PX_IS), r.pr(0, PX_TFD)), (2, pxis::TFES, 0x451));
    assert_eq!(&r.fis(cmd::RX_SDBFIS, 4), &[0xa1, 0x40, 0x51, 0x04]);
    assert_eq!(r.sink.take(), vec![IrqEvent::Intx(3, 0, true)]);
    // An ATAPI medium read: CHECK CONDITION, MEDIUM ERROR.
    let (mut r, g) = gated(true);
    let _release = Release(g.clone());
    g.open(true);
    g.break_it();
    r.packet(0, &read10(1, 1), true, &[(BUF, 2048, false)]);
    r.issue(0);
    assert_eq!((r.pr(0, PX_IS), r.pr(0, PX_TFD)), (pxis::TFES | pxis::DHRS, 0x3451));
    assert_eq!(r.c().cdrom(0).unwrap().sense().key, 3);
}
