//! Direct I/O (`O_DIRECT`, like QEMU's `cache=none`): the file's alignment rules, whether a
//! transfer meets them, and the aligned bounce buffer that carries a transfer that does not.
//!
//! A file opened with `O_DIRECT` takes a transfer only when every buffer address is a
//! multiple of its memory alignment and the file offset and every buffer length are
//! multiples of its offset alignment; the kernel answers anything else with EINVAL. The
//! alignments come from `statx(STATX_DIOALIGN)`. Keel's sectors are 512 bytes, so a file
//! whose offset alignment is coarser cannot serve a guest's requests directly and is refused
//! when it is opened. Guest buffers may lie anywhere: a transfer whose buffers do not meet
//! the memory rules goes through a [`Bounce`] buffer of [`BOUNCE_CHUNK`] bytes at most.

use std::alloc::Layout;
use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

/// Keel's sector: what every guest request's offset and length are multiples of.
pub const SECTOR_BYTES: u32 = 512;
/// The alignment assumed, for memory and offsets, where the file system reports none.
pub const FALLBACK_ALIGN: u32 = 4096;
/// Largest bounce buffer: a bigger transfer goes through it in pieces.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// A file's direct-I/O alignment, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// Of buffer addresses.
    pub mem: u32,
    /// Of file offsets and transfer lengths.
    pub offset: u32,
}

/// Why a file cannot serve Keel's 512-byte sectors with direct I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The file system reports that it does no direct I/O on this file.
    Unsupported,
    /// Offsets must be aligned to more than a sector; `reported` is false when the file
    /// system reported nothing and [`FALLBACK_ALIGN`] was assumed.
    Coarse { offset: u32, reported: bool },
}

/// What `statx(STATX_DIOALIGN)` said: `None` when the file system does not report it (the
/// bit is missing from `stx_mask`, or statx itself failed), else `(mem, offset)`.
pub fn alignment(report: Option<(u32, u32)>) -> Result<DioAlign, Refusal> {
    let (mem, offset, reported) = match report {
        None => (FALLBACK_ALIGN, FALLBACK_ALIGN, false),
        // statx(2): both are 0 when direct I/O is not supported on the file.
        Some((0, _)) | Some((_, 0)) => return Err(Refusal::Unsupported),
        Some((mem, offset)) => (mem, offset, true),
    };
    if offset > SECTOR_BYTES || !SECTOR_BYTES.is_multiple_of(offset) {
        return Err(Refusal::Coarse { offset, reported });
    }
    Ok(DioAlign { mem, offset })
}

