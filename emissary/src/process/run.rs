//! `emissary run`: one supervised execution, from a prepared program to its [`Outcome`].
//!
//! [`execute`] is shared by the plain `emissary run -- CMD` ([`run_command`]) and the template
//! mode (`crate::task::step`), which wraps it with input staging and output collection.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::Pid;

use protocol::{ExitReason, RunSummary, TaskError, exit, time};

use crate::fsutil::write_atomic;
use crate::process::capture::{self, Sinks};
use crate::process::control::{self, Control};
use crate::process::oom;
use crate::process::reap;
use crate::process::signals::{self, Signals};
use crate::process::spawn::{self, ChildStatus, Program, SpawnError, Stdio};
use crate::process::supervise;

/// Everything `emissary run` was asked to do.
#[derive(Debug, Default)]
pub struct RunOptions {
    pub command: Vec<OsString>,
    pub log_dir: Option<PathBuf>,
    pub summary: Option<PathBuf>,
    pub deadline: Option<Duration>,
    pub grace: Duration,
    /// Template mode (`--template`, or `EMISSARY_TEMPLATE`/`ARGO_TEMPLATE` in the environment).
    pub template: Option<PathBuf>,
    pub params: Vec<(String, String)>,
    pub inputs: Vec<(String, PathBuf)>,
    pub out: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub container: Option<String>,
    pub store: Option<PathBuf>,
}

/// A failure of the emissary itself: reported on one stderr line, exit 125.
#[derive(Debug)]
pub struct Fatal(pub String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

/// Blocks signals and becomes the tree's reaper: the first thing any run does, before any
/// fork or thread, so that no signal is ever delivered asynchronously.
pub fn prepare() -> Result<Signals, Fatal> {
    let signals = signals::block_all().map_err(|e| Fatal(format!("cannot block signals: {e}")))?;
    if std::process::id() != 1 {
        reap::become_subreaper()
            .map_err(|e| Fatal(format!("cannot become a child subreaper: {e}")))?;
    }
    Ok(signals)
}

/// `emissary run -- CMD`: no template, just supervision.
pub fn run_command(opts: &RunOptions) -> Result<i32, Fatal> {
    run_command_with(opts, |_| {})
}

/// [`run_command`], calling `started` with the log directory (and so the control FIFO) before
/// the command starts.
pub fn run_command_with(
    opts: &RunOptions,
    started: impl FnOnce(Option<&LogDir>),
) -> Result<i32, Fatal> {
    let program = Program::new(&opts.command)?;
    let signals = prepare()?;
    let mut logs = opts.log_dir.as_deref().map(LogDir::create).transpose()?;
    started(logs.as_ref());
    if let Some(summary) = &opts.summary {
        check_parent_exists(summary)?;
    }
    let job = Job {
        program: &program,
        capture: logs.is_some() || opts.summary.is_some(),
        deadline: opts.deadline.map(|d| Instant::now() + d),
        grace: opts.grace,
    };
    let outcome = execute(job, &signals, logs.as_mut())?;
    if let Some(path) = &opts.summary {
        write_summary(path, &outcome.summary())?;
    }
    if let Some(logs) = &logs {
        logs.write_exitcode(outcome.exit_code)?;
    }
    Ok(outcome.exit_code)
}

/// The log directory: captured streams, the control FIFO and the exitcode file.
pub struct LogDir {
    pub dir: PathBuf,
    stdout: File,
    stderr: File,
    combined: File,
    control: Control,
}

impl LogDir {
    pub fn create(dir: &Path) -> Result<LogDir, Fatal> {
        fs::create_dir_all(dir)
            .map_err(|e| Fatal(format!("cannot create log dir {}: {e}", dir.display())))?;
        // A dependant must not take an earlier run's exit code for this one's.
        for stale in ["exitcode", "summary.json"] {
            match fs::remove_file(dir.join(stale)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Fatal(format!(
                        "cannot remove {}: {e}",
                        dir.join(stale).display()
                    )));
                }
                _ => {}
            }
        }
        let open = |name: &str, append: bool| {
            let path = dir.join(name);
            let fail =
                |e: &dyn std::fmt::Display| Fatal(format!("cannot open {}: {e}", path.display()));
            // O_APPEND by hand: std refuses append together with truncate. Readable, so that
            // `outputs.result` is read back through this descriptor rather than the path.
            // Never through a planted symlink, nor into a FIFO (whose open would block).
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(
                    libc::O_NOFOLLOW | libc::O_NONBLOCK | if append { libc::O_APPEND } else { 0 },
                )
                .open(&path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => fail(&"a symbolic link, never written through"),
                    _ => fail(&e),
                })?;
            match file.metadata() {
                Ok(meta) if meta.is_file() => Ok(file),
                Ok(_) => Err(fail(&"not a regular file")),
                Err(e) => Err(fail(&e)),
            }
        };
        Ok(LogDir {
            dir: dir.to_owned(),
            stdout: open("stdout", false)?,
            stderr: open("stderr", false)?,
            combined: open("combined", true)?,
            control: control::listen(dir).map_err(|e| {
                Fatal(format!(
                    "cannot create {}: {e}",
                    dir.join(control::FIFO_NAME).display()
                ))
            })?,
        })
    }

    /// See [`Control::sender`].
    pub fn control_sender(&self) -> std::io::Result<File> {
        self.control.sender()
    }

    /// The control FIFO's own descriptor (for the stop watcher of transfers).
    pub fn control_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.control)
    }

    /// The captured stdout, as written (whatever is at its path now).
    pub fn stdout(&self) -> &File {
        &self.stdout
    }

    /// `DIR/exitcode`: the decimal exit code, no newline (Argo's format), written atomically.
    pub fn write_exitcode(&self, code: i32) -> Result<(), Fatal> {
        let path = self.dir.join("exitcode");
        write_atomic(&path, code.to_string().as_bytes())
            .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))
    }
}

