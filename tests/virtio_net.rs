//! The probe guest drives virtio-net under `keel run` against a real tap inside a network
//! namespace the test creates: the probe sends numbered frames, the test echoes each one back
//! from a packet socket on the tap, the probe checks every echo arrived.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const TAP: &str = "ktap0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Runs the probe with a NIC in a fresh namespace while the test echoes its frames; returns
/// the run and how many frames the host side echoed. None when no namespace can be made.
fn run_with_echo(test: &str, cmdline: &str) -> Option<(Run, usize)> {
    let ns = match netns::NetNs::new(test) {
        Ok(ns) => Arc::new(ns),
        Err(why) => {
            // CI runs as root: there a missing namespace is a failure, not a skip.
            if std::env::var("KEEL_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: cannot make a network namespace ({why})");
            }
            eprintln!("SKIPPED {test}: cannot make a network namespace ({why})");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ns, stop) = (ns.clone(), stop.clone());
        std::thread::spawn(move || netns::echo_frames(&ns, TAP, &stop))
    };
    let mut cmd = ns.command(KEEL);
    cmd.args(["run", "--kernel"]).arg(probe_elf()).args([
        "--net",
        "tap=ktap0,mac=52:54:00:12:34:56",
        "--cmdline",
        cmdline,
    ]);
    let run = run_with(cmd, None, Duration::from_secs(60), None);
    stop.store(true, Ordering::Release);
    let echoed = echo.join().expect("echo thread");
    Some((run, echoed))
}

#[test]
fn frames_echo_through_a_tap_in_a_namespace() {
    let test = "frames_echo_through_a_tap_in_a_namespace";
    if !kvm_available(test) {
        return;
    }
    let Some((run, echoed)) = run_with_echo(test, "probe.net_echo=16 probe.poweroff") else {
        return;
    };
    let ctx = run.context();
    let p = run.probe();
    let mac: Vec<String> = MAC.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(p["net0"], vec![format!("mac {}", mac.join(":"))], "{ctx}");
    assert_eq!(p["net_echo"], vec!["ok 16"], "{ctx}");
    assert!(echoed >= 16, "the host side echoed {echoed} frames\n{ctx}");
    assert_eq!(run.code(), Some(0), "{ctx}");
}

#[test]
fn nic_keeps_serving_after_garbage() {
    let test = "nic_keeps_serving_after_garbage";
    if !kvm_available(test) {
        return;
    }
    let Some((run, _)) = run_with_echo(test, "probe.garbage probe.net_echo=4 probe.poweroff")
    else {
        return;
    };
    let ctx = run.context();
    let p = run.probe();
    assert!(
        p["garbage"].contains(&"net0 recovered".to_string()),
        "{ctx}"
    );
    assert_eq!(p["net_echo"], vec!["ok 4"], "{ctx}");
    assert_eq!(run.code(), Some(0), "{ctx}");
}
