//! An import's work, on a blocking thread: the source read (raw and qcow2 copied as they are,
//! skipping holes; VMDK converted to raw by Keel's reader), written to a partial file in the
//! library, checked, synced and renamed into place.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use api::image::SourceFormat;

use super::{Error, Library, Result};
use crate::images::ImageDirs;
use crate::store::ImageRow;
use crate::time::now_ms;

/// Copies `src` to `dst` (empty), leaving holes where `src` has them (`disk::copy`);
/// `progress` hears (position, length).
pub fn copy_sparse(src: &File, dst: &File, progress: &dyn Fn(u64, u64)) -> std::io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    disk::copy::copy_sparse(src, 0, len, dst, 0, &mut |done| progress(done, len))
        .map_err(std::io::Error::other)?;
    Ok(())
}

/// Imports `source` (open, at `source_path`) as image `name`; the row to store.
pub fn import(
    library: &Library,
    dirs: &ImageDirs,
    name: &str,
    source_path: &str,
    format: SourceFormat,
    source: File,
    progress: &dyn Fn(u64, u64),
) -> Result<ImageRow> {
    let failed = |why: String| Error::Import {
        path: source_path.to_string(),
        why,
    };
    let partial = library.dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let mut dst = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| failed(format!("creating {}: {e}", partial.display())))?;
    let result = (|| -> Result<(&'static str, u64)> {
        match format {
            SourceFormat::Raw => {
                let len = source.metadata().map_err(|e| failed(e.to_string()))?.len();
                if len == 0 || !len.is_multiple_of(512) {
                    return Err(failed(format!(
                        "{len} bytes is not a disk of whole 512-byte sectors"
                    )));
                }
                copy_sparse(&source, &dst, progress).map_err(|e| failed(e.to_string()))?;
                Ok(("raw", len))
            }
            SourceFormat::Qcow2 => {
                let header = disk::qcow2::chain::read_header(&source, Path::new(source_path))
                    .map_err(|e| failed(e.to_string()))?;
                if let Some(backing) = &header.backing {
                    return Err(failed(format!(
                        "it has a backing file ({}); the library keeps whole images: flatten it first (qemu-img convert -O qcow2 SRC DST)",
                        backing.name
                    )));
                }
                copy_sparse(&source, &dst, progress).map_err(|e| failed(e.to_string()))?;
                // The copy must open as the image it claims to be.
                let check = dst.try_clone().map_err(|e| failed(e.to_string()))?;
                disk::Image::from_files(
                    check,
                    &partial,
                    disk::Format::Qcow2,
                    true,
                    false,
                    Vec::new(),
                )
                .map_err(|e| failed(e.to_string()))?;
                Ok(("qcow2", header.size))
            }
            SourceFormat::Vmdk => {
                let open = |p: &Path| -> std::io::Result<File> {
                    let path = p.to_str().ok_or_else(|| {
                        std::io::Error::other(format!("{} is not UTF-8", p.display()))
                    })?;
                    dirs.open("VMDK file", path, libc::O_RDONLY)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                };
                let disk = disk::vmdk::convert_file_with(
                    Path::new(source_path),
                    &mut dst,
                    progress,
                    &open,
                )
                .map_err(|e| failed(e.to_string()))?;
                Ok(("raw", disk.capacity_bytes))
            }
        }
    })();
    let (stored, virtual_size) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let file = library.dir.join(format!("{name}.{stored}"));
    let done = dst
        .sync_all()
        .and_then(|()| std::fs::rename(&partial, &file))
        .and_then(|()| File::open(&library.dir)?.sync_all());
    if let Err(e) = done {
        let _ = std::fs::remove_file(&partial);
        return Err(failed(format!("storing it as {}: {e}", file.display())));
    }
    Ok(ImageRow {
        name: name.to_string(),
        format: stored.to_string(),
        file: file.display().to_string(),
        virtual_size,
        created_ms: now_ms(),
        source: format!(
            "{source_path} ({})",
            match format {
                SourceFormat::Raw => "raw",
                SourceFormat::Qcow2 => "qcow2",
                SourceFormat::Vmdk => "vmdk",
            }
        ),
    })
}
