//! Snapshots of running VMs. A snapshot lives in
//! `STATE/snapshots/VM/NAME/`, or with `--to DIR` in `DIR/NAME/` (beneath the image
//! directories; its `snapshot.json` is kept in the state directory too, which lists it): the
//! VMM's state and memory files, each writable disk as it was at that instant (kept under a
//! qcow2 overlay the VM goes on in, see [`super::snapshot_disks`]; a `direct=on` disk
//! copied: a reflink where the file system shares blocks, else a sparse copy), and
//! `snapshot.json`. The VM stands still from the VMM's pause until its disks are switched
//! (and copied, if any is); the ledger records that pause with cause `maintenance`, which
//! SLA reports count. Restores are in [`super::restores`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::control::{Request, Response};
use api::snapshot::{SnapshotDisk, SnapshotInfo};
use api::{Cause, VmState};

use super::snapshot_disks::Kept;
use super::{Error, Result, Supervisor};
use crate::ledger::NewEvent;
use crate::store::Transition;
use crate::vmm_process;

/// Where the VMM writes a snapshot in its run directory before the daemon moves it.
const WRITING_DIR: &str = "snapshot-new";
/// The longest a VMM may take to write a snapshot (all of a large guest's memory).
const WRITE_TIMEOUT: Duration = Duration::from_secs(600);
const MANIFEST: &str = "snapshot.json";
/// `FICLONE`: the destination shares the source's blocks (btrfs, XFS).
const FICLONE: libc::c_ulong = 0x4004_9409;

pub(super) fn snap_err(vm: &str, why: impl std::fmt::Display) -> Error {
    Error::Snapshot {
        vm: vm.to_string(),
        why: why.to_string(),
    }
}

/// Copies `from` into the new file `to`: a reflink if the file system can, else sparse;
/// `progress` hears (bytes done, bytes in all).
pub(super) fn copy_disk(
    from: &File,
    to: &File,
    progress: &dyn Fn(u64, u64),
) -> std::io::Result<&'static str> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open files.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) } == 0 {
        let len = from.metadata()?.len();
        progress(len, len);
        return Ok("reflink");
    }
    crate::library::copy::copy_sparse(from, to, progress)?;
    to.sync_all()?;
    Ok("copy")
}

/// The operations a snapshot and a restore are, for clients to follow their disk copies
/// (`GET /operations`): a large disk without reflinks takes long, and a snapshot's guest
/// stands still meanwhile.
pub const VM_SNAPSHOT: &str = "vm-snapshot";
pub const VM_RESTORE: &str = "vm-restore";

/// Runs `work` under `progress`, which ends with its outcome (`result` names what it made).
pub(super) async fn as_operation<T>(
    progress: crate::operations::Progress,
    work: impl std::future::Future<Output = Result<T>>,
    result: impl FnOnce(&T) -> Option<String>,
) -> Result<T> {
    let done = work.await;
    if let Ok(made) = &done {
        progress.outcome(result(made), Vec::new());
    }
    progress.finish(done.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    done
}

/// The directories of a snapshot being taken, removed unless it completes.
struct Unfinished(Vec<PathBuf>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Moves file `from` to the new `to`: renamed on one file system, else copied (sparse) and
/// synced, then removed.
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_to_new(from, to)?.sync_all()?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}

/// A sparse copy of file `from` as the new file `to` (owner only).
pub(super) fn copy_to_new(from: &Path, to: &Path) -> std::io::Result<File> {
    let copy = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    crate::library::copy::copy_sparse(&File::open(from)?, &copy, &|_, _| {})?;
    Ok(copy)
}

/// Makes `path` (a file or directory in a VM's run directory) its jailed VMM's, like the
/// directory itself, so that the VMM can write it.
fn owned_like(path: &Path, dir: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))
}

impl Supervisor {
    fn snapshots_of(&self, vm: &str) -> PathBuf {
        self.state_dir.join("snapshots").join(vm)
    }

