//! The image library: images imported once (raw, qcow2, or VMDK converted to raw), kept in
//! `library/` of the first image directory with a row each in the store, and VMs' disks made
//! from them as thin clones (qcow2 overlays in `vms/NAME/`). An import runs on a blocking
//! thread as an operation whose progress clients poll; the image appears when it is whole
//! (written to a partial file, synced, renamed).

pub(crate) mod copy;
pub mod vm_clone;
pub mod vm_import;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::image::{ImageInfo, ImportRequest, Operation, SourceFormat};
use api::vm::{DiskFormat, VmSpec};
use api::Cause;

use crate::ledger::NewEvent;
use crate::store::{self, ImageRow};
use crate::supervisor::Supervisor;
use crate::time::rfc3339;

/// The kind of an import operation.
pub const IMPORT: &str = "image-import";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image name '{0}' is not allowed: use 1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("an image named '{0}' exists or is being imported; pick another name or remove it first (keel image rm)")]
    Exists(String),
    #[error("no image named '{0}'; `keel image list` shows the library")]
    NotFound(String),
    #[error("image '{name}' is used by VM(s) {}: delete them (or their disks) first", vms.join(", "))]
    InUse { name: String, vms: Vec<String> },
    #[error("{path}: say its format (--format raw|qcow2|vmdk); its name ends in none Keel knows")]
    NoFormat { path: String },
    #[error("{0}")]
    Policy(#[from] crate::images::Error),
    #[error("importing {path}: {why}")]
    Import { path: String, why: String },
    #[error("copying VM '{vm}': {why}")]
    Copy { vm: String, why: String },
    #[error("disk {index} of VM '{vm}': {why}")]
    Clone {
        vm: String,
        index: usize,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where the library and the VMs' clones live.
#[derive(Debug)]
pub struct Library {
    /// Imported images.
    pub dir: PathBuf,
    /// Disks made for VMs, a directory per VM.
    pub vms: PathBuf,
}

impl Library {
    /// The library under `images_dir` (the first image directory), made owner-only when
    /// missing; partial files an import left behind are removed.
    pub fn open(images_dir: &Path) -> std::io::Result<Library> {
        use std::os::unix::fs::DirBuilderExt;
        let library = Library {
            dir: images_dir.join("library"),
            vms: images_dir.join("vms"),
        };
        for dir in [&library.dir, &library.vms] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // What an import cut short by a stop left: partial images, unpacked OVAs.
        for entry in std::fs::read_dir(&library.dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".partial") {
                let _ = std::fs::remove_file(entry.path());
            } else if name.starts_with(".import-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(library)
    }

    /// The directory of VM `vm`'s own disks.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.vms.join(vm)
    }
}

/// The disk crate's name for a format of a definition.
pub fn image_format(format: DiskFormat) -> disk::Format {
    match format {
        DiskFormat::Raw => disk::Format::Raw,
        DiskFormat::Qcow2 => disk::Format::Qcow2,
    }
}

fn disk_format(stored: &str) -> DiskFormat {
    if stored == "qcow2" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// The VMs whose disks are `image` or a clone of it.
fn users(image: &ImageRow, vms: &[VmSpec]) -> Vec<String> {
    vms.iter()
        .filter(|vm| {
            vm.disks
                .iter()
                .any(|d| d.image.as_deref() == Some(&image.name) || d.path == image.file)
        })
        .map(|vm| vm.name.clone())
        .collect()
}

fn info(image: &ImageRow, vms: &[VmSpec]) -> ImageInfo {
    use std::os::unix::fs::MetadataExt;
    ImageInfo {
        name: image.name.clone(),
        format: disk_format(&image.format),
        path: image.file.clone(),
        virtual_size: image.virtual_size,
        allocated_bytes: std::fs::metadata(&image.file)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0),
        created: rfc3339(image.created_ms),
        source: image.source.clone(),
        used_by: users(image, vms),
    }
}

impl Supervisor {
    fn vm_specs(&self) -> Result<Vec<VmSpec>> {
        Ok(self
            .with_store(|s| s.vms())?
            .into_iter()
            .map(|r| r.spec)
            .collect())
    }

    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let vms = self.vm_specs()?;
        let images = self.with_store(|s| s.images())?;
        Ok(images.iter().map(|i| info(i, &vms)).collect())
    }

    pub fn show_image(&self, name: &str) -> Result<ImageInfo> {
        let vms = self.vm_specs()?;
        let image = self
            .with_store(|s| s.image(name))?
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(info(&image, &vms))
    }

    /// Starts importing `request.source` (which must lie in the image directories) as image
    /// `request.name`; returns the operation to follow.
    pub fn import_image(
        self: &Arc<Self>,
        request: ImportRequest,
        actor: &str,
    ) -> Result<Operation> {
        let name = request.name.clone();
        api::vm::check_name(&name).map_err(|_| Error::BadName(name.clone()))?;
        let format = request
            .format
            .or_else(|| SourceFormat::from_extension(&request.source))
            .ok_or_else(|| Error::NoFormat {
                path: request.source.clone(),
            })?;
        let source = self
            .images
            .open("image source", &request.source, libc::O_RDONLY)?;
        // Checked and started under the store's lock: two imports of one name cannot both
        // pass.
        let progress = self.with_store(|s| -> Result<_> {
            if s.image(&name)?.is_some() || self.operations.running(IMPORT, &name) {
                return Err(Error::Exists(name.clone()));
            }
            Ok(self.operations.start(IMPORT, &name))
        })?;
        let app = self.clone();
        let actor = actor.to_string();
        let started = progress.info();
        let source_path = request.source.clone();
        tokio::task::spawn_blocking(move || {
            let report = |done, total| progress.update(done, total);
            let imported = copy::import(
                &app.library,
                &app.images,
                &name,
                &request.source,
                format,
                source,
                &report,
            )
            .and_then(|row| {
                let event = NewEvent::host(
                    None,
                    Cause::Operator,
                    &actor,
                    format!(
                        "image '{}' imported from {} ({} bytes, stored as {})",
                        row.name, row.source, row.virtual_size, row.format
                    ),
                );
                app.with_store(|s| s.add_image(&row, &event)).map_err(|e| {
                    let _ = std::fs::remove_file(&row.file);
                    Error::from(e)
                })
            });
            progress.finish(imported.map_err(|e| e.to_string()));
        });
        started.ok_or_else(|| Error::Import {
            path: source_path,
            why: "its operation was lost (a bug in Keel)".into(),
        })
    }

    /// Removes image `name` and its file; refused while a VM uses it.
    pub fn remove_image(&self, name: &str, actor: &str) -> Result<()> {
        let vms = self.vm_specs()?;
        let image = self
            .with_store(|s| s.image(name))?
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let vms = users(&image, &vms);
        if !vms.is_empty() {
            return Err(Error::InUse {
                name: name.to_string(),
                vms,
            });
        }
        let event = NewEvent::host(
            None,
            Cause::Operator,
            actor,
            format!("image '{name}' removed ({})", image.file),
        );
        if !self.with_store(|s| s.remove_image(name, &event))? {
            return Err(Error::NotFound(name.to_string()));
        }
        if let Err(e) = std::fs::remove_file(&image.file) {
            tracing::warn!("image '{name}': removing {} failed: {e}", image.file);
        }
        Ok(())
    }

    /// `spec` with its disks that name a library image made: a qcow2 overlay each, in the
    /// VM's own directory. Returns the definition to store and the files made (to remove if
    /// the definition is not stored).
    pub fn make_image_disks(&self, spec: &VmSpec) -> Result<(VmSpec, Vec<PathBuf>)> {
        let mut spec = spec.clone();
        if spec
            .disks
            .iter()
            .all(|d| d.image.is_none() || !d.path.is_empty())
        {
            return Ok((spec, Vec::new()));
        }
        let dir = self.library.vm_dir(&spec.name);
        // No VM of this name exists (the caller checked): anything here is left over, but
        // what another VM or a snapshot reaches.
        self.remove_vm_disks(&spec.name);
        let mut made = Vec::new();
        let result = (|| -> Result<()> {
            for (index, disk) in spec.disks.iter_mut().enumerate() {
                let Some(image) = disk.image.clone().filter(|_| disk.path.is_empty()) else {
                    continue;
                };
                let failed = |why: String| Error::Clone {
                    vm: spec.name.clone(),
                    index,
                    why,
                };
                let row = self
                    .with_store(|s| s.image(&image))?
                    .ok_or_else(|| Error::NotFound(image.clone()))?;
                let size = disk.size.unwrap_or(row.virtual_size).next_multiple_of(512);
                if size < row.virtual_size {
                    return Err(failed(format!(
                        "size {size} is smaller than image '{image}' ({} bytes); a clone cannot shrink it",
                        row.virtual_size
                    )));
                }
                std::fs::create_dir_all(&dir).map_err(|e| failed(e.to_string()))?;
                let path = dir.join(format!("disk{index}.qcow2"));
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| failed(format!("creating {}: {e}", path.display())))?;
                made.push(path.clone());
                let base_format = image_format(disk_format(&row.format));
                disk::qcow2::create::create_overlay(
                    file,
                    &path,
                    size,
                    Some((&row.file, base_format)),
                )
                .map_err(|e| failed(e.to_string()))?;
                disk.path = path.display().to_string();
                disk.format = DiskFormat::Qcow2;
                disk.size = Some(size);
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok((spec, made)),
            Err(e) => {
                for path in &made {
                    let _ = std::fs::remove_file(path);
                }
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Removes the disks the daemon made for VM `name` (no longer defined, or never), but
    /// those another VM or a snapshot still reaches through a backing chain.
    pub fn remove_vm_disks(&self, name: &str) {
        let kept = self.collect_disks(name, true);
        let dir = self.library.vm_dir(name);
        if dir.exists() {
            tracing::info!(
                "VM '{name}': {} kept: files in it are still reached by another VM or a snapshot ({} removed)",
                dir.display(),
                kept.len()
            );
        }
    }
}
