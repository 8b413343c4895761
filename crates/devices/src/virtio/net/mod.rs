//! virtio-net on a tap device: one receive and one transmit queue, the virtio-net header
//! passed through to the tap (IFF_VNET_HDR) so checksum and segmentation offloads work where
//! the tap supports them. Frames move between guest buffers and the tap without a copy.

pub mod frame;
pub mod tap;
#[cfg(test)]
mod tests;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use self::frame::VNET_HDR_LEN;
use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::chain;
use super::device::{
    read_config_bytes, DeviceError, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::RateLimiter;

const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Event tokens: the tap, the rate limiter's timer.
const TAP_READABLE: u32 = 0;
const RATE_LIMIT_TIMER: u32 = 1;

/// Frames and bytes the device moved and dropped, and the rate limiter's holds: for the
/// operator's metrics, read from another thread while the device runs.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    /// Times the rate limiter made frames wait.
    pub throttled: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub struct Net {
    tap: Tap,
    /// Limits transmitted frames before they go and received frames after they arrive (their
    /// size is known only then), blocking further receives while in debt.
    limiter: RateLimiter,
    features: u64,
    config: Vec<u8>,
    acked: u64,
    /// The tap may hold frames that found no receive buffer; deliver when buffers arrive.
    rx_pending: bool,
    pub counters: Arc<NetCounters>,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6], limiter: RateLimiter) -> Self {
        let mut features =
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
        // Offer offloads only if this tap accepts them; until the guest acks, none are on.
        if tap
            .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok()
        {
            features |= VIRTIO_NET_F_CSUM
                | VIRTIO_NET_F_GUEST_CSUM
                | VIRTIO_NET_F_GUEST_TSO4
                | VIRTIO_NET_F_GUEST_TSO6
                | VIRTIO_NET_F_HOST_TSO4
                | VIRTIO_NET_F_HOST_TSO6;
        }
        let _ = tap.set_offload(0);
        let mut config = vec![0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        Self {
            tap,
            limiter,
            features,
            config,
            acked: 0,
            rx_pending: true,
            counters: Arc::new(NetCounters::default()),
        }
    }

    fn tap_offloads(acked: u64) -> u32 {
        let mut flags = 0;
        if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
        }
        flags
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let queue_err = |e| DeviceError::queue(RX_QUEUE, e);
        let mut used_any = false;
        loop {
            if self.limiter.is_blocked() {
                // Over the limit: frames wait in the tap until the timer fires.
                add(&self.counters.throttled, 1);
                self.rx_pending = true;
                break;
            }
            let Some((head, descs)) = chain::pop(queue, mem, RX_QUEUE)? else {
                // No buffer: the frame waits in the tap until the guest adds one.
                self.rx_pending = true;
                break;
            };
            let iov = frame::receive(&descs)
                .ok()
                .and_then(|segs| chain::iovecs(mem, &segs));
            let Some(iov) = iov else {
                // A bad buffer is returned empty; the frame stays for the next one.
                queue.add_used(mem, head, 0).map_err(queue_err)?;
                used_any = true;
                continue;
            };
            match self.tap.read_frame(&iov) {
                Ok(Some(len)) => {
                    // Written by the kernel, out of vm-memory's sight: marked again now that
                    // it is (a migration's dirty log; the iovecs were marked when made).
                    chain::mark_written(mem, &iov);
                    self.limiter.charge(len as u64, 1);
                    queue.add_used(mem, head, len as u32).map_err(queue_err)?;
                    add(&self.counters.rx_frames, 1);
                    add(&self.counters.rx_bytes, len as u64);
                    used_any = true;
                }
                Ok(None) => {
                    queue.go_to_previous_position();
                    self.rx_pending = false;
                    break;
                }
                Err(_) => {
                    queue.go_to_previous_position();
                    add(&self.counters.rx_dropped, 1);
                    break;
                }
            }
        }
        Ok(used_any)
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let queue_err = |e| DeviceError::queue(TX_QUEUE, e);
        let mut used_any = false;
        while let Some((head, descs)) = chain::pop(queue, mem, TX_QUEUE)? {
            let segments = frame::transmit(&descs);
            let len = segments.as_ref().map_or(0, |segs| chain::total_len(segs));
            if !self.limiter.consume(len, 1) {
                // Over the limit: the frame waits in the ring until the timer fires.
                add(&self.counters.throttled, 1);
                queue.go_to_previous_position();
                break;
            }
            let sent = segments
                .ok()
                .and_then(|segs| chain::iovecs(mem, &segs))
                .is_some_and(|iov| self.tap.write_frame(&iov).is_ok());
            if sent {
                add(&self.counters.tx_frames, 1);
                add(&self.counters.tx_bytes, len);
            } else {
                add(&self.counters.tx_dropped, 1);
            }
            queue.add_used(mem, head, 0).map_err(queue_err)?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn handover_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.tap.as_raw_fd()]
    }

    fn announce(&self) -> std::io::Result<bool> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        let frame = frame::announcement(&mac);
        let iov = [libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        }];
        // Not the guest's traffic: its counters are left alone.
        self.tap.write_frame(&iov)?;
        Ok(true)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError> {
        self.acked = acked_features;
        self.tap
            .set_offload(Self::tap_offloads(acked_features))
            .map_err(|e| {
                DeviceError::Activate(format!("tap {}: setting offloads: {e}", self.tap.name()))
            })?;
        // Frames may have queued before the driver was ready.
        self.rx_pending = true;
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE if self.rx_pending => self.receive(queue, mem),
            RX_QUEUE => Ok(false),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
        let _ = self.tap.set_offload(0);
        self.rx_pending = true;
        self.limiter.forgive_debt();
    }

    fn event_sources(&self) -> Vec<(RawFd, u32)> {
        let mut sources = vec![(self.tap.as_raw_fd(), TAP_READABLE)];
        if !self.limiter.is_unlimited() {
            sources.push((self.limiter.as_raw_fd(), RATE_LIMIT_TIMER));
        }
        sources
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        let mut used = 0;
        match token {
            TAP_READABLE => self.rx_pending = true,
            RATE_LIMIT_TIMER => {
                // The handler unblocks the limiter even when reading its timer fails; the
                // held frames must go on now, as the driver does not kick a queue the device
                // left with notifications off (`chain::next_chain`).
                let _ = self.limiter.event_handler();
                if let Some(tx) = queues.get_mut(TX_QUEUE).filter(|q| q.ready()) {
                    if self.transmit(tx, mem)? {
                        used |= 1 << TX_QUEUE;
                    }
                }
            }
            _ => return Ok(0),
        }
        if !self.rx_pending {
            return Ok(used);
        }
        let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else {
            return Ok(used);
        };
        if self.receive(rx, mem)? {
            used |= 1 << RX_QUEUE;
        }
        Ok(used)
    }
}

/// A stable MAC for a tap name: locally administered, unicast.
pub fn mac_for(name: &str) -> [u8; 6] {
    // FNV-1a over the name: the same tap gets the same MAC across restarts.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = hash.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

/// Header length of every frame on the tap.
pub const TAP_VNET_HDR_LEN: usize = VNET_HDR_LEN;
