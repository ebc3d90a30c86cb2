//! Exit codes: the command's own, 128+N for signals, 126/127 when it cannot start.

use crate::util::*;

#[test]
fn passes_the_commands_exit_code_through() {
    for code in [0, 1, 3, 42, 126, 127, 255] {
        let out = run_quick(&mut emissary([
            "run",
            "--",
            "sh",
            "-c",
            &format!("exit {code}"),
        ]));
        out.assert_code(code);
        assert!(
            out.stderr.is_empty(),
            "the emissary said something{}",
            out.dump()
        );
    }
}

#[test]
fn a_command_killed_by_a_signal_exits_128_plus_n() {
    for (signal, code) in [("TERM", 143), ("KILL", 137), ("SEGV", 139), ("INT", 130)] {
        run_quick(&mut emissary([
            "run",
            "--",
            "sh",
            "-c",
            &format!("kill -{signal} $$"),
        ]))
        .assert_code(code);
    }
}

#[test]
fn a_missing_command_exits_127_with_one_clear_line() {
    let out = run_quick(&mut emissary(["run", "--", "/no/such/program", "arg"]));
    out.assert_code(127)
        .assert_stderr_contains("\"/no/such/program\": command not found");
    assert_eq!(out.stderr().lines().count(), 1, "{}", out.dump());

    run_quick(&mut emissary(["run", "--", "no-such-program-in-path"])).assert_code(127);
}

#[test]
fn a_command_that_cannot_be_executed_exits_126() {
    let dir = Dir::new("not-executable");
    let script = dir.write("script.sh", "#!/bin/sh\necho hi\n");
    run_quick(&mut emissary([
        std::ffi::OsStr::new("run"),
        script.as_os_str(),
    ]))
    .assert_code(126)
    .assert_stderr_contains("Permission denied");
    run_quick(&mut emissary([
        std::ffi::OsStr::new("run"),
        dir.path().as_os_str(),
    ]))
    .assert_code(126);
}

#[test]
fn start_failures_are_summarised() {
    let dir = Dir::new("start-failed");
    let summary = dir.join("summary.json");
    run_quick(&mut emissary([
        "run",
        "--summary",
        summary.to_str().unwrap(),
        "--",
        "/no/such/program",
    ]))
    .assert_code(127);
    let json = dir.read_json("summary.json");
    assert_eq!(json["reason"], "StartFailed");
    assert_eq!(json["exit_code"], 127);
    assert_eq!(json["error"]["kind"], "user");
    assert_eq!(json["error"]["retryable"], false);
}

#[test]
fn writes_an_atomic_summary_of_the_run() {
    let dir = Dir::new("summary");
    let summary = dir.join("summary.json");
    let out = run_quick(&mut emissary([
        "run",
        "--summary",
        summary.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "printf 12345; printf abc >&2; exit 7",
    ]));
    out.assert_code(7);
    assert_eq!(out.stdout, b"12345");
    assert_eq!(out.stderr, b"abc");
    let json = dir.read_json("summary.json");
    assert_eq!(json["exit_code"], 7);
    assert_eq!(json["reason"], "Error");
    assert_eq!(json["signal"], serde_json::Value::Null);
    assert_eq!(json["stdout_bytes"], 5);
    assert_eq!(json["stderr_bytes"], 3);
    assert_eq!(json["error"]["kind"], "user");
    for field in ["duration_ms", "user_cpu_ms", "sys_cpu_ms", "max_rss_kb"] {
        assert!(json[field].is_u64(), "{field} missing in {json}");
    }
    assert!(
        json["max_rss_kb"].as_u64().unwrap() > 100,
        "rusage of the tree: {json}"
    );
    for field in ["started_at", "finished_at"] {
        let text = json[field].as_str().unwrap();
        assert!(
            text.len() == 24 && text.ends_with('Z') && text.as_bytes()[10] == b'T',
            "{field}: {text}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["summary.json"], "no temp files may remain");
}

#[test]
fn a_signalled_command_is_summarised_with_its_signal() {
    let dir = Dir::new("summary-signal");
    let summary = dir.join("s.json");
    run_quick(&mut emissary([
        "run",
        "--summary",
        summary.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "kill -USR1 $$",
    ]))
    .assert_code(128 + libc::SIGUSR1);
    let json = dir.read_json("s.json");
    assert_eq!(json["reason"], "Signaled");
    assert_eq!(json["signal"], libc::SIGUSR1);
}

#[test]
fn a_thousand_fast_exits_back_to_back_never_hang() {
    for i in 0..1000 {
        let out = run(
            &mut emissary(["run", "--", "true"]),
            b"",
            std::time::Duration::from_secs(5),
        );
        assert_eq!(out.code, Some(0), "run {i}{}", out.dump());
    }
}

#[test]
fn a_stderr_whose_reader_is_gone_aborts_nothing() {
    let dir = Dir::new("closed-stderr");
    for (command, code) in [
        (vec!["/nonexistent-command"], 127),
        (vec!["sh", "-c", "echo err >&2; exit 3"], 3),
    ] {
        let _ = std::fs::remove_file(dir.join("s.json"));
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = emissary(["run", "--summary"])
            .arg(dir.join("s.json"))
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .arg("--")
            .args(&command)
            .stdout(std::process::Stdio::null())
            .stderr(writer)
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code), "{command:?}: {status:?}");
        assert_eq!(dir.read_json("s.json")["exit_code"], code);
    }
    assert_eq!(dir.read_string("logs/stderr"), "err\n");
}
