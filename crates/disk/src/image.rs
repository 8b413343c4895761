//! A disk image open in its format: the one place where the format decides how guest I/O
//! reaches the file. The format is always given (by the definition or the image library),
//! never guessed from the file's contents: a raw image whose guest wrote a qcow2 header stays
//! raw.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::direct::DioAlign;
use crate::qcow2::{self, Layer, Qcow2Disk};
use crate::RawDisk;

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Raw,
    Qcow2,
}

impl Format {
    pub const NAMES: [&'static str; 2] = ["raw", "qcow2"];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("format '{other}': expected raw or qcow2")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Raw(#[from] crate::Error),
    #[error(transparent)]
    Qcow2(#[from] qcow2::Error),
}

/// An open disk image.
#[derive(Debug)]
pub enum Image {
    Raw(RawDisk),
    Qcow2(Qcow2Disk),
}

impl From<RawDisk> for Image {
    fn from(raw: RawDisk) -> Image {
        Image::Raw(raw)
    }
}

/// The files of an image, open: the image itself and, for qcow2, its backing chain
/// (nearest first), before the VMM makes them an [`Image`] (a jailed VMM can open no file:
/// the chain is opened before the jail, or by the daemon).
#[derive(Debug)]
pub struct ImageFiles {
    pub top: File,
    /// The path the image is known by (in messages).
    pub path: std::path::PathBuf,
    pub format: Format,
    pub backing: Vec<Layer>,
    /// The VM takes no lock on these files when it builds its disk: a live migration's
    /// target, whose daemon takes them (on the same open files) only when the source's VMM
    /// has let go.
    pub lock_deferred: bool,
}

impl ImageFiles {
    /// Opens the image at `path` (locked as [`RawDisk::open_file`] does) and its backing
    /// files by the paths its headers name: for `keel run`, where the operator names the
    /// files.
    pub fn open(path: &Path, format: Format, read_only: bool, direct: bool) -> Result<Self, Error> {
        let top = RawDisk::open_file(path, read_only, direct && format == Format::Raw)?;
        Self::with_backing(top, path, format, &mut |p| {
            File::open(p)
                .map_err(|e| format!("backing file {}: opening it failed: {e}", p.display()))
        })
    }

    /// `top` (at `path`), with the backing chain its headers name opened by `open` (given
    /// each resolved path; returns the file read-only, or why it may not be opened).
    pub fn with_backing(
        top: File,
        path: &Path,
        format: Format,
        open: &mut dyn FnMut(&Path) -> Result<File, String>,
    ) -> Result<Self, Error> {
        let backing = match format {
            Format::Raw => Vec::new(),
            Format::Qcow2 => qcow2::chain::open_backing(&top, path, open)?,
        };
        Ok(ImageFiles {
            top,
            path: path.to_path_buf(),
            format,
            backing,
            lock_deferred: false,
        })
    }

    /// The largest size the image file may reach while a VM writes it: a raw file keeps its
    /// size; a qcow2 file grows as clusters are allocated, up to its virtual size and the
    /// tables that map it (generously: twice the virtual size and 1 GiB).
    pub fn write_limit(&self) -> u64 {
        let now = self.top.metadata().map(|m| m.len()).unwrap_or(0);
        match self.format {
            Format::Raw => now,
            Format::Qcow2 => qcow2::chain::read_header(&self.top, &self.path)
                .map(|h| h.size.saturating_mul(2).saturating_add(1 << 30))
                .unwrap_or(0)
                .max(now),
        }
    }

    /// The same files on new descriptors (the same open files: locks are shared with them).
    pub fn try_clone(&self) -> std::io::Result<ImageFiles> {
        Ok(ImageFiles {
            top: self.top.try_clone()?,
            path: self.path.clone(),
            format: self.format,
            backing: self
                .backing
                .iter()
                .map(|l| {
                    Ok(Layer {
                        file: l.file.try_clone()?,
                        format: l.format,
                        path: l.path.clone(),
                    })
                })
                .collect::<std::io::Result<_>>()?,
            lock_deferred: self.lock_deferred,
        })
    }

    /// Every file, the image first: the order in which a launcher hands them over.
    pub fn files(&self) -> impl Iterator<Item = &File> {
        std::iter::once(&self.top).chain(self.backing.iter().map(|l| &l.file))
    }

    /// Takes the locks a VM holds on its disk (see [`crate::lock`]): the image exclusively
    /// unless `read_only`, its backing files shared.
    pub fn lock(&self, read_only: bool) -> Result<(), Error> {
        crate::lock(&self.top, &self.path, read_only)?;
        for layer in &self.backing {
            crate::lock(&layer.file, &layer.path, true)?;
        }
        Ok(())
    }

    /// Releases every lock [`ImageFiles::lock`] took (a VM leaving for another host gives
    /// its disks to the VMM there).
    pub fn unlock(&self) -> Result<(), Error> {
        for (file, path) in std::iter::once((&self.top, &self.path))
            .chain(self.backing.iter().map(|l| (&l.file, &l.path)))
        {
            crate::unlock(file, path)?;
        }
        Ok(())
    }
}

impl Image {
    /// Opens the image at `path` in `format`, with its backing files by the paths its
    /// headers name (see [`ImageFiles::open`]).
    pub fn open(
        path: &Path,
        format: Format,
        read_only: bool,
        direct: bool,
    ) -> Result<Image, Error> {
        let files = ImageFiles::open(path, format, read_only, direct)?;
        Self::from_image_files(files, read_only, direct)
    }

    /// The image on [`ImageFiles`] (see [`Image::from_files`]).
    pub fn from_image_files(
        files: ImageFiles,
        read_only: bool,
        direct: bool,
    ) -> Result<Image, Error> {
        Self::build(
            files.top,
            &files.path,
            files.format,
            (read_only, direct),
            files.backing,
            !files.lock_deferred,
        )
    }

    /// The image on files opened already (by [`Image::open`], or handed over by the daemon):
    /// `top` and, for qcow2, its backing chain nearest first. Each file's lock is taken:
    /// the top one as `read_only` says, backing files shared (read only).
    pub fn from_files(
        top: File,
        path: &Path,
        format: Format,
        read_only: bool,
        direct: bool,
        backing: Vec<Layer>,
    ) -> Result<Image, Error> {
        Self::build(top, path, format, (read_only, direct), backing, true)
    }

    fn build(
        top: File,
        path: &Path,
        format: Format,
        (read_only, direct): (bool, bool),
        backing: Vec<Layer>,
        lock: bool,
    ) -> Result<Image, Error> {
        match format {
            Format::Raw => Ok(Image::Raw(RawDisk::from_file_locking(
                top, path, read_only, direct, lock,
            )?)),
            Format::Qcow2 => {
                if direct {
                    return Err(qcow2::Error::Direct {
                        path: path.to_path_buf(),
                    }
                    .into());
                }
                if lock {
                    crate::lock(&top, path, read_only)?;
                    for layer in &backing {
                        crate::lock(&layer.file, &layer.path, true)?;
                    }
                }
                Ok(Image::Qcow2(Qcow2Disk::open(
                    top, path, read_only, backing,
                )?))
            }
        }
    }

    /// A read-only view of the image for disk boot's reader, on descriptors of files a VM
    /// holds (see [`ImageFiles::try_clone`]): no lock is taken, so the VM's own lock on the
    /// same open files is left as it is.
    pub fn reader(files: ImageFiles) -> Result<Image, Error> {
        match files.format {
            Format::Raw => Ok(Image::Raw(RawDisk::unlocked_reader(
                files.top,
                &files.path,
            )?)),
            Format::Qcow2 => Ok(Image::Qcow2(Qcow2Disk::open(
                files.top,
                &files.path,
                true,
                files.backing,
            )?)),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The raw disk, when the image is one: guest offsets are file offsets, so the io_uring
    /// engine and page-cache reads may go straight to the file.
    pub fn raw(&self) -> Option<&RawDisk> {
        match self {
            Image::Raw(r) => Some(r),
            Image::Qcow2(_) => None,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Image::Raw(r) => r.size(),
            Image::Qcow2(q) => q.size(),
        }
    }

    pub fn read_only(&self) -> bool {
        match self {
            Image::Raw(r) => r.read_only(),
            Image::Qcow2(q) => q.read_only(),
        }
    }

    /// The direct-I/O alignment, when the image was opened with `O_DIRECT`.
    pub fn direct(&self) -> Option<DioAlign> {
        self.raw().and_then(|r| r.direct())
    }

    /// Whether a transfer of `buffers` at `offset` can go straight to the file (see
    /// [`RawDisk::fits`]); always for qcow2, which is never opened for direct I/O.
    pub fn fits(&self, buffers: &[libc::iovec], offset: u64) -> bool {
        self.raw().is_none_or(|r| r.fits(buffers, offset))
    }

    /// Reads into `buffers` in full from `offset`, or fails. The iovecs must point at live
    /// memory of their lengths for the call.
    pub fn read_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        match self {
            Image::Raw(r) => r.read_at(buffers, offset),
            Image::Qcow2(q) => q.read_at(buffers, offset),
        }
    }

    /// Writes `buffers` in full at `offset`: when this returns Ok the data is in the file.
    pub fn write_at(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<()> {
        match self {
            Image::Raw(r) => r.write_at(buffers, offset),
            Image::Qcow2(q) => q.write_at(buffers, offset),
        }
    }

    /// A transfer whose buffers do not meet direct I/O's rules (raw, see
    /// [`RawDisk::bounced`]); qcow2 images take any buffers.
    pub fn bounced(&self, buffers: &[libc::iovec], offset: u64, write: bool) -> io::Result<()> {
        match (self, write) {
            (Image::Raw(r), _) => r.bounced(buffers, offset, write),
            (Image::Qcow2(q), true) => q.write_at(buffers, offset),
            (Image::Qcow2(q), false) => q.read_at(buffers, offset),
        }
    }

    /// Reads what the page cache holds without blocking (raw only, see
    /// [`RawDisk::read_nowait`]); other formats say `Unsupported`.
    pub fn read_nowait(&self, buffers: &[libc::iovec], offset: u64) -> io::Result<usize> {
        match self {
            Image::Raw(r) => r.read_nowait(buffers, offset),
            Image::Qcow2(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Writes what the driver keeps in memory (qcow2's table caches) into the file, without
    /// syncing it: another process opening the same file (a new VMM taking the disk over, a
    /// snapshot's copy) then reads the image as this one sees it. Raw images keep nothing.
    pub fn write_back(&self) -> io::Result<()> {
        match self {
            Image::Raw(_) => Ok(()),
            Image::Qcow2(q) => q.write_back(),
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Image::Raw(r) => r.flush(),
            Image::Qcow2(q) => q.flush(),
        }
    }

    /// Frees the range; it reads back as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Image::Raw(r) => r.discard(offset, len),
            Image::Qcow2(q) => q.discard(offset, len),
        }
    }

    /// Zeroes the range. Returns the bytes of zeroes written by hand (0 when the file
    /// system or the format zeroed it without writing them).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<u64> {
        match self {
            Image::Raw(r) => r.write_zeroes(offset, len, may_unmap),
            Image::Qcow2(q) => q.write_zeroes(offset, len, may_unmap).map(|()| 0),
        }
    }

    /// The file descriptor of a raw image (for the io_uring engine).
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.raw().map(|r| r.as_raw_fd())
    }
}

/// Disk boot reads the guest's disk through its format.
impl crate::boot::Image for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Image::read_at(self, &[crate::iov(buf.as_mut_ptr(), buf.len())], offset)
    }
}
