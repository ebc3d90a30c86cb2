//! The emissary API (`/v1/tasks/{task}/{attempt}/...`) and the admin endpoints.
//!
//! Every task request carries `Authorization: Bearer TOKEN`; a token opens only its own task
//! attempt's paths (401 for a bad or expired token, 403 for another task's or another node's),
//! until the attempt's result is recorded (409 after: see `crate::attempts`, which also keeps
//! the per-attempt quotas). It reads only its own workflow's keys and those its token grants.
//! JSON bodies are capped at 1 MiB (and their memory node-wide) and a malformed one is a 400
//! naming the field; names must be single safe path segments; a client silent mid-body for
//! `--body-idle-timeout` (60 s), or sending an upload slower than 64 KiB a minute, is cut off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protocol::api::{
    self, Command, Event, EventOutputs, EventParameter, Phase, ProgressReport, StartRequest,
    TaskResult, Usage, Value,
};
use serde::de::DeserializeOwned;
use tracing::{Instrument, info, info_span, warn};

use crate::argo::{Argo, ArgoError, ArgoPod};
use crate::attempts::{Attempts, Denied, Entered};
use crate::body::{Body, Chunks, InMemory, ReadError, Upload, empty, full, read_limited};
use crate::cache::{Cache, Lookup};
use crate::commands::Commands;
use crate::metrics::{Metrics, RequestLabels};
use crate::outbox::{AppendError, Outbox};
use crate::store::{Store, StoreError, stream_file};
use crate::token::{Claims, Secret};

const JSON_LIMIT: usize = api::JSON_BODY_LIMIT;
/// JSON bodies being read at once, node-wide: their memory is `JSON_LIMIT` each at most.
pub const JSON_BODIES: usize = 64;
/// The most files of one unarchived directory an input may have.
const DIRECTORY_FILES: usize = 100_000;
/// How long a client may take to send its request's headers (every listener).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/1 server of every listener: a client that never finishes its headers is cut off.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
}
/// The longest a commands long-poll may wait.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Everything a request handler needs.
pub struct App {
    pub secret: Secret,
    pub store: Store,
    /// The Argo adapter, when the agent can reach the Kubernetes API.
    pub argo: Option<Arc<Argo>>,
    pub cache: Option<Arc<Cache>>,
    pub outbox: Outbox,
    pub commands: Arc<Commands>,
    pub metrics: Arc<Metrics>,
    pub attempts: Arc<Attempts>,
    /// Free bytes a local store leaves on its filesystem.
    pub store_reserve: u64,
    /// Permits to buffer a JSON body.
    pub json_budget: tokio::sync::Semaphore,
    pub node: String,
    pub inline_limit: usize,
    /// How long a client may stay silent in the middle of a request body.
    pub body_idle: Duration,
    pub clock_skew: Duration,
    pub next_request: AtomicU64,
}

/// An error answer: status and message (sent as `{"error": message}`).
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal(status, message.into())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        let status = match e {
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Source(_) | StoreError::BadKey(_) => StatusCode::BAD_REQUEST,
            StoreError::Failed(_) => StatusCode::BAD_GATEWAY,
        };
        Refusal(status, e.to_string())
    }
}

impl From<ArgoError> for Refusal {
    fn from(e: ArgoError) -> Refusal {
        Refusal(e.0, e.1)
    }
}

impl From<Denied> for Refusal {
    fn from(e: Denied) -> Refusal {
        Refusal(e.0, e.1)
    }
}

impl From<AppendError> for Refusal {
    fn from(e: AppendError) -> Refusal {
        let status = match e {
            AppendError::Full => StatusCode::SERVICE_UNAVAILABLE,
            AppendError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            AppendError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal(status, e.to_string())
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    // Not `Response::builder()`: it parses the header's name, and this is every event's answer.
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves one request of the emissary API.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let id = app.next_request.fetch_add(1, Ordering::Relaxed);
    let span =
        info_span!("request", request_id = id, method = %req.method(), path = %req.uri().path());
    async move {
        info!("received");
        let (route, result) = route(&app, req).await;
        let response = match result {
            Ok(response) => response,
            Err(Refusal(status, message)) => {
                if status.is_server_error() {
                    warn!(status = status.as_u16(), error = %message, "refused");
                } else {
                    info!(status = status.as_u16(), error = %message, "refused");
                }
                json_response(status, &serde_json::json!({ "error": message }))
            }
        };
        app.metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: response.status().as_u16(),
            })
            .inc();
        info!(status = response.status().as_u16(), "done");
        Ok(response)
    }
    .instrument(span)
    .await
}

