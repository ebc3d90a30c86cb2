//! `emissary-agent serve`: wires the pieces and runs until SIGTERM.
//!
//! Shutdown: stop accepting, let in-flight requests (uploads) finish within the shutdown
//! timeout, then give the outbox the rest of it to drain to the controller; what is left stays
//! journaled for the next start.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::argo::Argo;
use crate::attempts::Attempts;
use crate::cache::Cache;
use crate::commands::Commands;
use crate::config::Settings;
use crate::controller::{self, Sink};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::server::{self, App};
use crate::store::{S3Settings, Store};
use crate::token::Secret;

/// Open API connections at most: far above a node's emissaries (a few each), far below what
/// exhausts the agent's memory or descriptors.
const CONNECTIONS: usize = 4096;

pub async fn serve(settings: Settings) -> Result<(), String> {
    let secret = Secret::from_file(&settings.secret_file)?;
    let _owner = own_data_dir(&settings.data_dir)?;
    let s3 = S3Settings {
        endpoint: settings.s3_endpoint.clone(),
        region: settings.s3_region.clone(),
        path_style: settings.s3_path_style,
    };
    let store = Store::open(&settings.store, &s3).await?;
    {
        let (store, started) = (store.clone(), std::time::SystemTime::now());
        tokio::task::spawn_blocking(move || {
            let removed = store.sweep_leftovers(started);
            if removed > 0 {
                info!(removed, "removed temporary files of uploads cut by a crash");
            }
        });
    }
    let data = &settings.data_dir;
    let outbox = Outbox::open(
        &data.join("journal"),
        settings.journal_max_bytes,
        settings.quotas.journal_bytes,
    )
    .map_err(|e| {
        format!(
            "cannot open the journal in {}: {e}",
            data.join("journal").display()
        )
    })?;
    let attempts = Attempts::open(data, settings.quotas.clone())
        .map_err(|e| format!("cannot open {}: {e}", data.join("closed").display()))?;
    let cache = Cache::open(
        &data.join("cache"),
        settings.cache_max_bytes,
        settings.cache_fresh_for,
    )
    .map_err(|e| {
        format!(
            "cannot open the node cache in {}: {e}",
            data.join("cache").display()
        )
    })?;
    let argo = kubernetes(&settings).await?.map(|client| {
        let budget = store
            .part_buffers()
            .unwrap_or_else(crate::store::PartBudget::new);
        Arc::new(Argo::new(client, &settings.node, budget))
    });
    let commands = Arc::new(Commands::default());
    if let Some(argo) = &argo {
        tokio::spawn(crate::argo::reconcile::run(argo.clone(), commands.clone()));
    }
    let metrics = Arc::new(Metrics::new(outbox.bytes.clone(), outbox.syncs.clone()));
    let undelivered = outbox.bytes.clone();
    let app = Arc::new(App {
        secret: secret.clone(),
        store,
        argo,
        cache: Some(Arc::new(cache)),
        outbox: outbox.clone(),
        commands: commands.clone(),
        metrics: metrics.clone(),
        attempts,
        store_reserve: settings.quotas.store_reserve,
        json_budget: tokio::sync::Semaphore::new(server::JSON_BODIES),
        node: settings.node.clone(),
        inline_limit: settings.inline_limit,
        body_idle: settings.body_idle_timeout,
        clock_skew: settings.clock_skew,
        next_request: Default::default(),
    });

    let api = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let admin = TcpListener::bind(settings.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.admin_listen))?;
    let (api_addr, admin_addr) = (
        api.local_addr().map_err(|e| e.to_string())?,
        admin.local_addr().map_err(|e| e.to_string())?,
    );

    let (stop_tx, stop) = watch::channel(false);
    let sink = Sink::new(
        settings.controller_url.as_deref(),
        settings.controller_ca.as_deref(),
        &secret,
        &settings.node,
        data.join("events.jsonl"),
    )?;
    let delivery = tokio::spawn(controller::deliver(
        outbox.clone(),
        sink.clone(),
        settings.node.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let relay = relay_runtime().map_err(|e| format!("cannot start the command relay: {e}"))?;
    relay.spawn(controller::relay_commands(
        sink.with_own_connections(),
        settings.node.clone(),
        commands.clone(),
        stop.clone(),
    ));
    tokio::spawn(controller::heartbeats(
        sink,
        settings.node.clone(),
        commands.clone(),
        outbox,
        stop.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let graceful = GracefulShutdown::new();
    let mut api_stop = stop.clone();
    let admin_app = app.clone();
    let admin_ready = ready.clone();
    let mut admin_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = admin.accept() => accepted,
                _ = admin_stop.changed() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let (app, ready) = (admin_app.clone(), admin_ready.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| server::admin(app.clone(), ready.clone(), req));
                let _ = server::http1()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    if let Some(path) = &settings.ready_file {
        let json =
            serde_json::json!({ "api": api_addr.to_string(), "admin": admin_addr.to_string() });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(api = %api_addr, admin = %admin_addr, store = %settings.store, node = %settings.node, "listening");

    let connections = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    loop {
        let accepted = tokio::select! {
            accepted = api.accept() => accepted,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = api_stop.changed() => break,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept");
                continue;
            }
        };
        // An answer goes out whole at once: Nagle would hold one written while the one
        // before is unacknowledged (a pipelining client), until its delayed ACK, 40 ms.
        let _ = stream.set_nodelay(true);
        // Past the bound a connection is closed at once: each costs buffers and a task.
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            warn!(
                limit = CONNECTIONS,
                "too many connections: closing a new one"
            );
            continue;
        };
        let (app, watcher, relay) = (app.clone(), graceful.watcher(), relay.clone());
        tokio::spawn(async move {
            let serve = async move |stream: tokio::net::TcpStream| {
                let service = service_fn(move |req| server::handle(app.clone(), req));
                let connection = server::http1().serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(connection).await;
                drop(slot);
            };
            if !waits_for_commands(&stream).await {
                return serve(stream).await;
            }
            // Moved to the relay's thread: registered with its reactor, not this one's.
            let Ok(stream) = stream.into_std() else {
                return;
            };
            relay.spawn(async move {
                if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                    serve(stream).await;
                }
            });
        });
    }

    info!(timeout = ?settings.shutdown_timeout, "shutting down: finishing in-flight requests");
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    drop(api);
    // Long-polls answer now: they would otherwise hold the shutdown for their whole wait.
    commands.close();
    let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("in-flight requests did not finish in time");
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout_at(deadline, delivery).await.is_ok();
    let left = undelivered.load(std::sync::atomic::Ordering::Relaxed);
    if !drained && left > 0 {
        warn!(
            bytes = left,
            "the outbox did not drain in time; undelivered events stay journaled"
        );
    }
    info!("stopped");
    Ok(())
}

/// A thread of its own for commands: the controller's command poll and the tasks' commands
/// long-polls. On a busy node the API's runtime has hundreds of requests queued; a signal
/// relayed there would wait behind them all.
fn relay_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            if let Err(e) = prefer_short_slices() {
                debug!(error = %e, "the relay keeps the scheduler's default slice");
            }
            runtime.block_on(std::future::pending::<()>())
        })?;
    Ok(handle)
}

