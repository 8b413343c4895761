//! x
pub mod ledger;
