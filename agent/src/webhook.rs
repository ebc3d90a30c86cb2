//! `emissary-agent webhook`: a Kubernetes mutating admission webhook over HTTPS (rustls).
//!
//! `POST /inject` takes an `admission.k8s.io/v1` AdmissionReview and answers with a JSONPatch
//! that injects the pod, for pods labelled `emissary.io/inject: "true"` (the
//! MutatingWebhookConfiguration's objectSelector sends only those; others are allowed
//! untouched). It fails closed: a review it cannot read is a 400 with the reason, and a pod it
//! cannot inject is denied with the reason, never admitted uninjected.
//!
//! Anyone who reaches its Service can send it bytes, so what it holds is bounded: a review of
//! at most 1 MiB (a pod is far smaller: annotations are capped at 256 KiB), read within
//! `--request-timeout`, 16 MiB of bodies at once, 256 connections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tracing::{info, warn};

use crate::inject::{self, Config, LABEL_ARGO_WORKFLOW, LABEL_INJECT};
use crate::server::{self, HEADER_TIMEOUT};

#[derive(clap::Args)]
pub struct WebhookArgs {
    /// Where to serve HTTPS.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// PEM private key.
    #[arg(long, value_name = "FILE")]
    pub tls_key: PathBuf,
    /// Injection settings (the ConfigMap's inject.yaml).
    #[arg(long, value_name = "FILE")]
    pub inject_config: PathBuf,
    /// Written once listening: {"addr": ADDR}.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// How long a client may take to send a request's body (the API server's own webhook
    /// timeout is 10 s by default).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub request_timeout: String,
}

/// The largest AdmissionReview read.
const BODY_LIMIT: usize = 1 << 20;
/// Bodies being read at once, of up to `BODY_LIMIT` each: what the webhook's memory limit
/// (64 Mi) can hold beside itself.
const BODIES: usize = 16;
const CONNECTIONS: usize = 256;

struct Limits {
    request_timeout: std::time::Duration,
    bodies: tokio::sync::Semaphore,
}

pub async fn serve(args: WebhookArgs) -> Result<(), String> {
    let config = Arc::new(inject::load_config(&args.inject_config)?);
    let limits = Arc::new(Limits {
        request_timeout: protocol::duration::parse(&args.request_timeout)
            .map_err(|e| format!("--request-timeout: {e}"))?,
        bodies: tokio::sync::Semaphore::new(BODIES),
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(&args)?));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json!({"addr": addr.to_string()}).to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    info!(addr = %addr, "webhook listening");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "accept"); continue; }
            },
            _ = terminate.recv() => return Ok(()),
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            warn!(peer = %peer, limit = CONNECTIONS, "too many connections: closing a new one");
            continue;
        };
        let (acceptor, config, limits) = (acceptor.clone(), config.clone(), limits.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // A peer that never finishes its handshake or headers must not hold a socket.
            let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    warn!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    warn!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |req| handle(config.clone(), limits.clone(), req));
            let _ = server::http1()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn tls_config(args: &WebhookArgs) -> Result<rustls::ServerConfig, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(&args.tls_cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", args.tls_cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", args.tls_cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut read(&args.tls_key)?.as_slice())
        .map_err(|e| format!("{}: {e}", args.tls_key.display()))?
        .ok_or_else(|| format!("{}: no PEM private key", args.tls_key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key: {e}"))
}

async fn handle(
    config: Arc<Config>,
    limits: Arc<Limits>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: Value| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid response"))
    };
    let argo = match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => false,
        (&Method::POST, "/argo") => true,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                json!({"error": "POST /inject or /argo only"}),
            );
        }
    };
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("an AdmissionReview of {BODY_LIMIT} bytes at most")}),
        );
    }
    let Ok(_memory) = limits.bodies.try_acquire() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "reading as many reviews as it may at once; try again"}),
        );
    };
    let body = http_body_util::Limited::new(req.into_body(), BODY_LIMIT).collect();
    let bytes = match tokio::time::timeout(limits.request_timeout, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("reading the request ({BODY_LIMIT} bytes at most): {e}")}),
            );
        }
        Err(_) => {
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": format!("the request's body took over {:?}", limits.request_timeout)}),
            );
        }
    };
    let answer = if argo {
        review_argo(&config, &bytes)
    } else {
        review(&config, &bytes)
    };
    match answer {
        Ok(answer) => reply(StatusCode::OK, answer),
        Err(message) => {
            warn!(error = %message, "malformed AdmissionReview");
            reply(StatusCode::BAD_REQUEST, json!({"error": message}))
        }
    }
}

/// The AdmissionReview answer for `bytes` on `/inject`, or why it could not be read.
pub fn review(config: &Config, bytes: &[u8]) -> Result<Value, String> {
    answer(bytes, |pod| {
        let labelled = pod.pointer(&format!(
            "/metadata/labels/{}",
            LABEL_INJECT.replace('/', "~1")
        )) == Some(&json!("true"));
        labelled.then(|| inject::inject(pod, config))
    })
}

/// The AdmissionReview answer for `bytes` on `/argo`: Argo's pods adopted.
pub fn review_argo(config: &Config, bytes: &[u8]) -> Result<Value, String> {
    answer(bytes, |pod| {
        let argo = pod
            .pointer(&format!(
                "/metadata/labels/{}",
                LABEL_ARGO_WORKFLOW.replace('/', "~1")
            ))
            .is_some();
        argo.then(|| inject::adopt_argo_pod(pod, config))
    })
}

/// Reads an AdmissionReview, and answers it with what `change` makes of its pod: `None`
/// allows it untouched, an error denies it with the reason.
fn answer(
    bytes: &[u8],
    change: impl FnOnce(&Value) -> Option<Result<Value, inject::InjectError>>,
) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review["apiVersion"], review["kind"]
        ));
    }
    let request = &review["request"];
    let uid = request["uid"].as_str().ok_or("request.uid is missing")?;
    let pod = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or("request.object is missing")?;
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(changed) = change(pod) {
        match changed {
            Ok(injected) => {
                let patch = inject::patch(pod, &injected);
                response["patchType"] = json!("JSONPatch");
                response["patch"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
            }
            Err(e) => {
                // Fail closed: the pod asked for the emissary and cannot have it.
                response["allowed"] = json!(false);
                response["status"] =
                    json!({"code": 400, "message": format!("emissary injection: {e}")});
            }
        }
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}
