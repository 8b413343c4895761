//! One VMM run of one probe benchmark: spawn, read the serial console from the stdout pipe
//! as it arrives, time the benchmark's `start` and `done` lines, sample the VMM's CPU time,
//! end the VMM once the probe idles. Every run is bounded by a deadline and killed at it.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use keel_benches::runner::read_pipes;
use keel_benches::serial::LineScanner;

use super::cpu::{self, Usage};
use super::lines::{self, Event};

/// What a run measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// From the arrival of the `start` line to the arrival of the `done` line.
    pub secs: f64,
    pub ops: u64,
    pub bytes: u64,
    /// QueueNotify writes the probe made (its `kicks` line).
    pub kicks: Option<u64>,
    /// The VMM's CPU time over the same interval, when /proc could be read at both ends.
    pub cpu: Option<Usage>,
}

impl Measured {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
}

/// Called from the watching thread when the benchmark's loop starts and when it ends.
pub type Hook<'a> = Box<dyn FnMut() + 'a>;

/// The benchmark to watch for and the bounds of the run.
pub struct Watch<'a> {
    /// The probe's name of the benchmark (`blk_read`, ...).
    pub bench: &'a str,
    /// The run is killed this long after its start.
    pub deadline: Duration,
    pub on_start: Option<Hook<'a>>,
    pub on_done: Option<Hook<'a>>,
}

/// How long a VMM may take to end after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// One piece of the VMM's stdout and when it arrived; an empty piece is the end of file.
type Chunk = (Instant, Vec<u8>);

/// A running VMM; killed when dropped.
struct Vmm {
    child: Child,
    stdout: Receiver<Chunk>,
    stderr: Receiver<Vec<u8>>,
    recent: Vec<String>,
}

impl Vmm {
    fn spawn(mut cmd: Command) -> Result<Vmm> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow!("starting {:?}: {e}", cmd.get_program()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let err = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let (stdout, stderr) = read_pipes(out, err);
        Ok(Vmm {
            child,
            stdout,
            stderr,
            recent: Vec::new(),
        })
    }

    fn remember(&mut self, line: &str) {
        if self.recent.len() == 6 {
            self.recent.remove(0);
        }
        self.recent.push(line.to_string());
    }

    /// SIGTERM (both VMMs then end cleanly), SIGKILL if it still runs after a while.
    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let until = Instant::now() + TERM_GRACE;
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// An error naming what went wrong, with the last serial and stderr lines. Kills the VMM.
    fn failure(&mut self, what: &str) -> anyhow::Error {
        self.kill();
        let until = Instant::now() + Duration::from_secs(1);
        let mut bytes = Vec::new();
        while let Ok(chunk) = self
            .stderr
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            bytes.extend(chunk);
        }
        let stderr = String::from_utf8_lossy(&bytes);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
        anyhow!(
            "{what}; last serial lines: {:?}; last stderr lines: {:?}",
            self.recent,
            tail.into_iter().rev().collect::<Vec<_>>()
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` (a VMM booting the probe with one benchmark switch and no power-off) and
/// measures the benchmark named in `watch`. The VMM's CPU time is sampled at the `start`
/// line and at the `PROBE idle` line after `done` (only the report's few serial bytes lie
/// between `done` and it); then the VMM is told to end (SIGTERM).
pub fn run(cmd: Command, mut watch: Watch<'_>) -> Result<Measured> {
    let end = Instant::now() + watch.deadline;
    let mut vmm = Vmm::spawn(cmd)?;
    let pid = vmm.child.id();
    let ticks = cpu::ticks_per_sec();
    let mut scanner = LineScanner::default();
    let (mut t_start, mut snap_start) = (None, None);
    let mut done: Option<(Instant, u64, u64)> = None;
    let mut kicks = None;
    let snap_done = 'console: loop {
        let (at, bytes) = match vmm
            .stdout
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) => {
                return Err(vmm.failure(&format!(
                    "no bench_{} result within {} s of the start",
                    watch.bench,
                    watch.deadline.as_secs()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => (Instant::now(), Vec::new()),
        };
        if bytes.is_empty() {
            return Err(vmm.failure(&format!(
                "the console closed before the bench_{} result",
                watch.bench
            )));
        }
        for line in scanner.feed(&bytes) {
            vmm.remember(&line);
            match lines::parse(&line) {
                Some(Event::Start(name)) if name == watch.bench => {
                    t_start = Some(at);
                    snap_start = cpu::snapshot(pid);
                    if let Some(hook) = watch.on_start.as_mut() {
                        hook();
                    }
                }
                Some(Event::Done { name, ops, bytes }) if name == watch.bench => {
                    if let Some(hook) = watch.on_done.as_mut() {
                        hook();
                    }
                    done = Some((at, ops, bytes));
                }
                Some(Event::Kicks { name, kicks: k }) if name == watch.bench => kicks = Some(k),
                Some(Event::Error(line)) => {
                    return Err(vmm.failure(&format!("the probe reported: {line}")))
                }
                Some(Event::Idle) => break 'console cpu::snapshot(pid),
                _ => {}
            }
        }
    };
    let (Some(t_start), Some((t_done, ops, bytes))) = (t_start, done) else {
        return Err(vmm.failure(&format!(
            "the probe idles without the bench_{} start and done lines",
            watch.bench
        )));
    };
    vmm.terminate();
    let cpu = match (snap_start, snap_done) {
        (Some(a), Some(b)) => Some(Usage::between(a, b, ticks)),
        _ => None,
    };
    Ok(Measured {
        secs: (t_done - t_start).as_secs_f64(),
        ops,
        bytes,
        kicks,
        cpu,
    })
}
