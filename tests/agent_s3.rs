//! The agent on a real S3 server (s3s-fs, embedded): multipart uploads, the node cache, an S3
//! outage.

use std::io::{Read, Write};
use std::time::Duration;

use sha2::Digest as _;

use crate::agent_util::*;
use crate::s3::{self, S3Server};
use crate::util::*;

/// An agent on `server` seen through a proxy that sends its answers at `bytes_per_sec` (a slow
/// store); the proxy lives as long as the agent needs it.
fn slow_s3_agent(dir: &Dir, server: &S3Server, bytes_per_sec: usize) -> (SlowProxy, Agent) {
    let slow = SlowProxy::start(server.addr, bytes_per_sec);
    let agent = s3_agent_at(dir, &format!("http://{}", slow.addr), &[]);
    (slow, agent)
}

#[test]
fn artifacts_go_to_s3_in_parts_and_come_back_through_the_node_cache() {
    let dir = Dir::new("s3-roundtrip");
    let server = S3Server::start(&dir.join("s3"), 0);
    let mut agent = s3_agent(&dir, &server, &[]);
    let token = agent.token("wf", "gen", 0, "1h");
    let auth = bearer(&token);
    let auth = [("Authorization", auth.as_str())];
    // 20 MiB: three parts of 8 MiB at most.
    let payload = noise(20 << 20, 4);
    let (status, body) = http(
        agent.api,
        "PUT",
        "/v1/tasks/gen/0/outputs/data.tgz",
        &auth,
        &payload,
    );
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        agent.log()
    );
    let stored: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(stored["key"], "emissary/default/wf/gen/0/data.tgz");
    assert!(
        server.object("emissary/default/wf/gen/0/data.tgz").unwrap() == payload,
        "S3 holds different bytes"
    );
    // The digest covers the parts in order (each is hashed while the next is received).
    let sha256: String = sha2::Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(stored["sha256"], sha256.as_str());
    assert_eq!(stored["size"], payload.len());

    let consumer = agent.token("wf", "use", 0, "1h");
    let path = "/v1/tasks/use/0/inputs/data?key=emissary/default/wf/gen/0/data.tgz";
    for round in 0..3 {
        let (status, body) = http(
            agent.api,
            "GET",
            path,
            &[("Authorization", &bearer(&consumer))],
            b"",
        );
        assert_eq!(status, 200, "round {round}");
        assert!(body == payload, "round {round}: bytes differ");
    }
    assert_eq!(
        agent.metric("emissary_agent_store_downloads"),
        1.0,
        "the cache should have served rounds 2 and 3"
    );
    assert_eq!(agent.metric("emissary_agent_cache_hits"), 2.0);
    assert_eq!(
        agent.metric("emissary_agent_cache_revalidations"),
        1.0,
        "warm hits within the freshness window asked the store again"
    );

    // The cache outlives the agent: after a kill -9, the same input comes from the node's disk.
    agent.crash_and_restart();
    let consumer = agent.token("wf", "use", 0, "1h");
    let (status, body) = http(
        agent.api,
        "GET",
        path,
        &[("Authorization", &bearer(&consumer))],
        b"",
    );
    assert_eq!(status, 200);
    assert!(body == payload);
    assert_eq!(
        agent.metric("emissary_agent_cache_hits"),
        1.0,
        "the restarted agent fetched it again"
    );
    assert_eq!(agent.metric("emissary_agent_store_downloads"), 0.0);
}

#[test]
fn a_token_reads_nothing_outside_the_agents_store_prefix() {
    let dir = Dir::new("s3-prefix");
    let server = S3Server::start(&dir.join("s3"), 0);
    // Another team's object in the same bucket.
    let elsewhere = dir.join("s3").join(s3::BUCKET).join("other-team/secret");
    std::fs::create_dir_all(elsewhere.parent().unwrap()).unwrap();
    std::fs::write(&elsewhere, b"not yours").unwrap();
    let agent = s3_agent(&dir, &server, &[]);
    let auth = bearer(&agent.token("wf", "t", 0, "1h"));
    for key in [
        "other-team/secret",
        "emissary/../other-team/secret",
        "emissaryx/secret",
    ] {
        let (status, body) = http(
            agent.api,
            "GET",
            &format!("/v1/tasks/t/0/inputs/x?key={key}"),
            &[("Authorization", &auth)],
            b"",
        );
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{key}: {body}");
        assert!(!body.contains("not yours"));
    }
}

