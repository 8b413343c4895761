//! `keel vm snapshot|snapshots|restore` through the daemon, with jailed VMMs: a probe writing
//! disk records is snapshotted mid-way and runs on, its records' disk now written in a qcow2
//! overlay (the raw file, the snapshot's disk, no longer changes; a second disk, `direct=on`,
//! is copied); after a stop, the restore
//! starts a new overlay on the snapshot's disk (the one the VM wrote in since is removed)
//! and the probe goes on from the snapshot's record and verifies every one, then its memory
//! churn starts and checks. The ledger records the pause (`maintenance`, counted by the SLA
//! report) and the restore; each is an operation a client can follow. A snapshot written
//! beneath the image directories (`--to`) restores and goes the same way. Removing
//! snapshots and VMs removes the overlays nothing reaches any more, and no other.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::*;

const RECORDS: u64 = 200;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The newest operation of `kind` on `target`.
fn operation(daemon: &Daemon, kind: &str, target: &str) -> serde_json::Value {
    let ops = daemon.api_get("/operations");
    ops.as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == kind && o["target"] == target)
        .unwrap_or_else(|| panic!("no {kind} operation on {target}: {ops}"))
        .clone()
}

fn wait_for(log: &std::path::Path, text: &str, from: usize) -> String {
    common::daemon::wait_for_output(log, text, from, TIMEOUT)
}

