//! A real Kubernetes control plane for the tests: etcd and kube-apiserver built from their Go
//! modules (`tests/cluster/build.sh`, pinned in `tests/cluster/go/`), and a test kubelet of
//! ours that runs pods with Linux namespaces. `emissary-cluster up` runs them all; the tests
//! start one such process and talk to its API server as any client would.

pub mod control_plane;
pub mod images;
pub mod kubelet;
pub mod netns;
pub mod podspec;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

/// The node of the test cluster's first kubelet.
pub const NODE: &str = "emissary-node-1";

/// What `emissary-cluster up` writes to its ready file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub dir: PathBuf,
    pub server: String,
    /// The admin (system:masters) kubeconfig.
    pub kubeconfig: PathBuf,
    pub ca_pem: String,
    pub nodes: Vec<String>,
}

/// A running test cluster, as the tests see it: an API server and an admin client.
pub struct Cluster {
    pub ready: Ready,
    pub client: kube::Client,
    runtime: tokio::runtime::Runtime,
    next_namespace: std::sync::atomic::AtomicUsize,
}

/// Directories the cluster needs, from the environment `make test` sets, else the defaults
/// under the workspace's `target/`.
pub fn cluster_bin() -> PathBuf {
    env_dir("CLUSTER_BIN", "target/cluster-bin")
}

pub fn image_dir() -> PathBuf {
    env_dir("IMAGE_DIR", "target/images")
}

fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(default)
    })
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// Where the test harness writes the log of `emissary-cluster up --dir DIR`: beside DIR, and
/// removed with it (unless `--keep`).
pub fn log_path(dir: &Path) -> PathBuf {
    dir.with_extension("log")
}

impl Cluster {
    /// The cluster every test of this process shares, started on first use by running
    /// `binary up` (the `emissary-cluster` binary). It stops when this process exits; with
    /// `EMISSARY_CLUSTER_KEEP` set, its directory (logs, pods) is kept.
    pub fn shared(binary: &Path) -> &'static Cluster {
        SHARED.get_or_init(|| Cluster::start(binary).unwrap_or_else(|e| panic!("{e}")))
    }

    fn start(binary: &Path) -> Result<Cluster, String> {
        let started = Instant::now();
        let dir = std::env::temp_dir().join(format!("emissary-cluster-{}", std::process::id()));
        let ready_file = dir.with_extension("ready.json");
        let _ = std::fs::remove_file(&ready_file);
        let log = log_path(&dir);
        let mut cmd = Command::new(binary);
        cmd.arg("up")
            .arg("--dir")
            .arg(&dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(std::env::var_os("EMISSARY_CLUSTER_KEEP").map(|_| "--keep"))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
        let pid = spawn_tied_to_this_process(cmd)?;
        let limit = Duration::from_secs(120);
        loop {
            if let Ok(bytes) = std::fs::read(&ready_file) {
                let ready: Ready = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                eprintln!(
                    "test cluster up in {:.1} s: {} (KUBECONFIG={})",
                    started.elapsed().as_secs_f64(),
                    ready.server,
                    ready.kubeconfig.display()
                );
                return Cluster::connect(ready);
            }
            // SAFETY: kill(pid, 0) only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid);
            if !alive || started.elapsed() > limit {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                return Err(format!(
                    "the test cluster did not start ({}): {}\n{}",
                    if alive { "timed out" } else { "it exited" },
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A handle on a cluster that is already up.
    pub fn connect(ready: Ready) -> Result<Cluster, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = runtime.block_on(client_for(&ready.kubeconfig))?;
        Ok(Cluster {
            ready,
            client,
            runtime,
            next_namespace: Default::default(),
        })
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A fresh namespace, ready for pods as a cluster with a controller manager would have it:
    /// its `default` ServiceAccount and its `kube-root-ca.crt` ConfigMap exist.
    pub fn namespace(&self, prefix: &str) -> String {
        let n = self
            .next_namespace
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        self.block_on(prepare_namespace(&self.client, &name, &self.ready.ca_pem))
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        name
    }

    /// `kubectl ARGS...` against this cluster as admin.
    pub fn kubectl<I, S>(&self, args: I) -> std::process::Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Command::new("kubectl")
            .env("KUBECONFIG", &self.ready.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl")
    }
}

/// A client with the credentials of `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    // Two TLS providers are linked (the AWS SDK brings its own); kube's client takes the
    // process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Creates `name` with what the controller manager (which this cluster does not run) would
/// add: the `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap.
pub async fn prepare_namespace(
    client: &kube::Client,
    name: &str,
    ca_pem: &str,
) -> Result<(), String> {
    let create = |e: kube::Error| match e {
        kube::Error::Api(ref a) if a.code == 409 => Ok(()),
        e => Err(e.to_string()),
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    if let Err(e) = namespaces.create(&PostParams::default(), &ns).await {
        create(e)?;
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let sa = serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
    if let Err(e) = accounts.create(&PostParams::default(), &sa).await {
        create(e)?;
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), name);
    let cm = serde_json::from_value(
        json!({"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca_pem}}),
    )
    .expect("configmap");
    if let Err(e) = maps.create(&PostParams::default(), &cm).await {
        create(e)?;
    }
    Ok(())
}

/// Spawns `cmd` from a thread that lives as long as this process, with SIGTERM as its
/// parent-death signal: when the test process ends, however it ends, the child is told to
/// stop. (The signal follows the thread that forked, hence the dedicated thread.)
fn spawn_tied_to_this_process(mut cmd: Command) -> Result<i32, String> {
    use std::os::unix::process::CommandExt;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("cluster-parent".into())
        .spawn(move || {
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id() as i32));
                    let _ = child.wait();
                    // Keep the thread: nothing else may be forked from it.
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot start {:?}: {e}", cmd.get_program())));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())?
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}
