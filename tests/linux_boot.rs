//! Boots Debian's kernel (the ELF vmlinux, through its PVH entry) with an initramfs built by
//! guest/linux/build.sh. On hardware KVM it must reach GUEST-READY and power off. On a PVM
//! host an unmodified kernel's ring-0 code is emulated and it cannot finish booting, so the
//! test checks, within 3 minutes, that the kernel's own early log shows Keel's boot data: the
//! command line and the e820 map.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

const MEMORY_MIB: u64 = 512;

/// Runs a guest build script (which reuses its cache), then asks it where the result is
/// (`print`: its flag for that).
fn built(script: &str, print: &str) -> PathBuf {
    let script = workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = Command::new("bash")
        .arg(&script)
        .arg(print)
        .output()
        .expect("the build's output path");
    PathBuf::from(String::from_utf8_lossy(&path.stdout).trim())
}

/// Builds (or finds in its cache) the Linux guest; returns its directory.
fn linux_guest() -> PathBuf {
    built("guest/linux/build.sh", "--print-dir")
}

/// The early log is complete once an e820 line is followed by some other kernel line.
fn e820_map_printed(out: &str) -> bool {
    let lines: Vec<&str> = out.lines().collect();
    match lines.iter().rposition(|l| l.contains("BIOS-e820:")) {
        Some(last) => lines.len() > last + 1 && lines[last + 1].contains(']'),
        None => false,
    }
}

#[test]
fn debian_kernel_accepts_keels_boot_data() {
    if !kvm_available("debian_kernel_accepts_keels_boot_data") {
        return;
    }
    let guest = linux_guest();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 guest_info poweroff_after_ready";
    let mut cmd = Command::new(KEEL);
    cmd.args(["run", "--kernel"])
        .arg(guest.join("vmlinux"))
        .arg("--initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args([
            "--memory",
            &MEMORY_MIB.to_string(),
            "--cpus",
            "2",
            "--cmdline",
            cmdline,
        ]);
    let pvm = pvm_host();
    let run = if pvm {
        run_until(cmd, None, Duration::from_secs(180), e820_map_printed)
    } else {
        run_until(cmd, None, Duration::from_secs(180), |_| false)
    };
    let ctx = run.context();
    assert!(
        run.stdout.contains(&format!("Command line: {cmdline}")),
        "kernel did not echo the command line\n{ctx}"
    );
    assert!(
        run.stdout
            .contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "conventional memory missing from the kernel's e820\n{ctx}"
    );
    let top = (MEMORY_MIB << 20) - 1;
    let high = format!("BIOS-e820: [mem 0x0000000000100000-0x{top:016x}] usable");
    assert!(
        run.stdout.contains(&high),
        "RAM above 1 MiB missing from the kernel's e820\n{ctx}"
    );
    if pvm {
        eprintln!("NOTE: PVM host: Debian's kernel accepted Keel's boot data; it cannot finish booting here");
    } else {
        assert!(run.stdout.contains("GUEST-READY"), "{ctx}");
        assert!(run.stdout.contains("GUEST-INFO cpus 2"), "{ctx}");
        assert_eq!(run.code(), Some(0), "{ctx}");
        assert!(run.stderr.contains("guest powered off"), "{ctx}");
    }
}