async fn route(
    app: &App,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, Refusal>) {
    let path = req.uri().path().to_owned();
    if path == api::ARGO_LOGIN_PATH {
        if req.method() != Method::POST {
            return ("argo-login", Ok(method_not_allowed(&Method::POST, &path)));
        }
        return ("argo-login", Box::pin(argo_login(app, &req)).await);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["v1", "tasks", task, attempt, rest @ ..] = segments.as_slice() else {
        return (
            "unknown",
            Err(Refusal::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        );
    };
    let (route, method) = match rest {
        ["start"] => ("start", Method::POST),
        ["progress"] => ("progress", Method::POST),
        ["result"] => ("result", Method::POST),
        ["inputs", _] => ("inputs", Method::GET),
        ["outputs", _, ..] => ("outputs", Method::PUT),
        ["commands"] => ("commands", Method::GET),
        ["containers", _] => ("containers", Method::GET),
        _ => {
            return (
                "unknown",
                Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint: {} {path}", req.method()),
                )),
            );
        }
    };
    if req.method() != method {
        return (route, Ok(method_not_allowed(&method, &path)));
    }
    let result = async {
        if !api::valid_name(task) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("task id {task:?} is not a name of [A-Za-z0-9._-]"),
            ));
        }
        let attempt: u32 = attempt.parse().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("attempt {attempt:?} is not a number"),
            )
        })?;
        let claims = authorize(app, &req, task, attempt)?;
        // How a sibling ended stays worth asking after the result (a sidecar waits on main).
        let mut entered = app.attempts.enter(&claims, route == "containers")?;
        let argo = match &claims.pod {
            Some(pod) => Some(Box::pin(argo_of(app)?.pod(pod)).await?),
            None => None,
        };
        let entered = &mut entered;
        // Every request's future is as large as its largest arm, and is moved into place per
        // request: the transfers and the Argo calls (kilobytes of state) are boxed, the
        // frequent small events are not.
        match (route, argo) {
            ("start", None) => start(app, &claims, entered, req).await,
            ("start", Some(_)) => Ok(json_response(StatusCode::OK, &serde_json::json!({}))),
            ("progress", None) => progress(app, &claims, entered, req).await,
            ("progress", Some(pod)) => Box::pin(argo_progress(app, &pod, entered, req)).await,
            ("result", None) => Box::pin(result(app, &claims, entered, req)).await,
            ("result", Some(pod)) => Box::pin(argo_result(app, &claims, &pod, entered, req)).await,
            ("inputs", None) => Box::pin(input(app, &claims, &req, rest[1])).await,
            ("inputs", Some(pod)) => Box::pin(argo_input(app, &pod, rest[1])).await,
            ("outputs", None) => {
                Box::pin(output(app, &claims, entered, req, &rest[1..].join("/"))).await
            }
            ("outputs", Some(pod)) => {
                Box::pin(argo_output(app, &pod, entered, req, &rest[1..].join("/"))).await
            }
            ("containers", _) => container_exit(app, &claims, &req, rest[1]).await,
            _ => commands(app, &claims, entered, &req).await,
        }
    }
    .await;
    (route, result)
}

/// 405, naming the one method `path` takes.
fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    let message = format!("{path} takes {method} only");
    let mut response = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": message }),
    );
    let allow = hyper::header::HeaderValue::from_str(method.as_str()).expect("a method name");
    response.headers_mut().insert(hyper::header::ALLOW, allow);
    response
}

fn authorize(
    app: &App,
    req: &Request<Incoming>,
    task: &str,
    attempt: u32,
) -> Result<Claims, Refusal> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer token",
        )
    })?;
    let claims = app
        .secret
        .verify(token.trim(), crate::token::now(), app.clock_skew.as_secs())
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    if let Some(node) = claims.on.as_deref().filter(|&on| on != app.node) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "this token is for node {node:?}, not this agent's {:?}",
                app.node
            ),
        ));
    }
    if claims.task != task || claims.attempt != attempt {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "this token is for task {}/{}, not {task}/{attempt}",
                claims.task, claims.attempt
            ),
        ));
    }
    Ok(claims)
}

