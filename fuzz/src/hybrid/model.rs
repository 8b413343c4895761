//! The model: what each chain must get (status byte and used length where they are certain),
//! what it does to the disk, and a shadow of the disk that completed writes define; checking
//! each used entry against it.

use std::ops::Range;

use devices::virtio::block::request::{Descriptor, ParseError, RequestKind};
use vm_memory::{Bytes, GuestAddress};

use super::{trace, Run, IOERR, MEM_SIZE, OK, SENTINEL, UNSUPP};
use crate::DISK_BYTES;

/// How a chain changes the disk, if it does.
#[derive(Clone)]
pub(super) enum DiskWrite {
    /// These bytes (a write: its source buffers as filled).
    Data(Vec<u8>),
    /// Zeroes (write-zeroes).
    Zeroes,
    /// Something (discard).
    Unknown,
}

/// A read of these disk bytes, into these guest segments (address, length), expecting the
/// bytes the shadow held when it was added (None: unknown).
pub(super) type DiskRead = (Range<u64>, Vec<(u64, u32)>, Vec<Option<u8>>);

pub(super) struct Chain {
    pub(super) head: u16,
    /// Descriptor table entries it occupies.
    pub(super) entries: Vec<u16>,
    /// Sum of the writable descriptors' lengths.
    pub(super) writable: u64,
    /// The status byte the device must write before the used entry (in the harness's own
    /// status area), if there is one.
    pub(super) status: Option<u64>,
    pub(super) expect_status: Option<u8>,
    pub(super) expect_len: Option<u32>,
    /// Times made available and not yet used.
    pub(super) instances: u32,
    /// First used entry: status byte (if known) and length.
    pub(super) result: Option<(Option<u8>, u32)>,
    /// Guest ranges of its data buffers: [start, end).
    pub(super) ranges: Vec<(u64, u64, bool)>,
    /// Another chain in flight shares its guest buffers: its data is not checked.
    pub(super) tainted: bool,
    /// Another chain in flight writes its sectors: its data is not checked.
    pub(super) contended: bool,
    /// A read of these disk bytes, into these guest segments, expecting the bytes the shadow
    /// held when it was added.
    pub(super) read: Option<DiskRead>,
    /// A change of these disk bytes.
    pub(super) write: Option<(Range<u64>, DiskWrite)>,
}

pub(super) fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

pub(super) fn in_memory(addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len))
        .is_some_and(|end| end <= MEM_SIZE)
}

pub(super) fn range_of(addr: u64, len: u32) -> (u64, u64) {
    (addr, addr.saturating_add(u64::from(len)))
}

/// The disk bytes `sector` and `len` name, if all lie on the disk.
pub(super) fn disk_range(sector: u64, len: u64) -> Option<Range<u64>> {
    let start = sector.checked_mul(512)?;
    let end = start.checked_add(len.div_ceil(512) * 512)?;
    (end <= DISK_BYTES).then_some(start..start + len)
}

