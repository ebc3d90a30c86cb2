//! Argo Workflows' own workflow-controller, built from its Go module at v4.1.4, v4.0.7 and
//! v3.7.18, unmodified, runs Argo's own examples on the test cluster with one change to its
//! configmap: `executor.image` is ours. (In place of the cluster DNS and kube-proxy this test
//! cluster lacks, `executor.env` also gives the agent's address; see the README.)
//!
//! Each version's controller watches a namespace of its own, in a network namespace of its own
//! (it listens on every address, with no flag against it). The artifact repository is the
//! embedded S3 server, with its credentials in a Secret of that namespace and a `keyFormat`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::k8s::*;
use crate::s3;
use crate::util::{Dir, wait_until};

pub struct Argo {
    version: &'static str,
    pub ns: String,
    pub module: PathBuf,
    log: PathBuf,
    _controller: std::process::Child,
    _dir: Dir,
}

/// The executor image Argo is told to use: ours.
pub const EXECUTOR_IMAGE: &str = "ghcr.io/emissary-executor/argoexec:0.1.0";

pub const VERSIONS: [&str; 3] = ["v4.1", "v4.0", "v3.7"];

pub fn argo(version: &'static str) -> &'static Argo {
    static INSTALLED: [OnceLock<Argo>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let i = VERSIONS
        .iter()
        .position(|v| *v == version)
        .expect("a tested version");
    INSTALLED[i].get_or_init(|| install(version, &Setup::default()))
}

/// How a controller differs from the shared ones of [`argo`].
#[derive(Default)]
pub struct Setup {
    /// The agent's address for the executor (`EMISSARY_AGENT_ADDR`) [default: the shared one].
    pub agent: Option<String>,
    /// More of the executor's environment.
    pub executor_env: Vec<(String, String)>,
    /// Keys added to (or replacing) the configmap's `config`.
    pub config: Value,
}

/// A controller of `version` with a namespace and a configmap of its own.
pub fn install(version: &'static str, setup: &Setup) -> Argo {
    let e = installed();
    let cluster = e.cluster;
    let module = emissary_tests::cluster::cluster_bin()
        .join(format!("argo-{version}"))
        .join("module");
    assert!(
        module.exists(),
        "{} is missing: tests/cluster/build.sh OUT argo links it (make test does)",
        module.display()
    );
    static CRDS: OnceLock<()> = OnceLock::new();
    CRDS.get_or_init(|| {
        // Argo's minimal CRDs are schemaless, the same for every version tested.
        let crds = module.join("manifests/base/crds/minimal");
        let mut args = vec!["apply".to_owned(), "--server-side".into()];
        for entry in std::fs::read_dir(&crds).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("argoproj.io_") {
                args.extend(["-f".to_owned(), entry.path().display().to_string()]);
            }
        }
        let out = cluster.kubectl(&args);
        assert!(
            out.status.success(),
            "Argo's CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // (kubectl wait fails at once on a CRD whose status has no conditions yet.)
        let established = || {
            cluster
                .kubectl([
                    "wait",
                    "--for=condition=Established",
                    "crd/workflows.argoproj.io",
                    "crd/workflowtaskresults.argoproj.io",
                    "--timeout=10s",
                ])
                .status
                .success()
        };
        assert!(
            wait_until(Duration::from_secs(60), established),
            "Argo's CRDs are not established"
        );
    });
    let ns = cluster.namespace(&format!("argo-{}", version.replace('.', "")));
    let dir = Dir::new(&format!("argo-{version}"));
    let agent = setup
        .agent
        .clone()
        .unwrap_or_else(|| e.agent.api.to_string());
    let mut env = vec![json!({"name": "EMISSARY_AGENT_ADDR", "value": agent})];
    env.extend(
        setup
            .executor_env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v})),
    );
    let mut config = json!({
        "executor": {"image": EXECUTOR_IMAGE, "env": env},
        "artifactRepository": {"s3": {
            "bucket": s3::BUCKET,
            "endpoint": e.s3.addr.to_string(),
            "insecure": true,
            "accessKeySecret": {"name": "s3-creds", "key": "accesskey"},
            "secretKeySecret": {"name": "s3-creds", "key": "secretkey"},
            "keyFormat": "argo/{{workflow.namespace}}/{{workflow.name}}/{{pod.name}}",
        }},
        // Argo's entrypoint index for images whose templates give no command.
        "images": {"argoproj/argosay:v2": {"entrypoint": ["/argosay"]}},
        "metricsConfig": {"enabled": false},
        "telemetryConfig": {"enabled": false},
    });
    for (key, value) in setup.config.as_object().into_iter().flatten() {
        config[key] = value.clone();
    }
    let objects = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": ns},
               "stringData": {"accesskey": s3::ACCESS_KEY, "secretkey": s3::SECRET_KEY}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "workflow-controller-configmap", "namespace": ns},
               "data": {"config": serde_norway::to_string(&config).unwrap()}}),
    ];
    apply(cluster, &objects).unwrap();
    let port = cluster.ready.server.rsplit(':').next().unwrap().to_owned();
    let controller = emissary_tests::cluster::cluster_bin()
        .join(format!("argo-{version}"))
        .join("workflow-controller");
    let log = dir.join("workflow-controller.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_emissary-cluster"))
        .args(["netns", &port, "--"])
        .arg(&controller)
        .arg("--kubeconfig")
        .arg(&cluster.ready.kubeconfig)
        .args([
            "--namespace",
            &ns,
            "--namespaced",
            "--managed-namespace",
            &ns,
        ])
        .args([
            "--configmap",
            "workflow-controller-configmap",
            "--loglevel",
            "info",
        ])
        .env("LEADER_ELECTION_DISABLE", "true")
        .env("DEFAULT_REQUEUE_TIME", "1s")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    crate::k8s::clean_up_at_exit(Some(child.id()), Some(dir.path()));
    Argo {
        version,
        ns,
        module,
        log,
        _controller: child,
        _dir: dir,
    }
}

