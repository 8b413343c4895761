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

use super::snapshot_disks::{is_delta, virtual_size, FileId, Reach};
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
        let mut reach = match self.reach() {
            Ok(reach) => reach,
            Err(why) => {
                tracing::warn!("VM '{vm}': its overlays stay as they are: {why}");
                return (Vec::new(), Vec::new());
            }
        };
        let mut merged = Vec::new();
        for middle in deltas {
            match self.merge_out(vm, &middle, &reach) {
                Ok(child) => {
                    merged.push((middle, child));
                    // A chain changed: what reaches what is read again.
                    reach = match self.reach() {
                        Ok(reach) => reach,
                        Err(why) => {
                            tracing::warn!("VM '{vm}': its unused disk files are kept: {why}");
                            return (merged, Vec::new());
                        }
                    };
                }
                Err(why) => tracing::debug!("{} stays in its chain: {why}", middle.display()),
            }
        }
        let removed = self.collect_disks_with(vm, false, Some(&reach));
        (merged, removed)
    }

    /// Takes the overlay at `middle` (one this host made for VM `vm`) out of its chains if
    /// it can be (see the module), `reach` saying what the host reaches; returns the child
    /// rewritten over its backing, or why it stays.
    fn merge_out(&self, vm: &str, middle: &Path, reach: &Reach) -> Outcome {
        let dir = self.library.vm_dir(vm);
        let ours = |p: &Path| {
            p.parent() == Some(dir.as_path())
                && p.file_name().and_then(|n| n.to_str()).is_some_and(is_delta)
        };
        let middle_id = std::fs::metadata(middle)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("{}: {e}", middle.display()))?;
        if reach
            .chains
            .iter()
            .any(|c| c.first().map(|f| f.0) == Some(middle_id))
        {
            return Err("a VM or another snapshot names it".into());
        }
        let mut children: Vec<(FileId, PathBuf)> = Vec::new();
        for chain in &reach.chains {
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
        if reach.written.contains(&child_id) {
            return Err(format!(
                "{} over it is the disk a running VM writes in",
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
        self.rewrite_over_backing(&child, middle_id)?;
        Ok(child)
    }

    /// Writes `child` anew over the backing of its backing image (which is `middle_id`),
    /// that image's data merged in, and renames it over `child`.
    fn rewrite_over_backing(
        &self,
        child: &Path,
        middle_id: FileId,
    ) -> std::result::Result<(), String> {
        let top = self
            .images
            .open("disk", &child.display().to_string(), libc::O_RDONLY)
            .map_err(|e| e.to_string())?;
        let files = vmm_process::open_chain(top, child, disk::Format::Qcow2, &self.images)
            .map_err(|e| e.to_string())?;
        let (middle, below_format) = match files.backing.as_slice() {
            [middle, below, ..] => (middle, below.format),
            _ => return Err("the overlay to merge has no backing file".into()),
        };
        let meta = middle.file.metadata().map_err(|e| e.to_string())?;
        if (meta.dev(), meta.ino()) != middle_id {
            return Err("its backing image changed meanwhile".into());
        }
        // The name as the middle's header gives it: the new image names its backing the same.
        let below = disk::qcow2::chain::read_header(&middle.file, &middle.path)
            .map_err(|e| e.to_string())?
            .backing
            .ok_or("the overlay to merge has no backing file")?;
        let size = virtual_size(&files)?;
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
