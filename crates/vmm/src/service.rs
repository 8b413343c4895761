//! `keel vmm --dir RUN_DIR`: one VM run detached, as the host daemon supervises it. Everything
//! it needs and leaves is in the run directory (names in [`api::control::files`]):
//!
//! - reads `vm.json` (an [`api::VmSpec`]);
//! - serves `control.sock` (the control protocol) and `console.sock` (raw serial bytes both
//!   ways), appends guest output to `console.log`; both sockets exist before the guest runs;
//! - on its end writes `exit.json` (an [`ExitRecord`]) atomically, then removes the sockets.
//!
//! A VMM killed outright leaves no `exit.json`: that is how the daemon tells a VMM crash.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use api::control::{files, ExitReason, ExitRecord};

use crate::config::{self, VmConfig};
use crate::exit::VmExit;
use crate::host_files::HostFiles;
use crate::signals::Signals;
use crate::snapshot;
use crate::vm::{self, Frontend, Restore};

/// Longest path a Unix socket address holds (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run directory {dir}: {source}")]
    RunDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the VM definition {path}: {source}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VM definition {path} is not valid JSON of a VM: {source}")]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(
        "another keel vmm already answers on {0}; stop it first, or use another run directory"
    )]
    AlreadyRunning(PathBuf),
    #[error("socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} a Unix socket takes; use a shorter run directory")]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting up the VMM's signals failed: {0}")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Vm(#[from] crate::Error),
    #[error(transparent)]
    Jail(#[from] jail::Error),
    #[error("snapshot name '{0}' is not a plain name of a directory in the run directory")]
    SnapshotName(String),
    #[error("{path}: {source}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: snapshot::file::Error,
    },
}

/// What the VM front end of `keel vmm` is handed: the run directory's open files and sockets.
pub(crate) struct Wiring {
    pub name: String,
    /// The run directory: snapshots are written in it.
    pub run_dir: PathBuf,
    /// The VM's definition, saved with its snapshots.
    pub spec: api::VmSpec,
    pub console_log: File,
    /// Most bytes `console.log` keeps (the oldest output goes first).
    pub console_log_max: u64,
    pub console_socket: UnixListener,
    pub control_socket: UnixListener,
    pub signals: Signals,
}

/// How `keel vmm` was launched.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The kernel, initrd and disks are open descriptors from 3 on (see
    /// [`crate::host_files`]), handed over by the daemon, instead of paths to open.
    pub handed_files: bool,
    /// Enter a jail with this identity and these limits before the VM is built.
    pub jail: Option<jail::LaunchOptions>,
    /// Most bytes `console.log` keeps.
    pub console_log_max: u64,
    /// Restore from the snapshot in this subdirectory of the run directory.
    pub restore: Option<String>,
    /// Take the running guest over from the VMM now serving this run directory (an
    /// upgrade): listen on `takeover.sock` for it (see [`crate::handover`]).
    pub takeover: bool,
    /// The guest taken over comes from another host (a live migration, offered by the
    /// daemon that received its memory): it may take up to [`INCOMING_WAIT`] to come, and
    /// this VMM opens its own taps.
    pub incoming: bool,
}

