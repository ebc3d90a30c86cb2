//! The emissary API against its own contract (issue 14, item 2): schemathesis drives every
//! operation of `protocol/openapi.yaml` tagged `emissary` against a live agent — examples,
//! boundary values, fuzzed and schema-violating requests, and stateful sequences along the
//! document's links — with a valid token and with a forged one. No 5xx, every status,
//! content type and body as documented, schema-violating input refused, no auth ignored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

fn schemathesis() -> PathBuf {
    std::env::var_os("SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/schemathesis")
        })
}

/// Every check, bar one the document cannot serve: a schema-valid request may still be refused
/// for what no schema says (an artifact key under another task, a spent token). The 501s of a
/// pod's operations are documented: this agent has no Kubernetes API.
const CONFIG: &str = r#"
[parameters]
"path.task" = "t"
"path.attempt" = 0
"query.wait" = "1s"

[checks]
enabled = true
positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "/containers/|/argo/login"
checks.not_a_server_error.enabled = false
"#;

/// Per operation and phase: a few in `make test`, more under `make fuzz`.
fn max_examples() -> String {
    std::env::var("SCHEMATHESIS_MAX_EXAMPLES").unwrap_or_else(|_| "25".into())
}

fn run_schemathesis(dir: &Dir, agent: &Agent, token: &str, phases: &str) -> Output {
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/openapi.yaml");
    let mut cmd = Command::new(schemathesis());
    cmd.arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&document)
        .args(["--url", &format!("http://{}", agent.api)])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--include-tag", "emissary", "--phases", phases])
        .args(["--max-examples", &max_examples()])
        .args(["--workers", "1", "--seed", "1"])
        .args(["--no-color", "--request-timeout", "20"])
        .current_dir(dir.path());
    run(&mut cmd, b"", Duration::from_secs(3600))
}

#[test]
fn the_emissary_api_meets_its_openapi_document_under_schemathesis() {
    let dir = Dir::new("schemathesis");
    let agent = Agent::start(dir.join("agent"), &[]);
    let token = agent.token("wf", "t", 0, "1h");
    // The links first, while the token is unspent: an upload read back by its key.
    let out = run_schemathesis(&dir, &agent, &token, "stateful");
    out.assert_code(0);
    assert!(
        out.stdout().contains("1 covered / 1 selected"),
        "the upload was never read back by its link{}",
        out.dump()
    );
    let out = run_schemathesis(&dir, &agent, &token, "examples,coverage,fuzzing");
    out.assert_code(0);
    let (claims, _) = token.split_once('.').unwrap();
    let forged = format!("{claims}.c2lnbmVkIGJ5IG5vYm9keQ");
    let out = run_schemathesis(&dir, &agent, &forged, "examples,coverage,fuzzing");
    out.assert_code(0);
}
