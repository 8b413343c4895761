//! The streams of one vsock device and the events that move them: one epoll set of its own
//! (the listener, every Unix stream, a deadline timer and a wake-up eventfd) that the VMM's
//! event loop watches as a single edge-triggered source, packets from the guest dispatched to
//! their stream, and packets for the guest handed out a stream at a time.
//!
//! Nothing here grows with what the guest or a host program does beyond fixed limits: at most
//! `MAX_CONNECTIONS` streams and host programs still writing their first line, at most
//! `BUF_ALLOC` bytes of guest data per stream, and at most `MAX_PENDING_RSTS` resets waiting
//! for a receive buffer. Everything else a stream owes the guest is a flag on the stream.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Fill, Verdict};
use super::packet::{self, Header, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::unix::{self, Line, MAX_CONNECT_LINE};
use super::Error;
use crate::virtio::chain;

/// Streams plus host programs still writing their `CONNECT` line.
pub const MAX_CONNECTIONS: usize = 1024;
/// Resets for the guest waiting for a receive buffer; more are dropped (the guest's own
/// timeouts end those streams).
pub const MAX_PENDING_RSTS: usize = 1024;
/// How long a host program has for its `CONNECT` line and the guest for its RESPONSE, and how
/// long a closing stream waits for the other side.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Ports we pick for streams host programs open.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LAST_LOCAL_PORT: u32 = u32::MAX - 1;

/// Tokens in our epoll set; streams get ids from `FIRST_STREAM_ID` on, never reused.
const LISTENER: u64 = 0;
const TIMER: u64 = 1;
const KICK: u64 = 2;
const FIRST_STREAM_ID: u64 = 16;
/// Rounds of draining our epoll set per event before yielding to the event loop.
const MAX_ROUNDS: usize = 16;

/// What the device did, for the operator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub tx_packets: u64,
    /// Transmit chains that were not packets (dropped, used length 0).
    pub tx_malformed: u64,
    /// Packets from a source CID other than the guest's (dropped).
    pub tx_spoofed: u64,
    pub rx_packets: u64,
    /// Receive chains that could not take a packet (returned with used length 0).
    pub rx_bad_buffers: u64,
    pub rsts_dropped: u64,
    /// Host programs turned away at the connection limit.
    pub host_refused: u64,
}

/// A host program that connected and has yet to send its whole `CONNECT` line.
struct HostClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed_for: Option<Instant>,
    kick: EventFd,
    /// Device and inode of the socket file we made, to remove it on drop only if it is still
    /// ours.
    socket_file: Option<(u64, u64)>,
    conns: HashMap<u64, Connection>,
    /// (local port, peer port) to stream id.
    ports: HashMap<(u32, u32), u64>,
    clients: HashMap<u64, HostClient>,
    /// Streams with something for the guest, served in turn.
    rx_list: VecDeque<u64>,
    rsts: VecDeque<Header>,
    next_id: u64,
    next_local_port: u32,
    pub timeout: Duration,
    pub counters: Counters,
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Setup { what, source }
}

impl Muxer {
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, Error> {
        Self::with_listener(guest_cid, path, unix::listen(path)?)
    }

