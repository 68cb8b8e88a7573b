//! Shared harness for the hvmdm fuzz targets: a machine-like assembly of the chipset and fw_cfg
//! built from the devices crate's public API, a probe device that checks the bus contract, and
//! invariant checks. Every check panics with a precise message, which libFuzzer reports as a
//! crash together with the reproducing input.

use std::sync::{Arc, Mutex, OnceLock};

use hvmdm_devices::bus::{AccessRules, Bus, BusDevice, IoResult, RegionId};
use hvmdm_devices::fw_cfg::{self, keys, FileOpts, FwCfg};
use hvmdm_devices::irq::{IrqEvent, RecordingIrqSink};
use hvmdm_devices::mem::{GuestRam, TestRam};
use hvmdm_devices::pci::{
    I440fxHostBridge, PciBuses, PciConfigIo, PciRoot, Piix3Ide, Piix3Isa, Piix4Pm, RegionTarget,
    DEVFN_HOST_BRIDGE, DEVFN_PIIX3_IDE, DEVFN_PIIX3_ISA, DEVFN_PIIX4_PM, PAM_SEGMENTS, PCI_CONFIG_IO_BASE,
    PCI_CONFIG_IO_LEN, PIIX4_PM_IO_LEN, PIIX_IDE_BM_LEN,
};
use hvmdm_devices::platform::{PamAttr, RecordingPlatform};

/// `HVMDM_FUZZ_STRICT=1` also asserts behaviours known to be broken (see README.md, "Findings"),
/// so a fix can be verified; without it those inputs are steered around and fuzzing goes on.
pub fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var("HVMDM_FUZZ_STRICT").is_ok_and(|v| v == "1"))
}

/// `HVMDM_FUZZ_OPEN=1` asserts findings that are still open (README.md, "Findings"): they are
/// steered around by default so `run-brief.sh` (strict, for the fixed ones) stays green.
pub fn open_findings() -> bool {
    static OPEN: OnceLock<bool> = OnceLock::new();
    *OPEN.get_or_init(|| std::env::var("HVMDM_FUZZ_OPEN").is_ok_and(|v| v == "1"))
}

/// Sizes a bus access may have: 1, 2, 4 or 8, chosen by a small index.
pub fn pow2_size(i: u8) -> u8 {
    1 << (i % 4)
}

/// Stands in for a device behind a window: checks that the handler only sees what the bus
/// promises (an implemented size, inside the region, naturally aligned), answers reads with a
/// fixed pattern and remembers written bytes.
pub struct Probe {
    pub name: &'static str,
    pub rules: AccessRules,
    pub len: u64,
    pub calls: u64,
}

impl Probe {
    pub fn new(name: &'static str, rules: AccessRules, len: u64) -> Self {
        Probe { name, rules, len, calls: 0 }
    }

    fn check(&mut self, offset: u64, size: usize) {
        let s = size as u8;
        assert!(
            size.is_power_of_two() && s >= self.rules.impl_min && s <= self.rules.impl_max,
            "{}: handler got a {size}-byte access at offset {offset:#x}, rules {:?}",
            self.name,
            self.rules
        );
        assert!(
            offset.checked_add(size as u64).is_some_and(|e| e <= self.len),
            "{}: access {offset:#x}+{size} beyond the {:#x}-byte region",
            self.name,
            self.len
        );
        self.calls += 1;
    }
}

impl BusDevice for Probe {
    fn read(&mut self, _r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        self.check(offset, data.len());
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8) ^ 0x5a;
        }
        IoResult::Done
    }
    fn write(&mut self, _r: RegionId, offset: u64, data: &[u8]) -> IoResult {
        self.check(offset, data.len());
        IoResult::Done
    }
}

pub const PM_RULES: AccessRules = AccessRules::new(1, 4, 2, 4);
pub const BM_RULES: AccessRules = AccessRules::BYTES;
pub const RAM_SIZE: usize = 16 * 1024;
pub const FILE_SLOTS: usize = 0x10;
pub const LAZY_TABLES: &str = "etc/acpi/tables";
pub const LAZY_RSDP: &str = "etc/acpi/rsdp";
pub const WRITABLE: &str = "etc/wp-target";
/// Files the assembly installs, with their maximum sizes.
pub const FILES: [(&str, usize); 5] =
    [("bootorder", 64), ("etc/big", 8192), (LAZY_TABLES, 4096), (LAZY_RSDP, 36), (WRITABLE, 8)];

