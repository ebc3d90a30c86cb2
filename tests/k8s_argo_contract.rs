//! The Argo drop-in's contract beyond the examples: who may log in, what a re-created pod finds,
//! archived logs, `http` inputs, progress, large templates and arguments, what emissary does not
//! do, and the agent unreachable or restarted mid-step.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent_util::{Agent, bearer, http};
use crate::k8s::*;
use crate::k8s_argo::{Setup, argo, install, nodes, summary};
use crate::util::{Dir, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

/// A pod as Argo's controller makes one, for the agent's checks (it runs `sleep` only).
fn argo_like_pod(name: &str, node_id: &str, workflow: &str) -> Value {
    let template = json!({"name": "t", "container": {"image": "busybox", "command": ["true"]}});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name,
            "labels": {"workflows.argoproj.io/workflow": workflow},
            "annotations": {"workflows.argoproj.io/node-id": node_id}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
            "initContainers": [{"name": "init", "image": "busybox", "command": ["true"],
                "env": [{"name": "ARGO_TEMPLATE", "value": template.to_string()}]}],
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "300"]}]},
    })
}

/// A ServiceAccount token of `ns/default`, bound to pod `name` (as the kubelet projects one),
/// or to nothing.
fn token(ns: &str, pod: Option<(&str, &str)>) -> String {
    let mut args = vec!["-n", ns, "create", "token", "default"];
    if let Some((name, uid)) = pod {
        args.extend([
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            name,
            "--bound-object-uid",
            uid,
        ]);
    }
    let out = installed().cluster.kubectl(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn login(agent: std::net::SocketAddr, token: &str) -> (u16, Value) {
    let auth = bearer(token);
    let (status, body) = http(
        agent,
        "POST",
        "/v1/argo/login",
        &[("Authorization", auth.as_str())],
        b"{}",
    );
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn uid_of(ns: &str, name: &str) -> String {
    let pod = wait_pod(installed().cluster, ns, name, LIMIT, |p| p.is_some()).unwrap();
    pod.metadata.uid.unwrap()
}

#[test]
fn a_pod_logs_in_with_its_own_token_and_gets_nothing_else() {
    let e = installed();
    let ns = e.cluster.namespace("argo-login");
    create_pod(
        e.cluster,
        &ns,
        &argo_like_pod("argo-pod", "wf-a-1234", "wf-a"),
    )
    .unwrap();
    let argo_uid = uid_of(&ns, "argo-pod");
    let mut plain = argo_like_pod("plain-pod", "x", "x");
    plain["metadata"] = json!({"name": "plain-pod"});
    create_pod(e.cluster, &ns, &plain).unwrap();
    let plain_uid = uid_of(&ns, "plain-pod");

    let (status, answer) = login(e.agent.api, &token(&ns, Some(("argo-pod", &argo_uid))));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["task"], "wf-a-1234");
    assert_eq!(answer["workflow"], "wf-a");
    assert_eq!(answer["namespace"], ns);
    // Its task token opens its own task, and not another's.
    let task_token = answer["token"].as_str().unwrap();
    let auth = bearer(task_token);
    let progress = br#"{"container":"main","progress":"1/2"}"#;
    let (status, _) = http(
        e.agent.api,
        "POST",
        "/v1/tasks/wf-a-1234/0/progress",
        &[("Authorization", &auth)],
        progress,
    );
    assert_eq!(status, 200);
    let (status, _) = http(
        e.agent.api,
        "POST",
        "/v1/tasks/wf-b-1/0/progress",
        &[("Authorization", &auth)],
        progress,
    );
    assert_eq!(status, 403);
    let result = e.cluster.kubectl([
        "-n",
        &ns,
        "get",
        "workflowtaskresult",
        "wf-a-1234",
        "-o",
        "json",
    ]);
    let result: Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(result["progress"], "1/2");
    assert_eq!(
        result["metadata"]["labels"]["workflows.argoproj.io/report-outputs-completed"],
        "false"
    );

    let refused = |token: &str, status: u16, says: &str| {
        let (got, answer) = login(e.agent.api, token);
        assert_eq!(got, status, "{answer}");
        assert!(
            answer["error"].as_str().unwrap_or("").contains(says),
            "{answer}"
        );
    };
    refused("not-a-token", 401, "does not accept this token");
    refused(&token(&ns, None), 401, "not bound to a pod");
    refused(
        &token(&ns, Some(("plain-pod", &plain_uid))),
        403,
        "not an Argo workflow's",
    );
    // The same pod, asking another node's agent.
    let dir = Dir::new("argo-other-node");
    let kubeconfig =
        service_account_kubeconfig(e.cluster, &dir, "emissary-system", "emissary-agent");
    let other = Agent::start_on(
        "emissary-node-2",
        dir.join("agent"),
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
        &[],
    );
    let (status, answer) = login(other.api, &token(&ns, Some(("argo-pod", &argo_uid))));
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not on this agent's node"),
        "{answer}"
    );
}

#[test]
fn a_pod_recreated_under_its_nodes_name_resets_the_result_it_finds() {
    let e = installed();
    let ns = e.cluster.namespace("argo-restart");
    // What a killed earlier pod of the node left: a result marked complete, for another uid.
    let stale = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowTaskResult",
        "metadata": {"name": "wf-r-77", "namespace": ns,
            "labels": {"workflows.argoproj.io/workflow": "wf-r",
                       "workflows.argoproj.io/report-outputs-completed": "true"},
            "annotations": {"emissary.io/pod-uid": "an-earlier-pod"}},
        "outputs": {"result": "from the earlier pod"}});
    apply(e.cluster, &[stale]).unwrap();
    create_pod(e.cluster, &ns, &argo_like_pod("again", "wf-r-77", "wf-r")).unwrap();
    let uid = uid_of(&ns, "again");
    let (status, answer) = login(e.agent.api, &token(&ns, Some(("again", &uid))));
    assert_eq!(status, 200, "{answer}");
    let out = e.cluster.kubectl([
        "-n",
        &ns,
        "get",
        "workflowtaskresult",
        "wf-r-77",
        "-o",
        "json",
    ]);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["metadata"]["labels"]["workflows.argoproj.io/report-outputs-completed"],
        "false"
    );
    assert_eq!(
        result["metadata"]["annotations"]["emissary.io/pod-uid"],
        uid
    );
    assert!(result.get("outputs").is_none(), "{result:#}");
}

