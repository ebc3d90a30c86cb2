//! The emissary installed on the test cluster (`emissary-cluster`, a real kube-apiserver and
//! our test kubelet): `images/deploy` rendered by kustomize and server-side applied, so the API
//! server validates every object; the webhook running with its certificate and registered by
//! our MutatingWebhookConfiguration, so the API server calls it on pod creation; the node
//! agent, an S3 server and the reference controller beside it. One installation serves every
//! test of this process, each in its own namespace.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use emissary_tests::cluster::Cluster;
use emissary_tests::cluster::control_plane::{Ca, free_port};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::agent_util::Agent;
use crate::controller::Controller;
use crate::s3::{self, S3Server};
use crate::util::*;

pub struct Emissary {
    pub cluster: &'static Cluster,
    pub s3: S3Server,
    pub controller: Controller,
    pub agent: Agent,
    pub ca: Ca,
    _webhook: std::process::Child,
    _dir: Dir,
}

/// What to kill and remove when this process exits: the installation lives in a static, which
/// is never dropped.
static AT_EXIT: std::sync::Mutex<(Vec<u32>, Vec<std::path::PathBuf>)> =
    std::sync::Mutex::new((Vec::new(), Vec::new()));

pub fn clean_up_at_exit(pid: Option<u32>, dir: Option<&std::path::Path>) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    extern "C" fn clean_up() {
        if let Ok(mut what) = AT_EXIT.lock() {
            for pid in what.0.drain(..) {
                kill(pid, libc::SIGKILL);
            }
            for dir in what.1.drain(..) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    // SAFETY: atexit with a plain extern "C" function.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean_up);
    });
    let mut what = AT_EXIT.lock().unwrap();
    what.0.extend(pid);
    what.1.extend(dir.map(std::path::Path::to_owned));
}

static INSTALLED: OnceLock<Emissary> = OnceLock::new();

pub fn cluster() -> &'static Cluster {
    Cluster::shared(std::path::Path::new(env!("CARGO_BIN_EXE_emissary-cluster")))
}

/// The emissary on the shared test cluster, installed on first use.
pub fn installed() -> &'static Emissary {
    INSTALLED.get_or_init(install)
}