impl Argo {
    pub fn example(&self, name: &str) -> PathBuf {
        self.module.join("examples").join(name)
    }

    /// Submits the workflow `yaml`; returns its name.
    pub fn submit_text(&self, yaml: &str) -> String {
        let dir = Dir::new("argo-workflow");
        self.submit(&dir.write("workflow.yaml", yaml))
    }

    /// Submits workflow file `file`; returns its name.
    pub fn submit(&self, file: &Path) -> String {
        let out = installed().cluster.kubectl([
            "-n",
            &self.ns,
            "create",
            "-f",
            file.to_str().unwrap(),
            "-o",
            "jsonpath={.metadata.name}",
        ]);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn get(&self, kind: &str, name: &str) -> Value {
        let out = installed()
            .cluster
            .kubectl(["-n", &self.ns, "get", kind, name, "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The workflow once it has ended (Succeeded, Failed or Error), or why not.
    pub fn wait(&self, name: &str, limit: Duration) -> Result<Value, String> {
        let started = Instant::now();
        loop {
            let wf = self.get("workflow", name);
            if matches!(
                wf["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed" | "Error")
            ) {
                return Ok(wf);
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "did not end within {limit:?} on Argo {}:\n{}\ncontroller log: {}",
                    self.version,
                    summary(&wf),
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The workflow's task results still waiting for outputs.
    pub fn incomplete_results(&self, workflow: &str) -> Vec<String> {
        let out = installed().cluster.kubectl([
            "-n",
            &self.ns,
            "get",
            "workflowtaskresults",
            "-l",
            &format!(
                "workflows.argoproj.io/workflow={workflow},workflows.argoproj.io/report-outputs-completed=false"
            ),
            "-o",
            "name",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A workflow's phase and its nodes' phases and messages, one line each.
pub fn summary(wf: &Value) -> String {
    let mut lines = vec![format!(
        "workflow {}: {} {}",
        wf["metadata"]["name"].as_str().unwrap_or(""),
        wf["status"]["phase"].as_str().unwrap_or("?"),
        wf["status"]["message"].as_str().unwrap_or("")
    )];
    for node in wf["status"]["nodes"]
        .as_object()
        .into_iter()
        .flat_map(|n| n.values())
    {
        lines.push(format!(
            "  {} [{}] {} {} {}",
            node["displayName"].as_str().unwrap_or(""),
            node["type"].as_str().unwrap_or(""),
            node["phase"].as_str().unwrap_or(""),
            node["message"].as_str().unwrap_or(""),
            node["outputs"]
        ));
    }
    lines.join("\n")
}

/// The nodes of `wf` whose display name is `name`.
pub fn nodes<'a>(wf: &'a Value, name: &str) -> Vec<&'a Value> {
    wf["status"]["nodes"]
        .as_object()
        .into_iter()
        .flat_map(|n| n.values())
        .filter(|n| n["displayName"] == name)
        .collect()
}

#[test]
fn hello_world_runs_on_every_argo_version() {
    for version in VERSIONS {
        let argo = argo(version);
        let name = argo.submit(&argo.example("hello-world.yaml"));
        let wf = argo.wait(&name, Duration::from_secs(120)).unwrap();
        assert_eq!(
            wf["status"]["phase"],
            "Succeeded",
            "{version}: {}",
            summary(&wf)
        );
        assert!(argo.incomplete_results(&name).is_empty());
        // No resident wait sidecar: it ends as soon as it starts, exit 0.
        let selector = format!("workflows.argoproj.io/workflow={name}");
        let out = installed()
            .cluster
            .kubectl(["-n", &argo.ns, "get", "pods", "-l", &selector, "-o", "json"]);
        let pods: Value = serde_json::from_slice(&out.stdout).unwrap();
        let statuses = pods["items"][0]["status"]["containerStatuses"]
            .as_array()
            .unwrap();
        let wait = statuses.iter().find(|c| c["name"] == "wait").unwrap();
        let ended = &wait["state"]["terminated"];
        assert_eq!(ended["exitCode"], 0, "{wait}");
        let at = |t: &Value| {
            t.as_str()
                .unwrap()
                .parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap()
        };
        let ran = at(&ended["finishedAt"]).duration_since(at(&ended["startedAt"]));
        assert!(ran.as_secs() <= 1, "{version}: wait ran {ran:?}");
    }
}

/// An example of Argo's and how it must end.
struct Example {
    file: &'static str,
    phase: &'static str,
    check: fn(&Argo, &Value),
}

fn succeeded_nodes(wf: &Value, names: &[&str]) {
    for name in names {
        let found = nodes(wf, name);
        assert!(
            !found.is_empty() && found.iter().all(|n| n["phase"] == "Succeeded"),
            "node {name}: {found:#?}"
        );
    }
}

fn output_parameter<'a>(node: &'a Value, name: &str) -> &'a Value {
    node["outputs"]["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .map(|p| &p["value"])
        .unwrap_or(&Value::Null)
}

/// The S3 object of an output artifact, as the controller recorded it.
fn artifact_bytes(node: &Value, name: &str) -> Option<Vec<u8>> {
    let art = node["outputs"]["artifacts"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)?;
    installed().s3.object(art["s3"]["key"].as_str()?)
}

const EXAMPLES: [Example; 20] = [
    Example {
        file: "hello-world.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &[]),
    },
    Example {
        file: "steps.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &["hello1", "hello2a", "hello2b"]),
    },
    Example {
        file: "dag-diamond.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &["A", "B", "C", "D"]),
    },
    Example {
        file: "scripts-bash.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            // od -i of two random bytes, scaled (busybox's od reads them signed).
            let result = &nodes(wf, "generate")[0]["outputs"]["result"];
            assert!(
                result.as_str().unwrap().trim().parse::<i64>().is_ok(),
                "{result}"
            );
        },
    },
    Example {
        file: "scripts-python.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            let result = &nodes(wf, "generate")[0]["outputs"]["result"];
            assert!(result.as_str().unwrap().parse::<u32>().is_ok(), "{result}");
        },
    },
    Example {
        file: "output-parameter.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            assert_eq!(
                output_parameter(nodes(wf, "generate-parameter")[0], "hello-param"),
                "hello world"
            );
            assert_eq!(
                nodes(wf, "consume-parameter")[0]["inputs"]["parameters"][0]["value"],
                "hello world"
            );
        },
    },
    Example {
        file: "arguments-parameters.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            assert_eq!(wf["status"]["nodes"].as_object().unwrap().len(), 1);
        },
    },
    Example {
        file: "artifact-passing.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            let bytes = artifact_bytes(nodes(wf, "generate-artifact")[0], "hello-art")
                .expect("hello-art in S3");
            assert_eq!(&bytes[..2], [0x1f, 0x8b], "a .tgz, as Argo's default");
            succeeded_nodes(wf, &["consume-artifact"]);
        },
    },
    Example {
        file: "artifact-disable-archive.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            let node = nodes(wf, "generate-artifact")[0];
            assert_eq!(artifact_bytes(node, "hello-txt").unwrap(), b"hello world\n");
            succeeded_nodes(wf, &["consume-artifact"]);
        },
    },
    Example {
        file: "input-artifact-raw.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &[]),
    },
    Example {
        file: "exit-code-output-variable.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            assert_eq!(
                nodes(wf, "failing-container")[0]["outputs"]["exitCode"],
                "123"
            );
            assert_eq!(
                nodes(wf, "echo-container")[0]["inputs"]["parameters"][0]["value"],
                "123"
            );
        },
    },
    Example {
        file: "retry-script.yaml",
        phase: "Succeeded|Failed",
        check: |_, wf| {
            // random.choice([0, 1, 1]) until it exits 0, ten retries at most.
            let attempts: Vec<&Value> = wf["status"]["nodes"]
                .as_object()
                .unwrap()
                .values()
                .filter(|n| n["type"] == "Pod")
                .collect();
            let ok = attempts
                .iter()
                .filter(|n| n["phase"] == "Succeeded")
                .count();
            let expected_ok = usize::from(wf["status"]["phase"] == "Succeeded");
            assert_eq!(ok, expected_ok, "{attempts:#?}");
            for failed in attempts.iter().filter(|n| n["phase"] == "Failed") {
                assert_eq!(failed["outputs"]["exitCode"], "1", "{failed:#}");
            }
            assert!(
                expected_ok == 1 || attempts.len() == 11,
                "{} attempts",
                attempts.len()
            );
        },
    },
    Example {
        file: "timeouts-step.yaml",
        phase: "Failed",
        check: |_, wf| {
            let node = &nodes(wf, wf["metadata"]["name"].as_str().unwrap())[0];
            let message = node["message"].as_str().unwrap_or_default();
            assert!(message.contains("deadline"), "{node:#}");
        },
    },
    Example {
        file: "exit-handlers.yaml",
        phase: "Failed",
        check: |_, wf| {
            // The exit handler's steps, by step name: notify (send-email) and cry ran.
            succeeded_nodes(wf, &["notify", "cry"]);
            assert!(
                nodes(wf, "celebrate")
                    .iter()
                    .all(|n| n["phase"] != "Succeeded")
            );
        },
    },
    Example {
        file: "global-outputs.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            let globals = json!({"outputs": wf["status"]["outputs"]});
            assert_eq!(
                output_parameter(&globals, "my-global-param"),
                "hello world",
                "{globals:#}"
            );
            succeeded_nodes(wf, &["consume-global-param", "consume-global-art"]);
        },
    },
    Example {
        file: "container-set-template/sequence-workflow.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &["a", "b", "c"]),
    },
    Example {
        file: "container-set-template/graph-workflow.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &["a", "b", "c", "d"]),
    },
    Example {
        file: "container-set-template/parallel-workflow.yaml",
        phase: "Succeeded",
        check: |_, wf| succeeded_nodes(wf, &["a", "b"]),
    },
    Example {
        file: "container-set-template/workspace-workflow.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            let node = nodes(wf, wf["metadata"]["name"].as_str().unwrap())[0];
            assert_eq!(output_parameter(node, "out"), "hi", "{node:#}");
            assert_eq!(
                artifact_bytes(node, "out").map(|b| b[..2] == [0x1f, 0x8b]),
                Some(true)
            );
        },
    },
    Example {
        file: "container-set-template/outputs-result-workflow.yaml",
        phase: "Succeeded",
        check: |_, wf| {
            assert_eq!(nodes(wf, "a")[0]["outputs"]["result"], "hi");
        },
    },
];

