//! The results of a benchmark run: a Markdown table (pasted into docs/benchmarks.md) or JSON.

use std::fmt::Write;

use crate::stats::{ratio, Summary};

/// A duration in milliseconds, as the tables show times.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// KiB (as /proc gives memory) in MiB, as the tables show memory.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The machine and software the figures come from.
#[derive(Debug, Clone)]
pub struct Host {
    pub date_utc: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    /// True when /dev/kvm is the software PVM module.
    pub pvm: bool,
    pub qemu_version: String,
}

impl Host {
    /// This machine, now.
    pub fn current(qemu_version: String) -> Host {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(std::time::Duration::ZERO);
        Host {
            date_utc: utc_date(now.as_secs()),
            cpu_model: crate::tools::cpu_model(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: crate::tools::kernel_release(),
            pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            qemu_version,
        }
    }

    /// "CPU (n CPUs), Linux release, /dev/kvm: kind; QEMU version", the reports' host line.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} CPUs), Linux {}, /dev/kvm: {}; {}",
            self.cpu_model,
            self.cpus,
            self.kernel,
            if self.pvm {
                "software PVM module (kvm_pvm)"
            } else {
                "hardware KVM"
            },
            self.qemu_version
        )
    }
}

/// One measured quantity for both VMMs.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Stable name, used in JSON and by the goals.
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub keel: Option<Summary>,
    pub qemu: Option<Summary>,
}

impl Metric {
    /// Keel's median over QEMU's median.
    pub fn ratio(&self) -> Option<f64> {
        ratio(self.keel.map(|s| s.median), self.qemu.map(|s| s.median))
    }
}

/// A target from the start-up issue, with what peers reach on this host.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub metric: &'static str,
    pub label: &'static str,
    /// Met when Keel's median is at most this.
    pub limit: f64,
    pub unit: &'static str,
    pub peers: &'static str,
}

pub const GOALS: [Goal; 2] = [
    Goal {
        metric: "first_line_ms",
        label: "time to first serial line",
        limit: 3.0,
        unit: "ms",
        peers: "bare KVM floor 1.3, Cloud Hypervisor 4.4, Firecracker 8-10, QEMU 38 ms",
    },
    Goal {
        metric: "idle_vm_rss_mib",
        label: "idle RSS",
        limit: 3.0,
        unit: "MiB",
        peers: "floor 1.2, Firecracker 4.1, Cloud Hypervisor 8.7, QEMU 36.4 MiB",
    },
];

/// Everything one benchmark run produced.
#[derive(Debug, Clone)]
pub struct Results {
    pub host: Host,
    pub runs: usize,
    pub rss_samples: usize,
    /// Runs that failed and were left out, one message each.
    pub failures: Vec<String>,
    pub metrics: Vec<Metric>,
}

impl Results {
    fn metric(&self, key: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.key == key)
    }

    /// Keel's median for the goal's metric, and whether it meets the goal.
    pub fn goal_status(&self, goal: &Goal) -> Option<(f64, bool)> {
        let keel = self.metric(goal.metric)?.keel?;
        Some((keel.median, keel.median <= goal.limit))
    }
}

/// A figure to two decimals, or "-".
pub fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// Markdown: host, metrics table, goals table, failures.
pub fn render_table(results: &Results) -> String {
    let h = &results.host;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Keel start-up benchmark, {} UTC: {} timed boots and {} idle-memory boots per VMM, \
         interleaved",
        h.date_utc, results.runs, results.rss_samples
    );
    let _ = writeln!(out, "Host: {}", h.describe());
    out.push('\n');
    out.push_str(
        "| Metric | Keel median | Keel min | Keel max | QEMU median | QEMU min | QEMU max \
         | Keel/QEMU |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in &results.metrics {
        let (k, q) = (m.keel, m.qemu);
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            m.label,
            m.unit,
            cell(k.map(|s| s.median)),
            cell(k.map(|s| s.min)),
            cell(k.map(|s| s.max)),
            cell(q.map(|s| s.median)),
            cell(q.map(|s| s.min)),
            cell(q.map(|s| s.max)),
            cell(m.ratio()),
        );
    }
    out.push_str(
        "\n| Goal | Keel median | Result | Peers on this host, quiet machine |\n\
         |---|---:|---|---|\n",
    );
    for goal in &GOALS {
        let (median, met) = match results.goal_status(goal) {
            Some((median, met)) => (
                format!("{median:.2} {}", goal.unit),
                if met { "met" } else { "not met" },
            ),
            None => ("-".to_string(), "not measured"),
        };
        let _ = writeln!(
            out,
            "| {} <= {} {} | {median} | {met} | {} |",
            goal.label, goal.limit, goal.unit, goal.peers
        );
    }
    if !results.failures.is_empty() {
        let _ = writeln!(
            out,
            "\n{} run(s) failed and are left out:",
            results.failures.len()
        );
        for failure in &results.failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
    out
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_number(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "null".to_string(),
    }
}