#[test]
fn concurrent_requests_for_one_input_download_it_once() {
    let dir = Dir::new("s3-single-flight");
    let server = S3Server::start(&dir.join("s3"), 0);
    let agent = s3_agent(&dir, &server, &[]);
    let token = agent.token("wf", "gen", 0, "1h");
    let payload = noise(8 << 20, 6);
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/gen/0/outputs/shared",
        &[("Authorization", &bearer(&token))],
        &payload,
    );
    assert_eq!(status, 200);
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let (api, token) = (agent.api, agent.token("wf", &format!("r{i}"), 0, "1h"));
            std::thread::spawn(move || {
                let path =
                    format!("/v1/tasks/r{i}/0/inputs/shared?key=emissary/default/wf/gen/0/shared");
                http(
                    api,
                    "GET",
                    &path,
                    &[("Authorization", &bearer(&token))],
                    b"",
                )
            })
        })
        .collect();
    for reader in readers {
        let (status, body) = reader.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == payload);
    }
    assert_eq!(agent.metric("emissary_agent_store_downloads"), 1.0);
}

/// Stores `payload` as task gen/0's output `big`, then asks for it as an input on a connection
/// of its own, read at the caller's pace; when it was asked.
fn store_then_ask(
    agent: &Agent,
    auth: &str,
    payload: &[u8],
) -> (std::net::TcpStream, std::time::Instant) {
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/gen/0/outputs/big",
        &[("Authorization", auth)],
        payload,
    );
    assert_eq!(status, 200);
    let asked = std::time::Instant::now();
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    write!(
        stream,
        "GET /v1/tasks/gen/0/inputs/big?key=emissary/default/wf/gen/0/big HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    (stream, asked)
}

#[test]
fn a_large_input_streams_while_the_node_cache_fills_and_a_reader_leaving_stops_nothing() {
    let dir = Dir::new("s3-fill");
    let server = S3Server::start(&dir.join("s3"), 0);
    let (_slow, agent) = slow_s3_agent(&dir, &server, 2 << 20);
    let token = agent.token("wf", "gen", 0, "1h");
    let auth = bearer(&token);
    let payload = noise(8 << 20, 9);
    // The store needs ~4 s to send it: the answer must start long before.
    let (mut stream, asked) = store_then_ask(&agent, &auth, &payload);
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "the first byte came after {:?}: the whole input was fetched first",
        asked.elapsed()
    );
    drop(stream); // the reader leaves mid-download

    let cache = agent.dir.join("data/cache");
    let complete = || {
        let names: Vec<(String, u64)> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        names.len() == 1 && !names[0].0.starts_with('.') && names[0].1 == payload.len() as u64
    };
    assert!(
        wait_until(Duration::from_secs(30), complete),
        "the download did not finish into the cache without its reader"
    );
    let (status, body) = http(
        agent.api,
        "GET",
        "/v1/tasks/gen/0/inputs/big?key=emissary/default/wf/gen/0/big",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200);
    assert!(body == payload, "bytes differ");
    assert_eq!(agent.metric("emissary_agent_store_downloads"), 1.0);
}

#[test]
fn a_reader_slower_than_the_store_gets_every_byte_from_the_node_cache() {
    let dir = Dir::new("s3-slow-reader");
    let server = S3Server::start(&dir.join("s3"), 0);
    let agent = s3_agent(&dir, &server, &[]);
    let token = agent.token("wf", "gen", 0, "1h");
    let auth = bearer(&token);
    // Far more than the socket buffers hold: the download runs ahead of its reader, whose
    // bytes then come from the file where the ones handed over directly stopped.
    let payload = noise(48 << 20, 11);
    let (mut stream, _) = store_then_ask(&agent, &auth, &payload);
    std::thread::sleep(Duration::from_millis(1500));
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        std::thread::sleep(Duration::from_micros(200)); // still slower than the store
    }
    let head = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(answer[head..] == payload[..], "bytes differ");
    assert_eq!(agent.metric("emissary_agent_store_downloads"), 1.0);
}

