//! Injection: how a controller adopts the emissary. Turns a Pod into its injected form.
//!
//! What an injected pod gets:
//! - an `emptyDir` volume `emissary` mounted at `/var/run/emissary` in every container;
//! - an init container `emissary-init` (the emissary image, `emissary init`) that copies the
//!   binary into it and stages the task's inputs;
//! - each task container's command rewritten to
//!   `/var/run/emissary/emissary run -- <command> <args>`;
//! - the environment of design.md section 4: `EMISSARY_AGENT_ADDR` (`$(EMISSARY_HOST_IP):PORT`,
//!   the node's IP from the Downward API), `EMISSARY_TASK_ID`, `EMISSARY_ATTEMPT`,
//!   `EMISSARY_TOKEN`, `EMISSARY_DEADLINE` (from the pod's `emissary.io/*` annotations),
//!   `EMISSARY_CONTAINER_NAME`, and `EMISSARY_TEMPLATE=@/etc/emissary/spec/template`: the task
//!   spec travels as the `emissary.io/template` annotation, projected as a file by the Downward
//!   API, so no size of spec ever meets the environment's limits (Argo #7586).
//!
//! A container without `command` takes its entrypoint from the configured image index (as
//! Argo's `images:`); an image not in the index is an error that says what to add, never a
//! guess. Injecting twice changes nothing.
//!
//! Everything here is a pure function of JSON values: the CLI and the webhook only move bytes.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// Where the emissary lives in every container.
pub const SHARED_DIR: &str = "/var/run/emissary";
/// The projected task spec.
pub const SPEC_DIR: &str = "/etc/emissary/spec";
pub const INIT_CONTAINER: &str = "emissary-init";
const SHARED_VOLUME: &str = "emissary";
const SPEC_VOLUME: &str = "emissary-spec";
/// Annotations the controller sets on a task pod.
pub const ANNOTATION_TEMPLATE: &str = "emissary.io/template";
pub const ANNOTATION_TASK: &str = "emissary.io/task-id";
pub const ANNOTATION_ATTEMPT: &str = "emissary.io/attempt";
pub const ANNOTATION_TOKEN: &str = "emissary.io/token";
pub const ANNOTATION_DEADLINE: &str = "emissary.io/deadline";
/// The label the admission webhook selects pods by.
pub const LABEL_INJECT: &str = "emissary.io/inject";

/// Injection settings (the `inject.yaml` of the ConfigMap).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The cluster default executor: `emissary`, or anything else for "not us".
    #[serde(default = "default_executor")]
    pub executor: String,
    pub emissary_image: String,
    #[serde(default = "default_port")]
    pub agent_port: u16,
    /// Image → entrypoint/cmd, for containers without `command`.
    #[serde(default)]
    pub images: BTreeMap<String, ImageEntry>,
    /// Our executor image for Argo pods the webhook adopts (namespaces labelled
    /// `emissary.io/argo: enabled`): it replaces Argo's in `init` and `wait`.
    #[serde(default = "default_argoexec_image")]
    pub argoexec_image: String,
}

fn default_argoexec_image() -> String {
    format!(
        "ghcr.io/emissary-executor/argoexec:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn default_executor() -> String {
    "emissary".to_owned()
}

fn default_port() -> u16 {
    7946
}

/// An image's ENTRYPOINT and CMD, as its config would give them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// Why a pod could not be injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError(pub String);

impl std::fmt::Display for InjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InjectError {}

fn fail<T>(message: impl Into<String>) -> Result<T, InjectError> {
    Err(InjectError(message.into()))
}

/// True when `pod` already carries the emissary (so injecting again must change nothing): our
/// init container, by name and by what it runs.
pub fn is_injected(pod: &Value) -> bool {
    init_named_ours(pod).is_some_and(|c| c["command"] == json!(init_command()))
}

fn init_named_ours(pod: &Value) -> Option<&Value> {
    pod.pointer("/spec/initContainers")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["name"] == INIT_CONTAINER)
}

