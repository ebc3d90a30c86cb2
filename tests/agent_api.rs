//! The agent's emissary API: tokens, bad input, streamed artifacts, events, commands.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::agent_util::*;
use crate::controller::Controller;
use crate::util::*;

fn events_file(agent: &Agent) -> Vec<serde_json::Value> {
    std::fs::read_to_string(agent.dir.join("data/events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_token_opens_only_its_own_task_and_nothing_is_written_otherwise() {
    let dir = Dir::new("agent-auth");
    // No clock skew allowed, so that a token minted with a TTL of 0 s is already expired.
    let agent = Agent::start(dir.join("agent"), &["--clock-skew", "0s"]);
    let good = agent.token("wf", "task-a", 0, "1h");
    let other_task = agent.token("wf", "task-b", 0, "1h");
    let other_attempt = agent.token("wf", "task-a", 1, "1h");
    let expired = agent.token("wf", "task-a", 0, "0s");
    let forged = {
        let (claims, mac) = good.split_once('.').unwrap();
        format!("{claims}.{}", mac.chars().rev().collect::<String>())
    };
    let start = br#"{"container": "main", "started_at": "2026-01-01T00:00:00Z"}"#;
    for (auth, status) in [
        (None, 401),
        (Some(forged.as_str()), 401),
        (Some(expired.as_str()), 401),
        (Some("not-a-token"), 401),
        (Some(other_task.as_str()), 403),
        (Some(other_attempt.as_str()), 403),
    ] {
        let header = auth.map(bearer);
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("Authorization", h.as_str()))
            .collect();
        let (got, body) = http(
            agent.api,
            "POST",
            "/v1/tasks/task-a/0/start",
            &headers,
            start,
        );
        assert_eq!(got, status, "{auth:?}: {}", String::from_utf8_lossy(&body));
        let (got, _) = http(
            agent.api,
            "PUT",
            "/v1/tasks/task-a/0/outputs/out.tgz",
            &headers,
            b"payload",
        );
        assert_eq!(got, status, "{auth:?} upload");
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        events_file(&agent).is_empty(),
        "a refused request made an event"
    );
    assert!(
        agent.store_files().is_empty(),
        "a refused upload wrote {:?}",
        agent.store_files()
    );

    let (got, _) = http(
        agent.api,
        "POST",
        "/v1/tasks/task-a/0/start",
        &[("Authorization", &bearer(&good))],
        start,
    );
    assert_eq!(got, 200);
}

#[test]
fn bad_input_is_refused_with_a_message_that_names_it() {
    let dir = Dir::new("agent-bad-input");
    let agent = Agent::start(dir.join("agent"), &[]);
    let token = agent.token("wf", "t", 0, "1h");
    let auth = [("Authorization", bearer(&token))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let (status, body) = http(
        agent.api,
        "POST",
        "/v1/tasks/t/0/result",
        &auth,
        br#"{"container": "main", "exit_code": "zero"}"#,
    );
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("exit_code"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = http(
        agent.api,
        "POST",
        "/v1/tasks/t/0/start",
        &auth,
        b"{not json",
    );
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = http(
        agent.api,
        "POST",
        "/v1/tasks/t/0/progress",
        &auth,
        &vec![b' '; 2 << 20],
    );
    assert_eq!(status, 413);
    for (method, path) in [
        ("PUT", "/v1/tasks/t/0/outputs/a%20b"),
        ("PUT", "/v1/tasks/t/0/outputs/.."),
        ("POST", "/v1/tasks/t/zero/start"),
        ("POST", "/v1/tasks/t%2Fx/0/start"),
    ] {
        let (status, body) = http(agent.api, method, path, &auth, b"x");
        assert!(
            status == 400 || status == 404,
            "{path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, body) = http(agent.api, "PUT", "/v1/tasks/t/0/start", &auth, b"x");
    assert_eq!(status, 405, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("takes POST only"));
    let (status, _) = http(agent.api, "GET", "/v1/tasks/t/0/inputs/x", &auth, b"");
    assert_eq!(status, 400, "an input needs ?key=");
    let (status, _) = http(
        agent.api,
        "GET",
        "/v1/tasks/t/0/inputs/x?key=default/wf/no/such/object",
        &auth,
        b"",
    );
    assert_eq!(status, 404);
    // A key that escapes the store is the caller's mistake (400, not retried as a 5xx would
    // be); a key prefix holding objects (below) is not itself an object.
    for key in [
        "../../etc/passwd",
        "/etc/passwd",
        "wf%2F..%2F..%2Fsecret",
        "wf//t",
        "wf/t%00/0",
        &"a".repeat(1025),
    ] {
        let (status, body) = http(
            agent.api,
            "GET",
            &format!("/v1/tasks/t/0/inputs/x?key={key}"),
            &auth,
            b"",
        );
        assert_eq!(status, 400, "{key}: {}", String::from_utf8_lossy(&body));
    }
    for (path, body) in [
        ("progress", r#"{"container": "main", "progress": "half"}"#),
        ("progress", r#"{"container": "main", "progress": "+1/2"}"#),
        ("progress", r#"{"container": "a/b", "progress": "1/2"}"#),
        (
            "start",
            r#"{"container": "", "started_at": "2026-01-01T00:00:00Z"}"#,
        ),
    ] {
        let (status, answer) = http(
            agent.api,
            "POST",
            &format!("/v1/tasks/t/0/{path}"),
            &auth,
            body.as_bytes(),
        );
        assert_eq!(status, 400, "{body}: {}", String::from_utf8_lossy(&answer));
    }
    let (status, _) = http(agent.api, "GET", "/v1/elsewhere", &[], b"");
    assert_eq!(status, 404);
    assert!(agent.store_files().is_empty());

    let (status, _) = http(agent.api, "PUT", "/v1/tasks/t/0/outputs/a.txt", &auth, b"x");
    assert_eq!(status, 200);
    let (status, body) = http(
        agent.api,
        "GET",
        "/v1/tasks/t/0/inputs/x?key=default/wf/t/0",
        &auth,
        b"",
    );
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));

    // A result names only what its own task may: no parameter name that is a path, no
    // artifact of another task, no digest that is not one.
    let own = format!(
        "{{\"name\": \"a\", \"key\": \"default/wf/t/0/a.txt\", \"size\": 1, \"sha256\": \"{}\", \"archive\": \"none\"}}",
        "ab".repeat(32)
    );
    for (outputs, field) in [
        (
            r#"{"parameters": [{"name": "../../x", "value": "v"}]}"#.to_owned(),
            "outputs.parameters[0].name",
        ),
        (
            own.replace("wf/t/0/", "wf/other/0/"),
            "outputs.artifacts[0].key",
        ),
        (
            own.replace("wf/t/0/", "wf/t/0/../../other/0/"),
            "outputs.artifacts[0].key",
        ),
        (
            own.replace(&"ab".repeat(32), "not-hex"),
            "outputs.artifacts[0].sha256",
        ),
    ] {
        let outputs = if outputs.starts_with("{\"name\"") {
            format!("{{\"artifacts\": [{outputs}]}}")
        } else {
            outputs
        };
        let body = format!(
            r#"{{"container": "main", "exit_code": 0, "reason": "Completed", "outputs": {outputs}}}"#
        );
        let (status, answer) = http(
            agent.api,
            "POST",
            "/v1/tasks/t/0/result",
            &auth,
            body.as_bytes(),
        );
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, 400, "{field}: {answer}");
        assert!(answer.contains(field), "{field}: {answer}");
    }
    let body = format!(
        r#"{{"container": "main", "exit_code": 0, "reason": "Completed", "outputs": {{"artifacts": [{own}]}}}}"#
    );
    let (status, answer) = http(
        agent.api,
        "POST",
        "/v1/tasks/t/0/result",
        &auth,
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

#[test]
fn a_json_body_that_stalls_or_breaks_is_a_408_or_a_400_not_a_413() {
    let dir = Dir::new("agent-body-errors");
    let agent = Agent::start(dir.join("agent"), &["--body-idle-timeout", "500ms"]);
    let token = agent.token("wf", "t", 0, "1h");
    let send = |head: String, body: &[u8]| {
        let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        read_response(stream).0
    };
    let head = |extra: &str| {
        format!(
            "POST /v1/tasks/t/0/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
        )
    };
    assert_eq!(send(head("Content-Length: 100\r\n"), b"{\"contai"), 408);
    assert_eq!(
        send(head("Transfer-Encoding: chunked\r\n"), b"ZZ\r\nxx\r\n"),
        400
    );
}

#[test]
fn artifacts_stream_through_byte_exact_and_events_are_journaled_in_order() {
    let dir = Dir::new("agent-roundtrip");
    let agent = Agent::start(dir.join("agent"), &["--inline-limit", "100"]);
    let token = agent.token("wf-9", "step", 2, "1h");
    let auth = bearer(&token);
    let auth = [("Authorization", auth.as_str())];
    let payload = noise(5 << 20, 3);
    let (status, body) = http(
        agent.api,
        "PUT",
        "/v1/tasks/step/2/outputs/out.tar.zst",
        &auth,
        &payload,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(stored["key"], "default/wf-9/step/2/out.tar.zst");
    assert_eq!(stored["size"], payload.len());
    let sha = std::process::Command::new("sha256sum")
        .arg(agent.dir.join("data/store/default/wf-9/step/2/out.tar.zst"))
        .output()
        .unwrap();
    assert_eq!(
        stored["sha256"],
        String::from_utf8_lossy(&sha.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    );

    let (status, body) = http(
        agent.api,
        "GET",
        "/v1/tasks/step/2/inputs/in?key=default/wf-9/step/2/out.tar.zst",
        &auth,
        b"",
    );
    assert_eq!(status, 200);
    assert!(body == payload, "downloaded bytes differ");

    // An artifact whose name is that of an offloaded value's key must not meet it.
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/step/2/outputs/parameters",
        &auth,
        b"an artifact",
    );
    assert_eq!(status, 200);

    let big = "x".repeat(150);
    let result = serde_json::json!({
        "container": "main", "exit_code": 0, "reason": "Completed",
        "outputs": {"parameters": [{"name": "small", "value": "v"}, {"name": "big", "value": big}], "result": "ok", "artifacts": []},
        "inputs_digest": "abc"
    });
    for (path, body) in [
        (
            "start",
            serde_json::json!({"container": "main", "started_at": "2026-01-01T00:00:00Z"}),
        ),
        (
            "progress",
            serde_json::json!({"container": "main", "progress": "1/2"}),
        ),
        ("result", result),
    ] {
        let (status, answer) = http(
            agent.api,
            "POST",
            &format!("/v1/tasks/step/2/{path}"),
            &auth,
            body.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
    }
    assert!(
        wait_until(Duration::from_secs(10), || events_file(&agent).len() == 3),
        "{:?}",
        events_file(&agent)
    );
    let events = events_file(&agent);
    let phases: Vec<&str> = events
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["Running", "Running", "Succeeded"]);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(events[1]["progress"], "1/2");
    let params = &events[2]["outputs"]["parameters"];
    assert_eq!(params[0]["value"]["inline"], "v");
    let offloaded = &params[1]["value"]["offloaded"];
    assert_eq!(
        offloaded["key"],
        "default/wf-9/step/2/~values/parameters/big"
    );
    let stored = agent.dir.join("data/store/default/wf-9/step/2");
    assert_eq!(
        std::fs::read_to_string(stored.join("~values/parameters/big")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(stored.join("parameters")).unwrap(),
        b"an artifact"
    );
    assert_eq!(events[2]["inputs_digest"], "abc");
    assert!(agent.metric("emissary_agent_events_appended") >= 3.0);
}

#[test]
fn commands_reach_the_tasks_long_poll_at_once() {
    let dir = Dir::new("agent-commands");
    let controller = Controller::start();
    let agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    let api = agent.api;
    let poll = std::thread::spawn(move || {
        let started = Instant::now();
        let (status, body) = http(
            api,
            "GET",
            "/v1/tasks/t/0/commands?wait=30s",
            &[("Authorization", &bearer(&token))],
            b"",
        );
        (status, body, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    // A signal that does not exist is dropped at the agent; the one after it arrives.
    controller
        .command(serde_json::json!({"task_id": "t", "attempt": 0, "kind": "signal", "signal": 99}));
    controller
        .command(serde_json::json!({"task_id": "t", "attempt": 0, "kind": "signal", "signal": 10}));
    let (status, body, waited) = poll.join().unwrap();
    let latency = sent.elapsed();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        serde_json::json!([{"kind": "signal", "signal": 10}])
    );
    assert!(
        waited >= Duration::from_millis(250),
        "the poll answered before the command existed"
    );
    assert!(
        latency < Duration::from_secs(2),
        "relayed after {latency:?}"
    );

    // No command: the long-poll ends with 204 after its wait.
    let other = agent.token("wf", "t", 1, "1h");
    let (status, _) = http(
        agent.api,
        "GET",
        "/v1/tasks/t/1/commands?wait=200ms",
        &[("Authorization", &bearer(&other))],
        b"",
    );
    assert_eq!(status, 204);
    assert!(
        wait_until(Duration::from_secs(15), || controller.heartbeats() > 0),
        "no heartbeat"
    );

    // The relay's thread asked for short slices, where the kernel says (≥ 6.12, with
    // scheduler statistics): it runs before the API's workers when it wakes on a busy node.
    let slices = thread_slices(agent.pid());
    let relay = slices.iter().find(|(name, _)| name == "relay");
    let relay = relay.unwrap_or_else(|| panic!("no relay thread among {slices:?}"));
    if let Some(slice) = relay.1 {
        assert_eq!(slice, 100_000, "the relay's slice, ns");
    }
}

/// Each thread of `pid`: its name, and its scheduler slice in ns where `/proc` shows it.
fn thread_slices(pid: u32) -> Vec<(String, Option<u64>)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .map(|task| {
            let read = |file| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            let slice = read("sched").lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                (name.trim() == "se.slice").then(|| value.trim().parse().ok())?
            });
            (read("comm").trim().to_owned(), slice)
        })
        .collect()
}

#[test]
fn probes_and_metrics_are_served_on_the_admin_port() {
    let dir = Dir::new("agent-admin");
    let agent = Agent::start(dir.join("agent"), &[]);
    assert_eq!(
        http(agent.api, "POST", "/v1/tasks/t/0/start", &[], b"{}").0,
        401
    );
    let (status, body) = http(agent.admin, "GET", "/healthz", &[], b"");
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    assert_eq!(http(agent.admin, "GET", "/readyz", &[], b"").0, 200);
    let (status, body) = http(agent.admin, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for name in [
        "emissary_agent_http_requests",
        "emissary_agent_journal_bytes",
        "emissary_agent_events_delivered",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    assert!(text.ends_with("# EOF\n"));
    assert_eq!(agent.metric("emissary_agent_journal_syncs_total"), 0.0);
    let token = agent.token("wf", "t", 0, "1h");
    let progress = br#"{"container": "main", "progress": "1/2"}"#;
    let (status, body) = request(&agent, &token, "POST", "/v1/tasks/t/0/progress", progress);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        agent.metric("emissary_agent_journal_syncs_total"),
        1.0,
        "an event is one fsync"
    );
}

#[test]
fn sigterm_finishes_in_flight_uploads_then_exits() {
    use std::io::Write;
    let dir = Dir::new("agent-sigterm");
    let mut agent = Agent::start(dir.join("agent"), &[]);
    let token = agent.token("wf", "t", 0, "1h");
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    let payload = noise(1 << 20, 8);
    write!(stream, "PUT /v1/tasks/t/0/outputs/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n", payload.len()).unwrap();
    stream.write_all(&payload[..1000]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = agent.pid();
    kill(pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(agent.api).is_err(),
        "still accepting after SIGTERM"
    );
    stream.write_all(&payload[1000..]).unwrap();
    let (status, _) = read_response(stream);
    assert_eq!(status, 200, "the in-flight upload was cut off");
    assert!(agent.terminate(Duration::from_secs(10)).success());
    assert_eq!(
        std::fs::read(agent.dir.join("data/store/default/wf/t/0/slow")).unwrap(),
        payload
    );
}

#[test]
fn an_upload_outliving_the_shutdown_timeout_is_cut_and_an_empty_outbox_is_not_reported_stuck() {
    use std::io::Write;
    let dir = Dir::new("agent-shutdown-timeout");
    let mut agent = Agent::start(dir.join("agent"), &["--shutdown-timeout", "1s"]);
    let token = agent.token("wf", "t", 0, "1h");
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    write!(stream, "PUT /v1/tasks/t/0/outputs/stuck HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n").unwrap();
    stream.write_all(&[0u8; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(agent.terminate(Duration::from_secs(10)).success());
    let log = agent.log();
    assert!(
        log.contains("in-flight requests did not finish in time"),
        "{log}"
    );
    assert!(
        !log.contains("did not drain"),
        "nothing was left to drain: {log}"
    );
    // The cut upload's temporary file went with it.
    assert!(agent.store_files().is_empty(), "{:?}", agent.store_files());
    drop(stream);
}

#[test]
fn an_input_key_that_escapes_the_store_fails_the_step_at_once_as_the_specs_fault() {
    let dir = Dir::new("agent-bad-key");
    let agent = Agent::start(dir.join("agent"), &[]);
    let target = dir.join("in");
    let spec = serde_json::json!({
        "container": {"command": ["true"]},
        "inputs": {"artifacts": [{"name": "data", "path": target, "s3": {"key": "../secret"}}]}
    });
    for through_agent in [true, false] {
        let root = dir.join(if through_agent {
            "root-agent"
        } else {
            "root-local"
        });
        let mut cmd = emissary(["run", "--root", root.to_str().unwrap()]);
        cmd.env("EMISSARY_TEMPLATE", spec.to_string());
        if through_agent {
            agent.emissary_env(&mut cmd, "wf", "t", 0);
        } else {
            cmd.args(["--store", dir.join("store").to_str().unwrap()]);
        }
        let started = Instant::now();
        let out = run(&mut cmd, b"", Duration::from_secs(30));
        out.assert_code(125)
            .assert_stderr_contains("must be a relative path without . or ..");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a refused key was retried{}",
            out.dump()
        );
        let outputs = dir.read_json(&format!(
            "{}/outputs.json",
            root.file_name().unwrap().to_str().unwrap()
        ));
        assert_eq!(outputs["reason"], "StartFailed", "{outputs}");
        assert_eq!(outputs["error"]["kind"], "user", "{outputs}");
        assert_eq!(outputs["error"]["retryable"], false, "{outputs}");
        assert!(!target.exists());
    }
}

#[test]
fn a_client_silent_mid_body_is_cut_off_and_nothing_is_stored() {
    use std::io::Write;
    let dir = Dir::new("agent-body-idle");
    let agent = Agent::start(dir.join("agent"), &["--body-idle-timeout", "500ms"]);
    let token = agent.token("wf", "t", 0, "1h");
    let started = Instant::now();
    let mut upload = std::net::TcpStream::connect(agent.api).unwrap();
    write!(upload, "PUT /v1/tasks/t/0/outputs/stalled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n").unwrap();
    upload.write_all(&[7; 1000]).unwrap();
    let (status, body) = read_response(upload);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let mut json = std::net::TcpStream::connect(agent.api).unwrap();
    write!(json, "POST /v1/tasks/t/0/progress HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{\"container\":").unwrap();
    let (status, _) = read_response(json);
    assert!(
        status >= 400,
        "a stalled JSON body is refused too: {status}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(agent.store_files().is_empty(), "{:?}", agent.store_files());
}

#[test]
fn every_log_line_of_a_request_carries_its_request_id() {
    let dir = Dir::new("agent-request-id");
    let agent = Agent::start(dir.join("agent"), &[]);
    let token = agent.token("wf", "t", 0, "1h");
    let auth = bearer(&token);
    let auth = [("Authorization", auth.as_str())];
    assert_eq!(
        http(agent.api, "PUT", "/v1/tasks/t/0/outputs/a.txt", &auth, b"x").0,
        200
    );
    assert_eq!(
        http(agent.api, "PUT", "/v1/tasks/t/0/outputs/b.txt", &auth, b"y").0,
        200
    );
    let lines: Vec<serde_json::Value> = agent
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|l: &serde_json::Value| l["target"] == "emissary_agent::server")
        .collect();
    // Each upload logs received, stored and done, all under one id, and the ids differ.
    let mut ids = Vec::new();
    for file in ["a.txt", "b.txt"] {
        let mine: Vec<_> = lines
            .iter()
            .filter(|l| l["span"]["path"] == format!("/v1/tasks/t/0/outputs/{file}"))
            .collect();
        let messages: Vec<_> = mine
            .iter()
            .map(|l| l["fields"]["message"].clone())
            .collect();
        assert_eq!(messages, ["received", "stored", "done"], "{mine:#?}");
        let id = &mine[0]["span"]["request_id"];
        assert!(
            id.is_u64() && mine.iter().all(|l| &l["span"]["request_id"] == id),
            "{mine:#?}"
        );
        ids.push(id.clone());
    }
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn a_refused_upload_fails_at_once_with_the_agents_reason() {
    let dir = Dir::new("agent-refused-upload");
    let agent = Agent::start(dir.join("agent"), &["--clock-skew", "0s"]);
    let out_file = dir.join("big");
    // The token expires while the command runs: the agent refuses the upload before reading
    // its body, which the emissary sees as a broken pipe mid-stream.
    let spec = serde_json::json!({
        "container": {"command": ["sh", "-c", format!("head -c 50000000 /dev/urandom > {}; sleep 3", out_file.display())]},
        "outputs": {"artifacts": [{"name": "big", "path": out_file, "archive": {"none": {}}}]}
    });
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string())
        .env("EMISSARY_AGENT_RETRY", "30s");
    agent.emissary_env(&mut cmd, "wf", "t", 0);
    cmd.env("EMISSARY_TOKEN", agent.token("wf", "t", 0, "2s"));
    let started = Instant::now();
    let out = run(&mut cmd, b"", Duration::from_secs(60));
    assert_ne!(out.code, Some(0), "{}", out.dump());
    out.assert_stderr_contains("uploading an output: HTTP 401");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a refused upload was retried as if the agent were unreachable: {:?}{}",
        started.elapsed(),
        out.dump()
    );
}

#[test]
fn progress_written_in_a_tight_loop_is_reported_at_most_once_a_second_ending_with_the_last() {
    let dir = Dir::new("agent-progress-throttle");
    let agent = Agent::start(dir.join("agent"), &[]);
    let spec = serde_json::json!({"container": {"command": ["sh", "-c",
        "i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo $i/100 > $EMISSARY_PROGRESS_FILE; sleep 0.01; done; sleep 1.5"]}});
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", "t", 0);
    run(&mut cmd, b"", Duration::from_secs(30)).assert_code(0);
    assert!(wait_until(Duration::from_secs(10), || events_file(&agent)
        .last()
        .is_some_and(|e| e["phase"] == "Succeeded")));
    let reported: Vec<String> = events_file(&agent)
        .iter()
        .filter(|e| e["phase"] == "Running" && e["progress"].is_string())
        .map(|e| e["progress"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        (2..=6).contains(&reported.len()),
        "{} progress events: {reported:?}",
        reported.len()
    );
    assert_eq!(reported.last().unwrap(), "100/100", "{reported:?}");
}

/// Outputs too large for one result body are reported as the step's error, not lost with a
/// 413 that leaves the controller without any result.
#[test]
fn outputs_too_large_to_report_fail_the_step_with_a_result_that_says_so() {
    let dir = Dir::new("agent-outputs-too-large");
    let agent = Agent::start(dir.join("agent"), &[]);
    let params: Vec<_> = (0..5)
        .map(|i| {
            let path = dir.join(format!("p{i}"));
            std::fs::write(&path, "v".repeat(250_000)).unwrap();
            serde_json::json!({"name": format!("p{i}"), "valueFrom": {"path": path}})
        })
        .collect();
    let spec = serde_json::json!({
        "container": {"command": ["true"]},
        "outputs": {"parameters": params}
    });
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", "t", 0);
    let out = run(&mut cmd, b"", Duration::from_secs(60));
    assert_eq!(out.code, Some(125), "{}", out.dump());
    let events = events_file(&agent);
    let result = events
        .iter()
        .find(|e| e.get("exit_code").is_some())
        .unwrap_or_else(|| panic!("no result reached the agent{}", out.dump()));
    assert_eq!(result["error"]["kind"], "user", "{result:#}");
    assert_eq!(result["error"]["retryable"], false, "{result:#}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than the 1048576 bytes a result carries"),
        "{message}"
    );
}
