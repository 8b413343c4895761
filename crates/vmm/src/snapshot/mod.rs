//! Snapshots: a paused VM's whole state as one checksummed state file ([`file`]) and a
//! sparse memory file of the pages the guest touched. [`capture`] writes them from a
//! paused VM; the VM builder restores from them (`vm.rs`), checking everything first.

pub mod file;

use std::fs::File;
use std::time::Instant;

use arch::cpu_state::VcpuState;
use devices::legacy::persist::LegacyState;
use devices::virtio::persist::TransportState;
use serde::{Deserialize, Serialize};

use crate::control::Machine;
use crate::memory;

/// Everything of a VM but its memory and disks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Names this snapshot; its memory file carries the same.
    pub id: String,
    /// The VM's definition when it was taken.
    pub spec: api::VmSpec,
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: arch::vm_state::VmState,
    pub legacy: LegacyState,
    /// The virtio devices, in the order the VM builder makes them.
    pub virtio: Vec<TransportState>,
    /// Wall-clock time it was taken (ms since the epoch): a record only; nothing reads it.
    pub taken_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("saving the vCPUs failed: {0}")]
    Vcpus(String),
    #[error("saving the VM's interrupt controllers and clock failed: {0}")]
    Vm(#[from] arch::vm_state::Error),
    #[error("writing guest memory to the memory file failed: {0}")]
    Memory(#[source] std::io::Error),
    #[error(transparent)]
    File(#[from] file::Error),
    #[error("opening {what} {path} failed: {source} (it must exist: the caller makes it)")]
    Open {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this VM has no definition to save with its snapshot")]
    NoSpec,
}

/// What a snapshot took, for the answer; its files, written but not yet synced.
pub struct Captured {
    pub memory_bytes_written: u64,
    pub state_bytes: u64,
    pub took_us: u64,
    files: [File; 2],
}

impl Captured {
    /// Syncs both files. Their contents are in the page cache already: the guest may run
    /// while this waits for the disk, and nothing it does changes them.
    pub fn sync(&self) -> Result<(), Error> {
        for file in &self.files {
            file.sync_all().map_err(Error::Memory)?;
        }
        Ok(())
    }
}

/// A fresh snapshot id: 16 random bytes, in hex.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the 16-byte buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never in practice; an id unique per process and time is still an id.
        bytes[..8].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
    }
    hex::encode(bytes)
}

/// Everything of the paused VM but its memory.
pub fn machine_state(machine: &Machine) -> Result<MachineState, Error> {
    machine.gate.ask_saves().map_err(Error::Vcpus)?;
    machine_state_asked(machine)
}

/// [`machine_state`] once the parked vCPUs were asked to save theirs (`PauseGate::ask_saves`):
/// they do while this saves the rest.
pub fn machine_state_asked(machine: &Machine) -> Result<MachineState, Error> {
    let spec = machine.spec.clone().ok_or(Error::NoSpec)?;
    let vm = arch::vm_state::VmState::save(&machine.vm)?;
    let legacy = machine.legacy_state();
    let virtio = machine.devices.save();
    Ok(MachineState {
        id: new_id(),
        spec,
        memory_bytes: machine.memory_bytes,
        vcpus: machine.gate.collect_saves().map_err(Error::Vcpus)?,
        vm,
        legacy,
        virtio,
        taken_ms: crate::service::now_ms(),
    })
}

/// Saves the paused VM into `state_file` and `memory_file` (both exist and are writable;
/// their contents are replaced). They are not synced yet: see [`Captured::sync`].
pub fn capture(
    machine: &Machine,
    state_file: &File,
    memory_file: &File,
) -> Result<Captured, Error> {
    let started = Instant::now();
    let state = machine_state(machine)?;
    memory_file
        .set_len(0)
        .and_then(|()| memory_file.set_len(file::MEMORY_HEADER_BYTES + machine.memory_bytes))
        .map_err(Error::Memory)?;
    file::write_memory_header(memory_file, &state.id, machine.memory_bytes)?;
    let written = memory::write_touched(
        &machine.memory,
        machine.memfd.as_ref(),
        memory_file,
        file::MEMORY_HEADER_BYTES,
    )
    .map_err(Error::Memory)?;
    let state_bytes = file::write_state(state_file, &state)?;
    Ok(Captured {
        memory_bytes_written: written,
        state_bytes,
        took_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        files: [
            state_file.try_clone().map_err(Error::Memory)?,
            memory_file.try_clone().map_err(Error::Memory)?,
        ],
    })
}
