//! Hooks that let whole-system tests make the VMM misbehave from inside. Compiled into debug
//! builds only (the ones `cargo test` runs): a release binary has none of this.

/// Environment variable: once the guest runs, the event-loop thread makes a system call its
/// seccomp filter forbids (`socket(AF_INET)`), so a test can see the VMM killed for it and
/// the daemon record the call.
pub const FORBIDDEN_SYSCALL_ENV: &str = "KEEL_TEST_FORBIDDEN_SYSCALL";

/// Environment variable: once the guest runs, the event-loop thread allocates and touches
/// this many MiB and keeps them (a leak), so a test can see the VMM's cgroup memory limit
/// reached, the kernel's OOM killer end the VMM, and the daemon record it.
pub const LEAK_MIB_ENV: &str = "KEEL_TEST_LEAK_MIB";

#[cfg(debug_assertions)]
pub fn after_start() {
    if std::env::var_os(FORBIDDEN_SYSCALL_ENV).is_some() {
        // SAFETY: socket takes plain integers; the result is not used.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    let leak: usize = std::env::var(LEAK_MIB_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if leak > 0 {
        let mut kept = Vec::new();
        for _ in 0..leak {
            // One MiB at a time, every page written: resident, charged to the cgroup.
            kept.push(vec![0x5au8; 1 << 20]);
        }
        std::mem::forget(kept);
    }
}

#[cfg(not(debug_assertions))]
pub fn after_start() {}
