//! One thread per vCPU: create and configure it, then run it and handle its exits. Every way
//! a vCPU can stop ends in one report to the [`ExitSignal`]; none leaves the VM hanging.

use std::sync::{Arc, Barrier};

use arch::layout::{GED_MMIO_SIZE, GED_MMIO_START};
use arch::regs::BootEntry;
use arch::GuestMemoryMmap;
use devices::legacy::Ged;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::exit::{CrashReport, ExitSignal, VmExit};
use crate::pause::{self, PauseGate};
use crate::virtio_devices::VirtioDevices;
use arch::cpu_state::VcpuState;
use devices::legacy::LegacyBus;

/// KVM's `kvm_run.internal.suberror` for an instruction it could not emulate.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
/// Longest x86 instruction.
const MAX_INSTRUCTION_BYTES: usize = 15;

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub vm: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
    pub cpuid: CpuId,
    pub cpu_count: u32,
    pub boot: BootEntry,
    pub trace_startup: bool,
    /// Install the vCPU seccomp filter before anything else on the thread.
    pub seccomp: bool,
    pub bus: Arc<LegacyBus>,
    pub virtio: Arc<VirtioDevices>,
    pub ged: Arc<Ged>,
    pub exit: Arc<ExitSignal>,
    /// Where the vCPUs stop for a pause.
    pub pause: Arc<PauseGate>,
    /// The MSRs a vCPU's saved state holds (those KVM lists).
    pub msr_indices: Arc<Vec<u32>>,
    /// Whether the VM is restored (a snapshot, a guest taken over) rather than booted...
    pub restoring: bool,
    /// ... and then its vCPUs' states, in vCPU order: set before `all_filtered` (a guest
    /// taken over sends them only once its vCPUs exist, see `vm::run_with`).
    pub restore: std::sync::OnceLock<Vec<VcpuState>>,
    /// Every vCPU thread and the main thread meet here once each vCPU is configured (or
    /// failed to be)...
    pub configured: Barrier,
    /// ... and here when the main thread lets them run: no vCPU runs before every one is
    /// set up (no INIT or SIPI reaches an AP being set up), and a new VMM taking a guest
    /// over runs none before the old one said go.
    pub go: Barrier,
    /// Set before `go` when the vCPUs must not run after all (a handover that failed).
    pub abort: std::sync::atomic::AtomicBool,
    /// Every vCPU thread and the main thread meet here once each vCPU thread has its
    /// seccomp filter (the main thread spawned them all unfiltered: a filtered thread may
    /// not clone)...
    pub filtered: Barrier,
    /// ... and here once the main thread has its own: no vCPU runs guest code, and the
    /// control socket answers, only when every VMM thread is filtered.
    pub all_filtered: Barrier,
}

/// Makes the vCPU and gives it its CPUID: what does not depend on the guest's state.
fn create(id: u32, shared: &VcpuShared) -> Result<VcpuFd, String> {
    let vcpu = shared
        .vm
        .create_vcpu(u64::from(id))
        .map_err(|e| format!("creating it: {e}"))?;
    let mut cpuid = shared.cpuid.clone();
    arch::cpuid::filter_entries(cpuid.as_mut_slice(), id, shared.cpu_count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("setting CPUID: {e}"))?;
    Ok(vcpu)
}

/// Sets the vCPU up to run: its restored state, or the boot state.
fn configure(id: u32, shared: &VcpuShared, vcpu: VcpuFd) -> Result<VcpuFd, String> {
    if shared.restoring {
        let state = shared
            .restore
            .get()
            .ok_or("the guest's state never came")?
            .get(id as usize)
            .ok_or_else(|| format!("the snapshot has no state for vCPU {id}"))?;
        state.restore(&vcpu, id).map_err(|e| e.to_string())?;
        return Ok(vcpu);
    }
    arch::regs::setup_msrs(&vcpu, id).map_err(|e| e.to_string())?;
    arch::regs::setup_fpu(&vcpu, id).map_err(|e| e.to_string())?;
    arch::regs::setup_lapic(&vcpu, id).map_err(|e| e.to_string())?;
    if id == 0 {
        arch::regs::setup_boot_registers(&vcpu, id, shared.boot).map_err(|e| e.to_string())?;
    }
    Ok(vcpu)
}

/// The thread body of vCPU `id`.
pub fn run_vcpu(id: u32, shared: Arc<VcpuShared>) {
    let filtered = if shared.seccomp {
        jail::seccomp::install(jail::seccomp::ThreadKind::Vcpu).map_err(|e| e.to_string())
    } else {
        Ok(())
    };
    // Whatever became of the filter: the main thread waits for every vCPU thread here, then
    // installs its own.
    shared.pause.register(id);
    // Made while the main thread may still wait for a guest's state.
    let created = filtered.and_then(|()| create(id, &shared));
    shared.filtered.wait();
    shared.all_filtered.wait();
    let configured = created.and_then(|vcpu| configure(id, &shared, vcpu));
    shared.configured.wait();
    shared.go.wait();
    if shared.abort.load(std::sync::atomic::Ordering::Acquire) {
        shared.pause.gone(id);
        return;
    }
    let mut vcpu = match configured {
        Ok(v) => v,
        Err(why) => {
            shared.pause.gone(id);
            shared
                .exit
                .report(VmExit::Failed(format!("setting up vCPU {id}: {why}")));
            return;
        }
    };
    if id == 0 && shared.trace_startup {
        eprintln!(
            "keel: startup: {} us of CPU time before the first vCPU entry",
            process_cpu_micros()
        );
    }
    pause::enter(vcpu.get_kvm_run());
    let exit = run_loop(id, &mut vcpu, &shared);
    shared.pause.gone(id);
    pause::leave();
    shared.exit.report(exit);
}

