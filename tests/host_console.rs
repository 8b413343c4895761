//! The serial console through the API, whole-system: `keel serve --listen` on TCP (TLS), a probe VM
//! on /dev/kvm, and `keel vm console` attaching over TCP with API tokens. An operator token
//! attaches and sees the guest's power-button report live while the VM shuts down, and the
//! console closes when the VM ends; Ctrl-A x detaches and leaves the VM running; a viewer
//! token is refused (403); an unknown VM is a 404 and a stopped one a 409; every attach,
//! allowed or refused, is an audit event with who and from where.
//!
//! Not observed here: that the client's bytes reach the guest's serial input. The probe guest
//! does not read its serial port, so nothing in the guest can show them. The path is checked
//! in two halves instead: the daemon's bridge delivers a client's WebSocket bytes to the
//! console socket (`host::console` unit tests), and the VMM delivers the console socket's
//! bytes to the serial input (`vmm::console_socket` unit tests).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::{free_port, Daemon};
use common::*;

const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// `keel vm console NAME` with the given API environment, stdin, stdout and stderr piped.
fn console(name: &str, env: &[(&str, &str)]) -> Child {
    Command::new(KEEL)
        .args(["vm", "console", name])
        .env_remove("KEEL_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel vm console")
}

/// Everything a reader yields, collected on a thread, so a test can wait for a line.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<String>>);

impl Collected {
    fn from(mut reader: impl Read + Send + 'static) -> Collected {
        let collected = Collected::default();
        let sink = collected.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        collected
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.text().contains(what) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

#[test]
fn the_console_over_tcp_needs_an_operator_and_is_audited() {
    if !kvm_available("the_console_over_tcp_needs_an_operator_and_is_audited") {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with("console", &[], &["--listen", &listen], &[]);
    let (api, fingerprint) = daemon.https(&listen);
    let client_config = daemon.client_config();
    let client_config = client_config.to_str().unwrap();
    let operator = daemon
        .ok(&["token", "create", "ops", "--role", "operator"])
        .trim()
        .to_string();
    let viewer = daemon
        .ok(&["token", "create", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    // Over TLS, the certificate pinned by its fingerprint: the console's WebSocket included.
    let as_operator = [
        ("KEEL_API", api.as_str()),
        ("KEEL_TOKEN", operator.as_str()),
        ("KEEL_FINGERPRINT", fingerprint.as_str()),
        ("KEEL_CLIENT_CONFIG", client_config),
    ];
    let as_viewer = [
        ("KEEL_API", api.as_str()),
        ("KEEL_TOKEN", viewer.as_str()),
        ("KEEL_FINGERPRINT", fingerprint.as_str()),
        ("KEEL_CLIENT_CONFIG", client_config),
    ];

    daemon.create_probe_vm("web", &["--start"]);
    let log = daemon.json(&["vm", "show", "web"])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("PROBE power_button waiting")
    {
        assert!(
            Instant::now() < deadline,
            "the probe does not wait for its power button: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A viewer may read the VM but not take its console. (The TCP listener may come up a
    // moment after the Unix socket the harness waits for.)
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let out = daemon.keel_env(&["vm", "show", "web"], &as_viewer);
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains("cannot reach keel serve") && Instant::now() < deadline,
            "{stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Spawned with a deadline: an attach that got through would wait for the VM to end.
    let mut viewing = console("web", &as_viewer);
    drop(viewing.stdin.take());
    let status = wait_or_kill(&mut viewing, Duration::from_secs(10));
    let mut refused = String::new();
    viewing
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut refused)
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "a viewer token was not refused: {refused}"
    );
    assert!(
        refused.starts_with("keel: error: ") && refused.contains("HTTP 403"),
        "{refused}"
    );
    assert!(refused.contains("needs operator"), "{refused}");
    assert!(!refused.contains("attached"), "{refused}");

    // Unknown VM: 404 with the daemon's message.
    let out = daemon.keel_env(&["vm", "console", "nope"], &as_operator);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("HTTP 404"), "{stderr}");

    // Ctrl-A x detaches; the VM keeps running.
    let mut first = console("web", &as_operator);
    let mut first_err = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    first_err.read_line(&mut line).unwrap();
    assert!(line.contains("attached to web's console"), "{line}");
    let mut stdin = first.stdin.take().unwrap();
    // Bytes for the guest (the waiting probe reports each as `PROBE serial_in`), then the
    // escape, which the client keeps for itself.
    stdin.write_all(b"hello guest\r\x01x").unwrap();
    let status = wait_or_kill(&mut first, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "Ctrl-A x did not detach: {status:?}"
    );
    let mut rest = String::new();
    first_err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("detached from web's console"), "{rest}");
    assert_eq!(daemon.state("web"), "running");
    // The typed bytes reached the guest's serial port, in order, through the API, the
    // daemon, the VMM's console socket and the 8250's receive interrupt.
    let log = daemon.json(&["vm", "show", "web"])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let typed: Vec<String> = b"hello guest\r"
        .iter()
        .map(|b| format!("PROBE serial_in {b:#x}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let received: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("PROBE serial_in"))
            .collect();
        if received == typed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest received {received:?}, not {typed:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Attached with the operator token, the power button's answer arrives live, and the
    // console closes when the VM ends. stdin ends at once: output keeps coming.
    let mut second = console("web", &as_operator);
    let out = Collected::from(second.stdout.take().unwrap());
    let err = Collected::from(second.stderr.take().unwrap());
    assert!(
        err.wait_for("attached to web's console", STATE_TIMEOUT),
        "{}",
        err.text()
    );
    drop(second.stdin.take());
    let shut = daemon.keel_env(&["vm", "shutdown", "web", "--timeout", "20"], &as_operator);
    assert!(
        shut.status.success(),
        "{}",
        String::from_utf8_lossy(&shut.stderr)
    );
    assert!(
        out.wait_for("PROBE power_button pressed", STATE_TIMEOUT),
        "live console output: {}",
        out.text()
    );
    let status = wait_or_kill(&mut second, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the console did not end with the VM: {status:?}; stderr: {}",
        err.text()
    );
    assert!(
        err.wait_for("console closed", Duration::from_secs(5)),
        "{}",
        err.text()
    );
    assert_eq!(daemon.state("web"), "stopped");

    // No VMM, no console: 409.
    let out = daemon.keel_env(&["vm", "console", "web"], &as_operator);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("HTTP 409") && stderr.contains("start it first"),
        "{stderr}"
    );

    // Every attach is in the audit trail: who, from where, and the answer.
    let audit = daemon.json(&["events", "--kind", "audit", "--vm", "web", "--limit", "100"]);
    let rows: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .filter(|(_, detail)| detail.starts_with("GET /vms/web/console from tcp 127.0.0.1:"))
        .collect();
    // A refusal's reason follows its status in the row.
    let with = |status: &str| rows.iter().filter(|(_, d)| d.contains(status)).count();
    assert_eq!(with(": 101 Switching Protocols"), 2, "{rows:?}");
    assert!(
        rows.iter()
            .filter(|(_, d)| d.ends_with(": 101 Switching Protocols"))
            .all(|(actor, _)| actor == "token:ops"),
        "{rows:?}"
    );
    assert_eq!(
        with(": 403 Forbidden: token 'watcher' has role viewer"),
        1,
        "{rows:?}"
    );
    assert_eq!(with(": 409 Conflict: VM 'web' is stopped"), 1, "{rows:?}");
    let text = daemon.ok(&["events", "--kind", "audit"]);
    assert!(text.contains("GET /vms/web/console"), "{text}");
}
