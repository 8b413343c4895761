//! `keel vmm --dir RUN_DIR` as the host daemon uses it: the probe guest boots from vm.json,
//! its console reaches console.sock and console.log, the control socket answers status,
//! presses the power button and stops the VM, SIGTERM stops it too, and every end leaves an
//! exit.json (except SIGKILL, which leaves none: that is how the daemon tells a VMM crash).

mod common;

use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};

use api::control::{files, ExitReason, Response};
use common::vmm::*;
use common::*;

#[test]
fn power_button_over_the_control_socket_powers_the_probe_off() {
    if !kvm_available("power_button_over_the_control_socket_powers_the_probe_off") {
        return;
    }
    let dir = RunDir::new("button", &spec("button-vm", "probe.power_button"));
    let mut child = start(&dir);
    // The sockets exist before the vCPUs start; a client attached then sees the whole boot,
    // but this one may attach a little later, so only what follows is checked on it.
    let console = Console::attach(&dir);
    let mut control = Control::connect(&dir);
    let status = control.status();
    assert_eq!(status.name, "button-vm");
    assert_eq!(status.pid, child.id());
    assert!(status.running);
    assert_eq!(status.power_button_presses, 0);
    // The probe must be listening before the button is pressed: an edge on a masked pin is lost.
    wait_until("the probe to wait for the button", &dir, || {
        dir.read(files::CONSOLE_LOG)
            .contains("PROBE power_button waiting")
    });
    assert_eq!(
        control.ask(br#"{"request":"power-button"}"#),
        Response::Done
    );
    let status = wait_exit(&mut child, &dir);
    assert_eq!(status.code(), Some(0), "{}", dir.context());
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::PowerOff, "{record:?}");
    assert_eq!(record.detail, "guest powered off");
    assert!(record.time_ms > 0);
    assert!(dir.sockets_gone(), "sockets left behind");
    let log = dir.read(files::CONSOLE_LOG);
    for line in [
        "PROBE start",
        "PROBE power_button waiting",
        "PROBE power_button pressed",
    ] {
        assert!(log.contains(line), "console.log lacks {line}\n{log}");
    }
    wait_until("the console client to see the press", &dir, || {
        console.text().contains("PROBE power_button pressed")
    });
    assert!(dir
        .read(files::VMM_LOG)
        .contains("power button pressed (control socket)"));
}

/// Starts an idle probe and waits until it has reported everything.
fn idle_vm(tag: &str) -> (RunDir, Child) {
    let dir = RunDir::new(tag, &spec(tag, ""));
    let child = start(&dir);
    wait_until("the probe's report", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE ready")
    });
    (dir, child)
}

#[test]
fn stop_request_and_sigterm_stop_the_vm() {
    if !kvm_available("stop_request_and_sigterm_stop_the_vm") {
        return;
    }
    let (dir, mut child) = idle_vm("stop");
    let mut control = Control::connect(&dir);
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(0));
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::Stopped);
    assert_eq!(record.detail, "stopped through the control socket");
    assert!(dir.sockets_gone());

    let (dir, mut child) = idle_vm("term");
    let _console = Console::attach(&dir);
    // SAFETY: sends SIGTERM to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(
        wait_exit(&mut child, &dir).code(),
        Some(0),
        "{}",
        dir.context()
    );
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::Stopped);
    assert_eq!(record.detail, "stopped by SIGTERM");
    assert!(dir.sockets_gone());
}

#[test]
fn garbage_gets_an_error_and_the_connection_stays_usable() {
    if !kvm_available("garbage_gets_an_error_and_the_connection_stays_usable") {
        return;
    }
    let (dir, mut child) = idle_vm("garbage");
    let mut control = Control::connect(&dir);
    for garbage in [
        &b"hello"[..],
        br#"{"request":"reboot"}"#,
        b"\xff\xfe{",
        br#"{"request":"status""#,
    ] {
        match control.ask(garbage) {
            Response::Error { message } => assert!(message.contains("not a request"), "{message}"),
            other => panic!("{garbage:?} answered {other:?}"),
        }
    }
    assert_eq!(control.status().pid, child.id());
    // Several requests in one write are answered in order.
    control
        .stream
        .write_all(b"{\"request\":\"status\"}\nnope\n{\"request\":\"status\"}\n")
        .unwrap();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        control.reader.read_line(&mut line).unwrap();
        kinds.push(match serde_json::from_str::<Response>(&line).unwrap() {
            Response::Status(_) => "status",
            Response::Error { .. } => "error",
            _ => "other",
        });
    }
    assert_eq!(kinds, ["status", "error", "status"]);

    // A line past 64 KiB gets an error, then the connection closes; others are unharmed.
    let mut flood = Control::connect(&dir);
    let long = vec![b'x'; 70 * 1024];
    let _ = flood.stream.write_all(&long);
    let mut line = String::new();
    flood.reader.read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
    line.clear();
    assert_eq!(flood.reader.read_line(&mut line).unwrap(), 0, "not closed");
    assert!(control.status().running);

    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(0));
}

