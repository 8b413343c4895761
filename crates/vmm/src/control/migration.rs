//! The source VMM's part of a live migration. The daemon does the moving: it reads guest
//! memory from the memfd and sends it to the target host; the VMM tracks what is written
//! (KVM's log for the vCPUs, vm-memory's bitmap for its devices), and in the switch pauses
//! the guest, gives up its disks' locks for the VMM that takes it over and hands out its
//! state.

use api::control::{GuestState, MigrationStart, Response, SwitchReport};
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::{micros, Controller};

fn error(message: String) -> Response {
    Response::Error { message }
}

impl Controller {
    pub(super) fn migration_start(&mut self) -> Response {
        let Some(m) = &self.machine else {
            return error("this VMM cannot migrate its VM".into());
        };
        let Some(memfd) = &m.memfd else {
            return error("its memory is not a memfd the daemon can read: it was restored from a snapshot (mapped privately: stop and start it to migrate it), or it has a direct=on disk on a host whose /sys/kernel/mm/transparent_hugepage/shmem_enabled gives shared memory no huge pages (set it to advise)".into());
        };
        if let Err(e) = crate::memory::log_dirty_pages(&m.vm, &m.memory, true) {
            return error(format!("turning the dirty-page log on failed: {e}"));
        }
        crate::memory::reset_device_writes(&m.memory);
        self.dirty_logging = true;
        Response::MigrationStarted(MigrationStart {
            memfd: memfd.as_raw_fd(),
            memory_bytes: m.memory_bytes,
        })
    }

    /// The switch: pause, the last dirty pages, the disks given up, the state saved (the
    /// vCPUs save theirs meanwhile). Any failure resumes the guest here.
    pub(super) fn migration_switch(&mut self) -> Response {
        if !self.dirty_logging {
            return error("the migration's tracking is off: start the migration first".into());
        }
        if self.machine.is_none() {
            return error("this VMM cannot migrate its VM".into());
        }
        let pause = match self.pause() {
            Response::Paused(report) => report,
            other => return other,
        };
        let Some(m) = &self.machine else {
            return error("this VMM cannot migrate its VM".into());
        };
        // Once the devices settled (their last completions' interrupts are raised), each
        // parked vCPU saves its state while the log is read and the disks go.
        if let Err(e) = m.gate.ask_saves() {
            return self.undo_switch(format!("saving the vCPUs' state failed: {e}"));
        }
        let began = Instant::now();
        let bitmap = match crate::memory::dirty_bitmap(&m.vm, &m.memory) {
            Ok(b) => b,
            Err(e) => return self.undo_switch(format!("reading the dirty-page log failed: {e}")),
        };
        let dirty_us = micros(began.elapsed());
        let began = Instant::now();
        match self.disk_locks(false) {
            Response::Done => {}
            Response::Error { message } => return self.undo_switch(message),
            other => return self.undo_switch(format!("releasing the disks answered {other:?}")),
        }
        let release_us = micros(began.elapsed());
        let began = Instant::now();
        let saved = match &self.machine {
            Some(m) => crate::snapshot::machine_state_asked(m).map_err(|e| e.to_string()),
            None => Err("no VM".into()),
        }
        .and_then(|s| serde_json::to_string(&s).map_err(|e| e.to_string()));
        let state = match saved {
            Ok(json) => GuestState(json),
            Err(e) => return self.undo_switch(format!("saving the VM's state failed: {e}")),
        };
        Response::MigrationSwitched(Box::new(SwitchReport {
            pause,
            dirty_us,
            release_us,
            state_us: micros(began.elapsed()),
            bitmap,
            state,
        }))
    }

    /// The migration's target: each NIC announces the guest that arrived.
    pub(super) fn announce(&self) -> Response {
        let Some(m) = &self.machine else {
            return error("this VMM has no NICs".into());
        };
        match m.devices.announce() {
            Ok(nics) => Response::Announced { nics },
            Err(e) => error(format!("announcing the guest on its tap failed: {e}")),
        }
    }

    /// A switch that failed: the disks' locks back and the guest running again.
    fn undo_switch(&mut self, why: String) -> Response {
        match self.resume() {
            Response::Resumed(_) => error(format!("{why}; the guest runs on")),
            Response::Error { message } => error(format!("{why}; then {message}")),
            other => error(format!("{why}; then resuming answered {other:?}")),
        }
    }

    pub(super) fn disk_locks(&mut self, held: bool) -> Response {
        let Some(m) = &self.machine else {
            return error("this VMM has no disks to lock".into());
        };
        let read_only: Vec<bool> = m
            .spec
            .as_ref()
            .map(|s| s.disks.iter().map(|d| d.readonly).collect())
            .unwrap_or_default();
        // Before another host's VMM may open them: every write in the files and synced
        // (on shared storage, the other host sees what reached the server).
        if !held {
            if let Err(e) = m.devices.write_back_disks(true) {
                return error(e);
            }
        }
        match m.devices.disk_locks(held, &read_only) {
            Ok(()) => {
                self.disks_released = !held;
                Response::Done
            }
            // Only the arbiter held elsewhere says another VMM has the guest.
            Err((true, disk::image::Error::Raw(e @ disk::Error::Locked { .. }))) if held => {
                Response::LockedElsewhere {
                    message: e.to_string(),
                }
            }
            Err((_, e)) => {
                // Some may be released: a resume takes them all back first.
                if !held {
                    self.disks_released = true;
                }
                error(format!(
                    "{} the disks' locks failed: {e}",
                    if held { "taking" } else { "releasing" }
                ))
            }
        }
    }
}
