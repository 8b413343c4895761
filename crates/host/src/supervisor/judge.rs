//! What the end of a VMM means for its VM: from the VMM's exit record, what the daemon had
//! asked of it, and (after a daemon restart) what the store remembers.

use api::control::{ExitReason, ExitRecord};
use api::{Cause, VmState};

use crate::store::{StopIntent, VmRow};
use crate::vmm_process::ProcessEnd;

/// What a VMM's end means: (new state, cause, actor, detail, start again?).
pub(super) type Judged = (VmState, Cause, String, String, bool);

/// What the previous daemon had asked of the VM's VMM: its stored intent, or for a store
/// from before intents were kept, a shutdown under way.
pub(super) fn pending_intent(row: &VmRow) -> Option<StopIntent> {
    row.stop_intent.clone().or_else(|| {
        (row.state == VmState::ShuttingDown).then(|| StopIntent {
            cause: Cause::Operator,
            actor: "keel".into(),
            detail: "shut down by the operator (power button)".into(),
            restart: false,
            killed: false,
        })
    })
}

/// What became of a VM whose VMM ended while no daemon watched it, or (`silenced`) that the
/// restarted daemon killed because it never answered on its control socket.
pub(super) fn judge_lost(
    row: &VmRow,
    record: Option<&ExitRecord>,
    host_booted: bool,
    silenced: bool,
) -> Judged {
    let pid = row.pid.unwrap_or(0);
    let keel = "keel".to_string();
    let intent = pending_intent(row);
    // With an exit record, or after the daemon's own SIGKILL (the stored intent says so), the
    // end is judged as the live daemon would have judged it.
    if record.is_some() || intent.as_ref().is_some_and(|i| i.killed) {
        return judge_end(pid, ProcessEnd::Unknown, record, intent);
    }
    if row.state == VmState::Starting && row.pid.is_none() {
        return (
            VmState::Stopped,
            Cause::DaemonRestart,
            keel,
            "the start was cut off by a daemon restart before its VMM ran; starting it again"
                .into(),
            true,
        );
    }
    if host_booted {
        return (
            VmState::Crashed,
            Cause::HostBoot,
            keel,
            format!("the host rebooted under VMM pid {pid}"),
            false,
        );
    }
    let detail = if silenced {
        format!("VMM pid {pid} did not answer on its control socket after the daemon restarted, and was killed (hung)")
    } else {
        format!("VMM pid {pid} was gone, without an exit record, when the daemon restarted")
    };
    (VmState::Crashed, Cause::VmmCrash, keel, detail, false)
}

/// What a VMM's end means, from its exit record and what the daemon intended.
pub(super) fn judge_end(
    pid: u32,
    end: ProcessEnd,
    record: Option<&ExitRecord>,
    intent: Option<StopIntent>,
) -> Judged {
    let keel = || "keel".to_string();
    // The daemon asked for this end (stop, reboot, or a shutdown that ran out of time): the
    // VMM said it stopped or powered off, or it was killed by the daemon's SIGKILL (the wait
    // status of a child shows it; for a re-adopted VMM only the intent knows).
    // A guest that rebooted while the operator's stop or shutdown was under way ends as the
    // operator asked: off (or, for the operator's reboot, started again), not restarted.
    let planned = match record.map(|r| r.reason) {
        Some(ExitReason::Stopped | ExitReason::PowerOff | ExitReason::Reboot) => true,
        None => {
            matches!(end, ProcessEnd::Signalled(libc::SIGKILL))
                || intent.as_ref().is_some_and(|i| i.killed)
        }
        _ => false,
    };
    if let (true, Some(intent)) = (planned, &intent) {
        return (
            VmState::Stopped,
            intent.cause,
            intent.actor.clone(),
            intent.detail.clone(),
            intent.restart,
        );
    }
    match (record.map(|r| r.reason), intent) {
        (Some(ExitReason::PowerOff), _) => (
            VmState::Stopped,
            Cause::Guest,
            "guest".into(),
            "the guest powered off".into(),
            false,
        ),
        (Some(ExitReason::Stopped), _) => (
            VmState::Stopped,
            Cause::Operator,
            "unknown".into(),
            "stopped through the VMM's control socket or SIGTERM, not by this daemon".into(),
            false,
        ),
        (Some(ExitReason::Reboot), _) => (
            VmState::Stopped,
            Cause::Guest,
            "guest".into(),
            "the guest rebooted; starting it again".into(),
            true,
        ),
        (Some(ExitReason::GuestCrash), _) => (
            VmState::Crashed,
            Cause::Guest,
            "guest".into(),
            record.map(|r| r.detail.clone()).unwrap_or_default(),
            false,
        ),
        (Some(ExitReason::Failed), _) => (
            VmState::Crashed,
            Cause::VmmCrash,
            keel(),
            record.map(|r| r.detail.clone()).unwrap_or_default(),
            false,
        ),
        (None, _) => (
            VmState::Crashed,
            Cause::VmmCrash,
            keel(),
            format!("VMM pid {pid} {end} without an exit record"),
            false,
        ),
    }
}

#[cfg(test)]
mod tests;
