//! Template mode: `emissary run` driven by a task spec.
//!
//! Spec → dependencies (containerSet) → inputs → the command, supervised → outputs → report.
//! Every path after the spec is loaded ends in a report: `ROOT/ctr/NAME/summary.json` and
//! `exitcode` always, and, from the container that owns the task's outputs (`main`, or the
//! only container), `ROOT/outputs.json`. A failed step still reports what it has.
//!
//! Layout under ROOT (`--out DIR`, `--root DIR`, `EMISSARY_ROOT`, default `/var/run/emissary`):
//! `ctr/NAME/{stdout,stderr,combined,exitcode,summary.json,signal,progress}` (`ctr/NAME` made by
//! this container's own emissary), `inputs/` and `inputs.sha256/` (staged by `emissary init`),
//! `script`, `artifacts/` (the local store), `outputs.json`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use protocol::api::{self, Outputs, TaskResult};
use protocol::spec::{Container, Template};
use protocol::{ExitReason, TaskError, exit, time};

use crate::env_any;
use crate::fsutil::{write_atomic, write_atomic_mode};
use crate::process::run::{self, Fatal, Job, LogDir, Outcome, RunOptions};
use crate::process::spawn::Program;
use crate::task::deps::{self, Waited};
use crate::task::inputs::{self, Sources};
use crate::task::outputs;
use crate::task::template;
use crate::transfer::agent::Agent;
use crate::transfer::archive::{self, Limits};
use crate::transfer::cancel;
use crate::transfer::store::{LocalStore, Store};

/// Where the shared volume is mounted in a pod.
pub const DEFAULT_ROOT: &str = "/var/run/emissary";

/// The container that owns a task's inputs and outputs (Argo's convention).
const MAIN: &str = "main";

/// How the task contract meets the pod: our injector's layout, or Argo's (`crate::argo`).
pub struct Layout {
    /// Inputs are staged by this container (not when an init container put them in place).
    pub stage_inputs: bool,
    pub naming: outputs::Naming,
    /// The exit code of the emissary's own failures (ours 125, Argo's 64), and the file the
    /// message goes to (Argo's `/dev/termination-log`, shown in the node's status).
    pub failure_code: i32,
    pub termination_log: Option<PathBuf>,
    /// The node agent, when the caller found it; else the environment names it (or none).
    pub agent: Option<Agent>,
}

impl Layout {
    pub fn ours() -> Layout {
        Layout {
            stage_inputs: true,
            naming: outputs::Naming::Ours,
            failure_code: exit::EMISSARY_FAILED,
            termination_log: None,
            agent: None,
        }
    }
}

pub fn run(opts: &RunOptions) -> Result<i32, Fatal> {
    run_as(opts, Layout::ours())
}

