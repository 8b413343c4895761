//! The ledger's head as this daemon last wrote it. Before each append the ledger must still
//! end there: if rows were cut, rewritten or added behind the daemon's back, numbering
//! resumes after the head it knows (so no number is used twice), and what happened is kept
//! for the daemon to raise as an incident. After each commit the head is anchored, signed
//! (anchor.rs).

use std::path::PathBuf;
use std::sync::Arc;

use api::Event;
use rusqlite::Connection;

use crate::anchor::{self, Anchor};
use crate::host_key::HostKey;
use crate::ledger::{self, NewEvent};

pub struct Chain {
    /// (seq, hash) of the last row this daemon appended or verified; None until the daemon
    /// has checked the ledger at start.
    head: Option<(i64, String)>,
    /// Where the head is anchored and the key that signs it.
    anchoring: Option<(PathBuf, Option<Arc<HostKey>>)>,
    /// Changes found behind the daemon's back, not yet raised.
    tampered: Vec<String>,
    /// Every committed row, to whoever follows them (`GET /events/stream`).
    followers: tokio::sync::broadcast::Sender<Event>,
}

/// Rows a slow follower may fall behind by before it is told it missed some.
const FOLLOW_BACKLOG: usize = 256;

impl Default for Chain {
    fn default() -> Self {
        Chain {
            head: None,
            anchoring: None,
            tampered: Vec::new(),
            followers: tokio::sync::broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

/// What happened between the head the daemon knows and the ledger's last row.
fn describe(known: &(i64, String), found: Option<&(i64, String)>) -> String {
    let (seq, _) = known;
    match found {
        None => format!(
            "every row of the ledger was deleted while the daemon ran (it had written up to row {seq}); numbering goes on from row {}",
            seq + 1
        ),
        Some((last, _)) if last < seq => format!(
            "{} cut from the ledger's end while the daemon ran; numbering goes on from row {}",
            if last + 1 == *seq {
                format!("row {seq} was")
            } else {
                format!("rows {} to {seq} were", last + 1)
            },
            seq + 1
        ),
        Some((last, _)) if last > seq => format!(
            "{} added to the ledger behind the daemon's back (it had written up to row {seq})",
            if *last == seq + 1 {
                format!("row {last} was")
            } else {
                format!("rows {} to {last} were", seq + 1)
            }
        ),
        Some(_) => format!("row {seq}, the ledger's last, was rewritten behind the daemon's back"),
    }
}

impl Chain {
    /// From now on: check the ledger still ends at `head` before each append, and anchor each
    /// new head in `state_dir`, signed with `key`.
    pub fn start(
        &mut self,
        head: Option<(i64, String)>,
        state_dir: PathBuf,
        key: Option<Arc<HostKey>>,
    ) {
        self.head = head;
        self.anchoring = Some((state_dir, key));
    }

    /// Appends `event` inside the caller's transaction.
    pub fn append(
        &mut self,
        tx: &Connection,
        event: &NewEvent,
        time_ms: i64,
    ) -> ledger::Result<Event> {
        if let Some(known) = &self.head {
            let found = ledger::last_row(tx)?;
            if found.as_ref() != Some(known) {
                if found.as_ref().is_none_or(|(last, _)| last <= &known.0) {
                    ledger::set_resume(tx, known.0, &known.1)?;
                }
                self.tampered.push(describe(known, found.as_ref()));
                // Said once: from here on the ledger is what it now is.
                self.head = None;
            }
        }
        ledger::append(tx, event, time_ms)
    }

    /// After the commit of `event`: it is the head, anchored now (the anchor is fast, not
    /// synced: see anchor.rs).
    pub fn committed(&mut self, event: &Event) {
        self.head = Some((event.seq, event.hash.clone()));
        // No follower is not an error.
        let _ = self.followers.send(event.clone());
        if let Some((state_dir, key)) = &self.anchoring {
            let anchor = Anchor::new(event.seq, &event.hash, key.as_deref());
            if let Err(e) = anchor::write(state_dir, &anchor, false) {
                tracing::error!("writing the ledger anchor in {}: {e}", state_dir.display());
            }
        }
    }

    /// Rows committed from now on.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.followers.subscribe()
    }

    /// Changes found behind the daemon's back since the last call.
    pub fn take_tampered(&mut self) -> Vec<String> {
        std::mem::take(&mut self.tampered)
    }
}
