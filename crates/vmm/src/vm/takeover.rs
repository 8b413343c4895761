//! A guest taken over from another VMM (an upgrade, a migration's end): the link it came
//! on, and its state set on a VM whose vCPUs and devices exist already.

use std::io::Write;

use devices::legacy::{Ged, LegacyBus, SerialDevice};
use vmm_sys_util::eventfd::EventFd;

use super::{check_restorable, restore_err};
use crate::config::VmConfig;
use crate::snapshot::MachineState;
use crate::vcpu::VcpuShared;
use crate::virtio_devices::VirtioDevices;
use crate::{Error, Result};

/// The new VMM's end of a handover, and the sockets it renames into place on `go`.
pub(crate) struct Takeover {
    /// The link once the state came on it.
    pub incoming: Option<crate::handover::Incoming>,
    pub renames: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// A migrating guest's disks (read-only or not, in order), whose locks this VMM takes on
    /// go: the source host released them. An upgrade's come locked.
    pub lock_disks: Option<Vec<bool>>,
}

impl Takeover {
    /// Tells the old VMM the guest is ready here, waits for its go and takes a migrating
    /// guest's disks: on `Ok` the guest runs here.
    pub(super) fn switch(&self, virtio: &VirtioDevices) -> Result<()> {
        let incoming = self
            .incoming
            .as_ref()
            .ok_or_else(|| Error::TakeoverAborted("the guest's state never came".into()))?;
        incoming
            .ready()
            .map_err(|e| Error::TakeoverAborted(e.to_string()))?;
        // The first writable disk first: the arbiter. Held by another VMM (the source's took
        // them back), the guest is not this VMM's.
        if let Some(read_only) = &self.lock_disks {
            if let Err((_, e)) = virtio.disk_locks(true, read_only) {
                let why = format!("its disks' locks could not be taken here: {e}");
                incoming.refuse(&why);
                return Err(Error::TakeoverAborted(why));
            }
        }
        Ok(())
    }

    /// The guest runs here: this VMM's sockets take the old one's names.
    pub(super) fn take_names(&self) {
        for (from, to) in &self.renames {
            // Once the guest is ours, a socket that did not move only costs clients.
            if let Err(e) = std::fs::rename(from, to) {
                eprintln!("keel: taking over {} failed: {e}", to.display());
            }
        }
        // Its absence says the guest is this VMM's now (see service::run).
        if let Some(dir) = self.renames.first().and_then(|(_, to)| to.parent()) {
            let _ = std::fs::remove_file(dir.join(crate::handover::TAKEOVER_SOCKET));
        }
    }
}

/// What a guest's state is applied to once it comes.
pub(super) struct Arrived<'a> {
    pub vm: &'a kvm_ioctls::VmFd,
    pub virtio: &'a VirtioDevices,
    pub bus: &'a LegacyBus,
    pub ged: &'a Ged,
    pub shared: &'a VcpuShared,
    /// The serial port's interrupt and output, for the port restored in place.
    pub spare_serial: Option<(EventFd, Box<dyn Write + Send>)>,
}

/// Says `prepared` to the VMM offering the guest, reads its state (waiting up to `wait`),
/// checks it and sets it on the VM, its devices and (through `shared`) its vCPUs.
pub(super) fn receive_state(
    offered: crate::handover::Offered,
    wait: std::time::Duration,
    config: &VmConfig,
    takeover: Option<&mut Takeover>,
    to: Arrived,
) -> Result<()> {
    let aborted = |e: &dyn std::fmt::Display| Error::TakeoverAborted(e.to_string());
    let (body, incoming) = offered.prepared(wait).map_err(|e| aborted(&e))?;
    if let Some(t) = takeover {
        t.incoming = Some(incoming);
    }
    let state: MachineState = serde_json::from_slice(&body)
        .map_err(|e| aborted(&format!("a state that is not a VM's: {e}")))?;
    check_restorable(config, &state)?;
    state.vm.restore(to.vm).map_err(restore_err)?;
    to.virtio.restore(&state.virtio).map_err(restore_err)?;
    let legacy = &state.legacy;
    to.bus
        .rtc
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(legacy.cmos_index, &legacy.cmos)
        .map_err(|e| Error::Restore(format!("the CMOS: {e}")))?;
    let (irq, out) = to
        .spare_serial
        .ok_or_else(|| Error::Restore("no serial port to restore".into()))?;
    *to.bus.serial.lock().unwrap_or_else(|e| e.into_inner()) =
        SerialDevice::restore(&legacy.serial, irq, out).map_err(restore_err)?;
    to.ged.set_pending(legacy.ged_events);
    to.shared
        .restore
        .set(state.vcpus)
        .map_err(|_| Error::Restore("the vCPUs' state came twice".into()))
}
