//! `host`: what the host daemon `keel serve` costs. Daemon start to a working API (new state
//! directory, and after `kill -9` with VMs to re-adopt), `keel vm start` to a running VM and
//! to the guest's `PROBE ready` (against QEMU microvm launched bare on the same probe, and
//! `keel run` without the daemon), re-adoption of running VMs, the daemon's and one VMM's
//! memory, `keel vm shutdown` and `keel vm stop`. Probe guest with `probe.power_button`.
//!
//! cargo run --release -p keel-benches --bin host -- [--rounds 10] [--vms 10]
//!     [--probe-dir DIR] [--keel PATH] [--qemu PATH]

#[path = "../host/mod.rs"]
mod host;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_benches::procfs::{self, MemoryStatus};
use keel_benches::report::{mib, ms, Host};
use keel_benches::runner::{self, Setup, Vmm, IDLE_SETTLE, MEMORY_MIB, READY_LINE, VCPUS};
use keel_benches::tools::{loadavg, Prepared, VmmPaths};

use host::cleanup;
use host::daemon::{Daemon, POLL, STEP_TIMEOUT};
use host::table::{self, Row};

/// What every VM boots with: the probe stays up until its power button is pressed.
const GUEST_CMDLINE: &str = "probe.power_button";
/// The VM of the lifecycle rounds.
const VM: &str = "bench";

#[derive(Parser)]
#[command(
    name = "host",
    about = "What the host daemon keel serve costs: start, re-adoption, memory, VM lifecycle \
             latency, against QEMU launched bare"
)]
struct Args {
    /// Rounds of every measurement (Keel and QEMU interleaved in the lifecycle rounds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Running VMs the daemon re-adopts after each kill -9.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=50))]
    vms: u32,
    #[command(flatten)]
    vmm: VmmPaths,
}

fn mibs(memory: &[MemoryStatus], kib: impl Fn(&MemoryStatus) -> u64) -> Vec<f64> {
    memory.iter().map(|m| mib(kib(m))).collect()
}

/// Every sample, in ms or MiB.
#[derive(Default)]
struct Samples {
    cold_start: Vec<f64>,
    daemon_rss_fresh: Vec<f64>,
    start_cli: Vec<f64>,
    start_ready: Vec<f64>,
    qemu_ready: Vec<f64>,
    keel_run_ready: Vec<f64>,
    vmm_memory: Vec<MemoryStatus>,
    qemu_memory: Vec<MemoryStatus>,
    keel_run_memory: Vec<MemoryStatus>,
    shutdown: Vec<f64>,
    stop: Vec<f64>,
    list_unix: Vec<f64>,
    list_tls: Vec<f64>,
    daemon_rss_after_rounds: Vec<f64>,
    daemon_rss_started_n: Vec<f64>,
    readopt_api: Vec<f64>,
    readopt_listed: Vec<f64>,
    daemon_rss_readopted_n: Vec<f64>,
}

fn daemon_rss(daemon: &Daemon) -> Result<f64> {
    let pid = daemon.pid().context("the daemon is not running")?;
    Ok(mib(procfs::read_status(pid)
        .context("reading the daemon's memory use")?
        .vm_rss_kib))
}

fn create_vm(daemon: &Daemon, name: &str, probe: &Path) -> Result<()> {
    let (cpus, memory) = (VCPUS.to_string(), MEMORY_MIB.to_string());
    // A VM's files come from the daemon's image directory (STATE/images by default).
    let images = daemon.state_dir.join("images");
    std::fs::create_dir_all(&images).context("creating the image directory")?;
    let kernel = images.join("probe.elf");
    if !kernel.exists() {
        std::fs::copy(probe, &kernel).context("copying the probe into the image directory")?;
    }
    let kernel = kernel.to_str().context("the probe's path is not UTF-8")?;
    daemon.run_cli(&[
        "vm",
        "create",
        name,
        "--kernel",
        kernel,
        "--cmdline",
        GUEST_CMDLINE,
        "--cpus",
        &cpus,
        "--memory",
        &memory,
    ])?;
    Ok(())
}

/// Whether the console log has `PROBE ready` after byte `offset`.
fn log_has_ready(log: &Path, offset: u64) -> bool {
    let Ok(mut file) = std::fs::File::open(log) else {
        return false;
    };
    let mut text = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut text).is_err() {
        return false;
    }
    String::from_utf8_lossy(&text).contains(READY_LINE)
}

