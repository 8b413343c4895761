//! Host CPU time of a VMM process, split into its vCPU thread and everything else (device
//! emulation, I/O, the event loop), from `/proc`.

use std::path::Path;

/// CPU time of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// All threads, exited ones included (`/proc/PID/stat`), in clock ticks.
    pub total_ticks: u64,
    /// The vCPU threads (`/proc/PID/task/TID/schedstat`), in nanoseconds.
    pub vcpu_ns: u64,
}

/// CPU seconds spent between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub vcpu_secs: f64,
    /// The rest of the process: total less the vCPU threads (clock-tick resolution).
    pub other_secs: f64,
}

impl Usage {
    pub fn between(a: Snapshot, b: Snapshot, ticks_per_sec: u64) -> Usage {
        let total = b.total_ticks.saturating_sub(a.total_ticks) as f64 / ticks_per_sec as f64;
        let vcpu = b.vcpu_ns.saturating_sub(a.vcpu_ns) as f64 / 1e9;
        Usage {
            vcpu_secs: vcpu,
            other_secs: (total - vcpu).max(0.0),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name in
/// parentheses may hold spaces and parentheses: the fields count from the last `)`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Time on CPU (the first field of `/proc/.../schedstat`), nanoseconds.
pub fn schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// True for a vCPU thread's name: Keel's `vcpuN`, QEMU's `CPU N/KVM` (with
/// `-name debug-threads=on`).
pub fn is_vcpu_thread(comm: &str) -> bool {
    let comm = comm.trim_end();
    comm.strip_prefix("vcpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
}

/// The process's CPU time now; None if it is gone.
pub fn snapshot(pid: u32) -> Option<Snapshot> {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let total_ticks = stat_ticks(&std::fs::read_to_string(proc_dir.join("stat")).ok()?)?;
    let mut vcpu_ns = 0;
    for task in std::fs::read_dir(proc_dir.join("task")).ok()?.flatten() {
        let dir = task.path();
        let is_vcpu = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| is_vcpu_thread(&c));
        if is_vcpu {
            vcpu_ns += std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| schedstat_ns(&s))
                .unwrap_or(0);
        }
    }
    Some(Snapshot {
        total_ticks,
        vcpu_ns,
    })
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ).
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_counts_from_the_last_parenthesis() {
        let stat = "4242 (CPU 0/KVM) (x) R 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(stat_ticks(stat), Some(325));
        assert_eq!(stat_ticks("4242 (keel) R 1"), None);
        assert_eq!(stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn schedstat_first_field_is_time_on_cpu() {
        assert_eq!(schedstat_ns("619755 0 2\n"), Some(619_755));
        assert_eq!(schedstat_ns(""), None);
    }

    #[test]
    fn vcpu_threads_of_both_vmms_are_recognised() {
        for name in ["vcpu0", "vcpu31\n", "CPU 0/KVM", "CPU 12/KVM\n"] {
            assert!(is_vcpu_thread(name), "{name}");
        }
        for name in [
            "keel",
            "vcpu",
            "vcpux",
            "qemu-system-x86",
            "IO mon_iothread",
            "CPU 0",
        ] {
            assert!(!is_vcpu_thread(name), "{name}");
        }
    }

    #[test]
    fn usage_splits_total_into_vcpu_and_the_rest() {
        let a = Snapshot {
            total_ticks: 100,
            vcpu_ns: 1_000_000_000,
        };
        let b = Snapshot {
            total_ticks: 450,
            vcpu_ns: 3_500_000_000,
        };
        let u = Usage::between(a, b, 100);
        assert_eq!(u.vcpu_secs, 2.5);
        assert!((u.other_secs - 1.0).abs() < 1e-9);
        // Tick rounding can make the vCPU part exceed the total: never a negative rest.
        let c = Snapshot {
            total_ticks: 101,
            vcpu_ns: 1_200_000_000,
        };
        assert_eq!(Usage::between(a, c, 100).other_secs, 0.0);
    }
}
