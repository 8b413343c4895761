//! This VMM's use of the handover protocol ([`api::handover`]): offering its guest to a new
//! VMM (an upgrade) with the VM's state as JSON.

use std::os::fd::AsRawFd;

pub use api::handover::*;

/// Sends the paused `machine`'s state over `outgoing` (see [`Outgoing::hand_over`]).
pub fn hand_over_machine(
    outgoing: Outgoing,
    machine: &crate::control::Machine,
) -> Result<(), String> {
    // The new VMM reads the disks' qcow2 tables from their files.
    machine.devices.write_back_disks(false)?;
    let state = crate::snapshot::machine_state(machine).map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    outgoing.hand_over(&body).map_err(|e| e.to_string())
}

/// Offers the running `machine` to the new VMM in its run directory (see [`offer`]).
pub fn offer_machine(machine: &crate::control::Machine) -> Result<Outgoing, String> {
    let memfd = machine.memfd.as_ref().ok_or(
        "its memory is not a memfd another process can map: it was restored from a snapshot (mapped privately: stop and start it to upgrade it), or it has a direct=on disk on a host whose /sys/kernel/mm/transparent_hugepage/shmem_enabled gives shared memory no huge pages (set it to advise to have both)",
    )?;
    let dir = machine
        .run_dir
        .as_ref()
        .ok_or("this VMM has no run directory")?;
    let (taps, disks) = machine.devices.handover_fds();
    offer(&dir.join(TAKEOVER_SOCKET), memfd.as_raw_fd(), &taps, &disks).map_err(|e| e.to_string())
}
