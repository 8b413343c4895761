//! Shared by the whole-system tests: finding KVM, building the probe guest, running
//! `keel run` with a deadline, and reading the probe's report.

#![allow(dead_code)]

pub mod daemon;
pub mod vmm;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// True when /dev/kvm can be used. Without it the test is skipped, loudly, unless
/// KEEL_REQUIRE_KVM=1 (CI), where it fails.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("KEEL_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!(
                    "{test}: /dev/kvm is needed and KEEL_REQUIRE_KVM=1, but opening it failed: {e}"
                );
            }
            eprintln!("SKIPPED {test}: /dev/kvm cannot be opened ({e}); set KEEL_REQUIRE_KVM=1 to make this a failure");
            false
        }
    }
}

/// True when this host's KVM is the software PVM module.
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Builds the probe guest once per test binary (and serialises builds across binaries).
pub fn probe_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("target/probe");
        std::fs::create_dir_all(&out).expect("create target/probe");
        let lock = std::fs::File::create(out.join(".build-lock")).expect("probe build lock");
        lock.lock().expect("lock the probe build");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(root.join("guest/probe"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("run make for the probe guest (is make installed?)");
        assert!(
            status.success(),
            "building the probe guest failed: {status}"
        );
        out
    })
}

pub fn probe_elf() -> PathBuf {
    probe_dir().join("probe.elf")
}

pub fn probe_bzimage() -> PathBuf {
    probe_dir().join("probe.bzImage")
}

/// What a finished `keel run` left.
#[derive(Debug)]
pub struct Run {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// True when the run was stopped by the test (deadline or marker), not by itself.
    pub killed: bool,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// The probe's report: key -> values, in order.
    pub fn probe(&self) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in self.stdout.lines() {
            if let Some(rest) = line.strip_prefix("PROBE ") {
                let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
                map.entry(key.to_string())
                    .or_default()
                    .push(value.to_string());
            }
        }
        map
    }

    pub fn context(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn reader(
    mut pipe: impl Read + Send + 'static,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
    is_stdout: bool,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((is_stdout, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Runs a command to completion, or kills it at `deadline` or when its stdout contains
/// `stop_at`. Never hangs.
pub fn run_with(
    cmd: Command,
    stdin: Option<Vec<u8>>,
    deadline: Duration,
    stop_at: Option<&str>,
) -> Run {
    match stop_at {
        Some(marker) => run_until(cmd, stdin, deadline, |out| out.contains(marker)),
        None => run_until(cmd, stdin, deadline, |_| false),
    }
}

/// Like [`run_with`], stopping the run once `done(stdout so far)` holds.
pub fn run_until(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    deadline: Duration,
    done: impl Fn(&str) -> bool,
) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child: Child = cmd.spawn().expect("spawn keel");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&input);
            // Keep the pipe open a while: closing it is not what is being tested.
            std::thread::sleep(Duration::from_secs(30));
        });
    }
    let (tx, rx) = mpsc::channel();
    reader(child.stdout.take().expect("stdout"), tx.clone(), true);
    reader(child.stderr.take().expect("stderr"), tx, false);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut killed = false;
    let status = loop {
        while let Ok((is_stdout, bytes)) = rx.recv_timeout(Duration::from_millis(20)) {
            if is_stdout {
                out.extend(bytes)
            } else {
                err.extend(bytes)
            }
        }
        if !killed && done(&String::from_utf8_lossy(&out)) {
            let _ = child.kill();
            killed = true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if start.elapsed() > deadline && !killed {
            let _ = child.kill();
            killed = true;
        }
    };
    // Drain what the readers still hold.
    while let Ok((is_stdout, bytes)) = rx.recv_timeout(Duration::from_millis(100)) {
        if is_stdout {
            out.extend(bytes)
        } else {
            err.extend(bytes)
        }
    }
    Run {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        killed,
    }
}

pub fn keel_run(args: &[&str]) -> Command {
    let mut cmd = Command::new(KEEL);
    cmd.arg("run").args(args);
    cmd
}

/// `keel run` of the probe, to its end (bounded at 60 s).
pub fn run_probe(kernel: &Path, cpus: u32, memory_mib: u64, cmdline: &str) -> Run {
    let (cpus, memory) = (cpus.to_string(), memory_mib.to_string());
    let cmd = keel_run(&[
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cpus",
        &cpus,
        "--memory",
        &memory,
        "--cmdline",
        cmdline,
    ]);
    run_with(cmd, None, Duration::from_secs(60), None)
}

/// Waits for the child to exit, killing it after `limit`; its exit status if it exited.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every process in /proc: its pid and its /proc/PID directory.
pub fn processes() -> impl Iterator<Item = (u32, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// Runs a tool the tests need from Debian (qemu-img, qemu-io, tar, mtools...), which must
/// succeed; its stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = tool_output(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool the tests need, whatever its status.
pub fn tool_output(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is needed (scripts/install-deps.sh installs it): {e}")
        })
}

/// A sparse 16 MiB raw disk at `path` (its directory made): room for the probe's records.
pub fn sparse_disk(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::File::create(path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
}

/// `qemu-img ARGS`, which must succeed; its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    tool("qemu-img", args)
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// xorshift64*: enough randomness for kill times, offsets and patterns, reproducible from the
/// seed a test prints.
pub struct Random(pub u64);

impl Random {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
