//! New qcow2 images: thin overlays on a base image (a VM's disk on an image of the library),
//! made by imago's creator on a file the caller made.

use std::fs::File;
use std::path::Path;

use imago::qcow2::Qcow2;
use imago::FormatCreateBuilder;

use super::storage::ImageFile;
use super::Error;
use crate::Format;

/// Largest size of a new image.
pub const MAX_CREATE_SIZE: u64 = super::header::MAX_SIZE;

/// Formats `file` (new and empty, named `path` in messages) as a qcow2 image of `size` bytes
/// (a multiple of 512) over `backing`, the base's name as the header will hold it (an
/// absolute path, or one relative to `path`'s directory) and its format; syncs it.
pub fn create_overlay(
    file: File,
    path: &Path,
    size: u64,
    backing: Option<(&str, Format)>,
) -> Result<(), Error> {
    let failed = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    if size == 0 || size > MAX_CREATE_SIZE || !size.is_multiple_of(512) {
        return Err(Error::Header {
            path: path.to_path_buf(),
            source: super::header::Error::Size(size),
        });
    }
    let sync = file.try_clone().map_err(failed)?;
    let (_, metadata) =
        ImageFile::views(file, &path.display().to_string(), Vec::new()).map_err(failed)?;
    let mut builder = Qcow2::<ImageFile>::create_builder(metadata).size(size);
    if let Some((name, format)) = backing {
        builder = builder.backing(name.to_string(), format.as_str().to_string());
    }
    builder.create().map_err(failed)?;
    sync.sync_all().map_err(failed)
}
