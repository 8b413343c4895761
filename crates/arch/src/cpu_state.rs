//! A vCPU's whole architectural state as plain data, for snapshots and moves: what KVM
//! gives out and takes back, nothing of the process it came from.
//!
//! Only what this KVM supports is saved: the MSRs are those KVM lists
//! (`KVM_GET_MSR_INDEX_LIST`) and reads, and nested-virtualization state is never asked for
//! (`KVM_CAP_NESTED_STATE` is 0 on the PVM host, where asking fails with EINVAL).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Most MSRs a state may carry (KVM lists about a hundred).
pub const MAX_MSRS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        vcpu: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM took {set} of {wanted} MSRs; it refused MSR {refused:#x}")]
    MsrRefused {
        vcpu: u32,
        set: usize,
        wanted: usize,
        refused: u32,
    },
    #[error("vCPU {vcpu}: the XSAVE area has {len} words instead of 1024")]
    XsaveSize { vcpu: u32, len: usize },
    #[error("vCPU {vcpu}: {count} MSRs is more than the {MAX_MSRS} a state may carry")]
    TooManyMsrs { vcpu: u32, count: usize },
}

/// One vCPU, as `KVM_GET_*` gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX registers: the legacy 4 KiB `kvm_xsave` region.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debug_regs: kvm_debugregs,
    /// The guest TSC's frequency, when KVM says it.
    pub tsc_khz: Option<u32>,
}

fn kvm(vcpu: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { vcpu, what, source }
}

/// The MSRs of `indices` KVM can read now: a read stops at the first MSR it refuses, which
/// is left out and the rest read on.
fn read_msrs(fd: &VcpuFd, vcpu: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut read = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs {
            vcpu,
            count: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm(vcpu, "reading MSRs"))?;
        read.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        // The MSR at `n` was refused: skip it.
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(read)
}

impl VcpuState {
    /// Reads vCPU `vcpu`'s state. Call it on a vCPU that is out of `KVM_RUN` and has finished
    /// any I/O instruction it exited for (see the VMM's pause).
    pub fn save(fd: &VcpuFd, vcpu: u32, msr_indices: &[u32]) -> Result<Self, Error> {
        // The events and multiprocessing state first: reading them settles what KVM keeps
        // pending, as QEMU and Firecracker order it.
        let mp_state = fd.get_mp_state().map_err(kvm(vcpu, "reading MP state"))?;
        let events = fd
            .get_vcpu_events()
            .map_err(kvm(vcpu, "reading pending events"))?;
        Ok(Self {
            regs: fd.get_regs().map_err(kvm(vcpu, "reading registers"))?,
            sregs: fd
                .get_sregs()
                .map_err(kvm(vcpu, "reading system registers"))?,
            xsave: fd
                .get_xsave()
                .map_err(kvm(vcpu, "reading XSAVE state"))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().map_err(kvm(vcpu, "reading XCRs"))?,
            lapic: fd.get_lapic().map_err(kvm(vcpu, "reading the LAPIC"))?,
            msrs: read_msrs(fd, vcpu, msr_indices)?,
            events,
            mp_state,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm(vcpu, "reading debug registers"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Puts the state into a fresh vCPU (CPUID already set), in the order KVM needs: MSRs
    /// and system registers before the LAPIC, events last.
    pub fn restore(&self, fd: &VcpuFd, vcpu: u32) -> Result<(), Error> {
        if let Some(khz) = self.tsc_khz {
            // Only where KVM can scale the TSC; elsewhere the host's frequency is the
            // guest's, and a different one is the guest's problem to notice, as on hardware.
            let _ = fd.set_tsc_khz(khz);
        }
        fd.set_sregs(&self.sregs)
            .map_err(kvm(vcpu, "setting system registers"))?;
        fd.set_regs(&self.regs)
            .map_err(kvm(vcpu, "setting registers"))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(Error::XsaveSize {
                vcpu,
                len: self.xsave.len(),
            });
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a whole legacy `kvm_xsave` (no trailing area), which is what
        // KVM_SET_XSAVE reads when XSAVE2 reports no more than its 4 KiB.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm(vcpu, "setting XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm(vcpu, "setting XCRs"))?;
        if self.msrs.len() > MAX_MSRS {
            return Err(Error::TooManyMsrs {
                vcpu,
                count: self.msrs.len(),
            });
        }
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| Error::TooManyMsrs {
            vcpu,
            count: self.msrs.len(),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm(vcpu, "setting MSRs"))?;
        if set != self.msrs.len() {
            return Err(Error::MsrRefused {
                vcpu,
                set,
                wanted: self.msrs.len(),
                refused: self.msrs.get(set).map_or(0, |m| m.index),
            });
        }
        fd.set_lapic(&self.lapic)
            .map_err(kvm(vcpu, "setting the LAPIC"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm(vcpu, "setting debug registers"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm(vcpu, "setting MP state"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm(vcpu, "setting pending events"))?;
        Ok(())
    }
}
