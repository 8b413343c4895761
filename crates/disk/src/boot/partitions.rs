//! Where the filesystems of a disk image start: an MBR's primary partitions, a GPT's
//! partitions, or the whole image. The tables come from the guest's disk, so every field is
//! checked against the image before it is used; a table that makes no sense yields no
//! partitions rather than an error, and the search goes on to the next candidate.

use super::Image;

/// 512-byte sectors: what MBR and GPT count in on virtual disks (Keel's virtio-blk reports
/// 512-byte logical blocks).
pub const SECTOR: u64 = 512;
/// MBR partition type of a GPT's protective entry.
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xee;
/// Extended partitions hold logical ones in a chain; those are not searched.
const MBR_TYPES_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// GPT entries read at most: the usual table holds 128.
pub const MAX_GPT_ENTRIES: u32 = 256;

/// One place a filesystem may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// The partition's number as Linux names it (`vda1` is 1); `None` for the whole image.
    pub number: Option<u32>,
    pub start: u64,
    pub len: u64,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.number {
            Some(n) => write!(f, "partition {n}"),
            None => f.write_str("the whole disk"),
        }
    }
}

/// The partitions of the image, in table order; the whole image when it holds no table.
pub fn find(image: &dyn Image) -> Vec<Partition> {
    let mut mbr = [0u8; SECTOR as usize];
    if image.read_at(0, &mut mbr).is_err() || mbr[510..512] != [0x55, 0xaa] {
        return whole(image);
    }
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    if entries.iter().any(|e| e.kind == MBR_TYPE_GPT_PROTECTIVE) {
        return gpt(image);
    }
    let found: Vec<Partition> = entries
        .iter()
        .zip(1..)
        .filter(|(e, _)| e.kind != 0 && !MBR_TYPES_EXTENDED.contains(&e.kind))
        .filter_map(|(e, number)| {
            within(
                image,
                number,
                u64::from(e.first_sector),
                u64::from(e.sectors),
            )
        })
        .collect();
    if found.is_empty() {
        // A boot sector signature without partitions: a filesystem may still start at 0.
        return whole(image);
    }
    found
}

fn whole(image: &dyn Image) -> Vec<Partition> {
    vec![Partition {
        number: None,
        start: 0,
        len: image.size(),
    }]
}

struct MbrEntry {
    kind: u8,
    first_sector: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(mbr: &[u8; SECTOR as usize], index: usize) -> Self {
        let e = &mbr[446 + 16 * index..446 + 16 * (index + 1)];
        Self {
            kind: e[4],
            first_sector: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    }
}

/// A partition of `sectors` sectors from `first`, if it lies inside the image.
fn within(image: &dyn Image, number: u32, first: u64, sectors: u64) -> Option<Partition> {
    let start = first.checked_mul(SECTOR)?;
    let len = sectors.checked_mul(SECTOR)?;
    let end = start.checked_add(len)?;
    (len > 0 && start > 0 && end <= image.size()).then_some(Partition {
        number: Some(number),
        start,
        len,
    })
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The partitions a GPT at LBA 1 lists (the backup table at the end is not consulted).
fn gpt(image: &dyn Image) -> Vec<Partition> {
    let mut header = [0u8; SECTOR as usize];
    if image.read_at(SECTOR, &mut header).is_err() || &header[..8] != GPT_SIGNATURE {
        return Vec::new();
    }
    let entries_lba = le_u64(&header, 72);
    let count = le_u32(&header, 80).min(MAX_GPT_ENTRIES);
    let entry_size = le_u32(&header, 84);
    // The spec: 128 * 2^n bytes. Anything else is not a table this reader trusts.
    if !(128..=4096).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Vec::new();
    }
    let Some(table_start) = entries_lba.checked_mul(SECTOR) else {
        return Vec::new();
    };
    let mut entry = vec![0u8; entry_size as usize];
    let mut found = Vec::new();
    for index in 0..count {
        let Some(at) = u64::from(index)
            .checked_mul(u64::from(entry_size))
            .and_then(|o| o.checked_add(table_start))
        else {
            break;
        };
        if image.read_at(at, &mut entry).is_err() {
            break;
        }
        // An all-zero type GUID marks an unused entry.
        if entry[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le_u64(&entry, 32), le_u64(&entry, 40));
        let Some(sectors) = last.checked_sub(first).and_then(|s| s.checked_add(1)) else {
            continue;
        };
        if let Some(p) = within(image, index + 1, first, sectors) {
            found.push(p);
        }
    }
    found
}