fn init_command() -> [&'static str; 4] {
    ["/emissary", "init", "--dest", SHARED_DIR]
}

/// The injected form of `pod`.
pub fn inject(pod: &Value, config: &Config) -> Result<Value, InjectError> {
    if pod.get("kind").is_some_and(|k| k != "Pod") {
        return fail(format!("expected a Pod, got kind {}", pod["kind"]));
    }
    let containers = match pod.pointer("/spec/containers") {
        None => return fail("spec.containers is missing: not a Pod spec"),
        Some(Value::Array(list)) => list,
        Some(other) => return fail(format!("spec.containers must be a list, not {other}")),
    };
    if containers.is_empty() {
        return fail("spec.containers is empty");
    }
    if is_injected(pod) {
        return Ok(pod.clone());
    }
    if init_named_ours(pod).is_some() {
        // Taking it for ours would admit the pod uninjected.
        return fail(format!(
            "spec.initContainers has an {INIT_CONTAINER:?} that is not the injector's (its command \
             is not {})",
            init_command().join(" ")
        ));
    }
    // Without them every container would start, find no token, and fail: refuse at admission.
    for key in [ANNOTATION_TASK, ANNOTATION_TOKEN] {
        let value = pod.pointer(&format!("/metadata/annotations/{}", escape(key)));
        if value.and_then(Value::as_str).is_none_or(str::is_empty) {
            return fail(format!(
                "metadata.annotations[{key:?}] is missing: the controller gives a task pod its \
                 identity ({ANNOTATION_TASK}, {ANNOTATION_ATTEMPT}, {ANNOTATION_TOKEN}) before \
                 the emissary is injected"
            ));
        }
    }
    let mut pod = pod.clone();
    let has_template = pod
        .pointer(&format!(
            "/metadata/annotations/{}",
            escape(ANNOTATION_TEMPLATE)
        ))
        .is_some();

    let spec = pod["spec"]
        .as_object_mut()
        .ok_or_else(|| InjectError("spec is not an object".into()))?;
    let containers = spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .expect("checked above");
    for (i, container) in containers.iter_mut().enumerate() {
        rewrite_container(container, i, config, has_template)?;
    }

    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    let Some(volumes) = volumes.as_array_mut() else {
        return fail("spec.volumes is not a list");
    };
    for name in [SHARED_VOLUME, SPEC_VOLUME] {
        if volumes.iter().any(|v| v["name"] == name) {
            return fail(format!("spec.volumes already has a volume named {name:?}"));
        }
    }
    volumes.push(json!({"name": SHARED_VOLUME, "emptyDir": {}}));
    if has_template {
        volumes.push(json!({"name": SPEC_VOLUME, "downwardAPI": {"items": [{
            "path": "template",
            "fieldRef": {"fieldPath": format!("metadata.annotations['{ANNOTATION_TEMPLATE}']")}
        }]}}));
    }

    let inits = spec.entry("initContainers").or_insert_with(|| json!([]));
    let Some(inits) = inits.as_array_mut() else {
        return fail("spec.initContainers is not a list");
    };
    inits.insert(0, init_container(config, has_template));
    Ok(pod)
}

/// JSON Pointer escaping of one path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn init_container(config: &Config, has_template: bool) -> Value {
    let mut env = vec![];
    let mut mounts = vec![json!({"name": SHARED_VOLUME, "mountPath": SHARED_DIR})];
    if has_template {
        env.push(json!({"name": "EMISSARY_TEMPLATE", "value": format!("@{SPEC_DIR}/template")}));
        mounts.push(json!({"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": true}));
    }
    env.extend(agent_env(config));
    json!({
        "name": INIT_CONTAINER,
        "image": config.emissary_image,
        "command": init_command(),
        "env": env,
        "volumeMounts": mounts,
        // Copying a 2 MB binary and staging inputs through the agent needs little; a tight CPU
        // limit would make every task start slower (Tekton #10152), so only memory is capped.
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }
    })
}

