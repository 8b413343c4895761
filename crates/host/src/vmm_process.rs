//! One `keel-vmm vmm` process as the daemon sees it: its run directory, starting it detached,
//! talking to its control socket, and learning (through a pidfd) the moment it ends, whether
//! the daemon started it or re-adopted it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use api::control::{files, ExitRecord, Request, Response, VmmStatus};
use api::VmSpec;

use crate::images::ImageDirs;
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
    #[error("starting the VMM ({exe}) failed: {source}; is keel-vmm still installed beside keel?")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's control socket {path}: {reason}")]
    Control { path: PathBuf, reason: String },
    #[error("{reason}")]
    Refused { reason: String },
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

    /// Creates the directory (owner only) and writes the VM's definition for the VMM. With
    /// a jail id, the directory and the console log belong to it: the jailed VMM writes
    /// there (console log, sockets, exit record) and nowhere else.
    pub fn prepare(&self, spec: &VmSpec, jail_id: Option<u32>) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)
            .map_err(|source| Error::Io {
                what: "creating the run directory",
                path: self.0.clone(),
                source,
            })?;
        let owner = |path: &Path| -> Result<()> {
            // lchown: a link the jailed user left is changed itself, never what it names.
            std::os::unix::fs::lchown(path, jail_id, jail_id).or_else(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(Error::Io {
                        what: "giving the VM's jail user",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            })
        };
        if jail_id.is_some() {
            owner(&self.0)?;
            owner(&self.console_log())?;
        }
        self.write_spec(spec)
    }

    /// Writes the VM's definition for its VMM (one started next, or taking over).
    pub fn write_spec(&self, spec: &VmSpec) -> Result<()> {
        let json = serde_json::to_vec_pretty(spec).unwrap_or_default();
        // Unchanged since the last start: no need to pay for the fsyncs again.
        if api::control::read_run_file(&self.file(files::SPEC)).is_ok_and(|old| old == json) {
            return Ok(());
        }
        write_atomically(&self.file(files::SPEC), &json)
    }

    /// The VMM log's length now: a VMM started next writes after it.
    pub fn log_len(&self) -> u64 {
        std::fs::symlink_metadata(self.file(files::VMM_LOG)).map_or(0, |m| m.len())
    }

    /// The system call a seccomp filter killed the VMM for, from the lines its log got
    /// after `from` (the log's length when it started).
    pub fn seccomp_violation(&self, from: u64) -> Option<u64> {
        use std::io::{Read, Seek};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.file(files::VMM_LOG))
            .ok()?;
        let len = file.metadata().ok()?.len();
        // The tail is enough: the report is the VMM's last word.
        let start = from.max(len.saturating_sub(64 * 1024));
        file.seek(std::io::SeekFrom::Start(start)).ok()?;
        let mut bytes = Vec::new();
        file.take(64 * 1024).read_to_end(&mut bytes).ok()?;
        String::from_utf8_lossy(&bytes)
            .lines()
            .rev()
            .find_map(|line| {
                let rest = line.strip_prefix(jail::seccomp::VIOLATION_MARKER)?;
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
    }

    /// The VMM's exit record, if it wrote one.
    pub fn exit_record(&self) -> Option<ExitRecord> {
        let text = api::control::read_run_file(&self.file(files::EXIT_RECORD)).ok()?;
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

/// What a VM's VMM is started with.
pub struct Launch<'a> {
    pub vmm_exe: &'a Path,
    pub run_dir: &'a RunDir,
    /// Its identity and limits: None when the daemon is not root (then unjailed).
    pub jail: Option<jail::LaunchOptions>,
    /// The kernel, initrd, boot image and disks the daemon opened, in that order.
    pub files: Vec<OwnedFd>,
    /// Most bytes the VM's console.log keeps.
    pub console_log_max: u64,
    /// Restore from the snapshot in this subdirectory of the run directory.
    pub restore: Option<&'a str>,
    /// Take the running guest over from the VMM now serving the run directory.
    pub takeover: bool,
    /// ... of a guest migrating in from another host (`--incoming`).
    pub incoming: bool,
}

/// Environment variables a VMM gets from the daemon's (the rest is not passed on).
const PASSED_ENV: [&str; 4] = [
    "KEEL_TRACE_STARTUP",
    "RUST_BACKTRACE",
    vmm_test_hook::FORBIDDEN_SYSCALL_ENV,
    vmm_test_hook::LEAK_MIB_ENV,
];

/// The test hooks' variables (vmm::test_hooks, debug builds of the VMM only), spelled here
/// so that the daemon needs no VMM code.
mod vmm_test_hook {
    pub const FORBIDDEN_SYSCALL_ENV: &str = "KEEL_TEST_FORBIDDEN_SYSCALL";
    pub const LEAK_MIB_ENV: &str = "KEEL_TEST_LEAK_MIB";
}

/// First descriptor number used to park the handed files while the child is set up, above
/// the numbers they are handed at.
const PARKED_FD: i32 = 512;

/// Starts `keel-vmm vmm --dir RUN_DIR --handed-files [--jail ...]` in its own session, so that
/// neither a signal to the daemon's process group nor the daemon's death reaches it, with
/// the VM's files as descriptors 3 on. With a jail, the process started jails a child and
/// ends at once, printing the child's pid: that child is the VMM (a child of the daemon,
/// which is a subreaper). Returns the VMM's pid.
pub fn spawn(launch: Launch) -> Result<u32> {
    let run_dir = launch.run_dir;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        // The run directory belongs to the VM's jailed user, who could leave a link (or a
        // FIFO, which O_NONBLOCK makes fail rather than hang) here.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(run_dir.file(files::VMM_LOG))
        .map_err(|source| Error::Io {
            what: "opening the VMM log",
            path: run_dir.file(files::VMM_LOG),
            source,
        })?;
    // Parked above the numbers they go to, so no dup2 below overwrites one not yet moved.
    let mut parked = Vec::with_capacity(launch.files.len());
    for (i, fd) in launch.files.iter().enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this process owns.
        let high =
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARKED_FD + i as i32) };
        if high < 0 {
            return Err(Error::Io {
                what: "handing over the VM's files",
                path: run_dir.0.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fcntl returned a new descriptor that nothing else owns.
        parked.push(unsafe { OwnedFd::from_raw_fd(high) });
    }
    let mut command = Command::new(launch.vmm_exe);
    command
        .arg("vmm")
        .arg("--dir")
        .arg(&run_dir.0)
        .arg("--handed-files")
        .arg("--console-log-max")
        .arg(launch.console_log_max.to_string())
        .args(launch.restore.iter().flat_map(|r| ["--restore", r]))
        .args(launch.takeover.then_some("--takeover"))
        .args(launch.incoming.then_some("--incoming"))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(if launch.jail.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(log);
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    // A daemon run under libfaketime (the date tests) runs its VMMs under it too.
    for (name, value) in std::env::vars_os() {
        let faked = name.to_str().is_some_and(|n| n.starts_with("FAKETIME"));
        if faked || name == "LD_PRELOAD" {
            command.env(name, value);
        }
    }
    if let Some(options) = &launch.jail {
        command.arg("--jail").arg(options.to_string());
    }
    let sources: Vec<i32> = parked.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: setsid, dup2 and close_range are async-signal-safe system calls that touch
    // only the child being set up; `sources` is not changed after the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (i, fd) in sources.iter().enumerate() {
                // dup2 clears close-on-exec on the new descriptor: it survives the exec.
                if libc::dup2(*fd, HANDED_FIRST_FD + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Descriptors the daemon inherited without close-on-exec (from its own parent:
            // a shell's pipes, a wrapper's) must not live on in every VMM. Marked rather than
            // closed, so std's exec-error pipe keeps working; an older kernel leaves them.
            libc::syscall(
                libc::SYS_close_range,
                (HANDED_FIRST_FD as usize + sources.len()) as u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        exe: launch.vmm_exe.to_path_buf(),
        source,
    })?;
    drop(parked);
    drop(launch.files);
    let Some(mut out) = child.stdout.take() else {
        // Unjailed: the process started is the VMM. Dropped without waiting: the pidfd
        // watch reaps it (`reap`).
        return Ok(child.id());
    };
    // The launcher prints the jailed VMM's pid and ends within milliseconds.
    let mut text = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut out), &mut text);
    let status = child.wait().map_err(|source| Error::Spawn {
        exe: launch.vmm_exe.to_path_buf(),
        source,
    })?;
    match text.trim().parse::<u32>() {
        Ok(pid) if status.success() => Ok(pid),
        _ => Err(Error::Refused {
            reason: run_dir.exit_record().map(|r| r.detail).unwrap_or_else(|| {
                format!(
                    "the VMM's launcher {status} without starting it (see {})",
                    run_dir.file(files::VMM_LOG).display()
                )
            }),
        }),
    }
}

/// Where the handed files start in the VMM (`vmm::host_files::FIRST_HANDED_FD`).
const HANDED_FIRST_FD: i32 = 3;

/// The descriptors of the files a VM uses, in the order the VMM takes them: kernel,
/// initrd, boot image (disk boot's reader: the first disk, read-only, no `O_DIRECT`),
/// disks (a qcow2 disk followed by its backing chain); each opened beneath the host's image
/// directories. Writable disks are locked
/// against any other writer, read-only ones against writers; a disk in use fails the start.
pub fn open_vm_files(spec: &VmSpec, images: &ImageDirs) -> Result<Vec<OwnedFd>> {
    let refused = |e: &dyn std::fmt::Display| Error::Refused {
        reason: e.to_string(),
    };
    let mut fds = Vec::new();
    let plain = |what, path: &str| {
        images
            .open(what, path, libc::O_RDONLY)
            .map(OwnedFd::from)
            .map_err(|e| refused(&e))
    };
    if let Some(kernel) = &spec.kernel {
        fds.push(plain("kernel", kernel)?);
    }
    if let Some(initrd) = &spec.initrd {
        fds.push(plain("initrd", initrd)?);
    }
    // Disk boot's plain view of a raw first disk (another format is read through it, on the
    // disk's own files).
    if spec.kernel.is_none() {
        if let Some(first) = spec.disks.first().filter(|d| d.format.is_raw()) {
            fds.push(plain("boot disk", &first.path)?);
        }
    }
    for d in &spec.disks {
        let files = open_disk(d, images)?;
        files.lock(d.readonly).map_err(|e| refused(&e))?;
        fds.push(OwnedFd::from(files.top));
        fds.extend(
            files
                .backing
                .into_iter()
                .map(|layer| OwnedFd::from(layer.file)),
        );
    }
    Ok(fds)
}

/// One disk's image and (qcow2) its backing chain, by the names its headers give, each
/// beneath the image directories, the chain read-only; the VMM walks the same headers to
/// take them. No lock is taken.
pub(crate) fn open_disk(d: &api::DiskSpec, images: &ImageDirs) -> Result<disk::ImageFiles> {
    let refused = |e: &dyn std::fmt::Display| Error::Refused {
        reason: e.to_string(),
    };
    let access = if d.readonly {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    let direct = if d.direct { libc::O_DIRECT } else { 0 };
    // O_NOATIME where the daemon may (it owns the file or is root), as the VMM would.
    let file = images
        .open("disk", &d.path, access | direct | libc::O_NOATIME)
        .or_else(|_| images.open("disk", &d.path, access | direct))
        .map_err(|e| refused(&e))?;
    let format = crate::library::image_format(d.format);
    open_chain(file, Path::new(&d.path), format, images).map_err(|e| refused(&e))
}

/// `top` (at `path`, in `format`) with the backing chain its headers name, each file
/// opened read-only beneath the image directories.
pub(crate) fn open_chain(
    top: std::fs::File,
    path: &Path,
    format: disk::Format,
    images: &ImageDirs,
) -> std::result::Result<disk::ImageFiles, disk::image::Error> {
    disk::ImageFiles::with_backing(top, path, format, &mut |p| {
        let path = p.to_str().ok_or("its name is not UTF-8")?;
        images
            .open("backing file", path, libc::O_RDONLY)
            .map_err(|e| e.to_string())
    })
}

/// The VM's disks opened for a VMM taking the guest over from another host, without their
/// locks (the source's VMM holds them until it lets go; the new VMM takes them: see
/// `supervisor::migrate_in`).
pub fn open_disks_unlocked(spec: &VmSpec, images: &ImageDirs) -> Result<Vec<disk::ImageFiles>> {
    spec.disks.iter().map(|d| open_disk(d, images)).collect()
}

/// Every live `keel-vmm vmm --dir DIR` process on the host, as (pid, DIR), from /proc. Zombies
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
        if let Some(dir) = run_dir_of(pid) {
            found.push((pid, dir));
        }
    }
    found
}