/// `keel vm start NAME`: the time from just before the CLI's spawn to its exit (the VM is
/// running), and to the moment `PROBE ready` is seen in the VM's console log (polled every
/// [`POLL`]).
fn timed_start(daemon: &Daemon, name: &str) -> Result<(Duration, Duration)> {
    let log = daemon.console_log(name);
    let offset = std::fs::metadata(&log).map_or(0, |m| m.len());
    let started = Instant::now();
    let mut child = daemon
        .cli(&["vm", "start", name])
        .spawn()
        .context("starting keel vm start")?;
    let (mut exited, mut ready) = (None, None);
    while exited.is_none() || ready.is_none() {
        if ready.is_none() && log_has_ready(&log, offset) {
            ready = Some(started.elapsed());
        }
        if exited.is_none() {
            if let Some(status) = child.try_wait()? {
                exited = Some((started.elapsed(), status));
            }
        }
        if started.elapsed() > STEP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "keel vm start {name}: {} after {} s; {}",
                if exited.is_none() {
                    "the CLI had not exited"
                } else {
                    "no PROBE ready in the console log"
                },
                STEP_TIMEOUT.as_secs(),
                daemon.log_tail()
            );
        }
        std::thread::sleep(POLL);
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (cli, status) = exited.context("the CLI's exit")?;
    if !status.success() || !stdout.starts_with(&format!("{name}: running")) {
        bail!(
            "keel vm start {name} ({status}): {}{}",
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok((cli, ready.context("the ready time")?))
}

/// `keel vm shutdown|stop NAME`, which must leave the VM stopped: its time.
fn timed_end(daemon: &Daemon, args: &[&str], name: &str) -> Result<Duration> {
    let (took, stdout) = daemon.run_cli(args)?;
    if !stdout.starts_with(&format!("{name}: stopped")) {
        bail!("keel {}: {stdout}", args.join(" "));
    }
    Ok(took)
}

/// The resident memory of the VM's VMM, as the daemon names it.
fn vmm_memory(daemon: &Daemon, name: &str) -> Result<MemoryStatus> {
    let row = daemon
        .vms()?
        .into_iter()
        .find(|v| v.name == name)
        .with_context(|| format!("VM {name} is not listed"))?;
    let pid = row
        .pid
        .with_context(|| format!("VM {name} is {} without a pid", row.state))?;
    procfs::read_status(pid).context("reading the VMM's memory use")
}

/// 1. Daemon start on a new state directory, and its memory once idle.
fn cold_starts(keel: &Path, work: &Path, rounds: u32, s: &mut Samples) -> Result<()> {
    for round in 1..=rounds {
        let mut daemon = Daemon::new(keel, work.join(format!("c{round:02}")));
        let took = daemon
            .start()
            .with_context(|| format!("cold start {round}"))?;
        std::thread::sleep(IDLE_SETTLE);
        let rss = daemon_rss(&daemon)?;
        daemon.stop()?;
        eprintln!(
            "host: cold start {round}/{rounds}: API after {:.2} ms, VmRSS {rss:.2} MiB",
            ms(took)
        );
        s.cold_start.push(ms(took));
        s.daemon_rss_fresh.push(rss);
    }
    Ok(())
}

/// The daemon's part of one lifecycle round: start, idle memory, shutdown, start, stop.
fn keel_round(daemon: &Daemon, s: &mut Samples) -> Result<String> {
    let (cli, ready) = timed_start(daemon, VM)?;
    std::thread::sleep(IDLE_SETTLE);
    let memory = vmm_memory(daemon, VM)?;
    let rss = mib(memory.vm_rss_kib);
    let shutdown = timed_end(daemon, &["vm", "shutdown", VM, "--timeout", "30"], VM)?;
    let (cli2, ready2) = timed_start(daemon, VM)?;
    let stop = timed_end(daemon, &["vm", "stop", VM], VM)?;
    let daemon_rss = daemon_rss(daemon)?;
    s.start_cli.extend([ms(cli), ms(cli2)]);
    s.start_ready.extend([ms(ready), ms(ready2)]);
    s.vmm_memory.push(memory);
    s.shutdown.push(ms(shutdown));
    s.stop.push(ms(stop));
    s.daemon_rss_after_rounds.push(daemon_rss);
    Ok(format!(
        " keel vm start {:.1}/{:.1} ms (ready {:.1}/{:.1}), shutdown {:.1} ms, stop {:.1} ms, \
         VMM {rss:.2} MiB;",
        ms(cli),
        ms(cli2),
        ms(ready),
        ms(ready2),
        ms(shutdown),
        ms(stop)
    ))
}

/// 2, 4, 5. `keel vm start`, shutdown and stop through the daemon, interleaved with QEMU
/// and `keel run` launched bare on the same probe.
fn lifecycle(setup: &Setup, work: &Path, rounds: u32, s: &mut Samples) -> Result<()> {
    let mut daemon = Daemon::new(&setup.keel, work.join("lc"));
    let listen = free_loopback_port()?;
    daemon.serve_args = vec!["--listen".into(), listen.clone()];
    daemon.start()?;
    create_vm(&daemon, VM, &setup.probe_elf)?;
    let tls = TlsClient::new(&daemon, &listen)?;
    // Warm-up, not counted: page cache, and a stop at once if something cannot boot.
    timed_start(&daemon, VM).context("warm-up start through the daemon")?;
    timed_end(&daemon, &["vm", "stop", VM], VM)?;
    for vmm in [Vmm::Qemu, Vmm::Keel] {
        runner::ready_then_idle(setup, vmm, GUEST_CMDLINE)
            .with_context(|| format!("warm-up boot under {} (bare)", vmm.name()))?;
    }
    for round in 1..=rounds {
        let mut line = format!("host: lifecycle {round}/{rounds}:");
        // Alternate who goes first, so that neither always follows the other's tail.
        let daemon_first = round % 2 == 1;
        if daemon_first {
            line += &keel_round(&daemon, s).with_context(|| format!("lifecycle round {round}"))?;
        }
        for vmm in [Vmm::Qemu, Vmm::Keel] {
            let (ready, memory) = runner::ready_then_idle(setup, vmm, GUEST_CMDLINE)
                .with_context(|| format!("round {round}: {} launched bare", vmm.name()))?;
            let rss = mib(memory.vm_rss_kib);
            line += &format!(
                " {} bare ready {:.1} ms, {rss:.2} MiB;",
                vmm.name(),
                ms(ready)
            );
            match vmm {
                Vmm::Qemu => {
                    s.qemu_ready.push(ms(ready));
                    s.qemu_memory.push(memory);
                }
                Vmm::Keel => {
                    s.keel_run_ready.push(ms(ready));
                    s.keel_run_memory.push(memory);
                }
            }
        }
        if !daemon_first {
            line += &keel_round(&daemon, s).with_context(|| format!("lifecycle round {round}"))?;
        }
        let (unix, _) = daemon.run_cli(&["vm", "list"])?;
        let tls_took = tls.list(&daemon)?;
        line += &format!(
            " keel vm list {:.1} ms (Unix socket), {:.1} ms (TLS);",
            ms(unix),
            ms(tls_took)
        );
        s.list_unix.push(ms(unix));
        s.list_tls.push(ms(tls_took));
        eprintln!("{line}");
    }
    daemon.stop()
}

/// A port on 127.0.0.1 nothing listens on now, as ADDR:PORT.
fn free_loopback_port() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.to_string())
}

