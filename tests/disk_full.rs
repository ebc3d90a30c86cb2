//! Disk full everywhere (issue 14, item 4): the store, the node cache and the emissary's log
//! directory on a full filesystem (a size-limited tmpfs). A clear error, the step failed as a
//! system error worth retrying, nothing half-written left visible, and the agent still serving.

use std::time::Duration;

use crate::agent_util::*;
use crate::util::*;

/// The final event of the step that printed `out`.
fn result(agent: &Agent, out: &Output) -> serde_json::Value {
    std::fs::read_to_string(agent.dir.join("data/events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e.get("exit_code").is_some())
        .unwrap_or_else(|| panic!("no result reached the agent{}", out.dump()))
}

/// A step of `task` writing `bytes` of noise to an output artifact, against `agent`.
fn step_with_output(dir: &Dir, agent: &Agent, task: &str, bytes: usize) -> Output {
    let file = dir.join(format!("{task}.out"));
    let spec = serde_json::json!({
        "container": {"command": ["sh", "-c", format!("head -c {bytes} /dev/urandom > {}", file.display())]},
        "outputs": {"artifacts": [{"name": "out", "path": file, "archive": {"none": {}}}]}
    });
    let mut cmd = emissary(["run", "--root", dir.join(task).to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", task, 0);
    run(&mut cmd, b"", Duration::from_secs(60))
}

#[test]
fn a_full_store_fails_the_step_as_a_retryable_system_error_and_keeps_serving() {
    let dir = Dir::new("disk-full-store");
    let _disk = Tmpfs::mount(&dir.join("agent/data/store"), "2m");
    // No reserve: the write itself must meet the full disk.
    let agent = Agent::start(dir.join("agent"), &["--store-reserve-bytes", "0"]);

    let out = step_with_output(&dir, &agent, "big", 4 << 20);
    assert_ne!(out.code, Some(0), "{}", out.dump());
    out.assert_stderr_contains("No space left on device");
    let result = result(&agent, &out);
    assert_eq!(result["error"]["kind"], "system", "{result:#}");
    assert_eq!(result["error"]["retryable"], true, "{result:#}");
    assert_eq!(
        agent.store_files(),
        Vec::<String>::new(),
        "half an upload is visible"
    );

    let out = step_with_output(&dir, &agent, "small", 1000);
    out.assert_code(0);
    assert_eq!(agent.store_files().len(), 1, "{:?}", agent.store_files());
}

#[test]
fn a_full_node_cache_disk_streams_the_input_around_the_cache() {
    let dir = Dir::new("disk-full-cache");
    let cache = dir.join("agent/data/cache");
    let _disk = Tmpfs::mount(&cache, "4m");
    let server = crate::s3::S3Server::start(&dir.join("s3"), 0);
    let agent = s3_agent(&dir, &server, &[]);
    upload_and_read_back(&agent, &noise(9 << 20, 7), 2);
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the full cache disk holds {left:?}");
}

#[test]
fn a_full_log_directory_fails_the_step_as_a_retryable_system_error_and_loses_no_echo() {
    let dir = Dir::new("disk-full-logs");
    let agent = Agent::start(dir.join("agent"), &[]);
    let root = dir.join("root");
    let _disk = Tmpfs::mount(&root, "512k");
    let spec =
        serde_json::json!({"container": {"command": ["sh", "-c", "head -c 2000000 /dev/zero"]}});
    let mut cmd = emissary(["run", "--root", root.to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", "t", 0);
    let out = run(&mut cmd, b"", Duration::from_secs(60));
    assert_eq!(out.code, Some(125), "{}", out.dump());
    assert_eq!(out.stdout.len(), 2_000_000, "the echo lost output");
    out.assert_stderr_contains("No space left on device");
    let result = result(&agent, &out);
    assert_eq!(result["exit_code"], 125, "{result:#}");
    assert_eq!(result["error"]["kind"], "system", "{result:#}");
    assert_eq!(result["error"]["retryable"], true, "{result:#}");
}
