//! The snapshot's state file: a header (magic, format version, body length, SHA-256 of the
//! body) and a JSON body, the [`MachineState`]. Reading it is parsing hostile input: the
//! header is checked before the body is looked at, the body's checksum before it is parsed,
//! and the parsed state is checked again when it is put into a VM.
//!
//! The memory file starts with a header page of its own that names the snapshot it belongs
//! to, so a memory file of another snapshot (or of nothing) is refused.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use super::MachineState;

/// Format versions this release reads. A later release keeps reading 1, or converts it.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"KEELSNAP";
const MEMORY_MAGIC: &[u8; 8] = b"KEELMEM\0";
/// magic, version, reserved, body length, SHA-256.
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 32;
/// Largest body read: a VM's state is tens of KiB; anything near this is not one.
pub const MAX_BODY_BYTES: u64 = 16 << 20;
/// The memory file's header page.
pub const MEMORY_HEADER_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a Keel snapshot state file (its first bytes are not KEELSNAP)")]
    NotASnapshot,
    #[error("the snapshot is of format {0}; this Keel reads format {VERSION}: restore it with the release that made it, or a newer one")]
    Version(u32),
    #[error("the state file is cut short: {have} bytes of a {want}-byte body")]
    Truncated { have: u64, want: u64 },
    #[error("the state file's body is {0} bytes, more than a VM's state can be")]
    TooLarge(u64),
    #[error("the state file was changed after it was written: its checksum does not match")]
    Checksum,
    #[error("the state file's body is not a VM's state: {0}")]
    Body(#[source] serde_json::Error),
    #[error("the memory file is not this snapshot's: {0}")]
    ForeignMemory(String),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// A body with its header: what a state file holds.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&Sha256::digest(body));
    bytes.extend_from_slice(body);
    bytes
}

/// Writes `state` into `file` (an existing file: a jailed VMM makes none); the caller syncs.
pub fn write_state(file: &File, state: &MachineState) -> Result<u64, Error> {
    let body = serde_json::to_vec(state).map_err(Error::Body)?;
    let bytes = frame(&body);
    file.set_len(0).map_err(io("emptying the state file"))?;
    file.write_all_at(&bytes, 0)
        .map_err(io("writing the state file"))?;
    Ok(bytes.len() as u64)
}

/// Reads and checks a state file's bytes (from a file, or a fuzzer).
pub fn parse_state(bytes: &[u8]) -> Result<MachineState, Error> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(Error::NotASnapshot);
    }
    if bytes.len() < HEADER_BYTES {
        return Err(Error::Truncated {
            have: 0,
            want: HEADER_BYTES as u64,
        });
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_BODY_BYTES {
        return Err(Error::TooLarge(len));
    }
    let body = &bytes[HEADER_BYTES..];
    if (body.len() as u64) < len {
        return Err(Error::Truncated {
            have: body.len() as u64,
            want: len,
        });
    }
    let body = &body[..len as usize];
    if Sha256::digest(body).as_slice() != &bytes[24..56] {
        return Err(Error::Checksum);
    }
    serde_json::from_slice(body).map_err(Error::Body)
}

/// Reads a state file.
pub fn read_state(file: &File) -> Result<MachineState, Error> {
    let mut bytes = Vec::new();
    file.take(MAX_BODY_BYTES + HEADER_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io("reading the state file"))?;
    parse_state(&bytes)
}

/// Writes the memory file's header page: it names snapshot `id` and the memory's size.
pub fn write_memory_header(file: &File, id: &str, memory_bytes: u64) -> Result<(), Error> {
    let mut page = vec![0u8; MEMORY_HEADER_BYTES as usize];
    page[..8].copy_from_slice(MEMORY_MAGIC);
    page[8..12].copy_from_slice(&VERSION.to_le_bytes());
    page[16..24].copy_from_slice(&memory_bytes.to_le_bytes());
    let id = id.as_bytes();
    let n = id.len().min(64);
    page[24] = n as u8;
    page[32..32 + n].copy_from_slice(&id[..n]);
    file.write_all_at(&page, 0)
        .map_err(io("writing the memory file's header"))
}

/// Checks that `file` is the memory of snapshot `id`, of `memory_bytes`, and not cut short.
pub fn check_memory(file: &File, id: &str, memory_bytes: u64) -> Result<(), Error> {
    let mut page = vec![0u8; MEMORY_HEADER_BYTES as usize];
    file.read_exact_at(&mut page, 0)
        .map_err(|_| Error::ForeignMemory("it has no header page".into()))?;
    if &page[..8] != MEMORY_MAGIC {
        return Err(Error::ForeignMemory(
            "its first bytes are not KEELMEM".into(),
        ));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&page[16..24]);
    let n = usize::from(page[24]).min(64);
    if &page[32..32 + n] != id.as_bytes() {
        return Err(Error::ForeignMemory(format!(
            "it belongs to snapshot {}, the state file to {id}",
            String::from_utf8_lossy(&page[32..32 + n])
        )));
    }
    if u64::from_le_bytes(size) != memory_bytes {
        return Err(Error::ForeignMemory(format!(
            "it holds {} bytes of memory, the state {memory_bytes}",
            u64::from_le_bytes(size)
        )));
    }
    let len = file
        .metadata()
        .map_err(io("reading the memory file's size"))?
        .len();
    if len != MEMORY_HEADER_BYTES + memory_bytes {
        return Err(Error::ForeignMemory(format!(
            "it is {len} bytes, cut short or grown (it should be {})",
            MEMORY_HEADER_BYTES + memory_bytes
        )));
    }
    Ok(())
}