/// How long a VMM waits for a migrating guest's memory to arrive and its state to follow.
pub const INCOMING_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Runs the VM defined in `dir/vm.json` until it ends; returns why it ended. An `Err` is a
/// failure to start; `exit.json` says so too (except when another VMM owns the directory,
/// which is left alone). With a jail, the process that was started returns `Ok(None)` once
/// the jailed VMM (its child, whose pid it prints on stdout) is on its way.
pub fn run(dir: &Path, launch: &Launch) -> Result<Option<VmExit>, Error> {
    // Before anything else: no thread exists yet, so all later ones inherit the mask.
    let signals = Signals::take_over().map_err(Error::Signals)?;
    let control_path = dir.join(files::CONTROL_SOCKET);
    if !launch.takeover && UnixStream::connect(&control_path).is_ok() {
        return Err(Error::AlreadyRunning(control_path));
    }
    remove_if_present(&dir.join(files::EXIT_RECORD)).map_err(|source| Error::RunDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    // The exit record's file is made now, while the process may still make files (its
    // seccomp filters forbid it later); it is filled in when the VM ends.
    let mut exit_file = None;
    // Taking a guest over, the listener is bound first (before the jail, which makes no
    // file): while it exists the guest is not ours, and nothing of the run directory is
    // touched on the way out.
    let takeover_path = dir.join(crate::handover::TAKEOVER_SOCKET);
    let takeover = if launch.takeover {
        // Bound under another name and renamed: the name appears only once the socket
        // listens (between bind and listen a connection is refused).
        let binding = dir.join(taking_over(crate::handover::TAKEOVER_SOCKET));
        let listener = bind(&binding)?;
        std::fs::rename(&binding, &takeover_path).map_err(|source| Error::File {
            what: "naming the takeover socket",
            path: takeover_path.clone(),
            source,
        })?;
        // Bound as root by a jailed VMM's launcher: the old VMM, jailed as the same user,
        // must be able to connect.
        if let Some(jail) = &launch.jail {
            std::os::unix::fs::chown(&takeover_path, Some(jail.uid), Some(jail.gid)).map_err(
                |source| Error::File {
                    what: "giving the takeover socket to the VM's user",
                    path: takeover_path.clone(),
                    source,
                },
            )?;
        }
        Some(listener)
    } else {
        None
    };
    let started = match prepare(dir, launch, signals.as_raw_fd(), takeover) {
        Ok(Prepared::Outside { child }) => {
            println!("{child}");
            return Ok(None);
        }
        Ok(Prepared::Inside(spec, config, host_files, origin)) => {
            exit_file = api::control::AtomicFile::create(&dir.join(files::EXIT_RECORD), 0o644).ok();
            start(
                dir,
                &spec,
                &config,
                host_files,
                signals,
                launch.console_log_max,
                origin,
            )
        }
        Err(e) => Err(e),
    };
    // A guest handed on, or one never taken over: the VM did not end here, and the run
    // directory's sockets are the other VMM's. No exit record.
    if matches!(started, Ok(VmExit::HandedOver)) {
        // Everything of the run directory is the new VMM's now, its sockets included.
        return started.map(Some);
    }
    if started.is_err() && launch.takeover && takeover_path.exists() {
        // Never taken over: only this VMM's own sockets go.
        for name in [
            files::CONTROL_SOCKET,
            files::CONSOLE_SOCKET,
            files::VSOCK_SOCKET,
        ] {
            let _ = remove_if_present(&dir.join(taking_over(name)));
        }
        let _ = remove_if_present(&takeover_path);
        return started.map(Some);
    }
    let ended = match &started {
        Ok(exit) => ExitRecord {
            reason: exit_reason(exit),
            detail: exit.to_string(),
            time_ms: now_ms(),
        },
        Err(e) => ExitRecord {
            reason: ExitReason::Failed,
            detail: e.to_string(),
            time_ms: now_ms(),
        },
    };
    let written = match exit_file {
        Some(file) => commit_exit_record(file, &ended),
        None => write_exit_record(dir, &ended),
    };
    if let Err(e) = written {
        eprintln!(
            "keel: writing {} failed: {e}",
            dir.join(files::EXIT_RECORD).display()
        );
    }
    for name in [files::CONTROL_SOCKET, files::CONSOLE_SOCKET] {
        let _ = remove_if_present(&dir.join(name));
    }
    started.map(Some)
}

/// Where [`prepare`] left this process.
enum Prepared {
    /// Outside the jail, which `child` runs in.
    Outside { child: u32 },
    /// The process that runs the VM (in its jail, when there is one).
    Inside(Box<api::VmSpec>, Box<VmConfig>, HostFiles, Origin),
}

/// Where the guest comes from.
enum Origin {
    /// A fresh boot.
    Boot,
    /// A snapshot in the run directory.
    Snapshot(Box<Restore>),
    /// Another VMM, which connects to this listener to hand it over (or, when `true`, the
    /// daemon that received it from another host).
    Takeover(UnixListener, bool),
}

/// Reads the definition, opens what the VM uses of the host and enters the jail.
fn prepare(
    dir: &Path,
    launch: &Launch,
    signals_fd: RawFd,
    takeover: Option<UnixListener>,
) -> Result<Prepared, Error> {
    let spec_path = dir.join(files::SPEC);
    let text = api::control::read_run_file(&spec_path).map_err(|source| Error::ReadSpec {
        path: spec_path.clone(),
        source,
    })?;
    let spec: api::VmSpec = serde_json::from_slice(&text).map_err(|source| Error::ParseSpec {
        path: spec_path,
        source,
    })?;
    let config = VmConfig::from_spec(&spec, &dir.join(files::VSOCK_SOCKET))?;
    // A guest taken over comes with the old VMM's disks and taps (their locks, and a tap's
    // one holder, go with the descriptors).
    let host_files = if takeover.is_some() {
        HostFiles::for_takeover(&config, launch.handed_files, launch.incoming)?
    } else if launch.handed_files {
        HostFiles::handed(&config, true)?
    } else {
        HostFiles::open(&config, true)?
    };
    // The snapshot is read and checked before the jail: a bad one is refused before any VM
    // exists, and its memory file is open for the jailed VMM.
    let restore = match &launch.restore {
        Some(name) => Some(Box::new(open_restore(dir, name)?)),
        None => None,
    };
    if let Some(options) = &launch.jail {
        // The snapshot's memory file is mapped inside the jail: it stays open across it.
        let mut keep = vec![signals_fd];
        keep.extend(
            restore
                .as_ref()
                .and_then(|r| r.snapshot_memory.as_ref())
                .map(|f| f.as_raw_fd()),
        );
        keep.extend(takeover.as_ref().map(|l| l.as_raw_fd()));
        let jail = crate::jailing::spec_for_service(
            dir,
            options,
            &host_files,
            config.memory_bytes(),
            &keep,
        )?;
        if let jail::Entered::Parent { child } = jail::enter(&jail)? {
            return Ok(Prepared::Outside { child });
        }
        // stdout is the launcher's answer to the daemon, which reads up to its end: the VMM
        // writes to its log instead.
        // SAFETY: dup2 of two descriptors this process holds.
        unsafe { libc::dup2(2, 1) };
    }
    Ok(Prepared::Inside(
        Box::new(spec),
        Box::new(config),
        host_files,
        match (restore, takeover) {
            (_, Some(listener)) => Origin::Takeover(listener, launch.incoming),
            (Some(restore), None) => Origin::Snapshot(restore),
            (None, None) => Origin::Boot,
        },
    ))
}

fn start(
    dir: &Path,
    spec: &api::VmSpec,
    config: &VmConfig,
    host_files: HostFiles,
    signals: Signals,
    console_log_max: u64,
    origin: Origin,
) -> Result<VmExit, Error> {
    let log_path = dir.join(files::CONSOLE_LOG);
    // Not O_APPEND: the cap moves the log's newest part to its start with positioned writes.
    let console_log = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&log_path)
        .map_err(|source| Error::File {
            what: "opening the console log",
            path: log_path,
            source,
        })?;
    let socket_name = |name: &str| match origin {
        Origin::Takeover(..) => taking_over(name),
        _ => name.to_string(),
    };
    let wiring = Wiring {
        name: spec.name.clone(),
        spec: spec.clone(),
        run_dir: dir.to_path_buf(),
        console_log,
        console_log_max,
        console_socket: bind(&dir.join(socket_name(files::CONSOLE_SOCKET)))?,
        control_socket: bind(&dir.join(socket_name(files::CONTROL_SOCKET)))?,
        signals,
    };
    let (host_files, restore) = match origin {
        Origin::Takeover(listener, incoming) => {
            take_over(dir, config, host_files, &listener, incoming)?
        }
        Origin::Snapshot(restore) => (host_files, Some(*restore)),
        Origin::Boot => (host_files, None),
    };
    Ok(vm::run_with(
        config,
        host_files,
        Frontend::Service(Box::new(wiring)),
        restore,
    )?)
}

