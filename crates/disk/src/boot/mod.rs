//! Disk boot: the kernel, initrd and command line a VM's boot disk holds, found without
//! firmware or a bootloader. The VMM reads them before the guest runs, in the VM's own
//! process (never in the daemon), because everything on the disk is the guest's: the
//! partition table, the ext2/3/4 filesystem (read with `ext4-view`) and the boot entries are
//! parsed as hostile input, with bounded sizes, and the fuzz target `disk_boot` feeds them
//! garbage.
//!
//! The search, per filesystem (partitions in table order, or the whole disk):
//! 1. Boot Loader Specification entries in `/loader/entries/*.conf` or
//!    `/boot/loader/entries/*.conf` (the newest version, per the specification's order);
//! 2. Debian's kernel links `/vmlinuz` and `/initrd.img`, then `/boot/vmlinuz` and
//!    `/boot/initrd.img`, with `root=/dev/vdaN ro` for the filesystem they were found on.

pub mod entries;
pub mod image;
pub mod partitions;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};
use partitions::Partition;

/// Boot entry files read at most per directory.
pub const MAX_ENTRIES: usize = 256;
/// Largest boot entry file read.
pub const MAX_ENTRY_BYTES: u64 = 64 * 1024;
const ENTRY_DIRS: [&str; 2] = ["/loader/entries", "/boot/loader/entries"];
const KERNEL_LINKS: [(&str, &str); 2] = [
    ("/vmlinuz", "/initrd.img"),
    ("/boot/vmlinuz", "/boot/initrd.img"),
];

/// Random access to a disk image.
pub trait Image {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error when the image ends first.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A disk image in a file.
pub struct FileImage {
    file: File,
    len: u64,
}

impl FileImage {
    pub fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl Image for FileImage {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// A disk image in memory (tests and the fuzz target).
impl Image for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no kernel found on the boot disk: {searched}. Install a kernel in the guest (a Boot Loader Specification entry in /loader/entries or /boot/loader/entries, or Debian's /vmlinuz link), or give the VM a kernel file")]
    NotFound { searched: String },
    #[error("{what} {path} on {partition} of the boot disk is {size} bytes, more than the {limit} bytes that fit in the VM's memory; give the VM more memory")]
    TooLarge {
        what: &'static str,
        path: String,
        partition: String,
        size: u64,
        limit: u64,
    },
    #[error("{what} {path} on {partition} of the boot disk cannot be read: {source}")]
    Read {
        what: &'static str,
        path: String,
        partition: String,
        #[source]
        source: Ext4Error,
    },
}

/// What the boot disk says to boot.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: Vec<u8>,
    /// The initrds, concatenated (Linux unpacks concatenated cpio archives in order).
    pub initrd: Option<Vec<u8>>,
    /// The disk's kernel options, with `root=` added when the disk gives none.
    pub cmdline: String,
    /// Where they came from, for logs and errors: "partition 1: /loader/entries/x.conf".
    pub source: String,
}

/// Finds what to boot on `image`, reading at most `max_bytes` of kernel and initrd (the
/// guest's memory: more could not be loaded anyway).
pub fn find(image: Rc<dyn Image>, max_bytes: u64) -> Result<BootFiles, Error> {
    let mut searched = Vec::new();
    for partition in partitions::find(image.as_ref()) {
        if !partitions::has_ext_magic(image.as_ref(), &partition) {
            searched.push(format!("{partition}: no ext2/3/4 filesystem"));
            continue;
        }
        let reader = PartitionReader {
            image: image.clone(),
            partition,
        };
        let fs = match Ext4::load(Box::new(reader)) {
            Ok(fs) => fs,
            Err(e) => {
                searched.push(format!("{partition}: the filesystem cannot be read ({e})"));
                continue;
            }
        };
        let filesystem = Filesystem {
            fs,
            partition,
            max_bytes,
        };
        if let Some(found) = filesystem.boot_files()? {
            return Ok(found);
        }
        searched.push(format!(
            "{partition}: no boot entry and no /vmlinuz or /boot/vmlinuz"
        ));
    }
    if searched.is_empty() {
        searched.push("the disk is empty".into());
    }
    Err(Error::NotFound {
        searched: searched.join("; "),
    })
}

/// One partition of the image, as `ext4-view` reads it: reads past its end fail.
struct PartitionReader {
    image: Rc<dyn Image>,
    partition: Partition,
}

impl Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.partition.len) {
            return Err(format!(
                "a read of {} bytes at {start_byte} runs past the end of {} ({} bytes)",
                dst.len(),
                self.partition,
                self.partition.len
            )
            .into());
        }
        Ok(self.image.read_at(self.partition.start + start_byte, dst)?)
    }
}