#[test]
fn logs_are_archived_on_success_and_on_failure() {
    let argo = argo("v4.1");
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: archive-logs-}
spec:
  entrypoint: both
  archiveLogs: true
  templates:
  - name: both
    steps:
    - - {name: ok, template: say, arguments: {parameters: [{name: code, value: "0"}]}}
      - {name: fails, template: say, arguments: {parameters: [{name: code, value: "3"}]}, continueOn: {failed: true}}
  - name: say
    inputs: {parameters: [{name: code}]}
    container:
      image: busybox
      command: [sh, -c, 'echo "to stdout {{inputs.parameters.code}}"; echo to stderr >&2; exit {{inputs.parameters.code}}']
"#,
    );
    let wf = argo.wait(&name, LIMIT).unwrap();
    for (step, code) in [("ok", "0"), ("fails", "3")] {
        let node = nodes(&wf, step)[0];
        let log = node["outputs"]["artifacts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"] == "main-logs"))
            .unwrap_or_else(|| panic!("{step}: no main-logs\n{}", summary(&wf)));
        let key = log["s3"]["key"].as_str().unwrap();
        assert!(key.ends_with("/main.log"), "{key}");
        let text = String::from_utf8(installed().s3.object(key).unwrap()).unwrap();
        assert!(
            text.contains(&format!("to stdout {code}")) && text.contains("to stderr"),
            "{text}"
        );
    }
}

/// An HTTP server for one file, with an ETag, counting the GETs it served.
struct FileServer {
    addr: std::net::SocketAddr,
    gets: Arc<AtomicUsize>,
}

impl FileServer {
    fn start(body: &'static str) -> FileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(AtomicUsize::new(0));
        let counter = gets.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = [0u8; 4096];
                let n = stream.read(&mut request).unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..n]);
                let get = head.starts_with("GET");
                counter.fetch_add(usize::from(get), Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    if get { body } else { "" }
                );
            }
        });
        FileServer { addr, gets }
    }
}