fn run_loop(id: u32, vcpu: &mut VcpuFd, shared: &VcpuShared) -> VmExit {
    loop {
        // A pause asked for between two exits: the entry below returns at once (after
        // finishing the instruction whose I/O exited to us) instead of running on.
        if shared.pause.requested() {
            vcpu.set_kvm_immediate_exit(1);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => shared.bus.read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Err(e) = shared.bus.write(port, data) {
                    return VmExit::Failed(format!("vCPU {id}: {e}"));
                }
            }
            // MMIO nobody owns reads as all ones; writes to it go nowhere.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if (GED_MMIO_START..GED_MMIO_START + GED_MMIO_SIZE).contains(&addr) {
                    data.fill(0);
                    if let Some(first) = data.first_mut() {
                        *first = shared.ged.read(addr - GED_MMIO_START);
                    }
                } else if !shared.virtio.mmio_read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.virtio.mmio_write(addr, data);
            }
            // With the in-kernel irqchip KVM handles HLT; should one reach us, run on.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Shutdown) => return crash(id, vcpu, shared, "triple fault", None),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let detail = format!("hardware entry failure reason {reason:#x} on host CPU {cpu}");
                return crash(
                    id,
                    vcpu,
                    shared,
                    "KVM could not enter the guest",
                    Some(detail),
                );
            }
            Ok(VcpuExit::InternalError) => {
                let (kind, detail) = internal_error(vcpu);
                return crash(id, vcpu, shared, kind, Some(detail));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => return VmExit::Reboot,
                KVM_SYSTEM_EVENT_CRASH => {
                    return crash(id, vcpu, shared, "guest-reported crash", None)
                }
                other => {
                    let detail = format!("KVM system event {other}");
                    return crash(id, vcpu, shared, "unexpected system event", Some(detail));
                }
            },
            Ok(other) => {
                let detail = format!("{other:?}");
                return crash(id, vcpu, shared, "unexpected VM exit", Some(detail));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or told not to enter): stopped at an instruction boundary.
                vcpu.set_kvm_immediate_exit(0);
                if shared.pause.requested() {
                    let msrs = &shared.msr_indices;
                    shared.pause.park(id, &mut || {
                        VcpuState::save(vcpu, id, msrs).map_err(|e| e.to_string())
                    });
                }
            }
            Err(e) => return VmExit::Failed(format!("KVM_RUN on vCPU {id} failed: {e}")),
        }
    }
}

/// User and system CPU time of the whole process so far, in microseconds.
fn process_cpu_micros() -> u64 {
    // SAFETY: rusage is plain data that getrusage fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// Reads KVM's internal-error suberror after a `KVM_EXIT_INTERNAL_ERROR`.
fn internal_error(vcpu: &mut VcpuFd) -> (&'static str, String) {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the exit union: the exit reason was
    // KVM_EXIT_INTERNAL_ERROR, which is why this is called.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let suberror = internal.suberror;
    let kind = if suberror == KVM_INTERNAL_ERROR_EMULATION {
        "KVM emulation failure (an instruction KVM cannot emulate)"
    } else {
        "KVM internal error"
    };
    (kind, format!("KVM internal error suberror {suberror}"))
}

fn crash(
    id: u32,
    vcpu: &VcpuFd,
    shared: &VcpuShared,
    kind: &str,
    detail: Option<String>,
) -> VmExit {
    let rip = vcpu.get_regs().ok().map(|r| r.rip);
    let instruction = rip
        .map(|rip| instruction_bytes(vcpu, shared, rip))
        .unwrap_or_default();
    VmExit::Crash(CrashReport {
        vcpu: id,
        kind: kind.to_string(),
        rip,
        instruction,
        detail,
    })
}

/// The bytes at the guest's RIP, through the guest's own page tables.
fn instruction_bytes(vcpu: &VcpuFd, shared: &VcpuShared, rip: u64) -> Vec<u8> {
    let Ok(sregs) = vcpu.get_sregs() else {
        return Vec::new();
    };
    let linear = sregs.cs.base.wrapping_add(rip);
    let Ok(t) = vcpu.translate_gva(linear) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let mut bytes = Vec::with_capacity(MAX_INSTRUCTION_BYTES);
    for i in 0..MAX_INSTRUCTION_BYTES as u64 {
        // Byte by byte: the instruction may straddle the end of RAM.
        match shared
            .memory
            .read_obj::<u8>(GuestAddress(t.physical_address + i))
        {
            Ok(b) => bytes.push(b),
            Err(_) => break,
        }
    }
    bytes
}
