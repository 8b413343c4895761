//! The source VMM's part of a live migration. The daemon does the moving: it reads guest
//! memory from the memfd and sends it to the target host; the VMM tracks what is written
//! (KVM's log for the vCPUs, vm-memory's bitmap for its devices), hands out the paused VM's
//! state and gives up its disks' locks for the VMM that takes the guest over.

use api::control::{MigrationStart, Response};
use std::os::fd::AsRawFd;

use super::Controller;

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

    pub(super) fn machine_state(&self) -> Response {
        let Some(m) = &self.machine else {
            return error("this VMM cannot save its VM".into());
        };
        match crate::snapshot::machine_state(m)
            .map_err(|e| e.to_string())
            .and_then(|state| serde_json::to_value(state).map_err(|e| e.to_string()))
        {
            Ok(state) => Response::MachineState { state },
            Err(e) => error(format!("saving the VM's state failed: {e}")),
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
            Err(disk::image::Error::Raw(e @ disk::Error::Locked { .. })) if held => {
                Response::LockedElsewhere {
                    message: e.to_string(),
                }
            }
            Err(e) => error(format!(
                "{} the disks' locks failed: {e}",
                if held { "taking" } else { "releasing" }
            )),
        }
    }
}