/// Every example on one version, submitted at once, each to the phase Argo documents, with its
/// outputs checked, and no task result left incomplete.
fn examples_on(version: &'static str) {
    let argo = argo(version);
    let submitted: Vec<(&Example, String)> = EXAMPLES
        .iter()
        .map(|e| (e, argo.submit(&argo.example(e.file))))
        .collect();
    let mut failures = Vec::new();
    for (example, name) in &submitted {
        let wf = match argo.wait(name, Duration::from_secs(180)) {
            Ok(wf) => wf,
            Err(message) => {
                failures.push(format!("{} ({name}): {message}", example.file));
                continue;
            }
        };
        let phase = wf["status"]["phase"].as_str().unwrap_or_default();
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(
                example.phase.split('|').any(|p| p == phase),
                "phase {phase}, expected {}",
                example.phase,
            );
            (example.check)(argo, &wf);
            let incomplete = argo.incomplete_results(name);
            assert!(
                incomplete.is_empty(),
                "task results left incomplete: {incomplete:?}"
            );
        }));
        if let Err(panic) = checked {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{} ({name}): {message}\n{}",
                example.file,
                summary(&wf)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "Argo {version}: {} of {} examples failed:\n{}",
        failures.len(),
        EXAMPLES.len(),
        failures.join("\n\n")
    );
}

#[test]
fn argo_v4_1_runs_its_examples_on_emissary() {
    examples_on("v4.1");
}

#[test]
fn argo_v4_0_runs_its_examples_on_emissary() {
    examples_on("v4.0");
}

#[test]
fn argo_v3_7_runs_its_examples_on_emissary() {
    examples_on("v3.7");
}
