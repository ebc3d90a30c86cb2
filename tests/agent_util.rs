//! The agent helpers of the black-box tests: the shared launcher and raw HTTP
//! (`emissary_tests::agent`), and requests and set-ups only these tests make.

pub use emissary_tests::agent::*;

use crate::util::*;

/// One request to the agent's API with `token`; the status and the body as text.
pub fn request(agent: &Agent, token: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let [(name, value)] = auth(token);
    let (status, body) = http(agent.api, method, path, &[(name, &value)], body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An agent on the embedded S3 `server`, with `extra` flags.
pub fn s3_agent(dir: &Dir, server: &crate::s3::S3Server, extra: &[&str]) -> Agent {
    s3_agent_at(dir, &server.endpoint(), extra)
}

/// An agent on the S3 server at `endpoint` (e.g. through a proxy); credentials come through
/// the standard AWS environment variables.
pub fn s3_agent_at(dir: &Dir, endpoint: &str, extra: &[&str]) -> Agent {
    let store = format!("s3://{}/emissary", crate::s3::BUCKET);
    let mut args = vec![
        "--store",
        &store,
        "--s3-endpoint",
        endpoint,
        "--s3-region",
        "us-east-1",
        "--s3-path-style",
    ];
    args.extend_from_slice(extra);
    Agent::start_with_env(
        dir.join("agent"),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", crate::s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", crate::s3::SECRET_KEY),
        ],
    )
}

/// Stores `payload` as task t's output `big` (in parts: only an object with an ETag is ever
/// cached) and reads it back as an input `reads` times, checking every byte.
pub fn upload_and_read_back(agent: &Agent, payload: &[u8], reads: usize) {
    let token = agent.token("wf", "t", 0, "1h");
    let (status, body) = request(agent, &token, "PUT", "/v1/tasks/t/0/outputs/big", payload);
    assert_eq!(status, 200, "{body}");
    for _ in 0..reads {
        let [(name, value)] = auth(&token);
        let (status, got) = http(
            agent.api,
            "GET",
            "/v1/tasks/t/0/inputs/big?key=emissary/default/wf/t/0/big",
            &[(name, &value)],
            b"",
        );
        assert_eq!(status, 200);
        assert!(got == payload, "the input came back changed");
    }
}
