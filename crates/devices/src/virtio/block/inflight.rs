//! The requests on the io_uring: a slab of slots indexed by the operation's `user_data`,
//! each holding what finishing the request needs (its head, its status byte, the bytes
//! still to transfer and the iovecs into guest memory the kernel reads), and the order of
//! flushes behind the writes before them.
//!
//! Slots are as many as the queue has entries, so a well-behaved driver can never have more
//! requests in flight than there are slots; only requests orphaned by a reset, or a hostile
//! driver making chains still in flight available again, can fill them, and then the device
//! leaves further chains in the ring until slots free up.
//!
//! A flush waits for the writes before it. virtio asks only that a flush cover the writes
//! the driver saw complete before it sent the flush; holding it until every write submitted
//! before it has completed covers those and the ones still in flight too, and unlike
//! `IOSQE_IO_DRAIN` it holds back no read and no later write while the `fdatasync` runs.
//! Writes are counted per epoch, an epoch ending at each flush; a flush goes to the disk when
//! no write of its epoch or an earlier one is in flight.

use std::collections::VecDeque;

use arch::GuestMemoryMmap;
use vm_memory::GuestAddress;

use super::request::Segment;
use crate::virtio::chain;

/// Host iovecs into guest memory, reused from request to request.
#[derive(Default)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the iovecs point into guest memory, which stays mapped for the VM's life and which
// any thread may access; they are only handed to the kernel by the thread that owns the
// device at the time (the transport is behind a mutex).
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Replaces the iovecs with those of `segments`; false if any part lies outside guest RAM
    /// (the iovecs are then incomplete and must not be used).
    pub fn fill(&mut self, mem: &GuestMemoryMmap, segments: &[Segment]) -> bool {
        self.0.clear();
        for s in segments {
            let Some(iov) = chain::iovec(mem, s) else {
                return false;
            };
            self.0.push(iov);
        }
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free,
    /// A flush waiting for the writes before it.
    Held,
    /// Handed to the io_uring; its completion has not been reaped.
    Submitted,
    /// Submitted before a reset that did not wait for it: its completion is dropped.
    Orphaned,
}

pub struct Slot {
    pub head: u16,
    pub status: GuestAddress,
    pub op: Op,
    /// File offset of the next byte to transfer.
    pub offset: u64,
    /// Bytes still to transfer.
    pub remaining: u64,
    /// Bytes written into guest buffers on success (reads: the data).
    pub written: u32,
    pub iov: IoVecs,
    /// First iovec not yet transferred in full.
    pub start: usize,
    /// Times the operation was retried after EAGAIN or EINTR.
    pub retries: u8,
    pub state: State,
    epoch: u64,
    /// A write counted in the flush order's epoch `epoch`.
    counted: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            head: 0,
            status: GuestAddress(0),
            op: Op::Read,
            offset: 0,
            remaining: 0,
            written: 0,
            iov: IoVecs::default(),
            start: 0,
            retries: 0,
            state: State::Free,
            epoch: 0,
            counted: false,
        }
    }

    /// The iovecs still to transfer.
    pub fn pending_iov(&self) -> &[libc::iovec] {
        self.iov.0.get(self.start..).unwrap_or(&[])
    }

    /// Moves past `n` transferred bytes.
    pub fn advance(&mut self, n: u64) {
        self.offset += n;
        self.remaining = self.remaining.saturating_sub(n);
        disk::advance(&mut self.iov.0, &mut self.start, n as usize);
    }
}

/// Writes in flight per epoch, and the flushes waiting for them.
#[derive(Default)]
struct FlushOrder {
    /// Epoch of `writes[0]`.
    base: u64,
    /// Writes in flight in epochs `base..`; never empty, the last is the current epoch.
    writes: VecDeque<u32>,
    /// Held flushes and the epoch each ends, oldest first.
    flushes: VecDeque<(u64, u16)>,
}

impl FlushOrder {
    fn new() -> Self {
        let mut writes = VecDeque::new();
        writes.push_back(0);
        Self {
            base: 0,
            writes,
            flushes: VecDeque::new(),
        }
    }

    fn current(&self) -> u64 {
        self.base + self.writes.len() as u64 - 1
    }

    fn write_started(&mut self) -> u64 {
        if let Some(n) = self.writes.back_mut() {
            *n += 1;
        }
        self.current()
    }

    fn write_finished(&mut self, epoch: u64) {
        let Some(i) = epoch.checked_sub(self.base) else {
            return;
        };
        if let Some(n) = self.writes.get_mut(i as usize) {
            *n = n.saturating_sub(1);
        }
    }

    fn flush_arrived(&mut self, slot: u16) {
        self.flushes.push_back((self.current(), slot));
        self.writes.push_back(0);
    }

    /// The oldest held flush, if no write before it is in flight.
    fn ready(&mut self) -> Option<u16> {
        while self.writes.len() > 1 && self.writes.front() == Some(&0) {
            self.writes.pop_front();
            self.base += 1;
        }
        match self.flushes.front() {
            Some(&(epoch, slot)) if epoch < self.base => {
                self.flushes.pop_front();
                Some(slot)
            }
            _ => None,
        }
    }
}

pub struct Inflight {
    slots: Vec<Slot>,
    free: Vec<u16>,
    order: FlushOrder,
}

impl Inflight {
    pub fn new(slots: u16) -> Self {
        Self {
            slots: (0..slots).map(|_| Slot::new()).collect(),
            free: (0..slots).rev().collect(),
            order: FlushOrder::new(),
        }
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Every slot is free: no request is held, on the ring, or orphaned.
    pub fn is_idle(&self) -> bool {
        self.free.len() == self.slots.len()
    }

    /// A free slot for a new request, reset but for its iovecs' capacity.
    pub fn take(&mut self) -> Option<u16> {
        let i = self.free.pop()?;
        let slot = &mut self.slots[usize::from(i)];
        slot.start = 0;
        slot.retries = 0;
        slot.remaining = 0;
        slot.written = 0;
        slot.state = State::Submitted;
        Some(i)
    }

    pub fn get(&self, i: u16) -> Option<&Slot> {
        self.slots.get(usize::from(i))
    }

    pub fn get_mut(&mut self, i: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(i))
    }

