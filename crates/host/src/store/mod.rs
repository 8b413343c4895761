//! The daemon's embedded store: one SQLite file under the state directory. VM definitions,
//! their current state, open incidents, API tokens, and the ledger (ledger.rs). A VM's state
//! change, its ledger row and any incident it opens commit in one transaction.

use std::path::Path;

use api::events::EventKind;
use api::{Cause, Event, Incident, VmSpec, VmState};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::ledger::{self, NewEvent};
use crate::time::{now_ms, rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store {what} failed: {source}")]
    Sqlite {
        what: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Ledger(#[from] ledger::Error),
    #[error("store: the row of VM '{name}' is damaged ({why}); restore it from a backup or delete the VM")]
    BadRow { name: String, why: String },
    #[error("store schema version {found} is newer than this keel understands ({known}); run a newer keel")]
    TooNew { found: i64, known: i64 },
    #[error("every jail id of the range {}..{} is in use: no more VMs can be defined", JAIL_IDS.start, JAIL_IDS.end)]
    NoJailId,
    #[error("store: a reader of the ledger ended abnormally: {0}")]
    Reader(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn sql(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
    let what = what.into();
    move |source| Error::Sqlite { what, source }
}

/// Each entry moves the schema one version up; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        since_ms INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
     );
     CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        opened_ms INTEGER NOT NULL,
        vm TEXT,
        cause TEXT NOT NULL,
        summary TEXT NOT NULL,
        event_seq INTEGER NOT NULL,
        closed_ms INTEGER,
        closed_by TEXT
     );
     CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER
     );
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 2: the daemon's pending stop, so a restarted daemon judges the VMM's end the same way.
    "ALTER TABLE vms ADD COLUMN stop_intent TEXT;",
    // 3: the start owed after a VMM's end (a reboot), recorded with that end, so a restarted
    // daemon finishes it.
    "ALTER TABLE vms ADD COLUMN pending_start TEXT;",
    // 4: each VM's own jail uid and gid (one number for both), never shared by two VMs.
    "CREATE TABLE jail_ids (vm TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE);",
    // 5: numbers of rows cut from the ledger's end are never used again.
    ledger::RESUME_SCHEMA,
    // 6: the image library.
    images::SCHEMA,
];

/// The uids and gids of jailed VMMs: one per VM from this range, recorded in the store.
/// Far above the ids of users and of subordinate-id ranges (useradd and subuid start at
/// 100000 and hand out 65536 at a time), below `keel run`'s own (3000000000 + pid).
pub const JAIL_IDS: std::ops::Range<u32> = 2_000_000_000..2_001_000_000;

/// A VM as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    pub spec: VmSpec,
    pub state: VmState,
    pub pid: Option<u32>,
    pub since_ms: i64,
    pub reason: String,
    /// What the daemon asked of the VM's VMM that has not ended yet.
    pub stop_intent: Option<StopIntent>,
    /// The start the daemon owes the VM: its VMM ended for a reboot and no new start has
    /// been recorded yet.
    pub pending_start: Option<PendingStart>,
}

/// What the daemon expects the next end of a VM's VMM to mean (a stop, a reboot, a shutdown
/// it asked for). Kept in the store so that a daemon killed meanwhile still knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StopIntent {
    pub cause: Cause,
    pub actor: String,
    pub detail: String,
    /// Start the VM again once it has ended (reboot).
    pub restart: bool,
    /// The daemon sent the VMM SIGKILL for this intent. A re-adopted VMM is not the daemon's
    /// child, so no wait status shows the signal; this says it instead.
    pub killed: bool,
}

/// A start owed to a stopped VM, with the cause and actor of the reboot that asked for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingStart {
    pub cause: Cause,
    pub actor: String,
}

const VM_COLUMNS: &str = "name, spec, state, pid, since_ms, reason, stop_intent, pending_start";

/// A `vms` row as SQLite gives it, before its text is parsed.
struct RawVm {
    name: String,
    spec: String,
    state: String,
    pid: Option<i64>,
    since_ms: i64,
    reason: String,
    stop_intent: Option<String>,
    pending_start: Option<String>,
}

