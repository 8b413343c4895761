//! x
pub mod ledger;
pub mod sla;
