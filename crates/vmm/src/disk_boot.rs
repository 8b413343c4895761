//! Disk boot's search of the guest's disk (`disk::boot::find`), run in a forked child
//! process that can do almost nothing: the partition table, the filesystem and the boot
//! entries are the guest's, parsed by code (ours and `ext4-view`'s) that has been fuzzed but
//! not proven. The child keeps only two descriptors (the image, the answer pipe) and runs
//! under seccomp filters: it may read the image, manage its memory, write to the pipe, signal
//! itself (abort) and end; a few calls the panic and allocation-failure paths make (opening
//! files for a backtrace, writing to stderr) fail with EPERM; anything else kills it. It has
//! address-space and CPU-time limits, the parent gives it a wall-clock deadline, and its
//! answer is checked on the way back. A crash, a runaway allocation, a loop, a hang or a
//! sandbox violation in the child fails the VM's start with an error; the VMM is not touched.
//!
//! It runs before the VMM creates its KVM VM, guest memory or any thread, so the fork copies
//! a small single-threaded process (checked: a fork with other threads running is refused).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use disk::boot::{BootFiles, FileImage, MAX_KERNEL_BYTES};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// CPU seconds the search may take (a few milliseconds is usual).
const CPU_LIMIT_SECS: u64 = 20;
/// Wall-clock time the parent waits for the answer (a stalled network image, a blocked child).
const WALL_LIMIT: Duration = Duration::from_secs(30);
/// Address space the child may add to what the VMM had, beyond the kernel and initrds it may
/// hold: the filesystem reader's working set.
const HEADROOM_BYTES: u64 = 256 << 20;
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

/// Finds what the disk at `path` boots, reading at most `max_bytes` of kernel and initrds,
/// in a sandboxed child process.
pub fn find(image: File, name: &str, max_bytes: u64) -> Result<BootFiles, Error> {
    let fd = image.as_raw_fd();
    let image = FileImage::new(image).map_err(|source| Error::Open {
        path: name.to_string(),
        source,
    })?;
    find_in(Rc::new(image), vec![fd], name, max_bytes)
}

/// [`find`] on a disk read through its format (a qcow2 image and its backing files): the
/// child may read only the descriptors `fds` (the image's files).
pub fn find_in(
    image: Rc<dyn disk::boot::Image>,
    fds: Vec<RawFd>,
    name: &str,
    max_bytes: u64,
) -> Result<BootFiles, Error> {
    let name = name.to_string();
    let reader_err = |reason: String| Error::Reader {
        path: name.clone(),
        reason,
    };
    let threads = thread_count();
    if threads != Some(1) {
        return Err(reader_err(format!(
            "the VMM has {} threads where it must have one to fork the reader (a bug in Keel)",
            threads.map_or("an unknown number of".to_string(), |n| n.to_string())
        )));
    }
    let kernel_limit = max_bytes.min(MAX_KERNEL_BYTES);
    let limits = Limits {
        address_space: address_space_now()
            .saturating_add(kernel_limit)
            .saturating_add(max_bytes)
            .saturating_add(HEADROOM_BYTES),
        cpu_secs: CPU_LIMIT_SECS,
        wall: WALL_LIMIT,
    };
    let answer_limit = max_bytes.saturating_add(4 * MAX_TEXT_BYTES + 64);
    let answer = isolated(
        move |out: &mut File| send(out, disk::boot::find(image, max_bytes)),
        &fds,
        &limits,
        answer_limit,
    )
    .map_err(reader_err)?;
    match decode(answer, max_bytes) {
        Some(Ok(found)) => Ok(found),
        Some(Err(reason)) => Err(Error::Search { path: name, reason }),
        None => Err(reader_err("its answer is malformed".into())),
    }
}

/// What the child may use.
struct Limits {
    /// RLIMIT_AS, bytes.
    address_space: u64,
    /// RLIMIT_CPU, seconds.
    cpu_secs: u64,
    /// How long the parent waits for the whole answer.
    wall: Duration,
}

/// Runs `work` in a forked child that keeps only the descriptors `keep` and its answer pipe,
/// under `limits` and the seccomp filters of [`sandbox`] (`keep[0]` is the one it may read),
/// and returns what it wrote (at most `answer_limit` bytes), or why the child failed.
fn isolated(
    work: impl FnOnce(&mut File) -> std::io::Result<()>,
    keep: &[RawFd],
    limits: &Limits,
    answer_limit: u64,
) -> Result<Vec<u8>, String> {
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

    // SAFETY: the caller forks with one thread (see `find`), so the child is a consistent
    // copy; it only runs `child` and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(read_end);
        let status = child(work, keep, limits, write_end);
        // SAFETY: ends the child without running the parent's exit handlers or destructors.
        unsafe { libc::_exit(status) };
    }
    drop(write_end);
    let received = receive(File::from(read_end), limits.wall, answer_limit);
    if received.is_err() {
        // SAFETY: kills our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = wait(pid);
    let answer = received?;
    let status = status.map_err(|e| format!("waiting for it: {e}"))?;
    if let Some(why) = abnormal(status, limits) {
        return Err(why);
    }
    Ok(answer)
}

