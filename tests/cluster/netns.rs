//! `emissary-cluster netns PORT -- CMD ARGS...`: runs a third-party server (Argo's
//! workflow-controller) in a network namespace of its own, where `127.0.0.1:PORT` leads to this
//! machine's `127.0.0.1:PORT` (the API server) and nothing else does. Whatever it listens on
//! (Argo's controller binds `:6060` and `:9090` on every address, with no flag to change that)
//! stays inside its namespace, reachable by nobody; several can run at once.
//!
//! One process, two network namespaces: the thread that makes connections to the API server
//! stays in the machine's namespace (namespaces are per thread, and a socket keeps the one it
//! was created in), the rest of the process and the command move to a new one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::mpsc;

type Connect = mpsc::Sender<io::Result<TcpStream>>;

pub fn run(port: u16, argv: &[String]) -> ! {
    match forward_and_run(port, argv) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("emissary-cluster netns: {e}");
            std::process::exit(125)
        }
    }
}

fn forward_and_run(port: u16, argv: &[String]) -> Result<i32, String> {
    let (program, args) = argv.split_first().ok_or("no command")?;
    // Created before the unshare: it stays in this machine's namespace.
    let (requests, incoming) = mpsc::channel::<Connect>();
    std::thread::spawn(move || {
        for reply in incoming {
            let _ = reply.send(TcpStream::connect(("127.0.0.1", port)));
        }
    });
    // SAFETY: unshare on this thread; the threads created from now on share its namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare: {}", io::Error::last_os_error()));
    }
    loopback_up()?;
    let listener =
        TcpListener::bind(("127.0.0.1", port)).map_err(|e| format!("listening on {port}: {e}"))?;
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (reply, answer) = mpsc::channel();
            if requests.send(reply).is_err() {
                return;
            }
            if let Ok(Ok(upstream)) = answer.recv() {
                splice(client, upstream);
            }
        }
    });
    let mut command = std::process::Command::new(program);
    command.args(args);
    // SAFETY: prctl is async-signal-safe; the command must not outlive this process.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(status.code().unwrap_or(125))
}

/// Copies both ways between two sockets until both sides are done.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    copy(a, b2);
    copy(b, a2);
}

/// A new network namespace's loopback is down: up it goes.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a plain socket and SIOC[GS]IFFLAGS ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket < 0 {
            return Err(format!("socket: {}", io::Error::last_os_error()));
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        let ok = libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) == 0 && {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS, &request) == 0
        };
        let error = io::Error::last_os_error();
        libc::close(socket);
        if ok {
            Ok(())
        } else {
            Err(format!("bringing lo up: {error}"))
        }
    }
}
