//! containerSet ordering: a container waits for its `dependencies` to end.
//!
//! When the node agent knows the pod (an Argo pod), their ends are what the kubelet reports,
//! asked through the agent: every container of a pod can write the shared directory, so a
//! sibling could forge an exit file there. Otherwise the exit files (`ROOT/ctr/NAME/exitcode`,
//! renamed into place whole) are read, woken by inotify the moment one lands: Argo and Tekton
//! poll once a second; this hands off in well under 5 ms.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::process::signals::{self, Signals};
use crate::transfer::agent::Agent;

/// How the wait ended.
pub enum Waited {
    /// Every dependency exited 0.
    Ready,
    /// This dependency ended with this non-zero code.
    Failed(String, i32),
    /// A signal arrived first: stop, as the command would have.
    Interrupted(i32),
    /// The task's deadline passed first.
    TimedOut,
}

/// How often to look when inotify is unavailable (its per-user instances are a node-wide limit).
const POLL_FALLBACK: Duration = Duration::from_millis(50);

/// Blocks until every container in `deps` has exited 0 (or one failed), a terminating signal
/// arrives, or `deadline` passes.
pub fn wait(
    ctr_root: &Path,
    deps: &[String],
    signals: &Signals,
    deadline: Option<Instant>,
    agent: Option<&Agent>,
) -> Result<Waited, String> {
    wait_for(ctr_root, deps, signals, deadline, agent, false).map(|(waited, _)| waited)
}

/// [`wait`] for every container of `others` to end, whatever its code: a containerSet's
/// outputs are collected once all its containers are done, as Argo's executor does. Returns
/// the codes of those that ended.
pub fn wait_ended(
    ctr_root: &Path,
    others: &[String],
    signals: &Signals,
    deadline: Option<Instant>,
    agent: Option<&Agent>,
) -> Result<(Waited, Vec<(String, i32)>), String> {
    wait_for(ctr_root, others, signals, deadline, agent, true)
}

/// How often the agent is asked when several dependencies are pending (one at a time is a
/// long-poll of up to a second).
const KUBELET_POLL: Duration = Duration::from_millis(250);

/// [`wait_for`] on what the kubelet reports, through the agent.
fn wait_for_kubelet(
    agent: &Agent,
    deps: &[String],
    signals: &Signals,
    deadline: Option<Instant>,
    any_code: bool,
) -> Result<(Waited, Vec<(String, i32)>), String> {
    let mut pending: Vec<&String> = deps.iter().collect();
    let mut ended = Vec::new();
    while let Some(&dep) = pending.first() {
        while let Ok(Some(signal)) = signals.next() {
            if signals::terminates(signal) {
                return Ok((Waited::Interrupted(signal), ended));
            }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            return Ok((Waited::TimedOut, ended));
        }
        let left = deadline.map_or(Duration::MAX, |d| d - now);
        let wait = if pending.len() == 1 {
            left.min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        match agent.container_exit(dep, wait)? {
            Some(code) if code != 0 && !any_code => {
                return Ok((Waited::Failed(dep.clone(), code), ended));
            }
            Some(code) => {
                ended.push((dep.clone(), code));
                pending.remove(0);
            }
            None if wait.is_zero() => {
                pending.rotate_left(1);
                std::thread::sleep(KUBELET_POLL.min(left));
            }
            None => {}
        }
    }
    Ok((Waited::Ready, ended))
}

fn wait_for(
    ctr_root: &Path,
    deps: &[String],
    signals: &Signals,
    deadline: Option<Instant>,
    agent: Option<&Agent>,
    any_code: bool,
) -> Result<(Waited, Vec<(String, i32)>), String> {
    if deps.is_empty() {
        return Ok((Waited::Ready, Vec::new()));
    }
    if let Some(agent) = agent.filter(|a| a.knows_the_pod()) {
        return wait_for_kubelet(agent, deps, signals, deadline, any_code);
    }
    fs::create_dir_all(ctr_root).map_err(|e| format!("creating {}: {e}", ctr_root.display()))?;
    // The dependency's directory may not exist yet: watch the root for it, then it.
    let mut inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .ok()
        .filter(|i| {
            i.add_watch(
                ctr_root,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .is_ok()
        });
    let mut watched = vec![false; deps.len()];
    loop {
        // Watch first, then look: a file landing in between is seen by the look.
        for (dep, seen) in deps.iter().zip(watched.iter_mut()) {
            let dir = ctr_root.join(dep);
            if let Some(watcher) = &inotify
                && !*seen
                && dir.is_dir()
            {
                let file_events = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE;
                if watcher.add_watch(&dir, file_events).is_err() {
                    inotify = None; // out of watches: look every POLL_FALLBACK instead
                }
                *seen = true;
            }
        }
        let mut pending = false;
        let mut ended = Vec::new();
        for dep in deps {
            match exit_code(&ctr_root.join(dep).join("exitcode")) {
                Some(code) if code != 0 && !any_code => {
                    return Ok((Waited::Failed(dep.clone(), code), ended));
                }
                Some(code) => ended.push((dep.clone(), code)),
                None => pending = true,
            }
        }
        if !pending {
            // Closing an inotify fd waits for an SRCU grace period (~1 ms measured): hand-off
            // latency is the point here, so let the fd go with the process instead.
            std::mem::forget(inotify);
            return Ok((Waited::Ready, ended));
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            return Ok((Waited::TimedOut, ended));
        }
        let mut sleep = deadline.map(|d| d - now);
        if inotify.is_none() {
            sleep = Some(sleep.map_or(POLL_FALLBACK, |s| s.min(POLL_FALLBACK)));
        }
        let timeout = match sleep {
            // Rounded up, so the deadline has passed when poll returns.
            Some(s) => {
                PollTimeout::try_from(s.as_millis().saturating_add(1).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if let Some(watcher) = &inotify {
            fds.push(PollFd::new(watcher.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        while let Ok(Some(signal)) = signals.next() {
            if signals::terminates(signal) {
                return Ok((Waited::Interrupted(signal), ended));
            }
        }
        if let Some(watcher) = &inotify {
            let _ = watcher.read_events();
        }
    }
}

/// The code in an exitcode file, once it is complete.
fn exit_code(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
