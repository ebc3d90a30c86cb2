//! End to end: reference controller + agent + S3 server + `emissary run` of Argo templates.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent_util::*;
use crate::controller::Controller;
use crate::s3::{self, S3Server};
use crate::util::*;

/// A node's worth of services: S3, a controller, the agent.
pub struct Cluster {
    pub dir: Dir,
    pub s3: S3Server,
    pub controller: Controller,
    pub agent: Agent,
}

impl Cluster {
    pub fn start(name: &str) -> Cluster {
        let dir = Dir::new(name);
        let s3 = S3Server::start(&dir.join("s3"), 0);
        let controller = Controller::start();
        let store = format!("s3://{}/wf-store", s3::BUCKET);
        let agent = Agent::start_with_env(
            dir.join("agent"),
            &[
                "--store",
                &store,
                "--s3-endpoint",
                &s3.endpoint(),
                "--s3-path-style",
                "--controller-url",
                &controller.url(),
            ],
            &[
                ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
            ],
        );
        Cluster {
            dir,
            s3,
            controller,
            agent,
        }
    }

    /// `emissary run` of `spec` as task `task` (its root under the test dir).
    fn step(&self, task: &str, spec: &serde_json::Value) -> std::process::Command {
        self.step_of("wf-e2e", task, spec)
    }

    /// [`Cluster::step`] in workflow `workflow`.
    fn step_of(
        &self,
        workflow: &str,
        task: &str,
        spec: &serde_json::Value,
    ) -> std::process::Command {
        let root = self.dir.join(format!("{workflow}-{task}"));
        let mut cmd = emissary(["run", "--root", root.to_str().unwrap()]);
        cmd.env("EMISSARY_TEMPLATE", spec.to_string())
            .env("EMISSARY_AGENT_RETRY", "20s");
        self.agent.emissary_env(&mut cmd, workflow, task, 0);
        cmd
    }
}

/// A shell script that sleeps (as `sleeps(marker)` finds) until TERM, then says so and exits 3.
fn until_term(marker: &str) -> String {
    format!("trap 'echo got TERM; exit 3' TERM; sleep {marker} & wait")
}

