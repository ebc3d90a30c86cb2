//! `emissary-agent serve` settings. Precedence: flags > `EMISSARY_AGENT_*` environment >
//! the TOML file given with `--config` (keys are the long flag names: `store = "s3://b/p"`,
//! `s3-path-style = true`) > defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Every option is optional here so that "not given" can fall through to the file.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with defaults for any option below.
    #[arg(long, value_name = "FILE", env = "EMISSARY_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The emissary API address [default: 0.0.0.0:7946].
    #[arg(long, value_name = "ADDR", env = "EMISSARY_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The admin address: /metrics, /healthz, /readyz [default: 0.0.0.0:9090].
    #[arg(long, value_name = "ADDR", env = "EMISSARY_AGENT_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Journal, node cache and the default local store [default: /var/lib/emissary-agent].
    #[arg(long, value_name = "DIR", env = "EMISSARY_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node key that signs task tokens (from the controller: `emissary-agent node-key`; ≥ 32 random bytes).
    #[arg(long, value_name = "FILE", env = "EMISSARY_AGENT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// The workflow controller; without it, events go to DATA_DIR/events.jsonl.
    #[arg(long, value_name = "URL", env = "EMISSARY_AGENT_CONTROLLER_URL")]
    pub controller_url: Option<String>,
    /// PEM certificates to trust for an https:// controller URL, instead of the system's roots
    /// (for a controller whose certificate a private or cluster CA signed).
    #[arg(long, value_name = "FILE", env = "EMISSARY_AGENT_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,
    /// file:///DIR or s3://BUCKET/PREFIX [default: file://DATA_DIR/store].
    #[arg(long, value_name = "URL", env = "EMISSARY_AGENT_STORE")]
    pub store: Option<String>,
    /// S3 endpoint (for S3-compatible servers) [default: AWS's].
    #[arg(long, value_name = "URL", env = "EMISSARY_AGENT_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: us-east-1].
    #[arg(long, value_name = "REGION", env = "EMISSARY_AGENT_S3_REGION")]
    pub s3_region: Option<String>,
    /// Address buckets by path (http://host/bucket/key) rather than by host name.
    #[arg(long, value_name = "BOOL", env = "EMISSARY_AGENT_S3_PATH_STYLE", num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: Option<bool>,
    /// This node's name, in events and the controller's command URL [default: the hostname].
    #[arg(long, value_name = "NAME", env = "EMISSARY_AGENT_NODE")]
    pub node: Option<String>,
    /// Parameters and results larger than this go to the store, events carry a reference
    /// [default: 65536].
    #[arg(long, value_name = "BYTES", env = "EMISSARY_AGENT_INLINE_LIMIT")]
    pub inline_limit: Option<usize>,
    /// The node input cache's size bound [default: 10737418240, 10 GiB].
    #[arg(long, value_name = "BYTES", env = "EMISSARY_AGENT_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// How long a version the store gave for a cached input holds before a read asks again
    /// (HEAD) [default: 10s].
    #[arg(long, value_name = "DURATION", env = "EMISSARY_AGENT_CACHE_FRESH_FOR")]
    pub cache_fresh_for: Option<String>,
    /// Undelivered events kept on disk at most; beyond it new events are refused (503) and the
    /// emissaries retry [default: 268435456, 256 MiB].
    #[arg(long, value_name = "BYTES", env = "EMISSARY_AGENT_JOURNAL_MAX_BYTES")]
    pub journal_max_bytes: Option<u64>,
    /// Undelivered events of one task attempt kept at most, so that one task cannot fill the
    /// journal for the node's others (429 beyond) [default: 8388608, 8 MiB].
    #[arg(
        long,
        value_name = "BYTES",
        env = "EMISSARY_AGENT_TASK_JOURNAL_MAX_BYTES"
    )]
    pub task_journal_max_bytes: Option<u64>,
    /// Bytes one task attempt may upload in all (413 beyond) [default: 68719476736, 64 GiB].
    #[arg(
        long,
        value_name = "BYTES",
        env = "EMISSARY_AGENT_TASK_MAX_OUTPUT_BYTES"
    )]
    pub task_max_output_bytes: Option<u64>,
    /// Objects one task attempt may upload (429 beyond) [default: 10000].
    #[arg(long, value_name = "N", env = "EMISSARY_AGENT_TASK_MAX_OUTPUTS")]
    pub task_max_outputs: Option<u64>,
    /// Free space a local store leaves on its filesystem (the journal and the cache share it):
    /// an upload that would eat into it is refused (507) [default: 1073741824, 1 GiB].
    #[arg(long, value_name = "BYTES", env = "EMISSARY_AGENT_STORE_RESERVE_BYTES")]
    pub store_reserve_bytes: Option<u64>,
    /// On SIGTERM, how long in-flight requests and the outbox flush may take [default: 30s].
    #[arg(long, value_name = "DURATION", env = "EMISSARY_AGENT_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// A client silent this long in the middle of a request body is cut off (the upload is
    /// discarded) [default: 60s].
    #[arg(
        long,
        value_name = "DURATION",
        env = "EMISSARY_AGENT_BODY_IDLE_TIMEOUT"
    )]
    pub body_idle_timeout: Option<String>,
    /// How long past its expiry a task token is still taken: the most the token minter's clock
    /// may lag this node's [default: 2m].
    #[arg(long, value_name = "DURATION", env = "EMISSARY_AGENT_CLOCK_SKEW")]
    pub clock_skew: Option<String>,
    /// Written (atomically) once listening: {"api": ADDR, "admin": ADDR}.
    #[arg(long, value_name = "FILE", env = "EMISSARY_AGENT_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// The Kubernetes API for the Argo adapter [default: in-cluster when the agent runs in a
    /// pod; none otherwise, and Argo pods are refused].
    #[arg(long, value_name = "FILE", env = "EMISSARY_AGENT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub secret_file: PathBuf,
    pub controller_url: Option<String>,
    pub controller_ca: Option<PathBuf>,
    pub store: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_path_style: bool,
    pub node: String,
    pub inline_limit: usize,
    pub cache_max_bytes: u64,
    pub cache_fresh_for: Duration,
    pub journal_max_bytes: u64,
    pub quotas: Quotas,
    pub shutdown_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub clock_skew: Duration,
    pub ready_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
}

