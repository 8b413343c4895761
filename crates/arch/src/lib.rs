//! x86_64 boot for Keel: the guest's memory layout, CPUID, registers, MSRs, FPU and LAPIC
//! state, boot data for both boot protocols (Linux `boot_params` and PVH `start_info`), the
//! e820 map and the ACPI tables. It knows guest memory and vCPU file descriptors; it owns no VM.

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod regs;
pub mod vm_state;

pub use boot::{e820_map, E820Entry, E820_RAM, E820_RESERVED};

/// Guest memory as every crate sees it: vm-memory's mmap backend with a dirty-page bitmap.
/// What the VMM itself writes into the guest (virtio rings, disk reads, received frames) is
/// not in KVM's dirty log; a live migration learns of it from this bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// The bitmap part of a slice of [`GuestMemoryMmap`].
pub type GuestBitmapSlice<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

/// Errors from setting up the guest's boot state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {what} to guest memory at {addr:#x} failed: {source}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the ACPI tables need {needed} bytes but only {room} are reserved for them")]
    AcpiTooLarge { needed: usize, room: usize },
    #[error("KVM refused the {what} of vCPU {vcpu}: {source}")]
    Kvm {
        what: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {vcpu}")]
    MsrsPartial {
        vcpu: u32,
        set: usize,
        wanted: usize,
    },
    #[error("building the CPUID table failed: {0}")]
    Cpuid(String),
}

pub type Result<T> = std::result::Result<T, Error>;
