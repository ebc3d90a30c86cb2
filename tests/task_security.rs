//! The user command, or a sibling container of another uid, attacks the emissary: each test
//! replays a finding of the security review (shared/research/security-review.md) and checks
//! that it no longer works.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent_util::*;
use crate::controller::Controller;
use crate::util::*;

/// The agent's journal of events (the controller's view, without a controller).
fn events_text(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("data/events.jsonl")).unwrap_or_default()
}

/// Every file under `dir`, read as text (lossily), one after another.
fn all_files(dir: &Path) -> String {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return text;
    };
    for entry in entries.flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            text.push_str(&all_files(&entry.path()));
        } else if kind.is_file() {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(entry.path()).unwrap(),
            ));
        }
    }
    text
}

/// `sh -c SCRIPT` as uid and gid `uid`, without supplementary groups: another container.
fn as_uid(uid: u32, script: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "sh",
        "-c",
        script,
    ]);
    default_signals(&mut cmd);
    cmd
}

/// Finding 2b: the command points the stdout capture and an output parameter at
/// /proc/self/environ, so that a root emissary, reading them by path, reports its own
/// environment and the task token in it.
#[test]
fn the_command_cannot_make_the_emissary_read_its_own_proc_files_into_outputs() {
    if !is_root() {
        eprintln!("skipped: only a root emissary can read its own environ once non-dumpable");
        return;
    }
    let dir = Dir::new("security-proc-outputs");
    let agent = Agent::start(dir.join("agent"), &[]);
    let work = dir.join("work");
    let script = format!(
        "mkdir -p {w} && echo fine > {w}/fine && ln -s {w}/fine {w}/linked && \
         ln -s /proc/self/environ {w}/leak && ln -s /proc/self/environ {w}/leak-raw && \
         echo printed && ctr=$(dirname \"$EMISSARY_PROGRESS_FILE\") && \
         rm $ctr/stdout && ln -s /proc/self/environ $ctr/stdout",
        w = work.display()
    );
    let spec = json!({
        "container": {"command": ["sh", "-c", script]},
        "outputs": {
            "parameters": [
                {"name": "leak", "valueFrom": {"path": work.join("leak")}},
                {"name": "linked", "valueFrom": {"path": work.join("linked")}}
            ],
            "artifacts": [{"name": "leak-raw", "path": work.join("leak-raw"), "archive": {"none": {}}}]
        }
    });
    let root = dir.join("root");
    let mut cmd = emissary(["run", "--root", root.to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string())
        .env("EMISSARY_AGENT_RETRY", "5s");
    agent.emissary_env(&mut cmd, "wf", "leaky", 0);
    let token = agent.token("wf", "leaky", 0, "1h");
    let out = run(&mut cmd, b"", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || events_text(&agent)
            .lines()
            .count()
            == 2),
        "no result event: {}",
        events_text(&agent)
    );

    let outputs = std::fs::read_to_string(root.join("outputs.json")).unwrap();
    let everything = [
        outputs.clone(),
        events_text(&agent),
        all_files(&agent.dir.join("data/store")),
        out.stdout(),
        out.stderr(),
    ];
    for (what, text) in ["outputs.json", "events", "store", "stdout", "stderr"]
        .iter()
        .zip(&everything)
    {
        // The token, or anything else of the emissary's environment.
        assert!(
            !text.contains(&token) && !text.contains("EMISSARY_AGENT_ADDR="),
            "the emissary's environment leaked into {what}: {text}"
        );
    }
    out.assert_code(125);
    let outputs: serde_json::Value = serde_json::from_str(&outputs).unwrap();
    assert_eq!(
        outputs["outputs"]["result"], "printed",
        "the result is what the command printed"
    );
    let parameters = outputs["outputs"]["parameters"].as_array().unwrap();
    assert_eq!(parameters.len(), 1, "{outputs}");
    assert_eq!(parameters[0]["name"], "linked");
    assert_eq!(
        parameters[0]["value"], "fine",
        "a symlink elsewhere still works"
    );
    let message = outputs["error"]["message"].as_str().unwrap();
    for part in [
        format!("output parameter \"leak\": {}", work.join("leak").display()),
        format!(
            "output artifact \"leak-raw\": {}",
            work.join("leak-raw").display()
        ),
        "/proc".to_owned(),
    ] {
        assert!(message.contains(&part), "{part:?} not in {message:?}");
    }
    assert_eq!(outputs["error"]["kind"], "user", "{outputs}");
}

