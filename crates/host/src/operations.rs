//! Long operations (image imports, disk copies) and their progress, for clients to poll at
//! `GET /operations/{id}`. Kept in memory: a daemon restart forgets them (an import cut short
//! leaves only a partial file, which the next start removes).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::image::{Operation, OperationState};

use crate::time::{now_ms, rfc3339};

/// Finished operations kept for clients that poll late.
const KEEP_FINISHED: usize = 64;

struct Entry {
    info: Operation,
    started: Instant,
}

/// Every operation of this daemon's life (the finished ones up to [`KEEP_FINISHED`]).
#[derive(Default)]
pub struct Operations {
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, Entry>>,
}

fn lock(ops: &Operations) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
    ops.entries.lock().unwrap_or_else(|e| e.into_inner())
}

impl Operations {
    /// Starts recording an operation of `kind` on `target`.
    pub fn start(self: &Arc<Self>, kind: &str, target: &str) -> Progress {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Operation {
            id,
            kind: kind.to_string(),
            target: target.to_string(),
            state: OperationState::Running,
            done_bytes: 0,
            total_bytes: 0,
            rate: 0.0,
            eta_secs: None,
            started: rfc3339(now_ms()),
            finished: None,
            error: None,
            step: None,
            result: None,
            notes: Vec::new(),
        };
        lock(self).insert(
            id,
            Entry {
                info,
                started: Instant::now(),
            },
        );
        Progress {
            ops: self.clone(),
            id,
        }
    }

    pub fn get(&self, id: u64) -> Option<Operation> {
        lock(self).get(&id).map(|e| e.info.clone())
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Operation> {
        lock(self).values().rev().map(|e| e.info.clone()).collect()
    }

    /// Whether an operation of `kind` on `target` is running.
    pub fn running(&self, kind: &str, target: &str) -> bool {
        lock(self).values().any(|e| {
            e.info.state == OperationState::Running
                && e.info.kind == kind
                && e.info.target == target
        })
    }
}

/// The handle a worker reports its progress through.
#[derive(Clone)]
pub struct Progress {
    ops: Arc<Operations>,
    pub id: u64,
}

impl Progress {
    pub fn info(&self) -> Option<Operation> {
        self.ops.get(self.id)
    }

    /// `done` of `total` bytes.
    pub fn update(&self, done: u64, total: u64) {
        let mut entries = lock(&self.ops);
        if let Some(e) = entries.get_mut(&self.id) {
            let secs = e.started.elapsed().as_secs_f64();
            e.info.done_bytes = done;
            e.info.total_bytes = total;
            e.info.rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            e.info.eta_secs =
                (e.info.rate > 0.0).then(|| total.saturating_sub(done) as f64 / e.info.rate);
        }
    }

    /// Names the step the operation is at (its bytes start again from 0).
    pub fn step(&self, step: impl Into<String>) {
        if let Some(e) = lock(&self.ops).get_mut(&self.id) {
            e.info.step = Some(step.into());
            e.info.done_bytes = 0;
            e.info.total_bytes = 0;
            e.started = Instant::now();
        }
    }

    /// Sets what the operation made and what the operator should know.
    pub fn outcome(&self, result: Option<String>, notes: Vec<String>) {
        if let Some(e) = lock(&self.ops).get_mut(&self.id) {
            e.info.result = result;
            e.info.notes = notes;
        }
    }

    /// Ends the operation: done, or failed with why.
    pub fn finish(&self, result: Result<(), String>) {
        let mut entries = lock(&self.ops);
        if let Some(e) = entries.get_mut(&self.id) {
            e.info.finished = Some(rfc3339(now_ms()));
            e.info.eta_secs = None;
            match result {
                Ok(()) => {
                    e.info.state = OperationState::Done;
                    e.info.done_bytes = e.info.total_bytes;
                }
                Err(why) => {
                    e.info.state = OperationState::Failed;
                    e.info.error = Some(why);
                }
            }
        }
        let finished: Vec<u64> = entries
            .iter()
            .filter(|(_, e)| e.info.state != OperationState::Running)
            .map(|(id, _)| *id)
            .collect();
        for id in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            entries.remove(id);
        }
    }
}