    /// Slot `i` by an operation's `user_data`, if it names one.
    pub fn index(user_data: u64) -> Option<u16> {
        u16::try_from(user_data).ok()
    }

    /// Frees slot `i`; a write leaves its epoch.
    pub fn release(&mut self, i: u16) {
        let Some(slot) = self.slots.get_mut(usize::from(i)) else {
            return;
        };
        if slot.state == State::Free {
            return;
        }
        if std::mem::take(&mut slot.counted) {
            self.order.write_finished(slot.epoch);
        }
        slot.state = State::Free;
        self.free.push(i);
    }

    /// Slot `i` holds a write about to be submitted.
    pub fn write_started(&mut self, i: u16) {
        let epoch = self.order.write_started();
        if let Some(slot) = self.slots.get_mut(usize::from(i)) {
            slot.epoch = epoch;
            slot.counted = true;
        }
    }

    /// Slot `i` holds a flush, to go when the writes before it have completed.
    pub fn hold_flush(&mut self, i: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(i)) {
            slot.state = State::Held;
            self.order.flush_arrived(i);
        }
    }

    /// A held flush whose writes have all completed, now marked submitted.
    pub fn ready_flush(&mut self) -> Option<u16> {
        let i = self.order.ready()?;
        if let Some(slot) = self.slots.get_mut(usize::from(i)) {
            slot.state = State::Submitted;
        }
        Some(i)
    }

    /// Operations the kernel still has: submitted or orphaned.
    pub fn in_kernel(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Submitted | State::Orphaned))
            .count()
    }

    /// Requests of the guest not answered yet: submitted or held.
    pub fn unanswered(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, State::Submitted | State::Held))
            .count()
    }

    /// A reset: held flushes are freed (they never reached the kernel), and the flush order
    /// starts over: writes still in the kernel no longer hold anything back.
    pub fn drop_held(&mut self) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.counted = false;
            if slot.state == State::Held {
                slot.state = State::Free;
                self.free.push(i as u16);
            }
        }
        self.order = FlushOrder::new();
    }

    /// A reset that stopped waiting: whatever is still submitted is orphaned. Returns how
    /// many.
    pub fn orphan_submitted(&mut self) -> usize {
        let mut n = 0;
        for s in self
            .slots
            .iter_mut()
            .filter(|s| s.state == State::Submitted)
        {
            s.state = State::Orphaned;
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_run_out_and_come_back() {
        let mut f = Inflight::new(2);
        let a = f.take().unwrap();
        let b = f.take().unwrap();
        assert_ne!(a, b);
        assert!(f.is_full() && f.take().is_none());
        assert!(!f.is_idle());
        f.release(a);
        f.release(a);
        assert_eq!(f.take(), Some(a));
        assert!(f.is_full());
        assert_eq!(Inflight::index(1 << 20), None);
        f.release(a);
        f.release(b);
        assert!(f.is_idle(), "a double release must not count a slot twice");
    }

    #[test]
    fn a_flush_waits_for_the_writes_before_it_not_after() {
        let mut f = Inflight::new(8);
        let w1 = f.take().unwrap();
        f.write_started(w1);
        let w2 = f.take().unwrap();
        f.write_started(w2);
        let flush = f.take().unwrap();
        f.hold_flush(flush);
        let w3 = f.take().unwrap();
        f.get_mut(w3).unwrap().op = Op::Write;
        f.write_started(w3);
        for w in [w1, w2] {
            f.get_mut(w).unwrap().op = Op::Write;
        }
        assert_eq!(f.ready_flush(), None);
        f.release(w1);
        assert_eq!(f.ready_flush(), None, "w2 still in flight");
        f.release(w2);
        assert_eq!(f.ready_flush(), Some(flush), "w3 came after the flush");
        assert_eq!(f.get(flush).unwrap().state, State::Submitted);
        assert_eq!(f.ready_flush(), None);
    }

    #[test]
    fn flushes_go_in_order_and_at_once_with_no_write_in_flight() {
        let mut f = Inflight::new(8);
        let f1 = f.take().unwrap();
        f.hold_flush(f1);
        let w = f.take().unwrap();
        f.get_mut(w).unwrap().op = Op::Write;
        f.write_started(w);
        let f2 = f.take().unwrap();
        f.hold_flush(f2);
        assert_eq!(f.ready_flush(), Some(f1));
        assert_eq!(f.ready_flush(), None);
        f.release(w);
        assert_eq!(f.ready_flush(), Some(f2));
    }

    #[test]
    fn reset_frees_held_flushes_and_orphans_the_rest() {
        let mut f = Inflight::new(4);
        let w = f.take().unwrap();
        f.get_mut(w).unwrap().op = Op::Write;
        f.write_started(w);
        let flush = f.take().unwrap();
        f.hold_flush(flush);
        f.drop_held();
        assert_eq!(f.get(flush).unwrap().state, State::Free);
        assert_eq!(f.orphan_submitted(), 1);
        // A flush after the reset does not wait for the orphaned write.
        let flush = f.take().unwrap();
        f.hold_flush(flush);
        assert_eq!(f.ready_flush(), Some(flush));
        f.release(flush);
        assert_eq!(f.in_kernel(), 1);
        f.release(w);
        assert_eq!(f.in_kernel(), 0);
        assert_eq!(f.free.len(), 4);
    }
}
