//! Per-attempt state: what one task attempt holds of its node's agent, and whether its token
//! is spent.
//!
//! - **Spent tokens.** Once an attempt's result is recorded, every later request with its
//!   token is refused (409): a leaked token can neither rewrite the outputs whose digests the
//!   controller now holds nor post a second result. Spent attempts are kept in
//!   `DATA_DIR/closed`, one `EXP ID` line each, appended and fsynced before the result is
//!   answered, until their token would have expired anyway; a restart forgets none.
//! - **Quotas.** Concurrent requests and uploads, uploaded bytes and objects, distinct
//!   containers: over one, 429 (413 for bytes) says which, and the node's other attempts are
//!   untouched. Counters live as long as the attempt's token.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;

use crate::config::Quotas;
use crate::token::Claims;

/// Requests of one attempt at once (a containerSet's containers each hold a commands poll).
const REQUESTS: u32 = 64;
/// Uploads of one attempt at once: each holds up to 3 of the 16 units of the S3 part budget.
pub const UPLOADS: u32 = 2;
/// Distinct containers one attempt may name (a pod has far fewer).
const CONTAINERS: usize = 64;
/// The shortest time between two progress reports of an Argo pod (the emissary sends one a
/// second at most): each is a write to the Kubernetes API. (Ours become events, bounded by the
/// attempt's journal quota.)
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A refusal: status and reason.
#[derive(Debug)]
pub struct Denied(pub StatusCode, pub String);

pub struct Attempts {
    state: Mutex<State>,
    file: Mutex<File>,
    path: PathBuf,
    quotas: Quotas,
}

#[derive(Default)]
struct State {
    /// Spent attempts and when their tokens expire.
    closed: HashMap<String, u64>,
    /// Results being recorded: a second one at the same time is refused, not raced.
    closing: HashSet<String>,
    /// Each admitted request holds its attempt's usage itself: no lookup after admission.
    live: HashMap<String, Arc<Mutex<Usage>>>,
}

#[derive(Default)]
struct Usage {
    exp: u64,
    requests: u32,
    uploads: u32,
    output_bytes: u64,
    outputs: u64,
    containers: HashSet<String>,
    last_progress: Option<std::time::Instant>,
}

impl Attempts {
    /// Opens `DATA_DIR/closed`, forgetting attempts whose tokens have expired.
    pub fn open(data_dir: &Path, quotas: Quotas) -> io::Result<Arc<Attempts>> {
        let path = data_dir.join("closed");
        let now = crate::token::now();
        let mut closed = HashMap::new();
        match fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    // A torn last line (a crash mid-append) parses as nothing: its result was
                    // not answered, so the emissary posts it again.
                    let Some((exp, id)) = line.split_once(' ') else {
                        continue;
                    };
                    if let Ok(exp) = exp.parse::<u64>()
                        && exp > now
                    {
                        closed.insert(id.to_owned(), exp);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Compacted: only the live entries, written whole before appends resume.
        let text: String = closed
            .iter()
            .map(|(id, exp)| format!("{exp} {id}\n"))
            .collect();
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Arc::new(Attempts {
            state: Mutex::new(State {
                closed,
                ..State::default()
            }),
            file: Mutex::new(file),
            path,
            quotas,
        }))
    }

    /// Admits one request of `claims`' attempt; the guard counts it until dropped. A spent
    /// token is refused unless `after_result`: a read that stays useful once the result is in
    /// (a sidecar asking whether `main` has ended).
    pub fn enter(self: &Arc<Self>, claims: &Claims, after_result: bool) -> Result<Entered, Denied> {
        let id = claims.attempt_id();
        let mut state = self.state.lock().unwrap();
        if state.closed.contains_key(&id) && !after_result {
            return Err(Denied(
                StatusCode::CONFLICT,
                format!(
                    "task {}/{} has reported its result: its token is spent",
                    claims.task, claims.attempt
                ),
            ));
        }
        let usage = match state.live.get(&id) {
            Some(usage) => usage.clone(),
            None => {
                // The map grows only here, so expired attempts are forgotten here.
                let now = crate::token::now();
                state
                    .live
                    .retain(|_, u| Arc::strong_count(u) > 1 || u.lock().unwrap().exp > now);
                state.closed.retain(|_, exp| *exp > now);
                let usage = Arc::new(Mutex::new(Usage::default()));
                state.live.insert(id.clone(), usage.clone());
                usage
            }
        };
        drop(state);
        {
            let mut usage = usage.lock().unwrap();
            usage.exp = usage.exp.max(claims.exp);
            if usage.requests >= REQUESTS {
                return Err(Denied(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this task attempt already has {REQUESTS} requests in progress"),
                ));
            }
            usage.requests += 1;
        }
        Ok(Entered {
            attempts: self.clone(),
            usage,
            id,
            upload: false,
        })
    }
}