#[test]
fn an_artifact_passes_from_one_step_to_the_next_through_agent_and_s3() {
    let cluster = Cluster::start("e2e-artifacts");
    let work = cluster.dir.join("work");
    let producer = json!({
        "name": "generate",
        "inputs": {"artifacts": [{"name": "seed", "path": work.join("seed.txt"), "raw": {"data": "seed-42"}}]},
        "container": {"command": ["sh", "-c", format!(
            "mkdir -p {w}/out && cp {w}/seed.txt {w}/out/ && head -c 3000000 /dev/urandom > {w}/out/blob && echo generated > {w}/msg && echo done",
            w = work.display())]},
        "outputs": {
            "parameters": [{"name": "msg", "valueFrom": {"path": work.join("msg")}}],
            "artifacts": [{"name": "out", "path": work.join("out"), "archive": {"zstd": {}}}]
        }
    });
    let out = run(
        &mut cluster.step("generate", &producer),
        b"",
        Duration::from_secs(60),
    );
    out.assert_code(0);
    let events = cluster.controller.wait_events(2, Duration::from_secs(20));
    let last = events.last().unwrap();
    assert_eq!(last["phase"], "Succeeded", "{last}");
    assert_eq!(
        last["outputs"]["parameters"][0]["value"]["inline"],
        "generated"
    );
    assert_eq!(last["outputs"]["result"]["inline"], "done");
    let artifact = &last["outputs"]["artifacts"][0];
    let key = artifact["key"].as_str().unwrap().to_owned();
    assert_eq!(key, "wf-store/default/wf-e2e/generate/0/out.tar.zst");
    let object = cluster.s3.object(&key).expect("the artifact is in S3");
    assert_eq!(artifact["size"], object.len());

    let consumed = cluster.dir.join("consumed");
    let consumer = json!({
        "name": "consume",
        "inputs": {"artifacts": [{"name": "in", "path": consumed, "s3": {"key": key}}]},
        "container": {"command": ["sh", "-c", format!("cat {}/seed.txt; cmp {}/blob {}/out/blob && echo same", consumed.display(), consumed.display(), work.display())]}
    });
    let out = run(
        &mut cluster.step("consume", &consumer),
        b"",
        Duration::from_secs(60),
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "seed-42same\n");

    cluster.controller.wait_events(4, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let events = cluster.controller.events();
    let seen: Vec<(String, u64, String)> = events
        .iter()
        .map(|e| {
            (
                e["task_id"].as_str().unwrap().to_owned(),
                e["seq"].as_u64().unwrap(),
                e["phase"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("generate".into(), 1, "Running".into()),
            ("generate".into(), 2, "Succeeded".into()),
            ("consume".into(), 1, "Running".into()),
            ("consume".into(), 2, "Succeeded".into())
        ],
        "{events:#?}"
    );
    let digest = |e: &serde_json::Value| e["inputs_digest"].as_str().unwrap().to_owned();
    assert_ne!(digest(&events[1]), digest(&events[3]));
}

#[test]
fn a_terminate_from_the_controller_stops_the_step() {
    let cluster = Cluster::start("e2e-terminate");
    let marker = marker(71);
    let spec = json!({"container": {"command": ["sh", "-c", until_term(&marker)]}});
    let running = start(&mut cluster.step("long", &spec));
    assert!(
        wait_until(Duration::from_secs(10), || sleeps(&marker).len() == 1),
        "the step did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    cluster
        .controller
        .command(json!({"task_id": "long", "attempt": 0, "kind": "terminate"}));
    let out = running.finish(Duration::from_secs(20));
    out.assert_code(3);
    assert!(out.stdout().contains("got TERM"), "{}", out.dump());
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "terminate took {:?}",
        sent.elapsed()
    );
    let events = cluster.controller.wait_events(2, Duration::from_secs(20));
    assert_eq!(events.last().unwrap()["phase"], "Aborted", "{events:#?}");
}

#[test]
fn a_terminate_for_one_workflow_leaves_the_same_task_id_of_another_running() {
    let cluster = Cluster::start("e2e-terminate-workflow");
    let marker = marker(73);
    let spec = json!({"container": {"command": ["sh", "-c", until_term(&marker)]}});
    let a = start(&mut cluster.step_of("wf-a", "step", &spec));
    let b = start(&mut cluster.step_of("wf-b", "step", &spec));
    assert!(
        wait_until(Duration::from_secs(10), || sleeps(&marker).len() == 2),
        "the steps did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    cluster
        .controller
        .command(json!({"workflow": "wf-a", "task_id": "step", "attempt": 0, "kind": "terminate"}));
    a.finish(Duration::from_secs(20)).assert_code(3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sleeps(&marker).len(), 1, "wf-b's step was stopped too");
    cluster
        .controller
        .command(json!({"task_id": "step", "attempt": 0, "kind": "terminate"}));
    b.finish(Duration::from_secs(20)).assert_code(3);
    let events = cluster.controller.wait_events(4, Duration::from_secs(20));
    let last = |workflow: &str| {
        events
            .iter()
            .rev()
            .find(|e| e["workflow"] == workflow)
            .unwrap_or_else(|| panic!("no event of {workflow}: {events:#?}"))["phase"]
            .clone()
    };
    assert_eq!(last("wf-a"), "Aborted");
    assert_eq!(last("wf-b"), "Aborted");
}

#[test]
fn a_terminate_reaches_every_container_of_a_container_set() {
    let cluster = Cluster::start("e2e-terminate-set");
    let marker = marker(72);
    let script = until_term(&marker);
    let spec = json!({"containerSet": {"containers": [
        {"name": "a", "command": ["sh", "-c", script]},
        {"name": "b", "command": ["sh", "-c", script]}
    ]}});
    let containers: Vec<Running> = ["a", "b"]
        .into_iter()
        .map(|name| start(cluster.step("set", &spec).args(["--container", name])))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || sleeps(&marker).len() == 2),
        "the containers did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    cluster
        .controller
        .command(json!({"task_id": "set", "attempt": 0, "kind": "terminate"}));
    for container in containers {
        let out = container.finish(Duration::from_secs(20));
        out.assert_code(3);
        assert!(out.stdout().contains("got TERM"), "{}", out.dump());
    }
}

#[test]
fn an_agent_killed_mid_upload_is_retried_and_the_object_lands_once() {
    let mut cluster = Cluster::start("e2e-agent-crash");
    let work = cluster.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    // A 96 MiB output uploads for a while; the agent dies in the middle of it.
    let spec = json!({
        "container": {"command": ["sh", "-c", format!("head -c 100663296 /dev/urandom > {}/big", work.display())]},
        "outputs": {"artifacts": [{"name": "big", "path": work.join("big"), "archive": {"none": {}}}]}
    });
    let running = start(&mut cluster.step("crashy", &spec));
    let upload_started = || {
        cluster
            .agent
            .log()
            .lines()
            .any(|l| l.contains("received") && l.contains("/outputs/big"))
    };
    assert!(
        wait_until(Duration::from_secs(60), upload_started),
        "the upload never started"
    );
    cluster.agent.crash_and_restart();
    let before_crash = cluster.agent.log();
    let before_crash = before_crash
        .split("\"listening\"")
        .nth(1)
        .unwrap_or_default();
    assert!(
        !before_crash.contains("\"stored\""),
        "the upload finished before the crash: the test proved nothing"
    );
    let out = running.finish(Duration::from_secs(120));
    out.assert_code(0);
    let key = "wf-store/default/wf-e2e/crashy/0/big";
    assert!(
        cluster.s3.object(key).unwrap() == std::fs::read(work.join("big")).unwrap(),
        "the object is not the whole file"
    );
    cluster.controller.wait_events(2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let events = cluster.controller.events();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2], "lost or duplicated events: {events:#?}");
    assert_eq!(events[1]["phase"], "Succeeded");
}

#[test]
fn an_unreachable_agent_fails_the_step_as_retryable_without_hanging() {
    let dir = Dir::new("e2e-no-agent");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = json!({"container": {"command": ["true"]}});
    let started = Instant::now();
    let out = run(
        emissary(["run", "--root", dir.path().to_str().unwrap()])
            .env("EMISSARY_TEMPLATE", spec.to_string())
            .env("EMISSARY_AGENT_ADDR", closed.to_string())
            .env("EMISSARY_TOKEN", "x.y")
            .env("EMISSARY_TASK_ID", "t")
            .env("EMISSARY_AGENT_RETRY", "1s"),
        b"",
        Duration::from_secs(30),
    );
    out.assert_code(125).assert_stderr_contains("unreachable");
    assert!(started.elapsed() < Duration::from_secs(10));
    let outputs = dir.read_json("outputs.json");
    assert_eq!(outputs["reason"], "StartFailed");
    assert_eq!(outputs["error"]["kind"], "system");
    assert_eq!(outputs["error"]["retryable"], true);
}
