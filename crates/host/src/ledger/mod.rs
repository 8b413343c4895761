//! The availability ledger (promise 5): every VM state change, every mutating API call and
//! every host record is one row of an append-only, hash-chained SQLite table.
//!
//! # The chain
//!
//! Rows are numbered from 1 without gaps (`seq`). Row `n` stores `prev_hash`, the `hash` of
//! row `n - 1` ([`GENESIS`], 64 `0`s, for row 1), and its own `hash`: the lowercase hex
//! SHA-256 of this byte string, so that anyone with the file can recompute it:
//!
//! ```text
//! text("keel-ledger-v1") text(prev_hash) int(seq) int(time_ms) text(kind)
//! opt(vm) opt(from_state) opt(to_state) text(cause) text(actor) text(detail)
//!
//! int(x)  = x as 8 bytes, big-endian two's complement
//! text(s) = int(byte length of s) followed by the UTF-8 bytes of s
//! opt(s)  = one byte 0 when absent, or one byte 1 followed by text(s)
//! ```
//!
//! Every field is length-prefixed, so moving text from one field into another changes the
//! hash. `kind`, states and `cause` are hashed as stored (`state`, `running`, `vmm-crash`).
//!
//! # What is enforced and what is detected
//!
//! Triggers in [`SCHEMA`] refuse `UPDATE` and `DELETE`, and an `INSERT` whose `seq` or
//! `prev_hash` does not continue the chain. Someone with write access to the file can drop
//! the triggers; [`verify`] then finds every edited row (its content no longer matches its
//! hash), every deleted or inserted row (a `seq` gap, or a `prev_hash` that is not the
//! previous row's hash) and every row whose fields do not parse. Removing rows from the end,
//! or rewriting the whole chain, leaves a chain that is consistent in itself: write down
//! [`LedgerVerification::head_hash`] (in a report, a ticket, another machine) and check it
//! later with [`verify_against`].
//!
//! Times are records, never decisions (promise 1): any `time_ms` is accepted and stored;
//! `Event::time` is RFC 3339 UTC with milliseconds for years 1970 to 9999 and `@<ms>ms`
//! outside them.

use std::fmt::Write as _;

use api::events::LedgerVerification;
use api::{Cause, Event, EventKind, VmState};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use crate::time::rfc3339;

/// The `prev_hash` of row 1, and the head of an empty ledger.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Creates the ledger table, its index and the triggers that keep it append-only.
/// Executed once by the store's migration (schema version 1).
pub const SCHEMA: &str = "
CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    vm TEXT NULL,
    from_state TEXT NULL,
    to_state TEXT NULL,
    cause TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE INDEX ledger_by_vm ON ledger (vm, seq);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: its rows cannot be changed');
END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: its rows cannot be deleted');
END;
CREATE TRIGGER ledger_append_only BEFORE INSERT ON ledger
WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger)
  OR NEW.prev_hash IS NOT COALESCE(
        (SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1),
        '0000000000000000000000000000000000000000000000000000000000000000')
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: a new row must follow the last one (seq and prev_hash)');
END;
";

/// Schema version 5: where numbering resumes after rows were cut from the end (so that their
/// numbers are never used again), and the append trigger that allows exactly that gap.
pub const RESUME_SCHEMA: &str = "
CREATE TABLE ledger_resume (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;
DROP TRIGGER ledger_append_only;
CREATE TRIGGER ledger_append_only BEFORE INSERT ON ledger
WHEN NOT (
    (NEW.seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger)
     AND NEW.prev_hash IS COALESCE(
        (SELECT hash FROM ledger ORDER BY seq DESC LIMIT 1),
        '0000000000000000000000000000000000000000000000000000000000000000'))
    OR (NEW.seq > (SELECT COALESCE(MAX(seq), 0) FROM ledger)
     AND EXISTS (SELECT 1 FROM ledger_resume WHERE seq + 1 = NEW.seq AND hash = NEW.prev_hash))
)
BEGIN
    SELECT RAISE(ABORT, 'the ledger is append-only: a new row must follow the last one (seq and prev_hash)');
END;
";

const HASH_VERSION: &str = "keel-ledger-v1";
const COLUMNS: &str =
    "seq, time_ms, kind, vm, from_state, to_state, cause, actor, detail, prev_hash, hash";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ledger: {doing} failed: {source}")]
    Sqlite {
        doing: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger row {seq} cannot be read ({problem}): the ledger file was changed outside keel; verifying the ledger lists every such row")]
    BadRow { seq: i64, problem: String },
    #[error("ledger: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn sql(doing: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sqlite { doing, source }
}

