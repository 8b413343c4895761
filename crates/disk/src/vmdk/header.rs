//! The header of a VMDK sparse extent (`KDMV`), as VMware's "Virtual Disk Format 5.0"
//! describes it: 512 bytes, little-endian, packed. Pure parsing, and every field a later step
//! uses to size or place something is checked here: a VMDK is hostile input.

/// "KDMV" as a little-endian u32.
pub const MAGIC: u32 = 0x564d_444b;
pub const SECTOR: u64 = 512;
/// `gd_offset` of a streamOptimized extent whose grain directory is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Bytes of the header.
pub const HEADER_BYTES: usize = 512;

/// Flag: the newline characters after the header are checked (catches ASCII-mode transfers).
const FLAG_NEWLINE_TEST: u32 = 1;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the extent has markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;

/// The largest disk converted: 64 TiB, well past what VMware makes (62 TiB).
pub const MAX_CAPACITY_SECTORS: u64 = (64 << 40) / SECTOR;
/// The largest grain: 64 MiB (VMware uses 64 KiB).
const MAX_GRAIN_SECTORS: u64 = (64 << 20) / SECTOR;
/// Most entries a grain table may have (VMware writes 512).
const MAX_GTES_PER_GT: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Deflate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity_sectors: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_sectors: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead_sectors: u64,
    pub compression: Compression,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("it is {0} bytes, shorter than a VMDK sparse header (512)")]
    Short(usize),
    #[error("it does not start with the VMDK sparse magic 'KDMV' (a descriptor-only VMDK is text; a flat extent has no header)")]
    Magic,
    #[error("VMDK sparse version {0} is not one this reader knows (1 to 3)")]
    Version(u32),
    #[error(
        "its grain size of {0} sectors is not a power of two from 8 (4 KiB) to 131072 (64 MiB)"
    )]
    GrainSize(u64),
    #[error("its grain tables have {0} entries, not 1 to 65536")]
    GrainTable(u32),
    #[error("its capacity of {0} sectors is more than 64 TiB")]
    Capacity(u64),
    #[error("its compression algorithm {0} is not deflate (1) or none (0)")]
    Compression(u16),
    #[error("its newline check characters were changed (the file was copied as text?)")]
    Newlines,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseHeader {
    /// Parses and checks a header.
    pub fn parse(bytes: &[u8]) -> Result<SparseHeader, HeaderError> {
        if bytes.len() < HEADER_BYTES {
            return Err(HeaderError::Short(bytes.len()));
        }
        if u32_at(bytes, 0) != MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = u32_at(bytes, 4);
        if !(1..=3).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        let flags = u32_at(bytes, 8);
        let header = SparseHeader {
            version,
            flags,
            capacity_sectors: u64_at(bytes, 12),
            grain_sectors: u64_at(bytes, 20),
            descriptor_offset: u64_at(bytes, 28),
            descriptor_sectors: u64_at(bytes, 36),
            gtes_per_gt: u32_at(bytes, 44),
            rgd_offset: u64_at(bytes, 48),
            gd_offset: u64_at(bytes, 56),
            overhead_sectors: u64_at(bytes, 64),
            compression: match u16::from_le_bytes([bytes[77], bytes[78]]) {
                0 => Compression::None,
                1 => Compression::Deflate,
                other => return Err(HeaderError::Compression(other)),
            },
        };
        let grain = header.grain_sectors;
        if !grain.is_power_of_two() || !(8..=MAX_GRAIN_SECTORS).contains(&grain) {
            return Err(HeaderError::GrainSize(grain));
        }
        if !(1..=MAX_GTES_PER_GT).contains(&header.gtes_per_gt) {
            return Err(HeaderError::GrainTable(header.gtes_per_gt));
        }
        if header.capacity_sectors > MAX_CAPACITY_SECTORS {
            return Err(HeaderError::Capacity(header.capacity_sectors));
        }
        if flags & FLAG_NEWLINE_TEST != 0 && bytes[73..77] != *b"\n \r\n" {
            return Err(HeaderError::Newlines);
        }
        Ok(header)
    }

    /// Grains of the disk (the last may be cut short by the capacity).
    pub fn grains(&self) -> u64 {
        self.capacity_sectors.div_ceil(self.grain_sectors)
    }

    /// Entries of the grain directory: one grain table per `gtes_per_gt` grains.
    pub fn gd_entries(&self) -> u64 {
        self.grains().div_ceil(u64::from(self.gtes_per_gt))
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0 && self.compression == Compression::Deflate
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }
}

#[cfg(test)]
pub(crate) fn sample(capacity_sectors: u64, grain_sectors: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..12].copy_from_slice(&FLAG_NEWLINE_TEST.to_le_bytes());
    h[12..20].copy_from_slice(&capacity_sectors.to_le_bytes());
    h[20..28].copy_from_slice(&grain_sectors.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_parsed_and_its_sizes_checked() {
        let h = SparseHeader::parse(&sample(16384, 128)).unwrap();
        assert_eq!(
            (h.capacity_sectors, h.grain_sectors, h.gtes_per_gt),
            (16384, 128, 512)
        );
        assert_eq!((h.grains(), h.gd_entries()), (128, 1));
        assert!(!h.compressed());
        assert_eq!(SparseHeader::parse(&[0u8; 10]), Err(HeaderError::Short(10)));
        assert_eq!(SparseHeader::parse(&[0u8; 512]), Err(HeaderError::Magic));
        let mut bad = sample(16384, 100);
        assert_eq!(SparseHeader::parse(&bad), Err(HeaderError::GrainSize(100)));
        bad = sample(u64::MAX, 128);
        assert!(matches!(
            SparseHeader::parse(&bad),
            Err(HeaderError::Capacity(_))
        ));
        bad = sample(16384, 128);
        bad[73] = b'\r';
        assert_eq!(SparseHeader::parse(&bad), Err(HeaderError::Newlines));
        bad = sample(16384, 128);
        bad[77] = 7;
        assert_eq!(SparseHeader::parse(&bad), Err(HeaderError::Compression(7)));
    }
}