impl RawVm {
    fn read(r: &rusqlite::Row) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            name: r.get(0)?,
            spec: r.get(1)?,
            state: r.get(2)?,
            pid: r.get(3)?,
            since_ms: r.get(4)?,
            reason: r.get(5)?,
            stop_intent: r.get(6)?,
            pending_start: r.get(7)?,
        })
    }

    fn parse(self) -> Result<VmRow> {
        let bad = |why: String| Error::BadRow {
            name: self.name.clone(),
            why,
        };
        let spec: VmSpec =
            serde_json::from_str(&self.spec).map_err(|e| bad(format!("definition: {e}")))?;
        let state: VmState = self.state.parse().map_err(bad)?;
        let pid = match self.pid {
            Some(p) => Some(u32::try_from(p).map_err(|_| bad(format!("pid {p}")))?),
            None => None,
        };
        let stop_intent = match &self.stop_intent {
            Some(json) => {
                Some(serde_json::from_str(json).map_err(|e| bad(format!("stop intent: {e}")))?)
            }
            None => None,
        };
        let pending_start = match &self.pending_start {
            Some(json) => {
                Some(serde_json::from_str(json).map_err(|e| bad(format!("pending start: {e}")))?)
            }
            None => None,
        };
        Ok(VmRow {
            spec,
            state,
            pid,
            since_ms: self.since_ms,
            reason: self.reason,
            stop_intent,
            pending_start,
        })
    }
}

/// An API token as stored (only the SHA-256 of its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub name: String,
    pub role: String,
    pub secret_sha256: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// A state change to record.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub to: VmState,
    pub pid: Option<u32>,
    pub cause: Cause,
    pub actor: &'a str,
    pub detail: &'a str,
    /// When it happened, if known better than "now" (a VMM's exit record).
    pub time_ms: Option<i64>,
}

pub struct Store {
    conn: Connection,
    path: std::path::PathBuf,
    /// The head this daemon wrote last, and its anchor (chain.rs).
    pub chain: chain::Chain,
}

/// A read-only connection to the store at `path`, for long reads (ledger verification, SLA
/// reports) that must not hold the store's writer: with WAL they read a snapshot while the
/// daemon goes on writing.
pub fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(format!("opening {} to read", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql("setting the busy timeout"))?;
    Ok(conn)
}

