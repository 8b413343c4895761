//! Restores from snapshots: into the VM the snapshot was taken of (stopped), or as a new VM
//! beside it. The disks a snapshot kept under an overlay go on in new overlays over its
//! disks; those it copied are copied back; then a VMM starts on the snapshot's state and
//! memory, and the guest runs on from where it was.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::snapshot::SnapshotInfo;
use api::Cause;

use super::snapshots::{as_operation, copy_disk, copy_to_new, snap_err, VM_RESTORE};
use super::{Error, Result, Supervisor, RESTORE_DIR};

impl Supervisor {
    /// Restores a stopped VM from one of its snapshots: its disks go back to that instant,
    /// then a VMM starts on the snapshot's state and the guest runs on from there.
    pub async fn restore(self: &Arc<Self>, vm: &str, snapshot: &str, actor: &str) -> Result<()> {
        let progress = self.operations.start(VM_RESTORE, vm);
        let work = self.restore_steps(vm, snapshot, actor, &progress);
        as_operation(progress.clone(), work, |()| Some(vm.to_string())).await
    }

    async fn restore_steps(
        self: &Arc<Self>,
        vm: &str,
        snapshot: &str,
        actor: &str,
        progress: &crate::operations::Progress,
    ) -> Result<()> {
        let guard = self.vm_lock(vm);
        let _held = guard.lock().await;
        let row = self.get(vm)?;
        if row.state.has_vmm() {
            return Err(Error::WrongState {
                name: vm.into(),
                state: row.state,
                hint: "stop it first: a restore replaces the running guest and its disks",
            });
        }
        let (dir, info) = self.find_snapshot(vm, snapshot)?;
        check_same_machine(&info, &row.spec).map_err(|why| {
            snap_err(vm, format!("its definition changed since snapshot {snapshot}: {why}; a snapshot restores only into the VM it was taken of"))
        })?;
        self.put_disks_back(vm, &info, progress).await?;
        progress.step("starting the disks' overlays on the snapshot's");
        self.restore_overlays(vm, &info, &row.spec, actor)?;
        // The overlays the VM wrote in since are unreached now, unless a snapshot keeps them.
        let removed = self.collect_disks(vm, false);
        if !removed.is_empty() {
            tracing::info!("VM '{vm}': removed {} unused overlay(s)", removed.len());
        }
        progress.step("starting the VM on the snapshot");
        self.start_restored(vm, snapshot, &dir, actor).await
    }

    /// Starts VM `vm` on snapshot `snapshot` (files in `dir`): its state and memory are
    /// linked into the run directory for the VMM, then the links go.
    async fn start_restored(
        self: &Arc<Self>,
        vm: &str,
        snapshot: &str,
        dir: &Path,
        actor: &str,
    ) -> Result<()> {
        let restore = self.run_dir(vm).file(RESTORE_DIR);
        let _ = std::fs::remove_dir_all(&restore);
        let linked = std::fs::create_dir_all(&restore).and_then(|()| {
            ["state", "memory"].iter().try_for_each(|file| {
                let (from, to) = (dir.join(file), restore.join(file));
                // Another file system (a snapshot written elsewhere): a sparse copy.
                std::fs::hard_link(&from, &to).or_else(|_| copy_to_new(&from, &to).map(drop))
            })
        });
        linked.map_err(|e| snap_err(vm, format!("putting the snapshot's files in place: {e}")))?;
        let started = self
            .start_from(vm, Cause::Operator, actor, Some(snapshot))
            .await;
        // The VMM has its memory file mapped (or failed): the links are not needed.
        let _ = std::fs::remove_dir_all(&restore);
        started
    }

    /// Restores snapshot `snapshot` of VM `vm` as a new VM `new`: the snapshot's definition
    /// under the new name, with copies of its disks in the new VM's directory; the guest runs
    /// on from where it was, beside the first VM (which may run meanwhile).
    pub async fn restore_as(
        self: &Arc<Self>,
        vm: &str,
        snapshot: &str,
        new: &str,
        actor: &str,
    ) -> Result<()> {
        let progress = self.operations.start(VM_RESTORE, new);
        let work = self.restore_as_steps(vm, snapshot, new, actor, &progress);
        as_operation(progress.clone(), work, |()| Some(new.to_string())).await
    }

