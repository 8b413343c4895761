//! Descriptor chains as flat lists, and guest buffers as host iovecs: what every device's
//! request parser starts from.

use arch::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::device::DeviceError;

/// A descriptor as the chain gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub device_writable: bool,
}

/// One guest buffer: where, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The next chain the driver made available, for a device that reads the chain itself.
///
/// This is where every device's drain loop ends, and the one place that turns the driver's
/// notifications back on. The transport turns them off before it hands a notified queue to
/// its device ([`super::MmioTransport::process_queue`]): VIRTQ_USED_F_NO_NOTIFY in the used
/// ring, or with EVENT_IDX an avail_event left behind, so that the driver does not kick for
/// chains it adds while the device is working through the ring. With the ring found empty,
/// notifications are re-enabled and the ring is checked once more, so that a chain the driver
/// added just before (seeing the flag still set, it did not kick) is served now rather than
/// lost. A device that stops before the ring is empty (a rate limiter, no free slot, nothing
/// to receive) leaves them off: the event that lets it go on (the limiter's timer, a
/// completion, a readable tap) drains the ring to here.
///
/// The loop is bounded: each turn either returns a chain (the ring's index moves on) or
/// re-reads the avail index, and a second empty look after notifications were re-enabled
/// ends it (only a driver moving its avail index back gets there). An avail index too far
/// ahead, or rings outside memory, are errors, as the queue reports them.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    for _ in 0..2 {
        if let Some(chain) = queue.iter(mem)?.next() {
            return Ok(Some(chain));
        }
        #[cfg(test)]
        tests::in_the_window();
        if !queue.enable_notification(mem)? {
            return Ok(None);
        }
    }
    Ok(None)
}

/// The next chain the driver made available on queue `index`: its head and descriptors
/// ([`next_chain`], which re-enables notifications once the ring is empty). A broken ring (an
/// avail index far ahead of the queue) is an error: the device then needs a reset.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
) -> Result<Option<(u16, Vec<Descriptor>)>, DeviceError> {
    let mut descs = Vec::new();
    Ok(pop_into(queue, mem, index, &mut descs)?.map(|head| (head, descs)))
}

/// VIRTQ_DESC_F_NEXT and VIRTQ_DESC_F_INDIRECT.
const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;

/// Whether the chain at `head` uses an indirect table. No Keel device offers
/// VIRTIO_RING_F_INDIRECT_DESC, so a driver that uses one breaks the rules, and virtio-queue
/// would follow it all the same: the chain is read here, directly from the descriptor table,
/// at most a queue's worth of descriptors. An unreadable descriptor counts as not indirect
/// (virtio-queue's own walk reports it).
fn uses_indirect(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> bool {
    let table = queue.desc_table();
    let mut index = head;
    for _ in 0..queue.size() {
        let at = table.wrapping_add(u64::from(index) * 16);
        let mut raw = [0u8; 4];
        if mem
            .read_slice(&mut raw, GuestAddress(at.wrapping_add(12)))
            .is_err()
        {
            return false;
        }
        let flags = u16::from_le_bytes([raw[0], raw[1]]);
        if flags & DESC_F_INDIRECT != 0 {
            return true;
        }
        if flags & DESC_F_NEXT == 0 {
            return false;
        }
        index = u16::from_le_bytes([raw[2], raw[3]]);
    }
    false
}

/// [`pop`], with the descriptors put in `descs` (cleared first), so that a device reusing
/// the buffer pops without allocating. Returns the head. virtio-queue ends the walk at a
/// loop, a bad index or a bad indirect table; what comes out is bounded by the queue size.
/// A chain with an indirect table (never negotiated) comes out empty: the device answers
/// it as the malformed chain it is.
pub fn pop_into(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
    descs: &mut Vec<Descriptor>,
) -> Result<Option<u16>, DeviceError> {
    descs.clear();
    let Some(chain) = next_chain(queue, mem).map_err(|e| DeviceError::queue(index, e))? else {
        return Ok(None);
    };
    let head = chain.head_index();
    if uses_indirect(queue, mem, head) {
        return Ok(Some(head));
    }
    descs.extend(chain.map(|d| Descriptor {
        addr: d.addr().0,
        len: d.len(),
        device_writable: d.is_write_only(),
    }));
    Ok(Some(head))
}

/// The host iovec for one guest buffer; None if any part lies outside guest RAM. The buffer
/// is marked written in guest memory's dirty bitmap: the kernel may write through the iovec
/// (a read from a disk or tap) where vm-memory cannot see it. The synchronous users write in
/// the same turn of the event loop; an asynchronous one marks again when the write completed
/// ([`mark_written`]).
pub fn iovec(mem: &GuestMemoryMmap, segment: &Segment) -> Option<libc::iovec> {
    let slice = mem.get_slice(segment.addr, segment.len as usize).ok()?;
    slice.bitmap().mark_dirty(0, segment.len as usize);
    Some(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: segment.len as usize,
    })
}

/// Marks the guest memory behind host iovecs (made by [`iovec`]) as written, once an
/// asynchronous transfer into them has completed: a live migration must send those pages
/// again, and KVM's log sees only what the vCPUs write.
pub fn mark_written(mem: &GuestMemoryMmap, iov: &[libc::iovec]) {
    for v in iov {
        let start = v.iov_base as usize;
        for region in mem.iter() {
            let base = region.as_ptr() as usize;
            if start >= base && start - base < region.len() as usize {
                region.bitmap().mark_dirty(start - base, v.iov_len);
                break;
            }
        }
    }
}

/// Host iovecs for guest buffers; None if any part lies outside guest RAM.
pub fn iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<Vec<libc::iovec>> {
    segments.iter().map(|s| iovec(mem, s)).collect()
}

/// Total length of the segments.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

#[cfg(test)]
mod tests;
