//! The host side's Unix sockets: the listener at the configured path, non-blocking connects to
//! `PATH_<port>`, sends that never raise SIGPIPE, and the `CONNECT <port>\n` line a host
//! program writes first.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::Error;

/// Longest `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// Listens at `path`. A socket file left there by a VMM that is gone is replaced; a path that
/// is something else, or a socket someone still listens on, is an error.
pub fn listen(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

/// `PATH_<port>`: where a guest's connection to host port `port` goes.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the stream socket at `path` without blocking the event loop: a listener whose
/// backlog is full answers `WouldBlock` instead of making us wait. No symbolic link is
/// followed on the way (the guest picks the port, so the path's end; a link planted there
/// must not lead its connection to another program's socket): the socket is opened with
/// `O_PATH` beneath `RESOLVE_NO_SYMLINKS`, checked to be a socket, and connected to through
/// that descriptor (`/proc/self/fd/N`).
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let socket = open_socket_no_symlinks(path)?;
    let through = format!("/proc/self/fd/{}", socket.as_raw_fd());
    connect_at(Path::new(&through))
}

/// The socket file at `path`, opened without following a symbolic link anywhere in it.
fn open_socket_no_symlinks(path: &Path) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in socket path"))?;
    // SAFETY: open_how is plain data; all zero is "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: openat2 reads a NUL-terminated path and an open_how of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            name.as_ptr(),
            &how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: stat is plain data that fstat fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor this function owns, into a valid stat.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
    }
    Ok(fd)
}

/// Connects to the socket named by `path` as it is.
fn connect_at(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain integers and arrays; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty or too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes hold the family and the
    // NUL-terminated path (checked shorter than sun_path above); `fd` is open.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

fn check(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Sends bytes without blocking and without SIGPIPE when the reader has gone.
pub fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: reads `bytes.len()` bytes of a live slice; the result is checked.
    check(unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// Sends guest memory without blocking and without SIGPIPE.
pub fn send_volatile<B: BitmapSlice>(fd: RawFd, data: &VolatileSlice<'_, B>) -> io::Result<usize> {
    let guard = data.ptr_guard();
    // SAFETY: the guard keeps `data.len()` bytes of mapped guest memory valid for reads for
    // the duration of the call; the kernel copies from them and does not keep the pointer.
    check(unsafe {
        libc::send(
            fd,
            guard.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// Receives into `buf` without blocking; with `peek` the bytes stay in the socket.
pub fn recv(fd: RawFd, buf: &mut [u8], peek: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    // SAFETY: writes at most `buf.len()` bytes into a live mutable slice; checked.
    check(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) })
}

/// What reading a host program's first line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// No newline yet.
    Incomplete,
    /// `CONNECT <port>`.
    Connect(u32),
    /// Anything else; the stream is closed.
    Malformed,
}

/// Parses `CONNECT <port>\n` (a `\r` before the newline is allowed): a decimal port of at most
/// ten digits that fits in 32 bits, the whole line within [`MAX_CONNECT_LINE`] bytes.
pub fn parse_connect_line(line: &[u8]) -> Line {
    let Some(end) = line.iter().position(|&b| b == b'\n') else {
        return if line.len() >= MAX_CONNECT_LINE {
            Line::Malformed
        } else {
            Line::Incomplete
        };
    };
    if end >= MAX_CONNECT_LINE {
        return Line::Malformed;
    }
    let text = line.get(..end).unwrap_or_default();
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let Some(digits) = text.strip_prefix(b"CONNECT ") else {
        return Line::Malformed;
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Line::Malformed;
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map_or(Line::Malformed, Line::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_follow_no_symbolic_link() {
        let dir = std::env::temp_dir().join(format!("keel-vsock-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let target = dir.join("real/other.sock");
        let _listener = UnixListener::bind(&target).unwrap();
        // A plain socket path connects.
        connect(&target).unwrap();
        // A link named as a port, and a directory link on the way: refused.
        std::os::unix::fs::symlink(&target, dir.join("v.sock_5000")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("via")).unwrap();
        for path in [dir.join("v.sock_5000"), dir.join("via/other.sock")] {
            let e = connect(&path).unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ELOOP),
                "{}: {e}",
                path.display()
            );
        }
        // A file that is no socket: refused.
        std::fs::write(dir.join("file_1"), b"x").unwrap();
        let e = connect(&dir.join("file_1")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1234\n"), Line::Connect(1234));
        assert_eq!(parse_connect_line(b"CONNECT 0\r\n"), Line::Connect(0));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\n"),
            Line::Connect(u32::MAX)
        );
        assert_eq!(parse_connect_line(b"CONNECT 12"), Line::Incomplete);
        assert_eq!(parse_connect_line(b""), Line::Incomplete);
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 1 2\n",
            b"connect 1\n",
            b"CONNECT 12345678901\n",
            b"HELLO\n",
            b"\n",
            &[b'x'; MAX_CONNECT_LINE],
        ] {
            assert_eq!(parse_connect_line(bad), Line::Malformed, "{bad:?}");
        }
        let mut long = b"CONNECT ".to_vec();
        long.extend_from_slice(&[b'0'; 30]);
        long.push(b'\n');
        assert_eq!(parse_connect_line(&long), Line::Malformed);
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/keel/v.sock"), 52),
            PathBuf::from("/run/keel/v.sock_52")
        );
    }

    #[test]
    fn listening_replaces_stale_sockets_and_refuses_the_rest() {
        let dir = std::env::temp_dir().join(format!("keel-vsock-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");

        // A socket file nobody listens on any more is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let live = listen(&path).expect("stale socket replaced");
        // A live one is not.
        assert!(matches!(listen(&path), Err(Error::InUse(_))));
        drop(live);

        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(listen(&file), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let err = listen(&dir.join("missing").join("v.sock")).unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err}");

        assert!(connect(&dir.join("nobody")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
