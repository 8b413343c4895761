//! Building and running one VM: the only place that knows the order of things.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use arch::layout::{
    ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, GED_IRQ, KVM_TSS_ADDRESS, MMIO_GAP_START,
};
use arch::regs::BootEntry;
use devices::legacy::{AcpiPmDevice, CmosRtc, Ged, ResetTrigger, SerialDevice, I8042};
use devices::{GuestRequest, RequestSink};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{self, VmConfig, MAX_VCPUS};
use crate::console::{EscapeParser, RawTerminal, StdoutWriter};
use crate::console_socket::{ConsoleClients, ConsoleOutput, ConsoleServer};
use crate::control::{CommandQueue, CommandSender, ControlLoop, Controller, Machine, VmCommand};
use crate::control_socket::ControlSocket;
use crate::exit::{ExitSignal, VmExit};
use crate::host_files::HostFiles;
use crate::pause::PauseGate;
use crate::service::Wiring;
use crate::snapshot::{self, MachineState};
use crate::vcpu::{run_vcpu, VcpuShared};
use crate::virtio_devices::VirtioDevices;
use crate::{host, loader, memory, test_hooks, Error, Result};
use devices::legacy::LegacyBus;
use jail::seccomp::ThreadKind;

mod takeover;
pub(crate) use takeover::Takeover;
use takeover::{receive_state, Arrived};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// How the outside world reaches the VM: the only thing `keel run` and `keel vmm` differ in.
pub(crate) enum Frontend {
    /// `keel run`: the serial console on this process's stdin and stdout (raw terminal), with
    /// the Ctrl-A escapes.
    Terminal,
    /// `keel vmm`: the console log and socket, the control socket, stop signals.
    Service(Box<Wiring>),
}

/// Boots the VM described by `config` with its console on the terminal (`keel run`) and runs
/// it until it ends; returns why it ended. Errors are failures to start it.
pub fn run(config: &VmConfig, files: HostFiles) -> Result<VmExit> {
    run_with(config, files, Frontend::Terminal, None)
}

/// A guest to restore instead of booting: its checked state, and its memory: a snapshot's
/// memory file, or (a guest taken over from another VMM) the VM built over its memfd.
pub(crate) struct Restore {
    /// The guest's state, when it is known before the VM is built (a snapshot's)...
    pub state: Option<MachineState>,
    /// ... or where it comes from once the vCPUs and devices exist (a guest taken over: the
    /// VMM that offers it sends it after `prepared`), and how long to wait for it.
    pub pending: Option<(crate::handover::Offered, std::time::Duration)>,
    /// A snapshot's memory file, mapped privately.
    pub snapshot_memory: Option<std::fs::File>,
    /// A guest handed over by another VMM (an upgrade): the link to it.
    pub takeover: Option<Takeover>,
    /// What was built before the guest's state came (a guest taken over).
    pub prebuilt: Option<Prebuilt>,
}

/// The parts of a VM that take time to make and do not depend on the guest's state: the
/// KVM VM with its memory slots, irqchip and PIT, and the guest memory they map.
pub(crate) struct Prebuilt {
    vm: kvm_ioctls::VmFd,
    memory: arch::GuestMemoryMmap,
    memfd: Option<std::fs::File>,
    /// What KVM supports, asked ahead too (`KVM_GET_SUPPORTED_CPUID` alone takes ~0.4 ms).
    kvm_support: KvmSupport,
}

/// The CPUID KVM supports and the MSRs it saves.
pub(crate) struct KvmSupport {
    cpuid: kvm_bindings::CpuId,
    msr_indices: Vec<u32>,
}

fn kvm_support(kvm: &kvm_ioctls::Kvm) -> Result<KvmSupport> {
    Ok(KvmSupport {
        msr_indices: kvm
            .get_msr_index_list()
            .map_err(kvm_err("listing the MSRs KVM saves"))?
            .as_slice()
            .to_vec(),
        cpuid: kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading the supported CPUID"))?,
    })
}

