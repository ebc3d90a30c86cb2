//! `argoexec init`: the pod's first container, as Argo's executor does it.
//!
//! Makes `/var/run/argo` and its `ctr/` sticky, installs this binary as
//! `/var/run/argo/argoexec` (0555, whole or not at all), writes the
//! template to `/var/run/argo/template` (0444) for the other containers and a script template's
//! source to `/argo/staging/script` (0755), logs in to the node agent (which creates the pod's
//! `WorkflowTaskResult`, so Argo waits for its outputs), and stages the input artifacts where
//! Argo's pod expects them: `/argo/inputs/artifacts/NAME`, which `main` mounts at the artifact's
//! path, or `/mainctrfs/PATH` when the path lies in a volume of the main container.

use std::path::{Path, PathBuf};

use crate::fsutil::write_atomic_mode;
use crate::task::inputs::{self, Sources};
use crate::task::template;
use crate::transfer::archive::Limits;

use super::VAR_RUN_ARGO;
use super::agent::Session;

const INPUT_ARTIFACTS: &str = "/argo/inputs/artifacts";
const MAIN_FILESYSTEM: &str = "/mainctrfs";
const SCRIPT: &str = "/argo/staging/script";

pub fn init() -> Result<i32, String> {
    let file = super::template_file()?;
    refuse_other_kinds(file.as_deref())?;
    let loaded = template::load(file.as_deref(), &[])?;
    let root = Path::new(VAR_RUN_ARGO);
    // Sticky (when init may make them so: Argo runs it as the executor's user), so that no
    // container of the pod replaces the binary or another's exit files.
    for dir in [root.to_owned(), root.join("ctr")] {
        crate::task::init::shared_dir(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    crate::task::init::copy_self(&root.join("argoexec"))
        .map_err(|e| format!("cannot install {VAR_RUN_ARGO}/argoexec: {e}"))?;
    write(&root.join("template"), &loaded.json, 0o444)?;
    if let Some(script) = &loaded.template.script {
        write(Path::new(SCRIPT), script.source.as_bytes(), 0o755)?;
    }
    let session = Session::start()?;
    let agent = session.agent()?;
    let sources = Sources {
        overrides: &[],
        staged: None,
        store: Some(&agent),
        limits: Limits::default(),
    };
    let mounts: Vec<&str> = loaded.template.volume_mounts().collect();
    for artifact in &loaded.template.inputs.artifacts {
        let path = artifact.path.as_deref().unwrap_or_default();
        let dest = destination(&artifact.name, path, &mounts);
        let staged = inputs::stage_one(artifact, &dest, &sources).map_err(|e| e.message)?;
        if staged.is_none() && !artifact.optional {
            return Err(format!(
                "input artifact {:?}: not found, and it is not optional",
                artifact.name
            ));
        }
    }
    Ok(0)
}

/// A resource, data, HTTP or plugin template runs no container the emissary could run (its pod's
/// `main` is argoexec's own subcommand): say so before anything else.
fn refuse_other_kinds(file: Option<&Path>) -> Result<(), String> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
        None => crate::env_any(&["ARGO_TEMPLATE"]).unwrap_or_default(),
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(()); // the loader says what is wrong with it
    };
    for (kind, subcommand) in [
        ("resource", "resource"),
        ("data", "data"),
        ("http", "agent"),
        ("plugin", "agent"),
    ] {
        if json.get(kind).is_some_and(|v| !v.is_null()) {
            return Err(super::unsupported(subcommand));
        }
    }
    Ok(())
}

/// Where Argo's pod expects input `name`: its own emptyDir, unless `path` is in one of main's
/// volumes (Argo then mirrors that volume into `init` under `/mainctrfs`).
fn destination(name: &str, path: &str, mounts: &[&str]) -> PathBuf {
    let in_volume = mounts.iter().any(|m| {
        let m = m.trim_end_matches('/');
        path == m || path.starts_with(&format!("{m}/"))
    });
    if in_volume {
        Path::new(MAIN_FILESYSTEM).join(path.trim_start_matches('/'))
    } else {
        Path::new(INPUT_ARTIFACTS).join(name)
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    write_atomic_mode(path, bytes, Some(mode))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::destination;

    #[test]
    fn inputs_go_where_argos_pod_mounts_them() {
        assert_eq!(
            destination("art", "/tmp/message", &["/data"]).to_str(),
            Some("/argo/inputs/artifacts/art")
        );
        assert_eq!(
            destination("art", "/data/in/x", &["/data/"]).to_str(),
            Some("/mainctrfs/data/in/x")
        );
        assert_eq!(
            destination("art", "/database", &["/data"]).to_str(),
            Some("/argo/inputs/artifacts/art")
        );
    }
}
