//! The in-process virtio-blk benchmark (`devices`): Keel's block device driven from the host
//! through guest memory by the virtio driver harness, against `fio` on the same file.
//!
//! [`pattern`], [`fio`]'s command lines and JSON parsing, and [`report`] are pure logic with
//! unit tests; [`image`] makes the file and controls its page cache; [`rig`] runs the device;
//! [`uring`] is a prototype io_uring engine for the same device path.

pub mod fio;
pub mod image;
pub mod pattern;
pub mod report;
pub mod rig;
pub mod uring;

use std::time::Duration;

/// What one measured run did, and what it took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Run {
    /// Requests completed (for writes with a flush after each: the writes).
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    pub wall: Duration,
    /// Process CPU time (user + system) over the run.
    pub cpu: Duration,
    /// Time inside the device's queue processing (`process()`), the rest being the
    /// harness acting as the guest driver. `None` where not measured (fio).
    pub device: Option<Duration>,
    /// The median over batches of the device's time per request, ns: the device's cost
    /// without the batches that other work on the host preempted.
    pub device_median_ns: Option<f64>,
}

fn per_second(count: f64, wall: Duration) -> Option<f64> {
    let secs = wall.as_secs_f64();
    (secs > 0.0).then(|| count / secs)
}

fn per_request(time: Duration, requests: u64) -> Option<f64> {
    (requests > 0).then(|| time.as_nanos() as f64 / requests as f64)
}

impl Run {
    pub fn iops(&self) -> Option<f64> {
        per_second(self.requests as f64, self.wall)
    }

    /// Decimal megabytes (10^6 bytes) per second, as fio's MB/s.
    pub fn mb_per_s(&self) -> Option<f64> {
        per_second(self.bytes as f64 / 1e6, self.wall)
    }

    pub fn cpu_ns_per_request(&self) -> Option<f64> {
        per_request(self.cpu, self.requests)
    }

    pub fn device_ns_per_request(&self) -> Option<f64> {
        per_request(self.device?, self.requests)
    }

    /// Wall time per request, ns.
    pub fn wall_ns_per_request(&self) -> Option<f64> {
        per_request(self.wall, self.requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_costs_of_a_run() {
        let run = Run {
            requests: 1000,
            bytes: 4_096_000,
            wall: Duration::from_millis(500),
            cpu: Duration::from_micros(400),
            device: Some(Duration::from_micros(250)),
            device_median_ns: Some(240.0),
        };
        assert_eq!(run.iops(), Some(2000.0));
        assert_eq!(run.mb_per_s(), Some(8.192));
        assert_eq!(run.cpu_ns_per_request(), Some(400.0));
        assert_eq!(run.device_ns_per_request(), Some(250.0));
        assert_eq!(run.wall_ns_per_request(), Some(500_000.0));
    }

    #[test]
    fn an_empty_run_has_no_rates() {
        let run = Run::default();
        assert_eq!(run.iops(), None);
        assert_eq!(run.cpu_ns_per_request(), None);
        assert_eq!(run.device_ns_per_request(), None);
    }
}
