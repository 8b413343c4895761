//! The results as Markdown tables (pasted into docs/benchmarks.md).

use std::fmt::Write;

use keel_benches::stats::{median, summarize, Summary};

use super::run::Measured;

/// The runs of one VMM configuration on one workload, summarised.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Operations per run (median).
    pub ops_per_run: f64,
    pub ops_per_sec: Summary,
    pub mb_per_sec: Summary,
    pub kicks_per_op: Option<f64>,
    /// Host CPU microseconds per operation: the vCPU thread, and the rest of the VMM.
    pub vcpu_us_per_op: Option<f64>,
    pub other_us_per_op: Option<f64>,
}

impl Stats {
    /// None for no runs.
    pub fn of(runs: &[Measured]) -> Option<Stats> {
        let per_op = |f: &dyn Fn(&Measured) -> Option<f64>| {
            median(
                &runs
                    .iter()
                    .filter_map(|m| f(m).map(|v| v / m.ops.max(1) as f64))
                    .collect::<Vec<_>>(),
            )
        };
        Some(Stats {
            ops_per_run: median(&runs.iter().map(|m| m.ops as f64).collect::<Vec<_>>())?,
            ops_per_sec: summarize(&runs.iter().map(Measured::ops_per_sec).collect::<Vec<_>>())?,
            mb_per_sec: summarize(&runs.iter().map(Measured::mb_per_sec).collect::<Vec<_>>())?,
            kicks_per_op: per_op(&|m| m.kicks.map(|k| k as f64)),
            vcpu_us_per_op: per_op(&|m| m.cpu.map(|c| c.vcpu_secs * 1e6)),
            other_us_per_op: per_op(&|m| m.cpu.map(|c| c.other_secs * 1e6)),
        })
    }
}

/// One workload: Keel, and QEMU in each configuration measured (none for vsock).
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: String,
    pub keel: Option<Stats>,
    /// Keel with the disk opened `direct=on` (`O_DIRECT`), when it was measured (disk
    /// workloads); inside, None when every run failed.
    pub keel_direct: Option<Option<Stats>>,
    /// (configuration, its figures; None when every run failed)
    pub qemu: Vec<(String, Option<Stats>)>,
}

/// 1234567.8 -> "1,234,568"
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

fn ratio(keel: Option<&Stats>, qemu: Option<&Stats>) -> String {
    match (keel, qemu) {
        (Some(k), Some(q)) if q.ops_per_sec.median > 0.0 => {
            format!("{:.2}", k.ops_per_sec.median / q.ops_per_sec.median)
        }
        _ => "-".to_string(),
    }
}

/// Throughput (medians) and the Keel/QEMU ratio of the medians.
pub fn render_throughput(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Workload | Keel ops/s | Keel MB/s | QEMU | QEMU ops/s | QEMU MB/s | Keel/QEMU |\n\
         |---|---:|---:|---|---:|---:|---:|\n",
    );
    for row in rows {
        let keel = row.keel.as_ref();
        let (k_ops, k_mb) = keel.map_or(("failed".into(), "-".into()), |k| {
            (
                thousands(k.ops_per_sec.median),
                format!("{:.1}", k.mb_per_sec.median),
            )
        });
        if row.qemu.is_empty() {
            let _ = writeln!(
                out,
                "| {} | {k_ops} | {k_mb} | (not run) | - | - | - |",
                row.workload
            );
        }
        for (i, (config, q)) in row.qemu.iter().enumerate() {
            let (q_ops, q_mb) = q.as_ref().map_or(("failed".into(), "-".into()), |q| {
                (
                    thousands(q.ops_per_sec.median),
                    format!("{:.1}", q.mb_per_sec.median),
                )
            });
            let (name, ko, km) = if i == 0 {
                (row.workload.as_str(), k_ops.as_str(), k_mb.as_str())
            } else {
                ("", "", "")
            };
            let _ = writeln!(
                out,
                "| {name} | {ko} | {km} | {config} | {q_ops} | {q_mb} | {} |",
                ratio(keel, q.as_ref())
            );
        }
    }
    out
}

