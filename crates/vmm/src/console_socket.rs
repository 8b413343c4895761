//! The serial console of a detached VMM: guest output is appended to the console log (the
//! scrollback, kept across boots) and copied to every client of the console socket; what a
//! client sends goes to the guest's serial input as raw bytes (no escapes).
//!
//! Output is written on the vCPU thread that runs the guest's `out`, so nothing here may
//! block it: clients are written with non-blocking sends, and the bytes a client's socket
//! cannot take right now are dropped for that client (like an overrun serial line: the client
//! stays attached and the log keeps everything). A client whose socket is broken is dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

/// Most console clients at once; more are closed as soon as they are accepted.
pub const MAX_CLIENTS: usize = 32;

/// The clients guest output is copied to, shared by the vCPU threads (writing) and the event
/// loop (attaching and detaching).
#[derive(Default)]
pub struct ConsoleClients(Mutex<Vec<Arc<UnixStream>>>);

impl ConsoleClients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<UnixStream>>> {
        // The list is valid whatever a panicking holder was doing.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, fd: RawFd) {
        self.lock().retain(|c| c.as_raw_fd() != fd);
    }
}

/// Guest serial output: to the log, then to each client, never blocking.
pub struct ConsoleOutput {
    log: CappedLog,
    clients: Arc<ConsoleClients>,
}

impl ConsoleOutput {
    /// `log` must be open for writing (not appending: positioned writes move its newest
    /// part to the start); it is kept at most `log_max` bytes long.
    pub fn new(log: File, log_max: u64, clients: Arc<ConsoleClients>) -> Self {
        Self {
            log: CappedLog::new(log, log_max),
            clients,
        }
    }
}

/// Default most bytes of `console.log`.
pub const DEFAULT_CONSOLE_LOG_MAX: u64 = 8 << 20;

/// A log file that never grows past `max` bytes: when a write would take it past, the
/// newest half of it is moved to its start and the rest cut off, so the oldest output goes
/// first. In place (no second file, no rename): the vCPU thread that writes the serial port
/// does it, under its seccomp filter. Each byte is copied at most once more on average.
pub struct CappedLog {
    file: File,
    max: u64,
    len: u64,
}

impl CappedLog {
    pub fn new(file: File, max: u64) -> Self {
        let len = file.metadata().map_or(0, |m| m.len());
        let mut log = Self {
            file,
            max: max.max(2),
            len,
        };
        // A log left over the cap (by an earlier, larger cap) is cut down now.
        if log.len > log.max {
            log.keep_newest(log.max / 2);
        }
        log
    }

    /// Keeps the last `keep` bytes, moved to the start of the file.
    fn keep_newest(&mut self, keep: u64) {
        use std::os::unix::fs::FileExt;
        let keep = keep.min(self.len);
        let mut tail = vec![0u8; keep as usize];
        let from = self.len - keep;
        let moved = self.file.read_exact_at(&mut tail, from).is_ok()
            && self.file.write_all_at(&tail, 0).is_ok();
        let new_len = if moved { keep } else { 0 };
        if self.file.set_len(new_len).is_ok() {
            self.len = new_len;
        }
    }

    pub fn write(&mut self, buf: &[u8]) {
        let n = buf.len() as u64;
        if n >= self.max {
            // More than the whole log: only its end is kept.
            self.keep_newest(0);
            let start = buf.len() - self.max as usize / 2;
            return self.write(&buf[start..]);
        }
        if self.len + n > self.max {
            self.keep_newest((self.max / 2).saturating_sub(n));
        }
        // A full disk must not stall the guest: what the log cannot take is lost from it.
        use std::os::unix::fs::FileExt;
        if self.file.write_all_at(buf, self.len).is_ok() {
            self.len += n;
        }
    }
}

