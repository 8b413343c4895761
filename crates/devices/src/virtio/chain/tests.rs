//! Notification suppression while a queue is served (VIRTQ_USED_F_NO_NOTIFY, EVENT_IDX's
//! avail_event): the flag is up while the device works through the ring and down once it is
//! empty, a chain the driver adds meanwhile without kicking is served, a device held back by
//! its rate limiter keeps it up until its timer lets it finish, and a guest on another thread
//! that kicks only when the flag says so loses nothing.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::rate_limiter::{RateLimitConfig, RateLimiter};
use crate::virtio::block::request::VIRTIO_BLK_T_FLUSH;
use crate::virtio::block::Block;
use crate::virtio::chain;
use crate::virtio::device::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::virtio::driver::{ring_addresses, Buffer, Driver, DATA_START};
use crate::virtio::mmio::{STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use crate::virtio::rng::Rng;

const USED_F_NO_NOTIFY: u16 = 1;

type Hook = Box<dyn FnOnce()>;

thread_local! {
    /// What the driver does in the window between the device's last empty look at the ring
    /// and its turning notifications back on: a test sets it, [`chain::next_chain`] runs it once.
    static WINDOW: std::cell::RefCell<Option<Hook>> = const { std::cell::RefCell::new(None) };
}

/// Called by [`chain::next_chain`] in that window.
pub(super) fn in_the_window() {
    if let Some(hook) = WINDOW.with(|w| w.borrow_mut().take()) {
        hook();
    }
}
use crate::virtio::device::VIRTIO_RING_F_EVENT_IDX as EVENT_IDX;

fn buffer(i: u64) -> Buffer {
    Buffer {
        addr: DATA_START + i * 0x100,
        len: 8,
        writable: true,
    }
}

/// Plays the guest inside the device's drain: what it saw and did.
#[derive(Default)]
struct Seen {
    /// The used ring's flags as each chain was served.
    flags: Vec<u16>,
    /// Chains the "guest" added while the queue was served, and whether it kicked for them.
    added: usize,
    kicked: bool,
}

/// A device that serves its one queue with `chain::pop`, as every device does; while serving
/// its first chain, the guest (on another vCPU, in a real VM) adds one more chain and kicks
/// only if the used ring lets it.
struct Watched {
    seen: Arc<Mutex<Seen>>,
    add_while_serving: bool,
}

impl VirtioDevice for Watched {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | EVENT_IDX
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
        let mut used = false;
        while let Some((head, _descs)) = chain::pop(queue, mem, index)? {
            let flags: u16 = mem.read_obj(GuestAddress(queue.used_ring())).unwrap();
            let mut seen = self.seen.lock().unwrap();
            seen.flags.push(flags);
            if self.add_while_serving && seen.added == 0 {
                // The guest reuses descriptor `head` (already read) for a new chain.
                let avail = queue.avail_ring();
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                let slot = u64::from(idx % queue.size());
                mem.write_obj(head, GuestAddress(avail + 4 + slot * 2))
                    .unwrap();
                fence(Ordering::SeqCst);
                mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                    .unwrap();
                fence(Ordering::SeqCst);
                let flags: u16 = mem.read_obj(GuestAddress(queue.used_ring())).unwrap();
                seen.added += 1;
                seen.kicked = flags & USED_F_NO_NOTIFY == 0;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|e| DeviceError::queue(index, e))?;
            used = true;
        }
        Ok(used)
    }
    fn reset(&mut self) {}
}

fn watched(add_while_serving: bool) -> (Driver, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let device = Watched {
        seen: seen.clone(),
        add_while_serving,
    };
    (Driver::new(Box::new(device), 4 << 20), seen)
}

#[test]
fn no_notify_is_set_while_a_queue_is_served_and_cleared_after() {
    let (mut d, seen) = watched(false);
    assert_ne!(d.init(0, 16) & STATUS_DRIVER_OK, 0);
    assert_eq!(d.used_flags(0), 0, "a new ring asks for notifications");
    for i in 0..3 {
        d.submit(0, &[buffer(i)]);
    }
    d.process(0);
    assert_eq!(d.used(0).len(), 3);
    assert_eq!(
        seen.lock().unwrap().flags,
        [USED_F_NO_NOTIFY; 3],
        "the driver need not notify while the device works through the ring"
    );
    assert_eq!(
        d.used_flags(0),
        0,
        "with the ring empty, notifications are back on"
    );
}

