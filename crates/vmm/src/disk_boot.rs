//! Disk boot's search of the guest's disk (`disk::boot::find`), run in a forked child
//! process that can do almost nothing: the partition table, the filesystem and the boot
//! entries are the guest's, parsed by code (ours and `ext4-view`'s) that has been fuzzed but
//! not proven. The child gets a seccomp filter that allows reading the already-open image,
//! memory management and writing its answer to a pipe (any other system call kills it), an
//! address-space and a CPU-time limit, and its answer is checked on the way back. An abort, a
//! runaway allocation, a loop or a sandbox violation in the child fails the VM's start with
//! an error; the VMM itself is not touched.
//!
//! It runs before the VMM creates its KVM VM, guest memory or any thread, so the fork copies
//! a small single-threaded process.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use disk::boot::{BootFiles, FileImage};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// CPU seconds the search may take (a few milliseconds is usual).
const CPU_LIMIT_SECS: u64 = 20;
/// Address space the child may add to what the VMM had: room for a kernel and initrds up to
/// the limit (read, then copied into the answer), and the filesystem reader's working set.
const HEADROOM_BYTES: u64 = 512 << 20;
/// Longest text field (source, command line, error) accepted back from the child.
const MAX_TEXT_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("boot disk {path}: opening it failed: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("boot disk {path}: {reason}")]
    Search { path: String, reason: String },
    #[error("boot disk {path}: the isolated reader of the disk failed: {reason}")]
    Reader { path: String, reason: String },
}

/// Finds what the disk at `path` boots, reading at most `max_bytes` of kernel and initrd, in
/// a sandboxed child process.
pub fn find(path: &Path, max_bytes: u64) -> Result<BootFiles, Error> {
    let name = path.display().to_string();
    let image = File::open(path)
        .and_then(FileImage::new)
        .map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?;
    let limits = Limits {
        address_space: address_space_now()
            .saturating_add(max_bytes.saturating_mul(3))
            .saturating_add(HEADROOM_BYTES),
        cpu_secs: CPU_LIMIT_SECS,
    };
    let answer_limit = max_bytes
        .saturating_mul(2)
        .saturating_add(4 * MAX_TEXT_BYTES + 64);
    let answer = isolated(
        move || encode(disk::boot::find(Rc::new(image), max_bytes)),
        &limits,
        answer_limit,
    )
    .map_err(|reason| Error::Reader {
        path: name.clone(),
        reason,
    })?;
    match decode(&answer, max_bytes) {
        Some(Ok(found)) => Ok(found),
        Some(Err(reason)) => Err(Error::Search { path: name, reason }),
        None => Err(Error::Reader {
            path: name,
            reason: "its answer is malformed".into(),
        }),
    }
}

/// What the child may use.
struct Limits {
    /// RLIMIT_AS, bytes.
    address_space: u64,
    /// RLIMIT_CPU, seconds.
    cpu_secs: u64,
}

/// Runs `work` in a forked child under `limits` and the seccomp filter of [`sandbox`], and
/// returns what it produced (at most `answer_limit` bytes), or why the child failed.
fn isolated(
    work: impl FnOnce() -> Vec<u8>,
    limits: &Limits,
    answer_limit: u64,
) -> Result<Vec<u8>, String> {
    // Built before the fork: the child should need little before its filter is on.
    let filter = sandbox().map_err(|e| format!("building its seccomp filter: {e}"))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array with new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "making a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: in the VMM there is no other thread yet (see the module comment), so the child
    // is a consistent copy; it only runs `child` and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let status = child(work, limits, &filter, write_end);
        // SAFETY: ends the child without running the parent's exit handlers or destructors.
        unsafe { libc::_exit(status) };
    }
    drop(write_end);
    let mut answer = Vec::new();
    let read = File::from(read_end)
        .take(answer_limit.saturating_add(1))
        .read_to_end(&mut answer);
    let status = wait(pid);
    read.map_err(|e| format!("reading its answer: {e}"))?;
    if let Some(why) = abnormal(status, limits) {
        return Err(why);
    }
    if answer.len() as u64 > answer_limit {
        return Err("its answer is larger than any it can give".into());
    }
    Ok(answer)
}

/// The child: limits, filter, work, answer. Returns the exit status.
fn child(
    work: impl FnOnce() -> Vec<u8>,
    limits: &Limits,
    filter: &BpfProgram,
    out: OwnedFd,
) -> i32 {
    set_limit(libc::RLIMIT_AS, limits.address_space);
    set_limit(libc::RLIMIT_CPU, limits.cpu_secs);
    // A backtrace would open files to symbolize it, which the filter forbids; a failure
    // should end as what it is.
    std::env::set_var("RUST_BACKTRACE", "0");
    if seccompiler::apply_filter(filter).is_err() {
        return 2;
    }
    // A panic must not unwind out of here: the child would go on running the caller's code.
    let Ok(answer) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) else {
        return 4;
    };
    if File::from(out).write_all(&answer).is_err() {
        return 3;
    }
    0
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit with a valid rlimit structure; lowering a limit needs no privilege.
    unsafe { libc::setrlimit(resource, &limit) };
}

/// What the child may do: read and seek the image it holds, manage its memory, write to its
/// pipe, end. Aborting (signals to itself) is allowed so that a panic ends as SIGABRT.
fn sandbox() -> Result<BpfProgram, seccompiler::BackendError> {
    let allowed = [
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_lseek,
        libc::SYS_write,
        libc::SYS_close,
        // Debug builds check a descriptor with F_GETFD when it is closed.
        libc::SYS_fcntl,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_getrandom,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The process's address space now, in bytes (0 when /proc cannot say).
fn address_space_now() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf with a valid name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages.saturating_mul(page)
}

fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid
            || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return status;
        }
    }
}