/// What one task attempt may consume of its node's agent.
#[derive(Debug, Clone)]
pub struct Quotas {
    pub journal_bytes: u64,
    pub output_bytes: u64,
    pub outputs: u64,
    pub store_reserve: u64,
}

impl ServeArgs {
    /// An empty value counts as unset, so that it does not override the config file with
    /// nothing (a manifest's `value: ""`, an optional ConfigMap key left empty).
    fn drop_empty(&mut self) {
        for text in [
            &mut self.controller_url,
            &mut self.store,
            &mut self.s3_endpoint,
            &mut self.s3_region,
            &mut self.node,
            &mut self.shutdown_timeout,
            &mut self.body_idle_timeout,
            &mut self.clock_skew,
            &mut self.cache_fresh_for,
        ] {
            if text.as_deref() == Some("") {
                *text = None;
            }
        }
        for path in [
            &mut self.config,
            &mut self.data_dir,
            &mut self.secret_file,
            &mut self.controller_ca,
            &mut self.ready_file,
            &mut self.kubeconfig,
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
    }

    /// Flags and environment (already in `self`) over the file over the defaults.
    pub fn resolve(mut self) -> Result<Settings, String> {
        self.drop_empty();
        let file: BTreeMap<String, toml::Value> = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => BTreeMap::new(),
        };
        const KNOWN: &[&str] = &[
            "listen",
            "admin-listen",
            "data-dir",
            "secret-file",
            "controller-url",
            "controller-ca",
            "store",
            "s3-endpoint",
            "s3-region",
            "s3-path-style",
            "node",
            "inline-limit",
            "cache-max-bytes",
            "journal-max-bytes",
            "task-journal-max-bytes",
            "task-max-output-bytes",
            "task-max-outputs",
            "store-reserve-bytes",
            "shutdown-timeout",
            "body-idle-timeout",
            "clock-skew",
            "cache-fresh-for",
            "ready-file",
            "kubeconfig",
        ];
        if let Some(unknown) = file.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!(
                "config file: unknown key {unknown:?} (known: {})",
                KNOWN.join(", ")
            ));
        }
        let text = |key: &str| -> Result<Option<String>, String> {
            match file.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("config file: {key} must be a string, not {other}")),
            }
        };
        let number = |key: &str| -> Result<Option<u64>, String> {
            match file.get(key) {
                None => Ok(None),
                Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Some(*n as u64)),
                Some(other) => Err(format!(
                    "config file: {key} must be a non-negative integer, not {other}"
                )),
            }
        };
        let parse = |key: &str, value: Option<String>| -> Result<Option<SocketAddr>, String> {
            value
                .map(|v| {
                    v.parse()
                        .map_err(|e| format!("config file: {key} {v:?}: {e}"))
                })
                .transpose()
        };
        let data_dir = self
            .data_dir
            .or(text("data-dir")?.map(PathBuf::from))
            .unwrap_or_else(|| "/var/lib/emissary-agent".into());
        // Absolute, so that the default store URL built from it is file:///...
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| format!("data-dir {}: {e}", data_dir.display()))?;
        let secret_file = self
            .secret_file
            .or(text("secret-file")?.map(PathBuf::from))
            .ok_or("no node secret: pass --secret-file FILE (or set EMISSARY_AGENT_SECRET_FILE)")?;
        let path_style = match (self.s3_path_style, file.get("s3-path-style")) {
            (Some(b), _) => b,
            (None, Some(toml::Value::Boolean(b))) => *b,
            (None, Some(other)) => {
                return Err(format!(
                    "config file: s3-path-style must be true or false, not {other}"
                ));
            }
            (None, None) => false,
        };
        // A duration from the flag or environment, else the file, else `default`.
        let duration = |given: Option<String>, key: &str, default: &str| {
            let value = given.or(text(key)?).unwrap_or_else(|| default.into());
            protocol::duration::parse(&value).map_err(|e| format!("{key}: {e}"))
        };
        let shutdown_timeout = duration(self.shutdown_timeout, "shutdown-timeout", "30s")?;
        let body_idle_timeout = duration(self.body_idle_timeout, "body-idle-timeout", "60s")?;
        let cache_fresh_for = duration(self.cache_fresh_for, "cache-fresh-for", "10s")?;
        let clock_skew = duration(self.clock_skew, "clock-skew", crate::token::CLOCK_SKEW)?;
        let settings = Settings {
            listen: match self.listen {
                Some(a) => a,
                None => parse("listen", text("listen")?)?
                    .unwrap_or_else(|| "0.0.0.0:7946".parse().unwrap()),
            },
            admin_listen: match self.admin_listen {
                Some(a) => a,
                None => parse("admin-listen", text("admin-listen")?)?
                    .unwrap_or_else(|| "0.0.0.0:9090".parse().unwrap()),
            },
            store: self
                .store
                .or(text("store")?)
                .unwrap_or_else(|| format!("file://{}", data_dir.join("store").display())),
            secret_file,
            controller_url: self
                .controller_url
                .or(text("controller-url")?)
                .map(|u| u.trim_end_matches('/').to_owned()),
            controller_ca: self
                .controller_ca
                .or(text("controller-ca")?.map(PathBuf::from)),
            s3_endpoint: self.s3_endpoint.or(text("s3-endpoint")?),
            s3_region: self
                .s3_region
                .or(text("s3-region")?)
                .unwrap_or_else(|| "us-east-1".into()),
            s3_path_style: path_style,
            node: self.node.or(text("node")?).unwrap_or_else(hostname),
            inline_limit: self
                .inline_limit
                .or(number("inline-limit")?.map(|n| n as usize))
                .unwrap_or(64 * 1024),
            cache_max_bytes: self
                .cache_max_bytes
                .or(number("cache-max-bytes")?)
                .unwrap_or(10 << 30),
            journal_max_bytes: self
                .journal_max_bytes
                .or(number("journal-max-bytes")?)
                .unwrap_or(256 << 20),
            quotas: Quotas {
                journal_bytes: self
                    .task_journal_max_bytes
                    .or(number("task-journal-max-bytes")?)
                    .unwrap_or(8 << 20),
                output_bytes: self
                    .task_max_output_bytes
                    .or(number("task-max-output-bytes")?)
                    .unwrap_or(64 << 30),
                outputs: self
                    .task_max_outputs
                    .or(number("task-max-outputs")?)
                    .unwrap_or(10_000),
                store_reserve: self
                    .store_reserve_bytes
                    .or(number("store-reserve-bytes")?)
                    .unwrap_or(1 << 30),
            },
            shutdown_timeout,
            body_idle_timeout,
            clock_skew,
            cache_fresh_for,
            ready_file: self.ready_file.or(text("ready-file")?.map(PathBuf::from)),
            kubeconfig: self.kubeconfig.or(text("kubeconfig")?.map(PathBuf::from)),
            data_dir,
        };
        if !protocol::api::valid_name(&settings.node) {
            return Err(format!(
                "node name {:?} must be a name of [A-Za-z0-9._-] (it is part of the controller's URLs)",
                settings.node
            ));
        }
        if let Some(url) = &settings.controller_url
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            return Err(format!(
                "controller-url {url:?}: must start with http:// or https://"
            ));
        }
        if settings.controller_ca.is_some()
            && !settings
                .controller_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        {
            return Err("controller-ca is only used with an https:// controller-url".into());
        }
        Ok(settings)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(
            &file,
            "store = \"s3://b/p\"\ninline-limit = 10\nnode = \"from-file\"\nsecret-file = \"/s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            node: Some("from-flag".into()),
            ..Default::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(
            (s.store.as_str(), s.inline_limit, s.node.as_str()),
            ("s3://b/p", 10, "from-flag")
        );
        assert_eq!(s.listen, "0.0.0.0:7946".parse().unwrap());

        std::fs::write(&file, "stroe = \"x\"\n").unwrap();
        let err = ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("unknown key \"stroe\""), "{err}");
        std::fs::write(&file, "inline-limit = \"big\"\nsecret-file = \"/s\"\n").unwrap();
        let err = ServeArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("inline-limit"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_value_is_unset_and_the_file_gives_it() {
        let dir = std::env::temp_dir().join(format!("agent-config-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(&file, "node = \"from-file\"\nsecret-file = \"/s\"\n").unwrap();
        let s = ServeArgs {
            config: Some(file),
            node: Some(String::new()),
            store: Some(String::new()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.node, "from-file");
        assert!(s.store.starts_with("file:///"), "{}", s.store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_node_name_that_cannot_be_a_url_segment_is_refused() {
        for node in ["a/b", "..", "node 1"] {
            let err = ServeArgs {
                node: Some(node.into()),
                secret_file: Some("/s".into()),
                ..Default::default()
            }
            .resolve()
            .unwrap_err();
            assert!(err.starts_with(&format!("node name {node:?}")), "{err}");
        }
    }

    #[test]
    fn a_relative_data_dir_is_made_absolute_and_so_is_the_default_store() {
        let s = ServeArgs {
            data_dir: Some("relative/data".into()),
            secret_file: Some("/s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let expected = std::env::current_dir().unwrap().join("relative/data");
        assert_eq!(s.data_dir, expected);
        assert_eq!(
            s.store,
            format!("file://{}", expected.join("store").display())
        );
    }
}
