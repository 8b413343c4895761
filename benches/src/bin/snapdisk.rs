//! `snapdisk`: how long a snapshot stands a guest still when its disk holds data, through
//! the daemon: Keel keeping the disk under a qcow2 overlay (the default), Keel copying it
//! (a `direct=on` disk, which is still copied), and QEMU's external disk snapshot
//! (`blockdev-snapshot-sync` to a new qcow2 overlay) of the same disk, in the same run and
//! interleaved.
//!
//! cargo build --release -p keel-benches --bin snapdisk
//! sudo target/release/snapdisk [--runs 5] [--disk-mib 2048] [--probe-dir DIR] [--keel PATH]
//!     [--qemu PATH] [--json]
//!
//! The disk: a raw file of `--disk-mib` MiB, every byte written (no holes), made once per
//! run of the benchmark and never written by a guest. Keel: a `keel serve` (in a network
//! namespace of the run, for its cleanup) runs a churning probe with the disk, and
//! `keel vm snapshot --json` takes a snapshot of state, touched memory and disk; the
//! daemon's figure is the snapshot's `paused_seconds`. QEMU: the probe with the disk on
//! virtio-blk, and `blockdev-snapshot-sync` over QMP (its disk only: no memory). "Guest saw"
//! is the longest stall the probe reported (its own clock) around the snapshot. Must run as
//! root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_benches::migrate::console;
use keel_benches::migrate::lab::{self, Daemon, Link, Proc};
use keel_benches::moves::qmp::Qmp;
use keel_benches::report::{cell, Host};
use keel_benches::stats::{median, ratio, summarize};
use keel_benches::tools::VmmPaths;
use serde_json::{json, Value};

const CHURN: &str = "probe.churn=4M probe.churn_rate=2 probe.churn_report_ms=1";
const READY: &str = "PROBE churn tick 20 ";
const LIMIT: Duration = Duration::from_secs(60);
const MEMORY_MIB: u64 = 256;

#[derive(Parser)]
#[command(
    name = "snapdisk",
    about = "Snapshot pauses with a full disk: Keel's overlay and copy against QEMU's external snapshot"
)]
struct Args {
    /// Runs per kind (interleaved).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// The disk's size, MiB, all of it data.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=65536))]
    disk_mib: u64,
    #[command(flatten)]
    vmm: VmmPaths,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One snapshot: the snapshotter's own measure of the pause, the guest's, and request to done.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    paused_ms: f64,
    guest_ms: f64,
    total_ms: f64,
}