    /// Every snapshot this host keeps, of any VM (one defined here or not). A manifest that
    /// cannot be read is an error (what it names would be unknown); a directory without one
    /// (a snapshot cut short) is skipped.
    pub(super) fn all_snapshots(&self) -> std::result::Result<Vec<SnapshotInfo>, String> {
        let mut found = Vec::new();
        let Ok(vms) = std::fs::read_dir(self.state_dir.join("snapshots")) else {
            return Ok(found);
        };
        for vm in vms.flatten() {
            for entry in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
                if !entry.path().join(MANIFEST).exists() {
                    continue;
                }
                let info = read_manifest(&entry.path())
                    .map_err(|e| format!("{}: {e}", entry.path().join(MANIFEST).display()))?;
                found.push(info);
            }
        }
        Ok(found)
    }

    /// The VM's snapshots, oldest first.
    pub fn list_snapshots(&self, vm: &str) -> Result<Vec<SnapshotInfo>> {
        self.get(vm)?;
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.snapshots_of(vm)) else {
            return Ok(found);
        };
        for entry in entries.flatten() {
            if let Ok(info) = read_manifest(&entry.path()) {
                found.push(info);
            }
        }
        found.sort_by(|a, b| a.taken.cmp(&b.taken).then(a.name.cmp(&b.name)));
        Ok(found)
    }

    /// Snapshots a running or paused VM; a running one runs on once its disks are switched to
    /// their overlays (or copied, for those that cannot have one).
    pub async fn snapshot(
        self: &Arc<Self>,
        vm: &str,
        request: api::snapshot::SnapshotRequest,
        actor: &str,
    ) -> Result<SnapshotInfo> {
        let progress = self.operations.start(VM_SNAPSHOT, vm);
        let work = self.snapshot_steps(vm, request.name, request.to, actor, &progress);
        as_operation(progress.clone(), work, |info| Some(info.name.clone())).await
    }

    async fn snapshot_steps(
        self: &Arc<Self>,
        vm: &str,
        name: Option<String>,
        to: Option<String>,
        actor: &str,
        progress: &crate::operations::Progress,
    ) -> Result<SnapshotInfo> {
        let _held = self.lock_for_request(vm).await?;
        let row = self.get(vm)?;
        if !matches!(row.state, VmState::Running | VmState::Paused) {
            return Err(Error::WrongState {
                name: vm.into(),
                state: row.state,
                hint: "only a running or paused VM can be snapshotted",
            });
        }
        let taken = self.list_snapshots(vm)?;
        let name = name.unwrap_or_else(|| {
            (1..)
                .map(|n| format!("snap-{n}"))
                .find(|n| !taken.iter().any(|t| &t.name == n))
                .unwrap_or_default()
        });
        api::vm::check_name(&name).map_err(|_| {
            snap_err(
                vm,
                format!(
                    "'{name}' is not a name for a snapshot: use letters, digits, '-', '_' and '.'"
                ),
            )
        })?;
        let index = self.snapshots_of(vm).join(&name);
        if index.exists() {
            return Err(snap_err(
                vm,
                format!("it has a snapshot named '{name}' already"),
            ));
        }
        // Where its files go: beside its manifest, or in a directory of the operator's.
        let dir = match &to {
            Some(to) => self.make_snapshot_dir(vm, to, &name)?,
            None => index.clone(),
        };
        // Until it is whole, a failure leaves nothing of it behind.
        let mut unfinished = Unfinished(vec![dir.clone(), index.clone()]);
        let run_dir = self.run_dir(vm);
        let writing = run_dir.file(WRITING_DIR);
        let _ = std::fs::remove_dir_all(&writing);
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&writing)?;
            owned_like(&writing, &run_dir.0)?;
            for file in ["state", "memory"] {
                let path = writing.join(file);
                File::create(&path)?;
                owned_like(&path, &run_dir.0)?;
            }
            Ok(())
        })();
        made.map_err(|e| snap_err(vm, format!("making {}: {e}", writing.display())))?;

        // The overlays the VM goes on in are made before the guest stands still.
        progress.step("making the disks' overlays");
        let kept = self.prepare_overlays(vm, &row.spec)?;
        let was_running = row.state == VmState::Running;
        let switch = self.name_overlays(vm, &row.spec, &kept, &name, actor)?;
        // The guest stands still for the copies, if any; else it runs on as soon as its
        // disks are switched, while the files are synced.
        let copying = kept.iter().any(|k| matches!(k, Kept::Copy(_)));
        progress.step("saving the state and memory, switching the disks to their overlays");
        let asked = Instant::now();
        let request = Request::Snapshot {
            name: WRITING_DIR.into(),
            stay_paused: copying,
            switch_disks: switch.disks.clone(),
        };
        let switched = switch.disks.clone();
        let answer = {
            let run_dir = run_dir.clone();
            tokio::task::spawn_blocking(move || {
                vmm_process::ControlLink::connect(&run_dir, WRITE_TIMEOUT)?
                    .ask_with_fds(&request, &switch.fds())
            })
            .await
            .unwrap_or_else(|e| {
                Err(vmm_process::Error::Refused {
                    reason: e.to_string(),
                })
            })
        };
        // An answer that is no report, or none, leaves the overlays named: the VMM may have
        // switched to them (see `name_overlays`). An error answer says it did not.
        let report = match answer {
            Ok(Response::Snapshot(report)) => report,
            Ok(Response::Error { message }) => {
                let _ = std::fs::remove_dir_all(&writing);
                self.unname_overlays(vm, &row.spec, &kept, &switched, &name, actor, &message);
                return Err(Error::VmmRefused {
                    name: vm.into(),
                    message,
                });
            }
            Ok(other) => return Err(snap_err(vm, format!("the VMM answered {other:?}"))),
            Err(e) => return Err(e.into()),
        };
        if let Some(why) = &report.unsynced {
            let _ = std::fs::remove_dir_all(&writing);
            return Err(snap_err(
                vm,
                format!("syncing its state and memory files failed ({why}); its disks went on in their overlays all the same"),
            ));
        }
        if was_running {
            self.transition(
                vm,
                Transition {
                    to: VmState::Paused,
                    pid: row.pid,
                    cause: Cause::Maintenance,
                    actor,
                    detail: &format!("paused for snapshot {name}"),
                    time_ms: None,
                },
            )?;
        }
        // The disks that cannot have an overlay are copied as they are now, while the guest
        // stands still; without any, it runs already (the VMM measured how long it stood).
        let copied = self.copy_disks(vm, &row.spec, &kept, &dir, progress).await;
        let paused = if copying {
            asked.elapsed()
        } else {
            Duration::from_micros(report.paused_us)
        };
        if was_running {
            self.resume_after(vm, row.pid, actor, &name, paused, copying)
                .await?;
        }
        let disks = match copied {
            Ok(disks) => disks,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&writing);
                return Err(e);
            }
        };
        let moved = ["state", "memory"].iter().try_for_each(|file| {
            let to = dir.join(file);
            move_file(&writing.join(file), &to)?;
            // The snapshot is the host's now: the VM's jailed user may no longer change it.
            std::os::unix::fs::lchown(&to, Some(0), Some(0)).or_else(|e| {
                // A daemon that is not root keeps its own files.
                if e.raw_os_error() == Some(libc::EPERM) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        });
        let _ = std::fs::remove_dir_all(&writing);
        if let Err(e) = moved {
            return Err(snap_err(vm, format!("moving its files: {e}")));
        }
        let info = SnapshotInfo {
            vm: vm.into(),
            name: name.clone(),
            dir: dir.display().to_string(),
            taken: crate::time::rfc3339(crate::time::now_ms()),
            spec: row.spec.clone(),
            memory_bytes: row.spec.memory_mib << 20,
            memory_stored_bytes: report.memory_bytes_written,
            state_bytes: report.state_bytes,
            disks,
            paused_seconds: if was_running {
                paused.as_secs_f64()
            } else {
                0.0
            },
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| snap_err(vm, e))?;
        // Beside the files (which it describes), and in the state directory, which lists
        // the VM's snapshots wherever their files are.
        let written = std::fs::create_dir_all(&index).and_then(|()| {
            [&dir, &index]
                .iter()
                .try_for_each(|d| api::control::write_atomically(&d.join(MANIFEST), &json, 0o600))
        });
        if let Err(e) = written {
            return Err(snap_err(vm, format!("writing its {MANIFEST}: {e}")));
        }
        unfinished.0.clear();
        self.with_store(|s| {
            s.record(&NewEvent::host(
                Some(vm),
                Cause::Operator,
                actor,
                format!(
                    "snapshot {name} taken: {} MiB of memory stored, {} disk(s), the guest stood still {:.3} s",
                    report.memory_bytes_written >> 20,
                    info.disks.len(),
                    info.paused_seconds
                ),
            ))
        })?;
        Ok(info)
    }

    /// Makes `TO/NAME/` for a snapshot's files: `to` must be a directory beneath the host's
    /// image directories (opened without leaving them), and `NAME` new in it.
    fn make_snapshot_dir(&self, vm: &str, to: &str, name: &str) -> Result<PathBuf> {
        let parent = self.images.open_dir("snapshot directory", to)?;
        // Where it really is (no link in between), for the files made below.
        let real = std::fs::read_link(format!("/proc/self/fd/{}", parent.as_raw_fd()))
            .map_err(|e| snap_err(vm, format!("resolving {to}: {e}")))?;
        // Not among the library's images or the VMs' own disks, which the daemon manages.
        if [&self.library.dir, &self.library.vms]
            .iter()
            .any(|managed| real.starts_with(managed))
        {
            return Err(snap_err(
                vm,
                format!("{to} holds the image library or the VMs' own disks, which Keel manages: write snapshots elsewhere beneath the image directories"),
            ));
        }
        let c_name = std::ffi::CString::new(name).map_err(|e| snap_err(vm, e))?;
        // SAFETY: mkdirat with a directory descriptor this function owns and a NUL-terminated
        // name of plain characters (checked above).
        if unsafe { libc::mkdirat(parent.as_raw_fd(), c_name.as_ptr(), 0o700) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(snap_err(
                vm,
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    format!("{to}/{name} exists already: name the snapshot otherwise")
                } else {
                    format!("making {to}/{name}: {e}")
                },
            ));
        }
        Ok(real.join(name))
    }

    /// Lets the VM run on after a snapshot paused it (`ask`: the VMM is asked to; else it
    /// did so itself); the ledger says how long it stood still.
    async fn resume_after(
        &self,
        vm: &str,
        pid: Option<u32>,
        actor: &str,
        name: &str,
        paused: Duration,
        ask: bool,
    ) -> Result<()> {
        if ask {
            match vmm_process::control(&self.run_dir(vm), &Request::Resume).await? {
                Response::Resumed(_) => {}
                Response::Error { message } => {
                    return Err(Error::VmmRefused {
                        name: vm.into(),
                        message,
                    })
                }
                other => return Err(snap_err(vm, format!("the VMM answered {other:?}"))),
            }
        }
        self.transition(
            vm,
            Transition {
                to: VmState::Running,
                pid,
                cause: Cause::Maintenance,
                actor,
                detail: &format!(
                    "resumed after snapshot {name}: stood still {:.3} s",
                    paused.as_secs_f64()
                ),
                time_ms: None,
            },
        )
    }

    /// What the snapshot keeps of each disk of `spec`: overlays and read-only disks are
    /// named; the others are copied into `dir` (made here).
    async fn copy_disks(
        self: &Arc<Self>,
        vm: &str,
        spec: &api::VmSpec,
        kept: &[Kept],
        dir: &Path,
        progress: &crate::operations::Progress,
    ) -> Result<Vec<SnapshotDisk>> {
        let (this, vm, spec, kept, dir, progress) = (
            self.clone(),
            vm.to_string(),
            spec.clone(),
            kept.to_vec(),
            dir.to_path_buf(),
            progress.clone(),
        );
        let count = kept.iter().filter(|k| matches!(k, Kept::Copy(_))).count();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| snap_err(&vm, format!("making {}: {e}", dir.display())))?;
            let mut disks = Vec::new();
            let mut nth = 0;
            for (i, (disk, kept)) in spec.disks.iter().zip(&kept).enumerate() {
                let named = |how: Option<&str>, overlay: Option<&Path>| SnapshotDisk {
                    path: disk.path.clone(),
                    copy: None,
                    how: how.map(str::to_string),
                    overlay: overlay.map(|p| p.display().to_string()),
                    copied_because: None,
                };
                let why = match kept {
                    Kept::ReadOnly => {
                        disks.push(named(None, None));
                        continue;
                    }
                    Kept::Overlay(path) => {
                        disks.push(named(Some("overlay"), Some(path)));
                        continue;
                    }
                    Kept::Copy(why) => why,
                };
                let from = this.images.open("disk", &disk.path, libc::O_RDONLY)?;
                let copy = dir.join(format!("disk{i}"));
                nth += 1;
                progress.step(format!(
                    "copying disk {nth} of {count} ({}: {why}), the guest standing still",
                    disk.path
                ));
                let to = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&copy)
                    .map_err(|e| snap_err(&vm, format!("making {}: {e}", copy.display())))?;
                let how = copy_disk(&from, &to, &|done, all| progress.update(done, all))
                    .map_err(|e| snap_err(&vm, format!("copying {}: {e}", disk.path)))?;
                disks.push(SnapshotDisk {
                    path: disk.path.clone(),
                    copy: Some(copy.display().to_string()),
                    how: Some(how.into()),
                    overlay: None,
                    copied_because: Some(why.clone()),
                });
            }
            Ok(disks)
        })
        .await
        .unwrap_or_else(|e| Err(snap_err("?", e)))
    }

    /// Removes every snapshot of VM `vm` (being deleted): their files and manifests. How
    /// many were removed.
    pub(super) fn remove_all_snapshots(&self, vm: &str) -> usize {
        let all = self.snapshots_of(vm);
        let mut removed = 0;
        for entry in std::fs::read_dir(&all).into_iter().flatten().flatten() {
            let index = entry.path();
            if let Ok(info) = read_manifest(&index) {
                let _ = std::fs::remove_dir_all(files_of(&index, &info));
                removed += 1;
            }
            let _ = std::fs::remove_dir_all(&index);
        }
        let _ = std::fs::remove_dir(&all);
        removed
    }

    /// Snapshot `snapshot` of VM `vm`: its directory and what its manifest says.
    pub(super) fn find_snapshot(
        &self,
        vm: &str,
        snapshot: &str,
    ) -> Result<(PathBuf, SnapshotInfo)> {
        api::vm::check_name(snapshot)
            .map_err(|_| snap_err(vm, format!("'{snapshot}' is not a snapshot's name")))?;
        let index = self.snapshots_of(vm).join(snapshot);
        let info = read_manifest(&index).map_err(|e| {
            snap_err(
                vm,
                format!("no snapshot '{snapshot}' ({e}); `keel vm snapshots {vm}` lists them"),
            )
        })?;
        Ok((files_of(&index, &info), info))
    }

    /// Deletes a snapshot's directory.
    pub async fn remove_snapshot(
        self: &Arc<Self>,
        vm: &str,
        snapshot: &str,
        actor: &str,
    ) -> Result<()> {
        api::vm::check_name(snapshot)
            .map_err(|_| snap_err(vm, format!("'{snapshot}' is not a snapshot's name")))?;
        // Held so that no snapshot of the VM makes overlays meanwhile (which the collection
        // below would find unreached).
        let held = self.lock_for_request(vm).await?;
        let index = self.snapshots_of(vm).join(snapshot);
        let info = read_manifest(&index)
            .map_err(|_| snap_err(vm, format!("it has no snapshot '{snapshot}'")))?;
        let files = files_of(&index, &info);
        for dir in [&files, &index] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(snap_err(vm, format!("removing {}: {e}", dir.display())))
                }
                _ => {}
            }
        }
        self.with_store(|s| {
            s.record(&NewEvent::host(
                Some(vm),
                Cause::Operator,
                actor,
                format!("snapshot {snapshot} removed"),
            ))
        })?;
        // The overlays it kept leave their chains where they can (see `snapshot_merge`),
        // and the files nothing reaches go, but only of a VM defined here (one that left for
        // another host runs on its files there).
        if self.get(vm).is_ok() {
            // Merging copies data: off the async workers.
            let (this, vm, snapshot) = (self.clone(), vm.to_string(), snapshot.to_string());
            // The VM's lock goes with the work: a request dropped meanwhile must not let the
            // VM start while its files are rewritten.
            let _ = tokio::task::spawn_blocking(move || {
                let _held = held;
                this.tidy_after_removal(&vm, &snapshot)
            })
            .await;
        }
        Ok(())
    }

    /// After snapshot `snapshot` of VM `vm` was removed: the VM's overlays that nothing names
    /// leave their chains where they can (its own, and any an earlier removal had to leave),
    /// and the VM's files nothing reaches go.
    fn tidy_after_removal(&self, vm: &str, snapshot: &str) {
        let (merged, removed) = self.tidy_disks(vm);
        for (middle, child) in merged {
            tracing::info!(
                "VM '{vm}': after snapshot {snapshot} was removed, overlay {} merged into {}",
                middle.display(),
                child.display()
            );
        }
        if !removed.is_empty() {
            tracing::info!(
                "VM '{vm}': snapshot {snapshot} removed with {} overlay(s) nothing reaches",
                removed.len()
            );
        }
    }
}

/// Where a snapshot's files are: beside its manifest (wherever the state directory is now),
/// or where `--to` put them.
fn files_of(index: &Path, info: &SnapshotInfo) -> PathBuf {
    if index.join("state").exists() {
        index.to_path_buf()
    } else {
        PathBuf::from(&info.dir)
    }
}

fn read_manifest(dir: &Path) -> std::result::Result<SnapshotInfo, String> {
    let bytes = api::control::read_run_file(&dir.join(MANIFEST)).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}