#[test]
fn an_http_input_is_fetched_by_the_agent_and_then_served_from_its_cache() {
    let argo = argo("v4.1");
    let server = FileServer::start("fetched over http\n");
    let workflow = format!(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {{generateName: http-input-}}
spec:
  entrypoint: read
  templates:
  - name: read
    inputs:
      artifacts:
      - name: page
        path: /tmp/page.txt
        mode: 0755
        http: {{url: "http://{}/page.txt"}}
    container:
      image: busybox
      command: [sh, -c, 'cat /tmp/page.txt; stat -c %a /tmp/page.txt']
"#,
        server.addr
    );
    for run in 1..=2 {
        let name = argo.submit_text(&workflow);
        let wf = argo.wait(&name, LIMIT).unwrap();
        assert_eq!(
            wf["status"]["phase"],
            "Succeeded",
            "run {run}: {}",
            summary(&wf)
        );
    }
    assert_eq!(
        server.gets.load(Ordering::SeqCst),
        1,
        "the second run was a cache hit"
    );
}

#[test]
fn progress_written_by_the_step_reaches_its_node() {
    let argo = argo("v4.1");
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: progress-}
spec:
  entrypoint: work
  templates:
  - name: work
    container:
      image: busybox
      command: [sh, -c, 'echo 1/4 > $ARGO_PROGRESS_FILE; sleep 2; echo 3/4 > $ARGO_PROGRESS_FILE; sleep 30']
"#,
    );
    let seen = wait_until(LIMIT, || {
        let wf = argo.get("workflow", &name);
        nodes(&wf, &name)
            .first()
            .is_some_and(|n| n["progress"] == "3/4")
    });
    assert!(seen, "{}", summary(&argo.get("workflow", &name)));
    installed()
        .cluster
        .kubectl(["-n", &argo.ns, "delete", "workflow", &name, "--wait=false"]);
}

#[test]
fn a_large_template_and_large_arguments_travel_as_argo_offloads_them() {
    let argo = argo("v4.1");
    // Over Argo's 128 KiB: the template goes to a ConfigMap, the argument to a file.
    let padding = "#".repeat(140 * 1024);
    let big = "x".repeat(200 * 1024);
    let name = argo.submit_text(&format!(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {{generateName: offloaded-}}
spec:
  entrypoint: both
  templates:
  - name: both
    steps:
    - - {{name: script, template: script}}
      - {{name: args, template: args}}
  - name: script
    script:
      image: busybox
      command: [sh]
      source: |
        echo from a large script
        {padding}
  - name: args
    container:
      image: busybox
      command: [sh, -c, 'case "$1" in @*) wc -c < "${{1#@}}";; *) echo "${{#1}} inline";; esac', sh]
      args: ["{big}"]
"#
    ));
    let wf = argo.wait(&name, LIMIT).unwrap();
    assert_eq!(wf["status"]["phase"], "Succeeded", "{}", summary(&wf));
    let pod = installed()
        .cluster
        .kubectl(["-n", &argo.ns, "get", "pods", "-o", "json"]);
    let pods: Value = serde_json::from_slice(&pod.stdout).unwrap();
    let offloaded = pods["items"].as_array().unwrap().iter().any(|p| {
        p["spec"]["initContainers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "ARGO_TEMPLATE" && e["value"] == "offloaded")
    });
    assert!(offloaded, "Argo did not offload the template");
}

#[test]
fn what_emissary_does_not_do_fails_at_once_and_says_so() {
    let argo = argo("v4.1");
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: unsupported-}
spec:
  entrypoint: both
  templates:
  - name: both
    steps:
    - - {name: resource, template: resource, continueOn: {failed: true, error: true}}
      - {name: git, template: git, continueOn: {failed: true, error: true}}
  - name: resource
    resource:
      action: create
      manifest: |
        apiVersion: v1
        kind: ConfigMap
        metadata: {generateName: made-}
  - name: git
    inputs: {artifacts: [{name: src, path: /src, git: {repo: "https://example.invalid/x.git"}}]}
    container: {image: busybox, command: [ls, /src]}
"#,
    );
    let wf = argo.wait(&name, LIMIT).unwrap();
    for (step, says) in [
        (
            "resource",
            "resource templates are not supported by emissary",
        ),
        ("git", "git repository, which emissary does not support"),
    ] {
        let node = nodes(&wf, step)[0];
        assert!(
            matches!(node["phase"].as_str(), Some("Failed" | "Error"))
                && node["message"].as_str().unwrap_or("").contains(says),
            "{step}: {}",
            summary(&wf)
        );
    }
}

