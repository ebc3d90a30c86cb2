//! Starting the command: fork, isolate the child, exec, and learn whether exec worked.
//!
//! Everything the child needs (argv, envp, paths, the oom_score_adj text) is built before
//! fork, so between fork and exec the child makes only raw system calls. A close-on-exec pipe
//! carries the errno back if exec fails: EOF on it means the command is running.

use std::ffi::{CStr, CString, OsStr, c_char, c_int};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2};

use protocol::exit;

/// What to run and how.
pub struct Program {
    argv: Vec<CString>,
    env: Option<Vec<CString>>,
    cwd: Option<CString>,
}

impl Program {
    /// `argv[0]` is looked up in `PATH` like a shell would (`execvp`). Arguments containing a
    /// NUL byte cannot be passed to exec and are rejected here.
    pub fn new(argv: &[impl AsRef<OsStr>]) -> Result<Self, String> {
        if argv.is_empty() {
            return Err("no command given".to_owned());
        }
        Ok(Program {
            argv: to_cstrings(argv, "argument")?,
            env: None,
            cwd: None,
        })
    }

    /// Replaces the inherited environment (`KEY=VALUE` entries).
    pub fn env(mut self, env: &[impl AsRef<OsStr>]) -> Result<Self, String> {
        self.env = Some(to_cstrings(env, "environment entry")?);
        Ok(self)
    }

    /// Runs the command in `dir` instead of the emissary's working directory.
    pub fn cwd(mut self, dir: impl AsRef<OsStr>) -> Result<Self, String> {
        self.cwd = Some(to_cstrings(&[dir], "working directory")?.remove(0));
        Ok(self)
    }

    /// The program name as given, for messages.
    pub fn name(&self) -> String {
        self.argv[0].to_string_lossy().into_owned()
    }
}

fn to_cstrings(items: &[impl AsRef<OsStr>], what: &str) -> Result<Vec<CString>, String> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_ref().as_bytes())
                .map_err(|_| format!("{what} {:?} contains a NUL byte", s.as_ref()))
        })
        .collect()
}

/// Where the child's stdout and stderr go: `None` inherits the emissary's own.
pub struct Stdio {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Why the command never ran.
#[derive(Debug)]
pub enum SpawnError {
    /// exec failed: not found, not executable, bad format...
    Exec { program: String, errno: Errno },
    /// The working directory could not be entered.
    Chdir { dir: String, errno: Errno },
    /// fork or pipe failed: the emissary's own failure.
    Os { what: &'static str, errno: Errno },
}

impl SpawnError {
    /// 127 when nothing was found to run, 126 when something was found but could not run,
    /// 125 when the emissary itself could not start it.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::Exec {
                errno: Errno::ENOENT | Errno::ENOTDIR,
                ..
            } => exit::NOT_FOUND,
            SpawnError::Exec { .. } | SpawnError::Chdir { .. } => exit::NOT_EXECUTABLE,
            SpawnError::Os { .. } => exit::EMISSARY_FAILED,
        }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Exec {
                program,
                errno: Errno::ENOENT,
            } => {
                write!(f, "cannot run {program:?}: command not found")
            }
            SpawnError::Exec { program, errno } => {
                write!(f, "cannot run {program:?}: {}", errno.desc())
            }
            SpawnError::Chdir { dir, errno } => {
                write!(
                    f,
                    "cannot enter working directory {dir:?}: {}",
                    errno.desc()
                )
            }
            SpawnError::Os { what, errno } => write!(f, "{what} failed: {}", errno.desc()),
        }
    }
}

/// How much more attractive to the OOM killer the child is than the emissary, in
/// `oom_score_adj` units (0.1 % of the memory limit each). Enough that the emissary, at ~1 MB,
/// is never picked over its child in a cgroup of 10 MB or more, while staying within the
/// kubelet's QoS bands on the node.
const OOM_SCORE_ADJ_RAISE: i32 = 100;

/// Forks and execs `program` in its own process group. Signals must already be blocked
/// ([`crate::signals::block_all`]); the child starts with an empty mask. Dispositions are
/// left alone, so what the caller ignored stays ignored across exec and everything else is
/// default (exec resets handlers).
pub fn spawn(program: &Program, stdio: Stdio) -> Result<Pid, SpawnError> {
    let os = |what| move |errno| SpawnError::Os { what, errno };
    let argv = pointers(&program.argv);
    let envp = program.env.as_ref().map(|env| pointers(env));
    let oom_adj = raised_oom_score_adj();
    let take_terminal = owns_foreground_terminal();
    let parent = Pid::this();
    let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC).map_err(os("pipe"))?;

    // SAFETY: the child only makes async-signal-safe system calls on data prepared above,
    // then execs or _exits.
    match unsafe { fork() }.map_err(os("fork"))? {
        ForkResult::Child => unsafe {
            let plan = ChildPlan {
                argv: &argv,
                envp: envp.as_deref(),
                cwd: program.cwd.as_deref(),
                stdout: stdio.stdout.as_ref().map(AsRawFd::as_raw_fd),
                stderr: stdio.stderr.as_ref().map(AsRawFd::as_raw_fd),
                oom_adj: oom_adj.as_deref(),
                take_terminal,
                parent: parent.as_raw(),
                report: report_write.as_raw_fd(),
            };
            exec_child(&plan)
        },
        ForkResult::Parent { child } => {
            drop(stdio);
            drop(report_write);
            let mut report = [0u8; 5];
            let n = read_full(report_read.as_raw_fd(), &mut report);
            if n < report.len() {
                return Ok(child);
            }
            // exec failed: the child has _exited; collect it so no zombie is left.
            let _ = waitpid(child, None);
            let errno = Errno::from_raw(i32::from_ne_bytes(report[..4].try_into().unwrap()));
            Err(match report[4] {
                STAGE_CHDIR => SpawnError::Chdir {
                    dir: program
                        .cwd
                        .as_deref()
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    errno,
                },
                _ => SpawnError::Exec {
                    program: program.name(),
                    errno,
                },
            })
        }
    }
}

