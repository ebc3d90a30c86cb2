//! Stopping Argo steps without `kubectl exec`: the agent watches the workflow of every Argo pod
//! running on its node, and tells the pod's emissaries to terminate (TERM, the grace period,
//! KILL) through the command long-poll they already hold, when
//! - the workflow is shut down: `spec.shutdown: Terminate`, or `Stop` for pods that are not
//!   part of an exit handler (Argo runs those on Stop);
//! - the controller marked the pod's node failed while it runs (a workflow deadline, or its
//!   own execution control);
//! - the workflow is deleted.
//!
//! Argo's controller signals running containers through `pods/exec` (`argoexec kill`), which
//! needs exec rights, a shell or our binary in the image, and a kubelet that serves exec; this
//! reaches the step within a second of the change, whatever the image.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use protocol::api::Command;
use serde_json::Value;
use tracing::{info, warn};

use crate::commands::Commands;

/// An Argo pod this node runs.
#[derive(Debug, Clone)]
pub struct Served {
    pub uid: String,
    pub node_id: String,
    /// Labelled `workflows.argoproj.io/on-exit`: part of an exit handler, which Stop runs.
    pub on_exit: bool,
}

/// The workflows watched, by (namespace, name), and the pods of each this node runs.
#[derive(Default)]
pub struct Shutdowns {
    watched: Mutex<HashMap<(String, String), Watched>>,
}

struct Watched {
    pods: HashMap<String, Served>,
    /// Pods told to terminate already (once is enough: each container gets each command).
    terminated: HashSet<String>,
    watch: tokio::task::JoinHandle<()>,
}

type Key = (String, String);

impl Shutdowns {
    /// Pod `pod` of workflow `ns/workflow` runs here: its workflow is watched while it does.
    pub fn serve(
        self: &Arc<Self>,
        client: &kube::Client,
        commands: &Arc<Commands>,
        (ns, workflow): (&str, &str),
        pod: Served,
    ) {
        let key = (ns.to_owned(), workflow.to_owned());
        let mut watched = self.watched.lock().unwrap();
        let entry = watched.entry(key.clone()).or_insert_with(|| Watched {
            pods: HashMap::new(),
            terminated: HashSet::new(),
            watch: tokio::spawn(self.clone().watch(client.clone(), commands.clone(), key)),
        });
        entry.pods.insert(pod.uid.clone(), pod);
    }

    /// Pod `uid` ended or went away: its workflow is no longer watched for it.
    pub fn forget(&self, (ns, workflow): (&str, &str), uid: &str) {
        let key = (ns.to_owned(), workflow.to_owned());
        let mut watched = self.watched.lock().unwrap();
        if let Some(entry) = watched.get_mut(&key) {
            entry.pods.remove(uid);
            entry.terminated.remove(uid);
            if entry.pods.is_empty() {
                entry.watch.abort();
                watched.remove(&key);
            }
        }
    }

    async fn watch(self: Arc<Self>, client: kube::Client, commands: Arc<Commands>, key: Key) {
        let gvk = GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Workflow");
        let resource = ApiResource::from_gvk(&gvk);
        let workflows: Api<DynamicObject> = Api::namespaced_with(client, &key.0, &resource);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", key.1));
        let mut events = watcher(workflows, config).default_backoff().boxed();
        loop {
            let (workflow, deleted) = match events.try_next().await {
                Ok(Some(watcher::Event::Apply(w) | watcher::Event::InitApply(w))) => (w, false),
                Ok(Some(watcher::Event::Delete(w))) => (w, true),
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(e) => {
                    warn!(namespace = %key.0, workflow = %key.1, error = %e, "watching a workflow");
                    continue;
                }
            };
            for (pod, why) in self.to_terminate(&key, &workflow.data, deleted) {
                info!(namespace = %key.0, workflow = %key.1, node_id = %pod.node_id, reason = why,
                      "terminating an Argo step");
                commands.push(Some(&key.1), &pod.node_id, 0, Command::Terminate);
            }
        }
    }

    /// The served pods of `key` that `workflow` says must stop, not told before, and why.
    fn to_terminate(
        &self,
        key: &Key,
        workflow: &Value,
        deleted: bool,
    ) -> Vec<(Served, &'static str)> {
        let mut watched = self.watched.lock().unwrap();
        let Some(entry) = watched.get_mut(key) else {
            return Vec::new();
        };
        let shutdown = workflow.pointer("/spec/shutdown").and_then(Value::as_str);
        let mut stop = Vec::new();
        for pod in entry.pods.values() {
            if entry.terminated.contains(&pod.uid) {
                continue;
            }
            let node_phase = workflow
                .pointer(&format!("/status/nodes/{}/phase", pod.node_id))
                .and_then(Value::as_str);
            let why = match (deleted, shutdown, node_phase) {
                (true, _, _) => "the workflow was deleted",
                (_, Some("Terminate"), _) => "the workflow is terminated",
                (_, Some("Stop"), _) if !pod.on_exit => "the workflow is stopped",
                (_, _, Some("Failed" | "Error")) => "the controller failed its node",
                _ => continue,
            };
            stop.push((pod.clone(), why));
        }
        for (pod, _) in &stop {
            entry.terminated.insert(pod.uid.clone());
        }
        stop
    }
}
