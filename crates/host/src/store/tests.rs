//! The store on real SQLite files: migrations, transactions, intents.

use super::*;

fn spec(name: &str) -> VmSpec {
    serde_json::from_str(&format!(r#"{{"name":"{name}","kernel":"/k"}}"#)).unwrap()
}

#[test]
fn migrates_once_and_keeps_data() {
    let dir = tempdir();
    let path = dir.join("keel.db");
    {
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.create_vm(&spec("a"), "uid:0").unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.vms().unwrap().len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempdir();
    let path = dir.join("keel.db");
    drop(Store::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(&path).err().unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_crash_is_a_ledger_row_and_an_incident() {
    let dir = tempdir();
    let mut store = Store::open(&dir.join("keel.db")).unwrap();
    store.create_vm(&spec("a"), "uid:0").unwrap();
    let running = store
        .transition(
            "a",
            &Transition {
                to: VmState::Running,
                pid: Some(42),
                cause: Cause::Operator,
                actor: "uid:0",
                detail: "started",
                time_ms: None,
            },
        )
        .unwrap();
    assert_eq!(running.from, Some(VmState::Stopped));
    assert_eq!(store.vm("a").unwrap().unwrap().pid, Some(42));
    let crash = store
        .transition(
            "a",
            &Transition {
                to: VmState::Crashed,
                pid: None,
                cause: Cause::VmmCrash,
                actor: "keel",
                detail: "VMM killed by signal 9",
                time_ms: None,
            },
        )
        .unwrap();
    let incidents = store.open_incidents().unwrap();
    assert_eq!(incidents.len(), 1);
    assert_eq!(incidents[0].event_seq, crash.seq);
    assert!(store.close_incident(incidents[0].id, "uid:0").unwrap());
    assert!(!store.close_incident(incidents[0].id, "uid:0").unwrap());
    assert!(store.open_incidents().unwrap().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_store_of_schema_1_migrates_to_the_current_schema_with_its_vms() {
    let dir = tempdir();
    let path = dir.join("keel.db");
    {
        // Schema 1 exactly as it shipped, with a VM in it.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(ledger::SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO vms (name, spec, state, pid, since_ms, reason) VALUES ('old', ?1, 'running', 77, 5, 'started')",
            [serde_json::to_string(&spec("old")).unwrap()],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let old = store.vm("old").unwrap().unwrap();
    assert_eq!(
        (old.state, old.pid, old.stop_intent),
        (VmState::Running, Some(77), None)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_store_of_schema_2_migrates_to_the_current_schema_with_its_stop_intents() {
    let dir = tempdir();
    let path = dir.join("keel.db");
    let intent = StopIntent {
        cause: Cause::Operator,
        actor: "uid:0".into(),
        detail: "rebooted by the operator".into(),
        restart: false,
        killed: false,
    };
    {
        // Schema 2 exactly as it shipped, with a VM whose stop was under way.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(ledger::SCHEMA).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        conn.execute(
            "INSERT INTO vms (name, spec, state, pid, since_ms, reason, stop_intent) VALUES ('old', ?1, 'running', 77, 5, 'started', ?2)",
            [
                serde_json::to_string(&spec("old")).unwrap(),
                serde_json::to_string(&intent).unwrap(),
            ],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
    let old = store.vm("old").unwrap().unwrap();
    assert_eq!(
        (old.state, old.pid, old.stop_intent, old.pending_start),
        (VmState::Running, Some(77), Some(intent), None)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_pending_start_is_recorded_with_the_end_and_lasts_until_the_next_change() {
    let dir = tempdir();
    let path = dir.join("keel.db");
    let mut store = Store::open(&path).unwrap();
    store.create_vm(&spec("a"), "uid:0").unwrap();
    let change = |to, detail| Transition {
        to,
        pid: None,
        cause: Cause::Operator,
        actor: "uid:7",
        detail,
        time_ms: None,
    };
    store
        .transition("a", &change(VmState::Running, "started"))
        .unwrap();
    let end = store
        .transition_then_start("a", &change(VmState::Stopped, "rebooted by the operator"))
        .unwrap();
    assert_eq!(
        (end.from, end.to, end.cause, end.actor.as_str()),
        (
            Some(VmState::Running),
            Some(VmState::Stopped),
            Cause::Operator,
            "uid:7"
        )
    );
    let owed = Some(PendingStart {
        cause: Cause::Operator,
        actor: "uid:7".into(),
    });
    let row = store.vm("a").unwrap().unwrap();
    assert_eq!((row.state, &row.pending_start), (VmState::Stopped, &owed));
    // A daemon killed now finds it when it opens the store again.
    drop(store);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.vm("a").unwrap().unwrap().pending_start, owed);
    // The start's first step settles it, and a plain end owes nothing.
    store
        .transition("a", &change(VmState::Starting, "starting"))
        .unwrap();
    assert_eq!(store.vm("a").unwrap().unwrap().pending_start, None);
    store
        .transition("a", &change(VmState::Stopped, "start failed"))
        .unwrap();
    assert_eq!(store.vm("a").unwrap().unwrap().pending_start, None);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stop_intent_lasts_while_the_vmm_does() {
    let dir = tempdir();
    let mut store = Store::open(&dir.join("keel.db")).unwrap();
    store.create_vm(&spec("a"), "uid:0").unwrap();
    let to = |state| Transition {
        to: state,
        pid: Some(9),
        cause: Cause::Operator,
        actor: "uid:0",
        detail: "",
        time_ms: None,
    };
    store.transition("a", &to(VmState::Running)).unwrap();
    let intent = StopIntent {
        cause: Cause::Operator,
        actor: "uid:0".into(),
        detail: "stopped by the operator".into(),
        restart: false,
        killed: true,
    };
    store.set_stop_intent("a", Some(&intent)).unwrap();
    store.transition("a", &to(VmState::ShuttingDown)).unwrap();
    assert_eq!(
        store.vm("a").unwrap().unwrap().stop_intent,
        Some(intent.clone())
    );
    store.transition("a", &to(VmState::Stopped)).unwrap();
    assert_eq!(store.vm("a").unwrap().unwrap().stop_intent, None);
    // A new VMM starts with nothing pending, whatever was left.
    store.set_stop_intent("a", Some(&intent)).unwrap();
    store.transition("a", &to(VmState::Running)).unwrap();
    assert_eq!(store.vm("a").unwrap().unwrap().stop_intent, None);
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keel-store-test-{}-{}",
        std::process::id(),
        now_ms() ^ (rand_u32() as i64)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u32
}

#[test]
fn jail_ids_are_stable_per_vm_never_shared_and_freed_with_the_vm() {
    let dir = tempdir();
    let mut store = Store::open(&dir.join("keel.db")).unwrap();
    let a = store.jail_id("a").unwrap();
    let b = store.jail_id("b").unwrap();
    assert_eq!(a, JAIL_IDS.start);
    assert_eq!(b, JAIL_IDS.start + 1);
    assert_eq!(store.jail_id("a").unwrap(), a, "stable across starts");
    store.delete_vm("a").unwrap();
    // The lowest free one is handed out again, never b's.
    assert_eq!(store.jail_id("c").unwrap(), a);
    assert_eq!(store.jail_id("d").unwrap(), b + 1);
    // Another daemon's VM runs with c's id: c moves above it, to a free one.
    assert_eq!(store.jail_id_after("c", a).unwrap(), b + 2);
    assert_eq!(store.jail_id("c").unwrap(), b + 2);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}
