//! The guest-facing checks of virtio-net chains: a transmit chain is device-readable only,
//! holds at least the 12-byte virtio-net header and at most a 64 KiB frame; a receive chain
//! is device-writable only and has room for the header.

use crate::virtio::chain::{Descriptor, Segment};
use vm_memory::GuestAddress;

/// `struct virtio_net_hdr_v1` (VERSION_1 always includes `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame Keel passes: a 64 KiB GSO frame, its Ethernet header and the virtio header.
pub const MAX_FRAME_LEN: usize = 65_536 + 14 + VNET_HDR_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a transmit chain has a device-writable buffer")]
    WritableInTransmit,
    #[error("a receive chain has a device-readable buffer")]
    ReadableInReceive,
    #[error("{0} bytes cannot hold the virtio-net header")]
    TooShort(u64),
    #[error("a {0}-byte frame is larger than {MAX_FRAME_LEN}")]
    TooLong(u64),
}

fn segments(descs: &[Descriptor]) -> (Vec<Segment>, u64) {
    let segs: Vec<Segment> = descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: GuestAddress(d.addr),
            len: d.len,
        })
        .collect();
    let total = segs.iter().map(|s| u64::from(s.len)).sum();
    (segs, total)
}

pub fn transmit(descs: &[Descriptor]) -> Result<Vec<Segment>, FrameError> {
    if descs.iter().any(|d| d.device_writable) {
        return Err(FrameError::WritableInTransmit);
    }
    let (segs, total) = segments(descs);
    if total < VNET_HDR_LEN as u64 {
        return Err(FrameError::TooShort(total));
    }
    if total > MAX_FRAME_LEN as u64 {
        return Err(FrameError::TooLong(total));
    }
    Ok(segs)
}

pub fn receive(descs: &[Descriptor]) -> Result<Vec<Segment>, FrameError> {
    if descs.iter().any(|d| !d.device_writable) {
        return Err(FrameError::ReadableInReceive);
    }
    let (segs, total) = segments(descs);
    if total < VNET_HDR_LEN as u64 {
        return Err(FrameError::TooShort(total));
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(addr: u64, len: u32, device_writable: bool) -> Descriptor {
        Descriptor {
            addr,
            len,
            device_writable,
        }
    }

    #[test]
    fn transmit_chains_are_checked() {
        assert_eq!(
            transmit(&[d(0x1000, 12, false), d(0x2000, 60, false)])
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            transmit(&[d(0x1000, 11, false)]),
            Err(FrameError::TooShort(11))
        );
        assert_eq!(
            transmit(&[d(0x1000, 12, false), d(0x2000, 8, true)]),
            Err(FrameError::WritableInTransmit)
        );
        let big = MAX_FRAME_LEN as u32;
        assert_eq!(
            transmit(&[d(0x1000, big, false), d(0x1000, 1, false)]),
            Err(FrameError::TooLong(big as u64 + 1))
        );
        assert_eq!(transmit(&[]), Err(FrameError::TooShort(0)));
    }

    #[test]
    fn receive_chains_are_checked() {
        assert_eq!(receive(&[d(0x1000, 2048, true)]).unwrap().len(), 1);
        assert_eq!(
            receive(&[d(0x1000, 2048, false)]),
            Err(FrameError::ReadableInReceive)
        );
        assert_eq!(receive(&[d(0x1000, 4, true)]), Err(FrameError::TooShort(4)));
        // Zero-length buffers are skipped, not passed to the kernel.
        assert_eq!(
            receive(&[d(0x1000, 0, true), d(0x2000, 64, true)])
                .unwrap()
                .len(),
            1
        );
    }
}