const STAGE_EXEC: u8 = 0;
const STAGE_CHDIR: u8 = 1;

struct ChildPlan<'a> {
    argv: &'a [*const c_char],
    envp: Option<&'a [*const c_char]>,
    cwd: Option<&'a CStr>,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
    oom_adj: Option<&'a CStr>,
    take_terminal: bool,
    parent: libc::pid_t,
    report: RawFd,
}

/// The child between fork and exec. Async-signal-safe calls only.
unsafe fn exec_child(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: raw system calls on valid pointers prepared by the parent before fork.
    unsafe {
        // Own process group, so a signal to the group reaches the command's whole tree but
        // never the emissary. Done here, not in the parent, so it holds before exec (tini).
        libc::setpgid(0, 0);
        if plan.take_terminal {
            // SIGTTOU is blocked here, so this cannot stop us.
            libc::tcsetpgrp(0, libc::getpid());
        }
        if let Some(fd) = plan.stdout {
            libc::dup2(fd, 1);
        }
        if let Some(fd) = plan.stderr {
            libc::dup2(fd, 2);
        }
        // If the emissary dies (SIGKILL, OOM), nobody would capture or report: stop too.
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != plan.parent {
            libc::_exit(exit::EMISSARY_FAILED);
        }
        if let Some(adj) = plan.oom_adj {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, adj.as_ptr().cast(), adj.to_bytes().len());
                libc::close(fd);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        if let Some(dir) = plan.cwd
            && libc::chdir(dir.as_ptr()) != 0
        {
            report_and_exit(plan.report, STAGE_CHDIR);
        }
        match plan.envp {
            Some(envp) => libc::execvpe(plan.argv[0], plan.argv.as_ptr(), envp.as_ptr()),
            None => libc::execvp(plan.argv[0], plan.argv.as_ptr()),
        };
        report_and_exit(plan.report, STAGE_EXEC)
    }
}

unsafe fn report_and_exit(fd: RawFd, stage: u8) -> ! {
    // SAFETY: errno location and write(2) are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut message = [0u8; 5];
        message[..4].copy_from_slice(&errno.to_ne_bytes());
        message[4] = stage;
        libc::write(fd, message.as_ptr().cast(), message.len());
        libc::_exit(exit::NOT_FOUND)
    }
}

/// A NULL-terminated pointer array over `strings` (which must outlive it).
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(fd: RawFd, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writing into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[filled..].as_mut_ptr().cast(), buf.len() - filled) };
        match n {
            0 => break,
            n if n > 0 => filled += n as usize,
            _ if Errno::last() == Errno::EINTR => continue,
            _ => break,
        }
    }
    filled
}

/// The child's `oom_score_adj`: ours raised by [`OOM_SCORE_ADJ_RAISE`], capped at 1000, so the
/// kernel picks the command, not the supervisor that must survive to report (Argo #9083).
fn raised_oom_score_adj() -> Option<CString> {
    let ours: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    CString::new((ours + OOM_SCORE_ADJ_RAISE).min(1000).to_string()).ok()
}

/// True when stdin is a terminal whose foreground group is ours: then the child takes it over,
/// so Ctrl-C and job control reach it directly. In the background we leave the terminal alone.
fn owns_foreground_terminal() -> bool {
    let stdin = std::io::stdin();
    // SAFETY: isatty and getpgrp have no preconditions.
    let is_tty = unsafe { libc::isatty(0) } == 1;
    is_tty && nix::unistd::tcgetpgrp(&stdin).is_ok_and(|pg| pg == nix::unistd::getpgrp())
}

/// Exit status of a reaped child, in the shell's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    Exited(i32),
    Signaled(c_int),
}

impl ChildStatus {
    pub fn exit_code(self) -> i32 {
        match self {
            ChildStatus::Exited(code) => code,
            ChildStatus::Signaled(signal) => exit::for_signal(signal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nul_bytes_and_empty_commands() {
        assert!(Program::new(&["a\0b"]).is_err());
        assert!(Program::new(&[] as &[&str]).is_err());
        assert!(Program::new(&["sh"]).unwrap().env(&["A=\0"]).is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let exec = |errno| SpawnError::Exec {
            program: "x".into(),
            errno,
        };
        assert_eq!(exec(Errno::ENOENT).exit_code(), 127);
        assert_eq!(exec(Errno::EACCES).exit_code(), 126);
        assert_eq!(exec(Errno::ENOEXEC).exit_code(), 126);
        assert_eq!(ChildStatus::Signaled(15).exit_code(), 143);
        assert_eq!(ChildStatus::Exited(3).exit_code(), 3);
    }
}
