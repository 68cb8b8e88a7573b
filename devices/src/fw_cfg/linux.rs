//! Direct Linux kernel boot through fw_cfg, with QEMU's item layout (`x86_load_linux`).
//!
//! The bzImage is split into the real-mode setup (patched header included) and the
//! protected-mode kernel. SeaBIOS boots it through QEMU's `linuxboot_dma.bin` option ROM, which
//! reads SETUP_ADDR/SIZE/DATA, INITRD_ADDR/SIZE/DATA, KERNEL_ADDR/SIZE/DATA and
//! CMDLINE_ADDR/SIZE/DATA with DMA and jumps to `setup_addr + 0x200` with the stack just below
//! the command line. OVMF reads only the SIZE/DATA items (its EFI stub / legacy loader places
//! everything itself).
//!
//! Protocol 2.06 (Linux 2.6.22, 2007) or newer is required: it is the first with `cmdline_size`,
//! so the command-line limit can be checked, and every such kernel is loaded high (bzImage).
//! This keeps one layout, the one QEMU uses for "high and recent" kernels.

use thiserror::Error;

use super::{keys, FileOpts, FwCfg, FwCfgError};

/// Real-mode setup load address (protocol ≥ 2.02 layout).
pub const SETUP_ADDR: u32 = 0x10000;
/// Command line address; the option ROM's stack sits just below it.
pub const CMDLINE_ADDR: u32 = 0x20000;
/// Protected-mode kernel load address.
pub const KERNEL_ADDR: u32 = 0x100000;
/// RAM QEMU keeps free at the top of low memory for the firmware's ACPI tables (128 KiB) and
/// other data (32 KiB); the initrd goes below it.
pub const ACPI_DATA_SIZE: u64 = 0x20000 + 0x8000;
/// fw_cfg file of the SeaBIOS boot option ROM.
pub const LINUXBOOT_DMA_ROM_FILE: &str = "genroms/linuxboot_dma.bin";
/// Its `bootorder` entry (QEMU gives the ROM bootindex 0).
pub const LINUXBOOT_DMA_BOOTORDER: &str = "/rom@genroms/linuxboot_dma.bin";

const MIN_PROTOCOL: u16 = 0x206;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 0x02;
/// "B" = QEMU in the high nibble of type_of_loader.
const LOADER_TYPE_QEMU: u8 = 0xb0;

// Setup header offsets (Documentation/arch/x86/boot.rst).
const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_VID_MODE: usize = 0x1fa;
const OFF_HEADER: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_TYPE_OF_LOADER: usize = 0x210;
const OFF_LOADFLAGS: usize = 0x211;
const OFF_RAMDISK_IMAGE: usize = 0x218;
const OFF_RAMDISK_SIZE: usize = 0x21c;
const OFF_HEAP_END_PTR: usize = 0x224;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_INITRD_ADDR_MAX: usize = 0x22c;
const OFF_XLOADFLAGS: usize = 0x236;
const OFF_CMDLINE_SIZE: usize = 0x238;
/// The header must reach past cmdline_size (protocol 2.06).
const MIN_HEADER_LEN: usize = 0x23c;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinuxBootError {
    #[error("kernel image is {0} bytes, too short for a Linux boot header")]
    TooShort(usize),
    #[error("no \"HdrS\" magic at 0x202: not a bzImage (multiboot/ELF/PVH kernels are not supported)")]
    BadMagic,
    #[error("boot protocol {0:#06x} is older than 2.06 (Linux 2.6.22), which this loader requires")]
    ProtocolTooOld(u16),
    #[error("kernel is a zImage (LOADED_HIGH clear); only bzImages are supported")]
    NotLoadedHigh,
    #[error("setup of {setup} bytes leaves no protected-mode kernel in a {len}-byte image")]
    BadSetupSize { setup: usize, len: usize },
    #[error("command line of {len} bytes exceeds the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("command line contains NUL")]
    CmdlineNul,
    #[error("invalid 'vga=' kernel parameter {0:?}")]
    BadVgaMode(String),
    #[error("{ram:#x} bytes of RAM below 4 GiB cannot hold a {kernel:#x}-byte kernel at 1 MiB")]
    RamTooSmall { ram: u64, kernel: u64 },
    #[error("initrd of {size:#x} bytes does not fit below {max:#x} above the kernel")]
    InitrdTooLarge { size: u64, max: u64 },
}

