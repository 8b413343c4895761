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
    log: File,
    clients: Arc<ConsoleClients>,
}

impl ConsoleOutput {
    /// `log` must be open for appending.
    pub fn new(log: File, clients: Arc<ConsoleClients>) -> Self {
        Self { log, clients }
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
        // A full disk must not stall the guest: what the log cannot take is lost from it.
        let _ = self.log.write_all(buf);
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
            .append(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn output_goes_to_the_log_and_every_client() {
        let (path, log) = temp_log("fanout");
        let clients = Arc::new(ConsoleClients::default());
        let (a_vmm, mut a) = UnixStream::pair().unwrap();
        let (b_vmm, mut b) = UnixStream::pair().unwrap();
        clients.lock().push(Arc::new(a_vmm));
        clients.lock().push(Arc::new(b_vmm));
        let mut out = ConsoleOutput::new(log, clients.clone());
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
        let mut out = ConsoleOutput::new(log, clients.clone());
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