/// Reads the child's answer until it closes the pipe, within `wall` and `limit` bytes.
fn receive(mut pipe: File, wall: Duration, limit: u64) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + wall;
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one valid pollfd for at most `ms` milliseconds.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waiting for its answer: {e}"));
        }
        if ready == 0 {
            return Err(format!(
                "it gave no answer within {} s and was killed (is the disk's file stalled?)",
                wall.as_secs()
            ));
        }
        match pipe.read(&mut chunk) {
            Ok(0) => return Ok(answer),
            Ok(n) => {
                if answer.len() as u64 + n as u64 > limit {
                    return Err("its answer is larger than any it can give; it was killed".into());
                }
                answer.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading its answer: {e}")),
        }
    }
}

/// The child: descriptors, limits, filters, work. Returns the exit status.
fn child(
    work: impl FnOnce(&mut File) -> std::io::Result<()>,
    keep: &[RawFd],
    limits: &Limits,
    out: OwnedFd,
) -> i32 {
    let out_fd = out.as_raw_fd();
    let mut kept: Vec<RawFd> = keep.iter().copied().chain([out_fd]).collect();
    kept.sort_unstable();
    close_all_but(&kept);
    set_limit(libc::RLIMIT_AS, limits.address_space);
    set_limit(libc::RLIMIT_CPU, limits.cpu_secs);
    let Ok(filters) = sandbox(keep, out_fd) else {
        return 2;
    };
    for filter in &filters {
        if seccompiler::apply_filter(filter).is_err() {
            return 2;
        }
    }
    let mut out = File::from(out);
    // A panic must not unwind out of here: the child would go on running the caller's code.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut out))) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) => 3,
        Err(_) => 4,
    }
}

/// Closes every descriptor but `kept` (sorted).
fn close_all_but(kept: &[RawFd]) {
    let mut from: u32 = 0;
    for &fd in kept {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: closes descriptors of this (child) process that nothing here uses.
            unsafe { libc::close_range(from, fd - 1, 0) };
        }
        from = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::close_range(from, u32::MAX, 0) };
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit with a valid rlimit structure; lowering a limit needs no privilege.
    unsafe { libc::setrlimit(resource, &limit) };
}

/// The file lookups a panic message or a backtrace makes: they fail with EPERM rather than
/// kill, so that a failure ends as what it is.
const FILE_LOOKUPS: [i64; 7] = [
    libc::SYS_openat,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
];

fn arg_is(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// Two filters (the kernel applies the stricter answer): an allow-list whose other calls
/// kill the process, and one that makes a few allowed-listed calls fail with EPERM instead:
/// writing anywhere but the pipe, and the file lookups a panic or backtrace makes.
fn sandbox(images: &[RawFd], pipe: RawFd) -> Result<Vec<BpfProgram>, seccompiler::BackendError> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    let any = Vec::new;
    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Only the image's files are read (positioned reads: a qcow2 image is read with preadv),
    // only this process signalled, only anonymous memory mapped.
    let readable = || {
        images
            .iter()
            .map(|fd| arg_is(0, *fd as u64))
            .collect::<Result<Vec<_>, _>>()
    };
    allowed.insert(libc::SYS_pread64, readable()?);
    allowed.insert(libc::SYS_preadv, readable()?);
    allowed.insert(libc::SYS_tgkill, vec![arg_is(0, me)?]);
    allowed.insert(libc::SYS_mmap, vec![arg_is(4, u64::from(u32::MAX))?]);
    for nr in [
        libc::SYS_write,
        libc::SYS_close,
        // Debug builds check a descriptor with F_GETFD when it is closed.
        libc::SYS_fcntl,
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
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    // Made to fail by the second filter.
    .chain(FILE_LOOKUPS)
    {
        allowed.insert(nr, any());
    }
    let allow_list = SeccompFilter::new(
        allowed,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    refused.insert(
        libc::SYS_write,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            pipe as u64,
        )?])?],
    );
    for nr in FILE_LOOKUPS {
        refused.insert(nr, any());
    }
    let refusals = SeccompFilter::new(
        refused,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    // Installed in this order: installing a filter takes prctl and seccomp, which the
    // allow-list does not allow.
    Ok(vec![refusals.try_into()?, allow_list.try_into()?])
}

