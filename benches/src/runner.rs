//! Starting a VMM on the probe guest and timing it: the moments its serial lines arrive on
//! the stdout pipe, its exit, and its resident memory while the guest idles.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::procfs::{self, MemoryStatus};
use crate::serial::{self, LineScanner};

/// The probe's first line, printed at its entry before any set-up.
pub const FIRST_LINE: &str = "PROBE start";
/// The probe's line once it has read the boot data and ACPI tables and started all CPUs.
pub const READY_LINE: &str = "PROBE ready";
/// Command-line switch that makes the probe power off after `PROBE ready`.
pub const POWEROFF_SWITCH: &str = "probe.poweroff";
/// Every run is stopped this long after its start, whatever it is doing.
pub const RUN_DEADLINE: Duration = Duration::from_secs(10);
/// Idle memory is read this long after `PROBE ready`.
pub const IDLE_SETTLE: Duration = Duration::from_millis(300);
/// Longest wait for the rest of a VMM's stderr once it has ended.
const STDERR_GRACE: Duration = Duration::from_secs(1);
/// Guest shape of every run.
pub const VCPUS: u32 = 1;
pub const MEMORY_MIB: u64 = 256;

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Keel,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Keel => "keel",
            Vmm::Qemu => "qemu",
        }
    }
}

/// Where the VMMs and the guest are.
#[derive(Debug, Clone)]
pub struct Setup {
    pub keel: PathBuf,
    pub qemu: PathBuf,
    pub probe_elf: PathBuf,
    /// Extra `keel run` options (`--no-jail`).
    pub keel_options: Vec<String>,
}

impl Setup {
    /// The command line of `vmm` booting the probe with the given guest command line.
    pub fn command(&self, vmm: Vmm, guest_cmdline: &str) -> Command {
        let (cpus, memory) = (VCPUS.to_string(), MEMORY_MIB.to_string());
        match vmm {
            Vmm::Keel => {
                let mut cmd = Command::new(&self.keel);
                cmd.arg("run")
                    .args(&self.keel_options)
                    .arg("--kernel")
                    .arg(&self.probe_elf)
                    .args(["--cpus", &cpus, "--memory", &memory])
                    .args(["--cmdline", guest_cmdline])
                    .env("KEEL_TRACE_STARTUP", "1");
                cmd
            }
            Vmm::Qemu => {
                let mut cmd = Command::new(&self.qemu);
                cmd.args(["-M", "microvm", "-accel", "kvm"])
                    .args(["-cpu", "host,-arch-capabilities"])
                    .args(["-m", &memory, "-smp", &cpus])
                    .args(["-nodefaults", "-no-user-config", "-nographic"])
                    .args(["-serial", "stdio", "-kernel"])
                    .arg(&self.probe_elf);
                if !guest_cmdline.is_empty() {
                    cmd.args(["-append", guest_cmdline]);
                }
                cmd
            }
        }
    }
}

/// One boot to power-off, timed from just before the spawn.
#[derive(Debug, Clone, Copy)]
pub struct BootTiming {
    pub first_line: Duration,
    pub ready: Duration,
    /// Until the VMM closed its stdout, i.e. exited.
    pub exit: Duration,
    /// Keel only: its CPU time before the first vCPU entry, from its start-up trace.
    pub startup_cpu_us: Option<u64>,
}

/// One piece of the VMM's stdout and when it arrived; an empty piece is the end of file.
type Chunk = (Instant, Vec<u8>);

/// A VMM process being watched. Dropping it kills the process if it still runs.
struct Running {
    vmm: Vmm,
    child: Child,
    started: Instant,
    stdout: Receiver<Chunk>,
    stderr: Receiver<Vec<u8>>,
    scanner: LineScanner,
    /// The last lines seen, for error messages.
    recent: Vec<String>,
    reaped: Option<ExitStatus>,
}

