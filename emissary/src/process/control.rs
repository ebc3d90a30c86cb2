//! The control FIFO: how `emissary signal --dir DIR SIG` reaches a running `emissary run`.
//!
//! `emissary run --log-dir DIR` creates the FIFO `DIR/signal` and holds it open for reading and
//! writing (so it never sees EOF); each write is one line naming a signal (or `terminate`, how
//! the agent's relay asks for the TERM-then-KILL escalation), read in the
//! supervisor's poll loop the moment it arrives. No polling interval, no file races (Argo's
//! signal file was polled every 2 s). The FIFO is removed when the run ends, so a sender gets a
//! clear "no emissary is running" instead of a write into the void. Senders inside the emissary
//! (the agent's relay) write through a duplicate of the listening descriptor ([`Control::sender`]),
//! never the path, which the command can replace.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;

use crate::process::signals;

/// The FIFO's name inside the control directory.
pub const FIFO_NAME: &str = "signal";

/// What a line of the FIFO asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Forward this signal to the command's group.
    Signal(i32),
    /// Stop the command: SIGTERM, then SIGKILL after the grace period (the agent's terminate).
    Terminate,
}

/// The listening end, owned by `emissary run`.
pub struct Control {
    fifo: File,
    path: PathBuf,
    partial: Vec<u8>,
}

/// Creates `dir/signal` (replacing a stale one) and opens it.
pub fn listen(dir: &Path) -> io::Result<Control> {
    let path = dir.join(FIFO_NAME);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o622))?;
    // Never through a symlink planted in between, and only the FIFO just made.
    let fifo = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&path)?;
    if !fifo.metadata()?.file_type().is_fifo() {
        return Err(io::Error::other("replaced before it was opened"));
    }
    Ok(Control {
        fifo,
        path,
        partial: Vec::new(),
    })
}

impl Control {
    /// A descriptor that writes into this FIFO whatever now lies at its path (a command that
    /// replaced it with a FIFO nobody reads would block an open(2) by path forever). Writes do
    /// not block: one short line goes in whole or fails at once.
    pub fn sender(&self) -> io::Result<File> {
        self.fifo.try_clone()
    }

    /// Every complete line received so far. Unreadable lines are reported and skipped.
    pub fn drain(&mut self) -> Vec<Message> {
        let mut buf = [0u8; 512];
        loop {
            match self.fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        parse_lines(&mut self.partial)
    }
}

/// The messages of the complete lines at the front of `partial` (taken out of it). Unknown
/// words are reported and skipped.
pub fn parse_lines(partial: &mut Vec<u8>) -> Vec<Message> {
    let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    let lines: Vec<u8> = partial.drain(..=end).collect();
    String::from_utf8_lossy(&lines)
        .split_whitespace()
        .filter_map(|word| {
            if word == "terminate" {
                return Some(Message::Terminate);
            }
            let signal = signals::parse(word);
            if signal.is_none() {
                crate::note!("emissary: ignoring unknown signal {word:?} from the control FIFO");
            }
            signal.map(Message::Signal)
        })
        .collect()
}

impl AsFd for Control {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fifo.as_fd()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Sends `signal` to the `emissary run` listening in `dir`.
pub fn send(dir: &Path, signal: i32) -> Result<(), String> {
    let path = dir.join(FIFO_NAME);
    let not_running = || format!("no emissary run is listening on {}", path.display());
    match fs::metadata(&path) {
        Ok(meta) if meta.file_type().is_fifo() => {}
        Ok(_) => return Err(format!("{} is not a FIFO", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_running()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    // O_NONBLOCK: fail at once (ENXIO) rather than wait for a reader that will never come.
    let mut fifo = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Err(not_running()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // One short write is atomic (< PIPE_BUF): the reader never sees half a line.
    fifo.write_all(format!("{signal}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}
