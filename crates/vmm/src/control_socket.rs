//! The control socket's connections: newline-delimited JSON requests in, one response line
//! out per request, several per connection. This module only frames and parses; the control
//! loop ([`crate::control`]) decides what each request does. Everything is non-blocking and
//! bounded: a line longer than [`MAX_LINE`] closes the connection, as does a client that lets
//! more than [`MAX_PENDING_OUTPUT`] bytes of answers pile up unread.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use api::control::{Request, Response};
use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

/// Longest request line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Most answer bytes held for a client that does not read them.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Most connections at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Most descriptors a connection may hold for requests not yet served (a snapshot's takes
/// each disk's new image and its chain); more close the connection.
pub const MAX_HELD_FDS: usize = api::control::MAX_SNAPSHOT_FDS;
/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
const FDS_PER_MESSAGE: usize = 253;

/// What one line on a connection was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Request(Request),
    /// Not a request: the error message to answer with.
    Garbage(String),
}

/// Splits bytes into lines, refusing lines longer than [`MAX_LINE`].
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

/// A line went past [`MAX_LINE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

impl LineBuffer {
    /// Adds `bytes`; returns the lines they completed, without their newlines.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, LineTooLong> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.pending[start..].iter().position(|&b| b == b'\n') {
            if pos > MAX_LINE {
                return Err(LineTooLong);
            }
            lines.push(self.pending[start..start + pos].to_vec());
            start += pos + 1;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        Ok(lines)
    }
}

/// Parses one line; blank lines are nothing.
pub fn parse_line(line: &[u8]) -> Option<Incoming> {
    let text = line.strip_suffix(b"\r").unwrap_or(line);
    if text.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(match serde_json::from_slice::<Request>(text) {
        Ok(request) => Incoming::Request(request),
        Err(e) => Incoming::Garbage(format!(
            "not a request ({e}); send one JSON object per line, like {{\"request\":\"status\"}}, \
             {{\"request\":\"power-button\"}} or {{\"request\":\"stop\"}}"
        )),
    })
}

/// One connection, for as long as it lives: its descriptor and a serial number no later
/// connection reuses (a descriptor number is reused as soon as it is closed). An answer that
/// comes for a connection gone is dropped, never sent to the next one on the same number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId {
    fd: RawFd,
    serial: u64,
}

struct Connection {
    serial: u64,
    stream: UnixStream,
    lines: LineBuffer,
    output: Vec<u8>,
    /// Descriptors that came with the connection's bytes (SCM_RIGHTS), in order, for the
    /// request that takes them; closed with the connection.
    fds: Vec<std::fs::File>,
    /// The client sent its last byte (or broke the rules): answer what is pending, then close.
    read_done: bool,
    /// Close at the next settle, whatever is pending.
    dead: bool,
    watching: EventSet,
}

/// The listening control socket and its connections.
pub struct ControlSocket {
    listener: UnixListener,
    connections: HashMap<RawFd, Connection>,
    next_serial: u64,
}

impl ControlSocket {
    pub fn new(listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            connections: HashMap::new(),
            next_serial: 0,
        })
    }

    pub fn register(&self, ops: &mut EventOps) -> Result<(), String> {
        ops.add(Events::new(&self.listener, EventSet::IN))
            .map_err(|e| format!("watching the control socket: {e}"))
    }

    /// Handles readiness of the listener or of a connection; returns the lines that arrived
    /// on that connection, in order. The caller answers them, then calls [`Self::settle`].
    pub fn process(&mut self, events: Events, ops: &mut EventOps) -> Vec<Incoming> {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return Vec::new();
        }
        let Some(conn) = self.connections.get_mut(&fd) else {
            return Vec::new();
        };
        let set = events.event_set();
        if set.contains(EventSet::ERROR) {
            conn.dead = true;
            return Vec::new();
        }
        let mut incoming = Vec::new();
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
            && !conn.read_done
        {
            let mut buf = [0u8; 16 * 1024];
            match receive(&conn.stream, &mut buf, &mut conn.fds) {
                Ok(0) => conn.read_done = true,
                Ok(n) => match conn.lines.push(&buf[..n]) {
                    Ok(lines) => incoming.extend(lines.iter().filter_map(|l| parse_line(l))),
                    Err(LineTooLong) => {
                        conn.read_done = true;
                        incoming.push(Incoming::Garbage(format!(
                            "request line longer than {MAX_LINE} bytes; closing the connection"
                        )));
                    }
                },
                Err(e) if is_transient(&e) => {}
                Err(_) => conn.dead = true,
            }
        }
        incoming
    }

    /// The connection now on descriptor `fd`, if one is.
    pub fn id_of(&self, fd: RawFd) -> Option<ConnectionId> {
        self.connections.get(&fd).map(|c| ConnectionId {
            fd,
            serial: c.serial,
        })
    }

    /// The descriptors that came on connection `id` and no request took yet, in order.
    pub fn take_fds(&mut self, id: ConnectionId) -> Vec<std::fs::File> {
        self.connections
            .get_mut(&id.fd)
            .filter(|c| c.serial == id.serial)
            .map(|c| std::mem::take(&mut c.fds))
            .unwrap_or_default()
    }

    /// Queues `response` for connection `id` (if it is still there) and writes what the
    /// socket takes now.
    pub fn respond(&mut self, id: ConnectionId, response: &Response, ops: &mut EventOps) {
        let fd = id.fd;
        let Some(conn) = self
            .connections
            .get_mut(&fd)
            .filter(|c| c.serial == id.serial)
        else {
            return;
        };
        match serde_json::to_vec(response) {
            Ok(mut line) => {
                line.push(b'\n');
                conn.output.extend_from_slice(&line);
            }
            Err(_) => conn.dead = true,
        }
        if conn.output.len() > MAX_PENDING_OUTPUT {
            conn.dead = true;
        }
        self.settle(fd, ops);
    }

    /// Writes what is pending on connection `fd`, watches for what it still needs, and closes
    /// it when it has nothing left to do.
    pub fn settle(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        while !conn.dead && !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(0) => conn.dead = true,
                Ok(n) => {
                    conn.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => conn.dead = true,
            }
        }
        let mut want = EventSet::empty();
        if !conn.read_done {
            want |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !conn.output.is_empty() {
            want |= EventSet::OUT;
        }
        if conn.dead || want.is_empty() {
            let _ = ops.remove(Events::empty(&conn.stream));
            self.connections.remove(&fd);
        } else if want != conn.watching && ops.modify(Events::new(&conn.stream, want)).is_ok() {
            conn.watching = want;
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: all taken. Other errors (EMFILE, ECONNABORTED): try again at the
                // next readiness; the pending connection stays in the backlog.
                Err(_) => return,
            };
            if self.connections.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue; // Dropped: the client sees the connection close.
            }
            let watching = EventSet::IN | EventSet::READ_HANG_UP;
            if ops.add(Events::new(&stream, watching)).is_err() {
                continue;
            }
            self.next_serial += 1;
            self.connections.insert(
                stream.as_raw_fd(),
                Connection {
                    serial: self.next_serial,
                    stream,
                    lines: LineBuffer::default(),
                    output: Vec::new(),
                    fds: Vec::new(),
                    read_done: false,
                    dead: false,
                    watching,
                },
            );
        }
    }
}

