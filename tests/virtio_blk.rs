//! The probe guest drives virtio-blk under `keel run` against real files: numbered,
//! checksummed records with a flush after each, read back, discard and write-zeroes, a
//! read-only disk, and several disks.

mod common;
#[path = "common/records.rs"]
mod records;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn image(name: &str, bytes: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-virtio-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(bytes).unwrap();
    path
}

fn run_with_disks(disks: &[String], cmdline: &str) -> Run {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf().display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_with(keel_run(&args), None, Duration::from_secs(120), None)
}

#[test]
fn records_are_acknowledged_read_back_discarded_and_in_the_file() {
    if !kvm_available("records_are_acknowledged_read_back_discarded_and_in_the_file") {
        return;
    }
    records_round_trip("records.img", "");
}

#[test]
fn records_round_trip_with_direct_io() {
    if !kvm_available("records_round_trip_with_direct_io") {
        return;
    }
    records_round_trip("records-direct.img", ",direct=on");
}

/// The probe's records, read-back, discard and write-zeroes on a 1 MiB disk with `options`
/// added to its `--disk`; checks what the guest said and the file.
fn records_round_trip(name: &str, options: &str) {
    let disk = image(name, 1 << 20);
    let run = run_with_disks(
        &[format!(
            "path={},serial=probe-disk-0{options}",
            disk.display()
        )],
        "probe.blk_records=50 probe.poweroff",
    );
    let ctx = run.context();
    let p = run.probe();
    assert_eq!(p["virtio"], vec!["0 0xd0000000 irq 5 id 2"], "{ctx}");
    assert_eq!(p["virtio_devices"], vec!["1"], "{ctx}");
    assert!(
        p["blk0"].contains(&"serial probe-disk-0".to_string()),
        "{ctx}"
    );
    assert!(
        p["blk0"].iter().any(|l| l.starts_with("capacity 2048 ")),
        "{ctx}"
    );
    assert_eq!(
        records::acked(&run.stdout),
        (0..50).collect::<Vec<_>>(),
        "{ctx}"
    );
    assert_eq!(p["blk_verify"], vec!["ok 50"], "{ctx}");
    assert_eq!(p["blk_discard"], vec!["ok"], "{ctx}");
    assert_eq!(p["blk_write_zeroes"], vec!["ok"], "{ctx}");
    assert_eq!(p.get("blk_done").map(Vec::len), Some(1), "{ctx}");
    assert_eq!(run.code(), Some(0), "{ctx}");
    // The file itself: discard and write-zeroes cleared sectors 0..=8; the rest are records.
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(records::bad_records(&bytes, 9..50), Vec::<u64>::new());
    assert!(
        bytes[..9 * 512].iter().all(|&b| b == 0),
        "discarded and zeroed sectors read as zero"
    );
    assert_eq!(bytes.len(), 1 << 20, "discard keeps the file size");
}

#[test]
fn read_only_disk_refuses_the_guests_write() {
    if !kvm_available("read_only_disk_refuses_the_guests_write") {
        return;
    }
    let disk = image("readonly.img", 64 * 1024);
    std::fs::write(&disk, vec![0x5au8; 64 * 1024]).unwrap();
    let run = run_with_disks(
        &[format!("path={},readonly=on", disk.display())],
        "probe.blk_readonly_check probe.poweroff",
    );
    let ctx = run.context();
    // The device offers VIRTIO_BLK_F_RO (bit 5); the probe writes anyway and gets IOERR.
    assert!(
        run.probe()["blk0"]
            .iter()
            .any(|l| l.starts_with("capacity 128 ")),
        "{ctx}"
    );
    assert_eq!(run.probe()["blk_write_status"], vec!["1"], "{ctx}");
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
        "the file is unchanged"
    );
    assert_eq!(run.code(), Some(0), "{ctx}");
}

#[test]
fn several_disks_each_get_a_window_an_irq_and_a_default_serial() {
    if !kvm_available("several_disks_each_get_a_window_an_irq_and_a_default_serial") {
        return;
    }
    let disks: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "path={}",
                image(&format!("multi{i}.img"), 64 * 1024).display()
            )
        })
        .collect();
    let run = run_with_disks(&disks, "probe.poweroff");
    let ctx = run.context();
    let p = run.probe();
    assert_eq!(
        p["virtio"],
        vec![
            "0 0xd0000000 irq 5 id 2",
            "1 0xd0001000 irq 6 id 2",
            "2 0xd0002000 irq 7 id 2"
        ],
        "{ctx}"
    );
    assert!(
        p["blk0"].contains(&"serial keel-disk-0".to_string()),
        "{ctx}"
    );
    assert_eq!(run.code(), Some(0), "{ctx}");
}

#[test]
fn bad_disk_options_are_one_clear_error() {
    if !kvm_available("bad_disk_options_are_one_clear_error") {
        return;
    }
    let disk = image("odd.img", 1000);
    let run = run_with_disks(&[format!("path={}", disk.display())], "probe.poweroff");
    assert_eq!(run.code(), Some(1), "{}", run.context());
    assert!(
        run.stderr.contains("not a multiple of 512"),
        "{}",
        run.context()
    );
    let run = run_with_disks(&["path=/x,bw=fast".to_string()], "");
    assert_eq!(run.code(), Some(2), "{}", run.context());
    assert!(run.stderr.contains("bw=fast"), "{}", run.context());
    // Direct I/O on a file system that cannot serve 512-byte sectors with it: this kernel's
    // tmpfs reports no direct-I/O alignment, so 4096 bytes is assumed.
    let shm = std::path::Path::new("/dev/shm").join(format!("keel-blk-{}", std::process::id()));
    std::fs::File::create(&shm)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let run = run_with_disks(
        &[format!("path={},direct=on", shm.display())],
        "probe.poweroff",
    );
    let _ = std::fs::remove_file(&shm);
    assert_eq!(run.code(), Some(1), "{}", run.context());
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{}", run.context());
    assert!(
        errors[0].starts_with(&format!("keel: error: disk {}: direct=on:", shm.display()))
            && errors[0].ends_with("use direct=off"),
        "{}",
        run.context()
    );
}

#[test]
fn ring3_benchmark_loops_run_to_completion() {
    if !kvm_available("ring3_benchmark_loops_run_to_completion") {
        return;
    }
    // The probe's benchmark switches (used by the e2e benchmark) must keep working: small
    // counts, with and without EVENT_IDX, each loop's done line exact.
    for event_idx in ["", " probe.bench_event_idx"] {
        let disk = image("bench.img", 16 << 20);
        let cmdline = format!(
            "probe.bench_blk_read=200 probe.bench_blk_read_qd=200 probe.bench_blk_write=3{event_idx} probe.poweroff"
        );
        let run = run_with_disks(&[format!("path={}", disk.display())], &cmdline);
        let ctx = run.context();
        let p = run.probe();
        assert_eq!(
            p["bench_blk_read"][..2],
            ["start", "done 200 819200"],
            "{ctx}"
        );
        assert_eq!(
            p["bench_blk_read_qd"][..2],
            ["start", "done 200 819200"],
            "{ctx}"
        );
        assert_eq!(
            p["bench_blk_write"][..2],
            ["start", "done 3 3145728"],
            "{ctx}"
        );
        assert_eq!(run.code(), Some(0), "{ctx}");
    }
}
