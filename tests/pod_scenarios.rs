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
