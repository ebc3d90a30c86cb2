//! emissary-agent: the per-node daemon. `main` only parses and wires.
#![deny(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use emissary_agent::{config, inject, prepare, serve, token, webhook};

/// jemalloc, not glibc's malloc: at 30,000 events/s glibc's malloc, free and fast-bin
/// consolidation (set off by hyper's read buffers) took ~15 % of the agent's CPU, and the caps
/// that kept its RSS down after large uploads (two arenas, a fixed mmap threshold) made every
/// 8 MiB upload part a fresh mmap, faulted in page by page. jemalloc: 22-24 µs of CPU per event
/// instead of 27-31, 50,000 events/s held, 45 MB after a 1 GiB upload (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "emissary-agent",
    about = "The per-node emissary agent: serves the emissaries on its node over HTTP with per-task tokens, \
             holds the artifact store's credentials, caches inputs, and delivers task events to the workflow \
             controller through a durable on-disk outbox.",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. Options: flags > EMISSARY_AGENT_* env > --config TOML file > defaults.
    Serve(Box<config::ServeArgs>),
    /// Print a task token (for controllers in other languages, and for debugging).
    Token(TokenArgs),
    /// Print the key of one node, derived from the controller's master key: each agent holds
    /// only its own, so one node's key cannot mint tokens for another node.
    NodeKey(NodeKeyArgs),
    /// Inject the emissary into a Pod (YAML or JSON) and print it in the same format.
    Inject(InjectArgs),
    /// Serve the Kubernetes mutating admission webhook (HTTPS) that injects labelled pods.
    Webhook(webhook::WebhookArgs),
    /// Make a node directory (a hostPath) the agent's own: create it 0700, chown it to UID:GID.
    /// For an init container running as root, so the journal and cache outlive the pod.
    PrepareDataDir(prepare::PrepareArgs),
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The node key file (the agent's --secret-file).
    #[arg(long, value_name = "FILE", required_unless_present = "master_key_file")]
    secret_file: Option<PathBuf>,
    /// The controller's master key instead: the token is signed with the key of `--on` (or of
    /// `--node`), derived as `emissary-agent node-key` derives it.
    #[arg(long, value_name = "FILE", conflicts_with = "secret_file")]
    master_key_file: Option<PathBuf>,
    #[arg(long, value_name = "ID", required_unless_present = "node")]
    task: Option<String>,
    #[arg(long, value_name = "N", required_unless_present = "node")]
    attempt: Option<u32>,
    /// Mint a node token instead (what the agent sends the controller), to test a controller.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["task", "attempt", "on"])]
    node: Option<String>,
    /// The workflow's namespace (the store key's first level).
    #[arg(long, value_name = "NAME", default_value = "default")]
    namespace: String,
    /// The workflow the task belongs to (the store key's second level).
    #[arg(long, value_name = "NAME", default_value = "default")]
    workflow: String,
    /// The node whose agent alone takes the token.
    #[arg(long, value_name = "NODE")]
    on: Option<String>,
    /// A store key outside its own workflow the task may read: an input passed to it (repeat;
    /// `PREFIX/` grants everything under it).
    #[arg(long = "read", value_name = "KEY")]
    reads: Vec<String>,
    /// How long the token is valid (e.g. 30m, 12h): the task's deadline and a margin.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    ttl: String,
}

#[derive(clap::Args)]
struct NodeKeyArgs {
    /// The controller's master key (at least 32 random bytes).
    #[arg(long, value_name = "FILE")]
    master_key_file: PathBuf,
    /// The node whose key to print (its agent's --secret-file).
    #[arg(long, value_name = "NAME")]
    node: String,
}

#[derive(clap::Args)]
struct InjectArgs {
    /// The Pod to inject; `-` for stdin.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        default_value = "-"
    )]
    file: String,
    /// Injection settings (the ConfigMap's inject.yaml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("emissary-agent: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(args) => {
            let settings = (*args).resolve()?;
            init_logging();
            runtime()?.block_on(serve::serve(settings))
        }
        Command::Token(args) => token_command(args),
        Command::NodeKey(args) => {
            let master = token::Secret::from_file(&args.master_key_file)?;
            if !protocol::api::valid_name(&args.node) {
                return Err("--node must be a name of [A-Za-z0-9._-]".into());
            }
            println!("{}", master.node_key(&args.node).text());
            Ok(())
        }
        Command::Inject(args) => {
            let config = inject::load_config(&args.config)?;
            let text = if args.file == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| format!("reading stdin: {e}"))?;
                text
            } else {
                std::fs::read_to_string(&args.file)
                    .map_err(|e| format!("cannot read {}: {e}", args.file))?
            };
            print!("{}", inject::inject_text(&text, &config)?);
            Ok(())
        }
        Command::Webhook(args) => {
            init_logging();
            runtime()?.block_on(webhook::serve(args))
        }
        Command::PrepareDataDir(args) => prepare::prepare(&args),
        Command::Version => {
            println!("emissary-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

fn token_command(args: TokenArgs) -> Result<(), String> {
    let signer = args.on.as_deref().or(args.node.as_deref());
    let secret = match (&args.secret_file, &args.master_key_file, signer) {
        (Some(file), _, _) => token::Secret::from_file(file)?,
        (None, Some(file), Some(node)) => token::Secret::from_file(file)?.node_key(node),
        _ => return Err("--master-key-file needs --on NODE (or --node)".into()),
    };
    let ttl = protocol::duration::parse(&args.ttl).map_err(|e| format!("--ttl: {e}"))?;
    let exp = token::now() + ttl.as_secs();
    if let Some(node) = args.node {
        println!("{}", secret.sign(&token::NodeClaims { node, exp }));
        return Ok(());
    }
    let (Some(task), Some(attempt)) = (args.task, args.attempt) else {
        return Err("--task and --attempt are required (or --node)".into());
    };
    for (flag, name) in [
        ("--task", &task),
        ("--workflow", &args.workflow),
        ("--namespace", &args.namespace),
    ]
    .into_iter()
    .chain(args.on.iter().map(|on| ("--on", on)))
    {
        if !protocol::api::valid_name(name) {
            return Err(format!("{flag} {name:?} is not a name of [A-Za-z0-9._-]"));
        }
    }
    let claims = token::Claims {
        ns: args.namespace,
        wf: args.workflow,
        task,
        attempt,
        exp,
        on: args.on,
        reads: args.reads,
        pod: None,
    };
    println!("{}", secret.sign(&claims));
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// JSON lines on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .init();
}
