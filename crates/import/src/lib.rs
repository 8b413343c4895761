//! Bringing VMs over from VMware. Today: the `.vmx` file ([`vmx`]), read into a plan for a
//! Keel VM (name, vCPUs, memory, disks in controller order, NICs with their MACs) and the list
//! of what cannot be carried over, each with what to do. The disks themselves are converted by
//! `disk::vmdk`.

pub mod vmx;