/// The objects of `images/deploy/overlays/example`, as kustomize renders them.
pub fn rendered_manifests() -> Vec<Value> {
    let dir = crate::deploy::example_overlay();
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Server-side applies `objects`; the error is the API server's own message.
pub fn apply(cluster: &Cluster, objects: &[Value]) -> Result<(), String> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let dir = Dir::new("k8s-apply");
    let file = dir.write("objects.json", list.to_string());
    let out = cluster.kubectl([
        "apply",
        "--server-side",
        "--field-manager=emissary-tests",
        "-f",
        file.to_str().unwrap(),
    ]);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn install() -> Emissary {
    let cluster = cluster();
    let dir = Dir::new("k8s-emissary");
    let s3 = S3Server::start(&dir.join("s3"), 0);
    let controller = Controller::start();
    // The agent starts last (with its ServiceAccount's token, once RBAC is applied), on a port
    // chosen now for the manifests.
    let agent_port = free_port().unwrap();

    // The manifests as a user installs them, with this cluster's addresses and secrets.
    let ca = Ca::new();
    let (cert, key) = ca.issue(&["127.0.0.1"]);
    let mut objects = rendered_manifests();
    let mut inject_config = None;
    for object in &mut objects {
        match (
            object["kind"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap(),
        ) {
            ("ConfigMap", "emissary-config") => {
                let text = object["data"]["inject.yaml"]
                    .as_str()
                    .unwrap()
                    .replace("agentPort: 7946", &format!("agentPort: {agent_port}"));
                object["data"]["inject.yaml"] = json!(text);
                inject_config = Some(text);
            }
            ("Secret", "emissary-webhook-tls") => {
                object["stringData"] = json!({"tls.crt": cert, "tls.key": key});
            }
            ("Secret", "emissary-node-key") => {
                object["stringData"] = json!({"key": crate::controller::NODE_SECRET});
            }
            _ => {}
        }
    }
    let inject_config = dir.write(
        "inject.yaml",
        inject_config.expect("the emissary-config ConfigMap"),
    );
    let cert_file = dir.write("tls.crt", &cert);
    let key_file = dir.write("tls.key", &key);
    let ready = dir.join("webhook-ready.json");
    let webhook = std::process::Command::new(agent_bin())
        .args(["webhook", "--listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file)
        .arg("--inject-config")
        .arg(&inject_config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("webhook.log")).unwrap())
        .spawn()
        .unwrap();
    clean_up_at_exit(Some(webhook.id()), None);
    assert!(
        wait_until(Duration::from_secs(10), || ready.exists()),
        "the webhook did not start"
    );
    let addr: std::net::SocketAddr =
        serde_json::from_slice::<Value>(&std::fs::read(&ready).unwrap()).unwrap()["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    for object in &mut objects {
        if object["kind"] == "MutatingWebhookConfiguration" {
            // No Service reaches a process on this machine: the API server calls the webhook
            // by URL, as envtest does.
            for hook in object["webhooks"].as_array_mut().unwrap() {
                let path = hook["clientConfig"]["service"]["path"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                hook["clientConfig"] = webhook_client(&ca, addr, &path);
            }
        }
    }
    apply(cluster, &objects).unwrap_or_else(|e| panic!("images/deploy does not apply:\n{e}"));

    // The agent speaks to the API server as its ServiceAccount, so our RBAC is what it may do.
    let kubeconfig = service_account_kubeconfig(cluster, &dir, "emissary-system", "emissary-agent");
    let store = format!("s3://{}/k8s", s3::BUCKET);
    let agent = Agent::start_listening(
        emissary_tests::cluster::NODE,
        dir.join("agent"),
        &format!("127.0.0.1:{agent_port}"),
        &[
            "--store",
            &store,
            "--s3-endpoint",
            &s3.endpoint(),
            "--s3-path-style",
            "--controller-url",
            &controller.url(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
        ],
    );
    clean_up_at_exit(Some(agent.pid()), Some(dir.path()));
    Emissary {
        cluster,
        s3,
        controller,
        agent,
        ca,
        _webhook: webhook,
        _dir: dir,
    }
}

/// A kubeconfig with a token of ServiceAccount `ns/name` (from the API server's TokenRequest).
pub fn service_account_kubeconfig(
    cluster: &Cluster,
    dir: &Dir,
    ns: &str,
    name: &str,
) -> std::path::PathBuf {
    let out = cluster.kubectl(["-n", ns, "create", "token", name, "--duration=24h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let ca = dir.write(&format!("{name}-ca.crt"), &cluster.ready.ca_pem);
    dir.write(
        &format!("{name}.kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\n\
             current-context: test\n",
            cluster.ready.server,
            ca.display(),
            token.trim()
        ),
    )
}

/// A webhook `clientConfig` for the API server to call `addr` trusting `ca`.
pub fn webhook_client(ca: &Ca, addr: std::net::SocketAddr, path: &str) -> Value {
    json!({
        "url": format!("https://{addr}{path}"),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca.pem),
    })
}

impl Emissary {
    /// A labelled task pod as a controller creates it: its identity in annotations (task id,
    /// attempt, a token for `workflow`), its spec as the `emissary.io/template` annotation (with
    /// the container added when the spec has none), and one container `main` running
    /// `command` in `image`.
    pub fn task_pod(
        &self,
        name: &str,
        workflow: &str,
        spec: &Value,
        image: &str,
        command: &[&str],
    ) -> Value {
        let mut spec = spec.clone();
        if ["container", "script", "containerSet"]
            .iter()
            .all(|k| spec.get(k).is_none())
        {
            spec["container"] = json!({"image": image, "command": command});
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {"emissary.io/inject": "true"},
                "annotations": {
                    "emissary.io/task-id": name,
                    "emissary.io/attempt": "0",
                    "emissary.io/token": self.agent.token(workflow, name, 0, "1h"),
                    "emissary.io/template": spec.to_string(),
                },
            },
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 10,
                "containers": [{"name": "main", "image": image, "command": command,
                                "env": [{"name": "EMISSARY_AGENT_RETRY", "value": "20s"}]}],
            },
        })
    }

    /// The events of `task` once `done` holds for them.
    pub fn events_of(
        &self,
        task: &str,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let events: Vec<Value> = self
                .controller
                .events()
                .into_iter()
                .filter(|e| e["task_id"] == task)
                .collect();
            if done(&events) {
                return events;
            }
            assert!(
                started.elapsed() < limit,
                "the events of {task} within {limit:?}: {events:#?}\nagent log:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Creates `pod` in `ns`; the error is the API server's message.
pub fn create_pod(cluster: &Cluster, ns: &str, pod: &Value) -> Result<Pod, String> {
    let pod: Pod = serde_json::from_value(pod.clone()).map_err(|e| e.to_string())?;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    cluster
        .block_on(api.create(&PostParams::default(), &pod))
        .map_err(|e| match e {
            kube::Error::Api(status) => status.message,
            e => e.to_string(),
        })
}

/// The pod once `done` holds for it (or `None` once it is gone, if `done(None)`).
pub fn wait_pod(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    limit: Duration,
    done: impl Fn(Option<&Pod>) -> bool,
) -> Option<Pod> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let started = Instant::now();
    loop {
        let pod = cluster.block_on(api.get_opt(name)).unwrap();
        if done(pod.as_ref()) {
            return pod;
        }
        assert!(
            started.elapsed() < limit,
            "pod {ns}/{name} within {limit:?}: {}\nkubelet's log: {}",
            serde_json::to_string_pretty(&pod).unwrap(),
            cluster.ready.dir.with_extension("log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn phase(pod: Option<&Pod>) -> &str {
    pod.and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// A finished pod (Succeeded or Failed).
pub fn wait_finished(cluster: &Cluster, ns: &str, name: &str, limit: Duration) -> Pod {
    wait_pod(cluster, ns, name, limit, |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    })
    .unwrap()
}

/// The status of container `name` (init containers included), as JSON.
pub fn container_status(pod: &Pod, name: &str) -> Value {
    let status = pod.status.as_ref().unwrap();
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
        .map(|c| serde_json::to_value(c).unwrap())
        .unwrap_or(Value::Null)
}
