//! VM lifecycle: start, shutdown, stop, reboot, and what happens when a VMM ends. Every
//! operation on one VM holds that VM's lock, so concurrent requests on it run one after the
//! other and see each other's result; the store is the one record of state.
//!
//! No decision here reads the wall clock (promise 1): timeouts are tokio's monotonic clock;
//! wall-clock times only go into records.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::control::{Request, Response};
use api::{Cause, VmSpec, VmState};
use tokio::sync::watch;

use crate::images::{self, ImageDirs};
use crate::ledger::NewEvent;
use crate::store::{self, StopIntent, Store, Transition, VmRow};
use crate::vmm_process::{self, ProcessEnd, ProcessHandle, RunDir};

mod judge;
mod migrate_in;
mod migrate_out;
mod migrate_pages;
mod migration_link;
mod moves;
mod recovery;
mod restores;
mod snapshot_disks;
mod snapshot_merge;
mod snapshots;
mod upgrade;
use judge::{judge_end, Judged};
pub use upgrade::Upgraded;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no VM named '{0}'; `keel vm list` shows the VMs on this host")]
    NotFound(String),
    #[error("a VM named '{0}' already exists; pick another name or delete it first")]
    Exists(String),
    #[error("VM '{name}' is {state}; {hint}")]
    WrongState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    #[error("VM '{name}' could not start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error(transparent)]
    Spec(#[from] api::vm::SpecError),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Vmm(#[from] vmm_process::Error),
    #[error(transparent)]
    Policy(#[from] images::Error),
    #[error("not started: {0}")]
    Capacity(String),
    #[error(transparent)]
    Library(#[from] crate::library::Error),
    #[error("VM '{name}': its VMM refused: {message}")]
    VmmRefused { name: String, message: String },
    #[error("snapshot of VM '{vm}': {why}")]
    Snapshot { vm: String, why: String },
    #[error("upgrade of VM '{vm}': {why}")]
    Upgrade { vm: String, why: String },
    #[error("migration of VM '{vm}': {why}")]
    Migration { vm: String, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

mod jailing;
mod policy;

pub use policy::{
    meminfo_kib, HostLimits, HostPolicy, DEFAULT_CONSOLE_LOG_MAX, DEFAULT_MAX_VMS,
    DEFAULT_MEMORY_SHARE,
};

/// Where in a VM's run directory the files of a snapshot being restored are put.
pub const RESTORE_DIR: &str = "restore";

/// How long a VMM may take from spawn to answering on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a hard stop waits for the VMM to end before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Default time a guest gets to act on the power button.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// A VMM the daemon watches.
struct Running {
    handle: Arc<ProcessHandle>,
    /// Becomes true once the VMM's end has been recorded in the store.
    ended: watch::Receiver<bool>,
}

pub struct Supervisor {
    pub state_dir: PathBuf,
    vmm_exe: PathBuf,
    store: Mutex<Store>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    intents: Mutex<HashMap<String, StopIntent>>,
    running: Mutex<HashMap<String, Running>>,
    /// VMMs that handed their guest to a new one: their end is no VM's end.
    handed_over: Mutex<std::collections::HashSet<u32>>,
    /// Outgoing live migrations and their progress.
    pub migrations: crate::migration::Migrations,
    /// The latest failed API operations, newest first, for the front page.
    failures: Mutex<std::collections::VecDeque<api::host::FailedOperation>>,
    /// Where VMs' cgroups go; None when VMMs run unjailed (a daemon that is not root).
    cgroups: Option<jail::cgroup::Layout>,
    /// What VMs may touch and how many may run.
    pub(crate) images: ImageDirs,
    /// The image library and the VMs' own disks.
    pub library: crate::library::Library,
    /// Long operations (imports) and their progress.
    pub operations: Arc<crate::operations::Operations>,
    limits: HostLimits,
    console_log_max: u64,
    /// Per VM, the daemon's copy of its jail id's lock while its VMM runs.
    id_locks: Mutex<HashMap<String, std::os::fd::OwnedFd>>,
    /// Per VM, when its VMM started: how long its log was (its own lines come after) and
    /// how many OOM kills its cgroup had counted.
    log_starts: Mutex<HashMap<String, (u64, u64)>>,
    /// The TLS fingerprint and ledger key shown on the front page, set once at start.
    pub identity: std::sync::OnceLock<api::host::HostIdentity>,
    /// When the previous daemon last wrote to the ledger: VMMs that ended while no daemon
    /// watched ended after this (and after their VM's last state change).
    pub unwatched_since_ms: std::sync::atomic::AtomicI64,
    /// The host key that signs the ledger's heads and exports, when it could be read.
    pub host_key: std::sync::OnceLock<Arc<crate::host_key::HostKey>>,
    /// The daemon's last verification of the ledger, as the front page shows it.
    ledger_check: Mutex<Option<api::host::HealthCheck>>,
    store_path: PathBuf,
    /// Whole-ledger reads running at once (each on a blocking thread of its own).
    readers: tokio::sync::Semaphore,
}

/// Whole-ledger reads that may run at once; more wait their turn without holding a thread.
const LEDGER_READERS: usize = 2;

/// What the daemon means by the end of the VMM it stops for an operator's stop or reboot.
/// A reboot's intent asks for the new start, so the end is recorded with the start owed.
fn power_off_intent(actor: &str, restart: bool) -> StopIntent {
    StopIntent {
        cause: Cause::Operator,
        actor: actor.to_string(),
        detail: if restart {
            "rebooted by the operator".into()
        } else {
            "stopped by the operator".into()
        },
        restart,
        killed: false,
    }
}

/// How many failed operations the front page keeps.
const RECENT_FAILURES: usize = 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    pub fn new(
        state_dir: PathBuf,
        vmm_exe: PathBuf,
        store: Store,
        policy: HostPolicy,
    ) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cgroups: policy.cgroups,
            library: policy.library,
            operations: Arc::default(),
            images: policy.images,
            limits: policy.limits,
            console_log_max: policy.console_log_max,
            log_starts: Mutex::new(HashMap::new()),
            identity: std::sync::OnceLock::new(),
            host_key: std::sync::OnceLock::new(),
            unwatched_since_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            ledger_check: Mutex::new(None),
            store_path: store.path().to_path_buf(),
            readers: tokio::sync::Semaphore::new(LEDGER_READERS),
            id_locks: Mutex::new(HashMap::new()),
            state_dir,
            vmm_exe,
            store: Mutex::new(store),
            locks: Mutex::new(HashMap::new()),
            intents: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            handed_over: Mutex::new(std::collections::HashSet::new()),
            migrations: crate::migration::Migrations::default(),
            failures: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    pub fn set_ledger_check(&self, check: api::host::HealthCheck) {
        *lock(&self.ledger_check) = Some(check);
    }

    pub fn ledger_check(&self) -> Option<api::host::HealthCheck> {
        lock(&self.ledger_check).clone()
    }

    /// Runs `f` on the store (short, synchronous work only).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut lock(&self.store))
    }

    /// Runs `f` on a read-only connection of its own, on a blocking thread: whole-ledger
    /// work (verification, SLA reports, anchoring) never holds the store, an async worker or
    /// the recording of VM state changes.
    pub async fn with_reader<T, F>(&self, f: F) -> std::result::Result<T, store::Error>
    where
        F: FnOnce(&rusqlite::Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        let _turn = self
            .readers
            .acquire()
            .await
            .map_err(|e| store::Error::Reader(e.to_string()))?;
        let path = self.store_path.clone();
        tokio::task::spawn_blocking(move || Ok(f(&store::open_reader(&path)?)))
            .await
            .map_err(|e| store::Error::Reader(e.to_string()))?
    }

    pub fn run_dir(&self, name: &str) -> RunDir {
        RunDir::new(&self.state_dir, name)
    }

    pub(crate) fn vm_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn get(&self, name: &str) -> Result<VmRow> {
        self.with_store(|s| s.vm(name))?
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// The VM's row when it runs; else why not, with `hint` on what to do.
    fn running_row(&self, name: &str, hint: &'static str) -> Result<VmRow> {
        let row = self.get(name)?;
        if row.state != VmState::Running {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint,
            });
        }
        Ok(row)
    }

    fn transition(&self, name: &str, change: Transition) -> Result<()> {
        self.with_store(|s| s.transition(name, &change))?;
        Ok(())
    }

    pub fn create(&self, spec: &VmSpec, actor: &str) -> Result<VmRow> {
        spec.validate()?;
        if self.with_store(|s| s.vm(&spec.name))?.is_some()
            || self.migrations.is_arriving(&spec.name)
        {
            return Err(Error::Exists(spec.name.clone()));
        }
        // Disks cloned from library images are made first (milliseconds each), outside the
        // store's lock; a definition that is not stored takes them away again.
        let (spec, made) = self.make_image_disks(spec)?;
        let created = self.with_store(|s| {
            if s.vm(&spec.name)?.is_some() {
                return Err(Error::Exists(spec.name.clone()));
            }
            self.images.check_spec(&spec)?;
            let others = s.vms()?;
            images::check_taps(&spec, others.iter().map(|r| &r.spec))?;
            Ok(s.create_vm(&spec, actor)?)
        });
        if created.is_err() && !made.is_empty() {
            self.remove_vm_disks(&spec.name);
        }
        created
    }

    pub async fn delete(&self, name: &str, actor: &str) -> Result<()> {
        let _held = self.lock_for_request(name).await?;
        let row = self.get(name)?;
        if row.state.has_vmm() {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "stop it first (keel vm stop)",
            });
        }
        self.with_store(|s| -> Result<()> {
            s.delete_vm(name)?;
            s.record(&NewEvent::host(
                Some(name),
                Cause::Operator,
                actor,
                format!("deleted (was {})", row.state),
            ))?;
            Ok(())
        })?;
        let _ = std::fs::remove_dir_all(&self.run_dir(name).0);
        // Its snapshots go with it; then its own disks, but what another VM still reaches.
        let snapshots = self.remove_all_snapshots(name);
        if snapshots > 0 {
            tracing::info!("VM '{name}': its {snapshots} snapshot(s) removed with it");
        }
        self.remove_vm_disks(name);
        Ok(())
    }

    /// Starts a stopped or crashed VM and returns once its VMM answers (or has failed).
    pub async fn start(self: &Arc<Self>, name: &str, cause: Cause, actor: &str) -> Result<()> {
        let guard = self.vm_lock(name);
        let _held = guard.lock().await;
        self.start_locked(name, cause, actor).await
    }

    /// A start that did not get as far as a running VMM leaves the VM stopped, with why.
    fn record_failed_start(
        &self,
        name: &str,
        cause: Cause,
        actor: &str,
        reason: &str,
        time_ms: Option<i64>,
    ) -> Result<()> {
        self.transition(
            name,
            Transition {
                to: VmState::Stopped,
                pid: None,
                cause,
                actor,
                detail: &format!("start failed: {reason}"),
                time_ms,
            },
        )
    }

    async fn start_locked(self: &Arc<Self>, name: &str, cause: Cause, actor: &str) -> Result<()> {
        self.start_from(name, cause, actor, None).await
    }

    /// Starts the VM, booting it, or restoring it from `restore` (a snapshot's name, whose
    /// files are in the run directory's [`RESTORE_DIR`]).
    async fn start_from(
        self: &Arc<Self>,
        name: &str,
        cause: Cause,
        actor: &str,
        restore: Option<&str>,
    ) -> Result<()> {
        let row = self.get(name)?;
        if row.state.has_vmm() {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "it already has a VMM; stop or shut it down first",
            });
        }
        self.transition(
            name,
            Transition {
                to: VmState::Starting,
                pid: None,
                cause,
                actor,
                detail: &match restore {
                    Some(snapshot) => format!("restoring snapshot {snapshot}"),
                    None => "starting".into(),
                },
                time_ms: None,
            },
        )?;
        let run_dir = self.run_dir(name);
        if let Err(e) = self.check_capacity(&row.spec) {
            self.record_failed_start(name, cause, actor, &e.to_string(), None)?;
            return Err(e);
        }
        let jail = match self.jail_for(name, &row.spec) {
            Ok(jail) => jail,
            Err(e) => {
                self.record_failed_start(name, cause, actor, &e.to_string(), None)?;
                return Err(e);
            }
        };
        let spawned = self
            .launch(&row.spec, &run_dir, jail, restore.map(|_| RESTORE_DIR))
            .await;
        let pid = match spawned {
            Ok(pid) => pid,
            Err(vmm_process::Error::Refused { reason }) => {
                self.forget_start(name);
                self.record_failed_start(name, cause, actor, &reason, None)?;
                return Err(Error::StartFailed {
                    name: name.into(),
                    reason,
                });
            }
            Err(e) => {
                self.forget_start(name);
                self.record_failed_start(name, cause, actor, &e.to_string(), None)?;
                // The host cannot start VMMs (run directory, keel binary): a 5xx, not the
                // caller's fault.
                return Err(e.into());
            }
        };
        let handle = Arc::new(ProcessHandle::open(pid)?);
        // Wait for the control socket; the pidfd says whether the VMM died meanwhile.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if handle.has_ended() {
                let end = handle.wait().await;
                let record = run_dir.exit_record();
                // Killed by its jail (seccomp, OOM) before it answered: a crash, with an
                // incident, not merely a start that failed.
                let explained = self.explain_jail_end(name);
                if let (None, Some((jail_cause, detail))) = (&record, explained) {
                    self.transition(
                        name,
                        Transition {
                            to: VmState::Crashed,
                            pid: None,
                            cause: jail_cause,
                            actor: "keel",
                            detail: &detail,
                            time_ms: None,
                        },
                    )?;
                    return Err(Error::StartFailed {
                        name: name.into(),
                        reason: detail,
                    });
                }
                let reason = match &record {
                    Some(r) => r.detail.clone(),
                    None => format!(
                        "the VMM {end} without saying why (see {})",
                        run_dir.file(api::control::files::VMM_LOG).display()
                    ),
                };
                // The daemon saw this end itself: its own clock says when.
                self.record_failed_start(name, cause, actor, &reason, None)?;
                return Err(Error::StartFailed {
                    name: name.into(),
                    reason,
                });
            }
            if let Ok(status) = vmm_process::status(&run_dir).await {
                if status.pid == pid {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = handle.kill(libc::SIGKILL);
                let end = handle.wait().await;
                self.forget_start(name);
                let reason = format!(
                    "the VMM did not answer on its control socket within {START_TIMEOUT:?}; it was killed ({end})"
                );
                self.transition(
                    name,
                    Transition {
                        to: VmState::Crashed,
                        pid: None,
                        cause: Cause::VmmCrash,
                        actor: "keel",
                        detail: &reason,
                        time_ms: None,
                    },
                )?;
                return Err(Error::StartFailed {
                    name: name.into(),
                    reason,
                });
            }
            // Connecting to a socket that is not there yet costs microseconds: poll often.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.transition(
            name,
            Transition {
                to: VmState::Running,
                pid: Some(pid),
                cause,
                actor,
                detail: &format!("started (VMM pid {pid})"),
                time_ms: None,
            },
        )?;
        self.watch(name, handle);
        Ok(())
    }

    /// Watches a VMM until it ends, then records why.
    fn watch(self: &Arc<Self>, name: &str, handle: Arc<ProcessHandle>) {
        let (tx, rx) = watch::channel(false);
        lock(&self.running).insert(
            name.to_string(),
            Running {
                handle: handle.clone(),
                ended: rx,
            },
        );
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let end = handle.wait().await;
            if let Err(e) = this.record_end(&name, handle.pid, end) {
                tracing::error!("recording the end of VM {name}'s VMM failed: {e}");
            }
            // Only its own entry: after an upgrade the name is the new VMM's.
            let mut running = lock(&this.running);
            if running
                .get(&name)
                .is_some_and(|r| r.handle.pid == handle.pid)
            {
                running.remove(&name);
            }
            drop(running);
            let _ = tx.send(true);
        });
    }

    /// Records the end of a VM's VMM from its exit record and what the daemon intended.
    fn record_end(self: &Arc<Self>, name: &str, pid: u32, end: ProcessEnd) -> Result<()> {
        // A VMM that handed its guest to a new one (an upgrade) ended; the VM did not.
        if lock(&self.handed_over).remove(&pid) {
            return Ok(());
        }
        let run_dir = self.run_dir(name);
        let record = run_dir.exit_record();
        let intent = lock(&self.intents).remove(name);
        let judged = self.jail_end(name, judge_end(pid, end, record.as_ref(), intent));
        // The daemon saw this end itself (its pidfd): its own clock says when, not the VMM's
        // exit record.
        if self.record_judged(name, judged, None)? {
            // An operator's reboot holds the VM's lock and starts it itself; this finds the
            // start done then. A guest's reboot is started here.
            let this = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                if let Err(e) = this.start_due(&name).await {
                    tracing::error!("restarting VM {name} after its reboot failed: {e}");
                }
            });
        }
        Ok(())
    }

    /// Records a judged end of a VMM, at `time_ms` (now when None). An end that asks for a
    /// new start (a reboot) records that start as owed in the same transaction, so a daemon
    /// killed before it starts the VM finishes the start when it comes back; returns whether
    /// it did.
    fn record_judged(
        &self,
        name: &str,
        (to, cause, actor, detail, restart): Judged,
        time_ms: Option<i64>,
    ) -> Result<bool> {
        let change = Transition {
            to,
            pid: None,
            cause,
            actor: &actor,
            detail: &detail,
            time_ms,
        };
        self.with_store(|s| {
            if restart {
                s.transition_then_start(name, &change)
            } else {
                s.transition(name, &change)
            }
        })?;
        Ok(restart)
    }

    /// Starts the VM if a start is owed to it (its VMM ended for a reboot and no start has
    /// been recorded since), with the reboot's cause and actor; otherwise (someone started or
    /// deleted it meanwhile) does nothing.
    async fn start_due(self: &Arc<Self>, name: &str) -> Result<()> {
        let guard = self.vm_lock(name);
        let _held = guard.lock().await;
        let owed = self
            .with_store(|s| s.vm(name))?
            .and_then(|r| r.pending_start);
        match owed {
            Some(owed) => self.start_locked(name, owed.cause, &owed.actor).await,
            None => Ok(()),
        }
    }

    /// Remembers what the next end of the VM's VMM means, in memory and in the store.
    fn set_intent(&self, name: &str, intent: StopIntent) {
        if let Err(e) = self.with_store(|s| s.set_stop_intent(name, Some(&intent))) {
            tracing::error!("VM {name}: {e}");
        }
        lock(&self.intents).insert(name.to_string(), intent);
    }

    fn update_intent(&self, name: &str, change: impl FnOnce(&mut StopIntent)) {
        let updated = {
            let mut intents = lock(&self.intents);
            intents.get_mut(name).map(|intent| {
                change(intent);
                intent.clone()
            })
        };
        if let Some(intent) = updated {
            if let Err(e) = self.with_store(|s| s.set_stop_intent(name, Some(&intent))) {
                tracing::error!("VM {name}: {e}");
            }
        }
    }

    fn handle(&self, name: &str) -> Option<(Arc<ProcessHandle>, watch::Receiver<bool>)> {
        lock(&self.running)
            .get(name)
            .map(|r| (r.handle.clone(), r.ended.clone()))
    }

    /// Presses the power button and, unless `wait` is false, waits (up to `timeout`) for the
    /// guest to power off; a guest that does not is stopped hard.
    pub async fn shutdown(
        self: &Arc<Self>,
        name: &str,
        actor: &str,
        timeout: Duration,
    ) -> Result<()> {
        let held = self.lock_for_request(name).await?;
        let row = self.running_row(name, "only a running VM can be shut down")?;
        let Some((handle, mut ended)) = self.handle(name) else {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "its VMM is not watched by this daemon; try again in a moment",
            });
        };
        // The state first: a daemon killed between the two leaves a VM shutting down (whose
        // intent recovery knows, and finishes with the power button), never a running VM
        // with a stored intent, which recovery would take for a hard stop.
        self.transition(
            name,
            Transition {
                to: VmState::ShuttingDown,
                pid: row.pid,
                cause: Cause::Operator,
                actor,
                detail: "power button pressed",
                time_ms: None,
            },
        )?;
        self.set_intent(
            name,
            StopIntent {
                cause: Cause::Operator,
                actor: actor.to_string(),
                detail: "shut down by the operator (power button)".into(),
                restart: false,
                killed: false,
            },
        );
        let run_dir = self.run_dir(name);
        match vmm_process::control(&run_dir, &Request::PowerButton).await {
            Ok(Response::Done) => {}
            Ok(other) => tracing::warn!("VM {name}: power button answer {other:?}"),
            Err(e) => tracing::warn!("VM {name}: pressing the power button failed: {e}"),
        }
        drop(held);
        // The guest's answer is awaited without the lock, so a stop can overtake it.
        if tokio::time::timeout(timeout, ended.wait_for(|e| *e))
            .await
            .is_err()
        {
            // Under the lock again, and only for the same VMM still running: an intent left
            // behind would be taken for the meaning of some later end.
            let _held = self.vm_lock(name).lock_owned().await;
            let same = self.handle(name).is_some_and(|(h, _)| h.pid == handle.pid);
            if !same || *ended.borrow() {
                return Ok(());
            }
            self.set_intent(
                name,
                StopIntent {
                    cause: Cause::Operator,
                    actor: actor.to_string(),
                    detail: format!(
                        "stopped: the guest did not power off within {}s of the power button",
                        timeout.as_secs()
                    ),
                    restart: false,
                    killed: false,
                },
            );
            self.stop_process(name, &handle, &mut ended).await;
        }
        Ok(())
    }

    /// Powers the VM off now (the VMM's Stop, then SIGKILL if it does not end).
    pub async fn stop(self: &Arc<Self>, name: &str, actor: &str) -> Result<()> {
        self.power_off(name, actor, false).await
    }

    /// Power-cycles the VM: hard stop, then start.
    pub async fn reboot(self: &Arc<Self>, name: &str, actor: &str) -> Result<()> {
        self.power_off(name, actor, true).await
    }

    async fn power_off(self: &Arc<Self>, name: &str, actor: &str, restart: bool) -> Result<()> {
        let held = self.lock_for_request(name).await?;
        let row = self.get(name)?;
        let Some((handle, mut ended)) = self.handle(name) else {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: if row.state.has_vmm() {
                    "its VMM is not watched by this daemon; try again in a moment"
                } else {
                    "it is not running (keel vm start)"
                },
            });
        };
        self.set_intent(name, power_off_intent(actor, restart));
        self.stop_process(name, &handle, &mut ended).await;
        // The end was recorded with this start owed (the intent's restart): a daemon killed
        // from here on finishes the reboot when it comes back.
        if restart {
            self.start_locked(name, Cause::Operator, actor).await?;
        }
        drop(held);
        Ok(())
    }

    /// Ends a VMM: Stop over the control socket, SIGKILL if that does not end it.
    async fn stop_process(
        &self,
        name: &str,
        handle: &ProcessHandle,
        ended: &mut watch::Receiver<bool>,
    ) {
        let run_dir = self.run_dir(name);
        // The grace period holds even when the Stop did not get through: a VMM that refuses it
        // is most often already on its way out (its guest just powered off) and writing its
        // exit record. A SIGKILL then would destroy that record, and were the daemon to die
        // before it recorded the stop, its restart would find a VMM gone without a word: a
        // crash. (A hung VMM is killed all the same, after the grace.)
        let _ = vmm_process::control(&run_dir, &Request::Stop).await;
        if tokio::time::timeout(STOP_GRACE, ended.wait_for(|e| *e))
            .await
            .is_err()
        {
            // Said (and stored) before the signal is sent, so the end is judged as this stop
            // when it is seen, by this daemon or the next.
            self.update_intent(name, |intent| intent.killed = true);
            let _ = handle.kill(libc::SIGKILL);
            let _ = ended.wait_for(|e| *e).await;
        }
    }

    /// Remembers a failed operation for the front page.
    pub fn note_failure(&self, failure: api::host::FailedOperation) {
        let mut failures = lock(&self.failures);
        failures.push_front(failure);
        failures.truncate(RECENT_FAILURES);
    }

    pub fn recent_failures(&self) -> Vec<api::host::FailedOperation> {
        lock(&self.failures).iter().cloned().collect()
    }

    /// Whether the daemon currently watches a VMM for this VM.
    pub fn is_watched(&self, name: &str) -> bool {
        lock(&self.running).contains_key(name)
    }
}

#[cfg(test)]
mod tests;
