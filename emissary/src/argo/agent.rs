//! This node's agent, from an Argo pod: where it is, and the task token it gives the pod.
//!
//! Where: `EMISSARY_AGENT_ADDR` (`HOST:PORT`; Argo passes `executor.env` to `init`), else the
//! agent's node-local Service, `emissary-agent.emissary-system.svc:7946` (a Service with
//! `internalTrafficPolicy: Local` reaches the agent of the pod's own node). The token: `init`
//! logs in with the pod's ServiceAccount token, which the agent checks with the API server;
//! it leaves the address and the task token in `/var/run/argo/emissary/` for the pod's other
//! containers, which need neither DNS nor a token of their own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use protocol::api::{ARGO_LOGIN_PATH, ArgoLogin};

use crate::transfer::agent::Agent;
use crate::transfer::http::Client;

const DEFAULT_ADDR: &str = "emissary-agent.emissary-system.svc:7946";
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

fn shared_dir() -> PathBuf {
    Path::new(super::VAR_RUN_ARGO).join("emissary")
}

/// A logged-in pod: the agent's address (`IP:PORT`) and its task.
pub struct Session {
    pub addr: String,
    pub login: ArgoLogin,
}

impl Session {
    /// The agent client for this session's task.
    pub fn agent(&self) -> Result<Agent, String> {
        Agent::new(
            &self.addr,
            &self.login.token,
            &self.login.task,
            self.login.attempt,
            Agent::retry_budget()?,
            true,
        )
    }

    /// In `init`: finds the agent, logs in, and leaves both for the pod's other containers.
    pub fn start() -> Result<Session, String> {
        let named = crate::env_any(&["EMISSARY_AGENT_ADDR"]).unwrap_or_else(|| DEFAULT_ADDR.into());
        let addr = resolve(&named)?;
        let session = Session {
            login: log_in(&addr)?,
            addr,
        };
        let dir = shared_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // Readable by every container's user (they may differ), written whole.
        for (name, text) in [
            ("agent", session.addr.clone()),
            (
                "login.json",
                serde_json::to_string(&session.login).unwrap_or_default(),
            ),
        ] {
            crate::fsutil::write_atomic_mode(&dir.join(name), text.as_bytes(), Some(0o444))
                .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))?;
        }
        Ok(session)
    }

    /// In a main container: the session `init` left, or (a token that expired) a new login with
    /// this container's own ServiceAccount token.
    pub fn resume() -> Result<Session, String> {
        let dir = shared_dir();
        let addr = std::fs::read_to_string(dir.join("agent")).map_err(|e| {
            format!(
                "{}: {e} (did `argoexec init` run?)",
                dir.join("agent").display()
            )
        })?;
        let text = std::fs::read(dir.join("login.json"))
            .map_err(|e| format!("{}: {e}", dir.join("login.json").display()))?;
        let login: ArgoLogin = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: {e}", dir.join("login.json").display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if login.expires > now + 60 || !Path::new(SERVICE_ACCOUNT_TOKEN).exists() {
            return Ok(Session { addr, login });
        }
        Ok(Session {
            login: log_in(&addr)?,
            addr,
        })
    }
}

/// `HOST:PORT` → `IP:PORT` (the HTTP client takes addresses only).
fn resolve(named: &str) -> Result<String, String> {
    if named.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(named.to_owned());
    }
    let (host, port) = named
        .rsplit_once(':')
        .ok_or_else(|| format!("the node agent's address {named:?} is not HOST:PORT"))?;
    Ok(format!("{}:{port}", crate::transfer::dns::lookup(host)?))
}

/// Logs in with the pod's ServiceAccount token, retrying while the agent is unreachable.
fn log_in(addr: &str) -> Result<ArgoLogin, String> {
    let token = std::fs::read_to_string(SERVICE_ACCOUNT_TOKEN).map_err(|e| {
        format!(
            "{SERVICE_ACCOUNT_TOKEN}: {e}: the node agent knows the pod by its ServiceAccount \
             token (do not turn off automountServiceAccountToken for Argo pods)"
        )
    })?;
    let client = Client::new(addr, token.trim())?;
    let until = Instant::now() + Agent::retry_budget()?;
    let mut wait = Duration::from_millis(200);
    loop {
        let answer = client
            .send(
                "POST",
                ARGO_LOGIN_PATH,
                Some(b"{}"),
                Duration::from_secs(60),
            )
            .and_then(|r| r.into_success());
        match answer {
            Ok(body) => {
                return serde_json::from_slice(&body)
                    .map_err(|e| format!("the node agent's login answer: {e}"));
            }
            Err(e) if e.retryable() && Instant::now() + wait < until => {
                crate::note!("argoexec: logging in to the node agent at {addr}: {e}; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(format!("logging in to the node agent at {addr}: {e}")),
        }
    }
}
