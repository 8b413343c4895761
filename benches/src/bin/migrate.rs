//! `migrate`: live migration of a running probe guest between two Keel daemons, and QEMU's
//! live migration of the same guest, in the same run and interleaved (keel, qemu, keel, ...).
//!
//! cargo build --release -p keel-benches --bin migrate
//! sudo target/release/migrate [--runs 5] [--memory MIB] [--probe-dir DIR] [--keel PATH]
//!     [--qemu PATH] [--json]
//!
//! The lab: two network namespaces made for the run, joined by a veth pair (10.231.0.1 and
//! 10.231.0.2); nothing is routed anywhere else. Keel: a `keel serve` in each, the target
//! serving TLS on the veth; the VM is created and started on the source, then
//! `keel vm migrate --max-downtime 50` moves it, and `keel vm migration --json` gives the
//! figures (elapsed_ms, downtime_ms, bytes_sent, switch_steps). QEMU: a target started with
//! `-incoming tcp:10.231.0.2:PORT` in the target's namespace, a source in the source's,
//! `migrate-set-parameters downtime-limit=50` and `migrate` over TCP, `query-migrate` polled
//! until completed (total-time, downtime, ram.transferred). Both: 1 vCPU, the same command
//! line and memory. After each migration the target's console must show a new churn tick
//! and no `PROBE churn check bad`. Must run as root (`ip netns`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_benches::migrate::lab::{nap, Hosts, Link, Proc, TARGET_IP};
use keel_benches::migrate::{console, lab};
use keel_benches::moves::qmp::Qmp;
use keel_benches::report::{cell, Host};
use keel_benches::stats::{median, ratio, summarize, Summary};
use keel_benches::tools::VmmPaths;
use serde_json::{json, Value};

/// The downtime budget of both VMMs, ms.
const BUDGET_MS: u64 = 50;
/// QEMU's max-bandwidth, bytes/s: its 32 MiB/s default lifted (Keel has no cap unless asked).
const QEMU_MAX_BANDWIDTH: u64 = 64 << 30;
/// The source runs this long (two churn periods) before it moves.
const READY: &str = "PROBE churn tick 2 ";
const BOOT_LIMIT: Duration = Duration::from_secs(60);
const MIGRATE_LIMIT: Duration = Duration::from_secs(300);
/// The target daemon's TLS port (inside the target's namespace).
const KEEL_PORT: u16 = 7443;

#[derive(Parser)]
#[command(
    name = "migrate",
    about = "Live migration between two Keel daemons against QEMU's, on the probe"
)]
struct Args {
    /// Runs per VMM and scenario (interleaved keel, qemu, keel, qemu, ...).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Guest memory, MiB: only this size (default: 256 and 2048).
    #[arg(long, value_parser = clap::value_parser!(u64).range(64..=16384))]
    memory: Option<u64>,
    #[command(flatten)]
    vmm: VmmPaths,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One guest size and workload.
struct Scenario {
    memory_mib: u64,
    churning: bool,
}

impl Scenario {
    fn label(&self) -> String {
        let work = if self.churning { "churning" } else { "idle" };
        format!("{} MiB {work}", self.memory_mib)
    }

    /// The same for both VMMs: 4 MiB filled, then still (rate 0) or rewritten at 10 pages
    /// per ms, a tick (with a check of every page) every 200 ms.
    fn cmdline(&self) -> String {
        format!(
            "probe.churn=4M probe.churn_rate={} probe.churn_report_ms=200",
            if self.churning { 10 } else { 0 }
        )
    }

    fn vm_name(&self, run: u32) -> String {
        let work = if self.churning { "churn" } else { "idle" };
        format!("mb-{}-{work}-{run}", self.memory_mib)
    }
}

/// One migration's figures.
#[derive(Debug, Default, Clone)]
struct Sample {
    downtime_ms: f64,
    /// The longest stall the guest saw around the switch, by its own clock (its TSC).
    guest_stall_ms: f64,
    total_ms: f64,
    sent_mib: f64,
    /// Keel only: the switch's steps, ms.
    steps: Vec<(String, f64)>,
}

type MetricDef = (&'static str, &'static str, fn(&Sample) -> f64);

const METRICS: [MetricDef; 4] = [
    ("downtime_ms", "downtime: guest stood still (ms)", |s| {
        s.downtime_ms
    }),
    (
        "guest_stall_ms",
        "... the longest stall the guest saw, by its clock (ms)",
        |s| s.guest_stall_ms,
    ),
    ("total_ms", "total: migration start to done (ms)", |s| {
        s.total_ms
    }),
    ("sent_mib", "memory sent (MiB)", |s| s.sent_mib),
];

fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}

