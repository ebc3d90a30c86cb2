//! The test kubelet's container runtime: `emissary-cluster shim SPEC` starts one container the
//! way runc would, with the kernel's own primitives.
//!
//! The shim joins the container's cgroups, unshares mount, PID, UTS and IPC namespaces and
//! forks the container's PID 1, which mounts an overlay of the image (a fresh writable layer),
//! the image's read-only host binds, `/proc` (with `/proc/sys` read-only), a private `/dev`,
//! `/sys` read-only, the volumes and the termination-message file, then chroots, drops to the
//! container's user and capabilities (Docker's default set for root) and execs the command,
//! found on the container's own `PATH`. The network is the host's (every pod is on 127.0.0.1).
//!
//! The shim stays the container's parent: it forwards every catchable signal to the container's
//! PID 1 (so a kubelet's SIGTERM reaches it as a runtime's would), and a SIGKILL to the shim
//! kills PID 1 too (`PR_SET_PDEATHSIG`), which ends the PID namespace. It writes JSON lines to
//! the report file: `{"pid": N}` once the command runs, then `{"exit": CODE}` or
//! `{"signal": N}` (with `maxrss_kb`, the largest resident set among its processes); or
//! `{"start_error": MESSAGE}` when the command cannot be started.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything the shim needs to start one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The image's lower layer.
    pub lower: PathBuf,
    /// This start's own directory: the overlay's upper and work dirs and mount point.
    pub layer: PathBuf,
    /// Host paths bound read-only into the image (its `/usr`...).
    pub image_binds: Vec<(PathBuf, String)>,
    /// The pod's volumes, in mount order (parents first).
    pub mounts: Vec<Mount>,
    /// (host file, path in the container) of the termination message.
    pub termination_log: Option<(PathBuf, String)>,
    /// cgroup directories to join.
    pub cgroups: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Capabilities kept in the bounding set (and, for root, effective).
    pub capabilities: Vec<u32>,
    pub no_new_privs: bool,
    pub read_only_root: bool,
    pub cwd: String,
    pub argv: Vec<String>,
    /// `NAME=VALUE`
    pub env: Vec<String>,
    pub hostname: String,
    pub report: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// What the report file says about one start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub pid: Option<i32>,
    pub exit: Option<i32>,
    pub signal: Option<i32>,
    pub start_error: Option<String>,
    /// The largest resident set among the container's processes, in KiB.
    pub maxrss_kb: Option<i64>,
}

impl Report {
    pub fn read(path: &Path) -> Report {
        let mut report = Report::default();
        for line in fs::read_to_string(path).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let int = |k: &str| v.get(k).and_then(|n| n.as_i64()).map(|n| n as i32);
            report.pid = int("pid").or(report.pid);
            report.exit = int("exit").or(report.exit);
            report.signal = int("signal").or(report.signal);
            report.maxrss_kb = v
                .get("maxrss_kb")
                .and_then(|n| n.as_i64())
                .or(report.maxrss_kb);
            if let Some(e) = v.get("start_error").and_then(|e| e.as_str()) {
                report.start_error = Some(e.to_owned());
            }
        }
        report
    }
}

/// Docker's (and containerd's) default capabilities for a container.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SYS_CHROOT",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
];

const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability named as Kubernetes allows (`NET_ADMIN` or `CAP_NET_ADMIN`).
pub fn capability(name: &str) -> Option<u32> {
    let name = name.to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name);
    CAPABILITY_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| i as u32)
}

/// The signals the shim forwards to the container (every catchable one but SIGCHLD).
fn forwarded() -> Vec<i32> {
    (1..=31)
        .filter(|s| ![libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD].contains(s))
        .collect()
}

