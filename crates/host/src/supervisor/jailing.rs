//! The daemon's side of its VMMs' jails: the jail id and limits of a start, the launch,
//! what a jail says of a VMM's end (seccomp, OOM), the VMs' cgroups and their use.

use std::sync::Arc;
use std::time::Duration;

use api::{Cause, VmSpec, VmState};

use super::judge::Judged;
use super::{lock, Error, Result, Supervisor};
use crate::vmm_process::{self, RunDir};

/// The jail of one VMM start: identity and limits, and the lock that holds the id.
pub(super) struct Jail {
    options: jail::LaunchOptions,
    id_lock: std::os::fd::OwnedFd,
}

impl Jail {
    /// Identity `id` with the limits `spec` asks for, held by `id_lock`.
    pub(super) fn new(id: u32, spec: &VmSpec, id_lock: std::os::fd::OwnedFd) -> Jail {
        Jail {
            options: jail::LaunchOptions {
                uid: id,
                gid: id,
                limits: jail::CgroupLimits {
                    cpu_percent: spec.cpu_limit_percent,
                    ..jail::limits_for(spec.cpus, spec.memory_mib << 20)
                },
            },
            id_lock,
        }
    }
}

impl Supervisor {
    /// A start that ended before its VMM ran: what was kept for its end goes, and its cgroup
    /// (if the launcher made one) is removed.
    pub(super) fn forget_start(&self, name: &str) {
        lock(&self.log_starts).remove(name);
        lock(&self.id_locks).remove(name);
        if let Some(cgroup) = self.cgroup(name) {
            remove_cgroup_soon(cgroup);
        }
    }

    /// What its jail says of a VMM's end: a kill by its seccomp filter (its log names the
    /// system call) or by the OOM killer (its cgroup counted one), as a cause and a detail.
    /// Either way what was kept for the end goes, and the VM's cgroup is removed once its
    /// processes are gone.
    pub(super) fn explain_jail_end(&self, name: &str) -> Option<(Cause, String)> {
        let (log_start, oom_before) = lock(&self.log_starts).remove(name).unwrap_or((0, 0));
        lock(&self.id_locks).remove(name);
        let cgroup = self.cgroup(name);
        let oom_kills = cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let limit = cgroup.as_ref().and_then(|c| c.memory_limit());
        if let Some(cgroup) = cgroup {
            remove_cgroup_soon(cgroup);
        }
        let run_dir = self.run_dir(name);
        if let Some(nr) = run_dir.seccomp_violation(log_start) {
            let detail = format!(
                "the VMM was killed by its seccomp filter for system call {nr}{} (a VMM bug or an escape attempt; see {})",
                jail::seccomp::syscall_name(nr).map_or(String::new(), |n| format!(" ({n})")),
                run_dir.file(api::control::files::VMM_LOG).display()
            );
            return Some((Cause::VmmCrash, detail));
        }
        (oom_kills > oom_before).then(|| {
            let detail = format!(
                "the VMM was killed by the OOM killer: its cgroup reached its memory limit{} (guest RAM plus {} MiB for the VMM)",
                limit.map_or(String::new(), |l| format!(" of {} MiB", l >> 20)),
                jail::MEMORY_OVERHEAD_BYTES >> 20
            );
            (Cause::OomKill, detail)
        })
    }

    /// A VMM's judged end, with what its jail explains of an unexplained crash.
    pub(super) fn jail_end(&self, name: &str, judged: Judged) -> Judged {
        let explained = self.explain_jail_end(name);
        match explained {
            Some((cause, detail))
                if judged.0 == VmState::Crashed && judged.1 == Cause::VmmCrash =>
            {
                (VmState::Crashed, cause, "keel".into(), detail, false)
            }
            _ => judged,
        }
    }

    /// The jail of the VM's next VMM, when VMMs are jailed: its id (locked host-wide; the
    /// daemon keeps a copy of the lock while the VMM runs, so a hostile VMM that closes its
    /// own does not give up the id) and limits.
    pub(super) fn jail_for(&self, name: &str, spec: &VmSpec) -> Result<Option<Jail>> {
        if self.cgroups.is_none() {
            return Ok(None);
        }
        let (id, id_lock) = self.take_jail_id(name)?;
        if let Ok(copy) = id_lock.try_clone() {
            lock(&self.id_locks).insert(name.to_string(), copy);
        }
        Ok(Some(Jail::new(id, spec, id_lock)))
    }