/// A row to append; `seq`, the time and the hashes are filled in by [`append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub vm: Option<String>,
    pub from: Option<VmState>,
    pub to: Option<VmState>,
    pub cause: Cause,
    pub actor: String,
    pub detail: String,
}

impl NewEvent {
    /// A `host` row: something about the daemon or a VM that changes no state.
    pub fn host(vm: Option<&str>, cause: Cause, actor: &str, detail: impl Into<String>) -> Self {
        NewEvent {
            kind: EventKind::Host,
            vm: vm.map(str::to_string),
            from: None,
            to: None,
            cause,
            actor: actor.to_string(),
            detail: detail.into(),
        }
    }
}

/// Which rows [`list`] returns. All fields `None`: every row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub vm: Option<String>,
    pub kind: Option<EventKind>,
    /// Only rows with `seq` greater than this.
    pub since: Option<i64>,
    /// At most this many rows: the oldest ones after `since` when it is given (so that a
    /// reader paging forward misses nothing), otherwise the newest ones.
    pub limit: Option<usize>,
}

/// A row as stored: text, not yet parsed into enums.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawRow {
    seq: i64,
    time_ms: i64,
    kind: String,
    vm: Option<String>,
    from: Option<String>,
    to: Option<String>,
    cause: String,
    actor: String,
    detail: String,
    prev_hash: String,
    hash: String,
}

fn put_int(h: &mut Sha256, x: i64) {
    h.update(x.to_be_bytes());
}

fn put_text(h: &mut Sha256, s: &str) {
    // A usize always fits in 8 bytes on the targets Keel builds for.
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn put_opt(h: &mut Sha256, s: Option<&str>) {
    match s {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put_text(h, s);
        }
    }
}

/// The hash of a row (see the module documentation for the encoding).
fn row_hash(r: &RawRow) -> String {
    let mut h = Sha256::new();
    put_text(&mut h, HASH_VERSION);
    put_text(&mut h, &r.prev_hash);
    put_int(&mut h, r.seq);
    put_int(&mut h, r.time_ms);
    put_text(&mut h, &r.kind);
    put_opt(&mut h, r.vm.as_deref());
    put_opt(&mut h, r.from.as_deref());
    put_opt(&mut h, r.to.as_deref());
    put_text(&mut h, &r.cause);
    put_text(&mut h, &r.actor);
    put_text(&mut h, &r.detail);
    let mut hex = String::with_capacity(64);
    for b in h.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Appends one row and returns it. Run it inside the caller's transaction (a
/// `&rusqlite::Transaction` derefs to `&Connection`) so that a state change and its ledger row
/// commit together; the transaction also keeps two writers from racing for the same `seq`.
pub fn append(conn: &Connection, event: &NewEvent, time_ms: i64) -> Result<Event> {
    if event.kind == EventKind::State && (event.vm.is_none() || event.to.is_none()) {
        return Err(Error::Invalid(format!(
            "a state row needs a VM and the state it moved to (detail: '{}')",
            event.detail
        )));
    }
    let last = conn
        .query_row(
            "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1",
            [],
            |row| {
                let seq: i64 = row.get(0)?;
                Ok((seq, text_column(row, 1, "hash")?))
            },
        )
        .optional()
        .map_err(sql("reading the last ledger row"))?;
    // Rows cut from the end keep their numbers: the chain goes on from the head they had.
    let last = match (resume_point(conn)?, last) {
        (Some((at, hash)), last) if last.as_ref().is_none_or(|(seq, _)| at >= *seq) => {
            Some((at, Ok(hash)))
        }
        (_, last) => last,
    };
    let (seq, prev_hash) = match last {
        None => (1, GENESIS.to_string()),
        Some((seq, Ok(hash))) => (
            seq.checked_add(1).ok_or_else(|| Error::BadRow {
                seq,
                problem: "seq is the largest integer".into(),
            })?,
            hash,
        ),
        Some((seq, Err(problem))) => return Err(Error::BadRow { seq, problem }),
    };
    let mut raw = RawRow {
        seq,
        time_ms,
        kind: event.kind.as_str().to_string(),
        vm: event.vm.clone(),
        from: event.from.map(|s| s.as_str().to_string()),
        to: event.to.map(|s| s.as_str().to_string()),
        cause: event.cause.as_str().to_string(),
        actor: event.actor.clone(),
        detail: event.detail.clone(),
        prev_hash,
        hash: String::new(),
    };
    raw.hash = row_hash(&raw);
    conn.execute(
        "INSERT INTO ledger (seq, time_ms, kind, vm, from_state, to_state, cause, actor, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            raw.seq,
            raw.time_ms,
            raw.kind,
            raw.vm,
            raw.from,
            raw.to,
            raw.cause,
            raw.actor,
            raw.detail,
            raw.prev_hash,
            raw.hash
        ],
    )
    .map_err(sql("appending a ledger row"))?;
    Ok(Event {
        seq: raw.seq,
        time_ms,
        time: rfc3339(time_ms),
        kind: event.kind,
        vm: raw.vm,
        from: event.from,
        to: event.to,
        cause: event.cause,
        actor: raw.actor,
        detail: raw.detail,
        prev_hash: raw.prev_hash,
        hash: raw.hash,
    })
}

