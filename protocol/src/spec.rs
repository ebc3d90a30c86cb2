//! The task spec: the JSON of an Argo Workflows template, as the controller resolved it (what
//! Argo passes as `ARGO_TEMPLATE`).
//!
//! Unknown fields are ignored (Argo templates carry much we do not need: `metadata`,
//! `resources`, `archiveLocation`...); wrong types are rejected with the JSON path of the field,
//! e.g. `outputs.artifacts[1].path: invalid type: integer 3, expected a string`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::api::ArchiveFormat;

/// One template: what to run, what it takes and what it gives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<Script>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_set: Option<ContainerSet>,
    #[serde(default)]
    pub inputs: Inputs,
    #[serde(default)]
    pub outputs: OutputsSpec,
    /// Seconds; Argo allows an int or a numeric string.
    #[serde(
        default,
        deserialize_with = "int_or_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub active_deadline_seconds: Option<u64>,
    /// Argo's artifact repository for this template; the emissary reads only `archiveLogs`
    /// (the agent holds the repository's address and credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_location: Option<ArchiveLocation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveLocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_logs: Option<bool>,
}

impl Template {
    /// Whether the main containers' logs are kept as artifacts (Argo's `archiveLogs`).
    pub fn archive_logs(&self) -> bool {
        self.archive_location
            .as_ref()
            .and_then(|a| a.archive_logs)
            .unwrap_or(false)
    }

    /// Where the volumes of `container` are mounted (a containerSet's are shared by all).
    pub fn volume_mounts(&self) -> impl Iterator<Item = &str> {
        let own = self
            .container
            .iter()
            .chain(self.script.as_ref().map(|s| &s.container))
            .flat_map(|c| &c.volume_mounts);
        let set = self.container_set.iter().flat_map(|s| &s.volume_mounts);
        own.chain(set).map(|m| m.mount_path.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub mount_path: String,
}

/// A container: the command to run and its environment (the image is the pod's business).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// `script`: a container whose `source` is written to a file and passed as the last argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Script {
    #[serde(flatten)]
    pub container: Container,
    #[serde(default)]
    pub source: String,
}

/// An environment variable. `valueFrom` (secrets, field refs) is resolved by the kubelet, not by
/// us, so only literal values are applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    #[serde(
        default,
        deserialize_with = "any_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<String>,
}

/// `containerSet`: several containers in one pod, ordered by `dependencies`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSet {
    #[serde(default)]
    pub containers: Vec<ContainerNode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_strategy: Option<ContainerSetRetry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// A container of a containerSet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerNode {
    #[serde(flatten)]
    pub container: Container,
    #[serde(default)]
    pub dependencies: Vec<String>,
}

/// `containerSet.retryStrategy`: `retries` is the total number of attempts (Argo's semantics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSetRetry {
    #[serde(default, deserialize_with = "int_or_string")]
    pub retries: Option<u64>,
    #[serde(default)]
    pub duration: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    #[serde(default)]
    pub parameters: Vec<Parameter>,
    #[serde(default)]
    pub artifacts: Vec<InputArtifact>,
}