fn keel_run(hosts: &Hosts, probe: &Path, scenario: &Scenario, run: u32) -> Result<Sample> {
    let name = scenario.vm_name(run);
    let (source, target) = (&hosts.source, &hosts.target);
    source.cli(&[
        "vm",
        "create",
        &name,
        "--kernel",
        &probe.display().to_string(),
        "--cmdline",
        &scenario.cmdline(),
        "--memory",
        &scenario.memory_mib.to_string(),
        "--cpus",
        "1",
        "--start",
    ])?;
    let moved = keel_move(hosts, &name);
    // Wherever it ended up, it goes: stopped and deleted.
    let mut cleanup = Ok(());
    for daemon in [source, target] {
        if daemon.json(&["vm", "show", &name]).is_ok() {
            let _ = daemon.cli(&["vm", "migrate", &name, "--cancel"]);
            if let Err(e) = daemon.remove_vm(&name) {
                cleanup = Err(e);
            }
        }
    }
    let sample = moved?;
    cleanup.context("removing the VM after its run")?;
    Ok(sample)
}

fn console_of(daemon: &lab::Daemon, name: &str) -> Result<PathBuf> {
    let vm = daemon.json(&["vm", "show", name])?;
    Ok(PathBuf::from(vm["console_log"].as_str().with_context(
        || format!("no console_log in keel vm show: {vm}"),
    )?))
}

fn keel_move(hosts: &Hosts, name: &str) -> Result<Sample> {
    let (source, target) = (&hosts.source, &hosts.target);
    let log = console_of(source, name)?;
    let seen = console::wait_for(&log, READY, 0, BOOT_LIMIT, "keel boot")?;
    let before = console::last_tick(&seen);
    let budget = BUDGET_MS.to_string();
    let mut args = vec!["vm", "migrate", name];
    args.extend(hosts.to.iter().map(String::as_str));
    args.extend(["--max-downtime", &budget]);
    source.call(&args, MIGRATE_LIMIT, true)?;
    let p = source.json(&["vm", "migration", name])?;
    if p["phase"] != "done" {
        bail!("keel vm migrate returned but the migration is not done: {p}");
    }
    let there = console::runs_on(
        &console_of(target, name)?,
        before,
        BOOT_LIMIT,
        "keel target",
    )?;
    let number = |key: &str| {
        p[key]
            .as_f64()
            .with_context(|| format!("no {key} in the progress: {p}"))
    };
    let steps = p["switch_steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|s| Some((s["step"].as_str()?.to_string(), s["ms"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Sample {
        downtime_ms: number("downtime_ms")?,
        guest_stall_ms: console::first_stall_ms(&there),
        total_ms: number("elapsed_ms")?,
        sent_mib: mib(number("bytes_sent")?),
        steps,
    })
}

/// QEMU in namespace `ns` with the probe: the same machine as the `moves` benchmark's.
fn qemu(
    qemu: &Path,
    probe: &Path,
    ns: &str,
    dir: &Path,
    scenario: &Scenario,
    incoming: Option<&str>,
) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(dir.join("console.log"))?;
    let mut cmd = Link::command(ns, qemu);
    keel_benches::moves::qemu::probe_machine(
        &mut cmd,
        scenario.memory_mib,
        dir,
        probe,
        &scenario.cmdline(),
    );
    if let Some(uri) = incoming {
        cmd.args(["-incoming", uri]);
    }
    Ok(Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?)
            .spawn()
            .context("starting QEMU under nsenter")?,
    ))
}

