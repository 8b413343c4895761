//! The results of the `devices` benchmark: Markdown tables (pasted into docs/benchmarks.md)
//! or JSON.

use std::fmt::Write;

use serde_json::{json, Value};

use super::Run;
use crate::stats::{median, ratio};

/// Keel's figure over fio's that the issue asks for.
pub const GOAL_RATIO: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Iops,
    /// Decimal megabytes per second.
    MegabytesPerSecond,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Iops => "IOPS",
            Unit::MegabytesPerSecond => "MB/s",
        }
    }

    pub fn rate(self, run: &Run) -> Option<f64> {
        match self {
            Unit::Iops => run.iops(),
            Unit::MegabytesPerSecond => run.mb_per_s(),
        }
    }
}

/// One workload, measured four ways, each over one or more rounds.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: Unit,
    /// Share of the file in the page cache before the first run and after the last, 0 to 1.
    pub resident: Option<(f64, f64)>,
    /// Keel's `Block`, with the engine of [`Results::keel_engine`].
    pub keel: Vec<Run>,
    pub fio_psync: Vec<Run>,
    /// The io_uring prototype behind the same transport and parser.
    pub uring: Vec<Run>,
    pub fio_uring: Vec<Run>,
    /// The hybrid prototype: page-cache hits by non-blocking preadv2, misses on io_uring.
    pub hybrid: Vec<Run>,
}

/// The median over the runs of a figure of each run.
pub fn median_of(runs: &[Run], figure: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(figure).collect();
    median(&values)
}

impl Row {
    /// Median rate of `runs`, in the row's unit.
    pub fn rate(&self, runs: &[Run]) -> Option<f64> {
        median_of(runs, |r| self.unit.rate(r))
    }

    pub fn keel_over_fio(&self) -> Option<f64> {
        ratio(self.rate(&self.keel), self.rate(&self.fio_psync))
    }

    pub fn uring_over_keel(&self) -> Option<f64> {
        ratio(self.rate(&self.uring), self.rate(&self.keel))
    }

    pub fn hybrid_over_keel(&self) -> Option<f64> {
        ratio(self.rate(&self.hybrid), self.rate(&self.keel))
    }

    /// fio's CPU time per request over Keel's: the throughput ratio as it would be if each
    /// had a CPU to itself, which other work on the host disturbs less.
    pub fn keel_over_fio_by_cpu(&self) -> Option<f64> {
        ratio(
            median_of(&self.fio_psync, Run::cpu_ns_per_request),
            median_of(&self.keel, Run::cpu_ns_per_request),
        )
    }

    pub fn goal_met(&self) -> Option<bool> {
        self.keel_over_fio().map(|r| r >= GOAL_RATIO)
    }
}

/// A cost per request of part of the path.
#[derive(Debug, Clone)]
pub struct Cost {
    pub key: &'static str,
    pub label: &'static str,
    pub ns: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub date_utc: String,
    pub host: String,
    pub file: String,
    pub file_bytes: u64,
    pub seconds: f64,
    pub rounds: usize,
    /// /proc/loadavg's 1-minute figure at the start and at the end: other work on the host.
    pub load: (f64, f64),
    /// fio's version, or why there is no fio.
    pub fio: Result<String, String>,
    /// Why there is no io_uring, when there is none.
    pub uring_error: Option<String>,
    /// The I/O engine of Keel's device (`Block::engine()`).
    pub keel_engine: Option<String>,
    pub rows: Vec<Row>,
    pub costs: Vec<Cost>,
}

fn figure(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v >= 10_000.0 => group_thousands(v.round() as u64),
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    }
}

/// 1234567 as "1,234,567".
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

fn residency(resident: Option<(f64, f64)>) -> String {
    match resident {
        None => "-".to_string(),
        Some((a, b)) if percent(a) == percent(b) => percent(a),
        Some((a, b)) => format!("{} -> {}", percent(a), percent(b)),
    }
}

fn ratio_cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}x"))
}

fn rate_cell(row: &Row, runs: &[Run]) -> String {
    figure(row.rate(runs), 0)
}

fn ns_cell(value: Option<f64>) -> String {
    figure(value, 0)
}

