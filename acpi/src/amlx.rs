//! Small additions to `acpi_tables::aml`: an owned byte-string node (so trees can be built from
//! temporaries), and the resource descriptors and helpers the crate lacks (IRQNoFlags, an
//! Extended Interrupt descriptor with several IRQs).

use acpi_tables::aml::{self, Path};
use acpi_tables::{Aml, AmlSink};

/// Already-serialised AML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Serialises any AML node.
pub fn raw(x: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    x.to_aml_bytes(&mut v);
    Raw(v)
}

fn refs(children: &[Raw]) -> Vec<&dyn Aml> {
    children.iter().map(|c| c as &dyn Aml).collect()
}

pub fn device(name: &str, children: &[Raw]) -> Raw {
    raw(&aml::Device::new(Path::new(name), refs(children)))
}

pub fn scope(name: &str, children: &[Raw]) -> Raw {
    raw(&aml::Scope::new(Path::new(name), refs(children)))
}

pub fn method(name: &str, args: u8, serialized: bool, children: &[Raw]) -> Raw {
    raw(&aml::Method::new(Path::new(name), args, serialized, refs(children)))
}

pub fn name(name: &str, value: &dyn Aml) -> Raw {
    raw(&aml::Name::new(Path::new(name), value))
}

pub fn package(children: &[Raw]) -> Raw {
    raw(&aml::Package::new(refs(children)))
}

pub fn resource_template(children: &[Raw]) -> Raw {
    raw(&aml::ResourceTemplate::new(refs(children)))
}

pub fn ret(value: &dyn Aml) -> Raw {
    raw(&aml::Return::new(value))
}

/// `Name(_HID, EisaId("PNP0303"))`, always as a DWORD constant, which is the form SeaBIOS's
/// DSDT scanner matches.
pub fn hid_eisa(id: &str) -> Raw {
    name("_HID", &aml::EISAName::new(id))
}

/// `Name(_HID, "QEMU0002")`.
pub fn hid_str(id: &str) -> Raw {
    name("_HID", &id.to_string())
}

/// Integer `Name(xxx, value)`.
pub fn name_int(n: &str, value: u64) -> Raw {
    name(n, &value)
}

/// `IO (Decode16, min, max, align, len)`.
pub fn io(min: u16, max: u16, align: u8, len: u8) -> Raw {
    raw(&aml::IO::new(min, max, align, len))
}

/// `IRQNoFlags () {irq}`: the short IRQ descriptor (edge, active-high, exclusive), as ISA
/// devices conventionally use.
pub fn irq_no_flags(irq: u8) -> Raw {
    let mask: u16 = 1u16.checked_shl(u32::from(irq)).unwrap_or(0);
    let m = mask.to_le_bytes();
    Raw(vec![0x22, m[0], m[1]])
}

/// `Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|Low, Shared|Exclusive) {irqs...}` with
/// any number of interrupts (the crate's `Interrupt` takes one).
pub fn ext_irq(level: bool, active_low: bool, shared: bool, irqs: &[u32]) -> Raw {
    let count = irqs.len().min(255);
    let mut v = vec![0x89];
    let len = (2 + 4 * count) as u16;
    v.extend_from_slice(&len.to_le_bytes());
    let flags =
        1u8 /* consumer */ | (u8::from(!level) << 1) | (u8::from(active_low) << 2) | (u8::from(shared) << 3);
    v.push(flags);
    v.push(count as u8);
    for irq in &irqs[..count] {
        v.extend_from_slice(&irq.to_le_bytes());
    }
    Raw(v)
}

/// `Store(src, dst)`.
pub fn store(src: &dyn Aml, dst: &dyn Aml) -> Raw {
    raw(&aml::Store::new(dst, src))
}

/// A 36-byte ACPI table header followed by `body`; checksum left 0 (the loader fixes it).
pub fn definition_block(signature: &[u8; 4], revision: u8, oem: &crate::OemIds, body: &[u8]) -> Vec<u8> {
    let mut t = crate::tables::header(signature, revision, oem);
    t.extend_from_slice(body);
    crate::tables::set_len(&mut t);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_descriptors() {
        assert_eq!(irq_no_flags(4).0, vec![0x22, 0x10, 0x00]);
        assert_eq!(irq_no_flags(12).0, vec![0x22, 0x00, 0x10]);
        let e = ext_irq(true, false, true, &[5, 10, 11]);
        assert_eq!(&e.0[..5], &[0x89, 14, 0, 0x09, 3]);
        assert_eq!(&e.0[5..9], &5u32.to_le_bytes());
        assert_eq!(e.0.len(), 17);
        // The PCI-link _CRS patches the IRQ at byte 5 of a single-IRQ descriptor.
        let one = ext_irq(true, false, true, &[9]);
        assert_eq!(&one.0[5..9], &9u32.to_le_bytes());
    }

    #[test]
    fn eisa_hid_is_dword() {
        let h = hid_eisa("PNP0303");
        // NameOp "_HID" DWordPrefix 41 d0 03 03: what SeaBIOS's scanner compares.
        assert_eq!(h.0, vec![0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03]);
    }
}