/// The relay's slice: it does a few microseconds of work per wakeup.
const RELAY_SLICE: Duration = Duration::from_micros(100);

/// Asks the scheduler for short slices on the calling thread (`sched_setattr`'s
/// `sched_runtime`, Linux ≥ 6.12): a thread with a shorter slice is run before, and preempts,
/// threads with longer ones when it wakes. On a saturated node the relay would otherwise wait
/// out the slices of the API's workers (the default: 1.4 ms on a 2-CPU VM) before a signal goes
/// on. Needs no privilege and changes neither the policy nor the nice value; older kernels
/// ignore it.
#[allow(unsafe_code)]
fn prefer_short_slices() -> std::io::Result<()> {
    /// `struct sched_attr`, its first version (48 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    const SCHED_FLAG_RESET_ON_FORK: u64 = 1;
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: the kernel writes at most `size` bytes into `attr`, which has them.
    if unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    attr.size = size;
    attr.flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.runtime = RELAY_SLICE.as_nanos() as u64;
    // SAFETY: the kernel reads `attr.size` bytes of `attr`.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a new connection's first request is a task's commands long-poll (the emissary
/// opens one connection per request). Anything else, or nothing within the header timeout,
/// is served as usual.
async fn waits_for_commands(stream: &tokio::net::TcpStream) -> bool {
    let mut head = [0u8; 256];
    match tokio::time::timeout(server::HEADER_TIMEOUT, stream.peek(&mut head)).await {
        Ok(Ok(n)) => is_commands_poll(&head[..n]),
        _ => false,
    }
}

/// Whether the first bytes of a request are `GET /v1/tasks/TASK/ATTEMPT/commands[?...] `.
fn is_commands_poll(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"GET /v1/tasks/") else {
        return false;
    };
    // A target cut short by the peek, with no space after it, is not taken for one.
    let Some(end) = rest.iter().position(|&b| b == b' ') else {
        return false;
    };
    let path = rest[..end].split(|&b| b == b'?').next().unwrap_or_default();
    matches!(
        path.split(|&b| b == b'/').collect::<Vec<_>>()[..],
        [_, _, b"commands"]
    )
}

/// The Kubernetes API client of the Argo adapter: from `--kubeconfig`, else in-cluster when
/// the agent runs in a pod, else none (the adapter is off; Argo pods are refused with why).
async fn kubernetes(settings: &Settings) -> Result<Option<kube::Client>, String> {
    // kube's TLS takes the process's default provider; the AWS SDK links a second one.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let config = match &settings.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            kube::Config::incluster().map_err(|e| format!("in-cluster Kubernetes config: {e}"))?
        }
        None => {
            info!("no Kubernetes API (no --kubeconfig, not in a pod): Argo pods are refused");
            return Ok(None);
        }
    };
    kube::Client::try_from(config)
        .map(Some)
        .map_err(|e| format!("Kubernetes client: {e}"))
}

/// Holds `DATA_DIR/lock` for as long as the agent runs. Two agents on one data directory (a
/// DaemonSet update that surges the new pod beside the old one) would interleave journal
/// appends, deliver events twice and sweep each other's uploads as leftovers: the second one
/// waits for its turn by failing to start, and Kubernetes restarts it.
fn own_data_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let path = dir.join("lock");
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail(&e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => {
                fail(&"another agent is running on this data directory")
            }
            other => fail(&other),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::is_commands_poll;

    #[test]
    fn only_a_whole_commands_request_line_goes_to_the_relay() {
        assert!(is_commands_poll(
            b"GET /v1/tasks/t1/0/commands?wait=30s&container=main HTTP/1.1\r\n"
        ));
        assert!(is_commands_poll(b"GET /v1/tasks/t1/0/commands HTTP/1.1"));
        for other in [
            &b"GET /v1/tasks/t1/0/commands?wait=30s"[..], // cut short: maybe /commandsX
            b"GET /v1/tasks/t1/0/commandsX HTTP/1.1",
            b"POST /v1/tasks/t1/0/commands HTTP/1.1",
            b"GET /v1/tasks/t1/0/inputs/commands HTTP/1.1",
            b"GET /v1/tasks/t1/0/containers/main?wait=5s HTTP/1.1",
            b"",
        ] {
            assert!(
                !is_commands_poll(other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
