//! Nothing the benchmark starts outlives it. Normal ends and errors drop their guards
//! ([`super::daemon::Daemon`] kills its daemon and VMMs; the runner kills its VMM). On
//! SIGINT, SIGTERM or SIGHUP a thread of its own kills every child process and every VMM of a
//! registered state directory (VMMs run in sessions of their own and outlive their daemon),
//! removes the work directory and exits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Result};

/// State directories whose VMMs must die with the benchmark, and the work directory.
static STATE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn state_dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    STATE_DIRS.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn register(state_dir: &Path) {
    state_dirs().push(state_dir.to_path_buf());
}

pub fn unregister(state_dir: &Path) {
    state_dirs().retain(|d| d != state_dir);
}

/// Write end of the pipe the signal handler writes the signal number to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; one byte from the stack to the pipe (or to -1,
    // which fails harmlessly).
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// Installs handlers for the stop signals that wake a thread of their own, which kills what
/// the benchmark started and exits. Handlers do not survive exec: child processes get the
/// default actions (and this process's signal mask, which is left empty).
pub fn install(work_dir: &Path) -> Result<()> {
    *WORK_DIR.lock().unwrap_or_else(|p| p.into_inner()) = Some(work_dir.to_path_buf());
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors of a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!(
            "creating the signal pipe: {}",
            std::io::Error::last_os_error()
        );
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    std::thread::spawn(move || {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local from the pipe's read end, which stays open.
        while unsafe { libc::read(fds[0], (&raw mut byte).cast(), 1) } != 1 {}
        let signal = i32::from(byte);
        eprintln!("host: signal {signal}: killing every process this benchmark started");
        kill_everything();
        std::process::exit(128 + signal);
    });
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a sigaction with a handler that only calls write(2); mask and flags set.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            bail!(
                "installing the handler of signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Kills every child of this process (daemons, CLI commands, QEMU, `keel run`), then every
/// VMM of a registered state directory; removes the work directory.
fn kill_everything() {
    let me = std::process::id();
    for pid in pids() {
        if parent_of(pid) == Some(me) {
            // SAFETY: kill(2) on a child of this process, read from /proc just now.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    for dir in state_dirs().iter() {
        kill_vmms_of(dir);
    }
    if let Some(dir) = WORK_DIR.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// `keel vmm` processes whose run directory is under `state_dir`, found through /proc (a
/// zombie has an empty command line and is not counted).
pub fn vmm_pids_of(state_dir: &Path) -> Vec<u32> {
    let prefix = state_dir.join("vms").display().to_string();
    let mut found: Vec<u32> = pids()
        .into_iter()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let words: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect();
            words.iter().any(|w| w == "vmm") && words.iter().any(|w| w.starts_with(&prefix))
        })
        .collect();
    found.sort_unstable();
    found
}

pub fn kill_vmms_of(state_dir: &Path) {
    for pid in vmm_pids_of(state_dir) {
        // SAFETY: kill(2) on a pid read from /proc just now; at worst it has already exited.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}
