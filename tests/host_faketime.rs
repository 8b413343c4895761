//! Promise 1, whole-system: the date never stops a VM. `keel serve` runs under libfaketime
//! (Debian's `faketime`) with the clock at 2038-01-20 (past the 32-bit time_t end) and at
//! 2100-01-01. Two probe VMs start, one shuts down on the power button, the daemon is killed
//! with SIGKILL and restarted (still in the faked year) and re-adopts the other VM's VMM; the
//! ledger verifies, its times are in the faked year, and the SLA report shows 100% for both
//! (operator actions are excluded). An API token that expired in 2030 still starts and stops
//! the existing VM over TCP (with a warning) but may not define a new one, and the front page
//! warns about it.
//!
//! How libfaketime is used, and why:
//!
//! - The `faketime` program does not exec the daemon: it forks, runs it as its child and waits
//!   (to remove its shared-memory segment afterwards). So the harness's child is `faketime`,
//!   and `Daemon::kill9` alone would kill only the wrapper and leave `keel serve` running.
//!   [`Faked::kill9`] sends SIGKILL to the real daemon (the wrapper's child) first. faketime
//!   waits for EOF on a pipe whose write end the daemon inherits (with an fd of its shared
//!   memory); `keel serve` does not pass them on to its VMMs (close-on-exec when it spawns
//!   one), but the wrapper is killed rather than waited for all the same.
//! - `faketime DATE` turns DATE into an offset from the moment it runs. A second `faketime
//!   DATE` for the restart would set the clock back by the seconds the first part took, so
//!   the test computes one offset (`faketime -f +Ns`) and every run of the daemon shares it:
//!   one faked clock that keeps running across the restart, as a real host's would.
//! - libfaketime fakes CLOCK_MONOTONIC too by default (it then reads about the faked epoch
//!   seconds, ~4.1e9 s for 2100). That is left on on purpose: tokio's timers and every
//!   timeout in the daemon only subtract instants of one process, so a monotonic clock with a
//!   huge constant offset must not matter, and the test checks it does not (a shutdown whose
//!   guest ignores the button is stopped after its 2 s timeout, not at once and not never).
//!   FAKETIME_DONT_FAKE_MONOTONIC=1 is therefore not set.
//! - The VMMs the daemon spawns inherit LD_PRELOAD and FAKETIME, so they run under the faked
//!   date too (the guest's RTC reads the faked year); the test checks they do.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::daemon::{free_port, Daemon};
use common::*;

const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// A faked date: how faketime spells it, its Unix time, and RFC 3339 bounds for the report.
struct FakedDate {
    faketime: &'static str,
    unix: i64,
    year: &'static str,
    report_to: &'static str,
}

#[test]
fn vms_run_and_are_readopted_in_2038() {
    lifecycle_under_faked_date(
        "faketime_2038",
        &FakedDate {
            faketime: "2038-01-20 00:00:00",
            unix: 2_147_558_400,
            year: "2038",
            report_to: "2038-01-21T00:00:00Z",
        },
    );
}

#[test]
fn vms_run_and_are_readopted_in_2100() {
    lifecycle_under_faked_date(
        "faketime_2100",
        &FakedDate {
            faketime: "2100-01-01 00:00:00",
            unix: 4_102_444_800,
            year: "2100",
            report_to: "2100-01-02T00:00:00Z",
        },
    );
}

/// The clock set back, as customers did in 2008 to get their VMs to power on: the daemon
/// runs in 2100, is killed, and comes back with the clock in 2030. The running VM is
/// re-adopted, a stopped one starts, both stop, and the ledger (whose times now go backwards)
/// still verifies: no decision read the clock, and the hash chain does not care about it.
#[test]
fn a_clock_set_back_decides_nothing() {
    let tag = "faketime_back";
    if !kvm_available(tag) || !faketime_available(tag) {
        return;
    }
    let now = unix_now();
    let offset_2100 = offset_to(4_102_444_800, now);
    let offset_2030 = offset_to(1_893_456_000, now);
    let mut faked = Faked {
        daemon: Daemon::start_with(tag, &["faketime", "-f", &offset_2100], &[], &[]),
    };
    faked.daemon.create_probe_vm("steady", &["--start"]);
    faked.daemon.create_probe_vm("later", &[]);
    let pid = faked.daemon.json(&["vm", "show", "steady"])["pid"].clone();
    faked.kill9();
    faked.daemon.set_wrapper(&["faketime", "-f", &offset_2030]);
    faked.daemon.restart();
    let shown = faked.daemon.json(&["vm", "show", "steady"]);
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["pid"], pid, "re-adopted, not restarted: {shown}");
    faked.daemon.ok(&["vm", "start", "later"]);
    faked.daemon.ok(&["vm", "stop", "later"]);
    faked.daemon.ok(&["vm", "stop", "steady"]);
    let events = faked.daemon.json(&["events", "--limit", "100"]);
    let years: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["time"].as_str().unwrap()[..4].to_string())
        .collect();
    assert!(
        years.first().map(String::as_str) == Some("2100")
            && years.last().map(String::as_str) == Some("2030"),
        "the ledger's times went from 2100 back to 2030: {years:?}"
    );
    let verified = faked.daemon.ok(&["ledger", "verify"]);
    assert!(verified.starts_with("ledger verified"), "{verified}");
    assert!(faked.daemon.vmm_pids().is_empty());
}

