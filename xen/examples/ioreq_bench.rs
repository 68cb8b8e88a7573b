//! ioreq_bench: drives PIO ioreqs through `IoreqServer` on `FakeXen` (a benchmark, not a test).
//! benches/ioreq-callgrind.sh runs it under callgrind for two counts and prints instructions per
//! ioreq; alone it prints wall-clock ns per ioreq.
//!
//!   ioreq_bench HANDLER N     HANDLER: trivial | i8042 | cmos
//!
//! Every ioreq is one synchronous 1-byte PIO read, as a guest `inb` arrives from Xen: FakeXen
//! writes the slot and raises the vCPU port (Xen's ioreq_send), the server takes the pending
//! port and serves it (unmask, drain the empty buffered ring, fetch, process, complete,
//! notify), and the test checks the answer (Xen's side reading IORESP_READY).
//! - trivial: a handler that returns a constant (the ioreq path alone);
//! - i8042: a `Bus` holding the chipset's I8042 (0x60/0x64) and Cmos (0x70/0x71), reading 0x64
//!   (status) the way hvmdm's `MachineIo` does: `Bus::read_sync` (the port benches/xen.sh
//!   measures from inside the guest);
//! - cmos: the same bus, reading 0x71 (CMOS data; index 0x0f, set once up front).
//!
//! FakeXen's own bookkeeping (its call log and pending queue) is part of the count; the
//! trivial handler's figure is the baseline to subtract for the device side.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use hvmdm_devices::bus::Bus;
use hvmdm_devices::chipset::{Cmos, CmosConfig, I8042};
use hvmdm_devices::irq::{IsaIrq, RecordingIrqSink};
use hvmdm_devices::mem::TestRam;
use hvmdm_devices::platform::RecordingPlatform;
use hvmdm_xen::fake::FakeXen;
use hvmdm_xen::ioreq::{IoreqHandler, PciSbdf};
use hvmdm_xen::sys::ioreq::{IoreqRaw, IOREQ_FLAG_DIR_READ, IOREQ_TYPE_PIO};
use hvmdm_xen::{EventOutcome, IoreqServer};

/// Answers every read with a constant.
struct Trivial;

impl IoreqHandler for Trivial {
    fn pio_read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0x1c);
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {}
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    fn pci_config_read(&mut self, _: PciSbdf, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pci_config_write(&mut self, _: PciSbdf, _: u16, _: &[u8]) {}
}

/// PIO into a device bus, as hvmdm's `MachineIo` (src/xen/handler.rs) does.
struct BusIo {
    pio: Bus,
}

impl IoreqHandler for BusIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.pio.read_sync(u64::from(port), data);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.pio.write_sync(u64::from(port), data);
    }
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    fn pci_config_read(&mut self, _: PciSbdf, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pci_config_write(&mut self, _: PciSbdf, _: u16, _: &[u8]) {}
}

fn chipset_bus() -> Result<BusIo, String> {
    let pio = Bus::new("pio");
    let sink = Arc::new(RecordingIrqSink::default());
    let kbd = Arc::new(Mutex::new(I8042::new(
        IsaIrq::new(sink.clone(), I8042::KBD_IRQ),
        IsaIrq::new(sink.clone(), I8042::AUX_IRQ),
        Arc::new(RecordingPlatform::default()),
    )));
    pio.insert(I8042::DATA_PORT, I8042::LEN, I8042::RULES, kbd.clone(), I8042::REGION_DATA)
        .map_err(|e| e.to_string())?;
    pio.insert(I8042::CMD_PORT, I8042::LEN, I8042::RULES, kbd, I8042::REGION_CMD)
        .map_err(|e| e.to_string())?;
    let cfg = CmosConfig { ram_below_4g: 512 << 20, xen: true, ..CmosConfig::default() };
    let cmos = Cmos::new(&cfg, Some(IsaIrq::new(sink, Cmos::IRQ))).map_err(|e| e.to_string())?;
    pio.insert(Cmos::BASE, Cmos::LEN, Cmos::RULES, Arc::new(Mutex::new(cmos)), Cmos::REGION)
        .map_err(|e| e.to_string())?;
    // CMOS index for the `cmos` handler: an NVRAM byte the device model owns under Xen.
    pio.write_sync(Cmos::BASE, &[0x0f]);
    Ok(BusIo { pio })
}

fn run<H: IoreqHandler>(handler: &mut H, port: u64, n: u64) -> Result<u64, String> {
    let fake = Arc::new(FakeXen::new(1, 0));
    let ram = TestRam::new(0);
    let mut srv =
        IoreqServer::start(fake.clone(), fake.clone(), fake.clone(), 1, 1).map_err(|e| e.to_string())?;
    srv.map_io_range(false, port, port).map_err(|e| e.to_string())?;
    let req = IoreqRaw {
        addr: port,
        count: 1,
        size: 1,
        type_: IOREQ_TYPE_PIO,
        flags: IOREQ_FLAG_DIR_READ,
        ..IoreqRaw::default()
    };
    let mut sum = 0u64;
    for i in 0..n {
        fake.post_ioreq(0, &req).ok_or("vCPU 0 port not bound")?;
        match srv.handle_pending(handler, &ram).map_err(|e| e.to_string())? {
            Some(EventOutcome::Completed { vcpu: 0 }) => {}
            other => return Err(format!("ioreq {i}: {other:?}")),
        }
        sum = sum.wrapping_add(fake.slot_result(0).1);
        // The fake logs every unmask/notify: keep that log (and its cost) bounded.
        if i % 1024 == 1023 {
            fake.clear_calls();
        }
    }
    Ok(sum)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(Ok(n))) = (args.get(1), args.get(2).map(|s| s.parse::<u64>())) else {
        eprintln!("usage: ioreq_bench trivial|i8042|cmos N");
        return ExitCode::from(2);
    };
    let t0 = std::time::Instant::now();
    let res = match kind.as_str() {
        "trivial" => run(&mut Trivial, 0x64, n),
        "i8042" => chipset_bus().and_then(|mut b| run(&mut b, I8042::CMD_PORT, n)),
        "cmos" => chipset_bus().and_then(|mut b| run(&mut b, Cmos::BASE + 1, n)),
        _ => Err(format!("unknown handler {kind}")),
    };
    match res {
        Ok(sum) => {
            let ns = t0.elapsed().as_nanos() as f64 / n.max(1) as f64;
            println!("ioreq_bench {kind} n={n} checksum={sum:#x} wall_ns_per_ioreq={ns:.0}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ioreq_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
