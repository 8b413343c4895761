//! The host's KVM: opening it with errors a user can act on, the capabilities Keel needs,
//! and whether it is a software PVM module.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM. Enable virtualization in the firmware and load the module (modprobe kvm_intel or kvm_amd)")]
    NoKvm,
    #[error("permission denied on /dev/kvm: run as root or add your user to the group that owns /dev/kvm (usually 'kvm')")]
    KvmPermission,
    #[error("opening /dev/kvm failed: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which Keel needs")]
    MissingCapability(&'static str),
}

/// Opens /dev/kvm and checks the capabilities Keel relies on.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(e),
    })?;
    for (cap, name) in [
        (
            Cap::Irqchip,
            "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
        ),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// True when /dev/kvm is the software PVM module: guest ring-0 code is emulated.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// What Keel says once per VM on a PVM host.
pub const PVM_HOST_NOTE: &str = "note: this host's KVM is the software PVM module (kvm_pvm): \
unmodified guest kernels run their ring-0 code emulated, very slowly; kernels built as PVM \
guests (CONFIG_PVM_GUEST) run at full speed";

/// Whether transparent huge pages can back shared memory (a memfd) on this host:
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is not `never` or `deny`. Read before
/// the jail, which has no /sys.
pub fn shmem_huge_pages() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .ok()
        .and_then(|s| {
            let start = s.find('[')?;
            let end = s[start..].find(']')?;
            Some(s[start + 1..start + end].to_string())
        })
        .is_some_and(|chosen| !matches!(chosen.as_str(), "never" | "deny"))
}

/// Most vCPUs this host's KVM allows in one VM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    kvm.get_max_vcpus() as u32
}