impl Run {
    pub(super) fn account(&mut self, id: u32, len: u32) {
        let head = u16::try_from(id).ok().filter(|&h| h < self.size);
        let Some(&c) = head.and_then(|h| self.live.get(&h)) else {
            panic!(
                "used entry for head {id}, which the driver does not have outstanding \
                 (outstanding: {:?})",
                self.live.keys().collect::<Vec<_>>()
            );
        };
        let chain = &mut self.chains[c];
        if trace() {
            eprintln!(
                "used: head {id} (chain {c}) len {len}, status byte {:?}",
                chain
                    .status
                    .map(|at| self.d.mem.read_obj::<u8>(GuestAddress(at)))
            );
        }
        assert!(chain.instances > 0);
        chain.instances -= 1;
        assert!(
            u64::from(len) <= chain.writable,
            "used length {len} of head {id} beyond the {} writable bytes offered",
            chain.writable
        );
        let status = chain.status.map(|at| {
            let s: u8 = self.d.mem.read_obj(GuestAddress(at)).expect("status byte");
            assert_ne!(
                s, SENTINEL,
                "used entry for head {id} without its status byte written"
            );
            assert!(s <= UNSUPP, "status byte {s} of head {id}");
            s
        });
        if let (Some(want), Some(got)) = (chain.expect_status, status) {
            assert_eq!(got, want, "status of head {id}");
        }
        if let Some(want) = chain.expect_len {
            assert_eq!(len, want, "used length of head {id}");
        }
        let first = chain.result.is_none();
        if first {
            chain.result = Some((status, len));
        }
        let clean = !chain.tainted && !chain.contended && status == Some(OK);
        if first && clean {
            if let Some((disk, segments, expect)) = &chain.read {
                let mut got = Vec::with_capacity(expect.len());
                for &(addr, len) in segments {
                    let mut buf = vec![0u8; len as usize];
                    self.d
                        .mem
                        .read_slice(&mut buf, GuestAddress(addr))
                        .expect("read buffer");
                    got.extend_from_slice(&buf);
                }
                for (i, (want, got)) in expect.iter().zip(&got).enumerate() {
                    if let Some(want) = want {
                        assert_eq!(
                            got,
                            want,
                            "head {id}: the read of disk bytes {disk:?} gave {got:#04x} at disk \
                             byte {}, the write that completed before it wrote {want:#04x}",
                            disk.start + i as u64
                        );
                    }
                }
            }
        }
        if chain.instances > 0 {
            return;
        }
        // Answered: the chain leaves, its descriptors are free, its write is in the file.
        let chain = &self.chains[c];
        self.live.remove(&chain.head);
        self.free.extend_from_slice(&chain.entries);
        if let Some((disk, what)) = &chain.write {
            let (start, disk, what) = (disk.start, disk.clone(), what.clone());
            if status == Some(OK) && !chain.contended && matches!(what, DiskWrite::Data(_)) {
                // A write that completed made the file at least this long (unless the file
                // was cut while it was in flight, which marks it contended).
                self.file_len = self.file_len.max(disk.end);
            }
            for b in disk {
                let i = b as usize;
                if self.poisoned_disk[i] {
                    continue;
                }
                self.shadow[i] = match (&what, clean) {
                    (DiskWrite::Data(data), true) => Some(data[(b - start) as usize]),
                    (DiskWrite::Zeroes, true) => Some(0),
                    _ => None,
                };
            }
        }
    }
    /// What the device must answer, where that is certain, and what the chain does to the
    /// disk and to guest memory.
    pub(super) fn predict(
        &self,
        chain: &mut Chain,
        parsed: &Result<devices::virtio::block::request::Request, ParseError>,
        descs: &[Descriptor],
        status_area: u64,
    ) {
        let req = match parsed {
            Err(e) => {
                // IOERR in the last writable byte, when there is one.
                let at = e
                    .has_status()
                    .then(|| {
                        descs
                            .iter()
                            .rev()
                            .find(|d| d.device_writable && d.len > 0)
                            .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1))
                    })
                    .flatten();
                if at == Some(status_area) {
                    chain.status = at;
                    chain.expect_status = Some(IOERR);
                    chain.expect_len = Some(1);
                } else if at.is_none() {
                    chain.expect_len = Some(0);
                }
                return;
            }
            Ok(req) => req,
        };
        if req.status.0 == status_area {
            chain.status = Some(status_area);
        }
        let data_in_memory = req.data.iter().all(|s| in_memory(s.addr.0, s.len));
        let range = disk_range(req.sector, req.data_len);
        let (status, written) = match req.kind {
            RequestKind::Read | RequestKind::Write => {
                let write = req.kind == RequestKind::Write;
                match range {
                    _ if write && self.read_only => (Some(IOERR), 0),
                    None => (Some(IOERR), 0),
                    Some(_) if req.data_len == 0 => (Some(OK), 0),
                    Some(_) if !data_in_memory => (Some(IOERR), 0),
                    // The file was cut short: the read may fail, or find it written again.
                    Some(range) if range.end > self.file_len && !write => (None, 0),
                    Some(range) => {
                        let segments: Vec<(u64, u32)> =
                            req.data.iter().map(|s| (s.addr.0, s.len)).collect();
                        if write {
                            let mut data = Vec::with_capacity(req.data_len as usize);
                            for &(addr, len) in &segments {
                                let mut buf = vec![0u8; len as usize];
                                self.d
                                    .mem
                                    .read_slice(&mut buf, GuestAddress(addr))
                                    .expect("source");
                                data.extend_from_slice(&buf);
                            }
                            chain.write = Some((range, DiskWrite::Data(data)));
                            (Some(OK), 0)
                        } else {
                            let expect =
                                self.shadow[range.start as usize..range.end as usize].to_vec();
                            chain.read = Some((range, segments, expect));
                            (Some(OK), req.data_len as u32)
                        }
                    }
                }
            }
            RequestKind::Flush => (Some(OK), 0),
            RequestKind::Unsupported(_) => (Some(UNSUPP), 0),
            RequestKind::GetId => (None, 0),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.read_only {
                    (Some(IOERR), 0)
                } else if req.data_len != 16 {
                    (Some(UNSUPP), 0)
                } else {
                    // The segment is the harness's own (a data buffer cannot be 16 bytes).
                    let mut seg = [0u8; 16];
                    if self.d.mem.read_slice(&mut seg, req.data[0].addr).is_ok() {
                        let sector = u64::from_le_bytes(seg[..8].try_into().expect("8"));
                        let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4"));
                        if let Some(r) = disk_range(sector, u64::from(sectors) * 512) {
                            let what = if req.kind == RequestKind::WriteZeroes {
                                DiskWrite::Zeroes
                            } else {
                                DiskWrite::Unknown
                            };
                            chain.write = Some((r, what));
                        }
                    }
                    (None, 0)
                }
            }
        };
        if chain.status.is_some() {
            chain.expect_status = status;
            if status.is_some() {
                chain.expect_len = Some(written + 1);
            }
        }
    }
}
