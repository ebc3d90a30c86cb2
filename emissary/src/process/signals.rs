//! Signals: blocked before fork, collected through a signalfd, forwarded to the child's group.
//!
//! Every signal is blocked in the emissary (threads inherit the mask), so nothing is ever
//! delivered asynchronously: the supervisor reads them from a signalfd in its poll loop, as tini
//! and catatonit do. Blocking happens before the child exists, so a signal sent the instant the
//! emissary starts is either fatal to it (default action, before this runs) or forwarded later;
//! never lost (dumb-init #102).
//!
//! What is forwarded and what is not:
//! - every catchable signal except SIGCHLD goes to the child's process group, including
//!   SIGTSTP, SIGTTIN and SIGTTOU: the group stops, the emissary keeps running and keeps
//!   supervising (a stopped child is not an exit). SIGCONT resumes the group. While the emissary
//!   has these blocked, the kernel never stops it for terminal I/O either.
//! - the fault signals (SEGV, BUS, ILL, FPE) are blocked too; a real fault in the emissary is
//!   still fatal because the kernel forces those through a mask.
//! - SIGKILL and SIGSTOP cannot be caught. SIGKILL kills the emissary; its main child then gets
//!   SIGKILL too (`PR_SET_PDEATHSIG`), so no command runs on unsupervised. SIGSTOP stops the
//!   emissary; the command runs on until its output pipes fill, then blocks until SIGCONT.
//!   As PID 1 of a PID namespace, the kernel ignores both when sent from inside the namespace.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

/// The emissary's signal inlet: all signals blocked, readable from one fd.
pub struct Signals {
    fd: SignalFd,
}

/// Blocks every signal for this thread (and the threads it later spawns) and opens a signalfd
/// for them. Call before forking or spawning any thread.
pub fn block_all() -> io::Result<Signals> {
    let all = SigSet::all();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None)?;
    let fd = SignalFd::with_flags(&all, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    Ok(Signals { fd })
}

impl Signals {
    /// The next pending signal number, or `None` when none is pending.
    pub fn next(&self) -> io::Result<Option<c_int>> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Ok(Some(info.ssi_signo as c_int)),
            Ok(None) => Ok(None),
            Err(Errno::EINTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sends `signal` to process `pid` (negative: a process group). A target that is already gone
/// is not an error: the race between its exit and our signal is normal.
pub fn send(pid: Pid, signal: c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let _ = unsafe { libc::kill(pid.as_raw(), signal) };
}

/// Parses `TERM`, `SIGTERM`, `term` or `15`. Real-time signals are accepted by number.
pub fn parse(text: &str) -> Option<c_int> {
    let text = text.trim();
    if let Ok(number) = text.parse::<c_int>() {
        return (1..=libc::SIGRTMAX()).contains(&number).then_some(number);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().ok().map(|s| s as c_int)
}

/// `SIGTERM` for 15; the number itself for signals without a name.
pub fn name(signal: c_int) -> String {
    Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned())
}

/// Whether `signal`'s default action ends a process: a window resize, SIGURG, SIGCONT or a
/// stop request must not fail the container while it waits.
pub fn terminates(signal: i32) -> bool {
    !matches!(
        signal,
        libc::SIGCHLD
            | libc::SIGCONT
            | libc::SIGURG
            | libc::SIGWINCH
            | libc::SIGTSTP
            | libc::SIGTTIN
            | libc::SIGTTOU
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_numbers() {
        assert_eq!(parse("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse("sigusr1"), Some(libc::SIGUSR1));
        assert_eq!(parse("SIGHUP"), Some(libc::SIGHUP));
        assert_eq!(parse("9"), Some(libc::SIGKILL));
        assert_eq!(parse(" 34\n"), Some(34));
        for bad in ["", "0", "65", "-1", "NOPE", "SIG"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
        assert_eq!(name(40), "40");
    }
}
