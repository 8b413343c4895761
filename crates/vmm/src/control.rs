//! The one place that changes a running VM's state. Every request to change it (a line on the
//! control socket, SIGTERM, the terminal's Ctrl-A escapes) becomes a [`VmCommand`] on one
//! channel; the control loop on the event-loop thread takes them off in order and applies each
//! with [`Controller::apply`]. Nothing else presses the power button or ends the VM from
//! outside the guest.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::control::{PauseReport, Request, Response, ResumeReport, VmmStatus};
use arch::layout::GED_EVENT_POWER_BUTTON;
use devices::legacy::Ged;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::control_socket::{ConnectionId, ControlSocket, Incoming};
use crate::exit::{ExitSignal, StopBy, VmExit};
use crate::pause::PauseGate;
use crate::signals::Signals;
use crate::virtio_devices::VirtioDevices;

mod disks;
mod migration;

pub use disks::HandedFiles;

/// Something to do to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmCommand {
    /// Report who this VMM is and how the VM is.
    Status,
    /// Press the ACPI power button; `from` names who pressed it, for the log.
    PowerButton { from: &'static str },
    /// End the VM now.
    Stop(StopBy),
    /// End the VM now: the terminal's Ctrl-A x.
    ConsoleQuit,
    /// The vCPUs have started (sent by the VM builder once).
    Started,
    /// Report the devices' counters.
    Metrics,
    /// Stop the vCPUs and quiesce the devices.
    Pause,
    /// Let a paused VM run on.
    Resume,
    /// Save the VM into the run directory's `name`, switching `switch` disks to the files
    /// that came with the request (see [`Request::Snapshot`]).
    Snapshot {
        name: String,
        stay_paused: bool,
        switch: Vec<api::control::DiskSwitch>,
        files: HandedFiles,
    },
    /// Hand the guest to a new VMM (see [`crate::handover`]).
    HandOver,
    /// Turn the dirty-page log on or off.
    DirtyLog { on: bool },
    /// Count the pages written since the last count.
    DirtyPages,
    /// Start a live migration's tracking (see [`Request::MigrationStart`]).
    MigrationStart,
    /// A live migration's switch (see [`Request::MigrationSwitch`]).
    MigrationSwitch,
    /// Announce the guest on its networks (see [`Request::Announce`]).
    Announce,
    /// Take or release the disks' locks.
    DiskLocks { held: bool },
}

impl VmCommand {
    /// The command a control-socket request asks for.
    pub fn from_request(request: Request) -> Self {
        match request {
            Request::Status => VmCommand::Status,
            Request::PowerButton => VmCommand::PowerButton {
                from: "control socket",
            },
            Request::Stop => VmCommand::Stop(StopBy::ControlSocket),
            Request::Metrics => VmCommand::Metrics,
            Request::Pause => VmCommand::Pause,
            Request::Resume => VmCommand::Resume,
            // The control loop gives it the connection's descriptors.
            Request::Snapshot {
                name,
                stay_paused,
                switch_disks,
            } => VmCommand::Snapshot {
                name,
                stay_paused,
                switch: switch_disks,
                files: HandedFiles::default(),
            },
            Request::HandOver => VmCommand::HandOver,
            Request::DirtyLog { on } => VmCommand::DirtyLog { on },
            Request::DirtyPages => VmCommand::DirtyPages,
            Request::MigrationStart => VmCommand::MigrationStart,
            Request::MigrationSwitch => VmCommand::MigrationSwitch,
            Request::Announce => VmCommand::Announce,
            Request::DiskLocks { held } => VmCommand::DiskLocks { held },
        }
    }

