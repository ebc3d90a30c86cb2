//! The emissary: a tiny static supervisor for one workflow task.
//!
//! Layered in folders, arrows pointing down only:
//! - [`process`]: supervising one command as a good init does (signals, spawn, reaping,
//!   capture, deadlines); it knows nothing of tasks.
//! - [`transfer`]: bytes in and out (archives, the store, the node agent's HTTP API).
//! - [`task`]: the task contract over both (spec, inputs, the supervised run, outputs,
//!   containerSet ordering, `emissary init`).
//! - [`argo`]: Argo's executor command line, files and environment over `task`, when the
//!   binary runs as `argoexec`.
//!
//! [`cli`] parses the command line and dispatches; [`fsutil`], [`stdio`] and [`env_any`] are
//! shared by all.

pub mod argo;
pub mod cli;
pub mod fsutil;
pub mod process;
pub mod stdio;
pub mod task;
pub mod transfer;
pub mod version;

/// The first of `names` set to a non-empty value: our name, then Argo's, so a migrating
/// controller changes little.
pub fn env_any(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}
