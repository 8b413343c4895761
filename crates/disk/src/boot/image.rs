//! Building boot disks from files, with the real tools: `mke2fs -d` (e2fsprogs) makes the
//! ext4 filesystem and `sfdisk` (fdisk) writes the partition table. The tests of disk boot and
//! the whole-system tests use it; `scripts/install-deps.sh` installs both packages.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// What a path in the filesystem is.
pub enum Node {
    File(Vec<u8>),
    Symlink(String),
}

/// Partitions start at 1 MiB and are aligned to it, as partitioning tools do.
const ALIGN: u64 = 1 << 20;

/// Partition table styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Mbr,
    Gpt,
}

fn run(cmd: &mut Command, stdin: Option<&str>, what: &str) -> io::Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{what}: {e}; install it (scripts/install-deps.sh)"),
            )
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// An ext4 filesystem of `size` bytes holding `files` (parent directories made as needed),
/// built in `work` (a scratch directory that must not exist yet).
pub fn ext4(work: &Path, files: &[(&str, Node)], size: u64) -> io::Result<Vec<u8>> {
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    for (path, node) in files {
        let target = root.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match node {
            Node::File(bytes) => std::fs::write(&target, bytes)?,
            Node::Symlink(to) => std::os::unix::fs::symlink(to, &target)?,
        }
    }
    let image = work.join("fs.img");
    std::fs::File::create(&image)?.set_len(size)?;
    // Small filesystems: 1 KiB blocks, no journal (the tests write nothing to them).
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "1024",
                "-O",
                "^has_journal",
                "-d",
            ])
            .arg(&root)
            .arg(&image),
        None,
        "mke2fs (e2fsprogs)",
    )?;
    let bytes = std::fs::read(&image)?;
    std::fs::remove_dir_all(work)?;
    Ok(bytes)
}

/// A disk with a `table` of one Linux partition per entry of `partitions`, each holding those
/// bytes, built in `work` (a scratch directory that must not exist yet).
pub fn partitioned(work: &Path, table: Table, partitions: &[Vec<u8>]) -> io::Result<Vec<u8>> {
    std::fs::create_dir_all(work)?;
    let mut script = match table {
        Table::Mbr => "label: dos\n".to_string(),
        Table::Gpt => "label: gpt\n".to_string(),
    };
    let mut starts = Vec::new();
    let mut at = ALIGN;
    for p in partitions {
        let size = (p.len() as u64).div_ceil(ALIGN).max(1) * ALIGN;
        script.push_str(&format!(
            "start={}, size={}, type=L\n",
            at / 512,
            size / 512
        ));
        starts.push(at);
        at += size;
    }
    let image = work.join("disk.img");
    let file = std::fs::File::create(&image)?;
    // Room after the last partition for GPT's backup table.
    file.set_len(at + ALIGN)?;
    run(
        Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&image),
        Some(&script),
        "sfdisk (fdisk)",
    )?;
    for (p, start) in partitions.iter().zip(starts) {
        file.write_all_at(p, start)?;
    }
    let bytes = std::fs::read(&image)?;
    std::fs::remove_dir_all(work)?;
    Ok(bytes)
}
