//! Reaping every descendant, and ending the ones that outlive the command.
//!
//! The emissary is a child subreaper (or PID 1), so every orphan in the command's tree is
//! re-parented to it. SIGCHLDs coalesce, so each wake-up drains `waitpid(-1, WNOHANG)` until it
//! reports nothing more, and notices the main child inside that loop (catatonit #4).

use std::fs;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::process::signals;
use crate::process::spawn::ChildStatus;

/// Makes orphans in the command's tree our children even when we are not PID 1.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What one reaping pass found.
pub struct Reaped {
    /// The main child's status, if it was reaped in this pass.
    pub main: Option<ChildStatus>,
    /// Whether any child (of ours) is still alive.
    pub children_left: bool,
}

/// Reaps every child that has exited, without blocking.
pub fn reap_exited(main: Pid) -> Reaped {
    let mut reaped = Reaped {
        main: None,
        children_left: true,
    };
    loop {
        let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ChildStatus::Exited(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, ChildStatus::Signaled(signal as i32)),
            Ok(WaitStatus::StillAlive) => return reaped,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(_) => {
                // ECHILD: nothing left to wait for.
                reaped.children_left = false;
                return reaped;
            }
        };
        if status.0 == main {
            reaped.main = Some(status.1);
        }
    }
}

/// The pids whose parent is this process (any of its threads).
fn direct_children() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// While terminating, how often to look for orphans adopted without a SIGCHLD to tell us.
const ADOPTION_SCAN: Duration = Duration::from_millis(100);

/// SIGTERM to everything that remains, SIGKILL after the grace period.
///
/// "Everything" is the command's process group plus every direct child of ours: orphans that
/// left the group (setsid, daemons) are re-parented to us and found that way.
pub struct Terminator {
    group: Pid,
    grace: Duration,
    state: State,
    group_termed: bool,
    sent_term: Vec<i32>,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Idle,
    Terminating { kill_at: Instant, scan_at: Instant },
    Killing { scan_at: Instant },
}

impl Terminator {
    pub fn new(group: Pid, grace: Duration) -> Self {
        Terminator {
            group,
            grace,
            state: State::Idle,
            group_termed: false,
            sent_term: Vec::new(),
        }
    }

    /// Starts the escalation (no-op if already started).
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle {
            self.state = State::Terminating {
                kill_at: now + self.grace,
                scan_at: now + ADOPTION_SCAN,
            };
            self.signal_all();
        }
    }

    /// When the supervisor must wake up for us next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Terminating { kill_at, scan_at } => Some(kill_at.min(scan_at)),
            State::Killing { scan_at } => Some(scan_at),
        }
    }

    /// Escalates to SIGKILL when the grace period is over; signals newly adopted orphans.
    pub fn tick(&mut self, now: Instant) {
        match self.state {
            State::Idle => return,
            State::Terminating { kill_at, .. } if now >= kill_at => {
                self.state = State::Killing { scan_at: now };
            }
            _ => {}
        }
        match &mut self.state {
            State::Terminating { scan_at, .. } | State::Killing { scan_at } if now >= *scan_at => {
                *scan_at = now + ADOPTION_SCAN;
                self.signal_all();
            }
            _ => {}
        }
    }

    /// Children changed (some were reaped): their orphans may now be ours.
    pub fn children_changed(&mut self) {
        if self.state != State::Idle {
            self.signal_all();
        }
    }

    /// Forwards a signal the emissary received: to the group, and once terminating also to
    /// the adopted orphans outside it.
    pub fn forward(&self, signal: i32) {
        signals::send(Pid::from_raw(-self.group.as_raw()), signal);
        if self.state != State::Idle {
            for pid in direct_children() {
                signals::send(Pid::from_raw(pid), signal);
            }
        }
    }

    fn signal_all(&mut self) {
        // TERM once per target (a second TERM means "hurry" to some programs); KILL as often
        // as it takes.
        let killing = matches!(self.state, State::Killing { .. });
        let group = Pid::from_raw(-self.group.as_raw());
        if killing {
            signals::send(group, libc::SIGKILL);
        } else if !self.group_termed {
            // CONT after TERM (as systemd does): a stopped process acts on TERM only once it
            // runs, instead of sitting out the whole grace.
            signals::send(group, libc::SIGTERM);
            signals::send(group, libc::SIGCONT);
            self.group_termed = true;
        }
        for pid in direct_children() {
            if killing {
                signals::send(Pid::from_raw(pid), libc::SIGKILL);
            } else if !self.sent_term.contains(&pid) {
                signals::send(Pid::from_raw(pid), libc::SIGTERM);
                signals::send(Pid::from_raw(pid), libc::SIGCONT);
                self.sent_term.push(pid);
            }
        }
    }
}