/// Finding 2b, inside an archive: a path through a symlink to /proc reaches a process file
/// that tar would otherwise pack whole.
#[test]
fn an_archived_output_refuses_a_process_file_too() {
    if !is_root() {
        eprintln!("skipped: only a root emissary can read its own environ once non-dumpable");
        return;
    }
    let dir = Dir::new("security-proc-tar");
    let work = dir.join("work");
    let spec = json!({
        "container": {"command": ["sh", "-c", format!("mkdir -p {w} && ln -s /proc {w}/proc", w = work.display())]},
        "outputs": {"artifacts": [{
            "name": "leak-tar",
            "path": work.join("proc/self/environ"),
            "archive": {"tar": {"compressionLevel": 0}}
        }]}
    });
    let spec_path = dir.write("spec.json", spec.to_string());
    let out = run_quick(
        emissary(["run", "--template", spec_path.to_str().unwrap(), "--out"])
            .arg(dir.join("out"))
            .env("LEAK_CANARY", "canary-4c9f1e"),
    );
    let stored = all_files(&dir.join("out"));
    assert!(
        !stored.contains("canary-4c9f1e"),
        "the emissary's environment was archived: {stored}"
    );
    out.assert_code(125);
    let message = dir.read_json("out/outputs.json")["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("output artifact \"leak-tar\"")
            && message.contains(&work.join("proc/self/environ").display().to_string())
            && message.contains("/proc"),
        "{message}"
    );
}

/// Finding 2: the token stays in the emissary's initial environment block, which is what
/// /proc/PID/environ shows to whoever may read it (root, a debugger, a core dump).
#[test]
fn the_token_is_wiped_from_the_emissarys_own_environment() {
    if !is_root() {
        eprintln!("skipped: reading a non-dumpable process's environ needs root");
        return;
    }
    let dir = Dir::new("security-environ");
    let agent = Agent::start(dir.join("agent"), &[]);
    let marker = marker(30);
    let spec = json!({"container": {"command": ["sh", "-c", format!(
        "echo \"command sees: ${{EMISSARY_TOKEN:-no token}}\"; sleep {marker}")]}});
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", "wiped", 0);
    let token = agent.token("wf", "wiped", 0, "1h");
    let running = start(&mut cmd);
    assert!(
        wait_until(Duration::from_secs(10), || sleeps(&marker).len() == 1),
        "the command did not start"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", running.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ).into_owned();
    for pid in sleeps(&marker) {
        kill(pid, libc::SIGKILL);
    }
    let out = running.finish(Duration::from_secs(20));
    assert!(
        environ.contains("EMISSARY_TASK_ID=wiped"),
        "not the emissary's environment: {environ:?}"
    );
    assert!(
        !environ.contains(&token),
        "the token is still in the emissary's environ: {environ:?}"
    );
    // The command never had it; the emissary still has it for the agent.
    assert!(
        out.stdout().contains("command sees: no token"),
        "{}",
        out.dump()
    );
    out.assert_code(137);
    assert!(
        wait_until(Duration::from_secs(10), || events_text(&agent)
            .contains("\"Failed\"")),
        "the result did not reach the agent: {}",
        events_text(&agent)
    );
}

/// Finding 11: the command replaces its control FIFO with one nobody reads, and the relay,
/// opening the path, blocked forever: the controller's terminate never arrived.
#[test]
fn a_command_that_replaces_its_signal_fifo_is_still_terminated() {
    let dir = Dir::new("security-fifo");
    let controller = Controller::start();
    let agent = Agent::start(dir.join("agent"), &["--controller-url", &controller.url()]);
    let marker = marker(15);
    let spec = json!({"container": {"command": ["sh", "-c", format!(
        "ctr=$(dirname \"$EMISSARY_PROGRESS_FILE\") && rm $ctr/signal && mkfifo $ctr/signal && sleep {marker}")]}});
    let mut cmd = emissary(["run", "--root", dir.join("root").to_str().unwrap()]);
    cmd.env("EMISSARY_TEMPLATE", spec.to_string());
    agent.emissary_env(&mut cmd, "wf", "stubborn", 0);
    let running = start(&mut cmd);
    assert!(
        wait_until(Duration::from_secs(10), || sleeps(&marker).len() == 1),
        "the command did not start"
    );
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    controller.command(json!({"task_id": "stubborn", "attempt": 0, "kind": "terminate"}));
    let out = running.finish(Duration::from_secs(30));
    out.assert_code(143);
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "terminate took {:?}{}",
        sent.elapsed(),
        out.dump()
    );
}

