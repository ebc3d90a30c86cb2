//! `POST /v1/argo/login`: a pod's ServiceAccount token in, a task token for that pod out.
//!
//! The API server vouches for the token (TokenReview) and names the pod it is bound to (the
//! kubelet projects only bound tokens); the agent then reads that pod and checks it (see
//! [`super::Argo::verify`]). A legacy, unbound token names no pod and gets nothing; another
//! node's pod gets nothing. Before it answers, the pod's `WorkflowTaskResult` exists, marked
//! incomplete: Argo must wait for this pod's outputs from then on.

use std::sync::Arc;

use hyper::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::{Argo, ArgoError, ArgoPod, results};
use crate::token::{Claims, Secret};

/// A task token lasts the pod's deadline and this margin, or a day without a deadline.
const MARGIN: u64 = 600;
const WITHOUT_DEADLINE: u64 = 24 * 3600;

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

impl Argo {
    /// Exchanges `service_account_token` for a task token: `(pod, token, expiry)`.
    pub async fn login(
        &self,
        secret: &Secret,
        service_account_token: &str,
    ) -> Result<(Arc<ArgoPod>, String, u64), ArgoError> {
        let unauthorized = |m: String| ArgoError::new(StatusCode::UNAUTHORIZED, m);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(service_account_token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ArgoError::api("reviewing the pod's token (TokenReview)", e))?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(unauthorized(format!(
                "the API server does not accept this token: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(account) = username.strip_prefix("system:serviceaccount:") else {
            return Err(unauthorized(format!(
                "{username:?} is not a ServiceAccount: log in with the pod's own token"
            )));
        };
        let (ns, _) = account.split_once(':').unwrap_or((account, ""));
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(name), Some(uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
            return Err(unauthorized(
                "the token is not bound to a pod (a legacy Secret token?): log in with the \
                 token the kubelet projects into the pod"
                    .into(),
            ));
        };
        let pod = Arc::new(self.verify(ns, &name, &uid).await?);
        results::ensure_placeholder(&self.client, &pod).await?;
        self.remember(pod.clone());
        let ttl = pod
            .deadline
            .map_or(WITHOUT_DEADLINE, |d| d.saturating_add(MARGIN))
            .min(WITHOUT_DEADLINE);
        let exp = crate::token::now() + ttl;
        let claims = Claims {
            ns: pod.pod.ns.clone(),
            wf: pod.workflow.clone(),
            task: pod.node_id.clone(),
            attempt: 0,
            exp,
            on: Some(self.node.clone()),
            // An Argo pod reads what its own template names, located by the agent.
            reads: Vec::new(),
            pod: Some(pod.pod.clone()),
        };
        Ok((pod, secret.sign(&claims), exp))
    }
}
