//! `make soak`: the agent under chaos for SOAK_MINUTES (a benchmark, not a test). Task attempts
//! (start, progress, an upload, its download, the result) run against one agent while it is
//! `kill -9`ed and restarted every 30-60 s, the controller goes down and up, the S3 server
//! (behind a proxy) stalls and refuses, and the journal's disk (a 32 MiB tmpfs) fills. Then,
//! with the chaos stopped: every acknowledged event delivered, no event key with two different
//! events, every stored object whole with the SHA-256 it was acknowledged with (or never
//! acknowledged), no temporary file left, and RSS and open fds compared between the second
//! sixth of the run and the last.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use sha2::{Digest, Sha256};

use emissary_tests::agent::Agent;
use emissary_tests::controller::{Controller, NODE_SECRET};
use emissary_tests::s3::{self, S3Server};
use emissary_tests::tmpfs::Tmpfs;

const WORKFLOW: &str = "soak";

fn main() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30.0);
    let attempts: u64 = std::env::var("SOAK_ATTEMPTS")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(1000);
    let run = Duration::from_secs_f64(minutes * 60.0);
    let dir = std::env::temp_dir().join(format!("emissary-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("agent/data/journal")).unwrap();
    let _journal = Tmpfs::mount(&dir.join("agent/data/journal"), "32m");

    let s3 = S3Server::start(&dir.join("s3"), 0);
    let proxy = Proxy::start(s3.addr);
    let mut controller = Controller::start();
    let agent = Arc::new(Mutex::new(start_agent(
        &dir.join("agent"),
        &controller,
        &proxy,
    )));
    let api = agent.lock().unwrap().api;
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    eprintln!(
        "soak: {minutes} min, {attempts} attempts, in {}",
        dir.display()
    );

    // The load: attempts spread over the run, four at a time.
    let next = Arc::new(AtomicU64::new(0));
    let pace = run.mul_f64(0.9) / attempts as u32;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (ledger, next) = (ledger.clone(), next.clone());
            thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= attempts {
                        return;
                    }
                    let due = started + pace * n as u32;
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    attempt(api, n, &ledger);
                }
            })
        })
        .collect();

    // The samples: the agent's RSS and fds every 5 s.
    let samples = Arc::new(Mutex::new(Vec::<(f64, u64, u64)>::new()));
    let sampler = {
        let (agent, samples, stop) = (agent.clone(), samples.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let pid = agent.lock().unwrap().pid();
                if let Some((rss, fds)) = usage(pid) {
                    let at = started.elapsed().as_secs_f64();
                    samples.lock().unwrap().push((at, rss, fds));
                }
                thread::sleep(Duration::from_secs(5));
            }
        })
    };

    // The chaos, until the run's time is up.
    let mut rng = Rng(started.elapsed().as_nanos() as u64 | 1);
    let mut next_kill = Instant::now() + Duration::from_secs(rng.between(30, 60));
    let mut next_controller = Instant::now() + Duration::from_secs(rng.between(20, 40));
    let mut next_s3 = Instant::now() + Duration::from_secs(rng.between(20, 40));
    let mut next_fill = Instant::now() + Duration::from_secs(rng.between(60, 120));
    let (mut kills, mut outages, mut s3_faults, mut fills) = (0, 0, 0, 0);
    let filler = dir.join("agent/data/journal/filler");
    while started.elapsed() < run {
        let now = Instant::now();
        if now >= next_kill {
            agent.lock().unwrap().crash_and_restart();
            kills += 1;
            next_kill = now + Duration::from_secs(rng.between(30, 60));
        }
        if now >= next_controller {
            controller.down();
            thread::sleep(Duration::from_secs(rng.between(3, 15)));
            controller.up();
            outages += 1;
            next_controller = Instant::now() + Duration::from_secs(rng.between(20, 40));
        }
        if now >= next_s3 {
            let fault = if rng.between(0, 1) == 0 {
                Fault::Stall
            } else {
                Fault::Refuse
            };
            proxy.fault.store(fault as u8, Ordering::SeqCst);
            thread::sleep(Duration::from_secs(rng.between(3, 15)));
            proxy.fault.store(Fault::None as u8, Ordering::SeqCst);
            s3_faults += 1;
            next_s3 = Instant::now() + Duration::from_secs(rng.between(20, 40));
        }
        if now >= next_fill {
            // Fill the journal's disk for a while: appends fail, nothing acknowledged is lost.
            if let Ok(mut file) = std::fs::File::create(&filler) {
                while file.write_all(&[b'.'; 65536]).is_ok() {}
            }
            thread::sleep(Duration::from_secs(rng.between(5, 15)));
            let _ = std::fs::remove_file(&filler);
            fills += 1;
            next_fill = Instant::now() + Duration::from_secs(rng.between(60, 120));
        }
        thread::sleep(Duration::from_millis(200));
    }
    let chaos_ended = started.elapsed();
    for worker in workers {
        worker.join().unwrap();
    }
    let loaded = started.elapsed();
    let _ = std::fs::remove_file(&filler);
    // Everything acknowledged reaches the controller once the chaos has stopped.
    let acked = ledger.acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    let delivered = loop {
        let keys: BTreeSet<EventKey> = controller.events().iter().map(event_key).collect();
        if acked.is_subset(&keys) || Instant::now() > deadline {
            break keys;
        }
        thread::sleep(Duration::from_secs(1));
    };
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let agent_dir = agent.lock().unwrap().dir.clone();
    drop(agent);

    // The verdicts.
    let mut failures = Vec::new();
    let lost: Vec<_> = acked.difference(&delivered).collect();
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged events never delivered: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        ));
    }
    let mut by_key: BTreeMap<EventKey, BTreeSet<String>> = BTreeMap::new();
    let events = controller.events();
    for event in &events {
        by_key
            .entry(event_key(event))
            .or_default()
            .insert(event.to_string());
    }
    let conflicting = by_key.values().filter(|v| v.len() > 1).count();
    if conflicting > 0 {
        failures.push(format!(
            "{conflicting} event keys carry two different events"
        ));
    }
    let uploads = ledger.uploads.lock().unwrap().clone();
    let mut objects = 0;
    for file in files(&s3.root.join(s3::BUCKET)) {
        let key = file
            .strip_prefix(s3.root.join(s3::BUCKET))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Some(sent) = uploads.get(&key) else {
            failures.push(format!("an object nobody uploaded: {key}"));
            continue;
        };
        objects += 1;
        let stored = hex(&Sha256::digest(std::fs::read(&file).unwrap()));
        if &stored != sent {
            failures.push(format!("{key} is not what was sent (torn or mixed)"));
        }
    }
    for key in ledger.acked_uploads.lock().unwrap().iter() {
        if !s3.root.join(s3::BUCKET).join(key).exists() {
            failures.push(format!("acknowledged upload {key} is gone"));
        }
    }
    let name = |f: &PathBuf| f.file_name().unwrap().to_string_lossy().into_owned();
    let temporary: Vec<_> = files(&agent_dir.join("data"))
        .into_iter()
        .filter(|f| name(f).starts_with('.') || name(f).contains(".tmp"))
        .chain(
            files(&s3.root)
                .into_iter()
                .filter(|f| name(f).starts_with(".tmp")),
        )
        .collect();
    // A multipart upload its agent was killed in the middle of: a real bucket's lifecycle rule
    // (AbortIncompleteMultipartUpload, in the README) removes it; nothing of it is visible.
    let incomplete = files(&s3.root)
        .iter()
        .filter(|f| name(f).starts_with(".upload-"))
        .count();
    if !temporary.is_empty() {
        failures.push(format!(
            "{} temporary files left: {:?}",
            temporary.len(),
            &temporary[..temporary.len().min(5)]
        ));
    }
    let samples = samples.lock().unwrap().clone();
    let total = chaos_ended.as_secs_f64();
    let window = |from: f64, to: f64| -> (f64, f64) {
        let inside: Vec<_> = samples
            .iter()
            .filter(|(at, ..)| *at >= from && *at < to)
            .collect();
        (
            median(inside.iter().map(|s| s.1 as f64).collect()),
            median(inside.iter().map(|s| s.2 as f64).collect()),
        )
    };
    let (early_rss, early_fds) = window(total / 6.0, total / 3.0);
    let (late_rss, late_fds) = window(total * 5.0 / 6.0, total);
    let drift = |early: f64, late: f64| (late - early) / early * 100.0;
    if drift(early_rss, late_rss) > 10.0 {
        failures.push(format!(
            "RSS grew {:.0} % ({early_rss} → {late_rss} KiB)",
            drift(early_rss, late_rss)
        ));
    }
    if drift(early_fds, late_fds) > 10.0 {
        failures.push(format!(
            "open fds grew {:.0} % ({early_fds} → {late_fds})",
            drift(early_fds, late_fds)
        ));
    }

    let stats = &ledger.stats;
    println!(
        "\n| soak | {minutes} min of chaos, {:.0} s in all |\n|---|---|\n\
         | task attempts | {} done of {attempts} ({} given up) |\n\
         | requests | {} answered, {} retried (refused, cut or unanswered) |\n\
         | events acknowledged / delivered (deduplicated) | {} / {} ({} copies in all) |\n\
         | uploads acknowledged / objects stored / multipart uploads cut by a kill | {} / {objects} / {incomplete} |\n\
         | agent kill -9s, controller outages, S3 stalls or refusals, journal disk fills | {kills}, {outages}, {s3_faults}, {fills} |\n\
         | agent RSS, median, 2nd sixth → last sixth | {:.1} → {:.1} MiB ({:+.0} %) |\n\
         | agent open fds, median, 2nd sixth → last sixth | {early_fds:.0} → {late_fds:.0} ({:+.0} %) |\n\
         | verdict | {} |",
        loaded.as_secs_f64(),
        stats.done.load(Ordering::SeqCst),
        stats.given_up.load(Ordering::SeqCst),
        stats.answered.load(Ordering::SeqCst),
        stats.retried.load(Ordering::SeqCst),
        acked.len(),
        delivered.len(),
        events.len(),
        ledger.acked_uploads.lock().unwrap().len(),
        early_rss / 1024.0,
        late_rss / 1024.0,
        drift(early_rss, late_rss),
        drift(early_fds, late_fds),
        if failures.is_empty() {
            "nothing lost, nothing torn, nothing left over".to_owned()
        } else {
            failures.join("; ")
        }
    );
    drop(s3);
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

