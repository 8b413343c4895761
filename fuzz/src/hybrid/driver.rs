//! The driver's side: bring-up, the notification-suppression protocol, reading the used ring
//! and the interrupt, reset, and the final drain.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arch::GuestMemoryMmap;
use devices::virtio::block::{Block, COMPLETIONS};
use devices::virtio::driver::ring_addresses;
use devices::virtio::mmio::{REG_QUEUE_NOTIFY, REG_STATUS, STATUS_DRIVER_OK, STATUS_NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

use super::{
    totals, trace, Outcome, Run, DRAIN_LIMIT, SENTINEL, VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_USED_F_NO_NOTIFY,
};
use crate::{Driver, ImageDir, DISK_BYTES, MEM_SIZE};

impl Run {
    /// A device as `flags` say (see the target's input layout), brought up with a queue of
    /// `size` entries.
    pub fn new(flags: u8, size: u16) -> Self {
        let read_only = flags & 1 != 0;
        let dir = if flags & 4 != 0 {
            ImageDir::Disk
        } else {
            ImageDir::Shm
        };
        crate::set_image_len(dir, DISK_BYTES);
        let mut block = crate::hybrid_block(read_only, dir);
        if flags & 8 != 0 {
            block.set_reset_wait(Duration::ZERO);
        }
        // A few in-flight slots: chains beyond them wait in the ring for a completion.
        let slots = (flags & 0x10 != 0).then(|| u16::from(flags >> 5) + 1);
        if let Some(n) = slots {
            limit_in_flight(&mut block, n);
        }
        if trace() {
            eprintln!("flags {flags:#04x}: queue size {size}, in-flight slots {slots:?}");
        }
        let stats = block.stats();
        let mut d = Driver::new(Box::new(block), MEM_SIZE as usize);
        let event_idx = flags & 2 != 0;
        let mut features = d.device_features();
        if !event_idx {
            features &= !VIRTIO_RING_F_EVENT_IDX;
        }
        let mut run = Self {
            d,
            stats,
            event_idx,
            size,
            features,
            read_only,
            chains: Vec::new(),
            live: HashMap::new(),
            free: Vec::new(),
            avail_idx: 0,
            decided: 0,
            used_idx: 0,
            epoch_chains: 0,
            resets: 0,
            abandoned: Vec::new(),
            poisoned_mem: Vec::new(),
            shadow: vec![None; DISK_BYTES as usize],
            poisoned_disk: vec![false; DISK_BYTES as usize],
            history: Vec::new(),
            dir,
            file_len: DISK_BYTES,
            slots,
        };
        run.bring_up();
        run
    }

    fn bring_up(&mut self) {
        // Rings as a driver allocates them, zeroed whole: avail_event and used_event of an
        // earlier bring-up would otherwise hold back the first notification or interrupt.
        let (_, avail, used) = ring_addresses(0);
        for (at, len) in [(avail, 6 + 2 * 256), (used, 6 + 8 * 256)] {
            self.d
                .mem
                .write_slice(&vec![0u8; len], GuestAddress(at))
                .expect("rings");
        }
        let status = self.d.init(self.features, self.size);
        assert_eq!(
            status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
            STATUS_DRIVER_OK,
            "bring-up: status {status:#x}"
        );
        self.free = (0..self.size).rev().collect();
        self.avail_idx = 0;
        self.decided = 0;
        self.used_idx = 0;
        self.epoch_chains = 0;
        self.set_used_event();
        let _ = self.d.irq.read();
    }

    /// With EVENT_IDX: the driver wants an interrupt for the next used entry.
    fn set_used_event(&mut self) {
        if self.event_idx {
            let at = ring_addresses(0).1 + 4 + 2 * u64::from(self.size);
            self.d
                .mem
                .write_obj(self.used_idx, GuestAddress(at))
                .expect("used_event");
        }
    }

    pub(super) fn used_idx_in_memory(&self) -> u16 {
        self.d
            .mem
            .read_obj(GuestAddress(ring_addresses(0).2 + 2))
            .expect("used idx")
    }

    pub fn outstanding(&self) -> u32 {
        self.live.values().map(|&c| self.chains[c].instances).sum()
    }

    /// The driver decides, as the notification-suppression protocol says, whether the device
    /// needs a notification for what it made available since its last decision.
    fn notify_if_needed(&mut self) {
        let need = if self.event_idx {
            let event = self.d.avail_event(0);
            let (new, old) = (self.avail_idx, self.decided);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.d.used_flags(0) & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.decided = self.avail_idx;
        if need {
            self.d.write_reg(REG_QUEUE_NOTIFY, 0);
        }
    }

    pub fn notify(&mut self) {
        self.decided = self.avail_idx;
        self.d.write_reg(REG_QUEUE_NOTIFY, 0);
    }

    pub(super) fn make_available(&mut self, head: u16, notify: u8) {
        self.d.make_available(0, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        match notify {
            1 => {}
            2 => self.notify(),
            _ => self.notify_if_needed(),
        }
    }

    /// One round of the event loop, waiting at most `wait` (ops 8, 9 and 11).
    pub fn serve_events(&mut self, wait: Duration) {
        crate::serve_events(&mut self.d, wait);
        self.observe();
    }

    /// The completion event served though it may not have fired (op 10).
    pub fn serve_completions(&mut self) {
        self.d.transport.process_event(COMPLETIONS);
        self.observe();
    }

    /// The queue served without a notification (op 15).
    pub fn process(&mut self) {
        self.d.process(0);
        self.observe();
    }

    /// Reads what the device did in the last call: new used entries, the interrupt, the
    /// device status.
    pub(super) fn observe(&mut self) {
        let used = self.d.used(0);
        let irq = self.d.irq.read().is_ok();
        assert_eq!(
            self.d.transport.status() & STATUS_NEEDS_RESET,
            0,
            "the device gave up (DEVICE_NEEDS_RESET) on rings the driver kept intact"
        );
        if !used.is_empty() {
            assert!(
                irq,
                "{} used entries and no interrupt, though the driver asked for one",
                used.len()
            );
        }
        for (id, len) in used {
            self.used_idx = self.used_idx.wrapping_add(1);
            self.account(id, len);
        }
        self.set_used_event();
    }
    /// Status 0 with whatever is in flight, then the bring-up again (op 13).
    pub fn reset(&mut self) {
        let before = self.used_idx_in_memory();
        self.d.write_reg(REG_STATUS, 0);
        assert_eq!(self.d.transport.status(), 0);
        // Nothing completes into the reset queue, whatever the event loop serves.
        crate::serve_events(&mut self.d, Duration::ZERO);
        assert_eq!(
            self.used_idx_in_memory(),
            before,
            "used entries after the reset began"
        );
        let mut live: Vec<usize> = self.live.drain().map(|(_, c)| c).collect();
        live.sort_unstable();
        for c in live {
            let chain = &self.chains[c];
            if let Some(at) = chain.status {
                if chain.result.is_none() {
                    assert_eq!(
                        self.d.mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                        SENTINEL,
                        "a status byte written for a chain the reset abandoned"
                    );
                    self.abandoned.push(at);
                }
            }
            self.poisoned_mem
                .extend(chain.ranges.iter().filter(|r| r.2).map(|r| (r.0, r.1)));
            if let Some((disk, _)) = &chain.write {
                for b in disk.clone() {
                    self.poisoned_disk[b as usize] = true;
                    self.shadow[b as usize] = None;
                }
            }
        }
        self.resets += 1;
        self.bring_up();
    }

    /// Serves events until every chain is answered, as a driver waiting for them would: it
    /// notifies if the protocol says so, then only events that fire move anything (op 14 and
    /// the end of every input).
    pub fn drain(&mut self) {
        self.notify_if_needed();
        // Lost means nothing answered for DRAIN_LIMIT: with a few slots, chains waiting in the
        // ring are served one completion after another, which may take longer in all.
        let mut deadline = Instant::now() + DRAIN_LIMIT;
        let mut outstanding = self.outstanding();
        while outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut heads: Vec<u16> = self.live.keys().copied().collect();
                heads.sort_unstable();
                panic!(
                    "lost completion: heads {heads:?} still outstanding, none answered for \
                     {DRAIN_LIMIT:?} after the driver notified as the protocol says (used flags \
                     {:#x}, avail_event {}, avail idx {}, event_idx {}, in-flight slots {:?}); \
                     engine stats {:?}",
                    self.d.used_flags(0),
                    self.d.avail_event(0),
                    self.avail_idx,
                    self.event_idx,
                    self.slots,
                    self.stats
                );
            }
            crate::serve_events(&mut self.d, left.min(Duration::from_millis(50)));
            self.observe();
            let now = self.outstanding();
            if now < outstanding {
                deadline = Instant::now() + DRAIN_LIMIT;
            }
            outstanding = now;
        }
    }

    pub fn finish(mut self) -> Outcome {
        self.drain();
        let mem: GuestMemoryMmap = self.d.mem.clone();
        let used = self.used_idx_in_memory();
        let check = |mem: &GuestMemoryMmap, when: &str| {
            for &at in &self.abandoned {
                assert_eq!(
                    mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                    SENTINEL,
                    "a status byte written for a chain a reset abandoned ({when})"
                );
            }
        };
        check(&mem, "after the drain");
        let completed = self.chains[self.chains.len() - self.epoch_chains..]
            .iter()
            .map(|c| c.result.expect("answered"))
            .collect();
        let outcome = Outcome {
            completed,
            resets: self.resets,
        };
        totals(&self.stats);
        let abandoned = std::mem::take(&mut self.abandoned);
        // Dropping the device waits for orphans; they touch neither ring nor status byte.
        drop(self.d);
        crate::set_image_len(self.dir, DISK_BYTES);
        let after: u16 = mem
            .read_obj(GuestAddress(ring_addresses(0).2 + 2))
            .expect("used idx");
        assert_eq!(after, used, "used entries after the device was dropped");
        for at in abandoned {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(at)).expect("status"),
                SENTINEL,
                "a status byte written for a chain a reset abandoned (after the drop)"
            );
        }
        outcome
    }
}

/// The device's hook for fewer in-flight slots exists only in builds with `--cfg fuzzing`
/// (`fuzz/run.sh`, cargo-fuzz), not in Keel's API.
#[cfg(fuzzing)]
fn limit_in_flight(block: &mut Block, slots: u16) {
    block.limit_in_flight(slots);
}

#[cfg(not(fuzzing))]
fn limit_in_flight(_: &mut Block, _: u16) {
    panic!("blk_hybrid limits in-flight slots only when built with --cfg fuzzing (fuzz/run.sh)");
}