/// The fw_cfg items of a direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBootItems {
    pub protocol: u16,
    pub setup_addr: u32,
    /// `(setup_sects + 1) * 512` bytes with the patched header.
    pub setup: Vec<u8>,
    pub kernel_addr: u32,
    /// The protected-mode part.
    pub kernel: Vec<u8>,
    pub initrd_addr: u32,
    pub initrd: Option<Vec<u8>>,
    pub cmdline_addr: u32,
    /// NUL-terminated.
    pub cmdline: Vec<u8>,
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Parses a bzImage and lays out setup, kernel, initrd and command line the way QEMU does.
/// `below_4g_ram` is the RAM size below 4 GiB; the initrd goes at the highest 4 KiB-aligned
/// address below `min(initrd_addr_max, below_4g_ram - ACPI_DATA_SIZE - 1)`.
pub fn load_linux(
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    below_4g_ram: u64,
) -> Result<LinuxBootItems, LinuxBootError> {
    if kernel.len() < MIN_HEADER_LEN {
        return Err(LinuxBootError::TooShort(kernel.len()));
    }
    if rd32(kernel, OFF_HEADER) != HDRS_MAGIC {
        return Err(LinuxBootError::BadMagic);
    }
    let protocol = rd16(kernel, OFF_VERSION);
    if protocol < MIN_PROTOCOL {
        return Err(LinuxBootError::ProtocolTooOld(protocol));
    }
    if kernel[OFF_LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(LinuxBootError::NotLoadedHigh);
    }
    let sects = match kernel[OFF_SETUP_SECTS] {
        0 => 4, // historical meaning of 0
        n => n as usize,
    };
    let setup_size = (sects + 1) * 512;
    if setup_size >= kernel.len() {
        return Err(LinuxBootError::BadSetupSize { setup: setup_size, len: kernel.len() });
    }
    if cmdline.contains('\0') {
        return Err(LinuxBootError::CmdlineNul);
    }
    let cmdline_max = rd32(kernel, OFF_CMDLINE_SIZE);
    if cmdline.len() as u64 > u64::from(cmdline_max) {
        return Err(LinuxBootError::CmdlineTooLong { len: cmdline.len(), max: cmdline_max });
    }

    let prot_len = (kernel.len() - setup_size) as u64;
    let kernel_end = u64::from(KERNEL_ADDR) + prot_len;
    let ram_top = below_4g_ram.saturating_sub(ACPI_DATA_SIZE);
    if kernel_end > ram_top {
        return Err(LinuxBootError::RamTooSmall { ram: below_4g_ram, kernel: prot_len });
    }

    let mut setup = kernel[..setup_size].to_vec();
    wr32(&mut setup, OFF_CMD_LINE_PTR, CMDLINE_ADDR);
    if let Some(mode) = vga_mode(cmdline)? {
        wr16(&mut setup, OFF_VID_MODE, mode);
    }
    setup[OFF_TYPE_OF_LOADER] = LOADER_TYPE_QEMU;
    setup[OFF_LOADFLAGS] |= CAN_USE_HEAP;
    // Heap ends where the option ROM's stack area (just below the command line) begins.
    wr16(&mut setup, OFF_HEAP_END_PTR, (CMDLINE_ADDR - SETUP_ADDR - 0x200) as u16);

    let mut initrd_addr = 0u32;
    if let Some(rd) = initrd {
        let hdr_max = if protocol >= 0x20c && rd16(kernel, OFF_XLOADFLAGS) & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
            // QEMU has no 64-bit ramdisk fields, so "anywhere" means "anywhere below 4 GiB".
            u64::from(u32::MAX)
        } else {
            u64::from(rd32(kernel, OFF_INITRD_ADDR_MAX))
        };
        let initrd_max = hdr_max.min(ram_top.saturating_sub(1));
        let size = rd.len() as u64;
        let too_large = LinuxBootError::InitrdTooLarge { size, max: initrd_max };
        if size >= initrd_max {
            return Err(too_large);
        }
        let addr = (initrd_max - size) & !0xfff;
        if addr < kernel_end {
            return Err(too_large);
        }
        // addr < initrd_max ≤ u32::MAX.
        initrd_addr = addr as u32;
        wr32(&mut setup, OFF_RAMDISK_IMAGE, initrd_addr);
        wr32(&mut setup, OFF_RAMDISK_SIZE, size as u32);
    }

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    Ok(LinuxBootItems {
        protocol,
        setup_addr: SETUP_ADDR,
        setup,
        kernel_addr: KERNEL_ADDR,
        kernel: kernel[setup_size..].to_vec(),
        initrd_addr,
        initrd: initrd.map(<[u8]>::to_vec),
        cmdline_addr: CMDLINE_ADDR,
        cmdline: cmd,
    })
}

