//! What the `migrate` benchmark (live migration against QEMU) needs: the lab of two network
//! namespaces with a daemon in each, and the console checks after a move.

pub mod console;
pub mod lab;
