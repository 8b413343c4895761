//! `keel vm upgrade` and `keel host upgrade` through the daemon, with jailed VMMs: a probe
//! writing disk records (in the qcow2 overlay a snapshot started; its cloud-init seed is a
//! disk after it) and then churning its memory is handed to new VMM processes again and again and loses nothing; the daemon watches the new process (a stop ends it, a daemon
//! restart re-adopts it), the ledger records each handover as `maintenance`, which the SLA
//! report counts.

mod common;

use std::time::Duration;

use common::daemon::{wait_for_output, Daemon};
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn pid(daemon: &Daemon, vm: &str) -> u64 {
    daemon.json(&["vm", "show", vm])["pid"].as_u64().unwrap()
}

#[test]
fn upgrades_hand_running_guests_to_new_vmms_and_lose_nothing() {
    if !kvm_available("upgrades_hand_running_guests_to_new_vmms_and_lose_nothing") {
        return;
    }
    let mut daemon = Daemon::start("upgrade");
    let disk = daemon.images().join("records.raw");
    sparse_disk(&disk);
    // u1 has cloud-init data: its VMMs have a seed disk after the records' disk.
    let user_data = daemon.images().join("user-data");
    std::fs::write(&user_data, "#cloud-config\nhostname: u1\n").unwrap();
    daemon.ok(&[
        "vm",
        "create",
        "u1",
        "--kernel",
        probe_elf().to_str().unwrap(),
        "--cmdline",
        "probe.blk_records=200 probe.blk_nodiscard probe.churn=4M probe.churn_rate=10 probe.churn_report_ms=200 probe.churn_gap_us=20000",
        "--memory",
        "128",
        "--disk",
        &format!("path={}", disk.display()),
        "--cloud-init",
        &format!("user-data={}", user_data.display()),
    ]);
    daemon.create_probe_with(
        "u2",
        "probe.churn=4M probe.churn_rate=10 probe.churn_report_ms=200 probe.churn_gap_us=20000",
        None,
    );
    let from = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    daemon.ok(&["vm", "start", "u1"]);
    daemon.ok(&["vm", "start", "u2"]);
    let log = |vm: &str| {
        std::path::PathBuf::from(
            daemon.json(&["vm", "show", vm])["console_log"]
                .as_str()
                .unwrap(),
        )
    };
    let (log1, log2) = (log("u1"), log("u2"));
    wait_for_output(&log1, "PROBE acked 5\n", 0, TIMEOUT);
    // A snapshot first: u1 writes on in a qcow2 overlay, which each new VMM takes over.
    let snap = daemon.json(&["vm", "snapshot", "u1", "--name", "before"]);
    assert_eq!(snap["disks"][0]["how"], "overlay", "{snap}");
    let frozen = std::fs::read(&disk).unwrap();

    // Three upgrades of u1 during its disk records.
    for _ in 0..3 {
        let before = pid(&daemon, "u1");
        let report = daemon.json(&["vm", "upgrade", "u1"]);
        assert_eq!(report["old_pid"].as_u64(), Some(before), "{report}");
        let after = report["new_pid"].as_u64().unwrap();
        assert_ne!(after, before);
        assert_eq!(pid(&daemon, "u1"), after);
        assert_eq!(daemon.state("u1"), "running");
        assert!(
            !std::path::Path::new(&format!("/proc/{before}/status")).exists() || {
                std::thread::sleep(Duration::from_millis(200));
                !std::path::Path::new(&format!("/proc/{before}/status")).exists()
            }
        );
    }
    // Every VM at once.
    wait_for_output(&log2, "PROBE churn start", 0, TIMEOUT);
    let text = daemon.ok(&["host", "upgrade"]);
    assert!(
        text.contains("u1: VMM upgraded") && text.contains("u2: VMM upgraded"),
        "{text}"
    );
    // The guests lost nothing.
    let u1 = wait_for_output(&log1, "PROBE churn tick 2 ", 0, TIMEOUT);
    assert!(u1.contains("PROBE blk_verify ok 200"), "{u1}");
    assert!(!u1.contains("check bad"), "{u1}");
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the snapshot's disk changed: the records went elsewhere than its overlay"
    );
    let mark = std::fs::read_to_string(&log2).unwrap().len();
    wait_for_output(&log2, "PROBE churn tick", mark, TIMEOUT);
    assert!(!std::fs::read_to_string(&log2)
        .unwrap()
        .contains("check bad"));
    assert_eq!(
        std::fs::read_to_string(&log1)
            .unwrap()
            .matches("PROBE start")
            .count(),
        1
    );

    // A restarted daemon (a new keel installed, say) re-adopts the new VMM, and upgrades it
    // again: the jail identity's lock, held by the VMM alone now, goes on to the next one.
    let current = pid(&daemon, "u1");
    daemon.kill9();
    daemon.restart();
    assert_eq!(daemon.state("u1"), "running");
    assert_eq!(pid(&daemon, "u1"), current);
    daemon.ok(&["vm", "upgrade", "u1"]);
    assert_ne!(pid(&daemon, "u1"), current);
    assert_eq!(daemon.state("u1"), "running");
    let mark = std::fs::read_to_string(&log1).unwrap().len();
    wait_for_output(&log1, "PROBE churn tick", mark, TIMEOUT);

    // The ledger: each handover is a maintenance pause, counted by the SLA report.
    let rows = daemon.json(&["events", "--vm", "u1", "--limit", "40"]);
    let details: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["cause"].as_str().unwrap(),
                r["detail"].as_str().unwrap()
            )
        })
        .collect();
    let upgrades = details
        .iter()
        .filter(|d| d.starts_with("maintenance resumed in its new VMM"))
        .count();
    assert_eq!(upgrades, 5, "{details:#?}");
    assert!(
        details.iter().any(|d| d.contains("VMM upgraded: pid")),
        "{details:#?}"
    );
    let to = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    let report = daemon.json(&["sla", "report", "--from", &from, "--to", &to, "--vm", "u1"]);
    let vm = &report["vms"][0];
    // The five handovers and the snapshot's pause.
    assert_eq!(vm["outages"], 6, "{report}");
    assert!(
        vm["availability_percent"].as_f64().unwrap() < 100.0,
        "{report}"
    );

    daemon.ok(&["vm", "stop", "u1"]);
    daemon.ok(&["vm", "stop", "u2"]);
    assert!(daemon.vmm_pids().is_empty(), "{:?}", daemon.vmm_pids());
    let refused = daemon.fails(&["vm", "upgrade", "u1"]);
    assert!(
        refused.contains("only a running VM is upgraded"),
        "{refused}"
    );
}
