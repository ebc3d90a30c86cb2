//! A small reference controller: records event batches and heartbeats, hands out queued
//! commands to the agent's long-poll, and can be told to fail or go down. Plain std threads
//! on 127.0.0.1, an ephemeral port (kept across a down/up so the agent finds it again),
//! HTTP or HTTPS. Like a real controller it answers 401 to a request without a valid node
//! token, verified here independently of the agent's code, from the documented format.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The node secret the tests' agents are given, and this controller verifies with.
pub const NODE_SECRET: &str = "a-test-node-secret-of-32-bytes!!";

#[derive(Default)]
struct State {
    events: Vec<Value>,
    batches: usize,
    heartbeats: Vec<Value>,
    commands: VecDeque<Value>,
    /// Answer event batches with 503.
    failing: bool,
    rejected_handshakes: usize,
    /// Requests refused for a missing, forged, expired or other node's token.
    unauthorized: usize,
    /// Event batches with a larger body are refused with 413.
    max_body: Option<usize>,
    /// The largest event batch body taken, in bytes.
    largest_batch: usize,
    /// Verify each node's token with the key derived for it from this master key (see
    /// `emissary-agent node-key`), rather than with [`NODE_SECRET`].
    master: Option<Vec<u8>>,
    /// Take event batches without reading them (a benchmark's).
    dropping: bool,
}

pub struct Controller {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    running: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Controller {
    pub fn start() -> Controller {
        Controller::start_with(None)
    }

    /// Serves HTTPS with this PEM certificate chain and private key.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Controller {
        let certs = rustls::pki_types::pem::PemObject::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key: rustls::pki_types::PrivateKeyDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Controller::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Controller {
        let mut c = Controller {
            addr: "127.0.0.1:0".parse().unwrap(),
            state: Arc::default(),
            running: Arc::new(AtomicBool::new(false)),
            thread: None,
            tls,
        };
        c.up();
        c
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// How many requests were refused with 401.
    pub fn unauthorized(&self) -> usize {
        self.state.0.lock().unwrap().unauthorized
    }

    /// How many TLS handshakes failed (the client did not trust the certificate).
    pub fn rejected_handshakes(&self) -> usize {
        self.state.0.lock().unwrap().rejected_handshakes
    }

    /// Starts serving (again, on the same port after `down`).
    pub fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).unwrap();
        self.addr = listener.local_addr().unwrap();
        self.running.store(true, Ordering::SeqCst);
        let (state, running, tls) = (self.state.clone(), self.running.clone(), self.tls.clone());
        self.thread = Some(thread::spawn(move || {
            for stream in listener.incoming() {
                if !running.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (state, running, tls) = (state.clone(), running.clone(), tls.clone());
                thread::spawn(move || match tls {
                    None => serve(stream, &state, &running),
                    Some(config) => serve_tls(config, stream, &state, &running),
                });
            }
        }));
    }

    /// Stops serving: connections are refused until `up`.
    pub fn down(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.state.1.notify_all();
    }

    /// Refuses (413) event batches whose body is larger than `bytes`.
    pub fn set_max_body(&self, bytes: usize) {
        self.state.0.lock().unwrap().max_body = Some(bytes);
    }

    pub fn largest_batch(&self) -> usize {
        self.state.0.lock().unwrap().largest_batch
    }

    /// Verifies node tokens with per-node keys derived from `master`.
    pub fn set_master_key(&self, master: &[u8]) {
        self.state.0.lock().unwrap().master = Some(master.to_vec());
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.0.lock().unwrap().failing = failing;
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.0.lock().unwrap().events.clone()
    }

    /// From now on, takes event batches without parsing or keeping them: a benchmark's would
    /// fill memory and spend the CPU the agent is measured on.
    pub fn drop_events(&self) {
        self.state.0.lock().unwrap().dropping = true;
    }

    pub fn heartbeats(&self) -> usize {
        self.state.0.lock().unwrap().heartbeats.len()
    }

    /// Queues a command (`{"task_id", "attempt", "kind", ...}`) for the node's agent.
    pub fn command(&self, command: Value) {
        self.state.0.lock().unwrap().commands.push_back(command);
        self.state.1.notify_all();
    }

    /// Waits until `count` events arrived; returns them.
    pub fn wait_events(&self, count: usize, limit: Duration) -> Vec<Value> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let events = self.events();
            if events.len() >= count {
                return events;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let events = self.events();
        panic!(
            "expected {count} events within {limit:?}, got {}: {events:#?}",
            events.len()
        );
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.down();
    }
}

