//! Links Xen's stable libraries through pkg-config, only with the `xen-libs` feature: without it
//! the crate (and the hvmdm binary) builds and runs on machines that have no libxen.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_XEN_LIBS").is_none() {
        return;
    }
    for lib in ["xendevicemodel", "xenforeignmemory", "xenevtchn", "xengnttab", "xentoolcore", "xencall"] {
        if let Err(e) = pkg_config::Config::new().probe(lib) {
            // A clear build failure beats undefined symbols at link time.
            panic!("feature xen-libs: pkg-config cannot find {lib} (install libxen-dev): {e}");
        }
    }
}