/// Keel with `direct=on` against QEMU with `cache=none` (both `O_DIRECT`), and against Keel
/// through the page cache; only the rows where Keel direct was measured.
pub fn render_direct(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Workload | Keel direct=on ops/s | Keel direct=on MB/s | QEMU cache=none ops/s | \
         QEMU cache=none MB/s | Keel direct / QEMU cache=none | Keel direct / Keel |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let Some(direct) = &row.keel_direct else {
            continue;
        };
        let none = row
            .qemu
            .iter()
            .find(|(c, _)| c.starts_with("cache=none"))
            .and_then(|(_, s)| s.as_ref());
        let figures = |s: Option<&Stats>| {
            s.map_or(("failed".to_string(), "-".to_string()), |s| {
                (
                    thousands(s.ops_per_sec.median),
                    format!("{:.1}", s.mb_per_sec.median),
                )
            })
        };
        let (d_ops, d_mb) = figures(direct.as_ref());
        let (q_ops, q_mb) = figures(none);
        let _ = writeln!(
            out,
            "| {} | {d_ops} | {d_mb} | {q_ops} | {q_mb} | {} | {} |",
            row.workload,
            ratio(direct.as_ref(), none),
            ratio(direct.as_ref(), row.keel.as_ref()),
        );
    }
    out
}

/// Per VMM configuration: spread of the runs, notifications and host CPU per operation.
pub fn render_costs(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Workload | VMM | Ops per run | Runs | ops/s min-max | Kicks per op | \
         vCPU thread us/op | Other threads us/op |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let mut configs = vec![("Keel".to_string(), row.keel.as_ref())];
        if let Some(direct) = &row.keel_direct {
            configs.push(("Keel direct=on".to_string(), direct.as_ref()));
        }
        configs.extend(
            row.qemu
                .iter()
                .map(|(c, s)| (format!("QEMU {c}"), s.as_ref())),
        );
        for (i, (vmm, s)) in configs.iter().enumerate() {
            let name = if i == 0 { row.workload.as_str() } else { "" };
            match s {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "| {name} | {vmm} | {} | {} | {}-{} | {} | {} | {} |",
                        thousands(s.ops_per_run),
                        s.ops_per_sec.count,
                        thousands(s.ops_per_sec.min),
                        thousands(s.ops_per_sec.max),
                        opt(s.kicks_per_op, 3),
                        opt(s.vcpu_us_per_op, 2),
                        opt(s.other_us_per_op, 2),
                    );
                }
                None => {
                    let _ = writeln!(out, "| {name} | {vmm} | - | 0 | failed | - | - | - |");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::cpu::Usage;

    fn measured(secs: f64, ops: u64) -> Measured {
        Measured {
            secs,
            ops,
            bytes: ops * 4096,
            kicks: Some(ops / 2),
            cpu: Some(Usage {
                vcpu_secs: secs,
                other_secs: secs / 2.0,
            }),
        }
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn stats_are_medians_per_operation() {
        let runs = [
            measured(1.0, 1000),
            measured(2.0, 1000),
            measured(4.0, 1000),
        ];
        let s = Stats::of(&runs).expect("runs");
        assert_eq!(s.ops_per_sec.median, 500.0);
        assert_eq!(s.ops_per_sec.min, 250.0);
        assert_eq!(s.mb_per_sec.median, 500.0 * 4096.0 / 1e6);
        assert_eq!(s.kicks_per_op, Some(0.5));
        assert_eq!(s.vcpu_us_per_op, Some(2000.0));
        assert_eq!(s.other_us_per_op, Some(1000.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn tables_have_a_line_per_qemu_configuration_and_the_ratio() {
        let fast = Stats::of(&[measured(1.0, 2000)]);
        let slow = Stats::of(&[measured(1.0, 1000)]);
        let rows = vec![
            Row {
                workload: "blk read".into(),
                keel: fast.clone(),
                keel_direct: Some(slow.clone()),
                qemu: vec![
                    ("cache=none".into(), slow.clone()),
                    ("cache=writeback".into(), None),
                ],
            },
            Row {
                workload: "vsock".into(),
                keel: fast,
                keel_direct: None,
                qemu: vec![],
            },
        ];
        let t = render_throughput(&rows);
        assert!(
            t.contains("| blk read | 2,000 | 8.2 | cache=none | 1,000 | 4.1 | 2.00 |"),
            "{t}"
        );
        assert!(
            t.contains("|  |  |  | cache=writeback | failed | - | - |"),
            "{t}"
        );
        assert!(
            t.contains("| vsock | 2,000 | 8.2 | (not run) | - | - | - |"),
            "{t}"
        );
        let c = render_costs(&rows);
        assert!(
            c.contains("| blk read | Keel | 2,000 | 1 | 2,000-2,000 | 0.500 | 500.00 | 250.00 |"),
            "{c}"
        );
        assert!(
            c.contains("|  | QEMU cache=writeback | - | 0 | failed | - | - | - |"),
            "{c}"
        );
        assert!(c.contains("|  | Keel direct=on | 1,000 | 1 |"), "{c}");
        let d = render_direct(&rows);
        assert!(
            d.contains("| blk read | 1,000 | 4.1 | 1,000 | 4.1 | 1.00 | 0.50 |"),
            "{d}"
        );
        assert!(!d.contains("vsock"), "{d}");
    }
}