    /// Starts a VMM that takes VM's running guest over (`keel vmm --takeover`, jailed with
    /// `jail`, handed only the jail's lock); its pid.
    pub(super) async fn launch_takeover(
        self: &Arc<Self>,
        run_dir: &RunDir,
        jail: Option<Jail>,
        incoming: Option<&VmSpec>,
    ) -> std::result::Result<u32, vmm_process::Error> {
        let (this, run_dir) = (self.clone(), run_dir.clone());
        let incoming = incoming.cloned();
        tokio::task::spawn_blocking(move || {
            let (options, id_lock) = match jail {
                Some(j) => (Some(j.options), Some(j.id_lock)),
                None => (None, None),
            };
            // A guest from another host gets a run directory of its own first.
            if let Some(spec) = &incoming {
                run_dir.prepare(spec, options.map(|o| o.uid))?;
                run_dir.remove_exit_record();
            }
            vmm_process::spawn(vmm_process::Launch {
                vmm_exe: &this.vmm_exe,
                run_dir: &run_dir,
                jail: options,
                files: id_lock.into_iter().collect(),
                console_log_max: this.console_log_max,
                restore: None,
                takeover: true,
                incoming: incoming.is_some(),
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(vmm_process::Error::Spawn {
                exe: self.vmm_exe.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    /// Starts the VM's VMM (jailed with `jail`), off the async workers: fsyncs of the
    /// definition, opening the VM's files, and the launcher's jail setup (its cgroup join
    /// alone waits ~10 ms on cgroup v1). Returns the VMM's pid.
    pub(super) async fn launch(
        self: &Arc<Self>,
        spec: &VmSpec,
        run_dir: &RunDir,
        jail: Option<Jail>,
        restore: Option<&'static str>,
    ) -> std::result::Result<u32, vmm_process::Error> {
        let name = &spec.name;
        let ooms = self.cgroup(name).map_or(0, |c| c.oom_kills());
        lock(&self.log_starts).insert(name.to_string(), (run_dir.log_len(), ooms));
        let (this, spec, run_dir) = (self.clone(), spec.clone(), run_dir.clone());
        tokio::task::spawn_blocking(move || {
            let (options, id_lock) = match jail {
                Some(j) => (Some(j.options), Some(j.id_lock)),
                None => (None, None),
            };
            // cloud-init's seed, made from the definition now, is the VMM's last disk.
            let spec = crate::cloud_init::with_seed(&spec, &this.library.vm_dir(&spec.name))
                .map_err(|e| vmm_process::Error::Refused {
                    reason: format!("making its cloud-init seed disk failed: {e}"),
                })?;
            run_dir.prepare(&spec, options.map(|o| o.uid))?;
            run_dir.remove_exit_record();
            let mut files = vmm_process::open_vm_files(&spec, &this.images)?;
            // After the VM's files: the VMM keeps it, and the id, until it ends.
            files.extend(id_lock);
            vmm_process::spawn(vmm_process::Launch {
                vmm_exe: &this.vmm_exe,
                run_dir: &run_dir,
                jail: options,
                files,
                console_log_max: this.console_log_max,
                restore,
                takeover: false,
                incoming: false,
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(vmm_process::Error::Spawn {
                exe: self.vmm_exe.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        })
    }

    /// The VM's jail id, locked host-wide for its VMM; an id that another daemon's VM runs
    /// with is given up for the next free one.
    pub(super) fn take_jail_id(&self, name: &str) -> Result<(u32, std::os::fd::OwnedFd)> {
        let mut id = self.with_store(|s| s.jail_id(name))?;
        loop {
            match crate::jail_id::lock(id) {
                Ok(Some(lock)) => return Ok((id, lock)),
                Ok(None) => id = self.with_store(|s| s.jail_id_after(name, id))?,
                Err(e) => {
                    return Err(Error::StartFailed {
                        name: name.into(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// What the VM's jailed VMM uses, from its cgroup.
    pub fn usage(&self, name: &str) -> Option<api::VmUsage> {
        let id = self.with_store(|s| s.known_jail_id(name)).ok()??;
        let cgroup = self.cgroup(name)?;
        Some(api::VmUsage {
            jail_id: id,
            memory_bytes: cgroup.memory_usage(),
            memory_limit_bytes: cgroup.memory_limit(),
            memory_peak_bytes: cgroup.memory_peak(),
            tasks: cgroup.pids_current(),
            tasks_limit: cgroup.pids_limit(),
        })
    }

    /// How VMMs are jailed here (the cgroup layout), or None when they are not.
    pub fn jail_description(&self) -> Option<String> {
        self.cgroups.as_ref().map(|l| l.describe())
    }

    /// The image directories, as messages name them.
    pub fn image_dirs(&self) -> String {
        self.images.describe()
    }

    /// Removes the empty VM cgroups that VMMs which ended while no daemon watched them left
    /// (any daemon's: a fresh one another start is about to join is made again by it).
    pub fn sweep_cgroups(&self) {
        if let Some(layout) = &self.cgroups {
            layout.sweep_empty("vm-");
        }
    }

    /// Whether this daemon jails its VMMs (it is root).
    pub fn jailed(&self) -> bool {
        self.cgroups.is_some()
    }

    /// The cgroup of the VM's jailed VMM (by its jail id), when VMMs are jailed.
    pub fn cgroup(&self, name: &str) -> Option<jail::Cgroups> {
        let layout = self.cgroups.as_ref()?;
        let id = self.with_store(|s| s.known_jail_id(name)).ok()??;
        Some(layout.vm(&jail::cgroup_name(id)))
    }
}

/// Removes a VM's cgroup once the kernel has let go of its last task (a VMM's kernel threads
/// end a moment after it); gives up after two seconds, leaving it for the next start.
fn remove_cgroup_soon(cgroup: jail::Cgroups) {
    tokio::spawn(async move {
        for _ in 0..40 {
            if cgroup.remove().is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