/// An input parameter: `value` (set by the caller) wins over `default`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    pub name: String,
    #[serde(
        default,
        deserialize_with = "any_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<String>,
    #[serde(
        default,
        deserialize_with = "any_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputArtifact {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// File mode to apply (decimal in JSON, as Kubernetes writes it: 420 = 0o644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawArtifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<Archive>,
    /// The store key to fetch (ours), e.g. `wf/task/0/out.tgz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Argo's S3 location; only its `key` is used (the agent holds the store's address and
    /// credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Location>,
    /// The SHA-256 (hex) the producer reported for the object: staging verifies the bytes
    /// against it, so an object rewritten after its producer's result is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl InputArtifact {
    /// The store key, from `key` or Argo's `s3.key`.
    pub fn store_key(&self) -> Option<&str> {
        self.key
            .as_deref()
            .or_else(|| self.s3.as_ref().and_then(|s| s.key.as_deref()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawArtifact {
    pub data: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct S3Location {
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputsSpec {
    #[serde(default)]
    pub parameters: Vec<OutputParameter>,
    #[serde(default)]
    pub artifacts: Vec<OutputArtifact>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputParameter {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ValueFrom>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(
        default,
        deserialize_with = "any_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputArtifact {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub optional: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<Archive>,
}

/// `archive: {none: {}} | {tar: {compressionLevel: N}} | {zstd: {level: N}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub none: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar: Option<TarArchive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<ZstdArchive>,
    /// Argo's zip: recognised so it can be refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zip: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TarArchive {
    /// gzip level 0-9; Argo's default (unset) is gzip's default, 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ZstdArchive {
    /// zstd level 1-19; default 1 (fast, and still smaller than gzip -6). The emissary ships
    /// zstd's fast strategies only (size budget), so levels above 4 compress like level 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
}

/// How to pack an output: the format and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    pub format: ArchiveFormat,
    pub level: i32,
}

/// gzip level when `tar.compressionLevel` is unset (gzip's default, as Argo).
pub const DEFAULT_GZIP_LEVEL: i32 = 6;
/// zstd level when `zstd.level` is unset.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

impl Archive {
    /// The packing this archive spec asks for; `None` spec means Argo's default, tar+gzip.
    pub fn packing(spec: Option<&Archive>) -> Result<Packing, String> {
        let Some(spec) = spec else {
            return Ok(Packing {
                format: ArchiveFormat::Tar,
                level: DEFAULT_GZIP_LEVEL,
            });
        };
        let chosen = [
            spec.none.is_some(),
            spec.tar.is_some(),
            spec.zstd.is_some(),
            spec.zip.is_some(),
        ];
        if chosen.iter().filter(|&&c| c).count() > 1 {
            return Err("set only one of none, tar, zstd".into());
        }
        if spec.zip.is_some() {
            return Err("zip archives are not supported; use tar or zstd".into());
        }
        if spec.none.is_some() {
            return Ok(Packing {
                format: ArchiveFormat::None,
                level: 0,
            });
        }
        if let Some(zstd) = &spec.zstd {
            let level = zstd.level.unwrap_or(DEFAULT_ZSTD_LEVEL);
            if !(1..=19).contains(&level) {
                return Err(format!("zstd.level {level} is outside 1..=19"));
            }
            return Ok(Packing {
                format: ArchiveFormat::Zstd,
                level,
            });
        }
        let level = spec
            .tar
            .as_ref()
            .and_then(|t| t.compression_level)
            .unwrap_or(DEFAULT_GZIP_LEVEL);
        if !(0..=9).contains(&level) {
            return Err(format!("tar.compressionLevel {level} is outside 0..=9"));
        }
        Ok(Packing {
            format: ArchiveFormat::Tar,
            level,
        })
    }
}

/// A spec that could not be used, with the JSON path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for SpecError {}

fn err(path: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        path: path.into(),
        message: message.into(),
    }
}

/// Parses and validates a template from JSON.
pub fn parse(json: &str) -> Result<Template, SpecError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| err("", format!("not valid JSON: {e}")))?;
    from_value(value)
}

/// Typed view of an already-parsed (and substituted) template.
pub fn from_value(value: serde_json::Value) -> Result<Template, SpecError> {
    let template: Template = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        err(path, e.into_inner().to_string())
    })?;
    template.validate()?;
    Ok(template)
}

