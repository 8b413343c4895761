//! `keel vm pause|resume` through the daemon: the state, the ledger rows with their cause and
//! the measured pause, the SLA report (an operator's pause is planned down time), a daemon
//! restart that finds a VM paused (by itself or behind its back), and who may pause.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::*;

const STATE_TIMEOUT: Duration = Duration::from_secs(30);

fn churning_vm(daemon: &Daemon, name: &str) -> std::path::PathBuf {
    let kernel = probe_elf();
    daemon.ok(&[
        "vm",
        "create",
        name,
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "probe.churn=8M probe.churn_rate=20 probe.churn_report_ms=200",
        "--memory",
        "128",
    ]);
    daemon.ok(&["vm", "start", name]);
    let shown = daemon.json(&["vm", "show", name]);
    let log = std::path::PathBuf::from(shown["console_log"].as_str().unwrap());
    wait_for(&log, "PROBE churn start", 0);
    log
}

fn wait_for(log: &std::path::Path, text: &str, from: usize) -> String {
    common::daemon::wait_for_output(log, text, from, STATE_TIMEOUT)
}

fn log_len(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().len()
}

/// The newest state rows of `vm`, newest first.
fn state_rows(daemon: &Daemon, vm: &str) -> Vec<serde_json::Value> {
    let mut rows = daemon
        .json(&["events", "--vm", vm, "--kind", "state", "--limit", "10"])
        .as_array()
        .unwrap()
        .clone();
    rows.reverse();
    rows
}

#[test]
fn pause_and_resume_are_recorded_and_planned() {
    if !kvm_available("pause_and_resume_are_recorded_and_planned") {
        return;
    }
    let daemon = Daemon::start("pause");
    let log = churning_vm(&daemon, "p1");
    let from = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();

    // Only a running VM pauses; only a paused one resumes; the power button waits.
    let refused = daemon.fails(&["vm", "resume", "p1"]);
    assert!(
        refused.contains("only a paused VM can be resumed"),
        "{refused}"
    );
    let paused = daemon.json(&["vm", "pause", "p1"]);
    assert_eq!(paused["state"], "paused", "{paused}");
    let mark = log_len(&log);
    let refused = daemon.fails(&["vm", "pause", "p1"]);
    assert!(
        refused.contains("only a running VM can be paused"),
        "{refused}"
    );
    let refused = daemon.fails(&["vm", "shutdown", "p1"]);
    assert!(refused.contains("is paused"), "{refused}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(log_len(&log), mark, "the guest ran while paused");
    let resumed = daemon.json(&["vm", "resume", "p1"]);
    assert_eq!(resumed["state"], "running", "{resumed}");
    let after = wait_for(&log, "PROBE churn check ok", mark);
    assert!(after.contains("PROBE churn gap "), "{after}");

    // The ledger: paused by the operator (with the VMM's stop time), resumed with how long.
    let rows = state_rows(&daemon, "p1");
    assert_eq!(rows[0]["to"], "running", "{rows:?}");
    assert_eq!(rows[0]["cause"], "operator");
    let detail = rows[0]["detail"].as_str().unwrap();
    let seconds: f64 = detail
        .strip_prefix("resumed after ")
        .and_then(|d| d.strip_suffix(" s paused"))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!((0.3..5.0).contains(&seconds), "{detail}");
    assert_eq!(rows[1]["to"], "paused");
    assert_eq!(rows[1]["cause"], "operator");
    assert!(
        rows[1]["detail"]
            .as_str()
            .unwrap()
            .contains("vCPUs stopped in"),
        "{rows:?}"
    );

    // The SLA report: the pause is excluded (the operator's choice), not down time.
    let to = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    let report = daemon.json(&["sla", "report", "--from", &from, "--to", &to, "--vm", "p1"]);
    let vm = &report["vms"][0];
    assert_eq!(vm["availability_percent"], 100.0, "{report}");
    assert!(vm["excluded_seconds"].as_f64().unwrap() >= 0.3, "{report}");
    assert_eq!(vm["outages"], 0, "{report}");

    // A paused VM stops like any other.
    daemon.ok(&["vm", "pause", "p1"]);
    daemon.ok(&["vm", "stop", "p1"]);
    assert_eq!(daemon.state("p1"), "stopped");
}

#[test]
fn a_restarted_daemon_believes_the_vmm_about_a_pause() {
    if !kvm_available("a_restarted_daemon_believes_the_vmm_about_a_pause") {
        return;
    }
    let mut daemon = Daemon::start("pause-restart");
    let log = churning_vm(&daemon, "p2");

    // Paused through the daemon, which is then killed: still paused when it comes back.
    daemon.ok(&["vm", "pause", "p2"]);
    daemon.kill9();
    daemon.restart();
    assert_eq!(daemon.state("p2"), "paused");
    let mark = log_len(&log);
    daemon.ok(&["vm", "resume", "p2"]);
    wait_for(&log, "PROBE churn check ok", mark);

    // Paused behind the daemon's back (its VMM's control socket) while it was down: the
    // restarted daemon records what the VMM says, with cause daemon-restart.
    daemon.kill9();
    let run_dir = daemon.state_dir.join("vms/p2");
    let answer = common::vmm::Control::connect_to(&run_dir.join("control.sock"))
        .ask(br#"{"request":"pause"}"#);
    assert!(
        matches!(answer, api::control::Response::Paused(_)),
        "{answer:?}"
    );
    daemon.restart();
    assert_eq!(daemon.state("p2"), "paused");
    let rows = state_rows(&daemon, "p2");
    assert_eq!(rows[0]["to"], "paused", "{rows:?}");
    assert_eq!(rows[0]["cause"], "daemon-restart", "{rows:?}");
    daemon.ok(&["vm", "resume", "p2"]);
    assert_eq!(daemon.state("p2"), "running");
    daemon.ok(&["vm", "stop", "p2"]);
}
