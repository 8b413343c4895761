//! Descriptor chains as flat lists, and guest buffers as host iovecs: what every device's
//! request parser starts from.

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
