//! virtio-blk on a raw file: read, write, flush, get-id, discard, write-zeroes. A write is
//! completed to the guest only after it is in the file; a flush only after `fdatasync`.

pub mod request;

use std::sync::Arc;

use std::os::fd::{AsRawFd, RawFd};

use disk::RawDisk;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use self::request::{parse, Request, RequestKind, ID_BYTES, SECTOR_SHIFT, SEGMENT_BYTES};
use super::chain;
use super::device::{read_config_bytes, DeviceError, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::rate_limiter::RateLimiter;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (the queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Discard / write-zeroes: segments per request and sectors per segment.
const MAX_DISCARD_SEGMENTS: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Event token of the rate limiter's timer.
const RATE_LIMIT_TIMER: u32 = 0;

pub struct Block {
    disk: Arc<RawDisk>,
    limiter: RateLimiter,
    serial: [u8; ID_BYTES],
    features: u64,
    config: Vec<u8>,
}

fn build_config(capacity_sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[56] = 1;
    c
}

impl Block {
    pub fn new(disk: RawDisk, serial: &str, limiter: RateLimiter) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config = build_config(disk.size() >> SECTOR_SHIFT);
        Self {
            disk: Arc::new(disk),
            limiter,
            serial: id,
            features,
            config,
        }
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

    /// Runs one request; returns (status, bytes written into guest buffers).
    fn execute(&self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let offset = req.sector << SECTOR_SHIFT;
        match &req.kind {
            RequestKind::Read | RequestKind::Write => {
                let is_write = req.kind == RequestKind::Write;
                if is_write && self.disk.read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                if !self.in_range(req.sector, req.data_len) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(bufs) = chain::iovecs(mem, &req.data) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let result = if is_write {
                    self.disk.write_at(&bufs, offset)
                } else {
                    self.disk.read_at(&bufs, offset)
                };
                match result {
                    Ok(()) if is_write => (VIRTIO_BLK_S_OK, 0),
                    Ok(()) => (VIRTIO_BLK_S_OK, req.data_len as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestKind::Flush => match self.disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            RequestKind::GetId => {
                let mut written = 0u32;
                let mut id = &self.serial[..];
                for seg in &req.data {
                    let n = id.len().min(seg.len as usize);
                    if mem.write_slice(&id[..n], seg.addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    written += n as u32;
                    id = &id[n..];
                }
                (VIRTIO_BLK_S_OK, written)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.disk.read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.discard_or_zero(req, mem)
            }
            RequestKind::Unsupported(_) => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn discard_or_zero(&self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        if req.data_len != SEGMENT_BYTES as u64 * u64::from(MAX_DISCARD_SEGMENTS) {
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
        let mut seg = [0u8; SEGMENT_BYTES];
        let mut filled = 0;
        for s in &req.data {
            let take = (SEGMENT_BYTES - filled).min(s.len as usize);
            if mem
                .read_slice(&mut seg[filled..filled + take], s.addr)
                .is_err()
            {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            filled += take;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let len = u64::from(sectors) << SECTOR_SHIFT;
        if sectors > MAX_DISCARD_SECTORS || !self.in_range(sector, len) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let offset = sector << SECTOR_SHIFT;
        let result = if req.kind == RequestKind::Discard {
            // Unknown flags in a discard segment are an error per the spec.
            if flags != 0 {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            self.disk.discard(offset, len)
        } else {
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            self.disk
                .write_zeroes(offset, len, flags & WRITE_ZEROES_FLAG_UNMAP != 0)
        };
        match result {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some((head, descs)) = chain::pop(queue, mem, index)? {
            let (status, written, status_addr) = match parse(&descs, mem) {
                Ok(req) if !self.limiter.consume(req.data_len, 1) => {
                    // Over the limit: the request waits in the ring until the timer fires.
                    queue.go_to_previous_position();
                    break;
                }
                Ok(req) => {
                    let (status, written) = self.execute(&req, mem);
                    (status, written, Some(req.status))
                }
                Err(e) => {
                    // The status address is the last writable byte, when there is one
                    // (it may be u64::MAX: add len - 1, never len first).
                    let addr = if e.has_status() {
                        descs
                            .iter()
                            .rev()
                            .find(|d| d.device_writable && d.len > 0)
                            .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
                            .map(vm_memory::GuestAddress)
                    } else {
                        None
                    };
                    (VIRTIO_BLK_S_IOERR, 0, addr)
                }
            };
            let mut used_len = written;
            if let Some(addr) = status_addr {
                if mem.write_obj(status, addr).is_ok() {
                    used_len += 1;
                }
            }
            queue
                .add_used(mem, head, used_len)
                .map_err(|e| DeviceError::queue(index, e))?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn reset(&mut self) {}

    fn event_sources(&self) -> Vec<(RawFd, u32)> {
        if self.limiter.is_unlimited() {
            Vec::new()
        } else {
            vec![(self.limiter.as_raw_fd(), RATE_LIMIT_TIMER)]
        }
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, DeviceError> {
        if token != RATE_LIMIT_TIMER || self.limiter.event_handler().is_err() {
            return Ok(0);
        }
        let Some(queue) = queues.get_mut(0) else {
            return Ok(0);
        };
        Ok(u64::from(self.process_queue(0, queue, mem)?))
    }
}