/// While taking a guest over, the VMM's sockets are bound under these names and renamed
/// into place on the old VMM's go.
fn taking_over(name: &str) -> String {
    format!("{name}.new")
}

/// Receives the guest from the old VMM: its memory's memfd, taps and disks, then builds the
/// VM's slow parts while the old VMM still runs the guest; its state comes later (see
/// `vm::run_with`).
fn take_over(
    dir: &Path,
    config: &VmConfig,
    mut host_files: HostFiles,
    listener: &UnixListener,
    incoming: bool,
) -> Result<(HostFiles, Option<Restore>), Error> {
    let aborted = |e: &dyn std::fmt::Display| crate::Error::TakeoverAborted(e.to_string());
    let wait = if incoming {
        INCOMING_WAIT
    } else {
        crate::handover::STEP_TIMEOUT
    };
    let offered = crate::handover::receive(listener, wait).map_err(|e| aborted(&e))?;
    // A guest from another host comes without taps: this VMM opened its own.
    let taps_expected = if incoming { 0 } else { config.nets.len() };
    if offered.taps.len() != taps_expected || offered.disks.len() != config.disks.len() {
        return Err(crate::Error::TakeoverAborted(format!(
            "{} taps and {} disks handed over for {} NICs and {} disks",
            offered.taps.len(),
            offered.disks.len(),
            taps_expected,
            config.disks.len()
        ))
        .into());
    }
    host_files.disks = offered
        .disks
        .iter()
        .zip(&config.disks)
        .map(|(files, d)| {
            let mut rest = files.iter().skip(1);
            let top = files[0].try_clone().map_err(|e| e.to_string())?;
            let mut image = disk::ImageFiles::with_backing(top, &d.path, d.format, &mut |p| {
                rest.next()
                    .ok_or_else(|| format!("no file handed over for {}", p.display()))?
                    .try_clone()
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?;
            // An upgrade's disks come locked; a migrating guest's are locked by the daemon
            // when the source's VMM lets go.
            image.lock_deferred = incoming;
            Ok(image)
        })
        .collect::<std::result::Result<_, String>>()
        .map_err(crate::Error::TakeoverAborted)?;
    if !incoming {
        host_files.taps = take_taps(&offered, config).map_err(|e| aborted(&e))?;
    }
    // The slow part (the KVM VM, its memory slots, irqchip and PIT), while the old VMM
    // still runs the guest (or, migrating, while its memory arrives).
    let prebuilt = vm::prebuild(&host_files.kvm, config.memory_bytes(), &offered.memfd)
        .map_err(|e| aborted(&e))?;
    let mut renames: Vec<_> = [files::CONTROL_SOCKET, files::CONSOLE_SOCKET]
        .iter()
        .map(|name| (dir.join(taking_over(name)), dir.join(name)))
        .collect();
    if let Some(v) = &config.vsock {
        renames.push((
            crate::host_files::takeover_name(&v.socket),
            v.socket.clone(),
        ));
    }
    Ok((
        host_files,
        Some(Restore {
            // It comes once the vCPUs and devices exist (see `vm::run_with`).
            state: None,
            pending: Some((offered, wait)),
            snapshot_memory: None,
            takeover: Some(vm::Takeover {
                incoming: None,
                renames,
                lock_disks: incoming.then(|| config.disks.iter().map(|d| d.read_only).collect()),
            }),
            prebuilt: Some(prebuilt),
        }),
    ))
}

fn take_taps(
    offered: &crate::handover::Offered,
    config: &VmConfig,
) -> std::io::Result<Vec<devices::virtio::net::tap::Tap>> {
    offered
        .taps
        .iter()
        .zip(&config.nets)
        .map(|(file, net)| {
            file.try_clone()
                .map(|f| devices::virtio::net::tap::Tap::from_attached(f, &net.tap))
        })
        .collect()
}

/// A snapshot's files in the run directory: `NAME/state` and `NAME/memory`.
pub fn snapshot_files(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(Error::SnapshotName(name.to_string()));
    }
    let sub = dir.join(name);
    Ok((sub.join(SNAPSHOT_STATE), sub.join(SNAPSHOT_MEMORY)))
}

/// The state file of a snapshot's name.
pub const SNAPSHOT_STATE: &str = "state";
/// Its memory file.
pub const SNAPSHOT_MEMORY: &str = "memory";

fn open_restore(dir: &Path, name: &str) -> Result<Restore, Error> {
    let (state_path, memory_path) = snapshot_files(dir, name)?;
    let open = |path: &Path, what| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| Error::File {
                what,
                path: path.to_path_buf(),
                source,
            })
    };
    let state_file = open(&state_path, "opening the snapshot's state file")?;
    let memory = open(&memory_path, "opening the snapshot's memory file")?;
    let state = snapshot::file::read_state(&state_file).map_err(|e| Error::Snapshot {
        path: state_path,
        source: e,
    })?;
    snapshot::file::check_memory(&memory, &state.id, state.memory_bytes).map_err(|e| {
        Error::Snapshot {
            path: memory_path,
            source: e,
        }
    })?;
    Ok(Restore {
        state: Some(state),
        pending: None,
        snapshot_memory: Some(memory),
        takeover: None,
        prebuilt: None,
    })
}

