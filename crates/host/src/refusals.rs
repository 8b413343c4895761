//! Requests and connections the API turned away without knowing who sent them: counted in
//! memory and written to the ledger as one row per peer and minute, never one fsynced row
//! each (anyone who reaches the port could otherwise grow the store without bound). Failed
//! authentications are also limited per peer: past the limit a peer's requests are refused
//! with 429 without looking at their token, until its window ends.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::{Cause, EventKind};

use crate::auth::Peer;
use crate::ledger::NewEvent;
use crate::time::rfc3339;

/// Failed authentications one peer may have in [`FAILURE_WINDOW`].
pub const MAX_FAILED_AUTH: u32 = 30;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers with a row of their own per minute; the others share one row.
pub const MAX_PEERS_PER_MINUTE: usize = 32;
const MINUTE_MS: i64 = 60_000;

/// One peer's refusals in one minute.
#[derive(Debug, Default, Clone)]
struct Tally {
    count: u64,
    /// HTTP status (0: connection closed before HTTP) to count.
    by_status: BTreeMap<u16, u64>,
    /// The first request refused, as an example.
    example: String,
    /// Peers folded into this tally (the "other peers" row).
    peers: u64,
}

#[derive(Default)]
struct Inner {
    /// Wall-clock minute (ms / 60000) -> peer -> tally. Times here are records only.
    minutes: BTreeMap<i64, BTreeMap<String, Tally>>,
    others: BTreeMap<i64, Tally>,
    failures: HashMap<String, (Instant, u32)>,
}

#[derive(Default)]
pub struct Refusals(Mutex<Inner>);

/// A peer as rows and limits see it: its address without the port, or its uid.
fn peer_key(peer: &Peer) -> String {
    match peer {
        Peer::Tcp(addr) => format!("tcp {}", addr.ip()),
        Peer::Unix { uid, .. } => format!("unix socket uid {uid}"),
    }
}

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one refusal: `status` 0 for a connection closed before HTTP.
    fn count(&self, peer: &Peer, status: u16, example: &str, now_ms: i64) {
        let key = peer_key(peer);
        let minute = now_ms.div_euclid(MINUTE_MS);
        let mut inner = self.lock();
        let peers = inner.minutes.entry(minute).or_default();
        let tally = if peers.contains_key(&key) || peers.len() < MAX_PEERS_PER_MINUTE {
            peers.entry(key).or_insert_with(|| Tally {
                peers: 1,
                ..Tally::default()
            })
        } else {
            let other = inner.others.entry(minute).or_default();
            other.peers += 1;
            other
        };
        tally.count += 1;
        *tally.by_status.entry(status).or_insert(0) += 1;
        if tally.example.is_empty() {
            tally.example = example.chars().take(120).collect();
        }
    }

    /// A connection closed at once because a cap was reached.
    pub fn connection_refused(&self, peer: &Peer, cap: &str) {
        self.count(
            peer,
            0,
            &format!("connection closed at {cap}"),
            crate::time::now_ms(),
        );
    }

    /// A request refused before its caller was known (401, 429, or a local user without a
    /// role); a 401 also counts towards the peer's failure limit.
    pub fn request_refused(&self, peer: &Peer, status: u16, request: &str) {
        self.count(peer, status, request, crate::time::now_ms());
        if status == 401 {
            let now = Instant::now();
            let mut inner = self.lock();
            let entry = inner.failures.entry(peer_key(peer)).or_insert((now, 0));
            if now.duration_since(entry.0) >= FAILURE_WINDOW {
                *entry = (now, 0);
            }
            entry.1 = entry.1.saturating_add(1);
        }
    }

    /// How long `peer` must wait, if it failed to authenticate too often.
    pub fn blocked(&self, peer: &Peer) -> Option<Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        let key = peer_key(peer);
        let (since, failed) = *inner.failures.get(&key)?;
        let elapsed = now.duration_since(since);
        if elapsed >= FAILURE_WINDOW {
            inner.failures.remove(&key);
            return None;
        }
        (failed >= MAX_FAILED_AUTH).then(|| FAILURE_WINDOW - elapsed)
    }

    /// Ledger rows for the minutes that ended before `now_ms` (all minutes when `all`),
    /// removed from the counts.
    pub fn take_rows(&self, now_ms: i64, all: bool) -> Vec<NewEvent> {
        let current = now_ms.div_euclid(MINUTE_MS);
        let mut inner = self.lock();
        let done: Vec<i64> = inner
            .minutes
            .keys()
            .chain(inner.others.keys())
            .copied()
            .filter(|m| all || *m < current)
            .collect();
        let mut rows = Vec::new();
        for minute in done {
            for (peer, tally) in inner.minutes.remove(&minute).unwrap_or_default() {
                rows.push(row(&format!("from {peer}"), minute, &tally));
            }
            if let Some(tally) = inner.others.remove(&minute) {
                rows.push(row(
                    &format!("from {} other peers", tally.peers),
                    minute,
                    &tally,
                ));
            }
        }
        // Old failure windows are forgotten, so the table stays small.
        let now = Instant::now();
        inner
            .failures
            .retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
        rows
    }
}

