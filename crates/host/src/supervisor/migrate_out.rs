//! Moving a running VM to another host's daemon (see [`crate::migration`] for the protocol).
//! The link is driven from a blocking thread of its own: it reads guest memory from the
//! VMM's memfd (opened through /proc: the jailed VMM names its descriptor) and writes a
//! WebSocket over TLS, pinned to the target's certificate. The VMM is asked over its control
//! socket for what was written since the last round, and, in one request for the switch, to
//! pause, give up its disks' locks and hand out its state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::control::{Request, Response};
use api::migration::{MigrateRequest, MigrationPhase, MigrationProgress};
use api::{Cause, VmState};

use super::migrate_pages::{open_memfd, Sender};
use super::migration_link::Link;
use super::{Error, Result, Supervisor};
use crate::ledger::NewEvent;
use crate::migration::{self as wire, Message, Outgoing, PAGE};
use crate::store::Transition;
use crate::vmm_process::{self, RunDir};

/// How long the source waits for its VMM at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Copy rounds after the first before a migration that does not converge gives up.
const MAX_ROUNDS: u32 = 30;
/// So few pages written in a round that the switch takes them without another round.
const FEW_PAGES: u64 = 64;
/// Rounds in a row that send no less than the best one before a migration gives up.
const STALLED_ROUNDS: u32 = 5;
/// The budget's part kept for the state and the switch itself.
const SWITCH_COST: Duration = Duration::from_millis(2);

fn migration_err(vm: &str, why: impl std::fmt::Display) -> Error {
    Error::Migration {
        vm: vm.to_string(),
        why: why.to_string(),
    }
}

/// Why a migration ended without moving the VM, and whether the guest was left paused.
pub(super) struct Failed {
    why: String,
    cancelled: bool,
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Failed {
        Failed {
            why: e.to_string(),
            cancelled: false,
        }
    }
}

/// What the VMM was made to do so far, to be undone if the migration fails.
#[derive(Default)]
struct Undo {
    tracking: bool,
    paused: bool,
    /// When the guest paused (its ledger row is written once the switch is over).
    paused_at_ms: Option<i64>,
    unlocked: bool,
    /// The VMM resumed the guest itself (a switch it could not complete).
    resumed: bool,
}

/// The switch's steps and how long each took, for the progress (where the pause goes).
struct Steps<'a> {
    outgoing: &'a Outgoing,
    last: Instant,
}

impl<'a> Steps<'a> {
    fn new(outgoing: &'a Outgoing) -> Self {
        outgoing.update(|p| p.switch_steps.clear());
        Steps {
            outgoing,
            last: Instant::now(),
        }
    }

    /// A step and its parts, as the other side measured them.
    fn done_split(&mut self, step: &str, parts: &[(&str, f64)]) {
        self.done(step);
        self.outgoing.update(|p| {
            for (part, ms) in parts {
                p.switch_steps.push(api::migration::MigrationStep {
                    step: format!("{step}: {part}"),
                    ms: *ms,
                })
            }
        });
    }

    fn done(&mut self, step: &str) {
        let ms = self.last.elapsed().as_secs_f64() * 1000.0;
        self.last = Instant::now();
        self.outgoing.update(|p| {
            p.switch_steps.push(api::migration::MigrationStep {
                step: step.to_string(),
                ms,
            })
        });
    }
}

