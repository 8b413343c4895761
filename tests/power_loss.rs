//! A power cut loses no flushed write, on raw and on qcow2: the disk lives on a test file
//! system (tests/common/powerloss.rs, FUSE) that holds every write since the last sync in
//! memory. The probe writes records, flushing after each, and says `PROBE acked N` once the
//! flush completed; the test kills the VMM, cuts the power (dropping every unsynced write,
//! or keeping a random subset of them in order, as a disk that reorders its cache may), and
//! checks the durable files: each acknowledged record intact and, for qcow2, no corruption
//! by `qemu-img check` (leaked clusters, space and not data, are allowed). Keeping a random
//! subset is what would catch a table written to disk before the data or refcounts it
//! depends on.
//!
//! Needs /dev/fuse and root, and qemu-img.

mod common;
#[path = "common/powerloss.rs"]
mod powerloss;
#[path = "common/records.rs"]
mod records;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// More records than any trial lives to write: the kill comes mid-stream.
const RECORDS: u64 = 1000;

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1
}

struct Outcome {
    acknowledged: u64,
    lost: Vec<u64>,
    dropped: usize,
    kept: usize,
    /// Power cuts replayed at points of the write history, and how many of them left
    /// leaked clusters (allocated, not yet mapped: space, not data).
    replayed: usize,
    leaky: usize,
}