/// Markdown: the header lines, throughput, CPU per request, the device path's own cost.
pub fn render_table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Keel devices benchmark (in-process virtio-blk), {} UTC: {} round(s), {:.1} s per run; \
         medians over the rounds",
        results.date_utc, results.rounds, results.seconds
    );
    let _ = writeln!(
        out,
        "Host: {}; load average {:.2} at the start, {:.2} at the end",
        results.host, results.load.0, results.load.1
    );
    let _ = writeln!(
        out,
        "File: {} ({} MiB, written in full before the runs)",
        results.file,
        results.file_bytes >> 20
    );
    match &results.fio {
        Ok(version) => {
            let _ = writeln!(out, "fio: {version}");
        }
        Err(why) => {
            let _ = writeln!(out, "fio: NOT MEASURED: {why}");
        }
    }
    if let Some(why) = &results.uring_error {
        let _ = writeln!(out, "io_uring prototype: NOT MEASURED: {why}");
    }
    if let Some(engine) = &results.keel_engine {
        let _ = writeln!(out, "Keel's I/O engine: {engine}");
    }
    out.push_str(
        "\n| Workload | Page cache | Keel | fio psync | Keel/fio | Goal >= 0.9 \
         | io_uring prototype | fio io_uring | io_uring/Keel | hybrid prototype \
         | hybrid/Keel |\n\
         |---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for row in &results.rows {
        let goal = match row.goal_met() {
            Some(true) => "met",
            Some(false) => "not met",
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            row.unit.name(),
            residency(row.resident),
            rate_cell(row, &row.keel),
            rate_cell(row, &row.fio_psync),
            ratio_cell(row.keel_over_fio()),
            goal,
            rate_cell(row, &row.uring),
            rate_cell(row, &row.fio_uring),
            ratio_cell(row.uring_over_keel()),
            rate_cell(row, &row.hybrid),
            ratio_cell(row.hybrid_over_keel()),
        );
    }
    out.push_str(
        "\nCPU per request (ns): process CPU time (user + system) over requests, the harness's \
         guest-side work included; \"in process()\": the device's own time, the median over \
         batches of the wall time inside process() per request.\n\n\
         | Workload | Keel CPU | Keel in process() | fio psync CPU | Keel/fio by CPU \
         | io_uring CPU | io_uring in process() | fio io_uring CPU | hybrid CPU \
         | hybrid in process() |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &results.rows {
        let cpu = |runs: &[Run]| ns_cell(median_of(runs, Run::cpu_ns_per_request));
        let device = |runs: &[Run]| ns_cell(median_of(runs, |r| r.device_median_ns));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            cpu(&row.keel),
            device(&row.keel),
            cpu(&row.fio_psync),
            ratio_cell(row.keel_over_fio_by_cpu()),
            cpu(&row.uring),
            device(&row.uring),
            cpu(&row.fio_uring),
            cpu(&row.hybrid),
            device(&row.hybrid),
        );
    }
    out.push_str(
        "\nThe device path alone, file in the page cache: wall time per request inside \
         process() (or per system call), the median over batches.\n\n\
         | Device path, per request | ns |\n|---|---:|\n",
    );
    for cost in &results.costs {
        let _ = writeln!(out, "| {} | {} |", cost.label, ns_cell(cost.ns));
    }
    out
}

fn json_runs(row: &Row, runs: &[Run]) -> Value {
    if runs.is_empty() {
        return Value::Null;
    }
    let rates: Vec<Option<f64>> = runs.iter().map(|r| row.unit.rate(r)).collect();
    json!({
        "rate_median": row.rate(runs),
        "rate_min": rates.iter().flatten().copied().reduce(f64::min),
        "rate_max": rates.iter().flatten().copied().reduce(f64::max),
        "rates": rates,
        "cpu_ns_per_request": median_of(runs, Run::cpu_ns_per_request),
        "device_ns_per_request_mean": median_of(runs, Run::device_ns_per_request),
        "device_ns_per_request_median": median_of(runs, |r| r.device_median_ns),
        "requests": runs.iter().map(|r| r.requests).sum::<u64>(),
        "bytes": runs.iter().map(|r| r.bytes).sum::<u64>(),
    })
}

