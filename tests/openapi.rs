//! The OpenAPI document matches the Rust types: every sample the types produce validates
//! against its schema (no undeclared field, no wrong type, nothing required missing), and
//! every property the document declares is produced by some sample (no stale field).

use std::collections::BTreeSet;
use std::path::Path;

use protocol::api::*;
use protocol::summary::{ErrorKind, ExitReason, RunSummary, TaskError};
use serde_json::{Value as Json, json};

fn document() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/openapi.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Checks `value` against `schema`; records every (schema, property) path it exercised.
fn check(
    doc: &Json,
    schema: &Json,
    value: &Json,
    at: &str,
    seen: &mut BTreeSet<String>,
    errors: &mut Vec<String>,
) {
    if let Some(reference) = schema.get("$ref").and_then(Json::as_str) {
        let name = reference.rsplit('/').next().unwrap();
        let target = &doc["components"]["schemas"][name];
        assert!(!target.is_null(), "{at}: dangling $ref {reference}");
        return check(doc, target, value, name, seen, errors);
    }
    if let Some(options) = schema.get("oneOf").and_then(Json::as_array) {
        let passing = options
            .iter()
            .filter(|option| {
                let mut trial = Vec::new();
                check(doc, option, value, at, &mut BTreeSet::new(), &mut trial);
                trial.is_empty()
            })
            .count();
        if passing != 1 {
            errors.push(format!(
                "{at}: {value} matches {passing} of the oneOf options"
            ));
        }
        for option in options {
            let mut trial = Vec::new();
            let mut trial_seen = BTreeSet::new();
            check(doc, option, value, at, &mut trial_seen, &mut trial);
            if trial.is_empty() {
                seen.extend(trial_seen);
            }
        }
        return;
    }
    if value.is_null() {
        if schema["nullable"] != json!(true) {
            errors.push(format!("{at}: null where the schema does not allow it"));
        }
        return;
    }
    let ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{at}: schema type {other} not handled"),
        None => true,
    };
    if !ok {
        errors.push(format!("{at}: {value} is not {}", schema["type"]));
        return;
    }
    if let Some(values) = schema.get("enum").and_then(Json::as_array)
        && !values.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {values:?}"));
    }
    if let Some(items) = schema.get("items") {
        for (i, item) in value.as_array().unwrap().iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), seen, errors);
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                errors.push(format!("{at}: required {required} missing in {value}"));
            }
        }
        for (key, field) in object {
            match properties.get(key) {
                Some(property) => {
                    seen.insert(format!("{at}.{key}"));
                    check(doc, property, field, &format!("{at}.{key}"), seen, errors);
                }
                None if schema["additionalProperties"] == json!(false) => {
                    errors.push(format!("{at}: field {key:?} is not in the document"));
                }
                None => {}
            }
        }
    }
}

fn stored() -> StoredArtifact {
    StoredArtifact {
        key: "p/wf/t/0/out.tgz".into(),
        size: 3,
        sha256: "a".repeat(64),
    }
}

fn summary() -> RunSummary {
    RunSummary {
        exit_code: 0,
        reason: ExitReason::OomKilled,
        signal: Some(9),
        started_at: "2026-01-01T00:00:00.000Z".into(),
        finished_at: "2026-01-01T00:00:01.000Z".into(),
        duration_ms: 1000,
        user_cpu_ms: 1,
        sys_cpu_ms: 1,
        max_rss_kb: 1,
        stdout_bytes: 1,
        stderr_bytes: 1,
        error: Some(TaskError {
            kind: ErrorKind::System,
            retryable: true,
            message: "m".into(),
        }),
    }
}

