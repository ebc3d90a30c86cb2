//! Supervising one command, tini-class: block signals before fork and collect them through a
//! signalfd ([`signals`]), start the child isolated ([`spawn`]), reap every descendant and end
//! the ones that outlive it ([`reap`]), copy its output ([`capture`]), take commands through a
//! FIFO ([`control`]), tie them together in one loop ([`supervise`]), notice OOM kills
//! ([`oom`]), and turn options into an outcome ([`run`]). Nothing here knows of tasks,
//! templates or stores; it may call only `crate::fsutil` and `crate::stdio`.

pub mod capture;
pub mod control;
pub mod oom;
pub mod reap;
pub mod run;
pub mod signals;
pub mod spawn;
pub mod supervise;
