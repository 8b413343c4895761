//! Descriptor chains as flat lists, and guest buffers as host iovecs: what every device's
//! request parser starts from.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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

/// The descriptors of a chain, in order. virtio-queue ends the walk at a loop, a bad index
/// or a bad indirect table; what comes out is bounded by the queue size.
pub fn descriptors<M>(chain: DescriptorChain<M>) -> Vec<Descriptor>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    chain
        .map(|d| Descriptor {
            addr: d.addr().0,
            len: d.len(),
            device_writable: d.is_write_only(),
        })
        .collect()
}

/// The next chain the driver made available on queue `index`: its head and descriptors.
/// With none left, notifications are re-enabled and the ring checked once more, so a chain
/// made available meanwhile is not missed (the EVENT_IDX race). A broken ring (an avail index
/// far ahead of the queue) is an error: the device then needs a reset.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
) -> Result<Option<(u16, Vec<Descriptor>)>, DeviceError> {
    let mut descs = Vec::new();
    Ok(pop_into(queue, mem, index, &mut descs)?.map(|head| (head, descs)))
}

/// [`pop`], with the descriptors put in `descs` (cleared first), so that a device reusing
/// the buffer pops without allocating. Returns the head.
pub fn pop_into(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
    descs: &mut Vec<Descriptor>,
) -> Result<Option<u16>, DeviceError> {
    descs.clear();
    loop {
        if let Some(chain) = queue
            .iter(mem)
            .map_err(|e| DeviceError::queue(index, e))?
            .next()
        {
            let head = chain.head_index();
            descs.extend(chain.map(|d| Descriptor {
                addr: d.addr().0,
                len: d.len(),
                device_writable: d.is_write_only(),
            }));
            return Ok(Some(head));
        }
        if !queue
            .enable_notification(mem)
            .map_err(|e| DeviceError::queue(index, e))?
        {
            return Ok(None);
        }
    }
}

/// Host iovecs for guest buffers; None if any part lies outside guest RAM.
pub fn iovecs(mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<Vec<libc::iovec>> {
    segments
        .iter()
        .map(|s| {
            let slice = mem.get_slice(s.addr, s.len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len as usize,
            })
        })
        .collect()
}

/// Total length of the segments.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}
