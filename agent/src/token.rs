//! Per-task bearer tokens: what lets an emissary use its agent, and only for its own task.
//!
//! Format: `base64url(claims) "." base64url(mac)`, no padding, where `claims` is the JSON
//! `{"ns": NAMESPACE, "wf": WORKFLOW, "task": TASK, "attempt": N, "exp": UNIX_SECONDS,
//! "on": NODE, "reads": [KEY, ...]}` (`ns` defaults to `default`; `on` and `reads` are optional)
//! and `mac` is HMAC-SHA256 of the claims' base64url text with the node key. Verification is
//! constant time; a token opens only `/v1/tasks/{task}/{attempt}/...` of its own claims, on
//! node `on` when it names one, until `exp` (give or take two minutes of clock skew), and only
//! until its attempt's result is recorded.
//! It reads its own workflow's keys (`{prefix}/{ns}/{wf}/...`) and the keys in `reads` (an
//! entry ending in `/` grants everything under it): the inputs the controller passed it.
//!
//! Node keys: the controller holds one master key and gives each node
//! `HMAC-SHA256(master, "emissary node key\0" NODE)` (`emissary-agent node-key`), so the key on
//! one node mints tokens for that node only, and a token minted for one node fails on another.
//!
//! The agent proves itself to the controller the same way: every request it makes carries a
//! node token, the same format with the claims `{"node": NODE, "exp": UNIX_SECONDS}` (valid
//! for five minutes, minted per request), which the controller verifies with that node's key.
//! Neither kind of token parses as the other: a task token lacks `node`, a node token `task`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The workflow's namespace: the store key's first level.
    #[serde(default = "default_name")]
    pub ns: String,
    /// The workflow: the store key's second level.
    #[serde(default = "default_name")]
    pub wf: String,
    pub task: String,
    pub attempt: u32,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// The only node whose agent takes this token (not `node`: that would read as a node token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
    /// Keys outside its own workflow it may read (`.../` for everything under a prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<String>,
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

fn default_name() -> String {
    "default".to_owned()
}

