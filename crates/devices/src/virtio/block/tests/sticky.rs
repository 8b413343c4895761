//! A failed flush stays failed. The kernel reports a writeback error to fdatasync once (here
//! ENOSPC, then EIO) and then answers "done" over pages that never reached the disk; the
//! device must keep failing every later flush. The failure is real: the image lives on an
//! ext4 file system on a loop device whose backing file sits on a 6 MiB tmpfs, so writeback
//! of more than that fails. Needs root (mount, losetup); CI runs as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A small file system whose writeback fails once its backing tmpfs is full.
struct FailingFs {
    tmpfs: PathBuf,
    mount: PathBuf,
    loop_dev: String,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl FailingFs {
    fn new(tag: &str) -> Result<FailingFs, String> {
        let base = std::env::temp_dir().join(format!("keel-sticky-{tag}-{}", std::process::id()));
        let (tmpfs, mount) = (base.join("t"), base.join("m"));
        for d in [&tmpfs, &mount] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let t = tmpfs.to_str().unwrap_or_default();
        run("mount", &["-t", "tmpfs", "-o", "size=6m", "tmpfs", t])?;
        let back = tmpfs.join("back");
        let back = back.to_str().unwrap_or_default();
        run("truncate", &["-s", "64M", back])?;
        let loop_dev = run("losetup", &["-f", "--show", back])?;
        let fs = FailingFs {
            tmpfs,
            mount,
            loop_dev,
        };
        run("mkfs.ext4", &["-q", "-O", "^has_journal", &fs.loop_dev])?;
        run(
            "mount",
            &[&fs.loop_dev, fs.mount.to_str().unwrap_or_default()],
        )?;
        Ok(fs)
    }
}

impl Drop for FailingFs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mount.to_str().unwrap_or_default()]);
        let _ = run("losetup", &["-d", &self.loop_dev]);
        let _ = run("umount", &[self.tmpfs.to_str().unwrap_or_default()]);
        if let Some(base) = self.tmpfs.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn every_flush_after_a_failed_one_fails(choice: EngineChoice, tag: &str) {
    if !is_root() {
        assert_ne!(
            std::env::var("KEEL_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "{tag}: needs root (CI runs as root)"
        );
        eprintln!("SKIPPED {tag}: needs root to mount a failing file system");
        return;
    }
    let fs = FailingFs::new(tag).expect("a failing file system");
    let path = fs.mount.join("disk.img");
    // 16 MiB of dirty data: far more than the 6 MiB under the loop device.
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(32 << 20).unwrap();
    drop(file);
    let mut t = rig_at(&path, choice);
    for chunk in 0..4u64 {
        t.fill(BUFFERS, 4 << 20, 0x5a);
        let w = t.write(0, chunk * (4 << 20), BUFFERS, 4 << 20);
        t.d.process(0);
        assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(w), 1)]);
        assert_eq!(t.status(0), VIRTIO_BLK_S_OK, "writes reach the page cache");
    }
    let mut statuses = Vec::new();
    for slot in 1..=5 {
        let f = t.flush(slot);
        t.d.process(0);
        assert_eq!(wait_used(&mut t.d, 1), vec![(u32::from(f), 1)]);
        statuses.push(t.status(slot));
    }
    // The kernel itself would say "done" by the third fdatasync: the device never does.
    assert_eq!(statuses, vec![VIRTIO_BLK_S_IOERR; 5], "{tag}");
    drop(t);
    drop(fs);
}

/// A rig on an existing image file (not removed afterwards: its file system goes).
fn rig_at(path: &Path, choice: EngineChoice) -> Rig {
    let disk = disk::RawDisk::open(path, false).unwrap();
    let limiter = RateLimiter::new(&RateLimitConfig::default()).unwrap();
    let block = Block::with_engine(disk, "sticky", limiter, choice);
    let stats = block.stats();
    let mut d = Driver::new(Box::new(block), MEM_SIZE);
    let status = d.init(VIRTIO_BLK_F_FLUSH, 256);
    assert_eq!(status & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    Rig {
        d,
        path: path.to_path_buf(),
        stats,
    }
}

#[test]
fn a_failed_flush_is_sticky_synchronous() {
    every_flush_after_a_failed_one_fails(EngineChoice::Synchronous, "sync");
}

#[test]
fn a_failed_flush_is_sticky_hybrid() {
    every_flush_after_a_failed_one_fails(EngineChoice::Hybrid, "hybrid");
}
