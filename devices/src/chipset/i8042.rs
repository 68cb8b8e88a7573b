//! i8042 keyboard controller at 0x60 (data) / 0x64 (status/command), with a PS/2 keyboard and a
//! PS/2 mouse behind it that answer commands but never produce input events.
//!
//! Enough for Linux's `i8042` probe (self test, CTR read/write, AUX loopback and AUX IRQ test,
//! `atkbd`/`psmouse` probing) and SeaBIOS's keyboard init. The mouse is *present* (ID 0x00,
//! a generic PS/2 mouse, like QEMU's without the IntelliMouse knock): Linux's `psmouse` then
//! probes cleanly and registers "PS/2 Generic Mouse"; a missing mouse would cost timeouts.
//!
//! Interrupts: IRQ 1 is high while the output buffer holds a keyboard-side byte and CTR bit 0 is
//! set; IRQ 12 likewise for an AUX byte and CTR bit 1. Lowering and re-raising between bytes
//! gives edge-triggered PICs one edge per byte.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::{AccessRules, IoResult, RegionId};
use crate::irq::IsaIrq;
use crate::platform::{PlatformControl, SystemEvent};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

// Status register.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
/// A2: the last write was to the command port.
const STS_CMD: u8 = 0x08;
/// Keyboard not inhibited (keylock switch "unlocked").
const STS_UNLOCKED: u8 = 0x10;
const STS_AUXB: u8 = 0x20;

// Controller configuration byte (CTR, "command byte").
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Output port: bit 0 = CPU reset line (active low), bit 1 = A20 gate.
const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
/// Power-on output port: reset line inactive, A20 on, remaining bits as QEMU (`KBD_OUT_ONES`).
const OUT_POWER_ON: u8 = 0xcf;

const ACK: u8 = 0xfa;
const RESEND: u8 = 0xfe;
const BAT_OK: u8 = 0xaa;
/// Queue depth of each PS/2 device (QEMU uses 16 for the keyboard's reply queue).
const DEV_QUEUE: usize = 16;

/// A byte waiting for the output buffer, tagged with its source port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OutByte {
    val: u8,
    aux: bool,
}

/// What the next byte written to port 0x60 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataTarget {
    Keyboard,
    /// Controller RAM byte (0x60..0x7f command: byte 0 is the CTR).
    WriteRam(u8),
    WriteOutPort,
    KbdOutBuf,
    AuxOutBuf,
    AuxDevice,
}

/// Keyboard commands that take a parameter byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KbdParam {
    None,
    Leds,
    Typematic,
    ScanSet,
}

#[derive(Debug)]
struct Keyboard {
    q: VecDeque<u8>,
    param: KbdParam,
    scanning: bool,
    scan_set: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard { q: VecDeque::new(), param: KbdParam::None, scanning: true, scan_set: 2 }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.q.len() < DEV_QUEUE {
                self.q.push_back(b);
            }
        }
    }

    fn write(&mut self, v: u8, translate: bool) {
        match std::mem::replace(&mut self.param, KbdParam::None) {
            KbdParam::Leds | KbdParam::Typematic => return self.push(&[ACK]),
            KbdParam::ScanSet => {
                match v {
                    0 => {
                        // Report the current set; translated controllers show set-1 style IDs.
                        let id = match (translate, self.scan_set) {
                            (true, 1) => 0x43,
                            (true, 3) => 0x3f,
                            (true, _) => 0x41,
                            (false, s) => s,
                        };
                        self.push(&[ACK, id]);
                    }
                    1..=3 => {
                        self.scan_set = v;
                        self.push(&[ACK]);
                    }
                    _ => self.push(&[RESEND]),
                }
                return;
            }
            KbdParam::None => {}
        }
        match v {
            0xed => {
                self.param = KbdParam::Leds;
                self.push(&[ACK]);
            }
            0xee => self.push(&[0xee]), // echo
            0xf0 => {
                self.param = KbdParam::ScanSet;
                self.push(&[ACK]);
            }
            // Identify: MF2 keyboard; 0x41 is what the translating controller makes of 0x83.
            0xf2 => self.push(&[ACK, 0xab, if translate { 0x41 } else { 0x83 }]),
            0xf3 => {
                self.param = KbdParam::Typematic;
                self.push(&[ACK]);
            }
            0xf4 => {
                self.scanning = true;
                self.push(&[ACK]);
            }
            0xf5 => {
                self.scanning = false;
                self.push(&[ACK]);
            }
            0xf6 => {
                self.scanning = true;
                self.push(&[ACK]);
            }
            0xf7..=0xfd => self.push(&[ACK]),
            0xfe => self.push(&[ACK]), // resend: nothing was sent that could be corrupt
            0xff => {
                *self = Keyboard::new();
                self.push(&[ACK, BAT_OK]);
            }
            _ => {
                warn_limited!(format!("i8042-kbd-cmd-{v:x}"), "i8042: unknown keyboard command {v:#x}");
                self.push(&[RESEND]);
            }
        }
    }
}