fn json_summary(summary: Option<Summary>) -> String {
    match summary {
        Some(s) => format!(
            "{{\"median\": {}, \"min\": {}, \"max\": {}, \"count\": {}}}",
            json_number(Some(s.median)),
            json_number(Some(s.min)),
            json_number(Some(s.max)),
            s.count
        ),
        None => "null".to_string(),
    }
}

/// The same content as [`render_table`], as one JSON object.
pub fn render_json(results: &Results) -> String {
    let h = &results.host;
    let mut out = String::from("{\n");
    let _ = writeln!(out, "  \"date_utc\": {},", json_string(&h.date_utc));
    let _ = writeln!(
        out,
        "  \"host\": {{\"cpu_model\": {}, \"cpus\": {}, \"kernel\": {}, \"pvm\": {}, \
         \"qemu_version\": {}}},",
        json_string(&h.cpu_model),
        h.cpus,
        json_string(&h.kernel),
        h.pvm,
        json_string(&h.qemu_version)
    );
    let _ = writeln!(out, "  \"runs\": {},", results.runs);
    let _ = writeln!(out, "  \"rss_samples\": {},", results.rss_samples);
    out.push_str("  \"metrics\": [\n");
    for (i, m) in results.metrics.iter().enumerate() {
        let _ = write!(
            out,
            "    {{\"key\": {}, \"label\": {}, \"unit\": {}, \"keel\": {}, \"qemu\": {}, \
             \"keel_over_qemu\": {}}}",
            json_string(m.key),
            json_string(m.label),
            json_string(m.unit),
            json_summary(m.keel),
            json_summary(m.qemu),
            json_number(m.ratio())
        );
        out.push_str(if i + 1 < results.metrics.len() {
            ",\n"
        } else {
            "\n"
        });
    }
    out.push_str("  ],\n  \"goals\": [\n");
    for (i, goal) in GOALS.iter().enumerate() {
        let status = results.goal_status(goal);
        let _ = write!(
            out,
            "    {{\"metric\": {}, \"label\": {}, \"limit\": {}, \"unit\": {}, \
             \"keel_median\": {}, \"met\": {}, \"peers\": {}}}",
            json_string(goal.metric),
            json_string(goal.label),
            json_number(Some(goal.limit)),
            json_string(goal.unit),
            json_number(status.map(|s| s.0)),
            status.map_or_else(|| "null".to_string(), |s| s.1.to_string()),
            json_string(goal.peers)
        );
        out.push_str(if i + 1 < GOALS.len() { ",\n" } else { "\n" });
    }
    let failures: Vec<String> = results.failures.iter().map(|f| json_string(f)).collect();
    let _ = writeln!(out, "  ],\n  \"failures\": [{}]\n}}", failures.join(", "));
    out
}

/// `YYYY-MM-DD HH:MM` in UTC for seconds since the Unix epoch.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_of_known_instants() {
        assert_eq!(utc_date(0), "1970-01-01 00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc_date(1_704_067_199), "2023-12-31 23:59");
        assert_eq!(utc_date(1_709_210_096), "2024-02-29 12:34");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn ratio_needs_both_medians() {
        let s = |median| Summary {
            median,
            min: median,
            max: median,
            count: 1,
        };
        let mut m = Metric {
            key: "k",
            label: "l",
            unit: "ms",
            keel: Some(s(2.0)),
            qemu: Some(s(40.0)),
        };
        assert_eq!(m.ratio(), Some(0.05));
        m.qemu = None;
        assert_eq!(m.ratio(), None);
    }
}
