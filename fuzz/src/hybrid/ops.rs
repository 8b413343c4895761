//! The operations that add chains and change what the device sees: a request chain decoded
//! from the input (op 0-5), the image file cut behind the device's back (op 7), a chain in
//! flight made available again (op 12).

use devices::virtio::block::request::{
    parse, Descriptor, RequestKind, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::model::{in_memory, overlaps, range_of, Chain};
use super::{trace, Run, DATA, DATA_LEN, HEADERS, MAX_CHAINS, MEM_SIZE, SENTINEL, STATUSES};
use crate::{Input, DISK_BYTES};

impl Run {
    /// Adds a chain (op 0-5). `kind % 8`: read, write, flush, get-id, discard, write-zeroes,
    /// type 99, read; `kind / 8 % 4`: notify as the protocol says (0, 3), not at all (1),
    /// always (2). `sector`: `sector % 136`, 255 for u64::MAX. `shape`: `& 15 % 5` data buffers,
    /// bit 4 header in two descriptors, bit 5 no status descriptor, bit 6 an 8-byte header,
    /// bit 7 a device-readable status descriptor. Discard and write-zeroes: `segment` gives
    /// the segment's sectors (`% 24`) and flags (`/ 32`). A data buffer: `place % 4`: in the
    /// data area at `offset * 64`, at the address of an earlier buffer, over the end of
    /// memory, outside memory; `place` bit 2 turns its direction around; `len`: `len % 17`
    /// sectors, or with bit 7 `(len & 0x7f) * 4 + 1` bytes.
    pub fn add(&mut self, input: &mut Input) {
        let kind_byte = input.u8();
        let sector_byte = input.u8();
        let shape = input.u8();
        let kind = match kind_byte % 8 {
            0 | 7 => VIRTIO_BLK_T_IN,
            1 => VIRTIO_BLK_T_OUT,
            2 => VIRTIO_BLK_T_FLUSH,
            3 => VIRTIO_BLK_T_GET_ID,
            4 => VIRTIO_BLK_T_DISCARD,
            5 => VIRTIO_BLK_T_WRITE_ZEROES,
            _ => 99,
        };
        let notify = (kind_byte / 8) % 4;
        let sector = match sector_byte {
            255 => u64::MAX,
            s => u64::from(s) % 136,
        };
        let segment = if matches!(kind, VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) {
            Some(input.u8())
        } else {
            None
        };
        let n = self.chains.len();
        let writes_data = kind != VIRTIO_BLK_T_IN && kind != VIRTIO_BLK_T_GET_ID;
        let header = HEADERS + 32 * n as u64;
        let status = STATUSES + n as u64;

        let mut descs = Vec::new();
        let header_len = if shape & 0x40 != 0 { 8 } else { 16 };
        if shape & 0x10 != 0 {
            descs.push((header, 5, false));
            descs.push((header + 5, header_len - 5, false));
        } else {
            descs.push((header, header_len, false));
        }
        if let Some(seg) = segment {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(seg % 24).to_le_bytes());
            raw[12..].copy_from_slice(&u32::from(seg / 32).to_le_bytes());
            self.d
                .mem
                .write_slice(&raw, GuestAddress(header + 16))
                .expect("segment");
            descs.push((header + 16, 16, false));
        }
        for _ in 0..(shape & 0x0f) % 5 {
            let place = input.u8();
            let offset = input.u16();
            let len = input.u8();
            let addr = match place % 4 {
                0 => DATA + (u64::from(offset) * 64) % DATA_LEN,
                1 => match self.history.len() {
                    0 => DATA,
                    h => self.history[usize::from(offset) % h],
                },
                2 => MEM_SIZE - 1 - u64::from(offset) % 4096,
                _ if offset & 1 == 0 => MEM_SIZE + u64::from(offset) * 4096,
                _ => u64::MAX - u64::from(offset),
            };
            self.history.push(addr);
            let len = if len & 0x80 == 0 {
                u32::from(len % 17) * 512
            } else {
                u32::from(len & 0x7f) * 4 + 1
            };
            // With the 8-byte header every data buffer is writable: the header stays short,
            // whatever the guest buffers hold (parsing must not depend on them).
            let writable = shape & 0x40 != 0 || (!writes_data ^ (place & 4 != 0));
            descs.push((addr, len, writable));
        }
        if shape & 0x20 == 0 {
            descs.push((status, 1, shape & 0x80 == 0));
        }
        if descs.len() > self.free.len()
            || self.outstanding() >= u32::from(self.size)
            || n >= MAX_CHAINS
        {
            return; // No room: a driver would wait.
        }

        // The request in guest memory: header, status sentinel.
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.d
            .mem
            .write_slice(&raw, GuestAddress(header))
            .expect("header");
        self.d
            .mem
            .write_obj(SENTINEL, GuestAddress(status))
            .expect("status");
        let descriptors: Vec<Descriptor> = descs
            .iter()
            .map(|&(addr, len, device_writable)| Descriptor {
                addr,
                len,
                device_writable,
            })
            .collect();
        let parsed = parse(&descriptors, &self.d.mem);

        // A write's data: a pattern of this chain, put in its source buffers now.
        if let Ok(req) = &parsed {
            if req.kind == RequestKind::Write {
                for (k, s) in req.data.iter().enumerate() {
                    if in_memory(s.addr.0, s.len) {
                        let fill: Vec<u8> = (0..s.len)
                            .map(|i| (n as u32 * 37 + k as u32 * 11 + i * 7 + i / 512) as u8)
                            .collect();
                        self.d.mem.write_slice(&fill, s.addr).expect("fill");
                    }
                }
            }
        }

        let mut chain = Chain {
            head: 0,
            entries: Vec::new(),
            writable: descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum(),
            status: None,
            expect_status: None,
            expect_len: None,
            instances: 1,
            result: None,
            ranges: descs
                .iter()
                .filter(|d| d.0 >= DATA)
                .map(|&(a, l, w)| {
                    let r = range_of(a, l);
                    (r.0, r.1, w)
                })
                .collect(),
            tainted: false,
            contended: false,
            read: None,
            write: None,
        };
        self.predict(&mut chain, &parsed, &descriptors, status);

        // Guest buffers shared with a chain in flight, or that an orphan may still fill.
        let mine: Vec<(u64, u64)> = chain.ranges.iter().map(|r| (r.0, r.1)).collect();
        for (i, a) in mine.iter().enumerate() {
            if mine[..i].iter().any(|&b| overlaps(*a, b))
                || self.poisoned_mem.iter().any(|&b| overlaps(*a, b))
            {
                chain.tainted = true;
            }
        }
        let disk_of =
            |c: &Chain| -> Option<(u64, u64)> { c.write.as_ref().map(|(r, _)| (r.start, r.end)) };
        let my_write = disk_of(&chain);
        let my_read = chain.read.as_ref().map(|(r, _, _)| (r.start, r.end));
        for &c in self.live.values() {
            let other = &mut self.chains[c];
            if other
                .ranges
                .iter()
                .any(|r| mine.iter().any(|&m| overlaps(m, (r.0, r.1))))
            {
                other.tainted = true;
                chain.tainted = true;
            }
            let other_write = other.write.as_ref().map(|(r, _)| (r.start, r.end));
            let other_read = other.read.as_ref().map(|(r, _, _)| (r.start, r.end));
            if let Some(w) = my_write {
                if other_write.is_some_and(|o| overlaps(w, o)) {
                    other.contended = true;
                    chain.contended = true;
                }
                if other_read.is_some_and(|o| overlaps(w, o)) {
                    other.contended = true;
                }
            }
            if let Some(r) = my_read {
                if other_write.is_some_and(|o| overlaps(r, o)) {
                    chain.contended = true;
                }
            }
        }

        // Into the descriptor table, on free entries, in any order.
        let entries: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("free entry"))
            .collect();
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let more = i + 1 < descs.len();
            let flags = u16::from(more) | if writable { 2 } else { 0 };
            let next = if more { entries[i + 1] } else { 0 };
            self.d.write_desc(0, entries[i], addr, len, flags, next);
        }
        chain.head = entries[0];
        chain.entries = entries;
        let head = chain.head;
        if trace() {
            eprintln!(
                "add chain {n}: head {head} type {kind} sector {sector} notify {notify} \
                 {descs:x?}: {:?}; expect status {:?} len {:?}; tainted {} contended {}",
                parsed.as_ref().map(|r| (&r.kind, r.data_len)),
                chain.expect_status,
                chain.expect_len,
                chain.tainted,
                chain.contended
            );
        }
        self.live.insert(head, self.chains.len());
        self.chains.push(chain);
        self.epoch_chains += 1;
        self.make_available(head, notify);
    }

    /// Cuts the image file to `sectors % 129` sectors (op 7). Requests in flight may meet
    /// either length: their outcome and data are no longer certain.
    pub fn cut(&mut self, sectors: u8) {
        let len = u64::from(sectors % 129) * 512;
        if trace() {
            eprintln!("cut the file to {len} bytes");
        }
        crate::set_image_len(self.dir, len);
        self.file_len = len;
        for &c in self.live.values() {
            let chain = &mut self.chains[c];
            chain.expect_status = None;
            chain.expect_len = None;
            chain.contended = true;
        }
        // Bytes past the end read as zeroes once writes make the file longer again.
        for b in len..DISK_BYTES {
            if !self.poisoned_disk[b as usize] {
                self.shadow[b as usize] = Some(0);
            }
        }
    }

    /// Makes an outstanding chain available again while it is in flight (op 12).
    pub fn republish(&mut self, input: &mut Input) {
        let pick = input.u8();
        if self.live.is_empty() || self.outstanding() >= u32::from(self.size) {
            return;
        }
        let mut heads: Vec<u16> = self.live.keys().copied().collect();
        heads.sort_unstable();
        let head = heads[usize::from(pick) % heads.len()];
        let c = self.live[&head];
        let chain = &mut self.chains[c];
        chain.instances += 1;
        // Two requests on the same buffers and sectors: the data is anyone's.
        chain.tainted = true;
        chain.contended = true;
        self.make_available(head, pick / 128);
    }
}
