//! The compatibility corpus (`tests/corpus/`, sources in its README): resolved templates from
//! Argo Workflows' examples, as the executor receives them. Every one parses; every one that
//! needs no cluster, image-only tool or network runs standalone with the outcome its example
//! describes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_template_of_the_corpus_parses() {
    let files = files();
    assert!(
        files.len() >= 15,
        "the corpus has only {} templates",
        files.len()
    );
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        if let Err(e) = protocol::spec::parse(&text) {
            panic!("{}: {e}", file.display());
        }
    }
    // Every file is listed in the README with its source.
    let readme = std::fs::read_to_string(corpus().join("README.md")).unwrap();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            readme.contains(&*name),
            "{name} is not in tests/corpus/README.md"
        );
    }
}

/// Runs one corpus template standalone; returns the run and its outputs.json.
fn run_template(name: &str, args: &[&str]) -> (Output, Value, Dir) {
    let (out, dir) = run_only(name, args);
    let outputs = dir.read_json("outputs.json");
    (out, outputs, dir)
}

fn run_only(name: &str, args: &[&str]) -> (Output, Dir) {
    let dir = Dir::new(&format!("corpus-{name}"));
    let mut cmd = emissary(["run", "--grace", "1s", "--template"]);
    cmd.arg(corpus().join(format!("{name}.json")))
        .arg("--out")
        .arg(dir.path())
        .args(args);
    (run(&mut cmd, b"", Duration::from_secs(30)), dir)
}

fn param<'a>(outputs: &'a Value, name: &str) -> &'a Value {
    outputs["outputs"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| &p["value"])
        .unwrap_or(&Value::Null)
}

#[test]
fn the_scripts_examples_print_their_results() {
    for name in [
        "scripts-bash--gen-random-int",
        "scripts-python--gen-random-int",
    ] {
        let (out, outputs, _) = run_template(name, &[]);
        out.assert_code(0);
        let n: u32 = outputs["outputs"]["result"]
            .as_str()
            .unwrap()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {outputs}"));
        assert!((1..=101).contains(&n), "{name}: {n}");
    }
    let (_, outputs, _) = run_template("scripts-bash--print-message", &[]);
    assert_eq!(outputs["outputs"]["result"], "result was: 42");
    let (_, outputs, _) = run_template("scripts-python--print-message", &["-p", "MESSAGE=7"]);
    assert_eq!(outputs["outputs"]["result"], "result was: 7");
    let (out, _, _) = run_template("scripts-python--print-message", &[]);
    out.assert_code(125)
        .assert_stderr_contains("inputs.parameters.MESSAGE");
}

#[test]
fn the_parameter_examples_produce_their_parameters() {
    let (out, outputs, _) = run_template("output-parameter--whalesay", &[]);
    out.assert_code(0);
    assert_eq!(param(&outputs, "hello-param"), "hello world");
    let (out, outputs, _) = run_template("output-parameter--default", &[]);
    out.assert_code(0);
    assert_eq!(param(&outputs, "hello-param"), "Foobar");
    let (_, outputs, _) = run_template("parameter-aggregation--odd-or-even", &[]);
    assert_eq!(
        (param(&outputs, "num"), param(&outputs, "evenness")),
        (&Value::from("4"), &Value::from("even"))
    );
    let (_, outputs, _) = run_template("parameter-aggregation--divide-by-2", &["-p", "num=4"]);
    assert_eq!(outputs["outputs"]["result"], "2");
    let (_, outputs, _) = run_template("handle-large-output-results--get-items", &[]);
    assert_eq!(param(&outputs, "count"), "3");
    assert_eq!(outputs["outputs"]["artifacts"][0]["name"], "items");
}

#[test]
fn the_exit_code_and_timeout_examples_end_as_argo_describes() {
    let (out, outputs, _) = run_template("exit-code-output-variable--failing-container", &[]);
    out.assert_code(123);
    assert_eq!(outputs["reason"], "Error");
    let (_, outputs, _) = run_template("exit-code-output-variable--echo-container", &[]);
    assert_eq!(outputs["outputs"]["result"], "Exit code was: 123");
    let (out, outputs, _) = run_template("timeouts-steps--sleep", &[]);
    out.assert_code(124);
    assert_eq!(outputs["reason"], "DeadlineExceeded");
    assert_eq!(outputs["outputs"]["result"], "sleeping for 1m");
    let (out, _, _) = run_template("retry-script--retry-script", &[]);
    assert!(matches!(out.code, Some(0 | 1)), "{}", out.dump());
}

#[test]
fn the_artifact_examples_stage_and_collect_their_artifacts() {
    let (out, outputs, _) = run_template("input-artifact-raw--raw-contents", &[]);
    out.assert_code(0);
    assert_eq!(
        outputs["outputs"]["result"],
        "this is\nthe raw file\ncontents"
    );

    let dir = Dir::new("corpus-artifact-inputs");
    let message = dir.write("message.txt", "hello from the store\n");
    let (out, outputs, _) = run_template(
        "artifact-passing--print-message",
        &["--input", &format!("message={}", message.display())],
    );
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["result"], "hello from the store");

    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("sub")).unwrap();
    std::fs::write(etc.join("sub/conf"), "x").unwrap();
    let hello = dir.write("hello.txt", "hello world\n");
    let (out, outputs, _) = run_template(
        "artifact-disable-archive--print-message",
        &[
            "--input",
            &format!("etc={}", etc.display()),
            "--input",
            &format!("hello-txt={}", hello.display()),
        ],
    );
    out.assert_code(0);
    assert_eq!(
        outputs["outputs"]["result"],
        "hello world\n.\n./sub\n./sub/conf"
    );
}

#[test]
fn the_work_avoidance_example_skips_work_done_before() {
    let _ = std::fs::remove_dir_all("/tmp/emissary-corpus-work");
    let (out, _, _) = run_template("work-avoidance--load-markers", &[]);
    out.assert_code(0);
    let (_, first, _) = run_template("work-avoidance--echo", &["-p", "num=1"]);
    assert_eq!(first["outputs"]["result"], "working very hard");
    let (_, second, _) = run_template("work-avoidance--echo", &["-p", "num=1"]);
    assert_eq!(second["outputs"]["result"], "work already done");
    let (out, saved, _) = run_template("work-avoidance--save-markers", &[]);
    out.assert_code(0);
    assert_eq!(saved["outputs"]["artifacts"][0]["name"], "markers");
}

#[test]
fn the_container_set_outputs_result_example_reports_main() {
    let (out, outputs, _) = run_template(
        "container-set-template--outputs-result-group",
        &["--container", "main"],
    );
    out.assert_code(0);
    assert_eq!(outputs["outputs"]["result"], "hi");
    run_template("container-set-template--outputs-result-verify", &[])
        .0
        .assert_code(0);
}

#[test]
fn image_entrypoint_containers_say_what_is_missing() {
    // argosay containers carry no command: the injector supplies their image's entrypoint.
    // Standalone, the emissary says so instead of guessing.
    let (out, dir) = run_only("container-set-template--parallel", &["--container", "a"]);
    out.assert_code(125)
        .assert_stderr_contains("has no command");
    // Only `main` reports the task; every container leaves its own summary.
    assert_eq!(
        dir.read_json("ctr/a/summary.json")["error"]["kind"],
        "system"
    );
}
