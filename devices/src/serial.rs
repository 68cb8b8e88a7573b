//! 16550A UART.
//!
//! Written here rather than taken from `vm-superio` 0.8: its `Serial` signals interrupts through
//! an edge `Trigger` with no way to lower a line, reports no FIFO bits in IIR (so Linux sees a
//! 16450, not a 16550A) and has no RX-timeout/THRE re-arm rules we can tune; our interrupt model
//! is a level on an [`IsaIrq`], as QEMU's `serial.c` does.
//!
//! Behaviour follows QEMU's 16550A where it matters to Linux's 8250 driver:
//! - THR writes transmit immediately (LSR.THRE/TEMT are always set afterwards); the THRE
//!   interrupt is re-armed after every write and when IER.THRI goes 0→1 while THRE is set, so
//!   the driver's "THRE test" passes and interrupt-driven TX works. Reading IIR when it reports
//!   THRE clears that interrupt.
//! - The IRQ line is not gated by MCR.OUT2 (QEMU does not gate either; Linux sets OUT2 whenever
//!   it uses the IRQ, so gating would not change what it sees).
//! - With FIFOs enabled, received data below the trigger level is reported as a character
//!   timeout (IIR 0xCC) at once instead of after four character times.
//! - Input is kept in a bounded queue larger than the 16-byte hardware FIFO (the input thread
//!   cannot be back-pressured by the guest); overflow drops bytes and sets LSR.OE.
//! - Loopback (MCR bit 4): THR bytes are received; MSR reflects MCR (RTS→CTS, DTR→DSR,
//!   OUT1→RI, OUT2→DCD), as Linux's autoconfig expects (MCR 0x1A → MSR 0x90).

use std::collections::VecDeque;
use std::io::Write;

use crate::bus::{AccessRules, IoResult, RegionId};
use crate::irq::IsaIrq;
use crate::warn_limited;

const RBR_THR: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;

const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_FE: u8 = 0x01;
const FCR_RFR: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_LOOP: u8 = 0x10;
const MCR_OUT2: u8 = 0x08;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_INT_ANY: u8 = 0x1e;

const MSR_DELTA: u8 = 0x0f;
/// Carrier detect, data set ready, clear to send: a connected, ready line.
const MSR_CONNECTED: u8 = 0xb0;

/// Bytes of pending input we keep at most.
pub const INPUT_CAPACITY: usize = 4096;

/// A 16550A UART (one region, see [`Serial::REGION`]).
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr: u8,
    msr: u8,
    scr: u8,
    fcr: u8,
    divisor: u16,
    rbr: u8,
    rx: VecDeque<u8>,
    thr_ipending: bool,
    irq: IsaIrq,
    irq_level: bool,
    out: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("irq", &self.irq)
            .field("ier", &self.ier)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("rx", &self.rx.len())
            .finish()
    }
}

impl Serial {
    /// Region 0: 8 byte registers at the base (COM1 0x3f8/IRQ 4, COM2 0x2f8/IRQ 3). Wider or
    /// unaligned accesses are split into bytes, as QEMU allows.
    pub const REGION: RegionId = 0;
    pub const LEN: u64 = 8;
    pub const RULES: AccessRules = AccessRules::BYTES.allow_unaligned();
    pub const COM1_BASE: u64 = 0x3f8;
    pub const COM1_IRQ: u8 = 4;

    /// A UART raising `irq`, transmitting to `out` (None: output discarded).
    pub fn new(irq: IsaIrq, out: Option<Box<dyn Write + Send>>) -> Self {
        let mut s = Serial {
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr: 0,
            msr: 0,
            scr: 0,
            fcr: 0,
            divisor: 0,
            rbr: 0,
            rx: VecDeque::new(),
            thr_ipending: false,
            irq,
            irq_level: false,
            out,
        };
        s.reset();
        s
    }

    /// Power-on state (QEMU's values: 9600 baud divisor, OUT2 set, line ready). Pending input
    /// is discarded.
    pub fn reset(&mut self) {
        self.ier = 0;
        self.lcr = 0;
        self.mcr = MCR_OUT2;
        self.lsr = LSR_THRE | LSR_TEMT;
        self.msr = MSR_CONNECTED;
        self.scr = 0;
        self.fcr = 0;
        self.divisor = 0x0c;
        self.rbr = 0;
        self.rx.clear();
        self.thr_ipending = false;
        self.update_irq();
    }

