//! The VMM's jail, checked from outside as an attacker would look: /proc of every thread of
//! a running VMM (identity, capabilities, no_new_privs, seccomp), its namespaces and root,
//! its cgroup's limits; a forbidden system call killing it and the daemon naming the call;
//! a writable image refused to a second VM. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{kvm_available, probe_elf, KEEL};

/// `Key:` of a /proc status file, its value trimmed.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Checks every thread of `pid` the way the jail promises; returns how many threads.
fn assert_jailed(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list");
    let mut threads = 0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if status.is_empty() {
            continue; // ended meanwhile
        }
        let name = status_field(&status, "Name");
        let uids: Vec<u64> = status_field(&status, "Uid")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        assert!(
            uids.len() == 4 && uids.iter().all(|u| *u != 0 && *u == uids[0]),
            "thread {name}: uids {uids:?}"
        );
        let gids = status_field(&status, "Gid");
        assert!(!gids.starts_with('0'), "thread {name}: gids {gids}");
        assert_eq!(status_field(&status, "Groups"), "", "thread {name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                status_field(&status, set),
                "0000000000000000",
                "thread {name}: {set}"
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "thread {name}");
        // KVM's own kernel thread of the VM (kvm-nx-lpage-recovery) runs no VMM code.
        if !name.starts_with("kvm-") {
            assert_eq!(status_field(&status, "Seccomp"), "2", "thread {name}");
        }
        threads += 1;
    }
    // Its own namespaces, not the test's.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the host");
    }
    // PID 1 of its PID namespace.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status_field(&status, "NSpid").ends_with("\t1")
            || status_field(&status, "NSpid").ends_with(" 1"),
        "{}",
        status_field(&status, "NSpid")
    );
    threads
}

/// Every path in the VMM's root (as it sees it), but its /proc.
fn files_in_root(pid: u32) -> Vec<String> {
    let root = format!("/proc/{pid}/root");
    let mut found = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(&root)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let shown = path.strip_prefix(&root).unwrap().display().to_string();
            if shown == "proc" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
            found.push(shown);
        }
    }
    found.sort();
    found
}

/// A file of the cgroup that `pid` is in for `controller`: on cgroup v1 under that
/// controller's hierarchy, else under v2's (`v1_file` or `v2_file`), read whole.
fn cgroup_file(pid: u32, controller: &str, v1_file: &str, v2_file: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        names
            .split(',')
            .any(|n| n == controller)
            .then(|| path.to_string())
    });
    let path = match v1 {
        Some(path) => format!("/sys/fs/cgroup/{controller}{path}/{v1_file}"),
        None => {
            let v2 = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            format!("/sys/fs/cgroup{v2}/{v2_file}")
        }
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

/// The memory and pids limits of the cgroup that `pid` is in (cgroup v1 or v2).
fn cgroup_limits(pid: u32) -> (u64, u64) {
    let memory = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max");
    let pids = cgroup_file(pid, "pids", "pids.max", "pids.max");
    (memory.parse().unwrap(), pids.parse().unwrap())
}

/// A child killed when the test ends, passed or not (a failed check must not leave a VM).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("KEEL_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: needs root (CI runs as root)");
        }
        eprintln!("SKIPPED {test}: needs root");
        return false;
    }
    kvm_available(test)
}

const OVERHEAD_MIB: u64 = 64;