/// The run directory of process `pid` if it is a `keel-vmm vmm --dir DIR`.
fn run_dir_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(3)
        .find(|w| w[0] == b"vmm" && w[1] == b"--dir")
        .map(|w| PathBuf::from(std::ffi::OsStr::from_bytes(w[2])))
}

/// Of `pids` (a VM's cgroup's), all but another daemon's VMMs: a cgroup is named by a jail
/// identity, which a VM of another daemon on this host (another state directory: tests run
/// two) may hold now. A process whose command line names no run directory stays counted (a
/// VMM that rewrote its own to name another state directory's would not be: the cost of
/// telling two daemons' VMMs apart by what they say).
pub fn of_run_dir(pids: Vec<u32>, run_dir: &RunDir) -> Vec<u32> {
    let ours = run_dir.0.parent();
    pids.into_iter()
        .filter(|&pid| match run_dir_of(pid) {
            Some(dir) => dir == run_dir.0 || dir.parent() == ours,
            None => true,
        })
        .collect()
}

/// Pids of the live `keel-vmm vmm` processes of this run directory.
pub fn processes_of(run_dir: &RunDir) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|(_, dir)| dir == &run_dir.0)
        .map(|(pid, _)| pid)
        .collect()
}

/// One request to a VMM's control socket, with a timeout.
pub async fn control(run_dir: &RunDir, request: &Request) -> Result<Response> {
    control_with_peer(run_dir, request, CONTROL_TIMEOUT, ANSWER_LIMIT)
        .await
        .map(|(r, _)| r)
}

