//! virtio-rng: fills every device-writable buffer the guest offers with bytes from the host
//! kernel's random number generator (getrandom).

use arch::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain;
use super::device::{DeviceError, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 64;
/// Most bytes served per request: a guest asking for more gets this much.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng;

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        let mut used_any = false;
        let mut random = vec![0u8; MAX_BYTES_PER_REQUEST];
        while let Some((head, descs)) = chain::pop(queue, mem, index)? {
            let mut budget = MAX_BYTES_PER_REQUEST;
            let mut written = 0u32;
            for desc in descs.iter().filter(|d| d.device_writable) {
                let len = (desc.len as usize).min(budget);
                if len == 0 {
                    break;
                }
                if fill_random(&mut random[..len]).is_err() {
                    break;
                }
                // A buffer outside guest memory ends the request with what was written.
                if mem
                    .write_slice(&random[..len], GuestAddress(desc.addr))
                    .is_err()
                {
                    break;
                }
                written += len as u32;
                budget -= len;
            }
            queue
                .add_used(mem, head, written)
                .map_err(|e| DeviceError::queue(index, e))?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::driver::{Buffer, Driver, DATA_START};

    #[test]
    fn fills_writable_buffers_and_skips_readable_ones() {
        let mut d = Driver::new(Box::new(Rng), 4 << 20);
        assert_eq!(d.read_reg(crate::virtio::mmio::REG_DEVICE_ID), 4);
        assert_ne!(d.init(0, 16) & crate::virtio::mmio::STATUS_DRIVER_OK, 0);
        d.mem
            .write_slice(&[0u8; 4096], GuestAddress(DATA_START))
            .unwrap();
        d.submit(
            0,
            &[
                Buffer {
                    addr: DATA_START,
                    len: 16,
                    writable: false,
                },
                Buffer {
                    addr: DATA_START + 0x100,
                    len: 1024,
                    writable: true,
                },
            ],
        );
        d.process(0);
        assert_eq!(d.used(0).first().map(|u| u.1), Some(1024));
        let mut ro = [0u8; 16];
        d.mem.read_slice(&mut ro, GuestAddress(DATA_START)).unwrap();
        assert_eq!(ro, [0; 16], "readable buffer untouched");
        let mut out = vec![0u8; 1024];
        d.mem
            .read_slice(&mut out, GuestAddress(DATA_START + 0x100))
            .unwrap();
        assert!(
            out.iter().filter(|&&b| b == 0).count() < 64,
            "random bytes, not zeroes"
        );
    }

    #[test]
    fn no_interrupt_flag_in_the_avail_ring_is_honoured() {
        let mut d = Driver::new(Box::new(Rng), 4 << 20);
        d.init(0, 16);
        let _ = d.irq.read();
        d.set_avail_flags(0, 1);
        d.submit(
            0,
            &[Buffer {
                addr: DATA_START,
                len: 8,
                writable: true,
            }],
        );
        d.process(0);
        assert_eq!(d.used(0).len(), 1);
        assert!(d.irq.read().is_err(), "the driver asked for no interrupt");
        d.set_avail_flags(0, 0);
        d.submit(
            0,
            &[Buffer {
                addr: DATA_START,
                len: 8,
                writable: true,
            }],
        );
        d.process(0);
        assert_eq!(d.used(0).len(), 1);
        assert_eq!(
            d.irq.read().unwrap(),
            1,
            "interrupts are back once the flag is clear"
        );
    }

    #[test]
    fn buffers_outside_memory_end_the_request_not_the_device() {
        let mut d = Driver::new(Box::new(Rng), 4 << 20);
        d.init(0, 16);
        d.submit(
            0,
            &[Buffer {
                addr: 0x1_0000_0000,
                len: 64,
                writable: true,
            }],
        );
        d.process(0);
        assert_eq!(d.used(0).first().map(|u| u.1), Some(0));
        d.submit(
            0,
            &[Buffer {
                addr: DATA_START,
                len: 8,
                writable: true,
            }],
        );
        d.process(0);
        assert_eq!(d.used(0).first().map(|u| u.1), Some(8));
    }
}
