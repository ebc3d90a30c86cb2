//! The HTTP contracts: emissary → node agent (`/v1/tasks/...`), agent → controller
//! (`/v1/events`, `/v1/nodes/{node}/commands`). Paths, bodies and the event model live here so
//! both sides, and the OpenAPI document, agree on one definition.
//!
//! Controller API (the agent is the client; `protocol/openapi.yaml` describes it):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/v1/events` | [`EventBatch`] | any 2xx acknowledges every event of the batch |
//! | GET | `/v1/nodes/{node}/commands?wait=30s` | | 200 [`NodeCommands`] (possibly empty) |
//! | POST | `/v1/nodes/{node}/heartbeat` | [`Heartbeat`] | 2xx |
//!
//! Emissary API (bearer token per task attempt; see the agent's `token` module):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/v1/tasks/{task}/{attempt}/start` | [`StartRequest`] | 200 `{}` |
//! | GET | `/v1/tasks/{task}/{attempt}/inputs/{name}?key=KEY` | | 200 the stored bytes (streamed), 404 |
//! | PUT | `/v1/tasks/{task}/{attempt}/outputs/{file}` | the artifact bytes (streamed) | 200 [`StoredArtifact`] |
//! | POST | `/v1/tasks/{task}/{attempt}/progress` | [`ProgressReport`] | 200 `{}` |
//! | POST | `/v1/tasks/{task}/{attempt}/result` | [`TaskResult`] | 200 `{}` once journaled |
//! | GET | `/v1/tasks/{task}/{attempt}/commands?wait=30s&container=NAME` | | 200 `[Command]` (each container gets each once), 204 nothing within `wait` |
//!
//! `{file}` is `{artifact name}.{extension}` (`tgz`, `tar.zst`, or the name alone for
//! `archive: none`). Names are 1-253 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.

use serde::{Deserialize, Serialize};

use crate::summary::{ExitReason, RunSummary, TaskError};

/// Prefix of every path of the emissary API.
pub const TASKS: &str = "/v1/tasks";
/// The largest JSON request body the agent reads (a result with its inline outputs): 413 past it.
pub const JSON_BODY_LIMIT: usize = 1 << 20;

/// Where an Argo pod exchanges its ServiceAccount token for a task token.
pub const ARGO_LOGIN_PATH: &str = "/v1/argo/login";

/// The answer to an Argo pod's login: a task token for it, and the task it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgoLogin {
    pub token: String,
    /// The pod's Argo node id: the task of the token's paths.
    pub task: String,
    pub attempt: u32,
    pub workflow: String,
    pub namespace: String,
    /// When the token expires, seconds since the epoch.
    pub expires: u64,
}

/// `/v1/tasks/{task}/{attempt}/{rest}`.
pub fn task_path(task: &str, attempt: u32, rest: &str) -> String {
    format!("{TASKS}/{task}/{attempt}/{rest}")
}

/// True for names that may appear as a path segment: task ids, artifact names, files.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// True for a progress report as the user process writes it: `N/M`, both decimal digits.
pub fn valid_progress(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    text.split_once('/')
        .is_some_and(|(n, m)| digits(n) && digits(m))
}

/// `POST .../start`: the command is about to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The container (`EMISSARY_CONTAINER_NAME`), `main` for a plain template.
    pub container: String,
    /// RFC 3339.
    pub started_at: String,
}

/// `POST .../progress`: the user process wrote a new `N/M` to its progress file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub container: String,
    pub progress: String,
}

/// Where an uploaded artifact landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    /// The store key, e.g. `artifacts/wf-1/task-a/0/out.tgz`.
    pub key: String,
    /// Bytes stored (after archiving and compression).
    pub size: u64,
    /// Hex SHA-256 of the stored bytes.
    pub sha256: String,
}

/// How an output artifact was packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveFormat {
    /// A single file, stored as is.
    None,
    /// tar + gzip (Argo's default; `.tgz`).
    Tar,
    /// tar + zstd (`.tar.zst`).
    Zstd,
}

impl ArchiveFormat {
    /// The file extension the store key ends with (empty for `none`).
    pub fn extension(self) -> &'static str {
        match self {
            ArchiveFormat::None => "",
            ArchiveFormat::Tar => "tgz",
            ArchiveFormat::Zstd => "tar.zst",
        }
    }
}

/// One collected output artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactOutput {
    pub name: String,
    #[serde(flatten)]
    pub stored: StoredArtifact,
    pub archive: ArchiveFormat,
}

/// One collected output parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterOutput {
    pub name: String,
    pub value: String,
}

/// What a task produced, collected on success and on failure alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outputs {
    #[serde(default)]
    pub parameters: Vec<ParameterOutput>,
    /// `outputs.result`: captured stdout, one trailing newline removed, the last 256 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// True when `result` is only the tail of a longer stdout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_truncated: bool,
    #[serde(default)]
    pub artifacts: Vec<ArtifactOutput>,
    /// The last `N/M` the user process reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}