/// True when faketime can be used; otherwise SKIPPED, or a failure under KEEL_REQUIRE_KVM=1.
fn faketime_available(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("faketime").is_file()))
        .unwrap_or(false);
    if found {
        return true;
    }
    let why = "the `faketime` program (Debian package faketime, libfaketime) is not installed; \
               scripts/install-deps.sh installs it";
    if std::env::var("KEEL_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: {why}, and KEEL_REQUIRE_KVM=1 makes that a failure");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A daemon run by `faketime`; kills the real daemon, not only the wrapper.
struct Faked {
    daemon: Daemon,
}

impl Faked {
    /// The `keel serve` process: the wrapper's child.
    fn serve_pid(&self) -> Option<u32> {
        let wrapper = self.daemon.pid()?;
        children_of(wrapper).into_iter().next()
    }

    /// SIGKILL to `keel serve` itself, then to the wrapper, which is reaped.
    fn kill9(&mut self) {
        if let Some(pid) = self.serve_pid() {
            // SAFETY: kill(2) on the daemon's pid, just read from /proc; it is our grandchild.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + STATE_TIMEOUT;
            while Path::new(&format!("/proc/{pid}")).exists() {
                assert!(
                    Instant::now() < deadline,
                    "keel serve {pid} survived SIGKILL"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let wrapper = self.daemon.pid();
        self.daemon.kill9();
        // The wrapper dies by the harness's SIGKILL without removing its shared memory.
        // Removed here, as faketime would (the VMMs keep their mappings).
        if let Some(pid) = wrapper {
            let _ = std::fs::remove_file(format!("/dev/shm/faketime_shm_{pid}"));
            let _ = std::fs::remove_file(format!("/dev/shm/sem.faketime_sem_{pid}"));
        }
    }
}

impl Drop for Faked {
    fn drop(&mut self) {
        // Before the harness's own cleanup, which would kill only the wrapper.
        self.kill9();
    }
}

/// The real clock's Unix time, in seconds.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// libfaketime's offset (`+Ns`) from `now` to the Unix time `to`.
fn offset_to(to: i64, now: i64) -> String {
    format!("+{}s", to - now)
}

/// Pids whose parent is `parent`, from /proc/PID/stat.
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for (pid, dir) in processes() {
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lifecycle_under_faked_date(tag: &str, date: &FakedDate) {
    if !kvm_available(tag) || !faketime_available(tag) {
        return;
    }
    // One offset for the whole test (see the top of the file).
    let offset = offset_to(date.unix, unix_now());
    let probe = std::process::Command::new("faketime")
        .args(["-f", &offset, "date", "-u", "+%Y"])
        .output()
        .expect("run faketime");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        date.year,
        "faketime -f {offset} date does not show {} ({}): libfaketime does not work here",
        date.faketime,
        stderr_of(&probe)
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut faked = Faked {
        daemon: Daemon::start_with(
            tag,
            &["faketime", "-f", &offset],
            &["--listen", &listen],
            &[],
        ),
    };
    let first = faked.daemon.json(&["events", "--limit", "1"])[0].clone();
    let from = first["time"].as_str().unwrap().to_string();
    assert!(
        from.starts_with(date.year),
        "the daemon does not run at the faked date {}: {first}",
        date.faketime
    );

    // A token that expired years before the faked date, made over the Unix socket.
    let secret = faked
        .daemon
        .ok(&[
            "token",
            "create",
            "old-ops",
            "--role",
            "operator",
            "--expires",
            "2030-01-01T00:00:00Z",
        ])
        .trim()
        .to_string();
    let (api, fingerprint) = faked.daemon.https(&listen);
    let tcp_env = [
        ("KEEL_API", api.as_str()),
        ("KEEL_TOKEN", secret.as_str()),
        ("KEEL_FINGERPRINT", fingerprint.as_str()),
    ];

    faked.daemon.create_probe_vm("keeper", &[]);
    faked.daemon.create_probe_vm("leaver", &["--start"]);
    // The expired token starts an existing VM (the TCP listener may come up a moment after
    // the Unix socket the harness waits for).
    let deadline = Instant::now() + STATE_TIMEOUT;
    let started = loop {
        let out = faked.daemon.keel_env(&["vm", "start", "keeper"], &tcp_env);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        assert!(
            stderr_of(&out).contains("cannot reach keel serve"),
            "{}",
            stderr_of(&out)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let warned = stderr_of(&started);
    assert!(
        started.status.success(),
        "an expired token must still start an existing VM: {warned}"
    );
    assert!(
        warned.contains("keel: warning:") && warned.contains("expired"),
        "{warned}"
    );
    // ... but may not define a new one.
    let kernel = probe_elf();
    let refused = faked.daemon.keel_env(
        &["vm", "create", "new", "--kernel", kernel.to_str().unwrap()],
        &tcp_env,
    );
    assert!(!refused.status.success(), "an expired token created a VM");
    assert!(
        stderr_of(&refused).contains("expired"),
        "{}",
        stderr_of(&refused)
    );
    assert!(faked
        .daemon
        .fails(&["vm", "show", "new"])
        .contains("no VM named"));
    // The front page says so.
    let host = faked.daemon.json(&["host"]);
    let warnings = host["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| {
            let w = w.as_str().unwrap();
            w.contains("old-ops") && w.contains("expired")
        }),
        "{host}"
    );

    for vm in ["keeper", "leaver"] {
        assert_eq!(faked.daemon.state(vm), "running");
    }
    let keeper = faked.daemon.json(&["vm", "show", "keeper"]);
    let keeper_pid = keeper["pid"].as_u64().unwrap() as u32;
    // The VMMs run under libfaketime too: they inherit its preload and offset.
    let environ = std::fs::read(format!("/proc/{keeper_pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("LD_PRELOAD=") && environ.contains(&format!("FAKETIME={offset}")),
        "VMM {keeper_pid} is not under libfaketime"
    );

    // A timer under the faked monotonic clock: a guest that ignores the power button (no
    // probe.power_button) is stopped once its 2 s run out.
    faked.daemon.ok(&[
        "vm",
        "create",
        "deaf",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--start",
    ]);
    let pressed = Instant::now();
    let out = faked
        .daemon
        .ok(&["vm", "shutdown", "deaf", "--timeout", "2"]);
    let took = pressed.elapsed();
    assert!(out.contains("did not power off within 2s"), "{out}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(15),
        "a 2 s shutdown timeout took {took:?} under the faked clock"
    );

    // The power button: the probe powers off.
    let shut = faked
        .daemon
        .ok(&["vm", "shutdown", "leaver", "--timeout", "20"]);
    assert!(shut.starts_with("leaver: stopped"), "{shut}");
    assert_eq!(faked.daemon.vmm_pids(), vec![keeper_pid]);

    // kill -9 of the daemon and a restart in the same faked year: keeper is re-adopted.
    faked.kill9();
    assert_eq!(
        faked.daemon.vmm_pids(),
        vec![keeper_pid],
        "VMMs outlive the daemon"
    );
    faked.daemon.restart();
    assert_eq!(
        faked.daemon.vmm_pids(),
        vec![keeper_pid],
        "no duplicate VMMs"
    );
    let shown = faked.daemon.json(&["vm", "show", "keeper"]);
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["pid"].as_u64(), Some(keeper_pid as u64), "{shown}");
    assert_eq!(faked.daemon.state("leaver"), "stopped");
    let readopted = faked
        .daemon
        .ok(&["events", "--vm", "keeper", "--kind", "host"]);
    assert!(
        readopted.contains(&format!("re-adopted running VMM pid {keeper_pid}")),
        "{readopted}"
    );

    // The expired token stops the VM, with a warning.
    let deadline = Instant::now() + STATE_TIMEOUT;
    let stopped = loop {
        let out = faked.daemon.keel_env(&["vm", "stop", "keeper"], &tcp_env);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let warned = stderr_of(&stopped);
    assert!(
        stopped.status.success(),
        "an expired token must still stop an existing VM: {warned}"
    );
    assert!(warned.contains("expired"), "{warned}");
    assert_eq!(faked.daemon.state("keeper"), "stopped");
    assert!(faked.daemon.vmm_pids().is_empty());

    // The ledger verifies; every row is stamped in the faked year.
    let verified = faked.daemon.ok(&["ledger", "verify"]);
    assert!(verified.starts_with("ledger verified: "), "{verified}");
    let events = faked.daemon.json(&["events", "--limit", "1000"]);
    let events = events.as_array().unwrap();
    assert!(events.len() > 10, "{events:?}");
    for event in events {
        let time = event["time"].as_str().unwrap();
        assert!(
            time.starts_with(&format!("{}-", date.year)),
            "an event outside {}: {event}",
            date.year
        );
    }
    let last = events.last().unwrap()["time"].as_str().unwrap();
    assert!(
        last > from.as_str(),
        "the faked clock went on across the restart"
    );

    // The SLA report: every stop was the operator's, so both VMs are at 100%.
    let report = faked
        .daemon
        .json(&["sla", "report", "--from", &from, "--to", date.report_to]);
    assert_eq!(report["ledger_verified"], true, "{report}");
    let vms = report["vms"].as_array().unwrap();
    for vm in ["keeper", "leaver"] {
        let row = vms
            .iter()
            .find(|v| v["vm"] == vm)
            .unwrap_or_else(|| panic!("{vm} missing: {report}"));
        assert_eq!(row["availability_percent"], 100.0, "{vm}: {report}");
        assert_eq!(row["outages"], 0, "{vm}: {report}");
    }
    let table = faked
        .daemon
        .ok(&["sla", "report", "--from", &from, "--to", date.report_to]);
    for vm in ["keeper", "leaver"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(vm))
            .unwrap_or_else(|| panic!("{vm} missing: {table}"));
        assert!(line.contains("100.0000%"), "{table}");
    }
}
