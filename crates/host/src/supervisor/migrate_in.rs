//! Taking a VM in from another host's daemon (see [`crate::migration`] for the protocol).
//! The VM is defined here as the source defined it, once its disks are shown to be the same
//! files; a jailed VMM is started to take the guest over (`keel vmm --takeover --incoming`)
//! and offered a memfd this daemon fills with the pages that arrive, and the disks opened
//! without their locks, which the VMM takes only once the source's state came.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{Cause, VmSpec, VmState};
use axum::extract::ws::{Message as WsMessage, WebSocket};

use super::{Error, Supervisor, START_TIMEOUT};
use crate::ledger::NewEvent;
use crate::migration::{self as wire, Message, PAGE};
use crate::store::Transition;
use crate::vmm_process::{self, ProcessHandle};

/// How long the target waits for the source between messages (the pre-copy included).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A VM arriving: what was set up for it, undone unless it ends running here.
struct Arriving {
    spec: VmSpec,
    /// Its definition is stored (the switch began).
    defined: bool,
    from: String,
    memfd: File,
    pages: u64,
    vmm: Arc<ProcessHandle>,
    offered: Option<api::handover::Outgoing>,
}

impl Supervisor {
    /// Serves one incoming migration on `ws` (the operator's connection from the source
    /// daemon) until the VM runs here or the migration ends.
    pub async fn migrate_in(self: &Arc<Self>, mut ws: WebSocket, actor: String) {
        let hello = match receive(&mut ws).await {
            Ok(Incoming::Text(m)) => m,
            Ok(Incoming::Pages(_)) => {
                let _ = send(&mut ws, &refused("pages before hello")).await;
                return;
            }
            Err(_) => return,
        };
        let mut arriving = match self.accept(hello, &actor).await {
            Ok(a) => a,
            Err(why) => {
                let _ = send(&mut ws, &Message::Refused { why }).await;
                return;
            }
        };
        let _ = send(
            &mut ws,
            &Message::Accepted {
                host: crate::health::hostname(),
            },
        )
        .await;
        match self.arrive(&mut ws, &mut arriving, &actor).await {
            Ok(()) => {}
            Err(why) => {
                // Its VMM ends and the disks' locks go before the source hears: after go,
                // the source takes the locks back to learn that the guest is still its own.
                self.turn_away(arriving, &actor, &why).await;
                let _ = send(&mut ws, &Message::Abort { why }).await;
            }
        }
    }

