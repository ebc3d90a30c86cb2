//! The agent's benchmarks: a 1 GiB artifact through emissary → agent → S3 against the SDK
//! uploading the same file directly; 1000 tasks long-polling while 10,000 events/s go through
//! the journal, with the latency of a relayed signal.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use emissary_tests::controller::Controller;
use emissary_tests::s3::{self, S3Server};

use crate::median;

struct Agent {
    child: Child,
    api: SocketAddr,
    secret: PathBuf,
}

impl Agent {
    fn start(dir: &Path, args: &[&str]) -> Agent {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/emissary-agent");
        std::fs::create_dir_all(dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, emissary_tests::controller::NODE_SECRET).unwrap();
        let ready = dir.join("ready.json");
        let child = Command::new(&bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--secret-file")
            .arg(&secret)
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (make bench builds it)", bin.display()));
        let until = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < until, "the agent did not start");
            thread::sleep(Duration::from_millis(20));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
        Agent {
            child,
            api: json["api"].as_str().unwrap().parse().unwrap(),
            secret,
        }
    }

    fn token(&self, task: &str) -> String {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/emissary-agent");
        let out = Command::new(bin)
            .args([
                "token",
                "--task",
                task,
                "--attempt",
                "0",
                "--workflow",
                "bench",
            ])
            .arg("--secret-file")
            .arg(&self.secret)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The agent's own peak RSS so far, MB.
    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb / 1024.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1 GiB through emissary → agent → S3 vs the SDK's direct upload of the same file.
pub fn upload(emissary: &Path, scratch: &Path, report: &mut String) {
    let dir = scratch.join("agent-upload");
    let server = S3Server::start(&dir.join("s3"), 0);
    let store = format!("s3://{}/bench", s3::BUCKET);
    let agent = Agent::start(
        &dir.join("agent"),
        &[
            "--store",
            &store,
            "--s3-endpoint",
            &server.endpoint(),
            "--s3-path-style",
        ],
    );
    let file = dir.join("artifact.bin");
    let size: u64 = 1 << 30;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {size} /dev/urandom > {}", file.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let spec = serde_json::json!({"container": {"command": ["true"]},
                                  "outputs": {"artifacts": [{"name": "big", "path": file, "archive": {"none": {}}}]}})
    .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(server.endpoint())
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                s3::ACCESS_KEY,
                s3::SECRET_KEY,
                None,
                None,
                "bench",
            ))
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        aws_sdk_s3::Client::from_conf(config)
    });
    let (mut ours, mut direct, mut multiparts) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let task = format!("upload-{round}");
        let start = Instant::now();
        let status = Command::new(emissary)
            .args(["run", "--root"])
            .arg(dir.join(&task))
            .env("EMISSARY_TEMPLATE", &spec)
            .env("EMISSARY_AGENT_ADDR", agent.api.to_string())
            .env("EMISSARY_TOKEN", agent.token(&task))
            .env("EMISSARY_TASK_ID", &task)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the emissary's upload failed");
        ours.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        runtime.block_on(async {
            let body = aws_sdk_s3::primitives::ByteStream::from_path(&file)
                .await
                .unwrap();
            client
                .put_object()
                .bucket(s3::BUCKET)
                .key(format!("direct/{round}"))
                .body(body)
                .send()
                .await
                .unwrap();
        });
        direct.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        runtime.block_on(multipart(&client, &file, &format!("multipart/{round}")));
        multiparts.push(start.elapsed().as_secs_f64());
    }
    let mb = size as f64 / 1e6;
    let (ours, direct, multipart) = (
        mb / median(ours),
        mb / median(direct),
        mb / median(multiparts),
    );
    writeln!(
        report,
        "| 1 GiB artifact, emissary → agent → S3 (s3s-fs), median of 3 | {ours:.0} MB/s, agent peak RSS {:.1} MB | aws-sdk-s3 direct from the file: `put_object` {direct:.0} MB/s; multipart as the agent does it (8 MiB parts, 3 in flight) {multipart:.0} MB/s | {:.2}× / {:.2}× | agent RSS ≤ 64 MB |",
        agent.peak_rss_mb(),
        ours / direct,
        ours / multipart
    )
    .unwrap();
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SDK uploading `file` in 8 MiB parts, three at a time: the agent's scheme without the
/// emissary and the agent in between.
async fn multipart(client: &aws_sdk_s3::Client, file: &Path, key: &str) {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    use tokio::io::AsyncReadExt;
    let created = client
        .create_multipart_upload()
        .bucket(s3::BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = created.upload_id().unwrap().to_owned();
    let mut source = tokio::fs::File::open(file).await.unwrap();
    let mut in_flight = std::collections::VecDeque::new();
    let mut parts = Vec::new();
    for number in 1.. {
        let mut part = Vec::with_capacity(8 << 20);
        while part.len() < 8 << 20 {
            if source.read_buf(&mut part).await.unwrap() == 0 {
                break;
            }
        }
        if part.is_empty() {
            break;
        }
        let request = client
            .upload_part()
            .bucket(s3::BUCKET)
            .key(key)
            .upload_id(&id)
            .part_number(number)
            .body(part.into());
        in_flight.push_back(tokio::spawn(async move {
            let sent = request.send().await.unwrap();
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(sent.e_tag().map(str::to_owned))
                .build()
        }));
        if in_flight.len() > 2 {
            parts.push(in_flight.pop_front().unwrap().await.unwrap());
        }
    }
    for handle in in_flight {
        parts.push(handle.await.unwrap());
    }
    let completed = CompletedMultipartUpload::builder()
        .set_parts(Some(parts))
        .build();
    client
        .complete_multipart_upload()
        .bucket(s3::BUCKET)
        .key(key)
        .upload_id(&id)
        .multipart_upload(completed)
        .send()
        .await
        .unwrap();
}

/// A keep-alive HTTP/1.1 connection for many small requests.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(addr: SocketAddr) -> Connection {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Connection {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn post(&mut self, path: &str, token: &str, body: &[u8]) -> u16 {
        write!(self.writer, "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        self.writer.write_all(body).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        status
    }
}

