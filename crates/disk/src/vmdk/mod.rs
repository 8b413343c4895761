//! VMware's VMDK, read to bring disks over from VMware: the sparse extent's header
//! ([`header`]), the text descriptor ([`descriptor`]), the conversion of a sparse extent
//! (monolithicSparse, streamOptimized) to a raw image ([`sparse`]) and of a whole disk of
//! one or several extents, sparse or flat ([`image`]). A VMDK is hostile input: parsing is pure and bounds-checked, and
//! every size is checked against the file before anything is allocated.

pub mod descriptor;
pub mod header;
pub mod image;
pub mod sparse;

pub use descriptor::{Descriptor, DescriptorError};
pub use header::{HeaderError, SparseHeader};
pub use image::{convert_file, convert_file_with, Disk, ImageError};
pub use sparse::{convert, Converted, Sink, Source, SparseError};