fn qemu_run(
    qemu_exe: &Path,
    probe: &Path,
    link: &Link,
    dir: &Path,
    scenario: &Scenario,
    port: u16,
) -> Result<Sample> {
    let _ = std::fs::remove_dir_all(dir);
    let uri = format!("tcp:{TARGET_IP}:{port}");
    let (source_dir, target_dir) = (dir.join("src"), dir.join("dst"));
    let target_vm = qemu(
        qemu_exe,
        probe,
        &link.target,
        &target_dir,
        scenario,
        Some(&uri),
    )?;
    let mut target = Qmp::connect(&target_dir.join("qmp.sock")).context("QEMU target")?;
    let source_vm = qemu(qemu_exe, probe, &link.source, &source_dir, scenario, None)?;
    let mut source = Qmp::connect(&source_dir.join("qmp.sock")).context("QEMU source")?;
    let seen = console::wait_for(
        &source_dir.join("console.log"),
        READY,
        0,
        BOOT_LIMIT,
        "qemu boot",
    )?;
    let before = console::last_tick(&seen);
    source.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": BUDGET_MS, "max-bandwidth": QEMU_MAX_BANDWIDTH}),
    )?;
    source.execute("migrate", json!({ "uri": uri }))?;
    let deadline = std::time::Instant::now() + MIGRATE_LIMIT;
    let info = loop {
        let info = source.execute("query-migrate", Value::Null)?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!(
                "qemu migrate: {info}; target's stderr: {}",
                std::fs::read_to_string(target_dir.join("qemu.log")).unwrap_or_default()
            ),
            _ if std::time::Instant::now() > deadline => {
                let _ = source.execute("migrate_cancel", Value::Null);
                bail!("qemu migrate did not complete within {MIGRATE_LIMIT:?}: {info}");
            }
            _ => nap(Duration::from_millis(5))?,
        }
    };
    let there = console::runs_on(
        &target_dir.join("console.log"),
        before,
        BOOT_LIMIT,
        "qemu target",
    )?;
    let number = |key: &str| {
        info.pointer(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("no {key} in query-migrate: {info}"))
    };
    let sample = Sample {
        downtime_ms: number("/downtime")?,
        guest_stall_ms: console::first_stall_ms(&there),
        total_ms: number("/total-time")?,
        sent_mib: mib(number("/ram/transferred")?),
        steps: Vec::new(),
    };
    let _ = source.execute("quit", Value::Null);
    let _ = target.execute("quit", Value::Null);
    drop((source_vm, target_vm));
    let _ = std::fs::remove_dir_all(dir);
    Ok(sample)
}

/// A scenario's samples and failures.
struct Outcome {
    scenario: Scenario,
    keel: Vec<Sample>,
    qemu: Vec<Sample>,
}

impl Outcome {
    fn summary(&self, qemu: bool, f: fn(&Sample) -> f64) -> Option<Summary> {
        let samples = if qemu { &self.qemu } else { &self.keel };
        summarize(&samples.iter().map(f).collect::<Vec<_>>())
    }

    /// Keel's switch steps in the order they came, each with its median, ms.
    fn steps(&self) -> Vec<(String, f64)> {
        let mut all: Vec<(String, Vec<f64>)> = Vec::new();
        for (step, ms) in self.keel.iter().flat_map(|s| &s.steps) {
            match all.iter_mut().find(|(s, _)| s == step) {
                Some((_, v)) => v.push(*ms),
                None => all.push((step.clone(), vec![*ms])),
            }
        }
        all.into_iter()
            .filter_map(|(step, v)| Some((step, median(&v)?)))
            .collect()
    }
}

fn summary_json(s: Option<Summary>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({"median": s.median, "min": s.min, "max": s.max, "count": s.count}),
    )
}