#[test]
fn a_snapshot_restores_the_guest_and_its_disk_to_that_instant() {
    if !kvm_available("a_snapshot_restores_the_guest_and_its_disk_to_that_instant") {
        return;
    }
    let daemon = Daemon::start("snap");
    let disk = daemon.images().join("records.raw");
    sparse_disk(&disk);
    // A disk served with direct I/O, which qcow2 overlays are not: it is copied.
    let odd = daemon.images().join("direct.raw");
    std::fs::write(&odd, vec![7u8; 1 << 20]).unwrap();
    let kernel = probe_elf();
    let cmdline = format!(
        "probe.blk_records={RECORDS} probe.blk_nodiscard probe.churn=4M probe.churn_rate=10 probe.churn_report_ms=200 probe.churn_gap_us=20000"
    );
    daemon.ok(&[
        "vm",
        "create",
        "s1",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory",
        "128",
        "--disk",
        &format!("path={}", disk.display()),
        "--disk",
        &format!("path={},direct=on", odd.display()),
    ]);
    let from = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    daemon.ok(&["vm", "start", "s1"]);
    let log = std::path::PathBuf::from(
        daemon.json(&["vm", "show", "s1"])["console_log"]
            .as_str()
            .unwrap(),
    );
    wait_for(&log, "PROBE acked 40\n", 0);
    let refused = daemon.fails(&["vm", "restore", "s1", "nope"]);
    assert!(refused.contains("stop it first"), "{refused}");

    let snap = daemon.json(&["vm", "snapshot", "s1", "--name", "mid"]);
    assert_eq!(snap["name"], "mid", "{snap}");
    // The records' disk: kept as it is, the VM going on in an overlay of its own.
    let delta1 = daemon.images().join("vms/s1/disk0.delta1.qcow2");
    assert_eq!(snap["disks"][0]["how"], "overlay", "{snap}");
    assert_eq!(snap["disks"][0]["path"], disk.to_str().unwrap(), "{snap}");
    assert_eq!(
        snap["disks"][0]["overlay"],
        delta1.to_str().unwrap(),
        "{snap}"
    );
    let shown = daemon.json(&["vm", "show", "s1"]);
    assert_eq!(
        shown["spec"]["disks"][0]["path"],
        delta1.to_str().unwrap(),
        "{shown}"
    );
    assert_eq!(shown["spec"]["disks"][0]["format"], "qcow2", "{shown}");
    let frozen = std::fs::read(&disk).unwrap();
    // The direct disk: copied, and why.
    assert_eq!(
        snap["disks"][1]["how"], "copy",
        "ext4 here: no reflink: {snap}"
    );
    assert!(
        snap["disks"][1]["copied_because"]
            .as_str()
            .unwrap()
            .contains("direct=on"),
        "{snap}"
    );
    let stored = snap["memory_stored_bytes"].as_u64().unwrap();
    assert!(stored < 16 << 20, "only touched memory is stored: {snap}");
    assert_eq!(daemon.state("s1"), "running");
    let listed = daemon.ok(&["vm", "snapshots", "s1"]);
    assert!(listed.contains("mid"), "{listed}");
    // Its disk copy was an operation a client could follow (GET /operations).
    let op = operation(&daemon, "vm-snapshot", "s1");
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["result"], "mid", "{op}");
    assert!(
        op["step"]
            .as_str()
            .unwrap()
            .starts_with("copying disk 1 of 1 ("),
        "{op}"
    );
    assert_eq!(op["total_bytes"], 1 << 20, "the direct disk's bytes: {op}");
    // The VM ran on: all records, then the churn.
    let first = wait_for(&log, "PROBE churn tick 1 ", 0);
    assert!(
        first.contains(&format!("PROBE blk_verify ok {RECORDS}")),
        "{first}"
    );
    daemon.ok(&["vm", "stop", "s1"]);
    // The records went into the overlay: the snapshot's disk is as it was.
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the raw disk changed"
    );
    qemu_img(&["check", delta1.to_str().unwrap()]);

    // The restore: the disk goes back to the snapshot's instant, the guest on from there.
    let mark = std::fs::read_to_string(&log).unwrap().len();
    let restored = daemon.json(&["vm", "restore", "s1", "mid"]);
    assert_eq!(restored["state"], "running", "{restored}");
    let op = operation(&daemon, "vm-restore", "s1");
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["step"], "starting the VM on the snapshot", "{op}");
    // A new overlay on the snapshot's disk; the one written since is reached by nothing.
    let delta2 = daemon.images().join("vms/s1/disk0.delta2.qcow2");
    assert_eq!(
        restored["spec"]["disks"][0]["path"],
        delta2.to_str().unwrap(),
        "{restored}"
    );
    assert!(
        !delta1.exists(),
        "the overlay the VM wrote in since the snapshot is gone"
    );
    let after = wait_for(&log, "PROBE churn tick 1 ", mark);
    assert!(!after.contains("PROBE start"), "it booted again: {after}");
    assert!(
        after.contains(&format!("PROBE blk_verify ok {RECORDS}")),
        "{after}"
    );
    let resumed_at: u64 = after
        .lines()
        .find_map(|l| l.strip_prefix("PROBE acked "))
        .and_then(|n| n.trim().parse().ok())
        .expect("records acked after the restore");
    assert!(
        (40..RECORDS).contains(&resumed_at),
        "the guest went on from record {resumed_at}"
    );
    // A tick comes only after every page was checked good since the last one.
    let churned = wait_for(&log, "PROBE churn tick 2 ", mark);
    assert!(!churned.contains("check bad"), "{churned}");

    // The ledger: the snapshot's pause (maintenance) and the restore.
    let details = daemon.ledger_rows("s1", 30);
    let has = |text: &str| details.iter().any(|d| d.contains(text));
    assert!(
        has("paused maintenance paused for snapshot mid"),
        "{details:#?}"
    );
    assert!(
        has("running maintenance resumed after snapshot mid"),
        "{details:#?}"
    );
    assert!(has("snapshot mid taken"), "{details:#?}");
    assert!(
        has("starting operator restoring snapshot mid"),
        "{details:#?}"
    );
    let to = daemon.json(&["events", "--limit", "1"])[0]["time"]
        .as_str()
        .unwrap()
        .to_string();
    let report = daemon.json(&["sla", "report", "--from", &from, "--to", &to, "--vm", "s1"]);
    let counted = report["vms"][0]["downtime_by_cause"]["maintenance"]
        .as_f64()
        .unwrap();
    assert!(counted > 0.0, "the snapshot's pause is counted: {report}");

    // The same snapshot as a new VM, beside the first (which still runs): its own copy of
    // the disk, the guest on from the same record.
    let s2 = daemon.json(&["vm", "restore", "s1", "mid", "--as", "s2"]);
    assert_eq!(s2["state"], "running", "{s2}");
    let s2_delta = daemon.images().join("vms/s2/disk0.delta1.qcow2");
    assert_eq!(
        s2["spec"]["disks"][0]["path"],
        s2_delta.to_str().unwrap(),
        "{s2}"
    );
    assert_ne!(
        s2["spec"]["disks"][1]["path"], snap["disks"][1]["path"],
        "its own copy of the copied disk: {s2}"
    );
    let log2 = std::path::PathBuf::from(s2["console_log"].as_str().unwrap());
    let second = wait_for(&log2, "PROBE churn tick 1 ", 0);
    assert!(!second.contains("PROBE start"), "it booted: {second}");
    assert!(
        second.contains(&format!("PROBE blk_verify ok {RECORDS}")),
        "{second}"
    );
    daemon.ok(&["vm", "stop", "s2"]);
    daemon.ok(&["vm", "rm", "s2"]);
    assert!(
        !daemon.images().join("vms/s2").exists(),
        "nothing reaches the deleted VM's files"
    );
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the raw disk changed"
    );

    // A snapshot written elsewhere (`--to`): beneath the image directories only, and into a
    // new directory of its name; it restores and goes like the others.
    let far = daemon.images().join("snaps");
    std::fs::create_dir_all(far.join("taken")).unwrap();
    let refused = daemon.fails(&["vm", "snapshot", "s1", "--to", "/tmp"]);
    assert!(refused.contains("image directories"), "{refused}");
    let refused = daemon.fails(&[
        "vm",
        "snapshot",
        "s1",
        "--name",
        "taken",
        "--to",
        far.to_str().unwrap(),
    ]);
    assert!(refused.contains("exists already"), "{refused}");
    let away = daemon.json(&[
        "vm",
        "snapshot",
        "s1",
        "--name",
        "away",
        "--to",
        far.to_str().unwrap(),
    ]);
    let files = far.join("away");
    assert_eq!(away["dir"], files.to_str().unwrap(), "{away}");
    for file in ["state", "memory", "disk1", "snapshot.json"] {
        assert!(files.join(file).is_file(), "{file} in {}", files.display());
    }
    let listed = daemon.ok(&["vm", "snapshots", "s1"]);
    assert!(listed.contains("away"), "{listed}");
    daemon.ok(&["vm", "stop", "s1"]);
    let mark = std::fs::read_to_string(&log).unwrap().len();
    let restored = daemon.json(&["vm", "restore", "s1", "away"]);
    assert_eq!(restored["state"], "running", "{restored}");
    let after = wait_for(&log, "PROBE churn tick", mark);
    assert!(!after.contains("PROBE start"), "it booted again: {after}");
    assert!(!after.contains("check bad"), "{after}");
    daemon.ok(&["vm", "stop", "s1"]);
    daemon.ok(&["vm", "snapshot-rm", "s1", "away"]);
    assert!(!files.exists(), "its files went with it");
    // Its disk (delta2) lies below the VM's overlay since the restore (delta4), which is
    // the only image over it, and the VM is stopped: delta2 is merged into delta4 and goes.
    let now = daemon.json(&["vm", "show", "s1"])["spec"]["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        now,
        daemon
            .images()
            .join("vms/s1/disk0.delta4.qcow2")
            .to_str()
            .unwrap()
    );
    assert!(!delta2.exists());
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &now])).unwrap();
    assert_eq!(info["backing-filename"], disk.to_str().unwrap(), "{info}");

    daemon.ok(&["vm", "snapshot-rm", "s1", "mid"]);
    let listed = daemon.ok(&["vm", "snapshots", "s1"]);
    assert!(listed.contains("no snapshots"), "{listed}");
    let refused = daemon.fails(&["vm", "restore", "s1", "mid"]);
    assert!(refused.contains("no snapshot 'mid'"), "{refused}");
    // The VM's chain is whole (qemu-img reads it through), then goes with the VM.
    qemu_img(&["check", &now]);
    daemon.ok(&["vm", "rm", "s1"]);
    assert!(!daemon.images().join("vms/s1").exists());
    assert!(
        std::fs::read(&disk).unwrap() == frozen,
        "the raw disk changed"
    );
}