#[test]
fn a_malformed_template_fails_init_with_the_reason() {
    let e = installed();
    let ns = e.cluster.namespace("argo-malformed");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad-template"},
        "spec": {"restartPolicy": "Never",
            "initContainers": [{"name": "init", "image": crate::k8s_argo::EXECUTOR_IMAGE,
                "command": ["argoexec", "init", "--loglevel", "info"],
                "env": [{"name": "ARGO_TEMPLATE", "value": "{\"container\": 5}"}]}],
            "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}});
    create_pod(e.cluster, &ns, &pod).unwrap();
    let done = wait_finished(e.cluster, &ns, "bad-template", LIMIT);
    let init = container_status(&done, "init")["state"]["terminated"].clone();
    assert_eq!(init["exitCode"], 64, "{init}");
    assert!(
        init["message"].as_str().unwrap().contains("bad task spec"),
        "{init}"
    );
}

#[test]
fn an_unreachable_agent_fails_the_step_as_an_error() {
    let argo = install(
        "v4.1",
        &Setup {
            agent: Some("127.0.0.1:9".into()),
            executor_env: vec![("EMISSARY_AGENT_RETRY".into(), "2s".into())],
            ..Setup::default()
        },
    );
    let name = argo.submit(&argo.example("hello-world.yaml"));
    let wf = argo.wait(&name, LIMIT).unwrap();
    let node = nodes(&wf, &name)[0];
    assert_eq!(node["phase"], "Error", "{}", summary(&wf));
    let message = node["message"].as_str().unwrap_or("");
    assert!(
        message.contains("node agent") && message.contains("exit code 64"),
        "{message}"
    );
}

#[test]
fn an_agent_restarted_mid_step_loses_no_result() {
    let e = installed();
    let dir = Dir::new("argo-restarted-agent");
    let kubeconfig =
        service_account_kubeconfig(e.cluster, &dir, "emissary-system", "emissary-agent");
    let mut agent = Agent::start_on(
        emissary_tests::cluster::NODE,
        dir.join("agent"),
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
        &[],
    );
    let argo = install(
        "v4.1",
        &Setup {
            agent: Some(agent.api.to_string()),
            config: json!({"instanceID": "emissary-test"}),
            ..Setup::default()
        },
    );
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata:
  generateName: agent-restart-
  labels: {workflows.argoproj.io/controller-instanceid: emissary-test}
spec:
  entrypoint: work
  templates:
  - name: work
    container:
      image: busybox
      command: [sh, -c, 'echo -n survived > /tmp/out; sleep 4']
    outputs:
      parameters: [{name: out, valueFrom: {path: /tmp/out}}]
"#,
    );
    // Mid-step: the pod logged in, main runs; the agent is killed and comes back.
    let running = wait_until(LIMIT, || {
        let wf = argo.get("workflow", &name);
        nodes(&wf, &name)
            .first()
            .is_some_and(|n| n["phase"] == "Running")
    });
    assert!(running);
    std::thread::sleep(Duration::from_millis(1500));
    // The result exists, waiting, with the controller's instance id (Argo deletes results once
    // a workflow is done, so it is looked at now).
    let out = e
        .cluster
        .kubectl(["-n", &argo.ns, "get", "workflowtaskresults", "-o", "json"]);
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels = &results["items"][0]["metadata"]["labels"];
    assert_eq!(
        labels["workflows.argoproj.io/controller-instanceid"], "emissary-test",
        "{results:#}"
    );
    assert_eq!(
        labels["workflows.argoproj.io/report-outputs-completed"],
        "false"
    );
    agent.crash_and_restart();
    let wf = argo.wait(&name, LIMIT).unwrap();
    assert_eq!(wf["status"]["phase"], "Succeeded", "{}", summary(&wf));
    let node = nodes(&wf, &name)[0];
    assert_eq!(
        node["outputs"]["parameters"][0]["value"], "survived",
        "{node:#}"
    );
}

