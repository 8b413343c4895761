//! The ACPI fixed-hardware registers of a hardware-reduced platform: the sleep control
//! register (a write of SLP_EN with the `\_S5_` sleep type powers off) and the reset register.

use crate::{GuestRequest, RequestSink};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control, sleep status and reset registers at consecutive I/O ports.
pub struct AcpiPmDevice {
    s5_sleep_type: u8,
    reset_value: u8,
    requests: RequestSink,
}

/// Register offsets from the device's first port.
pub const SLEEP_CONTROL: u16 = 0;
pub const SLEEP_STATUS: u16 = 1;
pub const RESET: u16 = 2;

impl AcpiPmDevice {
    pub fn new(s5_sleep_type: u8, reset_value: u8, requests: RequestSink) -> Self {
        Self {
            s5_sleep_type,
            reset_value,
            requests,
        }
    }

    pub fn read(&self, _offset: u16) -> u8 {
        // Sleep status: never "woken", nothing pending.
        0
    }

    pub fn write(&self, offset: u16, value: u8) {
        match offset {
            SLEEP_CONTROL
                if value & SLP_EN != 0
                    && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_sleep_type =>
            {
                (self.requests)(GuestRequest::PowerOff)
            }
            RESET if value == self.reset_value => (self.requests)(GuestRequest::Reboot),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (AcpiPmDevice, Arc<Mutex<Vec<GuestRequest>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (
            AcpiPmDevice::new(5, 1, Arc::new(move |r| sink.lock().unwrap().push(r))),
            seen,
        )
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (dev, seen) = device();
        dev.write(SLEEP_CONTROL, (5 << 2) | SLP_EN);
        assert_eq!(*seen.lock().unwrap(), vec![GuestRequest::PowerOff]);
    }

    #[test]
    fn other_sleep_states_and_missing_slp_en_do_nothing() {
        let (dev, seen) = device();
        dev.write(SLEEP_CONTROL, 5 << 2);
        dev.write(SLEEP_CONTROL, (3 << 2) | SLP_EN);
        dev.write(SLEEP_STATUS, 0xff);
        dev.write(RESET, 2);
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(dev.read(SLEEP_STATUS), 0);
    }

    #[test]
    fn reset_value_reboots() {
        let (dev, seen) = device();
        dev.write(RESET, 1);
        assert_eq!(*seen.lock().unwrap(), vec![GuestRequest::Reboot]);
    }
}