/// A definition as the `vms` table stores it.
fn spec_json(spec: &VmSpec) -> Result<String> {
    serde_json::to_string(spec).map_err(|e| Error::BadRow {
        name: spec.name.clone(),
        why: e.to_string(),
    })
}

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(sql(format!("opening {}", path.display())))?;
        // WAL with FULL sync: a committed row survives a crash of the daemon or the host.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("setting WAL mode"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("setting synchronous=FULL"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql("setting the busy timeout"))?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            chain: chain::Chain::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as i64;
        let found: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("reading the schema version"))?;
        if found > known {
            return Err(Error::TooNew { found, known });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = i as i64 + 1;
            let tx = self
                .conn
                .transaction()
                .map_err(sql("starting a migration"))?;
            tx.execute_batch(step)
                .map_err(sql(format!("migrating to schema {version}")))?;
            if version == 1 {
                tx.execute_batch(ledger::SCHEMA)
                    .map_err(sql("creating the ledger"))?;
            }
            tx.pragma_update(None, "user_version", version)
                .map_err(sql("recording the schema version"))?;
            tx.commit().map_err(sql("committing a migration"))?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("reading the schema version"))
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sql(format!("reading {key}")))
    }

    pub fn delete_meta(&self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", [key])
            .map(|_| ())
            .map_err(sql(format!("removing {key}")))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(sql(format!("writing {key}")))
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRow>> {
        let raw = self
            .conn
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"),
                [name],
                RawVm::read,
            )
            .optional()
            .map_err(sql(format!("reading VM {name}")))?;
        raw.map(RawVm::parse).transpose()
    }

    pub fn vms(&self) -> Result<Vec<VmRow>> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))
            .map_err(sql("listing VMs"))?;
        let rows = stmt
            .query_map([], RawVm::read)
            .map_err(sql("listing VMs"))?;
        let mut vms = Vec::new();
        for raw in rows {
            vms.push(raw.map_err(sql("listing VMs"))?.parse()?);
        }
        Ok(vms)
    }

    /// Records (or clears) what the daemon intends the VM's next VMM end to mean, so that a
    /// daemon restarted in between judges it the same way.
    pub fn set_stop_intent(&self, name: &str, intent: Option<&StopIntent>) -> Result<()> {
        let json = intent.and_then(|i| serde_json::to_string(i).ok());
        self.conn
            .execute(
                "UPDATE vms SET stop_intent = ?2 WHERE name = ?1",
                params![name, json],
            )
            .map(|_| ())
            .map_err(sql(format!("recording the stop intent of VM {name}")))
    }

    /// Defines a VM (stopped) and records it. The caller has checked the name is free.
    pub fn create_vm(&mut self, spec: &VmSpec, actor: &str) -> Result<VmRow> {
        let now = now_ms();
        let json = spec_json(spec)?;
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        tx.execute(
            "INSERT INTO vms (name, spec, state, pid, since_ms, reason) VALUES (?1, ?2, ?3, NULL, ?4, 'defined')",
            params![spec.name, json, VmState::Stopped.as_str(), now],
        )
        .map_err(sql(format!("defining VM {}", spec.name)))?;
        let event = self.chain.append(
            &tx,
            &NewEvent {
                kind: EventKind::State,
                vm: Some(spec.name.clone()),
                from: None,
                to: Some(VmState::Stopped),
                cause: Cause::Operator,
                actor: actor.to_string(),
                detail: "defined".into(),
            },
            now,
        )?;
        tx.commit().map_err(sql("committing a new VM"))?;
        self.chain.committed(&event);
        Ok(VmRow {
            spec: spec.clone(),
            state: VmState::Stopped,
            pid: None,
            since_ms: now,
            reason: "defined".into(),
            stop_intent: None,
            pending_start: None,
        })
    }

    /// Replaces a VM's definition (a snapshot moved its disks onto new overlays) and records
    /// why, in one transaction.
    pub fn set_spec(&mut self, spec: &VmSpec, event: &NewEvent) -> Result<()> {
        let now = now_ms();
        let json = spec_json(spec)?;
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let changed = tx
            .execute(
                "UPDATE vms SET spec = ?2 WHERE name = ?1",
                params![spec.name, json],
            )
            .map_err(sql(format!("changing the definition of VM {}", spec.name)))?;
        if changed != 1 {
            return Err(Error::BadRow {
                name: spec.name.clone(),
                why: "no such VM".into(),
            });
        }
        let appended = self.chain.append(&tx, event, now)?;
        tx.commit().map_err(sql(format!(
            "committing the definition of VM {}",
            spec.name
        )))?;
        self.chain.committed(&appended);
        Ok(())
    }

    pub fn delete_vm(&mut self, name: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM vms WHERE name = ?1", [name])
            .map_err(sql(format!("deleting VM {name}")))?;
        // Its jail id is free for another VM.
        self.conn
            .execute("DELETE FROM jail_ids WHERE vm = ?1", [name])
            .map(|_| ())
            .map_err(sql(format!("freeing the jail id of VM {name}")))
    }

    /// The VM's jail uid and gid: the one it had, or the lowest free one of [`JAIL_IDS`].
    pub fn jail_id(&mut self, name: &str) -> Result<u32> {
        self.jail_id_from(name, JAIL_IDS.start)
    }

    /// The VM's jail id, if it was given one.
    pub fn known_jail_id(&self, name: &str) -> Result<Option<u32>> {
        self.conn
            .query_row("SELECT id FROM jail_ids WHERE vm = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(format!("reading the jail id of VM {name}")))
    }

    /// Gives the VM a new jail id above `taken` (which a VM of another daemon on this host
    /// runs with).
    pub fn jail_id_after(&mut self, name: &str, taken: u32) -> Result<u32> {
        self.conn
            .execute("DELETE FROM jail_ids WHERE vm = ?1", [name])
            .map_err(sql(format!("freeing the jail id of VM {name}")))?;
        self.jail_id_from(name, taken.saturating_add(1))
    }

    fn jail_id_from(&mut self, name: &str, lowest: u32) -> Result<u32> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let known: Option<u32> = tx
            .query_row("SELECT id FROM jail_ids WHERE vm = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(format!("reading the jail id of VM {name}")))?;
        if let Some(id) = known {
            return Ok(id);
        }
        // The first id whose successor is free (or the range's first, when it is free).
        let free: Option<u32> = tx
            .query_row(
                "SELECT ?1 WHERE ?1 < ?2 AND NOT EXISTS (SELECT 1 FROM jail_ids WHERE id = ?1)
                 UNION ALL
                 SELECT id + 1 FROM jail_ids WHERE id + 1 >= ?1 AND id + 1 < ?2
                   AND NOT EXISTS (SELECT 1 FROM jail_ids j WHERE j.id = jail_ids.id + 1)
                 ORDER BY 1 LIMIT 1",
                params![lowest, JAIL_IDS.end],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("finding a free jail id"))?;
        let id = free.ok_or(Error::NoJailId)?;
        tx.execute(
            "INSERT INTO jail_ids (vm, id) VALUES (?1, ?2)",
            params![name, id],
        )
        .map_err(sql(format!("recording the jail id of VM {name}")))?;
        tx.commit().map_err(sql("committing the jail id"))?;
        Ok(id)
    }

    /// Moves a VM to a new state: the row, the ledger entry and (for a crash) an incident,
    /// in one transaction. Returns the ledger entry.
    pub fn transition(&mut self, name: &str, change: &Transition) -> Result<Event> {
        self.apply(name, change, false)
    }

    /// Records the end of a VM's VMM that asks for a new start (a reboot) and, in the same
    /// transaction, that start as owed (with the change's cause and actor): a daemon killed
    /// before it records the start finds it in `pending_start` and finishes it. The next
    /// state change, the start's own `starting` first, clears it.
    pub fn transition_then_start(&mut self, name: &str, change: &Transition) -> Result<Event> {
        self.apply(name, change, true)
    }

    fn apply(&mut self, name: &str, change: &Transition, then_start: bool) -> Result<Event> {
        let pending_start = then_start
            .then(|| {
                serde_json::to_string(&PendingStart {
                    cause: change.cause,
                    actor: change.actor.to_string(),
                })
            })
            .transpose()
            .map_err(|e| Error::BadRow {
                name: name.to_string(),
                why: format!("pending start: {e}"),
            })?;
        let time = change.time_ms.unwrap_or_else(now_ms);
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let from: Option<String> = tx
            .query_row("SELECT state FROM vms WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql(format!("reading VM {name}")))?;
        let from = from
            .map(|s| s.parse::<VmState>())
            .transpose()
            .map_err(|why| Error::BadRow {
                name: name.to_string(),
                why,
            })?;
        tx.execute(
            // A stop intent belongs to one VMM's end: it is set while the VM runs and kept
            // into shutting-down; any other change (the end, a new VMM) clears it. A pending
            // start lasts from the end that owes it to the next change (the start's own).
            "UPDATE vms SET state = ?2, pid = ?3, since_ms = ?4, reason = ?5,
                stop_intent = CASE WHEN ?6 THEN stop_intent ELSE NULL END,
                pending_start = ?7
             WHERE name = ?1",
            params![
                name,
                change.to.as_str(),
                change.pid.map(i64::from),
                time,
                change.detail,
                change.to == VmState::ShuttingDown,
                pending_start
            ],
        )
        .map_err(sql(format!("changing the state of VM {name}")))?;
        let event = self.chain.append(
            &tx,
            &NewEvent {
                kind: EventKind::State,
                vm: Some(name.to_string()),
                from,
                to: Some(change.to),
                cause: change.cause,
                actor: change.actor.to_string(),
                detail: change.detail.to_string(),
            },
            time,
        )?;
        if change.to == VmState::Crashed {
            open_incident(&tx, Some(name), change.cause, change.detail, &event)?;
        }
        tx.commit().map_err(sql("committing a state change"))?;
        self.chain.committed(&event);
        Ok(event)
    }

    /// Records an event that changes no VM state (audit, host).
    pub fn record(&mut self, event: &NewEvent) -> Result<Event> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let recorded = self.chain.append(&tx, event, now_ms())?;
        tx.commit().map_err(sql("committing an event"))?;
        self.chain.committed(&recorded);
        Ok(recorded)
    }

    /// Records a host event and opens an incident for it, in one transaction.
    pub fn record_incident(&mut self, event: &NewEvent) -> Result<Event> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let recorded = self.chain.append(&tx, event, now_ms())?;
        open_incident(
            &tx,
            event.vm.as_deref(),
            event.cause,
            &event.detail,
            &recorded,
        )?;
        tx.commit().map_err(sql("committing an incident"))?;
        self.chain.committed(&recorded);
        Ok(recorded)
    }

    /// Since when nothing has needed attention: the last incident's acknowledgement, else the
    /// ledger's first row (the host's history began then). None for an empty ledger.
    pub fn quiet_since_ms(&self) -> Result<Option<i64>> {
        self.conn
            .query_row(
                "SELECT COALESCE((SELECT MAX(closed_ms) FROM incidents),
                                 (SELECT time_ms FROM ledger ORDER BY seq LIMIT 1))",
                [],
                |r| r.get(0),
            )
            .map_err(sql("finding when the host was last quiet"))
    }

    /// Whether an incident (open or closed) has this summary.
    pub fn incident_raised(&self, summary: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM incidents WHERE summary = ?1)",
                [summary],
                |r| r.get(0),
            )
            .map_err(sql("looking for an incident"))
    }

    pub fn open_incidents(&self) -> Result<Vec<Incident>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, opened_ms, vm, cause, summary, event_seq FROM incidents
                 WHERE closed_ms IS NULL ORDER BY id DESC",
            )
            .map_err(sql("listing incidents"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(sql("listing incidents"))?;
        let mut incidents = Vec::new();
        for raw in rows {
            let (id, opened, vm, cause, summary, event_seq) =
                raw.map_err(sql("listing incidents"))?;
            incidents.push(Incident {
                id,
                opened: rfc3339(opened),
                vm,
                cause: cause.parse().unwrap_or(Cause::VmmCrash),
                summary,
                event_seq,
            });
        }
        Ok(incidents)
    }

    /// Closes an open incident; false when there is no open incident with that id.
    pub fn close_incident(&mut self, id: i64, actor: &str) -> Result<bool> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let changed = tx
            .execute(
                "UPDATE incidents SET closed_ms = ?2, closed_by = ?3 WHERE id = ?1 AND closed_ms IS NULL",
                params![id, now_ms(), actor],
            )
            .map_err(sql(format!("closing incident {id}")))?;
        let mut acknowledged = None;
        if changed == 1 {
            acknowledged = Some(self.chain.append(
                &tx,
                &NewEvent::host(
                    None,
                    Cause::Operator,
                    actor,
                    format!("incident {id} acknowledged"),
                ),
                now_ms(),
            )?);
        }
        tx.commit().map_err(sql("committing an incident change"))?;
        if let Some(event) = &acknowledged {
            self.chain.committed(event);
        }
        Ok(changed == 1)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, role, secret_sha256, created_ms, expires_ms FROM tokens ORDER BY name")
            .map_err(sql("listing tokens"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TokenRow {
                    name: r.get(0)?,
                    role: r.get(1)?,
                    secret_sha256: r.get(2)?,
                    created_ms: r.get(3)?,
                    expires_ms: r.get(4)?,
                })
            })
            .map_err(sql("listing tokens"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(sql("listing tokens"))
    }

    pub fn add_token(&mut self, token: &TokenRow) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO tokens (name, role, secret_sha256, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    token.name,
                    token.role,
                    token.secret_sha256,
                    token.created_ms,
                    token.expires_ms
                ],
            )
            .map(|_| ())
            .map_err(sql(format!("adding token {}", token.name)))
    }

    pub fn remove_token(&mut self, name: &str) -> Result<bool> {
        self.conn
            .execute("DELETE FROM tokens WHERE name = ?1", [name])
            .map(|n| n == 1)
            .map_err(sql(format!("removing token {name}")))
    }
}

fn open_incident(
    tx: &Transaction,
    vm: Option<&str>,
    cause: Cause,
    summary: &str,
    event: &Event,
) -> Result<()> {
    tx.execute(
        "INSERT INTO incidents (opened_ms, vm, cause, summary, event_seq) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![event.time_ms, vm, cause.as_str(), summary, event.seq],
    )
    .map(|_| ())
    .map_err(sql("opening an incident"))
}

pub mod chain;
pub mod images;
pub use images::ImageRow;
#[cfg(test)]
mod tests;
