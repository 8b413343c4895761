//! Holding a running VM still: pause and resume. The VMM stops the vCPUs and quiets the
//! devices; the ledger records the pause with who asked and the resume with how long the
//! guest stood still, as the VMM measured it on its monotonic clock.

use std::sync::Arc;

use api::control::{Request, Response};
use api::{Cause, VmState};

use super::{Error, Result, Supervisor};
use crate::store::Transition;
use crate::vmm_process;

impl Supervisor {
    /// Pauses a running VM; returns once the VMM holds it still.
    pub async fn pause(self: &Arc<Self>, name: &str, actor: &str) -> Result<()> {
        let _held = self.lock_for_request(name).await?;
        let row = self.running_row(name, "only a running VM can be paused")?;
        // The VMM first, the record after: a daemon that dies between the two finds the VMM
        // paused at its restart and records it then (recovery believes the VMM).
        let report = match self.ask_vmm(name, &Request::Pause).await? {
            Response::Paused(report) => report,
            other => return Err(unexpected(name, "pause", other)),
        };
        self.transition(
            name,
            Transition {
                to: VmState::Paused,
                pid: row.pid,
                cause: Cause::Operator,
                actor,
                detail: &format!(
                    "paused: vCPUs stopped in {} us, devices quiet {} us later",
                    report.vcpus_stopped_us, report.devices_settled_us
                ),
                time_ms: None,
            },
        )
    }

    /// Lets a paused VM run on.
    pub async fn resume(self: &Arc<Self>, name: &str, actor: &str) -> Result<()> {
        let _held = self.lock_for_request(name).await?;
        let row = self.get(name)?;
        if row.state != VmState::Paused {
            return Err(Error::WrongState {
                name: name.into(),
                state: row.state,
                hint: "only a paused VM can be resumed",
            });
        }
        let report = match self.ask_vmm(name, &Request::Resume).await? {
            Response::Resumed(report) => report,
            other => return Err(unexpected(name, "resume", other)),
        };
        self.transition(
            name,
            Transition {
                to: VmState::Running,
                pid: row.pid,
                cause: Cause::Operator,
                actor,
                detail: &format!(
                    "resumed after {:.3} s paused",
                    report.paused_us as f64 / 1e6
                ),
                time_ms: None,
            },
        )
    }

    /// One request to the VM's VMM; a VMM that refuses it says why.
    async fn ask_vmm(&self, name: &str, request: &Request) -> Result<Response> {
        match vmm_process::control(&self.run_dir(name), request).await? {
            Response::Error { message } => Err(Error::VmmRefused {
                name: name.into(),
                message,
            }),
            answer => Ok(answer),
        }
    }
}

fn unexpected(name: &str, what: &str, answer: Response) -> Error {
    Error::VmmRefused {
        name: name.into(),
        message: format!("the VMM answered {what} with {answer:?}"),
    }
}