/// One supervised execution.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub program: &'a Program,
    /// Pipe stdout/stderr through the emissary (needed for the log files and byte counts), and
    /// gather what a report needs (OOM detection). Without it, the emissary is a bare init.
    pub capture: bool,
    pub deadline: Option<Instant>,
    pub grace: Duration,
}

/// How an execution ended, with everything a summary needs.
pub struct Outcome {
    pub exit_code: i32,
    pub reason: ExitReason,
    pub signal: Option<i32>,
    pub error: Option<TaskError>,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub usage: Usage,
}

/// CPU and peak memory of every reaped descendant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user_ms: u64,
    pub sys_ms: u64,
    pub max_rss_kb: u64,
}

impl Outcome {
    /// An outcome for a command that never ran.
    pub fn not_started(exit_code: i32, error: TaskError, started_at: SystemTime) -> Outcome {
        Outcome {
            exit_code,
            reason: ExitReason::StartFailed,
            signal: None,
            error: Some(error),
            started_at,
            duration: Duration::ZERO,
            stdout_bytes: 0,
            stderr_bytes: 0,
            usage: Usage::default(),
        }
    }

    /// Marks the run failed for a reason besides the command's own (a log or output not
    /// written): a command that succeeded makes the run exit 125 with reason `Error`; a
    /// command that failed keeps its code and reason. Both errors are kept in the message.
    pub fn fail(&mut self, error: TaskError) {
        if self.exit_code == 0 {
            self.exit_code = exit::EMISSARY_FAILED;
        }
        if self.reason == ExitReason::Completed {
            self.reason = ExitReason::Error;
        }
        self.error = Some(match self.error.take() {
            Some(first) => TaskError {
                message: format!("{}; {}", first.message, error.message),
                ..error
            },
            None => error,
        });
    }

    pub fn summary(&self) -> RunSummary {
        RunSummary {
            exit_code: self.exit_code,
            reason: self.reason,
            signal: self.signal,
            started_at: time::format_rfc3339(self.started_at),
            finished_at: time::format_rfc3339(self.started_at + self.duration),
            duration_ms: self.duration.as_millis() as u64,
            user_cpu_ms: self.usage.user_ms,
            sys_cpu_ms: self.usage.sys_ms,
            max_rss_kb: self.usage.max_rss_kb,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            error: self.error.clone(),
        }
    }
}

