//! The ACPI generic event device: a byte of pending events the guest's `_EVT` method reads
//! (reading clears it) after the GED's interrupt. Keel uses it for the power button.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub struct Ged {
    pub(super) events: AtomicU8,
    irqfd: EventFd,
}

impl Ged {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            events: AtomicU8::new(0),
            irqfd,
        }
    }

    /// Raises `events` (bits) and interrupts the guest.
    pub fn notify(&self, events: u8) -> std::io::Result<()> {
        self.events.fetch_or(events, Ordering::AcqRel);
        self.irqfd.write(1)
    }

    /// A guest read of register `offset`: the pending events at 0 (then cleared), else 0.
    pub fn read(&self, offset: u64) -> u8 {
        if offset == 0 {
            self.events.swap(0, Ordering::AcqRel)
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_interrupt_and_clear_on_read() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::new(irq.try_clone().unwrap());
        assert_eq!(ged.read(0), 0);
        ged.notify(1).unwrap();
        ged.notify(4).unwrap();
        assert_eq!(irq.read().unwrap(), 2, "one interrupt per event");
        assert_eq!(ged.read(1), 0, "only offset 0 holds events");
        assert_eq!(ged.read(0), 5);
        assert_eq!(ged.read(0), 0, "read clears");
    }
}