#[derive(Debug)]
struct Mouse {
    q: VecDeque<u8>,
    /// The pending command that takes a parameter (0xe8 resolution, 0xf3 sample rate).
    param: Option<u8>,
    enabled: bool,
    remote: bool,
    wrap: bool,
    scaling21: bool,
    resolution: u8,
    rate: u8,
}

impl Mouse {
    fn new() -> Self {
        Mouse {
            q: VecDeque::new(),
            param: None,
            enabled: false,
            remote: false,
            wrap: false,
            scaling21: false,
            resolution: 2,
            rate: 100,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.q.len() < DEV_QUEUE {
                self.q.push_back(b);
            }
        }
    }

    fn write(&mut self, v: u8) {
        if let Some(cmd) = self.param.take() {
            match cmd {
                0xe8 => self.resolution = v & 3,
                _ => self.rate = v,
            }
            return self.push(&[ACK]);
        }
        // Wrap mode echoes everything except "reset wrap" and "reset".
        if self.wrap && v != 0xec && v != 0xff {
            return self.push(&[v]);
        }
        match v {
            0xe6 => {
                self.scaling21 = false;
                self.push(&[ACK]);
            }
            0xe7 => {
                self.scaling21 = true;
                self.push(&[ACK]);
            }
            0xe8 | 0xf3 => {
                self.param = Some(v);
                self.push(&[ACK]);
            }
            0xe9 => {
                let status =
                    u8::from(self.remote) << 6 | u8::from(self.enabled) << 5 | u8::from(self.scaling21) << 4;
                self.push(&[ACK, status, self.resolution, self.rate]);
            }
            0xea => {
                self.remote = false;
                self.push(&[ACK]);
            }
            // Read data: one empty movement packet (bit 3 is always set in byte 0).
            0xeb => self.push(&[ACK, 0x08, 0, 0]),
            0xec => {
                self.wrap = false;
                self.push(&[ACK]);
            }
            0xee => {
                self.wrap = true;
                self.push(&[ACK]);
            }
            0xf0 => {
                self.remote = true;
                self.push(&[ACK]);
            }
            0xf2 => self.push(&[ACK, 0x00]),
            0xf4 => {
                self.enabled = true;
                self.push(&[ACK]);
            }
            0xf5 => {
                self.enabled = false;
                self.push(&[ACK]);
            }
            0xf6 => {
                let q = std::mem::take(&mut self.q);
                *self = Mouse::new();
                self.q = q;
                self.push(&[ACK]);
            }
            0xff => {
                *self = Mouse::new();
                self.push(&[ACK, BAT_OK, 0x00]);
            }
            _ => {
                warn_limited!(format!("i8042-aux-cmd-{v:x}"), "i8042: unknown mouse command {v:#x}");
                self.push(&[RESEND]);
            }
        }
    }
}

/// The i8042 controller with its keyboard and mouse. One region (see [`I8042::REGION`]).
pub struct I8042 {
    /// Controller RAM; byte 0 is the CTR.
    ram: [u8; 32],
    status: u8,
    outport: u8,
    out: Option<OutByte>,
    /// Last byte read from the data port (what an empty buffer reads as).
    last_out: u8,
    /// Controller-generated bytes (command replies, 0xd2/0xd3 writes), served first.
    ctrl_q: VecDeque<OutByte>,
    target: DataTarget,
    kbd: Keyboard,
    mouse: Mouse,
    kbd_irq: IsaIrq,
    aux_irq: IsaIrq,
    kbd_level: bool,
    aux_level: bool,
    platform: Arc<dyn PlatformControl>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").field("ctr", &self.ram[0]).field("status", &self.status).finish()
    }
}

impl I8042 {
    /// Two 1-byte regions: [`I8042::REGION_DATA`] at [`I8042::DATA_PORT`] (0x60) and
    /// [`I8042::REGION_CMD`] at [`I8042::CMD_PORT`] (0x64), both with [`I8042::RULES`].
    /// (0x61..0x63 are not ours: 0x61 is the PIT/speaker port.)
    pub const REGION_DATA: RegionId = 0;
    pub const REGION_CMD: RegionId = 1;
    pub const DATA_PORT: u64 = 0x60;
    pub const CMD_PORT: u64 = 0x64;
    pub const LEN: u64 = 1;
    /// Byte registers; wider accesses are split into bytes (QEMU: impl 1, valid 1..4).
    pub const RULES: AccessRules = AccessRules::BYTES;
    pub const KBD_IRQ: u8 = 1;
    pub const AUX_IRQ: u8 = 12;

