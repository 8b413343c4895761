//! Why a VM ended, and the one place the first reason is recorded.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// What a vCPU saw when the guest died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    pub vcpu: u32,
    /// "triple fault", "KVM emulation failure", ...
    pub kind: String,
    pub rip: Option<u64>,
    /// The bytes at RIP, when they could be read.
    pub instruction: Vec<u8>,
    pub detail: Option<String>,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "guest crashed: {} on vCPU {}", self.kind, self.vcpu)?;
        if let Some(rip) = self.rip {
            write!(f, " at RIP {rip:#x}")?;
        }
        if self.instruction.is_empty() {
            write!(f, " (instruction bytes unreadable)")?;
        } else {
            let hex: Vec<String> = self
                .instruction
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            write!(f, " (instruction bytes: {})", hex.join(" "))?;
        }
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        Ok(())
    }
}

/// Who stopped the VM from outside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopBy {
    /// A `stop` request on the control socket.
    ControlSocket,
    /// A signal asking the process to end (SIGTERM, SIGINT).
    Signal(&'static str),
}

impl fmt::Display for StopBy {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            StopBy::ControlSocket => write!(f, "through the control socket"),
            StopBy::Signal(name) => write!(f, "by {name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest rebooted (i8042 reset, ACPI reset register). Keel ends the VM.
    Reboot,
    /// The user typed the console escape (Ctrl-A x).
    ConsoleQuit,
    /// Stopped from outside: a `stop` request on the control socket, or SIGTERM.
    Stopped(StopBy),
    /// The guest crashed: triple fault, emulation failure, failed entry.
    Crash(CrashReport),
    /// A vCPU could not be set up or KVM failed under it.
    Failed(String),
    /// The guest was handed to a new VMM (an upgrade): this one ends, the VM runs on.
    HandedOver,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reboot => write!(f, "guest rebooted; the VM ends here"),
            VmExit::ConsoleQuit => write!(f, "quit from the console (Ctrl-A x)"),
            VmExit::Stopped(by) => write!(f, "stopped {by}"),
            VmExit::Crash(report) => report.fmt(f),
            VmExit::Failed(why) => write!(f, "VM failed: {why}"),
            VmExit::HandedOver => write!(f, "the guest was handed to a new VMM"),
        }
    }
}

/// The first reason to end the VM wins; the event wakes the main loop.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    pub event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn report(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
            // If the write fails the counter is already non-zero: the loop wakes anyway.
            let _ = self.event.write(1);
        }
    }

    /// Whether a reason was reported (without taking it).
    pub fn is_reported(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub fn take(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        s.report(VmExit::PowerOff);
        s.report(VmExit::Reboot);
        assert_eq!(s.event.read().unwrap(), 1);
        assert_eq!(s.take(), Some(VmExit::PowerOff));
    }

    #[test]
    fn crash_report_names_vcpu_rip_and_bytes() {
        let r = CrashReport {
            vcpu: 2,
            kind: "triple fault".into(),
            rip: Some(0x100123),
            instruction: vec![0x0f, 0x0b],
            detail: None,
        };
        assert_eq!(
            r.to_string(),
            "guest crashed: triple fault on vCPU 2 at RIP 0x100123 (instruction bytes: 0f 0b)"
        );
    }
}
