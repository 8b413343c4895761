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

/// xorshift64*: enough randomness for kill times, reproducible from the printed seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Trial {
    acknowledged: u64,
    lost: Vec<u64>,
}

/// Boots the probe writing records, kills the VMM after `delay`, checks the file. The disk
/// is opened with `O_DIRECT` when `direct` is set.
fn trial(index: u64, delay: Duration, direct: bool) -> Trial {
    let dir = std::env::temp_dir().join(format!("keel-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join(format!("trial{index}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(RECORDS * 512)
        .unwrap();
    let mut child = Command::new(KEEL)
        .args(["run", "--kernel"])
        .arg(probe_elf())
        .arg("--disk")
        .arg(format!(
            "path={}{}",
            disk.display(),
            if direct { ",direct=on" } else { "" }
        ))
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
    let image = std::fs::read(&disk).unwrap();
    let lost = records::bad_records(&image, 0..acked.len() as u64);
    let _ = std::fs::remove_file(&disk);
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
        let t = trial(i, delay, false);
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
    let t = trial(1000, delay, true);
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
