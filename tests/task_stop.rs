//! A stop arriving while no command runs (issue 14, item 5): during input staging, output
//! upload, and a containerSet's retry pause, SIGTERM or the controller's terminate is acted on
//! at once, against an agent slow enough that the transfer would otherwise take minutes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

/// An agent that answers starts and results at once, sends inputs a byte every 100 ms, reads
/// uploads a KiB every 100 ms, and hands out `terminate` on the command poll when told to.
struct SlowAgent {
    addr: std::net::SocketAddr,
    results: Arc<Mutex<Vec<Value>>>,
    terminate: Arc<Mutex<bool>>,
}

impl SlowAgent {
    fn start() -> SlowAgent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let results = Arc::new(Mutex::new(Vec::new()));
        let terminate = Arc::new(Mutex::new(false));
        let (r, t) = (results.clone(), terminate.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, t) = (r.clone(), t.clone());
                std::thread::spawn(move || serve(stream, &r, &t));
            }
        });
        SlowAgent {
            addr,
            results,
            terminate,
        }
    }

    fn env(&self, cmd: &mut std::process::Command) {
        cmd.env("EMISSARY_AGENT_ADDR", self.addr.to_string())
            .env("EMISSARY_TOKEN", "t0k3n")
            .env("EMISSARY_TASK_ID", "t")
            .env("EMISSARY_AGENT_RETRY", "2s");
    }

    fn result(&self, limit: Duration) -> Value {
        let found = wait_until(limit, || !self.results.lock().unwrap().is_empty());
        assert!(found, "no result reached the agent");
        self.results.lock().unwrap()[0].clone()
    }
}

fn serve(stream: TcpStream, results: &Mutex<Vec<Value>>, terminate: &Mutex<bool>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut out = stream;
    let answer = |out: &mut TcpStream, status: &str, body: &str| {
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    if target.contains("/inputs/") {
        let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n");
        while out.write_all(b"x").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    } else if target.contains("/outputs/") {
        let mut buf = [0u8; 1024];
        while reader.read(&mut buf).is_ok_and(|n| n > 0) {
            std::thread::sleep(Duration::from_millis(100));
        }
    } else if target.contains("/commands") {
        std::thread::sleep(Duration::from_millis(300));
        if *terminate.lock().unwrap() {
            answer(&mut out, "200 OK", r#"[{"kind":"terminate"}]"#);
        } else {
            answer(&mut out, "204 No Content", "");
        }
    } else {
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        if target.ends_with("/result") {
            results
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
        }
        answer(&mut out, "200 OK", r#"{"seq":1}"#);
    }
}

/// Runs `spec` under the slow agent; after a second stops it with `stop`; returns the exit
/// code, how long the stop took to end the emissary, and the result the agent got.
fn stopped_after_a_second(
    dir: &Dir,
    spec: Value,
    stop: impl FnOnce(&SlowAgent, u32),
) -> (Option<i32>, Duration, Value) {
    let agent = SlowAgent::start();
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.env(&mut cmd);
    let running = start(&mut cmd);
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    stop(&agent, running.pid());
    let out = running.finish(Duration::from_secs(20));
    (
        out.code,
        stopped.elapsed(),
        agent.result(Duration::from_secs(5)),
    )
}

#[test]
fn sigterm_during_input_staging_stops_the_step_at_once() {
    let dir = Dir::new("stop-staging");
    let spec = json!({
        "container": {"command": ["echo", "never runs"]},
        "inputs": {"artifacts": [{"name": "big", "path": dir.join("big").to_str().unwrap(),
                                  "key": "default/default/p/0/big"}]}
    });
    let (code, took, result) =
        stopped_after_a_second(&dir, spec, |_, pid| kill(pid, libc::SIGTERM));
    assert_eq!(code, Some(143));
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
    assert_eq!(result["reason"], "Signaled", "{result:#}");
    assert_eq!(result["error"]["message"], "stopped while staging inputs");
}

#[test]
fn the_controllers_terminate_during_input_staging_stops_the_step_at_once() {
    let dir = Dir::new("stop-staging-terminate");
    let spec = json!({
        "container": {"command": ["echo", "never runs"]},
        "inputs": {"artifacts": [{"name": "big", "path": dir.join("big").to_str().unwrap(),
                                  "key": "default/default/p/0/big"}]}
    });
    let (code, took, result) = stopped_after_a_second(&dir, spec, |agent, _| {
        *agent.terminate.lock().unwrap() = true
    });
    assert_eq!(code, Some(143));
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
    assert_eq!(result["reason"], "Signaled", "{result:#}");
}

#[test]
fn sigterm_during_output_upload_stops_the_upload_and_the_step_reports() {
    let dir = Dir::new("stop-upload");
    let big = dir.join("big");
    std::fs::write(&big, noise(50 << 20, 7)).unwrap();
    let spec = json!({
        "container": {"command": ["true"]},
        "outputs": {"artifacts": [{"name": "big", "path": big.to_str().unwrap(),
                                   "archive": {"none": {}}}]}
    });
    let (code, took, result) =
        stopped_after_a_second(&dir, spec, |_, pid| kill(pid, libc::SIGTERM));
    assert_eq!(code, Some(143));
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
    assert_eq!(
        result["error"]["message"], "stopped by SIGTERM while uploading outputs",
        "{result:#}"
    );
    assert!(
        result["outputs"]["artifacts"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
}

#[test]
fn sigterm_during_a_retry_pause_ends_the_retries() {
    let dir = Dir::new("stop-retry-pause");
    let spec = json!({"containerSet": {
        "retryStrategy": {"retries": "3", "duration": "60s"},
        "containers": [{"name": "main", "command": ["false"]}]}});
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    let running = start(&mut cmd);
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    kill(running.pid(), libc::SIGTERM);
    let out = running.finish(Duration::from_secs(20));
    out.assert_code(143);
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped.elapsed()
    );
}
