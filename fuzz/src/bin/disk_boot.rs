//! Fuzz target: disk boot (`disk::boot::find`), which the VMM runs on the guest's disk before
//! the guest starts: the MBR or GPT, the ext2/3/4 filesystem (through `ext4-view`), the Boot
//! Loader Specification entries and their version order, Debian's kernel links, and the
//! command line built from them.
//!
//! Nothing may panic or read past the image, and what is found must respect the size limit
//! (kernel and initrds each within `MAX_BYTES`).
//!
//! Input: the disk image itself. The seeds are built around `fuzz/seeds/disk_boot.ext4`, a
//! 64 KiB filesystem with two entries (versions 1.9 and 1.10, the newer with kernel, initrd and
//! options) and a /vmlinuz link, made by:
//!
//! ```text
//! truncate -s 64K disk_boot.ext4
//! E2FSPROGS_FAKE_TIME=1700000000 mke2fs -q -F -t ext4 -b 1024 -N 32 -I 128 -m 0 \
//!   -O ^has_journal,^resize_inode -U 6b656c00-0000-4000-8000-000000000001 \
//!   -E root_owner=0:0,hash_seed=6b656c00-0000-4000-8000-000000000002 -d TREE disk_boot.ext4
//! ```

#![no_main]

use std::rc::Rc;

use disk::boot::{self, Error};
use keel_fuzz::{Encoder, Seed};

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("disk_boot", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

/// The largest kernel or initrd the search may return.
const MAX_BYTES: u64 = 1 << 20;

/// Where the boot files came from (and their sizes and command line), or why none were found.
#[derive(Debug, PartialEq)]
enum Outcome {
    Found {
        source: String,
        kernel: usize,
        initrd: Option<usize>,
        cmdline: String,
    },
    NotFound,
    TooLarge,
    Unreadable,
}

fn run(data: &[u8]) -> Outcome {
    match boot::find(Rc::new(data.to_vec()), MAX_BYTES) {
        Ok(found) => {
            assert!(
                found.kernel.len() as u64 <= MAX_BYTES,
                "kernel over the limit"
            );
            let initrd = found.initrd.as_ref().map(Vec::len);
            assert!(
                initrd.is_none_or(|n| n as u64 <= MAX_BYTES),
                "initrd over the limit"
            );
            let cmdline = boot::command_line(&found.cmdline, "root=/dev/vdb console=ttyS0");
            assert!(cmdline.ends_with("root=/dev/vdb console=ttyS0"));
            assert_eq!(
                cmdline
                    .split_whitespace()
                    .filter(|w| w.starts_with("root="))
                    .count(),
                1,
                "the operator's root= replaces the disk's"
            );
            Outcome::Found {
                source: found.source,
                kernel: found.kernel.len(),
                initrd,
                cmdline: found.cmdline,
            }
        }
        Err(Error::NotFound { .. }) => Outcome::NotFound,
        Err(Error::TooLarge { .. }) => Outcome::TooLarge,
        Err(Error::Read { .. }) => Outcome::Unreadable,
    }
}

const FS: &[u8] = include_bytes!("../../seeds/disk_boot.ext4");
const SECTOR: usize = 512;

/// An MBR with one Linux partition (type 0x83) from `first` sector, `sectors` long.
fn mbr(first: u32, sectors: u32, kind: u8) -> Vec<u8> {
    let mut sector = vec![0u8; SECTOR];
    let entry = Encoder::new()
        .bytes(&[0, 0, 0, 0, kind, 0, 0, 0])
        .u32(first)
        .u32(sectors)
        .finish();
    sector[446..462].copy_from_slice(&entry);
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    sector
}

/// A protective MBR, a GPT header at LBA 1 and four 128-byte entries at LBA 2 (only the
/// first used, from LBA 3), then the filesystem.
fn gpt_disk() -> Vec<u8> {
    let fs_sectors = (FS.len() / SECTOR) as u64;
    let mut disk = mbr(1, u32::MAX, 0xee);
    let mut header = Encoder::new()
        .bytes(b"EFI PART")
        .bytes(&[0; 64])
        .u64(2) // partition entries from LBA 2
        .u32(4) // four entries
        .u32(128) // of 128 bytes
        .finish();
    header.resize(SECTOR, 0);
    disk.extend(header);
    let mut entry = Encoder::new()
        .bytes(&[0xaf; 16]) // type GUID: any non-zero one
        .bytes(&[1; 16])
        .u64(3)
        .u64(3 + fs_sectors - 1)
        .finish();
    entry.resize(4 * 128, 0);
    disk.extend(entry);
    disk.extend_from_slice(FS);
    disk
}

fn seeds() -> Vec<Seed<Outcome>> {
    let found = |source: &str| Outcome::Found {
        source: source.into(),
        kernel: 6,
        initrd: Some(6),
        cmdline: "root=/dev/vda1 quiet".into(),
    };
    let fs_sectors = (FS.len() / SECTOR) as u32;
    let mut mbr_disk = mbr(2, fs_sectors, 0x83);
    mbr_disk.resize(2 * SECTOR, 0);
    mbr_disk.extend_from_slice(FS);
    // Entries over the end of the image, overflowing, and an extended partition.
    let mut bad_mbr = mbr(u32::MAX, u32::MAX, 0x83);
    bad_mbr[462..478].copy_from_slice(&mbr(1, 8, 0x05)[446..462]);
    vec![
        Seed {
            name: "whole_disk_ext4",
            input: FS.to_vec(),
            expect: found("the whole disk: /loader/entries/new.conf"),
        },
        Seed {
            name: "mbr_partition_1",
            input: mbr_disk,
            expect: found("partition 1: /loader/entries/new.conf"),
        },
        Seed {
            name: "gpt_partition_1",
            input: gpt_disk(),
            expect: found("partition 1: /loader/entries/new.conf"),
        },
        Seed {
            name: "mbr_out_of_range",
            input: bad_mbr,
            expect: Outcome::NotFound,
        },
        Seed {
            name: "empty",
            input: Vec::new(),
            expect: Outcome::NotFound,
        },
    ]
}
