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

/// What announces a guest that moved to another host, as the tap takes it (a zeroed
/// virtio-net header first): a broadcast RARP request from its MAC (ethertype 0x8035,
/// hardware and target address the MAC, no IP), padded to Ethernet's 60 bytes. Switches
/// learn the MAC's new port from it; the guest's stack never sees it. QEMU's
/// announcement is the same frame.
pub fn announcement(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    // RARP: Ethernet hardware, IPv4 protocol, their lengths, op 3 (reverse request).
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes());
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(VNET_HDR_LEN + 60, 0);
    f
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
    fn an_announcement_is_a_broadcast_rarp_from_the_guest() {
        let mac = [0x52, 0x54, 1, 2, 3, 4];
        let f = announcement(&mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        assert!(
            f[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "no offload asked"
        );
        let eth = &f[VNET_HDR_LEN..];
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
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
