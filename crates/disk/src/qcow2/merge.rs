//! Taking an overlay out of the middle of a chain: `child -> middle -> rest` becomes
//! `child' -> rest`, where `child'` is a new image that reads exactly as `child` did. Every
//! range that `child` or `middle` maps itself (data, explicit zeroes) is read through
//! `child`'s whole view and written into `child'`; what neither maps passes to `rest` in
//! both. Nothing is written to the three images: a daemon renames `child'` over `child`
//! once it is whole and synced, and whoever still reads the old files reads them on.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use imago::ShallowMapping;

use super::{open_layer, Error, Layer, Qcow2Disk};
use crate::image::ImageFiles;
use crate::Format;

/// Bytes copied at a time.
const CHUNK: u64 = 1 << 20;

/// The ranges the qcow2 image in `file` maps itself (data, explicit zeroes, compressed
/// clusters): what it does not leave to a backing file. Sorted, not overlapping.
pub fn own_ranges(file: File, path: &Path) -> Result<Vec<Range<u64>>, Error> {
    let failed = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let layer = Layer {
        file,
        format: Format::Qcow2,
        path: path.to_path_buf(),
    };
    // Opened without its backing file: what it leaves to one reads as unmapped zeroes.
    let access = open_layer(layer, false, None, Vec::new())?.access;
    let size = access.size();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut at = 0;
    while at < size {
        let (mapping, len) = access.get_shallow_mapping(at, size - at).map_err(failed)?;
        if len == 0 {
            break;
        }
        let own = match mapping {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => true,
            ShallowMapping::Zero { explicit, .. } => explicit,
            _ => false,
        };
        if own {
            match ranges.last_mut() {
                Some(last) if last.end == at => last.end = at + len,
                _ => ranges.push(at..at + len),
            }
        }
        at += len;
    }
    Ok(ranges)
}

