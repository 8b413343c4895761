//! What an API caller may make the root daemon touch: only files beneath its image
//! directories, each writable image for one VM, each tap for one VM, and new starts within
//! the host's totals. Tried as an attacker with API access would.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::kvm_available;

#[test]
fn host_files_outside_the_image_directories_are_refused_without_saying_if_they_exist() {
    let d = Daemon::start("policy-files");
    let probe = common::probe_elf();
    let kernel = probe.to_str().unwrap();
    let db = d.state_dir.join("keel.db");
    let images = d.images();
    std::os::unix::fs::symlink(&db, images.join("db.img")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", images.join("shadow")).unwrap();
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "initrd /etc/shadow",
            vec![
                "--kernel".into(),
                kernel.into(),
                "--initrd".into(),
                "/etc/shadow".into(),
            ],
        ),
        (
            "initrd /etc/no-such-file",
            vec![
                "--kernel".into(),
                kernel.into(),
                "--initrd".into(),
                "/etc/no-such-file".into(),
            ],
        ),
        (
            "keel.db as a disk",
            vec![
                "--kernel".into(),
                kernel.into(),
                "--disk".into(),
                format!("path={}", db.display()),
            ],
        ),
        (
            "a path with ..",
            vec![
                "--kernel".into(),
                format!("{}/../keel.db", images.display()),
            ],
        ),
    ];
    let mut messages = Vec::new();
    for (what, args) in &cases {
        let mut all = vec!["vm", "create", "x"];
        all.extend(args.iter().map(String::as_str));
        let refused = d.fails(&all);
        assert!(
            refused.contains("only under its image directories"),
            "{what}: {refused}"
        );
        assert!(!refused.contains("No such file"), "{what}: {refused}");
        // The message names the rule and the path given, nothing of what is there.
        messages.push(
            refused
                .replace("/etc/shadow", "P")
                .replace("/etc/no-such-file", "P"),
        );
    }
    assert_eq!(
        messages[0], messages[1],
        "existence leaks through the message"
    );
    // Symbolic links inside the image directory that lead out: defined (the names are
    // inside), refused when the VM starts, and the file is not opened.
    for (name, link) in [("viadb", "db.img"), ("viashadow", "shadow")] {
        let path = format!("path={}", images.join(link).display());
        d.ok(&["vm", "create", name, "--kernel", kernel, "--disk", &path]);
        let refused = d.fails(&["vm", "start", name]);
        assert!(
            refused.contains("leads out of its image directory"),
            "{refused}"
        );
        assert_eq!(d.state(name), "stopped");
    }
    assert!(d.state_dir.join("keel.db").exists());
}

#[test]
fn a_tap_belongs_to_one_vm() {
    let d = Daemon::start("policy-tap");
    d.create_probe_vm("a", &["--net", "tap=ktapx"]);
    let refused = d.fails(&[
        "vm",
        "create",
        "b",
        "--kernel",
        common::probe_elf().to_str().unwrap(),
        "--net",
        "tap=ktapx",
    ]);
    assert!(refused.contains("tap ktapx belongs to VM 'a'"), "{refused}");
}

#[test]
fn host_totals_refuse_new_starts_and_leave_running_vms_alone() {
    if !kvm_available("host_totals_refuse_new_starts_and_leave_running_vms_alone") {
        return;
    }
    let d = Daemon::start_with("policy-totals", &[], &["--max-vms", "1"], &[]);
    d.create_probe_vm("one", &["--start"]);
    d.create_probe_vm("two", &[]);
    let refused = d.fails(&["vm", "start", "two"]);
    assert!(refused.contains("the most this host allows"), "{refused}");
    assert_eq!(d.state("two"), "stopped");
    assert_eq!(d.state("one"), "running");
    // The front page warns before a start is refused, and stops when there is room again.
    let host = d.json(&["host"]);
    assert!(
        host["warnings"]
            .to_string()
            .contains("1 of at most 1 VMs run (keel serve --max-vms)"),
        "{host}"
    );
    d.ok(&["vm", "stop", "one"]);
    assert!(!d.json(&["host"])["warnings"]
        .to_string()
        .contains("--max-vms"));
    d.ok(&["vm", "start", "two"]);
    d.wait_state("two", "running", Duration::from_secs(10));
    d.ok(&["vm", "stop", "two"]);
}

#[test]
fn memory_beyond_the_hosts_share_is_refused_with_what_is_free() {
    let d = Daemon::start_with("policy-memory", &[], &["--memory-share", "1"], &[]);
    // 1% of this host's RAM is far below 8 GiB.
    let kernel = common::probe_elf();
    d.ok(&[
        "vm",
        "create",
        "big",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "8192",
    ]);
    let refused = d.fails(&["vm", "start", "big"]);
    assert!(refused.contains("needs 8192 MiB"), "{refused}");
    assert!(refused.contains("MiB free"), "{refused}");
}

#[test]
fn a_guest_flooding_its_console_does_not_grow_the_log_past_its_cap() {
    if !kvm_available("a_guest_flooding_its_console_does_not_grow_the_log_past_its_cap") {
        return;
    }
    let d = Daemon::start_with("policy-console", &[], &["--console-log-max", "65536"], &[]);
    let kernel = common::probe_elf();
    // 4000 lines of about 64 bytes: 250 KB, four times the cap.
    d.ok(&[
        "vm",
        "create",
        "loud",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--cmdline",
        "probe.console_flood=4000 probe.power_button",
        "--start",
    ]);
    let log = d.state_dir.join("vms/loud/console.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).to_string();
        if text.contains("PROBE ready") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood did not end: {}",
            text.len()
        );
        assert!(
            text.len() <= 65536,
            "console.log grew to {} bytes",
            text.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.len() <= 65536, "{}", text.len());
    // The newest output is kept, the oldest dropped.
    assert!(
        text.contains("PROBE flood 3999 "),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(!text.contains("PROBE flood 0 "));
    assert!(!text.contains("PROBE boot_protocol"));
    d.ok(&["vm", "stop", "loud"]);
}
