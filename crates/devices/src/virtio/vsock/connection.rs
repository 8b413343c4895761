//! One stream between a guest port and a host Unix stream: its state, flow control in both
//! directions (virtio 1.2, section 5.10.6), and shutdown.
//!
//! Credit, host to guest: the guest's last `buf_alloc` and `fwd_cnt` (carried by every packet
//! it sends) against the bytes we sent it (`tx_cnt`) give how much more it can take; we read
//! the Unix stream only that much, straight into a receive buffer, and not at all when the
//! credit is 0 or no buffer is posted, so host data waits in the kernel's socket buffer and
//! the host program's writes block: nothing piles up in the VMM.
//!
//! Credit, guest to host: we advertise `BUF_ALLOC` bytes and count in `fwd_cnt` what reached
//! the Unix stream. Guest data the stream does not take at once waits in `pending`, which the
//! guest's credit bounds to `BUF_ALLOC`; a packet beyond it is a protocol violation and resets
//! the stream. A credit update goes out when the guest's view of our free space falls below
//! half (or when it asks).

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::packet::{
    Header, RxBuffer, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::unix;

/// Receive buffer we advertise per stream: the most guest data we hold for a host program
/// that is not reading.
pub const BUF_ALLOC: u32 = 64 * 1024;

/// Control packets waiting for a receive buffer.
const PENDING_REQUEST: u8 = 1 << 0;
const PENDING_RESPONSE: u8 = 1 << 1;
const PENDING_SHUTDOWN: u8 = 1 << 2;
const PENDING_CREDIT_UPDATE: u8 = 1 << 3;
const PENDING_CREDIT_REQUEST: u8 = 1 << 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host program asked for a guest port; our REQUEST waits for the guest's RESPONSE.
    Connecting,
    Established,
    /// We told the guest we will neither send nor receive; its RST ends the stream.
    Closing,
}

/// What the muxer does with a stream after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send RST to the guest and free the stream.
    Reset,
    /// Free the stream; the guest already knows (it sent RST).
    Close,
}

/// What filling a receive buffer gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A packet of this used length.
    Sent(u32),
    /// Nothing to send after all.
    Nothing,
    /// The host side failed: answer with RST instead.
    Reset,
}

