//! i440FX host bridge (00:00.0): identity, PAM shadowing control and the SMRAM register.

use std::sync::Arc;

use crate::platform::{PamAttr, ShadowControl};

use super::{ConfigSpace, PciFunction, PciHeader, DEFAULT_SUBSYSTEM_ID, DEFAULT_SUBSYSTEM_VENDOR_ID};

/// PAM0..PAM6.
pub const I440FX_PAM: u16 = 0x59;
pub const I440FX_PAM_COUNT: usize = 7;
pub const I440FX_SMRAM: u16 = 0x72;
/// Number of PAM segments (see [`crate::platform::pam_segment`]).
pub const PAM_SEGMENTS: usize = 13;

const SMRAM_D_OPEN: u8 = 0x40;
const SMRAM_D_CLS: u8 = 0x20;
const SMRAM_D_LCK: u8 = 0x10;
const SMRAM_G_SMRAME: u8 = 0x08;
/// C_BASE_SEG = 010: SMRAM at 0xA0000 (hard-wired).
const SMRAM_C_BASE_SEG: u8 = 0x02;

pub struct I440fxHostBridge {
    cs: ConfigSpace,
    shadow: Arc<dyn ShadowControl>,
}

impl std::fmt::Debug for I440fxHostBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "I440fxHostBridge({:?})", self.cs)
    }
}

impl I440fxHostBridge {
    /// PAM changes are reported to `shadow`. Nothing is reported until the first change or
    /// [`PciFunction::reset`] (which reports all 13 segments as ROM/PCI).
    pub fn new(shadow: Arc<dyn ShadowControl>) -> Self {
        let mut cs = ConfigSpace::new(
            "i440fx",
            PciHeader {
                vendor_id: 0x8086,
                device_id: 0x1237,
                revision: 0x02,
                class_code: 0x060000,
                header_type: 0,
                subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
                subsystem_id: DEFAULT_SUBSYSTEM_ID,
                interrupt_pin: 0,
            },
        );
        // PAM nibbles have RE (bit 0) and WE (bit 1); PAM0's low nibble is reserved.
        cs.init_wmask(I440FX_PAM, 0x30);
        for i in 1..I440FX_PAM_COUNT as u16 {
            cs.init_wmask(I440FX_PAM + i, 0x33);
        }
        cs.init_byte(I440FX_SMRAM, SMRAM_C_BASE_SEG);
        cs.init_wmask(I440FX_SMRAM, SMRAM_D_OPEN | SMRAM_D_CLS | SMRAM_D_LCK | SMRAM_G_SMRAME);
        I440fxHostBridge { cs, shadow }
    }

    pub fn config_space(&self) -> &ConfigSpace {
        &self.cs
    }

    /// Current attribute of PAM segment `segment` (0..13).
    pub fn pam_attr(&self, segment: usize) -> PamAttr {
        nibble_attr(Self::pam_nibble(&self.cs, segment))
    }

    /// The SMRAM register (0x72).
    pub fn smram(&self) -> u8 {
        self.cs.byte(I440FX_SMRAM)
    }

    fn pam_nibble(cs: &ConfigSpace, segment: usize) -> u8 {
        if segment == 0 {
            return cs.byte(I440FX_PAM) >> 4;
        }
        // PAMk (k = 1..6): low nibble segment 2k-1, high nibble segment 2k.
        let reg = cs.byte(I440FX_PAM + segment.div_ceil(2) as u16);
        if segment % 2 == 1 {
            reg & 0xf
        } else {
            reg >> 4
        }
    }

    fn report_all(&self) {
        for seg in 0..PAM_SEGMENTS {
            self.shadow.set_pam(seg, self.pam_attr(seg));
        }
    }

    fn smram_written(&mut self) {
        let v = self.cs.byte(I440FX_SMRAM);
        if v & SMRAM_D_LCK != 0 {
            // Locking closes the window and freezes D_OPEN, D_LCK and G_SMRAME until reset.
            self.cs.set_byte(I440FX_SMRAM, v & !SMRAM_D_OPEN);
            self.cs.set_wmask(I440FX_SMRAM, SMRAM_D_CLS);
        }
    }
}

fn nibble_attr(n: u8) -> PamAttr {
    PamAttr { read_ram: n & 1 != 0, write_ram: n & 2 != 0 }
}

impl PciFunction for I440fxHostBridge {
    fn config_read(&mut self, reg: u16) -> u32 {
        self.cs.read(reg)
    }