    /// `kbd_irq` is ISA IRQ 1, `aux_irq` ISA IRQ 12; `platform` receives reset requests
    /// (0xfe pulse, output port bit 0 cleared).
    pub fn new(kbd_irq: IsaIrq, aux_irq: IsaIrq, platform: Arc<dyn PlatformControl>) -> Self {
        let mut d = I8042 {
            ram: [0; 32],
            status: 0,
            outport: OUT_POWER_ON,
            out: None,
            last_out: 0,
            ctrl_q: VecDeque::new(),
            target: DataTarget::Keyboard,
            kbd: Keyboard::new(),
            mouse: Mouse::new(),
            kbd_irq,
            aux_irq,
            kbd_level: false,
            aux_level: false,
            platform,
        };
        d.reset();
        d
    }

    /// Power-on state: CTR 0x03 (both interrupts on, as QEMU), buffers empty, A20 on.
    pub fn reset(&mut self) {
        self.ram = [0; 32];
        self.ram[0] = CTR_KBDINT | CTR_AUXINT;
        self.status = STS_CMD | STS_UNLOCKED;
        self.outport = OUT_POWER_ON;
        self.out = None;
        self.last_out = 0;
        self.ctrl_q.clear();
        self.target = DataTarget::Keyboard;
        self.kbd = Keyboard::new();
        self.mouse = Mouse::new();
        self.update_irq();
    }

    /// Queues scancodes from the keyboard (for a future input source, e.g. QMP `send-key`).
    /// Dropped while the keyboard has scanning disabled (0xf5) or its queue is full.
    pub fn inject_keyboard(&mut self, scancodes: &[u8]) {
        if self.kbd.scanning {
            self.kbd.push(scancodes);
            self.refill();
        }
    }

