//! Disk boot against images made by mke2fs and sfdisk.

use super::image::{ext4, partitioned, Node, Table};
use super::*;

const MIB: u64 = 1 << 20;

fn work(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-boot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fs(name: &str, files: &[(&str, Node)]) -> Vec<u8> {
    ext4(&work(name), files, 2 * MIB).expect("building an ext4 image")
}

/// An empty 2 MiB ext4 filesystem made with extra mke2fs options.
fn ext4_with(dir: &std::path::Path, options: &[&str]) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let status = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .args(options)
        .arg(&image)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("mke2fs (e2fsprogs)");
    assert!(status.success());
    let bytes = std::fs::read(&image).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    bytes
}

fn file(bytes: &[u8]) -> Node {
    Node::File(bytes.to_vec())
}

fn find_in(image: Vec<u8>) -> Result<BootFiles, Error> {
    find(Rc::new(image), 64 * MIB)
}

#[test]
fn debian_links_on_a_whole_disk_filesystem() {
    let image = fs(
        "links",
        &[
            ("boot/vmlinuz-6.1.0-27-amd64", file(b"kernel-6.1")),
            ("boot/initrd.img-6.1.0-27-amd64", file(b"initrd-6.1")),
            (
                "vmlinuz",
                Node::Symlink("boot/vmlinuz-6.1.0-27-amd64".into()),
            ),
            (
                "initrd.img",
                Node::Symlink("boot/initrd.img-6.1.0-27-amd64".into()),
            ),
        ],
    );
    let found = find_in(image).unwrap();
    assert_eq!(found.kernel, b"kernel-6.1");
    assert_eq!(found.initrd.as_deref(), Some(&b"initrd-6.1"[..]));
    assert_eq!(found.cmdline, "root=/dev/vda ro");
    assert_eq!(found.source, "the whole disk: /vmlinuz");
}

#[test]
fn the_newest_entry_on_the_second_mbr_partition() {
    let root = fs(
        "mbr",
        &[
            ("loader/entries/old.conf", file(b"title old\nversion 6.9.2\nlinux /vmlinuz-6.9\noptions root=/dev/vda2\n")),
            ("loader/entries/new.conf", file(b"title new\nversion 6.10.1\nlinux /vmlinuz-6.10\ninitrd /ucode.img\ninitrd /initrd-6.10\noptions root=/dev/vda2\noptions quiet\n")),
            ("loader/entries/readme.txt", file(b"linux /not-an-entry\n")),
            ("vmlinuz-6.9", file(b"kernel-6.9")),
            ("vmlinuz-6.10", file(b"kernel-6.10")),
            ("ucode.img", file(b"ucode+")),
            ("initrd-6.10", file(b"initrd-6.10")),
        ],
    );
    // Partition 1 holds no filesystem.
    let image = partitioned(&work("mbr-disk"), Table::Mbr, &[vec![0xa5; 4096], root]).unwrap();
    let found = find_in(image).unwrap();
    assert_eq!(found.kernel, b"kernel-6.10");
    assert_eq!(found.initrd.as_deref(), Some(&b"ucode+initrd-6.10"[..]));
    assert_eq!(found.cmdline, "root=/dev/vda2 quiet");
    assert_eq!(found.source, "partition 2: /loader/entries/new.conf");
}

#[test]
fn entries_in_boot_of_a_gpt_root_filesystem_name_paths_inside_boot() {
    let root = fs(
        "gpt",
        &[
            (
                "boot/loader/entries/fedora.conf",
                file(b"version 6.5\nlinux /vmlinuz-6.5\noptions root=UUID=1234 ro\n"),
            ),
            ("boot/vmlinuz-6.5", file(b"kernel-6.5")),
        ],
    );
    let image = partitioned(&work("gpt-disk"), Table::Gpt, &[root]).unwrap();
    let found = find_in(image).unwrap();
    assert_eq!(found.kernel, b"kernel-6.5");
    assert_eq!(found.initrd, None);
    assert_eq!(
        found.source,
        "partition 1: /boot/loader/entries/fedora.conf"
    );
}

#[test]
fn a_disk_without_a_kernel_says_what_was_searched() {
    let root = fs("empty", &[("etc/hostname", file(b"web1\n"))]);
    let image = partitioned(&work("empty-disk"), Table::Gpt, &[vec![0; 512], root]).unwrap();
    let e = find_in(image).unwrap_err().to_string();
    assert!(e.contains("partition 1: no ext2/3/4 filesystem"), "{e}");
    assert!(
        e.contains("partition 2: no boot entry and no /vmlinuz"),
        "{e}"
    );
    let e = find_in(vec![0; 4096]).unwrap_err().to_string();
    assert!(e.contains("the whole disk: no ext2/3/4 filesystem"), "{e}");
    // 128-byte inodes: ext4-view reads the superblock but no inode.
    let small_inodes = ext4_with(&work("small-inodes"), &["-I", "128"]);
    let e = find_in(small_inodes).unwrap_err().to_string();
    assert!(
        e.contains("the whole disk: the filesystem cannot be read"),
        "{e}"
    );
    let e = find_in(vec![0; 4096]).unwrap_err().to_string();
    assert!(e.contains("the whole disk: no ext2/3/4 filesystem"), "{e}");
    assert!(find_in(Vec::new()).is_err());
}

