//! qcow2 images (versions 2 and 3), read and written through the imago crate, with backing
//! chains. Keel owns three parts the crate leaves to its user:
//!
//! - which files an image reaches: the header is parsed here first ([`header`]), a backing
//!   file must name its format (never guessed), and the caller opens each backing file
//!   (the daemon beneath its image directories) and hands it over ([`chain`]);
//! - the write order behind a flush ([`storage`]);
//! - what the VMM serves: [`Qcow2Disk`] takes guest iovecs as the raw disk does.

pub mod chain;
pub mod create;
pub mod header;
pub mod merge;
pub mod storage;

use std::fs::File;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Mapping};

pub use chain::{Layer, MAX_CHAIN};
use storage::ImageFile;

use crate::Format;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk {path}: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: header::Error,
    },
    #[error("disk {path}: reading it failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path}: opening it as qcow2 failed: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path}: its backing file {backing} does not name its format; Keel never guesses a format. Name it with: qemu-img rebase -u -b {backing} -F qcow2|raw {path}")]
    BackingFormatMissing { path: PathBuf, backing: String },
    #[error("disk {path}: backing format '{format}' is not one Keel reads (raw, qcow2)")]
    BackingFormat { path: PathBuf, format: String },
    #[error("disk {path}: its backing chain is deeper than {MAX_CHAIN} images")]
    TooDeep { path: PathBuf },
    #[error("disk {path}: its backing chain comes back to an image already in it ({backing})")]
    Loop { path: PathBuf, backing: PathBuf },
    /// `reason` names the backing file (as its opener saw it).
    #[error("disk {path}: {reason}")]
    Backing {
        path: PathBuf,
        backing: String,
        reason: String,
    },
    #[error("disk {path}: direct=on is not offered for qcow2 images; use direct=off")]
    Direct { path: PathBuf },
}

/// An open layer: the driver's access, which file it is (see [`ImageFile::file_id`]), and
/// what completes its flushes.
struct OpenLayer {
    access: FormatAccess<ImageFile>,
    file_id: usize,
    durability: storage::Durability,
}

/// Where a qcow2 file's driver writes without its caches: the header's cluster, the L1
/// table, the refcount table (see [`storage`]).
fn held_ranges(header: &header::Header) -> Vec<std::ops::Range<u64>> {
    let cluster = 1u64 << header.cluster_bits;
    let l1_end = header
        .l1_offset
        .saturating_add(u64::from(header.l1_entries) * 8);
    let rt_end = header
        .refcount_table_offset
        .saturating_add(u64::from(header.refcount_table_clusters) * cluster);
    vec![
        0..cluster,
        header.l1_offset..l1_end,
        header.refcount_table_offset..rt_end,
    ]
}

/// Opens one layer of an image over the layer below it; its metadata writes to `held`
/// ranges wait for the flush (see [`storage`]).
fn open_layer(
    layer: Layer,
    writable: bool,
    below: Option<FormatAccess<ImageFile>>,
    held: Vec<std::ops::Range<u64>>,
) -> Result<OpenLayer, Error> {
    let path = layer.path.clone();
    let failed = |source| Error::Open {
        path: path.clone(),
        source,
    };
    let name = layer.path.display().to_string();
    let (data, metadata) = ImageFile::views(layer.file, &name, held).map_err(failed)?;
    let file_id = data.file_id();
    let durability = data.durability();
    let open = |access| OpenLayer {
        access,
        file_id,
        durability,
    };
    match layer.format {
        Format::Raw => {
            let raw = Raw::open_image(data, writable).map_err(failed)?;
            Ok(open(FormatAccess::new(raw)))
        }
        Format::Qcow2 => {
            let mut image = Qcow2::<ImageFile>::open_image(metadata, writable).map_err(failed)?;
            // Data through the data view of the same file (see `storage`): the image has no
            // external data file (the header check refuses those), so offsets are the same.
            image.set_data_file(Some(data));
            image.set_backing(below);
            Ok(open(FormatAccess::new(image)))
        }
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.flush() {
            eprintln!(
                "keel: disk {}: flushing it at close failed: {e}",
                self.path.display()
            );
        }
    }
}

/// A qcow2 disk with its backing chain, serving guest iovecs.
#[derive(Debug)]
pub struct Qcow2Disk {
    /// Reads and writes share it; discards, which may invalidate mappings, take it alone.
    access: RwLock<FormatAccess<ImageFile>>,
    size: u64,
    read_only: bool,
    path: PathBuf,
    cluster_size: u64,
    /// The image has a backing file (discarded clusters must then read as zeroes, not as
    /// the backing file's data).
    has_backing: bool,
    /// [`ImageFile::file_id`] of the image's own file: clusters it maps there are its own.
    top_file: usize,
    /// The image's own file, to give freed clusters' space back (a writable image's only:
    /// a read-only one holds no descriptor but its files', which disk boot's sandboxed
    /// reader counts on).
    punch_file: Option<File>,
    /// Completes a flush of the image's own file.
    durability: storage::Durability,
}