/// The longest answer a VMM may give, but for [`control_large`]'s.
const ANSWER_LIMIT: u64 = 64 * 1024;

/// [`control`] for a request that takes long (a snapshot writes all the guest's memory).
pub async fn control_waiting(
    run_dir: &RunDir,
    request: &Request,
    timeout: Duration,
) -> Result<Response> {
    control_with_peer(run_dir, request, timeout, ANSWER_LIMIT)
        .await
        .map(|(r, _)| r)
}

/// A blocking connection to a VMM's control socket, kept for many requests: a migration's
/// rounds and its switch, asked from a thread of their own with no async runtime between
/// them and the VMM (the guest stands still for the switch's request). Answers may be large
/// (a dirty-page bitmap, a VM's state): up to 64 MiB.
pub struct ControlLink {
    path: PathBuf,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl ControlLink {
    const ANSWER_LIMIT: u64 = 64 << 20;

    /// Connects; each answer is waited for up to `timeout`.
    pub fn connect(run_dir: &RunDir, timeout: Duration) -> Result<ControlLink> {
        let path = run_dir.control_socket();
        let stream = std::os::unix::net::UnixStream::connect(&path)
            .and_then(|s| s.set_read_timeout(Some(timeout)).map(|()| s))
            .and_then(|s| s.set_write_timeout(Some(timeout)).map(|()| s))
            .map_err(|e| Error::Control {
                path: path.clone(),
                reason: format!("cannot connect ({e})"),
            })?;
        Ok(ControlLink {
            path,
            reader: std::io::BufReader::new(stream),
        })
    }

    /// One request and its answer. After an error the link is not to be used again.
    pub fn ask(&mut self, request: &Request) -> Result<Response> {
        self.ask_with_fds(request, &[])
    }

    /// [`Self::ask`], the descriptors `fds` going with the request's line (SCM_RIGHTS): a
    /// jailed VMM opens no file, and takes new ones this way (`switch-disks`).
    pub fn ask_with_fds(&mut self, request: &Request, fds: &[RawFd]) -> Result<Response> {
        use std::io::{BufRead, Read, Write};
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let fail = |reason: String| Error::Control {
            path: self.path.clone(),
            reason,
        };
        let mut line = serde_json::to_string(request).map_err(|e| fail(e.to_string()))?;
        line.push('\n');
        let mut bytes = line.as_bytes();
        // The descriptors ride on the line's first bytes, at most the kernel's 253 a
        // message, each message one byte of the line; the rest follows as usual.
        for chunk in fds.chunks(253) {
            if bytes.len() < 2 {
                return Err(fail("too many descriptors for the request's line".into()));
            }
            let sent = self
                .reader
                .get_ref()
                .send_with_fds(&[&bytes[..1]], chunk)
                .map_err(|e| fail(format!("sending failed ({e})")))?;
            bytes = &bytes[sent..];
        }
        self.reader
            .get_ref()
            .write_all(bytes)
            .map_err(|e| fail(format!("sending failed ({e})")))?;
        let mut answer = String::new();
        // The VMM is hostile: an answer is one line of at most the limit.
        (&mut self.reader)
            .take(Self::ANSWER_LIMIT)
            .read_line(&mut answer)
            .map_err(|e| fail(format!("reading the answer failed ({e})")))?;
        if !answer.ends_with('\n') {
            return Err(fail(format!(
                "the answer ended after {} bytes, unfinished",
                answer.len()
            )));
        }
        parse_answer(&answer).map_err(fail)
    }
}

/// A VMM's answer, or why it is none (its start quoted: a state runs to kilobytes).
fn parse_answer(answer: &str) -> std::result::Result<Response, String> {
    serde_json::from_str::<Response>(answer).map_err(|e| {
        let start: String = answer.chars().take(200).collect();
        let cut = if start.len() < answer.len() {
            "..."
        } else {
            ""
        };
        format!(
            "unreadable answer {start:?}{cut} of {} bytes ({e})",
            answer.len()
        )
    })
}

/// [`control`], with the pid of the socket's owner as the kernel reports it.
async fn control_with_peer(
    run_dir: &RunDir,
    request: &Request,
    timeout: Duration,
    limit: u64,
) -> Result<(Response, Option<u32>)> {
    let path = run_dir.control_socket();
    let fail = |reason: String| Error::Control {
        path: path.clone(),
        reason,
    };
    let exchange = async {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| fail(format!("cannot connect ({e})")))?;
        let peer = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(request).map_err(|e| fail(e.to_string()))?;
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| fail(format!("sending failed ({e})")))?;
        let mut answer = String::new();
        // The VMM is hostile: an answer is one line of at most `limit` bytes.
        BufReader::new(tokio::io::AsyncReadExt::take(read, limit))
            .read_line(&mut answer)
            .await
            .map_err(|e| fail(format!("reading the answer failed ({e})")))?;
        parse_answer(&answer).map(|r| (r, peer)).map_err(fail)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// The VMM's status, if a VMM answers on the socket. Its pid is the one the kernel gives
/// for the socket's owner, in the daemon's PID namespace (a jailed VMM is PID 1 of its own).
pub async fn status(run_dir: &RunDir) -> Result<VmmStatus> {
    let (response, peer) =
        control_with_peer(run_dir, &Request::Status, CONTROL_TIMEOUT, ANSWER_LIMIT).await?;
    match response {
        Response::Status(mut status) => {
            if let Some(pid) = peer {
                status.pid = pid;
            }
            Ok(status)
        }
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
    /// A copy of the process's descriptor `fd` (the same open file, sharing its locks), by
    /// `pidfd_getfd`.
    pub fn copy_fd(&self, fd: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd with this handle's pidfd, a descriptor number and no flags;
        // the result is checked.
        let copy =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.get_ref().as_raw_fd(), fd, 0) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
    }

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