#[test]
fn an_upload_whose_client_leaves_mid_way_is_aborted_in_the_store() {
    let dir = Dir::new("s3-upload-left");
    let server = S3Server::start(&dir.join("s3"), 0);
    // S3's answers crawl, so the upload is still in flight when its client goes.
    let (_slow, agent) = slow_s3_agent(&dir, &server, 400);
    let token = agent.token("wf", "gen", 0, "1h");
    let body = noise(9 << 20, 10);
    let mut stream = std::net::TcpStream::connect(agent.api).unwrap();
    write!(
        stream,
        "PUT /v1/tasks/gen/0/outputs/big HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        bearer(&token),
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    let uploads = || {
        std::fs::read_dir(dir.join("s3"))
            .unwrap()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(".upload-") && name.ends_with(".json")
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || uploads() == 1),
        "no multipart upload was started"
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(stream);
    assert!(
        wait_until(Duration::from_secs(20), || uploads() == 0),
        "the abandoned multipart upload was never aborted"
    );
    assert!(server.object("emissary/default/wf/gen/0/big").is_none());
}

#[test]
fn concurrent_uploads_share_a_bounded_part_memory() {
    let dir = Dir::new("s3-upload-budget");
    let server = S3Server::start(&dir.join("s3"), 0);
    // S3 takes seconds to answer each request: parts pile up in the agent.
    let (_slow, agent) = slow_s3_agent(&dir, &server, 120);
    let payload = std::sync::Arc::new(noise(24 << 20, 11));
    let uploads: Vec<_> = (0..20)
        .map(|i| {
            let (api, payload) = (agent.api, payload.clone());
            let auth = bearer(&agent.token("wf", &format!("u{i}"), 0, "1h"));
            std::thread::spawn(move || {
                let path = format!("/v1/tasks/u{i}/0/outputs/big");
                http(api, "PUT", &path, &[("Authorization", &auth)], &payload).0
            })
        })
        .collect();
    for upload in uploads {
        assert_eq!(upload.join().unwrap(), 200);
    }
    assert!(server.object("emissary/default/wf/u19/0/big").unwrap() == *payload);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // Twenty uploads holding up to 24 MiB each reached 344 MiB; the budget is 128 MiB of
    // parts, under the DaemonSet's 256 MiB limit with the rest of the agent.
    assert!(
        peak_kb < 240 << 10,
        "the agent peaked at {} MiB",
        peak_kb >> 10
    );
}

#[test]
fn an_s3_outage_is_a_retryable_error_not_a_hang() {
    let dir = Dir::new("s3-down");
    let mut server = S3Server::start(&dir.join("s3"), 0);
    let agent = s3_agent(&dir, &server, &[]);
    server.stop();
    std::thread::sleep(Duration::from_millis(100));
    let token = agent.token("wf", "t", 0, "1h");
    let started = std::time::Instant::now();
    let (status, body) = http(
        agent.api,
        "PUT",
        "/v1/tasks/t/0/outputs/x",
        &[("Authorization", &bearer(&token))],
        b"data",
    );
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("store unavailable"));
    assert!(started.elapsed() < Duration::from_secs(30));

    // The emissary turns that into a system, retryable failure of the step.
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let spec = serde_json::json!({"container": {"command": ["sh", "-c", format!("echo x > {}/f", work.display())]},
                                      "outputs": {"artifacts": [{"name": "f", "path": work.join("f")}]}});
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string())
        .env("EMISSARY_AGENT_RETRY", "2s");
    agent.emissary_env(&mut cmd, "wf", "t", 0);
    let out = run(&mut cmd, b"", Duration::from_secs(30));
    out.assert_code(125);
    let outputs = dir.read_json("root/outputs.json");
    assert_eq!(outputs["error"]["kind"], "system", "{outputs}");
    assert_eq!(outputs["error"]["retryable"], true);
}

