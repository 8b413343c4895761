//! `keel import`: a VMware VM (`.vmx`, `.ovf` or `.ova`) becomes a Keel VM. The descriptor is
//! read into a plan (crate `import`), each disk is converted into the image library as
//! `VM-diskN`, and the VM is defined on thin clones of them, booting from its first disk;
//! what cannot be carried over is listed in the operation and in the ledger. Everything runs
//! as one operation; a failure takes back the images it made.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::image::{Operation, SourceFormat, VmImportRequest};
use api::vm::{DiskSpec, NetSpec, RateLimits, VmSpec};
use api::Cause;

use super::{copy, Error, Result};
use crate::ledger::NewEvent;
use crate::operations::Progress;
use crate::supervisor::Supervisor;

/// The kind of a VM import operation.
pub const VM_IMPORT: &str = "vm-import";

/// What a source file is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vmx,
    Ovf,
    Ova,
}

fn kind_of(source: &str) -> Option<Kind> {
    let ext = source.rsplit_once('.')?.1.to_ascii_lowercase();
    match ext.as_str() {
        "vmx" => Some(Kind::Vmx),
        "ovf" => Some(Kind::Ovf),
        "ova" => Some(Kind::Ova),
        _ => None,
    }
}

fn read_bounded(file: &File, limit: usize, path: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| import_err(path, format!("reading it: {e}")))?;
    Ok(bytes)
}

fn import_err(path: &str, why: String) -> Error {
    Error::Import {
        path: path.to_string(),
        why,
    }
}

impl Supervisor {
    /// Starts importing a VMware VM; returns the operation to follow.
    pub fn import_vm(self: &Arc<Self>, request: VmImportRequest, actor: &str) -> Result<Operation> {
        let source_path = request.source.clone();
        let kind = kind_of(&source_path).ok_or_else(|| {
            import_err(
                &source_path,
                "give a .vmx, .ovf or .ova file (by its name: the contents are never guessed)"
                    .into(),
            )
        })?;
        if let Some(name) = &request.name {
            api::vm::check_name(name).map_err(|_| Error::BadName(name.clone()))?;
        }
        let source = self
            .images
            .open("VM to import", &source_path, libc::O_RDONLY)?;
        let target = request
            .name
            .clone()
            .unwrap_or_else(|| source_path.rsplit('/').next().unwrap_or("").to_string());
        let progress = self.operations.start(VM_IMPORT, &target);
        let started = progress.info();
        let app = self.clone();
        let actor = actor.to_string();
        tokio::task::spawn_blocking(move || {
            let mut made_images = Vec::new();
            let staging = app.library.dir.join(format!(".import-{}", progress.id));
            let result = app.run_import(
                &request,
                kind,
                source,
                &staging,
                &progress,
                &actor,
                &mut made_images,
            );
            let _ = std::fs::remove_dir_all(&staging);
            if result.is_err() {
                for image in &made_images {
                    let _ = app.remove_image(image, &actor);
                }
            }
            match result {
                Ok((vm, notes)) => {
                    progress.outcome(Some(vm), notes);
                    progress.finish(Ok(()));
                }
                Err(e) => progress.finish(Err(e.to_string())),
            }
        });
        started.ok_or_else(|| {
            import_err(
                &source_path,
                "its operation was lost (a bug in Keel)".into(),
            )
        })
    }

