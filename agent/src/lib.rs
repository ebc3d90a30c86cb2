//! emissary-agent as a library: what the `emissary-agent` binary wires together, and what the
//! fuzz targets (tests/fuzz) call directly.
#![deny(unsafe_code)]

pub mod argo;
pub mod attempts;
pub mod body;
pub mod cache;
pub mod commands;
pub mod config;
pub mod controller;
pub mod digest;
pub mod inject;
pub mod metrics;
pub mod outbox;
pub mod prepare;
pub mod serve;
pub mod server;
pub mod store;
pub mod token;
pub mod webhook;
