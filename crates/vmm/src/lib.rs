//! Keel's VMM: one VM in one process. Builds the KVM VM (memory, irqchip, vCPUs, legacy
//! devices), loads the kernel, runs one thread per vCPU and one event-loop thread for the
//! devices, the console and the control loop, and returns why the VM ended. Two front ends:
//! [`run`] (`keel run`, console on the terminal) and [`service::run`] (`keel vmm`, console
//! and control sockets in a run directory, for the host daemon).

pub mod config;
pub mod console;
mod console_socket;
mod control;
mod control_socket;
mod disk_boot;
mod exit;
pub mod handover;
pub mod host;
pub mod host_files;
pub mod jailing;
pub mod loader;
mod memory;
mod pause;
pub mod service;
mod signals;
pub mod snapshot;
pub mod test_hooks;
mod vcpu;
mod virtio_devices;
mod vm;

pub use config::VmConfig;
pub use console_socket::DEFAULT_CONSOLE_LOG_MAX;
pub use exit::{CrashReport, StopBy, VmExit};
pub use host_files::HostFiles;
pub use vm::run;

/// Why a VM could not be started or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Boot(#[from] arch::Error),
    #[error(transparent)]
    Console(#[from] console::Error),
    #[error(transparent)]
    Devices(#[from] virtio_devices::Error),
    #[error(transparent)]
    HostFiles(#[from] host_files::Error),
    #[error(transparent)]
    Seccomp(#[from] jail::seccomp::Error),
    #[error(transparent)]
    Jail(#[from] jail::Error),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {reason}")]
    EventLoop { what: &'static str, reason: String },
    #[error("restoring the snapshot failed: {0}")]
    Restore(String),
    /// A handover that did not happen: the old VMM keeps the guest, this one ran nothing.
    #[error("taking the guest over failed: {0}; the old VMM keeps it")]
    TakeoverAborted(String),
    #[error("setting up vCPU {vcpu} failed: {message}")]
    VcpuSetup { vcpu: u32, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;
