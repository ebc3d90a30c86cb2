//! Task pods on a real API server: created labelled, injected by the API server calling our
//! webhook, bound and run by the test kubelet, reporting through the node agent to the
//! reference controller, their artifacts in S3, their ends in the pod's status.

use std::time::Duration;

use serde_json::{Value, json};

use crate::k8s::*;

const LIMIT: Duration = Duration::from_secs(60);

fn terminated(pod: &k8s_openapi::api::core::v1::Pod, container: &str) -> Value {
    let state = &container_status(pod, container)["state"]["terminated"];
    assert!(
        state.is_object(),
        "{container} has not terminated: {}",
        serde_json::to_string_pretty(&pod.status).unwrap()
    );
    state.clone()
}

fn last(events: &[Value]) -> &Value {
    events.last().expect("an event")
}

fn finished(events: &[Value]) -> bool {
    events.last().is_some_and(|e| e["phase"] != "Running")
}

#[test]
fn two_pods_pass_an_artifact_through_the_agent_and_s3() {
    let e = installed();
    let ns = e.cluster.namespace("pods-artifacts");
    let producer = json!({
        "outputs": {"artifacts": [{"name": "numbers", "path": "/tmp/out", "archive": {"zstd": {}}}]}
    });
    let pod = e.task_pod(
        "produce",
        &ns,
        &producer,
        "busybox",
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/out && seq 1 50000 > /tmp/out/numbers && echo made",
        ],
    );
    let created = create_pod(e.cluster, &ns, &pod).unwrap();
    let spec = created.spec.as_ref().unwrap();
    assert_eq!(
        spec.init_containers.as_ref().unwrap()[0].name,
        "emissary-init",
        "the API server called the webhook"
    );
    assert_eq!(
        spec.containers[0].command.as_ref().unwrap()[..3],
        ["/var/run/emissary/emissary", "run", "--"]
    );
    let done = wait_finished(e.cluster, &ns, "produce", LIMIT);
    assert_eq!(
        done.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert_eq!(terminated(&done, "emissary-init")["exitCode"], 0);
    assert_eq!(terminated(&done, "main")["exitCode"], 0);
    let events = e.events_of("produce", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "Succeeded", "{events:#?}");
    assert_eq!(last(&events)["node"], emissary_tests::cluster::NODE);
    let key = last(&events)["outputs"]["artifacts"][0]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(e.s3.object(&key).is_some(), "{key} is not in S3");

    // The consumer's init container fetches the input through the agent; main moves it in.
    let consumer = json!({
        "inputs": {"artifacts": [{"name": "numbers", "path": "/tmp/in", "s3": {"key": key}}]}
    });
    let pod = e.task_pod(
        "consume",
        &ns,
        &consumer,
        "busybox",
        &["sh", "-c", "tail -n 1 /tmp/in/numbers"],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "consume", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 0);
    let events = e.events_of("consume", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "Succeeded", "{events:#?}");
    assert_eq!(last(&events)["outputs"]["result"]["inline"], "50000");
}

