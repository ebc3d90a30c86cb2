//! The outbox under faults: a controller that is down or failing, an agent killed -9.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::agent_util::*;
use crate::controller::Controller;
use crate::util::*;

fn post(agent: &Agent, token: &str, task: &str, path: &str, body: serde_json::Value) -> u16 {
    let auth = bearer(token);
    http(
        agent.api,
        "POST",
        &format!("/v1/tasks/{task}/0/{path}"),
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .0
}

fn progress(n: usize) -> serde_json::Value {
    serde_json::json!({"container": "main", "progress": format!("{n}/100")})
}

/// (task, seq, progress) of every event, in arrival order.
fn summary(events: &[serde_json::Value]) -> Vec<(String, u64, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["task_id"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
                e["progress"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn events_wait_out_a_controller_outage_and_arrive_in_order() {
    let dir = Dir::new("outbox-outage");
    let mut controller = Controller::start();
    let agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let (a, b) = (
        agent.token("wf", "a", 0, "1h"),
        agent.token("wf", "b", 0, "1h"),
    );
    controller.down();
    for n in 0..30 {
        assert_eq!(
            post(&agent, &a, "a", "progress", progress(n)),
            200,
            "journaling must not need the controller"
        );
        assert_eq!(post(&agent, &b, "b", "progress", progress(n)), 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    controller.set_failing(true);
    controller.up();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        controller.events().is_empty(),
        "a 503 must not count as delivered"
    );
    controller.set_failing(false);
    controller.wait_events(60, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let events = summary(&controller.events());
    assert_eq!(events.len(), 60, "duplicates or losses: {events:?}");
    for task in ["a", "b"] {
        let mine: Vec<_> = events.iter().filter(|(t, _, _)| t == task).collect();
        let seqs: Vec<u64> = mine.iter().map(|(_, s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=30).collect::<Vec<_>>(),
            "task {task} out of order"
        );
        let progress: Vec<String> = mine.iter().map(|(_, _, p)| p.clone()).collect();
        assert_eq!(
            progress,
            (0..30).map(|n| format!("{n}/100")).collect::<Vec<_>>()
        );
    }
    assert!(agent.metric("emissary_agent_delivery_failures") >= 1.0);
    assert_eq!(
        controller.unauthorized(),
        0,
        "every request carried a valid node token"
    );
}

#[test]
fn a_controller_refuses_an_agent_whose_node_token_it_cannot_verify() {
    let dir = Dir::new("outbox-node-token");
    let controller = Controller::start();
    // An agent with another node secret: its node tokens do not verify.
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::write(agent_dir.join("secret"), "another-node-secret-of-32-bytes!").unwrap();
    let agent = Agent::start(agent_dir, &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    assert_eq!(post(&agent, &token, "t", "progress", progress(1)), 200);
    assert!(
        wait_until(Duration::from_secs(10), || controller.unauthorized() >= 2),
        "the controller saw no request"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(controller.events().is_empty());
    assert_eq!(controller.heartbeats(), 0);
    assert!(agent.metric("emissary_agent_delivery_failures") >= 1.0);
    assert!(
        agent.log().contains("401"),
        "the agent's log says why: {}",
        agent.log()
    );
}

#[test]
fn a_kill_9_loses_no_event_duplicates_no_seq_and_leaves_no_partial_object() {
    let dir = Dir::new("outbox-kill9");
    let mut controller = Controller::start();
    controller.down();
    let mut agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    for n in 0..5 {
        assert_eq!(post(&agent, &token, "t", "progress", progress(n)), 200);
    }
    // An artifact whose name looks like a temporary file is an object like any other.
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/t/0/outputs/.old.tmp.7",
        &[("Authorization", &bearer(&token))],
        b"kept",
    );
    assert_eq!(status, 200);
    // An upload cut in the middle by the crash.
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    write!(stream, "PUT /v1/tasks/t/0/outputs/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 4000000\r\n\r\n").unwrap();
    stream.write_all(&noise(1_000_000, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    agent.crash_and_restart();
    drop(stream);
    let key = agent.dir.join("data/store/default/wf/t/0/big");
    assert!(!key.exists(), "a partial object became visible");
    let names = || -> Vec<String> {
        std::fs::read_dir(key.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || names() == [".old.tmp.7"]),
        "the cut upload's temporary file outlived the restart, or the sweep took an object: {:?}",
        names()
    );
    for n in 5..8 {
        assert_eq!(post(&agent, &token, "t", "progress", progress(n)), 200);
    }
    let payload = noise(4_000_000, 2);
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/t/0/outputs/big",
        &[("Authorization", &bearer(&token))],
        &payload,
    );
    assert_eq!(status, 200);
    assert!(
        std::fs::read(&key).unwrap() == payload,
        "the re-upload is not the whole object"
    );
    controller.up();
    controller.wait_events(8, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let events = summary(&controller.events());
    let seqs: Vec<u64> = events.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "{events:?}");
}

#[test]
fn a_full_journal_refuses_new_events_and_drops_none() {
    let dir = Dir::new("outbox-full");
    let mut controller = Controller::start();
    controller.down();
    let agent = Agent::start(
        dir.join("agent"),
        &[
            "--controller-url",
            &controller.url(),
            "--journal-max-bytes",
            "4000",
        ],
    );
    let token = agent.token("wf", "t", 0, "1h");
    let mut accepted = 0;
    let mut refused = 0;
    for n in 0..60 {
        match post(&agent, &token, "t", "progress", progress(n)) {
            200 => accepted += 1,
            503 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        accepted > 5 && refused > 0,
        "accepted {accepted}, refused {refused}"
    );
    controller.up();
    controller.wait_events(accepted, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        controller.events().len(),
        accepted,
        "every accepted event arrives, once"
    );
    // Room again once delivered.
    assert!(wait_until(Duration::from_secs(10), || post(
        &agent,
        &token,
        "t",
        "progress",
        progress(99)
    ) == 200));
}

/// A private CA and a certificate it signed for 127.0.0.1: (CA PEM, leaf PEM, leaf key PEM).
fn private_ca() -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

#[test]
fn an_https_controller_gets_the_events_only_when_its_certificate_is_trusted() {
    let dir = Dir::new("outbox-https");
    let (ca, cert, key) = private_ca();
    let ca_file = dir.write("ca.pem", &ca);
    let controller = Controller::start_tls(&cert, &key);
    assert!(controller.url().starts_with("https://"));

    // The system roots do not know the private CA: nothing is delivered, nothing is lost.
    let mut agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    for n in 0..3 {
        assert_eq!(post(&agent, &token, "t", "progress", progress(n)), 200);
    }
    assert!(
        wait_until(Duration::from_secs(10), || controller.rejected_handshakes()
            >= 1),
        "the agent never tried the controller"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        controller.events().is_empty(),
        "an untrusted controller got events"
    );
    assert!(agent.metric("emissary_agent_delivery_failures") >= 1.0);
    assert!(agent.terminate(Duration::from_secs(40)).success());

    // The same journal, now trusting the CA: every event arrives, once, in order.
    let ca_arg = ca_file.display().to_string();
    let _agent = Agent::start(
        dir.join("agent"),
        &[
            "--controller-url",
            &controller.url(),
            "--controller-ca",
            &ca_arg,
        ],
    );
    controller.wait_events(3, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let events = summary(&controller.events());
    assert_eq!(
        events,
        (0..3)
            .map(|n| ("t".to_owned(), n as u64 + 1, format!("{n}/100")))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_bad_controller_ca_url_or_store_is_refused_at_start() {
    let dir = Dir::new("outbox-ca-refused");
    let empty = dir.write("empty.pem", "");
    let serve = |url: &str, ca: &Path| {
        run_quick(
            serve_command(&dir.join("agent"), "127.0.0.1:0")
                .args(["--controller-url", url, "--controller-ca"])
                .arg(ca),
        )
    };
    let out = serve("http://127.0.0.1:9", &empty);
    out.assert_code(1);
    assert!(
        out.stderr()
            .contains("controller-ca is only used with an https:// controller-url"),
        "{}",
        out.dump()
    );
    let out = serve("https://127.0.0.1:9", &empty);
    out.assert_code(1);
    assert!(
        out.stderr().contains("no PEM certificate") && out.stderr().contains("empty.pem"),
        "{}",
        out.dump()
    );
    let out = serve("ftp://127.0.0.1:9", &empty);
    out.assert_code(1);
    assert!(
        out.stderr().contains("must start with http:// or https://"),
        "{}",
        out.dump()
    );
    let out = run_quick(
        serve_command(&dir.join("agent"), "127.0.0.1:0").args(["--store", "file://relative"]),
    );
    out.assert_code(1);
    assert!(
        out.stderr()
            .contains("the directory must be absolute (file:///DIR)"),
        "{}",
        out.dump()
    );
}

#[test]
fn a_node_token_minted_by_hand_opens_only_its_own_node_at_the_controller() {
    let dir = Dir::new("outbox-node-token-cli");
    let controller = Controller::start();
    let secret = dir.write("secret", format!("{}\n", crate::controller::NODE_SECRET));
    let mint = |node: &str| {
        let out = run_quick(
            std::process::Command::new(agent_bin())
                .args(["token", "--node", node, "--ttl", "5m", "--secret-file"])
                .arg(&secret),
        );
        out.assert_code(0);
        bearer(out.stdout().trim())
    };
    let beat = br#"{"node": "n1", "timestamp": "2026-01-01T00:00:00Z", "active": [], "undelivered_bytes": 0}"#;
    let heartbeat = |auth: &[(&str, &str)]| {
        http(
            controller.addr,
            "POST",
            "/v1/nodes/n1/heartbeat",
            auth,
            beat,
        )
        .0
    };
    assert_eq!(heartbeat(&[("Authorization", &mint("n1"))]), 200);
    assert_eq!(
        heartbeat(&[("Authorization", &mint("n2"))]),
        401,
        "another node's token"
    );
    assert_eq!(heartbeat(&[]), 401, "no token");
    let task_token = bearer(
        run_quick(
            std::process::Command::new(agent_bin())
                .args(["token", "--task", "n1", "--attempt", "0", "--secret-file"])
                .arg(&secret),
        )
        .stdout()
        .trim(),
    );
    assert_eq!(
        heartbeat(&[("Authorization", &task_token)]),
        401,
        "a task token"
    );
    assert_eq!(controller.heartbeats(), 1);
}

#[test]
fn sigterm_flushes_the_outbox_to_a_controller_that_came_back() {
    let dir = Dir::new("outbox-sigterm-flush");
    let controller = Controller::start();
    controller.set_failing(true);
    let mut agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    for n in 0..5 {
        assert_eq!(post(&agent, &token, "t", "progress", progress(n)), 200);
    }
    // A task's long-poll is pending: it must not hold the shutdown for its whole wait.
    let api = agent.api;
    let poll = std::thread::spawn(move || {
        let auth = bearer(&token);
        http(
            api,
            "GET",
            "/v1/tasks/t/0/commands?wait=60s",
            &[("Authorization", &auth)],
            b"",
        )
        .0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(controller.events().is_empty());
    controller.set_failing(false);
    let stopping = std::time::Instant::now();
    assert!(agent.terminate(Duration::from_secs(40)).success()); // SIGTERM, then wait
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert_eq!(poll.join().unwrap(), 204);
    let events = summary(&controller.events());
    assert_eq!(
        events.iter().map(|(_, seq, _)| *seq).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>(),
        "delivered before exiting: {events:?}"
    );
}

#[test]
fn a_disk_full_mid_event_loses_none_of_the_events_journaled_after_it() {
    let dir = Dir::new("outbox-enospc");
    let journal = dir.join("agent/data/journal");
    let _disk = Tmpfs::mount(&journal, "256k");
    let mut controller = Controller::start();
    controller.down();
    let agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let token = agent.token("wf", "t", 0, "1h");
    assert_eq!(post(&agent, &token, "t", "progress", progress(1)), 200);

    // Fill the disk: the next event fits only partly in the segment's last page.
    let filler = journal.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while file.write_all(&[b'.'; 4096]).is_ok() {}
    drop(file);
    let big = "x".repeat(20_000);
    let result = serde_json::json!({
        "container": "main", "exit_code": 0, "reason": "Completed",
        "outputs": {"parameters": [{"name": "big", "value": big}], "artifacts": []},
    });
    let status = post(&agent, &token, "t", "result", result);
    assert_ne!(
        status, 200,
        "an event that did not reach the disk was acknowledged"
    );

    std::fs::remove_file(&filler).unwrap();
    for n in 2..=4 {
        assert_eq!(post(&agent, &token, "t", "progress", progress(n)), 200);
    }
    controller.up();
    controller.wait_events(4, Duration::from_secs(30));
    let progress: Vec<String> = summary(&controller.events())
        .into_iter()
        .map(|(_, _, p)| p)
        .collect();
    assert_eq!(progress, ["1/100", "2/100", "3/100", "4/100"]);
}

/// Two agents on one data directory would interleave journal appends and deliver twice: the
/// second refuses to start, saying why, and starts once the first is gone.
#[test]
fn a_second_agent_on_the_same_data_directory_refuses_to_start() {
    let dir = Dir::new("outbox-two-agents");
    let first = Agent::start(dir.join("agent"), &[]);
    let out = run(
        &mut serve_command(&dir.join("agent"), "127.0.0.1:0"),
        b"",
        Duration::from_secs(30),
    );
    assert_ne!(out.code, Some(0), "{}", out.dump());
    out.assert_stderr_contains("another agent is running on this data directory");
    drop(first);
    let _again = Agent::start(dir.join("agent"), &[]);
}
