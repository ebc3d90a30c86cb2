//! The test kubelet itself, against the behaviour of a real one that the scenarios rely on:
//! restarts, init failures, images it cannot pull, the environment and volumes it fills in,
//! and the ServiceAccount token it projects (which the API server must accept).

use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenReview;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::k8s::*;

const LIMIT: Duration = Duration::from_secs(60);

fn pod(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

fn log_of(
    ns: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
    container: &str,
    restart: u32,
) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap();
    let dir = cluster()
        .ready
        .dir
        .join("kubelet")
        .join(emissary_tests::cluster::NODE);
    std::fs::read_to_string(dir.join(format!("pods/{uid}/logs/{container}-{restart}.log")))
        .unwrap_or_else(|e| panic!("{ns}/{container}: {e}"))
}

#[test]
fn on_failure_restarts_until_success_and_counts() {
    let c = cluster();
    let ns = c.namespace("kubelet-restart");
    let spec = json!({"restartPolicy": "OnFailure", "volumes": [{"name": "d", "emptyDir": {}}],
        "containers": [{"name": "main", "image": "busybox",
            "command": ["sh", "-c", "echo x >> /d/n; [ $(wc -l < /d/n) -ge 3 ]"],
            "volumeMounts": [{"name": "d", "mountPath": "/d"}]}]});
    create_pod(c, &ns, &pod("retries", spec)).unwrap();
    let done = wait_finished(c, &ns, "retries", LIMIT);
    assert_eq!(phase(Some(&done)), "Succeeded");
    let status = container_status(&done, "main");
    assert_eq!(status["restartCount"], 2, "{status}");
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 1);
}

#[test]
fn a_failed_init_container_fails_the_pod_and_main_never_starts() {
    let c = cluster();
    let ns = c.namespace("kubelet-init");
    let spec = json!({"restartPolicy": "Never",
        "initContainers": [{"name": "setup", "image": "busybox", "command": ["sh", "-c", "echo no >&2; exit 2"],
                            "terminationMessagePolicy": "FallbackToLogsOnError"}],
        "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]});
    create_pod(c, &ns, &pod("init-fails", spec)).unwrap();
    let done = wait_finished(c, &ns, "init-fails", LIMIT);
    assert_eq!(phase(Some(&done)), "Failed");
    let setup = container_status(&done, "setup");
    assert_eq!(setup["state"]["terminated"]["exitCode"], 2);
    assert_eq!(setup["state"]["terminated"]["message"], "no");
    assert_eq!(
        container_status(&done, "main")["state"]["waiting"]["reason"],
        "PodInitializing"
    );
}

#[test]
fn an_image_not_in_the_table_waits_with_err_image_pull() {
    let c = cluster();
    let ns = c.namespace("kubelet-image");
    let spec = json!({"containers": [{"name": "main", "image": "registry.example/unknown:1", "command": ["x"]}]});
    create_pod(c, &ns, &pod("unpullable", spec)).unwrap();
    let pending = wait_pod(c, &ns, "unpullable", LIMIT, |p| {
        p.is_some_and(|p| {
            container_status(p, "main")["state"]["waiting"]["reason"] == "ErrImagePull"
        })
    })
    .unwrap();
    assert_eq!(phase(Some(&pending)), "Pending");
    let message = container_status(&pending, "main")["state"]["waiting"]["message"].clone();
    assert!(
        message.as_str().unwrap().contains("image table"),
        "{message}"
    );
}

#[test]
fn env_volumes_and_the_projected_token_are_what_a_kubelet_gives() {
    let c = cluster();
    let ns = c.namespace("kubelet-env");
    c.kubectl([
        "-n",
        &ns,
        "create",
        "configmap",
        "cfg",
        "--from-literal=k=from-configmap",
    ]);
    c.kubectl([
        "-n",
        &ns,
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=k=from-secret",
    ]);
    let spec = json!({"restartPolicy": "Never",
        "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "a", "fieldRef": {"fieldPath": "metadata.annotations['a']"}}]}}],
        "containers": [{"name": "main", "image": "busybox",
            "command": ["sh", "-c", "echo $POD $NODE $IP $SECRET $JOINED; cat /cfg/k /info/a; echo; \
                         cat /var/run/secrets/kubernetes.io/serviceaccount/token > /dev/termination-log"],
            "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}},
                    {"name": "JOINED", "value": "$(POD)/$(NODE)"}],
            "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}, {"name": "info", "mountPath": "/info"}]}]});
    let mut object = pod("env", spec);
    object["metadata"]["annotations"] = json!({"a": "from-annotation"});
    create_pod(c, &ns, &object).unwrap();
    let done = wait_finished(c, &ns, "env", LIMIT);
    assert_eq!(phase(Some(&done)), "Succeeded");
    let node = emissary_tests::cluster::NODE;
    assert_eq!(
        log_of(&ns, &done, "main", 0),
        format!("env {node} 127.0.0.1 from-secret env/{node}\nfrom-configmapfrom-annotation\n")
    );
    // The projected token is the API server's own, bound to this pod.
    let token = container_status(&done, "main")["state"]["terminated"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    let review: TokenReview = serde_json::from_value(json!({"spec": {"token": token}})).unwrap();
    let reviews: Api<TokenReview> = Api::all(c.client.clone());
    let answer = c
        .block_on(reviews.create(&PostParams::default(), &review))
        .unwrap();
    let status = answer.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:default").as_str())
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        ["env".to_owned()]
    );
}
