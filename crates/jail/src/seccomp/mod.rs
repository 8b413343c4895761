//! Seccomp filters per VMM thread kind ([`rules`] holds the allow-lists). A call outside a
//! thread's list raises SIGSYS; [`install_violation_report`]'s handler writes the call's
//! number to stderr (the VMM's log, where the daemon reads it) and then makes a call that a
//! second filter answers by killing the whole process, so the process ends by SIGSYS with the
//! reason on record. Installed per thread (no TSYNC): each thread gets its own kind's list.

mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the {kind} seccomp filter failed: {reason}")]
    Build { kind: ThreadKind, reason: String },
    #[error("installing the {kind} seccomp filter failed: {reason}")]
    Install { kind: ThreadKind, reason: String },
    #[error("installing the seccomp violation handler failed: {0}")]
    Handler(#[source] std::io::Error),
}

/// The kinds of thread a VMM has, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the device work of MMIO exits.
    Vcpu,
    /// The main thread once the VM runs: devices' queues, console, control socket, exit.
    EventLoop,
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
        })
    }
}

/// The call the violation handler makes to end the process: outside every allow-list, and
/// answered with KILL_PROCESS by the second filter.
const KILL_CALL: i64 = libc::SYS_reboot;

/// The text the violation handler writes before the process dies; the daemon looks for it.
pub const VIOLATION_MARKER: &str = "keel: seccomp: blocked system call ";

/// The two programs of `kind`, in the order they are installed.
pub fn filters(kind: ThreadKind) -> Result<Vec<BpfProgram>, Error> {
    // SAFETY: getpid has no preconditions.
    let own_pid = unsafe { libc::getpid() } as u32;
    let build = |e: seccompiler::BackendError| Error::Build {
        kind,
        reason: e.to_string(),
    };
    let allow_list = SeccompFilter::new(
        rules::allowed(kind, own_pid),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    let mut kill = BTreeMap::new();
    kill.insert(KILL_CALL, Vec::new());
    let killer = SeccompFilter::new(
        kill,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    let program = |f: SeccompFilter| {
        BpfProgram::try_from(f).map_err(|e| Error::Build {
            kind,
            reason: e.to_string(),
        })
    };
    // The killer first: installing takes prctl and seccomp, which the allow-list forbids.
    Ok(vec![program(killer)?, program(allow_list)?])
}

/// The name of system call `nr`, for the ones a report most likely names.
pub fn syscall_name(nr: u64) -> Option<&'static str> {
    const NAMES: [(i64, &str); 17] = [
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_bpf, "bpf"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n as u64 == nr)
        .map(|(_, name)| *name)
}

thread_local! {
    /// This thread's kind, for the violation report (0: none yet, 1: vCPU, 2: event loop).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs `kind`'s filters on the calling thread, for good.
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    KIND.with(|k| {
        k.set(match kind {
            ThreadKind::Vcpu => 1,
            ThreadKind::EventLoop => 2,
        })
    });
    for program in filters(kind)? {
        seccompiler::apply_filter(&program).map_err(|e| Error::Install {
            kind,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Installs the SIGSYS handler that reports a blocked call. Once per process, before any
/// filter.
pub fn install_violation_report() -> Result<(), Error> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = report_violation as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGSYS with a valid sigaction; no old action wanted.
    let r = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `siginfo_t` as SIGSYS fills it (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Formats `n` in decimal into `buf` from its end; returns where the digits start.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            return at;
        }
    }
}

/// The SIGSYS handler: async-signal-safe (writes from stack buffers, then one system call).
extern "C" fn report_violation(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS its
    // union holds `_sigsys`, whose layout SigsysInfo mirrors.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
    let mut digits = [0u8; 20];
    let start = decimal(nr.max(0) as u64, &mut digits);
    let kind: &[u8] = match KIND.with(|k| k.get()) {
        1 => b" on a vcpu thread; the VMM is killed\n",
        2 => b" on the event-loop thread; the VMM is killed\n",
        _ => b"; the VMM is killed\n",
    };
    let mut line = [0u8; 128];
    let mut len = 0;
    for part in [VIOLATION_MARKER.as_bytes(), &digits[start..], kind] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write and syscall are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::syscall(KILL_CALL, 0, 0, 0, 0);
        // Not reached: the killer filter ends the process. Should it not, end anyway.
        libc::_exit(159);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_from_the_end() {
        let mut buf = [0u8; 20];
        let at = decimal(101, &mut buf);
        assert_eq!(&buf[at..], b"101");
        let at = decimal(0, &mut buf);
        assert_eq!(&buf[at..], b"0");
        let at = decimal(u64::MAX, &mut buf);
        assert_eq!(&buf[at..], b"18446744073709551615");
    }

    #[test]
    fn every_kind_builds() {
        for kind in [ThreadKind::Vcpu, ThreadKind::EventLoop] {
            let programs = filters(kind).unwrap();
            assert_eq!(programs.len(), 2);
        }
    }

    #[test]
    fn a_forbidden_call_kills_the_process_by_sigsys_with_the_call_reported() {
        // In a forked child (one thread: the test harness's others are not copied).
        let mut pipe = [0; 2];
        // SAFETY: pipe fills two descriptors.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe functions and the filter install.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: dup2 of valid descriptors in the child.
            unsafe { libc::dup2(pipe[1], 2) };
            let _ = install_violation_report();
            if install(ThreadKind::Vcpu).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: a system call no vCPU thread may make.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            // SAFETY: ends the child (not reached).
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closes our copy of the write end.
        unsafe { libc::close(pipe[1]) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        let mut buf = [0u8; 256];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
        let text = String::from_utf8_lossy(&buf[..n.max(0) as usize]).to_string();
        assert!(
            text.contains(&format!(
                "{VIOLATION_MARKER}{} on a vcpu thread",
                libc::SYS_socket
            )),
            "{text}"
        );
    }
}
