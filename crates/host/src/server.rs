//! `keel serve`: opens the store, takes the state directory's lock, re-adopts the VMMs that
//! outlived the previous daemon, then serves the API until SIGTERM or SIGINT. Stopping the
//! daemon never stops a VM.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::Cause;
use tokio::net::{TcpListener, UnixListener};

use crate::auth::{Access, LocalRoles, Role};
use crate::ledger::NewEvent;
use crate::listen::{Limits, Listener};
use crate::refusals::Refusals;
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
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("plain HTTP is only served on a loopback address, and {0} is not one: drop --insecure-http to serve TLS there")]
    PlainHttpOffLoopback(SocketAddr),
}

pub struct ServeConfig {
    pub state_dir: PathBuf,
    /// The API's Unix socket (owner-only).
    pub socket: PathBuf,
    /// Also serve on TCP (API tokens required).
    pub listen: Option<SocketAddr>,
    /// TLS on TCP: where the certificate comes from; None serves plain HTTP, which only a
    /// loopback `listen` address may do.
    pub tls: Option<crate::tls::Source>,
    /// Roles of local users (by uid) on the Unix socket, beyond root and the daemon's user.
    pub local_roles: Vec<(u32, Role)>,
    /// Connection caps and deadlines of each listener.
    pub limits: Limits,
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

/// Binds the API's Unix socket so that it never exists with a wider mode than `mode`: it is
/// made in a new directory only the daemon can enter, given its mode there, then renamed
/// into place (which also replaces a socket a previous daemon left).
fn bind_private_socket(path: &Path, mode: u32) -> Result<UnixListener, Error> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(".api-socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io("creating", &private))?;
    let inner = private.join("socket");
    let bound = (|| {
        let listener =
            std::os::unix::net::UnixListener::bind(&inner).map_err(io("listening on", &inner))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode))
            .map_err(io("restricting", &inner))?;
        std::fs::rename(&inner, path).map_err(io("moving the API socket to", path))?;
        listener
            .set_nonblocking(true)
            .map_err(io("configuring", path))?;
        UnixListener::from_std(listener).map_err(io("listening on", path))
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// What the front page says of the TCP listener's certificate.
struct TlsShown {
    fingerprint: String,
    cert_path: PathBuf,
    not_after_ms: Option<i64>,
}

/// The TCP listener, with TLS unless plain HTTP was asked for on a loopback address.
async fn tcp_listener(
    addr: SocketAddr,
    config: &ServeConfig,
) -> Result<(Listener, Option<TlsShown>), Error> {
    let tls = match &config.tls {
        None if !addr.ip().is_loopback() => return Err(Error::PlainHttpOffLoopback(addr)),
        None => None,
        Some(source) => Some(crate::tls::server(&config.state_dir, source, addr)?),
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(io("listening on", Path::new(&addr.to_string())))?;
    let shown = tls.as_ref().map(|t| TlsShown {
        fingerprint: t.fingerprint.clone(),
        cert_path: t.cert_path.clone(),
        not_after_ms: t.not_after_ms,
    });
    if let Some(t) = &tls {
        tracing::info!(
            "TLS certificate {}{}; SHA-256 fingerprint {}",
            t.cert_path.display(),
            if t.generated {
                " (self-signed, made now)"
            } else {
                ""
            },
            t.fingerprint
        );
    }
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config));
    Ok((
        Listener::Tcp {
            listener,
            tls: acceptor,
        },
        shown,
    ))
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
    let mut store = Store::open(&config.state_dir.join("keel.db"))?;
    // The evidence first: the ledger is checked against its signed anchor before the daemon
    // writes a row of its own (on a blocking thread: it reads the whole ledger).
    let keys = Arc::new(crate::evidence::load_key(&config.state_dir));
    let (store, findings) = {
        let (keys, state_dir) = (keys.clone(), config.state_dir.clone());
        tokio::task::spawn_blocking(move || {
            let findings = crate::evidence::check_at_start(&mut store, &state_dir, &keys);
            (store, findings)
        })
        .await
        .map_err(|e| store::Error::Reader(e.to_string()))?
    };
    let (findings, ledger_check) = findings?;
    // When the previous daemon last wrote: VMMs that ended unwatched ended after this.
    let unwatched_since: i64 = store
        .connection()
        .query_row("SELECT COALESCE(MAX(time_ms), 0) FROM ledger", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
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
    let library = crate::library::Library::open(images.first())
        .map_err(|e| crate::images::Error::BadDir {
            path: images.first().join("library"),
            why: format!("making the image library there failed: {e}"),
        })
        .map_err(supervisor::Error::from)?;
    let policy = supervisor::HostPolicy {
        cgroups,
        library,
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
    sup.unwatched_since_ms
        .store(unwatched_since, std::sync::atomic::Ordering::Relaxed);
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
    sup.set_ledger_check(ledger_check);
    crate::evidence::raise(&sup, findings);
    let (adopted, lost) = sup.recover(host_booted).await?;
    sup.sweep_cgroups();
    sup.with_store(|s| s.set_meta("boot_id", &booted_now))?;
    crate::evidence::every_minute(&sup, &keys);
    let anchoring = {
        let (sup, keys) = (sup.clone(), keys.clone());
        tokio::spawn(async move {
            let mut minute = tokio::time::interval(ANCHOR_INTERVAL);
            let mut verified = tokio::time::Instant::now();
            loop {
                minute.tick().await;
                crate::evidence::every_minute(&sup, &keys);
                if verified.elapsed() >= VERIFY_INTERVAL {
                    crate::evidence::verify_all(&sup, &keys).await;
                    verified = tokio::time::Instant::now();
                }
            }
        })
    };
    tracing::info!("recovered: {adopted} VMM(s) re-adopted, {lost} found gone");

    // Local users other than root and the daemon's own reach the socket only when some have
    // a role; the kernel's peer credentials then decide, and users without one are refused.
    let socket_mode = if config.local_roles.is_empty() {
        0o600
    } else {
        0o666
    };
    // TCP first: once the socket exists (what scripts wait for), every listener is up.
    let tcp = match config.listen {
        Some(addr) => Some(tcp_listener(addr, &config).await?),
        None => None,
    };
    let unix = bind_private_socket(&config.socket, socket_mode)?;
    if let Some(key) = &keys.key {
        let _ = sup.host_key.set(key.clone());
    }
    let shown = tcp.as_ref().and_then(|(_, s)| s.as_ref());
    let _ = sup.identity.set(api::host::HostIdentity {
        tls_fingerprint: shown.map(|s| s.fingerprint.clone()),
        tls_certificate: shown.map(|s| s.cert_path.display().to_string()),
        tls_not_after: shown.and_then(|s| s.not_after_ms).map(crate::time::rfc3339),
        tls_not_after_ms: shown.and_then(|s| s.not_after_ms),
        ledger_public_key: keys.key.as_ref().map(|k| k.public_hex()),
    });
    let refusals = Arc::new(Refusals::default());
    let access = Arc::new(Access {
        local: LocalRoles::new(&config.local_roles),
        refusals: refusals.clone(),
        sessions: Default::default(),
        tls: config.tls.is_some(),
        answers: Default::default(),
    });
    let app = crate::rest::router(sup.clone(), access)
        .merge(crate::ui::router())
        .layer(axum::middleware::from_fn(crate::ui::security_headers));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(crate::listen::serve(
        Listener::Unix(unix),
        app.clone(),
        config.limits,
        refusals.clone(),
        stop_rx.clone(),
    ));
    let mut listening = config.socket.display().to_string();
    if let Some((listener, shown)) = tcp {
        if let (Some(addr), Some(fp)) = (config.listen, shown.as_ref().map(|s| &s.fingerprint)) {
            listening =
                format!("{listening} and https://{addr} (certificate SHA-256 fingerprint {fp})");
        } else if let Some(addr) = config.listen {
            listening = format!("{listening} and http://{addr} (plain HTTP, loopback only)");
        }
        servers.spawn(crate::listen::serve(
            listener,
            app,
            config.limits,
            refusals.clone(),
            stop_rx,
        ));
    }
    // Refusals are written down a row per peer and minute, as each minute ends.
    let summarising = {
        let (sup, refusals) = (sup.clone(), refusals.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every.tick().await;
                record_refusals(&sup, &refusals, false);
            }
        })
    };
    eprintln!(
        "keel serve: listening on {listening}; state in {}",
        config.state_dir.display()
    );
    stop_signal().await;
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    summarising.abort();
    record_refusals(&sup, &refusals, true);
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
    crate::evidence::every_minute(&sup, &keys);
    Ok(())
}

/// Writes the refusals of the minutes that ended (of all minutes when `all`) to the ledger.
fn record_refusals(sup: &Supervisor, refusals: &Refusals, all: bool) {
    for row in refusals.take_rows(crate::time::now_ms(), all) {
        if let Err(e) = sup.with_store(|s| s.record(&row)) {
            tracing::error!("recording refused requests: {e}");
        }
    }
}

/// How often the ledger's head is written down durably and the anchor re-read.
const ANCHOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the whole ledger is verified again while the daemon runs.
const VERIFY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

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
