//! Guest physical memory on KVM: RAM through vm-memory with the below-4G / above-4G split around
//! the PCI hole, firmware at the top of 4 GiB, and the 0xC0000..0xFFFFF shadow area whose mapping
//! follows the i440FX PAM registers.
//!
//! KVM memslots may not overlap, so RAM below 1 MiB is split around the 13 PAM segments, each of
//! which gets its own slot that is re-registered when the guest reprograms PAM: RAM read-write, RAM
//! read-only (writes exit and are dropped), or the ROM image read-only (writes exit and, if PAM says
//! so, land in the RAM underneath). Accesses that exit are served by [`ShadowMmio`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use hvmdm_devices::bus::{BusDevice, IoResult, RegionId};
use hvmdm_devices::mem::{GuestFileError, GuestMemError, GuestRam};
use hvmdm_devices::platform::{pam_segment, PamAttr, ShadowControl};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

pub const FOUR_GIB: u64 = 1 << 32;
/// Start of the 0xC0000..0x100000 shadow area.
pub const SHADOW_BASE: u64 = 0xC0000;
pub const SHADOW_LEN: u64 = 0x40000;
const PAM_SEGMENTS: usize = 13;

const SLOT_LOW: u32 = 0;
const SLOT_PAM0: u32 = 1; // ..=13
const SLOT_MID: u32 = 14;
const SLOT_HIGH: u32 = 15;
const SLOT_ROM: u32 = 16;
const SLOT_VARS: u32 = 17;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot allocate guest memory: {0}")]
    Alloc(String),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {err}")]
    SetRegion { slot: u32, err: kvm_ioctls::Error },
    #[error("firmware image of {0} bytes does not fit: it must be a multiple of 4 KiB, at most 16 MiB")]
    FirmwareSize(usize),
}

/// Where RAM goes in guest physical space for a given size (the PC layout QEMU uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    pub below_4g: u64,
    pub above_4g: u64,
}

impl RamLayout {
    pub fn new(ram: u64) -> Self {
        // QEMU's pc machine: with >= 3.5 GiB, keep 3 GiB low so the hole is gigabyte-aligned.
        let below_4g = if ram >= 0xE000_0000 { 0xC000_0000 } else { ram };
        RamLayout { below_4g, above_4g: ram - below_4g }
    }
}

/// Firmware images mapped read-only (CODE) and, for split OVMF, writable (VARS) below 4 GiB.
pub struct FirmwareImages {
    pub code: Vec<u8>,
    pub vars: Option<Vec<u8>>,
}

struct ShadowState {
    attrs: [PamAttr; PAM_SEGMENTS],
    /// Whether the segment's slot currently exists (deleting a missing slot is EINVAL).
    mapped: [bool; PAM_SEGMENTS],
}

/// Guest memory and the KVM slots that expose it.
pub struct KvmMemory {
    vm: Arc<VmFd>,
    pub ram: GuestMemoryMmap,
    pub layout: RamLayout,
    /// ROM content of the shadow area (0xFF for C/D segments, the BIOS tail for E/F).
    shadow_rom: MmapRegion,
    /// Firmware at the top of 4 GiB.
    rom: MmapRegion,
    vars: Option<MmapRegion>,
    state: Mutex<ShadowState>,
}

fn anon(len: usize) -> Result<MmapRegion, MemoryError> {
    MmapRegion::new(len).map_err(|e| MemoryError::Alloc(e.to_string()))
}