/// `emissary-cluster shim SPEC`: never returns.
pub fn shim(spec_path: &Path) -> ! {
    let spec: ContainerSpec = match fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("shim: {}: {e}", spec_path.display());
            std::process::exit(125);
        }
    };
    let mut report = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.report)
        .unwrap_or_else(|e| {
            eprintln!("shim: {}: {e}", spec.report.display());
            std::process::exit(125)
        });
    let mut say = |line: serde_json::Value| {
        let _ = writeln!(report, "{line}");
    };
    if let Err(e) = prepare_host_side(&spec) {
        say(serde_json::json!({ "start_error": e }));
        std::process::exit(128);
    }

    // Blocked before fork, so nothing the kubelet sends is lost before the wait loop.
    // SAFETY: plain libc calls on a single-threaded process; the child only execs or exits.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in forwarded().into_iter().chain([libc::SIGCHLD]) {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());

        let mut pipe = [0; 2];
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            say(serde_json::json!({ "start_error": "pipe2 failed" }));
            std::process::exit(128);
        }
        let child = libc::fork();
        if child < 0 {
            say(serde_json::json!({ "start_error": "fork failed" }));
            std::process::exit(128);
        }
        if child == 0 {
            libc::close(pipe[0]);
            // (getppid() is 0 in the new namespace: the shim is outside it.)
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let message = enter_and_exec(&spec).unwrap_err();
            let _ = libc::write(pipe[1], message.as_ptr().cast(), message.len());
            libc::_exit(128);
        }
        libc::close(pipe[1]);
        let mut message = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                message.extend_from_slice(&buf[..n as usize]);
            } else if n == 0 || *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
        if !message.is_empty() {
            let mut status = 0;
            libc::waitpid(child, &mut status, 0);
            say(serde_json::json!({ "start_error": String::from_utf8_lossy(&message) }));
            std::process::exit(128);
        }
        say(serde_json::json!({ "pid": child }));
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let signal = libc::sigwaitinfo(&set, &mut info);
            if signal == libc::SIGCHLD {
                let mut status = 0;
                if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                    // The largest resident set of the container's processes (its PID 1 reaps
                    // the rest): what the benchmark compares executors by.
                    let mut usage: libc::rusage = std::mem::zeroed();
                    libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
                    let maxrss_kb = usage.ru_maxrss;
                    if libc::WIFEXITED(status) {
                        let code = libc::WEXITSTATUS(status);
                        say(serde_json::json!({ "exit": code, "maxrss_kb": maxrss_kb }));
                        std::process::exit(code);
                    }
                    if libc::WIFSIGNALED(status) {
                        let sig = libc::WTERMSIG(status);
                        say(serde_json::json!({ "signal": sig, "maxrss_kb": maxrss_kb }));
                        std::process::exit(128 + sig);
                    }
                }
            } else if signal > 0 {
                libc::kill(child, signal);
            }
        }
    }
}

/// Before any namespace: the writable layer's directories, the cgroups.
fn prepare_host_side(spec: &ContainerSpec) -> Result<(), String> {
    for dir in ["upper", "work", "merged"] {
        let path = spec.layer.join(dir);
        fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let pid = std::process::id().to_string();
    for cgroup in &spec.cgroups {
        fs::write(cgroup.join("cgroup.procs"), &pid)
            .map_err(|e| format!("joining cgroup {}: {e}", cgroup.display()))?;
    }
    // SAFETY: unshare on a single-threaded process; the next fork's child is the new PID 1.
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(format!("unshare: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstr(path: impl AsRef<Path>) -> CString {
    CString::new(path.as_ref().as_os_str().as_bytes()).expect("no NUL in paths")
}

fn check(what: impl std::fmt::Display, rc: libc::c_int) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let (source_c, target_c, fstype_c) = (cstr(source), cstr(target), cstr(fstype));
    let data_c = data.map(|d| CString::new(d).expect("no NUL"));
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check(
        format_args!("mount {source} on {} ({fstype})", target.display()),
        rc,
    )
}

/// A bind mount of `source` at `target` (created as a file or directory like its source),
/// read-only if asked.
fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    let is_dir = fs::metadata(source)
        .map_err(|e| format!("{}: {e}", source.display()))?
        .is_dir();
    if is_dir {
        fs::create_dir_all(target).map_err(|e| format!("mount point {}: {e}", target.display()))?;
    } else if !target.exists() {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("mount point {}: {e}", parent.display()))?;
        }
        fs::write(target, b"").map_err(|e| format!("mount point {}: {e}", target.display()))?;
    }
    let source = source.to_string_lossy();
    mount(&source, target, "", libc::MS_BIND | libc::MS_REC, None)?;
    if read_only {
        mount(
            "",
            target,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_REC,
            None,
        )?;
    }
    Ok(())
}

