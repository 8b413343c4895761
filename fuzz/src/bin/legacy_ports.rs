//! Fuzz target: the guest's port I/O to the legacy devices, through the same dispatch the
//! vCPU threads use (`devices::legacy::LegacyBus`): the 8250 serial port (COM1), the i8042,
//! the CMOS RTC and the ACPI sleep and reset registers, with serial input from the host in
//! between. Any port, width and value; what must hold besides "no panic, no hang": a port
//! nobody owns reads all ones, bytes beyond the first of a wide read read all ones, and the
//! guest's requests are only power-off and reboot.
//!
//! Input: a sequence of operations, each `op: u8` then its arguments: `op % 4` 0: read
//! (`port: u16`, `width: u8`), 1: write (`port: u16`, `width: u8`, `value: u32`), 2: host
//! serial input (`len: u8` bytes, at most 64), 3: a port picked among the devices' own
//! (`which: u8`, `value: u8`, written then read back).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPmDevice, CmosRtc, LegacyBus, ResetTrigger, SerialDevice, I8042};
use devices::GuestRequest;
use keel_fuzz::{Encoder, Input, Seed};
use vmm_sys_util::eventfd::EventFd;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("legacy_ports", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

/// The ports of the devices on the bus (COM1, i8042, RTC, ACPI sleep control/status/reset).
const OWN_PORTS: [u16; 14] = [
    0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x60, 0x64, 0x70, 0x71, 0x3c0, 0x3c2,
];

fn owned(port: u16) -> bool {
    matches!(port, 0x3f8..=0x3ff | 0x60 | 0x64 | 0x70 | 0x71 | 0x3c0..=0x3c2)
}

/// What the run saw: (reads, guest requests).
#[derive(Debug, PartialEq)]
struct Outcome {
    reads: usize,
    requests: Vec<GuestRequest>,
}

fn run(data: &[u8]) -> Outcome {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let bus = LegacyBus {
        serial: Mutex::new(SerialDevice::new(irq, Box::new(std::io::sink()))),
        i8042: Mutex::new(I8042::new(ResetTrigger(Arc::new(move |r| {
            s1.lock().expect("requests").push(r)
        })))),
        rtc: Mutex::new(CmosRtc::new(64 << 20, 0)),
        acpi_pm: AcpiPmDevice::new(
            5,
            1,
            Arc::new(move |r| s2.lock().expect("requests").push(r)),
        ),
    };
    let mut input = Input::new(data);
    let mut reads = 0;
    for _ in 0..4096 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0 => {
                let port = input.u16();
                let width = [1, 2, 4][usize::from(input.u8() % 3)];
                let mut buf = [0u8; 4];
                bus.read(port, &mut buf[..width]);
                reads += 1;
                if !owned(port) {
                    assert_eq!(&buf[..width], &[0xff; 4][..width], "port {port:#x}");
                }
                assert!(
                    buf[1..width].iter().all(|b| *b == 0xff),
                    "wide read {port:#x}"
                );
            }
            1 => {
                let port = input.u16();
                let width = [1, 2, 4][usize::from(input.u8() % 3)];
                let value = input.u32().to_le_bytes();
                let _ = bus.write(port, &value[..width]);
            }
            2 => {
                let len = usize::from(input.u8() % 65);
                let _ = bus.serial_input(input.bytes(len));
            }
            _ => {
                let port = OWN_PORTS[usize::from(input.u8()) % OWN_PORTS.len()];
                let _ = bus.write(port, &[input.u8()]);
                let mut buf = [0u8; 1];
                bus.read(port, &mut buf);
                reads += 1;
            }
        }
    }
    let requests = seen.lock().expect("requests").clone();
    Outcome { reads, requests }
}

fn seeds() -> Vec<Seed<Outcome>> {
    let mut reset = Encoder::new();
    reset.u8(1).u16(0x64).u8(0).u32(0xfe);
    let mut poweroff = Encoder::new();
    poweroff.u8(1).u16(0x3c0).u8(0).u32((5 << 2) | (1 << 5));
    let mut serial = Encoder::new();
    // Line control (DLAB), divisor, 8N1, then input and reads of the receive buffer.
    serial
        .u8(1)
        .u16(0x3fb)
        .u8(0)
        .u32(0x80)
        .u8(1)
        .u16(0x3f8)
        .u8(0)
        .u32(1)
        .u8(1)
        .u16(0x3fb)
        .u8(0)
        .u32(0x03)
        .u8(2)
        .u8(3)
        .bytes(b"abc")
        .u8(0)
        .u16(0x3fd)
        .u8(0)
        .u8(0)
        .u16(0x3f8)
        .u8(0)
        .u8(0)
        .u16(0x3f8)
        .u8(2);
    let mut rtc = Encoder::new();
    rtc.u8(3)
        .u8(10)
        .u8(0x0d)
        .u8(3)
        .u8(11)
        .u8(0x00)
        .u8(0)
        .u16(0xcfc)
        .u8(2);
    vec![
        Seed {
            name: "i8042_reset",
            input: reset.finish(),
            expect: Outcome {
                reads: 0,
                requests: vec![GuestRequest::Reboot],
            },
        },
        Seed {
            name: "acpi_s5",
            input: poweroff.finish(),
            expect: Outcome {
                reads: 0,
                requests: vec![GuestRequest::PowerOff],
            },
        },
        Seed {
            name: "serial_setup_and_input",
            input: serial.finish(),
            expect: Outcome {
                reads: 3,
                requests: vec![],
            },
        },
        Seed {
            name: "rtc_and_an_unowned_port",
            input: rtc.finish(),
            expect: Outcome {
                reads: 3,
                requests: vec![],
            },
        },
    ]
}
