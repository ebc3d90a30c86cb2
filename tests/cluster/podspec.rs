//! What a kubelet derives from a pod spec before it starts anything: the volumes' contents,
//! each container's environment, command, user and capabilities. Kubernetes' own rules, as
//! far as the tests' pods and Argo's use them; anything else is refused by name.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::cluster::images::Image;
use crate::cluster::runtime::{self, ContainerSpec};

/// Why a container cannot start yet: a status reason (`CreateContainerConfigError`,
/// `ErrImagePull`...) and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: &'static str,
    pub message: String,
}

impl Waiting {
    pub fn config(message: impl Into<String>) -> Waiting {
        Waiting {
            reason: "CreateContainerConfigError",
            message: message.into(),
        }
    }
}

/// The pod's identity, as the downward API and `fieldRef` see it.
pub struct PodFields<'a> {
    pub pod: &'a Pod,
    pub node: &'a str,
    pub host_ip: &'a str,
}

impl PodFields<'_> {
    /// The value of a `fieldRef.fieldPath`.
    pub fn field(&self, path: &str) -> Result<String, String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let map_entry = |map: &Option<BTreeMap<String, String>>, key: &str| {
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default()
        };
        let quoted_key = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix("']"))
                .map(str::to_owned)
        };
        Ok(match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "metadata.labels" => format_map(&meta.labels),
            "metadata.annotations" => format_map(&meta.annotations),
            "spec.nodeName" => self.node.to_owned(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.hostIP" | "status.hostIPs" | "status.podIP" | "status.podIPs" => {
                self.host_ip.to_owned()
            }
            _ => {
                if let Some(key) = quoted_key("metadata.labels['") {
                    map_entry(&meta.labels, &key)
                } else if let Some(key) = quoted_key("metadata.annotations['") {
                    map_entry(&meta.annotations, &key)
                } else {
                    return Err(format!("unsupported fieldPath {path:?}"));
                }
            }
        })
    }
}

/// The downward API's rendering of labels and annotations: `key="value"` lines, sorted.
fn format_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect()
}

/// Kubernetes' `$(VAR)` expansion: a defined name is replaced, an undefined one stays as
/// written, and `$$` is a literal `$`.
pub fn expand(text: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A resource quantity in bytes (`64Mi`, `1G`, `500000`, `1e6`).
pub fn quantity_bytes(quantity: &str) -> Option<u64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "m" => 1e-3,
        s if s.starts_with('e') || s.starts_with('E') => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some((number * factor).ceil() as u64)
}

/// The container's environment, in Kubernetes' order: each entry may refer to the ones
/// before it with `$(NAME)`. Secrets and config maps are read with the kubelet's identity.
pub async fn resolve_env(
    client: &kube::Client,
    fields: &PodFields<'_>,
    container: &Container,
) -> Result<Vec<(String, String)>, Waiting> {
    let ns = fields
        .pod
        .metadata
        .namespace
        .as_deref()
        .unwrap_or("default");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        vars.insert(name.clone(), value.clone());
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            config_map(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &from.secret_ref {
            secret(client, ns, &r.name, r.optional.unwrap_or(false)).await?
        } else {
            continue;
        };
        for (k, v) in data.unwrap_or_default() {
            set(
                &mut env,
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => Some(expand(var.value.as_deref().unwrap_or(""), &vars_of(&env))),
            Some(source) => {
                if let Some(field) = &source.field_ref {
                    Some(fields.field(&field.field_path).map_err(Waiting::config)?)
                } else if let Some(r) = &source.secret_key_ref {
                    key_of(
                        secret(client, ns, &r.name, r.optional.unwrap_or(false)).await?,
                        &r.key,
                        r.optional.unwrap_or(false),
                        &format!("secret {ns}/{}", r.name),
                    )?
                } else if let Some(r) = &source.config_map_key_ref {
                    key_of(
                        config_map(client, ns, &r.name, r.optional.unwrap_or(false)).await?,
                        &r.key,
                        r.optional.unwrap_or(false),
                        &format!("configmap {ns}/{}", r.name),
                    )?
                } else if let Some(r) = &source.resource_field_ref {
                    Some(resource_field(container, &r.resource).map_err(Waiting::config)?)
                } else {
                    return Err(Waiting::config(format!(
                        "env {:?}: unsupported valueFrom",
                        var.name
                    )));
                }
            }
        };
        if let Some(value) = value {
            set(&mut env, var.name.clone(), value);
        }
    }
    Ok(env)
}

fn vars_of(env: &[(String, String)]) -> HashMap<String, String> {
    env.iter().cloned().collect()
}

fn key_of(
    data: Option<BTreeMap<String, Vec<u8>>>,
    key: &str,
    optional: bool,
    what: &str,
) -> Result<Option<String>, Waiting> {
    match data.and_then(|mut d| d.remove(key)) {
        Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        None if optional => Ok(None),
        None => Err(Waiting::config(format!(
            "couldn't find key {key} in {what}"
        ))),
    }
}

fn resource_field(container: &Container, resource: &str) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let resources = container.resources.as_ref();
    let map = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    Ok(match map.and_then(|m| m.get(name)) {
        Some(q) if name == "memory" || name == "ephemeral-storage" => {
            quantity_bytes(&q.0).unwrap_or(0).to_string()
        }
        Some(q) => q.0.clone(),
        None if name == "cpu" => "2".into(),
        None => "0".into(),
    })
}

