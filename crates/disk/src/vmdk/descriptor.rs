//! The VMDK text descriptor: `key = "value"` lines and extent lines such as
//! `RW 4192256 SPARSE "disk-s001.vmdk"` or `RW 16777216 FLAT "disk-flat.vmdk" 0`. It is
//! hostile input: lines and counts are bounded, and an extent may only name a plain file name
//! beside the descriptor (never a path: a descriptor naming `/etc/shadow` or `../x` would
//! otherwise make the importer read it).

use super::header::{MAX_CAPACITY_SECTORS, SECTOR};

/// The largest descriptor read (VMware's are a few hundred bytes; embedded ones 10 KiB).
pub const MAX_BYTES: usize = 64 << 10;
/// Most extents one descriptor may list (twoGbMaxExtent of a 62 TiB disk: about 32000).
const MAX_EXTENTS: usize = 40_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// A sparse extent file (its own KDMV header).
    Sparse,
    /// Raw sectors in a file, from an offset.
    Flat,
    /// Sectors that read as zeros, with no file.
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub kind: ExtentKind,
    pub sectors: u64,
    /// A file name beside the descriptor (None for ZERO).
    pub file: Option<String>,
    /// For FLAT: the first sector used in the file.
    pub offset_sectors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub extents: Vec<Extent>,
    /// The parent's CID: `ffffffff` when the disk has no parent (a snapshot's has one).
    pub parent_cid: Option<String>,
    /// `ddb.*` and other keys, as given.
    pub keys: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("the descriptor is {0} bytes, more than the 64 KiB a VMDK descriptor may have")]
    TooLong(usize),
    #[error("the descriptor is not text (UTF-8)")]
    NotText,
    #[error("descriptor line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("the descriptor lists no extent")]
    NoExtent,
    #[error("the descriptor lists more than {MAX_EXTENTS} extents")]
    TooManyExtents,
    #[error("the disk's extents add up to more than 64 TiB")]
    TooLarge,
}

/// An extent's file name: a plain name of the descriptor's directory.
fn file_name(raw: &str, line: usize) -> Result<String, DescriptorError> {
    let bad = |why: &str| DescriptorError::Line {
        line,
        why: format!("extent file \"{raw}\" {why}"),
    };
    if raw.is_empty() || raw == "." || raw == ".." {
        return Err(bad("is not a file name"));
    }
    if raw.contains('/') || raw.contains('\\') || raw.contains('\0') {
        return Err(bad("is a path; an extent must lie beside its descriptor"));
    }
    Ok(raw.to_string())
}

/// One extent line: ACCESS SECTORS TYPE ["FILE" [OFFSET]].
fn extent(line: &str, number: usize) -> Result<Extent, DescriptorError> {
    let bad = |why: String| DescriptorError::Line { line: number, why };
    let (head, quoted) = match line.split_once('"') {
        Some((head, rest)) => {
            let (name, tail) = rest
                .split_once('"')
                .ok_or_else(|| bad("an extent's file name has no closing quote".into()))?;
            (head, Some((name, tail.trim())))
        }
        None => (line, None),
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    let [access, sectors, kind] = words[..] else {
        return Err(bad(format!("'{line}' is not ACCESS SECTORS TYPE \"FILE\"")));
    };
    if !["RW", "RDONLY", "NOACCESS"].contains(&access) {
        return Err(bad(format!(
            "access '{access}' is not RW, RDONLY or NOACCESS"
        )));
    }
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| bad(format!("'{sectors}' is not a number of sectors")))?;
    if sectors == 0 || sectors > MAX_CAPACITY_SECTORS {
        return Err(bad(format!(
            "{sectors} sectors is not a usable extent size"
        )));
    }
    let kind = match kind {
        "SPARSE" => ExtentKind::Sparse,
        "FLAT" => ExtentKind::Flat,
        "ZERO" => ExtentKind::Zero,
        other => {
            return Err(bad(format!(
                "extent type {other} is not one Keel reads (SPARSE, FLAT, ZERO); VMFS extents are read on an ESXi host"
            )))
        }
    };
    let (file, offset_sectors) = match (kind, quoted) {
        (ExtentKind::Zero, _) => (None, 0),
        (_, None) => return Err(bad("the extent names no file".into())),
        (_, Some((name, tail))) => {
            let offset = if tail.is_empty() {
                0
            } else {
                tail.parse()
                    .map_err(|_| bad(format!("extent offset '{tail}' is not a number")))?
            };
            (Some(file_name(name, number)?), offset)
        }
    };
    if offset_sectors > MAX_CAPACITY_SECTORS {
        return Err(bad(format!("extent offset {offset_sectors} is too large")));
    }
    Ok(Extent {
        kind,
        sectors,
        file,
        offset_sectors,
    })
}

