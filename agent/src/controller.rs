//! The controller side: delivering the outbox, relaying commands, heartbeats.
//!
//! Delivery is in journal order, in batches of up to 500 events and 4 MiB; a batch is
//! acknowledged by any 2xx, and only then removed. Failures back off exponentially with full
//! jitter, 100 ms to 30 s. A batch whose content the controller refuses (400, 413, 422) is sent
//! again one event at a time, and an event refused alone is set aside in
//! `DATA_DIR/refused-events.jsonl`, logged and counted, so that it holds up no other task's. Without a controller, events are appended (and fsynced) to `DATA_DIR/events.jsonl`
//! instead, through the same journal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use protocol::api::{Command, Heartbeat, NodeCommands, TaskRef};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tracing::{debug, info, warn};

use crate::commands::Commands;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Reader};
use crate::token::{self, NodeClaims, Secret};

const BATCH: usize = 500;
/// What one delivery holds in memory, about twice over (records, then the body).
const BATCH_BYTES: u64 = 4 << 20;
/// Under load, one delivery per this interval carries all that was journaled meanwhile: each
/// delivery costs a request to the controller and a cursor write, whatever its size.
const DELIVERY_INTERVAL: Duration = Duration::from_millis(5);
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Where events go.
#[derive(Clone)]
pub enum Sink {
    Controller(Box<Controller>),
    File(PathBuf),
}

/// The workflow controller, as this node's agent speaks to it.
#[derive(Clone)]
pub struct Controller {
    url: String,
    connector: HttpsConnector<HttpConnector>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Signs the node token every request carries (see `crate::token`).
    secret: Secret,
    node: String,
}

/// How long a node token is valid; one is minted per request.
const NODE_TOKEN_TTL: u64 = 300;

impl Sink {
    /// An https:// controller is verified against `ca` (PEM) when given, else the system roots.
    pub fn new(
        url: Option<&str>,
        ca: Option<&Path>,
        secret: &Secret,
        node: &str,
        events_file: PathBuf,
    ) -> Result<Sink, String> {
        let Some(url) = url else {
            return Ok(Sink::File(events_file));
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(ca)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Sink::Controller(Box::new(Controller {
            url: url.to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector.clone()),
            connector,
            secret: secret.clone(),
            node: node.to_owned(),
        })))
    }

    /// The same sink with connections of its own, for another runtime: a pooled connection
    /// answers on the runtime that opened it.
    pub fn with_own_connections(&self) -> Sink {
        match self {
            Sink::File(path) => Sink::File(path.clone()),
            Sink::Controller(controller) => Sink::Controller(Box::new(Controller {
                client: Client::builder(TokioExecutor::new()).build(controller.connector.clone()),
                ..(**controller).clone()
            })),
        }
    }
}

impl Controller {
    /// Sends `method path` (JSON `body` if any) with this node's token; gives up after `limit`.
    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<hyper::Response<hyper::body::Incoming>, SendError> {
        let token = self.secret.sign(&NodeClaims {
            node: self.node.clone(),
            exp: token::now() + NODE_TOKEN_TTL,
        });
        let mut request = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {token}"));
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| SendError::new(e.to_string()))?;
        let url = format!("{method} {}{path}", self.url);
        let response = tokio::time::timeout(limit, self.client.request(request))
            .await
            .map_err(|_| SendError::new(format!("{url}: no answer in {limit:?}")))?
            .map_err(|e| SendError::new(format!("{url}: {}", causes(&e))))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(SendError {
                status: Some(response.status()),
                message: format!("{url}: {}", response.status()),
            })
        }
    }
}

/// A request the controller did not take: its answer's status, if it answered.
#[derive(Debug)]
pub struct SendError {
    status: Option<hyper::StatusCode>,
    message: String,
}

impl SendError {
    fn new(message: String) -> SendError {
        SendError {
            status: None,
            message,
        }
    }

