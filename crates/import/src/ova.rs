//! An OVA: a tar archive of an OVF descriptor, its disks and a manifest. Unpacked into a
//! directory of the caller's with every entry checked: regular files only (no links, devices
//! or directories), plain names (no path, no `..`, no hidden file), each name once, at most
//! [`MAX_ENTRIES`] entries, and exactly one `.ovf`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most entries an OVA may have (a descriptor, a manifest, a certificate and disks).
pub const MAX_ENTRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum OvaError {
    #[error("reading the OVA (a tar archive) failed: {0}")]
    Read(#[source] std::io::Error),
    #[error("the OVA has more than {MAX_ENTRIES} entries")]
    TooMany,
    #[error("the OVA's entry '{name}' is {what}; an OVA holds plain files only")]
    NotAFile { name: String, what: &'static str },
    #[error(
        "the OVA's entry '{0}' is not a plain file name (a path, '..', or hidden); it is refused"
    )]
    BadName(String),
    #[error("the OVA holds '{0}' twice")]
    Twice(String),
    #[error(
        "the OVA's entry '{name}' is cut short: {read} of its {size} bytes are in the archive"
    )]
    CutShort { name: String, read: u64, size: u64 },
    #[error("the OVA holds {0} OVF descriptors; it must hold exactly one")]
    Descriptors(usize),
    #[error("writing the OVA's entry '{name}' failed: {source}")]
    Write {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// What an OVA held, unpacked.
#[derive(Debug)]
pub struct Unpacked {
    /// The OVF descriptor.
    pub ovf: PathBuf,
    /// Every file, in the archive's order.
    pub files: Vec<PathBuf>,
}

fn plain(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\\')
        && name.len() <= 255
        && !name.bytes().any(|b| b < 0x20)
}

/// Unpacks `archive` into `dir` (which must exist; its files are made new, never replaced),
/// calling `progress` with (bytes read, archive size).
pub fn unpack(
    archive: &File,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Unpacked, OvaError> {
    let total = archive.metadata().map_err(OvaError::Read)?.len();
    unpack_from(archive, total, dir, progress)
}

/// [`unpack`] from any reader of `total` bytes (the fuzz target's archives are in memory).
pub fn unpack_from(
    archive: impl Read,
    total: u64,
    dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Unpacked, OvaError> {
    let mut tar = tar::Archive::new(archive);
    let mut files = Vec::new();
    let mut done = 0u64;
    for entry in tar.entries().map_err(OvaError::Read)? {
        let mut entry = entry.map_err(OvaError::Read)?;
        if files.len() == MAX_ENTRIES {
            return Err(OvaError::TooMany);
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        // Some tools write "./name".
        let name = name.strip_prefix("./").unwrap_or(&name).to_string();
        let what = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => None,
            tar::EntryType::Directory => Some("a directory"),
            tar::EntryType::Symlink => Some("a symbolic link"),
            tar::EntryType::Link => Some("a hard link"),
            _ => Some("not a regular file"),
        };
        // pax headers and GNU long names are read by the tar crate itself.
        if let Some(what) = what {
            return Err(OvaError::NotAFile { name, what });
        }
        if !plain(&name) {
            return Err(OvaError::BadName(name));
        }
        let path = dir.join(&name);
        if files.contains(&path) {
            return Err(OvaError::Twice(name));
        }
        let write_err = |source| OvaError::Write {
            name: name.clone(),
            source,
        };
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut copied = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(OvaError::Read)?;
            if n == 0 {
                break;
            }
            // Zeroes are left as holes: disks in OVAs are mostly compressed, raw ones sparse.
            if buf[..n].iter().all(|b| *b == 0) {
                use std::io::Seek;
                out.seek(std::io::SeekFrom::Current(n as i64))
                    .map_err(write_err)?;
            } else {
                std::io::Write::write_all(&mut out, &buf[..n]).map_err(write_err)?;
            }
            done += n as u64;
            copied += n as u64;
            progress(done.min(total), total);
        }
        let len = entry.header().size().map_err(OvaError::Read)?;
        // An archive cut short ends an entry early without an error: its header's size would
        // make a file of bytes the archive never had.
        if copied != len {
            return Err(OvaError::CutShort {
                name,
                read: copied,
                size: len,
            });
        }
        out.set_len(len).map_err(write_err)?;
        files.push(path);
    }
    let descriptors: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case("ovf")))
        .collect();
    if descriptors.len() != 1 {
        return Err(OvaError::Descriptors(descriptors.len()));
    }
    Ok(Unpacked {
        ovf: descriptors[0].clone(),
        files,
    })
}
