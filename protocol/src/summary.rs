//! The run summary (`emissary run --summary FILE`) and the reasons and error kinds it carries.

use serde::{Deserialize, Serialize};

/// Why the supervised command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// Exited with code 0.
    Completed,
    /// Exited with a non-zero code.
    Error,
    /// Killed by a signal it did not handle (see `signal`).
    Signaled,
    /// Stopped because its deadline expired.
    DeadlineExceeded,
    /// Never ran: not found, not executable, or the emissary could not prepare it.
    StartFailed,
    /// Killed by the kernel's OOM killer (a cgroup `oom_kill` counter rose while it ran).
    #[serde(rename = "OOMKilled")]
    OomKilled,
}

/// Whose fault a failure is (Flyte's split): the user's code or data, or the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    User,
    System,
}

/// A failure as a controller needs it to decide on a retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    pub kind: ErrorKind,
    pub retryable: bool,
    pub message: String,
}

impl TaskError {
    pub fn user(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            kind: ErrorKind::User,
            retryable,
            message: message.into(),
        }
    }

    pub fn system(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            kind: ErrorKind::System,
            retryable,
            message: message.into(),
        }
    }
}

/// What one `emissary run` did, written atomically as JSON when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The emissary's own exit code (see [`crate::exit`]).
    pub exit_code: i32,
    pub reason: ExitReason,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    /// RFC 3339, UTC, milliseconds.
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    /// CPU time and peak RSS of the whole reaped process tree (`getrusage(RUSAGE_CHILDREN)`).
    pub user_cpu_ms: u64,
    pub sys_cpu_ms: u64,
    pub max_rss_kb: u64,
    /// Bytes the command wrote to stdout and stderr (0 when output was not captured).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Present when the run failed, with who is at fault and whether a retry may help.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_use_the_documented_spelling() {
        let names: Vec<String> = [
            ExitReason::Completed,
            ExitReason::Error,
            ExitReason::Signaled,
            ExitReason::DeadlineExceeded,
            ExitReason::StartFailed,
            ExitReason::OomKilled,
        ]
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
        assert_eq!(
            names,
            [
                "\"Completed\"",
                "\"Error\"",
                "\"Signaled\"",
                "\"DeadlineExceeded\"",
                "\"StartFailed\"",
                "\"OOMKilled\""
            ]
        );
        assert_eq!(serde_json::to_string(&ErrorKind::User).unwrap(), "\"user\"");
    }
}
