//! What happens inside a pod: `emissary init`, containerSet ordering, OOM kills.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::cgroup::MemoryCgroup;
use crate::util::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn init_installs_the_binary_and_world_writable_sticky_dirs() {
    let dir = Dir::new("init-install");
    let dest = dir.join("shared");
    run_quick(&mut emissary(["init", "--dest", dest.to_str().unwrap()])).assert_code(0);
    assert_eq!(
        std::fs::read(dest.join("emissary")).unwrap(),
        std::fs::read(emissary_bin()).unwrap()
    );
    assert_eq!(mode(&dest.join("emissary")), 0o555);
    // Sticky: each uid of the pod may remove or replace only its own files.
    for d in ["", "ctr", "inputs"] {
        assert_eq!(mode(&dest.join(d)), 0o1777, "{d}");
    }
    let out = run_quick(
        default_signals(&mut std::process::Command::new(dest.join("emissary")))
            .args(["run", "--", "echo", "copied"]),
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "copied\n");
}

#[test]
fn a_concurrent_reader_never_sees_a_partial_binary() {
    let dir = Dir::new("init-atomic");
    let dest = dir.join("shared");
    let binary = std::fs::read(emissary_bin()).unwrap();
    let target = dest.join("emissary");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (done, target, len) = (done.clone(), target.clone(), binary.len());
        std::thread::spawn(move || {
            let (mut complete, mut partial) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&target) {
                    if bytes.len() == len {
                        complete += 1
                    } else {
                        partial += 1
                    }
                }
            }
            (complete, partial)
        })
    };
    for _ in 0..20 {
        run_quick(&mut emissary(["init", "--dest", dest.to_str().unwrap()])).assert_code(0);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (complete, partial) = reader.join().unwrap();
    assert_eq!(
        partial, 0,
        "a reader saw a partial binary ({complete} complete reads)"
    );
    assert!(complete > 0);
    let leftovers: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn init_stages_inputs_and_the_task_container_moves_them_into_place() {
    let dir = Dir::new("init-inputs");
    let shared = dir.join("shared");
    let target = dir.join("task-root/data.txt");
    let spec = json!({
        "inputs": {"artifacts": [{"name": "data", "path": target, "raw": {"data": "staged by init"}, "mode": 0o640}]},
        "script": {"command": ["sh"], "source": format!("cat {}", target.display())}
    });
    let spec_text = spec.to_string();
    run_quick(
        emissary(["init", "--dest", shared.to_str().unwrap()]).env("EMISSARY_TEMPLATE", &spec_text),
    )
    .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(shared.join("inputs/data")).unwrap(),
        "staged by init"
    );
    assert_eq!(mode(&shared.join("template")), 0o444);
    assert_eq!(mode(&shared.join("script")), 0o755);
    assert!(!target.exists(), "init stages into the shared volume only");

    let template = format!("@{}", shared.join("template").display());
    let out = run_quick(
        emissary(["run", "--root", shared.to_str().unwrap()]).env("EMISSARY_TEMPLATE", &template),
    );
    out.assert_code(0);
    assert_eq!(out.stdout(), "staged by init");
    assert_eq!(mode(&target), 0o640);
    assert!(!shared.join("inputs/data").exists(), "moved, not copied");
}

/// `emissary run` of one container of the containerSet `spec`, in the pod rooted at `root`.
fn member(root: &Path, spec: &str, container: &str) -> std::process::Command {
    let mut cmd = emissary([
        "run",
        "--root",
        root.to_str().unwrap(),
        "--container",
        container,
    ]);
    cmd.env("EMISSARY_TEMPLATE", spec);
    cmd
}

fn container_set(dir: &Dir, a_script: &str) -> (std::path::PathBuf, String) {
    let spec = json!({"containerSet": {"containers": [
        {"name": "a", "command": ["sh", "-c", a_script]},
        {"name": "main", "command": ["sh", "-c", format!("echo main ran; cat {}", dir.join("a.txt").display())], "dependencies": ["a"]}
    ]}});
    (dir.join("root"), spec.to_string())
}

#[test]
fn a_container_set_runs_in_dependency_order() {
    let dir = Dir::new("containerset-order");
    let (root, spec) = container_set(
        &dir,
        &format!("sleep 0.3; echo from a > {}", dir.join("a.txt").display()),
    );
    let main = start(&mut member(&root, &spec, "main"));
    std::thread::sleep(Duration::from_millis(100));
    let a = run_quick(&mut member(&root, &spec, "a"));
    a.assert_code(0);
    let main = main.finish(Duration::from_secs(10));
    main.assert_code(0);
    assert_eq!(main.stdout(), "main ran\nfrom a\n");
    // Only main reports the task's outputs.
    assert_eq!(
        std::fs::read_to_string(root.join("ctr/a/exitcode")).unwrap(),
        "0"
    );
    let outputs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("outputs.json")).unwrap()).unwrap();
    assert_eq!(outputs["container"], "main");
}

