//! Small legacy ports: the PS/2 system control port A (0x92), the firmware debug console (0x402,
//! optionally 0xe9) and the POST code port (0x80).

use std::io::Write;
use std::sync::Arc;

use crate::bus::{AccessRules, IoResult, RegionId};
use crate::platform::{PlatformControl, SystemEvent};
use crate::snapshot::{check_version, PendingState, SectionReader, SectionWriter, Snapshot, SnapshotError};
use crate::warn_limited;

fn put_byte(data: &mut [u8], v: u8) {
    data.fill(0);
    if let Some(b) = data.first_mut() {
        *b = v;
    }
}

/// Port 0x92 (system control port A): bit 1 drives A20, a 0→1 edge on bit 0 resets the system,
/// reads return the last value written.
pub struct ResetPort92 {
    val: u8,
    platform: Arc<dyn PlatformControl>,
}

impl std::fmt::Debug for ResetPort92 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResetPort92({:#x})", self.val)
    }
}

impl ResetPort92 {
    /// Region 0: port 0x92, 1 byte.
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0x92;
    pub const LEN: u64 = 1;
    pub const RULES: AccessRules = AccessRules::BYTES;

    pub fn new(platform: Arc<dyn PlatformControl>) -> Self {
        ResetPort92 { val: 0, platform }
    }

    /// Clears the reset bit so the next 0→1 edge resets again; A20 keeps its state (as QEMU).
    pub fn reset(&mut self) {
        self.val &= !0x01;
    }

    pub fn a20(&self) -> bool {
        self.val & 0x02 != 0
    }
}

impl crate::bus::BusDevice for ResetPort92 {
    fn read(&mut self, _region: RegionId, _offset: u64, data: &mut [u8]) -> IoResult {
        put_byte(data, self.val);
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, _offset: u64, data: &[u8]) -> IoResult {
        let Some(&v) = data.first() else { return IoResult::Done };
        let old = self.val;
        self.val = v;
        if v & 0x01 != 0 && old & 0x01 == 0 {
            log::info!("port 0x92: fast reset requested");
            self.platform.request(SystemEvent::Reset);
        }
        IoResult::Done
    }
}

/// Section "port92", version 1: the register value. Restoring never requests a reset.
impl Snapshot for ResetPort92 {
    fn section(&self) -> &'static str {
        "port92"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_u8(self.val);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        Ok(PendingState::new(r.get_u8()?))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        self.val = state.downcast(self.section())?;
        Ok(())
    }
}

/// Section "postcode", version 1: the last POST code.
impl Snapshot for PostCode {
    fn section(&self) -> &'static str {
        "postcode"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut SectionWriter) {
        w.put_u8(self.last);
    }
    fn decode(&self, version: u32, r: &mut SectionReader<'_>) -> Result<PendingState, SnapshotError> {
        check_version(r, version, 1)?;
        Ok(PendingState::new(r.get_u8()?))
    }
    fn apply(&mut self, state: PendingState) -> Result<(), SnapshotError> {
        self.last = state.downcast(self.section())?;
        Ok(())
    }
}

/// Longest line kept before it is logged anyway (a guest spewing bytes without newlines must not
/// grow our memory).
const MAX_LINE: usize = 4096;

/// The QEMU/Bochs-style debug console: every byte written is a character of firmware output.
/// Lines are logged at info level with target `firmware`, and raw bytes are appended to an
/// optional sink (the machine's firmware log file). Reads return 0xe9, which SeaBIOS and OVMF
/// check to detect the port.
pub struct DebugCon {
    /// One line buffer per region, so 0x402 and 0xe9 output do not interleave mid-line.
    lines: [Vec<u8>; 2],
    sink: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for DebugCon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugCon").field("has_sink", &self.sink.is_some()).finish()
    }
}

