//! Nothing acknowledged is lost: the probe writes records with a flush after each and says
//! `PROBE acked N` once the flush completed; the test kills the VMM with SIGKILL at a random
//! moment and checks that every acknowledged record is intact in the disk file.
//!
//! Once more with the disk opened for direct I/O (`direct=on`, `O_DIRECT`).
//!
//! CI runs a few trials. For 100 (prints `trials, acknowledged, lost`):
//!   KEEL_CRASH_TRIALS=100 cargo test --release -p keel --test crash_consistency -- --nocapture

mod common;
#[path = "common/records.rs"]
mod records;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const DEFAULT_TRIALS: u64 = 4;
/// More records than any trial lives to write: the kill always comes mid-stream.
const RECORDS: u64 = 4000;

struct Trial {
    acknowledged: u64,
    lost: Vec<u64>,
}

/// The disk a trial writes.
#[derive(Clone, Copy, PartialEq)]
enum DiskKind {
    Raw,
    /// Raw, opened with `O_DIRECT`.
    Direct,
    /// A qcow2 overlay on a raw base (every first write to a cluster allocates it and copies
    /// the rest of it up from the base).
    Qcow2Overlay,
}

/// Boots the probe writing records, kills the VMM after `delay`, checks the file.
fn trial(index: u64, delay: Duration, kind: DiskKind) -> Trial {
    let dir = std::env::temp_dir().join(format!("keel-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join(format!("trial{index}.img"));
    std::fs::File::create(&base)
        .unwrap()
        .set_len(RECORDS * 512)
        .unwrap();
    let disk = if kind == DiskKind::Qcow2Overlay {
        let overlay = dir.join(format!("trial{index}.qcow2"));
        let out = tool_output(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                overlay.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        overlay
    } else {
        base.clone()
    };
    let options = match kind {
        DiskKind::Raw => "",
        DiskKind::Direct => ",direct=on",
        DiskKind::Qcow2Overlay => ",format=qcow2",
    };
    let mut child = Command::new(KEEL)
        .args(["run", "--kernel"])
        .arg(probe_elf())
        .arg("--disk")
        .arg(format!("path={}{options}", disk.display()))
        .args([
            "--cmdline",
            &format!("probe.blk_records={RECORDS} probe.blk_nodiscard probe.poweroff"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn keel");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Everything the guest printed before dying: an acked line read now was written before
    // the kill.
    let out = reader.join().expect("stdout reader");
    let acked = records::acked(&out);
    assert!(
        acked.iter().copied().eq(0..acked.len() as u64),
        "acknowledgements out of order: {acked:?}"
    );
    let image = if kind == DiskKind::Qcow2Overlay {
        // No corruption, as QEMU checks it (status 3, leaked clusters only, is space lost to
        // a kill between a refcount update and the table that uses it, not data); then the
        // guest's view.
        let check = tool_output(
            "qemu-img",
            &["check", "-f", "qcow2", disk.to_str().unwrap()],
        );
        assert!(
            matches!(check.status.code(), Some(0) | Some(3)),
            "qemu-img check after the kill: status {:?}\n{}",
            check.status.code(),
            String::from_utf8_lossy(&check.stdout)
        );
        let raw = dir.join(format!("trial{index}.out"));
        let out = tool_output(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                disk.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let bytes = std::fs::read(&raw).unwrap();
        let _ = std::fs::remove_file(&raw);
        bytes
    } else {
        std::fs::read(&disk).unwrap()
    };
    let lost = records::bad_records(&image, 0..acked.len() as u64);
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&base);
    Trial {
        acknowledged: acked.len() as u64,
        lost,
    }
}

#[test]
fn sigkill_loses_no_acknowledged_record() {
    if !kvm_available("sigkill_loses_no_acknowledged_record") {
        return;
    }
    let trials: u64 = std::env::var("KEEL_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_TRIALS);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("crash trials: seed {seed:#x}");
    let mut random = Random(seed);
    let (mut acknowledged, mut lost) = (0u64, Vec::new());
    let mut killed_mid_stream = 0;
    for i in 0..trials {
        // Between 20 ms (boot, before any record) and 400 ms (hundreds of records).
        let delay = Duration::from_millis(20 + random.next() % 380);
        let t = trial(i, delay, DiskKind::Raw);
        if t.acknowledged > 0 && t.acknowledged < RECORDS {
            killed_mid_stream += 1;
        }
        eprintln!(
            "trial {i}: killed after {delay:?}, {} acknowledged, {} lost",
            t.acknowledged,
            t.lost.len()
        );
        acknowledged += t.acknowledged;
        lost.extend(t.lost);
    }
    println!("trials, acknowledged, lost");
    println!("{trials}, {acknowledged}, {}", lost.len());
    assert!(lost.is_empty(), "acknowledged records lost: {lost:?}");
    assert!(
        killed_mid_stream > 0,
        "no trial killed the VMM while it was writing: the test proved nothing"
    );
}

#[test]
fn sigkill_loses_no_acknowledged_record_with_direct_io() {
    if !kvm_available("sigkill_loses_no_acknowledged_record_with_direct_io") {
        return;
    }
    // One trial, killed once records are flowing (each is a direct write and an fdatasync).
    let delay = Duration::from_millis(300);
    let t = trial(1000, delay, DiskKind::Direct);
    println!(
        "direct=on: killed after {delay:?}, {} acknowledged, {} lost",
        t.acknowledged,
        t.lost.len()
    );
    assert!(t.lost.is_empty(), "acknowledged records lost: {:?}", t.lost);
    assert!(
        t.acknowledged > 0 && t.acknowledged < RECORDS,
        "the kill did not come while records were written ({} acknowledged): the test proved \
         nothing",
        t.acknowledged
    );
}

#[test]
fn sigkill_loses_no_acknowledged_record_on_a_qcow2_overlay() {
    if !kvm_available("sigkill_loses_no_acknowledged_record_on_a_qcow2_overlay") {
        return;
    }
    // Killed at a few moments while records flow; each trial's image must pass qemu-img
    // check and hold every acknowledged record.
    let mut killed_mid_stream = 0;
    for (i, ms) in [150u64, 300, 450].into_iter().enumerate() {
        let delay = Duration::from_millis(ms);
        let t = trial(2000 + i as u64, delay, DiskKind::Qcow2Overlay);
        println!(
            "qcow2 overlay: killed after {delay:?}, {} acknowledged, {} lost",
            t.acknowledged,
            t.lost.len()
        );
        assert!(t.lost.is_empty(), "acknowledged records lost: {:?}", t.lost);
        if t.acknowledged > 0 && t.acknowledged < RECORDS {
            killed_mid_stream += 1;
        }
    }
    assert!(
        killed_mid_stream > 0,
        "no trial killed the VMM while it was writing: the test proved nothing"
    );
}