impl Running {
    fn spawn(vmm: Vmm, mut cmd: Command) -> Result<Running> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({:?})", vmm.name(), cmd.get_program()))?;
        let out = child.stdout.take().context("the child's stdout pipe")?;
        let err = child.stderr.take().context("the child's stderr pipe")?;
        let (rx, err_rx) = read_pipes(out, err);
        Ok(Running {
            vmm,
            child,
            started,
            stdout: rx,
            stderr: err_rx,
            scanner: LineScanner::default(),
            recent: Vec::new(),
            reaped: None,
        })
    }

    fn deadline(&self) -> Instant {
        self.started + RUN_DEADLINE
    }

    /// Time from the spawn to the arrival of the line `marker`.
    fn wait_for_line(&mut self, marker: &str) -> Result<Duration> {
        loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            let (at, bytes) = match self.stdout.recv_timeout(left) {
                Ok(chunk) => chunk,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!(
                        "no {marker:?} line within {} s",
                        RUN_DEADLINE.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => (Instant::now(), Vec::new()),
            };
            if bytes.is_empty() {
                return Err(self.failure(&format!("stdout closed before the {marker:?} line")));
            }
            for line in self.scanner.feed(&bytes) {
                let found = line == marker;
                self.remember(line);
                if found {
                    return Ok(at - self.started);
                }
            }
        }
    }

    fn remember(&mut self, line: String) {
        const KEPT: usize = 5;
        if self.recent.len() == KEPT {
            self.recent.remove(0);
        }
        self.recent.push(line);
    }

    /// Time from the spawn to the end of stdout, then reaps the process (killed at the
    /// deadline).
    fn wait_for_exit(&mut self) -> Result<(Duration, ExitStatus)> {
        let closed_at = loop {
            let left = self.deadline().saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok((at, bytes)) if bytes.is_empty() => break at,
                Ok((_, bytes)) => {
                    for line in self.scanner.feed(&bytes) {
                        self.remember(line);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break Instant::now(),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!(
                        "still running {} s after its start",
                        RUN_DEADLINE.as_secs()
                    )))
                }
            }
        };
        let status = self.reap()?;
        Ok((closed_at - self.started, status))
    }

    /// Waits for the process to end, killing it at the deadline.
    fn reap(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the VMM")? {
                self.reaped = Some(status);
                return Ok(status);
            }
            if Instant::now() >= self.deadline() {
                self.kill();
                return Err(self.failure(&format!(
                    "closed its output but did not exit within {} s",
                    RUN_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn kill(&mut self) {
        if self.reaped.is_none() {
            let _ = self.child.kill();
            self.reaped = self.child.wait().ok();
        }
    }

    /// What the VMM wrote to stderr; kills it first if it still runs. Waits at most
    /// [`STDERR_GRACE`] for the end of the pipe, which a leftover child process may hold.
    fn stderr(&mut self) -> String {
        self.kill();
        let deadline = Instant::now() + STDERR_GRACE;
        let mut bytes = Vec::new();
        while let Ok(chunk) = self
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            bytes.extend(chunk);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// An error about this run, with what the VMM last printed. Kills the process.
    fn failure(&mut self, what: &str) -> anyhow::Error {
        let stderr = self.stderr();
        let stderr_tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let stderr_tail: Vec<&str> = stderr_tail.into_iter().rev().collect();
        anyhow!(
            "{}: {what} ({}); last serial lines: {:?}; last stderr lines: {:?}",
            self.vmm.name(),
            self.reaped
                .map_or_else(|| "exit status unknown".to_string(), |s| s.to_string()),
            self.recent,
            stderr_tail
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boots the probe with `probe.poweroff` and times its lines and the VMM's exit.
pub fn timed_boot(setup: &Setup, vmm: Vmm) -> Result<BootTiming> {
    let mut run = Running::spawn(vmm, setup.command(vmm, POWEROFF_SWITCH))?;
    let first_line = run.wait_for_line(FIRST_LINE)?;
    let ready = run.wait_for_line(READY_LINE)?;
    let (exit, status) = run.wait_for_exit()?;
    if !status.success() {
        return Err(run.failure("exited unsuccessfully after powering off"));
    }
    let startup_cpu_us = match vmm {
        Vmm::Keel => {
            let stderr = run.stderr();
            let cpu = serial::parse_startup_trace(&stderr);
            if cpu.is_none() {
                bail!(
                    "keel printed no start-up trace line with KEEL_TRACE_STARTUP=1; \
                     is {} an older build? Rebuild it: cargo build --release -p keel. \
                     Its stderr: {stderr:?}",
                    setup.keel.display()
                );
            }
            cpu
        }
        Vmm::Qemu => None,
    };
    Ok(BootTiming {
        first_line,
        ready,
        exit,
        startup_cpu_us,
    })
}

/// Boots the probe without a switch (it idles after `PROBE ready`), waits [`IDLE_SETTLE`]
/// and reads the VMM's resident memory; then kills it.
pub fn idle_memory(setup: &Setup, vmm: Vmm) -> Result<MemoryStatus> {
    ready_then_idle(setup, vmm, "").map(|(_, memory)| memory)
}

/// Boots the probe with `guest_cmdline` (which must leave it running after `PROBE ready`,
/// e.g. empty or `probe.power_button`): the time from the spawn to `PROBE ready`, and the
/// VMM's resident memory [`IDLE_SETTLE`] after that line; then kills it.
pub fn ready_then_idle(
    setup: &Setup,
    vmm: Vmm,
    guest_cmdline: &str,
) -> Result<(Duration, MemoryStatus)> {
    let mut run = Running::spawn(vmm, setup.command(vmm, guest_cmdline))?;
    let ready = run.wait_for_line(READY_LINE)?;
    std::thread::sleep(IDLE_SETTLE);
    // A jailed Keel VMM is the child of the `keel run` that waits for it outside the jail:
    // the VM's memory is the child's (the waiting parent's is reported by `launcher_memory`).
    let status = procfs::read_status(jailed_child(run.child.id()).unwrap_or(run.child.id()));
    if let Ok(Some(exit)) = run.child.try_wait() {
        run.reaped = Some(exit);
        return Err(run.failure("exited while it should idle"));
    }
    run.kill();
    let status = status.with_context(|| format!("reading {}'s memory use", vmm.name()))?;
    Ok((ready, status))
}

/// Stdout chunks with the time each read returned; an empty chunk marks the end.
pub type StdoutChunks = mpsc::Receiver<(Instant, Vec<u8>)>;
/// Stderr chunks.
pub type StderrChunks = mpsc::Receiver<Vec<u8>>;

/// A VMM's stdout chunks, each timestamped as soon as its read returns (an empty chunk marks
/// the end), and its stderr chunks: raw reads on threads of their own, with no buffering
/// between the pipe and the clock.
pub fn read_pipes(
    mut out: impl Read + Send + 'static,
    mut err: impl Read + Send + 'static,
) -> (StdoutChunks, StderrChunks) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now(), Vec::new()));
                    break;
                }
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = err.read(&mut buf) {
            if err_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (rx, err_rx)
}

/// The jailed VMM under a `keel run` process, if it has one (its first child).
pub fn jailed_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
