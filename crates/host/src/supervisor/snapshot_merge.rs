//! Keeping chains short: when a snapshot is removed, the overlay it kept (its disk) is taken
//! out of the chain if it can be. Snapshot after snapshot, a VM's disk becomes
//! `... -> S1's -> S2's -> S3's -> live`; removing S2 leaves S2's overlay needed only as the
//! backing of S3's. That one (the child) is rewritten as a new image over S2's own backing
//! with S2's data merged in (`disk::qcow2::merge`), which reads exactly as the child did,
//! and renamed over it; S2's overlay is then reached by nothing and removed.
//!
//! Only overlays the daemon made, in the VM's own directory, are merged or rewritten, and
//! only when the middle one is named by nothing (no VM's disk, no snapshot's) and has one
//! child, which no running VM writes in (a VM's live overlay while it runs: renaming over
//! it would lose what the VMM writes on in the old file). A running VM that reads the child
//! or the middle as backing files reads on in the old files, which it holds open; the next
//! VMM opens the new one.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use api::vm::DiskFormat;

use super::snapshot_disks::{is_delta, FileId};
use super::Supervisor;
use crate::vmm_process;

/// The suffix of a merged image being written, beside the image it will replace.
pub(super) const MERGING: &str = ".merging";

/// Why an overlay stays in its chain (for the log), or the failure.
type Outcome = std::result::Result<PathBuf, String>;

impl Supervisor {
    /// Takes every overlay this host made for VM `vm` that nothing names out of its chain
    /// where it can (see [`Self::merge_out`]), then removes the VM's files nothing reaches.
    /// Returns the overlays merged (with the image each went into) and the files removed.
    pub(super) fn tidy_disks(&self, vm: &str) -> (Vec<(PathBuf, PathBuf)>, Vec<PathBuf>) {
        let dir = self.library.vm_dir(vm);
        let mut deltas: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_delta))
            .map(|e| e.path())
            .filter(|p| self.made_here(p))
            .collect();
        deltas.sort();
        let mut merged = Vec::new();
        for middle in deltas {
            match self.merge_out(vm, &middle) {
                Ok(child) => merged.push((middle, child)),
                Err(why) => tracing::debug!("{} stays in its chain: {why}", middle.display()),
            }
        }
        (merged, self.collect_disks(vm, false))
    }

    /// Takes the overlay at `middle` out of VM `vm`'s chains if it can be (see the module);
    /// returns the child rewritten over its backing, or why it stays.
    pub(super) fn merge_out(&self, vm: &str, middle: &Path) -> Outcome {
        let dir = self.library.vm_dir(vm);
        let ours = |p: &Path| {
            p.parent() == Some(dir.as_path())
                && p.file_name().and_then(|n| n.to_str()).is_some_and(is_delta)
        };
        if !ours(middle) || !self.made_here(middle) {
            return Err("it is not an overlay a snapshot on this host made".into());
        }
        let id = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| (m.dev(), m.ino()))
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let middle_id = id(middle)?;
        let chains = self.chains()?;
        if chains
            .iter()
            .any(|c| c.first().map(|f| f.0) == Some(middle_id))
        {
            return Err("a VM or another snapshot names it".into());
        }
        let mut children: Vec<(FileId, PathBuf)> = Vec::new();
        for chain in &chains {
            for pair in chain.windows(2) {
                if pair[1].0 == middle_id && !children.iter().any(|c| c.0 == pair[0].0) {
                    children.push(pair[0].clone());
                }
            }
        }
        let (child_id, child) = match children.as_slice() {
            [] => return Err("nothing lies over it".into()),
            [one] => one.clone(),
            _ => return Err(format!("{} images lie over it", children.len())),
        };
        if !ours(&child) || !self.made_here(&child) {
            return Err(format!(
                "{} over it is not an overlay a snapshot on this host made",
                child.display()
            ));
        }
        // Whoever writes in it holds its exclusive lock (a VMM whose definition may name
        // another file after a snapshot whose outcome is unknown, or one on another host).
        let locked = File::open(&child)
            .and_then(|f| disk::write_locked(&f))
            .map_err(|e| format!("{}: {e}", child.display()))?;
        if locked {
            return Err(format!(
                "{} over it is the disk a VMM writes in",
                child.display()
            ));
        }
        for row in self.with_store(|s| s.vms()).map_err(|e| e.to_string())? {
            if !row.state.has_vmm() {
                continue;
            }
            for d in &row.spec.disks {
                if id(Path::new(&d.path)).ok() == Some(child_id) {
                    return Err(format!(
                        "{} over it is the disk VM '{}' writes in while it runs",
                        child.display(),
                        row.spec.name
                    ));
                }
            }
        }
        self.rewrite_over_backing(&child, middle_id)?;
        Ok(child)
    }

    /// Writes `child` anew over the backing of its backing image (which is `middle_id`),
    /// that image's data merged in, and renames it over `child`.
    fn rewrite_over_backing(
        &self,
        child: &Path,
        middle_id: (u64, u64),
    ) -> std::result::Result<(), String> {
        let spec = |path: &Path| api::DiskSpec {
            path: path.display().to_string(),
            format: DiskFormat::Qcow2,
            image: None,
            size: None,
            readonly: true,
            direct: false,
            serial: None,
            limits: Default::default(),
        };
        let files =
            vmm_process::open_disk(&spec(child), &self.images).map_err(|e| e.to_string())?;
        let middle = files.backing.first().ok_or("it has no backing image")?;
        let meta = middle.file.metadata().map_err(|e| e.to_string())?;
        if (meta.dev(), meta.ino()) != middle_id {
            return Err("its backing image changed meanwhile".into());
        }
        let below = disk::qcow2::chain::read_header(&middle.file, &middle.path)
            .map_err(|e| e.to_string())?
            .backing
            .ok_or("the overlay to merge has no backing file")?;
        let below_format = match below.format.as_deref() {
            Some("raw") => disk::Format::Raw,
            Some("qcow2") => disk::Format::Qcow2,
            other => {
                return Err(format!(
                    "its backing format {other:?} is not one Keel reads"
                ))
            }
        };
        let size = disk::qcow2::chain::read_header(&files.top, &files.path)
            .map_err(|e| e.to_string())?
            .size;
        let mut name = child.as_os_str().to_owned();
        name.push(MERGING);
        let out_path = PathBuf::from(name);
        let made = (|| -> std::result::Result<(), String> {
            let out = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out_path)
                .map_err(|e| format!("making {}: {e}", out_path.display()))?;
            disk::qcow2::create::create_overlay(
                out.try_clone().map_err(|e| e.to_string())?,
                &out_path,
                size,
                Some((&below.name, below_format)),
            )
            .map_err(|e| e.to_string())?;
            let mut rest = Vec::new();
            for layer in files.backing.iter().skip(1) {
                rest.push(disk::qcow2::Layer {
                    file: layer.file.try_clone().map_err(|e| e.to_string())?,
                    format: layer.format,
                    path: layer.path.clone(),
                });
            }
            let out = disk::ImageFiles {
                top: out,
                path: out_path.clone(),
                format: disk::Format::Qcow2,
                backing: rest,
                lock_deferred: false,
            };
            let copied = disk::qcow2::merge::merge_middle(files, out, &|_, _| {})
                .map_err(|e| e.to_string())?;
            std::fs::rename(&out_path, child)
                .map_err(|e| format!("renaming it into place: {e}"))?;
            if let Some(dir) = child.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
            }
            tracing::info!(
                "{}: rewritten over {} with {copied} bytes of the overlay below merged in",
                child.display(),
                below.name
            );
            Ok(())
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&out_path);
        }
        made
    }
}