/// The variables that locate this task's agent and identify the task to it.
fn agent_env(config: &Config) -> Vec<Value> {
    let annotation = |name: &str, key: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{key}']")}}});
    vec![
        json!({"name": "EMISSARY_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}),
        json!({"name": "EMISSARY_AGENT_ADDR", "value": format!("$(EMISSARY_HOST_IP):{}", config.agent_port)}),
        annotation("EMISSARY_TASK_ID", ANNOTATION_TASK),
        annotation("EMISSARY_ATTEMPT", ANNOTATION_ATTEMPT),
        annotation("EMISSARY_TOKEN", ANNOTATION_TOKEN),
        annotation("EMISSARY_DEADLINE", ANNOTATION_DEADLINE),
    ]
}

fn rewrite_container(
    container: &mut Value,
    index: usize,
    config: &Config,
    has_template: bool,
) -> Result<(), InjectError> {
    let at = format!("spec.containers[{index}]");
    let name = container["name"]
        .as_str()
        .ok_or_else(|| InjectError(format!("{at}.name is missing")))?
        .to_owned();
    let strings = |field: &str| -> Result<Option<Vec<String>>, InjectError> {
        match container.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|_| InjectError(format!("{at}.{field} must be a list of strings"))),
        }
    };
    let (command, args) = (strings("command")?, strings("args")?);
    refuse_token_references(container, &at)?;
    let (command, args) = match command {
        Some(command) if !command.is_empty() => (command, args.unwrap_or_default()),
        _ => {
            let image = container["image"].as_str().unwrap_or_default();
            let Some(entry) = config.images.get(image) else {
                return fail(format!(
                    "container {name:?} (image {image:?}) has no command, and the image is not in the injector's \
                     image index: set `command` in the pod spec, or add the image to `images:` in inject.yaml \
                     ({image}: {{entrypoint: [...], cmd: [...]}})"
                ));
            };
            // Kubernetes semantics: args replace the image's CMD, command its ENTRYPOINT.
            (
                entry.entrypoint.clone(),
                args.unwrap_or_else(|| entry.cmd.clone()),
            )
        }
    };
    if command.is_empty() && args.is_empty() {
        return fail(format!(
            "container {name:?}: the image index gives it neither entrypoint nor cmd"
        ));
    }
    let mut argv = vec![
        format!("{SHARED_DIR}/emissary"),
        "run".to_owned(),
        "--".to_owned(),
    ];
    argv.extend(command);
    argv.extend(args);
    let obj = container
        .as_object_mut()
        .ok_or_else(|| InjectError(format!("{at} is not an object")))?;
    obj.insert("command".into(), json!(argv));
    obj.remove("args");

    let env = obj.entry("env").or_insert_with(|| json!([]));
    let Some(env) = env.as_array_mut() else {
        return fail(format!("{at}.env is not a list"));
    };
    let mut ours = agent_env(config);
    ours.push(json!({"name": "EMISSARY_CONTAINER_NAME", "value": name}));
    if has_template {
        ours.push(json!({"name": "EMISSARY_TEMPLATE", "value": format!("@{SPEC_DIR}/template")}));
    }
    // Ours first: a later $(EMISSARY_HOST_IP) reference must see it defined.
    env.retain(|v| !ours.iter().any(|o| o["name"] == v["name"]));
    ours.append(env);
    *env = ours;

    let mounts = obj.entry("volumeMounts").or_insert_with(|| json!([]));
    let Some(mounts) = mounts.as_array_mut() else {
        return fail(format!("{at}.volumeMounts is not a list"));
    };
    mounts.push(json!({"name": SHARED_VOLUME, "mountPath": SHARED_DIR}));
    if has_template {
        mounts.push(json!({"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": true}));
    }
    Ok(())
}