/// `POST .../result`, and standalone `DIR/outputs.json`: how the task ended and what it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub container: String,
    pub exit_code: i32,
    pub reason: ExitReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    pub outputs: Outputs,
    /// Hex SHA-256 over the resolved spec and the input artifacts' digests (for memoization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_digest: Option<String>,
    /// Timing and resource usage of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<RunSummary>,
}

/// A command relayed from the controller to one task attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Command {
    /// Stop the task: SIGTERM to its group, SIGKILL after the grace period.
    Terminate,
    /// Deliver one signal to the task's process group.
    Signal { signal: i32 },
}

// ---- agent → controller ----------------------------------------------------------------------

/// Task phases (Flyte's): where an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Aborted,
    RetryableFailure,
}

impl Phase {
    /// The final phase of an attempt from how its command ended.
    pub fn of_result(result: &TaskResult) -> Phase {
        match result.reason {
            ExitReason::Completed if result.error.is_none() => Phase::Succeeded,
            ExitReason::DeadlineExceeded => Phase::TimedOut,
            _ if result.error.as_ref().is_some_and(|e| e.retryable) => Phase::RetryableFailure,
            _ => Phase::Failed,
        }
    }
}

/// A value carried inline, or a reference to where the agent offloaded it (values above the
/// agent's `--inline-limit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    Inline(String),
    Offloaded(StoredArtifact),
}

/// A parameter in an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventParameter {
    pub name: String,
    pub value: Value,
}

/// Outputs as events carry them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOutputs {
    #[serde(default)]
    pub parameters: Vec<EventParameter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_truncated: bool,
    #[serde(default)]
    pub artifacts: Vec<ArtifactOutput>,
}

/// Resource usage of an attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub duration_ms: u64,
    pub user_cpu_ms: u64,
    pub sys_cpu_ms: u64,
    pub max_rss_kb: u64,
}

/// One event about one task attempt. Delivered at least once, in `seq` order per
/// `(task_id, attempt)`; controllers deduplicate on `(workflow, task_id, attempt, seq)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The namespace of the workflow (from its token): workflow names are unique only within
    /// one. Empty in events an older agent journaled before this field existed.
    #[serde(default)]
    pub namespace: String,
    /// The workflow of the task (from its token): task ids need only be unique within one.
    /// Empty in events an older agent journaled before this field existed.
    #[serde(default)]
    pub workflow: String,
    pub task_id: String,
    pub attempt: u32,
    /// 1, 2, 3... per `(task_id, attempt)`.
    pub seq: u64,
    pub phase: Phase,
    /// RFC 3339.
    pub timestamp: String,
    /// The node whose agent emitted it.
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<EventOutputs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_digest: Option<String>,
}

/// `POST {controller}/v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub node: String,
    pub events: Vec<Event>,
}

/// A command for one task attempt, as the controller sends it to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCommand {
    /// The task's workflow; absent, the command is for the task id in any workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    pub task_id: String,
    pub attempt: u32,
    #[serde(flatten)]
    pub command: Command,
}

/// A task attempt, by identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    pub task_id: String,
    pub attempt: u32,
}

/// `POST {controller}/v1/nodes/{node}/heartbeat`, every 10 s: the agent is alive, and these
/// attempts are in touch with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    /// RFC 3339.
    pub timestamp: String,
    pub active: Vec<TaskRef>,
    /// Events journaled but not yet acknowledged.
    pub undelivered_bytes: u64,
}

/// `GET {controller}/v1/nodes/{node}/commands?wait=30s` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCommands {
    pub commands: Vec<NodeCommand>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_safe_path_segments() {
        for good in ["main", "out.tgz", "a_b-c.1", "wf-123-456"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "ü",
            "a\0",
            "a\n",
            &"x".repeat(254),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn progress_is_two_runs_of_digits() {
        for good in ["0/0", "3/10", "100/100"] {
            assert!(valid_progress(good), "{good}");
        }
        for bad in ["", "3", "3/", "/3", "+1/2", "1/2/3", "a/b", " 1/2", "1.5/2"] {
            assert!(!valid_progress(bad), "{bad:?}");
        }
    }

    #[test]
    fn commands_are_tagged_by_kind() {
        let json = serde_json::to_string(&Command::Signal { signal: 10 }).unwrap();
        assert_eq!(json, r#"{"kind":"signal","signal":10}"#);
        let parsed: Vec<Command> = serde_json::from_str(r#"[{"kind":"terminate"}]"#).unwrap();
        assert_eq!(parsed, [Command::Terminate]);
        let node: NodeCommand =
            serde_json::from_str(r#"{"task_id":"t","attempt":1,"kind":"signal","signal":2}"#)
                .unwrap();
        assert_eq!(node.command, Command::Signal { signal: 2 });
    }

    #[test]
    fn values_are_inline_or_offloaded() {
        let inline = serde_json::to_string(&Value::Inline("x".into())).unwrap();
        assert_eq!(inline, r#"{"inline":"x"}"#);
    }
}