impl Supervisor {
    /// Starts moving running VM `name` to the daemon at `request.to`; returns at once with
    /// the migration's first progress (follow it with [`Supervisor::migration`]).
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        request: MigrateRequest,
        actor: &str,
    ) -> Result<MigrationProgress> {
        let row = self.running_row(
            name,
            "only a running VM migrates (start it, or resume it, first)",
        )?;
        let addr = request
            .to
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/').to_string())
            .ok_or_else(|| {
                migration_err(
                    name,
                    format!("--to '{}' is not https://HOST:PORT", request.to),
                )
            })?;
        let fingerprint = crate::tls::parse_fingerprint(&request.fingerprint).ok_or_else(|| {
            migration_err(
                name,
                "the target's fingerprint is not a SHA-256 fingerprint (64 hex digits)",
            )
        })?;
        let max_downtime_ms = request.max_downtime_ms.unwrap_or(50);
        let outgoing = self
            .migrations
            .begin(wire::starting(
                name,
                &request.to,
                row.spec.memory_mib << 20,
                max_downtime_ms,
            ))
            .ok_or_else(|| Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "it is migrating already (keel vm migrate NAME --cancel stops that)",
            })?;
        let first = outgoing.progress();
        let (this, name, actor) = (self.clone(), name.to_string(), actor.to_string());
        tokio::spawn(async move {
            let guard = this.vm_lock(&name);
            let _held = guard.lock().await;
            let started = Instant::now();
            let target = Target {
                addr,
                fingerprint,
                token: request.token,
                max_downtime: Duration::from_millis(max_downtime_ms),
                max_bandwidth: request.max_bandwidth_mib_s.map(|m| m << 20),
            };
            let (t, n, o) = (this.clone(), name.clone(), outgoing.clone());
            let moved = tokio::task::spawn_blocking(move || t.move_out(&n, &o, &target))
                .await
                .unwrap_or_else(|e| {
                    Err(Failed {
                        why: format!("the migration's thread failed: {e}"),
                        cancelled: false,
                    })
                });
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            match moved {
                Ok((downtime, there)) => {
                    outgoing.update(|p| {
                        p.phase = MigrationPhase::Done;
                        p.downtime_ms = Some(downtime.as_secs_f64() * 1000.0);
                        p.elapsed_ms = elapsed;
                    });
                    if let Err(e) = this.moved_out(&name, &actor, &outgoing.progress(), &there) {
                        tracing::error!("recording VM {name}'s migration failed: {e}");
                    }
                }
                Err(failed) => {
                    outgoing.update(|p| {
                        p.phase = if failed.cancelled {
                            MigrationPhase::Cancelled
                        } else {
                            MigrationPhase::Failed
                        };
                        p.error = Some(failed.why.clone());
                        p.elapsed_ms = elapsed;
                    });
                    let _ = this.with_store(|s| {
                        s.record(&NewEvent::host(
                            Some(&name),
                            Cause::Operator,
                            &actor,
                            format!(
                                "migration to {} {}: {}",
                                outgoing.progress().to,
                                if failed.cancelled {
                                    "cancelled"
                                } else {
                                    "failed"
                                },
                                failed.why
                            ),
                        ))
                    });
                }
            }
        });
        Ok(first)
    }

    /// The VM's migration under way, or its last one's outcome.
    pub fn migration(&self, name: &str) -> Result<MigrationProgress> {
        self.get(name)?;
        self.migrations
            .get(name)
            .map(|m| m.progress())
            .ok_or_else(|| migration_err(name, "it has not been migrated since the daemon started"))
    }

    /// Cancels the VM's migration; it ends before the switch with the VM running here.
    /// The VM's lock for an operator's request on it; refused at once while the VM migrates
    /// away (the migration holds the lock until it ends), saying how to end that.
    pub(super) async fn lock_for_request(
        &self,
        name: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        if let Some(m) = self.migrations.get(name) {
            if !m.progress().phase.is_over() {
                return Err(Error::WrongState {
                    name: name.into(),
                    state: self.get(name).map_or(VmState::Running, |r| r.state),
                    hint: "it is migrating: follow it (keel vm migration NAME), or cancel it (keel vm migrate NAME --cancel) before the switch",
                });
            }
        }
        Ok(self.vm_lock(name).lock_owned().await)
    }

    pub fn cancel_migration(&self, name: &str) -> Result<MigrationProgress> {
        let m = self
            .migrations
            .get(name)
            .filter(|m| !m.progress().phase.is_over())
            .ok_or_else(|| migration_err(name, "it is not migrating"))?;
        m.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(m.progress())
    }

    /// The VM runs on the target: the ledger says so, its VMM here ends, and its definition
    /// goes (its disk files stay: the target's VMM uses them).
    fn moved_out(
        &self,
        name: &str,
        actor: &str,
        progress: &MigrationProgress,
        there: &str,
    ) -> Result<()> {
        let downtime = progress.downtime_ms.unwrap_or(0.0);
        if let Some((handle, _)) = self.handle(name) {
            super::lock(&self.handed_over).insert(handle.pid);
            let _ = handle.kill(libc::SIGKILL);
        }
        self.forget_start(name);
        self.transition(
            name,
            Transition {
                to: VmState::Stopped,
                pid: None,
                cause: Cause::Operator,
                actor,
                detail: &format!(
                    "migrated out to {} ({there}): stood still {downtime:.3} ms",
                    progress.to
                ),
                time_ms: None,
            },
        )?;
        self.with_store(|s| -> Result<()> {
            s.record(&NewEvent::host(
                Some(name),
                Cause::Operator,
                actor,
                format!(
                    "migrated-out to {} ({there}) in {:.0} ms, {} rounds, {:.1} MiB sent, stood still {downtime:.3} ms",
                    progress.to,
                    progress.elapsed_ms,
                    progress.rounds,
                    progress.bytes_sent as f64 / f64::from(1 << 20)
                ),
            ))?;
            s.delete_vm(name)?;
            Ok(())
        })?;
        let _ = std::fs::remove_dir_all(&self.run_dir(name).0);
        Ok(())
    }

    /// The whole migration, on a blocking thread: returns how long the guest stood still and
    /// the target's host name.
    fn move_out(
        self: &Arc<Self>,
        name: &str,
        outgoing: &Outgoing,
        target: &Target,
    ) -> std::result::Result<(Duration, String), Failed> {
        let run_dir = self.run_dir(name);
        let vmm = Vmm {
            run_dir: &run_dir,
            link: Default::default(),
        };
        let mut undo = Undo::default();
        let pid = self.handle(name).map(|(h, _)| h.pid);
        let moved = self.move_out_steps(&vmm, name, outgoing, target, &mut undo);
        if let Some(at) = undo.paused_at_ms {
            let _ = self.transition(
                name,
                Transition {
                    to: VmState::Paused,
                    pid,
                    cause: Cause::Maintenance,
                    actor: "keel",
                    detail: &format!("paused to migrate to {}", outgoing.progress().to),
                    time_ms: Some(at),
                },
            );
        }
        if let Err(failed) = &moved {
            // Back to running here, whatever step failed (each undo is for what was done).
            let mut left_paused = None;
            if undo.unlocked {
                match vmm.ask(&Request::DiskLocks { held: true }) {
                    Ok(Response::Done) => {}
                    other => {
                        left_paused = Some(format!(
                            "{}; then taking the disks' locks back failed ({}): the VM is left paused here, and may run on the target: check it there before resuming it here",
                            failed.why,
                            answer_text(other)
                        ))
                    }
                }
            }
            if undo.paused && left_paused.is_none() {
                let resumed = if undo.resumed {
                    Ok(())
                } else {
                    match vmm.ask(&Request::Resume) {
                        Ok(Response::Resumed(_)) => Ok(()),
                        other => Err(answer_text(other)),
                    }
                };
                match resumed {
                    Ok(()) => {
                        // The daemon's record of the pause ends with the resume.
                        let _ = self.transition(
                            name,
                            Transition {
                                to: VmState::Running,
                                pid,
                                cause: Cause::Maintenance,
                                actor: "keel",
                                detail: "resumed here: the migration did not complete",
                                time_ms: None,
                            },
                        );
                    }
                    Err(answer) => {
                        left_paused = Some(format!(
                            "{}; then resuming it here failed ({answer}): the VM is left paused (keel vm resume tries again)",
                            failed.why,
                        ))
                    }
                }
            }
            if undo.tracking {
                let _ = vmm.ask(&Request::DirtyLog { on: false });
            }
            if let Some(why) = left_paused {
                return Err(Failed {
                    why,
                    cancelled: failed.cancelled,
                });
            }
        }
        moved
    }

    fn move_out_steps(
        &self,
        vmm: &Vmm,
        name: &str,
        outgoing: &Outgoing,
        target: &Target,
        undo: &mut Undo,
    ) -> std::result::Result<(Duration, String), Failed> {
        let begun = Instant::now();
        let spec = self.get(name)?.spec;
        // The arbiter of a switch whose outcome is lost (see below).
        let has_writable_disk = spec.disks.iter().any(|d| !d.readonly);
        let pid = self
            .handle(name)
            .map(|(h, _)| h.pid)
            .ok_or("its VMM is not watched by this daemon")?;
        let disks = disk_proofs(&spec, &self.images)?;
        let _markers = Markers(disks.clone());
        let mut link = Link::connect(&target.addr, &target.fingerprint, &target.token)?;
        let memory = match vmm.ask(&Request::MigrationStart)? {
            Response::MigrationStarted(m) => m,
            other => return Err(unexpected(other).into()),
        };
        undo.tracking = true;
        let memfd = open_memfd(pid, memory.memfd, memory.memory_bytes)?;
        let pages = memory.memory_bytes / PAGE as u64;
        link.send(&Message::Hello {
            version: wire::VERSION,
            from: crate::health::hostname(),
            spec: Box::new(spec),
            memory_bytes: memory.memory_bytes,
            disks,
        })?;
        let there = match link.receive()? {
            Message::Accepted { host } => host,
            Message::Refused { why } => return Err(format!("the target refused: {why}").into()),
            other => return Err(format!("the target answered {other:?}").into()),
        };
        outgoing.update(|p| p.phase = MigrationPhase::Copying);
        let mut sender = Sender::new(&mut link, &memfd, outgoing, target.max_bandwidth);
        // Round 0: every page the guest ever touched (the memfd's data), zero pages skipped.
        let mut last_reading = Instant::now();
        sender.send_extents(pages)?;
        let mut bandwidth = sender.rate();
        let (mut fewest, mut stalled, mut previous) = (u64::MAX, 0, u64::MAX);
        // The last reading of the log, whose pages go just before the switch.
        let pending: Vec<u64>;
        loop {
            if outgoing.is_cancelled() {
                return Err(cancelled());
            }
            let bitmap = match vmm.ask(&Request::DirtyPages)? {
                Response::DirtyPages { bitmap, .. } => bitmap,
                other => return Err(unexpected(other).into()),
            };
            let dirty: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            let round_time = last_reading.elapsed().as_secs_f64().max(1e-6);
            last_reading = Instant::now();
            let bytes = dirty as f64 * PAGE as f64;
            let expected = Duration::from_secs_f64(bytes / bandwidth.max(1.0)) + SWITCH_COST;
            outgoing.update(|p| {
                p.rounds += 1;
                p.dirty_pages = dirty;
                p.dirty_rate_mib_s = bytes / round_time / f64::from(1 << 20);
                p.bandwidth_mib_s = bandwidth / f64::from(1 << 20);
                p.expected_downtime_ms = expected.as_secs_f64() * 1000.0;
                p.elapsed_ms = begun.elapsed().as_secs_f64() * 1000.0;
            });
            // Within the budget, one more round while the rest still halves: what is left
            // crosses while the guest stands still.
            if expected <= target.max_downtime && (dirty <= FEW_PAGES || dirty * 2 > previous) {
                // The log was read (and cleared): its pages go before the switch.
                pending = bitmap;
                break;
            }
            previous = dirty;
            // Rounds that leave no less to send than the best one so far do not converge.
            if dirty < fewest {
                fewest = dirty;
                stalled = 0;
            } else {
                stalled += 1;
            }
            let rounds = outgoing.progress().rounds;
            if rounds > MAX_ROUNDS || stalled >= STALLED_ROUNDS {
                let p = outgoing.progress();
                return Err(format!(
                    "it did not converge in {rounds} rounds: the guest writes {:.1} MiB/s and the link carries {:.1} MiB/s, so the switch would stand it still {:.0} ms, over the {} ms allowed; allow more downtime (--max-downtime), more bandwidth, or migrate when the guest is quieter",
                    p.dirty_rate_mib_s, p.bandwidth_mib_s, p.expected_downtime_ms, p.max_downtime_ms
                )
                .into());
            }
            sender.send_pages(wire::set_pages(&bitmap))?;
            bandwidth = bandwidth.max(sender.rate());
        }
        // The last round's pages go while the guest still runs: the switch carries only
        // what it writes from here.
        sender.send_pages(wire::set_pages(&pending))?;
        // The switch: the guest stands still from here.
        if outgoing.is_cancelled() {
            return Err(cancelled());
        }
        outgoing.update(|p| p.phase = MigrationPhase::Switching);
        sender.link.send(&Message::Stopping)?;
        match sender.link.receive()? {
            Message::Defined => {}
            Message::Abort { why } | Message::Refused { why } => {
                return Err(format!("the target gave up: {why}").into())
            }
            other => return Err(format!("the target answered {other:?} to stopping").into()),
        }
        let stood_still = Instant::now();
        let mut steps = Steps::new(outgoing);
        // One request pauses the guest, reads the last log, releases the disks and saves
        // the state; on an error the VMM has undone it all (the guest runs on).
        undo.paused_at_ms = Some(crate::time::now_ms());
        let switched = match vmm.ask(&Request::MigrationSwitch) {
            Ok(Response::MigrationSwitched(s)) => s,
            failed => {
                let why = match failed {
                    Ok(Response::Error { message }) => message,
                    Ok(other) => unexpected(other),
                    Err(e) => format!("the VMM did not answer the switch: {e}"),
                };
                // The VMM undoes a switch it could not complete, but may fail to resume:
                // whether it is paused tells (and then the undo below tries again).
                let paused = match vmm.ask(&Request::Status) {
                    Ok(Response::Status(s)) => s.paused,
                    _ => true,
                };
                if why.starts_with("pausing failed") && !paused {
                    // It never stood still.
                    undo.paused_at_ms = None;
                } else {
                    undo.paused = true;
                    undo.unlocked = paused;
                    undo.resumed = !paused;
                }
                return Err(why.into());
            }
        };
        undo.paused = true;
        undo.unlocked = true;
        let us = |us: u64| us as f64 / 1000.0;
        steps.done_split(
            "pause, log, locks, state",
            &[
                ("vCPUs stopped", us(switched.pause.vcpus_stopped_us)),
                ("devices settled", us(switched.pause.devices_settled_us)),
                ("dirty log", us(switched.dirty_us)),
                ("locks released", us(switched.release_us)),
                ("state saved", us(switched.state_us)),
            ],
        );
        sender.send_pages(wire::set_pages(&switched.bitmap))?;
        steps.done("last pages");
        if outgoing.is_cancelled() {
            return Err(cancelled());
        }
        // From here the target may run the guest (a state that failed to send may still
        // have reached it): only its word, or the disks' locks, tell.
        let sent = sender.link.send(&Message::State {
            state: switched.state,
        });
        // After the state the target decides by the disks' locks; an abort says nothing more.
        sender.link.finish();
        let outcome = sent.and_then(|()| sender.link.receive());
        // The target gives up only once its VMM ended: it does not run the guest.
        let (why, target_gave_up) = match outcome {
            Ok(Message::Running { build_us, .. }) => {
                steps.done_split("target running", &[("its VMM", build_us as f64 / 1000.0)]);
                return Ok((stood_still.elapsed(), there));
            }
            Ok(Message::Abort { why }) | Ok(Message::Refused { why }) => {
                (format!("the target gave up: {why}"), true)
            }
            Ok(other) => (format!("the target answered {other:?} to the state"), false),
            Err(e) => (e, false),
        };
        if !has_writable_disk && !target_gave_up {
            undo.paused = false;
            undo.unlocked = false;
            return Err(format!("{why}; the VM has no writable disk whose lock would tell whether the target runs it, so it is left paused here: check the target, then resume it here (keel vm resume) only if it does not run there").into());
        }
        match vmm.ask(&Request::DiskLocks { held: true }) {
            // The target never took the disks: the guest is still ours.
            Ok(Response::Done) => {
                undo.unlocked = false;
                Err(why.into())
            }
            // It holds the arbiter: it runs the guest.
            Ok(Response::LockedElsewhere { .. }) if !target_gave_up => {
                Ok((stood_still.elapsed(), there))
            }
            other => {
                undo.paused = false;
                undo.unlocked = false;
                Err(format!("{why}; whether the target runs the guest could not be told (taking the disks' locks back: {}), so it is left paused here: check the target, then resume it here only if it does not run there", answer_text(other)).into())
            }
        }
    }
}