/// The `vga=` parameter as QEMU interprets it: normal/ext/ask or a C-style number.
fn vga_mode(cmdline: &str) -> Result<Option<u16>, LinuxBootError> {
    let Some(pos) = cmdline.find("vga=") else {
        return Ok(None);
    };
    let v = &cmdline[pos + 4..];
    let word = v.split(' ').next().unwrap_or("");
    if v.starts_with("normal") {
        return Ok(Some(0xffff));
    }
    if v.starts_with("ext") {
        return Ok(Some(0xfffe));
    }
    if v.starts_with("ask") {
        return Ok(Some(0xfffd));
    }
    let bad = || LinuxBootError::BadVgaMode(word.to_string());
    let n = if let Some(h) = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        u32::from_str_radix(h, 16)
    } else if word.len() > 1 && word.starts_with('0') {
        u32::from_str_radix(&word[1..], 8)
    } else {
        word.parse::<u32>()
    }
    .map_err(|_| bad())?;
    // The header field is 16 bits; QEMU truncates, we refuse.
    u16::try_from(n).map(Some).map_err(|_| bad())
}

impl LinuxBootItems {
    /// Adds the SETUP/KERNEL/INITRD/CMDLINE items (INITRD only with an initrd, as QEMU).
    pub fn install(self, fw: &mut FwCfg) -> Result<(), FwCfgError> {
        // Lengths fit in u32: add_item rejects anything larger.
        let len32 = |v: &Vec<u8>| v.len() as u32;
        fw.add_item_u32(keys::CMDLINE_ADDR, self.cmdline_addr)?;
        fw.add_item_u32(keys::CMDLINE_SIZE, len32(&self.cmdline))?;
        fw.add_item(keys::CMDLINE_DATA, self.cmdline)?;
        if let Some(rd) = self.initrd {
            fw.add_item_u32(keys::INITRD_ADDR, self.initrd_addr)?;
            fw.add_item_u32(keys::INITRD_SIZE, len32(&rd))?;
            fw.add_item(keys::INITRD_DATA, rd)?;
        }
        fw.add_item_u32(keys::KERNEL_ADDR, self.kernel_addr)?;
        fw.add_item_u32(keys::KERNEL_SIZE, len32(&self.kernel))?;
        fw.add_item(keys::KERNEL_DATA, self.kernel)?;
        fw.add_item_u32(keys::SETUP_ADDR, self.setup_addr)?;
        fw.add_item_u32(keys::SETUP_SIZE, len32(&self.setup))?;
        fw.add_item(keys::SETUP_DATA, self.setup)
    }
}