#[test]
fn a_chain_added_while_the_queue_is_served_is_served_without_a_kick() {
    let (mut d, seen) = watched(true);
    d.init(0, 16);
    d.submit(0, &[buffer(0)]);
    d.submit(0, &[buffer(1)]);
    d.process(0);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.added, 1);
    assert!(!seen.kicked, "the guest saw NO_NOTIFY and did not kick");
    assert_eq!(
        d.used(0).len(),
        3,
        "the chain added in the window was served in the same pass"
    );
    assert_eq!(d.used_flags(0), 0);
}

#[test]
fn with_event_idx_the_flag_stays_clear_and_avail_event_follows_the_ring() {
    let (mut d, seen) = watched(false);
    d.init(EVENT_IDX, 16);
    for i in 0..5 {
        d.submit(0, &[buffer(i)]);
    }
    d.process(0);
    assert_eq!(d.used(0).len(), 5);
    assert_eq!(
        seen.lock().unwrap().flags,
        [0; 5],
        "EVENT_IDX uses avail_event"
    );
    assert_eq!(
        d.avail_event(0),
        5,
        "the driver notifies again once it adds past what the device served"
    );
}

#[test]
fn a_broken_ring_is_still_an_error_with_notifications_off() {
    let mut d = Driver::new(Box::new(Rng), 4 << 20);
    d.init(0, 16);
    d.set_avail_idx(0, 1000);
    d.process(0);
    assert_ne!(
        d.status() & STATUS_NEEDS_RESET,
        0,
        "avail idx 1000, 16 entries"
    );
    assert!(d.used(0).is_empty());
}

#[test]
fn a_rate_limited_queue_keeps_notifications_off_until_its_timer_lets_it_finish() {
    let path = std::env::temp_dir().join(format!("keel-notify-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let disk = disk::RawDisk::open(&path, false).unwrap();
    let _ = std::fs::remove_file(&path);
    let limits: RateLimitConfig = "iops=4,iops_burst=1".parse().unwrap();
    let device = Block::new(disk, "x", RateLimiter::new(&limits).unwrap());
    let mut d = Driver::new(Box::new(device), 4 << 20);
    assert_ne!(d.init(1 << 9, 16) & STATUS_DRIVER_OK, 0);
    let header = |i: u64| DATA_START + i * 0x100;
    let status = |i: u64| DATA_START + 0x10_0000 + i;
    for i in 0..3u64 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(header(i))).unwrap();
        d.submit(
            0,
            &[
                Buffer {
                    addr: header(i),
                    len: 16,
                    writable: false,
                },
                Buffer {
                    addr: status(i),
                    len: 1,
                    writable: true,
                },
            ],
        );
    }
    d.process(0);
    assert_eq!(
        d.used_flags(0),
        USED_F_NO_NOTIFY,
        "held back by the limiter, the device needs no kick: its timer brings it back"
    );
    // The timer fires every quarter second; each time one more request goes.
    let mut used = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while used < 3 && Instant::now() < deadline {
        crate::virtio::tests::serve_events(&mut d, Duration::from_millis(20));
        used += d.used(0).len();
    }
    assert_eq!(used, 3, "every held request was served after the timer");
    // Completions on the io_uring may still be reaped; the flag is what the drain left.
    assert_eq!(
        d.used_flags(0),
        0,
        "with the ring empty, notifications are back on"
    );
}

/// The race the re-check after turning notifications back on closes, made to happen: the
/// device has found the ring empty, and before it clears the flag the driver publishes a chain,
/// sees the flag still up and does not kick. The device must serve that chain before it
/// sleeps.
#[test]
fn a_chain_added_just_before_notifications_come_back_on_is_not_lost() {
    let (mut d, _seen) = watched(false);
    d.init(0, 16);
    d.submit(0, &[buffer(0)]);
    // The second chain's descriptor is in place; the hook makes it available.
    d.write_desc(0, 1, buffer(1).addr, 8, 2, 0);
    let (mem, (_, avail, used)) = (d.mem.clone(), ring_addresses(0));
    let kicked = Arc::new(AtomicBool::new(false));
    let hook_kicked = kicked.clone();
    WINDOW.with(|w| {
        *w.borrow_mut() = Some(Box::new(move || {
            mem.write_obj(1u16, GuestAddress(avail + 4 + 2)).unwrap();
            fence(Ordering::SeqCst);
            mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
            fence(Ordering::SeqCst);
            let flags: u16 = mem.read_obj(GuestAddress(used)).unwrap();
            hook_kicked.store(flags & USED_F_NO_NOTIFY == 0, Ordering::Relaxed);
        }))
    });
    d.process(0);
    assert!(
        WINDOW.with(|w| w.borrow().is_none()),
        "the device looked at an empty ring"
    );
    assert!(
        !kicked.load(Ordering::Relaxed),
        "the driver saw NO_NOTIFY and did not kick"
    );
    assert_eq!(
        d.used(0).iter().map(|u| u.0).collect::<Vec<_>>(),
        [0, 1],
        "the chain published in the window was served before the device slept"
    );
    assert_eq!(d.used_flags(0), 0);
}

