//! Disk boot: VMs with no kernel file boot what their first disk holds. The disks are real
//! images (mke2fs, sfdisk) with the probe guest installed as a kernel, booted by `keel run`
//! and by the daemon.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;
use disk::boot::image::{ext4, partitioned, Node, Table};

const MIB: u64 = 1 << 20;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-disk-boot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A GPT disk whose partition 2 holds two Boot Loader Specification entries: the newer boots
/// the probe's bzImage, the older its ELF. Partition 1 is empty, like a BIOS boot partition.
fn bls_disk(name: &str) -> PathBuf {
    let root = ext4(
        &scratch(&format!("{name}-fs")),
        &[
            (
                "loader/entries/probe-1.9.conf",
                Node::File(b"title Probe (old)\nversion 1.9\nlinux /probe.elf\noptions root=/dev/vda2 probe.old\n".to_vec()),
            ),
            (
                "loader/entries/probe-1.10.conf",
                Node::File(b"title Probe\nversion 1.10\nlinux /probe.bzImage\noptions root=/dev/vda2 probe.from_disk\n".to_vec()),
            ),
            ("probe.elf", Node::File(read(&probe_elf()))),
            ("probe.bzImage", Node::File(read(&probe_bzimage()))),
        ],
        4 * MIB,
    )
    .expect("building the root filesystem");
    let image = partitioned(&scratch(name), Table::Gpt, &[vec![0; 4096], root])
        .expect("partitioning the disk");
    let path =
        std::env::temp_dir().join(format!("keel-disk-boot-{}-{name}.img", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
}

/// A disk that is one ext4 filesystem with Debian's kernel link to the probe's ELF (PVH).
fn debian_links_disk(name: &str) -> PathBuf {
    let image = ext4(
        &scratch(name),
        &[
            ("boot/vmlinuz-probe", Node::File(read(&probe_elf()))),
            ("vmlinuz", Node::Symlink("boot/vmlinuz-probe".into())),
        ],
        4 * MIB,
    )
    .expect("building the filesystem");
    let path =
        std::env::temp_dir().join(format!("keel-disk-boot-{}-{name}.img", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
}

fn run_disk(disk: &Path, cmdline: &str) -> Run {
    let disk = format!("path={}", disk.display());
    let cmd = keel_run(&["--disk", &disk, "--memory", "64", "--cmdline", cmdline]);
    run_with(cmd, None, Duration::from_secs(60), None)
}

#[test]
fn keel_run_boots_the_newest_entry_of_a_partitioned_disk() {
    if !kvm_available("keel_run_boots_the_newest_entry_of_a_partitioned_disk") {
        return;
    }
    let disk = bls_disk("bls");
    let run = run_disk(&disk, "probe.poweroff");
    let ctx = run.context();
    assert_eq!(run.code(), Some(0), "{ctx}");
    let p = run.probe();
    assert_eq!(
        p["boot"],
        ["linux64"],
        "the bzImage of the newer entry\n{ctx}"
    );
    assert_eq!(
        p["cmdline"],
        ["root=/dev/vda2 probe.from_disk probe.poweroff"],
        "the entry's options, then the operator's\n{ctx}"
    );
    assert!(
        run.stderr.contains(&format!(
            "booting from disk {}: partition 2: /loader/entries/probe-1.10.conf",
            disk.display()
        )),
        "{ctx}"
    );
    let _ = std::fs::remove_file(disk);
}

#[test]
fn keel_run_boots_debians_kernel_link_with_the_root_it_was_found_on() {
    if !kvm_available("keel_run_boots_debians_kernel_link_with_the_root_it_was_found_on") {
        return;
    }
    let disk = debian_links_disk("links");
    let run = run_disk(&disk, "probe.poweroff");
    let ctx = run.context();
    assert_eq!(run.code(), Some(0), "{ctx}");
    let p = run.probe();
    assert_eq!(p["boot"], ["pvh"], "{ctx}");
    assert_eq!(p["cmdline"], ["root=/dev/vda ro probe.poweroff"], "{ctx}");
    let _ = std::fs::remove_file(disk);
}

#[test]
fn keel_run_boots_through_a_qcow2_overlay() {
    if !kvm_available("keel_run_boots_through_a_qcow2_overlay") {
        return;
    }
    // The partitioned disk converted to qcow2, under an overlay: the reader finds the newest
    // entry through two qcow2 layers.
    let raw = bls_disk("qcow2-base");
    let base = raw.with_extension("qcow2");
    let overlay = raw.with_extension("overlay.qcow2");
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (apt install qemu-utils)");
        assert!(out.status.success(), "{out:?}");
    };
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    let disk = format!("path={},format=qcow2", overlay.display());
    let cmd = keel_run(&[
        "--disk",
        &disk,
        "--memory",
        "64",
        "--cmdline",
        "probe.poweroff",
    ]);
    let run = run_with(cmd, None, Duration::from_secs(60), None);
    let ctx = run.context();
    assert_eq!(run.code(), Some(0), "{ctx}");
    let p = run.probe();
    assert_eq!(p["boot"], ["linux64"], "{ctx}");
    assert_eq!(
        p["cmdline"],
        ["root=/dev/vda2 probe.from_disk probe.poweroff"],
        "{ctx}"
    );
    for f in [raw, base, overlay] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn a_disk_without_a_kernel_is_refused_with_what_was_searched() {
    if !kvm_available("a_disk_without_a_kernel_is_refused_with_what_was_searched") {
        return;
    }
    let root = ext4(
        &scratch("nokernel-fs"),
        &[("etc/hostname", Node::File(b"web1\n".to_vec()))],
        2 * MIB,
    )
    .unwrap();
    let image = partitioned(&scratch("nokernel"), Table::Mbr, &[root]).unwrap();
    let path = std::env::temp_dir().join(format!(
        "keel-disk-boot-{}-nokernel.img",
        std::process::id()
    ));
    std::fs::write(&path, image).unwrap();
    let run = run_disk(&path, "");
    let ctx = run.context();
    assert_eq!(run.code(), Some(1), "{ctx}");
    assert!(
        run.stderr.contains("no kernel found on the boot disk: partition 1: no boot entry and no /vmlinuz or /boot/vmlinuz"),
        "{ctx}"
    );
    assert!(run.probe().is_empty(), "{ctx}");

    // No kernel and no disk at all.
    let run = run_with(
        keel_run(&["--memory", "64"]),
        None,
        Duration::from_secs(30),
        None,
    );
    assert_eq!(run.code(), Some(1), "{}", run.context());
    assert!(
        run.stderr.contains("no kernel and no disk"),
        "{}",
        run.context()
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn the_daemon_boots_a_vm_defined_without_a_kernel() {
    if !kvm_available("the_daemon_boots_a_vm_defined_without_a_kernel") {
        return;
    }
    let built = bls_disk("daemon");
    let daemon = Daemon::start("disk-boot");
    // The daemon opens VMs' files only from its image directories.
    let disk = daemon.images().join("boot.img");
    std::fs::rename(&built, &disk)
        .or_else(|_| std::fs::copy(&built, &disk).map(|_| ()))
        .unwrap();
    let disk_arg = format!("path={}", disk.display());
    daemon.ok(&[
        "vm",
        "create",
        "fromdisk",
        "--disk",
        &disk_arg,
        "--cmdline",
        "probe.power_button",
        "--memory",
        "64",
    ]);
    let shown = daemon.ok(&["vm", "show", "fromdisk"]);
    assert!(shown.contains("from the first disk (disk boot)"), "{shown}");
    daemon.ok(&["vm", "start", "fromdisk"]);
    daemon.wait_state("fromdisk", "running", Duration::from_secs(30));
    let log = daemon.json(&["vm", "show", "fromdisk"])["console_log"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while !text.contains("PROBE ready") {
        assert!(
            Instant::now() < deadline,
            "no PROBE ready in {log}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    assert!(
        text.contains("PROBE cmdline root=/dev/vda2 probe.from_disk probe.power_button"),
        "{text}"
    );
    daemon.ok(&["vm", "shutdown", "fromdisk"]);
    daemon.wait_state("fromdisk", "stopped", Duration::from_secs(30));

    // A disk without a kernel: the start fails with what was searched, and the VM stays
    // stopped.
    let blank = daemon.images().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(MIB).unwrap();
    let blank_arg = format!("path={}", blank.display());
    daemon.ok(&[
        "vm", "create", "blank", "--disk", &blank_arg, "--memory", "64",
    ]);
    let err = daemon.fails(&["vm", "start", "blank"]);
    assert!(
        err.contains("no kernel found on the boot disk: the whole disk: no ext2/3/4 filesystem"),
        "{err}"
    );
    assert_eq!(daemon.state("blank"), "stopped");
    let _ = std::fs::remove_file(blank);

    // A definition with neither kernel nor disk is refused when it is made.
    let err = daemon.fails(&["vm", "create", "nothing", "--memory", "64"]);
    assert!(err.contains("no kernel and no disk"), "{err}");
    let _ = std::fs::remove_file(disk);
}
