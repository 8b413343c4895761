//! qcow2 through Keel against QEMU: images made by `qemu-img create -f qcow2` (versions 2 and
//! 3, with and without a backing chain) open in Keel; what Keel writes reads back identically
//! with `qemu-img convert -O raw` and passes `qemu-img check`; discard frees clusters; a
//! backing file must name its format and lie where the opener allows; a raw image is never
//! taken for qcow2, whatever its guest wrote.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use disk::{Format, Image};

mod common;
use common::{s, tool as run, Random};

const MIB: u64 = 1 << 20;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keel-qcow2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    disk::iov(buf.as_mut_ptr(), buf.len())
}

/// Writes `buf` at `offset` through Keel, split into two iovecs as a guest's chain may be.
fn write(image: &Image, buf: &mut [u8], offset: u64) {
    let cut = buf.len() / 3;
    let (a, b) = buf.split_at_mut(cut);
    image.write_at(&[iov(a), iov(b)], offset).unwrap();
}

fn read(image: &Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read_at(&[iov(&mut buf)], offset).unwrap();
    buf
}

/// `qemu-img check` passes: no corruption and no leaked cluster.
fn check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(path)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: status {:?}\n{}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image as QEMU reads it, whole, as raw bytes.
fn qemu_raw(path: &Path, out: &Path) -> Vec<u8> {
    run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(path), s(out)],
    );
    std::fs::read(out).unwrap()
}

/// Random writes of random sizes (sector-aligned, within and across clusters) through
/// Keel, mirrored in `model`; flushed now and then, as a guest would.
fn random_writes(image: &Image, model: &mut [u8], seed: u64, count: usize) {
    let mut random = Random(seed);
    let sectors = model.len() as u64 / 512;
    for i in 0..count {
        let len = 512 * (1 + random.next() % 300) as usize;
        let at = 512 * (random.next() % (sectors - len as u64 / 512));
        let mut buf: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
        model[at as usize..at as usize + len].copy_from_slice(&buf);
        write(image, &mut buf, at);
        if i % 16 == 15 {
            image.flush().unwrap();
        }
    }
}