/// Finding 14: the shared directory is world-writable, so any container of the pod, at any
/// uid, could replace the binary, the staged inputs or a sibling's exit code.
#[test]
fn after_init_another_uid_cannot_replace_the_binary_a_siblings_files_or_staged_inputs() {
    if !is_root() {
        eprintln!("skipped: needs root to act as several uids");
        return;
    }
    let dir = Dir::new("security-sticky");
    let shared = dir.join("shared");
    let spec = json!({
        "inputs": {"artifacts": [{"name": "data", "path": dir.join("in/data"), "raw": {"data": "staged by init"}}]},
        "containerSet": {"containers": [
            {"name": "a", "command": ["sh", "-c", "exit 3"]},
            {"name": "main", "command": ["cat", dir.join("in/data")], "dependencies": ["a"]}
        ]}
    });
    run_quick(
        emissary(["init", "--dest", shared.to_str().unwrap()])
            .env("EMISSARY_TEMPLATE", spec.to_string()),
    )
    .assert_code(0);
    let template = format!("@{}", shared.join("template").display());
    run_quick(
        emissary([
            "run",
            "--root",
            shared.to_str().unwrap(),
            "--container",
            "a",
        ])
        .env("EMISSARY_TEMPLATE", &template),
    )
    .assert_code(3);
    let before: Vec<Vec<u8>> = ["emissary", "ctr/a/exitcode", "inputs/data"]
        .iter()
        .map(|f| std::fs::read(shared.join(f)).unwrap())
        .collect();

    // Each line is one attempt of another container, as uid 12345.
    let attempts = [
        "rm -f $S/emissary",
        "echo evil > $S/evil.$$ && mv -f $S/evil.$$ $S/emissary",
        "mv $S/ctr/a $S/ctr/a.old && mkdir $S/ctr/a && printf 0 > $S/ctr/a/exitcode",
        "rm -f $S/ctr/a/exitcode",
        "printf 0 > $S/ctr/a/exitcode",
        "rm -rf $S/inputs/data",
        "echo forged > $S/forged.$$ && mv -f $S/forged.$$ $S/inputs/data",
        "echo forged > $S/inputs/data",
        "echo 0000 > $S/inputs.sha256/data",
    ];
    let script = format!(
        "S={}\n{}\ntouch $S/mine && echo may-write-its-own",
        shared.display(),
        attempts
            .iter()
            .map(|a| format!("if ( {a} ) 2>/dev/null; then echo \"allowed: {a}\"; fi"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let out = run_quick(&mut as_uid(12345, &script));
    assert_eq!(
        out.stdout(),
        "may-write-its-own\n",
        "another uid changed what it must not{}",
        out.dump()
    );
    let after: Vec<Vec<u8>> = ["emissary", "ctr/a/exitcode", "inputs/data"]
        .iter()
        .map(|f| std::fs::read(shared.join(f)).unwrap())
        .collect();
    assert!(before == after, "a file changed");
}

/// Finding 14: a container's own directory, made in advance by another uid (or a symlink),
/// would let that uid plant files where this container's emissary writes.
#[test]
fn a_container_directory_made_by_another_uid_or_a_symlink_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to act as several uids");
        return;
    }
    let dir = Dir::new("security-ctr-dir");
    let shared = dir.join("shared");
    run_quick(&mut emissary(["init", "--dest", shared.to_str().unwrap()])).assert_code(0);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let script = format!(
        "mkdir {s}/ctr/main && chmod 777 {s}/ctr/main && ln -s {e} {s}/ctr/b && echo planted",
        s = shared.display(),
        e = elsewhere.display()
    );
    let out = run_quick(&mut as_uid(12345, &script));
    assert_eq!(out.stdout(), "planted\n", "{}", out.dump());

    let spec = json!({"container": {"command": ["true"]}}).to_string();
    // main's emissary, as uid 23456: the directory is not its own.
    let run_main = format!(
        "exec {}/emissary run --root {}",
        shared.display(),
        shared.display()
    );
    let out = run_quick(as_uid(23456, &run_main).env("EMISSARY_TEMPLATE", &spec));
    out.assert_code(125)
        .assert_stderr_contains(&shared.join("ctr/main").display().to_string())
        .assert_stderr_contains("uid 12345");
    // b's emissary, as root: a symlink is never its directory.
    let out = run_quick(
        emissary([
            "run",
            "--root",
            shared.to_str().unwrap(),
            "--container",
            "b",
        ])
        .env("EMISSARY_TEMPLATE", &spec),
    );
    out.assert_code(125)
        .assert_stderr_contains(&shared.join("ctr/b").display().to_string())
        .assert_stderr_contains("symbolic link");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "written through the symlink"
    );
}

