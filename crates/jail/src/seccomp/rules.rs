//! What each kind of VMM thread may ask of the kernel: the allow-lists, as data, in one
//! place. Everything not listed traps (see `super::report_violation`). Found by tracing the
//! VMM through every device and the whole test suite, and kept as narrow as that allows:
//!
//! - no `execve`, no `fork`/`clone` (every thread exists before its filter), no `ptrace`,
//!   no `mount`, no new namespaces, no `open` of devices (the VMM got its descriptors before
//!   the jail), no sockets but Unix ones (vsock's host side), no `kill` of other processes;
//! - `ioctl` only with the request numbers listed (KVM on its VM and vCPU descriptors, the
//!   tap's offload settings, the terminal's modes);
//! - no executable memory: `mmap` and `mprotect` without `PROT_EXEC`.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
// A vCPU's state for snapshots: saved by its own thread while paused, set at a restore.
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
// The dirty-page log: memory slots registered again with it on, and read.
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
// The VM's interrupt controllers, PIT and clock, saved by the event loop for a snapshot,
// and set by it when a guest taken over comes (its filter is in place by then: installing
// it takes a fraction of a millisecond the guest would stand still for).
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);

/// O_TMPFILE's own bit (libc's O_TMPFILE includes O_DIRECTORY, which plain opens of a
/// directory may carry).
const O_TMPFILE_BIT: i32 = 0x40_0000;

/// The tap's offloads, set when the guest's driver negotiates features (on a vCPU thread,
/// through its MMIO write) or resets the device.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

/// The calls every thread makes: memory, locks, its own signals, time, reading and writing
/// descriptors it already holds, and ending.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // A wait interrupted by a signal or by io_uring's task work (a pause's kick, a disk
    // completion) goes on with the arguments the filter already let through.
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // KEEL_TRACE_STARTUP: the VMM's CPU time at the first vCPU entry.
    libc::SYS_getrusage,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // Device resets on a vCPU thread wait for in-flight disk I/O and re-arm timers.
    libc::SYS_io_uring_enter,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_epoll_ctl,
    libc::SYS_shutdown,
    // Guest output reaches console clients from the vCPU thread that wrote the serial port.
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    // ... and into console.log, which is kept under its cap in place (positioned reads and
    // writes, a truncation).
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The event loop's own: waiting, the control and console sockets, vsock's Unix sockets,
/// disk I/O off the ring, and the exit record in the run directory (the only writable
/// place in the jail).
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    libc::SYS_poll,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    // vsock's connections to host programs: the socket opened without following links.
    libc::SYS_openat2,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_eventfd2,
    libc::SYS_wait4,
    // A snapshot asks which guest pages are resident: only those are written.
    libc::SYS_mincore,
];

fn arg_eq(index: u8, len: SeccompCmpArgLen, value: u64) -> SeccompRule {
    // Conditions on arguments 0-5 with plain values are always valid.
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        len,
        SeccompCmpOp::Eq,
        value,
    )
    .expect("argument index below 6")])
    .expect("one condition")
}

/// `mmap`/`mprotect` whose protection (argument 2) lacks PROT_EXEC.
fn not_executable() -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .expect("argument index below 6")])
    .expect("one condition")
}

/// The ioctl requests a thread kind may make (argument 1).
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    let vcpu = [
        KVM_CREATE_VCPU(),
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_TRANSLATE(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_GET_MSRS(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_TSC_KHZ(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
    ];
    let mut list: Vec<u64> = vec![TUNSETOFFLOAD, TUNSETVNETHDRSZ];
    match kind {
        ThreadKind::Vcpu => list.extend(vcpu),
        // The terminal of `keel run`: its modes are restored when the VM ends.
        ThreadKind::EventLoop => list.extend([
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::FIONBIO,
            KVM_GET_IRQCHIP(),
            KVM_SET_IRQCHIP(),
            KVM_GET_CLOCK(),
            KVM_SET_CLOCK(),
            KVM_GET_PIT2(),
            KVM_SET_PIT2(),
            KVM_GET_DIRTY_LOG(),
            KVM_SET_USER_MEMORY_REGION(),
        ]),
    }
    list
}

/// The allow-list of `kind`: system call number -> the argument rules of which one must
/// hold (none: any arguments).
pub(crate) fn allowed(kind: ThreadKind, own_pid: u32) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[i64] = match kind {
        ThreadKind::Vcpu => &[],
        ThreadKind::EventLoop => EVENT_LOOP,
    };
    for nr in COMMON.iter().chain(extra) {
        map.insert(*nr, Vec::new());
    }
    map.insert(libc::SYS_mmap, vec![not_executable()]);
    map.insert(libc::SYS_mprotect, vec![not_executable()]);
    map.insert(
        libc::SYS_ioctl,
        ioctls(kind)
            .into_iter()
            .map(|request| arg_eq(1, SeccompCmpArgLen::Dword, request))
            .collect(),
    );
    // A panic ends the process by abort(): SIGABRT to itself (tgkill of its own pid only),
    // after putting back the default action; recorded as what it is, not as a violation.
    map.insert(
        libc::SYS_tgkill,
        vec![arg_eq(0, SeccompCmpArgLen::Dword, u64::from(own_pid))],
    );
    map.insert(libc::SYS_rt_sigaction, Vec::new());
    // Thread names only (std names a thread as it starts).
    map.insert(
        libc::SYS_prctl,
        vec![
            arg_eq(0, SeccompCmpArgLen::Dword, libc::PR_SET_NAME as u64),
            arg_eq(0, SeccompCmpArgLen::Dword, libc::PR_GET_NAME as u64),
        ],
    );
    // Opening, never making, a file: the exit record's file was made before the filters,
    // so a hostile VMM cannot fill its run directory's file system with new files.
    if kind == ThreadKind::EventLoop {
        map.insert(
            libc::SYS_openat,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq((libc::O_CREAT | O_TMPFILE_BIT) as u64),
                0,
            )
            .expect("argument index below 6")])
            .expect("one condition")],
        );
    }
    // A receive timeout on its own socket: a handover waits for the new VMM so long only.
    if kind == ThreadKind::EventLoop {
        map.insert(
            libc::SYS_setsockopt,
            vec![SeccompRule::new(vec![
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::SOL_SOCKET as u64,
                )
                .expect("argument index below 6"),
                SeccompCondition::new(
                    2,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::SO_RCVTIMEO as u64,
                )
                .expect("argument index below 6"),
            ])
            .expect("two conditions")],
        );
    }
    // Unix sockets only: vsock's connections to host programs.
    if kind == ThreadKind::EventLoop {
        map.insert(
            libc::SYS_socket,
            vec![arg_eq(0, SeccompCmpArgLen::Dword, libc::AF_UNIX as u64)],
        );
    }
    map
}
