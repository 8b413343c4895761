//! Keel's VMDK reader against QEMU's, differentially: images made by `qemu-img create -f vmdk
//! -o subformat=...` with data written by `qemu-io`, converted to raw by Keel and by
//! `qemu-img convert`, must be byte-identical; Keel's output is sparse where the source was.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{program} is needed (apt install qemu-utils; scripts/install-deps.sh does): {e}"
            )
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-vmdk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Keel's conversion of `vmdk` to raw at `out`.
fn keel_convert(vmdk: &Path, out: &Path) -> disk::vmdk::Converted {
    let src = std::fs::File::open(vmdk).unwrap();
    let mut dst = std::fs::File::create(out).unwrap();
    disk::vmdk::convert(&src, &mut dst, |_, _| {}).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sparse_and_stream_optimized_vmdks_convert_as_qemu_converts_them() {
    let d = dir("both");
    let sparse = d.join("sparse.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            s(&sparse),
            "8M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0x5c 1M 4k",
            "-c",
            "write -P 0x11 7340544 512",
            s(&sparse),
        ],
    );
    let stream = d.join("stream.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&sparse),
            s(&stream),
        ],
    );
    for (name, vmdk) in [("monolithicSparse", &sparse), ("streamOptimized", &stream)] {
        let theirs = d.join(format!("{name}.qemu.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vmdk", "-O", "raw", s(vmdk), s(&theirs)],
        );
        let ours = d.join(format!("{name}.keel.raw"));
        let done = keel_convert(vmdk, &ours);
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len(), 8 << 20, "{name}");
        assert!(a == b, "{name}: Keel's raw image differs from qemu-img's");
        let allocated = std::fs::metadata(&ours).unwrap().blocks() * 512;
        eprintln!(
            "{name}: {} grains with data, {} written; {} KiB allocated of 8 MiB",
            done.grains_allocated,
            done.grains_written,
            allocated >> 10
        );
        assert!(
            allocated <= 512 << 10,
            "{name}: {allocated} bytes allocated: not sparse"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_vmdk_is_refused_with_what_is_wrong() {
    let d = dir("damaged");
    let vmdk = d.join("cut.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicSparse",
            s(&vmdk),
            "8M",
        ],
    );
    run(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0xab 0 64k", s(&vmdk)],
    );
    // Cut short before the data of the written grain.
    let len = std::fs::metadata(&vmdk).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&vmdk).unwrap();
    file.set_len(len - 32 * 1024).unwrap();
    let src = std::fs::File::open(&vmdk).unwrap();
    let mut dst = std::fs::File::create(d.join("out.raw")).unwrap();
    let e = disk::vmdk::convert(&src, &mut dst, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("beyond the end of the file"), "{e}");
    // Not a VMDK at all.
    std::fs::write(&vmdk, vec![0u8; 4096]).unwrap();
    let src = std::fs::File::open(&vmdk).unwrap();
    let e = disk::vmdk::convert(&src, &mut dst, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("KDMV"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