pub fn run_as(opts: &RunOptions, mut layout: Layout) -> Result<i32, Fatal> {
    let signals = run::prepare()?;
    let root = root_dir(opts);
    let name = opts
        .container
        .clone()
        .or_else(|| env_any(&["EMISSARY_CONTAINER_NAME", "ARGO_CONTAINER_NAME"]))
        .unwrap_or_else(|| MAIN.to_owned());
    if !protocol::api::valid_name(&name) {
        return Err(Fatal(format!(
            "container name {name:?} is not a name of [A-Za-z0-9._-]"
        )));
    }
    let ctr_root = root.join("ctr");
    crate::fsutil::own_dir(&ctr_root.join(&name)).map_err(Fatal)?;
    let mut logs = LogDir::create(&ctr_root.join(&name))?;
    cancel::arm(signals.as_fd(), Some(logs.control_fd()));
    let mut task = Task {
        root: root.clone(),
        name,
        owns_outputs: true,
        json: Vec::new(),
        staged: Vec::new(),
        agent: layout.agent.take(),
        result_from: 0,
        layout,
    };

    let loaded = match template::load(opts.template.as_deref(), &opts.params) {
        Ok(loaded) => loaded,
        Err(message) => return task.refuse(&logs, None, TaskError::system(message, false)),
    };
    task.json = loaded.json;
    let template = loaded.template;
    let (container, dependencies) = match select(&template, &task.name) {
        Ok(selected) => selected,
        Err(message) => return task.refuse(&logs, None, TaskError::system(message, false)),
    };
    task.owns_outputs = template.container_set.is_none() || task.name == MAIN;
    if task.agent.is_none() {
        match Agent::from_env() {
            None => {}
            Some(Ok(agent)) => task.agent = Some(agent),
            Some(Err(message)) => {
                return task.refuse(&logs, None, TaskError::system(message, false));
            }
        }
    }

    // The deadline runs from the start, dependencies and input staging included.
    let deadline = match deadline(opts, &template) {
        Ok(deadline) => deadline,
        Err(Fatal(message)) => {
            return task.refuse(&logs, Some(&template), TaskError::system(message, false));
        }
    };
    let waited = match deps::wait(
        &ctr_root,
        &dependencies,
        &signals,
        deadline,
        task.agent.as_ref(),
    ) {
        Ok(waited) => waited,
        Err(message) => {
            return task.refuse(&logs, Some(&template), TaskError::system(message, true));
        }
    };
    match waited {
        Waited::Ready => {}
        Waited::TimedOut => {
            let error =
                TaskError::user("the deadline passed while waiting for dependencies", false);
            let mut outcome = not_started(exit::DEADLINE_EXCEEDED, error);
            outcome.reason = ExitReason::DeadlineExceeded;
            return task.report(&logs, outcome, Some(&template), None);
        }
        Waited::Failed(dep, code) => {
            let message = format!("skipped: dependency {dep:?} failed with exit code {code}");
            return task.refuse(&logs, Some(&template), TaskError::user(message, false));
        }
        Waited::Interrupted(signal) => {
            let error = TaskError::user("stopped while waiting for dependencies", false);
            let mut outcome = not_started(exit::for_signal(signal), error);
            outcome.reason = ExitReason::Signaled;
            outcome.signal = Some(signal);
            return task.report(&logs, outcome, Some(&template), None);
        }
    }

    if let Some(agent) = &task.agent {
        if let Err(message) = agent.start(&task.name) {
            return task.refuse(&logs, Some(&template), TaskError::system(message, true));
        }
        // From now on: a terminate stops input staging as it stops the command.
        match logs.control_sender() {
            Ok(control) => agent.relay_commands(&task.name, control),
            Err(e) => crate::note!("emissary: cannot relay the agent's commands: {e}"),
        }
    }
    if task.owns_outputs && task.layout.stage_inputs {
        let local = opts.store.as_deref().map(LocalStore::new);
        let store: Option<&dyn Store> = match &task.agent {
            Some(agent) => Some(agent),
            None => local.as_ref().map(|s| s as &dyn Store),
        };
        let sources = Sources {
            overrides: &opts.inputs,
            staged: Some(root.join("inputs")),
            store,
            limits: limits_from_env(),
        };
        match cancel::watching(|| inputs::stage_all(&template, &sources)) {
            (_, Some(signal)) => {
                let error = TaskError::user("stopped while staging inputs", false);
                let outcome = stopped(exit::for_signal(signal), signal, error);
                return task.report(&logs, outcome, Some(&template), None);
            }
            (Ok(staged), None) => task.staged = staged,
            (Err(e), None) => {
                let error = if e.system {
                    TaskError::system(e.message, true)
                } else {
                    TaskError::user(e.message, false)
                };
                return task.refuse(&logs, Some(&template), error);
            }
        }
    }

    let program = match task.program(opts, &template, &container, &logs.dir) {
        Ok(program) => program,
        Err(message) => {
            return task.refuse(&logs, Some(&template), TaskError::system(message, false));
        }
    };
    if let Some(agent) = &task.agent {
        agent.relay_progress(&task.name, progress_file(&logs.dir));
    }
    let (attempts, pause) = container_set_retries(&template);
    let job = Job {
        program: &program,
        capture: true,
        deadline,
        grace: opts.grace,
    };
    let mut outcome = match run::execute(job, &signals, Some(&mut logs)) {
        Ok(outcome) => outcome,
        Err(Fatal(message)) => {
            return task.refuse(&logs, Some(&template), TaskError::system(message, true));
        }
    };
    for attempt in 2..=attempts {
        // A signal or the deadline ends the retries: only a failing command is tried again.
        if outcome.reason != ExitReason::Error
            || deadline.is_some_and(|d| Instant::now() + pause >= d)
        {
            break;
        }
        crate::note!(
            "emissary: {}; attempt {attempt} of {attempts} in {}",
            outcome.error.as_ref().map_or("failed", |e| &e.message),
            protocol::duration::format(pause)
        );
        if let Some(signal) = cancel::pause(pause) {
            let error = TaskError::user("stopped between retries", false);
            outcome = stopped(exit::for_signal(signal), signal, error);
            break;
        }
        task.result_from = logs.stdout().metadata().map_or(0, |m| m.len());
        outcome = match run::execute(job, &signals, Some(&mut logs)) {
            Ok(outcome) => outcome,
            Err(Fatal(message)) => {
                return task.refuse(&logs, Some(&template), TaskError::system(message, true));
            }
        };
    }
    // A containerSet's outputs may be written by any of its containers: they are collected
    // once every one has ended (a signal or the deadline cuts the wait short).
    if let Some(set) = template
        .container_set
        .as_ref()
        .filter(|_| task.owns_outputs)
    {
        let others: Vec<String> = set
            .containers
            .iter()
            .map(|c| c.container.name.clone())
            .filter(|n| *n != task.name)
            .collect();
        match deps::wait_ended(&ctr_root, &others, &signals, deadline, task.agent.as_ref()) {
            Err(message) => outcome.fail(TaskError::system(message, true)),
            // The set fails with any of its containers, as Argo's does. (An Argo pod's
            // controller reads that from the pod itself.)
            Ok((_, ended)) if !task.agent.as_ref().is_some_and(Agent::knows_the_pod) => {
                for (name, code) in ended.into_iter().filter(|(_, code)| *code != 0) {
                    let message = format!("container {name:?} failed with exit code {code}");
                    outcome.fail(TaskError::user(message, false));
                }
            }
            Ok(_) => {}
        }
    }
    let local = LocalStore::new(&root);
    let store: &dyn Store = match &task.agent {
        Some(agent) => agent,
        None => &local,
    };
    task.report(&logs, outcome, Some(&template), Some(store))
}