impl DebugCon {
    /// Region 0: port 0x402 (SeaBIOS/OVMF debug output), 1 byte.
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0x402;
    /// Region 1 (optional, KVM only; Xen handles 0xe9 itself): port 0xe9, 1 byte.
    pub const REGION_E9: RegionId = 1;
    pub const BASE_E9: u64 = 0xe9;
    pub const LEN: u64 = 1;
    pub const RULES: AccessRules = AccessRules::BYTES;
    /// The presence-check value reads return.
    pub const READBACK: u8 = 0xe9;

    pub fn new(sink: Option<Box<dyn Write + Send>>) -> Self {
        DebugCon { lines: [Vec::new(), Vec::new()], sink }
    }

    /// Logs any partial lines (the machine calls this on reset and at exit).
    pub fn flush(&mut self) {
        for i in 0..self.lines.len() {
            self.emit(i);
        }
        if let Some(s) = self.sink.as_mut() {
            if let Err(e) = s.flush() {
                warn_limited!("debugcon-flush", "debugcon: flushing the firmware log failed: {e}");
            }
        }
    }

    /// Flushes partial output; the port itself has no state.
    pub fn reset(&mut self) {
        self.flush();
    }

    fn emit(&mut self, i: usize) {
        let Some(buf) = self.lines.get_mut(i) else { return };
        if buf.is_empty() {
            return;
        }
        let line = String::from_utf8_lossy(buf);
        log::info!(target: "firmware", "{}", line.trim_end_matches('\r'));
        buf.clear();
    }

    fn byte(&mut self, region: RegionId, v: u8) {
        if let Some(s) = self.sink.as_mut() {
            if let Err(e) = s.write_all(&[v]) {
                warn_limited!("debugcon-write", "debugcon: writing the firmware log failed: {e}");
            }
            if v == b'\n' {
                if let Err(e) = s.flush() {
                    warn_limited!("debugcon-flush", "debugcon: flushing the firmware log failed: {e}");
                }
            }
        }
        let i = usize::from(region == Self::REGION_E9);
        if v == b'\n' {
            self.emit(i);
            return;
        }
        self.lines[i].push(v);
        if self.lines[i].len() >= MAX_LINE {
            self.emit(i);
        }
    }
}

impl Drop for DebugCon {
    fn drop(&mut self) {
        self.flush();
    }
}

impl crate::bus::BusDevice for DebugCon {
    fn read(&mut self, _region: RegionId, _offset: u64, data: &mut [u8]) -> IoResult {
        put_byte(data, Self::READBACK);
        IoResult::Done
    }

    fn write(&mut self, region: RegionId, _offset: u64, data: &[u8]) -> IoResult {
        if let Some(&v) = data.first() {
            self.byte(region, v);
        }
        IoResult::Done
    }
}

/// POST code port 0x80: writes are recorded (debug log), reads return 0xff as on QEMU. Guests
/// also write it as an I/O delay, so it must be cheap and silent.
#[derive(Debug, Default)]
pub struct PostCode {
    last: u8,
}

impl PostCode {
    /// Region 0: port 0x80, 1 byte.
    pub const REGION: RegionId = 0;
    pub const BASE: u64 = 0x80;
    pub const LEN: u64 = 1;
    pub const RULES: AccessRules = AccessRules::BYTES;

    pub fn new() -> Self {
        PostCode::default()
    }

    /// The last POST code written.
    pub fn last(&self) -> u8 {
        self.last
    }

    pub fn reset(&mut self) {
        self.last = 0;
    }
}

impl crate::bus::BusDevice for PostCode {
    fn read(&mut self, _region: RegionId, _offset: u64, data: &mut [u8]) -> IoResult {
        data.fill(0xff);
        IoResult::Done
    }

    fn write(&mut self, _region: RegionId, _offset: u64, data: &[u8]) -> IoResult {
        if let Some(&v) = data.first() {
            if v != self.last {
                log::trace!("POST code {v:#04x}");
            }
            self.last = v;
        }
        IoResult::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDevice};
    use crate::platform::RecordingPlatform;
    use std::sync::Mutex;

