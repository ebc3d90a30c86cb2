//! Exit codes of `emissary run`.
//!
//! The user's own code passes through; the emissary adds only the codes that docker, podman and
//! GNU `timeout` already made familiar. (argoexec uses 64 for its own failures; we do not.)

/// The deadline (`--deadline`, `activeDeadlineSeconds`) expired and the command was stopped.
pub const DEADLINE_EXCEEDED: i32 = 124;
/// The emissary itself failed: bad flag, bad spec, outputs that could not be written.
pub const EMISSARY_FAILED: i32 = 125;
/// The command was found but could not be executed (permissions, not a file).
pub const NOT_EXECUTABLE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;
/// A command killed by signal N exits with `SIGNALED_BASE + N`.
pub const SIGNALED_BASE: i32 = 128;

/// The exit code a shell would report for a process killed by `signal`.
pub fn for_signal(signal: i32) -> i32 {
    SIGNALED_BASE + signal
}
