//! Stopping every vCPU at an instruction boundary, and letting them go on.
//!
//! The control loop asks for a pause through the [`PauseGate`]: it raises the request, then
//! kicks each vCPU thread with [`KICK_SIGNAL`]. The signal's handler sets the thread's
//! `kvm_run.immediate_exit`, so a `KVM_RUN` in progress returns `EINTR` and one about to start
//! returns at once, after KVM has finished any port or MMIO instruction that exited to the
//! VMM (KVM completes pending I/O before it looks at `immediate_exit`). The vCPU thread then
//! parks on the gate until the pause ends. A vCPU that sees the request between two exits
//! sets `immediate_exit` itself, so no kick is ever lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// How long a pause waits for every vCPU to stop before it gives up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a vCPU that has not stopped yet is kicked again.
const KICK_AGAIN: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("installing the vCPU kick signal's handler failed: {0}")]
    Handler(#[source] std::io::Error),
    #[error("{stopped} of {total} vCPUs stopped within {PAUSE_TIMEOUT:?}; the VM runs on")]
    Timeout { stopped: u32, total: u32 },
}

thread_local! {
    /// This vCPU thread's `kvm_run`, for the kick signal's handler; null on other threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_signal: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by `enter` and valid
        // while the vCPU's descriptor lives (the thread clears it before dropping it); a
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick signal's handler (once per process, before the vCPU threads start).
pub fn install_kick_handler() -> Result<(), Error> {
    // SAFETY: sigaction is plain data, filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only does a volatile store to thread-local memory.
    if unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the calling thread's `kvm_run` the one its kick signal stops.
pub fn enter(run: &mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Forgets the calling thread's `kvm_run` (its vCPU is about to be dropped).
pub fn leave() {
    KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
}

/// What a parked vCPU is asked to save, and what it gave.
type Saved = Result<arch::cpu_state::VcpuState, String>;

#[derive(Default)]
struct GateState {
    paused: bool,
    /// vCPUs asked to save their state while parked...
    save_asked: Vec<bool>,
    /// ... and what they saved.
    saved: Vec<Option<Saved>>,
    /// vCPUs parked on the gate.
    parked: u32,
    /// vCPU threads that ended (the VM is ending): they count as stopped.
    gone: u32,
    /// Each vCPU thread, once it runs, for kicking.
    threads: Vec<Option<libc::pthread_t>>,
}

/// Where the control loop and the vCPU threads meet for a pause.
pub struct PauseGate {
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
    total: u32,
}

impl PauseGate {
    pub fn new(vcpus: u32) -> Self {
        Self {
            requested: AtomicBool::new(false),
            state: Mutex::new(GateState {
                threads: vec![None; vcpus as usize],
                save_asked: vec![false; vcpus as usize],
                saved: (0..vcpus).map(|_| None).collect(),
                ..Default::default()
            }),
            changed: Condvar::new(),
            total: vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU `id`'s thread says where it is, so that a pause can kick it.
    pub fn register(&self, id: u32) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Some(slot) = self.lock().threads.get_mut(id as usize) {
            *slot = Some(me);
        }
    }

    /// Whether a pause is asked for: the vCPU loop checks before every entry.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Stops every vCPU; returns how long that took. On a timeout the vCPUs that stopped run
    /// on and the VM is as it was.
    pub fn pause(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let mut state = self.lock();
        state.paused = true;
        self.requested.store(true, Ordering::Release);
        loop {
            if state.parked + state.gone >= self.total {
                return Ok(started.elapsed());
            }
            let waited = started.elapsed();
            if waited >= PAUSE_TIMEOUT {
                let stopped = state.parked + state.gone;
                drop(state);
                self.resume();
                return Err(Error::Timeout {
                    stopped,
                    total: self.total,
                });
            }
            for thread in state.threads.iter().flatten() {
                // SAFETY: each id is of a live vCPU thread: a thread takes its id out (`gone`,
                // under this lock) before it ends, and this loop holds the lock.
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
            }
            let wait = KICK_AGAIN.min(PAUSE_TIMEOUT - waited);
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets every parked vCPU go on.
    pub fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        state.save_asked.iter_mut().for_each(|a| *a = false);
        self.requested.store(false, Ordering::Release);
        drop(state);
        self.changed.notify_all();
    }

    /// Called by vCPU `id`'s thread once it stopped for the pause: waits until the pause
    /// ends, saving its state with `save` whenever it is asked to meanwhile.
    pub fn park(&self, id: u32, save: &mut dyn FnMut() -> Saved) {
        let id = id as usize;
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
        while state.paused {
            if state.save_asked.get(id).copied().unwrap_or(false) {
                state.save_asked[id] = false;
                // Saved without the lock: the control thread works on meanwhile.
                drop(state);
                let saved = save();
                state = self.lock();
                state.saved[id] = Some(saved);
                self.changed.notify_all();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
    }

    /// Asks every parked vCPU to save its state, and returns at once: see
    /// [`Self::collect_saves`]. Only while paused.
    pub fn ask_saves(&self) -> Result<(), String> {
        let mut state = self.lock();
        if !state.paused || state.gone > 0 || state.parked < self.total {
            return Err("the vCPUs are not all parked".into());
        }
        for i in 0..self.total as usize {
            state.save_asked[i] = true;
            state.saved[i] = None;
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Waits for the states [`Self::ask_saves`] asked for.
    pub fn collect_saves(&self) -> Result<Vec<arch::cpu_state::VcpuState>, String> {
        let mut state = self.lock();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while state.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.gone > 0 {
                state.save_asked.iter_mut().for_each(|a| *a = false);
                return Err("a vCPU did not save its state in time".into());
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state
            .saved
            .iter_mut()
            .map(|s| s.take().unwrap_or_else(|| Err("not saved".into())))
            .collect()
    }

    /// Called by a vCPU thread that is ending: a pause no longer waits for it.
    pub fn gone(&self, id: u32) {
        let mut state = self.lock();
        state.gone += 1;
        if let Some(slot) = state.threads.get_mut(id as usize) {
            *slot = None;
        }
        drop(state);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads that poll the gate like vCPU loops park within the pause and go on after it.
    #[test]
    fn pause_waits_for_every_thread_and_resume_lets_them_go() {
        let gate = Arc::new(PauseGate::new(3));
        let spins = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|id| {
                let (gate, spins) = (gate.clone(), spins.clone());
                std::thread::spawn(move || {
                    gate.register(id);
                    for _ in 0..200_000 {
                        if gate.requested() {
                            gate.park(id, &mut || Err("no vCPU here".into()));
                        }
                        spins.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                    gate.gone(id);
                })
            })
            .collect();
        install_kick_handler().unwrap();
        gate.pause().unwrap();
        let frozen = spins.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            spins.load(Ordering::Relaxed),
            frozen,
            "nothing ran while paused"
        );
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(spins.load(Ordering::Relaxed), 600_000);
        gate.pause().expect("ended threads count as stopped");
    }

    /// A vCPU saves its state without the gate's lock: the control thread works meanwhile
    /// (a save that held it would wait for the control thread's signal in vain).
    #[test]
    fn vcpus_save_while_the_control_thread_works() {
        let gate = Arc::new(PauseGate::new(2));
        let (signal, signalled) = std::sync::mpsc::channel::<()>();
        let signalled = Arc::new(Mutex::new(signalled));
        let threads: Vec<_> = (0..2)
            .map(|id| {
                let (gate, signalled) = (gate.clone(), signalled.clone());
                std::thread::spawn(move || {
                    gate.register(id);
                    while !gate.requested() {
                        std::thread::yield_now();
                    }
                    gate.park(id, &mut || {
                        let waited = signalled
                            .lock()
                            .unwrap()
                            .recv_timeout(Duration::from_secs(5));
                        Err(format!("vcpu {id}: {}", waited.is_ok()))
                    });
                    gate.gone(id);
                })
            })
            .collect();
        install_kick_handler().unwrap();
        gate.pause().unwrap();
        gate.ask_saves().unwrap();
        // Work that needs the gate while the vCPUs save, then let each save end.
        for _ in 0..2 {
            drop(gate.lock());
            signal.send(()).unwrap();
        }
        let saved = gate.collect_saves().unwrap_err();
        assert!(saved.ends_with(": true"), "{saved}");
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_thread_that_never_stops_times_the_pause_out_and_leaves_it_running() {
        let gate = PauseGate::new(1);
        install_kick_handler().unwrap();
        let e = gate.pause().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Timeout {
                    stopped: 0,
                    total: 1
                }
            ),
            "{e}"
        );
        assert!(!gate.requested());
    }
}