/// The task being run: where it reports, and what it has learnt so far.
struct Task {
    root: PathBuf,
    name: String,
    owns_outputs: bool,
    /// The substituted spec, for the inputs digest.
    json: Vec<u8>,
    staged: Vec<inputs::Staged>,
    /// The node agent, when the pod has one: the store and where the result goes.
    agent: Option<Agent>,
    /// Where the last attempt's stdout starts in the stdout file (retries append to it).
    result_from: u64,
    layout: Layout,
}

impl Task {
    /// The command will not run: say why, and report it.
    fn refuse(
        &self,
        logs: &LogDir,
        template: Option<&Template>,
        error: TaskError,
    ) -> Result<i32, Fatal> {
        crate::note!("emissary: {}", error.message);
        self.terminate_with(&error.message);
        self.report(
            logs,
            not_started(self.layout.failure_code, error),
            template,
            None,
        )
    }

    /// The message the pod's status shows for this container's end (Argo's termination log).
    fn terminate_with(&self, message: &str) {
        if let Some(path) = &self.layout.termination_log {
            let _ = std::fs::write(path, message);
        }
    }

    /// The command line and environment for `container`.
    fn program(
        &self,
        opts: &RunOptions,
        template: &Template,
        container: &Container,
        ctr: &Path,
    ) -> Result<Program, String> {
        let script = template.script.as_ref().map(|s| &s.source);
        let script_path = self.root.join("script");
        // Written unless it is there already (init wrote it, or another container of the set):
        // a script left by an earlier run of another spec must not be run.
        if let Some(source) = script
            && std::fs::read(&script_path).ok().as_deref() != Some(source.as_bytes())
        {
            write_atomic_mode(&script_path, source.as_bytes(), Some(0o755)).map_err(|e| {
                format!("cannot write the script to {}: {e}", script_path.display())
            })?;
        }
        let argv: Vec<OsString> = if !opts.command.is_empty() {
            opts.command.clone()
        } else {
            // Kubernetes semantics: `args` go to the image's ENTRYPOINT, which only the
            // injector knows (its image index); without a `command` there is nothing to run.
            let mut command = container.command.clone();
            if command.is_empty() && script.is_some() {
                command.push("sh".to_owned()); // Argo's default for scripts
            }
            if command.is_empty() {
                return Err(format!(
                    "container {:?} has no command (its image's entrypoint is not known here): \
                     set command in the spec, or pass the command after --",
                    self.name
                ));
            }
            let mut argv: Vec<OsString> = command
                .iter()
                .chain(&container.args)
                .map(OsString::from)
                .collect();
            if script.is_some() {
                argv.push(script_path.into_os_string());
            }
            argv
        };
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        // The agent token opens this task's store paths; the user's process has no use for it.
        env.remove(&OsString::from("EMISSARY_TOKEN"));
        for var in &container.env {
            if let Some(value) = &var.value {
                env.insert(var.name.clone().into(), value.into());
            }
        }
        let progress = progress_file(ctr);
        env.insert("EMISSARY_PROGRESS_FILE".into(), progress.clone().into());
        env.insert("ARGO_PROGRESS_FILE".into(), progress.into());
        let env: Vec<OsString> = env
            .into_iter()
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                kv
            })
            .collect();
        let mut program = Program::new(&argv)?.env(&env)?;
        if let Some(dir) = &container.working_dir {
            program = program.cwd(dir)?;
        }
        Ok(program)
    }

    /// Collects outputs (if this container owns them), writes the reports, returns the code.
    fn report(
        &self,
        logs: &LogDir,
        mut outcome: Outcome,
        template: Option<&Template>,
        store: Option<&dyn Store>,
    ) -> Result<i32, Fatal> {
        let mut result_outputs = Outputs::default();
        let command_code = outcome.exit_code;
        if self.owns_outputs {
            if let (Some(template), Some(store)) = (template, store) {
                let ((collected, mut errors), stop) = cancel::watching(|| {
                    let (mut collected, mut errors) =
                        outputs::collect(template, store, self.layout.naming);
                    if template.archive_logs() && self.layout.naming == outputs::Naming::Argo {
                        self.archive_logs(template, store, &mut collected, &mut errors);
                    }
                    (collected, errors)
                });
                if let Some(signal) = stop {
                    // The upload cut short is no output: say why, rather than how it broke.
                    let message = format!(
                        "stopped by {} while uploading outputs",
                        crate::process::signals::name(signal)
                    );
                    errors.clear();
                    outcome.exit_code = exit::for_signal(signal);
                    outcome.reason = ExitReason::Signaled;
                    outcome.signal = Some(signal);
                    outcome.error = Some(TaskError::user(message, false));
                }
                result_outputs = collected;
                if !errors.is_empty() {
                    let message = errors
                        .iter()
                        .map(|e| e.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    crate::note!("emissary: {message}");
                    // A store that failed is the platform's problem; a missing file, the step's.
                    let error = if errors.iter().any(|e| e.system) {
                        TaskError::system(message, true)
                    } else {
                        TaskError::user(message, false)
                    };
                    outcome.fail(error);
                }
                if include_result() {
                    match outputs::result(logs.stdout(), self.result_from) {
                        Ok((text, truncated)) => {
                            result_outputs.result = Some(text);
                            result_outputs.result_truncated = truncated;
                        }
                        Err(e) => outcome.fail(TaskError::system(
                            format!("reading stdout for the result: {e}"),
                            true,
                        )),
                    }
                }
            }
            result_outputs.progress = crate::fsutil::last_progress(&progress_file(&logs.dir));
        }
        let inputs_digest = (!self.json.is_empty()).then(|| self.inputs_digest());
        let build = |outcome: &Outcome, outputs: Outputs| TaskResult {
            container: self.name.clone(),
            exit_code: outcome.exit_code,
            reason: outcome.reason,
            error: outcome.error.clone(),
            outputs,
            inputs_digest: inputs_digest.clone(),
            summary: Some(outcome.summary()),
        };
        if self.owns_outputs && self.agent.is_some() {
            let size = serde_json::to_vec(&build(&outcome, result_outputs.clone()))
                .map_or(0, |json| json.len());
            if size > api::JSON_BODY_LIMIT {
                // Refused whole by the agent, it would report nothing: report why instead.
                outcome.fail(TaskError::user(
                    format!(
                        "the outputs are {size} bytes as JSON, more than the {} bytes a \
                         result carries: pass large values as output artifacts",
                        api::JSON_BODY_LIMIT
                    ),
                    false,
                ));
                result_outputs.parameters.clear();
                result_outputs.result = None;
            }
        }
        if self.owns_outputs
            && let Some(agent) = &self.agent
            && let Err(message) = agent.result(&build(&outcome, result_outputs.clone()))
        {
            // The result did not reach the controller: the pod's exit must say so.
            crate::note!("emissary: {message}");
            outcome.fail(TaskError::system(message, true));
        }
        if outcome.reason == ExitReason::DeadlineExceeded {
            self.terminate_with("Step exceeded its deadline");
        } else if command_code == 0 && outcome.exit_code == exit::EMISSARY_FAILED {
            // The command succeeded and the emissary did not (its outputs, its report).
            outcome.exit_code = self.layout.failure_code;
            if let Some(error) = &outcome.error {
                self.terminate_with(&error.message);
            }
        }
        let summary = outcome.summary();
        run::write_summary(&logs.dir.join("summary.json"), &summary)?;
        if self.owns_outputs {
            let result = build(&outcome, result_outputs);
            let mut json = serde_json::to_vec_pretty(&result)?;
            json.push(b'\n');
            let path = self.root.join("outputs.json");
            write_atomic(&path, &json)
                .map_err(|e| Fatal(format!("cannot write {}: {e}", path.display())))?;
        }
        logs.write_exitcode(outcome.exit_code)?;
        Ok(outcome.exit_code)
    }

    /// Argo's `archiveLogs`: each main container's combined output as `NAME.log`, the artifact
    /// `NAME-logs` (a containerSet's members that ran so far; this one's up to now).
    fn archive_logs(
        &self,
        template: &Template,
        store: &dyn Store,
        collected: &mut Outputs,
        errors: &mut Vec<outputs::OutputError>,
    ) {
        let names: Vec<&str> = match &template.container_set {
            Some(set) => set
                .containers
                .iter()
                .map(|c| c.container.name.as_str())
                .collect(),
            None => vec![self.name.as_str()],
        };
        let packing = protocol::spec::Packing {
            format: protocol::api::ArchiveFormat::None,
            level: 0,
        };
        for name in names {
            let log = self.root.join("ctr").join(name).join("combined");
            if !log.is_file() {
                continue;
            }
            match store.put(&format!("{name}.log"), &log, packing) {
                Ok(stored) => collected.artifacts.push(protocol::api::ArtifactOutput {
                    name: format!("{name}-logs"),
                    stored,
                    archive: packing.format,
                }),
                Err(message) => errors.push(outputs::OutputError {
                    message: format!("archiving the logs of {name}: {message}"),
                    system: true,
                }),
            }
        }
    }

    /// SHA-256 over the resolved spec and each staged input's digest: equal digests mean the
    /// same work (for a controller's memoization).
    fn inputs_digest(&self) -> String {
        let mut material = self.json.clone();
        for staged in &self.staged {
            material.extend_from_slice(format!("\n{}={}", staged.name, staged.sha256).as_bytes());
        }
        archive::sha256(&material)
    }
}

