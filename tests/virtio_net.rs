//! The probe guest drives virtio-net under `keel run` against a real tap inside a network
//! namespace the test creates: the probe sends numbered frames, the test echoes each one back
//! from a packet socket on the tap, the probe checks every echo arrived.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const TAP: &str = "ktap0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Echoes the probe's frames (payload "KEEL-PROBE i") back as "KEEL-ECHO i" until `stop`.
fn echo_frames(ns: &netns::NetNs, stop: &AtomicBool) -> usize {
    ns.enter();
    let start = Instant::now();
    let sock = loop {
        match netns::packet_socket(TAP) {
            Ok(s) => break s,
            Err(_)
                if start.elapsed() < Duration::from_secs(30) && !stop.load(Ordering::Acquire) =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("tap {TAP} never appeared: {e}"),
        }
    };
    let mut echoed = 0;
    while !stop.load(Ordering::Acquire) {
        let mut buf = [0u8; 2048];
        // SAFETY: recv into a live buffer of the given length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 14 || buf[12..14] != ETHERTYPE || !buf[14..n as usize].starts_with(b"KEEL-PROBE ") {
            continue;
        }
        let frame = &buf[..n as usize];
        let mut reply = Vec::with_capacity(frame.len());
        reply.extend_from_slice(&frame[6..12]);
        reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        reply.extend_from_slice(&ETHERTYPE);
        reply.extend_from_slice(b"KEEL-ECHO ");
        reply.extend_from_slice(&frame[14 + b"KEEL-PROBE ".len()..]);
        // SAFETY: send from a live buffer of the given length.
        let sent = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
        if sent == reply.len() as isize {
            echoed += 1;
        }
    }
    echoed
}

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
        std::thread::spawn(move || echo_frames(&ns, &stop))
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
