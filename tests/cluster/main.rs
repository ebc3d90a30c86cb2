//! `emissary-cluster`: the tests' Kubernetes cluster in one process.
//!
//! ```text
//! emissary-cluster up [--dir DIR] [--ready-file FILE] [--keep]
//!     etcd + kube-apiserver (from CLUSTER_BIN, `tests/cluster/build.sh`), a test kubelet
//!     for node emissary-node-1 and its scheduler; runs until SIGTERM or Ctrl-C, then stops
//!     every container, the API server and etcd, and removes DIR, FILE and DIR.log (unless
//!     --keep).
//! emissary-cluster shim SPEC
//!     starts one container (the kubelet's runtime; see runtime.rs).
//! emissary-cluster netns PORT -- CMD ARGS...
//!     runs CMD in a network namespace of its own that reaches only 127.0.0.1:PORT (netns.rs).
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use emissary_tests::cluster::{self, Ready, control_plane, images, kubelet};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("shim") if args.len() == 3 => cluster::runtime::shim(std::path::Path::new(&args[2])),
        Some("netns") if args.len() > 4 && args[3] == "--" => match args[2].parse() {
            Ok(port) => cluster::netns::run(port, &args[4..]),
            Err(_) => {
                eprintln!("emissary-cluster netns: {:?} is not a port", args[2]);
                std::process::exit(2);
            }
        },
        Some("up") => {
            if let Err(e) = up(&args[2..]) {
                eprintln!("emissary-cluster: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!(
                "usage: emissary-cluster up [--dir DIR] [--ready-file FILE] [--keep]\n       \
                 emissary-cluster shim SPEC\n       \
                 emissary-cluster netns PORT -- CMD [ARGS...]"
            );
            std::process::exit(2);
        }
    }
}

struct Options {
    dir: PathBuf,
    ready_file: Option<PathBuf>,
    keep: bool,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        dir: std::env::temp_dir().join(format!("emissary-cluster-{}", std::process::id())),
        ready_file: None,
        keep: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--dir" => options.dir = value()?.into(),
            "--ready-file" => options.ready_file = Some(value()?.into()),
            "--keep" => options.keep = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

fn up(args: &[String]) -> Result<(), String> {
    let options = options(args)?;
    let started = std::time::Instant::now();
    if options.dir.exists() {
        std::fs::remove_dir_all(&options.dir)
            .map_err(|e| format!("{}: {e}", options.dir.display()))?;
    }
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    let bin = cluster::cluster_bin();
    for program in ["etcd", "kube-apiserver"] {
        if !bin.join(program).exists() {
            return Err(format!(
                "{} is missing: build it with `tests/cluster/build.sh {} k8s` (make test does)",
                bin.join(program).display(),
                bin.display()
            ));
        }
    }
    let nodes = vec![cluster::NODE.to_owned()];
    let plane =
        control_plane::ControlPlane::start(&bin, &options.dir.join("control-plane"), &nodes[0])?;
    eprintln!(
        "control plane ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        plane.server
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let shim = std::env::current_exe().map_err(|e| e.to_string())?;
    let images = Arc::new(images::Images::new(
        &cluster::image_dir(),
        &options.dir.join("images"),
    ));
    let kubelets = runtime.block_on(async {
        let scheduler = cluster::client_for(&plane.kubeconfig(control_plane::SCHEDULER)).await?;
        tokio::spawn(async move {
            if let Err(e) = kubelet::schedule(scheduler, vec![cluster::NODE.to_owned()]).await {
                eprintln!("emissary-cluster: scheduler: {e}");
            }
        });
        let mut kubelets = Vec::new();
        for node in &nodes {
            let client = cluster::client_for(&plane.kubeconfig(control_plane::KUBELET)).await?;
            let k = Arc::new(kubelet::Kubelet::new(
                node,
                client,
                &options.dir.join("kubelet"),
                images.clone(),
                &shim,
                &plane.server,
            ));
            k.register().await?;
            let running = k.clone();
            tokio::spawn(async move {
                if let Err(e) = running.run().await {
                    eprintln!("emissary-cluster: kubelet: {e}");
                }
            });
            kubelets.push(k);
        }
        Ok::<_, String>(kubelets)
    })?;

    let ready = Ready {
        dir: options.dir.clone(),
        server: plane.server.clone(),
        kubeconfig: plane.kubeconfig(control_plane::ADMIN),
        ca_pem: plane.ca_pem.clone(),
        nodes: nodes.clone(),
    };
    let text = serde_json::to_string_pretty(&ready).map_err(|e| e.to_string())?;
    if let Some(path) = &options.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    eprintln!(
        "cluster up in {:.1} s; KUBECONFIG={}",
        started.elapsed().as_secs_f64(),
        ready.kubeconfig.display()
    );

    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, String>(())
    })?;
    eprintln!("stopping the cluster");
    kubelet::kill_all_containers();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for k in &kubelets {
        if let Some(c) = k.cgroups() {
            c.remove_root();
        }
    }
    drop(plane);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if !options.keep {
        let _ = std::fs::remove_dir_all(&options.dir);
        if let Some(path) = &options.ready_file {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(cluster::log_path(&options.dir));
    }
    Ok(())
}