/// Adds QEMU's `linuxboot_dma.bin` (Debian: /usr/share/qemu/linuxboot_dma.bin) as
/// `genroms/linuxboot_dma.bin`, which SeaBIOS runs as an option ROM. Put
/// [`LINUXBOOT_DMA_BOOTORDER`] first in `bootorder` so its boot vector is tried first.
pub fn add_linuxboot_dma_rom(fw: &mut FwCfg, rom: &[u8]) -> Result<(), FwCfgError> {
    fw.add_file(LINUXBOOT_DMA_ROM_FILE, rom.to_vec(), FileOpts::read_only(rom.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: 4 setup sectors + boot sector, then `payload` protected-mode bytes.
    fn bzimage(protocol: u16, payload: usize) -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512 + payload];
        k[OFF_SETUP_SECTS] = 4;
        wr16(&mut k, 0x1fe, 0xaa55);
        wr32(&mut k, OFF_HEADER, HDRS_MAGIC);
        wr16(&mut k, OFF_VERSION, protocol);
        k[OFF_LOADFLAGS] = LOADED_HIGH;
        wr32(&mut k, OFF_INITRD_ADDR_MAX, 0x7fff_ffff);
        wr32(&mut k, OFF_CMDLINE_SIZE, 2047);
        for (i, b) in k[5 * 512..].iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        k
    }

    const RAM: u64 = 512 << 20;

    #[test]
    fn splits_and_patches_like_qemu() {
        let k = bzimage(0x20f, 10000);
        let rd = vec![7u8; 5000];
        let it = load_linux(&k, Some(&rd), "console=ttyS0 vga=0x317", RAM).unwrap();
        assert_eq!(it.protocol, 0x20f);
        assert_eq!(it.setup.len(), 5 * 512);
        assert_eq!(it.kernel, k[5 * 512..]);
        assert_eq!((it.setup_addr, it.kernel_addr, it.cmdline_addr), (0x10000, 0x100000, 0x20000));
        assert_eq!(it.cmdline, b"console=ttyS0 vga=0x317\0");
        let s = &it.setup;
        assert_eq!(s[OFF_TYPE_OF_LOADER], 0xb0);
        assert_eq!(s[OFF_LOADFLAGS], LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!(rd16(s, OFF_HEAP_END_PTR), 0xfe00);
        assert_eq!(rd32(s, OFF_CMD_LINE_PTR), 0x20000);
        assert_eq!(rd16(s, OFF_VID_MODE), 0x317);
        // initrd_max = min(0x7fffffff, 512M - 160K - 1); addr = (max - size) & ~0xfff.
        let max = RAM - ACPI_DATA_SIZE - 1;
        assert_eq!(u64::from(it.initrd_addr), (max - 5000) & !0xfff);
        assert_eq!(rd32(s, OFF_RAMDISK_IMAGE), it.initrd_addr);
        assert_eq!(rd32(s, OFF_RAMDISK_SIZE), 5000);
        // The rest of the setup is untouched.
        assert_eq!(s[0x1fe..0x200], k[0x1fe..0x200]);
        assert_eq!(s[0x240..], k[0x240..5 * 512]);
    }

    #[test]
    fn initrd_respects_header_limit_and_above_4g_flag() {
        let mut k = bzimage(0x20c, 4096);
        wr32(&mut k, OFF_INITRD_ADDR_MAX, 0x0fff_ffff);
        let rd = vec![1u8; 0x10000];
        let big = 3u64 << 30;
        let it = load_linux(&k, Some(&rd), "", big).unwrap();
        assert_eq!(it.initrd_addr, (0x0fff_ffff - 0x10000) & !0xfff);
        wr16(&mut k, OFF_XLOADFLAGS, XLF_CAN_BE_LOADED_ABOVE_4G);
        let it = load_linux(&k, Some(&rd), "", big).unwrap();
        assert_eq!(u64::from(it.initrd_addr), (big - ACPI_DATA_SIZE - 1 - 0x10000) & !0xfff);
        // No initrd: no address, header untouched.
        let it = load_linux(&k, None, "", big).unwrap();
        assert_eq!((it.initrd_addr, rd32(&it.setup, OFF_RAMDISK_IMAGE)), (0, 0));
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let mut k = bzimage(0x206, 100);
        k[OFF_SETUP_SECTS] = 0;
        assert_eq!(load_linux(&k, None, "", RAM).unwrap().setup.len(), 2560);
    }

    #[test]
    fn malformed_kernels_are_clean_errors() {
        assert_eq!(load_linux(&[], None, "", RAM), Err(LinuxBootError::TooShort(0)));
        assert_eq!(load_linux(&[0; 0x300], None, "", RAM), Err(LinuxBootError::BadMagic));
        let k = bzimage(0x205, 100);
        assert_eq!(load_linux(&k, None, "", RAM), Err(LinuxBootError::ProtocolTooOld(0x205)));
        let mut k = bzimage(0x20f, 100);
        k[OFF_LOADFLAGS] = 0;
        assert_eq!(load_linux(&k, None, "", RAM), Err(LinuxBootError::NotLoadedHigh));
        let mut k = bzimage(0x20f, 100);
        k[OFF_SETUP_SECTS] = 200;
        assert!(matches!(load_linux(&k, None, "", RAM), Err(LinuxBootError::BadSetupSize { .. })));
        // Header only, no protected-mode part.
        let k = bzimage(0x20f, 0);
        assert!(matches!(load_linux(&k, None, "", RAM), Err(LinuxBootError::BadSetupSize { .. })));
        let k = bzimage(0x20f, 100);
        let long = "x".repeat(2048);
        assert_eq!(
            load_linux(&k, None, &long, RAM),
            Err(LinuxBootError::CmdlineTooLong { len: 2048, max: 2047 })
        );
        assert_eq!(load_linux(&k, None, "a\0b", RAM), Err(LinuxBootError::CmdlineNul));
        assert!(matches!(load_linux(&k, None, "vga=foo", RAM), Err(LinuxBootError::BadVgaMode(_))));
        assert!(matches!(load_linux(&k, None, "vga=0x10000", RAM), Err(LinuxBootError::BadVgaMode(_))));
        assert!(matches!(load_linux(&k, None, "", 1 << 20), Err(LinuxBootError::RamTooSmall { .. })));
        let rd = vec![0u8; 600 << 20];
        assert!(matches!(load_linux(&k, Some(&rd), "", RAM), Err(LinuxBootError::InitrdTooLarge { .. })));
        // Fits below the limit but would overlap the kernel.
        let rd = vec![0u8; (RAM - ACPI_DATA_SIZE - (1 << 20)) as usize - 4096];
        assert!(matches!(load_linux(&k, Some(&rd), "", RAM), Err(LinuxBootError::InitrdTooLarge { .. })));
    }

    #[test]
    fn vga_modes() {
        assert_eq!(vga_mode("a vga=normal").unwrap(), Some(0xffff));
        assert_eq!(vga_mode("vga=ext b").unwrap(), Some(0xfffe));
        assert_eq!(vga_mode("vga=ask").unwrap(), Some(0xfffd));
        assert_eq!(vga_mode("vga=791 quiet").unwrap(), Some(791));
        assert_eq!(vga_mode("vga=0317").unwrap(), Some(0o317));
        assert_eq!(vga_mode("vga=0").unwrap(), Some(0));
        assert_eq!(vga_mode("quiet").unwrap(), None);
        assert!(vga_mode("vga=").is_err());
    }

    #[test]
    fn install_provides_every_item_linuxboot_dma_reads() {
        use crate::mem::TestRam;
        let ram = std::sync::Arc::new(TestRam::new(0x10000));
        let mut fw = FwCfg::new(ram);
        let k = bzimage(0x20f, 3000);
        let it = load_linux(&k, Some(&[9u8; 100]), "root=/dev/vda", RAM).unwrap();
        let expect = it.clone();
        it.install(&mut fw).unwrap();
        let u32_item = |key| u32::from_le_bytes(fw.item(key).unwrap().try_into().unwrap());
        assert_eq!(u32_item(keys::SETUP_ADDR), 0x10000);
        assert_eq!(u32_item(keys::SETUP_SIZE), 2560);
        assert_eq!(fw.item(keys::SETUP_DATA).unwrap(), expect.setup);
        assert_eq!(u32_item(keys::KERNEL_ADDR), 0x100000);
        assert_eq!(u32_item(keys::KERNEL_SIZE), 3000);
        assert_eq!(fw.item(keys::KERNEL_DATA).unwrap(), expect.kernel);
        assert_eq!(u32_item(keys::INITRD_ADDR), expect.initrd_addr);
        assert_eq!(u32_item(keys::INITRD_SIZE), 100);
        assert_eq!(fw.item(keys::INITRD_DATA).unwrap(), &[9u8; 100]);
        assert_eq!(u32_item(keys::CMDLINE_ADDR), 0x20000);
        assert_eq!(u32_item(keys::CMDLINE_SIZE), 14);
        assert_eq!(fw.item(keys::CMDLINE_DATA).unwrap(), b"root=/dev/vda\0");

        let rom_path = std::path::Path::new("/usr/share/qemu/linuxboot_dma.bin");
        let rom = std::fs::read(rom_path).unwrap_or_else(|_| {
            let mut r = vec![0u8; 1536];
            r[0] = 0x55;
            r[1] = 0xaa;
            r
        });
        add_linuxboot_dma_rom(&mut fw, &rom).unwrap();
        assert_eq!(fw.file(LINUXBOOT_DMA_ROM_FILE).unwrap(), rom);
        assert_eq!(&rom[..2], &[0x55, 0xaa], "option ROM signature");
    }

    #[test]
    fn real_kernel_if_present() {
        let Ok(entries) = std::fs::read_dir("/boot") else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("vmlinuz") {
                continue;
            }
            let Ok(k) = std::fs::read(e.path()) else { continue };
            let it = load_linux(&k, None, "console=ttyS0", 1 << 30).unwrap();
            assert!(it.protocol >= 0x206);
            assert_eq!(it.setup.len() + it.kernel.len(), k.len());
        }
    }
}