/// The emissary keeps its token from the command; kubelet would hand it over anyway through
/// `$(EMISSARY_TOKEN)` in command, args or env values, or an env var reading the token's
/// annotation. A pod that asks for it is refused, naming where.
fn refuse_token_references(container: &Value, at: &str) -> Result<(), InjectError> {
    let mut texts: Vec<(String, &str)> = Vec::new();
    for field in ["command", "args"] {
        for (i, text) in container[field]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(text) = text.as_str() {
                texts.push((format!("{at}.{field}[{i}]"), text));
            }
        }
    }
    for (i, var) in container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(text) = var["value"].as_str() {
            texts.push((format!("{at}.env[{i}].value"), text));
        }
        let path = var
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str);
        if path.is_some_and(|p| p.contains(ANNOTATION_TOKEN)) {
            return fail(format!(
                "{at}.env[{i}] reads the {ANNOTATION_TOKEN} annotation: the task token is the \
                 emissary's, not the command's"
            ));
        }
    }
    for (place, text) in texts {
        if expands(text, "EMISSARY_TOKEN") {
            return fail(format!(
                "{place} refers to $(EMISSARY_TOKEN): the task token is the emissary's, not the \
                 command's (write $$(EMISSARY_TOKEN) for the literal text)"
            ));
        }
    }
    Ok(())
}

/// True when kubelet would expand `$(name)` in `text`: `$$` is an escaped `$`.
fn expands(text: &str, name: &str) -> bool {
    let reference = format!("({name})");
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix('$') {
            rest = escaped;
        } else if after.starts_with(&reference) {
            return true;
        } else {
            rest = after;
        }
    }
    false
}

/// The label Argo puts on its pods: the webhook's `/argo` path adopts pods that carry it.
pub const LABEL_ARGO_WORKFLOW: &str = "workflows.argoproj.io/workflow";

/// Adopts a pod an unmodified Argo controller made with its own executor, without touching the
/// controller's configmap: the containers running Argo's executor image (`init` and `wait`)
/// run ours instead. `init` then installs our binary as `/var/run/argo/argoexec`, which Argo's
/// rewritten `main` already runs, and our `wait` exits at once. Names, labels, annotations and
/// the `var-run-argo` mount stay as the controller reads them (research/argo-dropin.md §6):
/// the same contract as `executor.image`, for Argo v3.7, v4.0 and v4.1. The containers get
/// the agent's address (`EMISSARY_AGENT_ADDR`, the node's IP and `agentPort`) unless set.
/// v4.1's init-less layout (the executor as an image volume, a `supervisor`) is refused.
pub fn adopt_argo_pod(pod: &Value, config: &Config) -> Result<Value, InjectError> {
    let mut pod = pod.clone();
    let spec = pod["spec"]
        .as_object_mut()
        .ok_or_else(|| InjectError("spec is not an object".into()))?;
    let initless = spec
        .get("volumes")
        .and_then(Value::as_array)
        .is_some_and(|volumes| {
            volumes
                .iter()
                .any(|v| v["name"] == "argoexec-bin" || v.get("image").is_some())
        });
    if initless {
        return fail(
            "this Argo pod uses v4.1's init-less layout (the executor as an image volume): \
             the emissary does not run it; turn initlessPod off in the controller's configmap",
        );
    }
    let mut adopted = false;
    for field in ["initContainers", "containers"] {
        for container in spec
            .get_mut(field)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let runs_the_executor = matches!(container["name"].as_str(), Some("init" | "wait"));
            let mounts_argo = container["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|v| v["mountPath"] == "/var/run/argo"));
            if runs_the_executor {
                container["image"] = json!(config.argoexec_image);
                adopted = true;
            }
            if runs_the_executor || mounts_argo {
                add_agent_env(container, config)?;
            }
        }
    }
    if !adopted {
        return fail("no `init` or `wait` container: not a pod of Argo's executor");
    }
    Ok(pod)
}