    /// The controller will not take this content however often it is sent.
    fn refused_content(&self) -> bool {
        self.status
            .is_some_and(|s| matches!(s.as_u16(), 400 | 413 | 422))
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<SendError> for String {
    fn from(e: SendError) -> String {
        e.message
    }
}

fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("controller-ca: cannot read {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("controller-ca {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("controller-ca {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "controller-ca {}: no PEM certificate",
                    path.display()
                ));
            }
        }
        None => {
            // Unreadable system certificates only matter for an https:// URL; the handshake
            // then fails with "unknown issuer" and delivery retries, logged.
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                warn!("no system CA certificates found; an https:// controller will not verify");
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Exponential backoff with full jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
        }
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    pub fn step(&mut self) -> Duration {
        let wait = self.next.mul_f64(rand::random::<f64>());
        self.next = (self.next * 2).min(Duration::from_secs(30));
        wait
    }
}

/// Delivers journaled events until `stop` turns true and the journal is empty (or `stop`
/// turns true and a delivery fails: the rest waits for the next start).
pub async fn deliver(
    outbox: Outbox,
    sink: Sink,
    node: String,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = match Reader::open(&outbox) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read the journal; no events will be delivered");
            return;
        }
    };
    let mut backoff = Backoff::new();
    // After a refused batch: one event at a time, until past the one refused.
    let mut singly = 0usize;
    let refused_file = outbox.dir.with_file_name("refused-events.jsonl");
    // Paced after a partial batch only: a backlog drains at full speed.
    let mut next_delivery = tokio::time::Instant::now();
    loop {
        if next_delivery > tokio::time::Instant::now() {
            tokio::time::sleep_until(next_delivery).await;
        }
        let max = if singly > 0 { 1 } else { BATCH };
        let batch = match tokio::task::block_in_place(|| reader.peek(max, BATCH_BYTES)) {
            Ok(batch) => batch,
            Err(e) => {
                warn!(error = %e, "reading the journal");
                Vec::new()
            }
        };
        if batch.is_empty() {
            singly = 0;
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = outbox.appended.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let (last, count) = (batch.last().expect("not empty").id, batch.len());
        let events: Vec<Bytes> = batch.into_iter().map(|r| r.event).collect();
        let sent = match send(&sink, &node, &events).await {
            Err(e) if e.refused_content() && count == 1 => {
                let event: serde_json::Value =
                    serde_json::from_slice(&events[0]).unwrap_or_default();
                warn!(
                    error = %e, task = event["task_id"].as_str().unwrap_or_default(),
                    attempt = event["attempt"].as_u64(), seq = event["seq"].as_u64(),
                    file = %refused_file.display(),
                    "the controller refuses this event: set aside, so the others go on"
                );
                metrics.events_refused.inc();
                let path = refused_file.clone();
                tokio::task::spawn_blocking(move || append_lines(&path, &events))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map(|()| 0)
                    .map_err(|e| SendError::new(format!("setting aside a refused event: {e}")))
            }
            Err(e) if e.refused_content() => {
                info!(error = %e, events = count, "the controller refuses a batch: sending it one event at a time");
                singly = count;
                continue;
            }
            other => other,
        };
        match sent {
            Ok(delivered) => {
                metrics.events_delivered.inc_by(delivered);
                if count < max {
                    next_delivery = tokio::time::Instant::now() + DELIVERY_INTERVAL;
                }
                if let Err(e) = tokio::task::block_in_place(|| reader.ack(last)) {
                    warn!(error = %e, "recording delivery in the journal");
                }
                singly = singly.saturating_sub(1);
                backoff.reset();
            }
            Err(e) => {
                metrics.delivery_failures.inc();
                warn!(error = %e, "event delivery failed; will retry");
                if *stop.borrow() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.step()) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Appends `events` (JSON each) to `path` as lines, fsynced.
fn append_lines(path: &Path, events: &[Bytes]) -> Result<(), String> {
    let mut lines = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum());
    for event in events {
        lines.extend_from_slice(event);
        lines.push(b'\n');
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(&lines)
        .and_then(|()| file.sync_data())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Sends `events` (JSON each) to the sink.
async fn send(sink: &Sink, node: &str, events: &[Bytes]) -> Result<u64, SendError> {
    let count = events.len() as u64;
    match sink {
        Sink::File(path) => {
            let (path, events) = (path.clone(), events.to_vec());
            tokio::task::spawn_blocking(move || append_lines(&path, &events))
                .await
                .map_err(|e| SendError::new(e.to_string()))?
                .map_err(SendError::new)?;
            Ok(count)
        }
        Sink::Controller(controller) => {
            // An `EventBatch`, of events that are JSON already.
            let mut body =
                Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 64);
            body.extend_from_slice(b"{\"node\":");
            serde_json::to_writer(&mut body, node).map_err(|e| SendError::new(e.to_string()))?;
            body.extend_from_slice(b",\"events\":[");
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(event);
            }
            body.extend_from_slice(b"]}");
            controller
                .send(
                    hyper::Method::POST,
                    "/v1/events",
                    Some(body),
                    Duration::from_secs(30),
                )
                .await?;
            Ok(count)
        }
    }
}

/// An error with its sources: hyper's client says only "client error (Connect)", the cause
/// (refused, unknown issuer, DNS) is below it.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Long-polls the controller for commands and hands them to the tasks' own long-polls.
pub async fn relay_commands(
    sink: Sink,
    node: String,
    commands: Arc<Commands>,
    mut stop: watch::Receiver<bool>,
) {
    let Sink::Controller(controller) = sink else {
        return;
    };
    let path = format!("/v1/nodes/{node}/commands?wait=30s");
    let mut backoff = Backoff::new();
    loop {
        let poll = async {
            let response = controller
                .send(hyper::Method::GET, &path, None, Duration::from_secs(45))
                .await?;
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            serde_json::from_slice::<NodeCommands>(&bytes).map_err(|e| format!("bad answer: {e}"))
        };
        let outcome = tokio::select! {
            outcome = poll => outcome,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(list) => {
                backoff.reset();
                for c in list.commands {
                    if let Command::Signal { signal } = c.command
                        && !(1..=64).contains(&signal)
                    {
                        warn!(task = %c.task_id, signal, "ignoring a command with no such signal");
                        continue;
                    }
                    info!(task = %c.task_id, attempt = c.attempt, command = ?c.command, "command relayed");
                    commands.push(c.workflow.as_deref(), &c.task_id, c.attempt, c.command);
                }
            }
            Err(e) => {
                warn!(error = %e, "polling the controller for commands");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.step()) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Tells the controller every 10 s that this node's agent is alive, and who it serves.
pub async fn heartbeats(
    sink: Sink,
    node: String,
    commands: Arc<Commands>,
    outbox: Outbox,
    mut stop: watch::Receiver<bool>,
) {
    let Sink::Controller(controller) = sink else {
        return;
    };
    let path = format!("/v1/nodes/{node}/heartbeat");
    loop {
        let beat = Heartbeat {
            node: node.clone(),
            timestamp: protocol::time::format_rfc3339(std::time::SystemTime::now()),
            active: commands
                .active()
                .into_iter()
                .map(|(task_id, attempt)| TaskRef { task_id, attempt })
                .collect(),
            undelivered_bytes: outbox.bytes.load(std::sync::atomic::Ordering::Relaxed),
        };
        let body = serde_json::to_vec(&beat).unwrap_or_default();
        if let Err(e) = controller
            .send(
                hyper::Method::POST,
                &path,
                Some(body),
                Duration::from_secs(5),
            )
            .await
        {
            debug!(error = %e, "heartbeat");
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = stop.changed() => return,
        }
    }
}