/// The disk's contents as `qemu-img` reads them through its chain (no VMM may hold it).
fn contents(image: &std::path::Path) -> Vec<u8> {
    let out = image.with_extension("read.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

#[test]
fn removing_a_snapshot_merges_its_overlay_into_the_next() {
    if !kvm_available("removing_a_snapshot_merges_its_overlay_into_the_next") {
        return;
    }
    let daemon = Daemon::start("snapmerge");
    let disk = daemon.images().join("records.raw");
    sparse_disk(&disk);
    daemon.create_probe_with(
        "m",
        // A record a cluster (64 KiB): each overlay holds its own records' clusters.
        &format!("probe.blk_records={RECORDS} probe.blk_nodiscard probe.blk_spread=128"),
        Some(&disk),
    );
    daemon.ok(&["vm", "start", "m"]);
    let log = daemon.console_log("m");
    let delta = |n: u32| daemon.images().join(format!("vms/m/disk0.delta{n}.qcow2"));
    // Three snapshots while the records go: a keeps the raw file, b delta1, c delta2.
    for (name, acked) in [("a", 20), ("b", 60), ("c", 100)] {
        wait_for(&log, &format!("PROBE acked {acked}\n"), 0);
        daemon.ok(&["vm", "snapshot", "m", "--name", name]);
    }
    wait_for(&log, &format!("PROBE blk_verify ok {RECORDS}"), 0);
    daemon.ok(&["vm", "stop", "m"]);
    // c's disk as QEMU reads it (no VMM holds it now); some of it from b's overlay.
    let c_disk = contents(&delta(2));
    let map: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        delta(2).to_str().unwrap(),
    ]))
    .unwrap();
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|m| m["depth"] == 1 && m["data"] == true),
        "b's overlay holds none of c's data: {map}"
    );
    // The VM runs from c (on delta4 over delta2; delta3 is gone).
    let mark = std::fs::read_to_string(&log).unwrap().len();
    daemon.ok(&["vm", "restore", "m", "c"]);
    assert!(!delta(3).exists());

    // b's overlay (delta1) lies between a's disk and c's (delta2), which no VM writes in:
    // it is merged into delta2, over the raw file, while the VM reads the old files.
    daemon.ok(&["vm", "snapshot-rm", "m", "b"]);
    assert!(!delta(1).exists(), "b's overlay is still there");
    let out = wait_for(&log, &format!("PROBE blk_verify ok {RECORDS}"), mark);
    assert!(!out.contains("PROBE start"), "it booted again: {out}");
    daemon.ok(&["vm", "stop", "m"]);
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        delta(2).to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["backing-filename"], disk.to_str().unwrap(), "{info}");
    assert!(
        contents(&delta(2)) == c_disk,
        "c's disk reads otherwise after the merge"
    );
    qemu_img(&["check", delta(2).to_str().unwrap()]);

    // c restores from the merged image: the probe goes on from its record and verifies all.
    let mark = std::fs::read_to_string(&log).unwrap().len();
    daemon.ok(&["vm", "restore", "m", "c"]);
    let after = wait_for(&log, &format!("PROBE blk_verify ok {RECORDS}"), mark);
    assert!(!after.contains("PROBE start"), "it booted again: {after}");
    // a's disk is the operator's raw file: it stays, and so does c's, below the VM's.
    daemon.ok(&["vm", "snapshot-rm", "m", "a"]);
    assert!(disk.exists() && delta(2).exists());
    daemon.ok(&["vm", "stop", "m"]);
    daemon.ok(&["vm", "rm", "m"]);
    assert!(!daemon.images().join("vms/m").exists());
}