/// `statx(STATX_DIOALIGN)` of an open file: `(mem, offset)`, or `None` if not reported.
pub fn statx_dioalign(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty: &CStr = c"";
    // SAFETY: `empty` is a NUL-terminated string and `stx` a live statx buffer, both valid
    // for the call; AT_EMPTY_PATH makes it describe `fd` itself.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

impl DioAlign {
    /// Whether a transfer of `buffers` at `offset` meets the rules and may go straight
    /// between them and the file.
    pub fn fits(&self, buffers: &[libc::iovec], offset: u64) -> bool {
        let mem = self.mem.max(1) as usize;
        let len = self.offset.max(1) as usize;
        offset.is_multiple_of(u64::from(self.offset.max(1)))
            && buffers
                .iter()
                .all(|b| (b.iov_base as usize).is_multiple_of(mem) && b.iov_len.is_multiple_of(len))
    }

    /// Alignment of a bounce buffer: a power of two that meets the memory rule (and is a
    /// page at least).
    pub fn bounce_align(&self) -> usize {
        (self.mem.max(4096) as usize).next_power_of_two()
    }
}

/// A zeroed heap buffer at an alignment of its own.
pub struct Bounce {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory with no thread affinity, reached only through `&mut`
// or while its owner holds it.
unsafe impl Send for Bounce {}

impl Bounce {
    /// `len` bytes (at least 1) at `align` (a power of two).
    pub fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "allocating a direct-I/O bounce buffer failed",
            ));
        }
        Ok(Self { ptr, layout })
    }

    /// Its length in bytes.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// An iovec over the first `len` bytes (at most the buffer's length).
    pub fn iov(&mut self, len: usize) -> libc::iovec {
        crate::iov(self.ptr, len.min(self.capacity()))
    }

    /// Copies `len` bytes from `buffers`, starting `skip` bytes into them, into the start
    /// of the buffer; returns the bytes copied (fewer if the buffers end first).
    ///
    /// # Safety
    ///
    /// Every iovec points at live memory of its length, readable for the call.
    pub unsafe fn gather(&mut self, buffers: &[libc::iovec], skip: usize, len: usize) -> usize {
        let len = len.min(self.capacity());
        let mut done = 0;
        for_each_piece(buffers, skip, len, |src, n| {
            // SAFETY: `src` has `n` readable bytes (the caller's guarantee); the buffer has
            // `len` >= `done + n` bytes and is our own allocation, apart from guest memory.
            unsafe { std::ptr::copy_nonoverlapping(src, self.ptr.add(done), n) };
            done += n;
        });
        done
    }

    /// Copies the first `len` bytes of the buffer into `buffers`, starting `skip` bytes into
    /// them; returns the bytes copied.
    ///
    /// # Safety
    ///
    /// Every iovec points at live memory of its length, writable for the call.
    pub unsafe fn scatter(&self, buffers: &[libc::iovec], skip: usize, len: usize) -> usize {
        let len = len.min(self.capacity());
        let mut done = 0;
        for_each_piece(buffers, skip, len, |dst, n| {
            // SAFETY: `dst` has `n` writable bytes (the caller's guarantee); the buffer has
            // `len` >= `done + n` bytes and is our own allocation, apart from guest memory.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(done), dst, n) };
            done += n;
        });
        done
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Calls `f(address, length)` for each piece of `buffers` in the `len` bytes after the
/// first `skip`, in order.
fn for_each_piece(
    buffers: &[libc::iovec],
    skip: usize,
    len: usize,
    mut f: impl FnMut(*mut u8, usize),
) {
    let mut skip = skip;
    let mut left = len;
    for b in buffers {
        if left == 0 {
            break;
        }
        if skip >= b.iov_len {
            skip -= b.iov_len;
            continue;
        }
        let n = (b.iov_len - skip).min(left);
        // `skip` < the iovec's length: the address stays inside it.
        f(b.iov_base.cast::<u8>().wrapping_add(skip), n);
        skip = 0;
        left -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iov;

    #[test]
    fn the_alignment_decision() {
        assert_eq!(
            alignment(Some((512, 512))),
            Ok(DioAlign {
                mem: 512,
                offset: 512
            })
        );
        assert_eq!(
            alignment(Some((4, 512))),
            Ok(DioAlign {
                mem: 4,
                offset: 512
            })
        );
        // Byte-granular offsets (tmpfs reports 1) serve sectors as well.
        assert_eq!(alignment(Some((1, 1))).map(|a| a.offset), Ok(1));
        assert_eq!(
            alignment(Some((4096, 4096))),
            Err(Refusal::Coarse {
                offset: 4096,
                reported: true
            }),
            "a 4 KiB-sector disk cannot serve 512-byte sectors directly"
        );
        assert_eq!(
            alignment(None),
            Err(Refusal::Coarse {
                offset: FALLBACK_ALIGN,
                reported: false
            }),
            "not reported: 4096 assumed, which is too coarse"
        );
        assert_eq!(alignment(Some((0, 0))), Err(Refusal::Unsupported));
        assert_eq!(alignment(Some((512, 0))), Err(Refusal::Unsupported));
        assert!(matches!(
            alignment(Some((512, 384))),
            Err(Refusal::Coarse { offset: 384, .. })
        ));
    }

    #[test]
    fn fits_checks_addresses_lengths_and_the_offset() {
        let a = DioAlign {
            mem: 512,
            offset: 512,
        };
        let p = 0x10_0000 as *mut u8;
        assert!(a.fits(&[iov(p, 4096), iov(p.wrapping_add(8192), 512)], 1024));
        assert!(!a.fits(&[iov(p.wrapping_add(16), 4096)], 0), "address");
        assert!(
            !a.fits(&[iov(p, 256), iov(p.wrapping_add(4096), 256)], 0),
            "lengths"
        );
        assert!(!a.fits(&[iov(p, 512)], 100), "offset");
        assert!(a.fits(&[], 0));
        assert_eq!(a.bounce_align(), 4096);
    }

    #[test]
    fn gather_and_scatter_cross_iovecs() {
        let mut a: Vec<u8> = (0..10).collect();
        let mut b: Vec<u8> = (10..30).collect();
        let bufs = [iov(a.as_mut_ptr(), 10), iov(b.as_mut_ptr(), 20)];
        let mut bounce = Bounce::new(16, 4096).unwrap();
        assert_eq!(bounce.ptr as usize % 4096, 0);
        // SAFETY: the iovecs point at `a` and `b`, live for the calls.
        let n = unsafe { bounce.gather(&bufs, 5, 100) };
        assert_eq!(n, 16, "at most the buffer's length");
        let mut out = [0u8; 16];
        let outv = [iov(out.as_mut_ptr(), 16)];
        // SAFETY: as above, for `out`.
        unsafe { bounce.scatter(&outv, 0, 16) };
        assert_eq!(out.to_vec(), (5..21).collect::<Vec<u8>>());
        // SAFETY: as above.
        unsafe { bounce.scatter(&bufs, 25, 16) };
        assert_eq!(&b[15..], &[5, 6, 7, 8, 9], "only to the end of the iovecs");
    }
}
