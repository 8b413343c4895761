//! Live migrations of this host: the outgoing ones' progress and cancel, the names of VMs
//! arriving, and the markers that show a target sees a disk. What crosses the link is
//! [`api::migration::wire`] (re-exported here); the two ends are `supervisor::migrate_out`
//! and `supervisor::migrate_in`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use api::migration::wire::*;
use api::migration::{MigrationPhase, MigrationProgress};

/// Writes a new marker beside the disk open as `file` (named `path` in the definition): the
/// proof that the target sees the same file.
pub fn make_proof(file: &std::fs::File, path: &str) -> std::io::Result<DiskProof> {
    let size = file.metadata()?.len();
    let mut nonce = [0u8; 16];
    // SAFETY: getrandom writes at most `nonce.len()` bytes into it.
    let n = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
    if n != nonce.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    let marker = hex::encode(nonce);
    // Not through a link someone planted in the image directory (the daemon is root).
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(marker_path(path))?
        .write_all(marker.as_bytes())?;
    Ok(DiskProof {
        path: path.to_string(),
        size,
        marker,
    })
}

/// Removes a proof's marker (the migration is over).
pub fn remove_proof(proof: &DiskProof) {
    let _ = std::fs::remove_file(marker_path(&proof.path));
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

    /// Claims `vm`'s name for a VM arriving; false while another VM arrives (one at a time:
    /// an arrival's memory is not counted against the host's capacity until it is defined).
    pub fn arrive(&self, vm: &str) -> bool {
        let mut arriving = self.arriving.lock().unwrap_or_else(|e| e.into_inner());
        arriving.is_empty() && arriving.insert(vm.to_string())
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
    fn one_migration_per_vm_at_a_time() {
        let m = Migrations::default();
        let first = m.begin(starting("a", "t", 1, 50)).unwrap();
        assert!(m.begin(starting("a", "t", 1, 50)).is_none());
        assert!(m.begin(starting("b", "t", 1, 50)).is_some());
        first.update(|p| p.phase = MigrationPhase::Failed);
        assert!(m.begin(starting("a", "t", 1, 50)).is_some());
    }
}
