//! The legacy devices' state for snapshots: the serial port's registers and the input still
//! queued for it, the CMOS RAM, and the power button's pending events. The i8042 and the
//! ACPI sleep registers keep none. A snapshot is hostile input: what is restored is checked
//! (vm-superio refuses an over-full FIFO).

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::rtc::CmosRtc;
use super::serial::{EventFdTrigger, SerialDevice, MAX_PENDING_INPUT};
use super::Ged;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the serial port's saved state is not valid: {0}")]
    Serial(String),
    #[error("{count} bytes of queued serial input is more than the {MAX_PENDING_INPUT} kept")]
    PendingInput { count: usize },
}

/// vm-superio's `SerialState`, as data that can be saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO.
    pub in_buffer: Vec<u8>,
    /// Host input queued behind the FIFO.
    pub pending: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    pub serial: SerialSnapshot,
    pub cmos_index: u8,
    pub cmos: Vec<u8>,
    pub ged_events: u8,
}

impl SerialDevice {
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// A serial port as it was saved, raising `interrupt` and writing to `out`.
    pub fn restore(
        saved: &SerialSnapshot,
        interrupt: EventFd,
        out: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, Error> {
        if saved.pending.len() > MAX_PENDING_INPUT {
            return Err(Error::PendingInput {
                count: saved.pending.len(),
            });
        }
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, EventFdTrigger(interrupt), NoEvents, out)
            .map_err(|e| Error::Serial(e.to_string()))?;
        Ok(Self {
            serial,
            pending: saved.pending.iter().copied().collect(),
        })
    }
}

impl CmosRtc {
    /// The selected register and the CMOS RAM (the clock's registers are read from the
    /// host's clock when the guest reads them, never from here).
    pub fn save(&self) -> (u8, Vec<u8>) {
        (self.index, self.nvram.to_vec())
    }

    /// Puts back what [`Self::save`] gave; a CMOS of another size is refused.
    pub fn restore(&mut self, index: u8, cmos: &[u8]) -> Result<(), String> {
        if cmos.len() != self.nvram.len() {
            return Err(format!(
                "the saved CMOS has {} bytes instead of {}",
                cmos.len(),
                self.nvram.len()
            ));
        }
        self.index = index & 0x7f;
        self.nvram.copy_from_slice(cmos);
        Ok(())
    }
}

impl Ged {
    pub fn pending(&self) -> u8 {
        self.events.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_pending(&self, events: u8) {
        self.events
            .store(events, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_restore_save_is_equal_and_garbage_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        serial.write(3, 0x03).unwrap(); // 8 bits, no parity
        serial.write(1, 0x01).unwrap(); // receive interrupt on
        serial.queue_input(b"hello").unwrap();
        let saved = serial.save();
        let back =
            SerialDevice::restore(&saved, irq.try_clone().unwrap(), Box::new(std::io::sink()))
                .unwrap();
        assert_eq!(back.save(), saved);
        let mut full = saved.clone();
        full.in_buffer = vec![0; 65];
        assert!(
            SerialDevice::restore(&full, irq.try_clone().unwrap(), Box::new(std::io::sink()))
                .is_err()
        );
        let mut flood = saved;
        flood.pending = vec![0; MAX_PENDING_INPUT + 1];
        assert!(SerialDevice::restore(&flood, irq, Box::new(std::io::sink())).is_err());

        let mut rtc = CmosRtc::new(64 << 20, 0);
        let (index, cmos) = rtc.save();
        let mut other = CmosRtc::new(1 << 30, 0);
        other.restore(index, &cmos).unwrap();
        assert_eq!(other.save(), rtc.save());
        assert!(rtc.restore(0, &[0; 64]).is_err());
    }
}
