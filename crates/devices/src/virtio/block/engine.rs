//! How the device serves requests: popping and parsing chains, executing them synchronously
//! or starting them on the io_uring, and finishing them from its completions.

use std::io;
use std::time::Instant;

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::errors::ExecuteError;
use super::inflight::{Inflight, Op, State};
use super::request::{
    parse_into, status_descriptor, ParseError, Parsed, RequestKind, SECTOR_SHIFT, SEGMENT_BYTES,
};
use super::{
    Block, BlockStats, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS,
    SYNC_BUDGET_PER_TURN, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    WRITE_ZEROES_FLAG_UNMAP,
};
use crate::virtio::chain;
use crate::virtio::device::DeviceError;

/// Times an operation is retried after EAGAIN or EINTR before the request fails.
const MAX_RETRIES: u8 = 8;
/// Rounds of reaping in one call: completions keep coming while short transfers are
/// resubmitted; the rest waits for the next event.
const MAX_REAP_ROUNDS: usize = 4;

/// What became of a request the device looked at.
enum Start {
    /// On the io_uring (or held behind writes): it finishes from a completion.
    Queued,
    /// Finished: the status byte and the bytes written into guest buffers.
    Done(u8, u32),
}

/// A request finished from a completion: what to tell the driver.
struct Finished {
    head: u16,
    status_addr: GuestAddress,
    status: u8,
    written: u32,
}

/// Writes the status byte, when there is one, and puts the chain in the used ring.
fn finish(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    status: u8,
    written: u32,
    status_addr: Option<GuestAddress>,
) -> Result<(), DeviceError> {
    let mut used_len = written;
    if let Some(addr) = status_addr {
        if mem.write_obj(status, addr).is_ok() {
            used_len += 1;
        }
    }
    queue
        .add_used(mem, head, used_len)
        .map_err(|e| DeviceError::queue(index, e))
}

/// Where the status byte of a chain that failed to parse goes: the last writable byte, when
/// there is one (it may be at u64::MAX: add len - 1, never len first).
fn error_status_addr(descs: &[chain::Descriptor], e: &ParseError) -> Option<GuestAddress> {
    if !e.has_status() {
        return None;
    }
    status_descriptor(descs)
        .and_then(|(_, d)| d.addr.checked_add(u64::from(d.len) - 1))
        .map(GuestAddress)
}

/// Hands slot `i`'s operation (what is left of it) to the ring.
fn push(ring: &mut disk::uring::Uring, inflight: &mut Inflight, i: u16) -> io::Result<()> {
    let Some(slot) = inflight.get_mut(i) else {
        return Err(io::Error::other("no such slot"));
    };
    slot.state = State::Submitted;
    let user_data = u64::from(i);
    match slot.op {
        // SAFETY: the iovecs live in the slot, which is neither freed nor changed until this
        // operation's completion is reaped (a reset that stops waiting orphans the slot and
        // keeps it); they point into guest memory, mapped for the VM's life.
        Op::Read => unsafe { ring.readv(slot.pending_iov(), slot.offset, user_data) },
        // SAFETY: as for the read.
        Op::Write => unsafe { ring.writev(slot.pending_iov(), slot.offset, user_data) },
        Op::Flush => ring.fdatasync(user_data),
    }
}

/// What an operation is called in error messages.
fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "fdatasync",
    }
}

