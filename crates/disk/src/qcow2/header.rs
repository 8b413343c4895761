//! The qcow2 header, read without trusting it: what Keel needs before it hands an image to
//! the format driver (its version, size, cluster size and features, and above all the name
//! and format of its backing file, which decide what other host file the image reaches).
//! Pure parsing of the image's first bytes; every offset and length is checked against what
//! was read before it is used.

/// "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// What [`Header::parse`] needs at most: the header, its extensions and the backing file's
/// name all lie in the first cluster, and a cluster is at most 2 MiB.
pub const MAX_HEADER_BYTES: usize = 2 << 20;
/// The longest backing file name QEMU writes or reads.
pub const MAX_BACKING_NAME: usize = 1023;
/// Cluster sizes qcow2 allows: 512 bytes to 2 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// Length of the version 2 header (and of the fixed part of version 3's).
const V2_HEADER_BYTES: usize = 72;
const V3_MIN_HEADER_BYTES: usize = 104;
/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Incompatible feature bits of version 3.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Most guest bytes Keel serves from one image (as for VMDK: 64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("not a qcow2 image: it does not start with the qcow2 magic QFI\\xfb")]
    Magic,
    #[error("qcow2 header is cut short: {need} bytes needed, {have} read")]
    Short { need: usize, have: usize },
    #[error("qcow2 version {0}: Keel reads versions 2 and 3")]
    Version(u32),
    #[error("qcow2 cluster size 2^{0}: qcow2 allows 2^9 to 2^21 bytes")]
    ClusterBits(u32),
    #[error(
        "qcow2 virtual size {0} bytes: Keel serves disks up to 64 TiB, in whole 512-byte sectors"
    )]
    Size(u64),
    #[error("qcow2 image is encrypted (method {0}): Keel does not open encrypted qcow2; convert it with qemu-img convert first")]
    Encrypted(u32),
    #[error("qcow2 header length {0} is outside the first cluster or below version 3's 104 bytes")]
    HeaderLength(u32),
    #[error("qcow2 image is marked corrupt; repair it with qemu-img check -r all first")]
    Corrupt,
    #[error("qcow2 image uses {0}, which Keel does not support; convert it with qemu-img convert -O qcow2 first")]
    Unsupported(&'static str),
    #[error("qcow2 image sets unknown incompatible feature bits {0:#x}; Keel will not open it")]
    UnknownFeatures(u64),
    #[error("qcow2 header extension at byte {0} runs past the first cluster")]
    Extension(usize),
    #[error("qcow2 backing file name ({offset}, {len} bytes) lies outside the first cluster or is longer than 1023 bytes")]
    BackingName { offset: u64, len: u32 },
    #[error("qcow2 backing file name or format is not UTF-8 without NUL bytes")]
    BackingText,
}

/// What the header says of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Guest-visible size, bytes.
    pub size: u64,
    pub cluster_bits: u32,
    /// The backing file, as the header names it (relative names are relative to the
    /// image's directory), and its format if the header says.
    pub backing: Option<Backing>,
    /// The image was not closed cleanly with lazy refcounts: its refcounts need repair.
    pub dirty: bool,
    /// Where the L1 table lies, and its entries (8 bytes each).
    pub l1_offset: u64,
    pub l1_entries: u32,
    /// Where the refcount table lies, and its clusters.
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub name: String,
    /// `None` when the header does not say: the format is then never guessed.
    pub format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn text(bytes: &[u8]) -> Result<String, Error> {
    if bytes.contains(&0) {
        return Err(Error::BackingText);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::BackingText)
}

impl Header {
    /// Whether `bytes` start with the qcow2 magic (never used to guess a format: only to
    /// say what a file is in a message).
    pub fn looks_like_qcow2(bytes: &[u8]) -> bool {
        bytes.starts_with(&MAGIC)
    }