/// The driver's side of the race the re-check closes, on a thread of its own: it publishes
/// chains and kicks only when the used ring asks for it, as Linux's driver (and the probe's)
/// do. A lost wakeup (a chain published while the flag was up, just before the device turned
/// notifications back on and went to sleep) would leave the guest waiting for ever.
#[test]
fn a_guest_that_kicks_only_when_asked_loses_no_chain() {
    const CHAINS: u64 = 20_000;
    const SIZE: u16 = 16;
    let mut d = Driver::new(Box::new(Rng), 4 << 20);
    assert_ne!(d.init(0, SIZE) & STATUS_DRIVER_OK, 0);
    let kick = d.transport.queue_events()[0].try_clone().unwrap();
    let mem = d.mem.clone();
    let kicks = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (desc, avail, used) = ring_addresses(0);
    let guest = {
        let (kicks, stop) = (kicks.clone(), stop.clone());
        std::thread::spawn(move || {
            for n in 0..CHAINS {
                // Wait for a free entry: the device frees them as it serves.
                loop {
                    let done: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                    if (n as u16).wrapping_sub(done) < SIZE {
                        break;
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::yield_now();
                }
                let i = (n % u64::from(SIZE)) as u16;
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&(DATA_START + u64::from(i) * 0x100).to_le_bytes());
                raw[8..12].copy_from_slice(&8u32.to_le_bytes());
                raw[12..14].copy_from_slice(&2u16.to_le_bytes());
                mem.write_slice(&raw, GuestAddress(desc + u64::from(i) * 16))
                    .unwrap();
                mem.write_obj(i, GuestAddress(avail + 4 + u64::from(i) * 2))
                    .unwrap();
                fence(Ordering::SeqCst);
                mem.write_obj((n + 1) as u16, GuestAddress(avail + 2))
                    .unwrap();
                // Publish, then look at the flag (virtio 1.2, 2.7.13: a full barrier between).
                fence(Ordering::SeqCst);
                let flags: u16 = mem.read_obj(GuestAddress(used)).unwrap();
                if flags & USED_F_NO_NOTIFY == 0 {
                    kicks.fetch_add(1, Ordering::Relaxed);
                    kick.write(1).unwrap();
                }
            }
        })
    };
    // The device's event loop: sleep until kicked, serve, again.
    let evt = d.transport.queue_events()[0].try_clone().unwrap();
    let mut served = 0u64;
    let mut idle_since = Instant::now();
    while served < CHAINS {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&evt),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready > 0 {
            let _ = evt.read();
            d.process(0);
            served += d.used(0).len() as u64;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    assert_eq!(
        served, CHAINS,
        "the device slept with chains in its ring and no kick coming: a lost wakeup"
    );
    // How many kicks the flag saved depends on the two threads' timing: not asserted.
    assert!(kicks.load(Ordering::Relaxed) <= CHAINS);
}

/// Writes the kernel makes through a device's iovecs are out of vm-memory's sight: the
/// iovec marks its buffer written when made, and `mark_written` marks what an asynchronous
/// transfer filled, so that a live migration sends those pages again.
#[test]
fn device_buffers_are_marked_written_for_a_migration() {
    use vm_memory::GuestMemoryBackend;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let region = mem.iter().next().unwrap();
    let bitmap = std::ops::Deref::deref(region).bitmap();
    bitmap.reset();
    let iov = chain::iovec(
        &mem,
        &chain::Segment {
            addr: GuestAddress(0x3000),
            len: 0x1800,
        },
    )
    .unwrap();
    assert_eq!(bitmap.get_and_reset()[0], 0b11000, "pages 3 and 4");
    chain::mark_written(&mem, &[iov]);
    assert_eq!(bitmap.get_and_reset()[0], 0b11000);
    // Writes through vm-memory mark by themselves.
    mem.write_obj(7u32, GuestAddress(0x9000)).unwrap();
    assert_eq!(bitmap.get_and_reset()[0], 1 << 9);
}