/// This process's threads, from /proc.
fn thread_count() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
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

fn wait(pid: libc::pid_t) -> std::io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(status);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Why the child did not end normally, if it did not.
fn abnormal(status: i32, limits: &Limits) -> Option<String> {
    if libc::WIFSIGNALED(status) {
        return Some(match libc::WTERMSIG(status) {
            libc::SIGSYS => {
                "it made a system call its sandbox forbids and was killed (the disk may be crafted to attack the host)".into()
            }
            libc::SIGXCPU | libc::SIGKILL => format!(
                "it ran out of its {} s of CPU time and was killed (does the disk's filesystem make it loop?)",
                limits.cpu_secs
            ),
            libc::SIGABRT => "it aborted: out of memory within its limit (give the VM more memory if its kernel and initrd are that large) or a defect met on this disk".into(),
            other => format!("it was killed by signal {other}"),
        });
    }
    match libc::WEXITSTATUS(status) {
        0 => None,
        2 => Some("it could not install its seccomp filters".into()),
        3 => Some("it could not write its answer".into()),
        4 => Some("it panicked (a defect met on this disk)".into()),
        other => Some(format!("it exited with status {other}")),
    }
}

// The answer: a tag byte (0 found, 1 not), then length-prefixed fields; the kernel last, so
// the parent can keep it in the buffer it received.

fn header(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Writes the answer to the pipe, the large fields straight from where they are.
fn send(out: &mut File, result: Result<BootFiles, disk::boot::Error>) -> std::io::Result<()> {
    let mut head = Vec::new();
    match result {
        Ok(found) => {
            head.push(0);
            header(&mut head, found.source.as_bytes());
            header(&mut head, found.cmdline.as_bytes());
            match &found.initrd {
                Some(initrd) => {
                    head.push(1);
                    head.extend_from_slice(&(initrd.len() as u64).to_le_bytes());
                    out.write_all(&head)?;
                    out.write_all(initrd)?;
                    head.clear();
                }
                None => head.push(0),
            }
            head.extend_from_slice(&(found.kernel.len() as u64).to_le_bytes());
            out.write_all(&head)?;
            out.write_all(&found.kernel)
        }
        Err(e) => {
            head.push(1);
            header(&mut head, e.to_string().as_bytes());
            out.write_all(&head)
        }
    }
}

/// Where the next field of the answer starts.
struct Cursor<'a> {
    answer: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.answer.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// A length-prefixed field of at most `limit` bytes: its range in the answer.
    fn field(&mut self, limit: u64) -> Option<std::ops::Range<usize>> {
        let len_bytes = self.answer.get(self.at..self.at.checked_add(8)?)?;
        let len = u64::from_le_bytes(len_bytes.try_into().ok()?);
        if len > limit {
            return None;
        }
        let start = self.at + 8;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.answer.get(start..end)?;
        self.at = end;
        Some(start..end)
    }

    fn text(&mut self) -> Option<String> {
        let range = self.field(MAX_TEXT_BYTES)?;
        String::from_utf8(self.answer[range].to_vec()).ok()
    }

    fn at_end(&self) -> bool {
        self.at == self.answer.len()
    }
}

/// Reads the answer back; `None` when it is malformed or a field is larger than allowed.
/// The kernel stays in the buffer it came in.
fn decode(mut answer: Vec<u8>, max_bytes: u64) -> Option<Result<BootFiles, String>> {
    let mut cursor = Cursor {
        answer: &answer,
        at: 0,
    };
    match cursor.byte()? {
        0 => {
            let source = cursor.text()?;
            let cmdline = cursor.text()?;
            let initrd = match cursor.byte()? {
                0 => None,
                1 => Some(cursor.field(max_bytes)?),
                _ => return None,
            };
            let kernel = cursor.field(max_bytes)?;
            let total = kernel.len() + initrd.as_ref().map_or(0, |r| r.len());
            if !cursor.at_end() || total as u64 > max_bytes {
                return None;
            }
            let initrd = initrd.map(|r| answer[r].to_vec());
            answer.truncate(kernel.end);
            answer.drain(..kernel.start);
            Some(Ok(BootFiles {
                kernel: answer,
                initrd,
                cmdline,
                source,
            }))
        }
        1 => {
            let reason = cursor.text()?;
            cursor.at_end().then_some(Err(reason))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
