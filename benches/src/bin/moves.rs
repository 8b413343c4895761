//! `moves`: pause, snapshot and restore of a running probe under Keel and under QEMU, in the
//! same run and interleaved. The guest is the probe keeping 4 MiB of memory changing and
//! checked, printing a tick every millisecond (`probe.churn`), in 256 MiB and one vCPU.
//!
//! cargo run --release -p keel-benches --bin moves -- [--runs 10] [--probe-dir DIR]
//!     [--keel PATH] [--qemu PATH] [--json]
//!
//! Per run and VMM: a pause (request to answer; Keel's control socket, QEMU's QMP `stop`),
//! resumed at once; a snapshot of the running guest (Keel: `snapshot` with its files synced,
//! the guest resumed after; QEMU: `migrate` to `exec:cat > FILE`, then `cont`), with how
//! long the guest stood still and the bytes stored; then the VMM is stopped and a new one
//! restores the snapshot (Keel: `keel vmm --restore`; QEMU: `-incoming exec:cat FILE`), timed
//! from just before the spawn to the guest's first output (an inotify write on its console
//! log).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_benches::migrate::console::longest_stall;
use keel_benches::moves::qmp::Qmp;
use keel_benches::moves::watch::Written;
use keel_benches::report::{cell, Host};
use keel_benches::stats::{summarize, Summary};
use keel_benches::tools::VmmPaths;
use serde_json::{json, Value};

const CHURN: &str = "probe.churn=4M probe.churn_rate=2 probe.churn_report_ms=1";
const READY: &str = "PROBE churn tick 20 ";
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(
    name = "moves",
    about = "Pause, snapshot and restore against QEMU, on the probe"
)]
struct Args {
    /// Runs per VMM (interleaved keel, qemu, keel, qemu, ...).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=200))]
    runs: u32,
    #[command(flatten)]
    vmm: VmmPaths,
    /// Guest memory of both VMMs, MiB (the probe churns 4 MiB of it whatever its size).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=16384))]
    memory: u64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

static MEMORY_MIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(256);

fn memory_mib() -> u64 {
    MEMORY_MIB.load(std::sync::atomic::Ordering::Relaxed)
}

/// One run's figures, in milliseconds and MiB.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    pause_ms: f64,
    snapshot_ms: f64,
    snapshot_pause_ms: f64,
    stored_mib: f64,
    restore_ms: f64,
    upgrade_pause_ms: f64,
    upgrade_seen_ms: f64,
}

/// A metric: its JSON key, its label, and how it is read from a sample.
type MetricDef = (&'static str, &'static str, fn(&Sample) -> f64);

