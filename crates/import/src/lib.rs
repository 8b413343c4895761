//! Bringing VMs over from VMware: the `.vmx` file ([`vmx`]) and the OVF descriptor of an
//! `.ovf` or `.ova` export ([`ovf`], [`ova`]), read into a plan for a Keel VM (name, vCPUs,
//! memory, disks in controller order, NICs with their MACs) and the list of what cannot be
//! carried over, each with what to do ([`plan`]). The disks themselves are converted by
//! `disk::vmdk`.

pub mod ova;
pub mod ovf;
pub mod plan;
pub mod vmx;

pub use plan::{Plan, PlannedDisk, PlannedNic};