    /// The import's work; the VM's name and the notes for the operator.
    #[allow(clippy::too_many_arguments)]
    fn run_import(
        self: &Arc<Self>,
        request: &VmImportRequest,
        kind: Kind,
        source: File,
        staging: &Path,
        progress: &Progress,
        actor: &str,
        made_images: &mut Vec<String>,
    ) -> Result<(String, Vec<String>)> {
        let path = request.source.as_str();
        // The descriptor, and the directory its disks lie in.
        let (plan, disk_dir): (import::Plan, PathBuf) = match kind {
            Kind::Vmx => {
                let bytes = read_bounded(&source, import::vmx::MAX_BYTES, path)?;
                let vmx =
                    import::vmx::Vmx::parse(&bytes).map_err(|e| import_err(path, e.to_string()))?;
                (import::vmx::plan(&vmx), parent(path))
            }
            Kind::Ovf => {
                let bytes = read_bounded(&source, import::ovf::MAX_BYTES, path)?;
                let ovf =
                    import::ovf::Ovf::parse(&bytes).map_err(|e| import_err(path, e.to_string()))?;
                (ovf.plan, parent(path))
            }
            Kind::Ova => {
                progress.step("unpacking the OVA");
                std::fs::create_dir(staging)
                    .map_err(|e| import_err(path, format!("making {}: {e}", staging.display())))?;
                let unpacked = import::ova::unpack(&source, staging, &mut |done, all| {
                    progress.update(done, all)
                })
                .map_err(|e| import_err(path, e.to_string()))?;
                let ovf_file = File::open(&unpacked.ovf)
                    .map_err(|e| import_err(path, format!("opening its descriptor: {e}")))?;
                let bytes = read_bounded(&ovf_file, import::ovf::MAX_BYTES, path)?;
                let ovf =
                    import::ovf::Ovf::parse(&bytes).map_err(|e| import_err(path, e.to_string()))?;
                (ovf.plan, staging.to_path_buf())
            }
        };
        let name = request.name.clone().unwrap_or_else(|| plan.name.clone());
        api::vm::check_name(&name).map_err(|_| Error::BadName(name.clone()))?;
        if self.with_store(|s| s.vm(&name))?.is_some() {
            return Err(import_err(
                path,
                format!("a VM named '{name}' exists; import with another --name"),
            ));
        }
        if plan.disks.is_empty() {
            return Err(import_err(
                path,
                format!(
                    "it has no disk Keel can import{}",
                    if plan.not_carried.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", plan.not_carried.join("; "))
                    }
                ),
            ));
        }
        // Each disk into the library.
        let mut disks = Vec::new();
        for (i, planned) in plan.disks.iter().enumerate() {
            let image = format!("{name}-disk{i}");
            if self.with_store(|s| s.image(&image))?.is_some() {
                return Err(Error::Exists(image));
            }
            progress.step(format!(
                "converting disk {} of {} ({})",
                i + 1,
                plan.disks.len(),
                planned.file
            ));
            let vmdk = disk_dir.join(&planned.file);
            let vmdk = vmdk
                .to_str()
                .ok_or_else(|| import_err(path, "a disk name is not UTF-8".into()))?;
            let file = self.images.open("VMDK file", vmdk, libc::O_RDONLY)?;
            let row = copy::import(
                &self.library,
                &self.images,
                &image,
                vmdk,
                SourceFormat::Vmdk,
                file,
                &|done, all| progress.update(done, all),
            )?;
            let event = NewEvent::host(
                None,
                Cause::Operator,
                actor,
                format!(
                    "image '{image}' imported from {vmdk} for VM '{name}' ({} bytes)",
                    row.virtual_size
                ),
            );
            self.with_store(|s| s.add_image(&row, &event))?;
            made_images.push(image.clone());
            disks.push(DiskSpec {
                path: String::new(),
                format: api::vm::DiskFormat::Raw,
                image: Some(image),
                size: None,
                readonly: false,
                direct: false,
                serial: None,
                limits: RateLimits::default(),
            });
        }
        let mut notes = plan.not_carried.clone();
        let mut nets = Vec::new();
        for (i, nic) in plan.nics.iter().enumerate() {
            match request.taps.get(i) {
                Some(tap) => nets.push(NetSpec {
                    tap: tap.clone(),
                    mac: nic.mac.clone(),
                    limits: RateLimits::default(),
                }),
                None => notes.push(format!(
                    "NIC {} (MAC {}): no tap was given for it; import again with --net tap=NAME for each NIC",
                    nic.slot,
                    nic.mac.as_deref().unwrap_or("none")
                )),
            }
        }
        progress.step("defining the VM");
        let spec = VmSpec {
            name: name.clone(),
            cpus: plan.cpus,
            memory_mib: plan.memory_mib,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            disks,
            nets,
            rng: true,
            vsock: None,
            autostart: false,
            cpu_limit_percent: None,
            cloud_init: None,
        };
        self.create(&spec, actor)
            .map_err(|e| import_err(path, e.to_string()))?;
        self.with_store(|s| {
            s.record(&NewEvent::host(
                Some(&name),
                Cause::Operator,
                actor,
                format!(
                    "imported from {path}: {} vCPU(s), {} MiB, {} disk(s), {} NIC(s); not carried over: {}",
                    plan.cpus,
                    plan.memory_mib,
                    plan.disks.len(),
                    spec.nets.len(),
                    if notes.is_empty() { "nothing".to_string() } else { notes.join("; ") }
                ),
            ))
        })?;
        Ok((name, notes))
    }
}

/// The directory of `path`.
fn parent(path: &str) -> PathBuf {
    Path::new(path)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}