fn row(who: &str, minute: i64, tally: &Tally) -> NewEvent {
    let mut statuses = String::new();
    for (status, n) in &tally.by_status {
        if !statuses.is_empty() {
            statuses.push_str(", ");
        }
        match status {
            0 => {
                let _ = write!(statuses, "connection closed x {n}");
            }
            s => {
                let _ = write!(statuses, "{s} x {n}");
            }
        }
    }
    NewEvent {
        kind: EventKind::Audit,
        vm: None,
        from: None,
        to: None,
        cause: Cause::Operator,
        actor: "anonymous".into(),
        detail: format!(
            "refused {} unauthenticated request(s) {who} in the minute from {}: {statuses}; for example {}",
            tally.count,
            rfc3339(minute * MINUTE_MS),
            tally.example
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str) -> Peer {
        Peer::Tcp(format!("{ip}:40000").parse().unwrap())
    }

    #[test]
    fn a_thousand_refusals_from_one_peer_are_one_row_per_minute() {
        let refusals = Refusals::default();
        let minute = 29_000_000 * MINUTE_MS;
        for i in 0..1000 {
            refusals.count(&tcp("10.0.0.1"), 401, "POST /vms", minute + i);
        }
        refusals.count(&tcp("10.0.0.1"), 401, "GET /", minute + MINUTE_MS);
        assert!(refusals.take_rows(minute + 10, false).is_empty());
        let rows = refusals.take_rows(minute + MINUTE_MS + 1, false);
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0]
                .detail
                .starts_with("refused 1000 unauthenticated request(s) from tcp 10.0.0.1"),
            "{}",
            rows[0].detail
        );
        assert!(rows[0].detail.contains("401 x 1000"));
        assert_eq!(
            refusals.take_rows(0, true).len(),
            1,
            "the last minute at a stop"
        );
    }

    #[test]
    fn many_peers_share_a_row_past_the_cap() {
        let refusals = Refusals::default();
        for i in 0..100 {
            refusals.count(&tcp(&format!("10.0.1.{i}")), 401, "GET /vms", 0);
        }
        let rows = refusals.take_rows(MINUTE_MS, false);
        assert_eq!(rows.len(), MAX_PEERS_PER_MINUTE + 1);
        assert!(rows.last().unwrap().detail.contains("from 68 other peers"));
    }

    #[test]
    fn failed_authentications_are_limited_per_peer() {
        let refusals = Refusals::default();
        let (a, b) = (tcp("10.0.0.1"), tcp("10.0.0.2"));
        for _ in 0..MAX_FAILED_AUTH {
            assert!(refusals.blocked(&a).is_none());
            refusals.request_refused(&a, 401, "GET /vms");
        }
        let wait = refusals.blocked(&a).unwrap();
        assert!(wait <= FAILURE_WINDOW && wait > Duration::from_secs(50));
        assert!(
            refusals.blocked(&b).is_none(),
            "another peer is not held up"
        );
    }
}
