//! Disk images under the daemon: a VM runs on a qcow2 overlay whose backing file lies in the
//! image directories; a backing file anywhere else keeps the VM from starting, and is never
//! opened.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;

const STATE_TIMEOUT: Duration = Duration::from_secs(30);

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed (apt install qemu-utils; scripts/install-deps.sh does)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits until the console log holds `text`; the log's contents.
fn wait_console(d: &Daemon, vm: &str, text: &str) -> String {
    let log = d.json(&["vm", "show", vm])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains(text) {
            return out;
        }
        assert!(Instant::now() < deadline, "no '{text}' in {log}:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_vm_runs_on_a_qcow2_overlay_and_backing_files_stay_in_the_image_directories() {
    if !common::kvm_available("a_vm_runs_on_a_qcow2_overlay") {
        return;
    }
    let d = Daemon::start("images-qcow2");
    let images = d.images();
    let base = images.join("base.raw");
    let overlay = images.join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&overlay),
    ]);
    let base_before = std::fs::read(&base).unwrap();
    let kernel = common::probe_elf();
    let disk = format!("path={},format=qcow2", overlay.display());
    d.ok(&[
        "vm",
        "create",
        "thin",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        &disk,
        "--cmdline",
        "probe.blk_records=256 probe.poweroff",
    ]);
    assert_eq!(
        d.json(&["vm", "show", "thin"])["spec"]["disks"][0]["format"],
        "qcow2"
    );
    d.ok(&["vm", "start", "thin"]);
    let out = wait_console(&d, "thin", "PROBE blk_done");
    assert!(out.contains("PROBE blk_verify ok 256"), "{out}");
    assert!(out.contains("PROBE blk_discard ok"), "{out}");
    d.wait_state("thin", "stopped", STATE_TIMEOUT);
    let check = qemu_img(&["check", "-f", "qcow2", s(&overlay)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file was written"
    );

    // A backing file outside the image directories: defined, refused at start with the rule,
    // and not opened (its access time would not tell; the rule is checked before the open).
    let outside = std::env::temp_dir().join(format!("keel-outside-{}.raw", std::process::id()));
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let escaping = images.join("escaping.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&outside),
        "-F",
        "raw",
        s(&escaping),
    ]);
    let disk = format!("path={},format=qcow2", escaping.display());
    d.ok(&[
        "vm",
        "create",
        "escape",
        "--kernel",
        s(&kernel),
        "--memory",
        "64",
        "--disk",
        &disk,
    ]);
    let refused = d.fails(&["vm", "start", "escape"]);
    assert!(
        refused.contains("backing file") && refused.contains("only under its image directories"),
        "{refused}"
    );
    println!("start refused: {refused}");
    assert_eq!(d.state("escape"), "stopped");
    let _ = std::fs::remove_file(&outside);
}
