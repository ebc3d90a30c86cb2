//! OOM kills, from the memory cgroup's `oom_kill` counter (cgroup v2 `memory.events`, or v1
//! `memory.oom_control`), read before and after a run: a SIGKILL with a risen counter was the
//! OOM killer. Without a readable counter nothing is guessed (the run stays `Signaled`, 9).

use std::fs;
use std::path::PathBuf;

/// The OOM-kill count of the cgroup this process is in, or `None` when no counter is readable.
pub fn kills() -> Option<u64> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    counter_files(&cgroups, &mounts)
        .into_iter()
        .find_map(|(file, key)| {
            let text = fs::read_to_string(file).ok()?;
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
        })
}

/// Candidate counter files, in the order /proc/self/cgroup lists them; only one of a v1 and a v2
/// file exists where the memory controller lives.
fn counter_files(cgroups: &str, mounts: &str) -> Vec<(PathBuf, &'static str)> {
    let mut files = Vec::new();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (fstype, option, file, key) = if controllers.is_empty() {
            ("cgroup2", None, "memory.events", "oom_kill ")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("cgroup", Some("memory"), "memory.oom_control", "oom_kill ")
        } else {
            continue;
        };
        for (root, mount_point) in cgroup_mounts(mounts, fstype, option) {
            let Some(relative) = path.strip_prefix(root.as_str()) else {
                continue;
            };
            let dir = PathBuf::from(mount_point).join(relative.trim_start_matches('/'));
            files.push((dir.join(file), key));
        }
    }
    files
}

/// `(root within the hierarchy, mount point)` of each cgroup mount of `fstype` (and, for v1,
/// with `option` among its super options).
fn cgroup_mounts(mounts: &str, fstype: &str, option: Option<&str>) -> Vec<(String, String)> {
    mounts
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source super-options
            let (before, after) = line.split_once(" - ")?;
            let mut after = after.split(' ');
            if after.next()? != fstype {
                return None;
            }
            let super_options = after.nth(1).unwrap_or("");
            if let Some(option) = option
                && !super_options.split(',').any(|o| o == option)
            {
                return None;
            }
            let fields: Vec<&str> = before.split(' ').collect();
            Some((fields.get(3)?.to_string(), fields.get(4)?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_and_v2_counters() {
        let cgroups = "12:memory:/kubepods/pod1/ctr\n0::/kubepods/pod1/ctr\n3:cpu,cpuacct:/x\n";
        let mounts = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
        let files = counter_files(cgroups, mounts);
        let paths: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.oom_control",
                "/sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.events"
            ]
        );
    }

    #[test]
    fn a_namespaced_cgroup_root_is_stripped() {
        let cgroups = "0::/\n";
        let mounts = "40 30 0:30 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        let files = counter_files(cgroups, mounts);
        assert_eq!(files[0].0, PathBuf::from("/sys/fs/cgroup/memory.events"));
    }
}
