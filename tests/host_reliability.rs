//! Promise 2, whole-system: a `kill -9` of `keel serve` in the middle of 20 concurrent
//! lifecycle requests (start, stop, shutdown, reboot, create) loses nothing. After each
//! restart the store and the processes agree: every VM the API shows with a VMM has a live
//! `keel vmm` with that pid running that VM, every live VMM belongs to exactly one VM (no
//! orphans, no duplicates), no VM is left `starting`, and the ledger verifies. Five rounds hit
//! different moments; at the end every VM stops and no VMM remains.
//!
//! The requests and the moment of the kill come from a seed, printed at the start; set
//! KEEL_TEST_SEED to replay a run. Requests cut off by the kill may fail on the client side:
//! what is checked is the state after the restart.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;

const ROUNDS: usize = 5;
const REQUESTS: usize = 20;
const CREATES_PER_ROUND: usize = 2;
const FIRST_VMS: usize = 8;
/// How long the state may take to settle after a restart (a re-adopted VM whose power
/// button was pressed before the kill powers off a moment later).
const SETTLE: Duration = Duration::from_secs(15);

/// splitmix64: small, seeded, good enough to pick requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seed() -> u64 {
    match std::env::var("KEEL_TEST_SEED") {
        Ok(s) => s.parse().expect("KEEL_TEST_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// One VM as `keel vm list --json` shows it.
#[derive(Debug, Clone)]
struct Shown {
    state: String,
    pid: Option<u32>,
}

fn list(daemon: &Daemon) -> BTreeMap<String, Shown> {
    daemon
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["spec"]["name"].as_str().unwrap().to_string(),
                Shown {
                    state: v["state"].as_str().unwrap().to_string(),
                    pid: v["pid"].as_u64().map(|p| p as u32),
                },
            )
        })
        .collect()
}

/// The run directory a `keel vmm` process was started on (`--dir DIR`).
fn vmm_dir(pid: u32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let at = words.iter().position(|w| w == "--dir")?;
    words.get(at + 1).cloned()
}

/// Whether the API's VMs and the live VMMs agree; what is wrong if they do not.
fn inconsistencies(daemon: &Daemon) -> Result<BTreeMap<String, Shown>, String> {
    let before = daemon.vmm_pids();
    let vms = list(daemon);
    let after = daemon.vmm_pids();
    if before != after {
        return Err(format!(
            "VMMs changed while looking: {before:?} then {after:?}"
        ));
    }
    let mut problems = Vec::new();
    let mut claimed: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (name, vm) in &vms {
        match (vm.state.as_str(), vm.pid) {
            ("starting", _) => problems.push(format!("{name} is left starting ({vm:?})")),
            ("running" | "shutting-down", Some(pid)) => {
                claimed.entry(pid).or_default().push(name);
                if !after.contains(&pid) {
                    problems.push(format!(
                        "{name} is {} with pid {pid}, but no such keel vmm runs",
                        vm.state
                    ));
                }
                let want = daemon.state_dir.join("vms").join(name);
                match vmm_dir(pid) {
                    Some(dir) if Path::new(&dir) == want => {}
                    other => problems.push(format!(
                        "{name}'s pid {pid} runs {other:?}, not {}",
                        want.display()
                    )),
                }
            }
            ("running" | "shutting-down", None) => {
                problems.push(format!("{name} is {} without a pid", vm.state))
            }
            (_, Some(pid)) => {
                problems.push(format!("{name} is {} but still names pid {pid}", vm.state))
            }
            (_, None) => {}
        }
    }
    for pid in &after {
        match claimed.get(pid).map(Vec::len) {
            Some(1) => {}
            None => problems.push(format!(
                "orphan: keel vmm pid {pid} ({}) belongs to no VM the API shows with it",
                vmm_dir(*pid).unwrap_or_default()
            )),
            Some(_) => problems.push(format!("pid {pid} is claimed by {:?}", claimed[pid])),
        }
    }
    if problems.is_empty() {
        Ok(vms)
    } else {
        Err(problems.join("\n"))
    }
}