/// Builds a VM over the guest memory in `memfd` (a guest being taken over).
pub(crate) fn prebuild(
    kvm: &kvm_ioctls::Kvm,
    mem_size: u64,
    memfd: &std::fs::File,
) -> Result<Prebuilt> {
    let memory = memory::map_shared(mem_size, memfd)?;
    Ok(Prebuilt {
        vm: create_machine(kvm, &memory)?,
        memory,
        memfd: Some(
            memfd
                .try_clone()
                .map_err(io_err("keeping the guest's memfd"))?,
        ),
        kvm_support: kvm_support(kvm)?,
    })
}

/// A KVM VM with `memory` registered, its TSS, in-kernel irqchip and PIT.
fn create_machine(
    kvm: &kvm_ioctls::Kvm,
    memory: &arch::GuestMemoryMmap,
) -> Result<kvm_ioctls::VmFd> {
    let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    // Memory goes in before the irqchip and PIT: registered after them, the first memory
    // slot took ~5 ms on the PVM host (measured with strace), registered first ~0.2 ms.
    memory::register(&vm, memory)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("setting the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("creating the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("creating the in-kernel PIT"))?;
    Ok(vm)
}

/// Boots the VM described by `config` (or restores it from `restore`), wired to `frontend`,
/// and runs it until it ends.
pub(crate) fn run_with(
    config: &VmConfig,
    files: HostFiles,
    frontend: Frontend,
    mut restore: Option<Restore>,
) -> Result<VmExit> {
    let HostFiles {
        kvm,
        kernel,
        initrd,
        boot_image,
        disks,
        taps,
        vsock_listener,
        jail_id_lock: _jail_id_lock,
        shmem_huge_pages,
    } = files;
    if config.seccomp {
        jail::seccomp::install_violation_report()?;
    }
    let host_max = host::max_vcpus(&kvm);
    if config.cpus > host_max {
        return Err(config::Error::TooManyCpus {
            asked: config.cpus,
            max: host_max.min(MAX_VCPUS),
            why: " by this host's KVM",
        }
        .into());
    }
    let mem_size = config.memory_bytes();
    if let Some(state) = restore.as_ref().and_then(|r| r.state.as_ref()) {
        check_restorable(config, state)?;
    }
    // Disk boot reads the guest's disk in a forked, sandboxed child: before any thread, VM
    // or guest memory exists.
    let from_disk = match restore {
        Some(_) => None,
        None => loader::find_disk_boot(config, boot_image, &disks)?,
    };

    let direct_disk = config.disks.iter().any(|d| d.direct);
    // A restored VM's memory is the snapshot's file, mapped privately (no memfd to hand on).
    let Prebuilt {
        vm,
        memory: guest_memory,
        memfd,
        kvm_support,
    } = match restore.as_mut().and_then(|r| r.prebuilt.take()) {
        // A guest taken over: built while the old VMM still ran it.
        Some(prebuilt) => prebuilt,
        None => {
            let snapshot_memory = restore.as_ref().and_then(|r| r.snapshot_memory.as_ref());
            let (guest_memory, memfd) = match snapshot_memory {
                Some(file) => (
                    memory::map_private(mem_size, file, snapshot::file::MEMORY_HEADER_BYTES)?,
                    None,
                ),
                None => memory::create(mem_size, direct_disk, shmem_huge_pages)?,
            };
            Prebuilt {
                vm: create_machine(&kvm, &guest_memory)?,
                memory: guest_memory,
                memfd,
                kvm_support: kvm_support(&kvm)?,
            }
        }
    };

    let virtio = Arc::new(VirtioDevices::new(
        &vm,
        &guest_memory,
        config,
        disks,
        taps,
        vsock_listener,
    )?);
    let entry = match &restore {
        // The boot data and tables are in the restored memory already.
        Some(r) => {
            if let Some(state) = &r.state {
                state.vm.restore(&vm).map_err(restore_err)?;
                virtio.restore(&state.virtio).map_err(restore_err)?;
            }
            BootEntry::Pvh { entry: 0 }
        }
        None => {
            let boot = loader::load(&guest_memory, config, mem_size, from_disk, kernel, initrd)?;
            write_boot_data(&guest_memory, config, mem_size, boot, &virtio)?
        }
    };
    let KvmSupport { cpuid, msr_indices } = kvm_support;
    let msr_indices = Arc::new(msr_indices);

    let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit event"))?);
    let requests: RequestSink = {
        let exit = exit.clone();
        Arc::new(move |request| {
            exit.report(match request {
                GuestRequest::PowerOff => VmExit::PowerOff,
                GuestRequest::Reboot => VmExit::Reboot,
            })
        })
    };
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating the serial interrupt"))?;
    vm.register_irqfd(&serial_irq, arch::acpi::COM1_IRQ)
        .map_err(kvm_err("wiring the serial interrupt"))?;
    let (low_mem, high_mem) = (
        mem_size.min(MMIO_GAP_START),
        mem_size.saturating_sub(MMIO_GAP_START),
    );
    let console_clients = Arc::new(ConsoleClients::default());
    let serial_out = serial_output(&frontend, &console_clients)?;
    // A state that comes later restores the serial port in place, on these.
    let mut spare_serial = match restore.as_ref().and_then(|r| r.pending.as_ref()) {
        Some(_) => Some((
            serial_irq
                .try_clone()
                .map_err(io_err("sharing the serial interrupt"))?,
            serial_output(&frontend, &console_clients)?,
        )),
        None => None,
    };
    let mut rtc = CmosRtc::new(low_mem, high_mem);
    let serial = match restore.as_ref().and_then(|r| r.state.as_ref()) {
        Some(state) => {
            let legacy = &state.legacy;
            rtc.restore(legacy.cmos_index, &legacy.cmos)
                .map_err(|e| Error::Restore(format!("the CMOS: {e}")))?;
            SerialDevice::restore(&legacy.serial, serial_irq, serial_out).map_err(restore_err)?
        }
        None => SerialDevice::new(serial_irq, serial_out),
    };
    let bus = Arc::new(LegacyBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(I8042::new(ResetTrigger(requests.clone()))),
        rtc: Mutex::new(rtc),
        acpi_pm: AcpiPmDevice::new(ACPI_S5_SLEEP_TYPE, ACPI_RESET_VALUE, requests),
    });

    let ged_irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(io_err("creating the power button's interrupt"))?;
    vm.register_irqfd(&ged_irq, GED_IRQ)
        .map_err(kvm_err("wiring the power button's interrupt"))?;
    let ged = Arc::new(Ged::new(ged_irq));
    if let Some(state) = restore.as_ref().and_then(|r| r.state.as_ref()) {
        ged.set_pending(state.legacy.ged_events);
    }
    let vm = Arc::new(vm);

    let _terminal = match frontend {
        Frontend::Terminal => RawTerminal::enter()?,
        Frontend::Service(_) => None,
    };
    crate::pause::install_kick_handler().map_err(|e| Error::EventLoop {
        what: "preparing pauses",
        reason: e.to_string(),
    })?;
    let pause_gate = Arc::new(PauseGate::new(config.cpus));
    let (spec, run_dir) = match &frontend {
        Frontend::Service(wiring) => (Some(wiring.spec.clone()), Some(wiring.run_dir.clone())),
        Frontend::Terminal => (None, None),
    };
    let machine = Machine {
        gate: pause_gate.clone(),
        devices: virtio.clone(),
        vm: vm.clone(),
        memory: guest_memory.clone(),
        memfd,
        memory_bytes: mem_size,
        bus: bus.clone(),
        ged: ged.clone(),
        spec,
        run_dir,
    };
    let mut event_loop = EventLoop::new(
        &bus,
        &virtio,
        &ged,
        &exit,
        frontend,
        console_clients,
        machine,
    )?;
    // One pass before the guest runs: console clients already waiting are attached and see
    // its first byte.
    event_loop.turn(0)?;
    let shared = Arc::new(VcpuShared {
        vm: vm.clone(),
        memory: guest_memory,
        cpuid,
        cpu_count: config.cpus,
        boot: entry,
        trace_startup: config.trace_startup,
        seccomp: config.seccomp,
        bus: bus.clone(),
        virtio: virtio.clone(),
        ged: ged.clone(),
        exit: exit.clone(),
        pause: pause_gate,
        msr_indices,
        restoring: restore.is_some(),
        restore: restore
            .as_ref()
            .and_then(|r| r.state.as_ref())
            .map(|s| std::sync::OnceLock::from(s.vcpus.clone()))
            .unwrap_or_default(),
        configured: Barrier::new(config.cpus as usize + 1),
        go: Barrier::new(config.cpus as usize + 1),
        abort: AtomicBool::new(false),
        filtered: Barrier::new(config.cpus as usize + 1),
        all_filtered: Barrier::new(config.cpus as usize + 1),
    });
    for id in 0..config.cpus {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_vcpu(id, shared))
            .map_err(io_err("starting a vCPU thread"))?;
    }
    shared.filtered.wait();
    // From here on this thread is the event loop, and serves the guest's devices. Its
    // filter goes in before a guest taken over comes: installing it takes a fraction of a
    // millisecond, which that guest would stand still for.
    let filtered = if config.seccomp {
        jail::seccomp::install(ThreadKind::EventLoop)
    } else {
        Ok(())
    };
    // A guest taken over: its vCPUs and devices exist, now its state comes (the guest
    // stands still in its old VMM from here).
    let state_came = match restore.as_mut() {
        Some(r) => match r.pending.take() {
            Some((offered, wait)) => receive_state(
                offered,
                wait,
                config,
                r.takeover.as_mut(),
                Arrived {
                    vm: &vm,
                    virtio: &virtio,
                    bus: &bus,
                    ged: &ged,
                    shared: &shared,
                    spare_serial: spare_serial.take(),
                },
            ),
            None => Ok(()),
        },
        None => Ok(()),
    };
    // The vCPU threads go on only now (whatever became of the filter: they must not wait
    // for ever; a failed install ends the VM below).
    shared.all_filtered.wait();
    shared.configured.wait();
    // A guest taken over from another VMM runs here only once that VMM said go.
    let started = match restore.as_ref().and_then(|r| r.takeover.as_ref()) {
        Some(_) if exit.is_reported() => {
            Err(Error::TakeoverAborted("a vCPU could not be set up".into()))
        }
        Some(_) if state_came.is_err() => Err(Error::TakeoverAborted(format!(
            "the guest's state: {}",
            state_came
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        ))),
        // Never say ready for a guest this VMM would then not run.
        Some(_) if filtered.is_err() => Err(Error::TakeoverAborted(
            "the event loop's seccomp filter could not be installed".into(),
        )),
        Some(takeover) => takeover.switch(&virtio),
        None => Ok(()),
    };
    if started.is_err() || filtered.is_err() {
        shared.abort.store(true, Ordering::Release);
    }
    shared.go.wait();
    filtered?;
    started?;
    // The vCPUs run: this VMM takes the old one's sockets' names, then whoever offered the
    // guest hears it (a migration's target daemon waits for this before it tells the
    // source, and then uses the control socket).
    if let Some(takeover) = restore.as_ref().and_then(|r| r.takeover.as_ref()) {
        takeover.take_names();
        if let Some(incoming) = &takeover.incoming {
            incoming.running();
        }
    }
    // A restored VM's devices were left paused: they serve every queue once now, since the
    // guest's notifications before the snapshot may have been suppressed.
    if restore.is_some() {
        virtio.resume();
    }
    event_loop.commands.send(VmCommand::Started);
    test_hooks::after_start();

    let looped = event_loop.run();
    let ended = exit
        .take()
        .unwrap_or_else(|| VmExit::Failed("the VM stopped without a reason".into()));
    // Handed over, the devices' files are the new VMM's: nothing is released.
    if ended != VmExit::HandedOver {
        virtio.shutdown();
    }
    looped?;
    Ok(ended)
}