/// Finding 14: where a root emissary writes by path under the shared root, a planted symlink
/// redirected the write into a file of the planter's choosing: the log files, and the
/// temporary files of exitcode, summary.json and outputs.json (named after the PID, 1 in a
/// container).
#[test]
fn a_planted_symlink_is_not_written_through() {
    if !is_root() {
        eprintln!("skipped: needs root for unshare --pid");
        return;
    }
    let dir = Dir::new("security-planted");
    let victim = dir.write("victim", "untouched");
    let spec = dir.write(
        "spec.json",
        json!({"container": {"command": ["echo", "written"]}}).to_string(),
    );
    // As PID 1, as in a container: the temporary names were predictable.
    let run_as_pid_1 = |root: &Path| {
        let mut cmd = Command::new("unshare");
        default_signals(&mut cmd)
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(emissary_bin())
            .args(["run", "--template", spec.to_str().unwrap(), "--out"])
            .arg(root);
        run_quick(&mut cmd)
    };

    let root = dir.join("temps");
    std::fs::create_dir_all(root.join("ctr/main")).unwrap();
    for temp in [
        ".outputs.json.tmp.1",
        "ctr/main/.exitcode.tmp.1",
        "ctr/main/.summary.json.tmp.1",
    ] {
        symlink(&victim, root.join(temp)).unwrap();
    }
    run_as_pid_1(&root).assert_code(0);
    assert_eq!(dir.read_string("victim"), "untouched");
    assert_eq!(
        dir.read_json("temps/outputs.json")["outputs"]["result"],
        "written"
    );
    assert_eq!(dir.read_string("temps/ctr/main/exitcode"), "0");

    let root = dir.join("logs");
    std::fs::create_dir_all(root.join("ctr/main")).unwrap();
    symlink(&victim, root.join("ctr/main/stdout")).unwrap();
    let out = run_as_pid_1(&root);
    assert_eq!(dir.read_string("victim"), "untouched");
    out.assert_code(125)
        .assert_stderr_contains(&root.join("ctr/main/stdout").display().to_string());
}