const METRICS: [MetricDef; 7] = [
    ("pause_ms", "Pause: request to answer (ms)", |s| s.pause_ms),
    (
        "snapshot_ms",
        "Snapshot of the running guest: request to done (ms)",
        |s| s.snapshot_ms,
    ),
    (
        "snapshot_pause_ms",
        "... of which the guest stood still (ms)",
        |s| s.snapshot_pause_ms,
    ),
    ("stored_mib", "Snapshot stored on disk (MiB)", |s| {
        s.stored_mib
    }),
    (
        "restore_ms",
        "Restore: process start to the guest's next output (ms)",
        |s| s.restore_ms,
    ),
    (
        "upgrade_pause_ms",
        "Upgrade (Keel) / local migration (QEMU, unix socket): guest stood still (ms)",
        |s| s.upgrade_pause_ms,
    ),
    (
        "upgrade_seen_ms",
        "... the longest stall the guest saw around it, by its clock (ms)",
        |s| s.upgrade_seen_ms,
    ),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn wait_for_text(path: &Path, text: &str, from: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all = std::fs::read(path).unwrap_or_default();
        if all
            .get(from..)
            .is_some_and(|t| String::from_utf8_lossy(t).contains(text))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: no {text:?} in {} within {DEADLINE:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn fresh_dir(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))
}

fn stop(child: Stopped) {
    drop(child);
}

/// A VMM process, killed when dropped: a run that fails half-way leaves nothing running to
/// skew the next ones.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Keel's control socket, one request at a time.
struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    fn connect(dir: &Path) -> Result<Control> {
        let stream = UnixStream::connect(dir.join("control.sock"))?;
        Ok(Control {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    fn ask(&mut self, request: Value) -> Result<Value> {
        let mut text = request.to_string();
        text.push('\n');
        self.stream.write_all(text.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let answer: Value = serde_json::from_str(&line)?;
        if answer["response"] == "error" {
            bail!("keel vmm refused {request}: {}", answer["message"]);
        }
        Ok(answer)
    }
}

fn keel_vmm(keel: &Path, dir: &Path, restore: Option<&str>) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmm.log"))?;
    let mut cmd = Command::new(keel);
    cmd.args(["vmm", "--dir"]).arg(dir);
    if let Some(name) = restore {
        cmd.args(["--restore", name]);
    }
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

fn keel_run(keel: &Path, probe: &Path, dir: &Path) -> Result<Sample> {
    fresh_dir(dir)?;
    let spec = json!({
        "name": "moves", "kernel": probe, "cmdline": CHURN, "memory_mib": memory_mib(), "cpus": 1,
    });
    std::fs::write(dir.join("vm.json"), spec.to_string())?;
    let console = dir.join("console.log");
    let vmm = Stopped(keel_vmm(keel, dir, None)?);
    wait_for_text(&console, READY, 0, "keel boot")?;
    let mut control = Control::connect(dir)?;
    let asked = Instant::now();
    control.ask(json!({"request": "pause"}))?;
    let pause_ms = ms(asked.elapsed());
    control.ask(json!({"request": "resume"}))?;
    std::thread::sleep(Duration::from_millis(50));

    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap)?;
    for f in ["state", "memory"] {
        std::fs::File::create(snap.join(f))?;
    }
    let asked = Instant::now();
    let report = control.ask(json!({"request": "snapshot", "name": "snap"}))?;
    let snapshot_ms = ms(asked.elapsed());
    let snapshot_pause_ms = report["paused_us"].as_f64().unwrap_or(0.0) / 1000.0;
    let stored: u64 = ["state", "memory"]
        .iter()
        .map(|f| std::fs::metadata(snap.join(f)).map_or(0, |m| m.blocks() * 512))
        .sum();

    // The upgrade: a new VMM takes the guest over.
    let mut takeover = Command::new(keel);
    takeover
        .args(["vmm", "--dir"])
        .arg(dir)
        .arg("--takeover")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join("vmm.log"))?,
        );
    let new = Stopped(takeover.spawn()?);
    let deadline = Instant::now() + DEADLINE;
    while !dir.join("takeover.sock").exists() {
        if Instant::now() > deadline {
            bail!("keel vmm --takeover did not listen");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let mark = std::fs::metadata(&console)?.len() as usize;
    let report = control.ask(json!({"request": "hand-over"}))?;
    let upgrade_pause_ms = report["paused_us"].as_f64().unwrap_or(0.0) / 1000.0;
    let upgrade_seen_ms = longest_stall(&console, mark);
    stop(vmm);
    stop(new);

    let restore_ms = time_restore(&console, "keel", || keel_vmm(keel, dir, Some("snap")))?;
    Ok(Sample {
        pause_ms,
        snapshot_ms,
        snapshot_pause_ms,
        stored_mib: stored as f64 / f64::from(1 << 20),
        restore_ms,
        upgrade_pause_ms,
        upgrade_seen_ms,
    })
}

/// Starts a restoring VMM with `spawn`; milliseconds from just before the spawn to the
/// guest's first write into `console`. The VMM is stopped after.
fn time_restore(console: &Path, vmm: &str, spawn: impl FnOnce() -> Result<Child>) -> Result<f64> {
    let written = Written::watch(console)?;
    let spawned = Instant::now();
    let restored = Stopped(spawn()?);
    let came = written.wait(DEADLINE);
    let restore_ms = ms(spawned.elapsed());
    stop(restored);
    if !came {
        bail!("{vmm} restore: no guest output within {DEADLINE:?}");
    }
    Ok(restore_ms)
}

fn qemu_vm(qemu: &Path, probe: &Path, dir: &Path, incoming: Option<&Path>) -> Result<Child> {
    qemu_vm_with(
        qemu,
        probe,
        dir,
        incoming.map(|state| format!("exec:cat {}", state.display())),
    )
}

fn qemu_vm_incoming(qemu: &Path, probe: &Path, dir: &Path, uri: &str) -> Result<Child> {
    qemu_vm_with(qemu, probe, dir, Some(uri.to_string()))
}

fn qemu_vm_with(qemu: &Path, probe: &Path, dir: &Path, incoming: Option<String>) -> Result<Child> {
    let mut cmd = Command::new(qemu);
    keel_benches::moves::qemu::probe_machine(&mut cmd, memory_mib(), dir, probe, CHURN);
    if let Some(uri) = incoming {
        cmd.arg("-incoming").arg(uri);
    }
    Ok(cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn qemu_run(qemu: &Path, probe: &Path, dir: &Path) -> Result<Sample> {
    fresh_dir(dir)?;
    let console = dir.join("console.log");
    std::fs::File::create(&console)?;
    let vm = Stopped(qemu_vm(qemu, probe, dir, None)?);
    let mut qmp = Qmp::connect(&dir.join("qmp.sock"))?;
    wait_for_text(&console, READY, 0, "qemu boot")?;
    let asked = Instant::now();
    qmp.execute("stop", Value::Null)?;
    let pause_ms = ms(asked.elapsed());
    qmp.execute("cont", Value::Null)?;
    std::thread::sleep(Duration::from_millis(50));

    let state = dir.join("state");
    let asked = Instant::now();
    qmp.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", state.display())}),
    )?;
    let info = loop {
        let info = qmp.execute("query-migrate", Value::Null)?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("qemu migrate: {info}"),
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    let snapshot_ms = ms(asked.elapsed());
    let snapshot_pause_ms = info["downtime"].as_f64().unwrap_or(0.0);
    qmp.execute("cont", Value::Null)?;
    let stored = std::fs::metadata(&state).map_or(0, |m| m.blocks() * 512);

    // Local migration to a second QEMU over a Unix socket: QEMU's way to a new process.
    let target_dir = dir.join("target");
    fresh_dir(&target_dir)?;
    std::fs::File::create(target_dir.join("console.log"))?;
    let socket = dir.join("migrate.sock");
    let target = Stopped(qemu_vm_incoming(
        qemu,
        probe,
        &target_dir,
        &format!("unix:{}", socket.display()),
    )?);
    let deadline = Instant::now() + DEADLINE;
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("qemu -incoming did not listen");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // The socket file appears at bind, a moment before QEMU listens: a refused connection
    // is tried again.
    let mut attempts = 0;
    let info = 'migrated: loop {
        qmp.execute(
            "migrate",
            json!({"uri": format!("unix:{}", socket.display())}),
        )?;
        loop {
            let info = qmp.execute("query-migrate", Value::Null)?;
            match info["status"].as_str() {
                Some("completed") => break 'migrated info,
                Some("failed") if attempts < 5 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    break;
                }
                Some("failed") | Some("cancelled") => bail!("qemu local migrate: {info}"),
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    };
    let upgrade_pause_ms = info["downtime"].as_f64().unwrap_or(0.0);
    let upgrade_seen_ms = longest_stall(&target_dir.join("console.log"), 0);
    let _ = qmp.execute("quit", Value::Null);
    stop(vm);
    stop(target);

    let _ = std::fs::remove_file(dir.join("qmp.sock"));
    let restore_ms = time_restore(&console, "qemu", || qemu_vm(qemu, probe, dir, Some(&state)))?;
    Ok(Sample {
        pause_ms,
        snapshot_ms,
        snapshot_pause_ms,
        stored_mib: stored as f64 / f64::from(1 << 20),
        restore_ms,
        upgrade_pause_ms,
        upgrade_seen_ms,
    })
}

fn render(host: &Host, keel: &[Sample], qemu: &[Sample], failures: &[String], json: bool) {
    let summary = |samples: &[Sample], f: fn(&Sample) -> f64| -> Option<Summary> {
        summarize(&samples.iter().map(f).collect::<Vec<_>>())
    };
    if json {
        let metrics: Vec<Value> = METRICS
            .iter()
            .map(|(key, label, f)| {
                let (k, q) = (summary(keel, *f), summary(qemu, *f));
                json!({
                    "key": key, "label": label,
                    "keel": k.map(|s| json!({"median": s.median, "min": s.min, "max": s.max})),
                    "qemu": q.map(|s| json!({"median": s.median, "min": s.min, "max": s.max})),
                })
            })
            .collect();
        println!(
            "{}",
            json!({"host": host.describe(), "runs": keel.len(), "failures": failures, "metrics": metrics})
        );
        return;
    }
    println!("{}\n", host.describe());
    println!("| metric | Keel median (min-max) | QEMU median (min-max) | Keel/QEMU |");
    println!("|---|---|---|---|");
    for (_, label, f) in METRICS {
        let (k, q) = (summary(keel, f), summary(qemu, f));
        let range = |s: Option<Summary>| {
            s.map_or("-".into(), |s| {
                format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
            })
        };
        let ratio = match (k, q) {
            (Some(k), Some(q)) if q.median > 0.0 => Some(k.median / q.median),
            _ => None,
        };
        println!(
            "| {label} | {} | {} | {} |",
            range(k),
            range(q),
            cell(ratio)
        );
    }
    let restore = summary(keel, |s| s.restore_ms).map(|s| s.median);
    let snapshot = summary(keel, |s| s.snapshot_pause_ms).map(|s| s.median);
    println!(
        "\ngoals: restore <= 5 ms ({}); snapshot pause <= 50 ms ({}); Firecracker restores in 12.7 ms, Cloud Hypervisor in 12.6 ms on this host",
        restore.map_or("-".into(), |v| format!("{v:.2} ms, {}", if v <= 5.0 { "met" } else { "not met" })),
        snapshot.map_or("-".into(), |v| format!("{v:.2} ms, {}", if v <= 50.0 { "met" } else { "not met" })),
    );
    for f in failures {
        println!("failed: {f}");
    }
}

fn run(args: Args) -> Result<bool> {
    MEMORY_MIB.store(args.memory, std::sync::atomic::Ordering::Relaxed);
    let prepared = args.vmm.prepare()?;
    let setup = &prepared.setup;
    let root = std::env::temp_dir().join(format!("keel-moves-{}", std::process::id()));
    let (keel_dir, qemu_dir): (PathBuf, PathBuf) = (root.join("k"), root.join("q"));
    let (mut keel, mut qemu, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        match keel_run(&setup.keel, &setup.probe_elf, &keel_dir) {
            Ok(s) => keel.push(s),
            Err(e) => failures.push(format!("keel run {i}: {e:#}")),
        }
        match qemu_run(&setup.qemu, &setup.probe_elf, &qemu_dir) {
            Ok(s) => qemu.push(s),
            Err(e) => failures.push(format!("qemu run {i}: {e:#}")),
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    render(
        &Host::current(prepared.qemu_version),
        &keel,
        &qemu,
        &failures,
        args.json,
    );
    Ok(failures.is_empty())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("moves: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
