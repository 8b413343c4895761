//! `keel serve`: the host daemon. VM definitions and their state in an embedded SQLite store,
//! one supervised `keel-vmm vmm` process per running VM (re-adopted after a daemon restart), the
//! REST API with its OpenAPI document, events, the hash-chained ledger and SLA reports.

pub mod anchor;
pub mod auth;
pub mod cloud_init;
pub mod console;
pub mod console_log;
pub mod evidence;
pub mod health;
pub mod host_key;
pub mod images;
pub mod jail_id;
pub mod ledger;
pub mod library;
pub mod listen;
pub mod metrics;
pub mod migration;
pub mod operations;
pub mod refusals;
pub mod rest;
pub mod server;
pub mod session;
pub mod sla;
pub mod store;
pub mod supervisor;
pub mod time;
pub mod tls;
pub mod ui;
pub mod vmm_process;

pub use server::{serve, ServeConfig};
