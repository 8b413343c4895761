//! One `keel vmm` process as the daemon sees it: its run directory, starting it detached,
//! talking to its control socket, and learning (through a pidfd) the moment it ends, whether
//! the daemon started it or re-adopted it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use api::control::{files, ExitRecord, Request, Response, VmmStatus};
use api::VmSpec;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the VMM ({exe}) failed: {source}; is the keel binary still installed?")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
    #[error("watching VMM process {pid} failed: {source}")]
    Pidfd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How long one control request may take before the VMM counts as unresponsive.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// `<state dir>/vms/<name>/`: everything one VM's VMM reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(state_dir: &Path, name: &str) -> RunDir {
        RunDir(state_dir.join("vms").join(name))
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.file(files::CONTROL_SOCKET)
    }

    pub fn console_socket(&self) -> PathBuf {
        self.file(files::CONSOLE_SOCKET)
    }

    pub fn console_log(&self) -> PathBuf {
        self.file(files::CONSOLE_LOG)
    }

    /// Creates the directory (owner only) and writes the VM's definition for the VMM.
    pub fn prepare(&self, spec: &VmSpec) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)
            .map_err(|source| Error::Io {
                what: "creating the run directory",
                path: self.0.clone(),
                source,
            })?;
        let json = serde_json::to_vec_pretty(spec).unwrap_or_default();
        // Unchanged since the last start: no need to pay for the fsyncs again.
        if std::fs::read(self.file(files::SPEC)).is_ok_and(|old| old == json) {
            return Ok(());
        }
        write_atomically(&self.file(files::SPEC), &json)
    }

    /// The VMM's exit record, if it wrote one.
    pub fn exit_record(&self) -> Option<ExitRecord> {
        let text = std::fs::read(self.file(files::EXIT_RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn remove_exit_record(&self) {
        let _ = std::fs::remove_file(self.file(files::EXIT_RECORD));
    }
}

/// `api::control::write_atomically`, owner-only, with this module's error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    api::control::write_atomically(path, bytes, 0o600).map_err(|source| Error::Io {
        what: "writing atomically",
        path: path.to_path_buf(),
        source,
    })
}

/// Starts `keel vmm --dir RUN_DIR` in its own session, so that neither a signal to the
/// daemon's process group nor the daemon's death reaches it. Returns its pid.
pub fn spawn(keel_exe: &Path, run_dir: &RunDir) -> Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(run_dir.file(files::VMM_LOG))
        .map_err(|source| Error::Io {
            what: "opening the VMM log",
            path: run_dir.file(files::VMM_LOG),
            source,
        })?;
    let mut command = Command::new(keel_exe);
    command
        .arg("vmm")
        .arg("--dir")
        .arg(&run_dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid and close_range are async-signal-safe system calls that touch only the
    // child being set up.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Descriptors the daemon inherited without close-on-exec (from its own parent:
            // a shell's pipes, a wrapper's) must not live on in every VMM. Marked rather than
            // closed, so std's exec-error pipe keeps working; an older kernel leaves them.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| Error::Spawn {
        exe: keel_exe.to_path_buf(),
        source,
    })?;
    // The Child handle is dropped without waiting: the pidfd watch reaps it (`reap`).
    Ok(child.id())
}

/// Every live `keel vmm --dir DIR` process on the host, as (pid, DIR), from /proc. Zombies
/// (empty cmdline) are not listed.
pub fn all_processes() -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Some(w) = args.windows(3).find(|w| w[0] == b"vmm" && w[1] == b"--dir") {
            let dir = std::ffi::OsStr::from_bytes(w[2]);
            found.push((pid, PathBuf::from(dir)));
        }
    }
    found
}

/// Pids of the live `keel vmm` processes of this run directory.
pub fn processes_of(run_dir: &RunDir) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|(_, dir)| dir == &run_dir.0)
        .map(|(pid, _)| pid)
        .collect()
}

/// One request to a VMM's control socket, with a timeout.
pub async fn control(run_dir: &RunDir, request: &Request) -> Result<Response> {
    let path = run_dir.control_socket();
    let fail = |reason: String| Error::Control {
        path: path.clone(),
        reason,
    };
    let exchange = async {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| fail(format!("cannot connect ({e})")))?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(request).map_err(|e| fail(e.to_string()))?;
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| fail(format!("sending failed ({e})")))?;
        let mut answer = String::new();
        BufReader::new(read)
            .read_line(&mut answer)
            .await
            .map_err(|e| fail(format!("reading the answer failed ({e})")))?;
        serde_json::from_str::<Response>(&answer)
            .map_err(|e| fail(format!("unreadable answer {answer:?} ({e})")))
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {CONTROL_TIMEOUT:?}")))?
}

/// The VMM's status, if a VMM answers on the socket.
pub async fn status(run_dir: &RunDir) -> Result<VmmStatus> {
    match control(run_dir, &Request::Status).await? {
        Response::Status(status) => Ok(status),
        other => Err(Error::Control {
            path: run_dir.control_socket(),
            reason: format!("unexpected answer to status: {other:?}"),
        }),
    }
}

/// A handle on a process that becomes readable when it ends (pidfd_open(2)). Unlike a pid it
/// cannot come to mean another process, and it works for processes the daemon did not start.
pub struct ProcessHandle {
    pub pid: u32,
    fd: AsyncFd<OwnedFd>,
}

/// How a process ended, when the daemon could reap it (its own child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited(i32),
    Signalled(i32),
    /// Not the daemon's child (re-adopted): only the exit record tells.
    Unknown,
}

impl std::fmt::Display for ProcessEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            ProcessEnd::Exited(code) => write!(f, "exited with status {code}"),
            ProcessEnd::Signalled(sig) => write!(f, "killed by signal {sig}"),
            ProcessEnd::Unknown => write!(f, "ended"),
        }
    }
}

impl ProcessHandle {
    pub fn open(pid: u32) -> Result<ProcessHandle> {
        let fail = |source| Error::Pidfd { pid, source };
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| fail(std::io::Error::from_raw_os_error(libc::ESRCH)))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, libc::PIDFD_NONBLOCK) };
        if fd < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: an OwnedFd stays open, and keeps returning the same descriptor, for as long
        // as the AsyncFd that owns it lives.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
        Ok(ProcessHandle { pid, fd })
    }

    /// Whether the process has ended (without waiting).
    pub fn has_ended(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd with a zero timeout.
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        n == 1
    }

    /// Waits until the process ends; reaps it if it is the daemon's child.
    pub async fn wait(&self) -> ProcessEnd {
        // Readable once, and for good, when the process has ended.
        if let Ok(mut guard) = self.fd.readable().await {
            guard.retain_ready();
        }
        self.reap()
    }

    fn reap(&self) -> ProcessEnd {
        let mut status = 0;
        // SAFETY: waitpid on a pid with WNOHANG; ECHILD when it is not our child.
        let reaped = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if reaped != self.pid as libc::pid_t {
            return ProcessEnd::Unknown;
        }
        if libc::WIFEXITED(status) {
            ProcessEnd::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ProcessEnd::Signalled(libc::WTERMSIG(status))
        } else {
            ProcessEnd::Unknown
        }
    }

    /// Sends a signal through the pidfd, so it cannot hit a recycled pid.
    pub fn kill(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}
