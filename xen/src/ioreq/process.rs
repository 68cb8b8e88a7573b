//! Executing a validated [`Ioreq`] against the device model (specs §4.4).

use hvmdm_devices::mem::GuestRam;
use hvmdm_devices::warn_limited;

use super::slot::{all_ones, step, Ioreq, IoreqType};

/// A PCI function as Xen encodes it in PCI_CONFIG requests (`addr >> 32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciSbdf(pub u32);

impl PciSbdf {
    pub fn segment(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    pub fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

/// The device side of request execution. `data.len()` is the request size (1/2/4, or 8 for
/// MMIO); values are little-endian. Implementations answer unclaimed reads with all-ones.
pub trait IoreqHandler {
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// `addr` may be guest RAM as well as MMIO (rep movs between RAM and a device arrives as a
    /// COPY whose "device" side is RAM), so implementations fall back to guest memory.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// `reg` is the config-space offset (0..0x1000).
    fn pci_config_read(&mut self, sbdf: PciSbdf, reg: u16, data: &mut [u8]);
    fn pci_config_write(&mut self, sbdf: PciSbdf, reg: u16, data: &[u8]);
}

/// What the caller does after [`process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answer the slot with this `data` value.
    Reply(u64),
    /// The guest's RTC offset changed (seconds; QEMU ignores it, we record it). Answer with the
    /// request's `data` if it came synchronously.
    TimeOffset(u64),
    /// Drop every idle guest-memory mapping, then answer with the request's `data`.
    Invalidate,
}

impl Outcome {
    /// The value to pass to `complete` once any side work is done.
    pub fn reply(self, req: &Ioreq) -> u64 {
        match self {
            Outcome::Reply(v) => v,
            Outcome::TimeOffset(_) | Outcome::Invalidate => req.data,
        }
    }
}

/// Executes `req`. Work is bounded by `req.count` (validated) handler calls and guest-memory
/// accesses; a guest-memory failure stops the repetition (logged once).
pub fn process<H: IoreqHandler + ?Sized>(req: &Ioreq, handler: &mut H, ram: &dyn GuestRam) -> Outcome {
    let size = req.size as usize;
    let mut buf = [0u8; 8];
    match req.ty {
        IoreqType::TimeOffset => Outcome::TimeOffset(req.data),
        IoreqType::Invalidate => Outcome::Invalidate,
        IoreqType::PciConfig => {
            let sbdf = PciSbdf((req.addr >> 32) as u32);
            // Validation bounded the register to 0..0x1000.
            let reg = (req.addr & 0xfff) as u16;
            if req.dir_read {
                handler.pci_config_read(sbdf, reg, &mut buf[..size]);
                Outcome::Reply(u64::from_le_bytes(buf) & all_ones(req.size))
            } else {
                handler.pci_config_write(sbdf, reg, &req.data.to_le_bytes()[..size]);
                Outcome::Reply(req.data)
            }
        }
        IoreqType::Pio => {
            // Validation bounded the port range to 16 bits.
            let port = req.addr as u16;
            if !req.data_is_ptr {
                if req.dir_read {
                    handler.pio_read(port, &mut buf[..size]);
                    return Outcome::Reply(u64::from_le_bytes(buf) & all_ones(req.size));
                }
                handler.pio_write(port, &req.data.to_le_bytes()[..size]);
                return Outcome::Reply(req.data);
            }
            // rep ins / rep outs: the port stays, guest memory steps by ±size.
            for i in 0..req.count {
                let gpa = step(req.data, i, req.size, req.df);
                let chunk = &mut buf[..size];
                if req.dir_read {
                    handler.pio_read(port, chunk);
                    if ram.write(gpa, chunk).is_err() {
                        bad_ram("rep-ins", gpa);
                        break;
                    }
                } else {
                    if ram.read(gpa, chunk).is_err() {
                        bad_ram("rep-outs", gpa);
                        break;
                    }
                    handler.pio_write(port, chunk);
                }
            }
            Outcome::Reply(req.data)
        }
        IoreqType::Copy => {
            if !req.data_is_ptr {
                // rep stos / lods against MMIO: the device address steps, the value stays; for a
                // read the last value wins.
                let mut value = req.data;
                for i in 0..req.count {
                    let addr = step(req.addr, i, req.size, req.df);
                    if req.dir_read {
                        let mut b = [0u8; 8];
                        handler.mmio_read(addr, &mut b[..size]);
                        value = u64::from_le_bytes(b);
                    } else {
                        handler.mmio_write(addr, &req.data.to_le_bytes()[..size]);
                    }
                }
                return Outcome::Reply(value);
            }
            // rep movs: both sides step.
            for i in 0..req.count {
                let dev = step(req.addr, i, req.size, req.df);
                let gpa = step(req.data, i, req.size, req.df);
                let chunk = &mut buf[..size];
                if req.dir_read {
                    handler.mmio_read(dev, chunk);
                    if ram.write(gpa, chunk).is_err() {
                        bad_ram("movs-to-ram", gpa);
                        break;
                    }
                } else {
                    if ram.read(gpa, chunk).is_err() {
                        bad_ram("movs-from-ram", gpa);
                        break;
                    }
                    handler.mmio_write(dev, chunk);
                }
            }
            Outcome::Reply(req.data)
        }
    }
}

fn bad_ram(what: &str, gpa: u64) {
    warn_limited!(
        format!("ioreq-{what}"),
        "ioreq {what}: guest address {gpa:#x} is not RAM; rest of the repetition dropped"
    );
}
