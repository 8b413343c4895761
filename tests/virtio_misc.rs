//! The probe guest drives virtio-rng and virtio-vsock under `keel run`, and misbehaves on
//! purpose (`probe.garbage`) against every device: the VMM must keep serving them all.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn keel_probe(extra: &[String], cmdline: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(KEEL);
    cmd.args(["run", "--kernel"])
        .arg(probe_elf())
        .args(extra)
        .args(["--cmdline", cmdline]);
    cmd
}

#[test]
fn rng_gives_the_guest_random_bytes() {
    if !kvm_available("rng_gives_the_guest_random_bytes") {
        return;
    }
    let run = run_with(
        keel_probe(&["--rng".into()], "probe.rng probe.poweroff"),
        None,
        Duration::from_secs(60),
        None,
    );
    let ctx = run.context();
    let line = run
        .probe()
        .get("rng")
        .and_then(|v| v.first().cloned())
        .unwrap_or_default();
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.first(), Some(&"ok"), "{ctx}");
    assert_eq!(fields.get(1), Some(&"128"), "{ctx}");
    // 128 random bytes take ~100 distinct values; all-zero or a constant would give 1.
    let distinct: u32 = fields.get(2).and_then(|d| d.parse().ok()).unwrap_or(0);
    assert!(
        distinct > 60,
        "{distinct} distinct byte values is not random\n{ctx}"
    );
    assert_eq!(run.code(), Some(0), "{ctx}");
}

/// Host program for `probe.vsock_listen=PORT`: CONNECT (retried until the guest listens),
/// send `data`, read the echo, close. Returns what came back.
fn vsock_echo(socket: &Path, port: u32, data: Vec<u8>) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        if Instant::now() > deadline {
            return Err("the guest never accepted".into());
        }
        if let Ok(mut s) = UnixStream::connect(socket) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(format!("CONNECT {port}\n").as_bytes());
            let mut line = String::new();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut writer = stream.try_clone().unwrap();
    let len = data.len();
    // Send while reading: the echo's flow control holds both directions.
    let sender = std::thread::spawn(move || writer.write_all(&data));
    let mut got = vec![0u8; len];
    let mut reader = stream;
    reader
        .read_exact(&mut got)
        .map_err(|e| format!("reading the echo: {e}"))?;
    let _ = sender.join();
    let _ = reader.shutdown(std::net::Shutdown::Both);
    Ok(got)
}

/// Host program for `probe.vsock_connect=PORT`: listen on SOCKET_PORT, read the guest's line,
/// answer one.
fn vsock_serve(listener: UnixListener, reply: &str) -> Result<String, String> {
    listener.set_nonblocking(false).unwrap();
    let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    (&stream)
        .write_all(format!("{reply}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut rest = Vec::new();
    let _ = (&stream).read_to_end(&mut rest);
    Ok(line.trim_end().to_string())
}

#[test]
fn vsock_streams_both_ways_through_the_unix_socket() {
    if !kvm_available("vsock_streams_both_ways_through_the_unix_socket") {
        return;
    }
    let dir = scratch_dir("vsock");
    let socket = dir.join("v.sock");
    let guest_port = format!("{}_6000", socket.display());
    let listener = UnixListener::bind(&guest_port).unwrap();
    // The jailed VMM connects as the VM's own user: the host program lets it.
    std::fs::set_permissions(
        &guest_port,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let server = std::thread::spawn(move || vsock_serve(listener, "HELLO-FROM-HOST"));
    // More than the probe's 64 KiB of receive space: credit must flow for this to finish.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let expected = data.clone();
    let echo = {
        let socket = socket.clone();
        std::thread::spawn(move || vsock_echo(&socket, 5000, data))
    };
    let cmdline = "probe.vsock_listen=5000 probe.vsock_connect=6000 probe.poweroff";
    let extra = vec![
        "--vsock".to_string(),
        format!("cid=9,socket={}", socket.display()),
    ];
    let run = run_with(
        keel_probe(&extra, cmdline),
        None,
        Duration::from_secs(90),
        None,
    );
    let ctx = run.context();
    let echoed = echo.join().expect("echo thread");
    assert_eq!(echoed.as_ref().map(Vec::len), Ok(expected.len()), "{ctx}");
    assert!(echoed.unwrap() == expected, "echoed bytes differ\n{ctx}");
    assert_eq!(
        server.join().expect("server thread"),
        Ok("KEEL-PROBE-VSOCK".to_string()),
        "{ctx}"
    );
    let p = run.probe();
    assert_eq!(p["vsock0"], vec!["cid 9"], "{ctx}");
    assert_eq!(
        p["vsock_listen"],
        vec![format!("echoed {}", expected.len())],
        "{ctx}"
    );
    assert_eq!(p["vsock_connect"], vec!["ok HELLO-FROM-HOST"], "{ctx}");
    assert_eq!(run.code(), Some(0), "{ctx}");
    assert!(!socket.exists(), "the VMM removes its socket when it ends");
}

#[test]
fn garbage_from_the_guest_leaves_every_device_serving() {
    if !kvm_available("garbage_from_the_guest_leaves_every_device_serving") {
        return;
    }
    let dir = scratch_dir("garbage");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let extra = vec![
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--rng".into(),
        "--vsock".into(),
        format!("cid=5,socket={}", dir.join("g.sock").display()),
    ];
    // Garbage first, then real work on the same devices.
    let cmdline = "probe.garbage probe.blk_records=20 probe.rng probe.poweroff";
    let run = run_with(
        keel_probe(&extra, cmdline),
        None,
        Duration::from_secs(90),
        None,
    );
    let ctx = run.context();
    let p = run.probe();
    let garbage = &p["garbage"];
    for dev in ["blk0", "rng0", "vsock0"] {
        assert!(
            garbage.contains(&format!("{dev} recovered")),
            "{dev} did not recover\n{ctx}"
        );
        assert!(
            garbage
                .iter()
                .any(|l| l.starts_with(&format!("{dev} status "))),
            "{ctx}"
        );
    }
    assert!(!garbage.iter().any(|l| l.contains("broken")), "{ctx}");
    assert_eq!(p.get("garbage_done").map(Vec::len), Some(1), "{ctx}");
    assert_eq!(p["blk_verify"], vec!["ok 20"], "{ctx}");
    assert!(p["rng"][0].starts_with("ok 128 "), "{ctx}");
    assert_eq!(
        run.code(),
        Some(0),
        "the VMM survived and the guest powered off\n{ctx}"
    );
    assert!(!run.stderr.contains("panicked"), "{ctx}");
}