impl Descriptor {
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        // An embedded descriptor is padded with NULs to its sectors.
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        if bytes.len() > MAX_BYTES {
            return Err(DescriptorError::TooLong(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DescriptorError::NotText)?;
        let mut d = Descriptor {
            create_type: String::new(),
            extents: Vec::new(),
            parent_cid: None,
            keys: Vec::new(),
        };
        let mut total: u64 = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if ["RW", "RDONLY", "NOACCESS"].contains(&first) {
                if d.extents.len() == MAX_EXTENTS {
                    return Err(DescriptorError::TooManyExtents);
                }
                let e = extent(line, i + 1)?;
                total = total
                    .checked_add(e.sectors)
                    .filter(|t| *t <= MAX_CAPACITY_SECTORS)
                    .ok_or(DescriptorError::TooLarge)?;
                d.extents.push(e);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(DescriptorError::Line {
                    line: i + 1,
                    why: format!("'{line}' is neither key = value nor an extent"),
                });
            };
            let key = key.trim().to_string();
            let value = value.trim().trim_matches('"').to_string();
            match key.as_str() {
                "createType" => d.create_type = value,
                "parentCID" => d.parent_cid = Some(value),
                _ => d.keys.push((key, value)),
            }
        }
        if d.extents.is_empty() {
            return Err(DescriptorError::NoExtent);
        }
        Ok(d)
    }

    /// The disk's size in bytes: its extents' sectors.
    pub fn capacity_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum::<u64>() * SECTOR
    }

    /// Whether the disk is a snapshot on a parent (its contents need the parent's).
    pub fn has_parent(&self) -> bool {
        self.parent_cid
            .as_deref()
            .is_some_and(|c| !c.eq_ignore_ascii_case("ffffffff"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPLIT: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n# Extent description\nRW 4192256 SPARSE \"d-s001.vmdk\"\nRW 8192 SPARSE \"d-s002.vmdk\"\nRW 100 ZERO\n\nddb.virtualHWVersion = \"4\"\n";

    #[test]
    fn extents_and_keys_are_read() {
        let d = Descriptor::parse(SPLIT.as_bytes()).unwrap();
        assert_eq!(d.create_type, "twoGbMaxExtentSparse");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[1].file.as_deref(), Some("d-s002.vmdk"));
        assert_eq!(d.extents[2].kind, ExtentKind::Zero);
        assert_eq!(d.capacity_bytes(), (4192256 + 8192 + 100) * 512);
        assert!(!d.has_parent());
        let flat =
            Descriptor::parse(b"createType=\"monolithicFlat\"\nRW 2048 FLAT \"x-flat.vmdk\" 0\n")
                .unwrap();
        assert_eq!(flat.extents[0].kind, ExtentKind::Flat);
    }

    #[test]
    fn an_extent_may_not_name_a_path() {
        for name in ["/etc/shadow", "../x.vmdk", "a/b.vmdk", "..", ""] {
            let text = format!("RW 8 FLAT \"{name}\" 0\n");
            let e = Descriptor::parse(text.as_bytes()).unwrap_err();
            assert!(matches!(e, DescriptorError::Line { .. }), "{name}: {e}");
        }
        assert!(Descriptor::parse(b"RW 8 VMFS \"x\"\n").is_err());
        assert!(Descriptor::parse(b"RW 8 SPARSE x.vmdk\n").is_err());
        assert_eq!(
            Descriptor::parse(b"version=1\n"),
            Err(DescriptorError::NoExtent)
        );
        assert_eq!(
            Descriptor::parse(&vec![b'#'; MAX_BYTES + 1]),
            Err(DescriptorError::TooLong(MAX_BYTES + 1))
        );
    }
}
