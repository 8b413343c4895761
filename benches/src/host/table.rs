//! The results of `host` as a Markdown table: per figure the sample count, Keel's min, median
//! and max, QEMU's where there is a QEMU counterpart, and the ratio of the medians.

use std::fmt::Write;

use keel_benches::report::cell;
use keel_benches::stats::{ratio, summarize, Summary};

/// One figure.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub unit: &'static str,
    pub keel: Option<Summary>,
    pub qemu: Option<Summary>,
}

impl Row {
    pub fn new(label: &str, unit: &'static str, keel: &[f64], qemu: Option<&[f64]>) -> Row {
        Row {
            label: label.to_string(),
            unit,
            keel: summarize(keel),
            qemu: qemu.and_then(summarize),
        }
    }

    /// Keel's median over QEMU's median.
    pub fn ratio(&self) -> Option<f64> {
        ratio(self.keel.map(|s| s.median), self.qemu.map(|s| s.median))
    }
}

fn count(summary: Option<Summary>) -> String {
    summary.map_or_else(|| "-".to_string(), |s| s.count.to_string())
}

/// The Markdown table of `rows`.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Figure | n | Keel min | Keel median | Keel max | QEMU n | QEMU min | QEMU median \
         | QEMU max | Keel/QEMU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let (k, q) = (row.keel, row.qemu);
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            row.unit,
            count(k),
            cell(k.map(|s| s.min)),
            cell(k.map(|s| s.median)),
            cell(k.map(|s| s.max)),
            count(q),
            cell(q.map(|s| s.min)),
            cell(q.map(|s| s.median)),
            cell(q.map(|s| s.max)),
            cell(row.ratio()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_with_qemu_has_a_ratio_and_one_without_has_dashes() {
        let rows = [
            Row::new("start", "ms", &[10.0, 30.0, 20.0], Some(&[40.0, 40.0])),
            Row::new("daemon", "MiB", &[5.0], None),
        ];
        assert_eq!(rows[0].ratio(), Some(0.5));
        assert_eq!(rows[1].ratio(), None);
        let table = render(&rows);
        assert!(
            table.contains(
                "| start (ms) | 3 | 10.00 | 20.00 | 30.00 | 2 | 40.00 | 40.00 | 40.00 | 0.50 |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| daemon (MiB) | 1 | 5.00 | 5.00 | 5.00 | - | - | - | - | - |"),
            "{table}"
        );
    }
}
