//! The Argo adapter: how pods an unmodified Argo workflow-controller creates use this agent.
//!
//! A pod proves who it is with what Kubernetes gave it: its bound ServiceAccount token, which
//! the agent checks with the TokenReview API, then the pod itself (this node's, the uid the
//! token is bound to, an Argo workflow's). It gets a task token for that pod only
//! ([`login`]). Everything else is derived from the pod's own template, never from what the
//! task asks: where its inputs come from and its outputs go ([`template`], S3 credentials from
//! the Secrets the pod mounts), and the `WorkflowTaskResult` the controller reads its outputs
//! from ([`results`]). Nothing here is minted by Argo, and nothing enters the task's
//! containers but its task token.

pub mod directory;
pub mod login;
pub mod reconcile;
pub mod results;
pub mod shutdown;
pub mod template;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::Api;

use crate::store::{PartBudget, Store};
use crate::token::PodRef;
use template::{S3, Template};

/// Labels and annotations Argo puts on its pods and task results.
pub const LABEL_WORKFLOW: &str = "workflows.argoproj.io/workflow";
pub const LABEL_COMPLETED: &str = "workflows.argoproj.io/report-outputs-completed";
pub const LABEL_INSTANCE: &str = "workflows.argoproj.io/controller-instanceid";
pub const LABEL_ON_EXIT: &str = "workflows.argoproj.io/on-exit";
pub const ANNOTATION_NODE_ID: &str = "workflows.argoproj.io/node-id";

/// Why an Argo request failed: an HTTP status for the emissary, and a message for its user.
#[derive(Debug, Clone)]
pub struct ArgoError(pub StatusCode, pub String);

impl ArgoError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ArgoError {
        ArgoError(status, message.into())
    }

    /// A Kubernetes API error: a refusal stays one, the rest is the API being unavailable.
    pub fn api(what: &str, e: kube::Error) -> ArgoError {
        match &e {
            kube::Error::Api(status) if status.code == 403 => ArgoError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "{what}: the agent's ServiceAccount may not: {}",
                    status.message
                ),
            ),
            kube::Error::Api(status) if status.code < 500 && status.code != 429 => ArgoError::new(
                StatusCode::BAD_GATEWAY,
                format!("{what}: {}", status.message),
            ),
            _ => ArgoError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{what}: {e}")),
        }
    }
}

/// An Argo task's pod, as the agent verified it.
#[derive(Debug)]
pub struct ArgoPod {
    pub pod: PodRef,
    pub workflow: String,
    pub workflow_uid: Option<String>,
    /// The node of the workflow this pod runs (its task result's name).
    pub node_id: String,
    pub instance_id: Option<String>,
    pub template: Template,
    /// The containers whose logs may be archived: `main`, or the containerSet's.
    pub main_containers: Vec<String>,
    /// Secrets the pod mounts (the artifact repository's credentials among them).
    pub secrets: Vec<String>,
    /// Seconds the pod may run (its activeDeadlineSeconds), bounding its token.
    pub deadline: Option<u64>,
}

pub struct Argo {
    pub client: kube::Client,
    pub node: String,
    pods: Mutex<HashMap<String, Arc<ArgoPod>>>,
    stores: Mutex<HashMap<S3, Store>>,
    part_buffers: Arc<PartBudget>,
    /// For `http` input artifacts.
    pub http: crate::store::HttpClient,
    pub shutdowns: Arc<shutdown::Shutdowns>,
}

impl Argo {
    pub fn new(client: kube::Client, node: &str, part_buffers: Arc<PartBudget>) -> Argo {
        Argo {
            client,
            node: node.to_owned(),
            pods: Mutex::default(),
            stores: Mutex::default(),
            part_buffers,
            http: crate::store::http_client(),
            shutdowns: Arc::default(),
        }
    }

    /// The pod a task token was minted for: remembered since its login, or (after a restart
    /// of this agent) read and verified again.
    pub async fn pod(&self, pod: &PodRef) -> Result<Arc<ArgoPod>, ArgoError> {
        if let Some(known) = self.pods.lock().unwrap().get(&pod.uid) {
            return Ok(known.clone());
        }
        let verified = Arc::new(self.verify(&pod.ns, &pod.name, &pod.uid).await?);
        self.remember(verified.clone());
        Ok(verified)
    }