#[test]
fn a_kernel_larger_than_guest_memory_is_refused_before_it_is_read() {
    let image = fs("large", &[("vmlinuz", file(&[7; 300 * 1024]))]);
    let e = find(Rc::new(image), 256 * 1024).unwrap_err();
    assert!(matches!(e, Error::TooLarge { size: 307200, .. }), "{e}");
}

#[test]
fn every_cut_of_a_boot_disk_fails_cleanly_or_finds_the_kernel() {
    let root = fs(
        "cut",
        &[
            (
                "loader/entries/a.conf",
                file(b"version 1\nlinux /k\ninitrd /i\noptions x\n"),
            ),
            ("k", file(&[1; 5000])),
            ("i", file(&[2; 3000])),
        ],
    );
    let image = partitioned(&work("cut-disk"), Table::Gpt, &[root]).unwrap();
    // Truncated anywhere (a coarse stride keeps it quick), and with one byte flipped.
    for cut in (0..image.len()).step_by(4093) {
        let _ = find_in(image[..cut].to_vec());
    }
    for at in (0..image.len()).step_by(509) {
        let mut bad = image.clone();
        bad[at] ^= 0xff;
        if let Ok(found) = find_in(bad) {
            assert!(found.kernel.len() <= 5000);
        }
    }
}

#[test]
fn links_are_followed_through_directories_and_loops_end() {
    let image = fs(
        "symlinks",
        &[
            (
                "boot/real/loader/entries/a.conf",
                file(
                    b"linux /../k/../k/./vmlinuz-x
",
                ),
            ),
            ("loader", Node::Symlink("/boot/real/loader".into())),
            (
                "boot/real/k/vmlinuz-x",
                Node::Symlink("../../../vmlinuz-real".into()),
            ),
            ("k", Node::Symlink("boot/real/k".into())),
            ("vmlinuz-real", file(b"kernel-x")),
            ("loop-a", Node::Symlink("loop-b".into())),
            ("loop-b", Node::Symlink("/loop-a".into())),
            ("vmlinuz", Node::Symlink("loop-a".into())),
        ],
    );
    let found = find_in(image).unwrap();
    assert_eq!(found.kernel, b"kernel-x");
    assert_eq!(found.source, "the whole disk: /loader/entries/a.conf");

    // A link loop as the kernel: refused, not followed forever.
    let image = fs(
        "loop",
        &[
            (
                "loader/entries/a.conf",
                file(
                    b"linux /vmlinuz
",
                ),
            ),
            ("loop-a", Node::Symlink("loop-b".into())),
            ("loop-b", Node::Symlink("/loop-a".into())),
            ("vmlinuz", Node::Symlink("loop-a".into())),
        ],
    );
    let e = find_in(image).unwrap_err().to_string();
    assert!(
        e.contains("kernel /vmlinuz") && e.contains("more than 40 symbolic links"),
        "{e}"
    );
}

#[test]
fn the_operators_root_wins_and_their_words_come_last() {
    assert_eq!(command_line("root=/dev/vda1 ro", ""), "root=/dev/vda1 ro");
    assert_eq!(
        command_line("root=/dev/vda1 ro quiet", "root=/dev/vdb console=ttyS0"),
        "ro quiet root=/dev/vdb console=ttyS0"
    );
    assert_eq!(command_line("", "console=ttyS0"), "console=ttyS0");
}

#[test]
fn kernel_and_initrds_together_fit_in_guest_memory() {
    let image = fs(
        "together",
        &[
            ("vmlinuz", file(&[1; 200 * 1024])),
            ("initrd.img", file(&[2; 100 * 1024])),
        ],
    );
    let e = find(Rc::new(image), 256 * 1024).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                what: "initrd",
                size: 102400,
                limit: 57344,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn names_from_the_disk_are_shown_with_control_characters_escaped() {
    let image = fs(
        "names",
        &[
            (
                "loader/entries/a\nkeel: forged\x1b[2J.conf",
                file(b"linux /k\n"),
            ),
            ("k", file(b"kernel")),
        ],
    );
    let found = find_in(image).unwrap();
    assert_eq!(
        found.source,
        "the whole disk: /loader/entries/a\\nkeel: forged\\u{1b}[2J.conf"
    );
    assert_eq!(shown("tab\there"), "tab\\there");
}
