//! A whole VMDK disk, converted to a raw image: a sparse extent file on its own
//! (monolithicSparse, streamOptimized), or a text descriptor and the extents it names beside
//! it (monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, vmfs-free descriptors of
//! several extents). Output is sparse where the source was: unallocated grains and all-zero
//! stretches of flat extents are not written. A snapshot (a disk with a parent) is refused:
//! its contents need the parent's.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::descriptor::{Descriptor, DescriptorError, ExtentKind, MAX_BYTES};
use super::header::{SparseHeader, MAGIC, SECTOR};
use super::sparse::{self, Converted, Sink, SparseError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Descriptor {
        path: PathBuf,
        #[source]
        source: DescriptorError,
    },
    #[error("{path}: {source}")]
    Extent {
        path: PathBuf,
        #[source]
        source: SparseError,
    },
    #[error("{path} is a snapshot (its descriptor names a parent disk): convert the disk it was taken of, with the snapshot consolidated in VMware first")]
    Snapshot { path: PathBuf },
    #[error("{path}: the extent holds {found} sectors where the descriptor says {expected}")]
    ExtentSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: the flat extent needs bytes up to {needed}, the file has {len}")]
    FlatShort {
        path: PathBuf,
        needed: u64,
        len: u64,
    },
    #[error("writing the raw image at byte {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Opens an extent beside its descriptor, following no link.
/// Opens a file of the disk read-only, not through a symbolic link.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What converting a whole disk did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disk {
    pub create_type: String,
    pub capacity_bytes: u64,
    pub extents: usize,
    /// Bytes written to the raw image (the rest is holes).
    pub written_bytes: u64,
}

/// Converts the VMDK at `path` into the raw image `dst`. `progress` hears (bytes done, bytes
/// in all).
pub fn convert_file(
    path: &Path,
    dst: &mut File,
    progress: impl FnMut(u64, u64),
) -> Result<Disk, ImageError> {
    convert_file_with(path, dst, progress, &open_nofollow)
}

