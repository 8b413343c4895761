//! Parsing a virtio-blk request from a descriptor chain (virtio 1.2 section 5.2.6). This is a
//! guest-facing parser: every length, address and direction comes from a hostile guest and
//! is checked; bad requests become an error value, never a panic.
//!
//! Layout (any framing): 16 device-readable header bytes {type, reserved, sector}, then the
//! data (device-readable for writes, device-writable for reads), then one device-writable
//! status byte, which is the last writable byte of the chain.

use arch::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::chain::total_len;
pub use crate::virtio::chain::{Descriptor, Segment};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// Longest serial the GET_ID request returns.
pub const ID_BYTES: usize = 20;
/// Bytes of one discard / write-zeroes segment.
pub const SEGMENT_BYTES: usize = 16;
const HEADER_BYTES: usize = 16;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not implement: answered with UNSUPP.
    Unsupported(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// For reads: where the data goes. For writes, discard, write-zeroes: where it comes from.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the header needs {HEADER_BYTES} device-readable bytes, the chain has {0}")]
    ShortHeader(usize),
    #[error("reading the header from guest memory failed")]
    HeaderUnreadable,
    #[error("a descriptor's address range overflows")]
    Overflow,
    #[error("{0} request carries data in the wrong direction")]
    WrongDirection(&'static str),
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("a data buffer ({len} bytes at {addr:#x}) lies outside guest memory")]
    DataOutsideMemory { addr: u64, len: u64 },
}

impl ParseError {
    /// Whether the status byte can still be written to tell the guest.
    pub fn has_status(&self) -> bool {
        !matches!(self, ParseError::NoStatus | ParseError::Overflow)
    }
}

/// A parsed request without its data segments, which [`parse_into`] leaves in the caller's
/// buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub kind: RequestKind,
    pub sector: u64,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// The last device-writable descriptor that has bytes: it holds the status byte.
pub(super) fn status_descriptor(descs: &[Descriptor]) -> Option<(usize, &Descriptor)> {
    descs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, d)| d.device_writable && d.len > 0)
}