/// Samples with every optional field set, and the schema each must satisfy.
fn samples() -> Vec<(&'static str, Json)> {
    let artifact = ArtifactOutput {
        name: "out".into(),
        stored: stored(),
        archive: ArchiveFormat::Zstd,
    };
    let event = Event {
        namespace: "ns".into(),
        workflow: "wf".into(),
        task_id: "t".into(),
        attempt: 0,
        seq: 1,
        phase: Phase::RetryableFailure,
        timestamp: "2026-01-01T00:00:00.000Z".into(),
        node: "n".into(),
        container: Some("main".into()),
        exit_code: Some(1),
        outputs: Some(EventOutputs {
            parameters: vec![
                EventParameter {
                    name: "a".into(),
                    value: Value::Inline("v".into()),
                },
                EventParameter {
                    name: "b".into(),
                    value: Value::Offloaded(stored()),
                },
            ],
            result: Some(Value::Inline("r".into())),
            result_truncated: true,
            artifacts: vec![artifact.clone()],
        }),
        error: Some(TaskError {
            kind: ErrorKind::User,
            retryable: false,
            message: "m".into(),
        }),
        usage: Some(Usage {
            duration_ms: 1,
            user_cpu_ms: 1,
            sys_cpu_ms: 1,
            max_rss_kb: 1,
        }),
        progress: Some("1/2".into()),
        inputs_digest: Some("d".into()),
    };
    let to = |v: &dyn erased::Ser| v.json();
    vec![
        (
            "EventBatch",
            to(&EventBatch {
                node: "n".into(),
                events: vec![event],
            }),
        ),
        (
            "NodeCommands",
            to(&NodeCommands {
                commands: vec![
                    NodeCommand {
                        workflow: Some("wf".into()),
                        task_id: "t".into(),
                        attempt: 0,
                        command: Command::Terminate,
                    },
                    NodeCommand {
                        workflow: None,
                        task_id: "t".into(),
                        attempt: 1,
                        command: Command::Signal { signal: 10 },
                    },
                ],
            }),
        ),
        (
            "Heartbeat",
            to(&Heartbeat {
                node: "n".into(),
                timestamp: "2026-01-01T00:00:00.000Z".into(),
                active: vec![TaskRef {
                    task_id: "t".into(),
                    attempt: 0,
                }],
                undelivered_bytes: 0,
            }),
        ),
        (
            "StartRequest",
            to(&StartRequest {
                container: "main".into(),
                started_at: "2026-01-01T00:00:00Z".into(),
            }),
        ),
        (
            "ProgressReport",
            to(&ProgressReport {
                container: "main".into(),
                progress: "1/2".into(),
            }),
        ),
        (
            "TaskResult",
            to(&TaskResult {
                container: "main".into(),
                exit_code: 137,
                reason: ExitReason::OomKilled,
                error: Some(TaskError {
                    kind: ErrorKind::User,
                    retryable: true,
                    message: "oom".into(),
                }),
                outputs: Outputs {
                    parameters: vec![ParameterOutput {
                        name: "p".into(),
                        value: "v".into(),
                    }],
                    result: Some("r".into()),
                    result_truncated: true,
                    artifacts: vec![artifact],
                    progress: Some("1/1".into()),
                },
                inputs_digest: Some("d".into()),
                summary: Some(summary()),
            }),
        ),
        ("StoredArtifact", to(&stored())),
        (
            "ArgoLogin",
            to(&protocol::api::ArgoLogin {
                token: "t".into(),
                task: "wf-123".into(),
                attempt: 0,
                workflow: "wf".into(),
                namespace: "ns".into(),
                expires: 1,
            }),
        ),
        ("Command", to(&Command::Signal { signal: 15 })),
        ("Command", to(&Command::Terminate)),
    ]
}

/// Serializing through a trait object keeps `samples` one list of mixed types.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

#[test]
fn the_openapi_document_matches_the_rust_types() {
    let doc = document();
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for (name, sample) in samples() {
        let schema = json!({ "$ref": format!("#/components/schemas/{name}") });
        check(&doc, &schema, &sample, name, &mut seen, &mut errors);
    }
    assert!(
        errors.is_empty(),
        "the types and openapi.yaml disagree:\n{}",
        errors.join("\n")
    );

    // Every declared property is produced by some type (NodeCommand's `signal` through the
    // signal command, and so on): nothing in the document is stale.
    let mut declared = BTreeSet::new();
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        for key in schema["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            declared.insert(format!("{name}.{key}"));
        }
    }
    let missing: Vec<_> = declared.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "declared in openapi.yaml but produced by no type: {missing:?}"
    );

    // Every operation's $refs resolve.
    let text = serde_json::to_string(&doc).unwrap();
    for reference in text
        .split("\"$ref\":\"")
        .skip(1)
        .map(|r| r.split('"').next().unwrap())
    {
        let path: Vec<&str> = reference.trim_start_matches("#/").split('/').collect();
        let mut node = &doc;
        for part in &path {
            node = &node[*part];
        }
        assert!(!node.is_null(), "dangling {reference}");
    }
}

#[test]
fn the_checker_catches_a_disagreement() {
    let doc = document();
    let mut errors = Vec::new();
    let mut bad = serde_json::to_value(stored()).unwrap();
    bad["extra"] = json!(1);
    bad["size"] = json!("three");
    check(
        &doc,
        &json!({"$ref": "#/components/schemas/StoredArtifact"}),
        &bad,
        "StoredArtifact",
        &mut BTreeSet::new(),
        &mut errors,
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
}