/// Why the child did not end normally, if it did not.
fn abnormal(status: i32, limits: &Limits) -> Option<String> {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        return Some(match signal {
            libc::SIGSYS => {
                "it made a system call its sandbox forbids and was killed".into()
            }
            libc::SIGXCPU | libc::SIGKILL => format!(
                "it ran out of its {} s of CPU time and was killed (does the disk's filesystem make it loop?)",
                limits.cpu_secs
            ),
            libc::SIGABRT => "it aborted (out of memory within its limit, or a bug met on this disk)".into(),
            other => format!("it was killed by signal {other}"),
        });
    }
    match libc::WEXITSTATUS(status) {
        0 => None,
        2 => Some("it could not install its seccomp filter".into()),
        3 => Some("it could not write its answer".into()),
        4 => Some("it panicked (a bug met on this disk)".into()),
        other => Some(format!("it exited with status {other}")),
    }
}

// The answer: a tag byte (0 found, 1 not), then length-prefixed fields.

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn encode(result: Result<BootFiles, disk::boot::Error>) -> Vec<u8> {
    let mut out = Vec::new();
    match result {
        Ok(found) => {
            out.push(0);
            put(&mut out, found.source.as_bytes());
            put(&mut out, found.cmdline.as_bytes());
            put(&mut out, &found.kernel);
            match &found.initrd {
                Some(initrd) => {
                    out.push(1);
                    put(&mut out, initrd);
                }
                None => out.push(0),
            }
        }
        Err(e) => {
            out.push(1);
            put(&mut out, e.to_string().as_bytes());
        }
    }
    out
}

/// The answer, read front to back.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A length-prefixed field of at most `limit` bytes.
    fn field(&mut self, limit: u64) -> Option<Vec<u8>> {
        let len = u64::from_le_bytes(self.0.get(..8)?.try_into().ok()?);
        if len > limit {
            return None;
        }
        let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
        let field = self.0.get(8..end)?.to_vec();
        self.0 = &self.0[end..];
        Some(field)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.field(MAX_TEXT_BYTES)?).ok()
    }
}

/// Reads the answer back; `None` when it is malformed or a field is larger than allowed.
fn decode(bytes: &[u8], max_bytes: u64) -> Option<Result<BootFiles, String>> {
    let mut fields = Fields(bytes);
    let answer = match fields.byte()? {
        0 => {
            let source = fields.text()?;
            let cmdline = fields.text()?;
            let kernel = fields.field(max_bytes)?;
            let initrd = match fields.byte()? {
                0 => None,
                1 => Some(fields.field(max_bytes)?),
                _ => return None,
            };
            Ok(BootFiles {
                kernel,
                initrd,
                cmdline,
                source,
            })
        }
        1 => Err(fields.text()?),
        _ => return None,
    };
    fields.0.is_empty().then_some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            address_space: address_space_now() + (256 << 20),
            cpu_secs: 1,
        }
    }

    #[test]
    fn the_child_answers_and_each_way_it_can_fail_is_named() {
        assert_eq!(
            isolated(|| b"answer".to_vec(), &limits(), 100).unwrap(),
            b"answer"
        );
        let e = isolated(|| vec![0; 101], &limits(), 100).unwrap_err();
        assert!(e.contains("larger than any"), "{e}");
        let e = isolated(|| std::process::abort(), &limits(), 100).unwrap_err();
        assert!(e.contains("aborted"), "{e}");
        let e = isolated(|| panic!("on purpose"), &limits(), 100).unwrap_err();
        assert!(e.contains("panicked"), "{e}");
        // Opening a file is not among the system calls the sandbox allows.
        let e = isolated(
            || {
                let _ = File::open("/etc/hostname");
                Vec::new()
            },
            &limits(),
            100,
        )
        .unwrap_err();
        assert!(e.contains("forbids"), "{e}");
        // An allocation beyond the address-space limit fails (and Rust aborts on it).
        let e = isolated(|| vec![1u8; 1 << 30], &limits(), 100).unwrap_err();
        assert!(e.contains("aborted"), "{e}");
        // A loop is ended by the CPU limit.
        #[allow(clippy::empty_loop)]
        let e = isolated(|| loop {}, &limits(), 100).unwrap_err();
        assert!(e.contains("CPU time"), "{e}");
    }

    #[test]
    fn answers_round_trip_and_garbage_is_refused() {
        let found = BootFiles {
            kernel: vec![1; 100],
            initrd: Some(vec![2; 50]),
            cmdline: "root=/dev/vda1".into(),
            source: "partition 1: /vmlinuz".into(),
        };
        let bytes = encode(Ok(found));
        let back = decode(&bytes, 100).unwrap().unwrap();
        assert_eq!(
            (back.kernel.len(), back.initrd.map(|i| i.len())),
            (100, Some(50))
        );
        assert_eq!(back.cmdline, "root=/dev/vda1");
        // A kernel over the limit, a cut answer, trailing bytes, an unknown tag.
        assert!(decode(&bytes, 99).is_none());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], 100).is_none(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, 100).is_none());
        assert!(decode(&[7], 100).is_none());
        let not_found = encode(Err(disk::boot::Error::NotFound {
            searched: "the disk is empty".into(),
        }));
        assert!(decode(&not_found, 100)
            .unwrap()
            .unwrap_err()
            .contains("the disk is empty"));
    }
}
