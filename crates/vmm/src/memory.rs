//! Guest memory: shared mappings of one memfd (reserved lazily, so only what the guest
//! touches costs host RAM) registered with KVM as memory slots. A memfd, not anonymous
//! memory, so that another process can map the same pages: an upgrade hands the guest to a
//! new VMM without copying its memory. Region `i` lies in the memfd at the offset it has in a
//! snapshot's memory file less its header ([`file_offsets`]).
//!
//! Transparent huge pages on a memfd need the host's
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled` to be `advise` or `always` (this
//! development host: `never`, so guest memory is in 4 KiB pages whatever is advised).
//! With a `direct=on` disk the mappings are also advised `MADV_HUGEPAGE`, as QEMU and Cloud
//! Hypervisor advise all guest RAM: a direct read or write pins the guest pages it uses and
//! builds its bios from them, one segment for each physically contiguous run. A 1 MiB
//! request on 4 KiB pages is up to 256 segments (pinned one by one, and split in two
//! requests when they exceed the disk's limit, 254 on this host's virtio disk); on a
//! transparent huge page it is one. Measured (docs/benchmarks.md, direct=on): a 1 MiB
//! write's own time down 10-30% at the median, at QEMU's. It is left out without a direct
//! disk: buffered I/O copies through the page cache and gained nothing measurable, while
//! every 2 MiB the guest touches becomes resident whole (the idle probe: RssAnon 0.4 ->
//! 2.3 MiB).

use std::fs::File;
use std::os::fd::AsRawFd;

use arch::layout::ram_regions;
use arch::GuestMemoryMmap;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mapping {mib} MiB of guest memory failed: {source}; ask for less memory")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("making the guest's memory file (memfd) failed: {0}")]
    Memfd(String),
    #[error("mapping the snapshot's memory at guest address {addr:#x} failed: {reason}")]
    MapFile { addr: u64, reason: String },
    #[error("registering guest memory slot {slot} at {addr:#x} with KVM failed: {source}")]
    Register {
        slot: u32,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Makes `mem_size` bytes of guest memory and maps it; `huge_pages` asks for transparent
/// huge pages on it (see the module documentation). Guest memory is a new memfd (returned
/// too), except when huge pages are asked for and this host gives none to shared memory
/// (`shmem_huge_pages` false): then it is anonymous, as a direct disk's speed needs them
/// more than an upgrade needs a memfd (such a VM cannot be handed to a new VMM).
pub fn create(
    mem_size: u64,
    huge_pages: bool,
    shmem_huge_pages: bool,
) -> Result<(GuestMemoryMmap, Option<File>), Error> {
    if huge_pages && !shmem_huge_pages {
        let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map {
            mib: mem_size >> 20,
            source,
        })?;
        advise_huge_pages(&mem);
        return Ok((mem, None));
    }
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"keel-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: `fd` was just made by memfd_create and nothing else owns it.
    let memfd = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    memfd
        .set_len(mem_size)
        .map_err(|e| Error::Memfd(format!("sizing it to {mem_size} bytes: {e}")))?;
    let mem = map_shared(mem_size, &memfd)?;
    if huge_pages {
        advise_huge_pages(&mem);
    }
    Ok((mem, Some(memfd)))
}

/// Maps the guest memory held in `memfd` (made by [`create`], here or in another VMM).
pub fn map_shared(mem_size: u64, memfd: &File) -> Result<GuestMemoryMmap, Error> {
    let ranges = file_offsets(mem_size, 0)
        .into_iter()
        .map(|(addr, len, at)| {
            let file = memfd.try_clone().map_err(|e| Error::Memfd(e.to_string()))?;
            Ok((addr, len, Some(vm_memory::FileOffset::new(file, at))))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|source| Error::Map {
        mib: mem_size >> 20,
        source,
    })
}

/// `madvise(MADV_HUGEPAGE)` on every region. Only a hint: where it fails (a kernel without
/// transparent huge pages) the guest runs on small pages, and the VMM says so once.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: the range is one whole mapping owned by `mem`; MADV_HUGEPAGE changes only
        // how the kernel backs it, never its contents or its protection.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            eprintln!(
                "keel: asking for transparent huge pages on guest memory failed: {}; direct disk I/O goes through small pages",
                std::io::Error::last_os_error()
            );
            return;
        }
    }
}

/// Where a guest memory region lies in a snapshot's memory file: after a header page, the
/// regions one after the other, at their offset in guest RAM order.
pub fn file_offsets(mem_size: u64, header: u64) -> Vec<(GuestAddress, usize, u64)> {
    let mut offset = header;
    ram_regions(mem_size)
        .into_iter()
        .map(|(start, len)| {
            let at = offset;
            offset += len;
            (GuestAddress(start), len as usize, at)
        })
        .collect()
}

/// Maps guest memory privately from a snapshot's memory file: a page loads from the file
/// when the guest first touches it, and the guest's writes stay in this process.
pub fn map_private(
    mem_size: u64,
    file: &std::fs::File,
    header: u64,
) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    for (addr, len, at) in file_offsets(mem_size, header) {
        let fail = |e: String| Error::MapFile {
            addr: addr.raw_value(),
            reason: e,
        };
        let shared = file.try_clone().map_err(|e| fail(e.to_string()))?;
        // The bitmap is sized here: the builder's default one is empty and records nothing.
        let bitmap =
            <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(len);
        let region = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(shared, at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        regions.push(
            arch::GuestRegionMmap::new(region, addr)
                .ok_or_else(|| fail("the region does not fit the address space".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::MapFile {
        addr: 0,
        reason: e.to_string(),
    })
}

/// Which pages of the region at `base` (`len` bytes) the guest touched: the memfd's data
/// extents at `at` when guest memory is one (`SEEK_DATA` skips holes without looking at
/// them), else what `mincore` says is resident (a snapshot's private map).
fn touched_pages(
    memfd: Option<&std::fs::File>,
    at: u64,
    base: *const u8,
    len: usize,
) -> std::io::Result<Vec<bool>> {
    const PAGE: u64 = 4096;
    let pages = len.div_ceil(PAGE as usize);
    let Some(memfd) = memfd else {
        let mut resident = vec![0u8; pages];
        // SAFETY: `base` and `len` are one whole mapping owned by the caller's memory;
        // mincore writes one byte per page into a vector of that many bytes.
        if unsafe { libc::mincore(base.cast_mut().cast(), len, resident.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(resident.iter().map(|r| r & 1 != 0).collect());
    };
    let mut touched = vec![false; pages];
    let end = at + len as u64;
    let mut pos = at;
    while pos < end {
        let seek = |whence, from: u64| {
            // SAFETY: lseek on a descriptor the caller holds; no memory is passed.
            unsafe { libc::lseek(memfd.as_raw_fd(), from as libc::off_t, whence) }
        };
        let data = seek(libc::SEEK_DATA, pos);
        if data < 0 {
            // ENXIO: no data after `pos`.
            break;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        let hole = (seek(libc::SEEK_HOLE, data).max(0) as u64).clamp(data + 1, end);
        for page in (data - at) / PAGE..(hole - at).div_ceil(PAGE) {
            touched[page as usize] = true;
        }
        pos = hole;
    }
    Ok(touched)
}

/// Writes every page of `mem` that the guest touched and that is not all zeroes into `file`
/// at its place (see [`file_offsets`]), leaving holes elsewhere; returns the bytes written.
/// Pages the guest never touched are not even read (see [`touched_pages`]).
pub fn write_touched(
    mem: &GuestMemoryMmap,
    memfd: Option<&std::fs::File>,
    file: &std::fs::File,
    header: u64,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let mut written = 0;
    let mut offset = 0;
    for region in mem.iter() {
        let len = region.len() as usize;
        let base = region.as_ptr();
        let touched = touched_pages(memfd, offset, base, len)?;
        // SAFETY: the mapping is live for `mem`'s lifetime and the guest is paused: nothing
        // writes it while this reads it.
        let bytes = unsafe { std::slice::from_raw_parts(base, len) };
        let mut page = 0;
        while page < touched.len() {
            let wanted =
                |p: usize| touched[p] && bytes[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0);
            if !wanted(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < touched.len() && wanted(page) {
                page += 1;
            }
            let run = &bytes[first * PAGE..page * PAGE];
            file.write_all_at(run, header + offset + (first * PAGE) as u64)?;
            written += run.len() as u64;
        }
        offset += len as u64;
    }
    Ok(written)
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    register_with(vm, mem, 0)
}

/// Turns KVM's log of the pages the guest writes on or off for every slot (the groundwork
/// of a live migration's pre-copy). Writes the VMM's devices make are not in it.
pub fn log_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), Error> {
    register_with(
        vm,
        mem,
        if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    )
}

/// The pages the guest wrote since the last reading (a reading clears the log), one bitmap
/// per slot, a bit per 4 KiB page; the log must be on.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, Error> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            vm.get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| Error::Register {
                    slot: slot as u32,
                    addr: region.start_addr().raw_value(),
                    source,
                })
        })
        .collect()
}

/// Forgets what the VMM's devices wrote so far (a migration's tracking starts from here).
pub fn reset_device_writes(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

/// Every page written since the last reading, by the vCPUs (KVM's log, which must be on) or
/// by the VMM's devices (vm-memory's bitmap), as one bitmap over guest RAM in order (the
/// regions one after the other, as in the memfd): bit `i` is the page at RAM offset
/// `i * 4096`. Reading clears both.
pub fn dirty_bitmap(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, Error> {
    let total_pages: usize = mem.iter().map(|r| r.len() as usize / PAGE).sum();
    let mut out = vec![0u64; total_pages.div_ceil(64)];
    let mut first = 0usize;
    for (region, kvm) in mem.iter().zip(dirty_pages(vm, mem)?) {
        let pages = region.len() as usize / PAGE;
        let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
        // Guest memory is whole MiB and the regions split it at 3 GiB (`ram_regions`): each
        // region's words line up with the output's.
        debug_assert!(first.is_multiple_of(64));
        for (i, out) in out[first / 64..]
            .iter_mut()
            .take(pages.div_ceil(64))
            .enumerate()
        {
            *out |= kvm.get(i).copied().unwrap_or(0) | devices.get(i).copied().unwrap_or(0);
        }
        first += pages;
    }
    Ok(out)
}

const PAGE: usize = 4096;

fn register_with(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), Error> {
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
            flags,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice reaches the mapping: smaps lists the `hg` flag on the area holding it.
    #[test]
    fn huge_pages_are_advised_only_when_asked() {
        let flagged = |mem: &GuestMemoryMmap| {
            let addr = mem.iter().next().unwrap().as_ptr() as usize;
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
                if let Some((lo, hi)) = range {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
                if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                    return flags.split_whitespace().any(|f| f == "hg");
                }
            }
            panic!("guest memory at {addr:#x} is not in /proc/self/smaps");
        };
        for shmem in [false, true] {
            assert!(flagged(&create(16 << 20, true, shmem).unwrap().0));
            assert!(!flagged(&create(16 << 20, false, shmem).unwrap().0));
        }
        // Anonymous only when huge pages are asked for where shared memory gets none.
        assert!(create(16 << 20, true, false).unwrap().1.is_none());
        assert!(create(16 << 20, true, true).unwrap().1.is_some());
        assert!(create(16 << 20, false, false).unwrap().1.is_some());
    }
}
