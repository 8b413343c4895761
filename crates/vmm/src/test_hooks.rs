//! Hooks that let whole-system tests make the VMM misbehave from inside. Compiled into debug
//! builds only (the ones `cargo test` runs): a release binary has none of this.

/// Environment variable: once the guest runs, the event-loop thread makes a system call its
/// seccomp filter forbids (`socket(AF_INET)`), so a test can see the VMM killed for it and
/// the daemon record the call.
pub const FORBIDDEN_SYSCALL_ENV: &str = "KEEL_TEST_FORBIDDEN_SYSCALL";

#[cfg(debug_assertions)]
pub fn after_start() {
    if std::env::var_os(FORBIDDEN_SYSCALL_ENV).is_some() {
        // SAFETY: socket takes plain integers; the result is not used.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
}

#[cfg(not(debug_assertions))]
pub fn after_start() {}
