//! The chipset through CF8/CFC (and Xen's direct config path): CONFIG_ADDRESS values, data
//! accesses of every size and offset, BAR sizing and programming, command decode bits, PAM and
//! SMRAM, PIRQ routing, PMBA/PMREGMISC, the 0xCF9 reset control register, plain port accesses
//! that land in whatever windows the guest mapped, and resets.
//!
//! Checks beyond "no panic": the PAM state and PIRQ routes the backend was told match the
//! devices' registers; SMRAM lock semantics; windows sit where the PCI side says and never
//! displace fixed devices; read-only IDs survive; unclaimed ports float.
#![no_main]

use arbitrary::Arbitrary;
use hvmdm_devices::pci::{DEVFN_HOST_BRIDGE, DEVFN_PIIX3_IDE, DEVFN_PIIX3_ISA, DEVFN_PIIX4_PM};
use hvmdm_fuzz::Machine;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Dev {
    Host,
    Isa,
    Ide,
    Pm,
    /// An absent function (device 1 function 2, or anything else).
    Other(u8),
}

impl Dev {
    fn devfn(self) -> u8 {
        match self {
            Dev::Host => DEVFN_HOST_BRIDGE,
            Dev::Isa => DEVFN_PIIX3_ISA,
            Dev::Ide => DEVFN_PIIX3_IDE,
            Dev::Pm => DEVFN_PIIX4_PM,
            Dev::Other(d) => d,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Raw dword to CONFIG_ADDRESS.
    AddrRaw(u32),
    Addr {
        dev: Dev,
        reg: u8,
        bus: u8,
        enable: bool,
    },
    /// 0xCFC + off, size 0..=9.
    DataRead {
        off: u8,
        size: u8,
    },
    DataWrite {
        off: u8,
        size: u8,
        val: u32,
    },
    /// Any port, any size: lands in the PM block or BM BAR when the guest mapped them there.
    Pio {
        port: u16,
        size: u8,
        write: bool,
        val: u64,
    },
    /// Xen IOREQ_TYPE_PCI_CONFIG.
    Xen {
        bus: u8,
        dev: Dev,
        off: u16,
        size: u8,
        write: bool,
        val: u32,
    },
    /// BAR4 of the IDE function (sizing with all-ones, then an address) and its command register.
    IdeBar {
        val: u32,
        cmd: u16,
    },
    /// Any BAR slot of any function.
    Bar {
        dev: Dev,
        index: u8,
        val: u32,
    },
    Pam {
        index: u8,
        val: u8,
    },
    Smram(u8),
    Pirq {
        link: u8,
        val: u8,
    },
    Pmba {
        val: u32,
        misc: u8,
    },
    Rcr(u8),
    Reset,
}

fn cfg_addr(m: &Machine, devfn: u8, reg: u8) {
    m.outl(0xcf8, 0x8000_0000 | u32::from(devfn) << 8 | u32::from(reg & 0xfc));
}

fn cfg_writeb(m: &Machine, devfn: u8, reg: u8, v: u8) {
    cfg_addr(m, devfn, reg);
    m.write(0xcfc + u64::from(reg & 3), &[v]);
}

fn cfg_writew(m: &Machine, devfn: u8, reg: u8, v: u16) {
    cfg_addr(m, devfn, reg);
    m.write(0xcfc + u64::from(reg & 2), &v.to_le_bytes());
}

fn cfg_writel(m: &Machine, devfn: u8, reg: u8, v: u32) {
    cfg_addr(m, devfn, reg);
    m.outl(0xcfc, v);
}

fn sized(val: u64, size: usize) -> Vec<u8> {
    let b = val.to_le_bytes();
    let mut d = b[..size.min(8)].to_vec();
    d.resize(size, 0);
    d
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 512 {
        return;
    }
    let mut m = Machine::new(vec![0]);
    let mut touched = Vec::new();
    for op in ops {
        match op {
            Op::AddrRaw(v) => {
                m.outl(0xcf8, v);
                let back = m.inl(0xcf8);
                assert_eq!(back, v & 0x80ff_fffc, "CONFIG_ADDRESS readback");
            }
            Op::Addr { dev, reg, bus, enable } => {
                let bus = if bus < 0xf0 { 0 } else { bus };
                let en = if enable { 0x8000_0000 } else { 0 };
                m.outl(0xcf8, en | u32::from(bus) << 16 | u32::from(dev.devfn()) << 8 | u32::from(reg));
            }
            Op::DataRead { off, size } => {
                let size = usize::from(size % 10);
                let port = 0xcfc + u64::from(off % 4);
                let d = m.checked_read(port, size);
                let enabled = m.cfg_io.lock().unwrap().config_address() & 0x8000_0000 != 0;
                // Bytes past 0xCFF belong to whatever the guest mapped at 0xD00.
                let ours = size.min((0xd00 - port) as usize);
                if !enabled {
                    assert!(
                        d[..ours].iter().all(|&b| b == 0xff),
                        "config read with CONFIG_ADDRESS disabled: {d:x?}"
                    );
                }
            }
            Op::DataWrite { off, size, val } => {
                m.write(0xcfc + u64::from(off % 4), &sized(val.into(), usize::from(size % 10)));
            }
            Op::Pio { port, size, write, val } => {
                let size = usize::from(size % 10);
                touched.push(u64::from(port));
                if write {
                    m.write(port.into(), &sized(val, size));
                } else {
                    m.checked_read(port.into(), size);
                }
            }
            Op::Xen { bus, dev, off, size, write, val } => {
                let root = m.root.lock().unwrap();
                let size = size % 10;
                let off = off % 0x110;
                if write {
                    root.config_write(bus, dev.devfn(), off, size, val);
                } else {
                    let v = root.config_read(bus, dev.devfn(), off, size);
                    if size < 4 {
                        assert_eq!(v >> (8 * u32::from(size)), 0, "config read wider than {size} bytes");
                    }
                }
            }
            Op::IdeBar { val, cmd } => {
                cfg_writel(&m, DEVFN_PIIX3_IDE, 0x20, u32::MAX);
                cfg_addr(&m, DEVFN_PIIX3_IDE, 0x20);
                let sizing = m.inl(0xcfc);
                assert_eq!(sizing, 0xffff_fff1, "BAR4 sizing value");
                cfg_writel(&m, DEVFN_PIIX3_IDE, 0x20, val);
                cfg_writew(&m, DEVFN_PIIX3_IDE, 0x04, cmd);
            }
            Op::Bar { dev, index, val } => cfg_writel(&m, dev.devfn(), 0x10 + 4 * (index % 6), val),
            Op::Pam { index, val } => cfg_writeb(&m, DEVFN_HOST_BRIDGE, 0x59 + index % 7, val),
            Op::Smram(v) => cfg_writeb(&m, DEVFN_HOST_BRIDGE, 0x72, v),
            Op::Pirq { link, val } => cfg_writeb(&m, DEVFN_PIIX3_ISA, 0x60 + link % 4, val),
            Op::Pmba { val, misc } => {
                cfg_writel(&m, DEVFN_PIIX4_PM, 0x40, val);
                cfg_writeb(&m, DEVFN_PIIX4_PM, 0x80, misc);
            }
            Op::Rcr(v) => m.write(0xcf9, &[v]),
            Op::Reset => m.reset(),
        }
        m.check_chipset();
    }
    m.check_claims(&touched);
    m.check_identity();
    // Reboot: everything back to power-on, windows gone.
    m.reset();
    m.check_chipset();
    assert!(m.pam_model.iter().all(|a| *a == Default::default()), "PAM after reset");
    assert!(m.route_model.iter().all(Option::is_none), "PIRQ routes after reset");
    assert_eq!(m.pm.lock().unwrap().pm_mapped(), None);
    assert_eq!(m.ide.lock().unwrap().bm_base(), None);
    m.check_claims(&touched);
});
