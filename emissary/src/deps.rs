//! containerSet ordering: a container waits for its `dependencies` to write their exitcode
//! files (`ROOT/ctr/NAME/exitcode`, renamed into place whole), woken by inotify the moment
//! one lands. Argo and Tekton poll once a second; this hands off in well under 5 ms.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::signals::Signals;

/// How the wait ended.
pub enum Waited {
    /// Every dependency exited 0.
    Ready,
    /// This dependency ended with this non-zero code.
    Failed(String, i32),
    /// A signal arrived first: stop, as the command would have.
    Interrupted(i32),
}

/// Blocks until every container in `deps` under `ctr_root` has exited.
pub fn wait(ctr_root: &Path, deps: &[String], signals: &Signals) -> Result<Waited, String> {
    if deps.is_empty() {
        return Ok(Waited::Ready);
    }
    fs::create_dir_all(ctr_root).map_err(|e| format!("creating {}: {e}", ctr_root.display()))?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| format!("inotify: {e}"))?;
    // The dependency's directory may not exist yet: watch the root for it, then it.
    let root_events = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
    inotify
        .add_watch(ctr_root, root_events)
        .map_err(|e| format!("watching {}: {e}", ctr_root.display()))?;
    let mut watched = vec![false; deps.len()];
    loop {
        // Watch first, then look: a file landing in between is seen by the look.
        for (dep, seen) in deps.iter().zip(watched.iter_mut()) {
            let dir = ctr_root.join(dep);
            if !*seen && dir.is_dir() {
                let file_events = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE;
                inotify
                    .add_watch(&dir, file_events)
                    .map_err(|e| format!("watching {}: {e}", dir.display()))?;
                *seen = true;
            }
        }
        let mut pending = false;
        for dep in deps {
            match exit_code(&ctr_root.join(dep).join("exitcode")) {
                Some(0) => {}
                Some(code) => return Ok(Waited::Failed(dep.clone(), code)),
                None => pending = true,
            }
        }
        if !pending {
            // Closing an inotify fd waits for an SRCU grace period (~1 ms measured): hand-off
            // latency is the point here, so let the fd go with the process instead.
            std::mem::forget(inotify);
            return Ok(Waited::Ready);
        }
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        while let Ok(Some(signal)) = signals.next() {
            if signal != libc::SIGCHLD {
                return Ok(Waited::Interrupted(signal));
            }
        }
        let _ = inotify.read_events();
    }
}

/// The code in an exitcode file, once it is complete.
fn exit_code(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
