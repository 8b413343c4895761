//! The parts of `host`: what the host daemon `keel serve` costs.
//!
//! [`daemon`] starts and drives one `keel serve` (CLI and raw HTTP on its socket);
//! [`cleanup`] makes sure no daemon, VMM or QEMU outlives the benchmark, even on a signal;
//! [`table`] prints the results.

pub mod cleanup;
pub mod daemon;
pub mod table;
