//! A test kubelet (and a one-line scheduler): registers a Node, binds unscheduled pods to it,
//! runs them with the shim of `runtime.rs`, and writes their status as a kubelet does.
//!
//! What it honours: init containers in order, then the containers together; native sidecars
//! (init containers with `restartPolicy: Always`: started before the containers, stopped
//! after them); `restartPolicy` Never, OnFailure and Always (back-off 1 s, doubling to 10 s);
//! `activeDeadlineSeconds` (reason DeadlineExceeded); graceful deletion (TERM to the
//! containers, then to the sidecars, KILL when the grace period ends, then the pod is removed);
//! the volumes and environment of `podspec.rs`; memory limits (a memory cgroup per container;
//! an OOM kill is reason OOMKilled); `terminationMessagePath` and `FallbackToLogsOnError`.
//! Not served: `exec`, `logs`, `attach` and `port-forward` (there is no kubelet API port);
//! container logs are files in the cluster's directory (`kubelet/NODE/pods/UID/logs/`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::images::Images;
use crate::cluster::podspec::{self, PodFields, Waiting};
use crate::cluster::runtime::Report;

pub const KUBELET_VERSION: &str = "v1.34.12";

/// Every running shim, so that a stopping cluster can end its containers first.
static SHIMS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Kills every container of every kubelet of this process (their shims, whose PID 1s follow).
pub fn kill_all_containers() {
    for pid in SHIMS.lock().unwrap().drain(..) {
        // SAFETY: kill(2) of a shim this process started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

pub struct Kubelet {
    pub node: String,
    client: kube::Client,
    dir: PathBuf,
    images: Arc<Images>,
    /// The binary whose `shim` subcommand starts a container (this one).
    shim: PathBuf,
    cgroups: Option<Cgroups>,
    host_ip: String,
    /// `KUBERNETES_SERVICE_HOST` and `_PORT`, as a kubelet gives every container for the
    /// `kubernetes` Service: here the API server itself (pods share the host's network).
    service_env: Vec<(String, String)>,
}

fn log(message: impl std::fmt::Display) {
    eprintln!("{} kubelet: {message}", now_rfc3339());
}

fn now_rfc3339() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    format!("{:.0}", ts)
}

impl Kubelet {
    pub fn new(
        node: &str,
        client: kube::Client,
        dir: &Path,
        images: Arc<Images>,
        shim: &Path,
        api_server: &str,
    ) -> Kubelet {
        let (host, port) = api_server
            .trim_start_matches("https://")
            .rsplit_once(':')
            .unwrap_or(("127.0.0.1", "443"));
        Kubelet {
            node: node.to_owned(),
            client,
            dir: dir.join(node),
            images,
            shim: shim.to_owned(),
            cgroups: Cgroups::create(&format!("emissary-cluster-{}-{node}", std::process::id())),
            host_ip: "127.0.0.1".into(),
            service_env: vec![
                ("KUBERNETES_SERVICE_HOST".into(), host.to_owned()),
                ("KUBERNETES_SERVICE_PORT".into(), port.to_owned()),
            ],
        }
    }

    /// Creates this kubelet's Node, Ready.
    pub async fn register(&self) -> Result<(), String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {
                "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64"}},
        }))
        .expect("node object");
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("registering node {}: {e}", self.node)),
        }
        let now = now_rfc3339();
        let condition = |kind: &str, status: &str, reason: &str| {
            json!({"type": kind, "status": status, "reason": reason,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let resources =
            json!({"cpu": "2", "memory": "24Gi", "pods": "110", "ephemeral-storage": "50Gi"});
        let status = json!({"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "emissary-test", "systemUUID": "emissary-test", "bootID": "emissary-test",
                         "kernelVersion": kernel_version(), "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "containerRuntimeVersion": "emissary-cluster://0.1.0",
                         "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }});
        nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("node {} status: {e}", self.node))?;
        Ok(())
    }

    /// Runs the pods bound to this node until the process ends.
    pub async fn run(self: Arc<Self>) -> Result<(), String> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut stream = watcher(pods, config).default_backoff().boxed();
        let mut workers: HashMap<String, mpsc::UnboundedSender<Update>> = HashMap::new();
        let mut listed: Option<Vec<String>> = None;
        loop {
            let event = match stream.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => return Err("the pod watch ended".into()),
                Err(e) => {
                    log(format_args!("pod watch: {e}"));
                    continue;
                }
            };
            match event {
                watcher::Event::Init => listed = Some(Vec::new()),
                watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                    let Some(uid) = pod.metadata.uid.clone() else {
                        continue;
                    };
                    if let Some(listed) = &mut listed {
                        listed.push(uid.clone());
                    }
                    workers.retain(|_, tx| !tx.is_closed());
                    match workers.get(&uid) {
                        Some(tx) => {
                            let _ = tx.send(Update::Pod(Box::new(pod)));
                        }
                        None => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            workers.insert(uid, tx);
                            let worker = Worker::new(self.clone(), pod);
                            tokio::spawn(worker.run(rx));
                        }
                    }
                }
                watcher::Event::InitDone => {
                    // Pods that went away while the watch was down.
                    if let Some(listed) = listed.take() {
                        for (uid, tx) in &workers {
                            if !listed.contains(uid) {
                                let _ = tx.send(Update::Gone);
                            }
                        }
                    }
                }
                watcher::Event::Delete(pod) => {
                    if let Some(tx) = pod.metadata.uid.as_ref().and_then(|u| workers.remove(u)) {
                        let _ = tx.send(Update::Gone);
                    }
                }
            }
        }
    }
}

