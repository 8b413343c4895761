//! The VM's virtio-mmio devices: each gets a 4 KiB window and an IO APIC pin, an irqfd for its
//! interrupt and an ioeventfd per queue; guest MMIO accesses reach its transport from the
//! vCPU threads, queue work runs on the event-loop thread.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};

use arch::acpi::VirtioSlot;
use arch::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};
use arch::GuestMemoryMmap;
use devices::rate_limiter::{RateLimitConfig, RateLimiter};
use devices::virtio::block::Block;
use devices::virtio::mmio::REG_QUEUE_NOTIFY;
use devices::virtio::net::tap::Tap;
use devices::virtio::net::{mac_for, Net};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::{Interrupt, MmioTransport, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Disk(#[from] disk::Error),
    #[error(transparent)]
    Image(#[from] disk::image::Error),
    #[error("rate limiter: {0}")]
    RateLimiter(String),
    #[error("--vsock: {0}")]
    Vsock(#[from] devices::virtio::vsock::Error),
    #[error("--net: {0}")]
    Tap(#[from] devices::virtio::net::tap::Error),
    #[error("virtio device {index}: {what} failed: {reason}")]
    Setup {
        index: usize,
        what: &'static str,
        reason: String,
    },
}

struct Slot {
    base: u64,
    irq: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

/// A transport, or the disks' files or images, whoever panicked last holding them: a
/// transport is still a valid state machine, the lists still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn limiter(config: &RateLimitConfig) -> Result<RateLimiter, Error> {
    RateLimiter::new(config).map_err(|e| Error::RateLimiter(e.to_string()))
}

pub struct VirtioDevices {
    slots: Vec<Slot>,
    counters: DeviceCounters,
    /// Each disk's files (shared descriptions, with their locks), kept to hand over.
    disk_files: Mutex<Vec<disk::ImageFiles>>,
    /// Each disk's image as its device serves it.
    disk_images: Mutex<Vec<Arc<disk::Image>>>,
}

/// The devices' counters, shared with the thread that answers `metrics` requests.
#[derive(Clone, Default)]
pub struct DeviceCounters {
    disks: Vec<Arc<devices::virtio::block::BlockStats>>,
    nets: Vec<Arc<devices::virtio::net::NetCounters>>,
}

impl DeviceCounters {
    /// What they say now.
    pub fn snapshot(&self) -> api::control::VmmMetrics {
        use std::sync::atomic::Ordering::Relaxed;
        api::control::VmmMetrics {
            disks: self
                .disks
                .iter()
                .map(|d| api::control::DiskMetrics {
                    read_requests: d.read_requests.load(Relaxed),
                    read_bytes: d.read_bytes.load(Relaxed),
                    write_requests: d.write_requests.load(Relaxed),
                    write_bytes: d.write_bytes.load(Relaxed),
                    flush_requests: d.flush_requests.load(Relaxed),
                    other_requests: d.other_requests.load(Relaxed),
                    failed_requests: d.failed.load(Relaxed),
                    throttled: d.throttled.load(Relaxed),
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|n| api::control::NetMetrics {
                    tx_frames: n.tx_frames.load(Relaxed),
                    tx_bytes: n.tx_bytes.load(Relaxed),
                    tx_dropped: n.tx_dropped.load(Relaxed),
                    rx_frames: n.rx_frames.load(Relaxed),
                    rx_bytes: n.rx_bytes.load(Relaxed),
                    rx_dropped: n.rx_dropped.load(Relaxed),
                    throttled: n.throttled.load(Relaxed),
                })
                .collect(),
        }
    }
}

impl VirtioDevices {
    /// The devices' counters, for `metrics` requests.
    pub fn counters(&self) -> DeviceCounters {
        self.counters.clone()
    }

    /// The devices `config` asks for, in a fixed order: disks, NICs, the rng, vsock.
    /// `disks` and `taps` are open already ([`crate::HostFiles`]), one per entry of
    /// `config`, in its order.
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        config: &VmConfig,
        disks: Vec<disk::ImageFiles>,
        taps: Vec<Tap>,
        vsock_listener: Option<UnixListener>,
    ) -> Result<Self, Error> {
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        let mut counters = DeviceCounters::default();
        let mut disk_files = Vec::new();
        let mut disk_images = Vec::new();
        for (i, (d, files)) in config.disks.iter().zip(disks).enumerate() {
            disk_files.push(files.try_clone().map_err(|e| Error::Setup {
                index: i,
                what: "keeping its files",
                reason: e.to_string(),
            })?);
            let image = disk::Image::from_image_files(files, d.read_only, d.direct)?;
            let serial = d.serial.clone().unwrap_or_else(|| format!("keel-disk-{i}"));
            let block = Block::new(image, &serial, limiter(&d.rate_limit)?);
            if let Some(why) = block.fallback_reason() {
                eprintln!(
                    "keel: disk {}: {why}; serving it with the {} engine",
                    d.path.display(),
                    block.engine()
                );
            } else if config.trace_startup {
                eprintln!(
                    "keel: disk {}: {} engine{}",
                    d.path.display(),
                    block.engine(),
                    if d.direct { ", direct I/O" } else { "" }
                );
            }
            counters.disks.push(block.stats());
            disk_images.push(block.image());
            devices.push(Box::new(block));
        }
        for (n, tap) in config.nets.iter().zip(taps) {
            let net = Net::new(
                tap,
                n.mac.unwrap_or_else(|| mac_for(&n.tap)),
                limiter(&n.rate_limit)?,
            );
            counters.nets.push(net.counters.clone());
            devices.push(Box::new(net));
        }
        if config.rng {
            devices.push(Box::new(Rng));
        }
        if let (Some(v), Some(listener)) = (&config.vsock, vsock_listener) {
            devices.push(Box::new(Vsock::with_listener(v.cid, &v.socket, listener)?));
        }
        let mut slots = Vec::new();
        for (index, device) in devices.into_iter().enumerate() {
            let (base, irq) = virtio_mmio_slot(index);
            let setup = |what: &'static str| {
                move |e: &dyn std::fmt::Display| Error::Setup {
                    index,
                    what,
                    reason: e.to_string(),
                }
            };
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| setup("creating its interrupt")(&e))?;
            vm.register_irqfd(&irqfd, irq)
                .map_err(|e| setup("wiring its interrupt")(&e))?;
            let interrupt = Arc::new(Interrupt::new(irqfd));
            let transport = MmioTransport::new(device, mem.clone(), interrupt)
                .map_err(|e| setup("building its transport")(&e))?;
            for (queue, evt) in transport.queue_events().iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
                vm.register_ioevent(evt, &addr, queue as u32)
                    .map_err(|e| setup("wiring its queue notification")(&e))?;
            }
            slots.push(Slot {
                base,
                irq,
                transport: Arc::new(Mutex::new(transport)),
            });
        }
        Ok(Self {
            slots,
            counters,
            disk_files: Mutex::new(disk_files),
            disk_images: Mutex::new(disk_images),
        })
    }

    /// The devices as the DSDT describes them.
    pub fn acpi_slots(&self) -> Vec<VirtioSlot> {
        self.slots
            .iter()
            .map(|s| VirtioSlot {
                base: s.base,
                size: VIRTIO_MMIO_SIZE,
                irq: s.irq,
            })
            .collect()
    }

    /// `virtio_mmio.device=` entries, for kernels booted without ACPI.
    pub fn cmdline_entries(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn find(&self, addr: u64) -> Option<(&Slot, u64)> {
        self.slots
            .iter()
            .find(|s| addr >= s.base && addr - s.base < VIRTIO_MMIO_SIZE)
            .map(|s| (s, addr - s.base))
    }

    /// A guest MMIO read; false when no device owns the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((slot, offset)) => {
                lock(&slot.transport).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((slot, offset)) => {
                lock(&slot.transport).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The vCPUs are stopped: every device finishes what it took and takes nothing more.
    /// On a failure the devices paused so far are resumed.
    pub fn pause(&self) -> Result<(), Error> {
        for (index, slot) in self.slots.iter().enumerate() {
            if let Err(e) = lock(&slot.transport).pause() {
                self.resume();
                return Err(Error::Setup {
                    index,
                    what: "pausing it",
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Each network device tells the network the guest is here (see
    /// `VirtioDevice::announce`); how many did.
    pub fn announce(&self) -> std::io::Result<u32> {
        let (mut sent, mut failed) = (0, None);
        // Every NIC tries, whatever became of another's tap.
        for slot in &self.slots {
            match lock(&slot.transport).announce() {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(sent),
        }
    }

    /// Every device serves its queues again (each once now: see `MmioTransport::resume`).
    pub fn resume(&self) {
        for slot in &self.slots {
            lock(&slot.transport).resume();
        }
    }

    /// The descriptors a new VMM takes over with the devices: the taps, in device order, and
    /// each disk's files (image, then backing chain).
    pub fn handover_fds(&self) -> (Vec<RawFd>, Vec<Vec<RawFd>>) {
        use std::os::fd::AsRawFd;
        let taps = self
            .slots
            .iter()
            .flat_map(|s| lock(&s.transport).handover_fds())
            .collect();
        let disks = lock(&self.disk_files)
            .iter()
            .map(|d| d.files().map(|f| f.as_raw_fd()).collect())
            .collect();
        (taps, disks)
    }

    /// Writes every disk's cached metadata into its file (`sync`: and syncs it), with the
    /// devices quiet: before another process opens the disks (a new VMM, a migration's
    /// target) or copies them (a snapshot).
    pub fn write_back_disks(&self, sync: bool) -> Result<(), String> {
        let files = lock(&self.disk_files);
        for (image, files) in lock(&self.disk_images).iter().zip(files.iter()) {
            let done = if sync {
                image.flush()
            } else {
                image.write_back()
            };
            done.map_err(|e| format!("writing disk {} back: {e}", files.path.display()))?;
        }
        Ok(())
    }

    /// Takes or releases the locks on every disk's files (`read_only` per disk, in order):
    /// a VM migrating away gives them to the VMM that takes it over.
    ///
    /// The first writable disk is taken first: it is the arbiter of which VMM runs a
    /// migrating guest (its exclusive lock admits one), and the daemon of a migration's
    /// target takes it first too. When another holds it nothing else is taken.
    /// On an error, whether it was the arbiter's: locks taken before a later disk failed are
    /// given back (all or nothing).
    pub fn disk_locks(
        &self,
        held: bool,
        read_only: &[bool],
    ) -> Result<(), (bool, disk::image::Error)> {
        let disk_files = lock(&self.disk_files);
        let order = disk::arbiter_first(read_only, disk_files.len());
        for (n, &i) in order.iter().enumerate() {
            let files = &disk_files[i];
            let done = if held {
                files.lock(read_only.get(i).copied().unwrap_or(false))
            } else {
                files.unlock()
            };
            if let Err(e) = done {
                if held {
                    for &taken in &order[..n] {
                        let _ = disk_files[taken].unlock();
                    }
                }
                return Err((n == 0, e));
            }
        }
        Ok(())
    }

    /// Paused only: each `(disk, files)` of `switched` is served from `files` from now on (a
    /// new qcow2 image over the disk's present one, which a snapshot keeps). The present
    /// images are synced first: a guest's flush after the switch reaches only the new file.
    /// All of them switch or none does.
    pub fn switch_disks(&self, switched: Vec<(usize, disk::ImageFiles)>) -> Result<(), String> {
        let mut files = lock(&self.disk_files);
        let mut images = lock(&self.disk_images);
        for (i, new) in &switched {
            match images.get(*i) {
                None => return Err(format!("the VM has no disk {i}")),
                Some(image) if image.read_only() => {
                    return Err(format!("disk {i} is read-only: it has nothing to switch"))
                }
                Some(image) => image.flush().map_err(|e| {
                    format!(
                        "syncing disk {i} before switching it to {}: {e}",
                        new.path.display()
                    )
                })?,
            }
        }
        let mut done: Vec<(usize, disk::ImageFiles, Arc<disk::Image>)> = Vec::new();
        for (i, new) in switched {
            match self.switch_one(i, new, &files[i]) {
                Ok((image, kept)) => {
                    let old_image = std::mem::replace(&mut images[i], image);
                    let old_files = std::mem::replace(&mut files[i], kept);
                    done.push((i, old_files, old_image));
                }
                Err(e) => {
                    for (i, old_files, old_image) in done.into_iter().rev() {
                        let _ = lock(&self.slots[i].transport).switch_disk(old_image.clone());
                        let _ = files[i].unlock();
                        if let Err(e) = old_files.lock(false) {
                            eprintln!("keel: disk {i}: taking its lock back failed: {e}");
                        }
                        files[i] = old_files;
                        images[i] = old_image;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Switches disk `i` from `old` (its files now) to `new`: the locks move, the device takes
    /// the new image. On an error nothing has changed. Returns the image and the files kept.
    fn switch_one(
        &self,
        i: usize,
        new: disk::ImageFiles,
        old: &disk::ImageFiles,
    ) -> Result<(Arc<disk::Image>, disk::ImageFiles), String> {
        let path = new.path.clone();
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            format!("disk {i}: {what} {}: {e}", path.display())
        };
        // The new image's backing chain holds the old top file shared; its old exclusive
        // lock (another open file) would refuse that.
        old.unlock()
            .map_err(|e| failed("releasing its present file for", &e))?;
        let undo = |why: String| {
            if let Err(e) = old.lock(false) {
                eprintln!("keel: disk {i}: taking its lock back failed: {e}");
            }
            why
        };
        new.lock(false).map_err(|e| undo(failed("locking", &e)))?;
        let kept = new.try_clone().map_err(|e| {
            let _ = new.unlock();
            undo(failed("keeping the files of", &e))
        })?;
        let mut building = new;
        building.lock_deferred = true;
        let built = disk::Image::from_image_files(building, false, false)
            .map_err(|e| failed("opening", &e))
            .and_then(|image| {
                let image = Arc::new(image);
                lock(&self.slots[i].transport)
                    .switch_disk(image.clone())
                    .map(|_| image)
                    .map_err(|e| failed("serving", &e))
            });
        match built {
            Ok(image) => Ok((image, kept)),
            Err(why) => {
                let _ = kept.unlock();
                Err(undo(why))
            }
        }
    }

    /// Every device's transport state, in the VM's device order (while paused).
    pub fn save(&self) -> Vec<devices::virtio::persist::TransportState> {
        self.slots
            .iter()
            .map(|s| lock(&s.transport).save())
            .collect()
    }

    /// Puts saved transport states into these fresh devices, which must be the same ones in
    /// the same order; they are left paused (see [`Self::resume`]).
    pub fn restore(&self, saved: &[devices::virtio::persist::TransportState]) -> Result<(), Error> {
        if saved.len() != self.slots.len() {
            return Err(Error::Setup {
                index: saved.len().min(self.slots.len()),
                what: "restoring it",
                reason: format!(
                    "the snapshot has {} virtio devices, this VM {}",
                    saved.len(),
                    self.slots.len()
                ),
            });
        }
        for (index, (slot, state)) in self.slots.iter().zip(saved).enumerate() {
            lock(&slot.transport)
                .restore(state)
                .map_err(|e| Error::Setup {
                    index,
                    what: "restoring it",
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The VMM is exiting: devices release what would outlive it.
    pub fn shutdown(&self) {
        for slot in &self.slots {
            lock(&slot.transport).shutdown();
        }
    }

    /// One event-loop subscriber per device, serving its queues.
    pub fn queue_handlers(&self) -> Vec<QueueHandler> {
        self.slots
            .iter()
            .filter_map(|s| {
                let events: Option<Vec<EventFd>> = lock(&s.transport)
                    .queue_events()
                    .iter()
                    .map(|e| e.try_clone().ok())
                    .collect();
                let sources = lock(&s.transport).event_sources();
                Some(QueueHandler {
                    transport: s.transport.clone(),
                    events: events?,
                    sources,
                })
            })
            .collect()
    }
}

/// Serves a device's queues when their notifications fire.
pub struct QueueHandler {
    transport: Arc<Mutex<MmioTransport>>,
    events: Vec<EventFd>,
    /// The device's own file descriptors (tap, sockets) and their tokens.
    sources: Vec<(RawFd, u32)>,
}

/// Event data of a device's own sources: above every queue index.
const SOURCE_TOKEN_BASE: u32 = 1 << 16;

impl MutEventSubscriber for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.events.iter().enumerate() {
            // If this fails the device never hears from its driver: the guest sees a dead
            // device, not a dead VMM. Nothing else can be done from here.
            let _ = ops.add(Events::with_data(evt, i as u32, EventSet::IN));
        }
        for (fd, token) in &self.sources {
            // Edge-triggered: a device that cannot take more now (no guest buffers) must not
            // make the loop spin; it catches up when the guest gives it room.
            let _ = ops.add(Events::with_data_raw(
                *fd,
                SOURCE_TOKEN_BASE + token,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() >= SOURCE_TOKEN_BASE {
            lock(&self.transport).process_event(events.data() - SOURCE_TOKEN_BASE);
            return;
        }
        let index = events.data() as usize;
        if let Some(evt) = self.events.get(index) {
            let _ = evt.read();
        }
        lock(&self.transport).process_queue(index);
    }
}