/// Where the serial port writes: the terminal, or the console log and its clients.
fn serial_output(
    frontend: &Frontend,
    console_clients: &Arc<ConsoleClients>,
) -> Result<Box<dyn Write + Send>> {
    Ok(match frontend {
        Frontend::Terminal => Box::new(StdoutWriter),
        Frontend::Service(wiring) => Box::new(ConsoleOutput::new(
            wiring
                .console_log
                .try_clone()
                .map_err(io_err("sharing the console log"))?,
            wiring.console_log_max,
            console_clients.clone(),
        )),
    })
}

fn restore_err(e: impl std::fmt::Display) -> Error {
    Error::Restore(e.to_string())
}

/// Refuses a snapshot that does not fit the VM it is restored into, before anything is built.
fn check_restorable(config: &VmConfig, state: &MachineState) -> Result<()> {
    let refuse = |why: String| Err(Error::Restore(why));
    if state.memory_bytes != config.memory_bytes() {
        return refuse(format!(
            "the snapshot holds {} MiB of memory, the VM has {} MiB",
            state.memory_bytes >> 20,
            config.memory_bytes() >> 20
        ));
    }
    if state.vcpus.len() != config.cpus as usize {
        return refuse(format!(
            "the snapshot has {} vCPUs, the VM {}",
            state.vcpus.len(),
            config.cpus
        ));
    }
    Ok(())
}