#[test]
fn during_an_s3_outage_inputs_already_on_the_node_are_still_served() {
    let dir = Dir::new("s3-stale-if-error");
    let mut server = S3Server::start(&dir.join("s3"), 0);
    // Every read asks the store, so the one in the outage finds it gone.
    let agent = s3_agent(&dir, &server, &["--cache-fresh-for", "0s"]);
    let token = agent.token("wf", "gen", 0, "1h");
    let auth = bearer(&token);
    let auth = [("Authorization", auth.as_str())];
    let payload: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (status, _) = http(
        agent.api,
        "PUT",
        "/v1/tasks/gen/0/outputs/data.bin",
        &auth,
        &payload,
    );
    assert_eq!(status, 200);
    let input = "/v1/tasks/gen/0/inputs/data?key=emissary/default/wf/gen/0/data.bin";
    let (status, body) = http(agent.api, "GET", input, &auth, b"");
    assert_eq!((status, body.len()), (200, payload.len()));

    server.stop();
    let (status, body) = http(agent.api, "GET", input, &auth, b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == payload, "the cached copy, byte for byte");
    assert_eq!(agent.metric("emissary_agent_cache_stale_hits"), 1.0);
    // What the node never served cannot be: the outage is reported, retryable.
    let (status, body) = http(
        agent.api,
        "GET",
        "/v1/tasks/gen/0/inputs/other?key=emissary/default/wf/gen/0/other.bin",
        &auth,
        b"",
    );
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(agent.log().contains("serving the cached copy unverified"));
}

#[test]
fn the_node_cache_evicts_the_least_recently_used_past_its_bound() {
    let dir = Dir::new("s3-cache-lru");
    let server = S3Server::start(&dir.join("s3"), 0);
    // Room for two of the three 1 MB objects.
    let agent = s3_agent(&dir, &server, &["--cache-max-bytes", "2500000"]);
    let token = agent.token("wf", "gen", 0, "1h");
    let auth = bearer(&token);
    let auth = [("Authorization", auth.as_str())];
    let object = |n: u8| vec![n; 1_000_000];
    for n in 1..=3u8 {
        let path = format!("/v1/tasks/gen/0/outputs/o{n}.bin");
        assert_eq!(http(agent.api, "PUT", &path, &auth, &object(n)).0, 200);
    }
    let read = |n: u8| {
        let path = format!("/v1/tasks/gen/0/inputs/i?key=emissary/default/wf/gen/0/o{n}.bin");
        let (status, body) = http(agent.api, "GET", &path, &auth, b"");
        assert!(status == 200 && body == object(n), "o{n}: {status}");
    };
    let misses = || agent.metric("emissary_agent_cache_misses");
    read(1);
    std::thread::sleep(Duration::from_millis(20)); // distinct modification times
    read(2);
    std::thread::sleep(Duration::from_millis(20));
    read(1); // 1 is now more recent than 2
    std::thread::sleep(Duration::from_millis(20));
    read(3); // over the bound: 2, the least recently used, goes
    assert_eq!(misses(), 3.0);
    let cache = agent.dir.join("data/cache");
    let entries = |sub: &str| {
        std::fs::read_dir(cache.join(sub))
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .count()
    };
    // The reader of 3 was fed the store's frames as they came, so it may have its last byte
    // before the fill has written it and committed the entry, which is when eviction runs.
    let settled = std::time::Instant::now() + Duration::from_secs(10);
    while (entries(""), entries("latest")) != (2, 2) && std::time::Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(entries(""), 2, "two objects fit");
    assert_eq!(entries("latest"), 2, "no pointer outlives its entry");
    read(1);
    read(3);
    assert_eq!(misses(), 3.0, "1 and 3 stayed");
    read(2);
    assert_eq!(misses(), 4.0, "2 was evicted");
}
