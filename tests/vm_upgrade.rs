//! Handing a running guest to a new `keel vmm` process (an upgrade), proved from inside the
//! guest: twenty handovers in a row while the probe writes disk records and then churns its
//! memory, every record verified and every page checked after; and handovers that fail
//! (no new VMM, a new VMM that never answers) leave the guest running in the old one, never
//! in both and never in neither.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::control::{files, Response};
use common::vmm::*;
use common::*;

fn takeover(dir: &RunDir) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path(files::VMM_LOG))
        .unwrap();
    let child = std::process::Command::new(KEEL)
        .args(["vmm", "--dir"])
        .arg(&dir.0)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn keel vmm --takeover");
    wait_until("the new VMM's takeover socket", dir, || {
        dir.path("takeover.sock").exists()
    });
    KillOnDrop(child)
}

fn hand_over(dir: &RunDir) -> Response {
    Control::connect(dir).ask(br#"{"request":"hand-over"}"#)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn twenty_handovers_in_a_row_lose_nothing() {
    if !kvm_available("twenty_handovers_in_a_row_lose_nothing") {
        return;
    }
    const RECORDS: u64 = 300;
    let disk = ScratchDisk::new("upgrade", 16 << 20);
    let mut spec = spec(
        "upgrade-vm",
        &format!(
            "probe.blk_records={RECORDS} probe.blk_nodiscard probe.churn=4M probe.churn_rate=20 probe.churn_report_ms=200 probe.churn_gap_us=20000"
        ),
    );
    spec["memory_mib"] = 128.into();
    spec["cpus"] = 2.into();
    spec["disks"] = disk.spec();
    spec["vsock"] = serde_json::json!({ "cid": 42 });
    let dir = RunDir::new("upgrade", &spec);
    let mut current = KillOnDrop(start(&dir));
    wait_until("the first records", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE acked 5\n")
    });
    let mut pauses = Vec::new();
    for round in 0..20 {
        let next = takeover(&dir);
        let old_pid = current.id();
        match hand_over(&dir) {
            Response::HandedOver(report) => pauses.push(report.paused_us),
            other => panic!(
                "round {round}: hand-over answered {other:?}\n{}",
                dir.context()
            ),
        }
        let status = wait_exit(&mut current, &dir);
        assert!(
            status.success(),
            "round {round}: the old VMM ended {status}"
        );
        assert!(!alive(old_pid));
        current = next;
        // The new VMM answers on the run directory's socket, as itself.
        let mut control = Control::connect(&dir);
        assert_eq!(control.status().pid, current.id(), "round {round}");
        assert!(
            !dir.path(files::EXIT_RECORD).exists(),
            "round {round}: a handover is no end"
        );
    }
    wait_until(
        "the records and the churn after the handovers",
        &dir,
        || dir.read(files::CONSOLE_LOG).contains("PROBE churn tick 2 "),
    );
    let console = dir.read(files::CONSOLE_LOG);
    assert!(
        console.contains(&format!("PROBE blk_verify ok {RECORDS}")),
        "{}",
        dir.context()
    );
    assert!(!console.contains("check bad"), "{console}");
    assert_eq!(console.matches("PROBE start").count(), 1, "booted again");
    // The vsock device's host side moved with the guest.
    assert!(
        std::os::unix::net::UnixStream::connect(dir.path(files::VSOCK_SOCKET)).is_ok(),
        "nothing listens on vsock.sock after the handovers"
    );
    pauses.sort_unstable();
    eprintln!(
        "20 handovers: pause median {} us, max {} us (old VMM's measure, debug build)",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    assert_eq!(
        Control::connect(&dir).ask(br#"{"request":"stop"}"#),
        Response::Done
    );
    wait_exit(&mut current, &dir);
    assert_eq!(dir.exit_record().reason, api::control::ExitReason::Stopped);
}

#[test]
fn failed_handovers_leave_the_guest_running_in_the_old_vmm() {
    if !kvm_available("failed_handovers_leave_the_guest_running_in_the_old_vmm") {
        return;
    }
    let mut spec = spec(
        "upgrade-fail",
        "probe.churn=4M probe.churn_rate=20 probe.churn_report_ms=100 probe.churn_gap_us=20000",
    );
    spec["memory_mib"] = 128.into();
    let dir = RunDir::new("upgrade-fail", &spec);
    let mut old = KillOnDrop(start(&dir));
    wait_until("the churn", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE churn start")
    });
    let still_running = |dir: &RunDir| {
        let mark = dir.read(files::CONSOLE_LOG).len();
        wait_until("the guest to go on", dir, || {
            dir.read(files::CONSOLE_LOG)[mark..].contains("PROBE churn")
        });
        let mut control = Control::connect(dir);
        let status = control.status();
        assert!(status.running && !status.paused, "{status:?}");
        status.pid
    };

    // No new VMM at all.
    match hand_over(&dir) {
        Response::Error { message } => assert!(message.contains("runs on here"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(still_running(&dir), old.id());

    // A new VMM that never answers (stopped): the old one waits, then runs on.
    let stuck = takeover(&dir);
    // SAFETY: kill sends SIGSTOP to the child this test started.
    assert_eq!(unsafe { libc::kill(stuck.id() as i32, libc::SIGSTOP) }, 0);
    let asked = Instant::now();
    match hand_over(&dir) {
        Response::Error { message } => assert!(message.contains("runs on here"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(asked.elapsed() >= Duration::from_secs(9));
    drop(stuck);
    assert_eq!(still_running(&dir), old.id());
    let _ = std::fs::remove_file(dir.path("takeover.sock"));

    // A new VMM that cannot build the guest (its definition has other memory): it ends
    // without a word after taking the descriptors, and the old one runs on.
    let original = dir.read(files::SPEC);
    let mut other = spec.clone();
    other["memory_mib"] = 64.into();
    std::fs::write(dir.path(files::SPEC), other.to_string()).unwrap();
    let mut refusing = takeover(&dir);
    match hand_over(&dir) {
        Response::Error { message } => assert!(message.contains("refused"), "{message}"),
        other => panic!("{other:?}"),
    }
    wait_exit(&mut refusing, &dir);
    // Put back only now: the new VMM reads the definition after it starts listening.
    std::fs::write(dir.path(files::SPEC), &original).unwrap();
    assert!(
        dir.read(files::VMM_LOG).contains("64 MiB"),
        "the new VMM says why: {}",
        dir.context()
    );
    assert_eq!(still_running(&dir), old.id());
    assert!(!dir.path(files::EXIT_RECORD).exists(), "nothing ended");
    assert_eq!(
        Control::connect(&dir).ask(br#"{"request":"stop"}"#),
        Response::Done
    );
    wait_exit(&mut old, &dir);
}

/// A VM with a direct=on disk wants transparent huge pages; where this host gives shared
/// memory none (shmem_enabled never), its memory is anonymous and a handover is refused with
/// why; where it gives some, the memory is a memfd and the handover goes through.
#[test]
fn a_direct_disk_vm_hands_over_only_where_shared_memory_gets_huge_pages() {
    if !kvm_available("a_direct_disk_vm_hands_over_only_where_shared_memory_gets_huge_pages") {
        return;
    }
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let huge = !(shmem.contains("[never]") || shmem.contains("[deny]") || shmem.is_empty());
    let disk = ScratchDisk::new("upgrade-direct", 16 << 20);
    let mut spec = spec(
        "upgrade-direct",
        "probe.churn=1M probe.churn_rate=2 probe.churn_report_ms=200 probe.churn_gap_us=20000",
    );
    spec["disks"] = serde_json::json!([{ "path": disk.path.to_str().unwrap(), "direct": true }]);
    let dir = RunDir::new("upgrade-direct", &spec);
    let mut old = KillOnDrop(start(&dir));
    wait_until("the churn", &dir, || {
        dir.read(files::CONSOLE_LOG).contains("PROBE churn start")
    });
    let mut next = takeover(&dir);
    match (huge, hand_over(&dir)) {
        (false, Response::Error { message }) => {
            assert!(message.contains("shmem_enabled"), "{message}");
            wait_exit(&mut next, &dir);
            assert_eq!(Control::connect(&dir).status().pid, old.id());
            assert_eq!(
                Control::connect(&dir).ask(br#"{"request":"stop"}"#),
                Response::Done
            );
            wait_exit(&mut old, &dir);
        }
        (true, Response::HandedOver(_)) => {
            wait_exit(&mut old, &dir);
            assert_eq!(
                Control::connect(&dir).ask(br#"{"request":"stop"}"#),
                Response::Done
            );
            wait_exit(&mut next, &dir);
        }
        (huge, other) => panic!("shmem huge pages {huge}: hand-over answered {other:?}"),
    }
}
