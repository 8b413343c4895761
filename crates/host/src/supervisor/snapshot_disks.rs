//! A snapshot's writable disks kept without copying them. Before the pause the daemon makes
//! a qcow2 overlay over each disk's present file (`vms/VM/diskI.deltaN.qcow2` of the first
//! image directory) and the VM's definition names them; the VMM switches to them in the
//! snapshot's request, after it saved the state and before the guest runs again (the files
//! handed over with the request): from then on the
//! present file no longer changes, and it is the snapshot's disk. A restore starts a new
//! overlay over it. Overlays nothing reaches any more (not a disk of a VM here, not a
//! snapshot's, not below either in a backing chain) are removed.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use api::control::DiskSwitch;
use api::vm::DiskFormat;
use api::{Cause, VmSpec};

use super::{Error, Result, Supervisor};
use crate::ledger::NewEvent;
use crate::vmm_process;

/// The disks a snapshot's request switches, with the files that go with it.
#[derive(Debug, Default)]
pub(super) struct Switch {
    pub disks: Vec<DiskSwitch>,
    files: Vec<disk::ImageFiles>,
}

impl Switch {
    /// The descriptors, in the order the request's `switch_disks` counts them.
    pub fn fds(&self) -> Vec<RawFd> {
        self.files
            .iter()
            .flat_map(|f| f.files().map(|file| file.as_raw_fd()))
            .collect()
    }
}

/// A file by device and inode.
pub(super) type FileId = (u64, u64);

/// A disk's backing chain from the file named down: each file, and the path it was reached by.
pub(super) type Chain = Vec<(FileId, PathBuf)>;

/// What the VMs and snapshots of a host reach (see [`Supervisor::reach`]).
pub(super) struct Reach {
    /// Each disk's backing chain, from the file named down.
    pub chains: Vec<Chain>,
    /// The files running VMs' definitions name as their disks.
    pub written: HashSet<FileId>,
}

impl Reach {
    /// Every file reached.
    pub fn reached(&self) -> HashSet<FileId> {
        self.chains.iter().flatten().map(|(id, _)| *id).collect()
    }
}

/// What a snapshot does with one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kept {
    /// Read-only: named, as it does not change.
    ReadOnly,
    /// The VM goes on in this new overlay; the disk's file is kept as it is.
    Overlay(PathBuf),
    /// Copied while the guest stands still, for this reason.
    Copy(String),
}

fn snap_err(vm: &str, why: impl std::fmt::Display) -> Error {
    Error::Snapshot {
        vm: vm.to_string(),
        why: why.to_string(),
    }
}

/// Whether `name` is one the daemon gives the overlays it makes for snapshots.
pub(super) fn is_delta(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("disk")
        .and_then(|r| r.strip_suffix(".qcow2"))
    else {
        return false;
    };
    let Some((index, n)) = rest.split_once(".delta") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(index) && digits(n)
}