    /// Whether the command may be applied to a VM in `state`: the one table of what is
    /// allowed when. `Err` says why not, for the answer.
    pub fn allowed_in(&self, state: RunState) -> Result<(), &'static str> {
        use RunState::*;
        match (self, state) {
            (VmCommand::Status | VmCommand::Metrics, _) => Ok(()),
            (VmCommand::Stop(_) | VmCommand::ConsoleQuit, _) => Ok(()),
            (VmCommand::Started, Booting) => Ok(()),
            (VmCommand::Started, _) => Err("the vCPUs have started already"),
            (VmCommand::PowerButton { .. }, Booting | Running) => Ok(()),
            (VmCommand::PowerButton { .. }, Paused) => {
                Err("the VM is paused: resume it first, or stop it")
            }
            (VmCommand::Pause, Running) => Ok(()),
            (VmCommand::Pause, Booting) => Err("the VM has not started yet"),
            (VmCommand::Pause, Paused) => Err("the VM is paused already"),
            (VmCommand::Resume, Paused) => Ok(()),
            (VmCommand::Resume, _) => Err("the VM is not paused"),
            (VmCommand::Snapshot { .. }, Running | Paused) => Ok(()),
            (VmCommand::Snapshot { .. }, Booting) => Err("the VM has not started yet"),
            (VmCommand::HandOver, Running | Paused) => Ok(()),
            (VmCommand::HandOver, Booting) => Err("the VM has not started yet"),
            (VmCommand::DirtyLog { .. } | VmCommand::DirtyPages, Running | Paused) => Ok(()),
            (
                VmCommand::DirtyLog { .. } | VmCommand::DirtyPages | VmCommand::MigrationStart,
                Booting,
            ) => Err("the VM has not started yet"),
            (VmCommand::MigrationStart, Running | Paused) => Ok(()),
            (VmCommand::MigrationSwitch, Running) => Ok(()),
            (VmCommand::MigrationSwitch, Booting) => Err("the VM has not started yet"),
            (VmCommand::MigrationSwitch, Paused) => {
                Err("the VM is paused: a migration switches a running guest")
            }
            (VmCommand::Announce, Running) => Ok(()),
            (VmCommand::Announce, _) => Err("the guest does not run"),
            (VmCommand::DiskLocks { .. }, Paused) => Ok(()),
            (VmCommand::DiskLocks { .. }, _) => Err("the VM is not paused: pause it first"),
        }
    }
}

/// Where the VM is, as the control loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built; the vCPUs have not started.
    Booting,
    Running,
    /// vCPUs stopped, devices quiet.
    Paused,
}

/// What pauses and snapshots act on: the vCPUs' gate, the devices, the VM and its memory.
pub struct Machine {
    pub gate: Arc<PauseGate>,
    pub devices: Arc<VirtioDevices>,
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub memory: arch::GuestMemoryMmap,
    /// The memfd holding guest memory (none for a VM restored from a snapshot's file).
    pub memfd: Option<std::fs::File>,
    pub memory_bytes: u64,
    pub bus: Arc<devices::legacy::LegacyBus>,
    pub ged: Arc<Ged>,
    /// The VM's definition (none for `keel run`).
    pub spec: Option<api::VmSpec>,
    /// Where snapshots are written (none for `keel run`).
    pub run_dir: Option<std::path::PathBuf>,
}

impl Machine {
    pub fn legacy_state(&self) -> devices::legacy::persist::LegacyState {
        let serial = self
            .bus
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save();
        let (cmos_index, cmos) = self
            .bus
            .rtc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save();
        devices::legacy::persist::LegacyState {
            serial,
            cmos_index,
            cmos,
            ged_events: self.ged.pending(),
        }
    }
}

/// Where the answer to a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyTo {
    Nobody,
    /// A control-socket connection (never a bare descriptor number, which a later
    /// connection may reuse).
    Connection(ConnectionId),
}

struct Envelope {
    command: VmCommand,
    reply_to: ReplyTo,
}

/// The sending end of the command channel; wakes the control loop.
#[derive(Clone)]
pub struct CommandSender {
    tx: mpsc::Sender<Envelope>,
    wake: Arc<EventFd>,
}

impl CommandSender {
    /// Queues `command` for the control loop; its answer is only logged.
    pub fn send(&self, command: VmCommand) {
        self.send_for(command, ReplyTo::Nobody);
    }