/// The device-readable bytes after the first `skip`, as segments appended to `out`. With
/// `out` None, only checks them; true if there are any.
fn readable_after(
    descs: &[Descriptor],
    skip: u64,
    mut out: Option<&mut Vec<Segment>>,
) -> Result<bool, ParseError> {
    let mut skip = skip;
    let mut any = false;
    for d in descs.iter().filter(|d| !d.device_writable) {
        let len = u64::from(d.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let addr = d.addr.checked_add(skip).ok_or(ParseError::Overflow)?;
        any = true;
        if let Some(out) = out.as_deref_mut() {
            out.push(Segment {
                addr: GuestAddress(addr),
                len: (len - skip) as u32,
            });
        }
        skip = 0;
    }
    Ok(any)
}

/// The device-writable bytes but the status byte, as segments; `status` is the index of the
/// status descriptor. With `out` None, only checks them; true if there are any.
fn writable_data(
    descs: &[Descriptor],
    status: usize,
    mut out: Option<&mut Vec<Segment>>,
) -> Result<bool, ParseError> {
    let mut any = false;
    for (i, d) in descs.iter().enumerate() {
        if !d.device_writable || d.len == 0 || i > status {
            continue;
        }
        let len = if i == status { d.len - 1 } else { d.len };
        if len == 0 {
            continue;
        }
        d.addr
            .checked_add(u64::from(len))
            .ok_or(ParseError::Overflow)?;
        any = true;
        if let Some(out) = out.as_deref_mut() {
            out.push(Segment {
                addr: GuestAddress(d.addr),
                len,
            });
        }
    }
    Ok(any)
}

/// Parses the descriptors of one chain, reading the header from guest memory.
pub fn parse(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, ParseError> {
    let mut data = Vec::new();
    let p = parse_into(descs, mem, &mut data)?;
    Ok(Request {
        kind: p.kind,
        sector: p.sector,
        data,
        data_len: p.data_len,
        status: p.status,
    })
}

/// [`parse`], with the data segments put in `data` (cleared first), so that a caller
/// reusing the buffer parses without allocating.
pub fn parse_into(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    data: &mut Vec<Segment>,
) -> Result<Parsed, ParseError> {
    data.clear();
    let (status_index, last) = status_descriptor(descs).ok_or(ParseError::NoStatus)?;
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(ParseError::Overflow)?;
    let has_writable = writable_data(descs, status_index, None)?;
    let readable_bytes: u64 = descs
        .iter()
        .filter(|d| !d.device_writable)
        .map(|d| u64::from(d.len))
        .sum();
    if readable_bytes < HEADER_BYTES as u64 {
        return Err(ParseError::ShortHeader(readable_bytes as usize));
    }
    // The header may span descriptors: gather its 16 bytes.
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    for d in descs.iter().filter(|d| !d.device_writable && d.len > 0) {
        if filled == HEADER_BYTES {
            break;
        }
        let take = (HEADER_BYTES - filled).min(d.len as usize);
        mem.read_slice(&mut header[filled..filled + take], GuestAddress(d.addr))
            .map_err(|_| ParseError::HeaderUnreadable)?;
        filled += take;
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let has_readable_data = readable_after(descs, HEADER_BYTES as u64, None)?;

    let kind = match kind {
        VIRTIO_BLK_T_IN => {
            if has_readable_data {
                return Err(ParseError::WrongDirection("read"));
            }
            writable_data(descs, status_index, Some(data))?;
            RequestKind::Read
        }
        VIRTIO_BLK_T_OUT => {
            if has_writable {
                return Err(ParseError::WrongDirection("write"));
            }
            readable_after(descs, HEADER_BYTES as u64, Some(data))?;
            RequestKind::Write
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            writable_data(descs, status_index, Some(data))?;
            RequestKind::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if has_writable {
                return Err(ParseError::WrongDirection("discard or write-zeroes"));
            }
            readable_after(descs, HEADER_BYTES as u64, Some(data))?;
            if kind == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            }
        }
        other => RequestKind::Unsupported(other),
    };
    let data_len = total_len(data);
    if matches!(kind, RequestKind::Read | RequestKind::Write)
        && !data_len.is_multiple_of(SECTOR_SIZE)
    {
        return Err(ParseError::PartialSector(data_len));
    }
    // Checked here, before anything is charged or started for the request: a buffer that
    // claims more than guest memory holds is refused as what it is, at no cost.
    if let Some(bad) = data
        .iter()
        .find(|s| !mem.check_range(s.addr, s.len as usize))
    {
        return Err(ParseError::DataOutsideMemory {
            addr: bad.addr.0,
            len: u64::from(bad.len),
        });
    }
    Ok(Parsed {
        kind,
        sector,
        data_len,
        status: GuestAddress(status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr,
            len,
            device_writable: false,
        }
    }

    fn w(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr,
            len,
            device_writable: true,
        }
    }

    #[test]
    fn read_request_in_three_descriptors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let req = parse(&[r(0x1000, 16), w(0x2000, 1024), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.kind, RequestKind::Read);
        assert_eq!(req.sector, 7);
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 1024
            }]
        );
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor_and_status_sharing_the_last() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        let req = parse(&[r(0x1000, 16 + 512), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.kind, RequestKind::Write);
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 1);
        let req = parse(&[r(0x1000, 16), w(0x2000, 513)], &m).unwrap();
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
        assert_eq!(req.status, GuestAddress(0x2200));
    }

    #[test]
    fn header_spanning_descriptors_is_read_whole() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0x1122_3344);
        // 10 bytes in one descriptor, 6 in the next, placed right after.
        let req = parse(&[r(0x1000, 10), r(0x100a, 6), w(0x3000, 1)], &m).unwrap();
        assert_eq!((req.kind, req.sector), (RequestKind::Flush, 0x1122_3344));
    }

    #[test]
    fn malformed_chains_are_errors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(parse(&[r(0x1000, 16)], &m), Err(ParseError::NoStatus));
        assert_eq!(
            parse(&[r(0x1000, 8), w(0x3000, 1)], &m),
            Err(ParseError::ShortHeader(8))
        );
        assert_eq!(
            parse(&[r(0x1000, 16), r(0x1800, 512), w(0x3000, 1)], &m),
            Err(ParseError::WrongDirection("read"))
        );
        assert_eq!(
            parse(&[r(0x1000, 16), w(0x2000, 100), w(0x3000, 1)], &m),
            Err(ParseError::PartialSector(100))
        );
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse(&[r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)], &m),
            Err(ParseError::WrongDirection("write"))
        );
        // Header outside guest memory.
        assert_eq!(
            parse(&[r(0x10_0000_0000, 16), w(0x3000, 1)], &m),
            Err(ParseError::HeaderUnreadable)
        );
        // Address arithmetic that would wrap.
        assert_eq!(
            parse(&[r(0x1000, 16), w(u64::MAX, 2)], &m),
            Err(ParseError::Overflow)
        );
    }

    #[test]
    fn unknown_types_are_unsupported_not_errors() {
        let m = mem();
        header(&m, 0x1000, 0xdead, 0);
        let req = parse(&[r(0x1000, 16), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.kind, RequestKind::Unsupported(0xdead));
    }
}