/// [`convert_file`], with `open` opening each file of the disk read-only (the descriptor or
/// single file at `path`, and the extents it names, beside it): a daemon opens them beneath
/// its image directories.
pub fn convert_file_with(
    path: &Path,
    dst: &mut File,
    mut progress: impl FnMut(u64, u64),
    open: &dyn Fn(&Path) -> std::io::Result<File>,
) -> Result<Disk, ImageError> {
    let open_extent = |p: &Path| {
        open(p).map_err(|source| ImageError::Open {
            path: p.to_path_buf(),
            source,
        })
    };
    let file = open_extent(path)?;
    let mut magic = [0u8; 4];
    let is_sparse = file.read_exact_at(&mut magic, 0).is_ok() && u32::from_le_bytes(magic) == MAGIC;
    if is_sparse {
        return convert_sparse_file(path, &file, dst, progress);
    }
    let text = read_descriptor(path, &file)?;
    let descriptor = parse_descriptor(path, &text)?;
    let capacity = descriptor.capacity_bytes();
    dst.set_len(capacity).map_err(|source| ImageError::Write {
        offset: capacity,
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut disk = Disk {
        create_type: descriptor.create_type.clone(),
        capacity_bytes: capacity,
        extents: descriptor.extents.len(),
        written_bytes: 0,
    };
    let mut base = 0;
    for extent in &descriptor.extents {
        let bytes = extent.sectors * SECTOR;
        if let Some(name) = &extent.file {
            let extent_path = dir.join(name);
            let src = open_extent(&extent_path)?;
            disk.written_bytes += match extent.kind {
                ExtentKind::Sparse => {
                    let in_extent = |source| ImageError::Extent {
                        path: extent_path.clone(),
                        source,
                    };
                    let header = sparse::extent_header(&src).map_err(in_extent)?;
                    if header.capacity_sectors != extent.sectors {
                        return Err(ImageError::ExtentSize {
                            path: extent_path,
                            expected: extent.sectors,
                            found: header.capacity_sectors,
                        });
                    }
                    let done = sparse::convert_at(&src, &header, dst, base, |_, _| {})
                        .map_err(in_extent)?;
                    written(&done, &header)
                }
                ExtentKind::Flat => copy_flat(
                    &extent_path,
                    &src,
                    extent.offset_sectors * SECTOR,
                    bytes,
                    dst,
                    base,
                )?,
                ExtentKind::Zero => 0,
            };
        }
        base += bytes;
        progress(base, capacity);
    }
    Ok(disk)
}

/// The descriptor of `path`; a snapshot's is refused (its contents need its parent's).
fn parse_descriptor(path: &Path, text: &[u8]) -> Result<Descriptor, ImageError> {
    let descriptor = Descriptor::parse(text).map_err(|source| ImageError::Descriptor {
        path: path.to_path_buf(),
        source,
    })?;
    if descriptor.has_parent() {
        return Err(ImageError::Snapshot {
            path: path.to_path_buf(),
        });
    }
    Ok(descriptor)
}

fn written(done: &Converted, header: &SparseHeader) -> u64 {
    done.grains_written * header.grain_bytes()
}

/// A monolithicSparse or streamOptimized file. Its embedded descriptor, if any, must not
/// name a parent.
fn convert_sparse_file(
    path: &Path,
    file: &File,
    dst: &mut File,
    mut progress: impl FnMut(u64, u64),
) -> Result<Disk, ImageError> {
    let in_file = |source| ImageError::Extent {
        path: path.to_path_buf(),
        source,
    };
    let header = sparse::extent_header(file).map_err(in_file)?;
    let mut create_type = String::new();
    if header.descriptor_offset != 0 && header.descriptor_sectors != 0 {
        let len = (header.descriptor_sectors * SECTOR).min(MAX_BYTES as u64) as usize;
        let mut text = vec![0u8; len];
        file.read_exact_at(&mut text, header.descriptor_offset.saturating_mul(SECTOR))
            .map_err(|source| ImageError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        create_type = parse_descriptor(path, &text)?.create_type;
    }
    let capacity = header.capacity_sectors * SECTOR;
    let done = sparse::convert(file, dst, |d, all| {
        progress(d * capacity / all.max(1), capacity)
    })
    .map_err(in_file)?;
    Ok(Disk {
        create_type,
        capacity_bytes: capacity,
        extents: 1,
        written_bytes: written(&done, &header),
    })
}

fn file_len(path: &Path, file: &File) -> Result<u64, ImageError> {
    Ok(file
        .metadata()
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len())
}

fn read_descriptor(path: &Path, file: &File) -> Result<Vec<u8>, ImageError> {
    let len = file_len(path, file)?;
    if len > MAX_BYTES as u64 {
        return Err(ImageError::Descriptor {
            path: path.to_path_buf(),
            source: DescriptorError::TooLong(len as usize),
        });
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact_at(&mut text, 0)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(text)
}

/// Copies `bytes` of a flat extent from byte `from` of `src` to `base` of `dst`, leaving
/// all-zero stretches as holes. Returns the bytes written.
fn copy_flat(
    path: &Path,
    src: &File,
    from: u64,
    bytes: u64,
    dst: &mut File,
    base: u64,
) -> Result<u64, ImageError> {
    let len = file_len(path, src)?;
    let needed = from.saturating_add(bytes);
    if needed > len {
        return Err(ImageError::FlatShort {
            path: path.to_path_buf(),
            needed,
            len,
        });
    }
    crate::copy::copy_sparse(src, from, bytes, dst, base, &mut |_| {}).map_err(|e| match e {
        crate::copy::Error::Read { source, .. } => ImageError::Read {
            path: path.to_path_buf(),
            source,
        },
        crate::copy::Error::Write { offset, source } => ImageError::Write { offset, source },
    })
}