/// A config map's keys (`data` and `binaryData`), `None` when it is missing and optional.
async fn config_map(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, Waiting> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(cm)) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(Waiting::config(format!("configmap \"{name}\" not found"))),
        Err(e) => Err(Waiting::config(format!("configmap {ns}/{name}: {e}"))),
    }
}

async fn secret(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, Waiting> {
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(secret)) => {
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            data.extend(
                secret
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(Waiting::config(format!("secret \"{name}\" not found"))),
        Err(e) => Err(Waiting::config(format!("secret {ns}/{name}: {e}"))),
    }
}

/// Writes `files` (relative path → bytes) under `dir` with `mode`.
fn write_files(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> Result<(), String> {
    for (path, bytes, mode) in files {
        if path.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(format!("invalid volume file path {path:?}"));
        }
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        fs::write(&file, bytes).map_err(|e| format!("{}: {e}", file.display()))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(*mode))
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(())
}

/// The files of a config map or secret volume source: every key, or the listed `items`.
fn key_files(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    mode: u32,
    what: &str,
) -> Result<Vec<(String, Vec<u8>, u32)>, Waiting> {
    match items {
        None => Ok(data.into_iter().map(|(k, v)| (k, v, mode)).collect()),
        Some(items) => items
            .iter()
            .map(|item| {
                let bytes = data.get(&item.key).cloned().ok_or_else(|| {
                    Waiting::config(format!("configured key {} not found in {what}", item.key))
                })?;
                Ok((
                    item.path.clone(),
                    bytes,
                    item.mode.map_or(mode, |m| m as u32),
                ))
            })
            .collect(),
    }
}

/// Makes every volume of the pod under `dir/NAME`; returns NAME → host path. A missing
/// config map or secret is a [`Waiting`] the caller retries; an unsupported volume type too,
/// with a message that names it.
pub async fn prepare_volumes(
    client: &kube::Client,
    fields: &PodFields<'_>,
    dir: &Path,
) -> Result<HashMap<String, PathBuf>, Waiting> {
    let pod = fields.pod;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut paths = HashMap::new();
    let mount_error = |e: String| Waiting {
        reason: "ContainerCreating",
        message: e,
    };
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let path = dir.join(&volume.name);
        let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        if let Some(host) = &volume.host_path {
            let host_path = PathBuf::from(&host.path);
            if host.type_.as_deref() == Some("DirectoryOrCreate") {
                fs::create_dir_all(&host_path).map_err(|e| mount_error(e.to_string()))?;
            }
            paths.insert(volume.name.clone(), host_path);
            continue;
        }
        fs::create_dir_all(&path).map_err(|e| mount_error(format!("{}: {e}", path.display())))?;
        if volume.empty_dir.is_some() {
            // Kubernetes makes an emptyDir world-writable, so any uid can use it.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o777))
                .map_err(|e| mount_error(e.to_string()))?;
        } else if let Some(source) = &volume.config_map {
            let mode = source.default_mode.unwrap_or(0o644) as u32;
            if let Some(data) =
                config_map(client, ns, &source.name, source.optional.unwrap_or(false)).await?
            {
                files = key_files(
                    data,
                    &source.items,
                    mode,
                    &format!("configmap {}", source.name),
                )?;
            }
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            let mode = source.default_mode.unwrap_or(0o644) as u32;
            if let Some(data) = secret(client, ns, &name, source.optional.unwrap_or(false)).await? {
                files = key_files(data, &source.items, mode, &format!("secret {name}"))?;
            }
        } else if let Some(source) = &volume.downward_api {
            let mode = source.default_mode.unwrap_or(0o644) as u32;
            for item in source.items.iter().flatten() {
                files.push(downward_file(fields, item, mode).map_err(Waiting::config)?);
            }
        } else if let Some(projected) = &volume.projected {
            let mode = projected.default_mode.unwrap_or(0o644) as u32;
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let value = service_account_token(
                        client,
                        pod,
                        token.audience.clone(),
                        token.expiration_seconds.unwrap_or(3607),
                    )
                    .await?;
                    files.push((token.path.clone(), value.into_bytes(), mode));
                } else if let Some(cm) = &source.config_map {
                    if let Some(data) =
                        config_map(client, ns, &cm.name, cm.optional.unwrap_or(false)).await?
                    {
                        files.extend(key_files(
                            data,
                            &cm.items,
                            mode,
                            &format!("configmap {}", cm.name),
                        )?);
                    }
                } else if let Some(s) = &source.secret {
                    if let Some(data) =
                        secret(client, ns, &s.name, s.optional.unwrap_or(false)).await?
                    {
                        files.extend(key_files(
                            data,
                            &s.items,
                            mode,
                            &format!("secret {}", s.name),
                        )?);
                    }
                } else if let Some(downward) = &source.downward_api {
                    for item in downward.items.iter().flatten() {
                        files.push(downward_file(fields, item, mode).map_err(Waiting::config)?);
                    }
                } else {
                    return Err(mount_error(format!(
                        "volume {:?}: a projected source the test kubelet does not support",
                        volume.name
                    )));
                }
            }
        } else {
            return Err(mount_error(format!(
                "volume {:?}: its type is not supported by the test kubelet (emptyDir, configMap, \
                 secret, projected, downwardAPI and hostPath are)",
                volume.name
            )));
        }
        write_files(&path, &files).map_err(mount_error)?;
        paths.insert(volume.name.clone(), path);
    }
    Ok(paths)
}