impl Qcow2Disk {
    /// Opens `top` (a qcow2 file, named `path` in messages) over `backing` (its chain as
    /// [`chain::open_backing`] found it, nearest first); the backing layers are read only.
    pub fn open(
        top: File,
        path: &Path,
        read_only: bool,
        backing: Vec<Layer>,
    ) -> Result<Qcow2Disk, Error> {
        let header = chain::read_header(&top, path)?;
        let punch_file = if read_only {
            None
        } else {
            Some(top.try_clone().map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?)
        };
        let has_backing = !backing.is_empty();
        let mut below = None;
        for layer in backing.into_iter().rev() {
            below = Some(open_layer(layer, false, below, Vec::new())?.access);
        }
        let layer = Layer {
            file: top,
            format: Format::Qcow2,
            path: path.to_path_buf(),
        };
        let held = if read_only {
            Vec::new()
        } else {
            held_ranges(&header)
        };
        let top = open_layer(layer, !read_only, below, held)?;
        Ok(Qcow2Disk {
            size: top.access.size(),
            access: RwLock::new(top.access),
            read_only,
            path: path.to_path_buf(),
            cluster_size: 1 << header.cluster_bits,
            has_backing,
            top_file: top.file_id,
            punch_file,
            durability: top.durability,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "past the end of the disk",
            ));
        }
        Ok(())
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<ImageFile>> {
        // A panic while holding the lock leaves the image as the driver left it; go on.
        self.access.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads into `buffers` from `offset`. The iovecs must point at live memory of their
    /// lengths for the call.
    pub fn read_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        let total: usize = buffers.iter().map(|b| b.iov_len).sum();
        self.check(offset, total)?;
        let access = self.shared();
        // One mapping for the whole request (a read within a cluster, or a run of them):
        // straight to the file, or zeroes.
        if buffers.len() <= crate::IOV_MAX {
            if let Ok((mapping, len)) = access.get_mapping(offset, total as u64) {
                if len >= total as u64 {
                    match mapping {
                        Mapping::Raw {
                            storage, offset, ..
                        } => return storage.transfer(buffers, offset, false),
                        Mapping::Zero { .. } => {
                            for b in buffers {
                                // SAFETY: a live buffer of its length (the caller's
                                // guarantee).
                                unsafe {
                                    std::ptr::write_bytes(b.iov_base.cast::<u8>(), 0, b.iov_len)
                                };
                            }
                            return Ok(());
                        }
                        _ => {}
                    }
                }
            }
        }
        let slices: Vec<IoSliceMut<'_>> = buffers
            .iter()
            .filter(|b| b.iov_len > 0)
            .map(|b| {
                // SAFETY: the caller's guarantee: each iovec is live memory of its length,
                // not otherwise accessed during the call.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(b.iov_base.cast::<u8>(), b.iov_len)
                })
            })
            .collect();
        access.readv(IoVectorMut::from(slices), offset)
    }

    /// Writes `buffers` at `offset`: when this returns Ok the data is in the file; it is
    /// durable, and reachable after a crash, once [`Qcow2Disk::flush`] returns.
    pub fn write_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        let total: usize = buffers.iter().map(|b| b.iov_len).sum();
        self.check(offset, total)?;
        let access = self.shared();
        // Allocated clusters this image may write in place: straight to the file. Anything
        // else (allocation, copy-on-write) goes through the driver.
        if !self.read_only && buffers.len() <= crate::IOV_MAX {
            if let Ok((
                Mapping::Raw {
                    storage,
                    offset,
                    writable: true,
                    ..
                },
                len,
            )) = access.get_mapping(offset, total as u64)
            {
                if len >= total as u64 {
                    return storage.transfer(buffers, offset, true);
                }
            }
        }
        let slices: Vec<IoSlice<'_>> = buffers
            .iter()
            .filter(|b| b.iov_len > 0)
            .map(|b| {
                // SAFETY: as for reads; the memory is only read.
                IoSlice::new(unsafe {
                    std::slice::from_raw_parts(b.iov_base.cast::<u8>().cast_const(), b.iov_len)
                })
            })
            .collect();
        access.writev(IoVector::from(slices), offset)
    }

    /// Writes the driver's caches into the file (each table after what it depends on)
    /// without syncing it: another process opening the file then reads the image as this
    /// one sees it.
    pub fn write_back(&self) -> io::Result<()> {
        self.shared().flush()
    }

    /// Makes every write before it durable and reachable: the driver's caches are written
    /// (each table after what it depends on, see [`storage`]), then the file is synced.
    pub fn flush(&self) -> io::Result<()> {
        let access = self.shared();
        access.flush()?;
        access.sync()?;
        self.durability.commit()
    }

    /// Frees the clusters of the range: they read back as zeroes, and the space of those the
    /// range covers whole goes back to the host file system.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let mut access = self.access.write().unwrap_or_else(|e| e.into_inner());
        let freed = self.own_whole_clusters(&access, offset, len)?;
        match access.discard_to_zero(offset, len) {
            // Version 2 has no zero clusters: without a backing file an unallocated cluster
            // reads as zeroes; with one, the range is zeroed in place.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                if self.has_backing {
                    return access.write_zeroes(offset, len);
                }
                access.discard_to_backing(offset, len)?;
            }
            result => result?,
        }
        if let Some(file) = &self.punch_file {
            for (at, n) in freed {
                storage::punch(file, at, n)?;
            }
        }
        Ok(())
    }

    /// The host ranges of the clusters wholly inside `offset..offset + len` that the image
    /// maps to its own file.
    fn own_whole_clusters(
        &self,
        access: &FormatAccess<ImageFile>,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<(u64, u64)>> {
        let start = offset.next_multiple_of(self.cluster_size);
        let end = (offset + len) / self.cluster_size * self.cluster_size;
        let mut ranges = Vec::new();
        let mut at = start;
        while at < end {
            let (mapping, n) = access.get_mapping(at, end - at)?;
            if n == 0 {
                break;
            }
            if let Mapping::Raw {
                storage, offset, ..
            } = mapping
            {
                if storage.file_id() == self.top_file {
                    ranges.push((offset, n));
                }
            }
            at += n;
        }
        Ok(ranges)
    }

    /// Zeroes the range; with `may_unmap`, whole clusters are freed.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            return self.discard(offset, len);
        }
        self.check(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        self.shared().write_zeroes(offset, len)
    }
}
