//! What the `moves` benchmark (pause, snapshot, restore against QEMU) needs beyond the
//! shared runner: QEMU's machine, a QMP client and a watch for a console log's first write.

pub mod qemu;
pub mod qmp;
pub mod watch;
