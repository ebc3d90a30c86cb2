//! A memory cgroup for tests that need the kernel's OOM killer.

use std::fs;
use std::path::{Path, PathBuf};

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
