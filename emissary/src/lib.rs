//! The emissary: a tiny static supervisor for one workflow task.
//!
//! One module per concern, named after what it does to the process tree:
//! [`signals`] (block, collect, forward), [`spawn`] (fork/exec, isolation), [`reap`]
//! (subreaper, waitpid loop, TERM→KILL escalation), [`capture`] (stdout/stderr to files and
//! back out), [`control`] (the signal FIFO), [`supervise`] (the loop that ties them together),
//! and [`run`] (the `emissary run` command from options to exit code). Template mode adds
//! [`template`] (where the spec comes from), [`task`] (spec → inputs → run → outputs),
//! [`inputs`], [`outputs`], [`archive`] (with [`tar_guard`]), [`store`], [`deps`]
//! (containerSet ordering), [`oom`] and [`init`].

pub mod agent;
pub mod archive;
pub mod capture;
pub mod cli;
pub mod control;
pub mod deps;
pub mod fsutil;
pub mod http;
pub mod init;
pub mod inputs;
pub mod oom;
pub mod outputs;
pub mod reap;
pub mod run;
pub mod signals;
pub mod spawn;
pub mod stdio;
pub mod store;
pub mod supervise;
pub mod tar_guard;
pub mod task;
pub mod template;
pub mod version;