#[test]
fn a_bad_definition_fails_with_exit_1_and_a_record() {
    // No KVM needed: the definition is refused before /dev/kvm is opened.
    let missing = "/nonexistent/keel-test/vmlinux";
    let dir = RunDir::new(
        "badspec",
        &serde_json::json!({"name": "bad", "kernel": missing}),
    );
    // Leftovers of an earlier run must not survive or confuse it.
    std::fs::write(dir.path(files::EXIT_RECORD), "stale").unwrap();
    let mut child = start(&dir);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(1));
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::Failed);
    assert!(record.detail.contains(missing), "{record:?}");
    assert!(dir.sockets_gone());
    assert!(dir.read(files::VMM_LOG).contains(missing));

    std::fs::write(dir.path(files::SPEC), "{\"name\":").unwrap();
    let mut child = start(&dir);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(1));
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::Failed);
    assert!(record.detail.contains("vm.json"), "{record:?}");

    std::fs::write(
        dir.path(files::SPEC),
        serde_json::json!({"name": "Bad Name", "kernel": "/k"}).to_string(),
    )
    .unwrap();
    let mut child = start(&dir);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(1));
    assert!(dir.exit_record().detail.contains("'Bad Name'"));
}

#[test]
fn sigkill_leaves_no_record_and_the_next_vmm_starts_clean() {
    if !kvm_available("sigkill_leaves_no_record_and_the_next_vmm_starts_clean") {
        return;
    }
    let (dir, mut child) = idle_vm("kill");
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        !dir.path(files::EXIT_RECORD).exists(),
        "a killed VMM must leave no exit.json"
    );
    assert!(
        dir.path(files::CONTROL_SOCKET).exists(),
        "the dead VMM's socket file stays (nobody removed it)"
    );
    // The next VMM in the same directory replaces the stale sockets and record.
    std::fs::write(dir.path(files::EXIT_RECORD), "stale").unwrap();
    let log_before = dir.read(files::CONSOLE_LOG).len();
    let mut child = start(&dir);
    let mut control = Control::connect(&dir);
    assert_eq!(control.status().pid, child.id());
    assert!(
        !dir.path(files::EXIT_RECORD).exists(),
        "stale exit.json kept"
    );
    wait_until("the second boot's report", &dir, || {
        dir.read(files::CONSOLE_LOG)[log_before..].contains("PROBE ready")
    });
    assert!(
        dir.read(files::CONSOLE_LOG)[..log_before].contains("PROBE ready"),
        "console.log keeps the earlier boot"
    );
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(0));
}

#[test]
fn a_second_vmm_on_a_live_directory_is_refused() {
    if !kvm_available("a_second_vmm_on_a_live_directory_is_refused") {
        return;
    }
    let (dir, mut child) = idle_vm("twice");
    let second = Command::new(KEEL)
        .args(["vmm", "--dir"])
        .arg(&dir.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already answers"));
    assert!(
        !dir.path(files::EXIT_RECORD).exists(),
        "the refused VMM must not write the live one's exit.json"
    );
    let mut control = Control::connect(&dir);
    assert_eq!(control.status().pid, child.id());
    assert_eq!(control.ask(br#"{"request":"stop"}"#), Response::Done);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(0));
}

#[test]
fn reboot_and_crash_are_recorded_with_keel_runs_exit_codes() {
    if !kvm_available("reboot_and_crash_are_recorded_with_keel_runs_exit_codes") {
        return;
    }
    let dir = RunDir::new("reboot", &spec("reboot", "probe.reboot"));
    let mut child = start(&dir);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(0));
    assert_eq!(dir.exit_record().reason, ExitReason::Reboot);
    assert!(dir.sockets_gone());

    let dir = RunDir::new("crash", &spec("crash", "probe.triplefault"));
    let mut child = start(&dir);
    assert_eq!(wait_exit(&mut child, &dir).code(), Some(3));
    let record = dir.exit_record();
    assert_eq!(record.reason, ExitReason::GuestCrash);
    assert!(
        record.detail.contains("triple fault on vCPU 0"),
        "{record:?}"
    );
    assert!(dir.sockets_gone());
}
