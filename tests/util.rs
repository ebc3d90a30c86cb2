//! Test helpers: unique temp dirs, the binaries under test, and running them with a time limit
//! and a full dump (command, exit, stdout, stderr) whenever an assertion fails.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub use emissary_tests::process::{agent_bin, emissary_bin, kill, wait_until};

/// `emissary ARGS...` ready to run.
pub fn emissary<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(emissary_bin());
    cmd.args(args);
    default_signals(&mut cmd);
    cmd
}

/// Starts `cmd` with every signal at its default disposition. A test runner started in the
/// background by a non-interactive shell ignores SIGINT and SIGQUIT, and the emissary rightly
/// passes what its caller ignored on to the command; the tests must not depend on how they were
/// launched. Tests that want a signal ignored add their own `pre_exec` after this one.
pub fn default_signals(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: signal(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            for signal in 1..libc::SIGRTMIN() {
                if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
    cmd
}

/// A fresh directory for one test, removed when the test passes (kept on failure to inspect).
pub struct Dir {
    path: PathBuf,
}

impl Dir {
    pub fn new(name: &str) -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join("emissary-tests")
            .join(format!("{name}-{}-{id}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Dir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, bytes).unwrap();
        path
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        let path = self.join(name);
        fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    pub fn read_string(&self, name: &str) -> String {
        String::from_utf8(self.read(name)).unwrap()
    }

    pub fn read_json(&self, name: &str) -> serde_json::Value {
        serde_json::from_slice(&self.read(name))
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// What a finished process left behind.
pub struct Output {
    pub label: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Everything about the run, for failure messages.
    pub fn dump(&self) -> String {
        let clip = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4000)]).into_owned();
            if bytes.len() > 4000 {
                format!("{text}... ({} bytes)", bytes.len())
            } else {
                text
            }
        };
        format!(
            "\n--- {}\n--- exit code {:?}, signal {:?}, after {:?}\n--- stdout:\n{}\n--- stderr:\n{}\n---",
            self.label,
            self.code,
            self.signal,
            self.elapsed,
            clip(&self.stdout),
            clip(&self.stderr)
        )
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code{}", self.dump());
        self
    }

    #[track_caller]
    pub fn assert_stderr_contains(&self, text: &str) -> &Self {
        assert!(
            self.stderr().contains(text),
            "stderr lacks {text:?}{}",
            self.dump()
        );
        self
    }
}

/// Runs `cmd` to completion with `stdin` as input; kills it and fails the test after `limit`.
pub fn run(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Output {
    start(cmd).finish_with_input(stdin, limit)
}

/// A process started in the background, to be signalled and then finished.
pub struct Running {
    child: Child,
    label: String,
    started: Instant,
}

/// Starts `cmd` with piped stdin, stdout and stderr.
pub fn start(cmd: &mut Command) -> Running {
    let label = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {label}: {e}"));
    Running {
        child,
        label,
        started: Instant::now(),
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        kill(self.pid(), signal);
    }

    /// Waits for the exit (collecting all output); fails the test after `limit` from now.
    pub fn finish(self, limit: Duration) -> Output {
        self.finish_with_input(b"", limit)
    }

    fn finish_with_input(mut self, stdin: &[u8], limit: Duration) -> Output {
        let until = Instant::now() + limit;
        let (status, stdout, stderr) =
            wait_collecting(&mut self.child, stdin.to_vec(), until, &self.label);
        use std::os::unix::process::ExitStatusExt;
        Output {
            label: self.label,
            code: status.code(),
            signal: status.signal(),
            stdout,
            stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

/// [`run`] with no input and a 20 s limit.
pub fn run_quick(cmd: &mut Command) -> Output {
    run(cmd, b"", Duration::from_secs(20))
}

fn wait_collecting(
    child: &mut Child,
    input: Vec<u8>,
    until: Instant,
    label: &str,
) -> (std::process::ExitStatus, Vec<u8>, Vec<u8>) {
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let reader = |mut source: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = source.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{label} did not finish in time");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

/// The state letter of `pid` in /proc (R, S, T, Z...), or None if it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Fields after the command name in /proc/PID/stat: state, ppid, pgrp, session...
pub fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// A sleep duration of about `secs` seconds that is unique to this call, so a test can find
/// exactly its own `sleep` processes with [`sleeps`] (leftovers of other runs never match).
pub fn marker(secs: u32) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{secs}.{}{:03}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Live `sleep` processes given `marker` (a duration unique to one test) as an argument.
pub fn sleeps(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let is_sleep = args.next().is_some_and(|argv0| argv0.ends_with(b"sleep"));
        let matches = is_sleep && args.any(|arg| arg == marker.as_bytes());
        if matches && proc_state(pid).is_some_and(|s| s != 'Z') {
            found.push(pid);
        }
    }
    found
}

/// Zombie children of `pid`.
pub fn zombie_children(pid: u32) -> usize {
    let mut zombies = 0;
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(fields) = proc_stat_fields(child)
            && fields.first().map(String::as_str) == Some("Z")
            && fields.get(1).map(String::as_str) == Some(pid.to_string().as_str())
        {
            zombies += 1;
        }
    }
    zombies
}

/// Deterministic pseudo-random bytes (xorshift), so byte-exactness tests need no crate.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// True when running as root (namespaces and cgroups need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (PT_INTERP), i.e.
/// is dynamically linked.
pub fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// A TCP proxy on 127.0.0.1 that passes what its target answers at `bytes_per_sec` (a slow
/// store or network); requests pass at full speed. Stops accepting when dropped.
pub struct SlowProxy {
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowProxy {
    pub fn start(target: std::net::SocketAddr, bytes_per_sec: usize) -> SlowProxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(target)) else {
                    continue;
                };
                let (mut requests, mut upstream) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut requests, &mut upstream);
                    let _ = upstream.shutdown(Shutdown::Write);
                });
                let (mut server, mut client) = (server, client);
                thread::spawn(move || {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n @ 1..) = server.read(&mut buf) {
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_sec as f64));
                    }
                    let _ = client.shutdown(Shutdown::Both);
                });
            }
        });
        SlowProxy { addr, stop }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Whether the server at `addr` closes a connection that sent only `partial` (a request or
/// handshake that never completes) within `limit`.
pub fn cuts_off_a_silent_client(
    addr: std::net::SocketAddr,
    partial: &[u8],
    limit: Duration,
) -> bool {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(partial).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // an error answer (408) before the close is fine
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

pub use emissary_tests::tmpfs::Tmpfs;