/// The CLI against the daemon's TLS listener: a viewer token and the pinned fingerprint.
struct TlsClient {
    env: Vec<(String, String)>,
}

impl TlsClient {
    fn new(daemon: &Daemon, listen: &str) -> Result<TlsClient> {
        let (_, token) = daemon.run_cli(&["token", "create", "bench", "--role", "viewer"])?;
        let (_, host) = daemon.run_cli(&["host", "--json"])?;
        let host: serde_json::Value =
            serde_json::from_str(&host).context("parsing keel host --json")?;
        let fingerprint = host["identity"]["tls_fingerprint"]
            .as_str()
            .context("the daemon shows no TLS fingerprint")?;
        Ok(TlsClient {
            env: vec![
                ("KEEL_API".into(), format!("https://{listen}")),
                ("KEEL_TOKEN".into(), token.trim().to_string()),
                ("KEEL_FINGERPRINT".into(), fingerprint.to_string()),
            ],
        })
    }

    /// `keel vm list` over TLS: spawn to exit.
    fn list(&self, daemon: &Daemon) -> Result<std::time::Duration> {
        let started = std::time::Instant::now();
        let out = daemon
            .cli(&["vm", "list"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .context("keel vm list over TLS")?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "keel vm list over TLS failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }
}

/// VMs of `daemon` by name with their pids; every one must be running with a pid.
fn running_pids(daemon: &Daemon) -> Result<BTreeMap<String, u32>> {
    daemon
        .vms()?
        .into_iter()
        .map(|vm| match (vm.state.as_str(), vm.pid) {
            ("running", Some(pid)) => Ok((vm.name, pid)),
            (state, pid) => bail!("VM {} is {state} (pid {pid:?}), not running", vm.name),
        })
        .collect()
}

/// 1, 3, 4. `vms` running VMs; then, each round, kill -9 of the daemon and a new daemon that
/// must re-adopt every one of them with its old VMM.
fn readoption(setup: &Setup, work: &Path, rounds: u32, vms: u32, s: &mut Samples) -> Result<()> {
    let mut daemon = Daemon::new(&setup.keel, work.join("ra"));
    daemon.start()?;
    let names: Vec<String> = (1..=vms).map(|i| format!("vm{i:02}")).collect();
    for name in &names {
        create_vm(&daemon, name, &setup.probe_elf)?;
        timed_start(&daemon, name)?;
    }
    let before = running_pids(&daemon)?;
    if before.len() != names.len() {
        bail!(
            "{} VMs listed, {} created: {before:?}",
            before.len(),
            names.len()
        );
    }
    let vmm_pids = daemon.vmm_pids();
    let mut listed: Vec<u32> = before.values().copied().collect();
    listed.sort_unstable();
    if vmm_pids != listed {
        bail!("the daemon lists VMM pids {listed:?}, /proc has {vmm_pids:?}");
    }
    std::thread::sleep(IDLE_SETTLE);
    s.daemon_rss_started_n.push(daemon_rss(&daemon)?);
    for round in 1..=rounds {
        daemon.kill9();
        if daemon.vmm_pids() != vmm_pids {
            bail!(
                "RE-ADOPTION FAILED, round {round}: after kill -9 of the daemon the VMMs are \
                 {:?}, were {vmm_pids:?}: a VMM died with its daemon",
                daemon.vmm_pids()
            );
        }
        let api = daemon.start()?;
        let after_api = Instant::now();
        let now = loop {
            let listed = running_pids(&daemon)
                .with_context(|| format!("RE-ADOPTION FAILED, round {round}: a VM was lost"))?;
            if listed == before {
                break listed;
            }
            if after_api.elapsed() > STEP_TIMEOUT {
                bail!(
                    "RE-ADOPTION FAILED, round {round}: after {} s the daemon lists {listed:?}, \
                     was {before:?}",
                    STEP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(POLL);
        };
        let all_listed = api + after_api.elapsed();
        if daemon.vmm_pids() != vmm_pids {
            bail!(
                "RE-ADOPTION FAILED, round {round}: VMMs {:?} after the restart, were \
                 {vmm_pids:?} (a VMM was lost or started twice)",
                daemon.vmm_pids()
            );
        }
        std::thread::sleep(IDLE_SETTLE);
        let rss = daemon_rss(&daemon)?;
        eprintln!(
            "host: re-adoption {round}/{rounds}: API after {:.2} ms, all {} running with their \
             old pids after {:.2} ms, daemon VmRSS {rss:.2} MiB",
            ms(api),
            now.len(),
            ms(all_listed)
        );
        s.readopt_api.push(ms(api));
        s.readopt_listed.push(ms(all_listed));
        s.daemon_rss_readopted_n.push(rss);
    }
    for name in &names {
        timed_end(&daemon, &["vm", "stop", name], name)?;
    }
    daemon.stop()
}

fn rows(s: &Samples, vms: u32) -> Vec<Row> {
    vec![
        Row::new(
            "Daemon start to API answering `GET /`, new state dir",
            "ms",
            &s.cold_start,
            None,
        ),
        Row::new(
            &format!("Daemon start after kill -9 to API answering, {vms} VMs re-adopted"),
            "ms",
            &s.readopt_api,
            None,
        ),
        Row::new(
            &format!("Daemon start after kill -9 to all {vms} listed running, old pids"),
            "ms",
            &s.readopt_listed,
            None,
        ),
        Row::new(
            "`keel vm start`: CLI spawn to exit (VM running)",
            "ms",
            &s.start_cli,
            None,
        ),
        Row::new(
            "`keel vm start` to `PROBE ready` in console.log; QEMU: bare launch to `PROBE ready`",
            "ms",
            &s.start_ready,
            Some(&s.qemu_ready),
        ),
        Row::new(
            "`keel run` (no daemon) to `PROBE ready`; QEMU: the same",
            "ms",
            &s.keel_run_ready,
            Some(&s.qemu_ready),
        ),
        Row::new(
            "`keel vm shutdown` (power button to stopped)",
            "ms",
            &s.shutdown,
            None,
        ),
        Row::new("`keel vm stop`", "ms", &s.stop, None),
        Row::new(
            "`keel vm list`: CLI spawn to exit, Unix socket",
            "ms",
            &s.list_unix,
            None,
        ),
        Row::new(
            "`keel vm list`: CLI spawn to exit, TLS (handshake, token, pinned certificate)",
            "ms",
            &s.list_tls,
            None,
        ),
        Row::new(
            "Daemon VmRSS, new state dir, 0 VMs",
            "MiB",
            &s.daemon_rss_fresh,
            None,
        ),
        Row::new(
            "Daemon VmRSS, 1 VM defined, after each lifecycle round",
            "MiB",
            &s.daemon_rss_after_rounds,
            None,
        ),
        Row::new(
            &format!("Daemon VmRSS, {vms} VMs it started"),
            "MiB",
            &s.daemon_rss_started_n,
            None,
        ),
        Row::new(
            &format!("Daemon VmRSS, {vms} VMs re-adopted"),
            "MiB",
            &s.daemon_rss_readopted_n,
            None,
        ),
        Row::new(
            "Idle VMM VmRSS: `keel vmm` under the daemon; QEMU microvm",
            "MiB",
            &mibs(&s.vmm_memory, |m| m.vm_rss_kib),
            Some(&mibs(&s.qemu_memory, |m| m.vm_rss_kib)),
        ),
        Row::new(
            "Idle VMM RssAnon: `keel vmm` under the daemon; QEMU microvm",
            "MiB",
            &mibs(&s.vmm_memory, |m| m.rss_anon_kib),
            Some(&mibs(&s.qemu_memory, |m| m.rss_anon_kib)),
        ),
        Row::new(
            "Idle VMM RssFile: `keel vmm` under the daemon; QEMU microvm",
            "MiB",
            &mibs(&s.vmm_memory, |m| m.rss_file_kib),
            Some(&mibs(&s.qemu_memory, |m| m.rss_file_kib)),
        ),
        Row::new(
            "Idle VMM VmRSS: `keel run`; QEMU microvm",
            "MiB",
            &mibs(&s.keel_run_memory, |m| m.vm_rss_kib),
            Some(&mibs(&s.qemu_memory, |m| m.vm_rss_kib)),
        ),
    ]
}

fn run(args: Args, work: &Path) -> Result<()> {
    let Prepared {
        setup,
        qemu_version,
        ..
    } = args.vmm.prepare()?;
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let machine = Host::current(qemu_version);
    let load_before = loadavg();
    let mut samples = Samples::default();
    cold_starts(&setup.keel, work, args.rounds, &mut samples)?;
    lifecycle(&setup, work, args.rounds, &mut samples)?;
    readoption(&setup, work, args.rounds, args.vms, &mut samples)?;

    println!(
        "Keel host-daemon benchmark, {} UTC: {} rounds, {} VMs re-adopted per round; probe \
         guest `{GUEST_CMDLINE}`, {VCPUS} vCPU, {MEMORY_MIB} MiB",
        machine.date_utc, args.rounds, args.vms
    );
    println!(
        "Host: {}; load average {} before, {} after",
        machine.describe(),
        load_before,
        loadavg()
    );
    println!(
        "The `keel vm start` figures include the CLI's own start, the API round trip and the \
         daemon's work; QEMU's are a bare launch of qemu-system-x86_64.\n"
    );
    print!("{}", table::render(&rows(&samples, args.vms)));
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("khb-{}", std::process::id()));
    if let Err(e) = cleanup::install(&work) {
        eprintln!("host: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = run(args, &work);
    let _ = std::fs::remove_dir_all(&work);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
