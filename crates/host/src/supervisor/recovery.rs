//! Recovery after a daemon restart: re-adopting the VMMs that still run, judging the ends of
//! those that stopped meanwhile, and finishing what the dead daemon had begun (a start, a
//! reboot, a stop, a shutdown).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use api::control::{ExitRecord, Request, Response};
use api::{Cause, VmState};

use super::judge::{judge_lost, pending_intent};
use super::{lock, Result, Supervisor, DEFAULT_SHUTDOWN_TIMEOUT, START_TIMEOUT};
use crate::ledger::NewEvent;
use crate::store::{Transition, VmRow};
use crate::vmm_process::{self, ProcessHandle, RunDir};

/// What recovery found of a VM's VMM.
enum Found {
    /// It answered on its control socket: re-adopted with this pidfd; whether it holds its
    /// guest paused.
    Live(u32, ProcessHandle, bool),
    /// No process.
    Absent,
    /// Its process never answered within the start timeout and was killed.
    Silenced,
}

/// What recovery did with one VM.
enum Recovered {
    Adopted,
    Lost,
    Nothing,
}
impl Supervisor {
    /// After a daemon restart: re-adopts every VMM that still runs, records every one that
    /// ended meanwhile, and (after a host boot) starts the autostart VMs. Returns
    /// (re-adopted, lost). VMs are recovered concurrently: one whose VMM never answers (up
    /// to the start timeout) or must be stopped (up to the stop grace) delays the API's
    /// opening by that once, not once per such VM.
    pub async fn recover(self: &Arc<Self>, host_booted: bool) -> Result<(usize, usize)> {
        let vms = self.with_store(|s| s.vms())?;
        // Unjailed VMMs are found by one scan of /proc for every VM; jailed ones by their
        // cgroup.
        let processes = if self.jailed() {
            Vec::new()
        } else {
            vmm_process::all_processes()
        };
        let outcomes = futures_util::future::join_all(
            vms.iter()
                .map(|row| self.recover_vm(row, &processes, host_booted)),
        )
        .await;
        let (mut adopted, mut lost) = (0, 0);
        for outcome in outcomes {
            match outcome? {
                Recovered::Adopted => adopted += 1,
                Recovered::Lost => lost += 1,
                Recovered::Nothing => {}
            }
        }
        if host_booted {
            let autostart = vms.iter().filter(|r| r.spec.autostart).map(|row| async {
                let name = &row.spec.name;
                let started = match self.get(name) {
                    Ok(vm) if vm.state.has_vmm() => Ok(()),
                    Ok(_) => self.start(name, Cause::HostBoot, "keel").await,
                    Err(e) => Err(e),
                };
                if let Err(e) = started {
                    tracing::error!("autostart of VM {name} failed: {e}");
                }
            });
            futures_util::future::join_all(autostart).await;
        }
        Ok((adopted, lost))
    }

    /// Recovers one VM: re-adopts its VMM, or records its end, and finishes what the dead
    /// daemon had begun for it.
    async fn recover_vm(
        self: &Arc<Self>,
        row: &VmRow,
        processes: &[(u32, PathBuf)],
        host_booted: bool,
    ) -> Result<Recovered> {
        let mut outcome = Recovered::Nothing;
        let name = &row.spec.name;
        let run_dir = self.run_dir(name);
        let has_process = match self.cgroup(name) {
            Some(cgroup) => !vmm_process::of_run_dir(cgroup.processes(), &run_dir).is_empty(),
            None => processes.iter().any(|(_, dir)| dir == &run_dir.0),
        };
        let live = self.find_live_vmm(name, &run_dir, has_process).await;
        match (row.state.has_vmm(), live) {
            (_, Found::Live(pid, handle, paused)) => {
                outcome = Recovered::Adopted;
                // What the VMM says wins: the dead daemon may have paused or resumed it and
                // died before it recorded so.
                let seen = if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                let known = row.pid == Some(pid)
                    && match row.state {
                        VmState::Running | VmState::ShuttingDown => !paused,
                        VmState::Paused => paused,
                        _ => false,
                    };
                if !known {
                    // Started just before the daemon died, or running unknown to it.
                    self.transition(
                        name,
                        Transition {
                            to: seen,
                            pid: Some(pid),
                            cause: Cause::DaemonRestart,
                            actor: "keel",
                            detail: &format!(
                                "re-adopted {seen} VMM pid {pid} after a daemon restart"
                            ),
                            time_ms: None,
                        },
                    )?;
                } else {
                    self.with_store(|s| {
                        s.record(&NewEvent::host(
                            Some(name),
                            Cause::DaemonRestart,
                            "keel",
                            format!("re-adopted running VMM pid {pid}"),
                        ))
                    })?;
                }
                let shutting_down = known && row.state == VmState::ShuttingDown;
                let intent = pending_intent(row);
                let rebooting = known && intent.as_ref().is_some_and(|i| i.restart);
                // Running with a stored intent that is neither a shutdown nor a reboot:
                // an operator's stop the dead daemon had begun.
                let stopping = known && !shutting_down && intent.is_some() && !rebooting;
                if let Some(intent) = intent {
                    lock(&self.intents).insert(name.clone(), intent);
                }
                self.watch(name, Arc::new(handle));
                if shutting_down {
                    self.resume_shutdown(name, pid);
                } else if rebooting {
                    self.finish_reboot(name, pid).await;
                } else if stopping {
                    self.finish_stop(name, pid).await;
                }
            }
            (true, found) => {
                outcome = Recovered::Lost;
                let record = run_dir.exit_record();
                let silenced = matches!(found, Found::Silenced);
                let judged = judge_lost(row, record.as_ref(), host_booted, silenced);
                let when = self.unwatched_end_time(row, record.as_ref());
                if self.record_judged(name, judged, when)? {
                    self.finish_start(name).await;
                }
            }
            (false, _) => {
                if row.pending_start.is_some() {
                    // The previous daemon recorded the VMM's end for a reboot and died
                    // before it recorded the new start.
                    self.with_store(|s| {
                        s.record(&NewEvent::host(
                            Some(name),
                            Cause::DaemonRestart,
                            "keel",
                            "the start owed since its reboot was cut off by a daemon restart; starting it now",
                        ))
                    })?;
                    self.finish_start(name).await;
                }
            }
        }
        Ok(outcome)
    }