/// A JSON body, with the path of the field at fault when it does not parse.
async fn json_body<T: DeserializeOwned>(app: &App, req: Request<Incoming>) -> Result<T, Refusal> {
    let _memory = app.json_budget.try_acquire().map_err(|_| {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is reading as many request bodies as it may at once; try again",
        )
    })?;
    let bytes = read_limited(req.into_body(), JSON_LIMIT, app.body_idle)
        .await
        .map_err(|e| {
            let status = match e {
                ReadError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                ReadError::Stalled => StatusCode::REQUEST_TIMEOUT,
                ReadError::Broken(_) => StatusCode::BAD_REQUEST,
            };
            Refusal::new(status, e.to_string())
        })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("field {path}: ")
        };
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("bad JSON body: {at}{}", e.into_inner()),
        )
    })
}

fn event(app: &App, claims: &Claims, phase: Phase) -> Event {
    Event {
        namespace: claims.ns.clone(),
        workflow: claims.wf.clone(),
        task_id: claims.task.clone(),
        attempt: claims.attempt,
        seq: 0,
        phase,
        timestamp: protocol::time::format_rfc3339(std::time::SystemTime::now()),
        node: app.node.clone(),
        container: None,
        exit_code: None,
        outputs: None,
        error: None,
        usage: None,
        progress: None,
        inputs_digest: None,
    }
}

async fn journal(app: &App, event: Event) -> Result<Response<Body>, Refusal> {
    /// The answer; a struct, not a `json!` map: this is the most frequent answer of all.
    #[derive(serde::Serialize)]
    struct Appended {
        seq: u64,
    }
    let seq = app.outbox.append(event).await?;
    app.metrics.events_appended.inc();
    Ok(json_response(StatusCode::OK, &Appended { seq }))
}

async fn start(
    app: &App,
    claims: &Claims,
    entered: &Entered,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let start: StartRequest = json_body(app, req).await?;
    check_container(&start.container)?;
    entered.container(&start.container)?;
    let mut e = event(app, claims, Phase::Running);
    e.container = Some(start.container);
    journal(app, e).await
}

async fn progress(
    app: &App,
    claims: &Claims,
    entered: &Entered,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let report: ProgressReport = json_body(app, req).await?;
    check_container(&report.container)?;
    entered.container(&report.container)?;
    if !api::valid_progress(&report.progress) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("progress {:?} is not N/M", report.progress),
        ));
    }
    let mut e = event(app, claims, Phase::Running);
    e.container = Some(report.container);
    e.progress = Some(report.progress);
    journal(app, e).await
}

async fn result(
    app: &App,
    claims: &Claims,
    entered: &Entered,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let result: TaskResult = json_body(app, req).await?;
    check_container(&result.container)?;
    entered.container(&result.container)?;
    // One result per attempt: a second, concurrent or later, is refused rather than raced.
    let closing = entered.close(claims.exp)?;
    let phase = if app
        .commands
        .was_terminated(&claims.wf, &claims.task, claims.attempt)
        && result.reason != protocol::ExitReason::Completed
    {
        Phase::Aborted
    } else {
        Phase::of_result(&result)
    };
    let mut e = event(app, claims, phase);
    e.container = Some(result.container.clone());
    e.exit_code = Some(result.exit_code);
    e.error = result.error.clone();
    e.inputs_digest = result.inputs_digest.clone();
    e.progress = result.outputs.progress.clone();
    e.usage = result.summary.as_ref().map(|s| Usage {
        duration_ms: s.duration_ms,
        user_cpu_ms: s.user_cpu_ms,
        sys_cpu_ms: s.sys_cpu_ms,
        max_rss_kb: s.max_rss_kb,
    });
    check_outputs(app, claims, &result.outputs)?;
    let mut outputs = EventOutputs {
        parameters: Vec::new(),
        result: None,
        result_truncated: result.outputs.result_truncated,
        artifacts: result.outputs.artifacts.clone(),
    };
    for p in result.outputs.parameters {
        let value =
            inline_or_offload(app, claims, &format!("parameters/{}", p.name), p.value).await?;
        outputs.parameters.push(EventParameter {
            name: p.name,
            value,
        });
    }
    if let Some(text) = result.outputs.result {
        outputs.result = Some(inline_or_offload(app, claims, "result", text).await?);
    }
    e.outputs = Some(outputs);
    let answer = journal(app, e).await?;
    closing.commit();
    Ok(answer)
}

