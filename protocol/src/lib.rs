//! Types shared by the emissary and its agent: the run summary, the HTTP contracts and event
//! model ([`api`]), durations and timestamps.
//!
//! Everything here is data and pure functions: no I/O, so both sides agree on the contract
//! without either pulling in the other's dependencies.
#![forbid(unsafe_code)]

pub mod api;
pub mod duration;
pub mod exit;
pub mod spec;
pub mod summary;
pub mod time;

pub use summary::{ErrorKind, ExitReason, RunSummary, TaskError};
