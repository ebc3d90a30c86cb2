//! Output capture: the command writes to pipes; threads copy every byte to the log files and to
//! the emissary's own stdout or stderr (so `kubectl logs` still works).
//!
//! One thread per stream; with log files, a second per stream writes `combined` and the echo
//! while the first reads the pipe and writes the stream's own file: two page-cache writes of
//! every byte side by side instead of one after the other (1 GiB in 0.55-0.65 s instead of
//! 0.7-1.4 s here). Memory is bounded by [`CHUNKS`] buffers per stream. The threads, not the
//! supervisor, do the writing, so a slow terminal or a full disk never delays signal forwarding
//! or a deadline. Files are written before the echo: if our own stdout blocks forever, the
//! stream's own file holds everything read so far, and `combined` all but the chunks queued
//! behind the echo.

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
/// Buffers in flight per stream, between its reader and its second writer.
const CHUNKS: usize = 4;
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
fn copy(source: &OwnedFd, sinks: Sinks, stop: BorrowedFd<'_>, count: &AtomicU64) -> io::Result<()> {
    fcntl(source, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let mut pipe = Source {
        fd: source.as_fd(),
        stop,
        stopping: false,
    };
    let Sinks {
        file,
        combined,
        echo,
    } = sinks;
    let rest = || Rest {
        combined: combined.clone(),
        echo,
        echoing: true,
        error: None,
    };
    // Without a thread to spare (a pids limit) the reader does it all: it must drain the pipe.
    let second = file.as_ref().and_then(|_| Second::start(rest()));
    match (file, second) {
        (Some(file), Some(second)) => split(&mut pipe, file, second, count, rest),
        (file, _) => alone(&mut pipe, file, rest(), count),
    }
}

/// Every chunk to every sink from this thread.
fn alone(
    pipe: &mut Source<'_>,
    mut file: Option<File>,
    mut rest: Rest,
    count: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    let mut file_error = None;
    loop {
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            return file_error.or(rest.error).map_or(Ok(()), Err);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let (Some(file), None) = (&mut file, &file_error) {
            file_error = file.write_all(&buf[..n]).err();
        }
        rest.write(&buf[..n]);
    }
}

/// The stream's own file from this thread, the rest from `second`.
fn split(
    pipe: &mut Source<'_>,
    mut file: File,
    second: Second,
    count: &AtomicU64,
    rest: impl Fn() -> Rest,
) -> io::Result<()> {
    let Second {
        full,
        empty,
        thread,
    } = second;
    let (mut made, mut file_error) = (0, None);
    let mut gone = false;
    let drained = loop {
        let mut buf = match empty.try_recv() {
            Ok(buf) => buf,
            Err(_) if made < CHUNKS => {
                made += 1;
                vec![0u8; BUFFER]
            }
            Err(_) => match empty.recv() {
                Ok(buf) => buf,
                Err(_) => {
                    gone = true;
                    break Ok(());
                }
            },
        };
        let n = match pipe.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        if file_error.is_none() {
            file_error = file.write_all(&buf[..n]).err();
        }
        if full.send((buf, n)).is_err() {
            gone = true;
            break Ok(());
        }
    };
    drop(full);
    let rest_error = thread
        .join()
        .unwrap_or_else(|_| Some(io::Error::other("capture thread panicked")));
    drained?;
    if gone {
        // The second writer died (it cannot, short of a bug): drain the pipe all the same.
        alone(pipe, file_error.is_none().then_some(file), rest(), count)?;
    }
    file_error.or(rest_error).map_or(Ok(()), Err)
}

/// The thread that writes `combined` and the echo for a reader that writes the stream's file.
struct Second {
    full: mpsc::SyncSender<(Vec<u8>, usize)>,
    empty: mpsc::Receiver<Vec<u8>>,
    thread: thread::JoinHandle<Option<io::Error>>,
}

impl Second {
    /// None when no thread can be started.
    fn start(mut rest: Rest) -> Option<Second> {
        let (full, chunks) = mpsc::sync_channel::<(Vec<u8>, usize)>(CHUNKS);
        let (emptied, empty) = mpsc::channel();
        let thread = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                for (buf, n) in chunks {
                    rest.write(&buf[..n]);
                    let _ = emptied.send(buf);
                }
                rest.error
            })
            .ok()?;
        Some(Second {
            full,
            empty,
            thread,
        })
    }
}

/// The read end of a stream's pipe, non-blocking, read until EOF or until empty after `stop`.
struct Source<'a> {
    fd: BorrowedFd<'a>,
    stop: BorrowedFd<'a>,
    stopping: bool,
}

impl Source<'_> {
    /// Fills `buf` with what the pipe holds, waiting for it; 0 at the end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match read(self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if self.stopping => return Ok(0),
                Err(Errno::EAGAIN) => self.stopping = wait_readable(self.fd, self.stop)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What a chunk goes to after the stream's own file: `combined`, then the echo.
struct Rest {
    combined: Option<Arc<File>>,
    echo: BorrowedFd<'static>,
    echoing: bool,
    /// The first failure to write `combined`, after which it is left alone.
    error: Option<io::Error>,
}

impl Rest {
    fn write(&mut self, chunk: &[u8]) {
        if let (Some(combined), None) = (&self.combined, &self.error) {
            self.error = (&**combined).write_all(chunk).err();
        }
        // Our own stdout may be gone (EPIPE) or closed; the files still get everything.
        self.echoing = self.echoing && write_all_fd(self.echo, chunk).is_ok();
    }
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