/// The `container` of a start, progress or result: a name, as in the pod.
fn check_container(container: &str) -> Result<(), Refusal> {
    if api::valid_name(container) {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("container {container:?} is not a name of [A-Za-z0-9._-]"),
        ))
    }
}

/// A result names only what its own task may: parameter names that are single names (they
/// become store keys when offloaded), artifacts under its own key prefix with real digests.
fn check_outputs(app: &App, claims: &Claims, outputs: &api::Outputs) -> Result<(), Refusal> {
    let bad = |message: String| Err(Refusal::new(StatusCode::BAD_REQUEST, message));
    for (i, p) in outputs.parameters.iter().enumerate() {
        if !api::valid_name(&p.name) {
            return bad(format!(
                "outputs.parameters[{i}].name {:?} is not a name of [A-Za-z0-9._-]",
                p.name
            ));
        }
    }
    let own = object_key(app, claims, "");
    for (i, a) in outputs.artifacts.iter().enumerate() {
        // Exactly what an upload of this task stores: its prefix and one file name.
        let file = a.stored.key.strip_prefix(&own);
        if !file.is_some_and(api::valid_name) {
            return bad(format!(
                "outputs.artifacts[{i}].key {:?} is not under this task's {own:?}",
                a.stored.key
            ));
        }
        let digest = &a.stored.sha256;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!(
                "outputs.artifacts[{i}].sha256 {digest:?} is not a SHA-256 in hex"
            ));
        }
    }
    Ok(())
}

/// A value small enough travels in the event; a larger one goes to the store, and the event
/// carries where (as Flyte offloads literals).
async fn inline_or_offload(
    app: &App,
    claims: &Claims,
    name: &str,
    value: String,
) -> Result<Value, Refusal> {
    if value.len() <= app.inline_limit {
        return Ok(Value::Inline(value));
    }
    // `~` is in no artifact name: an artifact called `result` or `parameters` is not overwritten.
    let key = object_key(app, claims, &format!("~values/{name}"));
    let stored = app
        .store
        .put(&key, &mut InMemory(Some(Bytes::from(value))))
        .await?;
    Ok(Value::Offloaded(stored))
}

/// `{prefix}/{namespace}/{workflow}/{task}/{attempt}/{name}`.
fn object_key(app: &App, claims: &Claims, name: &str) -> String {
    format!(
        "{}{}/{}/{name}",
        workflow_prefix(app, claims),
        claims.task,
        claims.attempt
    )
}

/// `{prefix}/{namespace}/{workflow}/`: what a task reads without being granted it.
fn workflow_prefix(app: &App, claims: &Claims) -> String {
    let prefix = app.store.prefix();
    let base = format!("{}/{}/", claims.ns, claims.wf);
    if prefix.is_empty() {
        base
    } else {
        format!("{prefix}/{base}")
    }
}

async fn input(
    app: &App,
    claims: &Claims,
    req: &Request<Incoming>,
    name: &str,
) -> Result<Response<Body>, Refusal> {
    if !api::valid_name(name) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("input name {name:?} is not a name of [A-Za-z0-9._-]"),
        ));
    }
    let key = query(req, "key")
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, "missing ?key= of the input"))?;
    app.store.check_key(&key)?;
    // Reads are capabilities: the task's own workflow, and what the controller passed it.
    let granted = key.starts_with(&workflow_prefix(app, claims))
        || claims
            .reads
            .iter()
            .any(|read| match read.strip_suffix('/') {
                Some(prefix) => key.starts_with(read.as_str()) && !prefix.is_empty(),
                None => key == *read,
            });
    if !granted {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "input {name:?}: key {key:?} is neither under this task's workflow ({}) nor \
                 granted to it by its token",
                workflow_prefix(app, claims)
            ),
        ));
    }
    serve_object(app, &app.store, &key).await
}