    fn send_for(&self, command: VmCommand, reply_to: ReplyTo) {
        if self.tx.send(Envelope { command, reply_to }).is_ok() {
            // A failed write leaves the counter non-zero: the loop wakes anyway.
            let _ = self.wake.write(1);
        }
    }
}

/// The command channel: one receiver, owned by the control loop.
pub struct CommandQueue {
    rx: mpsc::Receiver<Envelope>,
    sender: CommandSender,
}

impl CommandQueue {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            rx,
            sender: CommandSender { tx, wake },
        })
    }

    pub fn sender(&self) -> CommandSender {
        self.sender.clone()
    }
}

/// The VM state commands act on, and the function that acts.
pub struct Controller {
    name: String,
    ged: Arc<Ged>,
    exit: Arc<ExitSignal>,
    power_button_presses: u64,
    state: RunState,
    /// KVM logs the pages the guest writes.
    dirty_logging: bool,
    /// The disks' locks were given up (a migration's switch) and not taken back.
    disks_released: bool,
    /// When the last vCPU stopped, while paused.
    paused_at: Option<Instant>,
    machine: Option<Machine>,
    counters: crate::virtio_devices::DeviceCounters,
}

impl Controller {
    pub fn new(name: String, ged: Arc<Ged>, exit: Arc<ExitSignal>) -> Self {
        Self {
            name,
            ged,
            exit,
            power_button_presses: 0,
            state: RunState::Booting,
            dirty_logging: false,
            disks_released: false,
            paused_at: None,
            machine: None,
            counters: Default::default(),
        }
    }

    /// What `pause` stops.
    pub fn with_pause(mut self, machine: Machine) -> Self {
        self.machine = Some(machine);
        self
    }

    /// The devices whose counters `metrics` reports.
    pub fn with_counters(mut self, counters: crate::virtio_devices::DeviceCounters) -> Self {
        self.counters = counters;
        self
    }

    /// Applies one command: the only code that changes the VM's state from outside the guest.
    pub fn apply(&mut self, command: VmCommand) -> Response {
        if let Err(why) = command.allowed_in(self.state) {
            return Response::Error {
                message: why.to_string(),
            };
        }
        match command {
            VmCommand::Status => Response::Status(VmmStatus {
                name: self.name.clone(),
                pid: std::process::id(),
                running: self.state != RunState::Booting,
                power_button_presses: self.power_button_presses,
                paused: self.state == RunState::Paused,
            }),
            VmCommand::PowerButton { from } => match self.ged.notify(GED_EVENT_POWER_BUTTON) {
                Ok(()) => {
                    self.power_button_presses += 1;
                    eprintln!("keel: power button pressed ({from})");
                    Response::Done
                }
                Err(e) => {
                    let message = format!("pressing the power button failed: {e}");
                    eprintln!("keel: {message}");
                    Response::Error { message }
                }
            },
            VmCommand::Stop(by) => {
                self.exit.report(VmExit::Stopped(by));
                Response::Done
            }
            VmCommand::Metrics => Response::Metrics(self.counters.snapshot()),
            VmCommand::ConsoleQuit => {
                self.exit.report(VmExit::ConsoleQuit);
                Response::Done
            }
            VmCommand::Started => {
                self.state = RunState::Running;
                Response::Done
            }
            VmCommand::Pause => self.pause(),
            VmCommand::Resume => self.resume(),
            VmCommand::Snapshot {
                name,
                stay_paused,
                switch,
                files,
            } => self.snapshot(&name, stay_paused, &switch, files.take()),
            VmCommand::HandOver => self.hand_over(),
            VmCommand::DirtyLog { on } => self.dirty_log(on),
            VmCommand::DirtyPages => self.dirty_pages(),
            VmCommand::MigrationStart => self.migration_start(),
            VmCommand::MigrationSwitch => self.migration_switch(),
            VmCommand::Announce => self.announce(),
            VmCommand::DiskLocks { held } => self.disk_locks(held),
        }
    }

