//! A `keel serve` on a state directory of its own, driven as an operator drives it: the CLI
//! for lifecycle commands, raw HTTP/1.1 on the API socket for readiness and listings. Dropping
//! it kills the daemon and every VMM it started and removes the state directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::cleanup;

/// Longest wait for the daemon's API, and for one CLI command.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls (API readiness, console log, listings).
pub const POLL: Duration = Duration::from_millis(1);

/// One VM as `GET /vms` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    pub name: String,
    pub state: String,
    pub pid: Option<u32>,
}

pub struct Daemon {
    keel: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// More `keel serve` arguments (`--listen`, ...).
    pub serve_args: Vec<String>,
}

impl Daemon {
    /// A daemon on `state_dir` (which need not exist), not started yet; its stderr goes to
    /// `state_dir` + `.log`.
    pub fn new(keel: &Path, state_dir: PathBuf) -> Daemon {
        cleanup::register(&state_dir);
        let mut log = state_dir.clone().into_os_string();
        log.push(".log");
        Daemon {
            keel: keel.to_path_buf(),
            state_dir,
            log: PathBuf::from(log),
            child: None,
            serve_args: Vec::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("api.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts `keel serve` and waits until `GET /` answers 200: the time from just before
    /// the spawn.
    pub fn start(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("the daemon on {} runs already", self.state_dir.display());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening the daemon log {}", self.log.display()))?;
        let mut command = Command::new(&self.keel);
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("starting {} serve", self.keel.display()))?;
        self.child = Some(child);
        loop {
            if let Ok((200, _)) = self.get("/") {
                return Ok(started.elapsed());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "keel serve exited with {status} before its API answered; {}",
                    self.log_tail()
                );
            }
            if started.elapsed() > STEP_TIMEOUT {
                bail!(
                    "keel serve did not answer GET / within {} s; {}",
                    STEP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL to the daemon alone (its VMMs keep running), and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM to the daemon; waits for it to exit (SIGKILL after [`STEP_TIMEOUT`]).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the daemon's pid, which this process owns and has not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for keel serve")? {
                if !status.success() {
                    bail!(
                        "keel serve ended with {status} on SIGTERM; {}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "keel serve still ran {} s after SIGTERM",
                    STEP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `keel ARGS` against this daemon, not started.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.keel);
        command
            .args(args)
            .env("KEEL_API", self.socket())
            .env("KEEL_CLIENT_CONFIG", self.state_dir.join("client.json"))
            .env_remove("KEEL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// `keel ARGS`, which must succeed: the time from just before the spawn to its exit,
    /// and its stdout.
    pub fn run_cli(&self, args: &[&str]) -> Result<(Duration, String)> {
        let started = Instant::now();
        let child = self
            .cli(args)
            .spawn()
            .with_context(|| format!("starting keel {}", args.join(" ")))?;
        let output = wait_with_timeout(child, STEP_TIMEOUT)
            .with_context(|| format!("keel {}", args.join(" ")))?;
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "keel {} failed ({}): {}{}; {}",
                args.join(" "),
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log_tail()
            );
        }
        Ok((took, stdout))
    }

    /// One `GET` on the API socket: the status and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = UnixStream::connect(self.socket())
            .with_context(|| format!("connecting to {}", self.socket().display()))?;
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        stream.set_write_timeout(Some(STEP_TIMEOUT))?;
        stream.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("GET {path}: not an HTTP answer: {answer:?}"))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Every VM with its state and pid, from `GET /vms`.
    pub fn vms(&self) -> Result<Vec<VmRow>> {
        let (status, body) = self.get("/vms")?;
        if status != 200 {
            bail!("GET /vms answered {status}: {body}");
        }
        parse_vms(&body)
    }

    /// The VM's console log.
    pub fn console_log(&self, vm: &str) -> PathBuf {
        self.state_dir.join("vms").join(vm).join("console.log")
    }

    /// The end of the daemon's stderr, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(8).collect();
        let lines: Vec<&str> = lines.into_iter().rev().collect();
        format!("daemon log {}: {:?}", self.log.display(), lines)
    }

    /// `keel vmm` processes running VMs of this state directory, from /proc.
    pub fn vmm_pids(&self) -> Vec<u32> {
        cleanup::vmm_pids_of(&self.state_dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        cleanup::kill_vmms_of(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(&self.log);
        cleanup::unregister(&self.state_dir);
    }
}

/// The rows of a `GET /vms` answer.
pub fn parse_vms(body: &str) -> Result<Vec<VmRow>> {
    let value: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("GET /vms: not JSON: {body}"))?;
    let rows = value
        .as_array()
        .ok_or_else(|| anyhow!("GET /vms: not a list: {body}"))?;
    rows.iter()
        .map(|vm| {
            Ok(VmRow {
                name: vm["spec"]["name"]
                    .as_str()
                    .ok_or_else(|| anyhow!("GET /vms: a VM without spec.name: {vm}"))?
                    .to_string(),
                state: vm["state"].as_str().unwrap_or_default().to_string(),
                pid: vm["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            })
        })
        .collect()
}

/// Waits for a child with piped output (small enough for the pipes), killing it after
/// `limit`.
fn wait_with_timeout(mut child: Child, limit: Duration) -> Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {} s; killed", limit.as_secs());
        }
        std::thread::sleep(POLL);
    }
    Ok(child.wait_with_output()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_are_read_from_the_listing() {
        let body = r#"[{"spec":{"name":"a","kernel":"k"},"state":"running","pid":42,
            "since":"x","reason":"","console_log":"l","console_socket":"s"},
            {"spec":{"name":"b"},"state":"stopped","since":"x"}]"#;
        assert_eq!(
            parse_vms(body).expect("valid"),
            vec![
                VmRow {
                    name: "a".into(),
                    state: "running".into(),
                    pid: Some(42)
                },
                VmRow {
                    name: "b".into(),
                    state: "stopped".into(),
                    pid: None
                },
            ]
        );
    }

    #[test]
    fn a_listing_that_is_not_a_list_is_an_error() {
        assert!(parse_vms(r#"{"error":"x"}"#).is_err());
        assert!(parse_vms("not json").is_err());
    }
}