/// `EMISSARY_HOST_IP` and `EMISSARY_AGENT_ADDR`, unless the container sets the address.
fn add_agent_env(container: &mut Value, config: &Config) -> Result<(), InjectError> {
    let obj = container
        .as_object_mut()
        .ok_or_else(|| InjectError("a container is not an object".into()))?;
    let env = obj.entry("env").or_insert_with(|| json!([]));
    let Some(env) = env.as_array_mut() else {
        return fail("a container's env is not a list");
    };
    if env.iter().any(|v| v["name"] == "EMISSARY_AGENT_ADDR") {
        return Ok(());
    }
    let ours: Vec<Value> = agent_env(config).into_iter().take(2).collect();
    env.retain(|v| v["name"] != "EMISSARY_HOST_IP");
    let theirs = std::mem::take(env);
    env.extend(ours);
    env.extend(theirs);
    Ok(())
}

/// Which executor runs `template` of `workflow`: the template's `executor`, else the
/// workflow's (`spec.executor`), else the cluster default. Precedence, most specific first,
/// as Flyte resolves its configuration.
pub fn executor_for<'a>(workflow: &'a Value, template: &'a Value, config: &'a Config) -> &'a str {
    template["executor"]
        .as_str()
        .or_else(|| workflow.pointer("/spec/executor").and_then(Value::as_str))
        .unwrap_or(&config.executor)
}

/// Marks the templates of an Argo Workflow that run under the emissary: their pods get the
/// `emissary.io/inject: "true"` label (through the template's `metadata.labels`), and the
/// admission webhook injects them as Argo creates them. Which templates: see [`executor_for`].
pub fn inject_workflow(workflow: &Value, config: &Config) -> Result<Value, InjectError> {
    let mut out = workflow.clone();
    let Some(templates) = workflow
        .pointer("/spec/templates")
        .and_then(Value::as_array)
    else {
        return fail("spec.templates is missing: not a Workflow");
    };
    for (i, template) in templates.iter().enumerate() {
        let runs_a_pod = ["container", "script", "containerSet"]
            .iter()
            .any(|k| template.get(*k).is_some());
        if !runs_a_pod || executor_for(workflow, template, config) != "emissary" {
            continue;
        }
        let labels = &mut out["spec"]["templates"][i]["metadata"]["labels"];
        if !labels.is_object() && !labels.is_null() {
            return fail(format!("spec.templates[{i}].metadata.labels is not a map"));
        }
        labels[LABEL_INJECT] = json!("true");
    }
    Ok(out)
}

/// Injects a Pod, or marks a Workflow, by its `kind`.
pub fn inject_any(object: &Value, config: &Config) -> Result<Value, InjectError> {
    match object["kind"].as_str() {
        Some("Workflow" | "WorkflowTemplate" | "ClusterWorkflowTemplate") => {
            inject_workflow(object, config)
        }
        _ => inject(object, config),
    }
}

