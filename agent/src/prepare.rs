//! `emissary-agent prepare-data-dir`: makes a node directory (a hostPath) the agent's own, so
//! that its journal and cache outlive the pod. Kubernetes creates a hostPath owned by root and
//! cannot chown it, while the agent runs as a non-root user; an init container running this
//! as root, with only CAP_CHOWN and CAP_DAC_READ_SEARCH, hands the directory over.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The directory (created 0700 if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The agent's user and group, UID:GID.
    #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
    pub owner: (u32, u32),
}

fn parse_owner(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("expected UID:GID, got {text:?}"))?;
    let number = |n: &str| {
        n.parse::<u32>()
            .map_err(|_| format!("expected UID:GID as numbers, got {text:?}"))
    };
    Ok((number(uid)?, number(gid)?))
}

/// Creates `dir` if needed and gives it, and everything below it, to `owner`. Symlinks are
/// changed themselves, never followed: nothing outside the directory changes hands.
pub fn prepare(args: &PrepareArgs) -> Result<(), String> {
    let (uid, gid) = args.owner;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    // The top directory may predate us (kubelet's DirectoryOrCreate makes it 0755, owned by
    // root, which may chmod it without CAP_FOWNER); once ours it is already 0700.
    let meta = std::fs::metadata(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(&args.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", args.dir.display()))?;
    }
    chown_tree(&args.dir, uid, gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    lchown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", path.display()))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", path.display()))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}
