//! The command line. Every usage error exits 125 without starting anything.
//!
//! Parsed by hand rather than with clap: the emissary has a 2 MB static budget and clap costs
//! ~110 KB of it (BENCHMARKS.md); the grammar here is small (long options with a value,
//! `-p`, `--`, then the command).

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use protocol::exit;

use crate::process::run::RunOptions;
use crate::process::{control, run, signals};
use crate::task::init::InitOptions;
use crate::version;

const USAGE: &str = "\
Usage: emissary <COMMAND>

Runs one workflow task: supervises the command like an init, captures its output, enforces its
deadline, and reports how it ended.

Commands:
  run      Run a command (or a task spec) under supervision
  signal   Deliver a signal to the `emissary run` whose --log-dir is DIR
  init     Install the emissary into the pod's shared volume and stage the task's inputs
  version  Print version, git commit, build target and linkage

Run `emissary <COMMAND> --help` for the options of each command.
";

const RUN_USAGE: &str = "\
Usage: emissary run [OPTIONS] [--] <CMD> [ARGS]...
       emissary run --template FILE [OPTIONS] [-- CMD [ARGS]...]

Runs CMD under supervision. Signals sent to the emissary are forwarded to the command's process
group; orphans are reaped; when the command exits, whatever it left running gets SIGTERM, then
SIGKILL after --grace.

Exit code: the command's own; 128+N if killed by signal N; 124 deadline exceeded; 125 the
emissary failed (or a required output is missing); 126 not executable; 127 not found.