#[test]
fn a_failed_dependency_skips_its_dependants() {
    let dir = Dir::new("containerset-failed");
    let (root, spec) = container_set(&dir, "exit 3");
    run_quick(&mut member(&root, &spec, "a")).assert_code(3);
    let main = run_quick(&mut member(&root, &spec, "main"));
    main.assert_code(125)
        .assert_stderr_contains("skipped: dependency \"a\" failed with exit code 3");
    assert!(!main.stdout().contains("main ran"));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("ctr/main/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["reason"], "StartFailed");
    assert_eq!(
        std::fs::read_to_string(root.join("ctr/main/exitcode")).unwrap(),
        "125"
    );
}

/// Security review, finding 10: a container main does not depend on fails: the set's result
/// says so (Argo fails the node), it is not lost behind main's success.
#[test]
fn a_failing_container_main_does_not_depend_on_fails_the_set() {
    let dir = Dir::new("containerset-sibling-failed");
    let spec = json!({"containerSet": {"containers": [
        {"name": "side", "command": ["sh", "-c", "exit 4"]},
        {"name": "main", "command": ["sh", "-c", "echo main ran"]}
    ]}})
    .to_string();
    let root = dir.join("root");
    run_quick(&mut member(&root, &spec, "side")).assert_code(4);
    let main = run_quick(&mut member(&root, &spec, "main"));
    assert_eq!(main.stdout(), "main ran\n");
    let outputs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("outputs.json")).unwrap()).unwrap();
    assert_ne!(outputs["exit_code"], 0, "{outputs:#}");
    let message = outputs["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("container \"side\" failed with exit code 4"),
        "{outputs:#}"
    );
}

#[test]
fn a_signal_while_waiting_for_dependencies_ends_the_wait() {
    let dir = Dir::new("containerset-term");
    let (root, spec) = container_set(&dir, "true");
    let main = start(&mut member(&root, &spec, "main"));
    assert!(wait_until(Duration::from_secs(5), || root
        .join("ctr/main/signal")
        .exists()));
    main.signal(libc::SIGTERM);
    let out = main.finish(Duration::from_secs(5));
    out.assert_code(143);
}

#[test]
fn a_window_resize_while_waiting_for_dependencies_changes_nothing() {
    let dir = Dir::new("containerset-winch");
    let (root, spec) = container_set(
        &dir,
        &format!("echo from a > {}", dir.join("a.txt").display()),
    );
    let main = start(&mut member(&root, &spec, "main"));
    assert!(wait_until(Duration::from_secs(5), || root
        .join("ctr/main/signal")
        .exists()));
    for signal in [libc::SIGWINCH, libc::SIGURG, libc::SIGCONT] {
        main.signal(signal);
    }
    std::thread::sleep(Duration::from_millis(100));
    run_quick(&mut member(&root, &spec, "a")).assert_code(0);
    let out = main.finish(Duration::from_secs(5));
    out.assert_code(0);
    assert_eq!(out.stdout(), "main ran\nfrom a\n");
}