/// i440FX + PIIX3/PIIX4 behind CF8/CFC and fw_cfg at 0x510/0x514 on one PIO bus.
pub struct Machine {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub root: Arc<Mutex<PciRoot>>,
    pub cfg_io: Arc<Mutex<PciConfigIo>>,
    pub host: Arc<Mutex<I440fxHostBridge>>,
    pub isa: Arc<Mutex<Piix3Isa>>,
    pub ide: Arc<Mutex<Piix3Ide>>,
    pub pm: Arc<Mutex<Piix4Pm>>,
    pub irq: Arc<RecordingIrqSink>,
    pub platform: Arc<RecordingPlatform>,
    pub ram: Arc<TestRam>,
    pub fw: Arc<Mutex<FwCfg>>,
    /// PAM state as the backend has been told it (starts as ROM/PCI everywhere).
    pub pam_model: [PamAttr; PAM_SEGMENTS],
    /// PIRQ routes as the backend has been told them.
    pub route_model: [Option<u8>; 4],
}

impl Drop for Machine {
    /// Breaks the reference cycle pio bus -> PciConfigIo -> PciRoot -> Piix4Pm/Piix3Ide window ->
    /// pio bus (README, "Findings"); without this every input leaks its whole machine.
    fn drop(&mut self) {
        self.pio.remove(PCI_CONFIG_IO_BASE);
    }
}