    /// Checks the VM can come here, defines it and starts the VMM that will take it.
    async fn accept(self: &Arc<Self>, hello: Message, actor: &str) -> Result<Arriving, String> {
        let Message::Hello {
            version,
            from,
            spec,
            memory_bytes,
            disks,
        } = hello
        else {
            return Err(format!("{hello:?} instead of hello"));
        };
        if version != wire::VERSION {
            return Err(format!(
                "this host speaks migration version {}, the source {version}",
                wire::VERSION
            ));
        }
        if memory_bytes != spec.memory_mib << 20 {
            return Err(format!(
                "{memory_bytes} bytes of memory for a VM of {} MiB",
                spec.memory_mib
            ));
        }
        let name = spec.name.clone();
        let from = printable(&from, 100);
        // Files on shared storage and the store: off the async workers.
        tokio::task::block_in_place(|| -> Result<(), String> {
            self.check_disks(&spec, &disks)?;
            self.check_capacity(&spec).map_err(|e| e.to_string())?;
            self.check_definition(&spec).map_err(|e| e.to_string())
        })?;
        // The VM is defined here only when the switch begins: a daemon that dies during the
        // copy leaves no definition behind. Meanwhile its name is claimed.
        // A previous attempt of the same VM may still be ending (its VMM being killed).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.migrations.arrive(&name) {
            if Instant::now() >= deadline {
                return Err(
                    "another VM is arriving on this host; one migration comes in at a time"
                        .to_string(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match self.start_arrival(&spec, &from, memory_bytes).await {
            Ok(a) => Ok(a),
            Err(why) => {
                self.forget_arrival(&name, false, actor, &from, &why);
                Err(why)
            }
        }
    }

    /// What `create` checks of a definition, without storing it.
    fn check_definition(&self, spec: &VmSpec) -> super::Result<()> {
        self.with_store(|s| {
            if s.vm(&spec.name)?.is_some() {
                return Err(Error::Exists(spec.name.clone()));
            }
            spec.validate()?;
            self.images.check_spec(spec)?;
            let others = s.vms()?;
            crate::images::check_taps(spec, others.iter().map(|r| &r.spec))?;
            Ok(())
        })
    }

    /// Defines the arriving VM, as the switch begins.
    fn define_arrival(&self, spec: &VmSpec, actor: &str) -> Result<(), String> {
        self.with_store(|s| -> super::Result<()> {
            if s.vm(&spec.name)?.is_some() {
                return Err(Error::Exists(spec.name.clone()));
            }
            s.create_vm(spec, actor)?;
            Ok(())
        })
        .map_err(|e| e.to_string())
    }

    /// Refuses disks this host does not see as the source does: another file, or none.
    fn check_disks(&self, spec: &VmSpec, proofs: &[wire::DiskProof]) -> Result<(), String> {
        if proofs.len() != spec.disks.len() {
            return Err(format!(
                "{} disk proofs for {} disks",
                proofs.len(),
                spec.disks.len()
            ));
        }
        for (d, proof) in spec.disks.iter().zip(proofs) {
            let unseen = |e: &dyn std::fmt::Display| {
                format!("its disk {} is not on storage this host sees: {e}; disks must be on storage both hosts share, at the same path", d.path)
            };
            if proof.path != d.path {
                return Err(format!(
                    "a proof for {} where the disk is {}",
                    proof.path, d.path
                ));
            }
            let here = self
                .images
                .open("disk", &d.path, libc::O_RDONLY)
                .map_err(|e| unseen(&e))?;
            let mut marker = String::new();
            std::io::Read::read_to_string(
                &mut std::io::Read::take(
                    self.images
                        .open("disk marker", &wire::marker_path(&d.path), libc::O_RDONLY)
                        .map_err(|e| unseen(&e))?,
                    64,
                ),
                &mut marker,
            )
            .map_err(|e| unseen(&e))?;
            proof.seen(&here, &marker)?;
        }
        Ok(())
    }

    async fn start_arrival(
        self: &Arc<Self>,
        spec: &VmSpec,
        from: &str,
        memory_bytes: u64,
    ) -> Result<Arriving, String> {
        let name = spec.name.clone();
        let memfd = new_memfd(memory_bytes)?;
        let disks =
            tokio::task::block_in_place(|| vmm_process::open_disks_unlocked(spec, &self.images))
                .map_err(|e| e.to_string())?;
        let run_dir = self.run_dir(&name);
        let socket = run_dir.file(api::control::files::TAKEOVER_SOCKET);
        let jail = self.jail_for(&name, spec).map_err(|e| e.to_string())?;
        let pid = self
            .launch_takeover(&run_dir, jail, Some(spec))
            .await
            .map_err(|e| e.to_string())?;
        let vmm = Arc::new(ProcessHandle::open(pid).map_err(|e| e.to_string())?);
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if vmm.has_ended() || Instant::now() >= deadline {
                let _ = vmm.kill(libc::SIGKILL);
                return Err(format!(
                    "its VMM here (pid {pid}) did not get ready to take it (see {})",
                    run_dir.file(api::control::files::VMM_LOG).display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let fds: Vec<Vec<i32>> = disks
            .iter()
            .map(|files| files.files().map(|f| f.as_raw_fd()).collect())
            .collect();
        let memfd_raw = memfd.as_raw_fd();
        let offered =
            tokio::task::block_in_place(|| api::handover::offer(&socket, memfd_raw, &[], &fds));
        let offered = match offered {
            Ok(o) => o,
            Err(e) => {
                let _ = vmm.kill(libc::SIGKILL);
                return Err(format!("its VMM here could not prepare the VM: {e}"));
            }
        };
        Ok(Arriving {
            spec: spec.clone(),
            defined: false,
            from: from.to_string(),
            memfd,
            pages: memory_bytes / PAGE as u64,
            vmm,
            offered: Some(offered),
        })
    }

    /// Takes pages, then the state; on `go`, the disks' locks and the run.
    async fn arrive(
        self: &Arc<Self>,
        ws: &mut WebSocket,
        a: &mut Arriving,
        actor: &str,
    ) -> Result<(), String> {
        let mut received = 0u64;
        let began = Instant::now();
        loop {
            match receive(ws).await? {
                Incoming::Pages(batch) => {
                    let pages = wire::decode_pages(&batch, a.pages).map_err(|e| e.to_string())?;
                    tokio::task::block_in_place(|| {
                        for (number, data) in &pages {
                            a.memfd
                                .write_all_at(data, number * PAGE as u64)
                                .map_err(|e| format!("writing guest memory here: {e}"))?;
                        }
                        Ok::<_, String>(())
                    })?;
                    received += pages.len() as u64;
                }
                // The source pauses the guest once every page so far is written here and
                // the VM defined (its commit waits for the disk: not while it stands still).
                Incoming::Text(Message::Stopping) => {
                    if a.defined {
                        return Err("a second stopping".into());
                    }
                    tokio::task::block_in_place(|| self.define_arrival(&a.spec, actor))?;
                    a.defined = true;
                    send(ws, &Message::Defined).await?;
                }
                // The state is also the go: the source's disks are unlocked.
                Incoming::Text(Message::State { state }) => {
                    let came = Instant::now();
                    if !a.defined {
                        return Err("the state came before stopping".into());
                    }
                    if self.test_drop_at("state") {
                        return Err("the link dropped at the state (a test's doing)".into());
                    }
                    let _third_party = self.test_hold_arbiter(&a.spec)?;
                    if self.test_drop_at("vmm-dies") {
                        let _ = a.vmm.kill(libc::SIGKILL);
                        a.vmm.wait().await;
                    }
                    let offered = a.offered.take().ok_or("a second state")?;
                    let name = a.spec.name.clone();
                    let vmm_failed = |e: &dyn std::fmt::Display| {
                        format!(
                            "its VMM here did not run the guest: {e}{}",
                            self.vmm_said(&name)
                        )
                    };
                    // The VMM builds the guest from the state, takes the disks' locks (the
                    // first writable disk first: the arbiter) and runs it.
                    let ran = tokio::task::block_in_place(|| {
                        offered.send_state_and_go(state.json().as_bytes())
                    });
                    drop(_third_party);
                    match ran {
                        Ok(()) => {}
                        // It said why it will not run the guest: it took nothing, and ends.
                        Err(e @ api::handover::Error::Refused(_)) => return Err(vmm_failed(&e)),
                        // Anything else came after go: the disks' arbiter tells whether the
                        // VMM took the guest before it failed to say so.
                        Err(e) => {
                            if !self.vmm_took_arbiter(&a.spec, &a.vmm).await {
                                return Err(vmm_failed(&e));
                            }
                            tracing::warn!(
                                "VM {}: its VMM here holds its disks but did not say it runs the guest ({e}); it is taken as running here",
                                a.spec.name
                            );
                        }
                    }
                    let build_us = u64::try_from(came.elapsed().as_micros()).unwrap_or(u64::MAX);
                    // The guest is this host's now (its disks' locks say so): the source
                    // hears it first, the ledger after.
                    let pid = a.vmm.pid;
                    if !self.test_drop_at("running") {
                        let _ = send(ws, &Message::Running { pid, build_us }).await;
                    }
                    // Its `running` came after it renamed its control socket into place.
                    self.watch(&a.spec.name, a.vmm.clone());
                    if !a.spec.nets.is_empty() {
                        self.announce(&a.spec.name);
                    }
                    self.migrations.arrived(&a.spec.name);
                    // Nothing after the run may turn the VM away: it runs here.
                    if let Err(e) = self.arrived(a, actor, received, began.elapsed()) {
                        tracing::error!("recording VM {}'s arrival failed: {e}", a.spec.name);
                    }
                    return Ok(());
                }
                Incoming::Text(Message::Abort { why }) => {
                    return Err(format!("the source gave up: {}", printable(&why, 300)))
                }
                Incoming::Text(other) => {
                    return Err(format!(
                        "the source sent {}",
                        printable(&format!("{other:?}"), 100)
                    ))
                }
            }
        }
    }

    /// Whether this host's VMM took the arriving guest's arbiter (its first writable disk's
    /// lock, which it takes before it runs the guest). If not, this daemon takes the lock
    /// and holds it until the VMM has ended, so that it never runs the guest. A VM without
    /// a writable disk has no arbiter: false.
    async fn vmm_took_arbiter(&self, spec: &VmSpec, vmm: &ProcessHandle) -> bool {
        match self.lock_arbiter(spec) {
            Some(Ok(_held)) => {
                let _ = vmm.kill(libc::SIGKILL);
                let _ = tokio::time::timeout(START_TIMEOUT, vmm.wait()).await;
                false
            }
            Some(Err(ArbiterNot::Elsewhere)) => true,
            _ => false,
        }
    }

    /// Has the VMM of VM `name`, arrived here, tell its networks: each NIC sends a broadcast
    /// RARP from its MAC, five times (now, then 50, 150, 250 and 350 ms apart, as QEMU
    /// does), so that switches send its traffic to this host's port at once instead of
    /// when the guest next speaks.
    fn announce(&self, name: &str) {
        let (run_dir, name) = (self.run_dir(name), name.to_string());
        tokio::spawn(async move {
            let mut warned = false;
            for gap_ms in [0, 50, 150, 250, 350] {
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                match vmm_process::control(&run_dir, &api::control::Request::Announce).await {
                    Ok(api::control::Response::Announced { .. }) => {}
                    // A tap not up yet takes no frame: the next round may go.
                    other if !warned => {
                        warned = true;
                        tracing::warn!("announcing VM {name} on its networks failed: {other:?}");
                    }
                    _ => {}
                }
            }
        });
    }

    /// Debug builds: a whole-system test makes this daemon drop a migration's link at a
    /// step (`state`: on the source's state, which is its go, before anything; `running`:
    /// the guest runs here but the source is not told), or its VMM die as the state comes
    /// (`vmm-dies`), named in `STATE/test-migration-drop`.
    #[cfg(debug_assertions)]
    fn test_drop_at(&self, step: &str) -> bool {
        std::fs::read_to_string(self.state_dir.join("test-migration-drop"))
            .is_ok_and(|s| s.trim() == step)
    }

    #[cfg(not(debug_assertions))]
    fn test_drop_at(&self, _step: &str) -> bool {
        false
    }

    /// Debug builds, `locked` in `STATE/test-migration-drop`: a third party (this daemon,
    /// through a file of its own) holds the VM's first writable disk when its VMM here would
    /// take it.
    fn test_hold_arbiter(&self, spec: &VmSpec) -> Result<Option<disk::ImageFiles>, String> {
        if !self.test_drop_at("locked") {
            return Ok(None);
        }
        match self.lock_arbiter(spec) {
            None => Ok(None),
            Some(Ok(files)) => Ok(Some(files)),
            Some(Err(ArbiterNot::Elsewhere)) => Err("its disk is locked elsewhere".into()),
            Some(Err(ArbiterNot::Failed(why))) => Err(why),
        }
    }

    /// The arriving VM's arbiter (its first writable disk), opened and locked by this
    /// daemon; None for a VM without one.
    fn lock_arbiter(&self, spec: &VmSpec) -> Option<Result<disk::ImageFiles, ArbiterNot>> {
        let d = spec.disks.iter().find(|d| !d.readonly)?;
        let files = match vmm_process::open_disk(d, &self.images) {
            Ok(f) => f,
            Err(e) => return Some(Err(ArbiterNot::Failed(e.to_string()))),
        };
        Some(match tokio::task::block_in_place(|| files.lock(false)) {
            Ok(()) => Ok(files),
            Err(disk::image::Error::Raw(disk::Error::Locked { .. })) => Err(ArbiterNot::Elsewhere),
            Err(e) => Err(ArbiterNot::Failed(e.to_string())),
        })
    }

    /// The last line the VMM logged, for an error (its run directory goes with the VM).
    fn vmm_said(&self, name: &str) -> String {
        let log = self.run_dir(name).file(api::control::files::VMM_LOG);
        std::fs::read_to_string(log)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .map(|l| format!(" (it said: {l})"))
            .unwrap_or_default()
    }

    fn arrived(&self, a: &Arriving, actor: &str, pages: u64, took: Duration) -> super::Result<()> {
        self.transition(
            &a.spec.name,
            Transition {
                to: VmState::Running,
                pid: Some(a.vmm.pid),
                cause: Cause::Maintenance,
                actor,
                detail: &format!("migrated in from {} (VMM pid {})", a.from, a.vmm.pid),
                time_ms: None,
            },
        )?;
        self.with_store(|s| {
            s.record(&NewEvent::host(
                Some(&a.spec.name),
                Cause::Operator,
                actor,
                format!(
                    "migrated-in from {}: {:.1} MiB received in {:.0} ms",
                    a.from,
                    (pages * PAGE as u64) as f64 / f64::from(1 << 20),
                    took.as_secs_f64() * 1000.0
                ),
            ))
        })?;
        Ok(())
    }

    /// The VM did not come: its VMM here is killed and its definition forgotten.
    async fn turn_away(&self, a: Arriving, actor: &str, why: &str) {
        let _ = a.vmm.kill(libc::SIGKILL);
        // Its descriptors (and with them the disks' locks) close when it has ended.
        let _ = tokio::time::timeout(START_TIMEOUT, a.vmm.wait()).await;
        self.forget_arrival(&a.spec.name, a.defined, actor, &a.from, why);
    }

    /// Forgets a VM that did not arrive (its definition too, when it was `defined`).
    fn forget_arrival(&self, name: &str, defined: bool, actor: &str, from: &str, why: &str) {
        self.migrations.arrived(name);
        self.forget_start(name);
        let _ = self.with_store(|s| -> super::Result<()> {
            // Without its definition, its jail id is freed (no other VM of the name can
            // have been made meanwhile: the name was claimed).
            if defined || s.vm(name)?.is_none() {
                s.delete_vm(name)?;
            }
            s.record(&NewEvent::host(
                Some(name),
                Cause::Operator,
                actor,
                format!("migration in from {from} did not complete: {why}"),
            ))?;
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&self.run_dir(name).0);
    }
}

/// Why this daemon could not lock an arriving VM's arbiter.
enum ArbiterNot {
    /// Another holds it (its VMM, or the source's).
    Elsewhere,
    Failed(String),
}

fn new_memfd(bytes: u64) -> Result<File, String> {
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"keel-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "making guest memory here failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just made by memfd_create and nothing else owns it.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd
        .set_len(bytes)
        .map_err(|e| format!("sizing guest memory here to {bytes} bytes failed: {e}"))?;
    Ok(memfd)
}

fn refused(why: &str) -> Message {
    Message::Refused {
        why: why.to_string(),
    }
}

enum Incoming {
    Text(Message),
    Pages(Vec<u8>),
}

async fn receive(ws: &mut WebSocket) -> Result<Incoming, String> {
    loop {
        let next = tokio::time::timeout(IDLE_TIMEOUT, ws.recv())
            .await
            .map_err(|_| format!("the source sent nothing for {IDLE_TIMEOUT:?}"))?;
        match next {
            Some(Ok(WsMessage::Text(text))) => {
                return serde_json::from_str(text.as_str())
                    .map(Incoming::Text)
                    .map_err(|e| format!("the source sent {} ({e})", printable(&text, 100)))
            }
            Some(Ok(WsMessage::Binary(bytes))) => return Ok(Incoming::Pages(bytes.to_vec())),
            Some(Ok(WsMessage::Close(_))) | None => return Err("the source closed the link".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("the link to the source broke ({e})")),
        }
    }
}

async fn send(ws: &mut WebSocket, message: &Message) -> Result<(), String> {
    let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
    ws.send(WsMessage::Text(text.into()))
        .await
        .map_err(|e| format!("the link to the source broke ({e})"))
}

/// At most `max` characters of what the source sent, control characters replaced: it goes
/// into this host's ledger, and the source is not trusted.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push_str("...");
    }
    out
}