impl Template {
    /// Checks what types alone cannot: one kind of body, absolute paths, unique names.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bodies = [
            self.container.is_some(),
            self.script.is_some(),
            self.container_set.is_some(),
        ];
        match bodies.iter().filter(|&&b| b).count() {
            1 => {}
            0 => {
                return Err(err(
                    "",
                    "the template has no container, script or containerSet",
                ));
            }
            _ => {
                return Err(err(
                    "",
                    "set only one of container, script and containerSet",
                ));
            }
        }
        if let Some(duration) = self
            .container_set
            .as_ref()
            .and_then(|s| s.retry_strategy.as_ref()?.duration.as_ref())
            && let Err(e) = crate::duration::parse(duration)
        {
            return Err(err("containerSet.retryStrategy.duration", e.to_string()));
        }
        if let Some(set) = &self.container_set {
            let names: Vec<&str> = set
                .containers
                .iter()
                .map(|c| c.container.name.as_str())
                .collect();
            for (i, node) in set.containers.iter().enumerate() {
                let at = format!("containerSet.containers[{i}]");
                if !crate::api::valid_name(&node.container.name) {
                    return Err(err(
                        format!("{at}.name"),
                        "must be a name of [A-Za-z0-9._-]",
                    ));
                }
                if names[..i].contains(&node.container.name.as_str()) {
                    return Err(err(
                        format!("{at}.name"),
                        format!("duplicate container {:?}", node.container.name),
                    ));
                }
                for (j, dep) in node.dependencies.iter().enumerate() {
                    if !names.contains(&dep.as_str()) || dep == &node.container.name {
                        return Err(err(
                            format!("{at}.dependencies[{j}]"),
                            format!("no other container is named {dep:?}"),
                        ));
                    }
                }
            }
            if let Some((i, cycle)) = dependency_cycle(set) {
                return Err(err(
                    format!("containerSet.containers[{i}].dependencies"),
                    format!("a cycle, no container could start: {}", cycle.join(" → ")),
                ));
            }
        }
        for (i, a) in self.inputs.artifacts.iter().enumerate() {
            check_name(&a.name, &format!("inputs.artifacts[{i}].name"))?;
            match &a.path {
                Some(p) => check_absolute(p, &format!("inputs.artifacts[{i}].path"))?,
                None => return Err(err(format!("inputs.artifacts[{i}].path"), "missing")),
            }
            if let Some(mode) = a.mode
                && mode > 0o7777
            {
                return Err(err(
                    format!("inputs.artifacts[{i}].mode"),
                    format!("{mode} is not a file mode"),
                ));
            }
            if let Some(archive) = &a.archive {
                Archive::packing(Some(archive))
                    .map_err(|m| err(format!("inputs.artifacts[{i}].archive"), m))?;
            }
            if let Some(sha256) = &a.sha256
                && !(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(err(
                    format!("inputs.artifacts[{i}].sha256"),
                    format!("{sha256:?} is not a SHA-256 (64 hex digits)"),
                ));
            }
        }
        for (i, p) in self.outputs.parameters.iter().enumerate() {
            check_name(&p.name, &format!("outputs.parameters[{i}].name"))?;
            if let Some(path) = p.value_from.as_ref().and_then(|v| v.path.as_deref()) {
                check_absolute(path, &format!("outputs.parameters[{i}].valueFrom.path"))?;
            }
        }
        for (i, a) in self.outputs.artifacts.iter().enumerate() {
            check_name(&a.name, &format!("outputs.artifacts[{i}].name"))?;
            match &a.path {
                Some(p) => check_absolute(p, &format!("outputs.artifacts[{i}].path"))?,
                None => return Err(err(format!("outputs.artifacts[{i}].path"), "missing")),
            }
            Archive::packing(a.archive.as_ref())
                .map_err(|m| err(format!("outputs.artifacts[{i}].archive"), m))?;
        }
        Ok(())
    }

    /// The input parameters' effective values (`value`, else `default`).
    pub fn parameter_values(&self) -> BTreeMap<String, String> {
        self.inputs
            .parameters
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    p.value.clone().or_else(|| p.default.clone())?,
                ))
            })
            .collect()
    }
}

/// The first dependency cycle of a containerSet whose names are known to be unique and whose
/// dependencies name other containers: the index where it was found and the names around it.
fn dependency_cycle(set: &ContainerSet) -> Option<(usize, Vec<String>)> {
    let index = |name: &str| set.containers.iter().position(|c| c.container.name == name);
    // 0: not visited, 1: on the current path, 2: done (no cycle through it).
    let mut state = vec![0u8; set.containers.len()];
    fn visit(
        at: usize,
        set: &ContainerSet,
        index: &dyn Fn(&str) -> Option<usize>,
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[at] = 1;
        path.push(at);
        for dep in &set.containers[at].dependencies {
            let next = index(dep)?;
            if state[next] == 1 {
                let start = path.iter().position(|&p| p == next).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(next);
                return Some(cycle);
            }
            if state[next] == 0
                && let Some(cycle) = visit(next, set, index, state, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        state[at] = 2;
        None
    }
    (0..set.containers.len()).find_map(|start| {
        if state[start] != 0 {
            return None;
        }
        let cycle = visit(start, set, &index, &mut state, &mut Vec::new())?;
        let names = cycle
            .iter()
            .map(|&i| set.containers[i].container.name.clone())
            .collect();
        Some((cycle[0], names))
    })
}

fn check_name(name: &str, path: &str) -> Result<(), SpecError> {
    if crate::api::valid_name(name) {
        Ok(())
    } else {
        Err(err(
            path,
            format!("{name:?} is not a name of [A-Za-z0-9._-]"),
        ))
    }
}

fn check_absolute(p: &str, path: &str) -> Result<(), SpecError> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(err(path, format!("{p:?} must be an absolute path")))
    }
}

