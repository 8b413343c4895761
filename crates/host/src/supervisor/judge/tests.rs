//! How a VMM's end is judged.

use super::*;

fn record(reason: ExitReason) -> ExitRecord {
    ExitRecord {
        reason,
        detail: "d".into(),
        time_ms: 1,
    }
}

fn operator() -> StopIntent {
    StopIntent {
        cause: Cause::Operator,
        actor: "uid:0".into(),
        detail: "stopped by the operator".into(),
        restart: false,
        killed: false,
    }
}

#[test]
fn ends_are_judged_by_record_and_intent() {
    let killed = ProcessEnd::Signalled(libc::SIGKILL);
    let ok = ProcessEnd::Exited(0);
    let r = |reason| Some(record(reason));
    assert_eq!(
        judge_end(1, ok, r(ExitReason::PowerOff).as_ref(), None).1,
        Cause::Guest
    );
    let (state, cause, ..) = judge_end(1, ok, r(ExitReason::Stopped).as_ref(), Some(operator()));
    assert_eq!((state, cause), (VmState::Stopped, Cause::Operator));
    // Killed by the daemon after Stop went unanswered: still the operator's stop.
    let (state, cause, ..) = judge_end(1, killed, None, Some(operator()));
    assert_eq!((state, cause), (VmState::Stopped, Cause::Operator));
    // A re-adopted VMM (no wait status) the daemon killed for a stop: the stop, too. Without
    // the daemon's kill it is a crash.
    let sent = StopIntent {
        killed: true,
        ..operator()
    };
    let (state, cause, ..) = judge_end(1, ProcessEnd::Unknown, None, Some(sent));
    assert_eq!((state, cause), (VmState::Stopped, Cause::Operator));
    let (state, ..) = judge_end(1, ProcessEnd::Unknown, None, Some(operator()));
    assert_eq!(state, VmState::Crashed);
    // Killed by someone else: a VMM crash, an incident.
    let (state, cause, _, detail, _) = judge_end(7, killed, None, None);
    assert_eq!((state, cause), (VmState::Crashed, Cause::VmmCrash));
    assert!(detail.contains("pid 7 killed by signal 9"), "{detail}");
    // Died on its own while a stop was pending: a crash, not a stop.
    let (state, ..) = judge_end(
        7,
        ProcessEnd::Signalled(libc::SIGSEGV),
        None,
        Some(operator()),
    );
    assert_eq!(state, VmState::Crashed);
    assert!(judge_end(1, ok, r(ExitReason::Reboot).as_ref(), None).4);
    // A guest reboot racing the operator's stop: stopped, not started again.
    let (state, cause, _, _, again) =
        judge_end(1, ok, r(ExitReason::Reboot).as_ref(), Some(operator()));
    assert_eq!(
        (state, cause, again),
        (VmState::Stopped, Cause::Operator, false)
    );
    let reboot = StopIntent {
        restart: true,
        ..operator()
    };
    assert!(judge_end(1, ok, r(ExitReason::Reboot).as_ref(), Some(reboot)).4);
    assert_eq!(
        judge_end(
            1,
            ProcessEnd::Exited(3),
            r(ExitReason::GuestCrash).as_ref(),
            None
        )
        .0,
        VmState::Crashed
    );
}

#[test]
fn a_kill_the_previous_daemon_sent_is_still_its_stop() {
    let row = |stop_intent| VmRow {
        spec: serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap(),
        state: VmState::Running,
        pid: Some(5),
        since_ms: 0,
        reason: String::new(),
        stop_intent,
        pending_start: None,
    };
    let killed = StopIntent {
        killed: true,
        ..operator()
    };
    // The daemon stored its intent and its SIGKILL, then died before recording the end.
    let (state, cause, ..) = judge_lost(&row(Some(killed)), None, false, false);
    assert_eq!((state, cause), (VmState::Stopped, Cause::Operator));
    // A stop was asked for but no kill sent: a VMM gone without a record crashed.
    let (state, cause, ..) = judge_lost(&row(Some(operator())), None, false, false);
    assert_eq!((state, cause), (VmState::Crashed, Cause::VmmCrash));
    let (state, cause, ..) = judge_lost(&row(None), None, true, false);
    assert_eq!((state, cause), (VmState::Crashed, Cause::HostBoot));
    // A VMM that never answered the restarted daemon was killed by it: said so, not "gone".
    let (state, cause, _, detail, _) = judge_lost(&row(None), None, false, true);
    assert_eq!((state, cause), (VmState::Crashed, Cause::VmmCrash));
    assert!(
        detail.contains("did not answer") && detail.contains("was killed"),
        "{detail}"
    );
    let (.., detail, _) = judge_lost(&row(None), None, false, false);
    assert!(detail.contains("was gone"), "{detail}");
}

#[test]
fn a_start_cut_off_by_a_daemon_restart_is_finished() {
    let row = VmRow {
        spec: serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap(),
        state: VmState::Starting,
        pid: None,
        since_ms: 0,
        reason: String::new(),
        stop_intent: None,
        pending_start: None,
    };
    let (state, cause, _, detail, again) = judge_lost(&row, None, false, false);
    assert_eq!(
        (state, cause, again),
        (VmState::Stopped, Cause::DaemonRestart, true)
    );
    assert!(detail.contains("starting it again"), "{detail}");
}