/// Sends without blocking and without SIGPIPE; returns the bytes taken.
fn send_now(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: sends from a valid slice on a socket this process holds open.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log.write(buf);
        self.clients.lock().retain(|client| {
            let mut rest = buf;
            while !rest.is_empty() {
                match send_now(client, rest) {
                    Ok(0) => return false,
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The socket is full: this client misses these bytes.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    // Broken: stop writing to it; the event loop closes it on its hang-up.
                    Err(_) => return false,
                }
            }
            true
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Takes bytes for the guest's serial input.
pub type SerialInput = Box<dyn FnMut(&[u8]) + Send>;

/// The console socket on the event loop: accepts clients and feeds their bytes to the guest.
pub struct ConsoleServer {
    listener: UnixListener,
    clients: Arc<ConsoleClients>,
    /// The event loop's own handle of each client, by fd: the fd stays open (and so cannot be
    /// reused under the epoll registration) until the loop itself closes it.
    streams: HashMap<RawFd, Arc<UnixStream>>,
    input: SerialInput,
}

impl ConsoleServer {
    /// `input` takes bytes for the guest's serial input.
    pub fn new(
        listener: UnixListener,
        clients: Arc<ConsoleClients>,
        input: SerialInput,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            clients,
            streams: HashMap::new(),
            input,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.streams.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops
                .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                .is_err()
            {
                continue;
            }
            let stream = Arc::new(stream);
            self.streams.insert(stream.as_raw_fd(), stream.clone());
            self.clients.lock().push(stream);
        }
    }

    fn detach(&mut self, fd: RawFd, ops: &mut EventOps) {
        self.clients.remove(fd);
        if let Some(stream) = self.streams.remove(&fd) {
            let _ = ops.remove(Events::empty(&*stream));
        }
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn init(&mut self, ops: &mut EventOps) {
        // Without it the console has no clients; the log and the VM still work.
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            eprintln!("keel: watching the console socket failed: {e}; no console clients");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let Some(stream) = self.streams.get(&fd).cloned() else {
            return;
        };
        let mut buf = [0u8; 4096];
        match (&*stream).read(&mut buf) {
            Ok(0) => self.detach(fd, ops),
            Ok(n) => (self.input)(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.detach(fd, ops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp_log(tag: &str) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("keel-console-{tag}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn a_guest_writing_without_end_never_grows_the_log_past_its_cap() {
        let (path, file) = temp_log("cap");
        let mut log = CappedLog::new(file, 1000);
        let mut written = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i}\n");
            log.write(line.as_bytes());
            written.extend_from_slice(line.as_bytes());
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        }
        let kept = std::fs::read(&path).unwrap();
        // What is kept is the newest output, whole and in order: an end of what was written.
        assert!(kept.len() >= 500, "{}", kept.len());
        assert!(written.ends_with(&kept));
        // One write larger than the cap keeps its own end.
        let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        log.write(&big);
        let kept = std::fs::read(&path).unwrap();
        assert!(kept.len() <= 1000 && big.ends_with(&kept), "{}", kept.len());
        // A log left longer by an earlier, larger cap is cut at once, to its newest part.
        drop(log);
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let _log = CappedLog::new(file, 1000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 500);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn output_goes_to_the_log_and_every_client() {
        let (path, log) = temp_log("fanout");
        let clients = Arc::new(ConsoleClients::default());
        let (a_vmm, mut a) = UnixStream::pair().unwrap();
        let (b_vmm, mut b) = UnixStream::pair().unwrap();
        clients.lock().push(Arc::new(a_vmm));
        clients.lock().push(Arc::new(b_vmm));
        let mut out = ConsoleOutput::new(log, DEFAULT_CONSOLE_LOG_MAX, clients.clone());
        out.write_all(b"hello\n").unwrap();
        let mut got = [0u8; 6];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn client_bytes_reach_the_serial_input_raw_and_clients_detach() {
        use event_manager::{EventManager, SubscriberOps};
        let path =
            std::env::temp_dir().join(format!("keel-console-in-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let clients = Arc::new(ConsoleClients::default());
        let server = ConsoleServer::new(
            listener,
            clients.clone(),
            Box::new(move |bytes: &[u8]| sink.lock().unwrap().extend_from_slice(bytes)),
        )
        .unwrap();
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(server));
        let mut client = UnixStream::connect(&path).unwrap();
        events.run_with_timeout(1000).unwrap();
        assert_eq!(clients.lock().len(), 1, "attached");
        // Ctrl-A x is not an escape here: it goes to the guest like any byte.
        client.write_all(b"ls\r\x01x").unwrap();
        let start = Instant::now();
        while got.lock().unwrap().len() < 5 && start.elapsed() < Duration::from_secs(5) {
            events.run_with_timeout(100).unwrap();
        }
        assert_eq!(&*got.lock().unwrap(), b"ls\r\x01x");
        drop(client);
        events.run_with_timeout(1000).unwrap();
        assert_eq!(clients.lock().len(), 0, "detached on hang-up");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_and_a_dead_one_is_dropped() {
        let (path, log) = temp_log("slow");
        let clients = Arc::new(ConsoleClients::default());
        let (slow_vmm, _slow) = UnixStream::pair().unwrap();
        let (dead_vmm, dead) = UnixStream::pair().unwrap();
        clients.lock().push(Arc::new(slow_vmm));
        clients.lock().push(Arc::new(dead_vmm));
        drop(dead);
        let mut out = ConsoleOutput::new(log, DEFAULT_CONSOLE_LOG_MAX, clients.clone());
        let chunk = vec![b'x'; 64 * 1024];
        let start = Instant::now();
        // Far more than any socket buffer holds.
        for _ in 0..64 {
            out.write_all(&chunk).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "output blocked");
        assert_eq!(clients.lock().len(), 1, "the dead client was dropped");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 64 * 1024);
        let _ = std::fs::remove_file(&path);
    }
}