impl KvmMemory {
    pub fn new(vm: Arc<VmFd>, ram_size: u64, fw: &FirmwareImages) -> Result<Arc<Self>, MemoryError> {
        let layout = RamLayout::new(ram_size);
        let mut ranges = vec![(GuestAddress(0), layout.below_4g as usize)];
        if layout.above_4g > 0 {
            ranges.push((GuestAddress(FOUR_GIB), layout.above_4g as usize));
        }
        let ram = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Alloc(e.to_string()))?;
        let total_fw = fw.code.len() + fw.vars.as_ref().map_or(0, |v| v.len());
        if fw.code.is_empty() || fw.code.len() % 0x1000 != 0 || total_fw > 16 << 20 {
            return Err(MemoryError::FirmwareSize(fw.code.len()));
        }
        let rom = anon(fw.code.len())?;
        copy_into(&rom, 0, &fw.code);
        let vars = match &fw.vars {
            Some(v) => {
                if v.is_empty() || v.len() % 0x1000 != 0 {
                    return Err(MemoryError::FirmwareSize(v.len()));
                }
                let r = anon(v.len())?;
                copy_into(&r, 0, v);
                Some(r)
            }
            None => None,
        };
        // The legacy BIOS alias: the last 128 KiB of the image appear at 0xE0000..0xFFFFF.
        let shadow_rom = anon(SHADOW_LEN as usize)?;
        copy_into(&shadow_rom, 0, &vec![0xff; SHADOW_LEN as usize]);
        let alias = fw.code.len().min(0x20000);
        copy_into(&shadow_rom, SHADOW_LEN as usize - alias, &fw.code[fw.code.len() - alias..]);