/// The key of `node` derived from `master`: HMAC-SHA256(master, "emissary node key\0" NODE),
/// as base64url text (the documented derivation, written here independently of the agent).
pub fn node_key(master: &[u8], node: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(master).unwrap();
    mac.update(b"emissary node key\0");
    mac.update(node.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// The node a token speaks for, if it is signed with its node's key (or [`NODE_SECRET`]
/// without a master key) and not expired.
fn verified_node(token: &str, master: Option<&[u8]>) -> Option<String> {
    let (claims, tag) = token.split_once('.')?;
    let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
    let node = json["node"].as_str()?.to_owned();
    let key = match master {
        Some(master) => node_key(master, &node),
        None => NODE_SECRET.to_owned(),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(claims.as_bytes());
    mac.verify_slice(&URL_SAFE_NO_PAD.decode(tag).ok()?).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (json["exp"].as_u64()? > now).then_some(node)
}

fn serve_tls(
    config: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
    state: &(Mutex<State>, Condvar),
    running: &AtomicBool,
) {
    let mut connection = rustls::ServerConnection::new(config).unwrap();
    while connection.is_handshaking() {
        if connection.complete_io(&mut tcp).is_err() {
            state.0.lock().unwrap().rejected_handshakes += 1;
            return;
        }
    }
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    serve(&mut stream, state, running);
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

/// Requests of one kept-alive connection, until the client closes it or the controller is
/// down (a request then goes unanswered, as if the connection had broken).
fn serve<S: Read + Write>(stream: S, state: &(Mutex<State>, Condvar), running: &AtomicBool) {
    let mut reader = BufReader::new(stream);
    while answer(&mut reader, state, running) {}
}

/// Reads one request and answers it; false when the connection is done.
fn answer<S: Read + Write>(
    reader: &mut BufReader<S>,
    state: &(Mutex<State>, Condvar),
    running: &AtomicBool,
) -> bool {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 || !running.load(Ordering::SeqCst) {
        return false;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut length = 0;
    let mut node = None;
    let master = state.0.lock().unwrap().master.clone();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                node = value
                    .trim()
                    .strip_prefix("Bearer ")
                    .and_then(|t| verified_node(t, master.as_deref()));
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let path = target.split('?').next().unwrap_or("").to_owned();
    // The token must speak for the node named in the path (commands, heartbeats) or batch.
    let named = match path.strip_prefix("/v1/nodes/") {
        Some(rest) => rest.split('/').next().map(str::to_owned),
        None => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|b| b["node"].as_str().map(str::to_owned)),
    };
    let (status, answer) = match (method.as_str(), path.as_str()) {
        _ if node.is_none() || node != named => {
            state.0.lock().unwrap().unauthorized += 1;
            (401, "{\"error\":\"no valid node token\"}".to_owned())
        }
        ("POST", "/v1/events") => {
            let mut s = state.0.lock().unwrap();
            if s.failing {
                (503, "{\"error\":\"failing on purpose\"}".to_owned())
            } else if s.max_body.is_some_and(|max| body.len() > max) {
                (413, "{\"error\":\"batch too large\"}".to_owned())
            } else {
                s.largest_batch = s.largest_batch.max(body.len());
                s.batches += 1;
                if s.dropping {
                    drop(s);
                    return respond(reader, 200, "{}");
                }
                let batch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                s.events
                    .extend(batch["events"].as_array().cloned().unwrap_or_default());
                (200, "{}".to_owned())
            }
        }
        ("POST", p) if p.ends_with("/heartbeat") => {
            state
                .0
                .lock()
                .unwrap()
                .heartbeats
                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            (200, "{}".to_owned())
        }
        ("GET", p) if p.ends_with("/commands") => {
            // Long-poll: up to 30 s for a command.
            crate::process::prefer_short_slices();
            let until = Instant::now() + Duration::from_secs(30);
            let mut s = state.0.lock().unwrap();
            while s.commands.is_empty() && Instant::now() < until && running.load(Ordering::SeqCst)
            {
                s = state
                    .1
                    .wait_timeout(s, Duration::from_millis(200))
                    .unwrap()
                    .0;
            }
            let commands: Vec<Value> = s.commands.drain(..).collect();
            (200, serde_json::json!({ "commands": commands }).to_string())
        }
        _ => (404, "{}".to_owned()),
    };
    respond(reader, status, &answer)
}

/// Writes the answer; false if the connection broke.
fn respond<S: Read + Write>(reader: &mut BufReader<S>, status: u16, answer: &str) -> bool {
    // One write: the pieces of a `write!` would be held back by Nagle's algorithm until the
    // agent's delayed ACK (40 ms) on a kept-alive connection.
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
    let stream = reader.get_mut();
    stream
        .write_all(response.as_bytes())
        .and_then(|()| stream.flush())
        .is_ok()
}
