//! The 8250 serial port (COM1), `vm-superio`'s device with an input queue in front of its
//! 64-byte receive FIFO: host input waits in the queue until the guest drains the FIFO, so
//! pasting into the console loses nothing unless the guest stops reading for a long time.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Input held for the guest beyond the FIFO; past this the oldest bytes are dropped.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Raises the serial interrupt by writing an eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("raising the serial interrupt failed: {0}")]
    Interrupt(io::Error),
}

/// Whether queued input reached the guest's FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialInputReady {
    pub dropped: usize,
}

pub struct SerialDevice {
    pub(super) serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    pub(super) pending: VecDeque<u8>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(interrupt), out),
            pending: VecDeque::new(),
        }
    }

    /// A guest read of register `offset`; reading the receive buffer makes room for input.
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.serial.read(offset);
        // A failed interrupt leaves the bytes in the FIFO for the guest's next poll.
        let _ = self.refill_fifo();
        value
    }

    /// A guest write of register `offset`. Output the host cannot take is dropped: a guest
    /// must never stall because nobody reads its console.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<(), Error> {
        match self.serial.write(offset, value) {
            Ok(()) => Ok(()),
            Err(vm_superio::serial::Error::Trigger(e)) => Err(Error::Interrupt(e)),
            Err(_) => Ok(()),
        }
    }

    /// Queues host input for the guest and moves what fits into the FIFO.
    pub fn queue_input(&mut self, bytes: &[u8]) -> Result<SerialInputReady, Error> {
        self.pending.extend(bytes);
        let dropped = self.pending.len().saturating_sub(MAX_PENDING_INPUT);
        self.pending.drain(..dropped);
        self.refill_fifo()?;
        Ok(SerialInputReady { dropped })
    }

    fn refill_fifo(&mut self) -> Result<(), Error> {
        let room = self.serial.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return Ok(());
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        match self.serial.enqueue_raw_bytes(&chunk) {
            Ok(_) => Ok(()),
            Err(vm_superio::serial::Error::Trigger(e)) => Err(Error::Interrupt(e)),
            Err(_) => Ok(()),
        }
    }

    /// Bytes waiting for the guest, in the queue (not counting the FIFO).
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const DATA: u8 = 0;
    const LSR: u8 = 5;
    const LSR_DATA_READY: u8 = 1;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Arc<Mutex<Vec<u8>>>, EventFd) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(Shared(out.clone())));
        (dev, out, irq)
    }

    #[test]
    fn guest_writes_reach_the_host() {
        let (mut dev, out, _) = device();
        for b in b"PROBE start\n" {
            dev.write(DATA, *b).unwrap();
        }
        assert_eq!(&*out.lock().unwrap(), b"PROBE start\n");
    }

    #[test]
    fn input_larger_than_the_fifo_arrives_whole_and_in_order() {
        let (mut dev, _, irq) = device();
        // Enable the "received data available" interrupt (IER bit 0).
        dev.write(1, 1).unwrap();
        let input: Vec<u8> = (0..200u8).collect();
        let ready = dev.queue_input(&input).unwrap();
        assert_eq!(ready.dropped, 0);
        assert_eq!(irq.read().unwrap(), 1, "input raised the interrupt");
        let mut got = Vec::new();
        while dev.read(LSR) & LSR_DATA_READY != 0 {
            got.push(dev.read(DATA));
        }
        assert_eq!(got, input);
        assert_eq!(dev.pending_input(), 0);
    }

    #[test]
    fn a_guest_that_never_reads_bounds_the_queue() {
        let (mut dev, _, _) = device();
        let big = vec![b'x'; MAX_PENDING_INPUT + 500];
        let ready = dev.queue_input(&big).unwrap();
        assert!(ready.dropped >= 500 - 64);
        assert!(dev.pending_input() <= MAX_PENDING_INPUT);
    }
}
