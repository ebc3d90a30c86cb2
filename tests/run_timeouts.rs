//! Deadlines: TERM to the group at the deadline, KILL after grace, exit 124.

use std::time::Duration;

use crate::util::*;

#[test]
fn the_deadline_stops_the_command_with_124() {
    let dir = Dir::new("deadline");
    let summary = dir.join("s.json");
    let out = run_quick(&mut emissary([
        "run",
        "--deadline",
        "300ms",
        "--summary",
        summary.to_str().unwrap(),
        "--",
        "sleep",
        "30",
    ]));
    out.assert_code(124);
    assert!(
        out.elapsed >= Duration::from_millis(290) && out.elapsed < Duration::from_secs(3),
        "{}",
        out.dump()
    );
    let json = dir.read_json("s.json");
    assert_eq!(json["reason"], "DeadlineExceeded");
    assert_eq!(json["exit_code"], 124);
    assert_eq!(json["signal"], libc::SIGTERM);
}

#[test]
fn a_command_ignoring_term_is_killed_after_the_grace() {
    let marker = &marker(61);
    let script = format!("trap '' TERM; sleep {marker}; echo unreachable");
    let out = run_quick(&mut emissary([
        "run",
        "--deadline",
        "200ms",
        "--grace",
        "400ms",
        "--",
        "sh",
        "-c",
        &script,
    ]));
    out.assert_code(124);
    assert!(out.elapsed >= Duration::from_millis(580), "{}", out.dump());
    assert!(out.elapsed < Duration::from_secs(4), "{}", out.dump());
    assert!(sleeps(marker).is_empty(), "{}", out.dump());
}

#[test]
fn a_command_that_finishes_in_time_keeps_its_code() {
    run_quick(&mut emissary([
        "run",
        "--deadline",
        "10s",
        "--",
        "sh",
        "-c",
        "exit 4",
    ]))
    .assert_code(4);
}

#[test]
fn a_duration_past_any_clock_is_a_usage_error_not_a_crash() {
    for flag in ["--deadline", "--grace"] {
        run_quick(&mut emissary([
            "run",
            flag,
            "4000000000000000h",
            "--",
            "true",
        ]))
        .assert_code(125)
        .assert_stderr_contains("longer than 100 years");
    }
}

#[test]
fn a_stopped_command_is_continued_so_it_can_act_on_term() {
    let out = run_quick(&mut emissary([
        "run",
        "--deadline",
        "300ms",
        "--grace",
        "10s",
        "--",
        "sh",
        "-c",
        "kill -STOP $$",
    ]));
    out.assert_code(124);
    assert!(out.elapsed < Duration::from_secs(3), "{}", out.dump());
}
