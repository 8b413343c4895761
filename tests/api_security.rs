//! The API tried as an attacker on the network and on the host would, whole-system: TLS by
//! default with the certificate pinned by the CLI, unauthenticated floods and idle
//! connections, the Unix socket's mode and local users' roles, and whole-ledger reads that
//! must not hold up a VM's start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{free_port, Daemon};
use common::{kvm_available, KEEL};

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One plain HTTP/1.1 request on a new connection; the whole answer as text.
fn http(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn tls_is_the_default_and_the_cli_pins_the_certificate() {
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with("tls", &[], &["--listen", &listen], &[]);
    let (api, fingerprint) = daemon.https(&listen);
    assert!(
        daemon.log().contains(&fingerprint),
        "keel serve prints the fingerprint:\n{}",
        daemon.log()
    );
    let token = daemon
        .ok(&["token", "create", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    let as_viewer = |extra: &[(&str, &str)]| {
        let mut env = vec![("KEEL_API", api.as_str()), ("KEEL_TOKEN", token.as_str())];
        env.extend_from_slice(extra);
        daemon.keel_env(&["vm", "list"], &env)
    };

    // Nothing trusted yet: refused, with the fingerprint to check.
    let first = as_viewer(&[]);
    assert!(!first.status.success());
    let said = stderr_of(&first);
    assert!(
        said.contains("not trusted yet") && said.contains(&fingerprint),
        "{said}"
    );
    // A wrong fingerprint: refused, with what was expected and what was seen.
    let wrong = format!(
        "{}{}",
        if fingerprint.starts_with('0') {
            "1"
        } else {
            "0"
        },
        &fingerprint[1..]
    );
    let refused = as_viewer(&[("KEEL_FINGERPRINT", wrong.as_str())]);
    assert!(!refused.status.success());
    let said = stderr_of(&refused);
    assert!(
        said.contains(&format!("expected fingerprint {wrong}"))
            && said.contains(&format!("saw {fingerprint}")),
        "{said}"
    );
    // The right one (typed without colons, in lower case): works, and is remembered.
    let typed = fingerprint.replace(':', "").to_lowercase();
    let pinned = as_viewer(&[("KEEL_FINGERPRINT", typed.as_str())]);
    assert!(pinned.status.success(), "{}", stderr_of(&pinned));
    let remembered = std::fs::read_to_string(daemon.client_config()).unwrap();
    assert!(remembered.contains(&fingerprint), "{remembered}");
    let later = as_viewer(&[]);
    assert!(later.status.success(), "{}", stderr_of(&later));

    // The port does not speak HTTP in clear.
    let clear = http(
        &listen,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(!clear.contains("HTTP/1.1 "), "plain HTTP answered: {clear}");

    // Plain HTTP off loopback is refused at start, saying why.
    let state = std::env::temp_dir().join(format!("kd-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let wide = Command::new(KEEL)
        .args(["serve", "--insecure-http", "--listen"])
        .arg(format!("0.0.0.0:{}", free_port()))
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = stderr_of(&wide);
    assert!(
        !wide.status.success() && said.contains("only served on a loopback address"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// A daemon serving TLS on `listen` with the operator's certificate and key.
fn daemon_with_certificate(tag: &str, listen: &str, cert: &Path, key: &Path) -> Daemon {
    Daemon::start_with(
        tag,
        &[],
        &[
            "--listen",
            listen,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn an_operators_ca_signed_certificate_is_trusted_through_the_ca_file() {
    let dir = std::env::temp_dir().join(format!("kd-cafiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A CA of the operator's and a certificate for 127.0.0.1 it signed.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (ca_file, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();

    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = daemon_with_certificate("ca", &listen, &cert, &key);
    let (api, _) = daemon.https(&listen);
    let token = daemon
        .ok(&["token", "create", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    let env = [("KEEL_API", api.as_str()), ("KEEL_TOKEN", token.as_str())];
    let untrusted = daemon.keel_env(&["vm", "list"], &env);
    assert!(
        stderr_of(&untrusted).contains("not trusted yet"),
        "{}",
        stderr_of(&untrusted)
    );
    let mut with_ca = env.to_vec();
    with_ca.push(("KEEL_CA", ca_file.to_str().unwrap()));
    let trusted = daemon.keel_env(&["vm", "list"], &with_ca);
    assert!(trusted.status.success(), "{}", stderr_of(&trusted));
    // Another CA's file does not vouch for it.
    let other = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
    let other_file = dir.join("other.pem");
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let mut with_other = env.to_vec();
    with_other.push(("KEEL_CA", other_file.to_str().unwrap()));
    let refused = daemon.keel_env(&["vm", "list"], &with_other);
    assert!(
        !refused.status.success() && stderr_of(&refused).contains("TLS handshake"),
        "{}",
        stderr_of(&refused)
    );
    drop(daemon);

    // A certificate past its end is warned about on the front page; nothing stops working
    // that pins it (promise 1), but browsers would refuse it.
    let old_key = rcgen::KeyPair::generate().unwrap();
    let mut old_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    old_params.not_before = rcgen::date_time_ymd(1999, 1, 1);
    old_params.not_after = rcgen::date_time_ymd(2000, 1, 1);
    let old_cert = old_params.signed_by(&old_key, &ca).unwrap();
    std::fs::write(&cert, old_cert.pem()).unwrap();
    std::fs::write(&key, old_key.serialize_pem()).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = daemon_with_certificate("ca-old", &listen, &cert, &key);
    let host = daemon.json(&["host"]);
    assert!(
        host["warnings"]
            .to_string()
            .contains("expired at 2000-01-01T00:00:00.000Z"),
        "{host}"
    );
    assert_eq!(
        host["identity"]["tls_not_after"],
        "2000-01-01T00:00:00.000Z"
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rows of the ledger, read from the store file.
fn ledger_rows(daemon: &Daemon) -> Vec<(i64, String, String)> {
    let conn = rusqlite::Connection::open(daemon.state_dir.join("keel.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, actor, detail FROM ledger ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn a_thousand_unauthenticated_requests_add_a_handful_of_rows() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut daemon =
        Daemon::start_with("flood", &[], &["--listen", &listen, "--insecure-http"], &[]);
    let before = ledger_rows(&daemon).len();
    let requests = [
        "POST /vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        "GET /vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer keel_guess\r\nConnection: close\r\n\r\n",
        "DELETE /tokens/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    let mut retry_after = false;
    for i in 0..1000 {
        let answer = http(&listen, requests[i % requests.len()]);
        *statuses.entry(status_of(&answer)).or_insert(0) += 1;
        retry_after |= answer.to_ascii_lowercase().contains("retry-after:");
    }
    eprintln!("statuses of 1000 unauthenticated requests: {statuses:?}");
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![401, 429],
        "only refusals: {statuses:?}"
    );
    assert!(
        statuses[&401] >= 30 && retry_after,
        "past 30 failures a minute the address is told to wait: {statuses:?}"
    );
    // The counts are written as the minute ends, or at a stop.
    assert!(daemon.stop(), "the daemon stops cleanly");
    let rows = ledger_rows(&daemon);
    let new = &rows[before..];
    let summaries: Vec<&(i64, String, String)> = new
        .iter()
        .filter(|(_, actor, detail)| actor == "anonymous" && detail.starts_with("refused "))
        .collect();
    eprintln!(
        "{} new ledger rows, {} of them summaries",
        new.len(),
        summaries.len()
    );
    assert!(
        new.len() <= 6 && !summaries.is_empty(),
        "a handful of rows, not one per request: {new:#?}"
    );
    let counted: u64 = summaries
        .iter()
        .map(|(_, _, d)| d.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 1000, "{summaries:#?}");
}

#[test]
fn idle_connections_hold_up_neither_the_api_nor_a_clean_stop() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut daemon = Daemon::start_with("idle", &[], &["--listen", &listen], &[]);
    let (api, fingerprint) = daemon.https(&listen);
    let token = daemon
        .ok(&["token", "create", "watcher", "--role", "viewer"])
        .trim()
        .to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // 200 connections from another loopback address that never say a word.
    let idle: Vec<tokio::net::TcpStream> = runtime.block_on(async {
        let mut held = Vec::new();
        for _ in 0..200 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            held.push(socket.connect(listen.parse().unwrap()).await.unwrap());
        }
        held
    });
    // Past the per-address cap the daemon closes them at once.
    let closed = runtime.block_on(async {
        let mut closed = 0;
        for stream in &idle {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(300), async {
                stream.readable().await?;
                stream.try_read(&mut byte)
            })
            .await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        closed
    });
    eprintln!("of 200 idle connections from one address, the daemon closed {closed} at once");
    assert!(closed >= 200 - 64, "closed only {closed}");
    // The API answers others, on TCP and on the socket.
    let started = Instant::now();
    let out = daemon.keel_env(
        &["host"],
        &[
            ("KEEL_API", api.as_str()),
            ("KEEL_TOKEN", token.as_str()),
            ("KEEL_FINGERPRINT", fingerprint.as_str()),
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    eprintln!("keel host over TLS beside them: {:?}", started.elapsed());
    daemon.ok(&["host"]);
    // A stop with them still open ends the daemon (within its 5 s grace).
    let pid = daemon.pid().unwrap();
    let started = Instant::now();
    let stopping = std::thread::spawn(move || {
        let ok = daemon.stop();
        (ok, daemon)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stopping.is_finished() {
        assert!(
            Instant::now() < deadline,
            "keel serve (pid {pid}) did not stop within 30 s with 200 idle connections open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, _daemon) = stopping.join().unwrap();
    assert!(ok, "the daemon exits 0");
    eprintln!(
        "clean stop with 200 idle connections: {:?}",
        started.elapsed()
    );
    drop(idle);
}

/// Every mode the socket path was seen with while `start` ran.
fn modes_seen_while(socket: &Path, start: impl FnOnce() + Send + 'static) -> Vec<u32> {
    let worker = std::thread::spawn(start);
    let mut seen = Vec::new();
    while !worker.is_finished() {
        if let Ok(meta) = std::fs::symlink_metadata(socket) {
            let mode = meta.permissions().mode() & 0o777;
            if seen.last() != Some(&mode) {
                seen.push(mode);
            }
        }
    }
    worker.join().unwrap();
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        seen.push(meta.permissions().mode() & 0o777);
    }
    seen
}

/// `keel ARGS` run as `uid` against the socket.
fn keel_as(uid: u32, socket: &Path, args: &[&str]) -> Output {
    Command::new(KEEL)
        .args(args)
        .env("KEEL_API", socket)
        .env_remove("KEEL_TOKEN")
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_socket_is_never_wider_and_local_users_get_only_their_role() {
    // A socket directory others may enter, so that local users can reach the socket at all.
    let dir = std::env::temp_dir().join(format!("kd-open-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("api.sock");
    let socket_arg = socket.to_str().unwrap().to_string();

    // Owner-only from its first moment, over several starts.
    let mut daemon = Daemon::start_with("sock", &[], &["--socket", &socket_arg], &[]);
    daemon.stop();
    for _ in 0..5 {
        let _ = std::fs::remove_file(&socket);
        let modes = modes_seen_while(&socket, {
            let state_dir = daemon.state_dir.clone();
            let socket_arg = socket_arg.clone();
            move || {
                let mut child = Command::new(KEEL)
                    .args(["serve", "--socket", &socket_arg, "--state-dir"])
                    .arg(&state_dir)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                while !Path::new(&socket_arg).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(50));
                // SAFETY: kill with a pid this test started.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
        });
        assert!(
            !modes.is_empty() && modes.iter().all(|m| *m == 0o600),
            "the socket was seen with modes {modes:?} (octal 384 is 0600)"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".api-socket"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Local roles: uid 4242 may read, uid 4243 has no role; root is an admin.
    daemon = Daemon::start_with(
        "sock",
        &[],
        &["--socket", &socket_arg, "--local-role", "4242=viewer"],
        &[],
    );
    let viewer = keel_as(4242, &socket, &["vm", "list"]);
    assert!(viewer.status.success(), "{}", stderr_of(&viewer));
    let create = keel_as(4242, &socket, &["vm", "create", "x", "--kernel", "/k"]);
    assert!(
        stderr_of(&create).contains("local user uid 4242 has role viewer but this needs operator"),
        "{}",
        stderr_of(&create)
    );
    let stranger = keel_as(4243, &socket, &["vm", "list"]);
    assert!(
        stderr_of(&stranger).contains("local user uid 4243 has no role"),
        "{}",
        stderr_of(&stranger)
    );
    let root = keel_as(0, &socket, &["token", "list"]);
    assert!(root.status.success(), "{}", stderr_of(&root));
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Appends `n` state rows of a VM that no daemon knows (a long history) straight into the
/// store's ledger, continuing its chain.
fn grow_ledger(daemon: &Daemon, n: usize) {
    let mut conn = rusqlite::Connection::open(daemon.state_dir.join("keel.db")).unwrap();
    let tx = conn.transaction().unwrap();
    let last: i64 = tx
        .query_row("SELECT MAX(time_ms) FROM ledger", [], |r| r.get(0))
        .unwrap();
    for i in 0..n {
        let to = if i % 2 == 0 {
            api::VmState::Running
        } else {
            api::VmState::Stopped
        };
        let event = host::ledger::NewEvent {
            kind: api::EventKind::State,
            vm: Some("history".into()),
            from: None,
            to: Some(to),
            cause: api::Cause::Operator,
            actor: "test".into(),
            detail: "history".into(),
        };
        host::ledger::append(&tx, &event, last - (n - i) as i64 * 1000).unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn sla_reports_in_a_loop_do_not_hold_up_a_vm_start() {
    if !kvm_available("sla_reports_in_a_loop_do_not_hold_up_a_vm_start") {
        return;
    }
    let mut daemon = Daemon::start("sla-load");
    daemon.stop();
    grow_ledger(&daemon, 200_000);
    daemon.restart();
    daemon.create_probe_vm("busy", &[]);
    let sla = [
        "sla",
        "report",
        "--from",
        "1970-01-01T00:00:00Z",
        "--to",
        "2200-01-01T00:00:00Z",
    ];
    // How long one report takes here, alone.
    let started = Instant::now();
    daemon.ok(&sla);
    let alone = started.elapsed();
    // Reports back to back on two threads; the VM starts while they run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (stop, spans) = (stop.clone(), spans.clone());
            let env = daemon.socket();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let begun = Instant::now();
                    let out = Command::new(KEEL)
                        .args(sla)
                        .env("KEEL_API", &env)
                        .stdout(Stdio::null())
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", stderr_of(&out));
                    spans.lock().unwrap().push((begun, Instant::now()));
                }
            })
        })
        .collect();
    std::thread::sleep(alone / 2);
    let begun = Instant::now();
    daemon.ok(&["vm", "start", "busy"]);
    let ended = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let spans = spans.lock().unwrap();
    let inside = spans.iter().any(|(b, e)| *b <= begun && ended <= *e);
    eprintln!(
        "one SLA report over 200k rows: {alone:?}; a VM start during the reports: {:?}; {} reports ran",
        ended - begun,
        spans.len()
    );
    assert!(
        inside,
        "the start did not complete while a report was running (start {:?}, report alone {alone:?})",
        ended - begun
    );
    daemon.ok(&["vm", "stop", "busy"]);
}
