//! `keel serve` and the CLI, whole-system: real VMMs boot the probe guest on /dev/kvm, a real
//! SQLite store, real Unix sockets. Two VMs survive a `kill -9` of the daemon and are
//! re-adopted; a VMM killed behind the daemon's back becomes a crash and an incident; the
//! ledger verifies and the SLA report shows the crash; bad API input gets a 4xx.

mod common;

use std::io::{BufRead, Read};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;

const STATE_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn two_vms_survive_a_daemon_kill_and_the_ledger_verifies() {
    if !kvm_available("two_vms_survive_a_daemon_kill_and_the_ledger_verifies") {
        return;
    }
    let mut daemon = Daemon::start("two");
    let from = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    daemon.create_probe_vm("web", &[]);
    daemon.create_probe_vm("db", &["--cpus", "2", "--start"]);
    let started = daemon.ok(&["vm", "start", "web"]);
    assert!(started.starts_with("web: running"), "{started}");

    // Both run, each in its own VMM, and the table says so.
    let list = daemon.ok(&["vm", "list"]);
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(rows.iter().all(|r| r.contains(" running ")), "{list}");
    let pids_before = daemon.vmm_pids();
    assert_eq!(pids_before.len(), 2, "two VMMs: {pids_before:?}");
    let listed: Vec<u64> = daemon
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sorted(listed.iter().map(|p| *p as u32).collect()),
        pids_before
    );

    // The console: earlier output is in the scrollback log; a live attach shows what the
    // guest prints now (its power-button report) and closes when the VM ends.
    let web = daemon.json(&["vm", "show", "web"]);
    let log = web["console_log"].as_str().unwrap().to_string();
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("PROBE ready")
    {
        assert!(Instant::now() < deadline, "no PROBE ready in {log}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // kill -9 of the daemon: the VMs keep running, in the same VMMs.
    let daemon_pid = daemon.pid().unwrap();
    daemon.kill9();
    assert!(!std::path::Path::new(&format!("/proc/{daemon_pid}")).exists());
    assert_eq!(daemon.vmm_pids(), pids_before, "VMMs outlive the daemon");
    daemon.restart();
    assert_eq!(daemon.vmm_pids(), pids_before, "no duplicate VMMs");
    for vm in ["web", "db"] {
        let shown = daemon.json(&["vm", "show", vm]);
        assert_eq!(shown["state"], "running", "{shown}");
        assert!(pids_before.contains(&(shown["pid"].as_u64().unwrap() as u32)));
    }
    let events = daemon.ok(&["events", "--kind", "host"]);
    assert_eq!(
        events.matches("re-adopted running VMM").count(),
        2,
        "{events}"
    );
    let host = daemon.json(&["host"]);
    assert_eq!(host["health"], "ok", "{host}");

    // Attach to web's console, then shut web down: the guest's answer to the power
    // button arrives live, and the console closes when the VM ends.
    let mut console = Command::new(KEEL)
        .args(["vm", "console", "web"])
        .env("KEEL_API", daemon.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The client says it is attached once its socket is connected.
    // (Its stderr stays open until the end: a closed pipe would fail its last message.)
    let mut console_stderr = std::io::BufReader::new(console.stderr.take().unwrap());
    let mut attached = String::new();
    console_stderr.read_line(&mut attached).unwrap();
    assert!(attached.contains("attached to web's console"), "{attached}");
    let shut = daemon.ok(&["vm", "shutdown", "web", "--timeout", "20"]);
    assert!(shut.starts_with("web: stopped"), "{shut}");
    drop(console.stdin.take());
    let out = wait_output(console, Duration::from_secs(10));
    let mut rest = String::new();
    let _ = console_stderr.read_to_string(&mut rest);
    assert!(rest.contains("console closed"), "{rest}");
    assert!(
        out.contains("PROBE power_button"),
        "live console output: {out}"
    );

    // A VMM killed behind the daemon's back: crashed, cause vmm-crash, an incident.
    let db_pid = daemon.json(&["vm", "show", "db"])["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the VMM's pid, which the test just read and which is alive.
    unsafe { libc::kill(db_pid as i32, libc::SIGKILL) };
    daemon.wait_state("db", "crashed", STATE_TIMEOUT);
    let host = daemon.json(&["host"]);
    assert_eq!(host["health"], "degraded", "{host}");
    let incident = &host["incidents"][0];
    assert_eq!(incident["vm"], "db", "{host}");
    assert_eq!(incident["cause"], "vmm-crash", "{host}");
    // Re-adopted, the VMM is not the daemon's child: no wait status, but its pid is named.
    let summary = incident["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("VMM pid {db_pid}"))
            && summary.contains("without an exit record"),
        "{host}"
    );
    let text = daemon.ok(&["host"]);
    assert!(text.contains("open incidents"), "{text}");
    let id = incident["id"].as_i64().unwrap().to_string();
    daemon.ok(&["host", "ack", &id]);
    assert_eq!(daemon.json(&["host"])["health"], "ok");
    // A crashed VM starts again.
    daemon.ok(&["vm", "start", "db"]);
    daemon.ok(&["vm", "stop", "db"]);
    assert!(daemon.vmm_pids().is_empty());

    // The ledger verifies, and the SLA report shows db's crash as vmm-crash downtime.
    let verified = daemon.ok(&["ledger", "verify"]);
    assert!(verified.starts_with("ledger verified: "), "{verified}");
    let to = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    let report = daemon.json(&["sla", "report", "--from", &from, "--to", &to]);
    assert_eq!(report["ledger_verified"], true, "{report}");
    let vms = report["vms"].as_array().unwrap();
    let db = vms.iter().find(|v| v["vm"] == "db").unwrap();
    let web = vms.iter().find(|v| v["vm"] == "web").unwrap();
    assert_eq!(db["outages"], 1, "{report}");
    assert!(db["downtime_by_cause"]["vmm-crash"].as_f64().unwrap() > 0.0);
    assert!(db["availability_percent"].as_f64().unwrap() < 100.0);
    assert_eq!(web["availability_percent"], 100.0, "{report}");
    let table = daemon.ok(&["sla", "report", "--from", &from, "--to", &to]);
    assert!(
        table.contains("AVAILABILITY") && table.contains("db"),
        "{table}"
    );
    let csv = daemon.ok(&[
        "sla", "report", "--from", &from, "--to", &to, "--format", "csv",
    ]);
    assert!(csv.starts_with("vm,"), "{csv}");
    assert!(daemon.stop(), "SIGTERM ends the daemon cleanly");
}

#[test]
fn illegal_transitions_and_unknown_names_say_what_to_do() {
    if !kvm_available("illegal_transitions_and_unknown_names_say_what_to_do") {
        return;
    }
    let daemon = Daemon::start("illegal");
    assert!(daemon
        .fails(&["vm", "start", "ghost"])
        .contains("no VM named 'ghost'"));
    daemon.create_probe_vm("a", &[]);
    assert!(daemon
        .fails(&["vm", "create", "a", "--kernel", "/k"])
        .contains("already exists"));
    assert!(daemon
        .fails(&["vm", "stop", "a"])
        .contains("it is not running"));
    assert!(daemon
        .fails(&["vm", "shutdown", "a"])
        .contains("only a running VM"));
    daemon.ok(&["vm", "start", "a"]);
    assert!(daemon
        .fails(&["vm", "start", "a"])
        .contains("stop or shut it down first"));
    assert!(daemon.fails(&["vm", "rm", "a"]).contains("stop it first"));
    daemon.ok(&["vm", "reboot", "a"]);
    assert_eq!(daemon.state("a"), "running");
    daemon.ok(&["vm", "stop", "a"]);
    daemon.ok(&["vm", "rm", "a"]);
    assert!(daemon.fails(&["vm", "show", "a"]).contains("no VM named"));

    // A VM whose kernel is gone fails to start with the reason, and stays stopped.
    let kernel = daemon.images().join("kernel");
    std::fs::copy(probe_elf(), &kernel).unwrap();
    daemon.ok(&["vm", "create", "lost", "--kernel", kernel.to_str().unwrap()]);
    std::fs::remove_file(&kernel).unwrap();
    let err = daemon.fails(&["vm", "start", "lost"]);
    assert!(
        err.contains("could not start") && err.contains(kernel.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(daemon.state("lost"), "stopped");
    // The failure is on the front page, and its reason in the audit trail.
    let host = daemon.json(&["host"]);
    let failed = &host["failed_operations"][0];
    assert_eq!(failed["request"], "POST /vms/lost/start", "{host}");
    assert_eq!(failed["status"], 422, "{host}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(kernel.to_str().unwrap()),
        "{host}"
    );
    assert!(daemon.ok(&["host"]).contains("failed operations"));
    let audit = daemon.json(&["events", "--kind", "audit", "--vm", "lost"]);
    let last = audit.as_array().unwrap().last().unwrap()["detail"].clone();
    assert!(
        last.as_str()
            .unwrap()
            .contains("422 Unprocessable Entity: VM 'lost' could not start"),
        "{last}"
    );
    assert!(daemon
        .fails(&["vm", "create", "Bad/Name", "--kernel", "/k"])
        .contains("not allowed"));

    // Without a daemon the CLI says where it looked.
    let out = Command::new(KEEL)
        .args(["vm", "list"])
        .env("KEEL_API", "/nonexistent/api.sock")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach keel serve at /nonexistent/api.sock"),
        "{stderr}"
    );
}

/// One raw HTTP/1.1 request on the daemon's socket; the status and body.
fn raw_http(daemon: &Daemon, request: &str) -> (u16, String) {
    let answer = daemon.http(request);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: keel\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n")
}

#[test]
fn malformed_requests_get_a_4xx_with_a_message() {
    if !kvm_available("malformed_requests_get_a_4xx_with_a_message") {
        return;
    }
    let daemon = Daemon::start("malformed");
    let big = "x".repeat(3 << 20);
    let cases: Vec<(String, u16)> =
        vec![
        (post("/vms", "{not json"), 400),
        // Neither kernel nor disk: refused by the definition's checks.
        (post("/vms", r#"{"name":"a"}"#), 400),
        (post("/vms", r#"{"name":"a","kernel":7}"#), 422),
        (post("/vms", r#"{"name":"a","kernel":"/k","cpux":1}"#), 422),
        (post("/vms", r#"{"name":"../etc","kernel":"/k"}"#), 400),
        (post("/vms", r#"{"name":"a","kernel":"/k","cpus":0}"#), 400),
        (post("/vms", r#"{"name":"a","kernel":"/k","cpus":-1}"#), 422),
        (post("/vms", r#"{"name":"a","kernel":"/k","memory_mib":1e99}"#), 422),
        (post("/vms", r#"[1,2,3]"#), 422),
        (post("/vms", &big), 413),
        (
            "POST /vms HTTP/1.1\r\nhost: keel\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                .to_string(),
            415,
        ),
        (post("/vms/nobody/start", ""), 404),
        (post("/vms/nobody/shutdown?timeout_s=abc", ""), 400),
        (post("/incidents/notanumber/ack", ""), 400),
        (post("/incidents/999/ack", ""), 404),
        (get("/events?limit=-5"), 400),
        (get("/events?kind=bogus"), 400),
        (get("/sla?from=yesterday&to=today"), 400),
        (get("/sla?from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z"), 400),
        (get("/sla?from=2030-01-01T00:00:00Z&to=2030-01-02T00:00:00Z&credits=x"), 400),
        (get("/no/such/path"), 404),
        (post("/tokens", r#"{"name":"t","role":"god"}"#), 422),
        (post("/tokens", r#"{"name":"t","role":"viewer","expires":"soon"}"#), 400),
    ];
    for (request, want) in &cases {
        let (status, body) = raw_http(&daemon, request);
        let shown: String = request.chars().take(100).collect();
        assert_eq!(status, *want, "{shown:?} -> {status} {body}");
        {
            let parsed: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{shown:?}: body is not JSON ({e}): {body}"));
            assert!(
                parsed["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{shown:?}: {body}"
            );
        }
    }
    // Garbage that is not HTTP at all: the connection is dropped, the daemon lives on.
    let (status, _) = raw_http(&daemon, "\x00\x01\x02 garbage\r\n\r\n");
    assert!(status == 400 || status == 0, "{status}");
    let (status, body) = raw_http(&daemon, &get("/"));
    assert_eq!(status, 200, "{body}");
    // Every refused mutation is in the audit trail too.
    let audit = daemon.ok(&["events", "--kind", "audit", "--limit", "100"]);
    assert!(audit.contains("POST /vms/nobody/start"), "{audit}");
    assert!(audit.contains("404"), "{audit}");

    let (status, doc) = raw_http(&daemon, &get("/openapi.json"));
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/",
        "/vms",
        "/vms/{name}/shutdown",
        "/events",
        "/sla",
        "/ledger/verify",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from OpenAPI"
        );
    }
}

#[test]
fn a_host_reboot_is_recorded_and_autostart_vms_start() {
    if !kvm_available("a_host_reboot_is_recorded_and_autostart_vms_start") {
        return;
    }
    let boot_id = std::env::temp_dir().join(format!("kd-boot-id-{}", std::process::id()));
    std::fs::write(&boot_id, "first-boot\n").unwrap();
    let boot_env = [("KEEL_BOOT_ID_FILE", boot_id.to_str().unwrap())];
    let mut daemon = Daemon::start_with("reboot", &[], &[], &boot_env);
    daemon.create_probe_vm("auto", &["--autostart", "--start"]);
    daemon.create_probe_vm("manual", &["--start"]);
    // The host "reboots": every VMM dies with it, and the boot id changes.
    daemon.kill9();
    for pid in daemon.vmm_pids() {
        // SAFETY: kill(2) on a VMM pid just read from /proc.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + STATE_TIMEOUT;
    while !daemon.vmm_pids().is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&boot_id, "second-boot\n").unwrap();
    daemon.restart();
    assert_eq!(
        daemon.state("auto"),
        "running",
        "autostart after a host boot"
    );
    assert_eq!(daemon.state("manual"), "crashed");
    let events = daemon.json(&["events", "--vm", "manual", "--kind", "state"]);
    let last = events.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "host-boot", "{events}");
    let auto = daemon.json(&["events", "--vm", "auto", "--kind", "state"]);
    let causes: Vec<&str> = auto
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap())
        .collect();
    assert!(
        causes.ends_with(&["host-boot", "host-boot", "host-boot"]),
        "crashed, starting, running: {causes:?}"
    );
    // A daemon restart on the same boot does not autostart a VM an operator stopped.
    daemon.ok(&["vm", "stop", "auto"]);
    daemon.kill9();
    daemon.restart();
    assert_eq!(daemon.state("auto"), "stopped");
    let _ = std::fs::remove_file(&boot_id);
}

/// The VM's state rows after `seq`, oldest first: (to, cause, actor, detail).
fn state_rows_after(daemon: &Daemon, vm: &str, seq: i64) -> Vec<(String, String, String, String)> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    daemon
        .json(&["events", "--vm", vm, "--kind", "state", "--limit", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["seq"].as_i64().unwrap() > seq)
        .map(|e| {
            (
                text(&e["to"]),
                text(&e["cause"]),
                text(&e["actor"]),
                text(&e["detail"]),
            )
        })
        .collect()
}

fn last_seq(daemon: &Daemon) -> i64 {
    daemon.json(&["events", "--limit", "1"])[0]["seq"]
        .as_i64()
        .unwrap()
}

fn vm_pid(daemon: &Daemon, vm: &str) -> Option<u32> {
    daemon.json(&["vm", "show", vm])["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// An operator's reboot is a stop and a start, both the operator's, in the ledger; and it
/// survives a `kill -9` of the daemon in its middle: the restarted daemon finishes it, the
/// VM runs again on a new VMM, and the ledger still shows the operator's stop and start.
#[test]
fn an_operators_reboot_survives_a_daemon_killed_in_its_middle() {
    if !kvm_available("an_operators_reboot_survives_a_daemon_killed_in_its_middle") {
        return;
    }
    let mut daemon = Daemon::start("rebootkill");
    daemon.create_probe_vm("a", &["--start"]);
    let actor = daemon.json(&["events", "--vm", "a", "--kind", "state", "--limit", "1"])[0]
        ["actor"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(actor.starts_with("uid:"), "{actor}");
    let operator = |to: &str| (to.to_string(), "operator".to_string(), actor.clone());
    let without_detail = |rows: &[(String, String, String, String)]| {
        rows.iter()
            .map(|(to, cause, actor, _)| (to.clone(), cause.clone(), actor.clone()))
            .collect::<Vec<_>>()
    };
    // After a restart: VM a runs in a VMM other than `old`, the only one, and the ledger
    // shows the operator's reboot (stopped, starting, running) after row `seq`.
    let reboot_finished = |daemon: &Daemon, old: u32, seq: i64, what: &str| {
        assert!(
            daemon.state("a") == "running" && vm_pid(daemon, "a").is_some_and(|p| p != old),
            "{what}: VM a is {} (pid {:?}, the old VMM was {old}):\n{}",
            daemon.state("a"),
            vm_pid(daemon, "a"),
            daemon.ok(&["events", "--limit", "30"])
        );
        let rows = state_rows_after(daemon, "a", seq);
        assert_eq!(
            without_detail(&rows),
            [
                operator("stopped"),
                operator("starting"),
                operator("running")
            ],
            "{rows:#?}"
        );
        assert_eq!(rows[0].3, "rebooted by the operator", "{rows:#?}");
        assert_eq!(daemon.vmm_pids(), vec![vm_pid(daemon, "a").unwrap()]);
    };

    // Undisturbed: one stop, one start, nothing started twice.
    let first = vm_pid(&daemon, "a").unwrap();
    let seq = last_seq(&daemon);
    daemon.ok(&["vm", "reboot", "a"]);
    reboot_finished(&daemon, first, seq, "the reboot did not happen");
    let old = vm_pid(&daemon, "a").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !daemon.log().contains("after its reboot failed"),
        "{}",
        daemon.log()
    );

    // The VMM is frozen, so the next reboot's Stop waits in its control socket; the daemon is
    // killed once it has stored what it is doing, before the VMM ends.
    // SAFETY: kill(2) on the VMM's pid, alive: the daemon shows it running.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGSTOP) }, 0);
    let seq = last_seq(&daemon);
    let mut reboot = daemon.spawn(&["vm", "reboot", "a"]);
    let db = rusqlite::Connection::open(daemon.state_dir.join("keel.db")).unwrap();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let intent: Option<String> = db
            .query_row("SELECT stop_intent FROM vms WHERE name = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        if intent.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the reboot never began");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(db);
    // Time to write the Stop to the socket. Had it not, the restarted daemon finds the VMM
    // still running and stops it itself: the reboot is finished all the same.
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill9();
    let _ = reboot.wait();
    // SAFETY: as above; the VMM was stopped, not ended, so the pid is still its own.
    assert_eq!(unsafe { libc::kill(old as i32, libc::SIGCONT) }, 0);
    // The VMM takes the Stop that waited for it and ends while no daemon runs.
    let deadline = Instant::now() + STATE_TIMEOUT;
    while daemon.vmm_pids().contains(&old) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Recovery finishes the reboot before the API opens.
    daemon.restart();
    reboot_finished(&daemon, old, seq, "the reboot was lost");

    // Killed earlier still: the reboot's intent stored, its Stop not yet sent (the store as
    // the daemon leaves it then). The restarted daemon re-adopts the VMM and finishes the
    // reboot itself.
    let old = vm_pid(&daemon, "a").unwrap();
    daemon.kill9();
    let seq = store_operator_intent(&daemon, "a", &actor, "rebooted by the operator", true);
    // Recovery finishes the reboot before the API opens.
    daemon.restart();
    reboot_finished(
        &daemon,
        old,
        seq,
        "the re-adopted VMM's reboot was not finished",
    );

    // The same for a plain stop: its intent stored, its Stop never sent. The restarted daemon
    // finishes it rather than leave the VM running against the operator's word (and a later
    // guest power-off recorded as that stop).
    daemon.kill9();
    let seq = store_operator_intent(&daemon, "a", &actor, "stopped by the operator", false);
    daemon.restart();
    assert_eq!(
        daemon.state("a"),
        "stopped",
        "the operator's stop was not finished:\n{}",
        daemon.ok(&["events", "--limit", "30"])
    );
    let rows = state_rows_after(&daemon, "a", seq);
    assert_eq!(without_detail(&rows), [operator("stopped")], "{rows:#?}");
    assert_eq!(rows[0].3, "stopped by the operator", "{rows:#?}");
    assert!(daemon.vmm_pids().is_empty());
    let verified = daemon.ok(&["ledger", "verify"]);
    assert!(verified.starts_with("ledger verified: "), "{verified}");
}

/// Writes an operator's stop intent for `vm` into the store of a daemon that is down, as a
/// daemon killed just after storing it (before its Stop reached the VMM) leaves it; returns
/// the ledger's last sequence number.
fn store_operator_intent(
    daemon: &Daemon,
    vm: &str,
    actor: &str,
    detail: &str,
    restart: bool,
) -> i64 {
    let db = rusqlite::Connection::open(daemon.state_dir.join("keel.db")).unwrap();
    let intent = serde_json::json!({
        "cause": "operator",
        "actor": actor,
        "detail": detail,
        "restart": restart,
        "killed": false,
    });
    db.execute(
        "UPDATE vms SET stop_intent = ?1 WHERE name = ?2",
        [intent.to_string(), vm.to_string()],
    )
    .unwrap();
    db.query_row("SELECT MAX(seq) FROM ledger", [], |r| r.get::<_, i64>(0))
        .unwrap()
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort();
    v
}

/// Collects a child's stdout, killing it if it has not ended by the deadline.
fn wait_output(mut child: std::process::Child, limit: Duration) -> String {
    wait_or_kill(&mut child, limit);
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    out
}

#[test]
fn a_daemon_vm_gets_its_disk_limits_rng_and_vsock() {
    if !kvm_available("a_daemon_vm_gets_its_disk_limits_rng_and_vsock") {
        return;
    }
    // A descriptor the daemon inherits without close-on-exec must not reach its VMMs.
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let stray = std::fs::read_link(format!("/proc/self/fd/{}", fds[0])).unwrap();
    let daemon = Daemon::start("devices");
    // SAFETY: closes the two descriptors pipe(2) just made; nothing else uses them.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let image = daemon.images().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={},serial=data1,bw=10M,iops=1000", image.display());
    // `keel events --follow --json` prints the new rows as they are recorded.
    let mut follower = Command::new(KEEL)
        .args(["events", "--follow", "--json", "--limit", "0"])
        .env("KEEL_API", daemon.socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let follow_out = std::io::BufReader::new(follower.stdout.take().unwrap());
    daemon.create_probe_vm(
        "dev",
        &["--disk", &disk, "--rng", "--vsock-cid", "42", "--start"],
    );
    let shown = daemon.json(&["vm", "show", "dev"]);
    assert_eq!(shown["state"], "running", "{shown}");
    let mut seen = Vec::new();
    for line in follow_out.lines() {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let running = event["vm"] == "dev" && event["to"] == "running";
        seen.push(event);
        if running {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let kinds: Vec<&str> = seen.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"state") && kinds.contains(&"audit"),
        "{seen:?}"
    );
    let limits = &shown["spec"]["disks"][0]["limits"];
    assert_eq!(limits["bw"], 10_000_000, "{shown}");
    assert_eq!(limits["iops"], 1000, "{shown}");
    assert_eq!(shown["spec"]["vsock"]["cid"], 42, "{shown}");
    // The VMM serves the vsock device's host side where the API says.
    let vsock = shown["vsock_socket"].as_str().unwrap();
    assert!(UnixStream::connect(vsock).is_ok(), "{vsock}");
    // The guest found three virtio devices (disk, rng, vsock) in its DSDT.
    let log = shown["console_log"].as_str().unwrap().to_string();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("PROBE ready") {
            assert!(text.contains("PROBE virtio_devices 3"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no PROBE ready: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmm = shown["pid"].as_u64().unwrap();
    let daemon_pid = daemon.pid().unwrap();
    let links = |pid: u64| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect()
    };
    assert!(
        links(u64::from(daemon_pid)).contains(&stray),
        "the daemon inherited the pipe"
    );
    assert!(
        !links(vmm).contains(&stray),
        "the VMM must not: {:?}",
        links(vmm)
    );
    let text = daemon.ok(&["vm", "show", "dev"]);
    assert!(text.contains("bw 10000000B/s, iops 1000/s"), "{text}");
    assert!(text.contains("guest CID 42"), "{text}");
    daemon.ok(&["vm", "stop", "dev"]);
}

#[test]
fn a_cli_whose_reader_went_away_ends_quietly() {
    if !kvm_available("a_cli_whose_reader_went_away_ends_quietly") {
        return;
    }
    let daemon = Daemon::start("closedpipe");
    daemon.create_probe_vm("a", &[]);
    for args in [&["events"][..], &["vm", "list"], &["host"]] {
        // stdout is a pipe whose reader is already gone: the first write fails (EPIPE).
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two-element array with new descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: closes the read end this test owns; the write end becomes the child's stdout.
        unsafe { libc::close(fds[0]) };
        // SAFETY: fds[1] is an open descriptor owned by nothing else.
        let stdout =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let out = Command::new(KEEL)
            .args(args)
            .env("KEEL_API", daemon.socket())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "keel {args:?}: {stderr}");
        // 141: what a shell shows for a tool ended by SIGPIPE.
        assert_eq!(out.status.code(), Some(141), "keel {args:?}: {stderr}");
    }
}
