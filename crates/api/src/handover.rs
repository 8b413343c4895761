//! Handing a running guest to a new VMM process, over a Unix socket in the run directory: an
//! upgrade (the old VMM offers) or the end of a live migration (the daemon that received the
//! guest's memory offers). The new VMM (`keel vmm --takeover`) listens on [`TAKEOVER_SOCKET`]; the old one,
//! asked to hand over, connects and, while the guest still runs, sends a fixed-size header
//! and a layout with the descriptors the new one cannot open itself (the memfd of guest
//! memory; the taps, which admit one holder; the disks' files, whose open-file-description
//! locks go with them). Guest memory is never copied: both map the same memfd. The new VMM
//! builds what costs time and does not depend on the guest's state (the KVM VM, its memory
//! slots, irqchip and PIT: milliseconds for gigabytes) and says `prepared`; only then is the
//! guest paused and its state sent. The switch then has two phases, so that the guest runs
//! in exactly one of them:
//!
//! 1. the new VMM builds the rest of the VM from the state, paused, and answers `ready` (or
//!    nothing: then the old one resumes the guest and goes on);
//! 2. the old one answers `go` and ends without touching anything the new one uses; the new
//!    one starts the vCPUs only on `go` (on anything else it ends, having run nothing), then
//!    says `running` (which a migration's target daemon waits for; an old VMM has gone).
//!
//! A migration's target daemon sends `go` without waiting for `ready` (the source host has
//! released the disks already): the new VMM then takes the disks' locks itself before it
//! runs the guest, and says why instead of `running` when it cannot.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The socket the new VMM listens on, in the run directory.
pub use crate::control::files::TAKEOVER_SOCKET;
/// How long either side waits for the other at each step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const MAGIC: &[u8; 8] = b"KEELHAND";
const VERSION: u32 = 2;
/// magic, version, descriptor count, layout length.
const HEADER_BYTES: usize = 8 + 4 + 4 + 8;
/// Most descriptors a handover carries (the memfd, taps, disks and their backing files).
const MAX_FDS: usize = 253;
/// Largest layout or state accepted.
const MAX_BODY_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the other VMM sent {0}")]
    Protocol(String),
    #[error("the new VMM refused the guest: {0}")]
    Refused(String),
    #[error("the new VMM ended without a word")]
    Ended,
    #[error("encoding the descriptors' layout failed: {0}")]
    Encode(#[source] serde_json::Error),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Which of the descriptors after the memfd are what: the taps, then each disk's files
/// (its image, then its backing chain, nearest first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Layout {
    taps: usize,
    disks: Vec<usize>,
}

/// The old VMM's side of a handover under way: the descriptors are sent and the new VMM
/// has prepared the VM; the guest still runs.
pub struct Outgoing {
    link: UnixStream,
}

