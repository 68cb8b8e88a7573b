//! The device-model command line parser (`hvmdm_toolstack::argv::DmArgs::parse`) on argv vectors
//! built from libxl 4.17's real options and values (whole values, or QemuOpts parameter lists
//! assembled from its keys and values, with `,,` escapes), `--opt` spellings, options missing
//! their argument, random strings, positional words and non-UTF-8 bytes.
//!
//! Checks beyond "no panic":
//! - every error names an option (or argument) that is really in argv, and its message shows it:
//!   `UnknownOption`/`Positional` name an argv element, `MissingArgument` the last element,
//!   the others an option of the parser's tables (first word, e.g. `-device rtl8139`) present in
//!   argv, `NotUtf8(i)` the first non-UTF-8 element;
//! - a successful parse is deterministic and consistent: 1 <= vcpus <= max_vcpus <= MAX_VCPUS,
//!   domid in 1..DOMID_FIRST_RESERVED, memory > 0, IDE index <= 3, no two disks in one slot,
//!   distinct QMP chardev ids.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use arbitrary::Arbitrary;
use hvmdm_toolstack::argv::{ArgvError, DiskInterface, DmArgs, DOMID_FIRST_RESERVED, MAX_VCPUS};
use libfuzzer_sys::fuzz_target;

const FLAGS: [&str; 9] = [
    "-no-shutdown",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-S",
    "-usb",
    "-no-acpi",
    "-xen-attach",
    "-xen-domid-restrict",
];

/// Options with an argument and values libxl (or its tests) pass.
const OPTIONS: [(&str, &[&str]); 32] = [
    ("-xen-domid", &["1", "5", "0", "32751", "32752", "abc", "-1", "0x10"]),
    (
        "-chardev",
        &[
            "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-1,server=on,wait=off",
            "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-1,server=on,wait=off",
            "socket,id=libxl-cmd,fd=19,server=on,wait=off",
            "socket,id=ch,path=/s,server,nowait",
            "socket,id=c,host=1.2.3.4,port=5",
            "pty,id=libxl-channel0",
            "file,id=f,path=/tmp/log",
            "null,id=n",
            "spicevmc,id=c",
        ],
    ),
    (
        "-mon",
        &[
            "chardev=libxl-cmd,mode=control",
            "chardev=libxenstat-cmd,mode=control",
            "chardev=ch,mode=readline",
            "chardev=nope,mode=control",
            "chardev=libxl-cmd,mode=control,pretty=on",
        ],
    ),
    ("-name", &["NAME", "vm1", "guest=vm1,debug-threads=on", "vm,,1", ""]),
    ("-vnc", &["none", "127.0.0.1:0,to=99", "0.0.0.0:3,password=on,to=99", ":1", "unix:/s", "127.0.0.1:x"]),
    ("-display", &["none", "sdl", "gtk", "vnc", "type=none"]),
    ("-k", &["en-us", "de", ""]),
    ("-kernel", &["/boot/vmlinuz", ""]),
    ("-initrd", &["/boot/initrd.img", ""]),
    ("-append", &["console=ttyS0 root=/dev/xvda1", ""]),
    (
        "-device",
        &[
            "cirrus-vga,vgamem_mb=8",
            "VGA,vgamem_mb=16",
            "qxl-vga,vram_size_mb=64,ram_size_mb=64",
            "rtl8139,id=nic0,netdev=net0,mac=00:16:3e:12:34:56",
            "e1000,id=nic1,netdev=net1,mac=00:16:3e:aa:bb:cc",
            "ide-cd,id=ide-5632,drive=ide-5632,bus=ide.1,unit=0",
            "ide-hd,bus=ahci0.0,unit=0,drive=ahcidisk-1",
            "ahci,id=ahci0",
            "lsi53c895a",
            "scsi-hd,drive=s,scsi-id=0",
            "xen-pvdevice,device-id=0x0002",
            "usb-tablet",
            "piix3-usb-uhci",
            "intel-hda",
            "hda-duplex",
            "virtio-blk-pci",
            "rtl8139,netdev=nope",
        ],
    ),
    (
        "-serial",
        &[
            "pty",
            "none",
            "null",
            "stdio",
            "chardev:ch",
            "file:/tmp/s",
            "/dev/ttyS0",
            "unix:/s,server,nowait",
            "tcp:127.0.0.1:4555",
        ],
    ),
    ("-spice", &["port=6000"]),
    ("-boot", &["order=c", "order=cda", "order=dc,once=d,menu=on", "menu=off", "order=x"]),
    ("-usbdevice", &["tablet", "mouse", "host:1234:5678"]),
    ("-soundhw", &["hda", "ac97", "sb16"]),
    ("-smp", &["2,maxcpus=4", "1", "4,maxcpus=2", "0", "2,cores=2", "200", "128", "2,sockets=2"]),
    (
        "-netdev",
        &[
            "type=tap,id=net0,ifname=vif5.0-emu,br=xenbr0,script=no,downscript=no",
            "type=tap,id=net1,ifname=vif5.1-emu,br=xenbr1,script=no,downscript=no",
            "user,id=n",
            "type=tap,id=n",
        ],
    ),
    ("-net", &["none", "nic,model=rtl8139"]),
    ("-object", &["filter-mirror,id=m"]),
    ("-chroot", &["/var/run/xen/qemu-root-5", ""]),
    ("-incoming", &["fd:7", "fd:x", "tcp:0:4444", "defer"]),
    (
        "-machine",
        &[
            "xenfv,suppress-vmdesc=on",
            "pc,accel=xen,suppress-vmdesc=on",
            "xenfv,max-ram-below-4g=3221225472",
            "xenfv,igd-passthru=on",
            "q35",
            "xenfv,foo=bar",
        ],
    ),
    ("-M", &["xenfv", "pc,accel=xen"]),
    ("-m", &["128", "1016", "0", "1.5", "1536K", "2G", "18446744073709551615"]),
    (
        "-drive",
        &[
            "file=/var/lib/xen/images/vm1.img,if=ide,index=0,media=disk,format=raw,cache=writeback",
            "if=none,readonly=on,id=ide-5632,file=/srv/iso/inst.iso,format=raw",
            "if=none,readonly=on,id=ide-5696",
            "file=/d.qcow2,if=none,id=ahcidisk-1,format=qcow2,cache=writeback",
            "file=/a,if=ide,index=4",
            "file=/a,if=virtio",
            "file=/x,,y.img,if=ide,index=1,media=disk,format=raw",
            "file=/a,if=none,id=s",
            "if=ide,index=0",
            "file=/b,if=ide,bus=0,unit=0",
            "file=/b,if=scsi,bus=0,unit=0,format=raw",
        ],
    ),
    ("-runas", &["xen-qemuuser-shared", "131091:131072", "", "1:x"]),
    (
        "-sandbox",
        &["on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny", "off", "maybe"],
    ),
    ("-trace", &["events=/dev/null", "help"]),
    ("-global", &["cirrus-vga.vgamem_mb=8", "isa-fdc.driveA=", "x"]),
    ("-vcpus", &["2"]),
    ("-vcpu_avail", &["3"]),
];

