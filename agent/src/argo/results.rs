//! The `WorkflowTaskResult` of an Argo pod: how the workflow-controller learns its outputs.
//!
//! As Argo's own executor writes it: named after the node, labelled with the workflow (and the
//! controller's instance id when it has one), owned by the Workflow, `report-outputs-completed`
//! `"false"` from the pod's first login until its outputs are in, then `"true"` in the same
//! patch as the outputs. A pod that Argo re-creates under the same name (v4's
//! `failedPodRestart`) finds its node's result there already: it is reset to incomplete, and the
//! annotation `emissary.io/pod-uid` says which pod the result now waits for.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use protocol::api::TaskResult;
use serde_json::{Value, json};

use super::{ArgoError, ArgoPod, LABEL_COMPLETED, LABEL_INSTANCE, LABEL_WORKFLOW};

const ANNOTATION_POD_UID: &str = "emissary.io/pod-uid";

/// How long a write is retried while the API server is unavailable; the emissary retries the
/// whole request beyond it.
const RETRY_FOR: Duration = Duration::from_secs(30);

fn resource() -> ApiResource {
    ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "WorkflowTaskResult".into(),
        plural: "workflowtaskresults".into(),
    }
}

fn api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource())
}

/// Runs `call` again while the API server answers that it is unavailable.
async fn retrying<T, F: Future<Output = Result<T, kube::Error>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> Result<T, ArgoError> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(200);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) => {
                let error = ArgoError::api(what, e);
                if error.0 != hyper::StatusCode::SERVICE_UNAVAILABLE
                    || started.elapsed() + wait > RETRY_FOR
                {
                    return Err(error);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Creates the pod's incomplete result, or resets the one an earlier pod of its node left.
pub async fn ensure_placeholder(client: &kube::Client, pod: &ArgoPod) -> Result<(), ArgoError> {
    let results = api(client, &pod.pod.ns);
    let name = &pod.node_id;
    let mut labels = json!({LABEL_WORKFLOW: pod.workflow, LABEL_COMPLETED: "false"});
    if let Some(id) = &pod.instance_id {
        labels[LABEL_INSTANCE] = json!(id);
    }
    let mut object = json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowTaskResult",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {ANNOTATION_POD_UID: pod.pod.uid}},
    });
    if let Some(uid) = &pod.workflow_uid {
        object["metadata"]["ownerReferences"] = json!([{"apiVersion": "argoproj.io/v1alpha1",
            "kind": "Workflow", "name": pod.workflow, "uid": uid}]);
    }
    let what = format!("creating WorkflowTaskResult {}/{name}", pod.pod.ns);
    let object: DynamicObject = serde_json::from_value(object).expect("a task result");
    let params = PostParams::default();
    let existing = match retrying(&what, || results.create(&params, &object)).await {
        Ok(_) => return Ok(()),
        Err(e) if e.1.contains("already exists") => retrying(&what, || results.get(name)).await?,
        Err(e) => return Err(e),
    };
    let owner = existing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_POD_UID));
    if owner == Some(&pod.pod.uid) {
        return Ok(()); // this pod's own, from an earlier login (init, then main)
    }
    let reset = json!({
        "metadata": {"labels": labels, "annotations": {ANNOTATION_POD_UID: pod.pod.uid}},
        "outputs": null, "progress": null,
    });
    patch(client, pod, &reset, "resetting").await
}

async fn patch(
    client: &kube::Client,
    pod: &ArgoPod,
    body: &Value,
    doing: &str,
) -> Result<(), ArgoError> {
    let results = api(client, &pod.pod.ns);
    let what = format!("{doing} WorkflowTaskResult {}/{}", pod.pod.ns, pod.node_id);
    let (params, patch) = (PatchParams::default(), Patch::Merge(body));
    retrying(&what, || results.patch(&pod.node_id, &params, &patch))
        .await
        .map(drop)
}

/// Reports `N/M` progress.
pub async fn progress(
    client: &kube::Client,
    pod: &ArgoPod,
    progress: &str,
) -> Result<(), ArgoError> {
    patch(
        client,
        pod,
        &json!({ "progress": progress }),
        "reporting progress in",
    )
    .await
}

/// Writes the pod's outputs and marks them complete, in one patch.
pub async fn complete(
    client: &kube::Client,
    pod: &ArgoPod,
    result: &TaskResult,
) -> Result<(), ArgoError> {
    let mut body = json!({
        "metadata": {"labels": {LABEL_COMPLETED: "true"}},
        "outputs": outputs(pod, result),
    });
    if let Some(progress) = &result.outputs.progress {
        body["progress"] = json!(progress);
    }
    patch(client, pod, &body, "completing").await
}

/// Argo's outputs for `result`: the template's output parameters with their values, the
/// artifacts that were saved (the template's spec, located by key alone, as Argo's executor
/// reports them) and the archived logs, and `result`.
pub fn outputs(pod: &ArgoPod, result: &TaskResult) -> Value {
    let reported = &result.outputs;
    let mut outputs = json!({});
    let parameters: Vec<Value> = pod.template.outputs["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|spec| {
            let mut spec = spec.clone();
            let name = spec["name"].as_str().unwrap_or_default();
            if let Some(p) = reported.parameters.iter().find(|p| p.name == name) {
                spec["value"] = json!(p.value);
            }
            spec
        })
        .collect();
    if !parameters.is_empty() {
        outputs["parameters"] = json!(parameters);
    }
    let specs = pod.template.output_artifacts();
    let artifacts: Vec<Value> = reported
        .artifacts
        .iter()
        .map(|a| {
            let mut spec = specs
                .iter()
                .find(|s| s["name"] == a.name)
                .cloned()
                .unwrap_or_else(|| json!({ "name": a.name }));
            if let Some(fields) = spec.as_object_mut() {
                for kind in [
                    "s3",
                    "gcs",
                    "azure",
                    "http",
                    "git",
                    "hdfs",
                    "oss",
                    "artifactory",
                    "raw",
                ] {
                    fields.remove(kind);
                }
            }
            spec["s3"] = json!({ "key": a.stored.key });
            spec
        })
        .collect();
    if !artifacts.is_empty() {
        outputs["artifacts"] = json!(artifacts);
    }
    if let Some(text) = &reported.result {
        outputs["result"] = json!(text);
    }
    outputs
}

/// Marks result `ns/name` complete if it still waits for pod `uid`'s outputs; true if it did.
pub async fn complete_if_waiting(
    client: &kube::Client,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<bool, ArgoError> {
    let results = api(client, ns);
    let what = format!("reading WorkflowTaskResult {ns}/{name}");
    let Some(result) = retrying(&what, || results.get_opt(name)).await? else {
        return Ok(false);
    };
    let meta = &result.metadata;
    let waiting = meta.labels.as_ref().and_then(|l| l.get(LABEL_COMPLETED))
        == Some(&"false".to_owned())
        && meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_POD_UID))
            == Some(&uid.to_owned());
    if !waiting {
        return Ok(false);
    }
    let body = json!({"metadata": {"labels": {LABEL_COMPLETED: "true"}}});
    let (params, patch) = (PatchParams::default(), Patch::Merge(&body));
    let what = format!("completing WorkflowTaskResult {ns}/{name}");
    retrying(&what, || results.patch(name, &params, &patch)).await?;
    Ok(true)
}