fn render(host: &Host, runs: u32, outcomes: &[Outcome], failures: &[String], as_json: bool) {
    if as_json {
        let scenarios: Vec<Value> = outcomes
            .iter()
            .map(|o| {
                let metrics: Vec<Value> = METRICS
                    .iter()
                    .map(|(key, label, f)| {
                        let (k, q) = (o.summary(false, *f), o.summary(true, *f));
                        json!({
                            "key": key, "label": label,
                            "keel": summary_json(k), "qemu": summary_json(q),
                            "keel_over_qemu": ratio(k.map(|s| s.median), q.map(|s| s.median)),
                        })
                    })
                    .collect();
                let steps: Vec<Value> = o
                    .steps()
                    .into_iter()
                    .map(|(step, ms)| json!({"step": step, "median_ms": ms}))
                    .collect();
                json!({
                    "scenario": o.scenario.label(), "memory_mib": o.scenario.memory_mib,
                    "cmdline": o.scenario.cmdline(), "metrics": metrics,
                    "keel_switch_steps": steps,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "host": host.describe(), "loadavg": keel_benches::tools::loadavg(), "runs": runs, "max_downtime_ms": BUDGET_MS,
                "qemu_max_bandwidth": QEMU_MAX_BANDWIDTH, "scenarios": scenarios,
                "failures": failures,
            })
        );
        return;
    }
    println!(
        "Live migration, Keel against QEMU: the probe guest, 1 vCPU, {runs} runs per VMM and \
         scenario, downtime budget {BUDGET_MS} ms, between two network namespaces on a veth \
         pair (Keel: TLS between daemons; QEMU: plain TCP, max-bandwidth {} GiB/s instead of \
         its 32 MiB/s default)",
        QEMU_MAX_BANDWIDTH >> 30
    );
    println!(
        "{}; load average {}\n",
        host.describe(),
        keel_benches::tools::loadavg()
    );
    println!("| scenario | metric | Keel median (min-max) | QEMU median (min-max) | Keel/QEMU |");
    println!("|---|---|---|---|---|");
    let range = |s: Option<Summary>| {
        s.map_or("-".into(), |s| {
            format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
        })
    };
    for o in outcomes {
        for (i, (_, label, f)) in METRICS.iter().enumerate() {
            let (k, q) = (o.summary(false, *f), o.summary(true, *f));
            println!(
                "| {} | {label} | {} | {} | {} |",
                if i == 0 {
                    o.scenario.label()
                } else {
                    String::new()
                },
                range(k),
                range(q),
                cell(ratio(k.map(|s| s.median), q.map(|s| s.median)))
            );
        }
    }
    println!("\nKeel's switch steps (where the guest's pause goes), median ms:");
    for o in outcomes {
        let steps: Vec<String> = o
            .steps()
            .iter()
            .map(|(step, ms)| format!("{step} {ms:.3}"))
            .collect();
        println!(
            "- {} ({}): {}",
            o.scenario.label(),
            o.scenario.cmdline(),
            if steps.is_empty() {
                "-".to_string()
            } else {
                steps.join(", ")
            }
        );
    }
    for f in failures {
        println!("failed: {f}");
    }
}

fn run(args: Args) -> Result<bool> {
    lab::catch_signals()?;
    let status = Command::new("ip").arg("-V").stdout(Stdio::null()).status();
    if !status.is_ok_and(|s| s.success()) {
        bail!("the ip command (iproute2) is needed: apt-get install -y iproute2");
    }
    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root: it makes network namespaces and a veth pair");
    }
    let prepared = args.vmm.prepare()?;
    let setup = &prepared.setup;
    let probe_dir = setup
        .probe_elf
        .parent()
        .context("the probe has no directory")?;
    let root = PathBuf::from(format!("/tmp/kmig-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let hosts = Hosts::start(&setup.keel, &root, probe_dir, KEEL_PORT);
    let result = hosts.and_then(|hosts| {
        let sizes = args.memory.map_or(vec![256, 2048], |m| vec![m]);
        let (mut outcomes, mut failures) = (Vec::new(), Vec::new());
        let mut port = 4444;
        for memory_mib in sizes {
            for churning in [false, true] {
                let mut o = Outcome {
                    scenario: Scenario {
                        memory_mib,
                        churning,
                    },
                    keel: Vec::new(),
                    qemu: Vec::new(),
                };
                let label = o.scenario.label();
                for i in 0..args.runs {
                    lab::check()?;
                    eprintln!("migrate: {label}, run {}/{}", i + 1, args.runs);
                    match keel_run(&hosts, &setup.probe_elf, &o.scenario, i) {
                        Ok(s) => o.keel.push(s),
                        Err(e) => failures.push(format!("keel {label} run {i}: {e:#}")),
                    }
                    lab::check()?;
                    port += 1;
                    let dir = root.join("q");
                    match qemu_run(
                        &setup.qemu,
                        &setup.probe_elf,
                        &hosts.link,
                        &dir,
                        &o.scenario,
                        port,
                    ) {
                        Ok(s) => o.qemu.push(s),
                        Err(e) => failures.push(format!("qemu {label} run {i}: {e:#}")),
                    }
                }
                outcomes.push(o);
            }
        }
        drop(hosts);
        Ok((outcomes, failures))
    });
    let _ = std::fs::remove_dir_all(&root);
    let (outcomes, failures) = result?;
    render(
        &Host::current(prepared.qemu_version),
        args.runs,
        &outcomes,
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
            eprintln!("migrate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