    async fn restore_as_steps(
        self: &Arc<Self>,
        vm: &str,
        snapshot: &str,
        new: &str,
        actor: &str,
        progress: &crate::operations::Progress,
    ) -> Result<()> {
        api::vm::check_name(new)
            .map_err(|_| snap_err(vm, format!("'{new}' is not a name for a VM")))?;
        if new == vm {
            return Err(snap_err(
                vm,
                "--as names the VM itself: restore into it without --as, or name a new VM",
            ));
        }
        let (dir, info) = self.find_snapshot(vm, snapshot)?;
        if !info.spec.nets.is_empty() {
            return Err(snap_err(
                vm,
                "its snapshot has NICs, whose taps and MACs belong to the first VM: restore it into that VM instead",
            ));
        }
        if self.with_store(|s| s.vm(new))?.is_some() {
            return Err(Error::Exists(new.to_string()));
        }
        // The first VM's too: its snapshot's files must stay while the new VM is made on them.
        let first = self.vm_lock(vm);
        let _first_held = first.lock().await;
        let guard = self.vm_lock(new);
        let _held = guard.lock().await;
        let mut spec = info.spec.clone();
        spec.name = new.to_string();
        spec.autostart = false;
        let target = self.library.vm_dir(new);
        let copied = {
            let (target, info, progress) = (target.clone(), info.clone(), progress.clone());
            tokio::task::spawn_blocking(
                move || -> std::result::Result<Vec<Option<String>>, String> {
                    std::fs::create_dir_all(&target).map_err(|e| e.to_string())?;
                    let count = info.disks.iter().filter(|d| d.copy.is_some()).count();
                    let mut nth = 0;
                    info.disks
                        .iter()
                        .enumerate()
                        .map(|(i, disk)| {
                            let Some(copy) = &disk.copy else {
                                return Ok(None);
                            };
                            nth += 1;
                            progress.step(format!("copying disk {nth} of {count}"));
                            let from = File::open(copy).map_err(|e| format!("{copy}: {e}"))?;
                            let path = target.join(format!("disk{i}"));
                            let to = File::options()
                                .read(true)
                                .write(true)
                                .create_new(true)
                                .open(&path)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            copy_disk(&from, &to, &|done, all| progress.update(done, all))
                                .map_err(|e| format!("copying {copy}: {e}"))?;
                            Ok(Some(path.display().to_string()))
                        })
                        .collect()
                },
            )
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        };
        let copies = match copied {
            Ok(copies) => copies,
            Err(why) => {
                self.remove_vm_disks(new);
                return Err(snap_err(vm, why));
            }
        };
        for (disk, copy) in spec.disks.iter_mut().zip(copies) {
            if let Some(path) = copy {
                disk.path = path;
            }
        }
        // Disks the snapshot kept under an overlay: the new VM goes on in one of its own.
        if let Err(e) = self.overlays_for(new, &info, &mut spec) {
            self.remove_vm_disks(new);
            return Err(e);
        }
        if let Err(e) = self.create(&spec, actor) {
            self.remove_vm_disks(new);
            return Err(e);
        }
        progress.step("starting the VM on the snapshot");
        self.start_restored(new, snapshot, &dir, actor).await
    }

    /// The disks snapshot `info` kept under an overlay go on in a new overlay over each, in
    /// VM `vm`'s directory: `spec` names them. Returns the files made; on an error none is
    /// left.
    fn overlays_for(
        &self,
        vm: &str,
        info: &SnapshotInfo,
        spec: &mut api::VmSpec,
    ) -> Result<Vec<PathBuf>> {
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            for (i, (disk, then)) in info.disks.iter().zip(&info.spec.disks).enumerate() {
                if disk.how.as_deref() != Some("overlay") {
                    continue;
                }
                let frozen = api::DiskSpec {
                    path: disk.path.clone(),
                    ..then.clone()
                };
                let d = spec
                    .disks
                    .get_mut(i)
                    .ok_or_else(|| snap_err(vm, "it has fewer disks than the snapshot"))?;
                let path = self.overlay_over(vm, i, &frozen)?;
                made.push(path.clone());
                d.path = path.display().to_string();
                d.format = api::vm::DiskFormat::Qcow2;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(made),
            Err(e) => {
                for path in made {
                    let _ = self.remove_delta(&path);
                }
                Err(e)
            }
        }
    }