    /// When a VMM that ended while no daemon watched it ended: what its exit record claims,
    /// but only inside the window nobody watched (after its VM's last state change and the
    /// previous daemon's last row, before now). A VMM's file cannot move an outage elsewhere.
    fn unwatched_end_time(&self, row: &VmRow, record: Option<&ExitRecord>) -> Option<i64> {
        let claimed = record?.time_ms;
        let now = crate::time::now_ms();
        let since = row
            .since_ms
            .max(
                self.unwatched_since_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .min(now);
        Some(claimed.clamp(since, now))
    }

    /// Recovery's start of a VM that is owed one. A start that fails is recorded (the VM
    /// stays stopped, with why); it must not keep the daemon from serving the other VMs.
    async fn finish_start(self: &Arc<Self>, name: &str) {
        if let Err(e) = self.start_due(name).await {
            tracing::error!("starting VM {name} again during recovery failed: {e}");
        }
    }

    /// The VMM running this VM, if any. A VMM process that exists but never answers on its
    /// control socket (a daemon killed just after starting it, a hung VMM) is killed, so no
    /// VMM is left running that the daemon does not account for.
    /// `has_process` says whether the host-wide scan at the start of recovery saw a VMM
    /// process for this run directory.
    async fn find_live_vmm(&self, name: &str, run_dir: &RunDir, has_process: bool) -> Found {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut first = true;
        loop {
            if let Ok(status) = vmm_process::status(run_dir).await {
                if status.name == name {
                    if let Ok(handle) = ProcessHandle::open(status.pid) {
                        return Found::Live(status.pid, handle, status.paused);
                    }
                }
            }
            if first && !has_process {
                return Found::Absent;
            }
            first = false;
            let processes = match self.cgroup(name) {
                Some(cgroup) => vmm_process::of_run_dir(cgroup.processes(), run_dir),
                None => vmm_process::processes_of(run_dir),
            };
            if processes.is_empty() {
                return Found::Absent;
            }
            if tokio::time::Instant::now() >= deadline {
                for pid in processes {
                    if let Ok(handle) = ProcessHandle::open(pid) {
                        tracing::warn!("VM {name}: VMM pid {pid} never answered; killing it");
                        let _ = handle.kill(libc::SIGKILL);
                        handle.wait().await;
                    }
                }
                return Found::Silenced;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A shutdown that was under way when the daemon died gets a fresh deadline (the old one
    /// was on the dead daemon's monotonic clock); a guest that ignores it is stopped then.
    /// The power button is pressed again: the dead daemon recorded the shutdown before it
    /// pressed, so the press may never have reached the VMM (a guest already shutting down
    /// takes a second press as nothing new).
    fn resume_shutdown(self: &Arc<Self>, name: &str, pid: u32) {
        let this = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let Some((handle, mut ended)) = this.handle(&name) else {
                return;
            };
            match vmm_process::control(&this.run_dir(&name), &Request::PowerButton).await {
                Ok(Response::Done) => {}
                Ok(other) => tracing::warn!("VM {name}: power button answer {other:?}"),
                Err(e) => tracing::warn!("VM {name}: pressing the power button again failed: {e}"),
            }
            let timeout = DEFAULT_SHUTDOWN_TIMEOUT;
            if tokio::time::timeout(timeout, ended.wait_for(|e| *e))
                .await
                .is_ok()
                || handle.pid != pid
            {
                return;
            }
            this.update_intent(&name, |intent| {
                intent.detail = format!(
                    "stopped: the guest did not power off within {}s of the power button (deadline restarted with the daemon)",
                    timeout.as_secs()
                )
            });
            this.stop_process(&name, &handle, &mut ended).await;
        });
    }

    /// An operator's reboot that the previous daemon died in the middle of, its VMM still
    /// running (re-adopted): the VMM is stopped (again: the Stop may not have reached it),
    /// its end, judged by the stored intent, owes the start, and the VM is started. Done
    /// within recovery, as a start cut off is, so no VM is left half rebooted when the API
    /// opens.
    async fn finish_reboot(self: &Arc<Self>, name: &str, pid: u32) {
        self.finish_stop(name, pid).await;
        self.finish_start(name).await;
    }

    /// An operator's stop (or the stop half of a reboot) that the previous daemon died in
    /// the middle of, its VMM re-adopted: the VMM is stopped (again: the Stop may not have
    /// reached it), and its end is judged by the stored intent. Without this the VM would run
    /// on against the operator's word, and its next end be recorded as that stop.
    async fn finish_stop(self: &Arc<Self>, name: &str, pid: u32) {
        if let Some((handle, mut ended)) = self.handle(name).filter(|(h, _)| h.pid == pid) {
            let guard = self.vm_lock(name);
            let _held = guard.lock().await;
            self.stop_process(name, &handle, &mut ended).await;
        }
    }
}