/// Binds a fresh socket at `path`, removing what a previous run left there.
fn bind(path: &Path) -> Result<UnixListener, Error> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    let file_err = |what| {
        move |source| Error::File {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    remove_if_present(path).map_err(file_err("removing the stale socket"))?;
    UnixListener::bind(path).map_err(file_err("binding the socket"))
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// How an exit is recorded for the daemon.
pub fn exit_reason(exit: &VmExit) -> ExitReason {
    match exit {
        VmExit::PowerOff => ExitReason::PowerOff,
        VmExit::Reboot => ExitReason::Reboot,
        VmExit::ConsoleQuit | VmExit::Stopped(_) => ExitReason::Stopped,
        VmExit::Crash(_) => ExitReason::GuestCrash,
        VmExit::Failed(_) => ExitReason::Failed,
        // Never recorded: the VM did not end.
        VmExit::HandedOver => ExitReason::Stopped,
    }
}

/// Wall-clock milliseconds, for the record only: nothing decides from it.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Writes `dir/exit.json` atomically: a temporary file in `dir`, fsync, rename, fsync of
/// `dir`. A reader sees the whole record or none.
pub fn write_exit_record(dir: &Path, record: &ExitRecord) -> io::Result<()> {
    commit_exit_record(
        api::control::AtomicFile::create(&dir.join(files::EXIT_RECORD), 0o644)?,
        record,
    )
}

fn commit_exit_record(file: api::control::AtomicFile, record: &ExitRecord) -> io::Result<()> {
    let mut json = serde_json::to_vec(record).map_err(io::Error::other)?;
    json.push(b'\n');
    file.commit(&json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::StopBy;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keel-svc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn exit_record_is_written_whole_and_replaced() {
        let dir = temp_dir("record");
        let first = ExitRecord {
            reason: ExitReason::PowerOff,
            detail: "guest powered off".into(),
            time_ms: 1,
        };
        write_exit_record(&dir, &first).unwrap();
        let second = ExitRecord {
            reason: exit_reason(&VmExit::Stopped(StopBy::Signal("SIGTERM"))),
            detail: VmExit::Stopped(StopBy::Signal("SIGTERM")).to_string(),
            time_ms: now_ms(),
        };
        write_exit_record(&dir, &second).unwrap();
        let read: ExitRecord =
            serde_json::from_slice(&fs::read(dir.join(files::EXIT_RECORD)).unwrap()).unwrap();
        assert_eq!(read, second);
        assert_eq!(read.reason, ExitReason::Stopped);
        assert_eq!(read.detail, "stopped by SIGTERM");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn over_long_socket_paths_are_refused_before_binding() {
        let long = PathBuf::from(format!("/tmp/{}/control.sock", "d".repeat(100)));
        let e = bind(&long).unwrap_err();
        assert!(e.to_string().contains("shorter run directory"), "{e}");
    }

    #[test]
    fn reasons_map_to_the_record() {
        assert_eq!(exit_reason(&VmExit::Reboot), ExitReason::Reboot);
        assert_eq!(exit_reason(&VmExit::ConsoleQuit), ExitReason::Stopped);
        assert_eq!(exit_reason(&VmExit::Failed("x".into())), ExitReason::Failed);
    }
}