/// The union of two sorted lists of ranges, sorted and merged.
fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Writes into `out` (a new, empty qcow2 image over the chain below `child`'s backing
/// image, the same size) what `child` and its backing image map themselves, as `child`
/// reads it; syncs `out`. `progress` hears (bytes done, bytes to do). Returns the bytes
/// copied.
pub fn merge_middle(
    child: ImageFiles,
    out: ImageFiles,
    progress: &dyn Fn(u64, u64),
) -> Result<u64, Error> {
    let middle = child.backing.first().ok_or_else(|| Error::Backing {
        path: child.path.clone(),
        backing: String::new(),
        reason: "it has no backing image to merge".into(),
    })?;
    let clone = |file: &File, path: &Path| {
        file.try_clone().map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let ranges = union(
        &own_ranges(clone(&child.top, &child.path)?, &child.path)?,
        &own_ranges(clone(&middle.file, &middle.path)?, &middle.path)?,
    );
    let view = Qcow2Disk::open(child.top, &child.path, true, child.backing)?;
    let dest = Qcow2Disk::open(out.top, &out.path, false, out.backing)?;
    if view.size() != dest.size() {
        return Err(Error::Backing {
            path: out.path.clone(),
            backing: String::new(),
            reason: format!(
                "it is {} bytes, the image it replaces {}",
                dest.size(),
                view.size()
            ),
        });
    }
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let mut buffer = vec![0u8; CHUNK as usize];
    let mut done = 0;
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(CHUNK) as usize;
            let iov = [crate::iov(buffer.as_mut_ptr(), n)];
            view.read_at(&iov, at).map_err(|source| Error::Read {
                path: child.path.clone(),
                source,
            })?;
            dest.write_at(&iov, at).map_err(|source| Error::Open {
                path: out.path.clone(),
                source,
            })?;
            at += n as u64;
            done += n as u64;
            progress(done, total);
        }
    }
    dest.flush().map_err(|source| Error::Open {
        path: out.path.clone(),
        source,
    })?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::create::create_overlay;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    fn open_rw(path: &Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    fn layer(path: &Path, format: Format) -> Layer {
        Layer {
            file: File::open(path).unwrap(),
            format,
            path: path.to_path_buf(),
        }
    }

    fn overlay(path: &Path, over: &Path, format: Format) {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        create_overlay(file, path, 4 * MIB, Some((over.to_str().unwrap(), format))).unwrap();
    }

    fn write(disk: &Qcow2Disk, at: u64, byte: u8, len: usize) {
        let mut data = vec![byte; len];
        disk.write_at(&[crate::iov(data.as_mut_ptr(), len)], at)
            .unwrap();
    }

    fn read_all(disk: &Qcow2Disk) -> Vec<u8> {
        let mut data = vec![0u8; disk.size() as usize];
        disk.read_at(&[crate::iov(data.as_mut_ptr(), data.len())], 0)
            .unwrap();
        data
    }

    #[test]
    fn the_merged_image_reads_as_the_child_did_over_the_rest() {
        let dir = std::env::temp_dir().join(format!("keel-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let at = |name: &str| -> PathBuf { dir.join(name) };
        // The base: 4 MiB of 0x11.
        std::fs::write(at("base.raw"), vec![0x11u8; 4 * MIB as usize]).unwrap();
        overlay(&at("middle.qcow2"), &at("base.raw"), Format::Raw);
        overlay(&at("child.qcow2"), &at("middle.qcow2"), Format::Qcow2);
        {
            // The middle: data in its first MiB, zeroes over the base's third.
            let middle = Qcow2Disk::open(
                open_rw(&at("middle.qcow2")),
                &at("middle.qcow2"),
                false,
                vec![layer(&at("base.raw"), Format::Raw)],
            )
            .unwrap();
            write(&middle, 0, 0x22, MIB as usize);
            middle.write_zeroes(2 * MIB, MIB, false).unwrap();
            middle.flush().unwrap();
        }
        {
            // The child: over part of the middle's data, and past it.
            let child = Qcow2Disk::open(
                open_rw(&at("child.qcow2")),
                &at("child.qcow2"),
                false,
                vec![
                    layer(&at("middle.qcow2"), Format::Qcow2),
                    layer(&at("base.raw"), Format::Raw),
                ],
            )
            .unwrap();
            write(&child, 512 * 1024, 0x33, MIB as usize);
            child.flush().unwrap();
        }
        let view = |top: &str, chain: Vec<Layer>| {
            read_all(&Qcow2Disk::open(File::open(at(top)).unwrap(), &at(top), true, chain).unwrap())
        };
        let before = view(
            "child.qcow2",
            vec![
                layer(&at("middle.qcow2"), Format::Qcow2),
                layer(&at("base.raw"), Format::Raw),
            ],
        );
        overlay(&at("merged.qcow2"), &at("base.raw"), Format::Raw);
        let child = ImageFiles {
            top: File::open(at("child.qcow2")).unwrap(),
            path: at("child.qcow2"),
            format: Format::Qcow2,
            backing: vec![
                layer(&at("middle.qcow2"), Format::Qcow2),
                layer(&at("base.raw"), Format::Raw),
            ],
            lock_deferred: false,
        };
        let out = ImageFiles {
            top: open_rw(&at("merged.qcow2")),
            path: at("merged.qcow2"),
            format: Format::Qcow2,
            backing: vec![layer(&at("base.raw"), Format::Raw)],
            lock_deferred: false,
        };
        let copied = merge_middle(child, out, &|_, _| {}).unwrap();
        // The middle's data and zeroes and the child's overlap: 0..1.5 MiB and 2..3 MiB.
        assert_eq!(copied, 3 * MIB / 2 + MIB);
        let after = view("merged.qcow2", vec![layer(&at("base.raw"), Format::Raw)]);
        assert!(before == after, "the merged image reads otherwise");
        assert_eq!(before[0], 0x22);
        assert_eq!(before[MIB as usize], 0x33);
        assert_eq!(before[2 * MIB as usize], 0);
        assert_eq!(before[3 * MIB as usize], 0x11);
        let header = crate::qcow2::chain::read_header(
            &File::open(at("merged.qcow2")).unwrap(),
            &at("merged.qcow2"),
        )
        .unwrap();
        assert_eq!(
            header.backing.unwrap().name,
            at("base.raw").to_str().unwrap()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ranges_join_where_they_touch_or_overlap() {
        assert_eq!(
            union(&[0..4, 10..12], &[4..6, 11..20, 30..31]),
            vec![0..6, 10..20, 30..31]
        );
        assert_eq!(union(&[], &[]), Vec::<std::ops::Range<u64>>::new());
    }
}