#[test]
fn a_daemon_vmm_runs_jailed_in_every_thread() {
    if !root_or_skip("a_daemon_vmm_runs_jailed_in_every_thread") {
        return;
    }
    let d = Daemon::start("jail");
    d.create_probe_vm("j1", &["--cpus", "2", "--start"]);
    d.create_probe_vm("j2", &["--start"]);
    let pid = d.json(&["vm", "show", "j1"])["pid"].as_u64().unwrap() as u32;
    let other = d.json(&["vm", "show", "j2"])["pid"].as_u64().unwrap() as u32;
    // Two vCPUs and the event loop at least.
    assert!(assert_jailed(pid) >= 3);
    assert_jailed(other);
    // Each VM has its own uid.
    let uid = |p: u32| {
        status_field(
            &std::fs::read_to_string(format!("/proc/{p}/status")).unwrap(),
            "Uid",
        )
    };
    assert_ne!(uid(pid), uid(other));
    // Its root holds its run directory and nothing of the host.
    let run_dir = d.state_dir.join("vms").join("j1");
    let files = files_in_root(pid);
    let run = run_dir.strip_prefix("/").unwrap().display().to_string();
    for f in &files {
        assert!(
            run.starts_with(f.as_str()) || f.starts_with(&run),
            "{f} in the VMM's root: {files:?}"
        );
    }
    assert!(files.contains(&format!("{run}/control.sock")), "{files:?}");
    // The daemon's store is not there, nor is /dev, /etc or the keel binary.
    assert!(!files.iter().any(|f| f.ends_with("keel.db")), "{files:?}");
    // Its cgroup has the limits: 64 MiB of guest RAM plus the overhead, pids.
    let (memory, pids) = cgroup_limits(pid);
    assert_eq!(memory, (64 + OVERHEAD_MIB) << 20);
    assert_eq!(pids, 2 + 64);
    // The API shows the same cgroup: its limits, and what is in use under them.
    let usage = &d.json(&["vm", "show", "j1"])["usage"];
    assert_eq!(
        usage["memory_limit_bytes"],
        (64 + OVERHEAD_MIB) << 20,
        "{usage}"
    );
    assert_eq!(usage["tasks_limit"], 2 + 64, "{usage}");
    let used = usage["memory_bytes"].as_u64().unwrap();
    assert!(used > 0 && used < (64 + OVERHEAD_MIB) << 20, "{usage}");
    assert!(usage["tasks"].as_u64().unwrap() >= 3, "{usage}");
    assert_eq!(
        usage["jail_id"].to_string(),
        uid(pid).split_whitespace().next().unwrap()
    );
    // The front page says the host jails its VMMs, and how.
    let host = d.json(&["host"]);
    let jail = host["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "jail")
        .cloned()
        .unwrap_or_default();
    assert_eq!(jail["ok"], true, "{host}");
    assert!(
        jail["detail"].as_str().unwrap().contains("cgroup v"),
        "{jail}"
    );
    let text = d.ok(&["vm", "show", "j1"]);
    assert!(
        text.contains("memory use") && text.contains("of 128.0 MiB"),
        "{text}"
    );
    // The root is read-only: the VMM's user cannot create anything outside its run dir.
    let mnt = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_line = mnt
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("{mnt}"));
    assert!(
        root_line.split(' ').nth(5).unwrap().starts_with("ro"),
        "{root_line}"
    );
    d.ok(&["vm", "stop", "j1"]);
    d.ok(&["vm", "stop", "j2"]);
}

#[test]
fn keel_run_as_root_runs_jailed() {
    if !root_or_skip("keel_run_as_root_runs_jailed") {
        return;
    }
    // A descriptor keel run inherits from its caller (not close-on-exec, as a careless shell
    // or wrapper leaves them): the jailed VMM must not have it.
    let planted = std::env::temp_dir().join(format!("keel-planted-{}", std::process::id()));
    std::fs::write(&planted, b"secret").unwrap();
    let planted_file = std::fs::File::open(&planted).unwrap();
    let planted_fd = std::os::fd::AsRawFd::as_raw_fd(&planted_file);
    let mut command = std::process::Command::new(KEEL);
    command
        .args(["run", "--kernel"])
        .arg(probe_elf())
        .args(["--cpus", "2", "--memory", "32"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: dup2 in the child before exec: async-signal-safe, touches only the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            libc::dup2(planted_fd, 9);
            Ok(())
        });
    }
    let mut child = KillOnDrop(command.spawn().unwrap());
    let child = &mut child.0;
    // The guest's first line: every vCPU thread has entered the guest, past its filter.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with("PROBE"), "{first:?}");
    // The jailed VMM is keel run's child.
    let deadline = Instant::now() + Duration::from_secs(20);
    let vmm = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
                .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            let pid: u32 = pid.parse().unwrap();
            // Jailed once its threads have their filters (the vCPUs exist by then).
            if std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) >= 3 {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "no jailed VMM under keel run");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(assert_jailed(vmm) >= 3);
    assert_eq!(files_in_root(vmm), Vec::<String>::new());
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .unwrap_or_default()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        !fds.iter().any(|f| f.contains("keel-planted")),
        "the jailed VMM kept an inherited descriptor: {fds:?}"
    );
    drop(planted_file);
    let _ = std::fs::remove_file(&planted);
    assert_eq!(cgroup_limits(vmm), ((32 + OVERHEAD_MIB) << 20, 2 + 64));
    // Killing keel run kills the VM with it.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{vmm}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap_or_default();
        if state.split(' ').nth(2) == Some("Z") {
            break;
        }
        assert!(Instant::now() < deadline, "the VMM outlived keel run");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon whose VMMs get the debug-build test hook `hook` (an environment variable; the
/// hooks exist in debug builds only, the ones cargo test builds), and the VM `vm` started
/// under it until it crashed: the daemon and what `keel vm show` says of the VM.
fn crashed_by_hook(tag: &str, hook: (&str, &str), vm: &str) -> (Daemon, serde_json::Value) {
    let d = Daemon::start_with(tag, &[], &[], &[hook]);
    d.create_probe_vm(vm, &[]);
    // The start may report the VM running or already crashed: either way it ends crashed.
    let _ = d.keel(&["vm", "start", vm]);
    d.wait_state(vm, "crashed", Duration::from_secs(30));
    let shown = d.json(&["vm", "show", vm]);
    (d, shown)
}

#[test]
fn a_forbidden_system_call_kills_the_vmm_and_the_daemon_names_it() {
    if !root_or_skip("a_forbidden_system_call_kills_the_vmm_and_the_daemon_names_it") {
        return;
    }
    let (d, shown) = crashed_by_hook("seccomp", ("KEEL_TEST_FORBIDDEN_SYSCALL", "1"), "bad");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "killed by its seccomp filter for system call {} (socket)",
            libc::SYS_socket
        )),
        "{shown}"
    );
    let host = d.json(&["host"]);
    let incidents = host["incidents"].as_array().unwrap();
    assert!(
        incidents
            .iter()
            .any(|i| i["vm"] == "bad" && i["summary"].as_str().unwrap_or("").contains("seccomp")),
        "{host}"
    );
}