fn downward_file(
    fields: &PodFields<'_>,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    mode: u32,
) -> Result<(String, Vec<u8>, u32), String> {
    let field = item
        .field_ref
        .as_ref()
        .ok_or_else(|| format!("downwardAPI {:?}: only fieldRef is supported", item.path))?;
    Ok((
        item.path.clone(),
        fields.field(&field.field_path)?.into_bytes(),
        item.mode.map_or(mode, |m| m as u32),
    ))
}

/// A token of the pod's ServiceAccount, bound to the pod, as the kubelet requests it.
async fn service_account_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<String>,
    expiration_seconds: i64,
) -> Result<String, Waiting> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let answer = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| Waiting {
            reason: "ContainerCreating",
            message: format!("requesting a token for serviceaccount {ns}/{account}: {e}"),
        })?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| Waiting::config("TokenRequest answered without a token"))
}

/// The command a container runs: Kubernetes' rules for `command`/`args` over the image's
/// ENTRYPOINT/CMD, with `$(VAR)` expanded from the container's environment.
pub fn argv(container: &Container, image: &Image, env: &[(String, String)]) -> Vec<String> {
    let vars = vars_of(env);
    let command = container.command.clone().filter(|c| !c.is_empty());
    let args = container.args.clone();
    let words = match (command, args) {
        (Some(command), args) => [command, args.unwrap_or_default()].concat(),
        (None, Some(args)) => [image.config.entrypoint.clone(), args].concat(),
        (None, None) => [image.config.entrypoint.clone(), image.config.cmd.clone()].concat(),
    };
    words.iter().map(|w| expand(w, &vars)).collect()
}

/// Who a container runs as and what it may do.
pub struct Security {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub capabilities: Vec<u32>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
}

