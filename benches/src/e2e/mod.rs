//! The parts of `e2e`: device throughput end to end, the probe guest's ring-3 benchmark
//! loops (`probe.bench_*`) under Keel and QEMU.
//!
//! [`lines`] and [`cpu`] are pure parsing with unit tests; [`run`] starts a VMM and times the
//! probe's `start` and `done` lines; [`netns`] holds the network namespace, the tap and the
//! frame sender; [`vsock`] the host end of the vsock stream; [`setup`] finds and builds what a
//! run needs; [`table`] prints the results.

pub mod cpu;
pub mod lines;
pub mod netns;
pub mod run;
pub mod setup;
pub mod table;
pub mod vsock;
