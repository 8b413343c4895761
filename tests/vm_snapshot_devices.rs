//! Snapshot and restore of a VM with every device type (a disk, a NIC on a tap in a network
//! namespace, an rng, a vsock device) and with its wall clock far from the host's: taken
//! during the probe's disk records, the snapshot is restored by a VMM whose clock says 2100
//! (faketime), and the guest goes on: its records all verify, then its rng, its NIC (frames
//! echoed through the tap) and its memory churn work.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use api::control::{files, Response};
use common::vmm::*;
use common::*;

const TAP: &str = "ktap0";
const RECORDS: u64 = 300;

fn vmm_in(
    ns: &netns::NetNs,
    dir: &RunDir,
    faketime: Option<&str>,
    restore: Option<&str>,
) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path(files::VMM_LOG))
        .unwrap();
    let mut cmd = match faketime {
        Some(at) => {
            let mut c = ns.command("faketime");
            c.args(["-f", at]).arg(KEEL);
            c
        }
        None => ns.command(KEEL),
    };
    cmd.args(["vmm", "--dir"]).arg(&dir.0);
    if let Some(name) = restore {
        cmd.args(["--restore", name]);
    }
    KillOnDrop(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel vmm"),
    )
}

#[test]
fn every_device_type_restores_and_the_date_does_not_matter() {
    let test = "every_device_type_restores_and_the_date_does_not_matter";
    if !kvm_available(test) {
        return;
    }
    let ns = match netns::NetNs::new("snapdev") {
        Ok(ns) => Arc::new(ns),
        Err(why) => {
            assert_ne!(
                std::env::var("KEEL_REQUIRE_KVM").as_deref(),
                Ok("1"),
                "{test}: cannot make a network namespace ({why})"
            );
            eprintln!("SKIPPED {test}: cannot make a network namespace ({why})");
            return;
        }
    };
    let scratch = ScratchDisk::new("snapdev", 16 << 20);
    let disk = &scratch.path;
    let mut spec = spec(
        "snapdev",
        &format!(
            "probe.blk_records={RECORDS} probe.blk_nodiscard probe.rng probe.net_echo=16 probe.churn=1M probe.churn_report_ms=200"
        ),
    );
    spec["memory_mib"] = 128.into();
    spec["disks"] = scratch.spec();
    spec["nets"] = serde_json::json!([{ "tap": TAP, "mac": "52:54:00:12:34:56" }]);
    spec["rng"] = true.into();
    spec["vsock"] = serde_json::json!({ "cid": 42 });
    let dir = RunDir::new("snapdev", &spec);

    // Taken by a VMM whose clock says 2026-ish (the host's), mid-way through the records.
    let mut child = vmm_in(&ns, &dir, None, None);
    let mut control = Control::connect(&dir);
    wait_until("the first records", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE acked 20\n")
    });
    make_snapshot_files(&dir, "s");
    let request = br#"{"request":"snapshot","name":"s","stay_paused":true}"#;
    assert!(matches!(control.ask(request), Response::Snapshot(_)));
    std::fs::copy(disk, scratch.dir.join("frozen.raw")).unwrap();
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    wait_exit(&mut child, &dir);
    std::fs::rename(scratch.dir.join("frozen.raw"), disk).unwrap();

    // Restored by a VMM whose clock says 2100.
    let mark = dir.read(files::CONSOLE_LOG).len();
    let mut restored = vmm_in(&ns, &dir, Some("@2100-06-01 12:00:00"), Some("s"));
    // The tap is the restored VMM's (the first one's went with it): echo on this one.
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ns, stop) = (ns.clone(), stop.clone());
        std::thread::spawn(move || netns::echo_frames(&ns, TAP, &stop))
    };
    // A tick, or a stall's check, comes only after every page checked good.
    wait_until("the restored guest's churn", &dir, || {
        let after = dir.read(files::CONSOLE_LOG)[mark..].to_string();
        after.contains("PROBE churn tick 1 ") || after.contains("PROBE churn check ok")
    });
    let after = dir.read(files::CONSOLE_LOG)[mark..].to_string();
    stop.store(true, Ordering::Release);
    let echoed = echo.join().expect("echo thread");
    assert!(!after.contains("PROBE start"), "it booted again: {after}");
    for expected in [
        format!("PROBE blk_verify ok {RECORDS}"),
        "PROBE rng ok".to_string(),
        "PROBE net_echo ok 16".to_string(),
    ] {
        assert!(
            after.contains(&expected),
            "no {expected:?} after the restore: {after}\n{}",
            dir.context()
        );
    }
    assert!(echoed >= 16, "the tap echoed {echoed} frames");
    assert!(!after.contains("check bad"), "{after}");
    let mut control = Control::connect(&dir);
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    wait_exit(&mut restored, &dir);
}