    /// Whether the output port's A20 gate is on.
    pub fn a20(&self) -> bool {
        self.outport & OUT_A20 != 0
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn set_ctr(&mut self, v: u8) {
        self.ram[0] = v;
        // The status SYS flag mirrors the CTR's (QEMU `KBD_CCMD_WRITE_MODE`).
        self.status = (self.status & !STS_SYS) | (v & CTR_SYS);
    }

    fn push_ctrl(&mut self, val: u8, aux: bool) {
        if self.ctrl_q.len() < DEV_QUEUE {
            self.ctrl_q.push_back(OutByte { val, aux });
        }
    }

    /// Moves the next pending byte into the empty output buffer and updates the IRQ lines.
    fn refill(&mut self) {
        if self.out.is_none() {
            self.out = if let Some(b) = self.ctrl_q.pop_front() {
                Some(b)
            } else if self.ctr() & CTR_KBDDIS == 0 && !self.kbd.q.is_empty() {
                self.kbd.q.pop_front().map(|val| OutByte { val, aux: false })
            } else if self.ctr() & CTR_AUXDIS == 0 && !self.mouse.q.is_empty() {
                self.mouse.q.pop_front().map(|val| OutByte { val, aux: true })
            } else {
                None
            };
        }
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let (kbd, aux) = match self.out {
            Some(b) if b.aux => (false, self.ctr() & CTR_AUXINT != 0),
            Some(_) => (self.ctr() & CTR_KBDINT != 0, false),
            None => (false, false),
        };
        if kbd != self.kbd_level {
            self.kbd_level = kbd;
            self.kbd_irq.set_level(kbd);
        }
        if aux != self.aux_level {
            self.aux_level = aux;
            self.aux_irq.set_level(aux);
        }
    }

    fn status(&self) -> u8 {
        let mut s = self.status & !(STS_OBF | STS_AUXB);
        if let Some(b) = self.out {
            s |= STS_OBF;
            if b.aux {
                s |= STS_AUXB;
            }
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.take() {
            self.last_out = b.val;
            // Lower the line for the byte just consumed before raising it for the next one.
            self.update_irq();
            self.refill();
        }
        self.last_out
    }

    fn write_outport(&mut self, v: u8) {
        self.outport = v;
        if v & OUT_RESET == 0 {
            log::info!("i8042: output port reset line asserted; requesting system reset");
            self.platform.request(SystemEvent::Reset);
        }
    }

    fn command(&mut self, cmd: u8) {
        self.target = DataTarget::Keyboard;
        match cmd {
            0x20..=0x3f => {
                let v = self.ram[usize::from(cmd & 0x1f)];
                self.push_ctrl(v, false);
            }
            0x60..=0x7f => self.target = DataTarget::WriteRam(cmd & 0x1f),
            0xa7 => self.set_ctr(self.ctr() | CTR_AUXDIS),
            0xa8 => self.set_ctr(self.ctr() & !CTR_AUXDIS),
            0xa9 | 0xab => self.push_ctrl(0x00, false), // interface tests pass
            0xaa => {
                self.status |= STS_SYS;
                self.push_ctrl(0x55, false);
            }
            0xad => self.set_ctr(self.ctr() | CTR_KBDDIS),
            0xae => self.set_ctr(self.ctr() & !CTR_KBDDIS),
            0xc0 => self.push_ctrl(0x80, false), // input port: keyboard not inhibited
            0xd0 => {
                // Bits 4/5 report the output buffer state.
                let mut v = self.outport & !0x30;
                if let Some(b) = self.out {
                    v |= if b.aux { 0x20 } else { 0x10 };
                }
                self.push_ctrl(v, false);
            }
            0xd1 => self.target = DataTarget::WriteOutPort,
            0xd2 => self.target = DataTarget::KbdOutBuf,
            0xd3 => self.target = DataTarget::AuxOutBuf,
            0xd4 => self.target = DataTarget::AuxDevice,
            0xdd => self.outport &= !OUT_A20,
            0xdf => self.outport |= OUT_A20,
            0xe0 => self.push_ctrl(0x00, false),
            0xf0..=0xff => {
                // Pulse output lines whose mask bit is 0; bit 0 is the CPU reset line.
                if cmd & 0x01 == 0 {
                    log::info!("i8042: reset pulse command {cmd:#x}; requesting system reset");
                    self.platform.request(SystemEvent::Reset);
                }
            }
            _ => {
                warn_limited!(format!("i8042-cmd-{cmd:x}"), "i8042: unsupported controller command {cmd:#x}");
            }
        }
        self.refill();
    }

    fn write_data(&mut self, v: u8) {
        match std::mem::replace(&mut self.target, DataTarget::Keyboard) {
            DataTarget::Keyboard => {
                // Talking to the keyboard re-enables its interface (as real controllers and QEMU).
                self.set_ctr(self.ctr() & !CTR_KBDDIS);
                let xlate = self.ctr() & CTR_XLATE != 0;
                self.kbd.write(v, xlate);
            }
            DataTarget::WriteRam(0) => self.set_ctr(v),
            DataTarget::WriteRam(i) => self.ram[usize::from(i)] = v,
            DataTarget::WriteOutPort => self.write_outport(v),
            DataTarget::KbdOutBuf => self.push_ctrl(v, false),
            DataTarget::AuxOutBuf => self.push_ctrl(v, true),
            DataTarget::AuxDevice => {
                self.set_ctr(self.ctr() & !CTR_AUXDIS);
                self.mouse.write(v);
            }
        }
        self.refill();
    }
}

impl crate::bus::BusDevice for I8042 {
    fn read(&mut self, region: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let v = match (region, offset) {
            (Self::REGION_DATA, 0) => self.read_data(),
            (Self::REGION_CMD, 0) => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        IoResult::Done
    }

    fn write(&mut self, region: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let Some(&v) = data.first() else { return IoResult::Done };
        match (region, offset) {
            (Self::REGION_DATA, 0) => {
                self.status &= !STS_CMD;
                self.write_data(v);
            }
            (Self::REGION_CMD, 0) => {
                self.status |= STS_CMD;
                self.command(v);
            }
            _ => {}
        }
        IoResult::Done
    }
}

// ---- save/restore: section "i8042", version 1 ----

/// Everything but the IRQ/platform bindings. IRQ 1/12 levels are recomputed and driven on
/// restore; restoring an output port with the reset line low does not reset the machine.
struct I8042State {
    ram: [u8; 32],
    status: u8,
    outport: u8,
    out: Option<OutByte>,
    last_out: u8,
    ctrl_q: VecDeque<OutByte>,
    target: DataTarget,
    kbd: Keyboard,
    mouse: Mouse,
}

fn put_out_byte(w: &mut SectionWriter, b: OutByte) {
    w.put_u8(b.val);
    w.put_bool(b.aux);
}

fn get_out_byte(r: &mut SectionReader<'_>) -> Result<OutByte, SnapshotError> {
    Ok(OutByte { val: r.get_u8()?, aux: r.get_bool()? })
}

/// A queue of at most [`DEV_QUEUE`] entries: u8 count, then the entries.
fn get_queue<T>(
    r: &mut SectionReader<'_>,
    mut item: impl FnMut(&mut SectionReader<'_>) -> Result<T, SnapshotError>,
) -> Result<VecDeque<T>, SnapshotError> {
    let n = usize::from(r.get_u8()?);
    if n > DEV_QUEUE {
        return Err(r.bad(format!("queue of {n} bytes")));
    }
    (0..n).map(|_| item(r)).collect()
}

impl Snapshot for I8042 {
    fn section(&self) -> &'static str {
        "i8042"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_raw(&self.ram);
        w.put_u8(self.status);
        w.put_u8(self.outport);
        w.put_bool(self.out.is_some());
        put_out_byte(w, self.out.unwrap_or(OutByte { val: 0, aux: false }));
        w.put_u8(self.last_out);
        // Queues are bounded by DEV_QUEUE (16).
        w.put_u8(self.ctrl_q.len() as u8);
        for b in &self.ctrl_q {
            put_out_byte(w, *b);
        }
        let (tag, arg) = match self.target {
            DataTarget::Keyboard => (0, 0),
            DataTarget::WriteRam(i) => (1, i),
            DataTarget::WriteOutPort => (2, 0),
            DataTarget::KbdOutBuf => (3, 0),
            DataTarget::AuxOutBuf => (4, 0),
            DataTarget::AuxDevice => (5, 0),
        };
        w.put_u8(tag);
        w.put_u8(arg);
        let k = &self.kbd;
        w.put_u8(k.q.len() as u8);
        for b in &k.q {
            w.put_u8(*b);
        }
        w.put_u8(match k.param {
            KbdParam::None => 0,
            KbdParam::Leds => 1,
            KbdParam::Typematic => 2,
            KbdParam::ScanSet => 3,
        });
        w.put_bool(k.scanning);
        w.put_u8(k.scan_set);
        let m = &self.mouse;
        w.put_u8(m.q.len() as u8);
        for b in &m.q {
            w.put_u8(*b);
        }
        w.put_u8(m.param.unwrap_or(0));
        for b in [m.enabled, m.remote, m.wrap, m.scaling21] {
            w.put_bool(b);
        }
        w.put_u8(m.resolution);
        w.put_u8(m.rate);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        let ram = r.get_array::<32>()?;
        let status = r.get_u8()?;
        let outport = r.get_u8()?;
        let has_out = r.get_bool()?;
        let out = get_out_byte(r)?;
        let last_out = r.get_u8()?;
        let ctrl_q = get_queue(r, get_out_byte)?;
        let target = match (r.get_u8()?, r.get_u8()?) {
            (0, 0) => DataTarget::Keyboard,
            (1, i) if i < 32 => DataTarget::WriteRam(i),
            (2, 0) => DataTarget::WriteOutPort,
            (3, 0) => DataTarget::KbdOutBuf,
            (4, 0) => DataTarget::AuxOutBuf,
            (5, 0) => DataTarget::AuxDevice,
            (t, a) => return Err(r.bad(format!("data port target {t}/{a}"))),
        };
        let q = get_queue(r, |r| r.get_u8())?;
        let param = match r.get_u8()? {
            0 => KbdParam::None,
            1 => KbdParam::Leds,
            2 => KbdParam::Typematic,
            3 => KbdParam::ScanSet,
            v => return Err(r.bad(format!("keyboard parameter state {v}"))),
        };
        let scanning = r.get_bool()?;
        let scan_set = r.get_u8()?;
        if !(1..=3).contains(&scan_set) {
            return Err(r.bad(format!("scan set {scan_set}")));
        }
        let kbd = Keyboard { q, param, scanning, scan_set };
        let q = get_queue(r, |r| r.get_u8())?;
        let param = match r.get_u8()? {
            0 => None,
            c @ (0xe8 | 0xf3) => Some(c),
            v => return Err(r.bad(format!("mouse parameter command {v:#x}"))),
        };
        let (enabled, remote, wrap, scaling21) = (r.get_bool()?, r.get_bool()?, r.get_bool()?, r.get_bool()?);
        let resolution = r.get_u8()?;
        if resolution > 3 {
            return Err(r.bad(format!("mouse resolution {resolution}")));
        }
        let rate = r.get_u8()?;
        let mouse = Mouse { q, param, enabled, remote, wrap, scaling21, resolution, rate };
        Ok(PendingState::new(I8042State {
            ram,
            status,
            outport,
            out: has_out.then_some(out),
            last_out,
            ctrl_q,
            target,
            kbd,
            mouse,
        }))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        let st: I8042State = state.downcast(self.section())?;
        self.ram = st.ram;
        self.status = st.status;
        self.outport = st.outport;
        self.out = st.out;
        self.last_out = st.last_out;
        self.ctrl_q = st.ctrl_q;
        self.target = st.target;
        self.kbd = st.kbd;
        self.mouse = st.mouse;
        self.update_irq();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::irq::{IrqEvent, RecordingIrqSink};
    use crate::platform::RecordingPlatform;
    use std::sync::Mutex;

    struct Rig {
        dev: I8042,
        sink: Arc<RecordingIrqSink>,
        plat: Arc<RecordingPlatform>,
    }

    fn rig() -> Rig {
        let sink = Arc::new(RecordingIrqSink::default());
        let plat = Arc::new(RecordingPlatform::default());
        let dev = I8042::new(IsaIrq::new(sink.clone(), 1), IsaIrq::new(sink.clone(), 12), plat.clone());
        sink.take();
        Rig { dev, sink, plat }
    }

    impl Rig {
        fn cmd(&mut self, v: u8) {
            self.dev.write(I8042::REGION_CMD, 0, &[v]);
        }
        fn put(&mut self, v: u8) {
            self.dev.write(I8042::REGION_DATA, 0, &[v]);
        }
        fn status(&mut self) -> u8 {
            let mut d = [0];
            self.dev.read(I8042::REGION_CMD, 0, &mut d);
            d[0]
        }
        fn get(&mut self) -> u8 {
            let mut d = [0];
            self.dev.read(I8042::REGION_DATA, 0, &mut d);
            d[0]
        }
        /// Linux's i8042_flush: read while OBF, return what came out.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = vec![];
            while self.status() & STS_OBF != 0 && v.len() < 64 {
                v.push(self.get());
            }
            v
        }
    }

    #[test]
    fn self_test_and_interface_tests() {
        let mut r = rig();
        assert_eq!(r.status() & (STS_OBF | STS_SYS), 0);
        assert_eq!(r.status() & STS_UNLOCKED, STS_UNLOCKED);
        r.cmd(0xaa);
        assert_eq!(r.status() & (STS_OBF | STS_SYS | STS_CMD), STS_OBF | STS_SYS | STS_CMD);
        assert_eq!(r.get(), 0x55);
        assert_eq!(r.status() & STS_OBF, 0);
        r.cmd(0xab);
        assert_eq!(r.drain(), vec![0x00]);
        r.cmd(0xa9);
        assert_eq!(r.drain(), vec![0x00]);
        // Empty buffer reads the last byte again, not garbage.
        assert_eq!(r.get(), 0x00);
    }

    #[test]
    fn reset_paths() {
        let mut r = rig();
        r.cmd(0xfe);
        assert_eq!(*r.plat.events.lock().unwrap(), vec![SystemEvent::Reset]);
        r.cmd(0xff); // no line pulsed
        r.cmd(0xd1);
        r.put(0x03); // reset line high (inactive), A20 on
        assert!(r.dev.a20());
        r.cmd(0xd1);
        r.put(0x01); // A20 off
        assert!(!r.dev.a20());
        assert_eq!(r.plat.events.lock().unwrap().len(), 1);
        r.cmd(0xd1);
        r.put(0x02); // bit 0 low: reset
        assert_eq!(r.plat.events.lock().unwrap().len(), 2);
        r.cmd(0xdf);
        assert!(r.dev.a20());
        r.cmd(0xd0);
        assert_eq!(r.get() & 0x03, 0x02);
    }

    #[test]
    fn linux_probe_sequence() {
        let mut r = rig();
        // i8042_controller_check: flush.
        assert!(r.drain().is_empty());
        // i8042_controller_selftest.
        r.cmd(0xaa);
        assert_eq!(r.drain(), vec![0x55]);
        // i8042_controller_init: read CTR twice until stable, disable kbd, write back.
        r.cmd(0x20);
        let ctr = r.get();
        r.cmd(0x20);
        assert_eq!(r.get(), ctr);
        let ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        r.cmd(0x60);
        r.put(ctr);
        r.cmd(0x20);
        assert_eq!(r.get(), ctr);
        // i8042_check_aux: loopback test, must come back as AUX data.
        r.cmd(0xd3);
        r.put(0x5a);
        assert_eq!(r.status() & (STS_OBF | STS_AUXB), STS_OBF | STS_AUXB);
        assert_eq!(r.get(), 0x5a);
        // Bit assignment test: 0xa7 sets AUXDIS, 0xa8 clears it.
        r.cmd(0xa7);
        r.cmd(0x20);
        assert_ne!(r.get() & CTR_AUXDIS, 0);
        r.cmd(0xa8);
        r.cmd(0x20);
        assert_eq!(r.get() & CTR_AUXDIS, 0);
        // AUX IRQ test: enable AUX interrupt, loop 0xa5, IRQ 12 must fire.
        r.cmd(0x60);
        r.put((ctr & !CTR_AUXDIS) | CTR_AUXINT);
        r.sink.take();
        r.cmd(0xd3);
        r.put(0xa5);
        assert!(r.sink.isa_level(12));
        assert!(!r.sink.isa_level(1));
        assert_eq!(r.get(), 0xa5);
        assert!(!r.sink.isa_level(12));
        // Enable keyboard interrupts and probe the keyboard (atkbd: GETID then enable).
        r.cmd(0x60);
        r.put(CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE);
        r.sink.take();
        r.put(0xf2);
        assert!(r.sink.isa_level(1));
        assert_eq!(r.drain(), vec![ACK, 0xab, 0x41]);
        // One edge per byte: high, low, high, low, high, low.
        let ev = r.sink.take();
        assert_eq!(ev.iter().filter(|e| **e == IrqEvent::Isa(1, true)).count(), 3);
        r.put(0xf5);
        r.put(0xed);
        r.put(0x00);
        r.put(0xf3);
        r.put(0x00);
        r.put(0xf4);
        assert_eq!(r.drain(), vec![ACK; 6]);
        r.put(0xff);
        assert_eq!(r.drain(), vec![ACK, BAT_OK]);
        // psmouse probe: reset, GETID, status request.
        r.cmd(0xd4);
        r.put(0xff);
        assert_eq!(r.drain(), vec![ACK, BAT_OK, 0x00]);
        r.cmd(0xd4);
        r.put(0xf2);
        assert_eq!(r.drain(), vec![ACK, 0x00]);
        r.cmd(0xd4);
        r.put(0xe8);
        r.cmd(0xd4);
        r.put(0x03);
        r.cmd(0xd4);
        r.put(0xe9);
        assert_eq!(r.drain(), vec![ACK, ACK, ACK, 0x00, 0x03, 100]);
    }

    #[test]
    fn interrupts_follow_ctr_and_disable_bits() {
        let mut r = rig();
        r.cmd(0x60);
        r.put(0x00); // no interrupts
        r.sink.take();
        r.cmd(0xaa);
        assert!(r.sink.take().is_empty());
        assert_eq!(r.get(), 0x55);
        // Keyboard interface disabled: keyboard bytes wait until re-enabled.
        r.cmd(0x60);
        r.put(CTR_KBDINT);
        r.put(0xf4); // re-enables the interface itself
        assert_eq!(r.drain(), vec![ACK]);
        r.cmd(0xad);
        r.dev.inject_keyboard(&[0x1c]);
        assert!(r.drain().is_empty());
        r.cmd(0xae);
        assert_eq!(r.drain(), vec![0x1c]);
        // 0xd2 writes a keyboard-side byte.
        r.cmd(0xd2);
        r.put(0x77);
        assert_eq!(r.status() & STS_AUXB, 0);
        assert_eq!(r.get(), 0x77);
    }

    #[test]
    fn garbage_commands_do_not_panic_and_queues_are_bounded() {
        let mut r = rig();
        for c in 0..=0xffu8 {
            if c & 0xf0 == 0xf0 {
                continue;
            }
            r.cmd(c);
            r.put(c);
        }
        for _ in 0..100 {
            r.put(0xf2);
            r.cmd(0xd4);
            r.put(0xe9);
        }
        let out = r.drain();
        assert!(out.len() <= 3 * DEV_QUEUE + 1, "{}", out.len());
        let mut d = [0u8];
        r.dev.read(7, 3, &mut d);
        assert_eq!(d[0], 0xff);
        r.dev.reset();
        assert!(r.drain().is_empty());
        r.cmd(0x20);
        assert_eq!(r.get(), 0x03);
    }

    #[test]
    fn through_a_bus() {
        let sink = Arc::new(RecordingIrqSink::default());
        let plat = Arc::new(RecordingPlatform::default());
        let dev = Arc::new(Mutex::new(I8042::new(
            IsaIrq::new(sink.clone(), 1),
            IsaIrq::new(sink.clone(), 12),
            plat.clone(),
        )));
        let bus = Bus::new("pio");
        bus.insert(I8042::DATA_PORT, I8042::LEN, I8042::RULES, dev.clone(), I8042::REGION_DATA).unwrap();
        bus.insert(I8042::CMD_PORT, I8042::LEN, I8042::RULES, dev.clone(), I8042::REGION_CMD).unwrap();
        bus.write_sync(0x64, &[0xaa]);
        let mut d = [0u8];
        bus.read_sync(0x64, &mut d);
        assert_eq!(d[0] & STS_OBF, STS_OBF);
        bus.read_sync(0x60, &mut d);
        assert_eq!(d[0], 0x55);
        bus.write_sync(0x64, &[0xfe]);
        assert_eq!(*plat.events.lock().unwrap(), vec![SystemEvent::Reset]);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::irq::RecordingIrqSink;
    use crate::platform::RecordingPlatform;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    fn dev() -> (I8042, Arc<RecordingIrqSink>, Arc<RecordingPlatform>) {
        let sink = Arc::new(RecordingIrqSink::default());
        let p = Arc::new(RecordingPlatform::default());
        let d = I8042::new(IsaIrq::new(sink.clone(), 1), IsaIrq::new(sink.clone(), 12), p.clone());
        (d, sink, p)
    }
    fn data(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(I8042::REGION_DATA, 0, &mut b);
        b[0]
    }
    fn status(d: &mut I8042) -> u8 {
        let mut b = [0u8];
        d.read(I8042::REGION_CMD, 0, &mut b);
        b[0]
    }

    #[test]
    fn roundtrip_queues_modes_and_irq() {
        let (mut a, _, _) = dev();
        // Mouse: enable, set resolution 3, then leave "set sample rate" pending its parameter.
        for v in [0xf4u8, 0xe8, 0x03, 0xf3] {
            a.write(I8042::REGION_CMD, 0, &[0xd4]);
            a.write(I8042::REGION_DATA, 0, &[v]);
        }
        // Keyboard: identify (ACK, AB, 41 queued), then the controller command 0x60 pending.
        a.write(I8042::REGION_DATA, 0, &[0xf2]);
        a.write(I8042::REGION_CMD, 0, &[0xdd]); // A20 off
        a.write(I8042::REGION_CMD, 0, &[0x60]);
        let blob = payload(&a);

        let (mut b, sink, p) = dev();
        sink.take();
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        assert!(!b.a20());
        assert!(sink.isa_level(12), "AUX byte in the output buffer re-asserts IRQ 12");
        assert_eq!(status(&mut b) & (STS_OBF | STS_AUXB), STS_OBF | STS_AUXB);
        // The same bytes in the same order as the original would deliver.
        let drain = |d: &mut I8042| {
            let mut got = vec![];
            while status(d) & STS_OBF != 0 {
                got.push(data(d));
            }
            got
        };
        let got = drain(&mut b);
        assert_eq!(got, drain(&mut a));
        assert_eq!(got, vec![ACK, ACK, 0xab, 0x83, ACK, ACK, ACK]);
        // The pending 0x60 takes the next data byte as the CTR.
        b.write(I8042::REGION_DATA, 0, &[0x00]);
        b.write(I8042::REGION_CMD, 0, &[0x20]);
        assert_eq!(data(&mut b), 0x00);
        // The mouse still waits for its sample rate, then reports its state.
        b.write(I8042::REGION_CMD, 0, &[0xd4]);
        b.write(I8042::REGION_DATA, 0, &[40]);
        b.write(I8042::REGION_CMD, 0, &[0xd4]);
        b.write(I8042::REGION_DATA, 0, &[0xe9]);
        let mut got = vec![];
        while status(&mut b) & STS_OBF != 0 {
            got.push(data(&mut b));
        }
        assert_eq!(got, vec![ACK, ACK, 0x20, 3, 40]);
        assert!(p.events.lock().unwrap().is_empty());
    }

    #[test]
    fn bad_values_rejected() {
        let (a, _, _) = dev();
        let good = payload(&a);
        let (mut b, _, _) = dev();
        // Layout: ram 32, status, outport, has_out, out(2), last_out, ctrl_q len at 38.
        let mut bad = good.clone();
        bad[38] = 17;
        assert!(load(&mut b, &bad).is_err());
        let mut bad = good.clone();
        bad[39] = 9; // target tag
        assert!(load(&mut b, &bad).is_err());
        let mut bad = good.clone();
        bad[34] = 2; // has_out is not a bool
        assert!(load(&mut b, &bad).is_err());
        load(&mut b, &good).unwrap();
    }
}
