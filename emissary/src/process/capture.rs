//! Output capture: the command writes to pipes; one thread per stream copies every byte to the
//! log files and to the emissary's own stdout or stderr (so `kubectl logs` still works).
//!
//! Memory is bounded by one buffer per stream. The threads, not the supervisor, do the
//! writing, so a slow terminal or a full disk never delays signal forwarding or a deadline.
//! Files are written before the echo: if our own stdout blocks forever, the files still hold
//! everything read so far.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::{pipe2, read};

/// Bytes moved per read. Large reads and writes amortise the per-call cost of file writes,
/// which dominates on ext4 (supervision.md section 2); touched only when output flows.
const BUFFER: usize = 256 * 1024;
/// Pipe capacity requested with F_SETPIPE_SZ, so a bursty command rarely blocks on us: one
/// read's worth. A 1 MiB pipe had the command's writes and our reads contend for the pipe's
/// lock so that, in four runs of ten, 1 GiB cost 2-4× the system time (BENCHMARKS.md).
const PIPE_SIZE: i32 = BUFFER as i32;

/// A pipe whose write end goes to the child.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

/// A close-on-exec pipe, enlarged when the kernel allows it.
pub fn pipe() -> io::Result<Pipe> {
    let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
    // Unprivileged users may be capped (pipe-user-pages-soft); the default size still works.
    let _ = fcntl(&read, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok(Pipe { read, write })
}

/// Where one stream's bytes go.
pub struct Sinks {
    /// The stream's own file (`stdout` or `stderr` in the log dir).
    pub file: Option<File>,
    /// `combined`, shared by both streams and opened O_APPEND so their writes never overlap.
    pub combined: Option<Arc<File>>,
    /// The emissary's own fd to echo to (1 or 2).
    pub echo: BorrowedFd<'static>,
}

/// The running copy threads.
pub struct Capture {
    stop: EventFd,
    done: mpsc::Receiver<(usize, io::Result<()>)>,
    counts: Arc<[AtomicU64; 2]>,
}

/// What was captured.
pub struct Captured {
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// The first failure to write a log file (the data still reached the echo).
    pub error: Option<String>,
}

/// Starts copying `stdout` and `stderr` (read ends of the child's pipes).
pub fn start(stdout: (OwnedFd, Sinks), stderr: (OwnedFd, Sinks)) -> io::Result<Capture> {
    let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let (tx, done) = mpsc::channel();
    for (index, (source, sinks)) in [stdout, stderr].into_iter().enumerate() {
        let stop = stop.as_fd().try_clone_to_owned()?;
        let counts = Arc::clone(&counts);
        let tx = tx.clone();
        thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let result = copy(&source, sinks, stop.as_fd(), &counts[index]);
                let _ = tx.send((index, result));
            })?;
    }
    Ok(Capture { stop, done, counts })
}

impl Capture {
    /// Drains what is left and stops. Call once every writer is gone; the threads then see EOF
    /// at once. A writer we do not know of (an fd passed out of the tree) cannot hold us: after
    /// the stop, each thread reads what is buffered and quits. A thread stuck writing to our
    /// own stdout is abandoned after `timeout`.
    pub fn finish(self, timeout: Duration) -> Captured {
        let _ = self.stop.write(1);
        let until = Instant::now() + timeout;
        let mut error = None;
        for _ in 0..2 {
            let left = until.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok((index, Err(e))) => {
                    let name = ["stdout", "stderr"][index];
                    error.get_or_insert(format!("capturing {name}: {e}"));
                }
                Ok((_, Ok(()))) => {}
                Err(_) => {
                    error.get_or_insert(
                        "capture did not finish: the emissary's own output is blocked".to_owned(),
                    );
                    break;
                }
            }
        }
        Captured {
            stdout_bytes: self.counts[0].load(Ordering::Relaxed),
            stderr_bytes: self.counts[1].load(Ordering::Relaxed),
            error,
        }
    }
}

/// Copies `source` until EOF (or until it is empty after `stop`). A failing log file is
/// reported but never stops the draining: the command must not block on a full pipe.
fn copy(
    source: &OwnedFd,
    mut sinks: Sinks,
    stop: BorrowedFd<'_>,
    count: &AtomicU64,
) -> io::Result<()> {
    fcntl(source, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let mut buf = vec![0u8; BUFFER];
    let mut first_error: Option<io::Error> = None;
    let mut echo = true;
    let mut stopping = false;
    loop {
        let n = match read(source, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) if stopping => break,
            Err(Errno::EAGAIN) => {
                stopping = wait_readable(source.as_fd(), stop)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let chunk = &buf[..n];
        count.fetch_add(n as u64, Ordering::Relaxed);
        if first_error.is_none() {
            let result = match (&mut sinks.file, &sinks.combined) {
                (Some(file), Some(combined)) => file
                    .write_all(chunk)
                    .and_then(|()| (&**combined).write_all(chunk)),
                (Some(file), None) => file.write_all(chunk),
                (None, Some(combined)) => (&**combined).write_all(chunk),
                (None, None) => Ok(()),
            };
            first_error = result.err();
        }
        // Our own stdout may be gone (EPIPE) or closed; the files still get everything.
        echo = echo && write_all_fd(sinks.echo, chunk).is_ok();
    }
    first_error.map_or(Ok(()), Err)
}

/// Blocks until `source` is readable or `stop` fires; returns true on stop.
fn wait_readable(source: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [
        PollFd::new(source, PollFlags::POLLIN),
        PollFd::new(stop, PollFlags::POLLIN),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => return Ok(fds[1].any().unwrap_or(false)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// write_all on a raw fd we do not own, tolerating an O_NONBLOCK set by someone else on the
/// shared file description.
fn write_all_fd(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The emissary's stdout or stderr as a `'static` borrowed fd (they live as long as we do).
pub fn std_fd(fd: i32) -> BorrowedFd<'static> {
    debug_assert!(fd == 1 || fd == 2);
    // SAFETY: fds 1 and 2 are never closed by the emissary (see `stdio::ensure_open`).
    unsafe { BorrowedFd::borrow_raw(fd) }
}