    fn remember(&self, pod: Arc<ArgoPod>) {
        let mut pods = self.pods.lock().unwrap();
        // Pods of this node come and go; a bound far above any node's pod count is enough.
        if pods.len() >= 4096 {
            pods.clear();
        }
        pods.insert(pod.pod.uid.clone(), pod);
    }

    /// How container `container` of `pod` ended, as its kubelet reports it: `None` while it
    /// runs. What a containerSet's dependency waits for, since the shared volume's exitcode
    /// files are writable by every container of the pod.
    pub async fn container_exit(
        &self,
        pod: &PodRef,
        container: &str,
    ) -> Result<Option<i32>, ArgoError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.ns);
        let current = pods
            .get_opt(&pod.name)
            .await
            .map_err(|e| ArgoError::api(&format!("reading pod {}/{}", pod.ns, pod.name), e))?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod.uid.as_str()))
            .ok_or_else(|| {
                ArgoError::new(
                    StatusCode::FORBIDDEN,
                    format!("pod {}/{} does not exist (any more)", pod.ns, pod.name),
                )
            })?;
        let status = current.status.unwrap_or_default();
        let known = current
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .any(|c| c.name == container);
        if !known {
            return Err(ArgoError::new(
                StatusCode::NOT_FOUND,
                format!("pod {}/{} has no container {container:?}", pod.ns, pod.name),
            ));
        }
        Ok(status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == container)
            .and_then(|c| c.state.as_ref()?.terminated.as_ref())
            .map(|t| t.exit_code))
    }

    /// Reads pod `ns/name` and checks that it is the pod `uid`, on this node, of an Argo
    /// workflow; returns what the agent needs of it.
    pub async fn verify(&self, ns: &str, name: &str, uid: &str) -> Result<ArgoPod, ArgoError> {
        let forbidden = |m: String| ArgoError::new(StatusCode::FORBIDDEN, m);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| ArgoError::api(&format!("reading pod {ns}/{name}"), e))?
            .ok_or_else(|| forbidden(format!("pod {ns}/{name} does not exist (any more)")))?;
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(forbidden(format!(
                "pod {ns}/{name} is not the pod this token was issued to (it was re-created)"
            )));
        }
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| forbidden("a pod without a spec".into()))?;
        if spec.node_name.as_deref() != Some(self.node.as_str()) {
            return Err(forbidden(format!(
                "pod {ns}/{name} runs on node {:?}, not on this agent's node {:?}",
                spec.node_name.as_deref().unwrap_or(""),
                self.node
            )));
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let (Some(workflow), Some(node_id)) = (
            labels.get(LABEL_WORKFLOW),
            annotations.get(ANNOTATION_NODE_ID),
        ) else {
            return Err(forbidden(format!(
                "pod {ns}/{name} is not an Argo workflow's (no {LABEL_WORKFLOW} label or \
                 {ANNOTATION_NODE_ID} annotation)"
            )));
        };
        if !protocol::api::valid_name(node_id) || !protocol::api::valid_name(workflow) {
            return Err(forbidden(format!(
                "pod {ns}/{name}: workflow {workflow:?} or node id {node_id:?} is not a name"
            )));
        }
        let workflow_uid = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "Workflow" && o.name == *workflow)
            .map(|o| o.uid.clone());
        let template = self.template(&pod, ns, name).await?;
        let main_containers = match &template.container_set {
            Some(set) => set["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect(),
            None => vec!["main".to_owned()],
        };
        let secrets = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
            .collect();
        Ok(ArgoPod {
            pod: PodRef {
                ns: ns.to_owned(),
                name: name.to_owned(),
                uid: uid.to_owned(),
            },
            workflow: workflow.clone(),
            workflow_uid,
            node_id: node_id.clone(),
            instance_id: labels.get(LABEL_INSTANCE).cloned(),
            template,
            main_containers,
            secrets,
            deadline: spec.active_deadline_seconds.map(|s| s.max(0) as u64),
        })
    }

    /// The pod's template: its `init` container's `ARGO_TEMPLATE`, or the ConfigMap named
    /// after the pod that Argo offloads a large one to.
    async fn template(&self, pod: &Pod, ns: &str, name: &str) -> Result<Template, ArgoError> {
        let bad = |m: String| ArgoError::new(StatusCode::BAD_REQUEST, m);
        let init = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .find(|c| c.name == "init")
            .ok_or_else(|| bad(format!("pod {ns}/{name} has no init container `init`")))?;
        let value = init
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "ARGO_TEMPLATE")
            .and_then(|e| e.value.clone())
            .ok_or_else(|| bad(format!("pod {ns}/{name}: `init` has no ARGO_TEMPLATE")))?;
        let text = if value == "offloaded" {
            let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
            maps.get(name)
                .await
                .map_err(|e| ArgoError::api(&format!("reading configmap {ns}/{name}"), e))?
                .data
                .and_then(|mut d| d.remove("ARGO_TEMPLATE"))
                .ok_or_else(|| bad(format!("configmap {ns}/{name} has no ARGO_TEMPLATE")))?
        } else {
            value
        };
        serde_json::from_str(&text).map_err(|e| bad(format!("pod {ns}/{name}: ARGO_TEMPLATE: {e}")))
    }

    /// The store of one S3 location, with the credentials of the Secrets it names, which the
    /// pod must mount: the agent lends a task no credentials its pod was not given.
    pub async fn store(&self, pod: &ArgoPod, s3: &S3) -> Result<Store, ArgoError> {
        let mut identity = s3.clone();
        identity.key = None;
        if let Some(store) = self.stores.lock().unwrap().get(&identity) {
            return Ok(store.clone());
        }
        let refuse = |m: String| ArgoError::new(StatusCode::BAD_REQUEST, m);
        let (Some(access), Some(secret)) = (&s3.access_key_secret, &s3.secret_key_secret) else {
            return Err(refuse(
                "the S3 location has no accessKeySecret and secretKeySecret: the agent lends \
                 its own credentials to no task"
                    .into(),
            ));
        };
        let access_key = self.secret_value(pod, access).await?;
        let secret_key = self.secret_value(pod, secret).await?;
        let session = match &s3.session_token_secret {
            Some(r) => Some(self.secret_value(pod, r).await?),
            None => None,
        };
        let credentials = aws_sdk_s3::config::Credentials::new(
            access_key,
            secret_key,
            session,
            None,
            "argo-repository",
        );
        let store = Store::s3_repository(
            &endpoint_url(s3),
            s3.region
                .as_deref()
                .filter(|r| !r.is_empty())
                .unwrap_or("us-east-1"),
            Some(credentials),
            s3.bucket.as_deref().unwrap_or_default(),
            self.part_buffers.clone(),
        );
        let mut stores = self.stores.lock().unwrap();
        if stores.len() >= 256 {
            stores.clear();
        }
        stores.insert(identity, store.clone());
        Ok(store)
    }
}

