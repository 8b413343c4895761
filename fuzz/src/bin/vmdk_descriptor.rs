//! Fuzz target: the VMDK text descriptor (`disk::vmdk::Descriptor::parse`), which an imported
//! VMware disk's `.vmdk` file (or the descriptor embedded in a sparse extent) is.
//!
//! Nothing may panic; an accepted descriptor lists at least one extent, every extent file is a
//! plain name (no path, no `..`), and the capacity is the sum of the extents.
//!
//! Input: the descriptor's bytes. Seeds: a split sparse disk's descriptor, a flat one, one
//! whose extent names a path, one with a parent (a snapshot).

#![no_main]

use disk::vmdk::descriptor::{Descriptor, ExtentKind};
use keel_fuzz::Seed;

libfuzzer_sys::fuzz_target!(
    init: keel_fuzz::write_seeds("vmdk_descriptor", seeds, run),
    |data: &[u8]| {
        run(data);
    }
);

#[derive(Debug, PartialEq)]
enum Outcome {
    Parsed { extents: usize, snapshot: bool },
    Refused,
}

fn run(data: &[u8]) -> Outcome {
    match Descriptor::parse(data) {
        Ok(d) => {
            assert!(!d.extents.is_empty());
            for e in &d.extents {
                match (&e.file, e.kind) {
                    (None, ExtentKind::Zero) => {}
                    (Some(name), kind) => {
                        assert_ne!(kind, ExtentKind::Zero);
                        assert!(!name.contains('/') && name != ".." && name != ".", "{name}");
                    }
                    (None, kind) => panic!("a {kind:?} extent without a file"),
                }
            }
            let sum: u64 = d.extents.iter().map(|e| e.sectors).sum();
            assert_eq!(d.capacity_bytes(), sum * 512);
            Outcome::Parsed {
                extents: d.extents.len(),
                snapshot: d.has_parent(),
            }
        }
        Err(_) => Outcome::Refused,
    }
}

fn seeds() -> Vec<Seed<Outcome>> {
    let seed = Seed::text;
    vec![
        seed(
            "split_sparse",
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 4192256 SPARSE \"d-s001.vmdk\"\nRW 1048576 SPARSE \"d-s002.vmdk\"\nddb.adapterType = \"lsilogic\"\n",
            Outcome::Parsed {
                extents: 2,
                snapshot: false,
            },
        ),
        seed(
            "flat",
            "createType=\"monolithicFlat\"\nRW 2048 FLAT \"d-flat.vmdk\" 0\nRW 16 ZERO\n",
            Outcome::Parsed {
                extents: 2,
                snapshot: false,
            },
        ),
        seed(
            "path_extent",
            "createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n",
            Outcome::Refused,
        ),
        seed(
            "snapshot",
            "parentCID=1234abcd\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"d-000001.vmdk\"\n",
            Outcome::Parsed {
                extents: 1,
                snapshot: true,
            },
        ),
    ]
}
