//! Whole pods: an init container installs the emissary, task containers run under it as PID 1
//! of their namespace, as a non-root user, on a read-only root (see `pod.rs`).

use std::time::Duration;

use serde_json::json;

use crate::pod::{self, Image, Pod};
use crate::util::*;

const EMISSARY: &str = "/var/run/emissary/emissary";

/// Runs the init container: `emissary init` from the emissary image, with `spec` if given.
fn init(pod: &Pod, spec: Option<&str>) {
    let rootfs = pod.rootfs("init", Image::Emissary);
    let mut cmd = pod.container(
        &rootfs,
        &["/emissary", "init", "--dest", "/var/run/emissary"],
    );
    if let Some(spec) = spec {
        cmd.env("EMISSARY_TEMPLATE", spec);
    }
    run_quick(&mut cmd).assert_code(0);
}

fn read_json(pod: &Pod, path: &str) -> serde_json::Value {
    let bytes = std::fs::read(pod.shared.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_script_step_runs_as_pid_1_non_root_on_a_read_only_root() {
    if !pod::can_run_pods() {
        return;
    }
    let pod = Pod::new("script", 256 << 20);
    let spec = json!({
        "inputs": {"artifacts": [{"name": "greeting", "path": "/tmp/greeting.txt", "raw": {"data": "hello from init"}}]},
        "outputs": {"parameters": [{"name": "who", "valueFrom": {"path": "/tmp/who"}}]},
        "script": {"command": ["sh"], "source": "cat /tmp/greeting.txt; echo; echo pid1=$(cat /proc/1/comm) uid=$(id -u); \
                   if touch /rootfs-is-writable 2>/dev/null; then echo writable; else echo read-only; fi; id -un > /tmp/who"}
    })
    .to_string();
    init(&pod, Some(&spec));
    assert_eq!(
        std::fs::read_to_string(pod.shared.join("inputs/greeting")).unwrap(),
        "hello from init"
    );

    let rootfs = pod.rootfs("main", Image::Busybox);
    let template = "@/var/run/emissary/template";
    let out = run_quick(
        pod.container(&rootfs, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", template),
    );
    out.assert_code(0);
    assert_eq!(
        out.stdout(),
        format!(
            "hello from init\npid1=emissary uid={}\nread-only\n",
            pod::UID
        )
    );
    let outputs = read_json(&pod, "outputs.json");
    assert_eq!(outputs["outputs"]["parameters"][0]["value"], "nonroot");
    assert_eq!(
        std::fs::read_to_string(pod.shared.join("ctr/main/exitcode")).unwrap(),
        "0"
    );
}

#[test]
fn a_container_set_runs_in_order_in_one_pod() {
    if !pod::can_run_pods() {
        return;
    }
    let pod = Pod::new("containerset", 256 << 20);
    let spec = json!({"containerSet": {"containers": [
        {"name": "a", "command": ["sh", "-c", "sleep 0.2; echo from-a > /var/run/emissary/handoff"]},
        {"name": "main", "command": ["sh", "-c", "cat /var/run/emissary/handoff"], "dependencies": ["a"]}
    ]}})
    .to_string();
    init(&pod, Some(&spec));
    let template = "@/var/run/emissary/template";
    let main_root = pod.rootfs("main", Image::Busybox);
    let a_root = pod.rootfs("a", Image::Busybox);
    let main = start(
        pod.container(&main_root, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", template)
            .env("EMISSARY_CONTAINER_NAME", "main"),
    );
    let a = run_quick(
        pod.container(&a_root, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", template)
            .env("ARGO_CONTAINER_NAME", "a"),
    );
    a.assert_code(0);
    let main = main.finish(Duration::from_secs(10));
    main.assert_code(0);
    assert_eq!(main.stdout(), "from-a\n");
    assert_eq!(read_json(&pod, "outputs.json")["container"], "main");
}

#[test]
fn an_oom_killed_step_is_reported_and_the_emissary_survives_to_say_so() {
    if !pod::can_run_pods() {
        return;
    }
    let pod = Pod::new("oom", 48 << 20);
    if !pod.has_memory_limit() {
        eprintln!("skipped: no memory cgroup controller");
        return;
    }
    // The string doubles until the cgroup's limit stops it.
    let spec = json!({"container": {"command": ["sh", "-c", "echo growing; x=aaaaaaaa; while :; do x=$x$x; done"]}}).to_string();
    init(&pod, Some(&spec));
    let rootfs = pod.rootfs("main", Image::Busybox);
    let out = run(
        pod.container(&rootfs, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", &spec),
        b"",
        Duration::from_secs(60),
    );
    out.assert_code(137);
    let outputs = read_json(&pod, "outputs.json");
    assert_eq!(outputs["reason"], "OOMKilled", "{outputs}");
    assert_eq!(outputs["error"]["retryable"], true);
    assert_eq!(outputs["outputs"]["result"], "growing");
}

#[test]
fn a_step_whose_image_has_no_shell_runs() {
    if !pod::can_run_pods() {
        return;
    }
    let pod = Pod::new("noshell", 256 << 20);
    let spec =
        json!({"container": {"command": ["/bin/busybox", "echo", "no shell needed"]}}).to_string();
    init(&pod, Some(&spec));
    let rootfs = pod.rootfs("main", Image::NoShell);
    assert!(!rootfs.join("bin/sh").exists());
    let out = run_quick(
        pod.container(&rootfs, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", &spec),
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "no shell needed\n");
    // Asking for a shell there fails as a missing command should.
    let spec = json!({"script": {"source": "echo hi"}}).to_string();
    let out = run_quick(
        pod.container(&rootfs, &[EMISSARY, "run"])
            .env("EMISSARY_TEMPLATE", &spec),
    );
    out.assert_code(127)
        .assert_stderr_contains("\"sh\": command not found");
}

/// The task environment the injector gives a pod's containers, for `task` on this agent.
fn task_env(
    cmd: &mut std::process::Command,
    cluster: &crate::agent_e2e::Cluster,
    task: &str,
    spec: &str,
) {
    cluster.agent.emissary_env(cmd, "wf-pods", task, 0);
    cmd.env("EMISSARY_TEMPLATE", spec)
        .env("EMISSARY_AGENT_RETRY", "20s");
}

#[test]
fn two_pods_pass_an_artifact_through_the_agent_and_s3() {
    if !pod::can_run_pods() {
        return;
    }
    let cluster = crate::agent_e2e::Cluster::start("pods-artifacts");
    let producer = json!({
        "container": {"command": ["sh", "-c", "mkdir -p /tmp/out && seq 1 50000 > /tmp/out/numbers && echo made"]},
        "outputs": {"artifacts": [{"name": "numbers", "path": "/tmp/out", "archive": {"zstd": {}}}]}
    })
    .to_string();
    let pod_a = Pod::new("pods-producer", 256 << 20);
    let rootfs = pod_a.rootfs("init", Image::Emissary);
    let mut init_a = pod_a.container(
        &rootfs,
        &["/emissary", "init", "--dest", "/var/run/emissary"],
    );
    task_env(&mut init_a, &cluster, "produce", &producer);
    run_quick(&mut init_a).assert_code(0);
    let rootfs = pod_a.rootfs("main", Image::Busybox);
    let mut main_a = pod_a.container(&rootfs, &[EMISSARY, "run"]);
    task_env(&mut main_a, &cluster, "produce", &producer);
    let out = run(&mut main_a, b"", Duration::from_secs(60));
    out.assert_code(0);
    let events = cluster.controller.wait_events(2, Duration::from_secs(20));
    let key = events[1]["outputs"]["artifacts"][0]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cluster.s3.object(&key).is_some(), "{key} is not in S3");

    // The consumer's init container fetches the input through the agent; its task container
    // only moves it into place.
    let consumer = json!({
        "inputs": {"artifacts": [{"name": "numbers", "path": "/tmp/in", "s3": {"key": key}}]},
        "container": {"command": ["sh", "-c", "tail -n 1 /tmp/in/numbers"]}
    })
    .to_string();
    let pod_b = Pod::new("pods-consumer", 256 << 20);
    let rootfs = pod_b.rootfs("init", Image::Emissary);
    let mut init_b = pod_b.container(
        &rootfs,
        &["/emissary", "init", "--dest", "/var/run/emissary"],
    );
    task_env(&mut init_b, &cluster, "consume", &consumer);
    run_quick(&mut init_b).assert_code(0);
    assert!(
        pod_b.shared.join("inputs/numbers/numbers").exists(),
        "init did not stage the input"
    );
    let rootfs = pod_b.rootfs("main", Image::Busybox);
    let mut main_b = pod_b.container(&rootfs, &[EMISSARY, "run"]);
    task_env(&mut main_b, &cluster, "consume", &consumer);
    let out = run(&mut main_b, b"", Duration::from_secs(60));
    out.assert_code(0);
    assert_eq!(out.stdout(), "50000\n");
    let events = cluster.controller.wait_events(4, Duration::from_secs(20));
    let phases: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["task_id"].as_str().unwrap(), e["phase"].as_str().unwrap()))
        .collect();
    assert_eq!(
        phases,
        [
            ("produce", "Running"),
            ("produce", "Succeeded"),
            ("consume", "Running"),
            ("consume", "Succeeded")
        ]
    );
}

#[test]
fn a_terminate_from_the_controller_reaches_the_process_in_its_pod() {
    if !pod::can_run_pods() {
        return;
    }
    let cluster = crate::agent_e2e::Cluster::start("pods-terminate");
    let spec = json!({"container": {"command": ["sh", "-c", "trap 'echo terminated; exit 7' TERM; while :; do sleep 0.1; done"]}}).to_string();
    let pod = Pod::new("pods-terminate", 256 << 20);
    init(&pod, None);
    let rootfs = pod.rootfs("main", Image::Busybox);
    let mut main = pod.container(&rootfs, &[EMISSARY, "run"]);
    task_env(&mut main, &cluster, "stop-me", &spec);
    let running = start(&mut main);
    cluster.controller.wait_events(1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    cluster
        .controller
        .command(json!({"task_id": "stop-me", "attempt": 0, "kind": "terminate"}));
    let out = running.finish(Duration::from_secs(20));
    out.assert_code(7);
    assert!(out.stdout().contains("terminated"), "{}", out.dump());
    let events = cluster.controller.wait_events(2, Duration::from_secs(20));
    assert_eq!(events[1]["phase"], "Aborted");
}