/// Writes what a booting guest reads: the command line, the boot protocol's data, the boot
/// page tables and the ACPI tables. Returns where the guest starts.
fn write_boot_data(
    guest_memory: &arch::GuestMemoryMmap,
    config: &VmConfig,
    mem_size: u64,
    boot: loader::Boot,
    virtio: &VirtioDevices,
) -> Result<BootEntry> {
    let loader::Boot {
        kernel,
        initrd,
        mut cmdline,
    } = boot;
    // A kernel without ACPI (told so with acpi=off) learns of the devices from its command line.
    if cmdline.split_whitespace().any(|w| w == "acpi=off") && !virtio.acpi_slots().is_empty() {
        cmdline = format!("{cmdline} {}", virtio.cmdline_entries());
    }
    arch::boot::write_cmdline(guest_memory, &cmdline)?;
    match kernel.entry {
        BootEntry::Pvh { .. } => arch::boot::write_pvh_start_info(guest_memory, mem_size, initrd)?,
        BootEntry::Linux64 { .. } => arch::boot::write_boot_params(
            guest_memory,
            mem_size,
            kernel.setup_header,
            cmdline.len(),
            initrd,
        )?,
    }
    arch::regs::write_boot_tables(guest_memory, kernel.entry)?;
    arch::acpi::write_tables(guest_memory, config.cpus as u8, &virtio.acpi_slots())?;
    Ok(kernel.entry)
}

