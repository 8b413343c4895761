//! Guest memory: anonymous mappings (reserved lazily, so only what the guest touches costs
//! host RAM) registered with KVM as memory slots.

use arch::layout::ram_regions;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mapping {mib} MiB of guest memory failed: {source}; ask for less memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("registering guest memory slot {slot} at {addr:#x} with KVM failed: {source}")]
    Register {
        slot: u32,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map {
        mib: mem_size >> 20,
        source,
    })
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let addr = region.start_addr().raw_value();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| Error::Register {
                slot,
                addr,
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: addr,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region describes a live mapping owned by `mem`, which outlives the VM:
        // the VMM keeps guest memory until the process exits.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| Error::Register {
            slot,
            addr,
            source,
        })?;
    }
    Ok(())
}
