//! The `etc/e820` fw_cfg file: the RAM map SeaBIOS (`qemu_early_e820`) and OVMF
//! (`PlatformScanE820`) prefer over CMOS. OVMF requires the size to be a multiple of 20.

/// `etc/e820` file name.
pub const E820_FILE: &str = "etc/e820";
/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;
/// Size of one packed entry.
pub const E820_ENTRY_SIZE: usize = 20;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub len: u64,
    /// [`E820_RAM`], [`E820_RESERVED`], ...
    pub kind: u32,
}

/// Packs entries as QEMU does: `{u64 addr, u64 len, u32 type}` little-endian, no padding.
pub fn e820_blob(entries: &[E820Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * E820_ENTRY_SIZE);
    for e in entries {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.kind.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_20_byte_little_endian_entries() {
        let b = e820_blob(&[
            E820Entry { addr: 0, len: 0x9fc00, kind: E820_RAM },
            E820Entry { addr: 0x1_0000_0000, len: 0x4000_0000, kind: E820_RESERVED },
        ]);
        assert_eq!(b.len(), 40);
        assert_eq!(b.len() % E820_ENTRY_SIZE, 0);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x9fc00);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[20..28].try_into().unwrap()), 0x1_0000_0000);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 2);
        assert!(e820_blob(&[]).is_empty());
    }
}