/// The event-loop thread's loop: devices, the console and the control loop.
struct EventLoop {
    events: EventManager<Box<dyn MutEventSubscriber + Send>>,
    ended: Arc<AtomicBool>,
    commands: CommandSender,
}

impl EventLoop {
    fn new(
        bus: &Arc<LegacyBus>,
        virtio: &VirtioDevices,
        ged: &Arc<Ged>,
        exit: &Arc<ExitSignal>,
        frontend: Frontend,
        console_clients: Arc<ConsoleClients>,
        machine: Machine,
    ) -> Result<Self> {
        let ended = Arc::new(AtomicBool::new(false));
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
            .map_err(|e| Error::EventLoop {
                what: "creating the event loop",
                reason: e.to_string(),
            })?;
        events.add_subscriber(Box::new(ExitWatcher {
            exit: exit.clone(),
            ended: ended.clone(),
        }));
        let queue = CommandQueue::new().map_err(io_err("creating the command channel"))?;
        let commands = queue.sender();
        let control = match frontend {
            Frontend::Terminal => {
                events.add_subscriber(Box::new(ConsoleInput {
                    bus: bus.clone(),
                    exit: exit.clone(),
                    commands: queue.sender(),
                    escape: EscapeParser::default(),
                }));
                let controller =
                    Controller::new(String::new(), ged.clone(), exit.clone()).with_pause(machine);
                ControlLoop::new(controller, queue, None, None)
            }
            Frontend::Service(wiring) => {
                let serial_input = {
                    let (bus, exit) = (bus.clone(), exit.clone());
                    move |bytes: &[u8]| {
                        if let Err(e) = bus.serial_input(bytes) {
                            exit.report(VmExit::Failed(e.to_string()));
                        }
                    }
                };
                let console = ConsoleServer::new(
                    wiring.console_socket,
                    console_clients,
                    Box::new(serial_input),
                )
                .map_err(io_err("setting up the console socket"))?;
                events.add_subscriber(Box::new(console));
                let socket = ControlSocket::new(wiring.control_socket)
                    .map_err(io_err("setting up the control socket"))?;
                let controller = Controller::new(wiring.name, ged.clone(), exit.clone())
                    .with_counters(virtio.counters())
                    .with_pause(machine);
                ControlLoop::new(controller, queue, Some(socket), Some(wiring.signals))
            }
        };
        events.add_subscriber(Box::new(control));
        for handler in virtio.queue_handlers() {
            events.add_subscriber(Box::new(handler));
        }
        Ok(Self {
            events,
            ended,
            commands,
        })
    }

