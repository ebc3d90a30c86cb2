//! Side by side on the same control plane and test kubelet: an unmodified Argo v4.1 controller
//! running the same workflows with Argo's own executor (argoexec built from the same module,
//! `tests/cluster/build.sh OUT argoexec`) and with ours, interleaved, medians of each.
//! A benchmark, not a test: `make bench` runs it (`cargo test -- --ignored argo_executors`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::{Value, json};

use crate::k8s::*;
use crate::k8s_argo::{Argo, Setup, argo, install};

/// Argo's own executor image, which the test kubelet maps to the argoexec built from Argo's
/// v4.1 module.
const ARGO_EXECUTOR: &str = "quay.io/argoproj/argoexec:v4.1.4";

fn rounds() -> usize {
    std::env::var("EMISSARY_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Argo's controller with Argo's executor, in a namespace of its own, with the executor's
/// recommended role (Argo's quick-start `executor` Role: task results create and patch).
fn argo_with_its_own_executor() -> Argo {
    let argo = install(
        "v4.1",
        &Setup {
            config: json!({"executor": {"image": ARGO_EXECUTOR}}),
            ..Setup::default()
        },
    );
    let ns = &argo.ns;
    apply(
        installed().cluster,
        &[
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "executor", "namespace": ns},
                   "rules": [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                              "verbs": ["create", "patch"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "executor-default", "namespace": ns},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "executor"},
                   "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}),
        ],
    )
    .unwrap();
    argo
}

struct Observed {
    /// Submission to the workflow's Succeeded, seconds.
    wall: f64,
    /// When the workflow was seen Succeeded, as `/proc/uptime` says (the clock the step's
    /// command reads too).
    succeeded_uptime: f64,
    pods: Vec<Pod>,
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// When the one-step workflow's command ended: the uptime it printed last, from its log.
fn command_ended(pod: &Pod) -> Option<f64> {
    let log = std::fs::read_to_string(pod_dir(pod).join("logs/main-0.log")).ok()?;
    log.lines()
        .rev()
        .find_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
}

fn workflows(ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Workflow");
    Api::namespaced_with(
        installed().cluster.client.clone(),
        ns,
        &ApiResource::from_gvk(&gvk),
    )
}

fn pods_of(ns: &str, workflow: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(installed().cluster.client.clone(), ns);
    let params =
        ListParams::default().labels(&format!("workflows.argoproj.io/workflow={workflow}"));
    installed()
        .cluster
        .block_on(pods.list(&params))
        .map(|l| l.items)
        .unwrap_or_default()
}

fn main_terminated(pods: &[Pod]) -> bool {
    pods.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.name == "main" && c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
    })
}