/// `containerSet.retryStrategy`: how many attempts in all (Argo: `retries` counts every attempt,
/// so `retries: 1` is one run) and the pause between them.
fn container_set_retries(template: &Template) -> (u64, Duration) {
    let Some(retry) = template
        .container_set
        .as_ref()
        .and_then(|s| s.retry_strategy.as_ref())
    else {
        return (1, Duration::ZERO);
    };
    // Validated with the spec.
    let pause = retry
        .duration
        .as_deref()
        .and_then(|d| protocol::duration::parse(d).ok())
        .unwrap_or_default();
    (retry.retries.unwrap_or(1).max(1), pause)
}

/// The container to run and what it waits for.
fn select(template: &Template, name: &str) -> Result<(Container, Vec<String>), String> {
    if let Some(set) = &template.container_set {
        let node = set
            .containers
            .iter()
            .find(|c| c.container.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = set
                    .containers
                    .iter()
                    .map(|c| c.container.name.as_str())
                    .collect();
                format!("containerSet has no container {name:?} (it has {names:?})")
            })?;
        return Ok((node.container.clone(), node.dependencies.clone()));
    }
    match (&template.container, &template.script) {
        (Some(c), _) => Ok((c.clone(), Vec::new())),
        (None, Some(s)) => Ok((s.container.clone(), Vec::new())),
        (None, None) => Err("the template has no container, script or containerSet".to_owned()),
    }
}