impl Machine {
    /// `lazy_sizes` drives the lazy hook: every regeneration takes the next byte as a size choice,
    /// so the input controls whether blobs shrink, grow or exceed their maximum.
    pub fn new(lazy_sizes: Vec<u8>) -> Machine {
        let buses = PciBuses { pio: Arc::new(Bus::new("pio")), mmio: Arc::new(Bus::new("mmio")) };
        let platform = Arc::new(RecordingPlatform::default());
        let irq = Arc::new(RecordingIrqSink::default());
        let ram = Arc::new(TestRam::new(RAM_SIZE));
        let pm_dev = Arc::new(Mutex::new(Probe::new("pm-io", PM_RULES, PIIX4_PM_IO_LEN)));
        let bm_dev = Arc::new(Mutex::new(Probe::new("ide-bm", BM_RULES, PIIX_IDE_BM_LEN)));
        let pm =
            Arc::new(Mutex::new(Piix4Pm::new(buses.pio.clone(), RegionTarget::new(pm_dev, 0, PM_RULES))));
        let ide = Arc::new(Mutex::new(
            Piix3Ide::new(&buses, RegionTarget::new(bm_dev, 0, BM_RULES)).expect("IDE BAR"),
        ));
        let host = Arc::new(Mutex::new(I440fxHostBridge::new(platform.clone())));
        let isa = Arc::new(Mutex::new(Piix3Isa::new(irq.clone())));
        let mut root = PciRoot::new();
        root.add(DEVFN_HOST_BRIDGE, host.clone()).expect("devfn");
        root.add(DEVFN_PIIX3_ISA, isa.clone()).expect("devfn");
        root.add(DEVFN_PIIX3_IDE, ide.clone()).expect("devfn");
        root.add(DEVFN_PIIX4_PM, pm.clone()).expect("devfn");
        let root = Arc::new(Mutex::new(root));
        let cfg_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone(), platform.clone())));
        buses
            .pio
            .insert(
                PCI_CONFIG_IO_BASE,
                PCI_CONFIG_IO_LEN,
                PciConfigIo::RULES,
                cfg_io.clone(),
                PciConfigIo::REGION,
            )
            .expect("cf8");

        let mut fw = FwCfg::with_file_slots(ram.clone(), FILE_SLOTS);
        fw.add_item_u64(keys::RAM_SIZE, RAM_SIZE as u64).expect("item");
        fw.add_item(keys::E820_TABLE, vec![0xe8; 24]).expect("item");
        fw.add_file("bootorder", b"/pci@i0cf8/ide@1,1/drive@0/disk@0\0".to_vec(), FileOpts::read_only(64))
            .expect("file");
        fw.add_file("etc/big", (0..5000u32).map(|i| i as u8).collect(), FileOpts::read_only(8192))
            .expect("file");
        fw.add_file(WRITABLE, vec![0; 8], FileOpts::writable(8)).expect("file");
        fw.add_file(LAZY_TABLES, vec![1; 512], FileOpts::read_only(4096)).expect("file");
        fw.add_file(LAZY_RSDP, vec![2; 20], FileOpts::read_only(36)).expect("file");
        let mut sizes = lazy_sizes.into_iter().cycle();
        fw.set_lazy_group(
            &[LAZY_TABLES, LAZY_RSDP],
            Box::new(move || {
                let s = sizes.next().unwrap_or(0);
                let tables = [0usize, 1, 512, 4095, 4096, 4097, 100_000, 64][usize::from(s & 7)];
                let rsdp = [20usize, 36, 37, 0][usize::from(s >> 3 & 3)];
                let mut v = vec![(LAZY_TABLES.to_string(), vec![0xaa; tables])];
                if s & 0x20 == 0 {
                    v.push((LAZY_RSDP.to_string(), vec![0xbb; rsdp]));
                }
                if s & 0x40 != 0 {
                    // Not a member of the group: must be ignored.
                    v.push(("etc/big".to_string(), vec![0; 20]));
                }
                v
            }),
        )
        .expect("lazy group");
        let fw = Arc::new(Mutex::new(fw));
        buses
            .pio
            .insert(fw_cfg::PORT_BASE, fw_cfg::PORT_LEN, fw_cfg::PORT_RULES, fw.clone(), fw_cfg::REGION_PORT)
            .expect("fw_cfg port");
        buses
            .pio
            .insert(fw_cfg::DMA_BASE, fw_cfg::DMA_LEN, fw_cfg::DMA_RULES, fw.clone(), fw_cfg::REGION_DMA)
            .expect("fw_cfg dma");

        Machine {
            pio: buses.pio,
            mmio: buses.mmio,
            root,
            cfg_io,
            host,
            isa,
            ide,
            pm,
            irq,
            platform,
            ram,
            fw,
            pam_model: [PamAttr::default(); PAM_SEGMENTS],
            route_model: [None; 4],
        }
    }

    pub fn read(&self, addr: u64, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.pio.read_sync(addr, &mut d);
        d
    }

    /// One byte, without allocating (the hot path of data-port streaming).
    pub fn inb(&self, port: u64) -> u8 {
        let mut d = [0u8; 1];
        self.pio.read_sync(port, &mut d);
        d[0]
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.pio.write_sync(addr, data);
    }

    pub fn outl(&self, port: u64, v: u32) {
        self.write(port, &v.to_le_bytes());
    }

    pub fn inl(&self, port: u64) -> u32 {
        let d = self.read(port, 4);
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    /// Whole-machine reset as the VMM does it on reboot.
    pub fn reset(&self) {
        self.root.lock().unwrap().reset();
        self.cfg_io.lock().unwrap().reset();
        self.fw.lock().unwrap().reset();
    }

    /// A read of an unclaimed port, or of an impossible size, must float (all-ones).
    pub fn checked_read(&self, port: u64, size: usize) -> Vec<u8> {
        let claimed = self.pio.is_claimed(port);
        let d = self.read(port, size);
        if !claimed || size > 8 {
            assert!(
                d.iter().all(|&b| b == 0xff),
                "unclaimed/oversized {size}-byte read at {port:#x} gave {d:x?}"
            );
        }
        d
    }

    /// Folds what the backend was told (PAM, PIRQ routes) into the models and checks them against
    /// the devices' own view; checks that windows sit where the PCI side says.
    pub fn check_chipset(&mut self) {
        for (seg, attr) in std::mem::take(&mut *self.platform.pam.lock().unwrap()) {
            assert!(seg < PAM_SEGMENTS, "set_pam for segment {seg}");
            self.pam_model[seg] = attr;
        }
        for ev in self.irq.take() {
            if let IrqEvent::Route(link, irq) = ev {
                assert!(link < 4, "route for link {link}");
                assert!(irq.is_none_or(|i| (1..16).contains(&i)), "link {link} routed to {irq:?}");
                self.route_model[usize::from(link)] = irq;
            }
        }
        self.platform.events.lock().unwrap().clear();
        let host = self.host.lock().unwrap();
        for seg in 0..PAM_SEGMENTS {
            assert_eq!(
                host.pam_attr(seg),
                self.pam_model[seg],
                "PAM segment {seg}: backend was told otherwise"
            );
        }
        let smram = host.smram();
        assert!(smram & 0x10 == 0 || smram & 0x40 == 0, "SMRAM {smram:#x}: locked but still open");
        assert_eq!(smram & 0x07, 0x02, "SMRAM C_BASE_SEG changed: {smram:#x}");
        drop(host);
        let isa = self.isa.lock().unwrap();
        for link in 0..4u8 {
            assert_eq!(isa.link_route(link), self.route_model[usize::from(link)], "PIRQ link {link}");
        }
        drop(isa);
        let (pm_base, pm_mapped) = {
            let pm = self.pm.lock().unwrap();
            (pm.pm_base(), pm.pm_mapped())
        };
        if let Some(b) = pm_mapped {
            assert_eq!(pm_base, Some(b), "PM block mapped at {b:#x} but PMBA/PMIOSE say {pm_base:?}");
            assert!(self.pio.is_claimed(b.into()) && self.pio.is_claimed(u64::from(b) + PIIX4_PM_IO_LEN - 1));
        }
        let bm = self.ide.lock().unwrap().bm_base();
        if let Some(b) = bm {
            let want = self.ide.lock().unwrap().config_space().bar_address(4);
            assert_eq!(want, Some(u64::from(b)), "BM BAR mapped at {b:#x}, decodes at {want:?}");
            assert!(self.pio.is_claimed(b.into()) && self.pio.is_claimed(u64::from(b) + PIIX_IDE_BM_LEN - 1));
        }
        // The fixed devices are never displaced by a window.
        for p in [0xcf8u64, 0xcfc, 0xcff, 0x510, 0x511, 0x514, 0x51b] {
            assert!(self.pio.is_claimed(p), "port {p:#x} lost its device");
        }
    }

    /// Read-only identity registers survive anything.
    pub fn check_identity(&self) {
        let root = self.root.lock().unwrap();
        for (devfn, id) in [
            (DEVFN_HOST_BRIDGE, 0x1237_8086u32),
            (DEVFN_PIIX3_ISA, 0x7000_8086),
            (DEVFN_PIIX3_IDE, 0x7010_8086),
            (DEVFN_PIIX4_PM, 0x7113_8086),
        ] {
            assert_eq!(root.config_read(0, devfn, 0, 4), id, "ID of devfn {devfn:#x} changed");
        }
    }

    /// Claim state of the ports around every device and window, plus `extra` ports, matches the
    /// fixed devices plus the mapped windows (a full 64 Ki-port sweep is too slow per input).
    pub fn check_claims(&self, extra: &[u64]) {
        let pm = self.pm.lock().unwrap().pm_mapped();
        let bm = self.ide.lock().unwrap().bm_base();
        let mut ports: Vec<u64> = extra.iter().map(|p| p & 0xffff).collect();
        let bases = [Some(0xcf8u64), Some(0x510), pm.map(u64::from), bm.map(u64::from)];
        for b in bases.into_iter().flatten() {
            ports.extend(b.saturating_sub(64)..(b + 128).min(0x1_0000));
        }
        for port in ports {
            let within = |base: u64, len: u64| port >= base && port < base + len;
            let want = within(PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN)
                || within(fw_cfg::PORT_BASE, fw_cfg::PORT_LEN)
                || within(fw_cfg::DMA_BASE, fw_cfg::DMA_LEN)
                || pm.is_some_and(|b| within(b.into(), PIIX4_PM_IO_LEN))
                || bm.is_some_and(|b| within(b.into(), PIIX_IDE_BM_LEN));
            assert_eq!(self.pio.is_claimed(port), want, "claim state of port {port:#x}");
        }
    }

    /// Reads the fw_cfg directory with one SeaBIOS-style DMA SELECT+READ (1028 port reads per
    /// input would halve the exec rate; `devices/tests/random_sequences.rs` reads it through the
    /// port) and checks it against `file()`. Overwrites the start of RAM.
    pub fn check_directory(&self) {
        const DESC: u64 = 0;
        const BUF: u64 = 0x100;
        let len = 4 + 64 * FILE_SLOTS;
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&(u32::from(keys::FILE_DIR) << 16 | 0x0a).to_be_bytes());
        d[4..8].copy_from_slice(&(len as u32).to_be_bytes());
        d[8..].copy_from_slice(&BUF.to_be_bytes());
        self.ram.write(DESC, &d).expect("descriptor in RAM");
        // High half first: the input may have left a stale one latched.
        self.write(0x514, &0u32.to_be_bytes());
        self.write(0x518, &(DESC as u32).to_be_bytes());
        let mut st = [0u8; 4];
        self.ram.read(DESC, &mut st).expect("status in RAM");
        assert_eq!(st, [0; 4], "directory DMA failed");
        let mut raw = vec![0u8; len];
        self.ram.read(BUF, &mut raw).expect("buffer in RAM");
        let count = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        let fw = self.fw.lock().unwrap();
        assert!(count <= fw.file_slots(), "directory count {count} > {} slots", fw.file_slots());
        assert_eq!(count, FILES.len(), "files appeared or vanished");
        let mut prev = String::new();
        for i in 0..count {
            let e = &raw[4 + 64 * i..4 + 64 * (i + 1)];
            let size = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as usize;
            let select = u16::from_be_bytes([e[4], e[5]]);
            let name_end = e[8..].iter().position(|&b| b == 0).unwrap_or(56);
            let name = String::from_utf8_lossy(&e[8..8 + name_end]).into_owned();
            assert!(name > prev, "directory not sorted at {name:?}");
            assert_eq!(select, keys::FILE_FIRST + i as u16, "selector of {name:?}");
            let content = fw.file(&name).unwrap_or_else(|| panic!("directory names unknown file {name:?}"));
            assert_eq!(size, content.len(), "directory size of {name:?} differs from file()");
            let max = FILES.iter().find(|(n, _)| *n == name).map(|f| f.1).unwrap_or(0);
            assert!(size <= max, "{name:?} is {size} bytes, above its maximum {max}");
            prev = name;
        }
        assert!(raw[4 + 64 * count..].iter().all(|&b| b == 0), "unused directory slots not zero");
    }
}
