//! The ledger's hash chain against real SQLite: appends, tampering of every kind, times.

use super::*;

fn db() -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    conn.execute_batch(RESUME_SCHEMA).unwrap();
    conn
}

fn head(seq: i64, hash: &str) -> ExpectedHead {
    ExpectedHead {
        seq: Some(seq),
        hash: hash.into(),
        source: "the anchor".into(),
    }
}

fn state(vm: &str, from: Option<VmState>, to: VmState, cause: Cause, detail: &str) -> NewEvent {
    NewEvent {
        kind: EventKind::State,
        vm: Some(vm.into()),
        from,
        to: Some(to),
        cause,
        actor: "uid:1000".into(),
        detail: detail.into(),
    }
}

/// Five rows: web defined, starting, running, crashed; one audit row.
fn five(conn: &Connection) -> Vec<Event> {
    use VmState::*;
    let rows = [
        state("web", None, Stopped, Cause::Operator, "defined"),
        state("web", Some(Stopped), Starting, Cause::Operator, "start"),
        state(
            "web",
            Some(Starting),
            Running,
            Cause::Operator,
            "guest booted",
        ),
        NewEvent {
            kind: EventKind::Audit,
            vm: None,
            from: None,
            to: None,
            cause: Cause::Operator,
            actor: "token:ci".into(),
            detail: "POST /v1/tokens from 10.0.0.2: 201".into(),
        },
        state(
            "web",
            Some(Running),
            Crashed,
            Cause::VmmCrash,
            "vmm killed by SIGSEGV",
        ),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, e)| append(conn, e, 1_893_456_000_000 + i as i64 * 1000).unwrap())
        .collect()
}

fn unlock(conn: &Connection) {
    conn.execute_batch(
        "DROP TRIGGER ledger_no_update; DROP TRIGGER ledger_no_delete; DROP TRIGGER ledger_append_only;",
    )
    .unwrap();
}

/// The append trigger again (of schema 5), after [`unlock`].
fn lock(conn: &Connection) {
    let (_, trigger) = RESUME_SCHEMA
        .split_once("DROP TRIGGER ledger_append_only;")
        .unwrap();
    conn.execute_batch(trigger).unwrap();
}

fn problem_seqs(v: &LedgerVerification) -> Vec<i64> {
    let mut seqs: Vec<i64> = v.problems.iter().map(|p| p.seq).collect();
    seqs.dedup();
    seqs
}

#[test]
fn appended_rows_chain_and_verify() {
    let conn = db();
    assert_eq!(
        verify(&conn).unwrap(),
        LedgerVerification {
            ok: true,
            rows: 0,
            problems: vec![],
            head_seq: 0,
            head_hash: GENESIS.into(),
            anchor_problem: None,
        }
    );
    let events = five(&conn);
    assert_eq!(events[0].seq, 1);
    assert_eq!(events[0].prev_hash, GENESIS);
    assert_eq!(events[0].time, "2030-01-01T00:00:00.000Z");
    for pair in events.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert_eq!(pair[1].prev_hash, pair[0].hash);
        assert_eq!(pair[0].hash.len(), 64);
    }
    let v = verify(&conn).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.rows, 5);
    assert_eq!(v.head_hash, events[4].hash);
    assert!(verify_against(&conn, &head(5, &events[4].hash)).unwrap().ok);
    assert!(verify_against(&conn, &head(3, &events[2].hash)).unwrap().ok);
    assert!(
        verify_against(&conn, &ExpectedHead::parse(&events[2].hash))
            .unwrap()
            .ok
    );
    assert!(
        verify_against(&conn, &ExpectedHead::parse(GENESIS))
            .unwrap()
            .ok
    );
    // What is listed is what was appended.
    assert_eq!(list(&conn, &EventFilter::default()).unwrap(), events);
}

#[test]
fn list_filters() {
    let conn = db();
    let events = five(&conn);
    append(
        &conn,
        &state("db", None, VmState::Stopped, Cause::Operator, "defined"),
        0,
    )
    .unwrap();
    let seqs =
        |f: EventFilter| -> Vec<i64> { list(&conn, &f).unwrap().iter().map(|e| e.seq).collect() };
    assert_eq!(
        seqs(EventFilter {
            vm: Some("web".into()),
            ..Default::default()
        }),
        [1, 2, 3, 5]
    );
    assert_eq!(
        seqs(EventFilter {
            kind: Some(EventKind::Audit),
            ..Default::default()
        }),
        [4]
    );
    assert_eq!(
        seqs(EventFilter {
            since: Some(3),
            ..Default::default()
        }),
        [4, 5, 6]
    );
    // Newest rows, oldest first; after `since`, the first ones.
    assert_eq!(
        seqs(EventFilter {
            limit: Some(2),
            ..Default::default()
        }),
        [5, 6]
    );
    assert_eq!(
        seqs(EventFilter {
            since: Some(1),
            limit: Some(2),
            ..Default::default()
        }),
        [2, 3]
    );
    assert_eq!(
        seqs(EventFilter {
            vm: Some("web".into()),
            kind: Some(EventKind::State),
            since: Some(1),
            limit: Some(10)
        }),
        [2, 3, 5]
    );
    assert_eq!(state_events(&conn).unwrap().len(), 5);
    assert_eq!(events.len(), 5);
}