/// Reads injection settings (YAML, or JSON which is YAML too).
pub fn load_config(path: &std::path::Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Injects a Pod given as text, answering in the same format: JSON in, JSON out; YAML in,
/// YAML out.
pub fn inject_text(text: &str, config: &Config) -> Result<String, String> {
    if text.trim_start().starts_with('{') {
        let pod: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let injected = inject_any(&pod, config).map_err(|e| e.to_string())?;
        let mut out = serde_json::to_string_pretty(&injected).map_err(|e| e.to_string())?;
        out.push('\n');
        Ok(out)
    } else {
        let pod: Value =
            serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
        let injected = inject_any(&pod, config).map_err(|e| e.to_string())?;
        serde_norway::to_string(&injected).map_err(|e| e.to_string())
    }
}

/// An RFC 6902 JSON Patch turning `before` into `after` for an admission response. The
/// injection touches `spec` only, so one `replace` of it is exact (and `add` when absent).
pub fn patch(before: &Value, after: &Value) -> Value {
    if before == after {
        return json!([]);
    }
    let op = if before.get("spec").is_some() {
        "replace"
    } else {
        "add"
    };
    json!([{"op": op, "path": "/spec", "value": after["spec"]}])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argo_pod() -> Value {
        let argo = json!([{"name": "var-run-argo", "mountPath": "/var/run/argo"}]);
        json!({"spec": {
            "initContainers": [{"name": "init", "image": "quay.io/argoproj/argoexec:v4.1.4",
                                "volumeMounts": argo}],
            "containers": [
                {"name": "wait", "image": "quay.io/argoproj/argoexec:v4.1.4", "volumeMounts": argo},
                {"name": "main", "image": "busybox", "volumeMounts": argo,
                 "env": [{"name": "EMISSARY_HOST_IP", "value": "spoofed"}, {"name": "X", "value": "1"}]},
                {"name": "other", "image": "busybox"}
            ],
            "volumes": [{"name": "var-run-argo", "emptyDir": {}}]
        }})
    }

    #[test]
    fn an_argo_pod_gets_our_executor_in_init_and_wait_and_the_agent_address() {
        let adopted = adopt_argo_pod(&argo_pod(), &config()).unwrap();
        let spec = &adopted["spec"];
        let ours = default_argoexec_image();
        assert_eq!(spec["initContainers"][0]["image"], json!(ours));
        assert_eq!(spec["containers"][0]["image"], json!(ours));
        assert_eq!(spec["containers"][1]["image"], "busybox");
        let names: Vec<&str> = spec["containers"][1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["EMISSARY_HOST_IP", "EMISSARY_AGENT_ADDR", "X"]);
        assert_eq!(
            spec["containers"][1]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.hostIP"
        );
        assert!(
            spec["containers"][2].get("env").is_none(),
            "not an Argo container"
        );
    }

    #[test]
    fn an_initless_argo_pod_or_a_pod_without_the_executor_is_refused() {
        let mut initless = argo_pod();
        initless["spec"]["volumes"] =
            json!([{"name": "argoexec-bin", "image": {"reference": "quay.io/argoproj/argoexec"}}]);
        let e = adopt_argo_pod(&initless, &config()).unwrap_err();
        assert!(e.0.contains("init-less"), "{e}");
        let mut plain = argo_pod();
        plain["spec"]["initContainers"] = json!([]);
        plain["spec"]["containers"] = json!([{"name": "main", "image": "busybox"}]);
        assert!(adopt_argo_pod(&plain, &config()).is_err());
    }

    #[test]
    fn token_references_follow_kubelets_escaping() {
        assert!(expands("echo $(EMISSARY_TOKEN)", "EMISSARY_TOKEN"));
        assert!(expands("$$$(EMISSARY_TOKEN)", "EMISSARY_TOKEN"));
        assert!(!expands("$$(EMISSARY_TOKEN)", "EMISSARY_TOKEN"));
        assert!(!expands(
            "$(EMISSARY_TOKENS) $EMISSARY_TOKEN",
            "EMISSARY_TOKEN"
        ));
    }

    fn config() -> Config {
        serde_json::from_value(json!({
            "emissaryImage": "emissary:dev",
            "images": {"python:3.12": {"entrypoint": ["python3"], "cmd": ["-V"]}}
        }))
        .unwrap()
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "step-1", "annotations": {
                "emissary.io/template": "{}", "emissary.io/task-id": "step-1",
                "emissary.io/token": "t0k3n", "other": "x"}},
            "spec": {
                "containers": [
                    {"name": "main", "image": "alpine", "command": ["sh", "-c"], "args": ["echo hi"],
                     "env": [{"name": "KEEP", "value": "1"}, {"name": "EMISSARY_TASK_ID", "value": "spoofed"}]},
                    {"name": "py", "image": "python:3.12"}
                ],
                "initContainers": [{"name": "user-init", "image": "busybox", "command": ["true"]}],
                "restartPolicy": "Never"
            }
        })
    }

    #[test]
    fn rewrites_commands_env_and_volumes() {
        let out = inject(&pod(), &config()).unwrap();
        let main = &out["spec"]["containers"][0];
        assert_eq!(
            main["command"],
            json!([
                "/var/run/emissary/emissary",
                "run",
                "--",
                "sh",
                "-c",
                "echo hi"
            ])
        );
        assert!(main.get("args").is_none());
        let names: Vec<&str> = main["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names[0], "EMISSARY_HOST_IP",
            "defined before $(EMISSARY_HOST_IP) is used"
        );
        assert!(names.contains(&"KEEP") && names.contains(&"EMISSARY_TEMPLATE"));
        assert_eq!(
            names.iter().filter(|n| **n == "EMISSARY_TASK_ID").count(),
            1,
            "the pod cannot spoof its identity"
        );
        let py = &out["spec"]["containers"][1];
        assert_eq!(
            py["command"],
            json!(["/var/run/emissary/emissary", "run", "--", "python3", "-V"])
        );
        let inits = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], INIT_CONTAINER, "ours runs first");
        assert_eq!(inits[1]["name"], "user-init");
        assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_pod_without_its_task_identity_is_refused() {
        for key in [ANNOTATION_TASK, ANNOTATION_TOKEN] {
            let mut pod = pod();
            pod["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove(key);
            let err = inject(&pod, &config()).unwrap_err();
            assert!(
                err.0
                    .starts_with(&format!("metadata.annotations[{key:?}] is missing")),
                "{err}"
            );
        }
    }

    #[test]
    fn an_init_container_that_only_borrows_our_name_is_refused() {
        let mut pod = pod();
        pod["spec"]["initContainers"] =
            json!([{"name": INIT_CONTAINER, "image": "busybox", "command": ["true"]}]);
        let err = inject(&pod, &config()).unwrap_err();
        assert!(err.0.contains("is not the injector's"), "{err}");
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let once = inject(&pod(), &config()).unwrap();
        assert_eq!(inject(&once, &config()).unwrap(), once);
        assert_eq!(patch(&once, &once), json!([]));
    }

    #[test]
    fn a_container_without_command_or_index_entry_is_an_error_that_says_what_to_add() {
        let mut pod = pod();
        pod["spec"]["containers"][1]["image"] = json!("unknown:1");
        let err = inject(&pod, &config()).unwrap_err().to_string();
        assert!(
            err.contains("\"py\"") && err.contains("unknown:1") && err.contains("images:"),
            "{err}"
        );
    }

    #[test]
    fn args_given_replace_the_images_cmd() {
        let mut pod = pod();
        pod["spec"]["containers"][1]["args"] = json!(["script.py"]);
        let out = inject(&pod, &config()).unwrap();
        assert_eq!(
            out["spec"]["containers"][1]["command"],
            json!([
                "/var/run/emissary/emissary",
                "run",
                "--",
                "python3",
                "script.py"
            ])
        );
    }

    #[test]
    fn executor_precedence_is_template_then_workflow_then_cluster() {
        let mut config = config();
        config.executor = "argo".into();
        let wf = json!({"spec": {"executor": "emissary"}});
        assert_eq!(executor_for(&wf, &json!({}), &config), "emissary");
        assert_eq!(
            executor_for(&wf, &json!({"executor": "argo"}), &config),
            "argo"
        );
        assert_eq!(executor_for(&json!({}), &json!({}), &config), "argo");
    }

    #[test]
    fn a_workflow_gets_its_emissary_templates_labelled() {
        let mut config = config();
        config.executor = "argo".into();
        let wf = json!({"kind": "Workflow", "spec": {"executor": "emissary", "templates": [
            {"name": "a", "container": {"image": "x"}},
            {"name": "b", "executor": "argo", "script": {"image": "x", "source": "true"}},
            {"name": "steps", "steps": []}
        ]}});
        let out = inject_any(&wf, &config).unwrap();
        assert_eq!(
            out["spec"]["templates"][0]["metadata"]["labels"][LABEL_INJECT],
            "true"
        );
        assert!(out["spec"]["templates"][1].get("metadata").is_none());
        assert!(out["spec"]["templates"][2].get("metadata").is_none());
    }

    #[test]
    fn rejects_what_is_not_a_pod() {
        assert!(inject(&json!({"kind": "Deployment", "spec": {}}), &config()).is_err());
        assert!(inject(&json!({"spec": {}}), &config()).is_err());
        let err = inject(&json!({"spec": {"containers": 5}}), &config()).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.containers must be a list, not 5"),
            "{err}"
        );
    }
}