fn root_dir(opts: &RunOptions) -> PathBuf {
    opts.out
        .clone()
        .or_else(|| opts.root.clone())
        .or_else(|| env_any(&["EMISSARY_ROOT"]).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The earliest of `--deadline`, `activeDeadlineSeconds` and `EMISSARY_DEADLINE` (RFC 3339).
fn deadline(opts: &RunOptions, template: &Template) -> Result<Option<Instant>, Fatal> {
    let now = Instant::now();
    let mut candidates: Vec<Instant> = Vec::new();
    candidates.extend(opts.deadline.map(|d| now + d));
    candidates.extend(
        template
            .active_deadline_seconds
            .map(|s| now + Duration::from_secs(s).min(protocol::duration::MAX)),
    );
    if let Some(text) = env_any(&["EMISSARY_DEADLINE", "ARGO_DEADLINE"]) {
        // Argo writes Go's zero time when there is no deadline.
        if !text.starts_with("0001-01-01") {
            let at =
                time::parse_rfc3339(&text).map_err(|e| Fatal(format!("EMISSARY_DEADLINE: {e}")))?;
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            candidates.push(now + left);
        }
    }
    Ok(candidates.into_iter().min())
}

fn not_started(code: i32, error: TaskError) -> Outcome {
    Outcome::not_started(code, error, SystemTime::now())
}

/// The outcome of a step a terminating `signal` stopped while no command ran.
fn stopped(code: i32, signal: i32, error: TaskError) -> Outcome {
    let mut outcome = not_started(code, error);
    outcome.reason = ExitReason::Signaled;
    outcome.signal = Some(signal);
    outcome
}

/// `outputs.result` is collected unless the controller said no (Argo sets this variable to
/// `true` only when a later step reads the result).
fn include_result() -> bool {
    env_any(&[
        "EMISSARY_INCLUDE_SCRIPT_OUTPUT",
        "ARGO_INCLUDE_SCRIPT_OUTPUT",
    ])
    .is_none_or(|v| v != "false")
}

/// The file the user process reports `N/M` progress in (the controller may choose it).
fn progress_file(ctr: &Path) -> PathBuf {
    env_any(&["EMISSARY_PROGRESS_FILE", "ARGO_PROGRESS_FILE"])
        .map(PathBuf::from)
        .unwrap_or_else(|| ctr.join("progress"))
}

/// Unpack limits, overridable for tests and unusual inputs.
fn limits_from_env() -> Limits {
    let mut limits = Limits::default();
    let read = |name: &str| env_any(&[name]).and_then(|v| v.parse().ok());
    if let Some(bytes) = read("EMISSARY_MAX_INPUT_BYTES") {
        limits.max_bytes = bytes;
    }
    if let Some(entries) = read("EMISSARY_MAX_INPUT_ENTRIES") {
        limits.max_entries = entries;
    }
    limits
}
