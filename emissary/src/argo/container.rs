//! `argoexec emissary -- CMD ARGS...`: a container of an Argo pod, under the emissary.
//!
//! `main` (or a containerSet's member) runs as a task of the template `init` wrote: containerSet
//! dependencies through `/var/run/argo/ctr/NAME/exitcode` as Argo's executor does, the command
//! supervised and its output captured in `/var/run/argo/ctr/NAME/`, then the outputs collected
//! and uploaded through the node agent, which writes them to the pod's `WorkflowTaskResult`
//! before this container exits. A sidecar runs supervised with no outputs of its own, and is
//! stopped once every main container has ended. The
//! arguments Argo offloaded (`ARGO_CONTAINER_ARGS_FILE`, a JSON list) are appended to the
//! command; one longer than the kernel takes for an argument (128 KiB) is passed as
//! `@/tmp/argo_arg_N.txt`, the file holding it, as Argo's executor does.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::run::{self, Fatal, RunOptions};
use crate::task::outputs::Naming;
use crate::task::step::{self, Layout};
use crate::task::template;
use crate::transfer::agent::Agent;

use super::agent::Session;
use super::{FAILED, TERMINATION_LOG, VAR_RUN_ARGO, fail};

/// The longest single argument execve takes (MAX_ARG_STRLEN).
const MAX_ARG: usize = 128 * 1024;

pub fn run(mut command: Vec<OsString>) -> i32 {
    let name = crate::env_any(&["ARGO_CONTAINER_NAME"]).unwrap_or_else(|| "main".into());
    if let Err(message) = offloaded_args(&mut command) {
        return fail(&message);
    }
    if command.is_empty() {
        return fail("no command after --");
    }
    let template_file = match super::template_file() {
        Ok(file) => file,
        Err(message) => return fail(&message),
    };
    let template = match template::load(template_file.as_deref(), &[]) {
        Ok(loaded) => loaded.template,
        Err(message) => return fail(&message),
    };
    let root = PathBuf::from(VAR_RUN_ARGO);
    let is_task = match &template.container_set {
        Some(set) => set.containers.iter().any(|c| c.container.name == name),
        None => name == "main",
    };
    let mut opts = RunOptions {
        command,
        grace: grace(),
        ..RunOptions::default()
    };
    if !is_task {
        // A sidecar: supervised, its exit code where Argo's executor writes it, no outputs; and
        // stopped once every main container has ended (TERM, the grace, KILL), as Argo's
        // controller would by `pods/exec`, so that a sidecar ignoring TERM cannot hang the step.
        let mains = match &template.container_set {
            Some(set) => set
                .containers
                .iter()
                .map(|c| c.container.name.clone())
                .collect(),
            None => vec!["main".to_owned()],
        };
        let agent = Session::resume().and_then(|s| s.agent()).ok();
        let ctr = root.join("ctr");
        opts.log_dir = Some(ctr.join(&name));
        let started = |logs: Option<&run::LogDir>| {
            if let Some(control) = logs.and_then(|l| l.control_sender().ok()) {
                stop_after(mains, agent, ctr, control);
            }
        };
        return match run::run_command_with(&opts, started) {
            Ok(code) => code,
            Err(Fatal(message)) => fail(&message),
        };
    }
    let agent = match Session::resume().and_then(|s| s.agent()) {
        Ok(agent) => agent,
        Err(message) => return fail(&message),
    };
    opts.template = template_file;
    opts.root = Some(root);
    opts.container = Some(name);
    let layout = Layout {
        stage_inputs: false,
        naming: Naming::Argo,
        failure_code: FAILED,
        termination_log: Some(TERMINATION_LOG.into()),
        agent: Some(agent),
    };
    match step::run_as(&opts, layout) {
        Ok(code) => code,
        Err(Fatal(message)) => fail(&message),
    }
}

/// Asks this container's supervisor to terminate (through its FIFO) once every container of
/// `mains` has ended: as its kubelet reports through the agent, else by its exit file.
fn stop_after(mains: Vec<String>, agent: Option<Agent>, ctr: PathBuf, mut control: std::fs::File) {
    let waiting = move || {
        for main in &mains {
            loop {
                let ended = match &agent {
                    Some(agent) => agent.container_exit(main, Duration::from_secs(1)),
                    None => Ok(ctr.join(main).join("exitcode").exists().then_some(0)),
                };
                match ended {
                    Ok(Some(_)) => break,
                    Ok(None) if agent.is_some() => {}
                    Ok(None) => std::thread::sleep(Duration::from_millis(250)),
                    Err(e) => {
                        crate::note!("emissary: sidecar: {e}");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        }
        let _ = control.write_all(b"terminate\n");
    };
    let _ = std::thread::Builder::new()
        .name("sidecar".into())
        .stack_size(64 * 1024)
        .spawn(waiting);
}

/// Argo's grace between TERM and KILL: `ARGO_TERMINATION_GRACE_PERIOD_SECONDS`, else 30 s.
fn grace() -> std::time::Duration {
    let seconds = crate::env_any(&["ARGO_TERMINATION_GRACE_PERIOD_SECONDS"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    std::time::Duration::from_secs(seconds)
}

/// Appends the arguments of `ARGO_CONTAINER_ARGS_FILE`; moves any too long for execve into a
/// file passed as `@FILE`.
fn offloaded_args(command: &mut Vec<OsString>) -> Result<(), String> {
    if let Some(file) = crate::env_any(&["ARGO_CONTAINER_ARGS_FILE"]) {
        let text =
            std::fs::read(&file).map_err(|e| format!("ARGO_CONTAINER_ARGS_FILE {file}: {e}"))?;
        let args: Vec<String> = serde_json::from_slice(&text).map_err(|e| {
            format!("ARGO_CONTAINER_ARGS_FILE {file}: not a JSON list of strings: {e}")
        })?;
        command.extend(args.into_iter().map(OsString::from));
    }
    for (i, arg) in command.iter_mut().enumerate() {
        if arg.len() >= MAX_ARG {
            let path = Path::new("/tmp").join(format!("argo_arg_{i}.txt"));
            std::fs::write(&path, arg.as_encoded_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            *arg = OsString::from(format!("@{}", path.display()));
        }
    }
    Ok(())
}
