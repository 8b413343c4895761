//! Keel's benchmarks. `startup` boots the probe guest under Keel and QEMU, interleaved, and
//! compares time to the first serial line, time to `PROBE ready`, idle memory and Keel's own
//! CPU time before the first vCPU entry. `devices` drives Keel's virtio-blk device in-process
//! through guest memory and compares it with fio on the same file. See docs/benchmarks.md.
//!
//! The modules hold the parts: [`stats`], [`serial`] and [`procfs`] are pure logic with unit
//! tests; [`runner`] starts and times the VMMs; [`report`] prints the results. [`blk`] holds
//! the parts of `devices`, [`moves`] and [`migrate`] those of the benchmarks of the same
//! names; [`tools`] finds or builds what every benchmark runs (probe, keel, QEMU).

pub mod blk;
pub mod migrate;
pub mod moves;
pub mod procfs;
pub mod report;
pub mod runner;
pub mod serial;
pub mod stats;
pub mod tools;
