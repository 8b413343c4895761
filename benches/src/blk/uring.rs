//! A prototype virtio-blk engine on io_uring, for the benchmark only: the same transport, the
//! same request parser (`devices::virtio::block::request::parse`) and the same iovecs into
//! guest memory as Keel's `Block`, but the reads and writes of one notification are queued on
//! an io_uring and submitted with one `io_uring_enter`, instead of one `preadv`/`pwritev`
//! each. A flush is an `fdatasync` queued behind everything before it (`IO_DRAIN`).
//!
//! It serves one notification at a time: process_queue submits what the ring holds and waits
//! for all of it. An engine in Keel would instead return to the event loop and complete
//! requests when the ring's eventfd fires; the work per request is the same.
//!
//! With `nowait_first` (the "hybrid" engine), a read first tries `preadv2(RWF_NOWAIT)`,
//! which the kernel serves only from the page cache and never blocks: a hit completes at
//! once, at the cost of one plain system call; only a miss goes on the ring.
//!
//! Not a device to run a guest on: a short read or write is an I/O error here (Keel's `Block`
//! carries on with the rest), and only read, write and flush are served.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};
use arch::GuestMemoryMmap;
use devices::virtio::block::request::{parse, Request, RequestKind, SECTOR_SHIFT};
use devices::virtio::chain;
use devices::virtio::device::{read_config_bytes, DeviceError, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use devices::virtio::VirtioDevice;
use io_uring::{opcode, squeue, types, IoUring};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const QUEUE_SIZE: u16 = 256;

/// A request on the ring: where its answer goes and what counts as done.
struct Pending {
    head: u16,
    status: GuestAddress,
    /// The byte count the operation must return to have succeeded.
    expected: u64,
    /// Bytes written into guest buffers on success (reads: the data).
    written: u32,
    /// Set from the completion: the status byte and the used length before it.
    outcome: Option<(u8, u32)>,
    /// The iovecs the kernel reads; they stay here until the completion is reaped.
    _iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which outlives the device and which any thread
// may access; the device is moved between threads only as a whole, like Keel's `Block`.
unsafe impl Send for Pending {}

/// What became of a request handed to [`UringBlock::start`].
enum Start {
    Queued,
    /// Done without the ring: the status byte and the bytes written into guest buffers.
    Done(u8, u32),
}

pub struct UringBlock {
    file: File,
    /// Reads try the page cache first with a non-blocking `preadv2`.
    nowait_first: bool,
    size: u64,
    ring: IoUring,
    config: Vec<u8>,
    pending: Vec<Pending>,
}

impl UringBlock {
    pub fn open(path: &Path, nowait_first: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let ring = IoUring::new(u32::from(QUEUE_SIZE))
            .context("creating an io_uring (is io_uring disabled on this host?)")?;
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&(size >> SECTOR_SHIFT).to_le_bytes());
        Ok(Self {
            file,
            nowait_first,
            size,
            ring,
            config,
            pending: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        })
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(1 << SECTOR_SHIFT)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= self.size)
    }

    /// Queues `req`, or completes it at once: from the page cache, or with an error.
    fn start(&mut self, head: u16, req: &Request, mem: &GuestMemoryMmap) -> Start {
        match self.try_start(head, req, mem) {
            Ok(start) => start,
            Err(status) => Start::Done(status, 0),
        }
    }

    fn try_start(&mut self, head: u16, req: &Request, mem: &GuestMemoryMmap) -> Result<Start, u8> {
        let fd = types::Fd(self.file.as_raw_fd());
        let (entry, expected, written, iov) = match req.kind {
            RequestKind::Read | RequestKind::Write => {
                if !self.in_range(req.sector, req.data_len) {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let iov = chain::iovecs(mem, &req.data).ok_or(VIRTIO_BLK_S_IOERR)?;
                let offset = req.sector << SECTOR_SHIFT;
                let count = iov.len() as u32;
                if self.nowait_first && req.kind == RequestKind::Read {
                    // SAFETY: the iovecs point at guest buffers of their lengths, mapped for
                    // the life of the device; the kernel writes only inside them.
                    let n = unsafe {
                        libc::preadv2(
                            self.file.as_raw_fd(),
                            iov.as_ptr(),
                            count as i32,
                            offset as i64,
                            libc::RWF_NOWAIT,
                        )
                    };
                    if u64::try_from(n).is_ok_and(|n| n == req.data_len) {
                        return Ok(Start::Done(VIRTIO_BLK_S_OK, req.data_len as u32));
                    }
                    // Not (all) in the page cache: the whole read goes on the ring.
                }
                let entry = if req.kind == RequestKind::Read {
                    opcode::Readv::new(fd, iov.as_ptr(), count)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Writev::new(fd, iov.as_ptr(), count)
                        .offset(offset)
                        .build()
                };
                let written = if req.kind == RequestKind::Read {
                    req.data_len as u32
                } else {
                    0
                };
                (entry, req.data_len, written, iov)
            }
            RequestKind::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .flags(squeue::Flags::IO_DRAIN),
                0,
                0,
                Vec::new(),
            ),
            _ => return Err(VIRTIO_BLK_S_UNSUPP),
        };
        let entry = entry.user_data(self.pending.len() as u64);
        self.pending.push(Pending {
            head,
            status: req.status,
            expected,
            written,
            outcome: None,
            _iov: iov,
        });
        loop {
            // SAFETY: the entry's iovecs and the guest buffers they point at stay valid until
            // its completion is reaped: the iovecs live in `self.pending` until then, and
            // guest memory outlives the device.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(Start::Queued);
            }
            // The submission queue is full: hand it to the kernel and try again.
            if self.ring.submit().is_err() {
                self.pending.pop();
                return Err(VIRTIO_BLK_S_IOERR);
            }
        }
    }

    /// Submits what is queued, waits for every completion and writes the answers.
    fn finish(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
        let mut done = 0;
        while done < self.pending.len() {
            match self.ring.submit_and_wait(self.pending.len() - done) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("io_uring_enter: {e}")),
            }
            for cqe in self.ring.completion() {
                let i = cqe.user_data() as usize;
                let Some(p) = self.pending.get_mut(i) else {
                    continue;
                };
                p.outcome = Some(
                    if u64::try_from(cqe.result()).is_ok_and(|n| n == p.expected) {
                        (VIRTIO_BLK_S_OK, p.written)
                    } else {
                        (VIRTIO_BLK_S_IOERR, 0)
                    },
                );
                done += 1;
            }
        }
        for p in &self.pending {
            let (status, mut used_len) = p.outcome.unwrap_or((VIRTIO_BLK_S_IOERR, 0));
            if mem.write_obj(status, p.status).is_ok() {
                used_len += 1;
            }
            queue
                .add_used(mem, p.head, used_len)
                .map_err(|e| e.to_string())?;
        }
        self.pending.clear();
        Ok(())
    }
}

impl VirtioDevice for UringBlock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
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
            let (status, written, addr) = match parse(&descs, mem) {
                Ok(req) => match self.start(head, &req, mem) {
                    Start::Queued => continue,
                    Start::Done(status, written) => (status, written, Some(req.status)),
                },
                // The benchmark sends no malformed chains; answer without a status byte.
                Err(_) => (VIRTIO_BLK_S_IOERR, 0, None),
            };
            let mut used_len = written;
            if let Some(addr) = addr {
                if mem.write_obj(status, addr).is_ok() {
                    used_len += 1;
                }
            }
            queue
                .add_used(mem, head, used_len)
                .map_err(|e| DeviceError::queue(index, e))?;
            used_any = true;
        }
        if !self.pending.is_empty() {
            self.finish(queue, mem)
                .map_err(|reason| DeviceError::Queue {
                    queue: index,
                    reason,
                })?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn reset(&mut self) {}
}
