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
mod filesystem;
pub mod image;
pub mod partitions;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use ext4_view::{Ext4, Ext4Read};
use filesystem::Filesystem;
use partitions::Partition;

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

impl std::os::fd::AsRawFd for FileImage {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
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
    #[error("{what} {path} on {partition} of the boot disk is {size} bytes, more than the {limit} allowed: {why}")]
    TooLarge {
        what: &'static str,
        path: String,
        partition: String,
        size: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("{what} {path} on {partition} of the boot disk cannot be read: {reason}")]
    Read {
        what: &'static str,
        path: String,
        partition: String,
        reason: String,
    },
}

/// Largest kernel read from a boot disk, whatever the guest's memory: Debian's kernel is
/// about 10 MiB as a bzImage, 55 MiB as an ELF. (A sparse file claiming gigabytes costs the
/// disk nothing and the host its memory.)
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// Why a kernel was refused as too large.
pub const KERNEL_CEILING: &str = "a kernel is at most 256 MiB and must fit in the VM's memory";
/// Why initrds were refused as too large.
pub const MEMORY_CEILING: &str =
    "the kernel and initrds must fit in the VM's memory together; give the VM more memory";

/// Text from the guest's disk (file names, paths) as it may be shown to an operator: control
/// characters, which could forge a log line or drive the terminal, written as escapes.
pub fn shown(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// What the boot disk says to boot.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: Vec<u8>,
    /// The initrds, concatenated (Linux unpacks concatenated cpio archives in order).
    pub initrd: Option<Vec<u8>>,
    /// The disk's kernel options: an entry's `options`, or for Debian's links `root=` of the
    /// partition they are on. (An entry without `root=` gets none: GRUB variables such as
    /// `$kernelopts` are not expanded.)
    pub cmdline: String,
    /// Where they came from, for logs and errors: "partition 1: /loader/entries/x.conf".
    pub source: String,
}

/// Finds what to boot on `image`, reading at most `max_bytes` of kernel and initrds together
/// (the guest's memory: more could not be loaded anyway), and a kernel of at most
/// [`MAX_KERNEL_BYTES`].
pub fn find(image: Rc<dyn Image>, max_bytes: u64) -> Result<BootFiles, Error> {
    let mut searched = Vec::new();
    for partition in partitions::find(image.as_ref()) {
        let Some(superblock) = ext_superblock(image.as_ref(), &partition) else {
            searched.push(format!("{partition}: no ext2/3/4 filesystem"));
            continue;
        };
        if let Err(why) = check_geometry(&superblock, &partition) {
            searched.push(format!(
                "{partition}: the filesystem cannot be read ({why})"
            ));
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
        if let Err(e) = fs.read_dir("/") {
            searched.push(format!("{partition}: the filesystem cannot be read ({e})"));
            continue;
        }
        let filesystem = Filesystem::new(fs, partition, max_bytes);
        if let Some(found) = filesystem.boot_files()? {
            return Ok(found);
        }
        searched.push(format!(
            "{partition}: no boot entry and no /vmlinuz or /boot/vmlinuz"
        ));
    }
    if searched.is_empty() {
        searched.push(
            "no partition or filesystem was found (an empty disk, or a partition table with no usable entry)".into(),
        );
    }
    Err(Error::NotFound {
        searched: searched.join("; "),
    })
}

/// The ext2/3/4 superblock: 1024 bytes, 1024 bytes into the filesystem, its magic at 0x38.
const SUPERBLOCK_BYTES: usize = 1024;
const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT_MAGIC_AT: usize = 0x38;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

/// The partition's ext2/3/4 superblock, if one starts there (read once, for the magic and
/// the geometry check).
fn ext_superblock(image: &dyn Image, partition: &Partition) -> Option<[u8; SUPERBLOCK_BYTES]> {
    let mut sb = [0u8; SUPERBLOCK_BYTES];
    let fits = partition.len >= SUPERBLOCK_OFFSET + SUPERBLOCK_BYTES as u64;
    (fits
        && image
            .read_at(partition.start + SUPERBLOCK_OFFSET, &mut sb)
            .is_ok()
        && sb[EXT_MAGIC_AT..EXT_MAGIC_AT + 2] == EXT_MAGIC)
        .then_some(sb)
}

/// Most block groups a filesystem may claim: 128 TiB in 4 KiB blocks. `ext4-view` allocates
/// its table of group descriptors from the superblock's count before reading them.
pub const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Checks the superblock's size claims against the partition before `ext4-view` trusts them:
/// a forged block count would otherwise have it allocate memory for billions of block groups
/// (found by the fuzz target: the VMM aborted).
fn check_geometry(sb: &[u8; SUPERBLOCK_BYTES], partition: &Partition) -> Result<(), String> {
    let u32_at = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    // The high half counts even without the 64bit feature: ext4-view reads it so.
    let blocks = u64::from(u32_at(0x150)) << 32 | u64::from(u32_at(0x4));
    let first_data_block = u64::from(u32_at(0x14));
    let log_block_size = u32_at(0x18);
    let blocks_per_group = u64::from(u32_at(0x20));
    if log_block_size > 6 {
        return Err(format!(
            "its superblock's block size field is {log_block_size}; at most 6 (64 KiB) is valid"
        ));
    }
    let block_size = 1024u64 << log_block_size;
    if blocks
        .checked_mul(block_size)
        .is_none_or(|bytes| bytes > partition.len)
    {
        return Err(format!(
            "its superblock claims {blocks} blocks of {block_size} bytes, more than the {} bytes of the partition",
            partition.len
        ));
    }
    let groups = blocks
        .saturating_sub(first_data_block)
        .div_ceil(blocks_per_group.max(1));
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!(
            "its superblock claims {groups} block groups, more than {MAX_BLOCK_GROUPS}"
        ));
    }
    Ok(())
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

/// The command line of a disk-booted guest: the disk's options, then the operator's (the kernel
/// takes the last of a repeated option); a `root=` of the operator's replaces the disk's.
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