/// Finding 14: the task container took whatever lay in the world-writable inputs/ for an input
/// init had staged, with whatever digest lay beside it. Now it takes only what init recorded
/// (moving it even when init ran as another uid), and fetches the rest itself.
#[test]
fn only_inputs_init_staged_are_taken_from_the_shared_directory() {
    if !is_root() {
        eprintln!("skipped: needs root to act as several uids");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new("security-staged");
    let shared = dir.join("shared");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let store = dir.join("store");
    dir.write("store/k", "real");
    let spec = json!({
        "inputs": {"artifacts": [
            {"name": "staged", "path": work.join("staged"), "raw": {"data": "from init"}},
            {"name": "planted", "path": work.join("planted"), "key": "k"}
        ]},
        "container": {"command": ["cat", work.join("staged"), work.join("planted")]}
    })
    .to_string();
    // Init has no store: it stages the raw input only.
    run_quick(
        emissary(["init", "--dest", shared.to_str().unwrap()]).env("EMISSARY_TEMPLATE", &spec),
    )
    .assert_code(0);
    let plant = format!(
        "echo forged > {s}/inputs/planted && echo {d} > {s}/inputs/.planted.sha256 && echo planted",
        s = shared.display(),
        d = "0".repeat(64)
    );
    assert_eq!(run_quick(&mut as_uid(12345, &plant)).stdout(), "planted\n");

    let run_main = format!(
        "exec {s}/emissary run --root {s} --store {}",
        store.display(),
        s = shared.display()
    );
    let out = run_quick(as_uid(23456, &run_main).env("EMISSARY_TEMPLATE", &spec));
    out.assert_code(0);
    assert_eq!(out.stdout(), "from initreal", "{}", out.dump());

    // As init's uid, main moves the staged input away; then, restarted, it must not take
    // what another uid put in its place.
    let run_as_root = |what: &str| {
        let out = run_quick(
            Command::new("sh")
                .args(["-c", &run_main])
                .env("EMISSARY_TEMPLATE", &spec),
        );
        out.assert_code(0);
        assert_eq!(out.stdout(), "from initreal", "{what}{}", out.dump());
    };
    run_as_root("moved by init's uid");
    assert!(!shared.join("inputs/staged").exists());
    let plant = format!(
        "echo forged > {}/inputs/staged && echo planted",
        shared.display()
    );
    assert_eq!(run_quick(&mut as_uid(12345, &plant)).stdout(), "planted\n");
    run_as_root("restarted");
}

/// Finding 13: an artifact rewritten in the store after its producer reported its SHA-256
/// was taken as is by its consumers. Now the expected digest, when the input carries it, is
/// checked as it is staged, by `run` and by `init`, and nothing is left staged on a mismatch.
#[test]
fn an_input_rewritten_after_its_producer_reported_it_is_refused() {
    let dir = Dir::new("security-sha256");
    let made = dir.join("made");
    let producer = json!({
        "container": {"command": ["sh", "-c", format!(
            "mkdir -p {m}/tree && echo produced > {m}/file && echo leaf > {m}/tree/leaf",
            m = made.display())]},
        "outputs": {"artifacts": [
            {"name": "raw", "path": made.join("file"), "archive": {"none": {}}},
            {"name": "tree", "path": made.join("tree")}
        ]}
    });
    let store = dir.join("store");
    let spec_path = dir.write("producer.json", producer.to_string());
    run_quick(emissary(["run", "--template", spec_path.to_str().unwrap(), "--out"]).arg(&store))
        .assert_code(0);
    let produced = dir.read_json("store/outputs.json");
    let reported = |name: &str| {
        let artifacts = produced["outputs"]["artifacts"].as_array().unwrap();
        let a = artifacts.iter().find(|a| a["name"] == name).unwrap();
        (
            a["key"].as_str().unwrap().to_owned(),
            a["sha256"].as_str().unwrap().to_owned(),
        )
    };
    let ((raw_key, raw_sha), (tree_key, tree_sha)) = (reported("raw"), reported("tree"));
    let consumer = |into: &Path| {
        json!({
            "inputs": {"artifacts": [
                {"name": "tree", "path": into.join("tree"), "key": tree_key, "sha256": tree_sha},
                {"name": "raw", "path": into.join("raw"), "key": raw_key, "sha256": raw_sha}
            ]},
            "container": {"command": ["cat", into.join("raw"), into.join("tree/leaf")]}
        })
    };
    let run_consumer = |into: &Path| {
        let spec = dir.write("consumer.json", consumer(into).to_string());
        run_quick(
            emissary(["run", "--template", spec.to_str().unwrap(), "--store"])
                .arg(&store)
                .arg("--out")
                .arg(into.join("out")),
        )
    };
    let out = run_consumer(&dir.join("intact"));
    out.assert_code(0);
    assert_eq!(out.stdout(), "produced\nleaf\n");

    // The object is rewritten after its producer reported it.
    std::fs::write(store.join(&raw_key), "rewritten\n").unwrap();
    let actual = String::from_utf8(
        Command::new("sha256sum")
            .arg(store.join(&raw_key))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .to_owned();
    let into = dir.join("rewritten");
    let out = run_consumer(&into);
    out.assert_code(125)
        .assert_stderr_contains("input artifact \"raw\"")
        .assert_stderr_contains(&raw_sha)
        .assert_stderr_contains(&actual);
    assert!(
        !into.join("raw").exists(),
        "the rewritten object was staged"
    );
    assert_eq!(
        dir.read_json("rewritten/out/outputs.json")["reason"],
        "StartFailed"
    );

    // init, staging for the task container, refuses it too and records nothing.
    let shared = dir.join("shared");
    let out = run_quick(
        emissary(["init", "--dest", shared.to_str().unwrap(), "--store"])
            .arg(&store)
            .env("EMISSARY_TEMPLATE", consumer(&dir.join("pod")).to_string()),
    );
    out.assert_code(125)
        .assert_stderr_contains("input artifact \"raw\"")
        .assert_stderr_contains(&actual);
    assert!(!shared.join("inputs/raw").exists());
    assert!(!shared.join("inputs.sha256/raw").exists());
}
