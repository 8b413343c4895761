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

/// `qemu-img create -f vmdk -o subformat=SUBFORMAT PATH SIZE`.
fn create(subformat: &str, path: &str, size: &str) {
    let option = format!("subformat={subformat}");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "-o", &option, path, size],
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Keel's conversion of the whole disk `vmdk` (any subformat) to raw at `out`.
fn keel_convert_disk(vmdk: &Path, out: &Path) -> disk::vmdk::Disk {
    let mut dst = std::fs::File::create(out).unwrap();
    disk::vmdk::convert_file(vmdk, &mut dst, |_, _| {}).unwrap()
}

#[test]
fn every_subformat_converts_as_qemu_converts_it() {
    let d = dir("all");
    // Data in both extents of the split formats (2 GiB extents: the disk is 2.5 GiB; only
    // the data is written, so the files stay small and sparse).
    let writes = [
        "write -P 0xab 0 64k",
        "write -P 0x5c 2147479552 8k", // across the extents' boundary
        "write -P 0x11 2684350464 4k", // the last 4 KiB, in the last extent
    ];
    for subformat in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let vmdk = d.join(format!("{subformat}.vmdk"));
        // qemu-io cannot write streamOptimized in place: it is made from a sparse one.
        let made_as = if subformat == "streamOptimized" {
            "monolithicSparse"
        } else {
            subformat
        };
        let source = d.join(format!("{subformat}-source.vmdk"));
        let target = if subformat == "streamOptimized" {
            &source
        } else {
            &vmdk
        };
        create(made_as, s(target), "2560M");
        let mut args = vec!["-f", "vmdk"];
        for w in &writes {
            args.extend(["-c", w]);
        }
        args.push(s(target));
        run("qemu-io", &args);
        if subformat == "streamOptimized" {
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
                    s(&source),
                    s(&vmdk),
                ],
            );
        }
        let theirs = d.join(format!("{subformat}.qemu.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vmdk", "-O", "raw", s(&vmdk), s(&theirs)],
        );
        let ours = d.join(format!("{subformat}.keel.raw"));
        let disk = keel_convert_disk(&vmdk, &ours);
        let same = Command::new("cmp")
            .args(["-s", s(&ours), s(&theirs)])
            .status()
            .unwrap()
            .success();
        let allocated = std::fs::metadata(&ours).unwrap().blocks() * 512;
        eprintln!(
            "{subformat}: {} extent(s), {} bytes, {} KiB written, {} KiB allocated",
            disk.extents,
            disk.capacity_bytes,
            disk.written_bytes >> 10,
            allocated >> 10
        );
        assert!(
            same,
            "{subformat}: Keel's raw image differs from qemu-img's"
        );
        assert_eq!(disk.capacity_bytes, 2560 << 20, "{subformat}");
        assert!(
            allocated <= 4 << 20,
            "{subformat}: {allocated} bytes allocated: not sparse"
        );
        for f in [&ours, &theirs] {
            let _ = std::fs::remove_file(f);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_descriptor_naming_a_path_or_a_parent_is_refused() {
    let d = dir("hostile");
    let out = d.join("out.raw");
    let convert = |text: &str| {
        let vmdk = d.join("disk.vmdk");
        std::fs::write(&vmdk, text).unwrap();
        let mut dst = std::fs::File::create(&out).unwrap();
        disk::vmdk::convert_file(&vmdk, &mut dst, |_, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = convert("createType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/shadow\" 0\n");
    assert!(
        e.contains("an extent must lie beside its descriptor"),
        "{e}"
    );
    let e = convert("createType=\"monolithicFlat\"\nRW 8 FLAT \"../x\" 0\n");
    assert!(e.contains("beside its descriptor"), "{e}");
    let e =
        convert("parentCID=1234abcd\ncreateType=\"monolithicSparse\"\nRW 8 SPARSE \"d-s.vmdk\"\n");
    assert!(e.contains("is a snapshot"), "{e}");
    // A flat extent shorter than the descriptor claims.
    std::fs::write(d.join("short-flat.vmdk"), vec![1u8; 1024]).unwrap();
    let e = convert("createType=\"monolithicFlat\"\nRW 8 FLAT \"short-flat.vmdk\" 0\n");
    assert!(e.contains("the file has 1024"), "{e}");
    // A link beside the descriptor is not followed.
    std::os::unix::fs::symlink("/etc/hostname", d.join("link-flat.vmdk")).unwrap();
    let e = convert("createType=\"monolithicFlat\"\nRW 1 FLAT \"link-flat.vmdk\" 0\n");
    assert!(e.contains("opening"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_damaged_vmdk_is_refused_with_what_is_wrong() {
    let d = dir("damaged");
    let vmdk = d.join("cut.vmdk");
    create("monolithicSparse", s(&vmdk), "8M");
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