    /// [`Muxer::new`] on a listener bound at `path` already (before the VMM entered its jail,
    /// where it may not be allowed to create it).
    pub fn with_listener(
        guest_cid: u64,
        path: &Path,
        listener: std::os::unix::net::UnixListener,
    ) -> Result<Self, Error> {
        let epoll = Epoll::new().map_err(setup("epoll set"))?;
        let timer = TimerFd::new()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .map_err(setup("timerfd"))?;
        set_nonblocking(timer.as_raw_fd()).map_err(setup("timerfd"))?;
        let kick =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(setup("eventfd"))?;
        let socket_file = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let in_et = EventSet::IN | EventSet::EDGE_TRIGGERED;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER),
            (timer.as_raw_fd(), TIMER),
            (kick.as_raw_fd(), KICK),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(in_et, token))
                .map_err(setup("epoll set"))?;
        }
        Ok(Self {
            guest_cid,
            path: path.to_path_buf(),
            epoll,
            listener,
            timer,
            timer_armed_for: None,
            kick,
            socket_file,
            conns: HashMap::new(),
            ports: HashMap::new(),
            clients: HashMap::new(),
            rx_list: VecDeque::new(),
            rsts: VecDeque::new(),
            next_id: FIRST_STREAM_ID,
            next_local_port: FIRST_LOCAL_PORT,
            timeout: DEFAULT_TIMEOUT,
            counters: Counters::default(),
        })
    }

    /// The one descriptor the event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes our epoll set fire, so the event loop calls back with the receive queue.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// Whether anything waits for a receive buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_list.is_empty()
    }

    /// Open streams (for tests and the operator).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every stream and every waiting host program (the driver reset the device).
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (_, c) in self.clients.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.ports.clear();
        self.rx_list.clear();
        self.rsts.clear();
        self.rearm_timer();
    }

    fn push_rst(&mut self, header: Header) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts.push_back(header);
        } else {
            self.counters.rsts_dropped += 1;
        }
    }

    /// A RST answering `to` (a packet of the guest's), from where it was sent.
    fn rst_reply(&mut self, to: &Header) {
        if to.op == OP_RST {
            return;
        }
        self.push_rst(Header {
            src_cid: to.dst_cid,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    fn schedule(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.scheduled && c.wants_rx() {
                c.scheduled = true;
                self.rx_list.push_back(id);
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Connection> {
        let c = self.conns.remove(&id)?;
        self.ports.remove(&(c.local_port, c.peer_port));
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(c)
    }

    fn apply(&mut self, id: u64, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(id),
            Verdict::Reset => {
                if let Some(mut c) = self.remove(id) {
                    let rst = c.rst_header();
                    self.push_rst(rst);
                }
            }
            Verdict::Close => {
                self.remove(id);
            }
        }
    }

    fn register(&self, stream: &UnixStream, id: u64) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, id),
        )
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ---- Guest to host -----------------------------------------------------------------

    /// Serves the transmit queue: every chain is parsed, acted on and returned (used length
    /// 0, the device writes nothing into transmit buffers).
    pub fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used_any = false;
        while let Some(mut chain) = chain::next_chain(queue, mem)? {
            let head = chain.head_index();
            match packet::parse_tx(mem, &mut chain) {
                Ok(pkt) => {
                    self.counters.tx_packets += 1;
                    self.guest_packet(&pkt.header, pkt.data.as_ref());
                }
                Err(_) => self.counters.tx_malformed += 1,
            }
            queue.add_used(mem, head, 0)?;
            used_any = true;
        }
        self.rearm_timer();
        Ok(used_any)
    }

    fn guest_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        header: &Header,
        data: Option<&vm_memory::VolatileSlice<'_, B>>,
    ) {
        if header.src_cid != self.guest_cid {
            self.counters.tx_spoofed += 1;
            return;
        }
        if header.dst_cid != HOST_CID || header.type_ != TYPE_STREAM {
            self.rst_reply(header);
            return;
        }
        let Some(&id) = self.ports.get(&(header.dst_port, header.src_port)) else {
            if header.op == OP_REQUEST {
                self.guest_connect(header);
            } else {
                self.rst_reply(header);
            }
            return;
        };
        let (now, linger) = (Instant::now(), self.timeout);
        let verdict = match self.conns.get_mut(&id) {
            Some(c) => c.on_guest_packet(header, data, now, linger),
            None => return,
        };
        self.apply(id, verdict);
    }

    /// The guest connects to host port P: we connect to `PATH_P`, or answer RST.
    fn guest_connect(&mut self, request: &Header) {
        if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
            self.rst_reply(request);
            return;
        }
        let path = unix::port_path(&self.path, request.dst_port);
        let Ok(stream) = unix::connect(&path) else {
            self.rst_reply(request);
            return;
        };
        let id = self.new_id();
        if self.register(&stream, id).is_err() {
            self.rst_reply(request);
            return;
        }
        let conn = Connection::guest_initiated(stream, self.guest_cid, request);
        self.ports.insert((conn.local_port, conn.peer_port), id);
        self.conns.insert(id, conn);
        self.schedule(id);
    }

    // ---- Host to guest -----------------------------------------------------------------

    /// Fills receive buffers with what waits for the guest: resets first, then one packet per
    /// stream in turn, until either runs out.
    pub fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error> {
        let mut used_any = false;
        let (now, linger) = (Instant::now(), self.timeout);
        loop {
            // Skip streams that went away while scheduled.
            while let Some(&id) = self.rx_list.front() {
                if self.conns.contains_key(&id) {
                    break;
                }
                self.rx_list.pop_front();
            }
            if !self.has_rx_work() {
                break;
            }
            let Some(mut chain) = chain::next_chain(queue, mem)? else {
                // Wait for the guest to post buffers: it notifies us.
                break;
            };
            let head = chain.head_index();
            let Ok(mut buf) = packet::parse_rx(mem, &mut chain) else {
                // A bad buffer goes back empty; the packet waits for the next one.
                self.counters.rx_bad_buffers += 1;
                queue.add_used(mem, head, 0)?;
                used_any = true;
                continue;
            };
            let len = if let Some(rst) = self.rsts.pop_front() {
                Some(buf.finish(&rst))
            } else if let Some(id) = self.rx_list.pop_front() {
                self.fill(id, &mut buf, now, linger)
            } else {
                None
            };
            match len {
                Some(len) => {
                    self.counters.rx_packets += 1;
                    queue.add_used(mem, head, len)?;
                    used_any = true;
                }
                None => queue.go_to_previous_position(),
            }
        }
        self.rearm_timer();
        Ok(used_any)
    }

    fn fill(
        &mut self,
        id: u64,
        buf: &mut packet::RxBuffer<'_, arch::GuestBitmapSlice<'_>>,
        now: Instant,
        linger: Duration,
    ) -> Option<u32> {
        let c = self.conns.get_mut(&id)?;
        c.scheduled = false;
        match c.fill(buf, now, linger) {
            Fill::Sent(len) => {
                self.schedule(id);
                Some(len)
            }
            Fill::Nothing => None,
            Fill::Reset => {
                let rst = c.rst_header();
                self.remove(id);
                Some(buf.finish(&rst))
            }
        }
    }

    // ---- Host events -------------------------------------------------------------------

    /// Drains our epoll set (edge-triggered: everything that is ready, now).
    pub fn handle_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..MAX_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in events.iter().take(n) {
                self.dispatch(ev.data(), ev.event_set());
            }
            if n < events.len() {
                self.expire(Instant::now());
                return;
            }
        }
        // Still busy: come back after the event loop has served others.
        self.expire(Instant::now());
        self.kick();
    }

    fn dispatch(&mut self, token: u64, events: EventSet) {
        match token {
            LISTENER => self.accept_all(),
            TIMER => {
                // Non-blocking: a timer re-armed since it fired reads as "not yet".
                let _ = self.timer.wait();
                self.timer_armed_for = None;
            }
            KICK => {
                let _ = self.kick.read();
            }
            id if self.clients.contains_key(&id) => self.client_readable(id),
            id => {
                // A half close (RDHUP) is a readable end of file; a hang-up means the
                // program takes no more either.
                let readable = events.intersects(EventSet::IN | EventSet::READ_HANG_UP);
                let hangup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
                let (now, linger) = (Instant::now(), self.timeout);
                let verdict = match self.conns.get_mut(&id) {
                    Some(c) => c.on_host_event(readable, hangup, now, linger),
                    None => return,
                };
                self.apply(id, verdict);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: all taken. Anything else (out of descriptors): the rest wait in
                // the backlog until the next host program connects.
                Err(_) => return,
            };
            if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
                self.counters.host_refused += 1;
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.new_id();
            if self.register(&stream, id).is_err() {
                continue;
            }
            let client = HostClient {
                stream,
                line: Vec::with_capacity(MAX_CONNECT_LINE),
                deadline: Instant::now() + self.timeout,
            };
            self.clients.insert(id, client);
            self.client_readable(id);
        }
    }

    /// Reads a host program's first line, never past its newline (what follows is stream
    /// data for the guest).
    fn client_readable(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let fd = client.stream.as_raw_fd();
        let outcome = loop {
            let room = MAX_CONNECT_LINE.saturating_sub(client.line.len()).max(1);
            let mut peek = [0u8; MAX_CONNECT_LINE];
            let n = match unix::recv(fd, &mut peek[..room], true) {
                Ok(0) => break Line::Malformed,
                Ok(n) => n.min(room),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Line::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Line::Malformed,
            };
            let take = peek[..n]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(n, |i| i + 1);
            let mut got = [0u8; MAX_CONNECT_LINE];
            let k = match unix::recv(fd, &mut got[..take], false) {
                Ok(k) if k > 0 => k.min(take),
                _ => break Line::Malformed,
            };
            client.line.extend_from_slice(&got[..k]);
            match unix::parse_connect_line(&client.line) {
                Line::Incomplete => continue,
                done => break done,
            }
        };
        match outcome {
            Line::Incomplete => {}
            Line::Malformed => self.drop_client(id),
            Line::Connect(port) => self.promote(id, port),
        }
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn local_port_for(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = if port >= LAST_LOCAL_PORT {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            if !self.ports.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    /// A host program asked for guest port `port`: a REQUEST goes to the guest.
    fn promote(&mut self, id: u64, port: u32) {
        let Some(local) = self.local_port_for(port) else {
            self.drop_client(id);
            return;
        };
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        let deadline = Instant::now() + self.timeout;
        let conn = Connection::host_initiated(client.stream, self.guest_cid, local, port, deadline);
        self.ports.insert((local, port), id);
        self.conns.insert(id, conn);
        self.schedule(id);
    }

    // ---- Deadlines ---------------------------------------------------------------------

    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.drop_client(id);
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        // Whatever the stream waited for (a RESPONSE, the guest's RST, a host program
        // reading) did not come: reset it.
        for id in late {
            self.apply(id, Verdict::Reset);
        }
    }

    /// Arms the timer for the earliest deadline (monotonic clock), or disarms it.
    pub fn rearm_timer(&mut self) {
        let earliest = self
            .clients
            .values()
            .map(|c| c.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if earliest == self.timer_armed_for {
            return;
        }
        let armed = match earliest {
            None => self.timer.clear(),
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer.
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
        };
        self.timer_armed_for = if armed.is_ok() { earliest } else { None };
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Muxer {
    /// Removes the listening socket's file if it is still the one this device created.
    pub fn remove_socket_file(&self) {
        let still_ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if still_ours.is_some() && still_ours == self.socket_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.remove_socket_file();
    }
}