/// The same content as [`render_table`], as one JSON object.
pub fn render_json(results: &Results) -> String {
    let rows: Vec<Value> = results
        .rows
        .iter()
        .map(|row| {
            json!({
                "key": row.key,
                "label": row.label,
                "unit": row.unit.name(),
                "resident_before": row.resident.map(|r| r.0),
                "resident_after": row.resident.map(|r| r.1),
                "keel": json_runs(row, &row.keel),
                "fio_psync": json_runs(row, &row.fio_psync),
                "keel_over_fio": row.keel_over_fio(),
                "keel_over_fio_by_cpu": row.keel_over_fio_by_cpu(),
                "goal": GOAL_RATIO,
                "goal_met": row.goal_met(),
                "uring_prototype": json_runs(row, &row.uring),
                "fio_io_uring": json_runs(row, &row.fio_uring),
                "uring_over_keel": row.uring_over_keel(),
                "hybrid_prototype": json_runs(row, &row.hybrid),
                "hybrid_over_keel": row.hybrid_over_keel(),
            })
        })
        .collect();
    let costs: Vec<Value> = results
        .costs
        .iter()
        .map(|c| json!({"key": c.key, "label": c.label, "ns": c.ns}))
        .collect();
    let value = json!({
        "date_utc": results.date_utc,
        "host": results.host,
        "file": results.file,
        "file_bytes": results.file_bytes,
        "seconds_per_run": results.seconds,
        "rounds": results.rounds,
        "load_average_start": results.load.0,
        "load_average_end": results.load.1,
        "fio_version": results.fio.as_ref().ok(),
        "fio_missing": results.fio.as_ref().err(),
        "uring_error": results.uring_error,
        "keel_engine": results.keel_engine,
        "workloads": rows,
        "device_path_ns": costs,
    });
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn run(requests: u64, bytes: u64) -> Run {
        Run {
            requests,
            bytes,
            wall: Duration::from_secs(1),
            cpu: Duration::from_millis(500),
            device: None,
            device_median_ns: None,
        }
    }

    fn row() -> Row {
        Row {
            key: "randread_qd1",
            label: "4 KiB random read, QD1",
            unit: Unit::Iops,
            resident: Some((1.0, 1.0)),
            keel: vec![run(450_000, 0)],
            fio_psync: vec![run(500_000, 0)],
            uring: Vec::new(),
            fio_uring: vec![run(400_000, 0)],
            hybrid: Vec::new(),
        }
    }

    #[test]
    fn ratios_and_goal() {
        let mut r = row();
        assert_eq!(r.keel_over_fio(), Some(0.9));
        // 500 ms of CPU over 450,000 and 500,000 requests.
        let by_cpu = r.keel_over_fio_by_cpu().expect("both CPU figures");
        assert!((by_cpu - 0.9).abs() < 1e-9, "{by_cpu}");
        assert_eq!(r.goal_met(), Some(true));
        assert_eq!(r.uring_over_keel(), None);
        r.keel = vec![run(400_000, 0)];
        assert_eq!(r.goal_met(), Some(false));
        // The median of the rounds counts, not the best.
        r.keel = vec![run(300_000, 0), run(460_000, 0), run(470_000, 0)];
        assert_eq!(r.goal_met(), Some(true));
        assert_eq!(r.rate(&r.keel), Some(460_000.0));
        r.fio_psync = Vec::new();
        assert_eq!(r.goal_met(), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }

    #[test]
    fn bandwidth_rows_use_megabytes() {
        let r = Row {
            unit: Unit::MegabytesPerSecond,
            keel: vec![run(100, 300_000_000)],
            fio_psync: vec![run(100, 250_000_000)],
            ..row()
        };
        assert_eq!(r.keel_over_fio(), Some(1.2));
    }

    #[test]
    fn numbers_are_grouped_and_missing_ones_dashed() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(figure(Some(523_456.4), 0), "523,456");
        assert_eq!(figure(Some(812.6), 0), "813");
        assert_eq!(figure(None, 0), "-");
        assert_eq!(residency(Some((1.0, 0.999))), "100%");
        assert_eq!(residency(Some((0.0, 0.23))), "0% -> 23%");
    }

    fn results() -> Results {
        Results {
            date_utc: "2026-11-23 12:00".to_string(),
            host: "test host".to_string(),
            file: "/tmp/x.img".to_string(),
            file_bytes: 1 << 30,
            seconds: 4.0,
            rounds: 1,
            load: (0.5, 0.7),
            fio: Err("fio is not installed".to_string()),
            uring_error: None,
            keel_engine: Some("hybrid".to_string()),
            rows: vec![row()],
            costs: vec![Cost {
                key: "get_id_qd1",
                label: "GET_ID",
                ns: Some(300.0),
            }],
        }
    }

    #[test]
    fn table_says_when_fio_is_missing() {
        let table = render_table(&results());
        assert!(table.contains("fio: NOT MEASURED: fio is not installed"));
        assert!(table.contains(
            "| 4 KiB random read, QD1 (IOPS) | 100% | 450,000 | 500,000 | 0.90x | met |"
        ));
        assert!(table.contains("| GET_ID | 300 |"));
        assert!(table.contains("Keel's I/O engine: hybrid"));
    }

    #[test]
    fn json_is_valid_and_complete() {
        let text = render_json(&results());
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["fio_missing"], "fio is not installed");
        assert_eq!(v["workloads"][0]["keel"]["rate_median"], 450_000.0);
        assert_eq!(v["workloads"][0]["keel"]["rates"][0], 450_000.0);
        assert_eq!(v["workloads"][0]["goal_met"], true);
        assert_eq!(v["workloads"][0]["uring_prototype"], Value::Null);
        assert_eq!(v["device_path_ns"][0]["ns"], 300.0);
        assert_eq!(v["keel_engine"], "hybrid");
    }
}
