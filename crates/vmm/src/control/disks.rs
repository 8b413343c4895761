//! Switching a paused VM's disks to new images, in a snapshot: it keeps a disk's present
//! file as it is and the VM goes on writing in a qcow2 overlay on it. The daemon makes the
//! overlay and hands its files over with the request (a jailed VMM opens no file); the VMM
//! checks that they are the chain the overlay's headers name, as for any handed-over disk.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::control::DiskSwitch;

use super::{micros, Controller};

/// Descriptors that came with a request, taken once by the command that uses them.
#[derive(Clone, Default)]
pub struct HandedFiles(Arc<Mutex<Vec<File>>>);

impl HandedFiles {
    pub fn new(files: Vec<File>) -> Self {
        Self(Arc::new(Mutex::new(files)))
    }

    /// The files, leaving none behind.
    pub fn take(&self) -> Vec<File> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl std::fmt::Debug for HandedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "HandedFiles({count})")
    }
}

/// Commands are compared by what they ask; the files are the same request's either way.
impl PartialEq for HandedFiles {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HandedFiles {}

/// Splits `files` among `disks` (each its `files` of them, in order) and walks each new
/// image's headers to check that its chain is the files handed over, no more, no fewer.
fn image_files(
    disks: &[DiskSwitch],
    files: Vec<File>,
) -> Result<Vec<(usize, disk::ImageFiles)>, String> {
    let wanted: usize = disks.iter().map(|d| d.files).sum();
    if wanted != files.len() {
        return Err(format!(
            "{} descriptors came with the request, which names {wanted}",
            files.len()
        ));
    }
    let mut seen = Vec::new();
    let mut files = files.into_iter();
    let mut out = Vec::new();
    for d in disks {
        if d.files == 0 || seen.contains(&d.index) {
            return Err(format!("disk {} is named twice or without files", d.index));
        }
        seen.push(d.index);
        let mut own: Vec<File> = files.by_ref().take(d.files).collect();
        let top = own.remove(0);
        let mut rest = own.into_iter();
        let path = Path::new(&d.path);
        let image = disk::ImageFiles::with_backing(top, path, disk::Format::Qcow2, &mut |p| {
            rest.next()
                .ok_or_else(|| format!("no file handed over for {}", p.display()))
        })
        .map_err(|e| e.to_string())?;
        if rest.next().is_some() {
            return Err(format!(
                "more files handed over for disk {} than its chain has",
                d.index
            ));
        }
        out.push((d.index, image));
    }
    Ok(out)
}

impl Controller {
    /// Paused: the disks `disks` name go on in the files handed over (their new images and
    /// chains); how long it took, microseconds. On an error no disk switched.
    pub(super) fn switch_disks(
        &mut self,
        disks: &[DiskSwitch],
        files: Vec<File>,
    ) -> Result<u64, String> {
        let started = Instant::now();
        let failed =
            |why: String| format!("switching the disks failed: {why}; they are as they were");
        let Some(m) = &mut self.machine else {
            return Err(failed("this VMM cannot switch its disks".into()));
        };
        let switched = image_files(disks, files).map_err(failed)?;
        m.devices.switch_disks(switched).map_err(failed)?;
        // The definition a later snapshot saves names the disks as they are now.
        if let Some(spec) = &mut m.spec {
            for d in disks {
                if let Some(disk) = spec.disks.get_mut(d.index) {
                    disk.path = d.path.clone();
                    disk.format = api::vm::DiskFormat::Qcow2;
                }
            }
        }
        eprintln!(
            "keel: {} disk(s) switched to new images ({})",
            disks.len(),
            disks
                .iter()
                .map(|d| d.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(micros(started.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw base and a qcow2 overlay on it, in a fresh directory.
    fn chain(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("keel-switch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.raw");
        File::create(&base).unwrap().set_len(1 << 20).unwrap();
        let top = dir.join("top.qcow2");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&top)
            .unwrap();
        disk::qcow2::create::create_overlay(
            file,
            &top,
            1 << 20,
            Some((base.to_str().unwrap(), disk::Format::Raw)),
        )
        .unwrap();
        (top, base)
    }

    fn switch(top: &Path, files: usize) -> DiskSwitch {
        DiskSwitch {
            index: 0,
            path: top.display().to_string(),
            files,
        }
    }

    #[test]
    fn handed_files_must_be_the_chain_the_headers_name() {
        let (top, base) = chain("chain");
        let open = |p: &Path| File::open(p).unwrap();
        let whole = image_files(&[switch(&top, 2)], vec![open(&top), open(&base)]).unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].1.backing.len(), 1);

        let short = image_files(&[switch(&top, 1)], vec![open(&top)]).unwrap_err();
        assert!(short.contains("no file handed over"), "{short}");
        let long = image_files(
            &[switch(&top, 3)],
            vec![open(&top), open(&base), open(&base)],
        )
        .unwrap_err();
        assert!(long.contains("more files handed over"), "{long}");
        let miscounted = image_files(&[switch(&top, 2)], vec![open(&top)]).unwrap_err();
        assert!(miscounted.contains("1 descriptors came"), "{miscounted}");
        let twice = image_files(
            &[switch(&top, 2), switch(&top, 2)],
            vec![open(&top), open(&base), open(&top), open(&base)],
        )
        .unwrap_err();
        assert!(twice.contains("named twice"), "{twice}");
        // A raw file handed over as the new image is no qcow2 image.
        let raw = image_files(&[switch(&base, 1)], vec![open(&base)]).unwrap_err();
        assert!(raw.contains("qcow2") || raw.contains("header"), "{raw}");
        let _ = std::fs::remove_dir_all(top.parent().unwrap());
    }
}
