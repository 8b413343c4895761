//! Fuzz target: an OVA (`import::ova::unpack_from`), the tar archive of a VMware export that
//! `keel import` unpacks: its headers (ustar, GNU, pax), entry types, names and sizes.
//!
//! Nothing may panic; what is unpacked lies in the target's directory and nowhere else:
//! plain files with plain names, no more than `MAX_ENTRIES`, exactly one `.ovf`, and never
//! more bytes written than the archive had.
//!
//! Input: the archive's bytes. Seeds: an OVA of a descriptor and a disk, one whose entry
//! names a path, one with a symbolic link, one cut short inside an entry, one with two
//! descriptors.

#![no_main]

use std::path::PathBuf;

use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("ova_unpack", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

#[derive(Debug, PartialEq)]
enum Outcome {
    Unpacked { files: usize },
    Refused,
}

/// A directory of this process's own, emptied for each input.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-fuzz-ova-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(data: &[u8]) -> Outcome {
    let dir = scratch();
    let result = import::ova::unpack_from(data, data.len() as u64, &dir, &mut |done, all| {
        assert!(done <= all)
    });
    // Whatever happened, nothing was made outside the directory, and only plain files in it.
    let mut written = 0u64;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        assert!(meta.is_file(), "{:?} is not a plain file", entry.path());
        written += meta.len();
    }
    assert!(
        written <= data.len() as u64,
        "{written} bytes unpacked from {}",
        data.len()
    );
    let outcome = match result {
        Ok(u) => {
            assert!(u.files.len() <= import::ova::MAX_ENTRIES);
            assert!(u.files.iter().all(|f| f.parent() == Some(dir.as_path())));
            assert!(u
                .ovf
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("ovf")));
            Outcome::Unpacked {
                files: u.files.len(),
            }
        }
        Err(_) => Outcome::Refused,
    };
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A ustar archive of `entries`: (name, type flag, contents).
fn tar(entries: &[(&str, u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data) in entries {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = *kind;
        if *kind == b'2' {
            h[157..168].copy_from_slice(b"/etc/shadow");
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn seeds() -> Vec<Seed<Outcome>> {
    let ovf: &[u8] = b"<Envelope/>";
    let disk: &[u8] = &[0x4b, 0x44, 0x4d, 0x56, 1, 0, 0, 0];
    // A disk entry whose header claims more than the archive holds (once unpacked to a file
    // of the claimed size; found by this target).
    let mut cut_short = tar(&[("a.ovf", b'0', ovf), ("a-disk1.vmdk", b'0', &[7u8; 3000])]);
    cut_short.truncate(512 + 512 + 512 + 1024);
    vec![
        Seed {
            name: "descriptor_and_disk",
            input: tar(&[("a.ovf", b'0', ovf), ("a-disk1.vmdk", b'0', disk)]),
            expect: Outcome::Unpacked { files: 2 },
        },
        Seed {
            name: "entry_with_a_path",
            input: tar(&[("../a.ovf", b'0', ovf)]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "symbolic_link",
            input: tar(&[("a.ovf", b'0', ovf), ("disk.vmdk", b'2', b"")]),
            expect: Outcome::Refused,
        },
        Seed {
            name: "cut_short",
            input: cut_short,
            expect: Outcome::Refused,
        },
        Seed {
            name: "two_descriptors",
            input: tar(&[("a.ovf", b'0', ovf), ("b.ovf", b'0', ovf)]),
            expect: Outcome::Refused,
        },
    ]
}