#[test]
fn triggers_refuse_update_delete_and_out_of_chain_inserts() {
    let conn = db();
    let events = five(&conn);
    let err = conn
        .execute(
            "UPDATE ledger SET detail = 'nothing happened' WHERE seq = 5",
            [],
        )
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = conn
        .execute("DELETE FROM ledger WHERE seq = 5", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = conn.execute("DELETE FROM ledger", []).unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    // A row that does not continue the chain.
    for (seq, prev) in [
        (3, events[1].hash.as_str()),
        (7, events[4].hash.as_str()),
        (6, GENESIS),
    ] {
        let err = conn
            .execute(
                &format!("INSERT INTO ledger ({COLUMNS}) VALUES (?1, 0, 'host', NULL, NULL, NULL, 'operator', 'x', 'y', ?2, 'z')"),
                params![seq, prev],
            )
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{seq}: {err}");
    }
    assert!(verify(&conn).unwrap().ok);
}

#[test]
fn an_edited_row_is_named() {
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute(
        "UPDATE ledger SET detail = 'guest powered off' WHERE seq = 5",
        [],
    )
    .unwrap();
    let v = verify(&conn).unwrap();
    assert!(!v.ok);
    assert_eq!(problem_seqs(&v), [5]);
    assert_eq!(
        v.problems[0].problem,
        "row 5 was edited: its content does not match its hash"
    );

    // Moving text from one field to another changes the hash too.
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute(
        "UPDATE ledger SET actor = 'uid:100', detail = '0' || detail WHERE seq = 2",
        [],
    )
    .unwrap();
    assert_eq!(problem_seqs(&verify(&conn).unwrap()), [2]);

    // A cause rewritten from vmm-crash to guest: the SLA would exclude the outage.
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute("UPDATE ledger SET cause = 'guest' WHERE seq = 5", [])
        .unwrap();
    assert_eq!(problem_seqs(&verify(&conn).unwrap()), [5]);
}

#[test]
fn an_edited_row_with_a_recomputed_hash_breaks_the_next_link() {
    let conn = db();
    five(&conn);
    unlock(&conn);
    let mut raw = RawRow {
        seq: 3,
        time_ms: 1_893_456_002_000,
        kind: "state".into(),
        vm: Some("web".into()),
        from: Some("starting".into()),
        to: Some("running".into()),
        cause: "operator".into(),
        actor: "uid:1000".into(),
        detail: "guest booted quickly".into(),
        prev_hash: list(&conn, &EventFilter::default()).unwrap()[1]
            .hash
            .clone(),
        hash: String::new(),
    };
    raw.hash = row_hash(&raw);
    conn.execute(
        "UPDATE ledger SET detail = ?1, hash = ?2 WHERE seq = 3",
        params![raw.detail, raw.hash],
    )
    .unwrap();
    let v = verify(&conn).unwrap();
    assert_eq!(problem_seqs(&v), [3], "{v:?}");
    assert!(
        v.problems[0].problem.starts_with("row 3 was rewritten"),
        "{v:?}"
    );
}

#[test]
fn a_deleted_row_is_named() {
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute("DELETE FROM ledger WHERE seq = 3", [])
        .unwrap();
    let v = verify(&conn).unwrap();
    assert!(!v.ok);
    assert_eq!(v.rows, 4);
    assert_eq!(problem_seqs(&v), [3]);
    assert_eq!(v.problems.len(), 1, "{v:?}");
    assert_eq!(v.problems[0].problem, "row 3 is missing: deleted");

    // The first rows.
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute("DELETE FROM ledger WHERE seq <= 2", [])
        .unwrap();
    let v = verify(&conn).unwrap();
    assert_eq!(problem_seqs(&v), [1]);
    assert_eq!(v.problems.len(), 1, "{v:?}");
    assert_eq!(v.problems[0].problem, "rows 1 to 2 are missing: deleted");

    // A middle row deleted and the rows after it renumbered down to close the gap.
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute("DELETE FROM ledger WHERE seq = 2", [])
        .unwrap();
    for seq in 3..=5 {
        conn.execute("UPDATE ledger SET seq = seq - 1 WHERE seq = ?1", [seq])
            .unwrap();
    }
    let v = verify(&conn).unwrap();
    assert_eq!(problem_seqs(&v), [2], "{v:?}");
    assert_eq!(
        v.problems[0].problem,
        "rows 2 to 4 are the original rows 3 to 5, renumbered because the original row 2 before them were deleted"
    );
}

#[test]
fn a_forged_row_inserted_in_the_middle_is_found() {
    let conn = db();
    let events = five(&conn);
    unlock(&conn);
    // Renumber rows 3.. up by one (from the top down, to keep seq unique) and put a
    // well-formed row, chained to row 2, in the hole.
    for seq in (3..=5).rev() {
        conn.execute("UPDATE ledger SET seq = seq + 1 WHERE seq = ?1", [seq])
            .unwrap();
    }
    let mut forged = RawRow {
        seq: 3,
        time_ms: events[1].time_ms + 500,
        kind: "state".into(),
        vm: Some("web".into()),
        from: Some("starting".into()),
        to: Some("stopped".into()),
        cause: "operator".into(),
        actor: "uid:0".into(),
        detail: "operator stopped it".into(),
        prev_hash: events[1].hash.clone(),
        hash: String::new(),
    };
    forged.hash = row_hash(&forged);
    conn.execute(
        &format!(
            "INSERT INTO ledger ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ),
        params![
            forged.seq,
            forged.time_ms,
            forged.kind,
            forged.vm,
            forged.from,
            forged.to,
            forged.cause,
            forged.actor,
            forged.detail,
            forged.prev_hash,
            forged.hash
        ],
    )
    .unwrap();
    let v = verify(&conn).unwrap();
    assert!(!v.ok);
    assert_eq!(v.rows, 6);
    // The forgery is named, and the rows moved to make room for it by their old numbers.
    assert_eq!(problem_seqs(&v), [3, 4], "{v:?}");
    assert_eq!(
        v.problems[0].problem,
        "row 3 was inserted: row 4 chains to the row before it"
    );
    assert_eq!(
        v.problems[1].problem,
        "rows 4 to 6 are the original rows 3 to 5, renumbered because 1 row(s) were inserted before them"
    );
}

#[test]
fn truncation_is_found_against_a_head_written_down_earlier() {
    let conn = db();
    let events = five(&conn);
    let head = verify(&conn).unwrap().head_hash;
    assert_eq!(head, events[4].hash);
    unlock(&conn);
    conn.execute("DELETE FROM ledger WHERE seq >= 4", [])
        .unwrap();
    // The chain alone looks fine...
    let v = verify(&conn).unwrap();
    assert!(v.ok);
    assert_eq!(v.head_hash, events[2].hash);
    // ...but the head written down with its number names the rows cut.
    let v = verify_against(&conn, &self::head(5, &head)).unwrap();
    assert!(!v.ok);
    assert_eq!(problem_seqs(&v), [4]);
    assert_eq!(
        v.problems[0].problem,
        "rows 4 to 5 were cut from the end: the anchor was row 5"
    );
    // A hash alone only says that it is gone.
    let v = verify_against(&conn, &ExpectedHead::parse(&head)).unwrap();
    assert!(!v.ok);
    assert!(v.problems[0].problem.contains(&head));

    // The numbers of the cut rows are not used again: the chain goes on from the cut head.
    set_resume(&conn, 5, &head).unwrap();
    lock(&conn);
    let next = append(
        &conn,
        &state(
            "web",
            None,
            VmState::Stopped,
            Cause::Operator,
            "after the cut",
        ),
        9,
    )
    .unwrap();
    assert_eq!((next.seq, next.prev_hash.as_str()), (6, head.as_str()));
    let v = verify(&conn).unwrap();
    assert_eq!(v.problems.len(), 1, "{v:?}");
    assert_eq!(v.problems[0].problem, "rows 4 to 5 are missing: deleted");
    // The trigger allows that gap and no other.
    let err = conn
        .execute(
            &format!("INSERT INTO ledger ({COLUMNS}) VALUES (9, 0, 'host', NULL, NULL, NULL, 'operator', 'x', 'y', ?1, 'h')"),
            [&next.hash],
        )
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    // Rows appended after the head written down are fine.
    let conn = db();
    let events = five(&conn);
    append(
        &conn,
        &state("web", None, VmState::Stopped, Cause::Operator, "x"),
        9,
    )
    .unwrap();
    assert!(
        verify_against(&conn, &self::head(5, &events[4].hash))
            .unwrap()
            .ok
    );
    assert!(
        !verify_against(&conn, &ExpectedHead::parse("not a hash"))
            .unwrap()
            .ok
    );
    // The anchored row rewritten (with every row after it): named by its number.
    let v = verify_against(&conn, &self::head(5, &"ab".repeat(32))).unwrap();
    assert_eq!(problem_seqs(&v), [5]);
    assert!(v.problems[0]
        .problem
        .starts_with("row 5 is not the row the anchor names"));
}

#[test]
fn unparsable_rows_are_problems_and_errors_not_panics() {
    let conn = db();
    five(&conn);
    unlock(&conn);
    conn.execute(
        "UPDATE ledger SET to_state = 'hibernating' WHERE seq = 3",
        [],
    )
    .unwrap();
    let v = verify(&conn).unwrap();
    assert_eq!(problem_seqs(&v), [3]);
    assert!(
        v.problems.iter().any(|p| p.problem.contains("hibernating")),
        "{v:?}"
    );
    let err = list(&conn, &EventFilter::default()).unwrap_err();
    assert!(matches!(err, Error::BadRow { seq: 3, .. }), "{err}");
    assert!(err.to_string().contains("row 3"), "{err}");
}

#[test]
fn wrongly_typed_columns_are_problems() {
    // A non-STRICT copy of the table, as someone editing the file could leave it.
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(&SCHEMA.replace(") STRICT;", ");"))
        .unwrap();
    five(&conn);
    unlock(&conn);
    conn.execute(
        "UPDATE ledger SET time_ms = 'yesterday', detail = X'FF00' WHERE seq = 2",
        [],
    )
    .unwrap();
    let v = verify(&conn).unwrap();
    assert_eq!(problem_seqs(&v), [2]);
    assert!(
        v.problems[0].problem.contains("time_ms holds text"),
        "{v:?}"
    );
    assert!(matches!(
        list(&conn, &EventFilter::default()),
        Err(Error::BadRow { seq: 2, .. })
    ));
    // The chain is checked past it.
    assert_eq!(v.rows, 5);
}

#[test]
fn a_state_row_needs_a_vm_and_a_state() {
    let conn = db();
    let mut e = state("web", None, VmState::Stopped, Cause::Operator, "defined");
    e.to = None;
    assert!(matches!(append(&conn, &e, 0), Err(Error::Invalid(_))));
    assert_eq!(verify(&conn).unwrap().rows, 0);
}

#[test]
fn far_future_and_out_of_range_times() {
    let conn = db();
    // 2100-01-01T00:00:00Z: 130 years of 365 days and 32 leap days (1972..=2096).
    let t2100 = (130 * 365 + 32) * 86_400 * 1000;
    let e = append(
        &conn,
        &state("web", None, VmState::Stopped, Cause::Operator, "x"),
        t2100,
    )
    .unwrap();
    assert_eq!(e.time, "2100-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(2_147_483_648_000), "2038-01-19T03:14:08.000Z");
    assert_eq!(
        rfc3339(t2100 + 59 * 86_400_000 + 1),
        "2100-03-01T00:00:00.001Z"
    );
    assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    // Times RFC 3339 cannot write are still recorded, never refused.
    for t in [-1, 253_402_300_800_000, i64::MAX, i64::MIN] {
        let e = append(
            &conn,
            &state("web", None, VmState::Stopped, Cause::Operator, "x"),
            t,
        )
        .unwrap();
        assert_eq!(e.time, format!("@{t}ms"));
    }
    assert!(verify(&conn).unwrap().ok);
    let listed = list(&conn, &EventFilter::default()).unwrap();
    assert_eq!(listed[0].time, "2100-01-01T00:00:00.000Z");
    assert_eq!(listed[4].time_ms, i64::MIN);
}

#[test]
fn works_inside_a_transaction_on_a_file() {
    let dir = std::env::temp_dir().join(format!("keel-ledger-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ledger.db");
    let _ = std::fs::remove_file(&path);
    {
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let tx = conn.transaction().unwrap();
        append(
            &tx,
            &state("web", None, VmState::Stopped, Cause::Operator, "a"),
            1,
        )
        .unwrap();
        tx.rollback().unwrap();
        let tx = conn.transaction().unwrap();
        append(
            &tx,
            &state("web", None, VmState::Stopped, Cause::Operator, "b"),
            2,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let conn = Connection::open(&path).unwrap();
    let events = list(&conn, &EventFilter::default()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].detail.as_str()), (1, "b"));
    assert!(verify(&conn).unwrap().ok);
    drop(conn);
    let _ = std::fs::remove_dir_all(&dir);
}