pub struct Connection {
    pub stream: UnixStream,
    pub guest_cid: u64,
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    pub state: State,
    /// When the stream is given up: no RESPONSE, no RST after our shutdown, or guest data a
    /// host program will not read after the guest closed.
    pub deadline: Option<Instant>,
    /// Whether the muxer has this stream in its list of streams with something for the guest.
    pub scheduled: bool,
    pending_ops: u8,
    shutdown_flags: u32,
    /// Guest data not yet written to the Unix stream (at most `BUF_ALLOC` bytes).
    pending: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    /// The Unix stream may have data (edge-triggered: cleared when a read would block).
    host_readable: bool,
    /// The host program will send no more (read returned 0).
    host_eof: bool,
    /// The host program closed its side entirely (hang-up).
    host_hup: bool,
    /// We shut down writing to the Unix stream.
    host_write_shut: bool,
    /// `SHUTDOWN_*` flags the guest sent.
    guest_shut: u32,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state: State::Connecting,
            deadline: None,
            scheduled: false,
            pending_ops: 0,
            shutdown_flags: 0,
            pending: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut: 0,
        }
    }

    /// A host program's stream to guest port `peer_port`: a REQUEST goes out, and the guest
    /// must answer by `deadline`.
    pub fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port);
        c.pending_ops = PENDING_REQUEST;
        c.deadline = Some(deadline);
        c
    }

    /// The guest's REQUEST, which reached a host listener: a RESPONSE goes out.
    pub fn guest_initiated(stream: UnixStream, guest_cid: u64, request: &Header) -> Self {
        let mut c = Self::new(stream, guest_cid, request.dst_port, request.src_port);
        c.state = State::Established;
        c.pending_ops = PENDING_RESPONSE;
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = request.fwd_cnt;
        c.host_readable = true;
        c
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn reads_host(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// Whether filling a receive buffer may give a packet.
    pub fn wants_rx(&self) -> bool {
        self.pending_ops != 0
            || (self.reads_host() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// A packet from the guest for this stream.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        header: &Header,
        data: Option<&VolatileSlice<'_, B>>,
        now: Instant,
        linger: std::time::Duration,
    ) -> Verdict {
        if header.op == OP_RST {
            return Verdict::Close;
        }
        if (header.buf_alloc, header.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        match (self.state, header.op) {
            (_, OP_CREDIT_UPDATE) => Verdict::Keep,
            (_, OP_CREDIT_REQUEST) => {
                self.pending_ops |= PENDING_CREDIT_UPDATE;
                Verdict::Keep
            }
            // After our full shutdown the guest may still be finishing; only its RST counts.
            (State::Closing, _) => Verdict::Keep,
            (State::Connecting, OP_RESPONSE) => self.established(),
            (State::Established, OP_RW) if self.guest_shut & SHUTDOWN_SEND == 0 => match data {
                Some(d) => self.guest_data(d),
                None => Verdict::Keep,
            },
            (State::Established, OP_SHUTDOWN) => {
                self.guest_shut |= header.flags & SHUTDOWN_BOTH;
                self.progress(now, linger)
            }
            // A second REQUEST or RESPONSE, data before the stream is up or after the guest
            // said it would send no more, an unknown operation.
            _ => Verdict::Reset,
        }
    }

    fn established(&mut self) -> Verdict {
        let line = format!("OK {}\n", self.local_port);
        // The stream is new and we have written nothing on it: the line fits in its buffer.
        match unix::send(self.stream.as_raw_fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => {
                self.state = State::Established;
                self.deadline = None;
                self.host_readable = true;
                Verdict::Keep
            }
            _ => Verdict::Reset,
        }
    }

    fn guest_data<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> Verdict {
        let len = data.len();
        if self.pending.len().saturating_add(len) > BUF_ALLOC as usize {
            // The guest sent beyond the credit we gave it.
            return Verdict::Reset;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len as u32);
        let mut sent = 0;
        if self.pending.is_empty() {
            match unix::send_volatile(self.stream.as_raw_fd(), data) {
                Ok(n) => sent = n.min(len),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if sent < len {
            let mut rest = vec![0u8; len - sent];
            let Ok(tail) = data.subslice(sent, len - sent) else {
                return Verdict::Reset;
            };
            tail.copy_to(&mut rest[..]);
            self.pending.extend(rest);
        }
        self.forwarded(sent);
        Verdict::Keep
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let guest_view_used = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_view_free = BUF_ALLOC.saturating_sub(guest_view_used);
        if self.fwd_cnt != self.last_fwd_cnt_sent && guest_view_free < BUF_ALLOC / 2 {
            self.pending_ops |= PENDING_CREDIT_UPDATE;
        }
    }

    /// Writes held guest data to the Unix stream until it would block.
    fn flush(&mut self) -> Verdict {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match unix::send(self.stream.as_raw_fd(), front) {
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(front.len());
                    self.pending.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Verdict::Reset,
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending = VecDeque::new();
        }
        Verdict::Keep
    }

    /// After guest data or a shutdown moved: pass the guest's end of sending on to the host
    /// program, and end the stream once nothing can flow any more.
    fn progress(&mut self, now: Instant, linger: std::time::Duration) -> Verdict {
        if self.flush() == Verdict::Reset {
            return Verdict::Reset;
        }
        let guest_done_sending = self.guest_shut & SHUTDOWN_SEND != 0;
        if guest_done_sending && self.pending.is_empty() && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let drained = self.pending.is_empty();
        if self.guest_shut == SHUTDOWN_BOTH || (guest_done_sending && self.host_eof) {
            if drained {
                // Clean close: the RST answers the guest's shutdown.
                return Verdict::Reset;
            }
            // The host program has yet to read what the guest sent last; give it a while.
            self.deadline.get_or_insert(now + linger);
        }
        Verdict::Keep
    }

    /// The Unix stream is readable, writable or hung up (edge-triggered).
    pub fn on_host_event(
        &mut self,
        readable: bool,
        hangup: bool,
        now: Instant,
        linger: std::time::Duration,
    ) -> Verdict {
        if readable || hangup {
            self.host_readable = true;
        }
        if hangup {
            self.host_hup = true;
        }
        if self.state == State::Closing {
            return Verdict::Keep;
        }
        if self.state == State::Connecting {
            // Before the RESPONSE the host program only waits for "OK"; if it hangs up we
            // find out on the guest's answer or the deadline.
            return Verdict::Keep;
        }
        self.progress(now, linger)
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending_ops &= !PENDING_CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The RST for this stream.
    pub fn rst_header(&mut self) -> Header {
        self.header(OP_RST, 0, 0)
    }

    fn control(
        &mut self,
        bit: u8,
        op: u16,
        flags: u32,
        buf: &mut RxBuffer<'_, impl BitmapSlice>,
    ) -> Fill {
        self.pending_ops &= !bit;
        let header = self.header(op, 0, flags);
        Fill::Sent(buf.finish(&header))
    }

    /// Fills one receive buffer with the stream's most urgent packet.
    pub fn fill<B: BitmapSlice>(
        &mut self,
        buf: &mut RxBuffer<'_, B>,
        now: Instant,
        linger: std::time::Duration,
    ) -> Fill {
        if self.pending_ops & PENDING_REQUEST != 0 {
            return self.control(PENDING_REQUEST, OP_REQUEST, 0, buf);
        }
        if self.pending_ops & PENDING_RESPONSE != 0 {
            return self.control(PENDING_RESPONSE, OP_RESPONSE, 0, buf);
        }
        if self.reads_host() {
            match self.read_host(buf) {
                Some(fill) => return fill,
                None if self.host_eof => {
                    // The host program will send no more; if it hung up it takes no more
                    // either, and the guest's RST closes the stream.
                    self.shutdown_flags =
                        SHUTDOWN_SEND | if self.host_hup { SHUTDOWN_RCV } else { 0 };
                    self.pending_ops |= PENDING_SHUTDOWN;
                }
                None => {}
            }
        }
        if self.pending_ops & PENDING_SHUTDOWN != 0 {
            let flags = self.shutdown_flags;
            if flags == SHUTDOWN_BOTH {
                self.state = State::Closing;
                self.deadline = Some(now + linger);
            }
            return self.control(PENDING_SHUTDOWN, OP_SHUTDOWN, flags, buf);
        }
        if self.pending_ops & PENDING_CREDIT_UPDATE != 0 {
            return self.control(PENDING_CREDIT_UPDATE, OP_CREDIT_UPDATE, 0, buf);
        }
        if self.pending_ops & PENDING_CREDIT_REQUEST != 0 {
            return self.control(PENDING_CREDIT_REQUEST, OP_CREDIT_REQUEST, 0, buf);
        }
        Fill::Nothing
    }

    /// Reads host data into the buffer, as much as credit and room allow. None: no packet
    /// (the stream would block, is at its end, or the guest has no credit).
    fn read_host<B: BitmapSlice>(&mut self, buf: &mut RxBuffer<'_, B>) -> Option<Fill> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            // Whether the host program sent more or ended, without taking its bytes.
            let mut probe = [0u8; 1];
            match unix::recv(self.stream.as_raw_fd(), &mut probe, true) {
                Ok(0) => self.host_eof = true,
                Ok(_) if !self.credit_requested => {
                    self.credit_requested = true;
                    self.pending_ops |= PENDING_CREDIT_REQUEST;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                Err(_) => return Some(Fill::Reset),
            }
            return None;
        }
        let want = credit.min(buf.data_capacity());
        let mut dst = buf.data(want)?;
        match (&self.stream).read_volatile(&mut dst) {
            Ok(0) => {
                self.host_eof = true;
                None
            }
            Ok(n) => {
                let n = n.min(want) as u32;
                self.tx_cnt = self.tx_cnt.wrapping_add(n);
                let header = self.header(OP_RW, n, 0);
                Some(Fill::Sent(buf.finish(&header)))
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(_) => Some(Fill::Reset),
        }
    }
}
