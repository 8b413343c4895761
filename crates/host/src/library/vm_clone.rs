//! `keel vm clone`: a stopped VM copied under a new name, as an operation. Its disks are
//! copied (holes kept) into the clone's own directory; a qcow2 clone of a library image is
//! copied as it is, so the copy is a clone of the same image. The source VM's lock is held
//! throughout, so it cannot start while its disks are read.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use api::image::{Operation, VmCloneRequest};
use api::vm::{DiskFormat, NetSpec};

use super::{copy, Error, Result};
use crate::supervisor::Supervisor;

/// The kind of a clone operation.
pub const VM_CLONE: &str = "vm-clone";

fn clone_err(vm: &str, why: String) -> Error {
    Error::Copy {
        vm: vm.to_string(),
        why,
    }
}

impl Supervisor {
    /// Starts cloning stopped VM `source` as `request.name`; returns the operation.
    pub fn clone_vm(
        self: &Arc<Self>,
        source: &str,
        request: VmCloneRequest,
        actor: &str,
    ) -> Result<Operation> {
        api::vm::check_name(&request.name).map_err(|_| Error::BadName(request.name.clone()))?;
        let row = self
            .with_store(|s| s.vm(source))?
            .ok_or_else(|| clone_err(source, "there is no such VM".into()))?;
        if row.state.has_vmm() {
            return Err(clone_err(
                source,
                format!(
                    "it is {}: stop it first (its disks change while it runs)",
                    row.state
                ),
            ));
        }
        if self.with_store(|s| s.vm(&request.name))?.is_some() {
            return Err(clone_err(
                source,
                format!("a VM named '{}' exists; pick another name", request.name),
            ));
        }
        let progress = self.operations.start(VM_CLONE, &request.name);
        let started = progress.info();
        let app = self.clone();
        let (source, actor) = (source.to_string(), actor.to_string());
        tokio::task::spawn_blocking(move || {
            let lock = app.vm_lock(&source);
            let _held = lock.blocking_lock();
            let dir = app.library.vm_dir(&request.name);
            let result = (|| -> Result<(String, Vec<String>)> {
                let row = app
                    .with_store(|s| s.vm(&source))?
                    .ok_or_else(|| clone_err(&source, "it was deleted meanwhile".into()))?;
                if row.state.has_vmm() {
                    return Err(clone_err(&source, "it was started meanwhile".into()));
                }
                let mut spec = row.spec.clone();
                spec.name = request.name.clone();
                spec.autostart = false;
                app.remove_vm_disks(&request.name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| clone_err(&source, format!("making {}: {e}", dir.display())))?;
                let count = spec.disks.len();
                for (i, disk) in spec.disks.iter_mut().enumerate() {
                    progress.step(format!("copying disk {} of {count}", i + 1));
                    let from = app.images.open("disk", &disk.path, libc::O_RDONLY)?;
                    if disk.format == DiskFormat::Qcow2 && disk.image.is_none() {
                        let header = disk::qcow2::chain::read_header(&from, Path::new(&disk.path))
                            .map_err(|e| clone_err(&source, e.to_string()))?;
                        if header
                            .backing
                            .as_ref()
                            .is_some_and(|b| !b.name.starts_with('/'))
                        {
                            return Err(clone_err(
                                &source,
                                format!("disk {} names its backing file by a relative path, which would not hold in the copy; rebase it to an absolute path (qemu-img rebase -u)", disk.path),
                            ));
                        }
                    }
                    let ext = match disk.format {
                        DiskFormat::Qcow2 => "qcow2",
                        DiskFormat::Raw => "raw",
                    };
                    let to_path = dir.join(format!("disk{i}.{ext}"));
                    let to = File::options()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&to_path)
                        .map_err(|e| {
                            clone_err(&source, format!("making {}: {e}", to_path.display()))
                        })?;
                    copy::copy_sparse(&from, &to, &|done, all| progress.update(done, all))
                        .and_then(|()| to.sync_all())
                        .map_err(|e| clone_err(&source, format!("copying {}: {e}", disk.path)))?;
                    disk.path = to_path.display().to_string();
                }
                let mut notes = Vec::new();
                let nics = std::mem::take(&mut spec.nets);
                for (i, nic) in nics.iter().enumerate() {
                    match request.taps.get(i) {
                        Some(tap) => spec.nets.push(NetSpec {
                            tap: tap.clone(),
                            mac: None,
                            limits: nic.limits.clone(),
                        }),
                        None => notes.push(format!(
                            "NIC {i} (tap {}) is left out: a tap belongs to one VM; clone again with --net tap=NAME for each NIC",
                            nic.tap
                        )),
                    }
                }
                if spec
                    .cloud_init
                    .as_ref()
                    .is_some_and(|c| c.meta_data.is_some())
                {
                    notes.push("its cloud-init meta-data was copied as it is: give the clone its own instance-id if cloud-init is to run again".into());
                }
                app.create(&spec, &actor)
                    .map_err(|e| clone_err(&source, e.to_string()))?;
                Ok((spec.name, notes))
            })();
            match result {
                Ok((vm, notes)) => {
                    progress.outcome(Some(vm), notes);
                    progress.finish(Ok(()));
                }
                Err(e) => {
                    app.remove_vm_disks(&request.name);
                    progress.finish(Err(e.to_string()));
                }
            }
        });
        started.ok_or_else(|| clone_err("?", "its operation was lost (a bug in Keel)".into()))
    }
}
