//! The host baseline: `fio` on the same file with the same pattern, one job, buffered I/O, the
//! page cache left as the benchmark set it (`--invalidate=0`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::Run;

/// One fio job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// `randread` or `write`.
    pub rw: &'static str,
    pub block_size: &'static str,
    /// `psync` or `io_uring`.
    pub engine: &'static str,
    pub depth: u32,
    /// `--fdatasync=1`: an fdatasync after every write.
    pub fdatasync: bool,
}

impl Job {
    fn is_read(&self) -> bool {
        self.rw.contains("read")
    }
}

/// fio's arguments for `job` on `file` (its first `size` bytes) for `runtime`.
pub fn arguments(job: &Job, file: &Path, size: u64, runtime: Duration) -> Vec<String> {
    let mut args = vec![
        format!("--name=keel-{}-{}-qd{}", job.rw, job.engine, job.depth),
        format!("--filename={}", file.display()),
        format!("--size={size}"),
        format!("--ioengine={}", job.engine),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.block_size),
        format!("--iodepth={}", job.depth),
        "--direct=0".to_string(),
        "--invalidate=0".to_string(),
        // No posix_fadvise hint (fio gives POSIX_FADV_RANDOM to random jobs by default, which
        // turns off readahead): Keel's device gives none either.
        "--fadvise_hint=0".to_string(),
        "--time_based".to_string(),
        format!("--runtime={}ms", runtime.as_millis().max(1)),
        "--output-format=json".to_string(),
    ];
    if job.rw.starts_with("rand") {
        // Like the harness: independent random offsets, a different sequence each run.
        args.push("--norandommap".to_string());
        args.push("--randrepeat=0".to_string());
    }
    if job.depth > 1 && job.engine != "psync" {
        // Submit a whole batch at once and reap it whole, like one guest notification.
        args.push(format!("--iodepth_batch_submit={}", job.depth));
        args.push(format!("--iodepth_batch_complete_min={}", job.depth));
    }
    if job.fdatasync {
        args.push("--fdatasync=1".to_string());
    }
    args
}

/// The figures of fio's JSON report (`--output-format=json`), in the harness's terms. fio
/// may print notes before the JSON: everything before the first `{` is skipped.
pub fn parse(output: &str, read: bool) -> Result<Run> {
    let json = output
        .find('{')
        .map(|i| &output[i..])
        .context("fio printed no JSON report")?;
    let report: Value = serde_json::from_str(json).context("fio's JSON report does not parse")?;
    let job = report["jobs"]
        .get(0)
        .context("fio's report has no job in it")?;
    if let Some(error) = job["error"].as_i64().filter(|&e| e != 0) {
        bail!("fio's job failed with error {error}");
    }
    let dir = &job[if read { "read" } else { "write" }];
    let number = |v: &Value, name: &str| {
        v[name]
            .as_f64()
            .with_context(|| format!("fio's report has no number {name}"))
    };
    let requests = number(dir, "total_ios")? as u64;
    let bytes = number(dir, "io_bytes")? as u64;
    let runtime_ms = number(dir, "runtime")?;
    let cpu_percent = number(job, "usr_cpu")? + number(job, "sys_cpu")?;
    let job_ms = number(job, "job_runtime").unwrap_or(runtime_ms);
    Ok(Run {
        requests,
        bytes,
        wall: Duration::from_secs_f64(runtime_ms / 1000.0),
        cpu: Duration::from_secs_f64(cpu_percent / 100.0 * job_ms / 1000.0),
        device: None,
        device_median_ns: None,
    })
}

/// fio from PATH and its version, or None when it is not installed.
pub fn find() -> Option<(PathBuf, String)> {
    let path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("fio"))
        .find(|p| p.is_file())?;
    let output = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Some((path, version))
}

/// Runs `job` with fio at `fio`.
pub fn run(fio: &Path, job: &Job, file: &Path, size: u64, runtime: Duration) -> Result<Run> {
    let output = Command::new(fio)
        .args(arguments(job, file, size, runtime))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", fio.display()))?;
    if !output.status.success() {
        bail!(
            "fio failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse(&String::from_utf8_lossy(&output.stdout), job.is_read())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDREAD: Job = Job {
        rw: "randread",
        block_size: "4k",
        engine: "psync",
        depth: 1,
        fdatasync: false,
    };

    #[test]
    fn random_read_arguments() {
        let args = arguments(
            &RANDREAD,
            Path::new("/t/disk.img"),
            1 << 30,
            Duration::from_secs(4),
        );
        for expected in [
            "--filename=/t/disk.img",
            "--size=1073741824",
            "--ioengine=psync",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=1",
            "--direct=0",
            "--invalidate=0",
            "--fadvise_hint=0",
            "--runtime=4000ms",
            "--norandommap",
            "--output-format=json",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--iodepth_batch")));
        assert!(!args.iter().any(|a| a.starts_with("--fdatasync")));
    }

    #[test]
    fn batched_and_synced_arguments() {
        let uring = Job {
            engine: "io_uring",
            depth: 32,
            ..RANDREAD
        };
        let args = arguments(&uring, Path::new("f"), 4096, Duration::from_millis(500));
        assert!(args.iter().any(|a| a == "--iodepth_batch_submit=32"));
        assert!(args.iter().any(|a| a == "--iodepth_batch_complete_min=32"));
        assert!(args.iter().any(|a| a == "--runtime=500ms"));
        let write = Job {
            rw: "write",
            block_size: "1M",
            fdatasync: true,
            ..RANDREAD
        };
        let args = arguments(&write, Path::new("f"), 4096, Duration::from_secs(1));
        assert!(args.iter().any(|a| a == "--fdatasync=1"));
        assert!(!args.iter().any(|a| a == "--norandommap"));
    }

    /// The parts of a fio 3.33 JSON report that are read, after a note fio prints first.
    const REPORT: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "keel", "error" : 0, "job_runtime" : 4000,
      "read" : { "io_bytes" : 8192000000, "total_ios" : 2000000, "runtime" : 4000,
                 "iops" : 500000.0, "bw_bytes" : 2048000000 },
      "write" : { "io_bytes" : 0, "total_ios" : 0, "runtime" : 0 },
      "usr_cpu" : 15.0, "sys_cpu" : 85.0
    }
  ]
}"#;

    #[test]
    fn parses_a_report() {
        let run = parse(REPORT, true).expect("report");
        assert_eq!(run.requests, 2_000_000);
        assert_eq!(run.iops(), Some(500_000.0));
        assert_eq!(run.cpu_ns_per_request(), Some(2000.0));
        assert_eq!(run.device, None);
        let write = parse(REPORT, false).expect("report");
        assert_eq!(write.requests, 0);
        assert_eq!(write.iops(), None);
    }

    #[test]
    fn rejects_failed_jobs_and_garbage() {
        let failed = REPORT.replace("\"error\" : 0", "\"error\" : 5");
        assert!(parse(&failed, true).is_err());
        assert!(parse("fio: no such file", true).is_err());
        assert!(parse("{\"jobs\": []}", true).is_err());
    }
}