/// A new file `dir/diskI.deltaN.qcow2` (owner only), N at least `from` and above any such
/// file's there. Returns it and N.
fn new_delta(dir: &Path, index: usize, from: u64) -> std::io::Result<(PathBuf, File, u64)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let prefix = format!("disk{index}.delta");
    let highest = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !is_delta(&name) {
                return None;
            }
            name.strip_prefix(&prefix)?
                .strip_suffix(".qcow2")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    let first = from.max(highest + 1);
    for n in first..first + 1000 {
        let path = dir.join(format!("{prefix}{n}.qcow2"));
        match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((path, file, n)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free overlay name"))
}

/// The store's mark of an overlay this host made (only those are merged or removed here:
/// another host sharing the storage may need its own, for snapshots this one never saw).
fn made_key(path: &Path) -> String {
    format!("overlay-made:{}", path.display())
}

/// The store's next number for VM `vm`'s disk `index`'s overlays (never given twice here).
fn next_key(vm: &str, index: usize) -> String {
    format!("overlay-next:{vm}:{index}")
}

/// The disk's size as a guest sees it: a raw file's length, a qcow2 image's virtual size.
pub(super) fn virtual_size(files: &disk::ImageFiles) -> std::result::Result<u64, String> {
    match files.format {
        disk::Format::Raw => files
            .top
            .metadata()
            .map(|m| m.len())
            .map_err(|e| e.to_string()),
        disk::Format::Qcow2 => disk::qcow2::chain::read_header(&files.top, &files.path)
            .map(|h| h.size)
            .map_err(|e| e.to_string()),
    }
}

impl Supervisor {
    /// Before the pause: for each disk of `spec`, what the snapshot will do; an overlay over
    /// each writable disk that can have one is made (and synced) now, so that the guest
    /// stands still only for the switch. A disk is copied instead when it is `direct=on`
    /// (qcow2 is not served with direct I/O) or its backing chain is as deep as a chain may
    /// be.
    pub(super) fn prepare_overlays(&self, vm: &str, spec: &VmSpec) -> Result<Vec<Kept>> {
        let dir = self.library.vm_dir(vm);
        let mut kept = Vec::new();
        let made = (|| -> Result<()> {
            for (i, d) in spec.disks.iter().enumerate() {
                if d.readonly {
                    kept.push(Kept::ReadOnly);
                    continue;
                }
                if d.direct {
                    kept.push(Kept::Copy(
                        "it is direct=on, and qcow2 overlays are not served with direct I/O".into(),
                    ));
                    continue;
                }
                let files = vmm_process::open_disk(d, &self.images)?;
                if files.backing.len() + 1 > disk::qcow2::MAX_CHAIN {
                    kept.push(Kept::Copy(format!(
                        "its backing chain is {} images deep, and an overlay would make it deeper than {}",
                        files.backing.len(),
                        disk::qcow2::MAX_CHAIN
                    )));
                    continue;
                }
                // Whole sectors: a raw disk of another size is refused at start.
                let size = virtual_size(&files).map_err(|e| snap_err(vm, e))?;
                let (path, file) = self.make_delta(vm, i)?;
                // Pushed first: a failure below removes it with the others.
                kept.push(Kept::Overlay(path.clone()));
                disk::qcow2::create::create_overlay(
                    file,
                    &path,
                    size,
                    Some((&d.path, crate::library::image_format(d.format))),
                )
                .map_err(|e| snap_err(vm, e))?;
            }
            // The new names are durable before any definition names them.
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| snap_err(vm, format!("syncing {}: {e}", dir.display())))
        })();
        match made {
            Ok(()) => Ok(kept),
            Err(e) => {
                self.remove_overlays(&kept);
                Err(e)
            }
        }
    }

    /// Before the snapshot's request: the VM's definitions (the store's, and the run
    /// directory's that a VMM taking the guest over reads) name the overlays of `kept`, and
    /// their files are opened to go with the request, which switches the VMM to them. On an
    /// error the overlays are gone, unless a definition names them still.
    ///
    /// The definitions name them from now on whatever the VMM does: an overlay the VMM did
    /// not switch to is empty and reads as the file below it, so the definition is right
    /// either way (after a failed snapshot, or a daemon that dies here); a snapshot that
    /// failed leaves at most a layer more in the chain.
    pub(super) fn name_overlays(
        &self,
        vm: &str,
        spec: &VmSpec,
        kept: &[Kept],
        snapshot: &str,
        actor: &str,
    ) -> Result<Switch> {
        let mut next = spec.clone();
        let mut switch = Switch::default();
        let opened = (|| -> Result<()> {
            for (i, k) in kept.iter().enumerate() {
                let Kept::Overlay(path) = k else { continue };
                let disk = &mut next.disks[i];
                disk.path = path.display().to_string();
                disk.format = DiskFormat::Qcow2;
                let opened = vmm_process::open_disk(disk, &self.images)?;
                switch.disks.push(DiskSwitch {
                    index: i,
                    path: disk.path.clone(),
                    files: 1 + opened.backing.len(),
                });
                switch.files.push(opened);
            }
            let fds: usize = switch.disks.iter().map(|d| d.files).sum();
            if fds > api::control::MAX_SNAPSHOT_FDS {
                return Err(snap_err(
                    vm,
                    format!("its overlays and their chains are {fds} files, more than the {} one request may hand over", api::control::MAX_SNAPSHOT_FDS),
                ));
            }
            Ok(())
        })();
        if let Err(e) = opened {
            self.remove_overlays(kept);
            return Err(e);
        }
        if switch.disks.is_empty() {
            return Ok(switch);
        }
        let named = switch
            .disks
            .iter()
            .map(|d| format!("disk {} in {}", d.index, d.path))
            .collect::<Vec<_>>()
            .join(", ");
        if let Err(e) = self.store_spec(
            vm,
            &next,
            actor,
            format!("snapshot {snapshot}: the VM writes on in new overlays ({named})"),
        ) {
            self.remove_overlays(kept);
            return Err(e);
        }
        let indexes: Vec<usize> = switch.disks.iter().map(|d| d.index).collect();
        // A VMM taking the guest over reads the run directory's: it must name the overlays
        // before the VMM serves them, or the new one would take a qcow2 file for raw.
        if let Err(why) = vmm_spec_names(&self.run_dir(vm), &next, &indexes) {
            self.unname_overlays(vm, spec, kept, &switch.disks, snapshot, actor, &why);
            return Err(snap_err(
                vm,
                format!("updating the definition in its run directory: {why}"),
            ));
        }
        Ok(switch)
    }

    /// The VMM answered that it switched no disk: the definitions name the disks' files again
    /// (`spec`), and the overlays go. If the store cannot be written they stay named (which
    /// is right either way, see [`Self::name_overlays`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn unname_overlays(
        &self,
        vm: &str,
        spec: &VmSpec,
        kept: &[Kept],
        switched: &[DiskSwitch],
        snapshot: &str,
        actor: &str,
        why: &str,
    ) {
        if switched.is_empty() {
            self.remove_overlays(kept);
            return;
        }
        let back = self.store_spec(
            vm,
            spec,
            actor,
            format!("snapshot {snapshot} failed, the VM's disks are as they were: {why}"),
        );
        if let Err(e) = back {
            tracing::warn!("VM '{vm}': its definition keeps naming the overlays: {e}");
            return;
        }
        let indexes: Vec<usize> = switched.iter().map(|d| d.index).collect();
        if let Err(e) = vmm_spec_names(&self.run_dir(vm), spec, &indexes) {
            tracing::warn!("VM '{vm}': updating the definition in its run directory: {e}");
        }
        self.remove_overlays(kept);
    }

    /// A new overlay file for VM `vm`'s disk `index`, in its directory, marked in the store
    /// as made here, under a name not given before.
    fn make_delta(&self, vm: &str, index: usize) -> Result<(PathBuf, File)> {
        let dir = self.library.vm_dir(vm);
        let from = self
            .with_store(|s| s.meta(&next_key(vm, index)))?
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1);
        let (path, file, n) = new_delta(&dir, index, from)
            .map_err(|e| snap_err(vm, format!("making an overlay in {}: {e}", dir.display())))?;
        let marked = self.with_store(|s| {
            s.set_meta(&next_key(vm, index), &(n + 1).to_string())?;
            s.set_meta(&made_key(&path), "1")
        });
        if let Err(e) = marked {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        Ok((path, file))
    }

    /// Removes the overlays `kept` names (made for a snapshot that did not happen).
    fn remove_overlays(&self, kept: &[Kept]) {
        for k in kept {
            if let Kept::Overlay(path) = k {
                let _ = self.remove_delta(path);
            }
        }
    }

    /// Whether this host made the overlay at `path` (see [`made_key`]).
    pub(super) fn made_here(&self, path: &Path) -> bool {
        self.with_store(|s| s.meta(&made_key(path)))
            .ok()
            .flatten()
            .is_some()
    }

    /// Removes the overlay at `path` this host made, and its mark.
    pub(super) fn remove_delta(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)?;
        let _ = self.with_store(|s| s.delete_meta(&made_key(path)));
        Ok(())
    }

    /// Stores VM `vm`'s definition `spec` (its disks moved to overlays), recording `why`.
    pub(super) fn store_spec(
        &self,
        vm: &str,
        spec: &VmSpec,
        actor: &str,
        why: String,
    ) -> Result<()> {
        self.with_store(|s| {
            s.set_spec(spec, &NewEvent::host(Some(vm), Cause::Operator, actor, why))
        })?;
        Ok(())
    }

    /// A new overlay over snapshot disk `frozen` (in `format`) for disk `index` of VM `vm`:
    /// a restore goes on from the snapshot's disk without copying it.
    pub(super) fn overlay_over(
        &self,
        vm: &str,
        index: usize,
        frozen: &api::DiskSpec,
    ) -> Result<PathBuf> {
        let files = vmm_process::open_disk(
            &api::DiskSpec {
                readonly: true,
                direct: false,
                ..frozen.clone()
            },
            &self.images,
        )?;
        let size = virtual_size(&files).map_err(|e| snap_err(vm, e))?;
        let dir = self.library.vm_dir(vm);
        let (path, file) = self.make_delta(vm, index)?;
        let made = disk::qcow2::create::create_overlay(
            file,
            &path,
            size,
            Some((&frozen.path, crate::library::image_format(frozen.format))),
        )
        .map_err(|e| snap_err(vm, e))
        .and_then(|()| {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| snap_err(vm, e))
        });
        if let Err(e) = made {
            let _ = self.remove_delta(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Removes the files in VM `vm`'s own directory that nothing reaches: with `all`, any
    /// file there (the VM is being deleted); else only the overlays snapshots made. A file
    /// is reached when a VM of this host names it as a disk, a snapshot of this host names
    /// it, or it lies below either in a backing chain. When a chain cannot be read whole,
    /// nothing is removed. Returns what was removed.
    pub(crate) fn collect_disks(&self, vm: &str, all: bool) -> Vec<PathBuf> {
        self.collect_disks_with(vm, all, None)
    }

    /// [`Self::collect_disks`], with what the host reaches when the caller has it already.
    pub(super) fn collect_disks_with(
        &self,
        vm: &str,
        all: bool,
        reach: Option<&Reach>,
    ) -> Vec<PathBuf> {
        let dir = self.library.vm_dir(vm);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        // Each file, and whether it is an overlay this host made.
        let mut candidates: Vec<(PathBuf, bool)> = Vec::new();
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            // A merge cut short (the VM's lock is held: none runs now) is never reached.
            if name.ends_with(super::snapshot_merge::MERGING) {
                let _ = std::fs::remove_file(entry.path());
            } else if is_delta(name) {
                // Another host's may be a disk of a snapshot kept there.
                if self.made_here(&entry.path()) {
                    candidates.push((entry.path(), true));
                }
            } else if all {
                candidates.push((entry.path(), false));
            }
        }
        if candidates.is_empty() {
            return Vec::new();
        }
        let computed;
        let reach = match reach {
            Some(reach) => reach,
            None => match self.reach() {
                Ok(r) => {
                    computed = r;
                    &computed
                }
                Err(why) => {
                    tracing::warn!("VM '{vm}': its unused disk files are kept: {why}");
                    return Vec::new();
                }
            },
        };
        let reached = reach.reached();
        let mut removed = Vec::new();
        for (path, made_here) in candidates {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if reached.contains(&(meta.dev(), meta.ino())) {
                continue;
            }
            let gone = if made_here {
                self.remove_delta(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed.push(path),
                Err(e) => tracing::warn!("removing {}: {e}", path.display()),
            }
        }
        if all {
            // Gone if nothing is left in it.
            let _ = std::fs::remove_dir(&dir);
        }
        removed
    }

    /// What the VMs and snapshots of this host reach, and which files running VMs write in.
    pub(super) fn reach(&self) -> std::result::Result<Reach, String> {
        let mut chains = Vec::new();
        let mut reach = |files: disk::ImageFiles| -> std::result::Result<(), String> {
            let mut chain = Vec::new();
            let paths = std::iter::once(files.path.clone())
                .chain(files.backing.iter().map(|l| l.path.clone()));
            for (file, path) in files.files().zip(paths) {
                let meta = file.metadata().map_err(|e| e.to_string())?;
                chain.push(((meta.dev(), meta.ino()), path));
            }
            chains.push(chain);
            Ok(())
        };
        let mut roots: Vec<api::DiskSpec> = Vec::new();
        let mut copies: Vec<(String, DiskFormat)> = Vec::new();
        let mut written = HashSet::new();
        for row in self.with_store(|s| s.vms()).map_err(|e| e.to_string())? {
            if row.state.has_vmm() {
                for d in &row.spec.disks {
                    if let Ok(m) = std::fs::metadata(&d.path) {
                        written.insert((m.dev(), m.ino()));
                    }
                }
            }
            roots.extend(row.spec.disks);
        }
        for info in self.all_snapshots()? {
            for (disk, then) in info.disks.iter().zip(&info.spec.disks) {
                roots.push(api::DiskSpec {
                    path: disk.path.clone(),
                    ..then.clone()
                });
                if let Some(copy) = &disk.copy {
                    copies.push((copy.clone(), then.format));
                }
            }
        }
        for root in roots {
            let spec = api::DiskSpec {
                readonly: true,
                direct: false,
                ..root
            };
            match vmm_process::open_disk(&spec, &self.images) {
                Ok(files) => reach(files)?,
                // A file that is gone reaches nothing.
                Err(_) if !Path::new(&spec.path).exists() => {}
                Err(e) => return Err(format!("reading the chain of {}: {e}", spec.path)),
            }
        }
        // A snapshot's copy of a qcow2 disk lies in the state directory, its backing files
        // beneath the image directories.
        for (copy, format) in copies {
            let top = match File::open(&copy) {
                Ok(top) => top,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{copy}: {e}")),
            };
            let format = crate::library::image_format(format);
            let files = vmm_process::open_chain(top, Path::new(&copy), format, &self.images)
                .map_err(|e| format!("reading the chain of {copy}: {e}"))?;
            reach(files)?;
        }
        Ok(Reach { chains, written })
    }
}

/// Makes the definition in the VM's run directory (which a VMM taking the guest over
/// reads; it has the cloud-init seed the store's has not) name disks `indexes` as `spec`
/// does.
fn vmm_spec_names(
    run_dir: &vmm_process::RunDir,
    spec: &VmSpec,
    indexes: &[usize],
) -> std::result::Result<(), String> {
    let bytes = api::control::read_run_file(&run_dir.file(api::control::files::SPEC))
        .map_err(|e| e.to_string())?;
    let mut running = serde_json::from_slice::<VmSpec>(&bytes).map_err(|e| e.to_string())?;
    for &i in indexes {
        if let (Some(to), Some(from)) = (running.disks.get_mut(i), spec.disks.get(i)) {
            to.path = from.path.clone();
            to.format = from.format;
        }
    }
    run_dir.write_spec(&running).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::is_delta;

    #[test]
    fn only_the_names_snapshots_give_are_deltas() {
        for name in ["disk0.delta1.qcow2", "disk12.delta345.qcow2"] {
            assert!(is_delta(name), "{name}");
        }
        for name in [
            "disk0.qcow2",
            "disk0.delta.qcow2",
            "disk.delta1.qcow2",
            "disk0.delta1.qcow2.tmp",
            "seed.img",
            "disk0.deltax.qcow2",
        ] {
            assert!(!is_delta(name), "{name}");
        }
    }
}
