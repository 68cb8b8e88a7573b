//! QEMU-style argv parser, QMP server, xenstore state, save/restore (later issue).
