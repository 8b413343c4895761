//! A host-side virtio driver for Keel's own device code: it brings a device up through the
//! transport's registers, as a guest driver would, places descriptor chains and rings in
//! guest memory, and reads back the used ring. Unit tests, fuzz targets and the in-process
//! device benchmark drive the real device code through it.

use std::sync::Arc;

use arch::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{VirtioDevice, VIRTIO_F_VERSION_1};
use super::mmio::*;

/// Guest memory layout of the harness: rings per queue, then a data area.
const RINGS_START: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1_0000;
pub const DATA_START: u64 = 0x10_0000;

/// One descriptor to place: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub struct Driver {
    pub transport: MmioTransport,
    pub mem: GuestMemoryMmap,
    pub irq: EventFd,
    queue_size: u16,
    next_avail: Vec<u16>,
    next_used: Vec<u16>,
    next_desc: Vec<u16>,
}

/// Where queue `q`'s descriptor table, avail ring and used ring lie, for a test that plays
/// the guest from another thread.
pub fn ring_addresses(q: usize) -> (u64, u64, u64) {
    (desc_table(q), avail_ring(q), used_ring(q))
}

fn desc_table(queue: usize) -> u64 {
    RINGS_START + queue as u64 * RING_STRIDE
}

fn avail_ring(queue: usize) -> u64 {
    desc_table(queue) + 0x4000
}

fn used_ring(queue: usize) -> u64 {
    desc_table(queue) + 0x8000
}

impl Driver {
    /// A device on a transport over `mem_size` bytes of memory (at least 2 MiB).
    pub fn new(device: Box<dyn VirtioDevice>, mem_size: usize) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).expect("harness memory");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("harness eventfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("harness eventfd")));
        let queues = device.queue_max_sizes().len();
        let transport =
            MmioTransport::new(device, mem.clone(), interrupt).expect("harness transport");
        Self {
            transport,
            mem,
            irq,
            queue_size: 0,
            next_avail: vec![0; queues],
            next_used: vec![0; queues],
            next_desc: vec![0; queues],
        }
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write_reg(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(REG_DEVICE_FEATURES);
        self.write_reg(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read_reg(REG_DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Negotiates `features` (VERSION_1 is added) and sets up every queue with `queue_size`
    /// entries; returns the status register at the end.
    pub fn init(&mut self, features: u64, queue_size: u16) -> u32 {
        let features = features | VIRTIO_F_VERSION_1;
        self.write_reg(REG_STATUS, 0);
        self.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        self.write_reg(REG_DRIVER_FEATURES, features as u32);
        self.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        self.write_reg(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let negotiated = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write_reg(REG_STATUS, negotiated);
        if self.read_reg(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return self.read_reg(REG_STATUS);
        }
        self.queue_size = queue_size;
        for q in 0..self.next_avail.len() {
            (self.next_avail[q], self.next_used[q], self.next_desc[q]) = (0, 0, 0);
            for ring in [avail_ring(q), used_ring(q)] {
                self.mem
                    .write_obj(0u32, GuestAddress(ring))
                    .expect("ring header");
            }
            self.setup_queue(q, queue_size, desc_table(q), avail_ring(q), used_ring(q));
        }
        self.write_reg(REG_STATUS, negotiated | STATUS_DRIVER_OK);
        self.read_reg(REG_STATUS)
    }

    /// Programs queue `q` with the given ring addresses (which a test may make hostile).
    pub fn setup_queue(&mut self, q: usize, size: u16, desc: u64, avail: u64, used: u64) {
        self.write_reg(REG_QUEUE_SEL, q as u32);
        self.write_reg(REG_QUEUE_NUM, u32::from(size));
        for (low, value) in [
            (REG_QUEUE_DESC_LOW, desc),
            (REG_QUEUE_DRIVER_LOW, avail),
            (REG_QUEUE_DEVICE_LOW, used),
        ] {
            self.write_reg(low, value as u32);
            self.write_reg(low + 4, (value >> 32) as u32);
        }
        self.write_reg(REG_QUEUE_READY, 1);
    }

    /// Writes descriptors `buffers` as one chain into queue `q` and makes it available.
    /// Returns the head index.
    pub fn submit(&mut self, q: usize, buffers: &[Buffer]) -> u16 {
        let size = self.queue_size.max(1);
        let head = self.next_desc[q] % size;
        for (i, b) in buffers.iter().enumerate() {
            let index = (head + i as u16) % size;
            let next = (index + 1) % size;
            let more = i + 1 < buffers.len();
            let flags: u16 = if more { 1 } else { 0 } | if b.writable { 2 } else { 0 };
            self.write_desc(q, index, b.addr, b.len, flags, next);
        }
        self.next_desc[q] = self.next_desc[q].wrapping_add(buffers.len() as u16);
        self.make_available(q, head);
        head
    }

    /// Writes one raw descriptor (a test may make it hostile).
    pub fn write_desc(&mut self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = desc_table(q) + u64::from(index) * 16;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor in harness memory");
    }

    /// Puts `head` in the avail ring and publishes the new index.
    pub fn make_available(&mut self, q: usize, head: u16) {
        let size = self.queue_size.max(1);
        let slot = self.next_avail[q] % size;
        let ring = avail_ring(q);
        self.mem
            .write_obj(head, GuestAddress(ring + 4 + u64::from(slot) * 2))
            .expect("avail ring");
        self.next_avail[q] = self.next_avail[q].wrapping_add(1);
        self.set_avail_idx(q, self.next_avail[q]);
    }

    /// Sets the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT = 1).
    pub fn set_avail_flags(&mut self, q: usize, flags: u16) {
        self.mem
            .write_obj(flags, GuestAddress(avail_ring(q)))
            .expect("avail flags");
    }

    /// The used ring's flags, as the device left them (VIRTQ_USED_F_NO_NOTIFY = 1: the
    /// driver need not notify).
    pub fn used_flags(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(used_ring(q)))
            .expect("used flags")
    }

    /// The used ring's avail_event (with EVENT_IDX: the avail index past which the driver
    /// notifies).
    pub fn avail_event(&self, q: usize) -> u16 {
        let at = used_ring(q) + 4 + 8 * u64::from(self.queue_size);
        self.mem.read_obj(GuestAddress(at)).expect("avail_event")
    }

    /// Publishes an avail index (a test may make it run ahead of the queue).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(avail_ring(q) + 2))
            .expect("avail idx");
    }

    /// The device serves queue `q` (what the event loop does when the guest notifies).
    pub fn process(&mut self, q: usize) {
        self.transport.process_queue(q);
    }

    /// New used entries of queue `q`: (head, bytes written).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let size = self.queue_size.max(1);
        let ring = used_ring(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(ring + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.next_used[q] != idx {
            let slot = u64::from(self.next_used[q] % size);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(ring + 4 + slot * 8))
                .expect("used id");
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(ring + 8 + slot * 8))
                .expect("used len");
            out.push((id, len));
            self.next_used[q] = self.next_used[q].wrapping_add(1);
        }
        out
    }

    pub fn status(&mut self) -> u32 {
        self.read_reg(REG_STATUS)
    }
}