#[test]
fn a_writable_image_serves_one_vm_only() {
    if !root_or_skip("a_writable_image_serves_one_vm_only") {
        return;
    }
    let d = Daemon::start("lock");
    let disk = d.images().join("shared.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    d.create_probe_vm("first", &["--disk", &disk_arg, "--start"]);
    d.create_probe_vm("second", &["--disk", &disk_arg]);
    let refused = d.fails(&["vm", "start", "second"]);
    assert!(refused.contains("is in use"), "{refused}");
    assert_eq!(d.state("second"), "stopped");
    // Once the first VM is off, the second may have it.
    d.ok(&["vm", "stop", "first"]);
    d.ok(&["vm", "start", "second"]);
    d.ok(&["vm", "stop", "second"]);
}

#[test]
fn the_vmm_binary_links_none_of_the_daemons_code() {
    // No HTTP server, no SQLite, no async runtime in the jailed process: none of their
    // functions is defined in keel-vmm, while keel has thousands (so the check can see them).
    let defined = |binary: &str, crate_name: &str| {
        let out = std::process::Command::new("nm")
            .args(["--defined-only", binary])
            .output()
            .expect("nm (binutils)");
        assert!(out.status.success(), "nm {binary}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(crate_name))
            .count()
    };
    for daemon_code in ["axum", "hyper", "tokio", "rusqlite", "sqlite3_", "utoipa"] {
        assert!(
            defined(KEEL, daemon_code) > 0,
            "keel has no {daemon_code}: the check is blind"
        );
        assert_eq!(
            defined(env!("CARGO_BIN_EXE_keel-vmm"), daemon_code),
            0,
            "keel-vmm defines {daemon_code} code"
        );
    }
}

#[test]
fn a_vmm_past_its_memory_limit_is_killed_and_recorded_as_an_oom_kill() {
    if !root_or_skip("a_vmm_past_its_memory_limit_is_killed_and_recorded_as_an_oom_kill") {
        return;
    }
    // The hook makes the VMM leak 256 MiB once the guest runs: far past its cgroup's limit
    // (64 MiB of guest RAM plus 64 MiB), so the kernel's OOM killer ends it.
    let (d, shown) = crashed_by_hook("oom", ("KEEL_TEST_LEAK_MIB", "256"), "hungry");
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("killed by the OOM killer"), "{shown}");
    assert!(reason.contains("memory limit of 128 MiB"), "{shown}");
    let host = d.json(&["host"]);
    let incidents = host["incidents"].as_array().unwrap();
    assert!(
        incidents
            .iter()
            .any(|i| i["vm"] == "hungry" && i["cause"] == "oom-kill"),
        "{host}"
    );
}

#[test]
fn a_cpu_limit_reaches_the_vms_cgroup() {
    if !root_or_skip("a_cpu_limit_reaches_the_vms_cgroup") {
        return;
    }
    let d = Daemon::start("cpu");
    d.create_probe_vm("capped", &["--cpu-limit", "50", "--start"]);
    let pid = d.json(&["vm", "show", "capped"])["pid"].as_u64().unwrap() as u32;
    // cgroup v1 keeps quota and period in files of their own, v2 both in cpu.max.
    let quota = cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max");
    let quota = if quota.contains(' ') {
        quota
    } else {
        let period = cgroup_file(pid, "cpu", "cpu.cfs_period_us", "cpu.max");
        format!("{quota} {period}")
    };
    assert_eq!(quota, "50000 100000");
    assert!(d.ok(&["vm", "show", "capped"]).contains("50% of one CPU"));
    d.ok(&["vm", "stop", "capped"]);
}