/// Power cuts at `points` places of the history of a qcow2 trial (half just before a sync,
/// half anywhere), each keeping a random subset of the unsynced changes: `qemu-img check`
/// must find no corruption (leaked clusters are allowed: a cut between a refcount update
/// and the table that uses it leaves them). Returns (cuts, cuts that leaked).
fn replay_cuts(
    state: &powerloss::State,
    dir: &Path,
    points: usize,
    random: &mut Random,
) -> (usize, usize) {
    let (events, syncs) = state.history();
    if events == 0 {
        return (0, 0);
    }
    let mut leaky = 0;
    for n in 0..points {
        let cut = if n % 2 == 0 && !syncs.is_empty() {
            syncs[(random.next() % syncs.len() as u64) as usize]
        } else {
            (random.next() % events as u64) as usize
        };
        for (name, bytes) in state.replay(cut, &mut || random.next().is_multiple_of(2)) {
            bytes.save(&dir.join(name));
        }
        let overlay = dir.join("overlay.qcow2");
        let check = tool_output("qemu-img", &["check", "-f", "qcow2", s(&overlay)]);
        match check.status.code() {
            Some(0) => {}
            // Leaked clusters only.
            Some(3) => leaky += 1,
            code => panic!(
                "a power cut before event {cut} of {events}: qemu-img check status {code:?}\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            ),
        }
    }
    (points, leaky)
}

/// How a power cut treats the writes since the last sync.
#[derive(Clone, Copy, Debug)]
enum Cut {
    DropAll,
    KeepRandomSubset,
}

/// Where records go and how often they are flushed: record i at sector i * `spread`, a flush
/// (and the acknowledgements) after every `batch` records.
#[derive(Clone, Copy)]
struct Layout {
    spread: u64,
    batch: u64,
}

/// One trial: the probe writes records to a disk on the power-loss file system (a raw image,
/// or a qcow2 overlay on a raw base named relatively), the VMM is killed after `delay`, the
/// power is cut, and the durable files are checked.
fn trial(
    index: u64,
    qcow2: bool,
    layout: Layout,
    delay: Duration,
    cut: Cut,
    random: &mut Random,
) -> Outcome {
    let scratch =
        std::env::temp_dir().join(format!("keel-powerloss-{}-{index}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let mnt = scratch.join("mnt");
    let after = scratch.join("after");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&after).unwrap();
    let size = RECORDS * layout.spread * 512;
    let base = powerloss::Bytes::zeroes(size);
    let (files, disk_name) = if qcow2 {
        let base_path = scratch.join("base.img");
        base.save(&base_path);
        let overlay = scratch.join("overlay.qcow2");
        let out = tool_output(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.img",
                "-F",
                "raw",
                s(&overlay),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let files = vec![
            ("base.img".to_string(), base),
            (
                "overlay.qcow2".to_string(),
                powerloss::Bytes::from_vec(&std::fs::read(&overlay).unwrap()),
            ),
        ];
        (files, "overlay.qcow2")
    } else {
        (vec![("disk.img".to_string(), base)], "disk.img")
    };
    let mounted = powerloss::mount(&mnt, files);
    let disk = format!(
        "path={}{}",
        mnt.join(disk_name).display(),
        if qcow2 { ",format=qcow2" } else { "" }
    );
    let mut child = Command::new(KEEL)
        .args(["run", "--kernel"])
        .arg(probe_elf())
        .args(["--disk", &disk])
        .args([
            "--cmdline",
            &format!(
                "probe.blk_records={RECORDS} probe.blk_spread={} probe.blk_batch={} \
                 probe.blk_nodiscard probe.poweroff",
                layout.spread, layout.batch
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    while start.elapsed() < delay && child.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let out = reader.join().expect("stdout reader");
    let acked = records::acked(&out);
    assert!(
        acked.iter().copied().eq(0..acked.len() as u64),
        "acknowledgements out of order: {acked:?}"
    );
    if acked.is_empty() {
        let mut err = String::new();
        let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        eprintln!("trial {index}: nothing acknowledged ({status}); stdout:\n{out}\nstderr:\n{err}");
    }
    let (replayed, leaky) = if qcow2 {
        let state = mounted.state.lock().unwrap();
        let cuts = scratch.join("cuts");
        std::fs::create_dir_all(&cuts).unwrap();
        replay_cuts(&state, &cuts, 24, random)
    } else {
        (0, 0)
    };
    let (dropped, kept) = {
        let mut state = mounted.state.lock().unwrap();
        let (dropped, kept) = state.power_cut(&mut || match cut {
            Cut::DropAll => false,
            Cut::KeepRandomSubset => random.next().is_multiple_of(2),
        });
        for name in ["disk.img", "base.img", "overlay.qcow2"] {
            if let Some(bytes) = state.durable(name) {
                bytes.save(&after.join(name));
            }
        }
        (dropped, kept)
    };
    drop(mounted);
    let image = if qcow2 {
        let overlay = after.join("overlay.qcow2");
        let check = tool_output("qemu-img", &["check", "-f", "qcow2", s(&overlay)]);
        // 0: clean; 3: leaked clusters only (a cut between a refcount update and the table
        // that uses it), which is space, not data. 2 would be corruption.
        assert!(
            matches!(check.status.code(), Some(0) | Some(3)),
            "trial {index} ({cut:?}): qemu-img check after the power cut: status {:?}\n{}{}",
            check.status.code(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let raw = after.join("out.raw");
        let out = tool_output(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", s(&overlay), s(&raw)],
        );
        assert!(out.status.success(), "{out:?}");
        std::fs::read(&raw).unwrap()
    } else {
        std::fs::read(after.join("disk.img")).unwrap()
    };
    let lost = records::bad_spread_records(&image, 0..acked.len() as u64, layout.spread);
    let _ = std::fs::remove_dir_all(&scratch);
    Outcome {
        acknowledged: acked.len() as u64,
        lost,
        dropped,
        kept,
        replayed,
        leaky,
    }
}

/// Trials at random moments, half dropping every unsynced write and half keeping a random
/// subset; prints `format, trials, acknowledged, lost, unsynced dropped`.
fn trials(qcow2: bool, layout: Layout, count: u64) {
    let seed = seed();
    let format = if qcow2 { "qcow2 overlay" } else { "raw" };
    eprintln!("power-loss trials on {format}: seed {seed:#x}");
    let mut random = Random(seed);
    let (mut acknowledged, mut lost, mut dropped, mut mid_stream) = (0, Vec::new(), 0, 0);
    for i in 0..count {
        let delay = Duration::from_millis(150 + random.next() % 350);
        let cut = if i % 2 == 0 {
            Cut::DropAll
        } else {
            Cut::KeepRandomSubset
        };
        let t = trial(
            i + if qcow2 { 100 } else { 0 },
            qcow2,
            layout,
            delay,
            cut,
            &mut random,
        );
        eprintln!(
            "{format} trial {i}: killed after {delay:?}, power cut {cut:?}: {} acknowledged, \
             {} lost, {} unsynced changes dropped, {} kept; {} cuts replayed, {} leaked clusters",
            t.acknowledged,
            t.lost.len(),
            t.dropped,
            t.kept,
            t.replayed,
            t.leaky
        );
        if t.acknowledged > 0 && t.acknowledged < RECORDS {
            mid_stream += 1;
        }
        acknowledged += t.acknowledged;
        dropped += t.dropped;
        lost.extend(t.lost);
    }
    println!("format, trials, acknowledged, lost, unsynced dropped");
    println!(
        "{format}, {count}, {acknowledged}, {}, {dropped}",
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged records lost: {lost:?}");
    assert!(
        mid_stream > 0,
        "no trial stopped the VM while it was writing: the test proved nothing"
    );
}

fn count() -> u64 {
    std::env::var("KEEL_POWERLOSS_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

#[test]
fn a_power_cut_loses_no_flushed_record_on_raw() {
    if !kvm_available("a_power_cut_loses_no_flushed_record_on_raw") {
        return;
    }
    // Every record flushed, and records flushed eight at a time.
    trials(
        false,
        Layout {
            spread: 1,
            batch: 1,
        },
        count(),
    );
    trials(
        false,
        Layout {
            spread: 1,
            batch: 8,
        },
        count(),
    );
}

#[test]
fn a_power_cut_loses_no_flushed_record_on_a_qcow2_overlay() {
    if !kvm_available("a_power_cut_loses_no_flushed_record_on_a_qcow2_overlay") {
        return;
    }
    // Records 129 sectors apart, each in a cluster of its own (allocated, and copied up
    // from the base, on its first write), flushed eight at a time: each flush writes
    // refcounts and L2 entries.
    trials(
        true,
        Layout {
            spread: 129,
            batch: 8,
        },
        count(),
    );
}
