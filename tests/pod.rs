//! A pod, faithfully, without a cluster: the kernel's own primitives play kubelet.
//!
//! Each "container" is a new PID and mount namespace whose first process becomes PID 1, entered
//! into its own root filesystem with `chroot --userspec` (so it runs as a non-root uid), with a
//! read-only root, a tmpfs `/tmp`, the pod's shared directory bind-mounted at
//! `/var/run/emissary` (the emptyDir), `/proc` of its own namespace, the host's `/dev`, and `/sys`
//! read-only (where a container finds its cgroup files). The
//! whole pod sits in a memory cgroup with a limit (v1 `memory.limit_in_bytes` on this hybrid
//! machine, v2 `memory.max` where the hierarchy is pure v2). The network is the host's, so an
//! agent on 127.0.0.1 is reachable as from a pod with the node's IP. (crun and runc refuse this
//! machine's hybrid cgroups, so this is the closest faithful stand-in; feasibility.md.)

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// The uid:gid containers run as (the images' `USER`).
pub const UID: u32 = 65532;

/// Root filesystems to build containers from.
pub enum Image {
    /// FROM scratch + the static emissary at /emissary (our init image).
    Emissary,
    /// Debian's static busybox with its applets linked in /bin (a shell image).
    Busybox,
    /// Only /bin/busybox, no /bin/sh or other links: an image without a shell.
    NoShell,
}

/// One pod: a shared directory and a memory cgroup.
pub struct Pod {
    pub dir: Dir,
    pub shared: PathBuf,
    cgroup: Option<MemoryCgroup>,
}

impl Pod {
    /// A pod whose containers share `memory_limit` bytes (no cgroup when the machine has no
    /// memory controller to use; `has_memory_limit` tells).
    pub fn new(name: &str, memory_limit: u64) -> Pod {
        let dir = Dir::new(name);
        let shared = dir.join("emptydir");
        fs::create_dir_all(&shared).unwrap();
        // An emptyDir is world-writable, which is what lets a non-root container use it.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let cgroup = MemoryCgroup::create(&format!("emissary-pod-{name}"), memory_limit);
        Pod {
            dir,
            shared,
            cgroup,
        }
    }

    pub fn has_memory_limit(&self) -> bool {
        self.cgroup.is_some()
    }

    /// A fresh root filesystem for one container.
    pub fn rootfs(&self, container: &str, image: Image) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{container}"));
        for d in [
            "proc",
            "dev",
            "sys",
            "tmp",
            "var/run/emissary",
            "bin",
            "etc",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(
            root.join("etc/passwd"),
            format!("root:x:0:0::/:/bin/false\nnonroot:x:{UID}:{UID}::/:/bin/false\n"),
        )
        .unwrap();
        match image {
            Image::Emissary => {
                let binary = fs::read(emissary_bin()).unwrap();
                assert!(
                    !has_interpreter(&binary),
                    "{} is dynamically linked and cannot run in a FROM scratch image: \
                     run `make test`, or set EMISSARY_BIN to the static build",
                    emissary_bin().display()
                );
                fs::write(root.join("emissary"), binary).unwrap();
                fs::set_permissions(root.join("emissary"), fs::Permissions::from_mode(0o755))
                    .unwrap();
            }
            Image::Busybox | Image::NoShell => {
                fs::copy(busybox(), root.join("bin/busybox")).unwrap();
                if matches!(image, Image::Busybox) {
                    for applet in [
                        "sh", "echo", "cat", "sleep", "ls", "head", "tail", "mkdir", "id",
                        "printf", "true", "seq",
                    ] {
                        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                            .unwrap();
                    }
                }
            }
        }
        root
    }

    /// The command that runs `argv` as PID 1 of a new container on `rootfs`, as uid 65532.
    pub fn container(&self, rootfs: &Path, argv: &[&str]) -> Command {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let enter_cgroup = match &self.cgroup {
            Some(cg) => format!("echo $$ > {}/cgroup.procs && ", cg.dir.display()),
            None => String::new(),
        };
        // Inside the new namespaces, as root: mounts, then chroot into the container as 65532.
        let inside = format!(
            "set -e; r={root}; \
             mount --make-rprivate /; \
             mount --bind $r $r; mount -o remount,bind,ro $r; \
             mount --bind {shared} $r/var/run/emissary; \
             mount -t proc proc $r/proc; \
             mount -t tmpfs -o mode=1777 tmpfs $r/tmp; \
             mount --rbind /dev $r/dev; \
             mount --rbind /sys $r/sys; mount -o remount,bind,ro $r/sys; \
             exec chroot --userspec={UID}:{UID} $r {argv}",
            root = quote(&rootfs.display().to_string()),
            shared = quote(&self.shared.display().to_string()),
            argv = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        );
        let mut cmd = Command::new("sh");
        default_signals(&mut cmd);
        cmd.args([
            "-c",
            &format!(
                "{enter_cgroup}exec unshare --pid --fork --mount sh -c {}",
                quote(&inside)
            ),
        ]);
        // A pod's containers start with a clean environment (kubelet sets what the spec says).
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }
}

fn busybox() -> &'static Path {
    let path = Path::new("/bin/busybox");
    assert!(
        path.exists(),
        "/bin/busybox missing: `make test` installs busybox-static"
    );
    path
}

/// A memory cgroup with a limit (v2 `memory.max` on a pure v2 hierarchy, else v1
/// `memory.limit_in_bytes`), removed when dropped.
pub struct MemoryCgroup {
    pub dir: PathBuf,
}

impl MemoryCgroup {
    /// `None` when the machine has no memory controller this process may use.
    pub fn create(name: &str, limit: u64) -> Option<MemoryCgroup> {
        let (parent, limit_file) = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            ("/sys/fs/cgroup", "memory.max")
        } else if Path::new("/sys/fs/cgroup/memory").is_dir() {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            return None;
        };
        let dir = Path::new(parent).join(format!("{name}-{}", std::process::id()));
        fs::create_dir(&dir).ok()?;
        fs::write(dir.join(limit_file), limit.to_string()).ok()?;
        Some(MemoryCgroup { dir })
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once the processes are gone; retry while the kernel finishes their exit.
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// True when this machine can run pods (root, for namespaces and cgroups).
pub fn can_run_pods() -> bool {
    if !is_root() {
        eprintln!("skipped: pods need root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}