#[test]
fn a_failing_step_fails_its_pod_and_kubectl_shows_the_exit_code() {
    let e = installed();
    let ns = e.cluster.namespace("pods-fail");
    let pod = e.task_pod(
        "fails",
        &ns,
        &json!({}),
        "busybox",
        &["sh", "-c", "echo oops >&2; exit 3"],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "fails", LIMIT);
    assert_eq!(
        done.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    assert_eq!(terminated(&done, "main")["exitCode"], 3);
    assert_eq!(terminated(&done, "main")["reason"], "Error");
    let events = e.events_of("fails", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "Failed");
    assert_eq!(last(&events)["exit_code"], 3);

    let out = e
        .cluster
        .kubectl(["-n", &ns, "get", "pod", "fails", "--no-headers"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Error"), "{table}");
    let out = e.cluster.kubectl([
        "-n",
        &ns,
        "get",
        "pod",
        "fails",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.terminated.exitCode}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3");
}

#[test]
fn a_step_past_its_deadline_is_stopped_and_reported_timed_out() {
    let e = installed();
    let ns = e.cluster.namespace("pods-deadline");
    let pod = e.task_pod(
        "slow",
        &ns,
        &json!({"activeDeadlineSeconds": 1}),
        "busybox",
        &["sleep", "60"],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "slow", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 124);
    let events = e.events_of("slow", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "TimedOut", "{events:#?}");
}

#[test]
fn a_pod_past_its_active_deadline_is_stopped_by_the_kubelet_and_still_reports() {
    let e = installed();
    let ns = e.cluster.namespace("pods-active-deadline");
    let mut pod = e.task_pod(
        "overdue",
        &ns,
        &json!({}),
        "busybox",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 5' TERM; while :; do sleep 0.1; done",
        ],
    );
    pod["spec"]["activeDeadlineSeconds"] = json!(2);
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "overdue", LIMIT);
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(terminated(&done, "main")["exitCode"], 5);
    let events = e.events_of("overdue", LIMIT, finished);
    assert_eq!(last(&events)["exit_code"], 5, "{events:#?}");
    assert_eq!(last(&events)["outputs"]["result"]["inline"], "got TERM");
}

#[test]
fn an_oom_killed_step_is_reported_and_its_pod_says_so() {
    let e = installed();
    let ns = e.cluster.namespace("pods-oom");
    let mut pod = e.task_pod(
        "hog",
        &ns,
        &json!({}),
        "busybox",
        &[
            "sh",
            "-c",
            "echo growing; x=aaaaaaaa; while :; do x=$x$x; done",
        ],
    );
    pod["spec"]["containers"][0]["resources"] = json!({"limits": {"memory": "48Mi"}});
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "hog", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 137);
    assert_eq!(terminated(&done, "main")["reason"], "OOMKilled");
    let events = e.events_of("hog", LIMIT, finished);
    let end = last(&events);
    assert_eq!(end["phase"], "RetryableFailure", "{events:#?}");
    assert_eq!(end["error"]["kind"], "user");
    assert_eq!(end["outputs"]["result"]["inline"], "growing");
}

#[test]
fn a_pod_deleted_mid_run_stops_gracefully_and_its_final_report_arrives() {
    let e = installed();
    let ns = e.cluster.namespace("pods-delete");
    let pod = e.task_pod(
        "deleted",
        &ns,
        &json!({}),
        "busybox",
        &[
            "sh",
            "-c",
            "trap 'echo stopping; exit 3' TERM; echo started; while :; do sleep 0.1; done",
        ],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    e.events_of("deleted", LIMIT, |events| !events.is_empty());
    let out = e
        .cluster
        .kubectl(["-n", &ns, "delete", "pod", "deleted", "--wait=true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_pod(e.cluster, &ns, "deleted", LIMIT, |p| p.is_none());
    let events = e.events_of("deleted", LIMIT, finished);
    let end = last(&events);
    assert_eq!(end["exit_code"], 3, "{events:#?}");
    assert_eq!(end["outputs"]["result"]["inline"], "started\nstopping");
}

#[test]
fn a_native_sidecar_is_stopped_after_main() {
    let e = installed();
    let ns = e.cluster.namespace("pods-sidecar");
    let mut pod = e.task_pod(
        "with-sidecar",
        &ns,
        &json!({}),
        "busybox",
        &["sh", "-c", "sleep 0.5; echo main done"],
    );
    pod["spec"]["initContainers"] = json!([{
        "name": "proxy", "image": "busybox", "restartPolicy": "Always",
        "command": ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"],
    }]);
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "with-sidecar", LIMIT);
    assert_eq!(
        done.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    let (main, proxy) = (terminated(&done, "main"), terminated(&done, "proxy"));
    assert_eq!(proxy["exitCode"], 0, "{proxy}");
    assert!(
        proxy["finishedAt"].as_str() >= main["finishedAt"].as_str(),
        "the sidecar stopped before main: {main} {proxy}"
    );
    let names: Vec<String> = done
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["emissary-init", "proxy"]);
    let events = e.events_of("with-sidecar", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "Succeeded");
}

#[test]
fn a_script_step_runs_as_pid_1_non_root_on_a_read_only_root() {
    let e = installed();
    let ns = e.cluster.namespace("pods-script");
    let spec = json!({
        "inputs": {"artifacts": [{"name": "greeting", "path": "/tmp/greeting.txt", "raw": {"data": "hello from init"}}]},
        "outputs": {"parameters": [{"name": "who", "valueFrom": {"path": "/tmp/who"}}]},
        "script": {"command": ["sh"], "source": "cat /tmp/greeting.txt; echo; echo pid1=$(cat /proc/1/comm) uid=$(id -u); \
                   if touch /rootfs-is-writable 2>/dev/null; then echo writable; else echo read-only; fi; id -un > /tmp/who"}
    });
    // The script `emissary init` wrote, run by the template's command.
    let mut pod = e.task_pod(
        "script",
        &ns,
        &spec,
        "busybox",
        &["sh", "/var/run/emissary/script"],
    );
    let main = &mut pod["spec"]["containers"][0];
    main["securityContext"] =
        json!({"runAsUser": 65532, "runAsNonRoot": true, "readOnlyRootFilesystem": true});
    main["volumeMounts"] = json!([{"name": "tmp", "mountPath": "/tmp"}]);
    pod["spec"]["volumes"] = json!([{"name": "tmp", "emptyDir": {}}]);
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "script", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 0);
    let events = e.events_of("script", LIMIT, finished);
    let end = last(&events);
    assert_eq!(
        end["outputs"]["result"]["inline"],
        "hello from init\npid1=emissary uid=65532\nread-only"
    );
    assert_eq!(
        end["outputs"]["parameters"][0]["value"]["inline"], "nonroot",
        "{end}"
    );
}

#[test]
fn a_container_set_runs_in_order_in_one_pod() {
    let e = installed();
    let ns = e.cluster.namespace("pods-containerset");
    let spec = json!({"containerSet": {"containers": [
        {"name": "a", "command": ["sh", "-c", "sleep 0.2; echo from-a > /var/run/emissary/handoff"]},
        {"name": "main", "command": ["sh", "-c", "cat /var/run/emissary/handoff"], "dependencies": ["a"]}
    ]}});
    let mut pod = e.task_pod(
        "set",
        &ns,
        &spec,
        "busybox",
        &["sh", "-c", "cat /var/run/emissary/handoff"],
    );
    let mut a = pod["spec"]["containers"][0].clone();
    a["name"] = json!("a");
    a["command"] = json!([
        "sh",
        "-c",
        "sleep 0.2; echo from-a > /var/run/emissary/handoff"
    ]);
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .insert(0, a);
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "set", LIMIT);
    assert_eq!(terminated(&done, "a")["exitCode"], 0);
    assert_eq!(terminated(&done, "main")["exitCode"], 0);
    let events = e.events_of("set", LIMIT, finished);
    assert_eq!(last(&events)["outputs"]["result"]["inline"], "from-a");
    assert_eq!(last(&events)["container"], "main");
}

#[test]
fn a_step_whose_image_has_no_shell_runs() {
    let e = installed();
    let ns = e.cluster.namespace("pods-noshell");
    let pod = e.task_pod(
        "noshell",
        &ns,
        &json!({}),
        "gcr.io/distroless/static-debian12",
        &["/bin/busybox", "echo", "no shell needed"],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "noshell", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 0);
    let events = e.events_of("noshell", LIMIT, finished);
    assert_eq!(
        last(&events)["outputs"]["result"]["inline"],
        "no shell needed"
    );
}

#[test]
fn a_terminate_from_the_controller_reaches_the_process_in_its_pod() {
    let e = installed();
    let ns = e.cluster.namespace("pods-terminate");
    let pod = e.task_pod(
        "stop-me",
        &ns,
        &json!({}),
        "busybox",
        &[
            "sh",
            "-c",
            "trap 'echo terminated; exit 7' TERM; while :; do sleep 0.1; done",
        ],
    );
    create_pod(e.cluster, &ns, &pod).unwrap();
    e.events_of("stop-me", LIMIT, |events| !events.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    e.controller
        .command(json!({"workflow": ns, "task_id": "stop-me", "attempt": 0, "kind": "terminate"}));
    let done = wait_finished(e.cluster, &ns, "stop-me", LIMIT);
    assert_eq!(terminated(&done, "main")["exitCode"], 7);
    let events = e.events_of("stop-me", LIMIT, finished);
    assert_eq!(last(&events)["phase"], "Aborted");
    assert_eq!(last(&events)["outputs"]["result"]["inline"], "terminated");
}