/// Submits `yaml` and watches it to the end every 20 ms.
fn run(argo: &Argo, yaml: &str) -> Observed {
    let started = Instant::now();
    let name = argo.submit_text(yaml);
    let api = workflows(&argo.ns);
    let limit = Duration::from_secs(600);
    loop {
        let wf = installed().cluster.block_on(api.get(&name)).unwrap().data;
        match wf.pointer("/status/phase").and_then(Value::as_str) {
            Some("Succeeded") => {
                return Observed {
                    wall: started.elapsed().as_secs_f64(),
                    succeeded_uptime: uptime(),
                    pods: pods_of(&argo.ns, &name),
                };
            }
            Some("Failed" | "Error") => panic!("{name}: {}", crate::k8s_argo::summary(&wf)),
            _ => {}
        }
        assert!(started.elapsed() < limit, "{name} did not end in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the pods of a namespace (no garbage collector runs here), so their copies of the
/// executor leave the disk between runs.
fn clean(ns: &str) {
    let _ = installed().cluster.kubectl([
        "-n",
        ns,
        "delete",
        "pods",
        "--all",
        "--wait=true",
        "--timeout=120s",
    ]);
    let _ = installed()
        .cluster
        .kubectl(["-n", ns, "delete", "workflows", "--all", "--wait=false"]);
}

fn pod_dir(pod: &Pod) -> PathBuf {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    installed()
        .cluster
        .ready
        .dir
        .join("kubelet")
        .join(emissary_tests::cluster::NODE)
        .join("pods")
        .join(uid)
}

/// Peak resident set of each container of `pod`, KiB, from the test kubelet's record.
fn peak_rss(pod: &Pod) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(pod_dir(pod).join("usage.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|u| {
            Some((
                u["container"].as_str()?.to_owned(),
                u["maxrssKiB"].as_f64()?,
            ))
        })
        .collect()
}

/// The bytes `init` copied into the pod: the executor binary in `/var/run/argo`.
fn copied_into(pod: &Pod) -> Option<u64> {
    let file = pod_dir(pod).join("volumes/var-run-argo/argoexec");
    std::fs::metadata(file).ok().map(|m| m.len())
}

const ONE_STEP: &str = r#"
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: bench-one-}
spec:
  entrypoint: one
  templates:
  - name: one
    container: {image: busybox, command: [sh, -c, 'echo hello; cat /proc/uptime']}
"#;

fn sequence(steps: usize) -> String {
    let list: String = (0..steps)
        .map(|i| format!("    - - {{name: s{i}, template: one}}\n"))
        .collect();
    format!(
        "apiVersion: argoproj.io/v1alpha1\nkind: Workflow\nmetadata: {{generateName: bench-seq-}}\n\
         spec:\n  entrypoint: seq\n  templates:\n  - name: seq\n    steps:\n{list}  - name: one\n    \
         container: {{image: busybox, command: [echo, hello]}}\n"
    )
}

fn fan_out(pods: usize) -> String {
    format!(
        "apiVersion: argoproj.io/v1alpha1\nkind: Workflow\nmetadata: {{generateName: bench-fan-}}\n\
         spec:\n  entrypoint: fan\n  parallelism: {pods}\n  templates:\n  - name: fan\n    steps:\n    \
         - - {{name: p, template: one, withSequence: {{count: \"{pods}\"}}}}\n  - name: one\n    \
         container: {{image: busybox, command: [echo, hello]}}\n"
    )
}

/// From the Stop patch to the step's `main` seen terminated, seconds; `None` past `limit`.
fn stop_latency(argo: &Argo, limit: Duration) -> Option<f64> {
    let name = argo.submit_text(
        "apiVersion: argoproj.io/v1alpha1\nkind: Workflow\nmetadata: {generateName: bench-stop-}\n\
         spec:\n  entrypoint: long\n  templates:\n  - name: long\n    container: {image: busybox, \
         command: [sleep, '300']}\n",
    );
    let running = crate::util::wait_until(Duration::from_secs(120), || {
        pods_of(&argo.ns, &name).iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.name == "main" && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
    });
    assert!(running, "{name} never ran");
    let patch = json!({"spec": {"shutdown": "Stop"}}).to_string();
    let patched = Instant::now();
    let out = installed().cluster.kubectl([
        "-n", &argo.ns, "patch", "workflow", &name, "--type", "merge", "-p", &patch,
    ]);
    assert!(out.status.success());
    let stopped = crate::util::wait_until(limit, || main_terminated(&pods_of(&argo.ns, &name)));
    stopped.then(|| patched.elapsed().as_secs_f64())
}

#[test]
#[ignore = "a benchmark: make bench runs it"]
fn argo_executors_side_by_side() {
    let theirs = argo_with_its_own_executor();
    let ours = argo("v4.1");
    let executors: [(&str, &Argo); 2] = [("argoexec", &theirs), ("emissary", ours)];
    let mut figures: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut record = |who: &'static str, what: &'static str, value: f64| {
        figures.entry((who, what)).or_default().push(value);
    };
    let rounds = rounds();
    for round in 0..rounds {
        for (who, argo) in executors {
            eprintln!("round {round}: {who}");
            let one = run(argo, ONE_STEP);
            record(who, "one-step wall (s)", one.wall);
            let ended = command_ended(&one.pods[0]).unwrap_or(f64::NAN);
            record(
                who,
                "command ended -> workflow Succeeded (s)",
                one.succeeded_uptime - ended,
            );
            for (container, kib) in peak_rss(&one.pods[0]) {
                match container.as_str() {
                    "init" => record(who, "init peak RSS (MiB)", kib / 1024.0),
                    "wait" => record(who, "wait peak RSS (MiB)", kib / 1024.0),
                    "main" => record(who, "main wrapper peak RSS (MiB)", kib / 1024.0),
                    _ => {}
                }
            }
            if let Some(bytes) = copied_into(&one.pods[0]) {
                record(who, "bytes copied into each pod (MB)", bytes as f64 / 1e6);
            }
            record(
                who,
                "20-step sequence wall (s)",
                run(argo, &sequence(20)).wall,
            );
            clean(&argo.ns);
            record(who, "50-pod fan-out wall (s)", run(argo, &fan_out(50)).wall);
            clean(&argo.ns);
        }
    }
    // Stop: Argo's executor is reached through `pods/exec`, which the test kubelet does not
    // serve; the row says so rather than pretend.
    for (who, argo) in executors {
        let latency = stop_latency(argo, Duration::from_secs(20));
        record(
            who,
            "Stop -> process gone (s)",
            latency.unwrap_or(f64::INFINITY),
        );
        clean(&argo.ns);
    }
    let image = |path: PathBuf| std::fs::metadata(path).map_or(f64::NAN, |m| m.len() as f64 / 1e6);
    let ours_image = image(emissary_tests::cluster::image_dir().join("argoexec.oci.tar"));
    let theirs_binary = image(emissary_tests::cluster::cluster_bin().join("argo-v4.1/argoexec"));

    println!(
        "\nArgo v4.1.4 controller, same cluster, {rounds} interleaved rounds, medians (range):\n"
    );
    println!("| | Argo's argoexec | emissary | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| executor image (MB; Argo's: its binary alone, a lower bound) | {theirs_binary:.1} | {ours_image:.1} | {:.0}x smaller |",
        theirs_binary / ours_image
    );
    let whats: Vec<&str> = {
        let mut seen = Vec::new();
        for (_, what) in figures.keys() {
            if !seen.contains(what) {
                seen.push(*what);
            }
        }
        seen
    };
    // The median, and the range over the rounds: "ahead in every round" is read off those.
    let shown = |xs: &[f64]| {
        let (low, high) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                (l.min(*x), h.max(*x))
            });
        format!("{:.2} ({low:.2}-{high:.2})", median(xs.to_vec()))
    };
    for what in whats {
        let all = |who| figures.get(&(who, what)).cloned().unwrap_or_default();
        let (theirs_all, ours_all) = (all("argoexec"), all("emissary"));
        let (theirs, ours) = (median(theirs_all.clone()), median(ours_all.clone()));
        let ratio = if theirs.is_infinite() {
            "needs pods/exec".to_owned()
        } else if ours > 0.0 {
            format!("{:.1}x", theirs / ours)
        } else {
            "-".to_owned()
        };
        println!(
            "| {what} | {} | {} | {ratio} |",
            shown(&theirs_all),
            shown(&ours_all)
        );
    }
}
