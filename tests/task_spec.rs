//! Task specs: where they come from, parameters, scripts, and what a bad spec does.

use std::time::Duration;

use serde_json::json;

use crate::util::*;

/// Runs `spec` standalone with `--out DIR/out`; returns the run and outputs.json.
pub fn run_spec(
    dir: &Dir,
    spec: &serde_json::Value,
    extra: &[&str],
) -> (Output, serde_json::Value) {
    let spec_path = dir.write("spec.json", serde_json::to_vec(spec).unwrap());
    let out = dir.join("out");
    let mut cmd = emissary([
        "run",
        "--template",
        spec_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    cmd.args(extra);
    let output = run(&mut cmd, b"", Duration::from_secs(30));
    let outputs = std::fs::read(out.join("outputs.json"))
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_else(|e| panic!("no outputs.json ({e}){}", output.dump()));
    (output, outputs)
}

#[test]
fn a_container_template_runs_its_command_with_its_env_and_working_dir() {
    let dir = Dir::new("spec-container");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let spec = json!({
        "name": "hello", "metadata": {"labels": {"x": "y"}}, "futureArgoField": {"a": 1},
        "container": {"image": "alpine", "command": ["sh", "-c"],
                      "args": ["echo \"$GREETING from $(pwd)\"; [ -z \"$EMISSARY_TOKEN\" ] && echo no-token"],
                      "env": [{"name": "GREETING", "value": "hello"}, {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {}}}],
                      "workingDir": work.to_str().unwrap()}
    });
    let spec_path = dir.write("spec.json", serde_json::to_vec(&spec).unwrap());
    let out_dir = dir.join("out");
    let out = run_quick(
        emissary([
            "run",
            "--template",
            spec_path.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ])
        .env("EMISSARY_TOKEN", "secret-token"),
    );
    out.assert_code(0);
    assert_eq!(
        out.stdout(),
        format!("hello from {}\nno-token\n", work.display())
    );
    let outputs = dir.read_json("out/outputs.json");
    assert_eq!(outputs["reason"], "Completed");
    assert_eq!(
        outputs["outputs"]["result"],
        format!("hello from {}\nno-token", work.display())
    );
    assert_eq!(dir.read_string("out/ctr/main/exitcode"), "0");
    assert_eq!(dir.read_json("out/ctr/main/summary.json")["exit_code"], 0);
}

#[test]
fn a_script_template_runs_its_source_with_its_command() {
    let dir = Dir::new("spec-script");
    let spec = json!({"script": {"image": "python", "command": ["python3"],
                                  "source": "import sys\nprint('from python', sys.argv[0].endswith('script'))"}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["result"], "from python True");

    // Without a command, Argo's default is sh.
    let dir = Dir::new("spec-script-sh");
    let spec = json!({"script": {"image": "alpine", "source": "echo from sh; exit 3"}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(3);
    assert_eq!(outputs["exit_code"], 3);
    assert_eq!(outputs["reason"], "Error");
    assert_eq!(outputs["error"]["kind"], "user");
    assert_eq!(outputs["outputs"]["result"], "from sh");

    // Another spec run in the same place runs its own script, not the one left there.
    let spec = json!({"script": {"image": "alpine", "source": "echo second"}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["result"], "second");
}

#[test]
fn parameters_are_substituted_and_unresolved_ones_are_named() {
    let dir = Dir::new("spec-params");
    let spec = json!({
        "inputs": {"parameters": [{"name": "who"}, {"name": "times", "value": "2"}]},
        "container": {"command": ["sh", "-c", "for i in $(seq {{inputs.parameters.times}}); do echo {{inputs.parameters.who}}; done"]}
    });
    let (out, _) = run_spec(&dir, &spec, &["-p", "who=world"]);
    out.assert_code(0);
    assert_eq!(out.stdout(), "world\nworld\n");
    let (out, _) = run_spec(&dir, &spec, &["-p", "who=x", "-p", "times=3"]);
    assert_eq!(out.stdout(), "x\nx\nx\n");

    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(125)
        .assert_stderr_contains("container.command[2]")
        .assert_stderr_contains("inputs.parameters.who");
    assert_eq!(outputs["reason"], "StartFailed");
    assert_eq!(outputs["error"]["kind"], "system");
    assert_eq!(outputs["error"]["retryable"], false);
}

#[test]
fn a_mistyped_spec_is_rejected_with_the_json_path() {
    let dir = Dir::new("spec-bad-type");
    let spec = json!({"container": {"command": ["true"]},
                      "outputs": {"artifacts": [{"name": "a", "path": "/tmp/a"}, {"name": "b", "path": 7}]}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(125)
        .assert_stderr_contains("outputs.artifacts[1].path");
    assert!(
        outputs["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outputs.artifacts[1].path")
    );
    assert_eq!(dir.read_string("out/ctr/main/exitcode"), "125");

    let spec_path = dir.write("broken.json", "{\"container\": ");
    run_quick(&mut emissary([
        "run",
        "--template",
        spec_path.to_str().unwrap(),
        "--out",
        dir.join("o2").to_str().unwrap(),
    ]))
    .assert_code(125)
    .assert_stderr_contains("not valid JSON");
}

#[test]
fn the_spec_comes_from_the_environment_inline_or_from_a_file() {
    let dir = Dir::new("spec-env");
    let spec = json!({"container": {"command": ["echo", "from env"]}}).to_string();
    let path = dir.write("t.json", &spec);
    let root = dir.join("root");
    for (var, value) in [
        ("EMISSARY_TEMPLATE", spec.clone()),
        ("EMISSARY_TEMPLATE", format!("@{}", path.display())),
        ("ARGO_TEMPLATE", spec.clone()),
    ] {
        let out = run_quick(emissary(["run", "--root", root.to_str().unwrap()]).env(var, &value));
        out.assert_code(0);
        assert_eq!(out.stdout(), "from env\n", "{var}={value}{}", out.dump());
    }
    // Argo's container name variable picks the log directory.
    run_quick(
        emissary(["run", "--root", root.to_str().unwrap()])
            .env("EMISSARY_TEMPLATE", &spec)
            .env("ARGO_CONTAINER_NAME", "main"),
    )
    .assert_code(0);
    assert!(root.join("ctr/main/stdout").exists());
    run_quick(
        emissary(["run", "--root", root.to_str().unwrap()])
            .env("EMISSARY_TEMPLATE", "@/no/such/spec.json"),
    )
    .assert_code(125)
    .assert_stderr_contains("/no/such/spec.json");
}

#[test]
fn active_deadline_seconds_stops_the_step_and_outputs_are_still_written() {
    let dir = Dir::new("spec-deadline");
    let spec = json!({"activeDeadlineSeconds": 1,
                      "container": {"command": ["sh", "-c", "echo partial > /dev/null; echo started; sleep 30"]},
                      "outputs": {"parameters": [{"name": "p", "valueFrom": {"path": "/nonexistent/p", "default": "d"}}]}});
    let (out, outputs) = run_spec(&dir, &spec, &["--grace", "200ms"]);
    out.assert_code(124);
    assert!(out.elapsed < Duration::from_secs(5), "{}", out.dump());
    assert_eq!(outputs["reason"], "DeadlineExceeded");
    assert_eq!(outputs["outputs"]["parameters"][0]["value"], "d");
    assert_eq!(outputs["outputs"]["result"], "started");
}

#[test]
fn an_active_deadline_of_the_largest_integer_means_no_deadline() {
    let dir = Dir::new("spec-deadline-max");
    let spec = json!({"activeDeadlineSeconds": i64::MAX, "container": {"command": ["echo", "hi"]}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["result"], "hi");
}

#[test]
fn an_rfc3339_deadline_from_the_environment_is_honoured() {
    let dir = Dir::new("spec-env-deadline");
    let soon = std::time::SystemTime::now() + Duration::from_millis(700);
    let secs = soon
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // RFC 3339 via date(1), to keep the test free of a date library.
    let stamp = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{secs:.3}"),
            "+%Y-%m-%dT%H:%M:%S.%3NZ",
        ])
        .output()
        .unwrap();
    let stamp = String::from_utf8(stamp.stdout).unwrap().trim().to_owned();
    let spec = json!({"container": {"command": ["sleep", "30"]}}).to_string();
    let out = run_quick(
        emissary([
            "run",
            "--grace",
            "100ms",
            "--root",
            dir.path().to_str().unwrap(),
        ])
        .env("EMISSARY_TEMPLATE", &spec)
        .env("ARGO_DEADLINE", &stamp),
    );
    out.assert_code(124);
    assert!(out.elapsed < Duration::from_secs(4), "{}", out.dump());
}

#[test]
fn progress_written_by_the_step_is_reported() {
    let dir = Dir::new("spec-progress");
    let spec = json!({"container": {"command": ["sh", "-c", "echo 1/4 > $ARGO_PROGRESS_FILE; echo 3/4 > $EMISSARY_PROGRESS_FILE"]}});
    let (out, outputs) = run_spec(&dir, &spec, &[]);
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["progress"], "3/4");
}
