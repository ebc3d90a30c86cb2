//! The supervisor loop, tini's `main` in Rust: wait for something to happen (a signal, a control
//! message, a timer), forward signals, reap, escalate; stop once the main child and every other
//! descendant are gone.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd::Pid;

use crate::process::control::{Control, Message};
use crate::process::reap::{self, Terminator};
use crate::process::signals::Signals;
use crate::process::spawn::ChildStatus;

/// How the supervised tree ended.
pub struct Ended {
    pub status: ChildStatus,
    pub deadline_exceeded: bool,
}

/// Supervises `main` (the leader of its own process group) until it and all other descendants
/// have been reaped.
pub fn supervise(
    main: Pid,
    signals: &Signals,
    mut control: Option<&mut Control>,
    deadline: Option<Instant>,
    grace: Duration,
) -> std::io::Result<Ended> {
    let mut terminator = Terminator::new(main, grace);
    let mut main_status = None;
    let mut deadline_exceeded = false;
    loop {
        let now = Instant::now();
        if main_status.is_none() && deadline.is_some_and(|d| now >= d) && !deadline_exceeded {
            deadline_exceeded = true;
            terminator.start(now);
        }
        terminator.tick(now);

        let deadline_pending = deadline.filter(|_| main_status.is_none() && !deadline_exceeded);
        let wake = [deadline_pending, terminator.next_wakeup()]
            .into_iter()
            .flatten()
            .min();
        wait(signals, control.as_deref(), wake)?;

        while let Some(signal) = signals.next()? {
            if signal != libc::SIGCHLD {
                terminator.forward(signal);
            }
        }
        if let Some(control) = control.as_deref_mut() {
            for message in control.drain() {
                match message {
                    Message::Signal(signal) => terminator.forward(signal),
                    Message::Terminate => terminator.start(Instant::now()),
                }
            }
        }

        let reaped = reap::reap_exited(main);
        if let Some(status) = reaped.main {
            main_status = Some(status);
            // The command is done; whatever it left behind gets TERM now, KILL after grace.
            if reaped.children_left {
                terminator.start(Instant::now());
            }
        }
        if reaped.children_left {
            terminator.children_changed();
        } else if let Some(status) = main_status {
            return Ok(Ended {
                status,
                deadline_exceeded,
            });
        }
    }
}

/// Sleeps until a signal or control message arrives, or until `wake`.
fn wait(
    signals: &Signals,
    control: Option<&Control>,
    wake: Option<Instant>,
) -> std::io::Result<()> {
    let timeout = match wake {
        None => PollTimeout::NONE,
        Some(at) => {
            // Round up: waking a little early would spin until the instant passes.
            let left = at.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
    if let Some(control) = control {
        fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
    }
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