fn kernel_version() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Binds every pod without a node to one: the node its `nodeSelector` names by
/// `kubernetes.io/hostname`, else the first. Pods for another scheduler are left alone.
pub async fn schedule(client: kube::Client, nodes: Vec<String>) -> Result<(), String> {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields("spec.nodeName=");
    let mut stream = watcher(pods, config).default_backoff().boxed();
    loop {
        let pod = match stream.try_next().await {
            Ok(Some(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
            Ok(Some(_)) => continue,
            Ok(None) => return Err("the scheduler's watch ended".into()),
            Err(e) => {
                log(format_args!("scheduler watch: {e}"));
                continue;
            }
        };
        let spec = pod.spec.as_ref();
        if spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_some_and(|s| s != "default-scheduler")
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let wanted = spec
            .and_then(|s| s.node_selector.as_ref())
            .and_then(|s| s.get("kubernetes.io/hostname"));
        let Some(node) = (match wanted {
            Some(name) => nodes.iter().find(|n| *n == name),
            None => nodes.first(),
        }) else {
            continue;
        };
        let (ns, name) = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "uid": pod.metadata.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        if let Err(e) = api
            .create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
            .await
        {
            log(format_args!("binding {ns}/{name} to {node}: {e}"));
        }
    }
}

enum Update {
    Pod(Box<Pod>),
    Gone,
}

enum Event {
    Exited { name: String, attempt: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Init(usize),
    Main,
    Stopping,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Every container ended: the sidecars are stopped, then the pod is final.
    Completed,
    /// An init container failed for good.
    InitFailed,
    DeadlineExceeded,
    Deleted,
}

struct Stop {
    reason: StopReason,
    kill_at: Instant,
    /// Containers that were sent SIGTERM.
    signalled: Vec<String>,
}

#[derive(Debug, Clone)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
        shim: i32,
        report: PathBuf,
    },
    Terminated(Value),
}

struct Ctr {
    spec: Container,
    init: bool,
    state: State,
    last_state: Option<Value>,
    restart_count: i32,
    /// Terminated for good: no restart will follow.
    done: bool,
    /// When a start (first, retried, or restart) may happen.
    start_at: Option<Instant>,
    backoff: Duration,
    ever_started: bool,
    cgroup: Option<PathBuf>,
}

impl Ctr {
    fn is_sidecar(&self) -> bool {
        self.init && self.spec.restart_policy.as_deref() == Some("Always")
    }
    fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }
    fn exit_code(&self) -> Option<i64> {
        match &self.state {
            State::Terminated(t) => t["exitCode"].as_i64(),
            _ => None,
        }
    }
}

