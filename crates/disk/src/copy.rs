//! Copying a stretch of one file into another, sparse where the source is: holes of the
//! source (`SEEK_DATA`) are skipped without reading them, and all-zero chunks are not written.
//! Image imports and VMDK flat extents copy this way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the source at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing the copy at byte {offset}: {source}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Bytes read and written at a time.
const CHUNK: u64 = 1 << 20;

/// Where the next data at or after `offset` begins (None: only holes after it). A file
/// system that cannot tell says `offset` itself, so everything is read.
fn next_data(file: &File, offset: u64) -> Option<u64> {
    let at = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on a descriptor this function borrows; no memory is passed.
    let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if data >= 0 {
        return Some(data as u64);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(offset),
    }
}

/// Copies `bytes` from byte `from` of `src` to byte `base` of `dst` (which must read as zeroes
/// there: a new file, or one set to its length), leaving holes. `progress` hears the bytes of
/// the stretch done so far. Returns the bytes written.
pub fn copy_sparse(
    src: &File,
    from: u64,
    bytes: u64,
    dst: &File,
    base: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, Error> {
    let mut buf = vec![0u8; CHUNK.min(bytes) as usize];
    let mut done = 0;
    let mut written = 0;
    while done < bytes {
        match next_data(src, from + done) {
            Some(data) if data >= from + bytes => break,
            Some(data) if data > from + done => {
                done = data - from;
                continue;
            }
            Some(_) => {}
            None => break,
        }
        let n = CHUNK.min(bytes - done) as usize;
        src.read_exact_at(&mut buf[..n], from + done)
            .map_err(|source| Error::Read {
                offset: from + done,
                source,
            })?;
        if buf[..n].iter().any(|b| *b != 0) {
            dst.write_all_at(&buf[..n], base + done)
                .map_err(|source| Error::Write {
                    offset: base + done,
                    source,
                })?;
            written += n as u64;
        }
        done += n as u64;
        progress(done);
    }
    progress(bytes);
    Ok(written)
}
