//! Our manifests and webhook on a real API server: it validates every object we ship, calls
//! the webhook for labelled pods, and refuses what the webhook refuses, with its message.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::k8s::*;

#[test]
fn images_deploy_applies_and_the_api_server_holds_every_object() {
    let e = installed();
    for object in rendered_manifests() {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let mut args = vec!["get", kind, name, "-o", "name"];
        if let Some(ns) = object["metadata"]["namespace"].as_str() {
            args.extend(["-n", ns]);
        }
        let out = e.cluster.kubectl(&args);
        assert!(
            out.status.success(),
            "{kind}/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let daemonsets: Api<DaemonSet> = Api::namespaced(e.cluster.client.clone(), "emissary-system");
    let agent = e
        .cluster
        .block_on(daemonsets.get("emissary-agent"))
        .unwrap();
    assert_eq!(
        agent.spec.unwrap().template.spec.unwrap().containers[0].name,
        "agent"
    );
}

#[test]
fn a_manifest_the_api_server_rejects_fails_with_its_message() {
    let e = installed();
    let mut broken = rendered_manifests()
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    broken["metadata"]["name"] = json!("emissary-agent-broken");
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(70000);
    let err = apply(e.cluster, &[broken]).unwrap_err();
    assert!(
        err.contains("hostPort") && err.contains("70000"),
        "the API server's message: {err}"
    );
}

#[test]
fn the_api_server_refuses_a_pod_our_webhook_refuses_with_our_message() {
    let e = installed();
    let ns = e.cluster.namespace("deploy-refused");
    let mut pod = e.task_pod("no-token", &ns, &json!({}), "busybox", &["true"]);
    pod["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("emissary.io/token");
    let err = create_pod(e.cluster, &ns, &pod).unwrap_err();
    assert!(
        err.contains("inject.emissary.io")
            && err.contains("metadata.annotations[\"emissary.io/token\"] is missing"),
        "{err}"
    );

    let mut pod = e.task_pod("foreign-init", &ns, &json!({}), "busybox", &["true"]);
    pod["spec"]["initContainers"] =
        json!([{"name": "emissary-init", "image": "busybox", "command": ["true"]}]);
    let err = create_pod(e.cluster, &ns, &pod).unwrap_err();
    assert!(err.contains("is not the injector's"), "{err}");
    // Nothing was admitted.
    let out = e.cluster.kubectl(["-n", &ns, "get", "pods", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn with_the_webhook_down_a_labelled_pod_is_not_admitted() {
    let e = installed();
    let ns = e.cluster.namespace("deploy-down");
    // Our webhook configuration, called for pods that also carry a test label, at an address
    // where nothing listens: the webhook is down for them and only them.
    let mut config = rendered_manifests()
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    config["metadata"]["name"] = json!("emissary-inject-down");
    let port = emissary_tests::cluster::control_plane::free_port().unwrap();
    for hook in config["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"] = webhook_client(
            &e.ca,
            format!("127.0.0.1:{port}").parse().unwrap(),
            "/inject",
        );
        hook["objectSelector"]["matchLabels"]["emissary.io/test"] = json!("webhook-down");
    }
    let api: Api<MutatingWebhookConfiguration> = Api::all(e.cluster.client.clone());
    let config: MutatingWebhookConfiguration = serde_json::from_value(config).unwrap();
    e.cluster
        .block_on(api.create(&PostParams::default(), &config))
        .unwrap();
    let mut pod = e.task_pod("unadmitted", &ns, &json!({}), "busybox", &["true"]);
    pod["metadata"]["labels"]["emissary.io/test"] = json!("webhook-down");
    let err = create_pod(e.cluster, &ns, &pod);
    e.cluster
        .block_on(api.delete("emissary-inject-down", &DeleteParams::default()))
        .unwrap();
    let err = err.unwrap_err();
    assert!(
        err.contains("failed calling webhook") && err.contains("inject.emissary.io"),
        "{err}"
    );
    let out = e.cluster.kubectl(["-n", &ns, "get", "pods", "-o", "name"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "admitted un-injected"
    );
}