/// Spawns `job.program`, supervises it and everything it starts, and reports how it ended.
/// Only failures of the emissary itself are errors; a command that cannot start is an
/// [`Outcome`] with reason `StartFailed`.
pub fn execute(
    job: Job<'_>,
    signals: &Signals,
    logs: Option<&mut LogDir>,
) -> Result<Outcome, Fatal> {
    let pipes = if job.capture {
        Some((capture::pipe()?, capture::pipe()?))
    } else {
        None
    };
    // Only a report can tell an OOM kill from another SIGKILL; without one, skip the reads.
    let oom_before = if job.capture { oom::kills() } else { None };
    let started_at = SystemTime::now();
    let start = Instant::now();
    let stdio = match &pipes {
        Some((out, err)) => Stdio {
            stdout: Some(out.write.try_clone()?),
            stderr: Some(err.write.try_clone()?),
        },
        None => Stdio {
            stdout: None,
            stderr: None,
        },
    };
    let pid = match spawn::spawn(job.program, stdio) {
        Ok(pid) => pid,
        Err(e) => {
            crate::note!("emissary: {e}");
            return Ok(Outcome::not_started(
                e.exit_code(),
                start_error(&e),
                started_at,
            ));
        }
    };

    let capture = match pipes {
        Some((out, err)) => {
            drop((out.write, err.write));
            let files = logs.as_deref().map(|l| (&l.stdout, &l.stderr, &l.combined));
            let clone = |f: &File| f.try_clone();
            let combined = files.map(|f| clone(f.2)).transpose()?.map(Arc::new);
            let stdout = Sinks {
                file: files.map(|f| clone(f.0)).transpose()?,
                combined: combined.clone(),
                echo: capture::std_fd(1),
            };
            let stderr = Sinks {
                file: files.map(|f| clone(f.1)).transpose()?,
                combined,
                echo: capture::std_fd(2),
            };
            match capture::start((out.read, stdout), (err.read, stderr)) {
                Ok(capture) => Some(capture),
                Err(e) => {
                    // Without readers the command would block on its first large write.
                    signals::send(Pid::from_raw(-pid.as_raw()), libc::SIGKILL);
                    return Err(Fatal(format!("cannot start output capture: {e}")));
                }
            }
        }
        None => None,
    };

    let control = logs.map(|l| &mut l.control);
    let ended = supervise::supervise(pid, signals, control, job.deadline, job.grace)?;
    let duration = start.elapsed();
    let (stdout_bytes, stderr_bytes, capture_error) = match capture {
        Some(capture) => {
            let captured = capture.finish(job.grace);
            (captured.stdout_bytes, captured.stderr_bytes, captured.error)
        }
        None => (0, 0, None),
    };
    let oom_killed = ended.status == ChildStatus::Signaled(libc::SIGKILL)
        && oom::kills()
            .zip(oom_before)
            .is_some_and(|(after, before)| after > before);
    let (exit_code, reason, error) = classify(&ended, oom_killed);
    let mut outcome = Outcome {
        exit_code,
        reason,
        signal: match ended.status {
            ChildStatus::Signaled(s) => Some(s),
            ChildStatus::Exited(_) => None,
        },
        error,
        started_at,
        duration,
        stdout_bytes,
        stderr_bytes,
        usage: children_usage(),
    };
    if let Some(message) = capture_error {
        crate::note!("emissary: {message}");
        outcome.fail(TaskError::system(message, true));
    }
    Ok(outcome)
}

fn start_error(e: &SpawnError) -> TaskError {
    match e {
        SpawnError::Os { .. } => TaskError::system(e.to_string(), true),
        _ => TaskError::user(e.to_string(), false),
    }
}

/// Exit code, reason and error kind from how the tree ended.
fn classify(ended: &supervise::Ended, oom_killed: bool) -> (i32, ExitReason, Option<TaskError>) {
    if ended.deadline_exceeded {
        let message = "deadline exceeded: the command was stopped".to_owned();
        (
            exit::DEADLINE_EXCEEDED,
            ExitReason::DeadlineExceeded,
            Some(TaskError::user(message, true)),
        )
    } else if oom_killed {
        let message = "the command was killed by the OOM killer (memory limit reached)".to_owned();
        (
            ended.status.exit_code(),
            ExitReason::OomKilled,
            Some(TaskError::user(message, true)),
        )
    } else {
        match ended.status {
            ChildStatus::Exited(0) => (0, ExitReason::Completed, None),
            ChildStatus::Exited(code) => {
                let message = format!("the command exited with code {code}");
                (
                    code,
                    ExitReason::Error,
                    Some(TaskError::user(message, false)),
                )
            }
            ChildStatus::Signaled(s) => {
                let message = format!("the command was killed by {}", signals::name(s));
                (
                    ended.status.exit_code(),
                    ExitReason::Signaled,
                    Some(TaskError::user(message, false)),
                )
            }
        }
    }
}

/// Writes a summary as pretty JSON, atomically.
pub fn write_summary(path: &Path, summary: &RunSummary) -> Result<(), Fatal> {
    let mut json = serde_json::to_vec_pretty(summary)?;
    json.push(b'\n');
    write_atomic(path, &json)
        .map_err(|e| Fatal(format!("cannot write summary {}: {e}", path.display())))
}

fn children_usage() -> Usage {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let ms = |tv: libc::timeval| tv.tv_sec as u64 * 1000 + tv.tv_usec as u64 / 1000;
    Usage {
        user_ms: ms(usage.ru_utime),
        sys_ms: ms(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss as u64,
    }
}

fn check_parent_exists(path: &Path) -> Result<(), Fatal> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if parent.is_dir() {
        Ok(())
    } else {
        Err(Fatal(format!(
            "cannot write summary {}: directory {} does not exist",
            path.display(),
            parent.display()
        )))
    }
}
