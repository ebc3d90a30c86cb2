//! One check per parser of untrusted input. Each takes arbitrary bytes and asserts what must
//! hold for every input — not only "no panic": a refused input gets an error, nothing is
//! written outside the target directory, a token is accepted only if signed, a patch says
//! exactly what the injection did. libFuzzer drives them under `make fuzz` (nightly, with
//! `-rss_limit_mb` bounding memory); `make test` replays `seeds/` and `findings/` on stable.

use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::Mac;
use serde_json::{Value, json};

use emissary::transfer::archive::{self, Limits, Unpack};
use emissary::transfer::http::Response;
use emissary_agent::inject::{self, Config};
use emissary_agent::outbox::{Outbox, Reader};
use emissary_agent::token::{Claims, Secret, TokenError};
use emissary_agent::webhook;
use protocol::api;
use protocol::spec;

/// A check of one input.
pub type Check = fn(&[u8]);

/// Every target by name, for the replay.
pub const TARGETS: &[(&str, Check)] = &[
    ("spec", spec),
    ("archive", archive),
    ("http_response", http_response),
    ("token", token),
    ("journal", journal),
    ("inject", inject),
    ("admission_review", admission_review),
    ("agent_json", agent_json),
];

/// The task spec, with `{{inputs.parameters.*}}` substitution as `emissary run` applies it.
pub fn spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        assert!(spec::parse(text).is_err(), "invalid JSON parsed");
        return;
    };
    let before = value.clone();
    let params = spec::declared_parameters(&value);
    let longest = params.values().map(String::len).max().unwrap_or(0);
    match spec::substitute(&mut value, &params) {
        Ok(()) => {
            // One pass, never recursive: each reference (at least `{{inputs.parameters.}}`,
            // 22 bytes) grows into one value at most, so no input can blow up.
            let (now, was) = (value.to_string().len(), before.to_string().len());
            assert!(
                now <= was + (was / 22 + 1) * longest,
                "substitution grew {was} bytes into {now}"
            );
            if params.is_empty() {
                assert_eq!(
                    value, before,
                    "nothing to substitute, yet something changed"
                );
            }
            let _ = spec::from_value(value);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Archive unpacking through the tar guard (tar, gzip, zstd, or a plain file).
pub fn archive(data: &[u8]) {
    let root = scratch("archive");
    let dest = root.join("dest");
    let limits = Limits {
        max_bytes: 1 << 20,
        max_entries: 256,
    };
    let unpack = if data.first() == Some(&b'!') {
        Unpack::Never
    } else {
        Unpack::Auto
    };
    let result = archive::stage(&mut Cursor::new(data), &dest, unpack, limits, None);
    let left: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    match result {
        Ok(digest) => {
            assert_eq!(
                left,
                ["dest"],
                "staging left {left:?} beside its destination"
            );
            assert_eq!(digest.size, data.len() as u64, "the digest skipped bytes");
            let (bytes, entries) = tree_size(&dest);
            assert!(
                bytes <= limits.max_bytes,
                "{bytes} bytes unpacked past the limit"
            );
            assert!(
                entries <= limits.max_entries + 1,
                "{entries} entries past the limit"
            );
            assert_no_escape(&dest, &dest);
        }
        Err(e) => {
            assert!(left.is_empty(), "a refused input left {left:?}");
            assert!(!e.is_empty());
        }
    }
}

/// The emissary's HTTP/1.1 response reader, chunked bodies included.
pub fn http_response(data: &[u8]) {
    let Ok(response) = Response::parse(Cursor::new(data.to_vec()), "GET /fuzz") else {
        return;
    };
    let mut body = Vec::new();
    if response.into_reader().read_to_end(&mut body).is_ok() {
        assert!(
            body.len() <= data.len(),
            "a {}-byte body out of {} bytes",
            body.len(),
            data.len()
        );
    }
}

/// Token verification: only a token this key signed, unexpired, is taken. The first byte
/// chooses: verify the rest as a token, or sign the rest as claims and check both keys.
pub fn token(data: &[u8]) {
    let (key, other) = keys();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(claims) = key.verify(text, 1_000_000, 120) {
            let (body, tag) = text.split_once('.').unwrap();
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY).unwrap();
            mac.update(body.as_bytes());
            let tag = URL_SAFE_NO_PAD.decode(tag).expect("accepted a bad tag");
            mac.verify_slice(&tag)
                .expect("accepted a token this key did not sign");
            assert!(claims.exp + 120 > 1_000_000, "accepted an expired token");
        }
        return;
    }
    let Ok(claims) = serde_json::from_str::<Claims>(text) else {
        return;
    };
    let token = key.sign(&claims);
    match key.verify(&token, 1_000_000, 120) {
        Ok(back) => assert_eq!(back, claims),
        Err(TokenError::Expired) => assert!(claims.exp + 120 <= 1_000_000),
        Err(e) => panic!("its own signature refused: {e}"),
    }
    assert_eq!(other.verify(&token, 0, 0), Err(TokenError::Forged));
}