#[test]
fn keel_writes_what_qemu_reads_on_versions_2_and_3() {
    let d = dir("versions");
    for (compat, cluster) in [("0.10", "65536"), ("1.1", "65536"), ("1.1", "4096")] {
        let path = d.join(format!("v{compat}-{cluster}.qcow2"));
        let options = format!("compat={compat},cluster_size={cluster}");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &options,
                s(&path),
                "64M",
            ],
        );
        // Data QEMU wrote reads back through Keel.
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 1M 192k", s(&path)],
        );
        let mut model = vec![0u8; (64 * MIB) as usize];
        model[MIB as usize..(MIB + 192 * 1024) as usize].fill(0x5a);
        let image = Image::open(&path, Format::Qcow2, false, false).unwrap();
        assert_eq!(image.size(), 64 * MIB);
        assert_eq!(read(&image, MIB - 4096, 8192)[4096..], [0x5a; 4096]);
        random_writes(&image, &mut model, 0x9e37_79b9 ^ cluster.len() as u64, 400);
        // Keel reads back what it wrote.
        assert!(
            read(&image, 0, model.len()) == model,
            "Keel's own read-back differs"
        );
        image.flush().unwrap();
        drop(image);
        check(&path);
        let raw = qemu_raw(&path, &d.join("out.raw"));
        assert!(
            raw == model,
            "compat={compat} cluster={cluster}: QEMU reads other bytes than Keel wrote"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_backing_chain_reads_through_and_writes_stay_on_top() {
    let d = dir("chain");
    let base = d.join("base.raw");
    let middle = d.join("middle.qcow2");
    let top = d.join("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "raw", s(&base), "32M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 8M", s(&base)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&middle),
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 4M 4M", s(&middle)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&middle),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    let base_before = std::fs::read(&base).unwrap();
    let middle_before = std::fs::read(&middle).unwrap();
    let mut model = vec![0u8; (32 * MIB) as usize];
    model[..(4 * MIB) as usize].fill(0x11);
    model[(4 * MIB) as usize..(8 * MIB) as usize].fill(0x22);

    let image = Image::open(&top, Format::Qcow2, false, false).unwrap();
    assert!(
        read(&image, 0, model.len()) == model,
        "the chain reads wrong"
    );
    // Partial-cluster writes over backed clusters: the rest of each cluster is copied up.
    random_writes(&image, &mut model, 7, 300);
    image.flush().unwrap();
    drop(image);
    check(&top);
    assert!(qemu_raw(&top, &d.join("out.raw")) == model);
    assert!(
        std::fs::read(&base).unwrap() == base_before
            && std::fs::read(&middle).unwrap() == middle_before,
        "a backing file changed"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn discard_frees_clusters_and_reads_zeroes() {
    let d = dir("discard");
    let path = d.join("d.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&path), "64M"],
    );
    let image = Image::open(&path, Format::Qcow2, false, false).unwrap();
    let mut data = vec![0xc3u8; (16 * MIB) as usize];
    write(&image, &mut data, 8 * MIB);
    image.flush().unwrap();
    let full = std::fs::metadata(&path).unwrap().blocks() * 512;
    image.discard(8 * MIB, 12 * MIB).unwrap();
    image.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert_eq!(
        read(&image, 8 * MIB, (12 * MIB) as usize),
        vec![0u8; (12 * MIB) as usize]
    );
    assert_eq!(read(&image, 20 * MIB, 4096), vec![0xc3u8; 4096]);
    drop(image);
    check(&path);
    assert!(
        after + 11 * MIB <= full,
        "discarding 12 MiB freed only {} bytes ({full} -> {after})",
        full.saturating_sub(after)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn backing_files_name_their_format_and_lie_where_allowed() {
    let d = dir("backing");
    let base = d.join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "16M"],
    );
    // No format named: refused, with the command that names it.
    let unnamed = d.join("unnamed.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&unnamed),
        ],
    );
    // qemu-img no longer makes such images; older ones exist. The backing-format header
    // extension is renamed to a type no reader knows (and skips).
    let mut bytes = std::fs::read(&unnamed).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("the backing format extension");
    bytes[at..at + 4].copy_from_slice(b"keel");
    std::fs::write(&unnamed, bytes).unwrap();
    let e = Image::open(&unnamed, Format::Qcow2, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not name its format") && e.contains("qemu-img rebase -u"),
        "{e}"
    );
    // The opener decides where a backing file may lie.
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    let file = std::fs::File::open(&top).unwrap();
    let e = disk::qcow2::chain::open_backing(&file, &top, &mut |p| {
        Err(format!("{} is outside the image directories", p.display()))
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("outside the image directories"), "{e}");
    // A chain that comes back to itself.
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "16M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&a),
            "-F",
            "qcow2",
            s(&b),
        ],
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            s(&b),
            "-F",
            "qcow2",
            s(&a),
        ],
    );
    let e = Image::open(&b, Format::Qcow2, false, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("comes back"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_raw_image_whose_guest_wrote_a_qcow2_header_stays_raw() {
    let d = dir("raw");
    // What a guest could write to the start of its raw disk: a qcow2 header whose backing
    // file is a host file it wants to read.
    let planted = d.join("planted.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/shadow",
            "-F",
            "raw",
            "-u",
            s(&planted),
            "1M",
        ],
    );
    let header = std::fs::read(&planted).unwrap();
    let raw = d.join("guest.raw");
    std::fs::write(&raw, vec![0u8; (4 * MIB) as usize]).unwrap();
    let image = Image::open(&raw, Format::Raw, false, false).unwrap();
    let mut first = header[..4096].to_vec();
    write(&image, &mut first, 0);
    image.flush().unwrap();
    drop(image);
    // Opened again as the definition says: raw, the header is just data.
    let image = Image::open(&raw, Format::Raw, true, false).unwrap();
    assert_eq!(image.format(), Format::Raw);
    assert_eq!(image.size(), 4 * MIB);
    assert_eq!(read(&image, 0, 4096), header[..4096]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn keel_makes_thin_overlays_that_qemu_reads() {
    let d = dir("overlay");
    let base = d.join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "32M"],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x77 0 1M", s(&base)],
    );
    let top = d.join("clone.qcow2");
    let started = std::time::Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&top)
        .unwrap();
    disk::qcow2::create::create_overlay(file, &top, 64 * MIB, Some(("base.qcow2", Format::Qcow2)))
        .unwrap();
    let made_in = started.elapsed();
    let made_bytes = std::fs::metadata(&top).unwrap().len();
    let info = run("qemu-img", &["info", "--output=json", s(&top)]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    // A clone larger than its base reads the base, then zeroes; writes stay on top.
    let image = Image::open(&top, Format::Qcow2, false, false).unwrap();
    assert_eq!(read(&image, 0, 4096), vec![0x77u8; 4096]);
    assert_eq!(read(&image, 48 * MIB, 4096), vec![0u8; 4096]);
    let mut model = vec![0u8; (64 * MIB) as usize];
    model[..MIB as usize].fill(0x77);
    random_writes(&image, &mut model, 99, 100);
    image.flush().unwrap();
    drop(image);
    check(&top);
    assert!(qemu_raw(&top, &d.join("out.raw")) == model);
    println!("a 64 MiB overlay made in {made_in:?}, {made_bytes} bytes before any write");
    let _ = std::fs::remove_dir_all(&d);
}