/// The user, groups, capabilities and filesystem options of a container, from its and its
/// pod's securityContext over the image's USER.
pub fn security(pod: &Pod, container: &Container, image: &Image) -> Result<Security, Waiting> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let uid = run_as_user.map_or(image.config.uid, |u| u as u32);
    let gid = match (run_as_group, run_as_user) {
        (Some(g), _) => g as u32,
        (None, None) => image.config.gid,
        (None, Some(u)) => primary_group(image, u as u32).unwrap_or(0),
    };
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(Waiting::config(format!(
            "container has runAsNonRoot and image will run as root (pod: {:?}, container: {})",
            pod.metadata.name.as_deref().unwrap_or(""),
            container.name
        )));
    }
    let mut groups = vec![gid];
    if let Some(pod_sc) = pod_sc {
        groups.extend(pod_sc.fs_group.map(|g| g as u32));
        groups.extend(
            pod_sc
                .supplemental_groups
                .iter()
                .flatten()
                .map(|g| *g as u32),
        );
    }
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let mut capabilities: Vec<u32> = if privileged {
        (0..=40).collect()
    } else {
        runtime::DEFAULT_CAPABILITIES
            .iter()
            .filter_map(|n| runtime::capability(n))
            .collect()
    };
    if let Some(caps) = sc.and_then(|s| s.capabilities.as_ref()) {
        for name in caps.drop.iter().flatten() {
            if name.eq_ignore_ascii_case("ALL") {
                capabilities.clear();
            } else if let Some(cap) = runtime::capability(name) {
                capabilities.retain(|c| *c != cap);
            }
        }
        for name in caps.add.iter().flatten() {
            if name.eq_ignore_ascii_case("ALL") {
                capabilities = (0..=40).collect();
            } else if let Some(cap) = runtime::capability(name) {
                capabilities.push(cap);
            } else {
                return Err(Waiting::config(format!("unknown capability {name:?}")));
            }
        }
    }
    let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let read_only_root = sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    Ok(Security {
        uid,
        gid,
        groups,
        capabilities,
        no_new_privs,
        read_only_root,
    })
}

/// The primary group of `uid` in the image's `/etc/passwd`.
fn primary_group(image: &Image, uid: u32) -> Option<u32> {
    let passwd = image
        .binds
        .iter()
        .find(|(_, target)| target == "/etc")
        .map(|(host, _)| host.join("passwd"))
        .unwrap_or_else(|| image.lower.join("etc/passwd"));
    fs::read_to_string(passwd).ok()?.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid))
            .then(|| f[3].parse().ok())
            .flatten()
    })
}

/// Assembles the shim's spec for one start of `container`.
#[allow(clippy::too_many_arguments)]
pub fn container_spec(
    pod: &Pod,
    container: &Container,
    image: &Image,
    env: Vec<(String, String)>,
    volumes: &HashMap<String, PathBuf>,
    layer: PathBuf,
    termination_log: PathBuf,
    cgroups: Vec<PathBuf>,
    report: PathBuf,
) -> Result<ContainerSpec, Waiting> {
    let Security {
        uid,
        gid,
        groups,
        capabilities,
        no_new_privs,
        read_only_root,
    } = security(pod, container, image)?;
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let Some(source) = volumes.get(&m.name) else {
            return Err(Waiting::config(format!(
                "volumeMount {:?}: no volume of that name in the pod",
                m.name
            )));
        };
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if sub.split('/').any(|s| s == "..") => {
                return Err(Waiting::config(format!(
                    "subPath {sub:?} leaves its volume"
                )));
            }
            Some(sub) => {
                let path = source.join(sub);
                if !path.exists() {
                    // As kubelet does for a subPath of a writable volume.
                    fs::create_dir_all(&path).map_err(|e| Waiting::config(e.to_string()))?;
                    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o777));
                }
                path
            }
            None => source.clone(),
        };
        mounts.push(runtime::Mount {
            source,
            target: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    // Parents before children, as kubelet orders them.
    mounts.sort_by_key(|m| m.target.matches('/').count());
    let argv = argv(container, image, &env);
    let mut merged: Vec<(String, String)> = image.config.env.clone();
    for (name, value) in env {
        merged.retain(|(n, _)| *n != name);
        merged.push((name, value));
    }
    let target = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    Ok(ContainerSpec {
        lower: image.lower.clone(),
        layer,
        image_binds: image.binds.clone(),
        mounts,
        termination_log: Some((termination_log, target)),
        cgroups,
        uid,
        gid,
        groups,
        capabilities,
        no_new_privs,
        read_only_root,
        cwd: container
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| image.config.workdir.clone()),
        argv,
        env: merged
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        hostname: hostname(pod),
        report,
    })
}

/// The pod's host name: `spec.hostname`, else its name cut to 63 bytes, as kubelet does.
fn hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    let cut = &name[..name.len().min(63)];
    cut.trim_end_matches(['-', '.']).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let vars: HashMap<String, String> = [("A".into(), "1".into()), ("B".into(), "x".into())]
            .into_iter()
            .collect();
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x");
        assert_eq!(expand("$(C) stays", &vars), "$(C) stays");
        assert_eq!(expand("$$(A) is escaped", &vars), "$(A) is escaped");
        assert_eq!(expand("cost: $5 $(A", &vars), "cost: $5 $(A");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("64Mi"), Some(64 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1e3"), Some(1000));
        assert_eq!(quantity_bytes("12"), Some(12));
        assert_eq!(quantity_bytes("lots"), None);
    }
}
