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