impl Argo {
    /// One key of a Secret the pod mounts.
    async fn secret_value(
        &self,
        pod: &ArgoPod,
        r: &template::SecretRef,
    ) -> Result<String, ArgoError> {
        let refuse = |m: String| ArgoError::new(StatusCode::BAD_REQUEST, m);
        let ns = &pod.pod.ns;
        if !pod.secrets.contains(&r.name) {
            return Err(refuse(format!(
                "secret {:?} is not mounted by pod {ns}/{}",
                r.name, pod.pod.name
            )));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let found = secrets
            .get(&r.name)
            .await
            .map_err(|e| ArgoError::api(&format!("reading secret {ns}/{}", r.name), e))?;
        let bytes = found
            .data
            .and_then(|mut d| d.remove(&r.key))
            .map(|b| b.0)
            .ok_or_else(|| refuse(format!("secret {ns}/{} has no key {:?}", r.name, r.key)))?;
        String::from_utf8(bytes)
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                refuse(format!(
                    "secret {ns}/{} key {:?} is not text",
                    r.name, r.key
                ))
            })
    }
}

/// Argo's `endpoint` is `host[:port]`, https unless `insecure`; AWS when unset.
fn endpoint_url(s3: &S3) -> String {
    let endpoint = s3
        .endpoint
        .as_deref()
        .filter(|e| !e.is_empty())
        .unwrap_or("s3.amazonaws.com");
    if endpoint.contains("://") {
        return endpoint.to_owned();
    }
    let scheme = if s3.insecure.unwrap_or(false) {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{endpoint}")
}