fn answer_text(answer: std::result::Result<Response, String>) -> String {
    match answer {
        Ok(Response::Error { message }) | Ok(Response::LockedElsewhere { message }) => message,
        Ok(other) => format!("{other:?}"),
        Err(e) => e,
    }
}

pub(super) fn cancelled() -> Failed {
    Failed {
        why: "cancelled by an operator".into(),
        cancelled: true,
    }
}

fn unexpected(answer: Response) -> String {
    match answer {
        Response::Error { message } => format!("the VMM refused: {message}"),
        other => format!("the VMM answered {other:?}"),
    }
}

/// The disks' markers, removed when the migration ends either way.
struct Markers(Vec<wire::DiskProof>);

impl Drop for Markers {
    fn drop(&mut self) {
        self.0.iter().for_each(wire::remove_proof);
    }
}

/// Where the VM goes.
struct Target {
    addr: String,
    fingerprint: String,
    token: String,
    max_downtime: Duration,
    max_bandwidth: Option<u64>,
}

/// The VMM's control socket, from the blocking thread: one connection, made again after
/// an error.
struct Vmm<'a> {
    run_dir: &'a RunDir,
    link: std::cell::RefCell<Option<vmm_process::ControlLink>>,
}

impl Vmm<'_> {
    fn ask(&self, request: &Request) -> std::result::Result<Response, String> {
        let mut link = self.link.borrow_mut();
        let connected = match link.take() {
            Some(l) => l,
            None => vmm_process::ControlLink::connect(self.run_dir, STEP_TIMEOUT)
                .map_err(|e| e.to_string())?,
        };
        let answer = link.insert(connected).ask(request);
        if answer.is_err() {
            *link = None;
        }
        answer.map_err(|e| e.to_string())
    }
}

/// Each disk's proof that the target sees the same file (a marker written beside it).
fn disk_proofs(
    spec: &api::VmSpec,
    images: &crate::images::ImageDirs,
) -> std::result::Result<Vec<wire::DiskProof>, String> {
    spec.disks
        .iter()
        .map(|d| {
            let file = images
                .open("disk", &d.path, libc::O_RDONLY)
                .map_err(|e| e.to_string())?;
            wire::make_proof(&file, &d.path)
                .map_err(|e| format!("writing a marker beside {}: {e}", d.path))
        })
        .collect()
}
