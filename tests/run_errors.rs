//! Every bad input to `keel run` gets one clear line on stderr and a non-zero exit, never a
//! panic or a hang.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs keel with `args` and returns (exit code, stderr), after checking it failed cleanly.
fn fails(args: &[&str]) -> (i32, String) {
    let run = run_with(keel_run(args), None, Duration::from_secs(30), None);
    check_clean_failure(&run)
}

fn check_clean_failure(run: &Run) -> (i32, String) {
    assert!(!run.killed, "keel hung\n{}", run.context());
    let code = run
        .code()
        .unwrap_or_else(|| panic!("keel died by a signal\n{}", run.context()));
    assert_ne!(code, 0, "{}", run.context());
    assert!(
        !run.stderr.contains("panicked"),
        "keel panicked\n{}",
        run.context()
    );
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("keel: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "want exactly one error line\n{}",
        run.context()
    );
    assert!(
        run.stdout.is_empty(),
        "nothing may reach the console\n{}",
        run.context()
    );
    (code, errors[0].to_string())
}

fn scratch(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-run-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn missing_kernel() {
    let (code, line) = fails(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1);
    assert_eq!(
        line,
        "keel: error: kernel /nonexistent/vmlinux: no such file"
    );
}

#[test]
fn kernel_that_is_a_directory_or_empty() {
    let (_, line) = fails(&["--kernel", "/"]);
    assert!(line.contains("kernel /: is a directory"), "{line}");
    let empty = scratch("empty", b"");
    let (_, line) = fails(&["--kernel", empty.to_str().unwrap()]);
    assert!(line.ends_with("is empty"), "{line}");
}

#[test]
fn file_that_is_no_kernel() {
    if !kvm_available("file_that_is_no_kernel") {
        return;
    }
    let text = scratch("notes.txt", &b"this is not a kernel\n".repeat(100));
    let (code, line) = fails(&["--kernel", text.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(line.contains("is not a kernel Keel can boot"), "{line}");
    // An ELF program that is no kernel: its entry point lies below 1 MiB.
    let (_, line) = fails(&["--kernel", "/bin/true"]);
    assert!(
        line.contains("kernel /bin/true is an invalid ELF kernel"),
        "{line}"
    );
}

#[test]
fn missing_initrd() {
    let (_, line) = fails(&[
        "--kernel",
        probe_elf().to_str().unwrap(),
        "--initrd",
        "/nonexistent/rd",
    ]);
    assert_eq!(line, "keel: error: initrd /nonexistent/rd: no such file");
}

#[test]
fn memory_too_small_or_beyond_the_host() {
    let kernel = probe_elf();
    let kernel = kernel.to_str().unwrap();
    let (_, line) = fails(&["--kernel", kernel, "--memory", "4"]);
    assert!(
        line.contains("--memory 4 MiB is too small: a VM needs at least 8 MiB"),
        "{line}"
    );
    let (_, line) = fails(&["--kernel", kernel, "--memory", "100000000"]);
    assert!(line.contains("is more than this host's RAM"), "{line}");
}

#[test]
fn zero_or_too_many_vcpus() {
    let kernel = probe_elf();
    let kernel = kernel.to_str().unwrap();
    let (_, line) = fails(&["--kernel", kernel, "--cpus", "0"]);
    assert!(
        line.contains("--cpus 0: a VM needs at least 1 vCPU"),
        "{line}"
    );
    let (_, line) = fails(&["--kernel", kernel, "--cpus", "33"]);
    assert!(line.contains("--cpus 33: at most 32 vCPUs"), "{line}");
}

#[test]
fn overlong_command_line() {
    if !kvm_available("overlong_command_line") {
        return;
    }
    let long = "x".repeat(5000);
    let (_, line) = fails(&[
        "--kernel",
        probe_elf().to_str().unwrap(),
        "--cmdline",
        &long,
    ]);
    assert!(
        line.contains("the command line is 5000 bytes; at most 4095 fit"),
        "{line}"
    );
}

#[test]
fn unknown_option_is_a_usage_error() {
    let run = run_with(
        keel_run(&["--kernal", "x"]),
        None,
        Duration::from_secs(10),
        None,
    );
    assert_eq!(run.code(), Some(2), "{}", run.context());
    assert!(
        run.stderr.contains("unexpected argument '--kernal'"),
        "{}",
        run.context()
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A copy of the probe anyone can read, for runs as another user.
fn world_readable_probe(name: &str) -> std::path::PathBuf {
    let copy = scratch(name, &std::fs::read(probe_elf()).unwrap());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(
        copy.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    copy
}

#[test]
fn no_dev_kvm() {
    if !is_root() || !Path::new("/usr/bin/unshare").exists() {
        eprintln!(
            "SKIPPED no_dev_kvm: needs root and unshare to hide /dev/kvm in a mount namespace"
        );
        return;
    }
    let kernel = world_readable_probe("no-kvm-probe.elf");
    // In a private mount namespace, an empty /dev: the host's /dev/kvm stays untouched.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {KEEL} run --kernel {}",
            kernel.display()
        ));
    let run = run_with(cmd, None, Duration::from_secs(30), None);
    let (code, line) = check_clean_failure(&run);
    assert_eq!(code, 1);
    assert!(line.contains("/dev/kvm does not exist"), "{line}");
}

#[test]
fn no_permission_on_dev_kvm() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED no_permission_on_dev_kvm: needs root and setpriv to run keel as an unprivileged user");
        return;
    }
    let kernel = world_readable_probe("no-permission-probe.elf");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        KEEL,
        "run",
        "--kernel",
    ])
    .arg(&kernel);
    let run = run_with(cmd, None, Duration::from_secs(30), None);
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if mode.map(|m| m & 0o006 != 0).unwrap_or(false) {
        eprintln!("SKIPPED no_permission_on_dev_kvm: /dev/kvm is open to everyone on this host");
        return;
    }
    let (code, line) = check_clean_failure(&run);
    assert_eq!(code, 1);
    assert!(line.contains("permission denied on /dev/kvm"), "{line}");
}

#[test]
fn unreadable_kernel() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!(
            "SKIPPED unreadable_kernel: needs root and setpriv to run keel as an unprivileged user"
        );
        return;
    }
    let kernel = world_readable_probe("unreadable-probe.elf");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        KEEL,
        "run",
        "--kernel",
    ])
    .arg(&kernel);
    let run = run_with(cmd, None, Duration::from_secs(30), None);
    let (code, line) = check_clean_failure(&run);
    assert_eq!(code, 1);
    assert!(
        line.ends_with("permission denied (cannot read it)"),
        "{line}"
    );
}
