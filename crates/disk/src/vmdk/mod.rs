//! VMware's VMDK, read to bring disks over from VMware: the sparse extent's header
//! ([`header`]) and the conversion of a sparse extent (monolithicSparse, streamOptimized) to a
//! raw image ([`sparse`]). A VMDK is hostile input: parsing is pure and bounds-checked, and
//! every size is checked against the file before anything is allocated.

pub mod header;
pub mod sparse;

pub use header::{HeaderError, SparseHeader};
pub use sparse::{convert, Converted, Sink, Source, SparseError};
