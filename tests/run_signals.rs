//! Signals: blocked before fork, forwarded to the command's whole process group; the command
//! starts with a clean mask and the caller's ignored signals still ignored.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use crate::util::*;

/// Parses a hex mask line such as `SigBlk:\t0000000000000000` from /proc/PID/status output.
fn mask(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// Signals 1..=31. glibc's posix_spawn (how the test harness starts the emissary) sets its
/// reserved real-time signals 32 and 33 to ignored; the emissary rightly passes that on.
const STANDARD: u64 = 0x7fff_ffff;

fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

#[test]
fn term_to_the_emissary_reaches_the_command() {
    let running = start(&mut emissary(["run", "--", "sleep", "30"]));
    std::thread::sleep(Duration::from_millis(200));
    running.signal(libc::SIGTERM);
    let out = running.finish(Duration::from_secs(5));
    out.assert_code(143);
    assert!(out.elapsed < Duration::from_secs(3), "{}", out.dump());
}

#[test]
fn signals_reach_grandchildren_through_the_process_group() {
    // sh waits for its child; SIGHUP must reach both (tini without -g leaves the grandchild).
    let marker = &marker(31);
    let running = start(&mut emissary([
        "run",
        "--",
        "sh",
        "-c",
        &format!("sleep {marker}; echo sh survived"),
    ]));
    assert!(wait_until(Duration::from_secs(5), || sleeps(marker).len() == 1));
    running.signal(libc::SIGHUP);
    let out = running.finish(Duration::from_secs(5));
    out.assert_code(129);
    assert!(!out.stdout().contains("survived"), "{}", out.dump());
    assert!(
        sleeps(marker).is_empty(),
        "grandchild sleep still alive{}",
        out.dump()
    );
}

#[test]
fn a_handled_signal_lets_the_command_decide_its_exit() {
    let script = r#"trap 'echo got USR1; exit 7' USR1; echo ready; while :; do sleep 0.01; done"#;
    let running = start(&mut emissary(["run", "--", "sh", "-c", script]));
    std::thread::sleep(Duration::from_millis(300));
    running.signal(libc::SIGUSR1);
    let out = running.finish(Duration::from_secs(5));
    out.assert_code(7);
    assert!(out.stdout().contains("got USR1"), "{}", out.dump());
}

#[test]
fn a_signal_sent_at_once_is_never_lost() {
    // Blocked before fork: either it kills the emissary before it starts anything (143), or it
    // waits in the signalfd and is forwarded. Never a run of the full 30 s.
    for _ in 0..50 {
        let running = start(&mut emissary(["run", "--", "sleep", "30"]));
        running.signal(libc::SIGTERM);
        let out = running.finish(Duration::from_secs(5));
        assert!(
            out.code == Some(143) || out.signal == Some(libc::SIGTERM),
            "{}",
            out.dump()
        );
    }
}

#[test]
fn the_command_gets_a_clean_mask_and_keeps_ignored_signals() {
    let mut cmd = emissary(["run", "--", "cat", "/proc/self/status"]);
    // The caller blocks USR2 and ignores INT, QUIT and PIPE, as a shell running a background
    // job might.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            for signal in [libc::SIGINT, libc::SIGQUIT, libc::SIGPIPE] {
                libc::signal(signal, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let out = run_quick(&mut cmd);
    out.assert_code(0);
    let status = out.stdout();
    assert_eq!(
        mask(&status, "SigBlk:"),
        0,
        "the child's mask must be empty{}",
        out.dump()
    );
    let ignored = bit(libc::SIGINT) | bit(libc::SIGQUIT) | bit(libc::SIGPIPE);
    assert_eq!(
        mask(&status, "SigIgn:") & STANDARD,
        ignored,
        "ignored signals must stay ignored{}",
        out.dump()
    );
}

#[test]
fn nothing_is_ignored_that_the_caller_did_not_ignore() {
    // Rust's runtime ignores SIGPIPE at startup; the emissary must not pass that on.
    let mut cmd = emissary(["run", "--", "cat", "/proc/self/status"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    let out = run_quick(&mut cmd);
    assert_eq!(
        mask(&out.stdout(), "SigIgn:") & STANDARD,
        0,
        "{}",
        out.dump()
    );
}

#[test]
fn the_command_leads_its_own_process_group() {
    let running = start(&mut emissary([
        "run",
        "--",
        "sh",
        "-c",
        "cat /proc/$$/stat",
    ]));
    let emissary_pid = running.pid();
    let out = running.finish(Duration::from_secs(5));
    out.assert_code(0);
    let stat = out.stdout();
    let pid: u32 = stat.split_whitespace().next().unwrap().parse().unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let (ppid, pgrp): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    assert_eq!(ppid, emissary_pid);
    assert_eq!(pgrp, pid, "the command must lead its own group");
}

#[test]
fn stop_signals_stop_the_group_but_not_the_emissary() {
    let marker = &marker(41);
    let running = start(&mut emissary(["run", "--", "sleep", marker]));
    assert!(wait_until(Duration::from_secs(5), || sleeps(marker).len() == 1));
    let sleeper = sleeps(marker)[0];
    running.signal(libc::SIGTSTP);
    assert!(
        wait_until(Duration::from_secs(5), || proc_state(sleeper) == Some('T')),
        "TSTP not forwarded"
    );
    assert_ne!(
        proc_state(running.pid()),
        Some('T'),
        "the emissary itself must keep running"
    );
    running.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(5), || proc_state(sleeper) == Some('S')),
        "CONT not forwarded: sleep {:?}, emissary {:?}",
        proc_state(sleeper),
        proc_state(running.pid())
    );
    running.signal(libc::SIGTERM);
    running.finish(Duration::from_secs(5)).assert_code(143);
}

#[test]
fn emissary_signal_reaches_the_run_through_its_log_dir() {
    let dir = Dir::new("signal-fifo");
    let logs = dir.join("logs");
    let script = r#"trap 'echo got USR1; exit 9' USR1; while :; do sleep 0.01; done"#;
    let running = start(&mut emissary([
        "run",
        "--log-dir",
        logs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]));
    assert!(wait_until(Duration::from_secs(5), || logs
        .join("signal")
        .exists()));
    std::thread::sleep(Duration::from_millis(100));
    run_quick(&mut emissary([
        "signal",
        "--dir",
        logs.to_str().unwrap(),
        "USR1",
    ]))
    .assert_code(0);
    let out = running.finish(Duration::from_secs(5));
    out.assert_code(9);
    assert!(out.stdout().contains("got USR1"), "{}", out.dump());
    assert!(
        !logs.join("signal").exists(),
        "the FIFO is removed when the run ends"
    );

    run_quick(&mut emissary([
        "signal",
        "--dir",
        logs.to_str().unwrap(),
        "TERM",
    ]))
    .assert_code(125)
    .assert_stderr_contains("no emissary run is listening");
}

#[test]
fn sigkill_of_the_emissary_takes_the_command_with_it() {
    let marker = &marker(47);
    let running = start(&mut emissary(["run", "--", "sleep", marker]));
    assert!(wait_until(Duration::from_secs(5), || sleeps(marker).len() == 1));
    running.signal(libc::SIGKILL);
    running.finish(Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(5), || sleeps(marker).is_empty()),
        "orphaned command"
    );
}
