//! A qcow2 image's backing chain: which files it reaches, found from the headers (parsed by
//! Keel, never by guessing a format) and opened by the caller, who decides where a backing
//! file may lie. The same walk runs in the daemon (which opens each file beneath its image
//! directories) and in the VMM (which takes the files the daemon handed over, in order).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::header::{Header, MAX_HEADER_BYTES};
use super::Error;
use crate::Format;

/// Most backing images below a disk.
pub const MAX_CHAIN: usize = 16;
/// Bytes read first to find the header; more only when its parts lie further in.
const FIRST_READ: usize = 64 << 10;

/// One image of a chain, open.
#[derive(Debug)]
pub struct Layer {
    pub file: File,
    pub format: Format,
    /// The path it was opened by (for messages).
    pub path: PathBuf,
}

/// Parses the qcow2 header of `file` (named `path` in messages).
pub fn read_header(file: &File, path: &Path) -> Result<Header, Error> {
    let mut want = FIRST_READ;
    loop {
        let mut bytes = Vec::new();
        let n = read_prefix(file, &mut bytes, want, path)?;
        match Header::parse(&bytes[..n]) {
            Err(super::header::Error::Short { need, .. })
                if n == want && want < MAX_HEADER_BYTES =>
            {
                want = need.max(want * 2).min(MAX_HEADER_BYTES);
            }
            result => {
                return result.map_err(|source| Error::Header {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Reads up to `want` bytes from the start of the file, without moving its offset.
fn read_prefix(file: &File, bytes: &mut Vec<u8>, want: usize, path: &Path) -> Result<usize, Error> {
    use std::os::unix::fs::FileExt;
    bytes.resize(want, 0);
    let mut done = 0;
    while done < want {
        match file.read_at(&mut bytes[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(done)
}

/// Where a backing file named `name` by the image at `path` lies: absolute names as they
/// are, relative ones beside the image.
pub fn resolve(path: &Path, name: &str) -> PathBuf {
    let named = Path::new(name);
    if named.is_absolute() {
        named.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new("/")).join(named)
    }
}

/// Opens the backing chain below the qcow2 image `top` (at `path`), nearest first: for each
/// backing file its header names, `open` is given the resolved path and returns the file
/// opened read-only, or why it may not be (a message that names the file). A missing backing format, an unknown one, a loop
/// or a chain deeper than [`MAX_CHAIN`] is refused.
pub fn open_backing(
    top: &File,
    path: &Path,
    open: &mut dyn FnMut(&Path) -> Result<File, String>,
) -> Result<Vec<Layer>, Error> {
    let identity = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    let mut seen: Vec<(u64, u64)> = identity(top).into_iter().collect();
    let mut layers: Vec<Layer> = Vec::new();
    let mut current_path = path.to_path_buf();
    let mut header = read_header(top, path)?;
    while let Some(backing) = header.backing.take() {
        if layers.len() == MAX_CHAIN {
            return Err(Error::TooDeep {
                path: path.to_path_buf(),
            });
        }
        let format = match backing.format.as_deref() {
            None => {
                return Err(Error::BackingFormatMissing {
                    path: current_path,
                    backing: backing.name,
                })
            }
            Some("qcow2") => Format::Qcow2,
            Some("raw") => Format::Raw,
            Some(other) => {
                return Err(Error::BackingFormat {
                    path: current_path,
                    format: other.to_string(),
                })
            }
        };
        let resolved = resolve(&current_path, &backing.name);
        let file = open(&resolved).map_err(|reason| Error::Backing {
            path: current_path.clone(),
            backing: backing.name.clone(),
            reason,
        })?;
        if let Some(id) = identity(&file) {
            if seen.contains(&id) {
                return Err(Error::Loop {
                    path: path.to_path_buf(),
                    backing: resolved,
                });
            }
            seen.push(id);
        }
        if format == Format::Qcow2 {
            header = read_header(&file, &resolved)?;
        }
        current_path = resolved.clone();
        layers.push(Layer {
            file,
            format,
            path: resolved,
        });
    }
    Ok(layers)
}