    /// Parses the header at the start of `bytes` (the image's first bytes: at least the
    /// header, its extensions and the backing file name; the first cluster always holds
    /// them).
    pub fn parse(bytes: &[u8]) -> Result<Header, Error> {
        let short = |need: usize| Error::Short {
            need,
            have: bytes.len(),
        };
        if bytes.len() < 4 {
            return Err(short(4));
        }
        if bytes[..4] != MAGIC {
            return Err(Error::Magic);
        }
        if bytes.len() < V2_HEADER_BYTES {
            return Err(short(V2_HEADER_BYTES));
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(Error::Version(version));
        }
        let backing_offset = be64(bytes, 8);
        let backing_len = be32(bytes, 16);
        let cluster_bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::ClusterBits(cluster_bits));
        }
        let cluster = 1usize << cluster_bits;
        let size = be64(bytes, 24);
        if size > MAX_SIZE || !size.is_multiple_of(512) {
            return Err(Error::Size(size));
        }
        let crypt = be32(bytes, 32);
        if crypt != 0 {
            return Err(Error::Encrypted(crypt));
        }
        let (header_len, dirty) = if version == 3 {
            if bytes.len() < V3_MIN_HEADER_BYTES {
                return Err(short(V3_MIN_HEADER_BYTES));
            }
            let incompatible = be64(bytes, 72);
            if incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(Error::Corrupt);
            }
            if incompatible & INCOMPAT_DATA_FILE != 0 {
                return Err(Error::Unsupported("an external data file"));
            }
            if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(Error::Unsupported("extended L2 entries (subclusters)"));
            }
            if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
                return Err(Error::Unsupported("zstd compression"));
            }
            let known = INCOMPAT_DIRTY
                | INCOMPAT_CORRUPT
                | INCOMPAT_DATA_FILE
                | INCOMPAT_COMPRESSION_TYPE
                | INCOMPAT_EXTENDED_L2;
            if incompatible & !known != 0 {
                return Err(Error::UnknownFeatures(incompatible & !known));
            }
            let len = be32(bytes, 100);
            if (len as usize) < V3_MIN_HEADER_BYTES || len as usize > cluster {
                return Err(Error::HeaderLength(len));
            }
            (len as usize, incompatible & INCOMPAT_DIRTY != 0)
        } else {
            (V2_HEADER_BYTES, false)
        };
        // Extensions follow the header, 8-byte aligned, within the first cluster.
        let mut backing_format = None;
        let mut at = header_len.next_multiple_of(8);
        loop {
            if at + 8 > cluster {
                return Err(Error::Extension(at));
            }
            if at + 8 > bytes.len() {
                return Err(short(at + 8));
            }
            let kind = be32(bytes, at);
            let len = be32(bytes, at + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data = at + 8;
            let end = data.checked_add(len).filter(|&e| e <= cluster);
            let Some(end) = end else {
                return Err(Error::Extension(at));
            };
            if end > bytes.len() {
                return Err(short(end));
            }
            if kind == EXT_BACKING_FORMAT {
                backing_format = Some(text(&bytes[data..end])?);
            }
            at = end.next_multiple_of(8);
        }
        let backing = if backing_offset == 0 {
            None
        } else {
            let bad = Error::BackingName {
                offset: backing_offset,
                len: backing_len,
            };
            if backing_len == 0 || backing_len as usize > MAX_BACKING_NAME {
                return Err(bad);
            }
            let start = usize::try_from(backing_offset).map_err(|_| bad.clone())?;
            let Some(end) = start
                .checked_add(backing_len as usize)
                .filter(|end| *end <= cluster)
            else {
                return Err(bad);
            };
            if end > bytes.len() {
                return Err(short(end));
            }
            Some(Backing {
                name: text(&bytes[start..end])?,
                format: backing_format,
            })
        };
        Ok(Header {
            version,
            size,
            cluster_bits,
            backing,
            dirty,
            l1_entries: be32(bytes, 36),
            l1_offset: be64(bytes, 40),
            refcount_table_offset: be64(bytes, 48),
            refcount_table_clusters: be32(bytes, 56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header with 64 KiB clusters, optionally naming a backing file.
    pub(crate) fn v3(size: u64, backing: Option<(&str, Option<&str>)>) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut at = 112;
        if let Some((name, format)) = backing {
            if let Some(f) = format {
                h[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
                h[at + 4..at + 8].copy_from_slice(&(f.len() as u32).to_be_bytes());
                h[at + 8..at + 8 + f.len()].copy_from_slice(f.as_bytes());
                at = (at + 8 + f.len()).next_multiple_of(8);
            }
            at += 8; // the end extension
            h[8..16].copy_from_slice(&(at as u64).to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        h
    }

    #[test]
    fn a_plain_image_and_one_with_a_backing_file() {
        let plain = Header::parse(&v3(1 << 30, None)).unwrap();
        assert_eq!(plain.version, 3);
        assert_eq!(plain.size, 1 << 30);
        assert_eq!(plain.cluster_bits, 16);
        assert_eq!(plain.backing, None);
        let over = Header::parse(&v3(1 << 30, Some(("base.qcow2", Some("qcow2"))))).unwrap();
        assert_eq!(
            over.backing,
            Some(Backing {
                name: "base.qcow2".into(),
                format: Some("qcow2".into())
            })
        );
        let unnamed = Header::parse(&v3(1 << 30, Some(("/images/base.raw", None)))).unwrap();
        assert_eq!(unnamed.backing.unwrap().format, None);
    }

    #[test]
    fn what_is_refused() {
        let good = v3(1 << 30, Some(("base", Some("raw"))));
        let with = |at: usize, bytes: &[u8]| {
            let mut h = good.clone();
            h[at..at + bytes.len()].copy_from_slice(bytes);
            Header::parse(&h)
        };
        assert_eq!(with(0, b"QFI\0"), Err(Error::Magic));
        assert_eq!(with(4, &4u32.to_be_bytes()), Err(Error::Version(4)));
        assert_eq!(with(20, &22u32.to_be_bytes()), Err(Error::ClusterBits(22)));
        assert_eq!(with(24, &513u64.to_be_bytes()), Err(Error::Size(513)));
        assert_eq!(with(32, &1u32.to_be_bytes()), Err(Error::Encrypted(1)));
        assert_eq!(with(72, &2u64.to_be_bytes()), Err(Error::Corrupt));
        assert!(matches!(
            with(72, &4u64.to_be_bytes()),
            Err(Error::Unsupported(_))
        ));
        assert_eq!(
            with(72, &(1u64 << 40).to_be_bytes()),
            Err(Error::UnknownFeatures(1 << 40))
        );
        assert_eq!(
            with(100, &70_000u32.to_be_bytes()),
            Err(Error::HeaderLength(70_000))
        );
        // A backing name past the first cluster, or too long.
        assert!(matches!(
            with(8, &65_534u64.to_be_bytes()),
            Err(Error::BackingName { .. })
        ));
        assert!(matches!(
            with(16, &2000u32.to_be_bytes()),
            Err(Error::BackingName { .. })
        ));
        // An offset at the end of the address space (found by the fuzz target).
        assert!(matches!(
            with(8, &u64::MAX.to_be_bytes()),
            Err(Error::BackingName { .. })
        ));
        // An extension that claims to run past the cluster.
        assert_eq!(
            with(116, &0xffff_fff0u32.to_be_bytes()),
            Err(Error::Extension(112))
        );
        // Cut short anywhere: an error, never a panic.
        for n in 0..good.len() {
            let _ = Header::parse(&good[..n]);
        }
        assert!(matches!(
            Header::parse(&good[..80]),
            Err(Error::Short { .. })
        ));
    }
}