struct Filesystem {
    fs: Ext4,
    partition: Partition,
    max_bytes: u64,
}

impl Filesystem {
    fn boot_files(&self) -> Result<Option<BootFiles>, Error> {
        for dir in ENTRY_DIRS {
            if let Some(entry) = entries::choose(self.entries(dir)) {
                return self.files_of_entry(dir, &entry).map(Some);
            }
        }
        for (kernel, initrd) in KERNEL_LINKS {
            if !self.is_file(kernel) {
                continue;
            }
            let initrd = if self.is_file(initrd) {
                Some(self.read("initrd", initrd)?)
            } else {
                None
            };
            let root = match self.partition.number {
                Some(n) => format!("root=/dev/vda{n} ro"),
                None => "root=/dev/vda ro".to_string(),
            };
            return Ok(Some(BootFiles {
                kernel: self.read("kernel", kernel)?,
                initrd,
                cmdline: root,
                source: format!("{}: {kernel}", self.partition),
            }));
        }
        Ok(None)
    }

    /// The parsable entries of one directory (none when it does not exist).
    fn entries(&self, dir: &str) -> Vec<entries::Entry> {
        let Ok(listing) = self.fs.read_dir(dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for item in listing.take(MAX_ENTRIES).flatten() {
            let Ok(name) = item.file_name().as_str().map(str::to_string) else {
                continue;
            };
            if !name.ends_with(".conf") {
                continue;
            }
            let path = format!("{dir}/{name}");
            let small_file = self
                .fs
                .metadata(path.as_str())
                .is_ok_and(|m| !m.is_dir() && m.len() <= MAX_ENTRY_BYTES);
            if !small_file {
                continue;
            }
            if let Some(entry) = self
                .fs
                .read(path.as_str())
                .ok()
                .and_then(|text| entries::parse(&name, &text))
            {
                found.push(entry);
            }
        }
        found
    }

    fn files_of_entry(&self, dir: &str, entry: &entries::Entry) -> Result<BootFiles, Error> {
        // Paths are relative to the root of the filesystem holding `loader/`: that is /boot
        // when the entries are in /boot/loader/entries of a root filesystem.
        let base = dir.strip_suffix("/loader/entries").unwrap_or("");
        let resolve = |path: &str| -> String {
            let path = format!("/{}", path.trim_start_matches('/'));
            if !base.is_empty() && !self.is_file(&path) {
                format!("{base}{path}")
            } else {
                path
            }
        };
        let kernel = self.read("kernel", &resolve(&entry.linux))?;
        let mut initrd: Option<Vec<u8>> = None;
        for path in &entry.initrds {
            let bytes = self.read("initrd", &resolve(path))?;
            let all = initrd.get_or_insert_with(Vec::new);
            if all.len() as u64 + bytes.len() as u64 > self.max_bytes {
                return Err(Error::TooLarge {
                    what: "initrd",
                    path: entry.initrds.join(" + "),
                    partition: self.partition.to_string(),
                    size: all.len() as u64 + bytes.len() as u64,
                    limit: self.max_bytes,
                });
            }
            all.extend_from_slice(&bytes);
        }
        Ok(BootFiles {
            kernel,
            initrd,
            cmdline: entry.options.clone(),
            source: format!("{}: {dir}/{}", self.partition, entry.file),
        })
    }

    fn is_file(&self, path: &str) -> bool {
        self.fs.metadata(path).is_ok_and(|m| !m.is_dir())
    }

    /// A whole file, after checking its size against the limit.
    fn read(&self, what: &'static str, path: &str) -> Result<Vec<u8>, Error> {
        let read_err = |source| Error::Read {
            what,
            path: path.to_string(),
            partition: self.partition.to_string(),
            source,
        };
        let size = self.fs.metadata(path).map_err(read_err)?.len();
        if size > self.max_bytes {
            return Err(Error::TooLarge {
                what,
                path: path.to_string(),
                partition: self.partition.to_string(),
                size,
                limit: self.max_bytes,
            });
        }
        self.fs.read(path).map_err(read_err)
    }
}

/// Adds `root=` to the disk's command line when neither it nor the operator's names one, and
/// the operator's words last (the kernel takes the last of a repeated option).
pub fn command_line(disk: &str, operator: &str) -> String {
    let has_root = |s: &str| s.split_whitespace().any(|w| w.starts_with("root="));
    let disk = if has_root(operator) {
        disk.split_whitespace()
            .filter(|w| !w.starts_with("root="))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        disk.to_string()
    };
    [disk.as_str(), operator]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
