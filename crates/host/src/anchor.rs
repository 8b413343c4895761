//! The ledger's head written down outside SQLite: `<state dir>/ledger.head`. A hash chain
//! shows an edited, inserted or deleted row, but not rows cut from its end; a verification
//! checks that the anchored head is still in the chain. The daemon writes the anchor after
//! recovery, every minute while the ledger grows, and when it stops. Someone who can rewrite
//! both files can still hide a truncation: copy the head elsewhere for real evidence.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::ledger;
use crate::time::{now_ms, rfc3339};
use crate::vmm_process::write_atomically;

pub const FILE: &str = "ledger.head";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    #[error(transparent)]
    Write(#[from] crate::vmm_process::Error),
    #[error("the ledger head written down at {} ({} rows, {}) is no longer in the ledger: rows were cut from its end or the chain was rewritten; the anchor in {} is kept as evidence", .0.written, .0.rows, .0.head_hash, FILE)]
    Truncated(Anchor),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// Rows in the ledger when it was written.
    pub rows: i64,
    pub head_hash: String,
    /// RFC 3339, when it was written (a record only).
    pub written: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The anchor, if one was written and is readable.
pub fn read(state_dir: &Path) -> Option<Anchor> {
    let text = std::fs::read(path(state_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes the current head, unless it is the one already anchored. An anchored head that is
/// no longer in the chain is an error and is not overwritten (that would launder the cut).
pub fn write(state_dir: &Path, conn: &Connection) -> Result<Anchor, Error> {
    let verified = ledger::verify(conn)?;
    if let Some(old) = read(state_dir) {
        if old.head_hash == verified.head_hash {
            return Ok(old);
        }
        if !ledger::verify_against(conn, &old.head_hash)?.ok {
            return Err(Error::Truncated(old));
        }
    }
    let anchor = Anchor {
        rows: verified.rows,
        head_hash: verified.head_hash,
        written: rfc3339(now_ms()),
    };
    let json = serde_json::to_vec_pretty(&anchor).unwrap_or_default();
    write_atomically(&path(state_dir), &json)?;
    Ok(anchor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::NewEvent;
    use api::Cause;

    #[test]
    fn a_truncated_ledger_does_not_verify_against_its_anchor() {
        let dir = std::env::temp_dir().join(format!("keel-anchor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(ledger::SCHEMA).unwrap();
        for i in 0..4 {
            let event = NewEvent::host(None, Cause::Operator, "keel", format!("row {i}"));
            ledger::append(&conn, &event, i).unwrap();
        }
        let anchor = write(&dir, &conn).unwrap();
        assert_eq!(anchor.rows, 4);
        assert_eq!(read(&dir), Some(anchor.clone()));
        assert!(ledger::verify_against(&conn, &anchor.head_hash).unwrap().ok);
        // Someone with the file cuts the last row (the triggers are dropped first).
        conn.execute_batch("DROP TRIGGER ledger_no_delete; DELETE FROM ledger WHERE seq = 4;")
            .unwrap();
        assert!(
            ledger::verify(&conn).unwrap().ok,
            "the chain alone cannot see it"
        );
        assert!(!ledger::verify_against(&conn, &anchor.head_hash).unwrap().ok);
        // Rows appended after the cut do not launder it: the anchor is kept.
        let event = NewEvent::host(None, Cause::Operator, "keel", "later");
        ledger::append(&conn, &event, 9).unwrap();
        assert!(matches!(write(&dir, &conn), Err(Error::Truncated(_))));
        assert_eq!(read(&dir), Some(anchor));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
