//! Output capture: byte-exact, to the emissary's own streams and to the log files; stdin
//! passes through untouched.

use std::time::Duration;

use crate::util::*;

#[test]
fn stdin_passes_through_untouched() {
    let input = noise(3 << 20, 7);
    let out = run(
        &mut emissary(["run", "--", "cat"]),
        &input,
        Duration::from_secs(20),
    );
    out.assert_code(0);
    assert!(
        out.stdout == input,
        "stdin altered on the way ({} of {} bytes)",
        out.stdout.len(),
        input.len()
    );
}

#[test]
fn binary_output_is_captured_byte_exact_in_every_place() {
    let dir = Dir::new("capture-binary");
    let payload = noise(5 << 20, 11);
    let err_payload = noise(1 << 20, 13);
    dir.write("out.bin", &payload);
    dir.write("err.bin", &err_payload);
    let logs = dir.join("logs");
    let script = format!(
        "cat {} & cat {} >&2; wait",
        dir.join("out.bin").display(),
        dir.join("err.bin").display()
    );
    let summary = dir.join("s.json");
    let out = run(
        &mut emissary([
            "run",
            "--log-dir",
            logs.to_str().unwrap(),
            "--summary",
            summary.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ]),
        b"",
        Duration::from_secs(30),
    );
    out.assert_code(0);
    assert!(out.stdout == payload, "echoed stdout differs");
    assert!(out.stderr == err_payload, "echoed stderr differs");
    assert!(dir.read("logs/stdout") == payload, "stdout file differs");
    assert!(
        dir.read("logs/stderr") == err_payload,
        "stderr file differs"
    );
    let combined = dir.read("logs/combined");
    assert_eq!(combined.len(), payload.len() + err_payload.len());
    let json = dir.read_json("s.json");
    assert_eq!(json["stdout_bytes"], payload.len());
    assert_eq!(json["stderr_bytes"], err_payload.len());
    assert_eq!(dir.read_string("logs/exitcode"), "0");
}

#[test]
fn combined_keeps_each_streams_order() {
    let dir = Dir::new("capture-combined");
    let logs = dir.join("logs");
    let script = "for i in $(seq 200); do echo out$i; echo err$i >&2; done";
    run_quick(&mut emissary([
        "run",
        "--log-dir",
        logs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]))
    .assert_code(0);
    let combined = dir.read_string("logs/combined");
    let outs: Vec<&str> = combined.lines().filter(|l| l.starts_with("out")).collect();
    let errs: Vec<&str> = combined.lines().filter(|l| l.starts_with("err")).collect();
    let expect = |p: &str| (1..=200).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    assert_eq!(outs, expect("out"));
    assert_eq!(errs, expect("err"));
}

#[test]
fn nothing_is_lost_when_the_command_exits_with_data_in_the_pipe() {
    let dir = Dir::new("capture-tail");
    let logs = dir.join("logs");
    // 4 MiB written as fast as possible, then an immediate exit: most of it is still in
    // flight when the exit is reaped.
    let out = run(
        &mut emissary([
            "run",
            "--log-dir",
            logs.to_str().unwrap(),
            "--",
            "head",
            "-c",
            "4194304",
            "/dev/zero",
        ]),
        b"",
        Duration::from_secs(20),
    );
    out.assert_code(0);
    assert_eq!(out.stdout.len(), 4 << 20);
    assert_eq!(dir.read("logs/stdout").len(), 4 << 20);
}

#[test]
fn files_are_complete_even_when_our_own_stdout_is_gone() {
    let dir = Dir::new("capture-epipe");
    let logs = dir.join("logs");
    // The emissary's stdout is a pipe whose reader exits at once.
    let script = format!(
        "{} run --log-dir {} -- sh -c 'seq 100000; echo finished >&2' | true; echo rc=$?",
        emissary_bin().display(),
        logs.display()
    );
    let out =
        run_quick(default_signals(&mut std::process::Command::new("bash")).args(["-c", &script]));
    out.assert_code(0);
    let lines = dir.read_string("logs/stdout").lines().count();
    assert_eq!(lines, 100_000, "stdout file incomplete{}", out.dump());
    assert!(out.stderr().contains("finished"), "{}", out.dump());
}

#[test]
fn a_stdout_of_our_own_that_never_drains_fails_the_task_after_the_grace() {
    let dir = Dir::new("capture-blocked");
    let logs = dir.join("logs");
    // Our stdout is a pipe nobody reads: the echo blocks once it holds 64 KiB.
    let mut child = emissary(["run", "--grace", "1s", "--log-dir"])
        .arg(&logs)
        .args(["--", "head", "-c", "100000", "/dev/zero"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the emissary waited for its blocked stdout past the grace");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("own output is blocked"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // What was read is in the file, and nothing else.
    let captured = dir.read("logs/stdout");
    assert!(!captured.is_empty() && captured.len() <= 100_000 && captured.iter().all(|&b| b == 0));
}

#[test]
fn without_capture_the_command_inherits_the_terminal_streams() {
    // No --log-dir, no --summary: the child writes straight to our fds (no copy at all).
    let out = run_quick(&mut emissary([
        "run",
        "--",
        "sh",
        "-c",
        "readlink /proc/self/fd/1",
    ]));
    out.assert_code(0);
    assert!(out.stdout().starts_with("pipe:"), "{}", out.dump());
}