/// A raw file of `mib` MiB with no hole, synced.
fn full_disk(path: &Path, mib: u64) -> Result<()> {
    let mut file = std::fs::File::create(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mib {
        chunk.fill((i % 251) as u8 + 1);
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

fn keel_run(daemon: &Daemon, probe: &Path, disk: &Path, copy: bool, n: u32) -> Result<Sample> {
    let name = format!("sd{n}{}", if copy { "c" } else { "o" });
    let disk_arg = format!(
        "path={}{}",
        disk.display(),
        if copy { ",direct=on" } else { "" }
    );
    daemon.cli(&[
        "vm",
        "create",
        &name,
        "--kernel",
        &probe.display().to_string(),
        "--cmdline",
        CHURN,
        "--memory",
        &MEMORY_MIB.to_string(),
        "--cpus",
        "1",
        "--disk",
        &disk_arg,
    ])?;
    let taken = (|| -> Result<Sample> {
        daemon.cli(&["vm", "start", &name])?;
        let shown = daemon.json(&["vm", "show", &name])?;
        let log = PathBuf::from(shown["console_log"].as_str().context("no console_log")?);
        console::wait_for(&log, READY, 0, LIMIT, "keel boot")?;
        let mark = console::read_from(&log, 0).len();
        let asked = Instant::now();
        let snap = daemon.json(&["vm", "snapshot", &name, "--name", "bench"])?;
        let total_ms = asked.elapsed().as_secs_f64() * 1000.0;
        let how = snap["disks"][0]["how"].as_str().unwrap_or("");
        let want = if copy { "copy" } else { "overlay" };
        if how != want {
            bail!("keel kept the disk by {how:?}, not {want}: {snap}");
        }
        Ok(Sample {
            paused_ms: snap["paused_seconds"].as_f64().unwrap_or(0.0) * 1000.0,
            guest_ms: console::longest_stall(&log, mark),
            total_ms,
        })
    })();
    // Its snapshot and overlay go with it; the disk itself is never written.
    let _ = daemon.remove_vm(&name);
    taken
}

fn qemu_run(qemu: &Path, probe: &Path, disk: &Path, dir: &Path) -> Result<Sample> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let log = dir.join("console.log");
    std::fs::File::create(&log)?;
    let mut cmd = Command::new(qemu);
    keel_benches::moves::qemu::probe_machine(&mut cmd, MEMORY_MIB, dir, probe, CHURN);
    cmd.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,node-name=n0",
            disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"]);
    let _vm = Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu")?,
    );
    let mut qmp = Qmp::connect(&dir.join("qmp.sock"))?;
    console::wait_for(&log, READY, 0, LIMIT, "qemu boot")?;
    let mark = console::read_from(&log, 0).len();
    let overlay = dir.join("overlay.qcow2");
    let asked = Instant::now();
    qmp.execute(
        "blockdev-snapshot-sync",
        json!({"node-name": "n0", "snapshot-file": overlay.display().to_string(),
               "snapshot-node-name": "ov0", "format": "qcow2"}),
    )?;
    let total_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let guest_ms = console::longest_stall(&log, mark);
    let _ = qmp.execute("quit", Value::Null);
    Ok(Sample {
        // QEMU does not pause the vCPUs for it; the command's own time is its measure.
        paused_ms: total_ms,
        guest_ms,
        total_ms,
    })
}

fn run(args: Args) -> Result<bool> {
    lab::catch_signals()?;
    let prepared = args.vmm.prepare()?;
    let setup = &prepared.setup;
    let probe_dir = setup
        .probe_elf
        .parent()
        .context("the probe has no directory")?;
    let root = PathBuf::from("/tmp/keel-snapdisk");
    let _ = std::fs::remove_dir_all(&root);
    let images = root.join("images");
    std::fs::create_dir_all(&images)?;
    let disk = images.join("data.raw");
    eprintln!("snapdisk: writing a {} MiB disk", args.disk_mib);
    full_disk(&disk, args.disk_mib)?;
    let link = Link::new()?;
    let daemon = Daemon::start(
        &setup.keel,
        &link.source,
        root.join("state"),
        &[
            "--images".into(),
            images.display().to_string(),
            "--images".into(),
            probe_dir.display().to_string(),
        ],
    )?;
    let (mut overlay, mut copy, mut qemu) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures = Vec::new();
    for n in 0..args.runs {
        for (kind, samples) in [
            ("keel overlay", &mut overlay),
            ("keel copy", &mut copy),
            ("qemu", &mut qemu),
        ] {
            let sample = match kind {
                "keel overlay" => keel_run(&daemon, &setup.probe_elf, &disk, false, n),
                "keel copy" => keel_run(&daemon, &setup.probe_elf, &disk, true, n),
                _ => qemu_run(&setup.qemu, &setup.probe_elf, &disk, &root.join("qemu")),
            };
            match sample {
                Ok(s) => {
                    eprintln!(
                        "snapdisk: run {} {kind}: paused {:.2} ms, guest saw {:.2} ms, done in {:.1} ms",
                        n + 1,
                        s.paused_ms,
                        s.guest_ms,
                        s.total_ms
                    );
                    samples.push(s);
                }
                Err(e) => failures.push(format!("run {} {kind}: {e:#}", n + 1)),
            }
            lab::check()?;
        }
    }
    drop(daemon);
    drop(link);
    let _ = std::fs::remove_dir_all(&root);
    render(
        &Host::current(prepared.qemu_version.clone()),
        args.disk_mib,
        [&overlay, &copy, &qemu],
        &failures,
        args.json,
    );
    Ok(failures.is_empty())
}

/// A row of the table: its JSON key, its label, and what of a sample it shows.
type Row = (&'static str, &'static str, fn(&Sample) -> f64);

fn render(host: &Host, disk_mib: u64, kinds: [&Vec<Sample>; 3], failures: &[String], json: bool) {
    let pick =
        |samples: &[Sample], f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let rows: [Row; 3] = [
        (
            "paused_ms",
            "Stood still, the snapshotter's measure (ms)",
            |s| s.paused_ms,
        ),
        ("guest_ms", "Stood still, as the guest saw it (ms)", |s| {
            s.guest_ms
        }),
        ("total_ms", "Request to done (ms)", |s| s.total_ms),
    ];
    if json {
        let mut out = serde_json::Map::new();
        for (key, _, f) in rows {
            let entry: Vec<Value> = kinds
                .iter()
                .map(|k| {
                    json!(summarize(&pick(k, f))
                        .map(|s| json!({"median": s.median, "min": s.min, "max": s.max})))
                })
                .collect();
            out.insert(
                key.into(),
                json!({"keel_overlay": entry[0], "keel_copy": entry[1], "qemu": entry[2]}),
            );
        }
        out.insert("disk_mib".into(), json!(disk_mib));
        out.insert("failures".into(), json!(failures));
        println!("{}", Value::Object(out));
        return;
    }
    println!("snapdisk: {}", host.describe());
    println!(
        "a {disk_mib} MiB raw disk full of data, a {MEMORY_MIB} MiB churning probe; medians (min-max) of {} run(s)\n",
        kinds[0].len()
    );
    println!("| | Keel overlay | Keel copy | QEMU blockdev-snapshot-sync | overlay/QEMU |");
    println!("|---|---|---|---|---|");
    for (_, label, f) in rows {
        let fmt = |k: &Vec<Sample>| {
            summarize(&pick(k, f)).map_or("-".into(), |s| {
                format!(
                    "{} ({}-{})",
                    cell(Some(s.median)),
                    cell(Some(s.min)),
                    cell(Some(s.max))
                )
            })
        };
        let r = ratio(median(&pick(kinds[0], f)), median(&pick(kinds[2], f)));
        println!(
            "| {label} | {} | {} | {} | {} |",
            fmt(kinds[0]),
            fmt(kinds[1]),
            fmt(kinds[2]),
            r.map_or("-".into(), |r| format!("{r:.2}x"))
        );
    }
    println!("\nKeel's snapshot also saves the VM's state and touched memory; QEMU's command snapshots the disk only.");
    for f in failures {
        println!("failed: {f}");
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("snapdisk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
