//! Transfers cut short by a stop: while inputs are staged or outputs uploaded (and during a
//! containerSet's retry pause) no command runs to forward signals to, so a watcher reads the
//! emissary's signals and control FIFO itself. The first terminating signal, or the agent's
//! `terminate`, is recorded and the socket of the transfer in progress is shut down: a read or
//! write blocked on it returns at once, and the step reports within its grace instead of when
//! a large transfer ends.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::process::control::{self, Message};
use crate::process::signals;

/// The signal that stopped the step, 0 while none did.
static STOPPED: AtomicI32 = AtomicI32::new(0);
/// The socket of the transfer in progress, -1 when none is.
static SOCKET: AtomicI32 = AtomicI32::new(-1);
/// Duplicates of the signalfd and the control FIFO, read by the watcher.
static WATCHED: OnceLock<(OwnedFd, Option<OwnedFd>)> = OnceLock::new();

/// Makes transfers cancellable by what arrives on `signals` and `control` (once per process).
pub fn arm(signals: BorrowedFd<'_>, control: Option<BorrowedFd<'_>>) {
    if let Ok(signals) = signals.try_clone_to_owned() {
        let control = control.and_then(|c| c.try_clone_to_owned().ok());
        let _ = WATCHED.set((signals, control));
    }
}

/// The terminating signal that stopped the step, if one did.
pub fn stopped() -> Option<i32> {
    match STOPPED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// A transfer's socket, shut down on a stop while this lives.
pub struct Transfer(RawFd);

pub fn transfer(socket: &impl AsRawFd) -> Transfer {
    let fd = socket.as_raw_fd();
    SOCKET.store(fd, Ordering::SeqCst);
    if stopped().is_some() {
        // SAFETY: shutdown(2) on a socket this process holds open.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    Transfer(fd)
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let _ = SOCKET.compare_exchange(self.0, -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Runs `work` with a watcher beside it; returns what it returned and the signal that stopped
/// the step meanwhile, if any.
pub fn watching<T>(work: impl FnOnce() -> T) -> (T, Option<i32>) {
    let Ok((done_read, done_write)) = nix::unistd::pipe() else {
        return (work(), stopped());
    };
    let value = std::thread::scope(|scope| {
        let watcher = std::thread::Builder::new()
            .name("stop-watch".into())
            .stack_size(64 * 1024)
            .spawn_scoped(scope, || watch(None, Some(done_read.as_fd())));
        let value = work();
        let _ = nix::unistd::write(&done_write, b"x");
        if let Ok(watcher) = watcher {
            let _ = watcher.join();
        }
        value
    });
    (value, stopped())
}

/// Waits `pause`, or less if a stop arrives: returns its signal then.
pub fn pause(pause: Duration) -> Option<i32> {
    watch(Some(pause), None);
    stopped()
}

/// Reads signals and control messages until a stop (recorded, and the transfer's socket shut
/// down), `done` is readable, or `timeout` passes.
fn watch(timeout: Option<Duration>, done: Option<BorrowedFd<'_>>) {
    let Some((signals, control)) = WATCHED.get() else {
        if let Some(timeout) = timeout {
            std::thread::sleep(timeout);
        }
        return;
    };
    let until = timeout.map(|t| std::time::Instant::now() + t);
    let mut partial = Vec::new();
    while stopped().is_none() {
        let wait = match until {
            Some(until) => {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return;
                }
                PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32 + 1)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            control
                .iter()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(done.iter().map(|d| PollFd::new(*d, PollFlags::POLLIN)));
        if poll(&mut fds, wait).is_err() {
            continue;
        }
        if done.is_some()
            && fds
                .last()
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        {
            return;
        }
        while let Some(signal) = read_signal(signals) {
            if signals::terminates(signal) {
                stop(signal);
            }
        }
        if let Some(control) = control {
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = nix::unistd::read(control, &mut buf) {
                partial.extend_from_slice(&buf[..n]);
            }
            for message in control::parse_lines(&mut partial) {
                match message {
                    Message::Terminate => stop(libc::SIGTERM),
                    Message::Signal(s) if signals::terminates(s) => stop(s),
                    Message::Signal(_) => {}
                }
            }
        }
    }
}

fn stop(signal: i32) {
    if STOPPED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        crate::note!(
            "emissary: {} while transferring: stopping",
            signals::name(signal)
        );
    }
    let socket = SOCKET.load(Ordering::SeqCst);
    if socket >= 0 {
        // SAFETY: shutdown(2) on the registered socket; at worst one just closed (EBADF).
        unsafe { libc::shutdown(socket, libc::SHUT_RDWR) };
    }
}

/// The next signal from a signalfd, non-blocking.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which has that size.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
    // SAFETY: a full read initialised every field.
    (n == size as isize).then(|| unsafe { info.assume_init() }.ssi_signo as i32)
}