type EventKey = (String, String, u64, u64);

fn event_key(event: &serde_json::Value) -> EventKey {
    (
        event["workflow"].as_str().unwrap_or("").to_owned(),
        event["task_id"].as_str().unwrap_or("").to_owned(),
        event["attempt"].as_u64().unwrap_or(0),
        event["seq"].as_u64().unwrap_or(0),
    )
}

#[derive(Default)]
struct Ledger {
    /// Events the agent answered 200 with their seq.
    acked: Mutex<BTreeSet<EventKey>>,
    /// Every upload tried: key → SHA-256 of its bytes.
    uploads: Mutex<BTreeMap<String, String>>,
    /// Uploads the agent acknowledged (with that SHA-256).
    acked_uploads: Mutex<BTreeSet<String>>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    done: AtomicU64,
    given_up: AtomicU64,
    answered: AtomicU64,
    retried: AtomicU64,
}

/// One task attempt, as an emissary makes it, retrying what the chaos breaks.
fn attempt(api: SocketAddr, n: u64, ledger: &Ledger) {
    let task = format!("t-{n}");
    let token = sign(&task);
    let path = |rest: &str| format!("/v1/tasks/{task}/0/{rest}");
    let mut rng = Rng(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let ack = |answer: &[u8]| {
        if let Some(seq) = serde_json::from_slice::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["seq"].as_u64())
        {
            ledger
                .acked
                .lock()
                .unwrap()
                .insert((WORKFLOW.into(), task.clone(), 0, seq));
        }
    };
    let give_up = || {
        ledger.stats.given_up.fetch_add(1, Ordering::SeqCst);
    };
    let start = serde_json::json!({"container": "main", "started_at": "2026-01-01T00:00:00Z"});
    let Some(answer) = call(
        api,
        &token,
        "POST",
        &path("start"),
        &start.to_string().into_bytes(),
        ledger,
    ) else {
        return give_up();
    };
    ack(&answer);
    for i in 1..=3 {
        let body = serde_json::json!({"container": "main", "progress": format!("{i}/3")});
        let Some(answer) = call(
            api,
            &token,
            "POST",
            &path("progress"),
            &body.to_string().into_bytes(),
            ledger,
        ) else {
            return give_up();
        };
        ack(&answer);
    }
    let size = rng.between(0, 2 << 20) as usize;
    let bytes: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
    let sha = hex(&Sha256::digest(&bytes));
    let key = format!("emissary/default/{WORKFLOW}/{task}/0/out");
    ledger
        .uploads
        .lock()
        .unwrap()
        .insert(key.clone(), sha.clone());
    let Some(answer) = call(api, &token, "PUT", &path("outputs/out"), &bytes, ledger) else {
        return give_up();
    };
    let stored: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    assert_eq!(
        stored["sha256"],
        sha.as_str(),
        "the agent stored other bytes"
    );
    ledger.acked_uploads.lock().unwrap().insert(key.clone());
    let Some(back) = call(
        api,
        &token,
        "GET",
        &format!("{}?key={key}", path("inputs/out")),
        b"",
        ledger,
    ) else {
        return give_up();
    };
    assert!(back == bytes, "{task}: the download is not the upload");
    let result = serde_json::json!({
        "container": "main", "exit_code": 0, "reason": "Completed",
        "outputs": {"parameters": [{"name": "n", "value": n.to_string()}],
                    "artifacts": [{"name": "out", "key": key, "size": size, "sha256": sha, "archive": "none"}]}
    });
    match call(
        api,
        &token,
        "POST",
        &path("result"),
        &result.to_string().into_bytes(),
        ledger,
    ) {
        Some(answer) => ack(&answer),
        None => return give_up(),
    }
    ledger.stats.done.fetch_add(1, Ordering::SeqCst);
}

