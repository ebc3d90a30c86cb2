//! `emissary-agent webhook`: a Kubernetes mutating admission webhook over HTTPS (rustls).
//!
//! `POST /inject` takes an `admission.k8s.io/v1` AdmissionReview and answers with a JSONPatch
//! that injects the pod, for pods labelled `emissary.io/inject: "true"` (the
//! MutatingWebhookConfiguration's objectSelector sends only those; others are allowed
//! untouched). It fails closed: a review it cannot read is a 400 with the reason, and a pod it
//! cannot inject is denied with the reason, never admitted uninjected.

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

use crate::inject::{self, Config, LABEL_INJECT};
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
}

pub async fn serve(args: WebhookArgs) -> Result<(), String> {
    let config = Arc::new(inject::load_config(&args.inject_config)?);
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
        let (acceptor, config) = (acceptor.clone(), config.clone());
        tokio::spawn(async move {
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
            let service = service_fn(move |req| handle(config.clone(), req));
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
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: Value| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid response"))
    };
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return reply(StatusCode::NOT_FOUND, json!({"error": "POST /inject only"}));
    }
    let bytes = match http_body_util::Limited::new(req.into_body(), 3 << 20)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("reading the request (3 MiB at most): {e}")}),
            );
        }
    };
    match review(&config, &bytes) {
        Ok(answer) => reply(StatusCode::OK, answer),
        Err(message) => {
            warn!(error = %message, "malformed AdmissionReview");
            reply(StatusCode::BAD_REQUEST, json!({"error": message}))
        }
    }
}

/// The AdmissionReview answer for `bytes`, or why it could not be read.
pub fn review(config: &Config, bytes: &[u8]) -> Result<Value, String> {
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
    if pod.pointer(&format!(
        "/metadata/labels/{}",
        LABEL_INJECT.replace('/', "~1")
    )) == Some(&json!("true"))
    {
        match inject::inject(pod, config) {
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