    /// Queues input bytes from the host side; returns how many were accepted. Bytes beyond
    /// [`INPUT_CAPACITY`] are dropped and flagged as an overrun.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.input_space());
        self.rx.extend(&bytes[..n]);
        if n < bytes.len() {
            self.lsr |= LSR_OE;
            warn_limited!("serial-overrun", "serial: input overrun, {} bytes dropped", bytes.len() - n);
        }
        if !self.rx.is_empty() {
            self.lsr |= LSR_DR;
        }
        self.update_irq();
        n
    }

    /// Free space in the input queue (the machine may use it to pace its input thread).
    pub fn input_space(&self) -> usize {
        INPUT_CAPACITY.saturating_sub(self.rx.len())
    }

    /// The programmed divisor latch (baud = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_FE != 0
    }

    fn trigger_level(&self) -> usize {
        [1, 4, 8, 14][usize::from(self.fcr >> 6)]
    }

    /// Current interrupt identification (low 4 bits of IIR), by 16550 priority.
    fn pending(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.lsr & LSR_INT_ANY != 0 {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && self.lsr & LSR_DR != 0 {
            if self.fifo_enabled() && self.rx.len() < self.trigger_level() {
                IIR_CTI
            } else {
                IIR_RDI
            }
        } else if self.ier & IER_THRI != 0 && self.thr_ipending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr & MSR_DELTA != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    fn iir(&self) -> u8 {
        self.pending() | if self.fifo_enabled() { IIR_FIFO_ENABLED } else { 0 }
    }

    fn update_irq(&mut self) {
        let level = self.pending() != IIR_NO_INT;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    fn transmit(&mut self, v: u8) {
        // The byte leaves THR: THRE drops (and the THRE interrupt with it) ...
        self.thr_ipending = false;
        self.lsr &= !(LSR_THRE | LSR_TEMT);
        self.update_irq();
        if self.mcr & MCR_LOOP != 0 {
            if self.rx.len() < INPUT_CAPACITY {
                self.rx.push_back(v);
                self.lsr |= LSR_DR;
            } else {
                self.lsr |= LSR_OE;
            }
        } else if let Some(out) = self.out.as_mut() {
            let r = out.write_all(&[v]).and_then(|_| out.flush());
            if let Err(e) = r {
                warn_limited!("serial-output", "serial: output failed, byte dropped: {e}");
            }
        }
        // ... and is "sent" at once: THRE is back and interrupts again (a fresh edge).
        self.lsr |= LSR_THRE | LSR_TEMT;
        self.thr_ipending = true;
        self.update_irq();
    }

    fn msr_value(&self) -> u8 {
        if self.mcr & MCR_LOOP != 0 {
            // Modem outputs wired to the inputs: OUT2→DCD, OUT1→RI, RTS→CTS, DTR→DSR.
            (self.mcr & 0x0c) << 4 | (self.mcr & 0x02) << 3 | (self.mcr & 0x01) << 5
        } else {
            self.msr
        }
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        match reg {
            RBR_THR if self.lcr & LCR_DLAB != 0 => self.divisor as u8,
            RBR_THR => {
                if let Some(b) = self.rx.pop_front() {
                    self.rbr = b;
                }
                if self.rx.is_empty() {
                    self.lsr &= !(LSR_DR | LSR_BI);
                }
                self.update_irq();
                self.rbr
            }
            IER if self.lcr & LCR_DLAB != 0 => (self.divisor >> 8) as u8,
            IER => self.ier,
            IIR_FCR => {
                let v = self.iir();
                if v & 0x0f == IIR_THRI {
                    self.thr_ipending = false;
                    self.update_irq();
                }
                v
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let v = self.lsr;
                if self.lsr & (LSR_BI | LSR_OE) != 0 {
                    self.lsr &= !(LSR_BI | LSR_OE);
                    self.update_irq();
                }
                v
            }
            MSR => {
                let v = self.msr_value();
                if self.msr & MSR_DELTA != 0 {
                    self.msr &= !MSR_DELTA;
                    self.update_irq();
                }
                v
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u8) {
        match reg {
            RBR_THR if self.lcr & LCR_DLAB != 0 => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            RBR_THR => self.transmit(v),
            IER if self.lcr & LCR_DLAB != 0 => self.divisor = (self.divisor & 0x00ff) | u16::from(v) << 8,
            IER => {
                let new = v & 0x0f;
                let changed = self.ier ^ new;
                self.ier = new;
                // THRI 0→1 with THR empty re-arms the THRE interrupt (Linux's THRE test and
                // Windows rely on it); THRI 1→0 forgets it.
                if changed & IER_THRI != 0 {
                    self.thr_ipending = new & IER_THRI != 0 && self.lsr & LSR_THRE != 0;
                }
                self.update_irq();
            }
            IIR_FCR => {
                let old = self.fcr;
                // Toggling FIFO enable clears the FIFOs, as does RFR; TX is always empty.
                if (old ^ v) & FCR_FE != 0 || v & FCR_RFR != 0 {
                    self.rx.clear();
                    self.lsr &= !(LSR_DR | LSR_BI);
                }
                // Only FE and the trigger level are stored (DMA mode bit 3 is meaningless here).
                self.fcr = v & 0xc1;
                self.update_irq();
            }
            LCR => self.lcr = v,
            MCR => {
                self.mcr = v & 0x1f;
                self.update_irq();
            }
            // LSR and MSR writes are factory-test only; ignore.
            LSR | MSR => {}
            SCR => self.scr = v,
            _ => {}
        }
    }
}

impl crate::bus::BusDevice for Serial {
    fn read(&mut self, _region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let v = self.read_reg(offset);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        if let Some(&v) = data.first() {
            self.write_reg(offset, v);
        }
        IoResult::Done
    }
}

/// Saved UART state (section "serial", version 1). The output sink and the IRQ binding are
/// configuration, not state. The line level is recomputed and driven on restore.
struct SerialState {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr: u8,
    msr: u8,
    scr: u8,
    fcr: u8,
    divisor: u16,
    rbr: u8,
    rx: Vec<u8>,
    thr_ipending: bool,
}

impl crate::snapshot::Snapshot for Serial {
    fn section(&self) -> &'static str {
        "serial"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut crate::snapshot::SectionWriter) {
        for v in [self.ier, self.lcr, self.mcr, self.lsr, self.msr, self.scr, self.fcr] {
            w.put_u8(v);
        }
        w.put_u16(self.divisor);
        w.put_u8(self.rbr);
        let (a, b) = self.rx.as_slices();
        w.put_bytes(&[a, b].concat());
        w.put_bool(self.thr_ipending);
    }
    fn decode(
        &self,
        version: u32,
        r: &mut crate::snapshot::SectionReader<'_>,
    ) -> Result<crate::snapshot::PendingState, crate::snapshot::SnapshotError> {
        crate::snapshot::check_version(r, version, 1)?;
        let st = SerialState {
            ier: r.get_u8()?,
            lcr: r.get_u8()?,
            mcr: r.get_u8()?,
            lsr: r.get_u8()?,
            msr: r.get_u8()?,
            scr: r.get_u8()?,
            fcr: r.get_u8()?,
            divisor: r.get_u16()?,
            rbr: r.get_u8()?,
            rx: r.get_bytes(INPUT_CAPACITY)?,
            thr_ipending: r.get_bool()?,
        };
        // Only bits a guest write can set are accepted.
        if st.ier & !0x0f != 0 || st.mcr & !0x1f != 0 || st.fcr & !0xc1 != 0 {
            return Err(r.bad(format!("IER/MCR/FCR {:#x}/{:#x}/{:#x}", st.ier, st.mcr, st.fcr)));
        }
        Ok(crate::snapshot::PendingState::new(st))
    }
    fn apply(&mut self, state: crate::snapshot::PendingState) -> Result<(), crate::snapshot::SnapshotError> {
        let st: SerialState = state.downcast(self.section())?;
        self.ier = st.ier;
        self.lcr = st.lcr;
        self.mcr = st.mcr;
        self.lsr = st.lsr;
        self.msr = st.msr;
        self.scr = st.scr;
        self.fcr = st.fcr;
        self.divisor = st.divisor;
        self.rbr = st.rbr;
        self.rx = st.rx.into();
        self.thr_ipending = st.thr_ipending;
        self.update_irq();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::irq::{IrqEvent, RecordingIrqSink};
    use std::sync::{Arc, Mutex};

    use crate::testutil::SharedBuf as Shared;

    fn uart() -> (Serial, Arc<RecordingIrqSink>, Shared) {
        let sink = Arc::new(RecordingIrqSink::default());
        let out = Shared::default();
        let s = Serial::new(IsaIrq::new(sink.clone(), 4), Some(Box::new(out.clone())));
        sink.take();
        (s, sink, out)
    }

    fn rd(s: &mut Serial, r: u64) -> u8 {
        let mut d = [0u8];
        s.read(0, r, &mut d);
        d[0]
    }

    fn wr(s: &mut Serial, r: u64, v: u8) {
        s.write(0, r, &[v]);
    }

    #[test]
    fn output_and_lsr() {
        let (mut s, _sink, out) = uart();
        assert_eq!(rd(&mut s, LSR), LSR_THRE | LSR_TEMT);
        for &b in b"hi\n" {
            wr(&mut s, RBR_THR, b);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert_eq!(rd(&mut s, LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut s, MSR), MSR_CONNECTED);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn divisor_latch() {
        let (mut s, _sink, out) = uart();
        wr(&mut s, LCR, 0x83);
        wr(&mut s, RBR_THR, 0x01);
        wr(&mut s, IER, 0x00);
        assert_eq!((rd(&mut s, RBR_THR), rd(&mut s, IER)), (0x01, 0x00));
        assert_eq!(s.divisor(), 1);
        wr(&mut s, LCR, 0x03);
        // With DLAB clear the same offsets are THR/IER again, and nothing was transmitted.
        assert_eq!(rd(&mut s, IER), 0);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(rd(&mut s, LCR), 0x03);
        wr(&mut s, SCR, 0x5a);
        assert_eq!(rd(&mut s, SCR), 0x5a);
    }

    #[test]
    fn loopback_like_linux_autoconfig() {
        let (mut s, _sink, out) = uart();
        wr(&mut s, MCR, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0x90);
        wr(&mut s, MCR, MCR_LOOP | 0x05);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0x60);
        wr(&mut s, RBR_THR, 0x42);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, RBR_THR), 0x42);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        wr(&mut s, MCR, MCR_OUT2);
        assert_eq!(rd(&mut s, MSR), MSR_CONNECTED);
    }

    #[test]
    fn fifo_detection_reports_16550a() {
        let (mut s, _sink, _) = uart();
        wr(&mut s, IIR_FCR, FCR_FE);
        assert_eq!(rd(&mut s, IIR_FCR) >> 6, 3);
        // No 16750 64-byte FIFO bit.
        wr(&mut s, IIR_FCR, FCR_FE | 0x20);
        assert_eq!(rd(&mut s, IIR_FCR) >> 5, 6);
        wr(&mut s, IIR_FCR, 0);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn thre_interrupt_raise_and_clear_linux_thre_test() {
        let (mut s, sink, _) = uart();
        // serial8250_startup's THRE test.
        wr(&mut s, IER, IER_THRI);
        assert!(sink.isa_level(4));
        let iir1 = rd(&mut s, IIR_FCR);
        assert_eq!(iir1 & 0x0f, IIR_THRI);
        assert!(!sink.isa_level(4), "reading IIR clears THRE interrupt");
        wr(&mut s, IER, 0);
        wr(&mut s, IER, IER_THRI);
        let iir = rd(&mut s, IIR_FCR);
        assert_eq!(iir & IIR_NO_INT, 0, "THRE must be re-asserted");
        wr(&mut s, IER, 0);
        sink.take();
        // Interrupt-driven TX: each THR write produces a new rising edge.
        wr(&mut s, IER, IER_THRI);
        let _ = rd(&mut s, IIR_FCR);
        sink.take();
        wr(&mut s, RBR_THR, b'a');
        assert_eq!(sink.take(), vec![IrqEvent::Isa(4, true)]);
        wr(&mut s, RBR_THR, b'b');
        assert_eq!(sink.take(), vec![IrqEvent::Isa(4, false), IrqEvent::Isa(4, true)]);
        // Disabling THRI lowers the line.
        wr(&mut s, IER, 0);
        assert!(!sink.isa_level(4));
    }

    #[test]
    fn receive_interrupts_and_overflow() {
        let (mut s, sink, _) = uart();
        wr(&mut s, IER, IER_RDI | IER_RLSI);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(sink.isa_level(4));
        assert_eq!(rd(&mut s, IIR_FCR), IIR_RDI);
        assert_eq!(rd(&mut s, RBR_THR), b'a');
        assert!(sink.isa_level(4));
        assert_eq!(rd(&mut s, RBR_THR), b'b');
        assert!(!sink.isa_level(4));
        // Reading an empty RBR repeats the last byte, no panic.
        assert_eq!(rd(&mut s, RBR_THR), b'b');
        // FIFO mode, trigger 8: 2 bytes are a timeout, 8 are data available.
        wr(&mut s, IIR_FCR, FCR_FE | 0x80);
        s.enqueue_input(b"12");
        assert_eq!(rd(&mut s, IIR_FCR), 0xc0 | IIR_CTI);
        s.enqueue_input(b"345678");
        assert_eq!(rd(&mut s, IIR_FCR), 0xc0 | IIR_RDI);
        wr(&mut s, IIR_FCR, FCR_FE | FCR_RFR);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        // Overflow: bounded, sets OE which raises a line-status interrupt, cleared by reading LSR.
        let big = vec![0u8; INPUT_CAPACITY + 10];
        assert_eq!(s.enqueue_input(&big), INPUT_CAPACITY);
        assert_eq!(s.input_space(), 0);
        assert_eq!(rd(&mut s, IIR_FCR) & 0x0f, IIR_RLSI);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, LSR_OE);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, 0);
        s.reset();
        assert_eq!(s.input_space(), INPUT_CAPACITY);
        assert!(!sink.isa_level(4));
    }

    #[test]
    fn through_a_bus_and_bad_offsets() {
        let sink = Arc::new(RecordingIrqSink::default());
        let out = Shared::default();
        let s = Arc::new(Mutex::new(Serial::new(IsaIrq::new(sink, 4), Some(Box::new(out.clone())))));
        let bus = Bus::new("pio");
        bus.insert(Serial::COM1_BASE, Serial::LEN, Serial::RULES, s.clone(), Serial::REGION).unwrap();
        bus.write_sync(0x3f8, b"X");
        // A word write at 0x3fb hits LCR then MCR.
        bus.write_sync(0x3fb, &[0x03, 0x0b]);
        let mut d = [0u8; 2];
        bus.read_sync(0x3fb, &mut d);
        assert_eq!(d, [0x03, 0x0b]);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"X");
        let mut one = [0u8];
        s.lock().unwrap().read(0, 99, &mut one);
        assert_eq!(one[0], 0xff);
        s.lock().unwrap().write(0, 99, &[1]);
        // No output sink: bytes are discarded quietly.
        let mut quiet = Serial::new(IsaIrq::new(Arc::new(RecordingIrqSink::default()), 4), None);
        quiet.write(0, 0, b"q");
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::irq::RecordingIrqSink;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};
    use crate::snapshot::{SectionReader, Snapshot, SnapshotError};
    use std::sync::Arc;

    fn uart() -> (Serial, Arc<RecordingIrqSink>) {
        let sink = Arc::new(RecordingIrqSink::default());
        (Serial::new(IsaIrq::new(sink.clone(), 4), None), sink)
    }
    fn rd(s: &mut Serial, r: u64) -> u8 {
        let mut d = [0u8];
        s.read(0, r, &mut d);
        d[0]
    }
    fn wr(s: &mut Serial, r: u64, v: u8) {
        s.write(0, r, &[v]);
    }
    #[test]
    fn roundtrip_registers_fifo_and_irq() {
        let (mut a, _) = uart();
        wr(&mut a, LCR, 0x80);
        wr(&mut a, RBR_THR, 0x01);
        wr(&mut a, LCR, 0x03);
        wr(&mut a, IIR_FCR, FCR_FE | 0x40);
        wr(&mut a, SCR, 0x77);
        wr(&mut a, MCR, 0x0b);
        wr(&mut a, IER, IER_RDI);
        a.enqueue_input(b"xyz");
        let blob = payload(&a);

        let (mut b, sink) = uart();
        sink.take();
        load(&mut b, &blob).unwrap();
        assert!(sink.isa_level(4), "pending RX interrupt re-asserted on restore");
        assert_eq!(b.divisor(), 1);
        assert_eq!(rd(&mut b, LCR), 0x03);
        assert_eq!(rd(&mut b, MCR), 0x0b);
        assert_eq!(rd(&mut b, SCR), 0x77);
        assert_eq!(rd(&mut b, IIR_FCR), 0xc0 | IIR_CTI);
        assert_eq!([rd(&mut b, RBR_THR), rd(&mut b, RBR_THR), rd(&mut b, RBR_THR)], *b"xyz");
        assert_eq!(rd(&mut b, LSR) & LSR_DR, 0);
        assert!(!sink.isa_level(4));
    }

    #[test]
    fn corrupt_payloads_rejected_without_change() {
        let (a, _) = uart();
        let good = payload(&a);
        let (mut b, _) = uart();
        wr(&mut b, SCR, 0x55);
        assert_prefixes_fail(&b, &good);
        let mut bad = good.clone();
        bad[0] = 0xff; // IER bits 4..7
        assert!(matches!(load(&mut b, &bad), Err(SnapshotError::BadValue { .. })));
        let mut bad = good.clone();
        bad[10..14].copy_from_slice(&(INPUT_CAPACITY as u32 + 1).to_le_bytes());
        assert!(matches!(load(&mut b, &bad), Err(SnapshotError::TooLarge { .. })));
        assert!(matches!(
            b.load(2, &mut SectionReader::new("serial", &good)),
            Err(SnapshotError::UnsupportedSectionVersion { .. })
        ));
        assert_eq!(rd(&mut b, SCR), 0x55);
    }
}