/// Streams object `key` of `store`, through the node cache when the store is remote.
async fn serve_object(app: &App, store: &Store, key: &str) -> Result<Response<Body>, Refusal> {
    let key = key.to_owned();
    let not_found = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no object {key:?} in the store"),
        )
    };
    let (size, body) = match &app.cache {
        Some(cache) if !store.is_local() => {
            let head = match cache.fresh(store, &key) {
                Some(meta) => Ok(Some(meta)),
                None => {
                    app.metrics.cache_revalidations.inc();
                    let head = store.head(&key).await;
                    if let Ok(Some(meta)) = &head {
                        cache.checked(store, &key, meta);
                    }
                    head
                }
            };
            let path = match head {
                Ok(meta) => {
                    let meta = meta.ok_or_else(not_found)?;
                    let lookup = if meta.etag.is_empty() {
                        // Nothing would tell a changed object from the cached one.
                        Lookup::Bypass
                    } else {
                        cache.get(store, &key, &meta).await?
                    };
                    match lookup {
                        Lookup::Bypass => {
                            // Streamed through, its length unknown (chunked).
                            let (_, body) = store.get(&key).await?.ok_or_else(not_found)?;
                            app.metrics.store_downloads.inc();
                            return Ok(Response::builder()
                                .status(StatusCode::OK)
                                .header("content-type", "application/octet-stream")
                                .body(body)
                                .expect("valid response"));
                        }
                        Lookup::Hit(path) => {
                            app.metrics.cache_hits.inc();
                            path
                        }
                        Lookup::Filling { body, started } => {
                            if started {
                                app.metrics.cache_misses.inc();
                                app.metrics.store_downloads.inc();
                            } else {
                                app.metrics.cache_hits.inc();
                            }
                            app.metrics.download_bytes.inc_by(meta.size);
                            return Ok(octet_stream(meta.size, body));
                        }
                    }
                }
                Err(StoreError::Unavailable(e)) => {
                    let Some(path) = cache.last_served(store, &key) else {
                        return Err(StoreError::Unavailable(e).into());
                    };
                    warn!(%key, error = %e, "store unreachable: serving the cached copy unverified");
                    app.metrics.cache_stale_hits.inc();
                    path
                }
                Err(e) => return Err(e.into()),
            };
            let file = tokio::fs::File::open(&path).await.map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("node cache: {e}"),
                )
            })?;
            let size = file.metadata().await.map(|m| m.len()).map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("node cache: {e}"),
                )
            })?;
            (size, stream_file(file))
        }
        _ => {
            let (meta, body) = store.get(&key).await?.ok_or_else(not_found)?;
            app.metrics.store_downloads.inc();
            (meta.size, body)
        }
    };
    app.metrics.download_bytes.inc_by(size);
    Ok(octet_stream(size, body))
}

fn octet_stream(size: u64, body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(body)
        .expect("valid response")
}

async fn output(
    app: &App,
    claims: &Claims,
    entered: &mut Entered,
    req: Request<Incoming>,
    file: &str,
) -> Result<Response<Body>, Refusal> {
    if !api::valid_name(file) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("output name {file:?} is not a name of [A-Za-z0-9._-]"),
        ));
    }
    let key = object_key(app, claims, file);
    store_upload(app, &app.store, entered, &key, req).await
}

/// Streams the request's body to `key` of `store`, within the attempt's quotas; answers with
/// what was stored.
async fn store_upload(
    app: &App,
    store: &Store,
    entered: &mut Entered,
    key: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    entered.upload()?;
    let mut upload = Metered {
        upload: Upload::new(req.into_body(), app.body_idle),
        entered,
        local_root: store.local_root().map(|root| (root, app.store_reserve)),
        checked: 0,
        denied: None,
    };
    let stored = store.put(key, &mut upload).await;
    if let Some(denied) = upload.denied.take() {
        return Err(denied.into());
    }
    let stored = stored?;
    app.metrics.upload_bytes.inc_by(stored.size);
    info!(key = %stored.key, size = stored.size, "stored");
    Ok(json_response(StatusCode::OK, &stored))
}

/// An upload's body, counted against its attempt's quota and, for a local store, the free
/// space its filesystem must keep.
struct Metered<'a> {
    upload: Upload,
    entered: &'a Entered,
    local_root: Option<(&'a std::path::Path, u64)>,
    /// Bytes since the free space was last looked at.
    checked: u64,
    denied: Option<Denied>,
}

