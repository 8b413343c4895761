//! The i8042 keyboard controller, only so that a guest can reset the machine through it
//! (command 0xFE, "pulse reset line"), as PC guests do. The device is `vm-superio`'s.

use crate::{GuestRequest, RequestSink};

/// Turns the controller's reset signal into a reboot request.
pub struct ResetTrigger(pub RequestSink);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(GuestRequest::Reboot);
        Ok(())
    }
}

pub type I8042 = vm_superio::I8042Device<ResetTrigger>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn pulse_reset_command_requests_a_reboot() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut dev = I8042::new(ResetTrigger(Arc::new(move |r| {
            sink.lock().unwrap().push(r)
        })));
        // Offset 4 is the command port (0x64 from the base 0x60).
        dev.write(4, 0xfe).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![GuestRequest::Reboot]);
    }
}
