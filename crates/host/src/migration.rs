//! Live migration between daemons: what crosses the link and how a migration's progress is
//! kept. The source daemon (`supervisor::migrate_out`) reads guest memory from its VMM's
//! memfd and sends it in rounds over a WebSocket to the target daemon's
//! `GET /migrations/incoming` (`supervisor::migrate_in`), which writes it into a memfd of its
//! own and hands that to a new jailed VMM as an upgrade does. Text messages are [`Message`]s
//! (JSON); binary ones are page batches ([`encode_pages`]).
//!
//! The order, and who may still turn back:
//!
//! 1. `hello` (the definition, memory size, proofs that the disks are the same files: a
//!    marker the source wrote beside each, which the target reads back) ->
//!    `accepted` or `refused`; the target starts its VMM, which builds the VM over the empty
//!    memfd while pages arrive.
//! 2. page batches, in rounds, while the guest runs; the target writes them.
//! 3. `stopping`; the source pauses the guest and sends the last pages, then `state`.
//! 4. `ready` once the target's VMM has built the guest from it (paused); the source
//!    releases its disks' locks and says `go`; the target takes the locks (the arbiter:
//!    only one VMM can hold them) and lets its VMM run, then says `running`.
//!
//! Until `go` the source resumes its guest on any failure or `abort`, and the target kills
//! its VMM and forgets the VM. After `go` without `running`, the source tries to take its
//! disks' locks back: if it can, the target did not start the guest, and it resumes; if it
//! cannot, the target has it. A VM without writable disks has no such arbiter and stays
//! paused here until an operator decides (an incident says so).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use api::migration::{MigrationPhase, MigrationProgress};
use serde::{Deserialize, Serialize};

/// The version of this protocol; a target refuses another.
pub const VERSION: u32 = 1;
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
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
    /// Writes a new marker beside the disk open as `file` (named `path` in the definition).
    pub fn make(file: &std::fs::File, path: &str) -> Result<DiskProof, Error> {
        let fail = |source| Error::Read {
            path: path.to_string(),
            source,
        };
        let size = file.metadata().map_err(fail)?.len();
        let mut nonce = [0u8; 16];
        // SAFETY: getrandom writes at most `nonce.len()` bytes into it.
        let n = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
        if n != nonce.len() as isize {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let marker = hex::encode(nonce);
        std::fs::write(marker_path(path), &marker).map_err(|source| Error::Read {
            path: marker_path(path),
            source,
        })?;
        Ok(DiskProof {
            path: path.to_string(),
            size,
            marker,
        })
    }

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

    /// Removes the marker (the migration is over).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(marker_path(&self.path));
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
        spec: Box<api::VmSpec>,
        memory_bytes: u64,
        disks: Vec<DiskProof>,
    },
    Accepted {
        host: String,
    },
    Refused {
        why: String,
    },
    /// The last round follows: the guest is being paused.
    Stopping,
    /// The paused guest's state, as its VMM saved it.
    State {
        state: serde_json::Value,
    },
    /// The target's VMM has built the guest, paused.
    Ready,
    Go,
    /// The guest runs on the target.
    Running {
        pid: u32,
    },
    /// Either side gives up (before `go`).
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

/// One outgoing migration: its progress, and the operator's cancel.
pub struct Outgoing {
    pub progress: Mutex<MigrationProgress>,
    pub cancelled: AtomicBool,
}

impl Outgoing {
    pub fn update(&self, f: impl FnOnce(&mut MigrationProgress)) {
        f(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn progress(&self) -> MigrationProgress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// The host's outgoing migrations, by VM, kept after they end (their outcome) until the
/// VM's next one; and the names of VMs arriving, not yet defined here.
#[derive(Default)]
pub struct Migrations {
    outgoing: Mutex<HashMap<String, Arc<Outgoing>>>,
    arriving: Mutex<std::collections::HashSet<String>>,
}

impl Migrations {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Outgoing>>> {
        self.outgoing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `vm`'s name for a VM arriving; false if one of that name is arriving already.
    pub fn arrive(&self, vm: &str) -> bool {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.to_string())
    }

    /// Whether a VM of that name is arriving.
    pub fn is_arriving(&self, vm: &str) -> bool {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(vm)
    }

    /// The VM arrived or did not: its name is the store's business again.
    pub fn arrived(&self, vm: &str) {
        self.arriving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm);
    }

    /// Registers a new migration of `vm`; None if one is under way.
    pub fn begin(&self, progress: MigrationProgress) -> Option<Arc<Outgoing>> {
        let mut map = self.map();
        if map
            .get(&progress.vm)
            .is_some_and(|m| !m.progress().phase.is_over())
        {
            return None;
        }
        let outgoing = Arc::new(Outgoing {
            progress: Mutex::new(progress.clone()),
            cancelled: AtomicBool::new(false),
        });
        map.insert(progress.vm, outgoing.clone());
        Some(outgoing)
    }

    pub fn get(&self, vm: &str) -> Option<Arc<Outgoing>> {
        self.map().get(vm).cloned()
    }

    /// Whether `vm` is migrating now.
    pub fn is_migrating(&self, vm: &str) -> bool {
        self.get(vm).is_some_and(|m| !m.progress().phase.is_over())
    }
}

/// A fresh progress record.
pub fn starting(vm: &str, to: &str, memory_bytes: u64, max_downtime_ms: u64) -> MigrationProgress {
    MigrationProgress {
        vm: vm.to_string(),
        to: to.to_string(),
        phase: MigrationPhase::Connecting,
        rounds: 0,
        memory_bytes,
        bytes_sent: 0,
        dirty_pages: 0,
        dirty_rate_mib_s: 0.0,
        bandwidth_mib_s: 0.0,
        expected_downtime_ms: 0.0,
        max_downtime_ms,
        elapsed_ms: 0.0,
        downtime_ms: None,
        switch_steps: Vec::new(),
        error: None,
    }
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
        let text = serde_json::to_string(&Message::Go).unwrap();
        assert_eq!(text, r#"{"message":"go"}"#);
        let back: Message = serde_json::from_str(r#"{"message":"abort","why":"x"}"#).unwrap();
        assert_eq!(back, Message::Abort { why: "x".into() });
    }

    #[test]
    fn one_migration_per_vm_at_a_time() {
        let m = Migrations::default();
        let first = m.begin(starting("a", "t", 1, 50)).unwrap();
        assert!(m.begin(starting("a", "t", 1, 50)).is_none());
        assert!(m.begin(starting("b", "t", 1, 50)).is_some());
        first.update(|p| p.phase = MigrationPhase::Failed);
        assert!(m.begin(starting("a", "t", 1, 50)).is_some());
    }
}