        let mem = Arc::new(KvmMemory {
            vm,
            ram,
            layout,
            shadow_rom,
            rom,
            vars,
            state: Mutex::new(ShadowState {
                attrs: [PamAttr::default(); PAM_SEGMENTS],
                mapped: [false; PAM_SEGMENTS],
            }),
        });
        mem.map_static()?;
        {
            let mut st = mem.state.lock().unwrap_or_else(|p| p.into_inner());
            for seg in 0..PAM_SEGMENTS {
                mem.map_pam(&mut st, seg, PamAttr::default())?;
            }
        }
        Ok(mem)
    }

    fn ram_host(&self, gpa: u64) -> u64 {
        // Only called for addresses inside the low RAM region, which always exists (>= 16 MiB).
        self.ram.get_host_address(GuestAddress(gpa)).map(|p| p as u64).unwrap_or(0)
    }

    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: u64, readonly: bool) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` is an mmap owned by `self` (RAM, ROM or VARS), which lives as
        // long as the VM: KvmMemory is held by the VM object for the whole run.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|err| MemoryError::SetRegion { slot, err })
    }

    fn map_static(&self) -> Result<(), MemoryError> {
        self.set_slot(SLOT_LOW, 0, SHADOW_BASE, self.ram_host(0), false)?;
        let mid = SHADOW_BASE + SHADOW_LEN;
        self.set_slot(SLOT_MID, mid, self.layout.below_4g - mid, self.ram_host(mid), false)?;
        if self.layout.above_4g > 0 {
            self.set_slot(SLOT_HIGH, FOUR_GIB, self.layout.above_4g, self.ram_host(FOUR_GIB), false)?;
        }
        let rom_base = FOUR_GIB - self.rom.size() as u64;
        self.set_slot(SLOT_ROM, rom_base, self.rom.size() as u64, self.rom.as_ptr() as u64, true)?;
        if let Some(v) = &self.vars {
            let base = rom_base - v.size() as u64;
            self.set_slot(SLOT_VARS, base, v.size() as u64, v.as_ptr() as u64, false)?;
        }
        Ok(())
    }

    fn map_pam(&self, st: &mut ShadowState, seg: usize, attr: PamAttr) -> Result<(), MemoryError> {
        let (base, len) = pam_segment(seg);
        let slot = SLOT_PAM0 + seg as u32;
        // Flags cannot change in place: delete, then add.
        if st.mapped[seg] {
            self.set_slot(slot, base, 0, 0, false)?;
            st.mapped[seg] = false;
        }
        st.attrs[seg] = attr;
        let r = if attr.read_ram {
            self.set_slot(slot, base, len, self.ram_host(base), !attr.write_ram)
        } else {
            let host = self.shadow_rom.as_ptr() as u64 + (base - SHADOW_BASE);
            self.set_slot(slot, base, len, host, true)
        };
        st.mapped[seg] = r.is_ok();
        r
    }

    /// PAM back to power-on state (everything reads the ROM alias).
    pub fn reset_shadow(&self) {
        for seg in 0..PAM_SEGMENTS {
            self.set_pam(seg, PamAttr::default());
        }
    }

    /// Base of the firmware image (just below 4 GiB).
    pub fn rom_base(&self) -> u64 {
        FOUR_GIB - self.rom.size() as u64
    }
}

fn copy_into(r: &MmapRegion, off: usize, data: &[u8]) {
    // `r` is a fresh anonymous mapping at least off+len long (callers size it).
    if let Ok(vs) = r.get_slice(off, data.len()) {
        vs.copy_from(data);
    }
}

use vm_memory::VolatileMemory;

impl ShadowControl for KvmMemory {
    fn set_pam(&self, segment: usize, attr: PamAttr) {
        if segment >= PAM_SEGMENTS {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.attrs[segment] == attr && st.mapped[segment] {
            return;
        }
        if let Err(e) = self.map_pam(&mut st, segment, attr) {
            log::error!("PAM segment {segment}: {e}");
        }
    }
}

impl GuestRam for KvmMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let err = GuestMemError::OutOfRange { gpa, len: buf.len() };
        if !GuestMemoryBackend::check_range(&self.ram, GuestAddress(gpa), buf.len()) {
            return Err(err);
        }
        self.ram.read_slice(buf, GuestAddress(gpa)).map_err(|_| err)
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        let err = GuestMemError::OutOfRange { gpa, len: buf.len() };
        if !GuestMemoryBackend::check_range(&self.ram, GuestAddress(gpa), buf.len()) {
            return Err(err);
        }
        self.ram.write_slice(buf, GuestAddress(gpa)).map_err(|_| err)
    }
    fn read_from_file(&self, gpa: u64, len: usize, file: &File, offset: u64) -> Result<(), GuestFileError> {
        self.file_io(gpa, len, file, offset, true)
    }
    fn write_to_file(&self, gpa: u64, len: usize, file: &File, offset: u64) -> Result<(), GuestFileError> {
        self.file_io(gpa, len, file, offset, false)
    }
}

impl KvmMemory {
    /// Disk DMA between a raw image and guest RAM with pread/pwrite on the RAM mapping itself:
    /// one copy (the kernel's) instead of image -> bounce buffer -> RAM.
    fn file_io(
        &self,
        gpa: u64,
        len: usize,
        file: &File,
        offset: u64,
        into_guest: bool,
    ) -> Result<(), GuestFileError> {
        let err = GuestMemError::OutOfRange { gpa, len };
        if !GuestMemoryBackend::check_range(&self.ram, GuestAddress(gpa), len) {
            return Err(err.into());
        }
        let fd = file.as_raw_fd();
        let mut pos = 0usize;
        for slice in self.ram.get_slices(GuestAddress(gpa), len) {
            let slice = slice.map_err(|_| err)?;
            let mut done = 0usize;
            while done < slice.len() {
                let at = offset
                    .checked_add((pos + done) as u64)
                    .and_then(|o| libc::off_t::try_from(o).ok())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
                let want = slice.len() - done;
                let n = if into_guest {
                    let g = slice.ptr_guard_mut();
                    // SAFETY: [g.as_ptr() + done, + want) lies inside this slice of the guest RAM
                    // mapping (get_slices checked it against the region), which `self.ram` keeps
                    // mapped while `g` lives; the kernel stores plain bytes there, as a DMA
                    // engine would while the guest runs.
                    unsafe { libc::pread(fd, g.as_ptr().add(done).cast(), want, at) }
                } else {
                    let g = slice.ptr_guard();
                    // SAFETY: as above; the kernel only reads the range.
                    unsafe { libc::pwrite(fd, g.as_ptr().add(done).cast(), want, at) }
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e.into());
                }
                if n == 0 {
                    // The caller checked the range against the image size: a file that shrank.
                    let kind = if into_guest {
                        std::io::ErrorKind::UnexpectedEof
                    } else {
                        std::io::ErrorKind::WriteZero
                    };
                    return Err(std::io::Error::from(kind).into());
                }
                done += n as usize;
            }
            pos += slice.len();
        }
        Ok(())
    }
}

/// Serves the exits the shadow slots cause: writes to read-only segments, and accesses in the short
/// window while a segment's slot is being re-registered.
pub struct ShadowMmio {
    pub mem: Arc<KvmMemory>,
}

impl ShadowMmio {
    fn segment_of(addr: u64) -> usize {
        if addr >= 0xF0000 {
            0
        } else {
            1 + ((addr - SHADOW_BASE) / 0x4000) as usize
        }
    }
}

impl BusDevice for ShadowMmio {
    fn read(&mut self, _r: RegionId, offset: u64, data: &mut [u8]) -> IoResult {
        let gpa = SHADOW_BASE + offset;
        let attr = self.mem.state.lock().unwrap_or_else(|p| p.into_inner()).attrs[Self::segment_of(gpa)];
        if attr.read_ram {
            let _ = self.mem.ram.read_slice(data, GuestAddress(gpa));
        } else if let Ok(vs) = self.mem.shadow_rom.get_slice(offset as usize, data.len()) {
            vs.copy_to(data);
        }
        IoResult::Done
    }
    fn write(&mut self, _r: RegionId, offset: u64, data: &[u8]) -> IoResult {
        let gpa = SHADOW_BASE + offset;
        let attr = self.mem.state.lock().unwrap_or_else(|p| p.into_inner()).attrs[Self::segment_of(gpa)];
        if attr.write_ram {
            let _ = self.mem.ram.write_slice(data, GuestAddress(gpa));
        }
        IoResult::Done
    }
}

/// Writes to the firmware ROM exit as MMIO; they are dropped (the ROM is not flash).
pub struct RomSink;

impl BusDevice for RomSink {
    fn read(&mut self, _r: RegionId, _o: u64, data: &mut [u8]) -> IoResult {
        data.fill(0xff);
        IoResult::Done
    }
    fn write(&mut self, _r: RegionId, _o: u64, _d: &[u8]) -> IoResult {
        IoResult::Done
    }
}

#[allow(dead_code)]
fn _assert_region_traits(r: &vm_memory::GuestRegionMmap) -> u64 {
    r.len()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    /// The direct pread/pwrite path between an image file and the RAM mapping (disk DMA on KVM).
    #[test]
    fn file_io_moves_bytes_between_file_and_ram() {
        let vm = Arc::new(kvm_ioctls::Kvm::new().expect("/dev/kvm").create_vm().expect("KVM_CREATE_VM"));
        let fw = FirmwareImages { code: vec![0xf4; 0x1000], vars: None };
        let mem = KvmMemory::new(vm, 16 << 20, &fw).unwrap();
        let path = std::env::temp_dir().join(format!("hvmdm-fileio-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 13 + i / 4096) as u8).collect();
        f.write_all(&data).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // Image -> RAM at an unaligned address and offset.
        mem.read_from_file(0x10_0003, 5000, &f, 77).unwrap();
        let mut got = vec![0u8; 5000];
        mem.read(0x10_0003, &mut got).unwrap();
        assert_eq!(got, &data[77..5077]);
        // RAM -> image.
        mem.write(0x20_0000, &[0xab; 1500]).unwrap();
        mem.write_to_file(0x20_0000, 1500, &f, 4000).unwrap();
        let mut back = vec![0u8; 1500];
        f.read_exact_at(&mut back, 4000).unwrap();
        assert_eq!(back, vec![0xab; 1500]);
        // Outside RAM: refused before any I/O; past the end of the file: an error, not a hang.
        assert!(matches!(mem.read_from_file(16 << 20, 512, &f, 0), Err(GuestFileError::Mem(_))));
        assert!(matches!(mem.write_to_file((16 << 20) - 256, 512, &f, 0), Err(GuestFileError::Mem(_))));
        assert!(matches!(mem.read_from_file(0x1000, 512, &f, 3 * 4096 - 100), Err(GuestFileError::Io(_))));
        std::fs::remove_file(&path).unwrap();
    }
}