    fn pause(&mut self) -> Response {
        let Some(p) = &self.machine else {
            return Response::Error {
                message: "this VMM cannot pause its VM".into(),
            };
        };
        let asked = Instant::now();
        let stopped = match p.gate.pause() {
            Ok(took) => took,
            Err(e) => {
                return Response::Error {
                    message: format!("pausing failed: {e}"),
                }
            }
        };
        let stopped_at = asked + stopped;
        if let Err(e) = p.devices.pause() {
            p.gate.resume();
            return Response::Error {
                message: format!("pausing failed: {e}; the VM runs on"),
            };
        }
        self.state = RunState::Paused;
        self.paused_at = Some(stopped_at);
        Response::Paused(PauseReport {
            vcpus_stopped_us: micros(stopped),
            devices_settled_us: micros(stopped_at.elapsed()),
        })
    }

    fn snapshot(
        &mut self,
        name: &str,
        stay_paused: bool,
        switch: &[api::control::DiskSwitch],
        files: Vec<std::fs::File>,
    ) -> Response {
        let asked = Instant::now();
        let was_running = self.state == RunState::Running;
        if was_running {
            if let Response::Error { message } = self.pause() {
                return Response::Error { message };
            }
        }
        // The daemon copies the disks once this answers (qcow2's tables must be in the file).
        let written = match self
            .machine
            .as_ref()
            .map(|m| m.devices.write_back_disks(false))
        {
            Some(Err(e)) => Err(e),
            _ => self.write_snapshot(name),
        };
        // The disks go on in their new images before the guest runs again: the snapshot's
        // disks are their present files as the saved state left them.
        let mut switched_us = 0;
        let written = match written {
            Ok(c) if !switch.is_empty() => self.switch_disks(switch, files).map(|us| {
                switched_us = us;
                c
            }),
            other => other,
        };
        // The files hold their contents in the page cache now: the guest runs on while they
        // are synced, and the answer waits for the sync.
        let paused_us = if was_running && !stay_paused {
            self.resume();
            micros(asked.elapsed())
        } else {
            0
        };
        // Once the disks switched the answer is a report either way, so that the daemon knows
        // they did: an error answer means they did not.
        match written {
            Ok(c) => {
                let unsynced = c.sync().err().map(|e| e.to_string());
                Response::Snapshot(api::control::SnapshotReport {
                    paused_us,
                    write_us: c.took_us,
                    memory_bytes_written: c.memory_bytes_written,
                    state_bytes: c.state_bytes,
                    disks_switched_us: switched_us,
                    unsynced,
                })
            }
            Err(message) => Response::Error {
                message: format!("snapshot failed: {message}"),
            },
        }
    }

    /// Offers the guest to the new VMM (which prepares its VM while the guest runs), pauses
    /// it, hands it over, and on success ends this VMM; on failure the guest runs on here.
    fn hand_over(&mut self) -> Response {
        let failed = |why: String| Response::Error {
            message: format!("handing the VM over failed: {why}; it runs on here"),
        };
        let outgoing = match self
            .machine
            .as_ref()
            .ok_or("this VMM cannot hand its VM over".to_string())
            .and_then(crate::handover::offer_machine)
        {
            Ok(outgoing) => outgoing,
            Err(why) => return failed(why),
        };
        let was_running = self.state == RunState::Running;
        if was_running {
            if let Response::Error { message } = self.pause() {
                return failed(message);
            }
        }
        let stopped_at = self.paused_at.unwrap_or_else(Instant::now);
        let handed = match self.machine.as_ref() {
            Some(machine) => crate::handover::hand_over_machine(outgoing, machine),
            None => Err("this VMM cannot hand its VM over".into()),
        };
        match handed {
            Ok(()) => {
                self.exit.report(VmExit::HandedOver);
                Response::HandedOver(api::control::HandOverReport {
                    paused_us: micros(stopped_at.elapsed()),
                })
            }
            Err(why) => {
                if was_running {
                    self.resume();
                }
                failed(why)
            }
        }
    }