    fn config_write(&mut self, reg: u16, value: u32, byte_mask: u8) {
        let reg = reg & !3;
        let touches_pam = reg == 0x58 || reg == 0x5c;
        let before: Vec<u8> = if touches_pam {
            (0..PAM_SEGMENTS).map(|s| Self::pam_nibble(&self.cs, s)).collect()
        } else {
            vec![]
        };
        self.cs.write(reg, value, byte_mask);
        if touches_pam {
            for (seg, old) in before.into_iter().enumerate() {
                let new = Self::pam_nibble(&self.cs, seg);
                if new != old {
                    self.shadow.set_pam(seg, nibble_attr(new));
                }
            }
        }
        if reg == I440FX_SMRAM & !3 && byte_mask & 0x4 != 0 {
            self.smram_written();
        }
    }

    fn reset(&mut self) {
        self.cs.reset();
        self.report_all();
    }
}

/// Section "i440fx", version 1: the config space. Restore reports all 13 PAM segments to the
/// shadow control (as reset does) and keeps a saved SMRAM lock (narrowed write mask).
impl crate::snapshot::Snapshot for I440fxHostBridge {
    fn section(&self) -> &'static str {
        "i440fx"
    }
    fn section_version(&self) -> u32 {
        1
    }
    fn save(&self, w: &mut crate::snapshot::SectionWriter) {
        self.cs.save_state(w);
    }
    fn decode(
        &self,
        version: u32,
        r: &mut crate::snapshot::SectionReader<'_>,
    ) -> Result<crate::snapshot::PendingState, crate::snapshot::SnapshotError> {
        crate::snapshot::check_version(r, version, 1)?;
        Ok(crate::snapshot::PendingState::new(self.cs.decode_state(r)?))
    }
    fn apply(&mut self, state: crate::snapshot::PendingState) -> Result<(), crate::snapshot::SnapshotError> {
        let st: super::ConfigSpaceState = state.downcast(self.cs.name())?;
        self.cs.apply_state(&st);
        self.report_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::RecordingPlatform;

    fn setup() -> (I440fxHostBridge, Arc<RecordingPlatform>) {
        let p = Arc::new(RecordingPlatform::default());
        (I440fxHostBridge::new(p.clone()), p)
    }

    fn take(p: &RecordingPlatform) -> Vec<(usize, PamAttr)> {
        std::mem::take(&mut *p.pam.lock().unwrap())
    }

    const RW: PamAttr = PamAttr { read_ram: true, write_ram: true };
    const RO: PamAttr = PamAttr { read_ram: true, write_ram: false };
    const WO: PamAttr = PamAttr { read_ram: false, write_ram: true };
    const ROM: PamAttr = PamAttr { read_ram: false, write_ram: false };

    #[test]
    fn ids() {
        let (mut hb, _) = setup();
        assert_eq!(hb.config_read(0), 0x1237_8086);
        assert_eq!(hb.config_read(8), 0x0600_0002);
        assert_eq!(hb.config_read(0xc) >> 16 & 0xff, 0);
        assert_eq!(hb.config_read(0x2c), 0x1100_1af4);
    }

    #[test]
    fn pam_changes_reported_per_segment() {
        let (mut hb, p) = setup();
        // SeaBIOS make_bios_writable: PAM0 = 0x30 (byte at 0x59).
        hb.config_write(0x58, 0x30 << 8, 0x2);
        assert_eq!(take(&p), vec![(0, RW)]);
        // PAM1..PAM6 = 0x33: dword at 0x5c covers PAM3..PAM6, word writes PAM1..PAM2.
        hb.config_write(0x58, 0x3333_0000, 0xc);
        assert_eq!(take(&p), vec![(1, RW), (2, RW), (3, RW), (4, RW)]);
        hb.config_write(0x5c, 0x3333_3333, 0xf);
        assert_eq!(take(&p).iter().map(|e| e.0).collect::<Vec<_>>(), (5..=12).collect::<Vec<_>>());
        // Rewriting the same value reports nothing.
        hb.config_write(0x5c, 0x3333_3333, 0xf);
        assert!(take(&p).is_empty());
        // Lock: PAM0 = 0x10 (read-only RAM), PAM6 = 0x31 (low RO, high RW).
        hb.config_write(0x58, 0x10 << 8, 0x2);
        hb.config_write(0x5c, 0x3133_3333, 0xf);
        assert_eq!(take(&p), vec![(0, RO), (11, RO)]);
        assert_eq!(hb.pam_attr(12), RW);
        // Reserved bits and PAM0's low nibble are read-only.
        hb.config_write(0x58, 0xffff_ffff, 0xf);
        assert_eq!(hb.config_read(0x58) >> 8 & 0xff, 0x30);
        assert_eq!(hb.config_read(0x58) >> 16, 0x3333);
        hb.config_write(0x5c, 0x2222_2222, 0xf);
        assert_eq!(hb.pam_attr(5), WO);
    }

    #[test]
    fn reset_zeroes_pam_and_reports() {
        let (mut hb, p) = setup();
        hb.config_write(0x5c, 0x3333_3333, 0xf);
        take(&p);
        hb.reset();
        let ev = take(&p);
        assert_eq!(ev.len(), PAM_SEGMENTS);
        assert!(ev.iter().enumerate().all(|(i, e)| *e == (i, ROM)));
        assert_eq!(hb.config_read(0x5c), 0);
    }

    #[test]
    fn smram_open_close_lock() {
        let (mut hb, _) = setup();
        assert_eq!(hb.smram(), 0x02);
        hb.config_write(0x70, 0x4a << 16, 0x4);
        assert_eq!(hb.smram(), 0x4a);
        hb.config_write(0x70, 0x0a << 16, 0x4);
        assert_eq!(hb.smram(), 0x0a);
        // C_BASE_SEG is hard-wired.
        hb.config_write(0x70, 0x07 << 16, 0x4);
        assert_eq!(hb.smram(), 0x02);
        hb.config_write(0x70, 0x5a << 16, 0x4); // open + lock + enable
        assert_eq!(hb.smram(), 0x1a, "lock clears D_OPEN");
        hb.config_write(0x70, 0x40 << 16, 0x4);
        assert_eq!(hb.smram(), 0x1a, "locked bits frozen");
        hb.reset();
        assert_eq!(hb.smram(), 0x02);
        hb.config_write(0x70, 0x48 << 16, 0x4);
        assert_eq!(hb.smram(), 0x4a, "reset unlocks");
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::platform::RecordingPlatform;
    use crate::snapshot::testing::{assert_prefixes_fail, load, payload};

    #[test]
    fn roundtrip_pam_and_smram_lock() {
        let p = Arc::new(RecordingPlatform::default());
        let mut a = I440fxHostBridge::new(p.clone());
        a.config_write(0x58, 0x3300, 0x2); // PAM0 (byte 0x59): F0000 segment RAM r/w
        a.config_write(0x5c, 0x0000_0011, 0x1); // PAM3 low nibble: segment 5 read RAM
        a.config_write(0x70, (SMRAM_D_LCK as u32 | SMRAM_C_BASE_SEG as u32) << 16, 0x4);
        let blob = payload(&a);

        let p2 = Arc::new(RecordingPlatform::default());
        let mut b = I440fxHostBridge::new(p2.clone());
        assert_prefixes_fail(&b, &blob);
        load(&mut b, &blob).unwrap();
        let pam = p2.pam.lock().unwrap().clone();
        assert_eq!(pam.len(), PAM_SEGMENTS, "every segment reported");
        assert_eq!(pam[0], (0, PamAttr { read_ram: true, write_ram: true }));
        assert_eq!(pam[5], (5, PamAttr { read_ram: true, write_ram: false }));
        assert_eq!(b.pam_attr(1), PamAttr::default());
        // The lock survived: D_OPEN cannot be set any more.
        b.config_write(0x70, (SMRAM_D_OPEN as u32) << 16, 0x4);
        assert_eq!(b.smram() & SMRAM_D_OPEN, 0);
        assert_eq!(b.smram() & SMRAM_D_LCK, SMRAM_D_LCK);
    }

    #[test]
    fn read_only_and_mask_tampering_rejected() {
        let p = Arc::new(RecordingPlatform::default());
        let a = I440fxHostBridge::new(p.clone());
        let good = payload(&a);
        let mut b = I440fxHostBridge::new(p.clone());
        let mut bad = good.clone();
        bad[2] ^= 1; // device ID
        assert!(load(&mut b, &bad).is_err());
        let mut bad = good.clone();
        bad[I440FX_PAM as usize] = 0x01; // PAM0 low nibble is reserved
        assert!(load(&mut b, &bad).is_err());
        let mut bad = good.clone();
        bad[256] = 0xff; // write mask of the vendor ID (byte 0)
        assert!(load(&mut b, &bad).is_err());
        assert!(p.pam.lock().unwrap().is_empty(), "nothing applied");
        load(&mut b, &good).unwrap();
    }
}