    /// Waits up to `timeout_ms` (-1: for ever) for events and handles them.
    fn turn(&mut self, timeout_ms: i32) -> Result<()> {
        self.events
            .run_with_timeout(timeout_ms)
            .map(|_| ())
            .map_err(|e| Error::EventLoop {
                what: "waiting for events",
                reason: e.to_string(),
            })
    }

    /// Serves events until a reason to end the VM is reported.
    fn run(&mut self) -> Result<()> {
        while !self.ended.load(Ordering::Acquire) {
            self.turn(-1)?;
        }
        Ok(())
    }
}

struct ExitWatcher {
    exit: Arc<ExitSignal>,
    ended: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        // Without this event nothing could end the VM: failing here must not go unnoticed.
        if ops
            .add(Events::new(&self.exit.event, EventSet::IN))
            .is_err()
        {
            self.ended.store(true, Ordering::Release);
            self.exit
                .report(VmExit::Failed("watching the exit event failed".into()));
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.event.read();
        self.ended.store(true, Ordering::Release);
    }
}

/// Host stdin to the serial port; Ctrl-A p and Ctrl-A x to the control loop.
struct ConsoleInput {
    bus: Arc<LegacyBus>,
    exit: Arc<ExitSignal>,
    commands: CommandSender,
    escape: EscapeParser,
}

struct Stdin;

impl AsRawFd for Stdin {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        0
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Stdin may be a file or /dev/null, which epoll refuses: then there is no input.
        let _ = ops.add(Events::new(&Stdin, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a valid buffer of the given length from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let err = std::io::Error::last_os_error();
            if n == 0
                || err.kind() != std::io::ErrorKind::Interrupted
                    && err.kind() != std::io::ErrorKind::WouldBlock
            {
                // End of input: the VM runs on without a console.
                let _ = ops.remove(events);
            }
            return;
        }
        let input = self.escape.feed(&buf[..n as usize]);
        if !input.for_guest.is_empty() {
            if let Err(e) = self.bus.serial_input(&input.for_guest) {
                self.exit.report(VmExit::Failed(e.to_string()));
            }
        }
        if input.power_button {
            self.commands
                .send(VmCommand::PowerButton { from: "Ctrl-A p" });
        }
        if input.quit {
            self.commands.send(VmCommand::ConsoleQuit);
        }
    }
}