/// How often an upload to a local store looks at the free space.
const SPACE_CHECK_BYTES: u64 = 16 << 20;

impl Chunks for Metered<'_> {
    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        let chunk = self.upload.next_chunk().await?;
        let Ok(bytes) = &chunk else {
            return Some(chunk);
        };
        let len = bytes.len() as u64;
        let mut denied = self.entered.uploaded(len).err();
        self.checked += len;
        if let Some((root, reserve)) = self.local_root
            && denied.is_none()
            && (self.checked >= SPACE_CHECK_BYTES || self.checked == len)
        {
            self.checked = 0;
            denied = crate::store::check_free_space(root, reserve)
                .err()
                .map(|e| Denied(StatusCode::INSUFFICIENT_STORAGE, e));
        }
        if let Some(denied) = denied {
            let message = denied.1.clone();
            self.denied = Some(denied);
            return Some(Err(std::io::Error::other(message)));
        }
        Some(chunk)
    }
}

fn argo_of(app: &App) -> Result<&Arc<Argo>, Refusal> {
    app.argo.as_ref().ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "this agent has no access to the Kubernetes API, so it serves no Argo pods \
             (run it in the cluster, or give it --kubeconfig)",
        )
    })
}

/// `POST /v1/argo/login`: the pod's ServiceAccount token for a task token (`crate::argo`).
async fn argo_login(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer with the pod's ServiceAccount token",
            )
        })?;
    let (pod, token, exp) = argo_of(app)?.login(&app.secret, token).await?;
    info!(pod = %format!("{}/{}", pod.pod.ns, pod.pod.name), node_id = %pod.node_id, "argo pod logged in");
    Ok(json_response(
        StatusCode::OK,
        &api::ArgoLogin {
            token,
            task: pod.node_id.clone(),
            attempt: 0,
            workflow: pod.workflow.clone(),
            namespace: pod.pod.ns.clone(),
            expires: exp,
        },
    ))
}

async fn argo_progress(
    app: &App,
    pod: &ArgoPod,
    entered: &Entered,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let report: ProgressReport = json_body(app, req).await?;
    entered.progress()?;
    if !api::valid_progress(&report.progress) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("progress {:?} is not N/M", report.progress),
        ));
    }
    crate::argo::results::progress(&argo_of(app)?.client, pod, &report.progress).await?;
    Ok(json_response(StatusCode::OK, &serde_json::json!({})))
}

/// An Argo pod's result: its outputs into its `WorkflowTaskResult`, marked complete, before the
/// answer (the emissary exits only after it, so Argo never waits for a result that is gone).
async fn argo_result(
    app: &App,
    claims: &Claims,
    pod: &ArgoPod,
    entered: &Entered,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let result: TaskResult = json_body(app, req).await?;
    check_container(&result.container)?;
    let closing = entered.close(claims.exp)?;
    for (i, a) in result.outputs.artifacts.iter().enumerate() {
        let allowed = pod
            .template
            .output_artifacts()
            .iter()
            .any(|s| s["name"] == a.name)
            || pod
                .main_containers
                .iter()
                .any(|c| a.name == format!("{c}-logs"));
        if !allowed {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "outputs.artifacts[{i}]: the template has no output artifact {:?}",
                    a.name
                ),
            ));
        }
    }
    crate::argo::results::complete(&argo_of(app)?.client, pod, &result).await?;
    closing.commit();
    info!(node_id = %pod.node_id, exit_code = result.exit_code, "argo task result complete");
    Ok(json_response(StatusCode::OK, &serde_json::json!({})))
}

/// An Argo pod's input, by name: its location is the one in the pod's template.
async fn argo_input(app: &App, pod: &ArgoPod, name: &str) -> Result<Response<Body>, Refusal> {
    let location = pod
        .template
        .input_location(name)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?;
    match location {
        crate::argo::template::Location::S3(s3) => {
            let store = argo_of(app)?.store(pod, &s3).await?;
            let key = s3.key.as_deref().unwrap_or_default();
            // A directory Argo stored without an archive (one object per file under the key),
            // as Argo's S3 driver tells one: by listing first.
            let files = store.list(&format!("{key}/"), DIRECTORY_FILES).await?;
            if files.is_empty() {
                return serve_object(app, &store, key).await;
            }
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/x-tar")
                .header("x-emissary-directory", "tar")
                .body(crate::argo::directory::as_tar(store, key, files))
                .expect("valid response"))
        }
        crate::argo::template::Location::Http { url, headers } => {
            let store = Store::Http {
                client: Box::new(argo_of(app)?.http.clone()),
                headers: Arc::new(headers),
            };
            serve_object(app, &store, &url).await
        }
    }
}