    fn dirty_log(&mut self, on: bool) -> Response {
        let Some(m) = &self.machine else {
            return Response::Error {
                message: "this VMM keeps no dirty-page log".into(),
            };
        };
        match crate::memory::log_dirty_pages(&m.vm, &m.memory, on) {
            Ok(()) => {
                self.dirty_logging = on;
                Response::Done
            }
            Err(e) => Response::Error {
                message: format!(
                    "turning the dirty-page log {} failed: {e}",
                    if on { "on" } else { "off" }
                ),
            },
        }
    }

    fn dirty_pages(&self) -> Response {
        let Some(m) = self.machine.as_ref().filter(|_| self.dirty_logging) else {
            return Response::Error {
                message: "the dirty-page log is off: turn it on first".into(),
            };
        };
        match crate::memory::dirty_bitmap(&m.vm, &m.memory) {
            Ok(bitmap) => Response::DirtyPages {
                pages: bitmap.iter().map(|w| u64::from(w.count_ones())).sum(),
                bitmap,
            },
            Err(e) => Response::Error {
                message: format!("reading the dirty-page log failed: {e}"),
            },
        }
    }

    fn write_snapshot(&self, name: &str) -> Result<crate::snapshot::Captured, String> {
        let machine = self.machine.as_ref().ok_or("this VMM cannot save its VM")?;
        let dir = machine
            .run_dir
            .as_ref()
            .ok_or("this VMM has no run directory to save its VM in")?;
        let (state_path, memory_path) =
            crate::service::snapshot_files(dir, name).map_err(|e| e.to_string())?;
        let open = |path: &std::path::Path| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| {
                    format!(
                        "opening {} failed: {e} (the caller makes it, empty, before asking)",
                        path.display()
                    )
                })
        };
        let (state, memory) = (open(&state_path)?, open(&memory_path)?);
        crate::snapshot::capture(machine, &state, &memory).map_err(|e| e.to_string())
    }

    fn resume(&mut self) -> Response {
        // Disks given up for a migration are taken back first: if another VMM holds them,
        // the guest may be running there, and must not run here too.
        if self.disks_released {
            match self.disk_locks(true) {
                Response::Done => {}
                Response::LockedElsewhere { message } | Response::Error { message } => {
                    return Response::Error {
                        message: format!("not resumed: its disks' locks were given up for a migration and cannot be taken back ({message}); the guest may run on the migration's target"),
                    }
                }
                other => {
                    return Response::Error {
                        message: format!("not resumed: taking the disks' locks back answered {other:?}"),
                    }
                }
            }
        }
        let Some(p) = &self.machine else {
            return Response::Error {
                message: "this VMM cannot pause its VM".into(),
            };
        };
        p.devices.resume();
        p.gate.resume();
        self.state = RunState::Running;
        let paused = self
            .paused_at
            .take()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        Response::Resumed(ResumeReport {
            paused_us: micros(paused),
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The control loop: an event-loop subscriber that drains the command channel, and also
/// serves the control socket and the termination signals, whose requests it puts on the same
/// channel.
pub struct ControlLoop {
    controller: Controller,
    queue: CommandQueue,
    socket: Option<ControlSocket>,
    signals: Option<Signals>,
}

impl ControlLoop {
    pub fn new(
        controller: Controller,
        queue: CommandQueue,
        socket: Option<ControlSocket>,
        signals: Option<Signals>,
    ) -> Self {
        Self {
            controller,
            queue,
            socket,
            signals,
        }
    }

    /// Applies every queued command in order and sends each answer where it is wanted.
    fn drain(&mut self, ops: &mut EventOps) {
        while let Ok(envelope) = self.queue.rx.try_recv() {
            let response = self.controller.apply(envelope.command);
            if let (ReplyTo::Connection(id), Some(socket)) = (envelope.reply_to, &mut self.socket) {
                socket.respond(id, &response, ops);
            }
        }
    }

    fn serve_socket(&mut self, events: Events, ops: &mut EventOps) {
        let Some(socket) = &mut self.socket else {
            return;
        };
        let fd = events.fd();
        let incoming = socket.process(events, ops);
        let Some(id) = socket.id_of(fd) else {
            return;
        };
        for incoming in incoming {
            match incoming {
                Incoming::Request(request) => {
                    let mut command = VmCommand::from_request(request);
                    if let VmCommand::Snapshot { files, .. } = &mut command {
                        if let Some(socket) = &mut self.socket {
                            *files = HandedFiles::new(socket.take_fds(id));
                        }
                    }
                    let sender = self.queue.sender();
                    sender.send_for(command, ReplyTo::Connection(id));
                    // Drained at once so that answers leave in the order the lines came.
                    self.drain(ops);
                }
                Incoming::Garbage(message) => {
                    if let Some(socket) = &mut self.socket {
                        socket.respond(id, &Response::Error { message }, ops);
                    }
                }
            }
        }
        if let Some(socket) = &mut self.socket {
            socket.settle(fd, ops);
        }
    }
}

impl MutEventSubscriber for ControlLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let watched = ops
            .add(Events::new(&*self.queue.sender.wake, EventSet::IN))
            .map_err(|e| e.to_string())
            .and_then(|()| match &self.socket {
                Some(socket) => socket.register(ops),
                None => Ok(()),
            })
            .and_then(|()| match &self.signals {
                Some(signals) => ops
                    .add(Events::new(signals, EventSet::IN))
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            });
        // Without these events the VM could not be controlled: end it rather than run deaf.
        if let Err(e) = watched {
            self.controller.exit.report(VmExit::Failed(format!(
                "watching the control events failed: {e}"
            )));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue.sender.wake.as_raw_fd() {
            let _ = self.queue.sender.wake.read();
        } else if let Some(signals) = self.signals.as_ref().filter(|s| s.as_raw_fd() == fd) {
            while let Some(name) = signals.read() {
                eprintln!("keel: {name} received: stopping the VM");
                self.queue
                    .sender()
                    .send(VmCommand::Stop(StopBy::Signal(name)));
            }
        } else {
            self.serve_socket(events, ops);
        }
        self.drain(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (Controller, EventFd, Arc<ExitSignal>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Arc::new(Ged::new(irq.try_clone().unwrap()));
        let exit = Arc::new(ExitSignal::new().unwrap());
        (Controller::new("vm1".into(), ged, exit.clone()), irq, exit)
    }

    #[test]
    fn status_names_the_vm_and_counts_presses() {
        let (mut c, irq, exit) = controller();
        let Response::Status(s) = c.apply(VmCommand::Status) else {
            panic!("not a status")
        };
        assert_eq!(
            (s.name.as_str(), s.pid, s.running),
            ("vm1", std::process::id(), false)
        );
        assert_eq!(c.apply(VmCommand::Started), Response::Done);
        assert_eq!(
            c.apply(VmCommand::PowerButton { from: "test" }),
            Response::Done
        );
        assert_eq!(irq.read().unwrap(), 1, "the GED interrupt was raised");
        let Response::Status(s) = c.apply(VmCommand::Status) else {
            panic!("not a status")
        };
        assert!(s.running);
        assert_eq!(s.power_button_presses, 1);
        assert_eq!(exit.take(), None, "the power button does not end the VM");
    }

    #[test]
    fn stop_and_quit_end_the_vm_first_reason_wins() {
        let (mut c, _irq, exit) = controller();
        assert_eq!(
            c.apply(VmCommand::Stop(StopBy::Signal("SIGTERM"))),
            Response::Done
        );
        assert_eq!(c.apply(VmCommand::ConsoleQuit), Response::Done);
        assert_eq!(
            exit.take(),
            Some(VmExit::Stopped(StopBy::Signal("SIGTERM")))
        );
    }

    #[test]
    fn commands_queue_in_order_and_wake_the_loop() {
        let queue = CommandQueue::new().unwrap();
        let sender = queue.sender();
        sender.send(VmCommand::Status);
        sender.send(VmCommand::from_request(Request::Stop));
        assert_eq!(queue.sender.wake.read().unwrap(), 2);
        let got: Vec<VmCommand> = queue.rx.try_iter().map(|e| e.command).collect();
        assert_eq!(
            got,
            vec![VmCommand::Status, VmCommand::Stop(StopBy::ControlSocket)]
        );
    }
}