/// Connects to the new VMM at `socket`, sends the descriptors and waits for it to prepare.
pub fn offer(
    socket: &Path,
    memfd: RawFd,
    taps: &[RawFd],
    disks: &[Vec<RawFd>],
) -> Result<Outgoing, Error> {
    let layout = serde_json::to_vec(&Layout {
        taps: taps.len(),
        disks: disks.iter().map(Vec::len).collect(),
    })
    .map_err(Error::Encode)?;
    let mut fds = vec![memfd];
    fds.extend_from_slice(taps);
    fds.extend(disks.iter().flatten());
    if fds.len() > MAX_FDS {
        return Err(Error::Protocol(format!(
            "{} descriptors to send",
            fds.len()
        )));
    }
    let link = UnixStream::connect(socket).map_err(io("connecting to the new VMM"))?;
    link.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io("setting a timeout"))?;
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(fds.len() as u32).to_le_bytes());
    header.extend_from_slice(&(layout.len() as u64).to_le_bytes());
    link.send_with_fds(&[&header[..]], &fds)
        .map_err(|e| Error::Io {
            what: "sending the descriptors",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    (&link)
        .write_all(&layout)
        .map_err(io("sending the descriptors' layout"))?;
    let outgoing = Outgoing { link };
    outgoing.expect("prepared")?;
    Ok(outgoing)
}

impl Outgoing {
    fn expect(&self, word: &str) -> Result<(), Error> {
        let mut line = String::new();
        BufReader::new(&self.link)
            .read_line(&mut line)
            .map_err(io("waiting for the new VMM"))?;
        match line.trim_end() {
            w if w == word => Ok(()),
            "" => Err(Error::Refused("it ended without a word".into())),
            other => Err(Error::Refused(other.to_string())),
        }
    }

    /// Sends the paused guest's state, waits for the new VMM to be ready and tells it to
    /// go. On `Ok` the guest is the new VMM's: this process must end without touching the
    /// devices' files or the run directory's sockets.
    pub fn hand_over(self, state: &[u8]) -> Result<(), Error> {
        self.send_state(state)?;
        self.expect("ready")?;
        (&self.link)
            .write_all(b"go\n")
            .map_err(io("telling the new VMM to go"))
    }

    /// Sends the paused guest's state (JSON) and `go` behind it, and waits for the new VMM
    /// to build the guest and run it. On `Ok` its vCPUs run; on an error it did not say so
    /// (the caller ends it).
    pub fn send_state_and_go(self, state: &[u8]) -> Result<(), Error> {
        self.send_state(state)?;
        (&self.link)
            .write_all(b"go\n")
            .map_err(io("telling the new VMM to go"))?;
        // One reader for both words: they may come in one read.
        let mut words = BufReader::new(&self.link);
        for word in ["ready", "running"] {
            let mut line = String::new();
            words
                .read_line(&mut line)
                .map_err(io("waiting for the new VMM to run"))?;
            match line.trim_end() {
                w if w == word => {}
                "" => return Err(Error::Ended),
                other => return Err(Error::Refused(other.to_string())),
            }
        }
        Ok(())
    }

    fn send_state(&self, body: &[u8]) -> Result<(), Error> {
        (&self.link)
            .write_all(&(body.len() as u64).to_le_bytes())
            .and_then(|()| (&self.link).write_all(body))
            .map_err(io("sending the state"))
    }
}

/// The new VMM's side, once it has the descriptors.
pub struct Offered {
    pub memfd: File,
    /// Attached tap descriptors, in the VM's NIC order.
    pub taps: Vec<File>,
    /// Each disk's files (image, then backing chain), in the VM's disk order.
    pub disks: Vec<Vec<File>>,
    link: UnixStream,
}

/// The new VMM's side once it has the guest's state: the link on which it says ready.
pub struct Incoming {
    link: UnixStream,
}

/// The new VMM's side: takes the one connection to `listener` (within `wait`) and reads the
/// descriptors, checking them as the hostile input they may be.
pub fn receive(listener: &UnixListener, wait: Duration) -> Result<Offered, Error> {
    let link = accept_within(listener, wait)?;
    link.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io("setting a timeout"))?;
    let mut header = [0u8; HEADER_BYTES];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which may take any bytes.
    let (read, fd_count) =
        unsafe { link.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| Error::Io {
            what: "receiving the descriptors",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    // Each received descriptor is wrapped once, so they close on every path below.
    let mut files: Vec<File> = fds[..fd_count]
        .iter()
        .map(|&fd| {
            // SAFETY: the first `fd_count` entries are descriptors this process now owns,
            // and nothing else wraps them.
            unsafe { File::from_raw_fd(fd) }
        })
        .collect();
    (&link)
        .read_exact(&mut header[read..])
        .map_err(io("reading the handover's header"))?;
    if &header[..8] != MAGIC {
        return Err(Error::Protocol("no handover header".into()));
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if word(8) != VERSION {
        return Err(Error::Protocol(format!("handover version {}", word(8))));
    }
    if word(12) as usize != files.len() || files.is_empty() {
        return Err(Error::Protocol(format!(
            "{} descriptors where the header says {}",
            files.len(),
            word(12)
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let layout: Layout = serde_json::from_slice(&read_body(&link, u64::from_le_bytes(len))?)
        .map_err(|e| Error::Protocol(format!("a layout that is not one: {e}")))?;
    let described = 1 + layout.taps + layout.disks.iter().sum::<usize>();
    if described != files.len() || layout.disks.contains(&0) {
        return Err(Error::Protocol(format!(
            "{} descriptors laid out as {layout:?}",
            files.len()
        )));
    }
    let memfd = files.remove(0);
    let mut rest = files.into_iter();
    let taps = rest.by_ref().take(layout.taps).collect();
    let disks = layout
        .disks
        .iter()
        .map(|&n| rest.by_ref().take(n).collect())
        .collect();
    Ok(Offered {
        memfd,
        taps,
        disks,
        link,
    })
}

fn read_body(link: &UnixStream, len: u64) -> Result<Vec<u8>, Error> {
    if len > MAX_BODY_BYTES {
        return Err(Error::Protocol(format!("a body of {len} bytes")));
    }
    let mut body = vec![0u8; len as usize];
    let mut reader = link;
    reader
        .read_exact(&mut body)
        .map_err(io("reading from the old VMM"))?;
    Ok(body)
}

impl Offered {
    /// The VM is prepared: tells the old VMM, which pauses the guest and sends its state
    /// (JSON), waited for up to `wait`.
    pub fn prepared(self, wait: Duration) -> Result<(Vec<u8>, Incoming), Error> {
        (&self.link)
            .write_all(b"prepared\n")
            .map_err(io("telling the old VMM we are prepared"))?;
        self.link
            .set_read_timeout(Some(wait))
            .map_err(io("setting a timeout"))?;
        let mut len = [0u8; 8];
        let mut reader = &self.link;
        reader
            .read_exact(&mut len)
            .map_err(io("reading the state's length"))?;
        let body = read_body(&self.link, u64::from_le_bytes(len))?;
        self.link
            .set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(io("setting a timeout"))?;
        Ok((body, Incoming { link: self.link }))
    }
}

impl Incoming {
    /// Says the guest runs here (after `go`): best effort, since an old VMM ends at once.
    pub fn running(&self) {
        let _ = (&self.link).write_all(b"running\n");
    }

    /// Says why the guest will not run here after all (after `go`), on one line: best effort.
    pub fn refuse(&self, why: &str) {
        let line: String = why
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = (&self.link).write_all(format!("{line}\n").as_bytes());
    }

    /// The VM is built (paused): tells the old VMM and waits for its `go`. An error means the
    /// guest stays the old VMM's: this process must end without running it.
    pub fn ready(&self) -> Result<(), Error> {
        (&self.link)
            .write_all(b"ready\n")
            .map_err(io("telling the old VMM we are ready"))?;
        let mut line = String::new();
        BufReader::new(&self.link)
            .read_line(&mut line)
            .map_err(io("waiting for the old VMM's go"))?;
        if line.trim_end() == "go" {
            Ok(())
        } else {
            Err(Error::Protocol(format!("{line:?} instead of go")))
        }
    }
}

fn accept_within(listener: &UnixListener, timeout: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + timeout;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Protocol(format!(
                "nothing: no VMM handed a guest over within {timeout:?}"
            )));
        }
        // SAFETY: polls one live pollfd for at most `left`.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            let (stream, _) = listener.accept().map_err(io("accepting the old VMM"))?;
            return Ok(stream);
        }
    }
}