/// 1000 tasks long-polling for commands while events stream through the journal at a target
/// of 10,000/s; the latency of a signal from the controller to a task's long-poll.
pub fn longpoll(scratch: &Path, report: &mut String) {
    const TASKS: usize = 1000;
    const RATE: u64 = 10_000;
    let dir = scratch.join("agent-longpoll");
    let controller = Controller::start();
    let agent = Agent::start(&dir.join("agent"), &["--controller-url", &controller.url()]);
    let tokens: Vec<String> = (0..TASKS).map(|i| agent.token(&format!("t{i}"))).collect();

    // Each task: one long-poll at a time, reporting when a command arrives.
    let (arrived, arrivals) = mpsc::channel::<(usize, Instant)>();
    let stop = Arc::new(AtomicBool::new(false));
    for (i, token) in tokens.iter().enumerate() {
        let (token, arrived, stop, api) = (token.clone(), arrived.clone(), stop.clone(), agent.api);
        thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut stream = TcpStream::connect(api).unwrap();
                    write!(stream, "GET /v1/tasks/t{i}/0/commands?wait=20s HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer);
                    if answer.starts_with("HTTP/1.1 200") {
                        let _ = arrived.send((i, Instant::now()));
                    }
                }
            })
            .unwrap();
    }
    thread::sleep(Duration::from_secs(2));

    // Events: 16 connections, each paced to a sixteenth of the rate.
    let sent = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..16)
        .map(|w| {
            let (token, sent, stop, api) =
                (tokens[w].clone(), sent.clone(), stop.clone(), agent.api);
            thread::spawn(move || {
                let mut connection = Connection::open(api);
                let body = br#"{"container": "main", "progress": "1/2"}"#;
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = start + Duration::from_secs_f64(n as f64 / (RATE as f64 / 16.0));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    assert_eq!(
                        connection.post(&format!("/v1/tasks/t{w}/0/progress"), &token, body),
                        200
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();

    // Signals, one at a time, to random tasks, while the load runs.
    let started = Instant::now();
    let mut latencies = Vec::new();
    for k in 0..100 {
        let task = (k * 7919) % TASKS;
        let queued = Instant::now();
        controller.command(serde_json::json!({"task_id": format!("t{task}"), "attempt": 0, "kind": "signal", "signal": 10}));
        loop {
            let (who, when) = arrivals
                .recv_timeout(Duration::from_secs(10))
                .expect("a signal never arrived");
            if who == task {
                latencies.push(when.duration_since(queued).as_secs_f64() * 1000.0);
                break;
            }
        }
        thread::sleep(Duration::from_millis(30));
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        let _ = worker.join();
    }
    let rate = sent.load(Ordering::Relaxed) as f64 / elapsed;
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    writeln!(
        report,
        "| {TASKS} tasks long-polling + events at {RATE}/s target through the journal | {rate:.0} events/s journaled (fsynced); relayed signal p50 {:.1} ms, p99 {p99:.1} ms; agent peak RSS {:.1} MB | | | p99 ≤ 50 ms, RSS ≤ 64 MB |",
        median(latencies.clone()),
        agent.peak_rss_mb()
    )
    .unwrap();
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}
