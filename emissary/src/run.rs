//! `emissary run`: prepare, spawn, supervise, report.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::unistd::Pid;

use protocol::{ExitReason, RunSummary, TaskError, exit, time};

use crate::capture::{self, Captured, Sinks};
use crate::control::{self, Control};
use crate::fsutil::write_atomic;
use crate::reap;
use crate::signals;
use crate::spawn::{self, ChildStatus, Program, Stdio};
use crate::supervise;

/// Everything `emissary run` was asked to do.
pub struct RunOptions {
    pub command: Vec<OsString>,
    pub log_dir: Option<PathBuf>,
    pub summary: Option<PathBuf>,
    pub deadline: Option<Duration>,
    pub grace: Duration,
}

/// A failure of the emissary itself: reported on one stderr line, exit 125.
pub struct Fatal(pub String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

/// Runs the command and returns the emissary's exit code.
pub fn run(opts: RunOptions) -> i32 {
    match execute(&opts) {
        Ok(code) => code,
        Err(Fatal(message)) => {
            eprintln!("emissary: {message}");
            exit::EMISSARY_FAILED
        }
    }
}

/// The log directory: captured streams, the control FIFO and the exitcode file.
struct LogDir {
    dir: PathBuf,
    stdout: File,
    stderr: File,
    combined: File,
    control: Control,
}

impl LogDir {
    fn create(dir: &Path) -> Result<LogDir, Fatal> {
        fs::create_dir_all(dir)
            .map_err(|e| Fatal(format!("cannot create log dir {}: {e}", dir.display())))?;
        let open = |name: &str, append: bool| {
            let path = dir.join(name);
            // O_APPEND by hand: std refuses append together with truncate.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(if append { libc::O_APPEND } else { 0 })
                .open(&path)
                .map_err(|e| Fatal(format!("cannot open {}: {e}", path.display())))
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
}

fn execute(opts: &RunOptions) -> Result<i32, Fatal> {
    let program = Program::new(&opts.command)?;
    // Before any fork or thread: from here on no signal is delivered asynchronously.
    let signals = signals::block_all().map_err(|e| Fatal(format!("cannot block signals: {e}")))?;
    if std::process::id() != 1 {
        reap::become_subreaper()
            .map_err(|e| Fatal(format!("cannot become a child subreaper: {e}")))?;
    }
    let mut logs = opts.log_dir.as_deref().map(LogDir::create).transpose()?;
    if let Some(summary) = &opts.summary {
        check_parent_exists(summary)?;
    }
    let capturing = logs.is_some() || opts.summary.is_some();
    let pipes = if capturing {
        Some((capture::pipe()?, capture::pipe()?))
    } else {
        None
    };

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
    let spawned = spawn::spawn(&program, stdio);
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("emissary: {e}");
            let code = e.exit_code();
            let error = if code == exit::EMISSARY_FAILED {
                TaskError::system(e.to_string(), true)
            } else {
                TaskError::user(e.to_string(), false)
            };
            let report = Report {
                exit_code: code,
                reason: ExitReason::StartFailed,
                signal: None,
                error: Some(error),
                started_at,
                start,
                captured: Captured {
                    stdout_bytes: 0,
                    stderr_bytes: 0,
                    error: None,
                },
            };
            return finish(opts, logs.as_ref(), report);
        }
    };

    let capture = match pipes {
        Some((out, err)) => {
            drop((out.write, err.write));
            let combined = logs
                .as_ref()
                .map(|l| l.combined.try_clone())
                .transpose()?
                .map(Arc::new);
            let stdout = Sinks {
                file: logs.as_ref().map(|l| l.stdout.try_clone()).transpose()?,
                combined: combined.clone(),
                echo: capture::std_fd(1),
            };
            let stderr = Sinks {
                file: logs.as_ref().map(|l| l.stderr.try_clone()).transpose()?,
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

    let deadline = opts.deadline.map(|d| start + d);
    let control = logs.as_mut().map(|l| &mut l.control);
    let ended = supervise::supervise(pid, &signals, control, deadline, opts.grace)?;
    let captured = match capture {
        Some(capture) => capture.finish(opts.grace),
        None => Captured {
            stdout_bytes: 0,
            stderr_bytes: 0,
            error: None,
        },
    };
    finish(
        opts,
        logs.as_ref(),
        Report::ended(&ended, started_at, start, captured),
    )
}

/// The facts a summary is made of.
struct Report {
    exit_code: i32,
    reason: ExitReason,
    signal: Option<i32>,
    error: Option<TaskError>,
    started_at: SystemTime,
    start: Instant,
    captured: Captured,
}

impl Report {
    fn ended(
        ended: &supervise::Ended,
        started_at: SystemTime,
        start: Instant,
        captured: Captured,
    ) -> Report {
        let signal = match ended.status {
            ChildStatus::Signaled(s) => Some(s),
            ChildStatus::Exited(_) => None,
        };
        let (exit_code, reason, error) = if ended.deadline_exceeded {
            let message = "deadline exceeded: the command was stopped".to_owned();
            (
                exit::DEADLINE_EXCEEDED,
                ExitReason::DeadlineExceeded,
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
        };
        Report {
            exit_code,
            reason,
            signal,
            error,
            started_at,
            start,
            captured,
        }
    }
}

/// Writes the summary and exitcode file; returns the emissary's exit code.
fn finish(opts: &RunOptions, logs: Option<&LogDir>, mut report: Report) -> Result<i32, Fatal> {
    let duration = report.start.elapsed();
    let usage = children_usage();
    if let Some(message) = report.captured.error.take() {
        eprintln!("emissary: {message}");
        report.exit_code = exit::EMISSARY_FAILED;
        report.error = Some(TaskError::system(message, true));
    }
    let summary = RunSummary {
        exit_code: report.exit_code,
        reason: report.reason,
        signal: report.signal,
        started_at: time::format_rfc3339(report.started_at),
        finished_at: time::format_rfc3339(report.started_at + duration),
        duration_ms: duration.as_millis() as u64,
        user_cpu_ms: usage.user_ms,
        sys_cpu_ms: usage.sys_ms,
        max_rss_kb: usage.max_rss_kb,
        stdout_bytes: report.captured.stdout_bytes,
        stderr_bytes: report.captured.stderr_bytes,
        error: report.error,
    };
    if let Some(path) = &opts.summary {
        let mut json = serde_json::to_vec_pretty(&summary)?;
        json.push(b'\n');
        write_atomic(path, &json)
            .map_err(|e| Fatal(format!("cannot write summary {}: {e}", path.display())))?;
    }
    if let Some(logs) = logs {
        let path = logs.dir.join("exitcode");
        write_atomic(&path, summary.exit_code.to_string().as_bytes())
            .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(summary.exit_code)
}

struct Usage {
    user_ms: u64,
    sys_ms: u64,
    max_rss_kb: u64,
}

/// CPU and peak memory of every reaped descendant.
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