/// Where numbering resumes, if rows were cut from the end: the cut head's number and hash.
/// (Stores older than schema 5, and bare test ledgers, have no such table: none.)
fn resume_point(conn: &Connection) -> Result<Option<(i64, String)>> {
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_resume')",
            [],
            |r| r.get(0),
        )
        .map_err(sql("looking for the resume point"))?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        "SELECT seq, hash FROM ledger_resume WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(sql("reading the resume point"))
}

/// Makes the next row `seq + 1`, chained to `hash`: the head rows were cut from.
pub fn set_resume(conn: &Connection, seq: i64, hash: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO ledger_resume (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        params![seq, hash],
    )
    .map_err(sql("setting the resume point"))?;
    Ok(())
}

/// The last row's number and stored hash (None for an empty ledger).
pub fn last_row(conn: &Connection) -> Result<Option<(i64, String)>> {
    conn.query_row(
        "SELECT seq, CAST(hash AS TEXT) FROM ledger ORDER BY seq DESC LIMIT 1",
        [],
        |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            ))
        },
    )
    .optional()
    .map_err(sql("reading the last ledger row"))
}

/// Rows matching `filter`, oldest first. A row that does not parse is an [`Error::BadRow`].
pub fn list(conn: &Connection, filter: &EventFilter) -> Result<Vec<Event>> {
    let mut sql_text = format!("SELECT {COLUMNS} FROM ledger WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(vm) = &filter.vm {
        args.push(vm.clone().into());
        let _ = write!(sql_text, " AND vm = ?{}", args.len());
    }
    if let Some(kind) = filter.kind {
        args.push(kind.as_str().to_string().into());
        let _ = write!(sql_text, " AND kind = ?{}", args.len());
    }
    if let Some(since) = filter.since {
        args.push(since.into());
        let _ = write!(sql_text, " AND seq > ?{}", args.len());
    }
    let newest_first = filter.limit.is_some() && filter.since.is_none();
    sql_text.push_str(if newest_first {
        " ORDER BY seq DESC"
    } else {
        " ORDER BY seq ASC"
    });
    if let Some(limit) = filter.limit {
        args.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        let _ = write!(sql_text, " LIMIT ?{}", args.len());
    }
    let mut stmt = conn
        .prepare(&sql_text)
        .map_err(sql("preparing to list the ledger"))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(sql("listing the ledger"))?;
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(sql("listing the ledger"))? {
        let (seq, raw) = read_raw(row).map_err(sql("reading a ledger row"))?;
        let raw = raw.map_err(|problem| Error::BadRow { seq, problem })?;
        let event = parse(&raw).map_err(|problem| Error::BadRow { seq, problem })?;
        events.push(event);
    }
    if newest_first {
        events.reverse();
    }
    Ok(events)
}

/// Every `state` row, oldest first: what [`crate::sla::report`] needs.
pub fn state_events(conn: &Connection) -> Result<Vec<Event>> {
    list(
        conn,
        &EventFilter {
            kind: Some(EventKind::State),
            ..EventFilter::default()
        },
    )
}

/// Text in column `i`: `Ok(Err(problem))` when it holds something else.
fn text_column(
    row: &Row,
    i: usize,
    name: &str,
) -> rusqlite::Result<std::result::Result<String, String>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(format!("{name} is not UTF-8 text")),
        },
        other => Err(format!("{name} holds {} instead of text", type_name(other))),
    })
}