impl Claims {
    /// What identifies the attempt across the agent's state: its pod for an Argo task (a pod
    /// re-created under the same name is another attempt), else namespace, workflow, task, attempt.
    pub fn attempt_id(&self) -> String {
        match &self.pod {
            Some(pod) => format!("pod:{}", pod.uid),
            None => format!("{}/{}/{}/{}", self.ns, self.wf, self.task, self.attempt),
        }
    }
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

/// How far the minter's clock may be behind this node's by default: a token is taken until
/// `exp` plus this, and no longer (`--clock-skew`).
pub const CLOCK_SKEW: &str = "2m";

/// A node key: at least [`MIN_KEY_BYTES`] bytes, not a placeholder, not a repeated pattern.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

pub const MIN_KEY_BYTES: usize = 32;
/// Fewer distinct bytes than this in a key is a pattern, not randomness (32 random bytes
/// have ~28; their base64 text ~24).
const MIN_DISTINCT_BYTES: usize = 12;

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the node key has {} bytes; it needs at least {MIN_KEY_BYTES} random bytes \
                 (head -c 32 /dev/urandom | base64 > FILE)",
                bytes.len()
            ));
        }
        let text = String::from_utf8_lossy(&bytes).to_ascii_uppercase();
        if text.contains("REPLACE") || text.contains("CHANGEME") || text.contains("PLACEHOLDER") {
            return Err(
                "the node key is a placeholder: generate one (head -c 32 /dev/urandom | base64 > FILE)"
                    .into(),
            );
        }
        let mut seen = [false; 256];
        bytes.iter().for_each(|&b| seen[b as usize] = true);
        if seen.iter().filter(|&&s| s).count() < MIN_DISTINCT_BYTES {
            return Err(format!(
                "the node key has fewer than {MIN_DISTINCT_BYTES} distinct bytes: it is not random \
                 (head -c 32 /dev/urandom | base64 > FILE)"
            ));
        }
        Ok(Secret(bytes))
    }

    /// The key of `node`, derived from this master key (as the controller derives it).
    pub fn node_key(&self, node: &str) -> Secret {
        let mut mac = self.mac();
        mac.update(b"emissary node key\0");
        mac.update(node.as_bytes());
        // Text, so the key file is printable like any other; 43 characters from 32 bytes.
        Secret(
            URL_SAFE_NO_PAD
                .encode(mac.finalize().into_bytes())
                .into_bytes(),
        )
    }

    /// The key as its file holds it.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
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

    /// The claims of a token this key signed, unless it expired more than `skew` seconds
    /// before `now`.
    pub fn verify(&self, token: &str, now: u64, skew: u64) -> Result<Claims, TokenError> {
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
        if claims.exp.saturating_add(skew) <= now {
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

    const KEY: &[u8] = b"0123456789abcdefghijklmnopqrstuv";
    const OTHER: &[u8] = b"vutsrqponmlkjihgfedcba9876543210";

    fn claims() -> Claims {
        Claims {
            ns: "team-a".into(),
            wf: "wf-1".into(),
            task: "t".into(),
            attempt: 2,
            exp: 1000,
            on: None,
            reads: Vec::new(),
            pod: None,
        }
    }

    #[test]
    fn signs_and_verifies() {
        let secret = Secret::new(KEY.to_vec()).unwrap();
        let token = secret.sign(&claims());
        assert_eq!(secret.verify(&token, 999, 0), Ok(claims()));
        assert_eq!(secret.verify(&token, 1000, 0), Err(TokenError::Expired));
        // Two minutes of clock skew, and no more.
        assert_eq!(secret.verify(&token, 1119, 120), Ok(claims()));
        assert_eq!(secret.verify(&token, 1120, 120), Err(TokenError::Expired));
    }

    #[test]
    fn node_and_task_tokens_do_not_stand_for_each_other() {
        let secret = Secret::new(KEY.to_vec()).unwrap();
        let node = secret.sign(&NodeClaims {
            node: "n1".into(),
            exp: 1000,
        });
        assert_eq!(secret.verify(&node, 1, 0), Err(TokenError::Malformed));
        let task = secret.sign(&claims());
        let json = URL_SAFE_NO_PAD
            .decode(task.split_once('.').unwrap().0)
            .unwrap();
        assert!(serde_json::from_slice::<NodeClaims>(&json).is_err());
    }

    #[test]
    fn refuses_forgeries() {
        let secret = Secret::new(KEY.to_vec()).unwrap();
        let other = Secret::new(OTHER.to_vec()).unwrap();
        assert_eq!(
            secret.verify(&other.sign(&claims()), 1, 0),
            Err(TokenError::Forged)
        );
        let token = secret.sign(&claims());
        let (_, tag) = token.split_once('.').unwrap();
        let mut raised = claims();
        raised.attempt = 3;
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&raised).unwrap());
        assert_eq!(
            secret.verify(&format!("{body}.{tag}"), 1, 0),
            Err(TokenError::Forged)
        );
        assert_eq!(secret.verify("garbage", 1, 0), Err(TokenError::Malformed));
        assert!(Secret::new(b"short".to_vec()).is_err());
    }

    #[test]
    fn refuses_placeholders_and_patterns_as_keys() {
        for key in [
            &b"REPLACE-WITH-32-RANDOM-BYTES-BASE64"[..],
            b"abababababababababababababababababab",
            b"0123456789abcde",
        ] {
            assert!(Secret::new(key.to_vec()).is_err(), "{key:?}");
        }
    }

    #[test]
    fn a_node_key_mints_for_its_node_only() {
        let master = Secret::new(KEY.to_vec()).unwrap();
        let (n1, n2) = (master.node_key("n1"), master.node_key("n2"));
        assert_ne!(n1.text(), n2.text());
        assert_eq!(n1.text().len(), 43);
        assert!(
            Secret::new(n1.text().into_bytes()).is_ok(),
            "a derived key is a valid key"
        );
        assert_eq!(
            n2.verify(&n1.sign(&claims()), 1, 0),
            Err(TokenError::Forged)
        );
    }
}
