//! `keel serve`: opens the store, takes the state directory's lock, re-adopts the VMMs that
//! outlived the previous daemon, then serves the API until SIGTERM or SIGINT. Stopping the
//! daemon never stops a VM.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use api::Cause;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, UnixListener};

use crate::auth::Peer;
use crate::ledger::NewEvent;
use crate::store::{self, Store};
use crate::supervisor::{self, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another keel serve already uses the state directory {0}; stop it first or pass another --state-dir")]
    Locked(PathBuf),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Cgroup(#[from] jail::cgroup::Error),
    #[error(transparent)]
    Supervisor(#[from] supervisor::Error),
}

pub struct ServeConfig {
    pub state_dir: PathBuf,
    /// The API's Unix socket (owner-only).
    pub socket: PathBuf,
    /// Also serve on TCP (API tokens required).
    pub listen: Option<SocketAddr>,
    /// The VMM binary, keel-vmm.
    pub vmm_exe: PathBuf,
    /// Where VMs' kernels, initrds and disks must lie (STATE/images when empty).
    pub images: Vec<PathBuf>,
    /// Most VMs running at once.
    pub max_vms: usize,
    /// Share of host RAM running VMs may have, percent.
    pub memory_share_percent: u32,
    /// Most bytes each VM's console.log keeps.
    pub console_log_max: u64,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(cred) => Peer::Unix {
                uid: cred.uid(),
                pid: cred.pid().unwrap_or(0),
            },
            Err(_) => Peer::Unix {
                uid: u32::MAX,
                pid: 0,
            },
        }
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer::Tcp(*stream.remote_addr())
    }
}

/// This boot of the host, so a restarted daemon can tell a host reboot from its own restart.
/// KEEL_BOOT_ID_FILE replaces the kernel's file, so tests can simulate a host reboot.
fn boot_id() -> String {
    let path = std::env::var_os("KEEL_BOOT_ID_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id"));
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Holds an exclusive lock on `<state dir>/daemon.lock` for the daemon's life.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, Error> {
    let path = state_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("opening", &path))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Locked(state_dir.to_path_buf()));
    }
    Ok(file)
}

/// Where VMs' cgroups go. A daemon that is not root cannot jail its VMMs: it says so and
/// runs them unjailed (under their seccomp filters).
fn jail_layout() -> Result<Option<jail::cgroup::Layout>, Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("not root: VMMs run unjailed, with this user's rights (no own uid, namespaces or cgroup), under their seccomp filters");
        return Ok(None);
    }
    let layout = jail::cgroup::Layout::detect()?;
    tracing::info!("VMMs are jailed; cgroups: {}", layout.describe());
    Ok(Some(layout))
}

pub async fn serve(config: ServeConfig) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .map_err(io("creating the state directory", &config.state_dir))?;
    // Resolved once (a link in the operator's path, /var/run say): VMMs' paths then hold
    // none, and vsock's connections to host programs follow no link.
    let config = ServeConfig {
        state_dir: config
            .state_dir
            .canonicalize()
            .map_err(io("resolving the state directory", &config.state_dir))?,
        ..config
    };
    let _lock = lock_state_dir(&config.state_dir)?;
    let store = Store::open(&config.state_dir.join("keel.db"))?;
    let booted_now = boot_id();
    let host_booted = store.meta("boot_id")? != Some(booted_now.clone());
    let cgroups = jail_layout()?;
    // A jailed VMM's launcher ends as soon as the VMM runs: the VMM then becomes this
    // daemon's child, so its end (a seccomp kill's SIGSYS included) is seen in full.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let images = if config.images.is_empty() {
        vec![config.state_dir.join("images")]
    } else {
        config.images.clone()
    };
    let images = crate::images::ImageDirs::new(&images, &config.state_dir)
        .map_err(supervisor::Error::from)?;
    tracing::info!("image directories: {}", images.describe());
    let policy = supervisor::HostPolicy {
        cgroups,
        images,
        limits: supervisor::HostLimits::new(config.max_vms, config.memory_share_percent),
        console_log_max: config.console_log_max,
    };
    let sup = Supervisor::new(
        config.state_dir.clone(),
        config.vmm_exe.clone(),
        store,
        policy,
    );
    sup.with_store(|s| {
        s.record(&NewEvent::host(
            None,
            if host_booted {
                Cause::HostBoot
            } else {
                Cause::DaemonRestart
            },
            "keel",
            format!(
                "daemon started (pid {}, keel {}){}",
                std::process::id(),
                env!("CARGO_PKG_VERSION"),
                if host_booted {
                    " on a newly booted host"
                } else {
                    " again on the same host boot"
                }
            ),
        ))
    })?;
    let (adopted, lost) = sup.recover(host_booted).await?;
    sup.sweep_cgroups();
    sup.with_store(|s| s.set_meta("boot_id", &booted_now))?;
    anchor_ledger(&sup);
    // The head is written down outside SQLite every minute while the ledger grows.
    let anchoring = {
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ANCHOR_INTERVAL);
            loop {
                every.tick().await;
                anchor_ledger(&sup);
            }
        })
    };
    tracing::info!("recovered: {adopted} VMM(s) re-adopted, {lost} found gone");

    let _ = std::fs::remove_file(&config.socket);
    let unix = UnixListener::bind(&config.socket).map_err(io("listening on", &config.socket))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting", &config.socket))?;
    let app = crate::rest::router(sup.clone());
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(
        axum::serve(
            unix,
            app.clone().into_make_service_with_connect_info::<Peer>(),
        )
        .with_graceful_shutdown(stop_signal())
        .into_future(),
    );
    if let Some(addr) = config.listen {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(io("listening on", Path::new(&addr.to_string())))?;
        servers.spawn(
            axum::serve(tcp, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(stop_signal())
                .into_future(),
        );
    }
    eprintln!(
        "keel serve: listening on {}{}; state in {}",
        config.socket.display(),
        config
            .listen
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default(),
        config.state_dir.display()
    );
    while servers.join_next().await.is_some() {}
    anchoring.abort();
    let _ = std::fs::remove_file(&config.socket);
    sup.with_store(|s| {
        s.record(&NewEvent::host(
            None,
            Cause::Operator,
            "keel",
            "daemon stopped; VMs keep running",
        ))
    })?;
    anchor_ledger(&sup);
    Ok(())
}

/// How often the ledger's head is written down outside SQLite.
const ANCHOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes the ledger's head down; a head cut from the ledger is raised as an incident once.
fn anchor_ledger(sup: &Supervisor) {
    let state_dir = sup.state_dir.clone();
    match sup.with_store(|s| crate::anchor::write(&state_dir, s.connection())) {
        Ok(_) => {}
        Err(e @ crate::anchor::Error::Truncated(_)) => {
            let detail = e.to_string();
            let raised = sup.with_store(|s| -> Result<bool, store::Error> {
                if s.open_incidents()?.iter().any(|i| i.summary == detail) {
                    return Ok(false);
                }
                let event = NewEvent::host(None, Cause::DaemonRestart, "keel", detail.clone());
                s.record_incident(&event)?;
                Ok(true)
            });
            match raised {
                Ok(true) => tracing::error!("{detail}"),
                Ok(false) => {}
                Err(e) => tracing::error!("raising the ledger incident: {e}"),
            }
        }
        Err(e) => tracing::error!(
            "writing the ledger anchor {}: {e}",
            crate::anchor::path(&state_dir).display()
        ),
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
