//! Xen platform PCI device and the emulated-device unplug protocol (later issue).
