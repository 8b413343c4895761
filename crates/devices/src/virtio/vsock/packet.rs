//! The vsock packet header (virtio 1.2, section 5.10.6) and the guest-facing parser: a transmit
//! chain becomes a copied header and a bounds-checked view of its payload, a receive chain a
//! place to write one. The `virtio-vsock` crate does the chain walking and the checks (header
//! in the head descriptor, payload in the head or the next descriptor, device-readable on
//! transmit and device-writable on receive, `len` no larger than the buffer or the limit);
//! this module copies the header once, so nothing the guest rewrites later is read again.

use std::ops::Deref;

use arch::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub use virtio_vsock::packet::PKT_HEADER_SIZE;

/// The host's address; the guest's comes from the configuration.
pub const HOST_CID: u64 = 2;

/// Socket types: only streams are served.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `OP_SHUTDOWN` flags: the sender will receive no more, will send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload of one packet in either direction (what Linux sends at most).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Why a chain was not a packet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed vsock packet: {0}")]
    Chain(virtio_vsock::packet::Error),
    #[error("receive buffer has no room for data after the header")]
    NoDataBuffer,
}

/// A packet header as plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// The header as the 44 bytes of the wire format.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header from its wire format (tests and tools; the device parses chains instead).
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A packet the guest sent: its header, copied, and its payload in guest memory (exactly
/// `header.len` bytes; `None` when `len` is 0).
pub struct TxPacket<'a, B: BitmapSlice> {
    pub header: Header,
    pub data: Option<VolatileSlice<'a, B>>,
}

/// Parses a transmit chain. Only the first one or two descriptors are looked at.
pub fn parse_tx<'a, T>(
    mem: &'a GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
) -> Result<TxPacket<'a, arch::GuestBitmapSlice<'a>>, Error>
where
    T: Deref,
    T::Target: vm_memory::GuestMemory,
{
    let pkt = VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(Error::Chain)?;
    let header = Header::of(&pkt);
    let data = if header.len == 0 {
        None
    } else {
        pkt.data_slice().copied()
    };
    Ok(TxPacket { header, data })
}

/// A receive buffer: where a header goes, and room for data after it.
pub struct RxBuffer<'a, B: BitmapSlice> {
    pkt: VsockPacket<'a, B>,
}

/// Parses a receive chain. Buffers without room for data are refused: every receive buffer
/// must be able to carry a data packet, or one bad buffer at the head of the ring would stall
/// every stream behind it.
pub fn parse_rx<'a, T>(
    mem: &'a GuestMemoryMmap,
    chain: &mut DescriptorChain<T>,
) -> Result<RxBuffer<'a, arch::GuestBitmapSlice<'a>>, Error>
where
    T: Deref,
    T::Target: vm_memory::GuestMemory,
{
    let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(Error::Chain)?;
    match pkt.data_slice() {
        Some(d) if !d.is_empty() => Ok(RxBuffer { pkt }),
        _ => Err(Error::NoDataBuffer),
    }
}

impl<'a, B: BitmapSlice> RxBuffer<'a, B> {
    /// Room for data, at most [`MAX_PKT_DATA`] bytes.
    pub fn data_capacity(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |d| d.len().min(MAX_PKT_DATA as usize))
    }

    /// The first `len` bytes of the data area (None if larger than the buffer).
    pub fn data(&self, len: usize) -> Option<VolatileSlice<'a, B>> {
        self.pkt.data_slice()?.subslice(0, len).ok()
    }

    /// Writes the header; returns the used length for the ring (header plus `header.len`).
    pub fn finish(&mut self, header: &Header) -> u32 {
        self.pkt
            .set_src_cid(header.src_cid)
            .set_dst_cid(header.dst_cid)
            .set_src_port(header.src_port)
            .set_dst_port(header.dst_port)
            .set_len(header.len)
            .set_type(header.type_)
            .set_op(header.op)
            .set_flags(header.flags)
            .set_buf_alloc(header.buf_alloc)
            .set_fwd_cnt(header.fwd_cnt);
        (PKT_HEADER_SIZE as u32).saturating_add(header.len)
    }
}