#[test]
fn the_deadline_runs_while_waiting_for_dependencies() {
    let dir = Dir::new("containerset-deadline");
    let spec = json!({"activeDeadlineSeconds": 1, "containerSet": {"containers": [
        {"name": "a", "command": ["true"]},
        {"name": "main", "command": ["true"], "dependencies": ["a"]}
    ]}});
    let root = dir.join("root");
    let out = run(
        &mut member(&root, &spec.to_string(), "main"),
        b"",
        Duration::from_secs(10),
    );
    out.assert_code(124);
    assert!(out.elapsed < Duration::from_secs(3), "{}", out.dump());
    assert_eq!(
        std::fs::read_to_string(root.join("ctr/main/exitcode")).unwrap(),
        "124"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("ctr/main/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["reason"], "DeadlineExceeded");
}

#[test]
fn a_container_that_cannot_start_still_leaves_its_exit_code_for_its_dependants() {
    let dir = Dir::new("containerset-bad-deadline");
    let (root, spec) = container_set(&dir, "true");
    run_quick(member(&root, &spec, "a").env("EMISSARY_DEADLINE", "tomorrow"))
        .assert_code(125)
        .assert_stderr_contains("EMISSARY_DEADLINE");
    assert_eq!(
        std::fs::read_to_string(root.join("ctr/a/exitcode")).unwrap(),
        "125"
    );
    run_quick(&mut member(&root, &spec, "main"))
        .assert_code(125)
        .assert_stderr_contains("skipped: dependency \"a\" failed with exit code 125");
}

#[test]
fn an_exit_code_left_by_an_earlier_run_is_not_taken_for_this_one() {
    let dir = Dir::new("containerset-stale");
    let a_txt = dir.join("a.txt");
    let (root, spec) = container_set(&dir, &format!("sleep 1; echo from a > {}", a_txt.display()));
    let run_a = || start(&mut member(&root, &spec, "a"));
    run_a().finish(Duration::from_secs(10)).assert_code(0);
    std::fs::remove_file(&a_txt).unwrap();
    // The second run of `a` has started, not finished: main must wait for it.
    let a = run_a();
    std::thread::sleep(Duration::from_millis(300));
    let main = run_quick(&mut member(&root, &spec, "main"));
    a.finish(Duration::from_secs(10)).assert_code(0);
    main.assert_code(0);
    assert_eq!(main.stdout(), "main ran\nfrom a\n");
}

#[test]
fn an_unknown_container_is_a_clear_error() {
    let dir = Dir::new("containerset-unknown");
    let (root, spec) = container_set(&dir, "true");
    run_quick(&mut member(&root, &spec, "nope"))
        .assert_code(125)
        .assert_stderr_contains("containerSet has no container \"nope\"");
}

#[test]
fn a_dependency_cycle_is_refused_instead_of_waiting_forever() {
    let dir = Dir::new("containerset-cycle");
    let spec = serde_json::json!({"containerSet": {"containers": [
        {"name": "a", "command": ["true"], "dependencies": ["b"]},
        {"name": "b", "command": ["true"], "dependencies": ["a"]}
    ]}});
    let root = dir.join("root");
    let out = run(
        &mut member(&root, &spec.to_string(), "a"),
        b"",
        Duration::from_secs(10),
    );
    out.assert_code(125)
        .assert_stderr_contains("containerSet.containers[0].dependencies: a cycle")
        .assert_stderr_contains("a → b → a");
}

#[test]
fn an_oom_killed_command_is_reported_as_oomkilled_and_the_emissary_survives() {
    if !is_root() {
        eprintln!("skipped: needs root for a memory cgroup");
        return;
    }
    let Some(cgroup) = MemoryCgroup::create("emissary-oom", 48 << 20) else {
        eprintln!("skipped: no memory cgroup controller");
        return;
    };
    let dir = Dir::new("oom");
    let summary = dir.join("s.json");
    // Enter the cgroup, then exec the emissary; its child reads one endless line into memory.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} run --summary {} -- tail /dev/zero",
        cgroup.dir.display(),
        emissary_bin().display(),
        summary.display()
    );
    let out =
        run_quick(default_signals(&mut std::process::Command::new("sh")).args(["-c", &script]));
    out.assert_code(137);
    let json = dir.read_json("s.json");
    assert_eq!(json["reason"], "OOMKilled", "{json}");
    assert_eq!(json["error"]["retryable"], true);
}

#[test]
fn a_container_set_retries_a_failing_container_as_argo_counts_retries() {
    let dir = Dir::new("containerset-retry");
    let count = dir.join("count");
    // Fails twice, then succeeds: `retries: 3` is three attempts in all.
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo attempt $n; [ $n -ge 3 ]",
        c = count.display()
    );
    let spec = |retries: u32| {
        json!({"containerSet": {"retryStrategy": {"retries": retries.to_string(), "duration": "50ms"},
                                "containers": [{"name": "main", "command": ["sh", "-c", &script]}]}})
        .to_string()
    };
    let root = dir.join("root");
    let out = run_quick(
        emissary(["run", "--root", root.to_str().unwrap()]).env("EMISSARY_TEMPLATE", spec(3)),
    );
    out.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(root.join("ctr/main/stdout")).unwrap(),
        "attempt 1\nattempt 2\nattempt 3\n"
    );
    // The result is the attempt that counted, as its byte count is.
    let outputs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("outputs.json")).unwrap()).unwrap();
    assert_eq!(outputs["outputs"]["result"], "attempt 3");
    assert_eq!(outputs["summary"]["stdout_bytes"], 10, "{outputs}");

    std::fs::remove_file(&count).unwrap();
    let out = run_quick(
        emissary(["run", "--root", root.to_str().unwrap()]).env("EMISSARY_TEMPLATE", spec(2)),
    );
    out.assert_code(1);
    assert_eq!(
        std::fs::read_to_string(&count).unwrap().trim(),
        "2",
        "retries: 2 is two attempts"
    );
}