/// Security review, finding 10: in a containerSet, a sibling (root, so the sticky
/// `/var/run/argo/ctr` does not stop it) writes `a`'s exit file as 0 while `a` still runs (it
/// exits 3). The dependency is decided on what the kubelet reports, so `main` does not run and
/// the step fails with `a`.
#[test]
fn a_sibling_cannot_forge_a_dependencys_exit_in_a_container_set() {
    let argo = argo("v4.1");
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: forged-dependency-}
spec:
  entrypoint: set
  templates:
  - name: set
    containerSet:
      containers:
      - name: a
        image: busybox
        command: [sh, -c, 'sleep 4; exit 3']
      - name: forger
        image: busybox
        command: [sh, -c, 'for d in /var/run/argo /var/run/argo/ctr; do [ "$(stat -c %a $d)" = 1777 ] || exit 9; done; sleep 1; d=/var/run/argo/ctr/a; mkdir -p $d; printf 0 > $d/.x; mv $d/.x $d/exitcode; echo forged']
      - name: main
        image: busybox
        command: [sh, -c, 'echo main ran']
        dependencies: [a]
"#,
    );
    let wf = argo.wait(&name, LIMIT).unwrap();
    assert_eq!(wf["status"]["phase"], "Failed", "{}", summary(&wf));
    let main = nodes(&wf, "main")[0];
    assert_ne!(
        main["phase"],
        "Succeeded",
        "main ran on a forged exit\n{}",
        summary(&wf)
    );
    let forger = nodes(&wf, "forger")[0];
    assert_eq!(forger["phase"], "Succeeded", "{}", summary(&wf));
}