/// The declared input parameters' values (`value`, else `default`) of a raw template, read
/// before substitution (when typed fields may still hold `{{...}}`). Malformed entries are
/// skipped here; the typed parse reports them.
pub fn declared_parameters(template: &serde_json::Value) -> BTreeMap<String, String> {
    let as_text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let Some(list) = template
        .pointer("/inputs/parameters")
        .and_then(|p| p.as_array())
    else {
        return BTreeMap::new();
    };
    list.iter()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?.to_owned();
            let value = p
                .get("value")
                .and_then(as_text)
                .or_else(|| p.get("default").and_then(as_text))?;
            Some((name, value))
        })
        .collect()
}

/// Replaces `{{inputs.parameters.NAME}}` in every string of `value` with `params[NAME]`.
/// Other `{{...}}` expressions are left as they are (the controller resolves those); a
/// parameter reference with no value is an error naming it.
pub fn substitute(
    value: &mut serde_json::Value,
    params: &BTreeMap<String, String>,
) -> Result<(), SpecError> {
    substitute_at(value, params, &mut String::new())
}

fn substitute_at(
    value: &mut serde_json::Value,
    params: &BTreeMap<String, String>,
    path: &mut String,
) -> Result<(), SpecError> {
    match value {
        serde_json::Value::String(s) if s.contains("{{") => {
            *s = substitute_str(s, params).map_err(|name| {
                err(
                    path.trim_start_matches('.').to_owned(),
                    format!("unresolved {{{{inputs.parameters.{name}}}}} (pass -p {name}=VALUE)"),
                )
            })?;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute_at(item, params, path)?;
                path.truncate(len);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                // The parameter declarations are the source of values, not a place for them.
                if path == ".inputs" && key == "parameters" {
                    continue;
                }
                let len = path.len();
                path.push('.');
                path.push_str(key);
                substitute_at(item, params, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Substitutes in one string; `Err(name)` for the first reference without a value.
fn substitute_str(s: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
    const OPEN: &str = "{{";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let expr = after[..end].trim();
        match expr.strip_prefix("inputs.parameters.") {
            Some(name) => out.push_str(params.get(name).ok_or_else(|| name.to_owned())?),
            None => out.push_str(&rest[start..start + OPEN.len() + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Accepts a string, number or bool as a string (Argo's AnyString: YAML `value: 3`).
fn any_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        S(String),
        N(serde_json::Number),
        B(bool),
    }
    Ok(
        match Option::<Any>::deserialize(d).map_err(|_| {
            serde::de::Error::custom("invalid type: expected a string, number or boolean")
        })? {
            None => None,
            Some(Any::S(s)) => Some(s),
            Some(Any::N(n)) => Some(n.to_string()),
            Some(Any::B(b)) => Some(b.to_string()),
        },
    )
}

/// Accepts `30` or `"30"` (Kubernetes IntOrString).
fn int_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        I(u64),
        S(String),
    }
    match Option::<IntOrString>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("invalid type: expected a non-negative integer"))?
    {
        None => Ok(None),
        Some(IntOrString::I(n)) => Ok(Some(n)),
        Some(IntOrString::S(s)) => s.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("expected a non-negative integer, got {s:?}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = r#"{
        "name": "gen", "metadata": {}, "unknownField": [1, 2],
        "inputs": {"parameters": [{"name": "msg", "value": "hi"}, {"name": "n", "default": 3}],
                   "artifacts": [{"name": "data", "path": "/tmp/in.txt", "mode": 420,
                                  "s3": {"bucket": "b", "key": "wf/a/0/data.tgz"}}]},
        "outputs": {"parameters": [{"name": "out", "valueFrom": {"path": "/tmp/out", "default": "none"}}],
                    "artifacts": [{"name": "res", "path": "/tmp/res", "optional": true,
                                   "archive": {"tar": {"compressionLevel": 1}}}]},
        "script": {"image": "python:3", "command": ["python"], "source": "print('{{inputs.parameters.msg}}')"},
        "activeDeadlineSeconds": "300"
    }"#;

    #[test]
    fn parses_an_argo_script_template() {
        let t = parse(SCRIPT).unwrap();
        assert_eq!(t.name, "gen");
        assert_eq!(t.script.as_ref().unwrap().container.command, ["python"]);
        assert_eq!(t.active_deadline_seconds, Some(300));
        assert_eq!(t.inputs.artifacts[0].store_key(), Some("wf/a/0/data.tgz"));
        assert_eq!(t.inputs.artifacts[0].mode, Some(0o644));
        assert_eq!(t.parameter_values().get("n").map(String::as_str), Some("3"));
        let packing = Archive::packing(t.outputs.artifacts[0].archive.as_ref()).unwrap();
        assert_eq!(
            packing,
            Packing {
                format: ArchiveFormat::Tar,
                level: 1
            }
        );
    }

    #[test]
    fn wrong_types_name_the_json_path() {
        let bad = SCRIPT.replace(r#""path": "/tmp/res""#, r#""path": 3"#);
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.path, "outputs.artifacts[0].path", "{e}");
        let bad = SCRIPT.replace(r#""optional": true"#, r#""optional": "yes""#);
        assert_eq!(
            parse(&bad).unwrap_err().path,
            "outputs.artifacts[0].optional"
        );
        let bad = SCRIPT.replace(
            r#""activeDeadlineSeconds": "300""#,
            r#""activeDeadlineSeconds": "soon""#,
        );
        assert_eq!(parse(&bad).unwrap_err().path, "activeDeadlineSeconds");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SCRIPT.replace(r#""path": "/tmp/res""#, r#""path": "res""#);
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "outputs.artifacts[0].path: \"res\" must be an absolute path"
        );
        let bad = SCRIPT.replace(r#""compressionLevel": 1"#, r#""compressionLevel": 12"#);
        assert_eq!(
            parse(&bad).unwrap_err().path,
            "outputs.artifacts[0].archive"
        );
        let bad = SCRIPT.replace(r#""name": "res""#, r#""name": "a/b""#);
        assert_eq!(parse(&bad).unwrap_err().path, "outputs.artifacts[0].name");
        let bad = SCRIPT.replace(r#""mode": 420"#, r#""mode": 420, "sha256": "abc""#);
        assert_eq!(parse(&bad).unwrap_err().path, "inputs.artifacts[0].sha256");
        assert!(
            parse(r#"{"name": "x"}"#)
                .unwrap_err()
                .to_string()
                .contains("no container")
        );
        assert!(
            parse("{nope")
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
    }

    #[test]
    fn substitutes_parameters_and_names_unresolved_ones() {
        let mut v: serde_json::Value = serde_json::from_str(SCRIPT).unwrap();
        let mut params = BTreeMap::new();
        params.insert("msg".to_owned(), "hello".to_owned());
        substitute(&mut v, &params).unwrap();
        assert_eq!(v["script"]["source"], "print('hello')");

        let mut v: serde_json::Value = serde_json::json!({"container": {"args": ["{{inputs.parameters.who}} {{workflow.name}}"]}});
        let e = substitute(&mut v, &params).unwrap_err();
        assert_eq!(e.path, "container.args[0]");
        assert!(e.message.contains("-p who=VALUE"), "{e}");
        params.insert("who".to_owned(), "me".to_owned());
        substitute(&mut v, &params).unwrap();
        assert_eq!(v["container"]["args"][0], "me {{workflow.name}}");
    }

    #[test]
    fn container_set_dependencies_must_exist() {
        let set = r#"{"containerSet": {"containers": [
            {"name": "a", "command": ["true"]},
            {"name": "main", "command": ["true"], "dependencies": ["b"]}]}}"#;
        assert_eq!(
            parse(set).unwrap_err().path,
            "containerSet.containers[1].dependencies[0]"
        );
    }

    #[test]
    fn container_set_dependency_cycles_are_refused() {
        let set = r#"{"containerSet": {"containers": [
            {"name": "prep", "command": ["true"]},
            {"name": "a", "command": ["true"], "dependencies": ["prep", "c"]},
            {"name": "b", "command": ["true"], "dependencies": ["a"]},
            {"name": "c", "command": ["true"], "dependencies": ["b"]},
            {"name": "main", "command": ["true"], "dependencies": ["prep", "c"]}]}}"#;
        let e = parse(set).unwrap_err();
        assert_eq!(e.path, "containerSet.containers[1].dependencies");
        assert!(e.message.contains("a → c → b → a"), "{}", e.message);
        let diamond = r#"{"containerSet": {"containers": [
            {"name": "a", "command": ["true"]},
            {"name": "b", "command": ["true"], "dependencies": ["a"]},
            {"name": "c", "command": ["true"], "dependencies": ["a"]},
            {"name": "main", "command": ["true"], "dependencies": ["b", "c"]}]}}"#;
        assert!(parse(diamond).is_ok());
    }
}