fn opt_text_column(
    row: &Row,
    i: usize,
    name: &str,
) -> rusqlite::Result<std::result::Result<Option<String>, String>> {
    if let ValueRef::Null = row.get_ref(i)? {
        return Ok(Ok(None));
    }
    Ok(text_column(row, i, name)?.map(Some))
}

fn type_name(v: ValueRef) -> &'static str {
    match v {
        ValueRef::Null => "NULL",
        ValueRef::Integer(_) => "an integer",
        ValueRef::Real(_) => "a real number",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "a blob",
    }
}

/// Reads a row selected with [`COLUMNS`]: its `seq`, and the row or what is wrong with its
/// column types. SQLite errors (I/O, a broken statement) are the outer error.
fn read_raw(row: &Row) -> rusqlite::Result<(i64, std::result::Result<RawRow, String>)> {
    // seq is the rowid: SQLite guarantees an integer.
    let seq: i64 = row.get(0)?;
    let time_ms = match row.get_ref(1)? {
        ValueRef::Integer(t) => Ok(t),
        other => Err(format!(
            "time_ms holds {} instead of an integer",
            type_name(other)
        )),
    };
    let kind = text_column(row, 2, "kind")?;
    let vm = opt_text_column(row, 3, "vm")?;
    let from = opt_text_column(row, 4, "from_state")?;
    let to = opt_text_column(row, 5, "to_state")?;
    let cause = text_column(row, 6, "cause")?;
    let actor = text_column(row, 7, "actor")?;
    let detail = text_column(row, 8, "detail")?;
    let prev_hash = text_column(row, 9, "prev_hash")?;
    let hash = text_column(row, 10, "hash")?;
    let raw = (|| {
        Ok(RawRow {
            seq,
            time_ms: time_ms?,
            kind: kind?,
            vm: vm?,
            from: from?,
            to: to?,
            cause: cause?,
            actor: actor?,
            detail: detail?,
            prev_hash: prev_hash?,
            hash: hash?,
        })
    })();
    Ok((seq, raw))
}

/// The typed event of a raw row, or what does not parse.
fn parse(raw: &RawRow) -> std::result::Result<Event, String> {
    let kind: EventKind = raw.kind.parse()?;
    let cause: Cause = raw.cause.parse()?;
    let from = raw.from.as_deref().map(str::parse::<VmState>).transpose()?;
    let to = raw.to.as_deref().map(str::parse::<VmState>).transpose()?;
    if kind == EventKind::State && (raw.vm.is_none() || to.is_none()) {
        return Err("a state row without a VM or without the state it moved to".into());
    }
    Ok(Event {
        seq: raw.seq,
        time_ms: raw.time_ms,
        time: rfc3339(raw.time_ms),
        kind,
        vm: raw.vm.clone(),
        from,
        to,
        cause,
        actor: raw.actor.clone(),
        detail: raw.detail.clone(),
        prev_hash: raw.prev_hash.clone(),
        hash: raw.hash.clone(),
    })
}

/// Recomputes the whole chain and names every row that does not fit it.
pub fn verify(conn: &Connection) -> Result<LedgerVerification> {
    verify_inner(conn, None)
}

/// [`verify`], and also checks `expected` (a head written down earlier): with its row
/// number, rows cut from the end are named exactly; a hash alone must still be a row's.
/// Rows appended after it are fine.
pub fn verify_against(conn: &Connection, expected: &ExpectedHead) -> Result<LedgerVerification> {
    verify_inner(conn, Some(expected))
}

fn verify_inner(conn: &Connection, expected: Option<&ExpectedHead>) -> Result<LedgerVerification> {
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM ledger ORDER BY seq ASC"))
        .map_err(sql("preparing to verify the ledger"))?;
    let mut rows = stmt.query([]).map_err(sql("verifying the ledger"))?;
    let mut checker = verify::Checker::new(expected);
    while let Some(row) = rows.next().map_err(sql("verifying the ledger"))? {
        let (seq, raw) = read_raw(row).map_err(sql("reading a ledger row"))?;
        let stored_hash = match &raw {
            Ok(_) => None,
            Err(_) => text_column(row, 10, "hash")
                .map_err(sql("reading a ledger row"))?
                .ok(),
        };
        checker.row(seq, raw, stored_hash);
    }
    Ok(checker.finish())
}

pub mod export;
mod verify;
pub use verify::ExpectedHead;

#[cfg(test)]
mod tests;
