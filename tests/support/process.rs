//! Running the binaries under test: where they are, signalling them, waiting on them.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The emissary under test: `$EMISSARY_BIN` (make test points it at the static release build),
/// else the workspace's debug build.
pub fn emissary_bin() -> PathBuf {
    binary("EMISSARY_BIN", "emissary")
}

/// The agent under test: `$EMISSARY_AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    binary("EMISSARY_AGENT_BIN", "emissary-agent")
}

fn binary(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| built("debug", name));
    found(path, "run `cargo build` (or `make test`) first")
}

/// The release agent the benchmarks and the soak measure.
pub fn release_agent_bin() -> PathBuf {
    found(
        built("release", "emissary-agent"),
        "`make bench` (or `make soak`) builds it",
    )
}

fn built(profile: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join(name)
}

fn found(path: PathBuf, how: &str) -> PathBuf {
    assert!(path.is_file(), "{} not found: {how}", path.display());
    path
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Polls `condition` every 5 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    condition()
}

/// Asks the scheduler for short slices on the calling thread (`sched_setattr`'s
/// `sched_runtime`, Linux ≥ 6.12), as the agent's relay does: the benchmarks' threads that
/// stand for a controller or an emissary elsewhere take their readings without waiting out
/// the slices of the load they share two CPUs with. Best effort.
#[allow(unsafe_code)]
pub fn prefer_short_slices() {
    // `struct sched_attr`, its first version: size, policy, flags, nice, priority, runtime,
    // deadline, period.
    let mut attr = [0u64; 6];
    let size = std::mem::size_of_val(&attr);
    // SAFETY: the kernel writes at most `size` bytes into `attr`, and reads as many back.
    unsafe {
        if libc::syscall(libc::SYS_sched_getattr, 0, attr.as_mut_ptr(), size, 0) == 0 {
            attr[0] = attr[0] >> 32 << 32 | size as u64; // the size; the policy kept
            attr[1] &= 1; // SCHED_FLAG_RESET_ON_FORK
            attr[3] = 100_000; // runtime: 0.1 ms
            libc::syscall(libc::SYS_sched_setattr, 0, attr.as_ptr(), 0);
        }
    }
}
