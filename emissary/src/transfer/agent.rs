//! The node agent, from the emissary's side: the artifact store, the reports (start, progress,
//! result) and the commands (terminate, signal) of one task attempt.
//!
//! Configured by the injector's environment: `EMISSARY_AGENT_ADDR` (`IP:PORT`),
//! `EMISSARY_TOKEN`, `EMISSARY_TASK_ID`, `EMISSARY_ATTEMPT`. Every call retries with jittered
//! backoff while the agent is unreachable or answers 5xx, for at most `EMISSARY_AGENT_RETRY`
//! (default 60s): then the task fails with a system, retryable error, never a hang.

use std::ffi::c_char;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use protocol::api::{self, Command, ProgressReport, StartRequest, StoredArtifact, TaskResult};
use protocol::spec::Packing;

use crate::env_any;
use crate::transfer::archive;
use crate::transfer::http::{Client, HttpError};
use crate::transfer::store::{GetError, Input, Store};

/// The shortest time between two progress reports.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// `EMISSARY_TOKEN`, as [`take_token`] found it.
static TOKEN: OnceLock<String> = OnceLock::new();

/// Keeps `EMISSARY_TOKEN` for [`Agent::from_env`] and overwrites its value with zeros where
/// the kernel put it: /proc/PID/environ shows that block whatever the process does to its
/// `environ` later, and root, a debugger or a core dump can read it.
///
/// # Safety
/// `envp` is the environment `main` received (NULL-terminated, its strings writable), and no
/// other thread reads it meanwhile.
pub unsafe fn take_token(envp: *const *mut c_char) {
    const NAME: &[u8] = b"EMISSARY_TOKEN=";
    let mut entry = envp;
    // SAFETY: per the contract, every entry up to the NULL is a C string we may write.
    unsafe {
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::slice::from_raw_parts_mut((*entry).cast::<u8>(), libc::strlen(*entry));
            if text.starts_with(NAME) {
                let value = &mut text[NAME.len()..];
                let _ = TOKEN.set(String::from_utf8_lossy(value).into_owned());
                value.fill(0);
            }
            entry = entry.add(1);
        }
    }
}

pub struct Agent {
    client: Client,
    task: String,
    attempt: u32,
    retry_for: Duration,
    /// Inputs are asked for by name (an Argo pod's agent locates them from the pod's template).
    inputs_by_name: bool,
}

impl Agent {
    /// The agent named by the environment; `None` when there is none (standalone).
    pub fn from_env() -> Option<Result<Agent, String>> {
        let addr = env_any(&["EMISSARY_AGENT_ADDR"])?;
        Some((|| {
            // Taken out of the environment at start; read there when `main` was not ours.
            let token = TOKEN
                .get()
                .filter(|t| !t.is_empty())
                .cloned()
                .or_else(|| env_any(&["EMISSARY_TOKEN"]))
                .ok_or("EMISSARY_AGENT_ADDR is set but EMISSARY_TOKEN is not")?;
            let task = env_any(&["EMISSARY_TASK_ID"])
                .ok_or("EMISSARY_AGENT_ADDR is set but EMISSARY_TASK_ID is not")?;
            if !api::valid_name(&task) {
                return Err(format!(
                    "EMISSARY_TASK_ID {task:?} is not a name of [A-Za-z0-9._-]"
                ));
            }
            let attempt = match env_any(&["EMISSARY_ATTEMPT"]) {
                Some(text) => text
                    .parse()
                    .map_err(|_| format!("EMISSARY_ATTEMPT {text:?} is not a number"))?,
                None => 0,
            };
            let retry_for = Agent::retry_budget()?;
            Agent::new(&addr, &token, &task, attempt, retry_for, false)
        })())
    }