/// An Argo pod's output, by file name: only the template's own outputs, at the template's
/// archive location.
async fn argo_output(
    app: &App,
    pod: &ArgoPod,
    entered: &mut Entered,
    req: Request<Incoming>,
    file: &str,
) -> Result<Response<Body>, Refusal> {
    if file.split('/').any(|segment| !api::valid_name(segment))
        || pod
            .template
            .allows_output(file, &pod.main_containers)
            .is_none()
    {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{file:?} is none of the template's outputs (NAME.tgz, NAME.tar.zst, for \
                 archive none the path's base name or a file under it, CONTAINER.log)"
            ),
        ));
    }
    let location = pod
        .template
        .output_location(file)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?;
    let store = argo_of(app)?.store(pod, &location).await?;
    store_upload(
        app,
        &store,
        entered,
        location.key.as_deref().unwrap_or_default(),
        req,
    )
    .await
}

async fn commands(
    app: &App,
    claims: &Claims,
    entered: &Entered,
    req: &Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let wait = match query(req, "wait") {
        Some(text) => protocol::duration::parse(&text)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("wait: {e}")))?,
        None => Duration::ZERO,
    };
    // Each container of a containerSet polls with the same token: each gets every command.
    let container = query(req, "container").unwrap_or_default();
    if !container.is_empty() {
        check_container(&container)?;
    }
    entered.container(&container)?;
    let list: Vec<Command> = app
        .commands
        .wait(
            (&claims.wf, &claims.task, claims.attempt),
            &container,
            wait.min(MAX_WAIT),
        )
        .await;
    if list.is_empty() {
        return Ok(Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .expect("valid response"));
    }
    Ok(json_response(StatusCode::OK, &list))
}

/// `GET containers/{name}?wait=D`: how a container of the task's pod ended, as its kubelet
/// reports it (`{"exit_code": N}`), or 204 while it still runs after `wait`. Only for a token
/// bound to a pod: a containerSet's dependencies are decided on this, not on files its
/// siblings could write.
async fn container_exit(
    app: &App,
    claims: &Claims,
    req: &Request<Incoming>,
    container: &str,
) -> Result<Response<Body>, Refusal> {
    check_container(container)?;
    let Some(pod) = &claims.pod else {
        return Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "this token names no pod: the agent cannot ask its kubelet",
        ));
    };
    let wait = match query(req, "wait") {
        Some(text) => protocol::duration::parse(&text)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("wait: {e}")))?,
        None => Duration::ZERO,
    };
    let until = tokio::time::Instant::now() + wait.min(MAX_WAIT);
    let argo = argo_of(app)?;
    loop {
        if let Some(code) = argo.container_exit(pod, container).await? {
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "exit_code": code }),
            ));
        }
        // The pod's status changes only when its kubelet writes it: a look every half second
        // costs the API server little and the waiting container at most that.
        let next = tokio::time::Instant::now() + Duration::from_millis(500);
        if next > until {
            return Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(empty())
                .expect("valid response"));
        }
        tokio::time::sleep_until(next).await;
    }
}

/// One query parameter, percent-decoded.
fn query(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let digit = |i: usize| bytes.get(i).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], digit(i + 1), digit(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The admin port: metrics and probes.
pub async fn admin(
    app: Arc<App>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let response = match req.uri().path() {
        "/metrics" => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(full(app.metrics.encode())),
        "/healthz" => Response::builder().body(full("ok\n")),
        "/readyz" if ready.load(Ordering::Relaxed) => Response::builder().body(full("ready\n")),
        "/readyz" => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full("starting\n")),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("not found\n")),
    };
    Ok(response.expect("valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_exact() {
        assert_eq!(percent_decode("a%2Fb%20c+d"), "a/b c d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
