//! The supervisor over a real store, with the daemon killed between two of its steps: a new
//! supervisor over the same store is the restarted daemon.

use api::control::{files, ExitReason, ExitRecord};

use super::*;
use crate::ledger;

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "keel-supervisor-{tag}-{}-{}",
        std::process::id(),
        crate::time::now_ms()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A daemon on `dir`'s store. Its VMM program is /bin/false: a start gets as far as the VMM,
/// which exits at once without an exit record, so the VM ends up stopped with why.
fn daemon(dir: &std::path::Path) -> Arc<Supervisor> {
    let store = Store::open(&dir.join("keel.db")).unwrap();
    Supervisor::new(
        dir.to_path_buf(),
        "/bin/false".into(),
        store,
        crate::supervisor::HostPolicy::unjailed(dir).unwrap(),
    )
}

/// The VM's state rows, oldest first: (to, cause, actor, detail).
fn state_rows(sup: &Supervisor, vm: &str) -> Vec<(VmState, Cause, String, String)> {
    sup.with_store(|s| ledger::state_events(s.connection()))
        .unwrap()
        .into_iter()
        .filter(|e| e.vm.as_deref() == Some(vm))
        .map(|e| (e.to.unwrap(), e.cause, e.actor, e.detail))
        .collect()
}

/// A reboot whose VMM ended and whose end was recorded, the daemon killed before it recorded
/// the new start: the restarted daemon starts the VM, with the reboot's cause and actor, once.
#[test]
fn a_reboot_cut_off_after_the_vmm_ended_is_finished_by_the_next_daemon() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pid = 4242;
    // (what rebooted, the daemon's intent, the VMM's exit record, cause, actor, the end's detail)
    let cases = [
        (
            "operator",
            Some(power_off_intent("uid:7", true)),
            ExitReason::Stopped,
            Cause::Operator,
            "uid:7",
            "rebooted by the operator",
        ),
        (
            "guest",
            None,
            ExitReason::Reboot,
            Cause::Guest,
            "guest",
            "the guest rebooted; starting it again",
        ),
    ];
    for (what, intent, reason, cause, actor, detail) in cases {
        let dir = tempdir(what);
        let first = daemon(&dir);
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "a",
            "kernel": dir.join("images/k").display().to_string(),
        }))
        .unwrap();
        first.create(&spec, "uid:7").unwrap();
        first
            .transition(
                "a",
                Transition {
                    to: VmState::Running,
                    pid: Some(pid),
                    cause: Cause::Operator,
                    actor: "uid:7",
                    detail: "started",
                    time_ms: None,
                },
            )
            .unwrap();
        // The VMM ends as the reboot asked: its exit record, then the daemon records the end
        // the way it does when its pidfd says so. The daemon is killed right after: the
        // runtime that would run the new start goes with it.
        let run_dir = first.run_dir("a");
        run_dir.prepare(&spec, None).unwrap();
        let record = ExitRecord {
            reason,
            detail: "d".into(),
            time_ms: crate::time::now_ms(),
        };
        api::control::write_atomically(
            &run_dir.file(files::EXIT_RECORD),
            &serde_json::to_vec(&record).unwrap(),
            0o600,
        )
        .unwrap();
        {
            let killed = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _inside = killed.enter();
            if let Some(intent) = intent {
                first.set_intent("a", intent);
            }
            first.record_end("a", pid, ProcessEnd::Exited(0)).unwrap();
        }
        let ended = (
            VmState::Stopped,
            cause,
            actor.to_string(),
            detail.to_string(),
        );
        assert_eq!(state_rows(&first, "a").last(), Some(&ended), "{what}");
        drop(first);

        // The restarted daemon finds the VM stopped with its start owed, and starts it.
        let second = daemon(&dir);
        assert_eq!(
            runtime.block_on(second.recover(false)).unwrap(),
            (0, 0),
            "{what}"
        );
        let rows = state_rows(&second, "a");
        let after_end: Vec<_> = rows
            .iter()
            .skip_while(|r| **r != ended)
            .skip(1)
            .map(|(to, cause, actor, _)| (*to, *cause, actor.as_str()))
            .collect();
        assert_eq!(
            after_end,
            [
                (VmState::Starting, cause, actor),
                // /bin/false is no VMM: the start itself fails, and says so.
                (VmState::Stopped, cause, actor),
            ],
            "{what}: {rows:#?}"
        );
        assert!(
            rows.last().unwrap().3.starts_with("start failed"),
            "{rows:#?}"
        );
        let host_rows = second
            .with_store(|s| {
                ledger::list(
                    s.connection(),
                    &ledger::EventFilter {
                        vm: Some("a".into()),
                        kind: Some(api::EventKind::Host),
                        ..Default::default()
                    },
                )
            })
            .unwrap();
        assert!(
            host_rows
                .iter()
                .any(|e| e.cause == Cause::DaemonRestart && e.detail.contains("cut off")),
            "{what}: {host_rows:#?}"
        );
        let row = second.get("a").unwrap();
        assert_eq!(row.pending_start, None, "{what}");
        drop(second);

        // The start was owed once: a third daemon starts nothing.
        let third = daemon(&dir);
        runtime.block_on(third.recover(false)).unwrap();
        assert_eq!(state_rows(&third, "a"), rows, "{what}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An operator's stop owes no start; a reboot's intent does.
#[test]
fn only_a_reboot_asks_for_a_new_start() {
    assert!(power_off_intent("uid:0", true).restart);
    assert!(!power_off_intent("uid:0", false).restart);
}
