//! The command line: bad input is a usage error (exit 125) and starts nothing.

use crate::util::*;

#[track_caller]
fn assert_usage_error(args: &[&str], marker: &std::path::Path) {
    let out = run_quick(&mut emissary(args));
    out.assert_code(125);
    assert!(
        out.stderr().contains("error:") || out.stderr().contains("Usage"),
        "{}",
        out.dump()
    );
    assert!(!marker.exists(), "a child was started for {args:?}");
}

#[test]
fn bad_input_is_a_usage_error_and_starts_nothing() {
    let dir = Dir::new("usage");
    let marker = dir.join("started");
    let touch = format!("touch {}", marker.display());
    assert_usage_error(&["run", "--bogus", "--", "sh", "-c", &touch], &marker);
    assert_usage_error(
        &["run", "--deadline", "5x", "--", "sh", "-c", &touch],
        &marker,
    );
    assert_usage_error(
        &["run", "--deadline", "30", "--", "sh", "-c", &touch],
        &marker,
    );
    assert_usage_error(&["run", "--grace", "", "--", "sh", "-c", &touch], &marker);
    assert_usage_error(&["run"], &marker);
    assert_usage_error(&["run", "--"], &marker);
    assert_usage_error(&["run", "--log-dir"], &marker);
    assert_usage_error(&["frobnicate"], &marker);
    assert_usage_error(&[], &marker);
    assert_usage_error(&["signal", "--dir", "/tmp", "NOSUCHSIG"], &marker);
    assert_usage_error(&["version", "--bogus"], &marker);
    assert_usage_error(&["version", "--"], &marker);
}

#[test]
fn task_options_without_a_task_spec_are_refused_not_ignored() {
    let dir = Dir::new("usage-task-only");
    let marker = dir.join("started");
    let touch = format!("touch {}", marker.display());
    let out_dir = dir.join("out").display().to_string();
    for (option, value, named) in [
        ("--out", out_dir.as_str(), "--out"),
        ("-p", "name=value", "--param"),
        ("--input", "data=/etc/hostname", "--input"),
        ("--container", "main", "--container"),
    ] {
        let out = run_quick(&mut emissary([
            "run", option, value, "--", "sh", "-c", &touch,
        ]));
        out.assert_code(125)
            .assert_stderr_contains(&format!("{named} needs a task spec"));
        assert!(!marker.exists(), "the command ran{}", out.dump());
    }
    assert!(
        !dir.join("out").exists(),
        "--out wrote something without a spec"
    );
}

#[test]
fn the_duration_error_names_the_bad_value() {
    run_quick(&mut emissary([
        "run",
        "--deadline",
        "12parsecs",
        "--",
        "true",
    ]))
    .assert_code(125)
    .assert_stderr_contains("\"12parsecs\"");
}

#[test]
fn help_explains_and_exits_zero() {
    let out = run_quick(&mut emissary(["run", "--help"]));
    out.assert_code(0);
    for word in [
        "--deadline",
        "--grace",
        "--log-dir",
        "--summary",
        "124",
        "127",
    ] {
        assert!(
            out.stdout().contains(word),
            "help lacks {word}{}",
            out.dump()
        );
    }
    run_quick(&mut emissary(["--help"])).assert_code(0);
}

#[test]
fn options_may_be_followed_by_the_command_without_a_double_dash() {
    let out = run_quick(&mut emissary([
        "run",
        "--grace",
        "1s",
        "sh",
        "-c",
        "echo $0 $1",
        "a",
        "-x",
    ]));
    out.assert_code(0);
    assert_eq!(out.stdout(), "a -x\n");
}

#[test]
fn version_names_commit_target_and_linkage() {
    let out = run_quick(&mut emissary(["version"]));
    out.assert_code(0);
    let text = out.stdout();
    assert!(text.starts_with("emissary "), "{}", out.dump());
    assert!(
        text.contains("commit ") && text.contains("linux"),
        "{}",
        out.dump()
    );
    assert!(
        text.contains("static") || text.contains("dynamic"),
        "{}",
        out.dump()
    );
}

#[test]
fn nul_free_arguments_reach_the_command_exactly() {
    let tricky = ["", " spaced ", "ünïcödé", "$HOME", "'quoted'", "-n", "--"];
    let mut args = vec![
        "run",
        "--",
        "sh",
        "-c",
        r#"for a in "$@"; do printf '[%s]' "$a"; done"#,
        "sh",
    ];
    args.extend(tricky);
    let out = run_quick(&mut emissary(&args));
    out.assert_code(0);
    let expected: String = tricky.iter().map(|a| format!("[{a}]")).collect();
    assert_eq!(out.stdout(), expected);
}