struct Worker {
    kubelet: Arc<Kubelet>,
    pod: Pod,
    dir: PathBuf,
    events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    volumes: Option<HashMap<String, PathBuf>>,
    volume_error: Option<Waiting>,
    order: Vec<String>,
    ctrs: HashMap<String, Ctr>,
    stage: Stage,
    stop: Option<Stop>,
    started: Instant,
    start_time: String,
    phase: &'static str,
    reason: Option<&'static str>,
    message: Option<String>,
    conditions: BTreeMap<&'static str, (bool, String)>,
    published: Option<Value>,
    wake_at: Option<Instant>,
    gone: bool,
    delete_sent: bool,
}

const DEADLINE_MESSAGE: &str = "Pod was active on the node longer than the specified deadline";

impl Worker {
    fn new(kubelet: Arc<Kubelet>, pod: Pod) -> Worker {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = kubelet.dir.join("pods").join(&uid);
        let spec = pod.spec.clone().unwrap_or_default();
        let mut order = Vec::new();
        let mut ctrs = HashMap::new();
        for (init, list) in [
            (true, spec.init_containers.unwrap_or_default()),
            (false, spec.containers),
        ] {
            for c in list {
                order.push(c.name.clone());
                ctrs.insert(
                    c.name.clone(),
                    Ctr {
                        spec: c,
                        init,
                        state: State::Waiting {
                            reason: "PodInitializing".into(),
                            message: None,
                        },
                        last_state: None,
                        restart_count: 0,
                        done: false,
                        start_at: None,
                        backoff: Duration::from_secs(1),
                        ever_started: false,
                        cgroup: None,
                    },
                );
            }
        }
        Worker {
            kubelet,
            pod,
            dir,
            events: mpsc::unbounded_channel(),
            volumes: None,
            volume_error: None,
            order,
            ctrs,
            stage: Stage::Init(0),
            stop: None,
            started: Instant::now(),
            start_time: now_rfc3339(),
            phase: "Pending",
            reason: None,
            message: None,
            conditions: BTreeMap::new(),
            published: None,
            wake_at: None,
            gone: false,
            delete_sent: false,
        }
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or(""),
            self.pod.metadata.name.as_deref().unwrap_or("")
        )
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.pod
                .metadata
                .deletion_grace_period_seconds
                .or(self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30)
                .max(0) as u64,
        )
    }

    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>) {
        for dir in [
            "volumes",
            "layers",
            "logs",
            "reports",
            "specs",
            "termination",
        ] {
            let _ = fs::create_dir_all(self.dir.join(dir));
        }
        log(format_args!("pod {} added", self.name()));
        loop {
            self.step().await;
            self.publish().await;
            if self.gone && self.ctrs.values().all(|c| !c.running()) {
                break;
            }
            let sleep = async {
                match self.wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => self.on_update(update),
                    None => self.on_update(Update::Gone),
                },
                Some(event) = self.events.1.recv() => self.on_event(event),
                _ = sleep => {}
            }
        }
        self.cleanup();
        log(format_args!("pod {} removed", self.name()));
    }

    fn on_update(&mut self, update: Update) {
        match update {
            Update::Pod(pod) => self.pod = *pod,
            Update::Gone => {
                // Removed from the API (a forced delete, or our own final delete): nothing more
                // to report, and nothing may keep running.
                self.gone = true;
                for ctr in self.ctrs.values() {
                    if let State::Running { shim, report, .. } = &ctr.state {
                        kill(*shim, report, libc::SIGKILL);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let Event::Exited { name, attempt } = event;
        self.on_exit(&name, attempt);
    }

    /// Moves the pod forward as far as it can go now, and sets when to look again.
    async fn step(&mut self) {
        self.wake_at = None;
        if self.gone {
            return;
        }
        if self.stop.is_none() && self.stage != Stage::Done {
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.begin_stop(StopReason::Deleted, self.grace());
            } else if let Some(deadline) = self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.active_deadline_seconds)
            {
                let at = self.started + Duration::from_secs(deadline.max(0) as u64);
                if Instant::now() >= at {
                    self.begin_stop(StopReason::DeadlineExceeded, self.grace());
                } else {
                    self.wake(at);
                }
            }
        }
        if self.stop.is_some() {
            self.drive_stop().await;
        }
        if self.stage == Stage::Done {
            self.finish_deletion().await;
            return;
        }
        if self.stop.is_some() {
            return;
        }
        if self.volumes.is_none() {
            let fields = PodFields {
                pod: &self.pod,
                node: &self.kubelet.node,
                host_ip: &self.kubelet.host_ip,
            };
            match podspec::prepare_volumes(&self.kubelet.client, &fields, &self.dir.join("volumes"))
                .await
            {
                Ok(volumes) => {
                    self.volumes = Some(volumes);
                    self.volume_error = None;
                }
                Err(waiting) => {
                    self.volume_error = Some(waiting);
                    self.wake(Instant::now() + Duration::from_secs(1));
                    return;
                }
            }
        }
        loop {
            match self.stage {
                Stage::Init(i) => {
                    let Some(name) = self
                        .order
                        .iter()
                        .filter(|n| self.ctrs[*n].init)
                        .nth(i)
                        .cloned()
                    else {
                        self.stage = Stage::Main;
                        continue;
                    };
                    if self.ctrs[&name].is_sidecar() {
                        // Started, then the next one: a native sidecar does not block.
                        self.start_if_due(&name).await;
                        if self.ctrs[&name].ever_started {
                            self.stage = Stage::Init(i + 1);
                            continue;
                        }
                        return;
                    }
                    let ctr = &self.ctrs[&name];
                    if ctr.done {
                        if ctr.exit_code() == Some(0) {
                            self.stage = Stage::Init(i + 1);
                            continue;
                        }
                        self.begin_stop(StopReason::InitFailed, self.grace());
                        self.drive_stop().await;
                        return;
                    }
                    self.start_if_due(&name).await;
                    return;
                }
                Stage::Main => {
                    let mains: Vec<String> = self
                        .order
                        .iter()
                        .filter(|n| !self.ctrs[*n].init)
                        .cloned()
                        .collect();
                    for name in &mains {
                        self.start_if_due(name).await;
                    }
                    let sidecars: Vec<String> = self
                        .order
                        .iter()
                        .filter(|n| self.ctrs[*n].is_sidecar())
                        .cloned()
                        .collect();
                    for name in &sidecars {
                        self.start_if_due(name).await;
                    }
                    if mains.iter().all(|n| self.ctrs[n].done) {
                        self.begin_stop(StopReason::Completed, self.grace());
                        self.drive_stop().await;
                    }
                    return;
                }
                Stage::Stopping | Stage::Done => return,
            }
        }
    }

    fn wake(&mut self, at: Instant) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }

    /// Starts `name` if it is waiting (first start, a retry, or a restart) and its time came.
    async fn start_if_due(&mut self, name: &str) {
        let ctr = &self.ctrs[name];
        if ctr.running() || ctr.done {
            return;
        }
        if let Some(at) = ctr.start_at
            && Instant::now() < at
        {
            self.wake(at);
            return;
        }
        if let Err(waiting) = self.start(name).await {
            let ctr = self.ctrs.get_mut(name).expect("known container");
            ctr.state = State::Waiting {
                reason: waiting.reason.into(),
                message: Some(waiting.message),
            };
            let retry = Instant::now() + Duration::from_secs(2);
            ctr.start_at = Some(retry);
            self.wake(retry);
        }
    }

    async fn start(&mut self, name: &str) -> Result<(), Waiting> {
        let container = self.ctrs[name].spec.clone();
        let image_ref = container.image.clone().unwrap_or_default();
        let image = self
            .kubelet
            .images
            .resolve(&image_ref)
            .map_err(|message| Waiting {
                reason: "ErrImagePull",
                message,
            })?;
        let fields = PodFields {
            pod: &self.pod,
            node: &self.kubelet.node,
            host_ip: &self.kubelet.host_ip,
        };
        let mut env = self.kubelet.service_env.clone();
        env.extend(podspec::resolve_env(&self.kubelet.client, &fields, &container).await?);
        let attempt = self.ctrs[name].restart_count;
        let id = format!("{name}-{attempt}");
        let termination = self.dir.join("termination").join(&id);
        fs::write(&termination, b"").map_err(|e| Waiting::config(e.to_string()))?;
        fs::set_permissions(&termination, fs::Permissions::from_mode(0o666))
            .map_err(|e| Waiting::config(e.to_string()))?;
        let report = self.dir.join("reports").join(format!("{id}.jsonl"));
        let _ = fs::remove_file(&report);
        let limit = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| podspec::quantity_bytes(&q.0));
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        let cgroup = self
            .kubelet
            .cgroups
            .as_ref()
            .and_then(|c| c.container(&uid, &id, limit));
        let spec = podspec::container_spec(
            &self.pod,
            &container,
            &image,
            env,
            self.volumes.as_ref().expect("volumes before containers"),
            self.dir.join("layers").join(&id),
            termination,
            cgroup.iter().cloned().collect(),
            report.clone(),
        )?;
        let spec_file = self.dir.join("specs").join(format!("{id}.json"));
        fs::write(&spec_file, serde_json::to_vec_pretty(&spec).expect("spec"))
            .map_err(|e| Waiting::config(e.to_string()))?;
        let log_file = fs::File::create(self.dir.join("logs").join(format!("{id}.log")))
            .map_err(|e| Waiting::config(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&self.kubelet.shim);
        cmd.arg("shim")
            .arg(&spec_file)
            .stdin(std::process::Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(|e| Waiting::config(e.to_string()))?,
            )
            .stderr(log_file)
            .env_clear()
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; a container must not outlive its kubelet.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Waiting::config(format!("starting the shim: {e}")))?;
        let shim = child.id().unwrap_or(0) as i32;
        SHIMS.lock().unwrap().push(shim);
        let events = self.events.0.clone();
        let owned_name = name.to_owned();
        tokio::spawn(async move {
            let _ = child.wait().await;
            SHIMS.lock().unwrap().retain(|p| *p != shim);
            let _ = events.send(Event::Exited {
                name: owned_name,
                attempt,
            });
        });
        let ctr = self.ctrs.get_mut(name).expect("known container");
        ctr.state = State::Running {
            started_at: now_rfc3339(),
            shim,
            report,
        };
        ctr.ever_started = true;
        ctr.start_at = None;
        ctr.cgroup = cgroup;
        log(format_args!(
            "pod {} container {name} started ({})",
            self.name(),
            image_ref
        ));
        Ok(())
    }

    fn on_exit(&mut self, name: &str, attempt: i32) {
        let policy = self.restart_policy().to_owned();
        let stopping = self.stop.is_some() || self.gone;
        let log_dir = self.dir.join("logs");
        let termination_dir = self.dir.join("termination");
        let cgroups = self.kubelet.cgroups.clone();
        let pod_name = self.name();
        let Some(ctr) = self.ctrs.get_mut(name) else {
            return;
        };
        if ctr.restart_count != attempt {
            return;
        }
        let State::Running {
            started_at, report, ..
        } = &ctr.state
        else {
            return;
        };
        let r = Report::read(report);
        let oom = match (&cgroups, &ctr.cgroup) {
            (Some(c), Some(path)) => c.oom_kills(path) > 0,
            _ => false,
        };
        let id = format!("{name}-{attempt}");
        let (code, reason, mut message) = if let Some(error) = r.start_error {
            (128, "StartError", error)
        } else {
            let code = r.exit.unwrap_or(128 + r.signal.unwrap_or(libc::SIGKILL));
            // As containerd: an OOM kill anywhere in the container's cgroup names its end.
            let reason = match (code, oom) {
                (0, _) => "Completed",
                (_, true) => "OOMKilled",
                _ => "Error",
            };
            (code, reason, String::new())
        };
        if message.is_empty() {
            message = read_limited(&termination_dir.join(&id), 4096);
        }
        if message.is_empty()
            && code != 0
            && ctr.spec.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        {
            message = log_tail(&log_dir.join(format!("{id}.log")));
        }
        let mut terminated = json!({"exitCode": code, "reason": reason,
            "startedAt": started_at, "finishedAt": now_rfc3339(),
            "containerID": container_id(&pod_name, &id)});
        if !message.is_empty() {
            terminated["message"] = json!(message);
        }
        if let Some(signal) = r.signal {
            terminated["signal"] = json!(signal);
        }
        // What each container used, for the benchmarks: `pods/UID/usage.jsonl`.
        let memory_peak = match (&cgroups, &ctr.cgroup) {
            (Some(c), Some(path)) => c.peak(path),
            _ => None,
        };
        let usage = json!({"container": name, "attempt": attempt, "exitCode": code,
            "maxrssKiB": r.maxrss_kb, "memoryPeakBytes": memory_peak});
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("usage.jsonl"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{usage}\n").as_bytes()));
        if let (Some(c), Some(path)) = (&cgroups, ctr.cgroup.take()) {
            c.remove(&path);
        }
        let restart = !stopping
            && if ctr.is_sidecar() {
                true
            } else if ctr.init {
                code != 0 && policy != "Never"
            } else {
                policy == "Always" || (policy == "OnFailure" && code != 0)
            };
        log(format_args!(
            "pod {pod_name} container {name} exited {code} ({reason}){}",
            if restart { ", restarting" } else { "" }
        ));
        ctr.state = State::Terminated(terminated.clone());
        if restart {
            ctr.last_state = Some(json!({"terminated": terminated}));
            ctr.restart_count += 1;
            ctr.start_at = Some(Instant::now() + ctr.backoff);
            ctr.backoff = (ctr.backoff * 2).min(Duration::from_secs(10));
        } else {
            ctr.done = true;
        }
    }

    fn begin_stop(&mut self, reason: StopReason, grace: Duration) {
        if self.stop.is_some() {
            return;
        }
        log(format_args!(
            "pod {} stopping ({reason:?}, grace {grace:?})",
            self.name()
        ));
        self.stage = Stage::Stopping;
        if reason == StopReason::DeadlineExceeded {
            self.reason = Some("DeadlineExceeded");
            self.message = Some(DEADLINE_MESSAGE.into());
        }
        self.stop = Some(Stop {
            reason,
            kill_at: Instant::now() + grace,
            signalled: Vec::new(),
        });
        for ctr in self.ctrs.values_mut() {
            if !ctr.running() {
                ctr.done = true;
            }
        }
    }

    /// TERM to the containers, then (once they are gone) to the sidecars; KILL to whatever
    /// runs when the grace period ends; then the pod is final.
    async fn drive_stop(&mut self) {
        let Some(stop) = self.stop.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mains_running = self.ctrs.values().any(|c| c.running() && !c.is_sidecar());
        for name in self.order.iter().rev() {
            let ctr = &self.ctrs[name];
            let State::Running { shim, report, .. } = &ctr.state else {
                continue;
            };
            if now >= stop.kill_at {
                kill(*shim, report, libc::SIGKILL);
            } else if (!ctr.is_sidecar() || !mains_running) && !stop.signalled.contains(name) {
                kill(*shim, report, libc::SIGTERM);
                stop.signalled.push(name.clone());
            }
        }
        if self.ctrs.values().any(Ctr::running) {
            let at = if now >= stop.kill_at {
                now + Duration::from_millis(200)
            } else {
                stop.kill_at
            };
            self.wake(at);
            return;
        }
        let reason = stop.reason;
        for ctr in self.ctrs.values_mut() {
            ctr.done = true;
        }
        self.stage = Stage::Done;
        let mains_ok = self
            .ctrs
            .values()
            .filter(|c| !c.init)
            .all(|c| c.exit_code() == Some(0));
        self.phase = match reason {
            StopReason::DeadlineExceeded | StopReason::InitFailed => "Failed",
            StopReason::Completed | StopReason::Deleted if mains_ok => "Succeeded",
            _ => "Failed",
        };
        self.stop = None;
        log(format_args!("pod {} is {}", self.name(), self.phase));
    }

    /// Removes the pod from the API once it is final and was deleted: the API server keeps a
    /// gracefully deleted pod until its kubelet says it is gone.
    async fn finish_deletion(&mut self) {
        if self.delete_sent || self.pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        self.publish().await;
        let (ns, name) = (
            self.pod.metadata.namespace.clone().unwrap_or_default(),
            self.pod.metadata.name.clone().unwrap_or_default(),
        );
        let api: Api<Pod> = Api::namespaced(self.kubelet.client.clone(), &ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => self.delete_sent = true,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => self.delete_sent = true,
            Err(e) => {
                log(format_args!("deleting pod {ns}/{name}: {e}"));
                self.wake(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    fn condition(&mut self, kind: &'static str, status: bool) -> Value {
        let entry = self
            .conditions
            .entry(kind)
            .or_insert_with(|| (status, now_rfc3339()));
        if entry.0 != status {
            *entry = (status, now_rfc3339());
        }
        json!({"type": kind, "status": if status { "True" } else { "False" },
               "lastProbeTime": null, "lastTransitionTime": entry.1})
    }

    fn container_status(&self, name: &str) -> Value {
        let ctr = &self.ctrs[name];
        let pod_name = self.name();
        let (state, ready) = match &ctr.state {
            State::Waiting { reason, message } => {
                let reason = match (&self.volume_error, reason.as_str()) {
                    (Some(_), "PodInitializing") if !ctr.init || self.stage == Stage::Init(0) => {
                        "ContainerCreating"
                    }
                    _ => reason,
                };
                let mut waiting = json!({"reason": reason});
                if let Some(m) = message.clone().or_else(|| {
                    self.volume_error
                        .as_ref()
                        .filter(|_| reason == "ContainerCreating")
                        .map(|w| w.message.clone())
                }) {
                    waiting["message"] = json!(m);
                }
                (json!({"waiting": waiting}), false)
            }
            State::Running { started_at, .. } => {
                (json!({"running": {"startedAt": started_at}}), true)
            }
            State::Terminated(t) => (json!({"terminated": t}), false),
        };
        let mut status = json!({
            "name": name,
            "image": ctr.spec.image,
            "imageID": format!("emissary-cluster://{}", ctr.spec.image.as_deref().unwrap_or("")),
            "ready": ready,
            "started": ready,
            "restartCount": ctr.restart_count,
            "state": state,
            "lastState": ctr.last_state.clone().unwrap_or(json!({})),
        });
        if ctr.ever_started {
            status["containerID"] = json!(container_id(
                &pod_name,
                &format!("{name}-{}", ctr.restart_count)
            ));
        }
        status
    }

    /// Writes the pod's status if it changed since the last write.
    async fn publish(&mut self) {
        if self.gone {
            return;
        }
        if self.stage != Stage::Done {
            let mains: Vec<&Ctr> = self.ctrs.values().filter(|c| !c.init).collect();
            self.phase = if mains.iter().all(|c| c.ever_started) {
                "Running"
            } else {
                "Pending"
            };
        }
        let initialized = matches!(self.stage, Stage::Main)
            || (matches!(self.stage, Stage::Stopping | Stage::Done)
                && self.ctrs.values().any(|c| !c.init && c.ever_started));
        let ready = self
            .ctrs
            .values()
            .filter(|c| !c.init || c.is_sidecar())
            .all(Ctr::running);
        let conditions = vec![
            self.condition("PodReadyToStartContainers", self.volumes.is_some()),
            self.condition("Initialized", initialized),
            self.condition("Ready", ready),
            self.condition("ContainersReady", ready),
            self.condition("PodScheduled", true),
        ];
        let inits: Vec<Value> = self
            .order
            .iter()
            .filter(|n| self.ctrs[*n].init)
            .map(|n| self.container_status(n))
            .collect();
        let mains: Vec<Value> = self
            .order
            .iter()
            .filter(|n| !self.ctrs[*n].init)
            .map(|n| self.container_status(n))
            .collect();
        let mut status = json!({
            "phase": self.phase,
            "hostIP": self.kubelet.host_ip, "hostIPs": [{"ip": self.kubelet.host_ip}],
            "podIP": self.kubelet.host_ip, "podIPs": [{"ip": self.kubelet.host_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "initContainerStatuses": inits,
            "containerStatuses": mains,
        });
        if let Some(reason) = self.reason {
            status["reason"] = json!(reason);
        }
        if let Some(message) = &self.message {
            status["message"] = json!(message);
        }
        // Timestamps alone do not make a new status.
        if self.published.as_ref() == Some(&status) {
            return;
        }
        let (ns, name) = (
            self.pod.metadata.namespace.clone().unwrap_or_default(),
            self.pod.metadata.name.clone().unwrap_or_default(),
        );
        let api: Api<Pod> = Api::namespaced(self.kubelet.client.clone(), &ns);
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            Ok(_) => self.published = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.published = Some(status);
            }
            Err(e) => {
                log(format_args!("pod {ns}/{name} status: {e}"));
                self.wake(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    fn cleanup(&mut self) {
        if let Some(cgroups) = &self.kubelet.cgroups {
            for ctr in self.ctrs.values_mut() {
                if let Some(path) = ctr.cgroup.take() {
                    cgroups.remove(&path);
                }
            }
            cgroups.remove_pod(self.pod.metadata.uid.as_deref().unwrap_or(""));
        }
        // The layers may still be mounted in a dying container's namespace: best effort.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn container_id(pod: &str, id: &str) -> String {
    format!("emissary-cluster://{pod}/{id}")
}

/// Signals a container: through its shim (which forwards to PID 1), or, for SIGKILL, to its
/// PID 1 directly (the shim then reports the kill).
fn kill(shim: i32, report: &Path, signal: i32) {
    let target = if signal == libc::SIGKILL {
        Report::read(report).pid.unwrap_or(shim)
    } else {
        shim
    };
    // SAFETY: kill(2) on a pid we started (the shim is our child and not yet reaped).
    unsafe { libc::kill(target, signal) };
}

fn read_limited(path: &Path, limit: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[..bytes.len().min(limit)]).into_owned()
}

/// What kubelet takes from the log for `FallbackToLogsOnError`: the last 80 lines, at most
/// 2048 bytes.
fn log_tail(path: &Path) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let start = tail.len().saturating_sub(2048);
    let start = (start..tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(0);
    tail[start..].to_owned()
}

/// The kubelet's memory cgroups: one per container start, under one root per kubelet (v2
/// `memory.max` on a pure v2 hierarchy, else v1 `memory.limit_in_bytes`).
#[derive(Clone)]
pub struct Cgroups {
    root: PathBuf,
    v2: bool,
}

impl Cgroups {
    fn create(name: &str) -> Option<Cgroups> {
        let (parent, v2) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (Path::new("/sys/fs/cgroup"), true)
        } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
            (Path::new("/sys/fs/cgroup/memory"), false)
        } else {
            return None;
        };
        let root = parent.join(name);
        fs::create_dir_all(&root).ok()?;
        if v2 {
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        Some(Cgroups { root, v2 })
    }

    fn container(&self, pod_uid: &str, id: &str, limit: Option<u64>) -> Option<PathBuf> {
        let pod = self.root.join(format!("pod{pod_uid}"));
        fs::create_dir_all(&pod).ok()?;
        if self.v2 {
            let _ = fs::write(pod.join("cgroup.subtree_control"), "+memory");
        }
        let path = pod.join(id);
        fs::create_dir_all(&path).ok()?;
        if let Some(limit) = limit {
            let file = if self.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            fs::write(path.join(file), limit.to_string()).ok()?;
        }
        Some(path)
    }

    /// The most memory the container's cgroup held (cgroup v2 only).
    fn peak(&self, path: &Path) -> Option<u64> {
        if !self.v2 {
            return None;
        }
        fs::read_to_string(path.join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn oom_kills(&self, path: &Path) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(path.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn remove(&self, path: &Path) {
        for _ in 0..50 {
            if fs::remove_dir(path).is_ok() || !path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn remove_pod(&self, pod_uid: &str) {
        self.remove(&self.root.join(format!("pod{pod_uid}")));
    }

    /// Removes the root once every pod is gone.
    pub fn remove_root(&self) {
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    if let Ok(inner) = fs::read_dir(e.path()) {
                        for i in inner.flatten() {
                            if i.path().is_dir() {
                                let _ = fs::remove_dir(i.path());
                            }
                        }
                    }
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.root);
    }
}

impl Kubelet {
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }
}