/// Reads what the stream has into `buf`, keeping descriptors that came with it in `held`
/// (at most [`MAX_HELD_FDS`]: more is an error, and they are closed).
fn receive(
    stream: &UnixStream,
    buf: &mut [u8],
    held: &mut Vec<std::fs::File>,
) -> io::Result<usize> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut fds = [-1 as RawFd; FDS_PER_MESSAGE];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which may take any bytes, for the call.
    let (n, count) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let room = MAX_HELD_FDS - held.len().min(MAX_HELD_FDS);
    for (i, &fd) in fds[..count].iter().enumerate() {
        // SAFETY: the first `count` entries are descriptors this process now owns; each is
        // wrapped once, so it is closed on every path.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        // Not for any program this process might start.
        // SAFETY: F_SETFD on a descriptor this process owns; no pointer is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if i < room {
            held.push(file);
        }
    }
    if count > room {
        return Err(io::Error::other("too many descriptors on one connection"));
    }
    Ok(n)
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_reads_and_blank_ones_are_nothing() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"{\"request\":").unwrap(), Vec::<Vec<u8>>::new());
        let lines = b
            .push(b"\"status\"}\n\r\n{\"request\":\"stop\"}\npart")
            .unwrap();
        let parsed: Vec<Incoming> = lines.iter().filter_map(|l| parse_line(l)).collect();
        assert_eq!(
            parsed,
            vec![
                Incoming::Request(Request::Status),
                Incoming::Request(Request::Stop)
            ]
        );
        assert_eq!(b.push(b"\n").unwrap(), vec![b"part".to_vec()]);
    }

    #[test]
    fn garbage_is_answered_with_what_a_request_looks_like() {
        for line in [
            &b"hello"[..],
            b"{\"request\":\"reboot\"}",
            b"\xff\xfe",
            b"[1,2]",
        ] {
            match parse_line(line) {
                Some(Incoming::Garbage(m)) => {
                    assert!(m.contains("{\"request\":\"status\"}"), "{m}")
                }
                other => panic!("{line:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn descriptors_that_come_with_a_line_are_held_up_to_the_limit() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (client, server) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        client
            .send_with_fds(&[&b"{\"request\":\"status\"}\n"[..]], &[file.as_raw_fd()])
            .unwrap();
        let mut held = Vec::new();
        let mut buf = [0u8; 256];
        let n = receive(&server, &mut buf, &mut held).unwrap();
        assert_eq!(&buf[..n], b"{\"request\":\"status\"}\n");
        assert_eq!(held.len(), 1);
        // Up to the limit, over several messages; past it, an error, and what came is closed.
        let many = vec![file.as_raw_fd(); FDS_PER_MESSAGE];
        client.send_with_fds(&[&b"x"[..]], &many).unwrap();
        receive(&server, &mut buf, &mut held).unwrap();
        assert_eq!(held.len(), 1 + FDS_PER_MESSAGE);
        let rest = vec![file.as_raw_fd(); MAX_HELD_FDS - held.len()];
        client.send_with_fds(&[&b"y"[..]], &rest).unwrap();
        receive(&server, &mut buf, &mut held).unwrap();
        assert_eq!(held.len(), MAX_HELD_FDS);
        client
            .send_with_fds(&[&b"z"[..]], &[file.as_raw_fd()])
            .unwrap();
        assert!(receive(&server, &mut buf, &mut held).is_err());
        assert_eq!(held.len(), MAX_HELD_FDS);
    }

    #[test]
    fn over_long_lines_are_refused_with_or_without_a_newline() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(&vec![b'x'; MAX_LINE]).unwrap().len(), 0);
        assert_eq!(b.push(b"x"), Err(LineTooLong));
        let mut b = LineBuffer::default();
        let mut long = vec![b' '; MAX_LINE + 1];
        long.push(b'\n');
        assert_eq!(b.push(&long), Err(LineTooLong));
        let mut b = LineBuffer::default();
        let mut max = vec![b' '; MAX_LINE];
        max.push(b'\n');
        assert_eq!(
            b.push(&max).unwrap().len(),
            1,
            "exactly MAX_LINE is allowed"
        );
    }
}