/// The outbox journal read back after a crash: whatever the segment holds, recovery and
/// delivery end, and deliver no more records than it has lines.
pub fn journal(data: &[u8]) {
    // A directory per input: the last input's journal writer may still be finishing in its own.
    // The ones before are removed, and one whose removal raced its writer is tried again later.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static LEFT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch(&format!("journal-{run}"));
    {
        let mut left = LEFT.lock().unwrap();
        let last = left.pop();
        left.retain(|old| fs::remove_dir_all(old).is_err() && old.exists());
        left.extend(last);
        left.push(dir.clone());
    }
    fs::write(dir.join("00000000000000000001.jsonl"), data).unwrap();
    let outbox = Outbox::open(&dir, 1 << 30, 1 << 30).expect("a journal that does not open");
    let mut reader = Reader::open(&outbox).unwrap();
    let lines = data.iter().filter(|&&b| b == b'\n').count();
    let mut delivered = 0;
    loop {
        let batch = reader.peek(64, 64 << 10).unwrap();
        let Some(last) = batch.last() else { break };
        delivered += batch.len();
        assert!(
            delivered <= lines,
            "{delivered} records out of {lines} lines"
        );
        reader.ack(last.id).unwrap();
    }
    drop(reader);
    drop(outbox);
}

/// `emissary-agent inject` on arbitrary Pod or Workflow YAML/JSON: an injected pod is
/// injected once only.
pub fn inject(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = inject::inject_text(text, config()) else {
        return;
    };
    let twice = inject::inject_text(&once, config()).expect("its own output refused");
    assert_eq!(once, twice, "injected twice");
}

/// The webhook's AdmissionReview, both endpoints: the answer is for this request, and its
/// patch turns the pod into exactly the injected pod.
pub fn admission_review(data: &[u8]) {
    for (review, change) in [
        (
            webhook::review as fn(&Config, &[u8]) -> _,
            inject::inject as fn(&_, &_) -> _,
        ),
        (webhook::review_argo, inject::adopt_argo_pod),
    ] {
        let Ok(answer) = review(config(), data) else {
            continue;
        };
        let request: Value = serde_json::from_slice(data).unwrap();
        let response = &answer["response"];
        assert_eq!(response["uid"], request["request"]["uid"]);
        let Some(patch) = response["patch"].as_str() else {
            continue;
        };
        let patch: Value = serde_json::from_slice(&STANDARD.decode(patch).unwrap()).unwrap();
        let pod = &request["request"]["object"];
        let expected = change(pod, config()).expect("patched a pod it refuses");
        assert_eq!(
            apply(pod, &patch),
            expected,
            "the patch is not the injection"
        );
    }
}

/// The agent's JSON request bodies: what parses, serializes back to the same value, and
/// names it carries pass the name rule only if they are single path segments.
pub fn agent_json(data: &[u8]) {
    fn round_trip<T>(data: &[u8]) -> Option<T>
    where
        T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
    {
        let value: T = serde_json::from_slice(data).ok()?;
        let back: T = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(back, value);
        Some(value)
    }
    round_trip::<api::StartRequest>(data);
    round_trip::<api::ProgressReport>(data);
    round_trip::<api::ArgoLogin>(data);
    if let Some(result) = round_trip::<api::TaskResult>(data) {
        let names = result.outputs.parameters.iter().map(|p| p.name.as_str());
        for name in names.chain(std::iter::once(result.container.as_str())) {
            if api::valid_name(name) {
                assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..");
            }
        }
    }
}

const KEY: &[u8] = b"fuzzing-key-0123456789abcdefghijklmnopq";

fn keys() -> &'static (Secret, Secret) {
    static KEYS: OnceLock<(Secret, Secret)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            Secret::new(KEY.to_vec()).unwrap(),
            Secret::new(b"another-key-zyxwvutsrqponmlkjihgfedcba98".to_vec()).unwrap(),
        )
    })
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        serde_json::from_value(json!({
            "emissaryImage": "emissary:fuzz",
            "images": {"busybox": {"entrypoint": ["/bin/sh"]}}
        }))
        .unwrap()
    })
}

/// An empty directory of this process for `what`.
fn scratch(what: &str) -> PathBuf {
    let dir = scratch_path(what);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes what the checks of this process left in the temporary directory.
pub fn clean_up() {
    let prefix = format!("emissary-fuzz-{}-", std::process::id());
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn scratch_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("emissary-fuzz-{}-{what}", std::process::id()))
}

/// Bytes of regular files and number of entries under `dir`, not following links.
fn tree_size(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return total;
    };
    total.1 += 1;
    if meta.is_file() {
        total.0 += meta.len();
    } else if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            let (bytes, entries) = tree_size(&entry.unwrap().path());
            total.0 += bytes;
            total.1 += entries;
        }
    }
    total
}

/// No symlink under `dir` resolves outside `dest` (followed when its target exists; else its
/// text taken from where it lives).
fn assert_no_escape(dest: &Path, dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if meta.file_type().is_symlink() {
        let dest = fs::canonicalize(dest).unwrap();
        let resolved = fs::canonicalize(dir).unwrap_or_else(|_| {
            let parent = fs::canonicalize(dir.parent().unwrap()).unwrap();
            lexical(&parent.join(fs::read_link(dir).unwrap()))
        });
        assert!(
            resolved.starts_with(&dest),
            "{} points outside: {}",
            dir.display(),
            resolved.display()
        );
    } else if meta.is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            assert_no_escape(dest, &entry.unwrap().path());
        }
    }
}

/// `path` with `.` and `..` resolved as text.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Applies the only patch shapes the webhook emits: none, or one `add`/`replace` of `/spec`.
fn apply(pod: &Value, patch: &Value) -> Value {
    let mut pod = pod.clone();
    for op in patch.as_array().expect("a patch is a list") {
        assert_eq!(op["path"], "/spec", "a patch of {}", op["path"]);
        match op["op"].as_str() {
            Some("add") => assert!(pod.get("spec").is_none(), "add over an existing spec"),
            Some("replace") => assert!(pod.get("spec").is_some(), "replace of a missing spec"),
            other => panic!("patch op {other:?}"),
        }
        pod["spec"] = op["value"].clone();
    }
    pod
}