impl Block {
    /// Records a failed request (counted, logged at a limited rate; a failed fdatasync makes
    /// every later flush fail); returns the status to answer it with.
    fn fail(&mut self, e: ExecuteError) -> u8 {
        if matches!(
            e,
            ExecuteError::Io {
                op: "fdatasync",
                ..
            }
        ) {
            self.flush_failed = true;
        }
        BlockStats::add(&self.stats.failed, 1);
        let end = self
            .serial
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.serial.len());
        let name = String::from_utf8_lossy(&self.serial[..end]).into_owned();
        self.errors.record(&name, &e)
    }

    fn capacity(&self) -> u64 {
        self.disk.size() >> SECTOR_SHIFT
    }

    /// Checks that `len` bytes from `sector` lie on the disk.
    fn in_range(&self, sector: u64, len: u64) -> bool {
        let sectors = len.div_ceil(1 << SECTOR_SHIFT);
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.capacity())
    }

    /// Pops, parses and starts requests until the ring is empty, the rate limiter says wait,
    /// or no slot is free.
    pub(super) fn serve(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        self.sync_bytes = 0;
        loop {
            if self.sync_bytes >= SYNC_BUDGET_PER_TURN {
                // This turn's share is spent: the rest waits for the next turn.
                if let Some(resume) = &self.resume {
                    if resume.write(1).is_ok() {
                        BlockStats::add(&self.stats.yielded, 1);
                        break;
                    }
                }
            }
            if self.ring.is_some() && self.inflight.is_full() {
                // A driver has at most a queue's worth of chains out, so only orphans of a
                // reset, or a driver that makes chains still in flight available again, fill
                // the slots: the chains wait in the ring until completions free some.
                self.held_back = true;
                if queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
                {
                    BlockStats::add(&self.stats.held_back, 1);
                }
                break;
            }
            let Some(head) = chain::pop_into(queue, mem, index, &mut self.scratch.descs)? else {
                break;
            };
            let (status, written, status_addr) =
                match parse_into(&self.scratch.descs, mem, &mut self.scratch.segments) {
                    Ok(req) if !self.limiter.consume(req.data_len, 1) => {
                        // Over the limit: the request waits in the ring until the timer fires.
                        BlockStats::add(&self.stats.throttled, 1);
                        queue.go_to_previous_position();
                        break;
                    }
                    Ok(req) => match self.counted_start(head, &req, mem) {
                        Start::Queued => continue,
                        Start::Done(status, written) => (status, written, Some(req.status)),
                    },
                    Err(e) => {
                        let addr = error_status_addr(&self.scratch.descs, &e);
                        (self.fail(e.into()), 0, addr)
                    }
                };
            finish(index, queue, mem, head, status, written, status_addr)?;
            used = true;
        }
        used |= self.answer_failed(index, queue, mem)?;
        Ok(used)
    }

    /// Counts `req` for the operator's metrics, then [`Self::start`]s it.
    fn counted_start(&mut self, head: u16, req: &Parsed, mem: &GuestMemoryMmap) -> Start {
        self.stats.taken(&req.kind, req.data_len);
        self.start(head, req, mem)
    }

    /// Executes `req` or starts it on the ring.
    fn start(&mut self, head: u16, req: &Parsed, mem: &GuestMemoryMmap) -> Start {
        match &req.kind {
            RequestKind::Read | RequestKind::Write => {
                let write = req.kind == RequestKind::Write;
                if write && self.disk.read_only() {
                    return Start::Done(self.fail(ExecuteError::ReadOnly), 0);
                }
                if !self.in_range(req.sector, req.data_len) {
                    let e = ExecuteError::OutOfRange {
                        sector: req.sector,
                        len: req.data_len,
                    };
                    return Start::Done(self.fail(e), 0);
                }
                if req.data_len == 0 {
                    return Start::Done(VIRTIO_BLK_S_OK, 0);
                }
                if self.ring.is_some() {
                    return self.start_transfer(head, req, mem);
                }
                let offset = req.sector << SECTOR_SHIFT;
                self.sync_bytes += req.data_len;
                let iov = &mut self.scratch.iov;
                if !iov.fill(mem, &self.scratch.segments) {
                    return Start::Done(self.fail(ExecuteError::Buffers), 0);
                }
                if !self.disk.fits(&iov.0, offset) {
                    // RawDisk carries it through its bounce buffer.
                    BlockStats::add(&self.stats.bounced, 1);
                }
                let result = if write {
                    self.disk.write_at(&iov.0, offset)
                } else {
                    self.disk.read_at(&iov.0, offset)
                };
                let op = if write { "write" } else { "read" };
                match result {
                    Ok(()) if write => Start::Done(VIRTIO_BLK_S_OK, 0),
                    Ok(()) => Start::Done(VIRTIO_BLK_S_OK, req.data_len as u32),
                    Err(source) => Start::Done(self.fail(ExecuteError::Io { op, source }), 0),
                }
            }
            RequestKind::Flush => {
                if self.flush_failed {
                    return Start::Done(self.fail(ExecuteError::FlushFailedBefore), 0);
                }
                if self.ring.is_some() {
                    return self.start_flush(head, req);
                }
                match self.disk.flush() {
                    Ok(()) => Start::Done(VIRTIO_BLK_S_OK, 0),
                    Err(source) => {
                        let e = ExecuteError::Io {
                            op: "fdatasync",
                            source,
                        };
                        Start::Done(self.fail(e), 0)
                    }
                }
            }
            RequestKind::GetId => {
                let mut written = 0u32;
                let mut id = &self.serial[..];
                for seg in &self.scratch.segments {
                    let n = id.len().min(seg.len as usize);
                    if mem.write_slice(&id[..n], seg.addr).is_err() {
                        return Start::Done(self.fail(ExecuteError::Buffers), written);
                    }
                    written += n as u32;
                    id = &id[n..];
                }
                Start::Done(VIRTIO_BLK_S_OK, written)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.disk.read_only() {
                    return Start::Done(self.fail(ExecuteError::ReadOnly), 0);
                }
                match self.discard_or_zero(req, mem) {
                    Ok(by_hand) => {
                        self.sync_bytes += by_hand;
                        Start::Done(VIRTIO_BLK_S_OK, 0)
                    }
                    Err(e) => Start::Done(self.fail(e), 0),
                }
            }
            RequestKind::Unsupported(_) => Start::Done(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// A read or write with the hybrid engine: a read the page cache holds in full completes
    /// here; anything else goes on the ring (for a read, the bytes not yet read).
    fn start_transfer(&mut self, head: u16, req: &Parsed, mem: &GuestMemoryMmap) -> Start {
        let Some(i) = self.inflight.take() else {
            return Start::Done(self.fail(ExecuteError::NoSlot), 0);
        };
        let write = req.kind == RequestKind::Write;
        let Some(slot) = self.inflight.get_mut(i) else {
            return Start::Done(self.fail(ExecuteError::NoSlot), 0);
        };
        slot.head = head;
        slot.status = req.status;
        slot.op = if write { Op::Write } else { Op::Read };
        slot.offset = req.sector << SECTOR_SHIFT;
        slot.remaining = req.data_len;
        slot.written = if write { 0 } else { req.data_len as u32 };
        if !slot.iov.fill(mem, &self.scratch.segments) {
            self.inflight.release(i);
            return Start::Done(self.fail(ExecuteError::Buffers), 0);
        }
        if !self.disk.fits(slot.pending_iov(), slot.offset) {
            // Direct I/O, and guest buffers it cannot take: served here through a bounce
            // buffer (see the module documentation for why this keeps the flush order).
            BlockStats::add(&self.stats.bounced, 1);
            self.sync_bytes += slot.remaining;
            let result = self.disk.bounced(slot.pending_iov(), slot.offset, write);
            self.inflight.release(i);
            let op = if write { "write" } else { "read" };
            return match result {
                Ok(()) if write => Start::Done(VIRTIO_BLK_S_OK, 0),
                Ok(()) => Start::Done(VIRTIO_BLK_S_OK, req.data_len as u32),
                Err(source) => Start::Done(self.fail(ExecuteError::Io { op, source }), 0),
            };
        }
        if write {
            self.inflight.write_started(i);
            BlockStats::add(&self.stats.writes_ring, 1);
        } else {
            if self.nowait {
                match self.disk.read_nowait(slot.pending_iov(), slot.offset) {
                    Ok(n) if n as u64 >= slot.remaining => {
                        self.inflight.release(i);
                        BlockStats::add(&self.stats.reads_inline, 1);
                        return Start::Done(VIRTIO_BLK_S_OK, req.data_len as u32);
                    }
                    // Part was cached: the ring reads the rest.
                    Ok(n) => {
                        if n > 0 {
                            BlockStats::add(&self.stats.reads_partly_inline, 1);
                        }
                        slot.advance(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.nowait = false,
                    // Anything else: the ring's read says what it is.
                    Err(_) => {}
                }
            }
            BlockStats::add(&self.stats.reads_ring, 1);
        }
        self.push_or_fail(i)
    }

    /// A flush with the hybrid engine: held until the writes before it have completed.
    fn start_flush(&mut self, head: u16, req: &Parsed) -> Start {
        let Some(i) = self.inflight.take() else {
            return Start::Done(self.fail(ExecuteError::NoSlot), 0);
        };
        if let Some(slot) = self.inflight.get_mut(i) {
            slot.head = head;
            slot.status = req.status;
            slot.op = Op::Flush;
        }
        self.inflight.hold_flush(i);
        // With no write in flight it goes at once (the caller submits it); if the ring
        // refuses it, the caller answers it from the failed list.
        self.release_flushes();
        if self.inflight.get(i).is_some_and(|s| s.state == State::Held) {
            BlockStats::add(&self.stats.flushes_waited, 1);
        }
        Start::Queued
    }

    /// Queues slot `i` on the ring; if even that fails, frees it and answers IOERR.
    fn push_or_fail(&mut self, i: u16) -> Start {
        let Some(ring) = self.ring.as_mut() else {
            self.inflight.release(i);
            let e = ExecuteError::Ring(io::Error::other("the device has no io_uring"));
            return Start::Done(self.fail(e), 0);
        };
        match push(ring, &mut self.inflight, i) {
            Ok(()) => Start::Queued,
            Err(e) => {
                self.inflight.release(i);
                Start::Done(self.fail(ExecuteError::Ring(e)), 0)
            }
        }
    }

    /// Queues every held flush whose writes have completed. A flush the ring refuses is
    /// freed and put on the failed list, to be answered IOERR.
    fn release_flushes(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut refused = Vec::new();
        while let Some(i) = self.inflight.ready_flush() {
            BlockStats::add(&self.stats.flushes_ring, 1);
            if let Err(e) = push(ring, &mut self.inflight, i) {
                if let Some(slot) = self.inflight.get(i) {
                    self.scratch.failed.push((slot.head, slot.status));
                }
                self.inflight.release(i);
                refused.push(e);
            }
        }
        for e in refused {
            self.fail(ExecuteError::Ring(e));
        }
    }

    /// Answers IOERR to the flushes the ring refused.
    fn answer_failed(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut first_error = None;
        for (head, addr) in self.scratch.failed.drain(..) {
            let r = finish(index, queue, mem, head, VIRTIO_BLK_S_IOERR, 0, Some(addr));
            used |= r.is_ok();
            first_error = first_error.or(r.err());
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(used),
        }
    }

    /// Hands what is queued to the kernel. On failure the operations stay queued and go with
    /// the next submission, which the next completion or notification makes.
    pub(super) fn submit(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if ring.unsubmitted() > 0 {
                let _ = ring.submit();
            }
        }
    }

    /// Reaps completions and finishes their requests; true if any went in the used ring.
    pub(super) fn complete(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        // With every slot free nothing is in the kernel (an orphan keeps its slot until its
        // completion is reaped), so there is nothing to reap: reads the page cache served
        // inline, the common case, skip the completion queue.
        if self.inflight.is_idle() && self.scratch.failed.is_empty() {
            return Ok(false);
        }
        let mut used = false;
        let mut first_error = None;
        for _ in 0..MAX_REAP_ROUNDS {
            let Some(ring) = self.ring.as_mut() else {
                return Ok(false);
            };
            let mut reaped = std::mem::take(&mut self.scratch.reaped);
            reaped.clear();
            ring.reap(&mut reaped);
            if reaped.is_empty() {
                self.scratch.reaped = reaped;
                break;
            }
            for &(user_data, result) in &reaped {
                self.mark_read_done(user_data, mem);
                if let Some(f) = self.on_completion(user_data, result) {
                    let r = finish(
                        index,
                        queue,
                        mem,
                        f.head,
                        f.status,
                        f.written,
                        Some(f.status_addr),
                    );
                    used |= r.is_ok();
                    first_error = first_error.or(r.err());
                }
            }
            self.scratch.reaped = reaped;
            // Writes that completed may let flushes go.
            self.release_flushes();
            match self.answer_failed(index, queue, mem) {
                Ok(u) => used |= u,
                Err(e) => first_error = first_error.or(Some(e)),
            }
            self.submit();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(used),
        }
    }

    /// The kernel wrote a read's buffers out of vm-memory's sight: they are marked for a
    /// live migration (see [`chain::mark_written`]), whatever the result.
    fn mark_read_done(&self, user_data: u64, mem: &GuestMemoryMmap) {
        let slot = Inflight::index(user_data).and_then(|i| self.inflight.get(i));
        if let Some(slot) = slot.filter(|s| s.op == Op::Read) {
            chain::mark_written(mem, &slot.iov.0);
        }
    }

    /// One completion: the request it finishes, if it does (a short transfer is submitted
    /// again for the rest; an orphan's completion is dropped).
    fn on_completion(&mut self, user_data: u64, result: i32) -> Option<Finished> {
        let i = Inflight::index(user_data)?;
        let slot = self.inflight.get_mut(i)?;
        match slot.state {
            State::Submitted => {}
            State::Orphaned => {
                self.inflight.release(i);
                return None;
            }
            State::Free | State::Held => return None,
        }
        let ok = match (slot.op, result) {
            (Op::Flush, r) => r == 0,
            (_, r) if r > 0 && r as u64 >= slot.remaining => true,
            (_, r) if r > 0 => {
                // Short: the rest goes on the ring.
                slot.advance(r as u64);
                slot.retries = 0;
                return self.resubmit(i);
            }
            (_, r) if (r == -libc::EAGAIN || r == -libc::EINTR) && slot.retries < MAX_RETRIES => {
                slot.retries += 1;
                return self.resubmit(i);
            }
            // Direct I/O that the file system would not take as it was, though its buffers
            // met the alignment statx gave: the rest goes through the bounce buffer, here.
            (op, r) if r == -libc::EINVAL && self.disk.direct().is_some() => {
                BlockStats::add(&self.stats.bounced, 1);
                self.disk
                    .bounced(slot.pending_iov(), slot.offset, op == Op::Write)
                    .is_ok()
            }
            // No progress (the end of the file) or an error.
            _ => false,
        };
        let mut finished = Finished {
            head: slot.head,
            status_addr: slot.status,
            status: VIRTIO_BLK_S_OK,
            written: if ok { slot.written } else { 0 },
        };
        let op = slot.op;
        self.inflight.release(i);
        if !ok {
            finished.status = self.fail(ExecuteError::from_completion(op_name(op), result));
        }
        Some(finished)
    }

    fn resubmit(&mut self, i: u16) -> Option<Finished> {
        BlockStats::add(&self.stats.resubmits, 1);
        match self.push_or_fail(i) {
            Start::Queued => None,
            Start::Done(status, written) => {
                // push_or_fail freed the slot; its head and status address are still there.
                let slot = self.inflight.get(i)?;
                Some(Finished {
                    head: slot.head,
                    status_addr: slot.status,
                    status,
                    written,
                })
            }
        }
    }

    /// Waits at most `wait` for the kernel to finish every operation, dropping their
    /// completions; orphans what is left. Held flushes are dropped at once.
    /// The VM is pausing: every request in the kernel completes and is answered in the used
    /// ring (held flushes go as their writes finish); chains not yet taken stay in the ring.
    /// Returns whether anything went in the used ring; fails if requests are still in flight
    /// after `wait` (they complete later, as usual).
    pub(super) fn settle(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        wait: std::time::Duration,
    ) -> Result<bool, DeviceError> {
        let deadline = Instant::now() + wait;
        let mut used = false;
        loop {
            self.release_flushes();
            self.submit();
            used |= self.complete(0, queue, mem)?;
            let Some(ring) = self.ring.as_ref() else {
                return Ok(used);
            };
            // Orphans of a reset are no request of the guest's any more: not waited for.
            let left = self.inflight.unanswered();
            if left == 0 && self.scratch.failed.is_empty() {
                return Ok(used);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DeviceError::Settle(format!(
                    "{left} disk requests still in flight after {wait:?}"
                )));
            }
            ring.wait(remaining);
        }
    }

    pub(super) fn quiesce(&mut self, wait: std::time::Duration) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        // Held flushes never reached the kernel; the flush order starts over.
        self.inflight.drop_held();
        let _ = ring.submit();
        let deadline = Instant::now() + wait;
        let mut reaped = std::mem::take(&mut self.scratch.reaped);
        loop {
            ring.clear_eventfd();
            reaped.clear();
            ring.reap(&mut reaped);
            for &(user_data, _) in &reaped {
                if let Some(i) = Inflight::index(user_data) {
                    self.inflight.release(i);
                }
            }
            if self.inflight.in_kernel() == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let n = self.inflight.orphan_submitted();
                BlockStats::add(&self.stats.orphaned, n as u64);
                break;
            }
            ring.wait(left);
        }
        self.scratch.reaped = reaped;
    }

    /// Returns the bytes of zeroes written by hand (the file system could not zero the range).
    fn discard_or_zero(&self, req: &Parsed, mem: &GuestMemoryMmap) -> Result<u64, ExecuteError> {
        if req.data_len != SEGMENT_BYTES as u64 * u64::from(MAX_DISCARD_SEGMENTS) {
            return Err(ExecuteError::Unsupported("more than one discard segment"));
        }
        let mut seg = [0u8; SEGMENT_BYTES];
        let mut filled = 0;
        for s in &self.scratch.segments {
            let take = (SEGMENT_BYTES - filled).min(s.len as usize);
            if mem
                .read_slice(&mut seg[filled..filled + take], s.addr)
                .is_err()
            {
                return Err(ExecuteError::Buffers);
            }
            filled += take;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let len = u64::from(sectors) << SECTOR_SHIFT;
        let max = if req.kind == RequestKind::Discard {
            MAX_DISCARD_SECTORS
        } else {
            MAX_WRITE_ZEROES_SECTORS
        };
        if sectors > max || !self.in_range(sector, len) {
            return Err(ExecuteError::OutOfRange { sector, len });
        }
        let offset = sector << SECTOR_SHIFT;
        let result = if req.kind == RequestKind::Discard {
            // Unknown flags in a discard segment are an error per the spec.
            if flags != 0 {
                return Err(ExecuteError::Unsupported("discard flags"));
            }
            self.disk.discard(offset, len).map(|()| 0)
        } else {
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err(ExecuteError::Unsupported("write-zeroes flags"));
            }
            self.disk
                .write_zeroes(offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0)
        };
        let op = if req.kind == RequestKind::Discard {
            "discard"
        } else {
            "write-zeroes"
        };
        result.map_err(|source| ExecuteError::Io { op, source })
    }
}
