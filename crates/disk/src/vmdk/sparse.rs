//! Reading a VMDK sparse extent (monolithicSparse, and streamOptimized with its deflate-
//! compressed grains) and writing the disk it holds as a raw image, sparse where the source
//! was: unallocated and all-zero grains are not written. Every offset and size read from the
//! file is checked against the file's length before anything is allocated or read.

use std::io::{self, Read};

use super::header::{HeaderError, SparseHeader, GD_AT_END, HEADER_BYTES, SECTOR};

/// Where an extent is read from: a file, or bytes in memory (the fuzz target).
pub trait Source {
    /// Its size in bytes.
    fn size(&self) -> u64;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|e| *e <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

/// Where the raw disk is written.
pub trait Sink {
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl Sink for std::fs::File {
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Converted {
    pub capacity_bytes: u64,
    /// Grains the extent has data for.
    pub grains_allocated: u64,
    /// Of those, grains written (not all zero).
    pub grains_written: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    #[error("the VMDK header: {0}")]
    Header(#[from] HeaderError),
    #[error("the VMDK's {what} ({len} bytes at byte {offset}) lies beyond the end of the file ({file_len} bytes): the file is cut short or damaged")]
    OutOfFile {
        what: String,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("reading the VMDK's {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the raw image at byte {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("grain {grain}: its marker names sector {found}, not {expected}: the grain table points at the wrong place")]
    Marker {
        grain: u64,
        found: u64,
        expected: u64,
    },
    #[error("grain {grain}: its compressed data ({len} bytes) does not inflate to a grain: {why}")]
    Inflate { grain: u64, len: u64, why: String },
}

/// Checks that `len` bytes at `offset` lie in the file; the end offset.
fn within(what: &str, offset: u64, len: u64, file_len: u64) -> Result<(), SparseError> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(SparseError::OutOfFile {
            what: what.to_string(),
            offset,
            len,
            file_len,
        }),
    }
}

fn read(
    src: &(impl Source + ?Sized),
    what: &str,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), SparseError> {
    within(what, offset, buf.len() as u64, src.size())?;
    src.read_exact_at(buf, offset)
        .map_err(|source| SparseError::Read {
            what: what.to_string(),
            source,
        })
}

fn sector_offset(what: &str, sector: u64, file_len: u64) -> Result<u64, SparseError> {
    sector.checked_mul(SECTOR).ok_or(SparseError::OutOfFile {
        what: what.to_string(),
        offset: u64::MAX,
        len: 0,
        file_len,
    })
}

/// The header that places the grain directory: the one at the start, or for a
/// streamOptimized extent whose directory is at its end, the footer's copy (the second to last
/// sector, before the end-of-stream marker).
fn effective_header(src: &(impl Source + ?Sized)) -> Result<SparseHeader, SparseError> {
    let mut first = [0u8; HEADER_BYTES];
    if src.size() < HEADER_BYTES as u64 {
        return Err(HeaderError::Short(src.size() as usize).into());
    }
    read(src, "header", &mut first, 0)?;
    let header = SparseHeader::parse(&first)?;
    if header.gd_offset != GD_AT_END {
        return Ok(header);
    }
    let footer_at = src
        .size()
        .checked_sub(2 * SECTOR)
        .ok_or(HeaderError::Short(src.size() as usize))?;
    let mut footer = [0u8; HEADER_BYTES];
    read(src, "footer", &mut footer, footer_at)?;
    Ok(SparseHeader::parse(&footer)?)
}

/// Converts the sparse extent in `src` into the raw disk in `dst` (made `capacity` bytes
/// long first, so that what is not written reads as zeros). `progress` hears (grain tables
/// done, grain tables in all).
pub fn convert(
    src: &(impl Source + ?Sized),
    dst: &mut impl Sink,
    progress: impl FnMut(u64, u64),
) -> Result<Converted, SparseError> {
    let header = effective_header(src)?;
    let capacity = header.capacity_sectors * SECTOR;
    dst.set_len(capacity).map_err(|source| SparseError::Write {
        offset: capacity,
        source,
    })?;
    convert_at(src, &header, dst, 0, progress)
}

/// The header of the sparse extent in `src` (the footer's for a streamOptimized one).
pub fn extent_header(src: &(impl Source + ?Sized)) -> Result<SparseHeader, SparseError> {
    effective_header(src)
}

/// Converts the sparse extent in `src`, whose header is `header`, into `dst` from byte
/// `base` on (one extent of a split disk); `dst` is long enough already.
pub fn convert_at(
    src: &(impl Source + ?Sized),
    header: &SparseHeader,
    dst: &mut impl Sink,
    base: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<Converted, SparseError> {
    let file_len = src.size();
    let capacity = header.capacity_sectors * SECTOR;
    let gd_entries = header.gd_entries();
    // Sizes first, against the file: a directory or table the file cannot hold is refused
    // before anything of its size is allocated.
    let gd_at = sector_offset("grain directory", header.gd_offset, file_len)?;
    within("grain directory", gd_at, gd_entries * 4, file_len)?;
    let mut gd = vec![0u8; (gd_entries * 4) as usize];
    read(src, "grain directory", &mut gd, gd_at)?;

    let gtes = u64::from(header.gtes_per_gt);
    let grain_bytes = header.grain_bytes();
    let mut table = vec![0u8; (gtes * 4) as usize];
    let mut grain = vec![0u8; grain_bytes as usize];
    let mut compressed = Vec::new();
    let mut done = Converted {
        capacity_bytes: capacity,
        ..Converted::default()
    };
    for (d, entry) in gd.chunks_exact(4).enumerate() {
        let d = d as u64;
        let gt_sector = u64::from(u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]));
        if gt_sector != 0 {
            let what = format!("grain table {d}");
            let gt_at = sector_offset(&what, gt_sector, file_len)?;
            read(src, &what, &mut table, gt_at)?;
            for (e, slot) in table.chunks_exact(4).enumerate() {
                let index = d * gtes + e as u64;
                if index >= header.grains() {
                    break;
                }
                let grain_sector =
                    u64::from(u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]));
                // 0: never written (zeros); 1: written as zeros.
                if grain_sector <= 1 {
                    continue;
                }
                done.grains_allocated += 1;
                let lba = index * header.grain_sectors;
                let here = grain_bytes.min(capacity - lba * SECTOR) as usize;
                let at = sector_offset(&format!("grain {index}"), grain_sector, file_len)?;
                if header.compressed() {
                    read_compressed(src, &mut compressed, &mut grain, at, index, lba)?;
                } else {
                    grain[here..].fill(0);
                    read(src, &format!("grain {index}"), &mut grain[..here], at)?;
                }
                if grain[..here].iter().all(|b| *b == 0) {
                    continue;
                }
                let offset = base + lba * SECTOR;
                dst.write_all_at(&grain[..here], offset)
                    .map_err(|source| SparseError::Write { offset, source })?;
                done.grains_written += 1;
            }
        }
        progress(d + 1, gd_entries);
    }
    Ok(done)
}

/// A compressed grain: a 12-byte marker (its first sector, the data's length), then the
/// zlib stream of the grain. Inflates into `grain` (zeros past what it holds).
fn read_compressed(
    src: &(impl Source + ?Sized),
    compressed: &mut Vec<u8>,
    grain: &mut [u8],
    at: u64,
    index: u64,
    lba: u64,
) -> Result<(), SparseError> {
    let what = format!("grain {index}");
    let mut marker = [0u8; 12];
    read(src, &what, &mut marker, at)?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&marker[..8]);
    let found = u64::from_le_bytes(found);
    if found != lba {
        return Err(SparseError::Marker {
            grain: index,
            found,
            expected: lba,
        });
    }
    let len = u64::from(u32::from_le_bytes([
        marker[8], marker[9], marker[10], marker[11],
    ]));
    // Deflate never more than doubles a grain; more is a damaged file, refused before it is
    // allocated.
    let most = grain.len() as u64 * 2 + 1024;
    if len > most {
        return Err(SparseError::Inflate {
            grain: index,
            len,
            why: format!("more than {most} bytes for one grain"),
        });
    }
    compressed.resize(len as usize, 0);
    read(src, &what, compressed, at + 12)?;
    let mut inflater = flate2::read::ZlibDecoder::new(&compressed[..]);
    let mut filled = 0;
    loop {
        let n = inflater
            .read(&mut grain[filled..])
            .map_err(|e| SparseError::Inflate {
                grain: index,
                len,
                why: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        filled += n;
        if filled == grain.len() {
            let mut extra = [0u8; 1];
            if inflater.read(&mut extra).unwrap_or(0) != 0 {
                return Err(SparseError::Inflate {
                    grain: index,
                    len,
                    why: "it inflates to more than a grain".into(),
                });
            }
            break;
        }
    }
    grain[filled..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink in memory, for the tests and the fuzz target.
    struct Memory(Vec<u8>);

    impl Sink for Memory {
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.0.resize(len as usize, 0);
            Ok(())
        }

        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.0[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    /// A 1 MiB disk of 64 KiB grains: header, grain directory at sector 1, one table at
    /// sector 2, grain 3 holding 0xAB at sector 16.
    fn image() -> Vec<u8> {
        let mut f = super::super::header::sample(2048, 128);
        f[56..64].copy_from_slice(&1u64.to_le_bytes());
        f.resize(16 * 512 + 128 * 512, 0);
        f[512..516].copy_from_slice(&2u32.to_le_bytes());
        let gte = 2 * 512 + 3 * 4;
        f[gte..gte + 4].copy_from_slice(&16u32.to_le_bytes());
        f[16 * 512..].fill(0xab);
        f
    }

    #[test]
    fn grains_land_where_their_table_says() {
        let src = image();
        let mut out = Memory(Vec::new());
        let done = convert(&src[..], &mut out, |_, _| {}).unwrap();
        assert_eq!(done.capacity_bytes, 1 << 20);
        assert_eq!((done.grains_allocated, done.grains_written), (1, 1));
        let grain = 3 * 128 * 512;
        assert!(out.0[..grain].iter().all(|b| *b == 0));
        assert!(out.0[grain..grain + 65536].iter().all(|b| *b == 0xab));
        assert!(out.0[grain + 65536..].iter().all(|b| *b == 0));
    }

    #[test]
    fn offsets_beyond_the_file_are_refused_before_anything_is_read() {
        let mut src = image();
        let gte = 2 * 512 + 3 * 4;
        src[gte..gte + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = convert(&src[..], &mut Memory(Vec::new()), |_, _| {}).unwrap_err();
        assert!(matches!(e, SparseError::OutOfFile { .. }), "{e}");
        // A directory claimed far past the end.
        let mut src = image();
        src[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = convert(&src[..], &mut Memory(Vec::new()), |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("beyond the end of the file"), "{e}");
    }
}