/// One admitted request.
pub struct Entered {
    attempts: Arc<Attempts>,
    usage: Arc<Mutex<Usage>>,
    id: String,
    upload: bool,
}

impl Entered {
    fn with<T>(&self, f: impl FnOnce(&mut Usage) -> T) -> T {
        f(&mut self.usage.lock().unwrap())
    }

    /// Admits `container`: an attempt names a bounded number of them (each keeps state here
    /// and in the command log).
    pub fn container(&self, container: &str) -> Result<(), Denied> {
        self.with(|usage| {
            if usage.containers.contains(container) {
                return Ok(());
            }
            if usage.containers.len() >= CONTAINERS {
                return Err(Denied(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this task attempt has already named {CONTAINERS} containers"),
                ));
            }
            usage.containers.insert(container.to_owned());
            Ok(())
        })
    }

    /// Admits a progress report, unless the last came less than [`PROGRESS_INTERVAL`] ago.
    pub fn progress(&self) -> Result<(), Denied> {
        self.with(|usage| {
            if usage
                .last_progress
                .is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL)
            {
                return Err(Denied(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("progress at most once every {PROGRESS_INTERVAL:?}"),
                ));
            }
            usage.last_progress = Some(std::time::Instant::now());
            Ok(())
        })
    }

    /// Makes this request an upload of one more object: within the attempt's concurrent
    /// uploads and object count.
    pub fn upload(&mut self) -> Result<(), Denied> {
        let outputs = self.attempts.quotas.outputs;
        self.with(|usage| {
            if usage.uploads >= UPLOADS {
                return Err(Denied(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this task attempt already has {UPLOADS} uploads in progress"),
                ));
            }
            if usage.outputs >= outputs {
                return Err(Denied(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this task attempt has uploaded its quota of {outputs} objects"),
                ));
            }
            usage.uploads += 1;
            usage.outputs += 1;
            Ok(())
        })?;
        self.upload = true;
        Ok(())
    }

    /// Counts `bytes` more uploaded; an error once the attempt's byte quota is passed.
    pub fn uploaded(&self, bytes: u64) -> Result<(), Denied> {
        let limit = self.attempts.quotas.output_bytes;
        self.with(|usage| {
            usage.output_bytes += bytes;
            if usage.output_bytes > limit {
                return Err(Denied(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("this task attempt's uploads passed their quota of {limit} bytes"),
                ));
            }
            Ok(())
        })
    }

    /// Starts recording the attempt's result: the token is spent once [`Closing::commit`]
    /// returns; dropped before, nothing changed (the emissary may post it again).
    pub fn close(&self, exp: u64) -> Result<Closing, Denied> {
        let mut state = self.attempts.state.lock().unwrap();
        if state.closed.contains_key(&self.id) || !state.closing.insert(self.id.clone()) {
            return Err(Denied(
                StatusCode::CONFLICT,
                "this task attempt's result is already recorded".into(),
            ));
        }
        Ok(Closing {
            attempts: self.attempts.clone(),
            id: self.id.clone(),
            exp,
        })
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let upload = self.upload;
        self.with(|usage| {
            usage.requests = usage.requests.saturating_sub(1);
            if upload {
                usage.uploads = usage.uploads.saturating_sub(1);
            }
        });
    }
}

/// A result being recorded.
pub struct Closing {
    attempts: Arc<Attempts>,
    id: String,
    exp: u64,
}

impl Closing {
    /// Spends the token, once the result is recorded. Not being able to write it down only
    /// costs its surviving a restart: the result stands, so this is no reason to refuse it.
    pub fn commit(self) {
        let line = format!("{} {}\n", self.exp, self.id);
        let written = {
            let mut file = self.attempts.file.lock().unwrap();
            file.write_all(line.as_bytes())
                .and_then(|()| file.sync_data())
        };
        if let Err(e) = written {
            tracing::warn!(path = %self.attempts.path.display(), error = %e, "recording a spent token");
        }
        self.attempts
            .state
            .lock()
            .unwrap()
            .closed
            .insert(self.id.clone(), self.exp);
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.attempts.state.lock().unwrap().closing.remove(&self.id);
    }
}
