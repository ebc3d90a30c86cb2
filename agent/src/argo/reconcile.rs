//! This node's Argo pods, watched.
//!
//! While one runs, its workflow is watched for a shutdown ([`super::shutdown`]).
//!
//! No task result is left incomplete: when a pod of this node ends (or goes away) while the
//! `WorkflowTaskResult` it logged in for still says its outputs are coming, the agent marks it
//! complete. Argo's controller waits for an incomplete result forever (v4 has no timeout), and
//! a `main` that was killed, or a containerSet without a `main` to report, never completes it.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

use super::shutdown::Served;
use super::{ANNOTATION_NODE_ID, Argo, LABEL_ON_EXIT, LABEL_WORKFLOW, results};
use crate::commands::Commands;

pub async fn run(argo: Arc<Argo>, commands: Arc<Commands>) {
    let pods: Api<Pod> = Api::all(argo.client.clone());
    let config = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", argo.node))
        .labels(LABEL_WORKFLOW);
    let mut events = watcher(pods, config).default_backoff().boxed();
    // Pods already seen ended: their later updates (Argo labels them) need no second look.
    let mut done: HashSet<String> = HashSet::new();
    loop {
        let event = match events.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "watching this node's Argo pods");
                continue;
            }
        };
        let (pod, gone) = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (pod, false),
            watcher::Event::Delete(pod) => (pod, true),
            _ => continue,
        };
        let ended = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let workflow = labels.get(LABEL_WORKFLOW).cloned().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let node_id = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_NODE_ID))
            .cloned();
        match (&node_id, ended || gone) {
            (_, true) => argo.shutdowns.forget((&namespace, &workflow), &uid),
            (Some(node_id), false) => argo.shutdowns.serve(
                &argo.client,
                &commands,
                (&namespace, &workflow),
                Served {
                    uid: uid.clone(),
                    node_id: node_id.clone(),
                    on_exit: labels.contains_key(LABEL_ON_EXIT),
                },
            ),
            (None, false) => {}
        }
        if !(ended || gone) || done.contains(&uid) {
            continue;
        }
        if done.len() > 10_000 {
            done.clear();
        }
        done.insert(uid.clone());
        let Some(node_id) = node_id else {
            continue;
        };
        match results::complete_if_waiting(&argo.client, &namespace, &node_id, &uid).await {
            Ok(true) => {
                info!(pod = %format!("{namespace}/{}", pod.metadata.name.as_deref().unwrap_or("")), %node_id,
                "the pod ended without completing its task result: completed it")
            }
            Ok(false) => {}
            Err(e) => {
                // Looked at again on its next update, or after a restart of the watch.
                done.remove(&uid);
                warn!(%node_id, error = %e.1, "completing a task result");
            }
        }
    }
}