/// QemuOpts keys and values seen in libxl's argv, for assembled parameter lists.
const KEYS: [&str; 32] = [
    "id",
    "path",
    "fd",
    "server",
    "wait",
    "nowait",
    "chardev",
    "mode",
    "pretty",
    "file",
    "if",
    "index",
    "media",
    "format",
    "cache",
    "readonly",
    "drive",
    "bus",
    "unit",
    "netdev",
    "mac",
    "ifname",
    "br",
    "script",
    "maxcpus",
    "order",
    "once",
    "menu",
    "vgamem_mb",
    "suppress-vmdesc",
    "accel",
    "type",
];
const VALUES: [&str; 24] = [
    "on",
    "off",
    "0",
    "1",
    "3",
    "19",
    "control",
    "ide",
    "none",
    "disk",
    "cdrom",
    "raw",
    "qcow2",
    "writeback",
    "ide.0",
    "ide.1",
    "net0",
    "libxl-cmd",
    "/tmp/x",
    "xen",
    "00:16:3e:00:00:01",
    "no",
    "",
    "ahci0.0",
];

#[derive(Arbitrary, Debug)]
enum Value {
    Known(u8),
    Params { implied: Option<u8>, params: Vec<(u8, Option<u8>)>, escaped_comma: bool },
    Random(String),
}

#[derive(Arbitrary, Debug)]
enum Arg {
    Flag(u8),
    Opt {
        opt: u8,
        value: Value,
        double_dash: bool,
    },
    /// An option as the last element, without its argument.
    Bare(u8),
    Random(String),
    NotUtf8(Vec<u8>),
}