/// A request retried with backoff, for up to five minutes, until the agent answers 2xx; a
/// result answered 409 was recorded by an earlier try whose answer was lost.
fn call(
    api: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: &[u8],
    ledger: &Ledger,
) -> Option<Vec<u8>> {
    let until = Instant::now() + Duration::from_secs(300);
    let mut backoff = Duration::from_millis(100);
    while Instant::now() < until {
        match request(api, token, method, path, body) {
            Ok((status, answer)) if (200..300).contains(&status) => {
                ledger.stats.answered.fetch_add(1, Ordering::SeqCst);
                return Some(answer);
            }
            Ok((409, _)) if path.ends_with("/result") => return Some(Vec::new()),
            Ok((status, answer)) if status < 500 && status != 429 && status != 408 => {
                panic!(
                    "{method} {path}: {status} {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            _ => {}
        }
        ledger.stats.retried.fetch_add(1, Ordering::SeqCst);
        thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    None
}

/// One HTTP/1.1 request on its own connection; the status and the (de-chunked) body.
fn request(
    api: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&api, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    stream.set_write_timeout(Some(Duration::from_secs(90)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut rest = &raw[head_end + 4..];
    if !head.contains("transfer-encoding: chunked") {
        if let Some(length) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            && rest.len() != length
        {
            return Err(std::io::Error::other("a cut body"));
        }
        return Ok((status, rest.to_vec()));
    }
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| std::io::Error::other("a cut chunked body"))?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok((status, body));
        }
        if rest.len() < size + 2 {
            return Err(std::io::Error::other("a cut chunk"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A task token for `task`, signed here with the node key (the documented format).
fn sign(task: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 4 * 3600;
    let claims = serde_json::json!({"wf": WORKFLOW, "task": task, "attempt": 0, "exp": exp});
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(NODE_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!(
        "{body}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// The release agent on the S3 server behind `proxy`, delivering to `controller`.
fn start_agent(dir: &Path, controller: &Controller, proxy: &Proxy) -> Agent {
    Agent::start_release(
        dir.to_owned(),
        &[
            "--controller-url",
            &controller.url(),
            "--store",
            &format!("s3://{}/emissary", s3::BUCKET),
            "--s3-endpoint",
            &format!("http://{}", proxy.addr),
            "--s3-region",
            "us-east-1",
            "--s3-path-style",
            "--journal-max-bytes",
            "16777216",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
        ],
    )
}

#[repr(u8)]
#[derive(Clone, Copy)]
enum Fault {
    None = 0,
    /// Connections are taken and nothing is forwarded either way.
    Stall = 1,
    /// Connections are closed at once.
    Refuse = 2,
}

/// A TCP proxy in front of the S3 server that can stall or refuse.
struct Proxy {
    addr: SocketAddr,
    fault: Arc<AtomicU8>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let faults = fault.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let fault = faults.clone();
                thread::spawn(move || {
                    match fault.load(Ordering::SeqCst) {
                        2 => return,
                        1 => {
                            while fault.load(Ordering::SeqCst) == 1 {
                                thread::sleep(Duration::from_millis(100));
                            }
                            return; // a stalled connection is dropped, never resumed
                        }
                        _ => {}
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        return;
                    };
                    pipe(client, server, fault);
                });
            }
        });
        Proxy { addr, fault }
    }
}

/// Copies both ways until either side ends; a stall freezes it, a refusal cuts it.
fn pipe(client: TcpStream, server: TcpStream, fault: Arc<AtomicU8>) {
    let copy = |mut from: TcpStream, mut to: TcpStream, fault: Arc<AtomicU8>| {
        let mut buf = [0u8; 64 * 1024];
        loop {
            while fault.load(Ordering::SeqCst) == 1 {
                thread::sleep(Duration::from_millis(100));
            }
            if fault.load(Ordering::SeqCst) == 2 {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    };
    let (c2, s2, f2) = (
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        fault.clone(),
    );
    let up = thread::spawn(move || copy(c2, s2, f2));
    copy(server, client, fault);
    let _ = up.join();
}

/// The agent's RSS (KiB) and open fds.
fn usage(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files(&path)),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
    out
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// xorshift64: the chaos and the payloads, reproducible enough, with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}
