//! Upgrading a running VM's VMM without stopping its guest: a new `keel vmm` of the
//! installed binary is started with `--takeover` in the VM's jail (same identity, same
//! cgroup), the old one is asked to hand the guest over (see `vmm::handover`), and the
//! daemon then watches the new process. The guest stands still for the handover only; the
//! ledger records it as `paused` then `running` with cause `maintenance`, which SLA reports
//! count, and a host row names both pids. A failure at any step leaves the guest in the old
//! VMM, and a new VMM that did not take it is killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::control::{Request, Response};
use api::{Cause, VmState};

use super::jailing::Jail;
use super::{lock, Error, Result, Supervisor, START_TIMEOUT};
use crate::ledger::NewEvent;
use crate::store::Transition;
use crate::vmm_process::{self, ProcessHandle};

/// The longest a handover may take (the new VMM builds the VM; each of its steps has 10 s).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

fn upgrade_err(vm: &str, why: impl std::fmt::Display) -> Error {
    Error::Upgrade {
        vm: vm.to_string(),
        why: why.to_string(),
    }
}

/// What an upgrade did.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
    /// The guest stood still this long, as the old VMM measured it.
    pub paused: Duration,
}

impl Supervisor {
    /// Hands running VM `name` to a new VMM process of the installed binary.
    pub async fn upgrade(self: &Arc<Self>, name: &str, actor: &str) -> Result<Upgraded> {
        let _held = self.lock_for_request(name).await?;
        let row = self.running_row(
            name,
            "only a running VM is upgraded (a stopped one starts on the new binary)",
        )?;
        let Some((old, _ended)) = self.handle(name) else {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "its VMM is not watched by this daemon; try again in a moment",
            });
        };
        let run_dir = self.run_dir(name);
        let takeover_socket = run_dir.file(api::control::files::TAKEOVER_SOCKET);
        let _ = std::fs::remove_file(&takeover_socket);
        let jail = self.jail_for_upgrade(name, &row.spec)?;
        let new_pid = self.launch_takeover(&run_dir, jail, None).await?;
        let new = Arc::new(ProcessHandle::open(new_pid)?);
        // The new VMM listens once its jail is set up.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !takeover_socket.exists() {
            if new.has_ended() || tokio::time::Instant::now() >= deadline {
                let _ = new.kill(libc::SIGKILL);
                return Err(upgrade_err(
                    name,
                    format!(
                        "the new VMM (pid {new_pid}) did not get ready to take the guest over; it runs on in pid {} (see {})",
                        old.pid,
                        run_dir.file(api::control::files::VMM_LOG).display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Said before the request: the old VMM ends as soon as it handed the guest over.
        lock(&self.handed_over).insert(old.pid);
        let asked = Instant::now();
        let answer =
            vmm_process::control_waiting(&run_dir, &Request::HandOver, HANDOVER_TIMEOUT).await;
        let report = match answer {
            Ok(Response::HandedOver(report)) => report,
            failed => {
                lock(&self.handed_over).remove(&old.pid);
                let _ = new.kill(libc::SIGKILL);
                let why = match failed {
                    Ok(Response::Error { message }) => message,
                    Ok(other) => format!("the old VMM answered {other:?}"),
                    Err(e) => e.to_string(),
                };
                return Err(upgrade_err(
                    name,
                    format!("{why}; the guest runs on in pid {}", old.pid),
                ));
            }
        };
        let paused = Duration::from_micros(report.paused_us);
        self.watch(name, new.clone());
        let ms = paused.as_secs_f64() * 1000.0;
        for (to, detail) in [
            (
                VmState::Paused,
                format!("paused for an upgrade of its VMM (pid {})", old.pid),
            ),
            (
                VmState::Running,
                format!("resumed in its new VMM (pid {new_pid}): stood still {ms:.3} ms"),
            ),
        ] {
            self.transition(
                name,
                Transition {
                    to,
                    pid: Some(new_pid),
                    cause: Cause::Maintenance,
                    actor,
                    detail: &detail,
                    time_ms: None,
                },
            )?;
        }
        self.with_store(|s| {
            s.record(&NewEvent::host(
                Some(name),
                Cause::Operator,
                actor,
                format!(
                    "VMM upgraded: pid {} handed the guest to pid {new_pid} in {:.1} ms ({ms:.3} ms standing still)",
                    old.pid,
                    asked.elapsed().as_secs_f64() * 1000.0
                ),
            ))
        })?;
        Ok(Upgraded {
            old_pid: old.pid,
            new_pid,
            paused,
        })
    }

    /// Upgrades every running VM, one after the other; each one's outcome.
    pub async fn upgrade_all(
        self: &Arc<Self>,
        actor: &str,
    ) -> Result<Vec<(String, std::result::Result<Upgraded, String>)>> {
        let running: Vec<String> = self
            .with_store(|s| s.vms())?
            .into_iter()
            .filter(|r| r.state == VmState::Running)
            .map(|r| r.spec.name)
            .collect();
        let mut outcomes = Vec::new();
        for name in running {
            let outcome = self.upgrade(&name, actor).await.map_err(|e| e.to_string());
            outcomes.push((name, outcome));
        }
        Ok(outcomes)
    }

    /// The jail of a VMM taking over VM `name`: the identity and limits its running VMM has,
    /// and a copy of the daemon's lock of that identity.
    fn jail_for_upgrade(&self, name: &str, spec: &api::VmSpec) -> Result<Option<Jail>> {
        if !self.jailed() {
            return Ok(None);
        }
        let id = self
            .with_store(|s| s.known_jail_id(name))?
            .ok_or_else(|| upgrade_err(name, "it has no jail identity"))?;
        let held = lock(&self.id_locks)
            .get(name)
            .and_then(|l| l.try_clone().ok());
        let id_lock = match held {
            Some(l) => l,
            // Re-adopted after a restart: the VMM holds the lock; a copy of its descriptor
            // shares it, for the new VMM and this daemon.
            None => {
                let copied = self.handle(name).and_then(|(h, _)| {
                    let fd = crate::jail_id::fd_in(h.pid, id)?;
                    h.copy_fd(fd).ok()
                });
                let copied = copied.ok_or_else(|| {
                    upgrade_err(
                        name,
                        "neither this daemon nor its VMM holds the lock of its jail identity",
                    )
                })?;
                if let Ok(mine) = copied.try_clone() {
                    lock(&self.id_locks).insert(name.to_string(), mine);
                }
                copied
            }
        };
        Ok(Some(Jail::new(id, spec, id_lock)))
    }
}