fn build(args: &[Arg]) -> Vec<OsString> {
    let mut v = Vec::new();
    for a in args.iter().take(48) {
        match a {
            Arg::Flag(i) => v.push(FLAGS[usize::from(*i) % FLAGS.len()].into()),
            Arg::Opt { opt, value, double_dash } => {
                let (name, values) = OPTIONS[usize::from(*opt) % OPTIONS.len()];
                v.push(if *double_dash { format!("-{name}") } else { name.to_string() }.into());
                let val = match value {
                    Value::Known(i) => values[usize::from(*i) % values.len()].to_string(),
                    Value::Params { implied, params, escaped_comma } => {
                        let mut parts = Vec::new();
                        if let Some(i) = implied {
                            let first = values[usize::from(*i) % values.len()];
                            parts.push(first.split(',').next().unwrap_or("").to_string());
                        }
                        for (k, val) in params.iter().take(10) {
                            let k = KEYS[usize::from(*k) % KEYS.len()];
                            parts.push(match val {
                                Some(x) => format!("{k}={}", VALUES[usize::from(*x) % VALUES.len()]),
                                None => k.to_string(),
                            });
                        }
                        let mut s = parts.join(",");
                        if *escaped_comma {
                            s.push_str(",,");
                        }
                        s
                    }
                    Value::Random(s) => s.clone(),
                };
                v.push(val.into());
            }
            Arg::Bare(i) => {
                v.push(OPTIONS[usize::from(*i) % OPTIONS.len()].0.into());
                break;
            }
            Arg::Random(s) => v.push(s.into()),
            Arg::NotUtf8(b) => v.push(OsString::from_vec(b.clone())),
        }
    }
    v
}

fn known_option(o: &str) -> bool {
    FLAGS.contains(&o) || OPTIONS.iter().any(|(n, _)| *n == o) || o == "-vcpu"
}

/// Option as the parser sees it (`--opt` is `-opt`).
fn normalise(s: &str) -> &str {
    if s.starts_with("--") {
        &s[1..]
    } else {
        s
    }
}

fuzz_target!(|args: Vec<Arg>| {
    let argv = build(&args);
    let strs: Vec<Option<&str>> = argv.iter().map(|a| a.to_str()).collect();
    let present = |o: &str| strs.iter().flatten().any(|s| normalise(s) == o);
    match DmArgs::parse(&argv) {
        Ok(a) => {
            assert_eq!(DmArgs::parse(&argv).as_ref(), Ok(&a), "parse is not deterministic");
            assert!(strs.iter().all(Option::is_some), "non-UTF-8 argv accepted");
            assert!(
                1 <= a.vcpus && a.vcpus <= a.max_vcpus && a.max_vcpus <= MAX_VCPUS,
                "vcpus {}/{}",
                a.vcpus,
                a.max_vcpus
            );
            assert!(a.domid.is_none_or(|d| d > 0 && d < DOMID_FIRST_RESERVED), "domid {:?}", a.domid);
            assert!(a.memory_mib.is_none_or(|m| m > 0), "memory {:?}", a.memory_mib);
            for (i, d) in a.disks.iter().enumerate() {
                if let DiskInterface::Ide { index } = d.interface {
                    assert!(index <= 3, "IDE index {index}");
                }
                assert!(
                    a.disks[..i].iter().all(|e| e.interface != d.interface),
                    "two disks at {:?}",
                    d.interface
                );
            }
            for (i, q) in a.qmp.iter().enumerate() {
                assert!(
                    a.qmp[..i].iter().all(|p| p.chardev_id != q.chardev_id),
                    "QMP chardev {} twice",
                    q.chardev_id
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            match &e {
                ArgvError::NotUtf8(i) => {
                    let first_bad = strs.iter().position(Option::is_none).map(|p| p + 1);
                    assert_eq!(first_bad, Some(*i), "{msg}");
                }
                ArgvError::UnknownOption(s) | ArgvError::Positional(s) => {
                    assert!(strs.iter().flatten().any(|a| a == s), "{msg}: not an argv element");
                    // Positional arguments are shown quoted (control characters escaped).
                    assert!(msg.contains(s.as_str()) || msg.contains(&format!("{s:?}")), "{msg}");
                    if let ArgvError::Positional(_) = e {
                        assert!(!s.starts_with('-') || s == "-", "{msg}");
                    } else {
                        assert!(!known_option(normalise(s)), "{msg}: a known option");
                    }
                }
                ArgvError::MissingArgument(o) => {
                    assert_eq!(strs.last().copied().flatten().map(normalise), Some(o.as_str()), "{msg}");
                    assert!(msg.contains(o.as_str()), "{msg}");
                }
                ArgvError::Unsupported { option, .. }
                | ArgvError::InvalidValue { option, .. }
                | ArgvError::UnknownParameter { option, .. }
                | ArgvError::MissingParameter { option, .. }
                | ArgvError::Reference { option, .. } => {
                    let word = option.split(' ').next().unwrap_or("");
                    assert!(known_option(word), "{msg}: error names {option:?}, not an option");
                    assert!(present(word), "{msg}: {word} is not in argv");
                    assert!(msg.contains(option.as_str()), "{msg}");
                }
            }
        }
    }
});
