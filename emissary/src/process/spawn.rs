//! Starting the command: clone, isolate the child, exec, and learn whether exec worked.
//!
//! Everything the child needs (argv, envp, paths, the oom_score_adj text) is built before
//! the child exists, so between clone and exec it makes only raw system calls.

use std::ffi::{CStr, CString, OsStr, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

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

/// Starts `program` in its own process group. Signals must already be blocked
/// ([`crate::process::signals::block_all`]); the child starts with an empty mask. Dispositions are
/// left alone, so what the caller ignored stays ignored across exec and everything else is
/// default (exec resets handlers).
///
/// The child is a `clone(CLONE_VM | CLONE_VFORK)`, as glibc's posix_spawn does it: it runs on
/// its own small stack in our memory while we wait, so no page tables are copied and no
/// copy-on-write faults follow (fork cost ~150 µs more per run, BENCHMARKS.md). An exec error
/// is left in shared memory for us to read when the child exits.
pub fn spawn(program: &Program, stdio: Stdio) -> Result<Pid, SpawnError> {
    let argv = pointers(&program.argv);
    let envp = program.env.as_ref().map(|env| pointers(env));
    let oom_adj = raised_oom_score_adj();
    let failure = AtomicU64::new(0);
    let plan = ChildPlan {
        argv: &argv,
        envp: envp.as_deref(),
        cwd: program.cwd.as_deref(),
        stdout: stdio.stdout.as_ref().map(AsRawFd::as_raw_fd),
        stderr: stdio.stderr.as_ref().map(AsRawFd::as_raw_fd),
        oom_adj: oom_adj.as_deref(),
        take_terminal: owns_foreground_terminal(),
        parent: Pid::this().as_raw(),
        failure: &failure,
    };
    // execvp's PATH search and script fallback use a few KiB plus a copy of argv.
    let mut stack = vec![0u8; CHILD_STACK + 16 * argv.len()];
    // SAFETY: the stack outlives the child's use of it (CLONE_VFORK: we resume only after the
    // child has exec'd or exited); the child makes raw system calls only on `plan`.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            child_entry,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &plan as *const ChildPlan<'_> as *mut c_void,
        )
    };
    if pid < 0 {
        return Err(SpawnError::Os {
            what: "clone",
            errno: Errno::last(),
        });
    }
    drop(stdio);
    let child = Pid::from_raw(pid);
    let failure = failure.load(Ordering::SeqCst);
    if failure == 0 {
        return Ok(child);
    }
    // exec failed: the child has _exited; collect it so no zombie is left.
    let _ = waitpid(child, None);
    let errno = Errno::from_raw((failure >> 8) as i32);
    Err(match (failure & 0xff) as u8 {
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

const CHILD_STACK: usize = 64 * 1024;
const STAGE_EXEC: u8 = 1;
const STAGE_CHDIR: u8 = 2;

struct ChildPlan<'a> {
    argv: &'a [*const c_char],
    envp: Option<&'a [*const c_char]>,
    cwd: Option<&'a CStr>,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
    oom_adj: Option<&'a CStr>,
    take_terminal: bool,
    parent: libc::pid_t,
    /// `errno << 8 | stage` when the child could not exec; 0 while all is well.
    failure: &'a AtomicU64,
}

extern "C" fn child_entry(plan: *mut c_void) -> c_int {
    // SAFETY: `plan` is the ChildPlan the parent passed to clone, alive while it waits.
    unsafe { exec_child(&*(plan as *const ChildPlan<'_>)) }
}

/// The child between clone and exec. Raw system calls only: it shares the parent's memory.
unsafe fn exec_child(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: raw system calls on valid pointers prepared by the parent.
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
            fail(plan, STAGE_CHDIR);
        }
        match plan.envp {
            Some(envp) => libc::execvpe(plan.argv[0], plan.argv.as_ptr(), envp.as_ptr()),
            None => libc::execvp(plan.argv[0], plan.argv.as_ptr()),
        };
        fail(plan, STAGE_EXEC)
    }
}

/// Leaves errno and the failed stage for the parent, and exits.
unsafe fn fail(plan: &ChildPlan<'_>, stage: u8) -> ! {
    // SAFETY: the errno location and _exit are safe to use here.
    unsafe {
        let errno = *libc::__errno_location() as u64;
        plan.failure
            .store(errno << 8 | u64::from(stage), Ordering::SeqCst);
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

/// The child's `oom_score_adj`: ours raised by [`OOM_SCORE_ADJ_RAISE`], capped at 1000, so the
/// kernel picks the command, not the supervisor that must survive to report (Argo #9083).
fn raised_oom_score_adj() -> Option<CString> {
    // A raw read into a stack buffer: this runs on every start, and fs::read_to_string costs
    // two more system calls.
    let mut buf = [0u8; 16];
    // SAFETY: open/read/close on a buffer we own.
    let n = unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let ours: i32 = std::str::from_utf8(buf.get(..usize::try_from(n).ok()?)?)
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