    use crate::testutil::SharedBuf as Shared;

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("disk full"))
        }
    }

    #[test]
    fn port92_edge_reset_and_a20() {
        let plat = Arc::new(RecordingPlatform::default());
        let mut p = ResetPort92::new(plat.clone());
        p.write(0, 0, &[0x02]);
        assert!(p.a20());
        assert!(plat.events.lock().unwrap().is_empty());
        p.write(0, 0, &[0x03]);
        assert_eq!(*plat.events.lock().unwrap(), vec![SystemEvent::Reset]);
        // Level held high: no further reset.
        p.write(0, 0, &[0x03]);
        assert_eq!(plat.events.lock().unwrap().len(), 1);
        let mut d = [0u8];
        p.read(0, 0, &mut d);
        assert_eq!(d[0], 0x03);
        p.reset();
        p.read(0, 0, &mut d);
        assert_eq!(d[0], 0x02);
        p.write(0, 0, &[0x01]);
        assert_eq!(plat.events.lock().unwrap().len(), 2);
    }

    #[test]
    fn debugcon_sink_and_readback() {
        let out = Shared::default();
        let dev = Arc::new(Mutex::new(DebugCon::new(Some(Box::new(out.clone())))));
        let bus = Bus::new("pio");
        bus.insert(DebugCon::BASE, DebugCon::LEN, DebugCon::RULES, dev.clone(), DebugCon::REGION).unwrap();
        bus.insert(DebugCon::BASE_E9, DebugCon::LEN, DebugCon::RULES, dev.clone(), DebugCon::REGION_E9)
            .unwrap();
        let mut d = [0u8];
        bus.read_sync(0x402, &mut d);
        assert_eq!(d[0], 0xe9);
        for &b in b"SeaBIOS (version 1.16)\r\n" {
            bus.write_sync(0x402, &[b]);
        }
        bus.write_sync(0xe9, b"x");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"SeaBIOS (version 1.16)\r\nx");
        // An endless line is cut, not buffered forever.
        for _ in 0..(MAX_LINE * 2 + 5) {
            bus.write_sync(0x402, b"a");
        }
        assert!(dev.lock().unwrap().lines[0].len() < MAX_LINE);
        dev.lock().unwrap().reset();
        assert!(dev.lock().unwrap().lines.iter().all(|l| l.is_empty()));
        // A failing sink only warns.
        let mut b = DebugCon::new(Some(Box::new(Broken)));
        b.write(0, 0, b"z");
        b.write(0, 0, b"\n");
        let mut none = DebugCon::new(None);
        none.write(0, 0, &[0xff]);
    }

    #[test]
    fn postcode() {
        let mut p = PostCode::new();
        p.write(0, 0, &[0x42]);
        assert_eq!(p.last(), 0x42);
        let mut d = [0u8];
        p.read(0, 0, &mut d);
        assert_eq!(d[0], 0xff);
        p.reset();
        assert_eq!(p.last(), 0);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::platform::RecordingPlatform;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    #[test]
    fn port92_roundtrip_without_reset() {
        let p = Arc::new(RecordingPlatform::default());
        let mut a = ResetPort92::new(p.clone());
        a.write(0, 0, &[0x03]);
        p.events.lock().unwrap().clear();
        let blob = payload(&a);
        let mut b = ResetPort92::new(p.clone());
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        assert!(b.a20());
        let mut d = [0u8];
        b.read(0, 0, &mut d);
        assert_eq!(d[0], 0x03);
        assert!(p.events.lock().unwrap().is_empty(), "restore must not reset the machine");
        let mut pc = PostCode::new();
        pc.write(0, 0, &[0x42]);
        let mut pc2 = PostCode::new();
        load(&mut pc2, &payload(&pc)).unwrap();
        assert_eq!(pc2.last(), 0x42);
    }
}