/// Waits until the API and the processes agree; panics with the evidence after SETTLE.
fn settled(daemon: &Daemon, context: &str) -> BTreeMap<String, Shown> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match inconsistencies(daemon) {
            Ok(vms) => return vms,
            Err(problems) if Instant::now() > deadline => panic!(
                "{context}: the store and the VMMs disagree after {SETTLE:?}:\n{problems}\n\
                 VMs: {:#?}\nVMMs: {:?}\nevents:\n{}\ndaemon log:\n{}",
                list(daemon),
                daemon
                    .vmm_pids()
                    .iter()
                    .map(|p| (*p, vmm_dir(*p)))
                    .collect::<Vec<_>>(),
                daemon.ok(&["events", "--limit", "50"]),
                daemon.log()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_daemon_killed_mid_requests_loses_and_orphans_nothing() {
    if !kvm_available("a_daemon_killed_mid_requests_loses_and_orphans_nothing") {
        return;
    }
    let seed = seed();
    eprintln!("host_reliability: seed {seed} (replay with KEEL_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let kernel = probe_elf();
    let kernel = kernel.to_str().unwrap();
    let mut daemon = Daemon::start("rel");
    let mut names: Vec<String> = (0..FIRST_VMS).map(|i| format!("vm{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let start: &[&str] = if i % 2 == 0 { &["--start"] } else { &[] };
        daemon.create_probe_vm(name, start);
    }
    settled(&daemon, "before the first round");

    for round in 0..ROUNDS {
        // 20 requests at once, each its own CLI process.
        let mut requests: Vec<(String, Child)> = Vec::new();
        for i in 0..REQUESTS {
            let args: Vec<String> = if i < CREATES_PER_ROUND {
                let name = format!("new{round}x{i}");
                names.push(name.clone());
                let mut a = vec![
                    "vm",
                    "create",
                    &name,
                    "--kernel",
                    kernel,
                    "--cmdline",
                    "probe.power_button",
                    "--memory",
                    "64",
                ];
                if rng.below(2) == 0 {
                    a.push("--start");
                }
                a.iter().map(|s| s.to_string()).collect()
            } else {
                let vm = names[rng.below(names.len())].clone();
                let verb: &[&str] = match rng.below(4) {
                    0 => &["start"],
                    1 => &["stop"],
                    2 => &["shutdown", "--timeout", "5"],
                    _ => &["reboot"],
                };
                let mut a = vec!["vm".to_string(), verb[0].to_string(), vm];
                a.extend(verb[1..].iter().map(|s| s.to_string()));
                a
            };
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            let child = daemon.spawn(&words);
            requests.push((args.join(" "), child));
        }
        let delay = Duration::from_millis(50 + rng.below(251) as u64);
        std::thread::sleep(delay);
        daemon.kill9();
        let mut outcomes = Vec::new();
        for (what, mut child) in requests {
            let outcome =
                match wait_or_kill(&mut child, Duration::from_secs(30)).map(|s| s.success()) {
                    Some(true) => "ok",
                    Some(false) => "failed",
                    None => "hung",
                };
            outcomes.push(format!("{what}: {outcome}"));
        }
        eprintln!(
            "round {round}: daemon killed {delay:?} after the requests began; {} of {REQUESTS} \
             answered ok",
            outcomes.iter().filter(|o| o.ends_with(": ok")).count()
        );
        assert!(
            !outcomes.iter().any(|o| o.ends_with(": hung")),
            "a client hung on the dead daemon: {outcomes:#?}"
        );

        daemon.restart();
        // Recovery runs before the API listens: nothing may still be starting.
        let now = list(&daemon);
        let starting: Vec<_> = now.iter().filter(|(_, v)| v.state == "starting").collect();
        assert!(
            starting.is_empty(),
            "round {round} (seed {seed}): left starting after the restart: {starting:?}\n{}",
            daemon.ok(&["events", "--limit", "50"])
        );
        let vms = settled(
            &daemon,
            &format!("round {round} (seed {seed}, kill after {delay:?})"),
        );
        let verified = daemon.ok(&["ledger", "verify"]);
        assert!(verified.starts_with("ledger verified: "), "{verified}");
        let host = daemon.json(&["host"]);
        let supervision = host["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "supervision")
            .cloned()
            .unwrap_or_default();
        assert_eq!(supervision["ok"], true, "round {round}: {host}");
        // Nothing here crashes a VM: a probe guest does not, and no VMM is killed behind the
        // daemon's back. A crash would be the daemon misreading an end it caused.
        let crashed: Vec<_> = vms.iter().filter(|(_, v)| v.state == "crashed").collect();
        if !crashed.is_empty() {
            let logs: Vec<String> = crashed
                .iter()
                .map(|(name, _)| {
                    let log = daemon.state_dir.join("vms").join(name).join("vmm.log");
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(12).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {}:\n{}", log.display(), tail.join("\n"))
                })
                .collect();
            panic!(
                "round {round} (seed {seed}, kill after {delay:?}): crashed after the restart: \
                 {crashed:?}\nrequests:\n{}\nevents:\n{}\n{}",
                outcomes.join("\n"),
                daemon.ok(&["events", "--limit", "50"]),
                logs.join("\n")
            );
        }
        eprintln!(
            "round {round}: consistent; {} VMs, {} VMMs",
            vms.len(),
            daemon.vmm_pids().len()
        );
    }

    // Everything stops, and no VMM is left.
    for (name, vm) in settled(&daemon, "at the end") {
        if vm.state == "running" {
            daemon.ok(&["vm", "stop", &name]);
        }
    }
    let deadline = Instant::now() + SETTLE;
    while !daemon.vmm_pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMMs left after stopping every VM: {:?}\n{:#?}",
            daemon.vmm_pids(),
            list(&daemon)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let vms = settled(&daemon, "after stopping everything");
    assert!(
        vms.values().all(|v| v.state == "stopped"),
        "every VM stopped: {vms:#?}"
    );
    let verified = daemon.ok(&["ledger", "verify"]);
    assert!(verified.starts_with("ledger verified: "), "{verified}");
}
