//! What crosses a live migration's link between daemons. The source daemon reads guest memory
//! from its VMM's memfd and sends it in rounds over a WebSocket to the target daemon's
//! `GET /migrations/incoming`, which writes it into a memfd of its own and hands that to a
//! new jailed VMM as an upgrade does. Text messages are [`Message`]s
//! (JSON); binary ones are page batches ([`encode_pages`]).
//!
//! The order, and who may still turn back:
//!
//! 1. `hello` (the definition, memory size, proofs that the disks are the same files: a
//!    marker the source wrote beside each, which the target reads back) ->
//!    `accepted` or `refused`; the target starts its VMM, which builds the VM over the empty
//!    memfd while pages arrive.
//! 2. page batches, in rounds, while the guest runs; the target writes them.
//! 3. `stopping` -> `defined` (the target caught up with the pages and defined the VM: the
//!    guest does not stand still for either); the source pauses the guest, releases its
//!    disks' locks, and sends the last pages, then `state`, which is also the go: the
//!    target's VMM builds the guest from it, takes the disks' locks (the arbiter: only one
//!    VMM can hold them) and runs it; then the target says `running`.
//!
//! Until `state` is sent the source resumes its guest on any failure or `abort`, and the
//! target kills its VMM and forgets the VM. After it, without `running`, the source tries to
//! take its disks' locks back: if it can, the target did not start the guest (a target that
//! gives up says `abort` only once its VMM, and the locks with it, are gone), and it
//! resumes; if it cannot, the target has it. A VM without writable disks has no such arbiter
//! and stays paused here until an operator decides (the migration's error says so).

use serde::{Deserialize, Serialize};

/// The version of this protocol; a target refuses another.
pub const VERSION: u32 = 2;
/// Guest page size.
pub const PAGE: usize = 4096;
/// Pages in one binary message (1 MiB of data).
pub const BATCH_PAGES: usize = 256;
/// Largest message either side takes: a full batch and its page numbers, or a VM's state.
pub const MAX_MESSAGE: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a page batch of {0} bytes is not whole pages with their numbers")]
    BadBatch(usize),
    #[error("page {page} lies beyond the guest's {pages} pages")]
    PageOutside { page: u64, pages: u64 },
}

/// Why two hosts believe they see the same disk: the source writes a random marker beside
/// it (`DISK.keel-migration`), which the target must read back through the same path; its
/// size must match too. (The disk's own bytes would not do: the guest writes them meanwhile.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProof {
    pub path: String,
    pub size: u64,
    pub marker: String,
}

/// The marker file beside a disk.
pub fn marker_path(disk: &str) -> String {
    format!("{disk}.keel-migration")
}

impl DiskProof {
    /// What this host sees at the proof's path: the disk `file` and the marker beside it.
    pub fn seen(&self, file: &std::fs::File, marker: &str) -> Result<(), String> {
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size != self.size {
            return Err(format!(
                "its disk {} here has {size} bytes, the source's {}",
                self.path, self.size
            ));
        }
        if marker.trim() != self.marker {
            return Err(format!(
                "its disk {} here is another file than the source's (the marker the source wrote beside it is not here)",
                self.path
            ));
        }
        Ok(())
    }
}

/// The text messages of the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum Message {
    Hello {
        version: u32,
        /// The source host's name, for the target's ledger.
        from: String,
        spec: Box<crate::VmSpec>,
        memory_bytes: u64,
        disks: Vec<DiskProof>,
    },
    Accepted {
        host: String,
    },
    Refused {
        why: String,
    },
    /// The last round follows: the target answers `defined` once it wrote every page so far
    /// and defined the VM, and the source then pauses the guest.
    Stopping,
    Defined,
    /// The paused guest's state, as its VMM saved it; the source's disks are unlocked: the
    /// target may run the guest.
    State {
        state: crate::control::GuestState,
    },
    /// The guest runs on the target, whose VMM took this long (microseconds: no float
    /// crosses, as JSON does not carry every one exactly) from the state's arrival at its
    /// daemon (to build the guest, take the disks' locks and start the vCPUs).
    Running {
        pid: u32,
        #[serde(default)]
        build_us: u64,
    },
    /// Either side gives up (the target, once its VMM has ended).
    Abort {
        why: String,
    },
}

/// A batch of pages: for each, its number (little-endian u64) then its 4096 bytes.
pub fn encode_pages(pages: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pages.len() * (8 + PAGE));
    for (number, data) in pages {
        out.extend_from_slice(&number.to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The pages of a batch, each checked to lie inside a guest of `pages` pages.
pub fn decode_pages(batch: &[u8], pages: u64) -> Result<Vec<(u64, &[u8])>, Error> {
    if !batch.len().is_multiple_of(8 + PAGE) {
        return Err(Error::BadBatch(batch.len()));
    }
    batch
        .chunks_exact(8 + PAGE)
        .map(|chunk| {
            let mut number = [0u8; 8];
            number.copy_from_slice(&chunk[..8]);
            let page = u64::from_le_bytes(number);
            if page >= pages {
                return Err(Error::PageOutside { page, pages });
            }
            Ok((page, &chunk[8..]))
        })
        .collect()
}

/// The page numbers set in a dirty bitmap (64 pages a word, lowest bit first).
pub fn set_pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &word)| {
        (0..64)
            .filter(move |b| word >> b & 1 == 1)
            .map(move |b| w as u64 * 64 + b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_hostile_ones_are_refused() {
        let a = [1u8; PAGE];
        let b = [2u8; PAGE];
        let batch = encode_pages(&[(3, &a), (9, &b)]);
        let pages = decode_pages(&batch, 10).unwrap();
        assert_eq!(pages, vec![(3, &a[..]), (9, &b[..])]);
        assert!(matches!(
            decode_pages(&batch, 9),
            Err(Error::PageOutside { page: 9, pages: 9 })
        ));
        assert!(matches!(
            decode_pages(&batch[..100], 10),
            Err(Error::BadBatch(100))
        ));
        assert!(decode_pages(&[], 10).unwrap().is_empty());
    }

    #[test]
    fn bitmaps_name_their_pages() {
        let pages: Vec<u64> = set_pages(&[0b101, 1 << 63]).collect();
        assert_eq!(pages, vec![0, 2, 127]);
    }

    #[test]
    fn messages_are_tagged_json() {
        let text = serde_json::to_string(&Message::Stopping).unwrap();
        assert_eq!(text, r#"{"message":"stopping"}"#);
        let state = r#"{"message":"state","state":"{\"vcpus\":[1, 2.5]}"}"#;
        let back: Message = serde_json::from_str(state).unwrap();
        // The state crosses as it came: its text, untouched.
        let Message::State { state } = &back else {
            panic!("{back:?}")
        };
        assert_eq!(state.json(), r#"{"vcpus":[1, 2.5]}"#);
        let back: Message = serde_json::from_str(r#"{"message":"abort","why":"x"}"#).unwrap();
        assert_eq!(back, Message::Abort { why: "x".into() });
    }
}