Options:
      --log-dir DIR        Capture stdout and stderr into DIR/stdout, DIR/stderr and DIR/combined
                           (still echoed to the emissary's own stdout/stderr); also creates
                           DIR/signal for `emissary signal` and writes DIR/exitcode at the end
      --summary FILE       Write the JSON run summary to FILE (atomically) when the run ends
      --deadline DURATION  Stop the command after DURATION (e.g. 1500ms, 30s, 2m): SIGTERM to its
                           group, SIGKILL after --grace; exit code 124
      --grace DURATION     How long a process gets between SIGTERM and SIGKILL [default: 10s]
  -h, --help               Print this help

Task spec (an Argo Workflows template as JSON):
      --template FILE      Run the spec in FILE; without it, the spec comes from
                           EMISSARY_TEMPLATE or ARGO_TEMPLATE (JSON, or @FILE) when set. The
                           command defaults to the spec's; inputs are staged first, outputs
                           collected after, even on failure
  -p, --param NAME=VALUE   Set {{inputs.parameters.NAME}} (repeatable; overrides the spec's value)
      --input NAME=PATH    Take input artifact NAME from PATH: a file, archive or directory
                           (repeatable)
      --out DIR            Standalone: write DIR/outputs.json, the artifacts under DIR/artifacts
                           and the logs under DIR/ctr/NAME
      --root DIR           The shared directory [default: EMISSARY_ROOT, else /var/run/emissary]
      --container NAME     Which container of the spec this is [default: EMISSARY_CONTAINER_NAME,
                           ARGO_CONTAINER_NAME, else main]; a containerSet container first waits
                           for its dependencies
      --store DIR          A local directory store: inputs with a `key` are read from DIR/KEY
";

const VERSION_USAGE: &str = "\
Usage: emissary version

Prints the version, git commit, build target and linkage.
";

const SIGNAL_USAGE: &str = "\
Usage: emissary signal --dir DIR <SIGNAL>

Delivers SIGNAL (a name or number: TERM, SIGUSR1, 9...) to the `emissary run` whose --log-dir
is DIR, which forwards it to its command's process group.
";

const INIT_USAGE: &str = "\
Usage: emissary init [--dest DIR] [--template FILE] [--store DIR]

Installs the emissary into the pod's shared volume (DIR/emissary, mode 0555, atomically) and,
when a task spec is present, writes it (DIR/template), its script (DIR/script), and stages its
input artifacts into DIR/inputs so the task container only moves them into place.

Options:
      --dest DIR       The shared volume [default: /var/run/emissary]
      --template FILE  The task spec [default: EMISSARY_TEMPLATE or ARGO_TEMPLATE when set]
      --store DIR      A local directory store for inputs with a `key`
";

/// Parses `args` and runs the chosen command; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.first().is_some_and(crate::argo::invoked_as_argoexec) {
        return crate::argo::main(args);
    }
    let mut args = Args::new(args.into_iter().skip(1).collect());
    let result = match args.next_word().as_deref() {
        Some("run") => parse_run(&mut args).map(run),
        Some("signal") => {
            parse_signal(&mut args).map(|(dir, signal)| match control::send(&dir, signal) {
                Ok(()) => 0,
                Err(message) => {
                    crate::note!("emissary: {message}");
                    exit::EMISSARY_FAILED
                }
            })
        }
        Some("init") => parse_init(&mut args).map(|opts| match crate::task::init::init(&opts) {
            Ok(()) => 0,
            Err(message) => {
                crate::note!("emissary: init: {message}");
                exit::EMISSARY_FAILED
            }
        }),
        Some("version" | "--version" | "-V") => match args.next_token() {
            Token::End => {
                let _ = writeln!(std::io::stdout(), "{}", version::describe());
                Ok(0)
            }
            Token::Option(name, _) if name == "-h" || name == "--help" => {
                Err(Usage::Help(VERSION_USAGE))
            }
            _ => Err(Usage::Error(
                "version takes no arguments".into(),
                VERSION_USAGE,
            )),
        },
        Some("help" | "--help" | "-h") => Err(Usage::Help(USAGE)),
        Some(other) => Err(Usage::Error(
            format!("unrecognized subcommand {other:?}"),
            USAGE,
        )),
        None => Err(Usage::Error("a command is required".into(), USAGE)),
    };
    match result {
        Ok(code) => code,
        Err(Usage::Help(text)) => {
            let _ = write!(std::io::stdout(), "{text}");
            0
        }
        Err(Usage::Error(message, text)) => {
            let usage = text
                .lines()
                .take_while(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            crate::note!("error: {message}\n\n{usage}\n\nFor more information, try '--help'.");
            exit::EMISSARY_FAILED
        }
    }
}

/// Why parsing stopped: help was asked for, or the input was wrong (with the usage to show).
enum Usage {
    Help(&'static str),
    Error(String, &'static str),
}

/// What is left of the command line.
struct Args {
    rest: std::collections::VecDeque<OsString>,
}

/// One option or the start of the command.
enum Token {
    /// `--name` or `--name=value`, `-x` or `-xvalue`.
    Option(String, Option<OsString>),
    /// The first word that is not an option (or everything after `--`).
    Command(Vec<OsString>),
    End,
}

impl Args {
    fn new(args: Vec<OsString>) -> Args {
        Args { rest: args.into() }
    }

    fn next_word(&mut self) -> Option<String> {
        self.rest
            .pop_front()
            .map(|w| w.to_string_lossy().into_owned())
    }

    fn next_token(&mut self) -> Token {
        let Some(word) = self.rest.pop_front() else {
            return Token::End;
        };
        let bytes = word.as_encoded_bytes();
        if bytes == b"--" {
            return Token::Command(self.rest.drain(..).collect());
        }
        if let Some(long) = bytes.strip_prefix(b"--") {
            let text = String::from_utf8_lossy(long);
            return match text.split_once('=') {
                Some((name, value)) => Token::Option(format!("--{name}"), Some(value.into())),
                None => Token::Option(format!("--{text}"), None),
            };
        }
        if bytes.len() > 1 && bytes[0] == b'-' {
            let text = String::from_utf8_lossy(bytes);
            let (name, value) = text.split_at(2);
            return Token::Option(name.to_owned(), (!value.is_empty()).then(|| value.into()));
        }
        let mut command = vec![word];
        command.extend(self.rest.drain(..));
        Token::Command(command)
    }

    /// The value of option `name`: inline (`--name=value`) or the next word.
    fn value(
        &mut self,
        name: &str,
        inline: Option<OsString>,
        usage: &'static str,
    ) -> Result<OsString, Usage> {
        inline.or_else(|| self.rest.pop_front()).ok_or_else(|| {
            Usage::Error(
                format!("a value is required for '{name}' but none was supplied"),
                usage,
            )
        })
    }
}

fn parse_run(args: &mut Args) -> Result<RunOptions, Usage> {
    let usage = RUN_USAGE;
    let mut opts = RunOptions {
        grace: Duration::from_secs(10),
        ..RunOptions::default()
    };
    loop {
        let (name, inline) = match args.next_token() {
            Token::End => break,
            Token::Command(command) => {
                opts.command = command;
                break;
            }
            Token::Option(name, inline) => (name, inline),
        };
        let bad = |e: String| Usage::Error(format!("invalid value for '{name}': {e}"), usage);
        match name.as_str() {
            "-h" | "--help" => return Err(Usage::Help(usage)),
            "--log-dir" => opts.log_dir = Some(args.value(&name, inline, usage)?.into()),
            "--summary" => opts.summary = Some(args.value(&name, inline, usage)?.into()),
            "--deadline" => {
                opts.deadline = Some(duration(&args.value(&name, inline, usage)?).map_err(bad)?)
            }
            "--grace" => opts.grace = duration(&args.value(&name, inline, usage)?).map_err(bad)?,
            "--template" => opts.template = Some(args.value(&name, inline, usage)?.into()),
            "-p" | "--param" => opts
                .params
                .push(pair(&args.value(&name, inline, usage)?).map_err(bad)?),
            "--input" => {
                let (input, path) = pair(&args.value(&name, inline, usage)?).map_err(bad)?;
                opts.inputs.push((input, PathBuf::from(path)));
            }
            "--out" => opts.out = Some(args.value(&name, inline, usage)?.into()),
            "--root" => opts.root = Some(args.value(&name, inline, usage)?.into()),
            "--container" => {
                opts.container = Some(text(&args.value(&name, inline, usage)?).map_err(bad)?)
            }
            "--store" => opts.store = Some(args.value(&name, inline, usage)?.into()),
            _ => return Err(unexpected(&name, usage)),
        }
    }
    let templated = opts.template.is_some() || crate::task::template::from_environment();
    if opts.command.is_empty() && !templated {
        return Err(Usage::Error("no command given".into(), usage));
    }
    if !templated && let Some(option) = task_only_option(&opts) {
        return Err(Usage::Error(
            format!(
                "{option} needs a task spec (--template FILE, or EMISSARY_TEMPLATE/ARGO_TEMPLATE)"
            ),
            usage,
        ));
    }
    Ok(opts)
}

/// The first option given that only means something for a task spec: a plain run would
/// silently ignore it (`--out` would write nothing).
fn task_only_option(opts: &RunOptions) -> Option<&'static str> {
    [
        ("--param", !opts.params.is_empty()),
        ("--input", !opts.inputs.is_empty()),
        ("--out", opts.out.is_some()),
        ("--root", opts.root.is_some()),
        ("--container", opts.container.is_some()),
        ("--store", opts.store.is_some()),
    ]
    .into_iter()
    .find_map(|(option, given)| given.then_some(option))
}

fn parse_signal(args: &mut Args) -> Result<(PathBuf, i32), Usage> {
    let usage = SIGNAL_USAGE;
    let (mut dir, mut signal) = (None, None);
    loop {
        match args.next_token() {
            Token::End => break,
            Token::Option(name, inline) => match name.as_str() {
                "-h" | "--help" => return Err(Usage::Help(usage)),
                "--dir" => dir = Some(PathBuf::from(args.value(&name, inline, usage)?)),
                _ => return Err(unexpected(&name, usage)),
            },
            Token::Command(words) => {
                if words.len() != 1 {
                    return Err(Usage::Error("expected exactly one SIGNAL".into(), usage));
                }
                let word = words[0].to_string_lossy();
                let parsed = signals::parse(&word).ok_or_else(|| {
                    Usage::Error(
                        format!("unknown signal {word:?} (e.g. TERM, SIGUSR1, 9)"),
                        usage,
                    )
                })?;
                signal = Some(parsed);
            }
        }
    }
    match (dir, signal) {
        (Some(dir), Some(signal)) => Ok((dir, signal)),
        (None, _) => Err(Usage::Error(
            "the required '--dir DIR' was not provided".into(),
            usage,
        )),
        (_, None) => Err(Usage::Error(
            "the required SIGNAL was not provided".into(),
            usage,
        )),
    }
}

fn parse_init(args: &mut Args) -> Result<InitOptions, Usage> {
    let usage = INIT_USAGE;
    let mut opts = InitOptions {
        dest: PathBuf::from(crate::task::step::DEFAULT_ROOT),
        template: None,
        store: None,
    };
    loop {
        match args.next_token() {
            Token::End => break,
            Token::Option(name, inline) => match name.as_str() {
                "-h" | "--help" => return Err(Usage::Help(usage)),
                "--dest" => opts.dest = args.value(&name, inline, usage)?.into(),
                "--template" => opts.template = Some(args.value(&name, inline, usage)?.into()),
                "--store" => opts.store = Some(args.value(&name, inline, usage)?.into()),
                _ => return Err(unexpected(&name, usage)),
            },
            Token::Command(words) if words.is_empty() => break,
            Token::Command(words) => {
                return Err(Usage::Error(
                    format!("unexpected argument {:?}", words[0]),
                    usage,
                ));
            }
        }
    }
    Ok(opts)
}

fn unexpected(name: &str, usage: &'static str) -> Usage {
    Usage::Error(
        format!(
            "unexpected argument '{name}' found (to pass it to the command, put '--' before the command)"
        ),
        usage,
    )
}

fn text(value: &OsStr) -> Result<String, String> {
    value
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{value:?} is not valid UTF-8"))
}

fn duration(value: &OsStr) -> Result<Duration, String> {
    protocol::duration::parse(&text(value)?).map_err(|e| e.to_string())
}

fn pair(value: &OsStr) -> Result<(String, String), String> {
    let value = text(value)?;
    match value.split_once('=') {
        Some((name, v)) if !name.is_empty() => Ok((name.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {value:?}")),
    }
}

/// Runs what `opts` asks for and returns the emissary's exit code.
pub fn run(opts: RunOptions) -> i32 {
    let templated = opts.template.is_some() || crate::task::template::from_environment();
    let result = if templated {
        crate::task::step::run(&opts)
    } else {
        run::run_command(&opts)
    };
    match result {
        Ok(code) => code,
        Err(run::Fatal(message)) => {
            crate::note!("emissary: {message}");
            exit::EMISSARY_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_opts(words: &[&str]) -> Result<RunOptions, String> {
        let mut args = Args::new(words.iter().map(OsString::from).collect());
        parse_run(&mut args).map_err(|u| match u {
            Usage::Help(_) => "help".to_owned(),
            Usage::Error(m, _) => m,
        })
    }

    #[test]
    fn options_then_command() {
        let o = run_opts(&[
            "--grace=2s",
            "--deadline",
            "1500ms",
            "--template",
            "step.json",
            "-p",
            "a=1",
            "-pb=2",
            "sh",
            "-c",
            "x",
            "--grace",
        ])
        .unwrap();
        assert_eq!(o.grace, Duration::from_secs(2));
        assert_eq!(o.deadline, Some(Duration::from_millis(1500)));
        assert_eq!(
            o.params,
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(o.command, ["sh", "-c", "x", "--grace"]);
        let o = run_opts(&["--", "--weird", "-x"]).unwrap();
        assert_eq!(o.command, ["--weird", "-x"]);
    }

    #[test]
    fn bad_input_names_the_option() {
        assert!(
            run_opts(&["--bogus", "true"])
                .unwrap_err()
                .contains("'--bogus'")
        );
        assert!(
            run_opts(&["--deadline", "30", "true"])
                .unwrap_err()
                .contains("missing unit")
        );
        assert!(
            run_opts(&["--log-dir"])
                .unwrap_err()
                .contains("'--log-dir'")
        );
        assert!(
            run_opts(&["-p", "noequals", "true"])
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(run_opts(&[]).unwrap_err().contains("no command"));
        assert_eq!(run_opts(&["--help"]).unwrap_err(), "help");
    }

    #[test]
    fn no_command_line_panics() {
        // Every prefix of some awkward command lines, for each subcommand.
        let lines: &[&[&str]] = &[
            &["--", "x"],
            &["-p", "-p"],
            &["--dest", "--", "--"],
            &["--dir", "d", "--", "TERM", "x"],
            &["-", "--=", "-x=1", "--log-dir="],
        ];
        for sub in ["run", "signal", "init", "version", "nope", ""] {
            for line in lines {
                for end in 0..=line.len() {
                    let mut args = vec![OsString::from("emissary"), OsString::from(sub)];
                    args.extend(line[..end].iter().map(OsString::from));
                    if sub == "run"
                        && (line[..end].is_empty() || line[..end] == ["--", "x"][..end.min(2)])
                    {
                        continue; // would actually run something
                    }
                    std::panic::catch_unwind(|| {
                        let mut parsed = Args::new(args[1..].to_vec());
                        let _ = parsed.next_word();
                        let _ = match sub {
                            "run" => parse_run(&mut parsed).map(drop),
                            "signal" => parse_signal(&mut parsed).map(drop),
                            _ => parse_init(&mut parsed).map(drop),
                        };
                    })
                    .unwrap_or_else(|_| panic!("{sub} {:?} panicked", &line[..end]));
                }
            }
        }
    }
}
