//! The command line. Every usage error exits 125 without starting anything.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use protocol::exit;

use crate::run::RunOptions;
use crate::{control, run, signals, version};

#[derive(Parser)]
#[command(
    name = "emissary",
    about = "Runs one workflow task: supervises the command like an init, captures its output, \
             enforces its deadline, and reports how it ended.",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command under supervision.
    ///
    /// Signals sent to the emissary are forwarded to the command's process group; orphans are
    /// reaped; when the command exits, whatever it left running gets SIGTERM, then SIGKILL after
    /// --grace. Exit code: the command's own; 128+N if killed by signal N; 124 deadline
    /// exceeded; 125 the emissary failed; 126 not executable; 127 not found.
    #[command(arg_required_else_help = true)]
    Run(RunArgs),
    /// Deliver a signal to the `emissary run` whose --log-dir is DIR.
    Signal(SignalArgs),
    /// Print version, git commit, build target and linkage.
    Version,
}

#[derive(Args)]
struct RunArgs {
    /// Capture stdout and stderr into DIR/stdout, DIR/stderr and DIR/combined (still echoed to
    /// the emissary's own stdout/stderr); also creates DIR/signal for `emissary signal` and
    /// writes DIR/exitcode at the end.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Write the JSON run summary to FILE (atomically) when the run ends.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Stop the command after DURATION (e.g. 1500ms, 30s, 2m): SIGTERM to its group, SIGKILL
    /// after --grace; exit code 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    deadline: Option<Duration>,
    /// How long a process gets between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    grace: Duration,
    /// The command and its arguments (put `--` before it if it starts with `-`).
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true)]
    command: Vec<OsString>,
}

#[derive(Args)]
struct SignalArgs {
    /// The --log-dir of the target `emissary run`.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Signal name or number: TERM, SIGUSR1, 9...
    #[arg(value_name = "SIGNAL", value_parser = parse_signal)]
    signal: i32,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    protocol::duration::parse(text).map_err(|e| e.to_string())
}

fn parse_signal(text: &str) -> Result<i32, String> {
    signals::parse(text).ok_or_else(|| format!("unknown signal {text:?} (e.g. TERM, SIGUSR1, 9)"))
}

/// Parses `args` and runs the chosen command; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::EMISSARY_FAILED
            } else {
                0
            };
        }
    };
    match cli.command {
        Command::Run(args) => run::run(RunOptions {
            command: args.command,
            log_dir: args.log_dir,
            summary: args.summary,
            deadline: args.deadline,
            grace: args.grace,
        }),
        Command::Signal(args) => match control::send(&args.dir, args.signal) {
            Ok(()) => 0,
            Err(message) => {
                eprintln!("emissary: {message}");
                exit::EMISSARY_FAILED
            }
        },
        Command::Version => {
            println!("{}", version::describe());
            0
        }
    }
}
