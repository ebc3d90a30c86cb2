//! `make bench`: the emissary measured against its anchors in one run, interleaved, medians.
//!
//! This is a 2-core VM where exec latency drifts ~15 % over minutes and throughput 2-4x run to
//! run, so every comparison runs its candidates round-robin in the same loop and reports the
//! median; only ratios within one run mean anything.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

fn main() {
    let emissary =
        PathBuf::from(env::var("EMISSARY_BIN").expect("EMISSARY_BIN: the static emissary"));
    let scratch = env::temp_dir().join(format!("emissary-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let only: Vec<String> = env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);

    let mut report = String::new();
    writeln!(report, "| benchmark | result | anchor | ratio | goal |").unwrap();
    writeln!(report, "|---|---|---|---|---|").unwrap();
    if wanted("size") {
        size(&emissary, &mut report);
    }
    if wanted("exec") {
        exec_overhead(&emissary, &mut report);
    }
    if wanted("rss") {
        peak_rss(&emissary, &mut report);
    }
    if wanted("logs") {
        log_throughput(&emissary, &scratch, &mut report);
    }
    let _ = fs::remove_dir_all(&scratch);
    println!("\n{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-latest.md");
    fs::write(&out, &report).unwrap();
    eprintln!("(also written to {})", out.display());
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn shell(script: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", script]);
    cmd
}

/// Runs `cmd` with output discarded; returns wall time. Panics on failure: a benchmark of a
/// failing command measures nothing.
fn time_it(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let elapsed = start.elapsed();
    assert!(status.success(), "{cmd:?} failed: {status}");
    elapsed
}

/// Round-robin over `candidates`, `rounds` times after `warmup` rounds; per-candidate samples.
fn interleaved(candidates: &mut [Command], warmup: usize, rounds: usize) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::with_capacity(rounds); candidates.len()];
    for round in 0..warmup + rounds {
        for (i, cmd) in candidates.iter_mut().enumerate() {
            let t = time_it(cmd).as_secs_f64();
            if round >= warmup {
                samples[i].push(t);
            }
        }
    }
    samples
}

fn size(emissary: &Path, report: &mut String) {
    let bytes = fs::metadata(emissary).unwrap().len();
    let tini = fs::metadata("/usr/bin/tini-static")
        .map(|m| m.len())
        .unwrap_or(0);
    writeln!(
        report,
        "| static emissary size | {:.2} MB ({bytes} B) | tini-static {:.2} MB | {:.2}× | ≤ 2 MB |",
        bytes as f64 / 1e6,
        tini as f64 / 1e6,
        bytes as f64 / tini.max(1) as f64
    )
    .unwrap();
}

fn exec_overhead(emissary: &Path, report: &mut String) {
    let mut candidates = [
        Command::new("/bin/true"),
        {
            let mut c = Command::new(emissary);
            c.args(["run", "--", "/bin/true"]);
            c
        },
        {
            let mut c = Command::new("/usr/bin/tini-static");
            c.args(["-s", "/bin/true"]);
            c
        },
    ];
    let samples = interleaved(&mut candidates, 100, 2000);
    let [bare, ours, tini] = [0, 1, 2].map(|i| median(samples[i].clone()) * 1e6);
    let (ours_over, tini_over) = (ours - bare, tini - bare);
    writeln!(
        report,
        "| wrap overhead, `emissary run -- /bin/true` minus `/bin/true` (median of 2000, interleaved) | {ours_over:.0} µs | tini-static -s: {tini_over:.0} µs (bare /bin/true {bare:.0} µs) | {:.2}× | ≤ 1.0× |",
        ours_over / tini_over
    )
    .unwrap();
}

/// The wrapper's own VmHWM while it supervises `sleep`, median of 7 runs.
fn peak_rss(emissary: &Path, report: &mut String) {
    let measure = |program: &Path, args: &[&str]| {
        let mut kbs = Vec::new();
        for _ in 0..7 {
            let mut child = Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            thread::sleep(Duration::from_millis(150));
            let status = fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
            let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
            kbs.push(
                hwm.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<f64>()
                    .unwrap(),
            );
            child.wait().unwrap();
        }
        median(kbs)
    };
    let ours = measure(emissary, &["run", "--", "sleep", "0.3"]);
    let ours_logs = measure(
        emissary,
        &[
            "run",
            "--log-dir",
            "/tmp/emissary-bench-rss",
            "--",
            "sleep",
            "0.3",
        ],
    );
    let tini = measure(Path::new("/usr/bin/tini-static"), &["-s", "sleep", "0.3"]);
    let _ = fs::remove_dir_all("/tmp/emissary-bench-rss");
    writeln!(
        report,
        "| own peak RSS (VmHWM) supervising `sleep` | {:.2} MB ({:.2} MB with --log-dir) | tini-static {:.2} MB | {:.2}× | ≤ 1.5 MB |",
        ours / 1024.0,
        ours_logs / 1024.0,
        tini / 1024.0,
        ours / tini
    )
    .unwrap();
}

/// 1 GiB through the log capture vs coreutils tee doing the same work.
fn log_throughput(emissary: &Path, scratch: &Path, report: &mut String) {
    let gib = 1u64 << 30;
    let producer = format!("head -c {gib} /dev/zero");
    let logs = scratch.join("logs");
    let tee_dir = scratch.join("tee");
    fs::create_dir_all(&tee_dir).unwrap();
    let mut candidates = [
        shell(&format!(
            "{} run --log-dir {} -- {producer} > /dev/null",
            emissary.display(),
            logs.display()
        )),
        shell(&format!(
            "{producer} | tee {0}/stdout {0}/combined > /dev/null",
            tee_dir.display()
        )),
    ];
    let samples = interleaved(&mut candidates, 1, 5);
    let [ours, tee] = [0, 1].map(|i| gib as f64 / median(samples[i].clone()) / 1e9);
    writeln!(
        report,
        "| log capture, 1 GiB `head -c` → `--log-dir` files, stdout to /dev/null (median of 5) | {ours:.2} GB/s | coreutils tee to 2 files: {tee:.2} GB/s | {:.2}× | ≥ 1.3× |",
        ours / tee
    )
    .unwrap();
}
