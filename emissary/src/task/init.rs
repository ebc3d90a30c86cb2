//! `emissary init`: what the injected init container does before the task container starts.
//!
//! Copies this binary into the shared volume (temp + rename, mode 0555 so any uid can exec it;
//! a concurrent reader never sees a partial binary), creates the shared directories world-
//! writable (a non-root task must be able to write them: Argo #6238) and sticky (no uid may
//! remove or replace what another made: the binary, a sibling's directory, a staged input),
//! and, when a task spec is present, writes it (`template`, 0444) and its script, and stages
//! its inputs into `DIR/inputs/NAME`, so the task container only moves them into place. Their
//! digests go to `DIR/inputs.sha256/NAME`, a directory only init's uid may write.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::fsutil::{temp_name, write_atomic_mode};
use crate::task::inputs::{self, Sources};
use crate::task::template;
use crate::transfer::agent::Agent;
use crate::transfer::archive::Limits;
use crate::transfer::store::{LocalStore, Store};

pub struct InitOptions {
    pub dest: PathBuf,
    pub template: Option<PathBuf>,
    pub store: Option<PathBuf>,
}

pub fn init(opts: &InitOptions) -> Result<(), String> {
    for dir in [
        opts.dest.clone(),
        opts.dest.join("ctr"),
        opts.dest.join("inputs"),
    ] {
        shared_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let binary = opts.dest.join("emissary");
    copy_self(&binary).map_err(|e| format!("cannot install {}: {e}", binary.display()))?;
    if opts.template.is_none() && !template::from_environment() {
        return Ok(());
    }
    let loaded = template::load(opts.template.as_deref(), &[])?;
    let spec_path = opts.dest.join("template");
    write_mode(&spec_path, &loaded.json, 0o444)?;
    if let Some(script) = &loaded.template.script {
        write_mode(&opts.dest.join("script"), script.source.as_bytes(), 0o755)?;
    }
    // Inputs come through the node agent when the pod has one, else from --store.
    let agent = Agent::from_env().transpose()?;
    let local = opts.store.as_deref().map(LocalStore::new);
    let store: Option<&dyn Store> = match &agent {
        Some(agent) => Some(agent),
        None => local.as_ref().map(|s| s as &dyn Store),
    };
    let sources = Sources {
        overrides: &[],
        staged: None,
        store,
        limits: Limits::default(),
    };
    let staged_dir = opts.dest.join("inputs");
    crate::fsutil::own_dir(&inputs::digest_dir(&staged_dir))?;
    for artifact in &loaded.template.inputs.artifacts {
        let dest = staged_dir.join(&artifact.name);
        // Not available here (e.g. no store in this container): the task container tries.
        if let Some(digest) = inputs::stage_one(artifact, &dest, &sources).map_err(|e| e.message)? {
            let digest_file = inputs::digest_file(&staged_dir, &artifact.name);
            write_mode(&digest_file, digest.sha256.as_bytes(), 0o444)?;
        }
    }
    Ok(())
}

/// A directory every uid in the pod can write, sticky so that each may remove or replace only
/// its own entries (mode set explicitly: the umask would narrow it). Never a symlink. An
/// emptyDir is 0777 but root's: a non-root init cannot chmod it, and says what that leaves open.
pub fn shared_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory (a symbolic link?)"));
    }
    let mode = meta.permissions().mode();
    if mode & 0o1777 == 0o1777 {
        return Ok(());
    }
    match fs::set_permissions(dir, fs::Permissions::from_mode(0o1777)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && mode & 0o777 == 0o777 => {
            crate::note!(
                "emissary: cannot make {} sticky ({e}): any uid of the pod may replace what is in it",
                dir.display()
            );
            Ok(())
        }
        done => done,
    }
}

pub fn copy_self(dest: &Path) -> io::Result<()> {
    let tmp = temp_name(dest);
    let result = (|| {
        let mut copy = crate::fsutil::create_new(&tmp)?;
        io::copy(&mut File::open("/proc/self/exe")?, &mut copy)?;
        copy.set_permissions(fs::Permissions::from_mode(0o555))?;
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    write_atomic_mode(path, bytes, Some(mode))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
