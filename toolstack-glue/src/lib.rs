//! Toolstack glue: the QEMU-style argv libxl passes (`argv`), the QMP protocol core (`qmp`) and
//! its Unix-socket server with SCM_RIGHTS fd passing (`qmp::server`).

pub mod argv;
pub mod qmp;