/// Debian's kernel installed on a disk the way Debian installs it (/boot/vmlinuz-VERSION and
/// /boot/initrd.img-VERSION with the /vmlinuz and /initrd.img links, on partition 1 of a GPT
/// disk) boots with no kernel file: the ELF form of the kernel, which this host can run.
#[test]
fn debian_kernel_boots_from_a_disk() {
    use disk::boot::image::{ext4, partitioned, Node, Table};
    if !kvm_available("debian_kernel_boots_from_a_disk") {
        return;
    }
    let guest = linux_guest();
    let read = |name: &str| std::fs::read(guest.join(name)).expect("reading the Linux guest");
    let scratch = std::env::temp_dir().join(format!("keel-linux-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let (kernel, initrd) = (read("vmlinux"), read("initramfs.cpio.gz"));
    let size = (kernel.len() + initrd.len()) as u64 + (16 << 20);
    let root = ext4(
        &scratch.join("fs"),
        &[
            ("boot/vmlinuz-debian", Node::File(kernel)),
            ("boot/initrd.img-debian", Node::File(initrd)),
            ("vmlinuz", Node::Symlink("boot/vmlinuz-debian".into())),
            ("initrd.img", Node::Symlink("boot/initrd.img-debian".into())),
        ],
        size,
    )
    .expect("building the root filesystem");
    let image = partitioned(&scratch.join("disk"), Table::Gpt, &[root]).expect("partitioning");
    let disk_path = scratch.with_extension("img");
    std::fs::write(&disk_path, image).unwrap();

    let operator = "console=ttyS0 earlyprintk=serial,ttyS0,115200 guest_info poweroff_after_ready";
    let mut cmd = Command::new(KEEL);
    cmd.arg("run")
        .arg("--disk")
        .arg(format!("path={}", disk_path.display()))
        .args(["--memory", &MEMORY_MIB.to_string(), "--cpus", "2"])
        .args(["--cmdline", operator]);
    let pvm = pvm_host();
    let run = if pvm {
        run_until(cmd, None, Duration::from_secs(180), e820_map_printed)
    } else {
        run_until(cmd, None, Duration::from_secs(180), |_| false)
    };
    let _ = std::fs::remove_file(&disk_path);
    let ctx = run.context();
    assert!(
        run.stderr.contains("partition 1: /vmlinuz"),
        "the kernel was not found through Debian's link\n{ctx}"
    );
    assert!(
        run.stdout
            .contains(&format!("Command line: root=/dev/vda1 ro {operator}")),
        "the kernel did not get the disk's root and the operator's options\n{ctx}"
    );
    if pvm {
        eprintln!(
            "NOTE: PVM host: Debian's kernel booted from the disk as far as this host allows"
        );
    } else {
        assert!(run.stdout.contains("GUEST-READY"), "{ctx}");
        assert_eq!(run.code(), Some(0), "{ctx}");
    }
}

/// Builds (or finds in its cache) the Debian server image; its path.
fn debian_image() -> PathBuf {
    built("guest/debian/build.sh", "--print-path")
}

#[test]
fn the_debian_server_image_boots_from_its_qcow2_disk() {
    if !kvm_available("the_debian_server_image_boots_from_its_qcow2_disk") {
        return;
    }
    let image = debian_image();
    let operator = "earlyprintk=serial,ttyS0,115200";
    let mut cmd = Command::new(KEEL);
    cmd.arg("run")
        .arg("--disk")
        .arg(format!("path={},format=qcow2,readonly=on", image.display()))
        .args(["--memory", &MEMORY_MIB.to_string(), "--cpus", "2"])
        .args(["--cmdline", operator]);
    let pvm = pvm_host();
    let run = if pvm {
        run_until(cmd, None, Duration::from_secs(180), e820_map_printed)
    } else {
        run_until(cmd, None, Duration::from_secs(180), |out| {
            out.contains("login:")
        })
    };
    let ctx = run.context();
    assert!(
        run.stderr
            .contains("partition 1: /boot/loader/entries/debian.conf"),
        "the image's Boot Loader Specification entry was not used\n{ctx}"
    );
    assert!(
        run.stdout.contains("Linux version") && run.stdout.contains("cloud-amd64"),
        "Debian's cloud kernel did not start\n{ctx}"
    );
    assert!(
        run.stdout.contains(&format!(
            "Command line: root=LABEL=keel-root ro console=ttyS0 net.ifnames=0 {operator}"
        )),
        "the kernel did not get the image's options and the operator's\n{ctx}"
    );
    if pvm {
        eprintln!("NOTE: PVM host: the Debian image booted as far as this host allows");
    } else {
        assert!(run.stdout.contains("login:"), "no login prompt\n{ctx}");
    }
}
