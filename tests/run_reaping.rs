//! Reaping: as a child subreaper and as PID 1, every orphan is collected, even in a storm;
//! when the command exits, what it left behind is ended (TERM, then KILL after --grace).

use std::time::Duration;

use crate::util::*;

#[test]
fn a_storm_of_orphans_is_reaped_as_a_subreaper() {
    // 500 subshells each leave an orphaned sleep behind; all the sleeps end together at ~0.5 s
    // (one burst of coalesced SIGCHLDs). The command lives on until 1.5 s, so the emissary
    // must reap the storm while still supervising.
    let script = "for i in $(seq 500); do (sleep 0.5 &); done; sleep 1.5";
    let running = start(&mut emissary(["run", "--", "sh", "-c", script]));
    let pid = running.pid();
    std::thread::sleep(Duration::from_millis(1100));
    // On a loaded machine the last sleeps start late and end around now: one seen between its
    // exit and its reaping is no leak. One still there 300 ms later, with no other child
    // exiting to wake the emissary, is.
    let mut zombies = 0;
    wait_until(Duration::from_millis(300), || {
        zombies = zombie_children(pid);
        zombies == 0
    });
    let out = running.finish(Duration::from_secs(10));
    out.assert_code(0);
    assert_eq!(zombies, 0, "zombies left under the emissary{}", out.dump());
}

#[test]
fn leftovers_get_term_when_the_command_exits() {
    let marker = &marker(53);
    let out = run_quick(&mut emissary([
        "run",
        "--",
        "sh",
        "-c",
        &format!("sleep {marker} & exit 5"),
    ]));
    out.assert_code(5);
    assert!(out.elapsed < Duration::from_secs(3), "{}", out.dump());
    assert!(
        sleeps(marker).is_empty(),
        "background sleep survived{}",
        out.dump()
    );
}

#[test]
fn leftovers_that_ignore_term_are_killed_after_the_grace_period() {
    let dir = Dir::new("leftovers-ignore-term");
    let marker = &marker(57);
    // One leftover stays in the group, one escapes it with setsid; the command exits only
    // once both ignore TERM (each touches a ready file after its trap).
    let ready = |n: u32| dir.join(format!("ready{n}")).display().to_string();
    let script = format!(
        "(trap '' TERM; : > {r1}; exec sleep {marker}) & \
         setsid sh -c 'trap \"\" TERM; : > {r2}; sleep {marker}' & \
         while [ ! -e {r1} ] || [ ! -e {r2} ]; do sleep 0.01; done; exit 0",
        r1 = ready(1),
        r2 = ready(2)
    );
    let out = run_quick(&mut emissary([
        "run", "--grace", "700ms", "--", "sh", "-c", &script,
    ]));
    out.assert_code(0);
    assert!(
        out.elapsed >= Duration::from_millis(650),
        "KILL came before the grace ended{}",
        out.dump()
    );
    assert!(out.elapsed < Duration::from_secs(5), "{}", out.dump());
    assert!(
        sleeps(marker).is_empty(),
        "a leftover survived{}",
        out.dump()
    );
}

#[test]
fn a_background_process_holding_stdout_does_not_hang_the_run() {
    let dir = Dir::new("holding-stdout");
    let logs = dir.join("logs");
    let marker = &marker(59);
    let script = format!("(trap '' TERM; sleep {marker}) & echo done");
    let out = run_quick(&mut emissary([
        "run",
        "--grace",
        "300ms",
        "--log-dir",
        logs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]));
    out.assert_code(0);
    assert_eq!(out.stdout(), "done\n");
    assert!(out.elapsed < Duration::from_secs(5), "{}", out.dump());
    assert_eq!(dir.read_string("logs/stdout"), "done\n");
}

#[test]
fn as_pid_1_in_a_new_pid_namespace_orphans_are_reaped() {
    if !is_root() {
        eprintln!("skipped: needs root for unshare --pid");
        return;
    }
    // Inside, the emissary is PID 1: the orphaned sleep is re-parented to it and must not stay
    // a zombie. The script counts zombies from inside the namespace.
    let script = r#"
        (sleep 0.2 &)
        sleep 0.8
        zombies=0
        for f in /proc/[0-9]*/stat; do
            set -- $(cat "$f" 2>/dev/null | sed 's/.*) //')
            [ "$1" = Z ] && zombies=$((zombies + 1))
        done
        echo "pid1=$(cat /proc/1/comm) zombies=$zombies"
        exit 3
    "#;
    let emissary = emissary_bin();
    let out = run_quick(
        default_signals(&mut std::process::Command::new("unshare"))
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(&emissary)
            .args(["run", "--", "sh", "-c", script]),
    );
    out.assert_code(3);
    assert_eq!(
        out.stdout().trim(),
        "pid1=emissary zombies=0",
        "{}",
        out.dump()
    );
}
