//! Per-task bearer tokens: what lets an emissary use its agent, and only for its own task.
//!
//! Format: `base64url(claims) "." base64url(mac)`, no padding, where `claims` is the JSON
//! `{"wf": WORKFLOW, "task": TASK, "attempt": N, "exp": UNIX_SECONDS}` and `mac` is
//! HMAC-SHA256 of the claims' base64url text with the node secret (shared with the controller,
//! which mints the tokens; `emissary-agent token` mints one by hand). Verification is constant
//! time; a token opens only `/v1/tasks/{task}/{attempt}/...` of its own claims, until `exp`.
//!
//! The agent proves itself to the controller the same way: every request it makes carries a
//! node token, the same format with the claims `{"node": NODE, "exp": UNIX_SECONDS}` (valid
//! for five minutes, minted per request), which the controller verifies with the node secret.
//! Neither kind of token parses as the other: a task token lacks `node`, a node token `task`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The workflow: the store key's second level.
    #[serde(default = "default_workflow")]
    pub wf: String,
    pub task: String,
    pub attempt: u32,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// The pod of an Argo task, for which this agent minted the token (`crate::argo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A pod, exactly: a pod re-created under the same name is another pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub ns: String,
    pub name: String,
    pub uid: String,
}

/// What a node token asserts: this agent speaks for `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClaims {
    pub node: String,
    pub exp: u64,
}

fn default_workflow() -> String {
    "default".to_owned()
}

/// Why a token was refused (the answer is 401 either way; the log says which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Forged,
    Expired,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::Forged => "token signature does not match",
            TokenError::Expired => "token expired",
        })
    }
}

/// The node secret; at least 16 bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < 16 {
            return Err(format!(
                "the node secret has {} bytes; it needs at least 16",
                bytes.len()
            ));
        }
        Ok(Secret(bytes))
    }

    /// Reads a secret file, ignoring one trailing newline.
    pub fn from_file(path: &std::path::Path) -> Result<Secret, String> {
        let mut bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
        }
        Secret::new(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    pub fn sign(&self, claims: &(impl Serialize + ?Sized)) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        format!(
            "{body}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (body, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag).map_err(|_| TokenError::Forged)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            wf: "wf-1".into(),
            task: "t".into(),
            attempt: 2,
            exp: 1000,
            pod: None,
        }
    }

    #[test]
    fn signs_and_verifies() {
        let secret = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        let token = secret.sign(&claims());
        assert_eq!(secret.verify(&token, 999), Ok(claims()));
        assert_eq!(secret.verify(&token, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn node_and_task_tokens_do_not_stand_for_each_other() {
        let secret = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        let node = secret.sign(&NodeClaims {
            node: "n1".into(),
            exp: 1000,
        });
        assert_eq!(secret.verify(&node, 1), Err(TokenError::Malformed));
        let task = secret.sign(&claims());
        let json = URL_SAFE_NO_PAD
            .decode(task.split_once('.').unwrap().0)
            .unwrap();
        assert!(serde_json::from_slice::<NodeClaims>(&json).is_err());
    }

    #[test]
    fn refuses_forgeries() {
        let secret = Secret::new(b"0123456789abcdef".to_vec()).unwrap();
        let other = Secret::new(b"fedcba9876543210".to_vec()).unwrap();
        assert_eq!(
            secret.verify(&other.sign(&claims()), 1),
            Err(TokenError::Forged)
        );
        let token = secret.sign(&claims());
        let (_, tag) = token.split_once('.').unwrap();
        let mut raised = claims();
        raised.attempt = 3;
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&raised).unwrap());
        assert_eq!(
            secret.verify(&format!("{body}.{tag}"), 1),
            Err(TokenError::Forged)
        );
        assert_eq!(secret.verify("garbage", 1), Err(TokenError::Malformed));
        assert!(Secret::new(b"short".to_vec()).is_err());
    }
}