    /// VM `vm` restored from snapshot `info`: its disks kept under overlays go on in new
    /// ones (see [`Self::overlays_for`]), and the definition `spec` naming them is stored.
    fn restore_overlays(
        &self,
        vm: &str,
        info: &SnapshotInfo,
        spec: &api::VmSpec,
        actor: &str,
    ) -> Result<()> {
        let mut next = spec.clone();
        let made = self.overlays_for(vm, info, &mut next)?;
        if made.is_empty() {
            return Ok(());
        }
        let named = made
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let stored = self.store_spec(
            vm,
            &next,
            actor,
            format!(
                "restoring snapshot {}: its disks go on in new overlays ({named})",
                info.name
            ),
        );
        if stored.is_err() {
            for path in made {
                let _ = self.remove_delta(&path);
            }
        }
        stored
    }

    async fn put_disks_back(
        self: &Arc<Self>,
        vm: &str,
        info: &SnapshotInfo,
        progress: &crate::operations::Progress,
    ) -> Result<()> {
        let (this, vm, info, progress) =
            (self.clone(), vm.to_string(), info.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            let count = info.disks.iter().filter(|d| d.copy.is_some()).count();
            for (nth, disk) in info.disks.iter().filter(|d| d.copy.is_some()).enumerate() {
                let Some(copy) = &disk.copy else { continue };
                progress.step(format!(
                    "putting disk {} of {count} back ({})",
                    nth + 1,
                    disk.path
                ));
                let from =
                    File::open(copy).map_err(|e| snap_err(&vm, format!("opening {copy}: {e}")))?;
                let to = this.images.open("disk", &disk.path, libc::O_WRONLY)?;
                to.set_len(0)
                    .and_then(|()| {
                        copy_disk(&from, &to, &|done, all| progress.update(done, all)).map(|_| ())
                    })
                    .map_err(|e| snap_err(&vm, format!("putting {} back: {e}", disk.path)))?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(snap_err("?", e)))
    }
}

/// A snapshot restores into the machine it was taken of: the same memory, vCPUs and devices,
/// and the disks it copied where they were (those under an overlay get a new one).
fn check_same_machine(info: &SnapshotInfo, now: &api::VmSpec) -> std::result::Result<(), String> {
    let then = &info.spec;
    let differs = |what: &str, a: String, b: String| Err(format!("{what} was {a}, is {b}"));
    if then.memory_mib != now.memory_mib {
        return differs(
            "memory",
            then.memory_mib.to_string(),
            now.memory_mib.to_string(),
        );
    }
    if then.cpus != now.cpus {
        return differs("vCPUs", then.cpus.to_string(), now.cpus.to_string());
    }
    // A disk kept under an overlay may be named otherwise now (the VM went on in it).
    let paths = |s: &api::VmSpec| {
        s.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let overlaid = info.disks.get(i).and_then(|k| k.how.as_deref()) == Some("overlay");
                (
                    if overlaid {
                        "(overlay)".to_string()
                    } else {
                        d.path.clone()
                    },
                    d.readonly,
                )
            })
            .collect::<Vec<_>>()
    };
    if paths(then) != paths(now) {
        return differs(
            "disks",
            format!("{:?}", paths(then)),
            format!("{:?}", paths(now)),
        );
    }
    if then.nets.len() != now.nets.len() || then.rng != now.rng || then.vsock != now.vsock {
        return Err("its NICs, rng or vsock device changed".into());
    }
    Ok(())
}