/// The pods of workflow `name` in `ns`.
fn workflow_pods(ns: &str, name: &str) -> Vec<Value> {
    let out = installed().cluster.kubectl([
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        &format!("workflows.argoproj.io/workflow={name}"),
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The state (`running`, `terminated`...) of container `container` of `pod`.
fn container_state(pod: &Value, container: &str) -> Option<String> {
    pod["status"]["containerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?["state"]
        .as_object()?
        .keys()
        .next()
        .cloned()
}

/// Issue 13: Stop and Terminate reach a running step through its node's agent within seconds,
/// without `pods/exec` (the test kubelet serves none, so Argo's own `argoexec kill` cannot):
/// the step's process gets TERM, the workflow ends as Argo documents, and Stop still runs the
/// exit handler.
#[test]
fn stop_and_terminate_end_a_running_step_without_exec() {
    let argo = argo("v4.1");
    for strategy in ["Terminate", "Stop"] {
        let name = argo.submit_text(
            r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: shutdown-}
spec:
  entrypoint: long
  onExit: cleanup
  templates:
  - name: long
    container:
      image: busybox
      command: [sh, -c, 'echo started; sleep 300']
  - name: cleanup
    container:
      image: busybox
      command: [sh, -c, 'echo cleaning up']
"#,
        );
        let running = wait_until(Duration::from_secs(60), || {
            workflow_pods(&argo.ns, &name)
                .iter()
                .any(|p| container_state(p, "main").as_deref() == Some("running"))
        });
        assert!(running, "{strategy}: the step never ran");
        let patched = Instant::now();
        let patch = json!({"spec": {"shutdown": strategy}}).to_string();
        let out = installed().cluster.kubectl([
            "-n", &argo.ns, "patch", "workflow", &name, "--type", "merge", "-p", &patch,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stopped = wait_until(Duration::from_secs(30), || {
            workflow_pods(&argo.ns, &name)
                .iter()
                .all(|p| container_state(p, "main").as_deref() != Some("running"))
        });
        let took = patched.elapsed();
        assert!(
            stopped,
            "{strategy}: the step still runs 30 s after the patch"
        );
        assert!(
            took < Duration::from_secs(5),
            "{strategy}: the step ran {took:?} after the patch"
        );
        let wf = argo.wait(&name, LIMIT).unwrap();
        assert_eq!(wf["status"]["phase"], "Failed", "{}", summary(&wf));
        let message = wf["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("Stopped with strategy '{strategy}'")),
            "{}",
            summary(&wf)
        );
        let handler_ran = nodes(&wf, &format!("{name}.onExit"))
            .iter()
            .any(|n| n["phase"] == "Succeeded");
        assert_eq!(
            handler_ran,
            strategy == "Stop",
            "{strategy}:\n{}",
            summary(&wf)
        );
    }
}

/// Issue 13, faults: a workflow deleted mid-step (no garbage collector runs here, so nothing
/// else would stop its pod): its node's agent stops the step, once, without an error storm.
#[test]
fn a_workflow_deleted_mid_step_stops_its_step() {
    let argo = argo("v4.0");
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: deleted-}
spec:
  entrypoint: long
  templates:
  - name: long
    container:
      image: busybox
      command: [sh, -c, 'sleep 300']
"#,
    );
    let running = wait_until(Duration::from_secs(60), || {
        workflow_pods(&argo.ns, &name)
            .iter()
            .any(|p| container_state(p, "main").as_deref() == Some("running"))
    });
    assert!(running, "the step never ran");
    let out =
        installed()
            .cluster
            .kubectl(["-n", &argo.ns, "delete", "workflow", &name, "--wait=false"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped = wait_until(Duration::from_secs(10), || {
        workflow_pods(&argo.ns, &name)
            .iter()
            .all(|p| container_state(p, "main").as_deref() != Some("running"))
    });
    assert!(stopped, "the step of a deleted workflow still runs");
    std::thread::sleep(Duration::from_secs(2));
    let log = installed().agent.log();
    let about_it: Vec<&str> = log.lines().filter(|l| l.contains(&name)).collect();
    let warnings = about_it.iter().filter(|l| l.contains("\"WARN\"")).count();
    assert!(warnings <= 1, "{}", about_it.join("\n"));
    let terminations = about_it
        .iter()
        .filter(|l| l.contains("terminating an Argo step"))
        .count();
    assert_eq!(terminations, 1, "{}", about_it.join("\n"));
}

/// Issue 13: a template's sidecars stop once `main` has ended — TERM, then KILL after the
/// pod's grace for one that ignores TERM — without `pods/exec`, and the step is main's.
#[test]
fn sidecars_stop_when_main_ends_even_one_that_ignores_term() {
    let argo = argo("v4.1");
    let started = Instant::now();
    let name = argo.submit_text(
        r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: sidecars-}
spec:
  entrypoint: with-sidecars
  templates:
  - name: with-sidecars
    podSpecPatch: '{"terminationGracePeriodSeconds": 2}'
    container:
      image: busybox
      command: [sh, -c, 'sleep 1; echo main done']
    sidecars:
    - name: polite
      image: busybox
      command: [sh, -c, 'sleep 300']
    - name: stubborn
      image: busybox
      command: [sh, -c, 'trap "" TERM; while true; do sleep 1; done']
"#,
    );
    let wf = argo.wait(&name, Duration::from_secs(60)).unwrap();
    assert_eq!(wf["status"]["phase"], "Succeeded", "{}", summary(&wf));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the step took {:?}",
        started.elapsed()
    );
    let pods = workflow_pods(&argo.ns, &name);
    for sidecar in ["polite", "stubborn"] {
        let status = pods[0]["status"]["containerStatuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == sidecar)
            .unwrap();
        let code = &status["state"]["terminated"]["exitCode"];
        let expected = if sidecar == "polite" { 143 } else { 137 };
        assert_eq!(code, expected, "{sidecar}: {status:#}");
    }
}

/// Issue 13: the webhook's mode for Argo. The controller keeps Argo's own executor image in its
/// configmap; in a namespace labelled `emissary.io/argo: enabled` the webhook gives its pods'
/// `init` and `wait` our image, so every step runs on the emissary, on each Argo version.
#[test]
fn argo_pods_are_adopted_by_the_webhook_without_touching_the_configmap() {
    for version in crate::k8s_argo::VERSIONS {
        let argo = install(
            version,
            &Setup {
                config: json!({"executor": {"image": "quay.io/argoproj/argoexec:v4.1.4"}}),
                ..Setup::default()
            },
        );
        let out = installed().cluster.kubectl([
            "label",
            "namespace",
            &argo.ns,
            "emissary.io/argo=enabled",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = argo.submit(&argo.example("artifact-passing.yaml"));
        let wf = argo.wait(&name, LIMIT).unwrap();
        assert_eq!(
            wf["status"]["phase"],
            "Succeeded",
            "{version}: {}",
            summary(&wf)
        );
        assert!(argo.incomplete_results(&name).is_empty());
        for pod in workflow_pods(&argo.ns, &name) {
            for (field, container) in [("initContainers", "init"), ("containers", "wait")] {
                let image = pod["spec"][field]
                    .as_array()
                    .and_then(|list| list.iter().find(|c| c["name"] == container))
                    .map(|c| c["image"].clone());
                assert_eq!(
                    image,
                    Some(json!("ghcr.io/emissary-executor/argoexec:0.1.0")),
                    "{version}: {container}"
                );
            }
        }
    }
}