    /// The agent at `addr` (`HOST:PORT`), for task `task`/`attempt` with `token`.
    pub fn new(
        addr: &str,
        token: &str,
        task: &str,
        attempt: u32,
        retry_for: Duration,
        inputs_by_name: bool,
    ) -> Result<Agent, String> {
        // The token is in our memory: make /proc/self/environ and /proc/self/mem unreadable to
        // the command (same uid) and refuse ptrace. exec gives the command a dumpable state.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        Ok(Agent {
            client: Client::new(addr, token)?,
            task: task.to_owned(),
            attempt,
            retry_for,
            inputs_by_name,
        })
    }

    /// How long calls are retried while the agent is unreachable: `EMISSARY_AGENT_RETRY`, 60 s
    /// by default.
    pub fn retry_budget() -> Result<Duration, String> {
        match env_any(&["EMISSARY_AGENT_RETRY"]) {
            Some(text) => {
                protocol::duration::parse(&text).map_err(|e| format!("EMISSARY_AGENT_RETRY: {e}"))
            }
            None => Ok(Duration::from_secs(60)),
        }
    }

    fn path(&self, rest: &str) -> String {
        api::task_path(&self.task, self.attempt, rest)
    }

    /// Runs `call` until it succeeds, fails for good, or the retry budget is spent.
    fn retry<T>(
        &self,
        what: &str,
        mut call: impl FnMut() -> Result<T, HttpError>,
    ) -> Result<T, String> {
        let until = Instant::now() + self.retry_for;
        let mut wait = Duration::from_millis(100);
        loop {
            match call() {
                Ok(value) => return Ok(value),
                Err(e) if e.retryable() && Instant::now() + wait < until => {
                    crate::note!("emissary: {what}: {e}; retrying");
                    std::thread::sleep(wait.mul_f64(0.5 + jitter() / 2.0));
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) if e.retryable() => {
                    return Err(format!("{what}: the agent is unreachable: {e}"));
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
    }

    pub fn start(&self, container: &str) -> Result<(), String> {
        let body = StartRequest {
            container: container.to_owned(),
            started_at: protocol::time::format_rfc3339(std::time::SystemTime::now()),
        };
        self.retry("reporting the start", || {
            self.client.post_json(&self.path("start"), &body)
        })
        .map(drop)
    }

    pub fn result(&self, result: &TaskResult) -> Result<(), String> {
        self.retry("reporting the result", || {
            match self.client.post_json(&self.path("result"), result) {
                // The attempt's result is recorded: a retry whose first answer was lost.
                Err(e) if e.status == Some(409) => Ok(Vec::new()),
                other => other,
            }
        })
        .map(drop)
    }

    /// Whether the agent knows this task's pod (an Argo pod's token is bound to it), so that it
    /// can say how the pod's containers ended.
    pub fn knows_the_pod(&self) -> bool {
        self.inputs_by_name
    }

    /// How sibling `container` of this pod ended, as its kubelet reports it through the agent,
    /// waiting up to `wait`: `Ok(None)` while it runs.
    pub fn container_exit(&self, container: &str, wait: Duration) -> Result<Option<i32>, String> {
        let path = self.path(&format!(
            "containers/{container}?wait={}ms",
            wait.as_millis()
        ));
        let response = self.retry("asking how a container ended", || {
            let response = self
                .client
                .send("GET", &path, None, wait + Duration::from_secs(30))?;
            match response.status {
                200 | 204 => Ok(response),
                _ => Err(response.into_error()),
            }
        })?;
        if response.status == 204 {
            return Ok(None);
        }
        let body = response.into_success().map_err(|e| e.to_string())?;
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("bad answer: {e}"))?;
        answer["exit_code"]
            .as_i64()
            .map(|code| Some(code as i32))
            .ok_or_else(|| "bad answer: no exit_code".to_owned())
    }

    /// Relays the agent's commands for this task into `control`, the supervisor's control
    /// FIFO, as lines like those of `emissary signal` (a thread; it ends with the process).
    pub fn relay_commands(&self, container: &str, control: File) {
        let path = self.path(&format!(
            "commands?wait=30s&container={}",
            percent_encode(container)
        ));
        let client = self.client.clone();
        let spawned = std::thread::Builder::new().name("commands".into()).stack_size(64 * 1024).spawn(move || {
            let mut wait = Duration::from_millis(100);
            loop {
                match client.send("GET", &path, None, Duration::from_secs(45)).and_then(read_commands) {
                    Ok(commands) => {
                        wait = Duration::from_millis(100);
                        let lines: String = commands
                            .iter()
                            .map(|c| match c {
                                Command::Terminate => "terminate\n".to_owned(),
                                Command::Signal { signal } => format!("{signal}\n"),
                            })
                            .collect();
                        if !lines.is_empty()
                            && let Err(e) = (&control).write_all(lines.as_bytes())
                        {
                            crate::note!("emissary: delivering a command: {e}");
                        }
                    }
                    Err(e) if e.retryable() => {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        crate::note!("emissary: the agent refused the command poll ({e}); commands will not reach this task");
                        return;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            crate::note!("emissary: cannot start the command relay: {e}");
        }
    }

    /// Reports `N/M` progress written to `file`, as it changes (a thread, woken by inotify).
    pub fn relay_progress(&self, container: &str, file: PathBuf) {
        let (client, path, container) = (
            self.client.clone(),
            self.path("progress"),
            container.to_owned(),
        );
        let _ = std::thread::Builder::new()
            .name("progress".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
                let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
                    return;
                };
                let Ok(inotify) = Inotify::init(InitFlags::IN_CLOEXEC) else {
                    return;
                };
                if inotify
                    .add_watch(
                        dir,
                        AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
                    )
                    .is_err()
                {
                    return;
                }
                let mut last = None;
                let mut reported: Option<Instant> = None;
                loop {
                    let Ok(events) = inotify.read_events() else {
                        return;
                    };
                    // An overflowed queue may have dropped our file's event: look anyway.
                    if !events.iter().any(|e| {
                        e.name.as_deref() == Some(name)
                            || e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                    }) {
                        continue;
                    }
                    // At most one report per interval: a tight loop writing its progress
                    // must not become a flood of events. What it wrote meanwhile is read
                    // after the pause, so the latest value is the one reported.
                    if let Some(at) = reported {
                        std::thread::sleep(PROGRESS_INTERVAL.saturating_sub(at.elapsed()));
                    }
                    let progress = crate::fsutil::last_progress(&file);
                    if progress.is_some() && progress != last {
                        let report = ProgressReport {
                            container: container.clone(),
                            progress: progress.clone().unwrap_or_default(),
                        };
                        let _ = client.post_json(&path, &report);
                        reported = Some(Instant::now());
                        last = progress;
                    }
                }
            });
    }
}

fn read_commands(response: crate::transfer::http::Response) -> Result<Vec<Command>, HttpError> {
    if response.status == 204 {
        return Ok(Vec::new());
    }
    let body = response.into_success()?;
    serde_json::from_slice(&body).map_err(|e| HttpError {
        status: None,
        message: format!("bad commands answer: {e}"),
    })
}

impl Agent {
    /// Streams `inputs/{rest}` (a name, and for ours the key).
    fn fetch_input(&self, rest: &str) -> Result<Option<Input<'_>>, GetError> {
        let path = self.path(&format!("inputs/{rest}"));
        let response = self
            .retry("fetching an input", || {
                let response = self
                    .client
                    .send("GET", &path, None, Duration::from_secs(300))?;
                match response.status {
                    200..=299 | 400 | 403 | 404 => Ok(response),
                    _ => Err(response.into_error()),
                }
            })
            .map_err(GetError::Failed)?;
        match response.status {
            404 => Ok(None),
            // A key the spec may not read (403) is the spec's fault, like a malformed one.
            400 | 403 => Err(GetError::BadKey(response.into_error().to_string())),
            _ => Ok(Some(Input {
                directory: response.directory,
                bytes: Box::new(response.into_reader()),
            })),
        }
    }
}

impl Store for Agent {
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + '_>>, GetError> {
        let input = self.fetch_input(&format!("input?key={}", percent_encode(key)))?;
        Ok(input.map(|i| i.bytes))
    }

    fn get_input(
        &self,
        artifact: &protocol::spec::InputArtifact,
    ) -> Result<Option<Input<'_>>, GetError> {
        match artifact.store_key() {
            _ if self.inputs_by_name => self.fetch_input(&percent_encode(&artifact.name)),
            Some(key) => Ok(self.get(key)?.map(Input::object)),
            None => Ok(None),
        }
    }

    fn put(&self, file: &str, source: &Path, packing: Packing) -> Result<StoredArtifact, String> {
        let path = self.path(&format!("outputs/{file}"));
        // A broken upload (agent restarted mid-way) is packed and sent again from the start:
        // the agent only makes an object visible once it is complete.
        let body = self.retry("uploading an output", || {
            // Large chunks: one chunk header and one write per 256 KiB, not per 8 KiB copy.
            let mut upload =
                std::io::BufWriter::with_capacity(super::CHUNK, self.client.put_stream(&path)?);
            let packed = match packing.format {
                // Straight from the page cache to the socket.
                api::ArchiveFormat::None => archive::open_unarchived(source)
                    .and_then(|file| upload.get_mut().send_file(&file)),
                _ => archive::pack_unhashed(source, packing, &mut upload),
            };
            if let Err(e) = packed {
                let (upload, _) = upload.into_parts();
                if !upload.broken() {
                    // Reading the output failed: the step's fault, not worth a retry.
                    return Err(HttpError {
                        status: Some(400),
                        message: format!("packing {}: {e}", source.display()),
                    });
                }
                // A refusal (an expired token, a bad name) breaks the body off: say why, and do
                // not retry what will be refused again. Anything else is the connection's.
                return Err(upload.refusal().unwrap_or_else(|| HttpError {
                    status: None,
                    message: format!("sending {}: {e}", source.display()),
                }));
            }
            let upload = upload.into_inner().map_err(|e| HttpError {
                status: None,
                message: e.to_string(),
            })?;
            upload.finish()
        })?;
        serde_json::from_slice(&body).map_err(|e| format!("the agent's answer to the upload: {e}"))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A number in [0, 1) from the clock's low bits: enough to spread retries apart.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}