/// In the container's PID 1: builds its filesystem, becomes its user and execs the command.
/// Returns only with the reason it could not.
fn enter_and_exec(spec: &ContainerSpec) -> Result<std::convert::Infallible, String> {
    let root = spec.layer.join("merged");
    let at = |path: &str| root.join(path.trim_start_matches('/'));
    mount(
        "",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        spec.lower.display(),
        spec.layer.join("upper").display(),
        spec.layer.join("work").display()
    );
    mount("overlay", &root, "overlay", 0, Some(&options))?;
    for (source, target) in &spec.image_binds {
        bind(source, &at(target), true)?;
    }

    let proc = at("/proc");
    fs::create_dir_all(&proc).map_err(|e| e.to_string())?;
    mount(
        "proc",
        &proc,
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    // As runc does: the container's root must not reach the host's kernel knobs.
    for knob in ["sys", "sysrq-trigger"] {
        if proc.join(knob).exists() {
            bind(&proc.join(knob), &proc.join(knob), true)?;
        }
    }

    let dev = at("/dev");
    fs::create_dir_all(&dev).map_err(|e| e.to_string())?;
    mount(
        "tmpfs",
        &dev,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        bind(&Path::new("/dev").join(node), &dev.join(node), false)?;
    }
    fs::create_dir_all(dev.join("pts")).map_err(|e| e.to_string())?;
    mount(
        "devpts",
        &dev.join("pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    fs::create_dir_all(dev.join("shm")).map_err(|e| e.to_string())?;
    mount(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).map_err(|e| e.to_string())?;
    }

    let sys = at("/sys");
    fs::create_dir_all(&sys).map_err(|e| e.to_string())?;
    bind(Path::new("/sys"), &sys, true)?;

    for m in &spec.mounts {
        bind(&m.source, &at(&m.target), m.read_only)?;
    }
    if let Some((file, target)) = &spec.termination_log {
        bind(file, &at(target), false)?;
    }
    let tmp = at("/tmp");
    if !tmp.exists() {
        fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(|e| e.to_string())?;
    }
    let cwd = at(&spec.cwd);
    if !cwd.exists() {
        // runc creates a missing working directory.
        let _ = fs::create_dir_all(&cwd);
    }
    if spec.read_only_root {
        mount(
            "",
            &root,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }

    let program = find_program(&root, spec)?;
    // SAFETY: plain system calls in the single-threaded child, with valid pointers.
    unsafe {
        let hostname = spec.hostname.as_bytes();
        check(
            "sethostname",
            libc::sethostname(hostname.as_ptr().cast(), hostname.len()),
        )?;
        check("chroot", libc::chroot(cstr(&root).as_ptr()))?;
        if libc::chdir(cstr(&spec.cwd).as_ptr()) != 0 {
            return Err(format!(
                "chdir to cwd (\"{}\") set in config.json failed: {}",
                spec.cwd,
                std::io::Error::last_os_error()
            ));
        }
        drop_privileges(spec)?;
        // What the runtime gives every container: no signal blocked or ignored.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for s in 1..=31 {
            if s != libc::SIGKILL && s != libc::SIGSTOP {
                libc::signal(s, libc::SIG_DFL);
            }
        }
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| format!("NUL in argument {a:?}")))
            .collect::<Result<_, _>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|e| CString::new(e.as_bytes()).map_err(|_| format!("NUL in variable {e:?}")))
            .collect::<Result<_, _>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr());
        Err(format!(
            "exec: {:?}: {}",
            spec.argv[0],
            std::io::Error::last_os_error()
        ))
    }
}

/// The command's path inside the container, found as runc finds it: on the container's
/// `PATH` unless it names a path.
fn find_program(root: &Path, spec: &ContainerSpec) -> Result<CString, String> {
    let name = spec
        .argv
        .first()
        .ok_or("no command: neither the container nor its image gives one")?;
    if name.contains('/') {
        return Ok(cstr(name));
    }
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = root.join(dir.trim_start_matches('/')).join(name);
        if let Ok(meta) = fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(cstr(Path::new(dir).join(name)));
        }
    }
    Err(format!(
        "exec: {name:?}: executable file not found in $PATH"
    ))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Groups, uid and gid as the spec says; capabilities limited to the kept set.
///
/// # Safety
/// Call only in the single-threaded child, after chroot.
unsafe fn drop_privileges(spec: &ContainerSpec) -> Result<(), String> {
    // SAFETY: prctl and raw syscalls with valid arguments.
    unsafe {
        for cap in 0..CAPABILITY_NAMES.len() as u32 {
            if !spec.capabilities.contains(&cap) {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        let groups: Vec<libc::gid_t> = if spec.groups.is_empty() {
            vec![spec.gid]
        } else {
            spec.groups.clone()
        };
        check("setgroups", libc::setgroups(groups.len(), groups.as_ptr()))?;
        check("setresgid", libc::setresgid(spec.gid, spec.gid, spec.gid))?;
        check("setresuid", libc::setresuid(spec.uid, spec.uid, spec.uid))?;
        if spec.uid == 0 {
            let mut data = [CapData::default(); 2];
            for &cap in &spec.capabilities {
                let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
                data[word].effective |= bit;
                data[word].permitted |= bit;
            }
            let mut header = CapHeader {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                return Err(format!("capset: {}", std::io::Error::last_os_error()));
            }
        }
        if spec.no_new_privs {
            check(
                "no_new_privs",
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            )?;
        }
    }
    Ok(())
}
