//! Input artifacts, staged at their `path` before the command starts.
//!
//! Sources, first match wins: `--input NAME=PATH` (standalone); what `emissary init` already
//! staged in `ROOT/inputs/NAME` (then it is only moved); `raw.data`; the store, by key, its
//! bytes checked against the input's `sha256` when given. A missing input is an error unless
//! it is `optional`.

use std::fs::{self, File};
use std::io::{self, Cursor};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use protocol::spec::{InputArtifact, Template};

use crate::transfer::archive::{self, Digest, Limits, Unpack};
use crate::transfer::store::{GetError, Store};

/// Where inputs may come from.
pub struct Sources<'a> {
    /// `--input NAME=PATH`.
    pub overrides: &'a [(String, PathBuf)],
    /// `ROOT/inputs`, where `emissary init` stages inputs for the task container.
    pub staged: Option<PathBuf>,
    pub store: Option<&'a dyn Store>,
    pub limits: Limits,
}

/// One staged input, for the inputs digest.
pub struct Staged {
    pub name: String,
    pub sha256: String,
}

/// An input that could not be staged.
#[derive(Debug)]
pub struct InputError {
    pub message: String,
    /// The store failed (the platform's fault), rather than the input being missing or bad.
    pub system: bool,
}

/// Stages every input artifact of `template` at its path.
pub fn stage_all(template: &Template, sources: &Sources<'_>) -> Result<Vec<Staged>, InputError> {
    let mut staged = Vec::new();
    for artifact in &template.inputs.artifacts {
        let dest = PathBuf::from(artifact.path.as_deref().unwrap_or_default());
        match stage_one(artifact, &dest, sources)? {
            Some(digest) => staged.push(Staged {
                name: artifact.name.clone(),
                sha256: digest.sha256,
            }),
            None if artifact.optional => {}
            None => {
                let key = artifact
                    .store_key()
                    .map(|k| format!(" (key {k:?})"))
                    .unwrap_or_else(|| {
                        format!(
                            " (no key or raw data: give it with --input {}=PATH)",
                            artifact.name
                        )
                    });
                return Err(InputError {
                    message: format!(
                        "input artifact {:?}: not found{key}; it is not optional",
                        artifact.name
                    ),
                    system: false,
                });
            }
        }
    }
    Ok(staged)
}

/// Builds the errors of one input: `system` when the store failed, not the input.
fn failure(artifact: &InputArtifact, system: bool) -> impl Fn(String) -> InputError + '_ {
    move |e| InputError {
        message: format!("input artifact {:?}: {e}", artifact.name),
        system,
    }
}

/// Stages one input at `dest`, with its `mode` applied; `Ok(None)` when no source has it.
pub fn stage_one(
    artifact: &InputArtifact,
    dest: &Path,
    sources: &Sources<'_>,
) -> Result<Option<Digest>, InputError> {
    let fail = |system: bool| failure(artifact, system);
    let digest = fetch(artifact, dest, sources)?;
    if let (Some(_), Some(mode)) = (&digest, artifact.mode) {
        fs::set_permissions(dest, fs::Permissions::from_mode(mode))
            .map_err(|e| fail(false)(format!("chmod {mode:o} {}: {e}", dest.display())))?;
    }
    Ok(digest)
}

fn fetch(
    artifact: &InputArtifact,
    dest: &Path,
    sources: &Sources<'_>,
) -> Result<Option<Digest>, InputError> {
    let fail = |system: bool| failure(artifact, system);
    let unpack = match &artifact.archive {
        Some(a) if a.none.is_some() => Unpack::Never,
        _ => Unpack::Auto,
    };
    if let Some((_, path)) = sources
        .overrides
        .iter()
        .find(|(name, _)| name == &artifact.name)
    {
        return stage_path(path, dest, unpack, sources.limits)
            .map(Some)
            .map_err(fail(false));
    }
    // Only what init staged, as its digest record says, and still init's: anything else in
    // the world-writable inputs/ may have been put there by any container of the pod.
    if let Some(dir) = &sources.staged
        && let Some((sha256, init_uid)) = staged_digest(dir, &artifact.name)
    {
        let staged = dir.join(&artifact.name);
        if fs::symlink_metadata(&staged).is_ok_and(|m| m.uid() == init_uid) {
            move_into(&staged, dest).map_err(fail(true))?;
            return Ok(Some(Digest { size: 0, sha256 }));
        }
    }
    if let Some(raw) = &artifact.raw {
        let mut data = Cursor::new(raw.data.as_bytes());
        return archive::stage(&mut data, dest, Unpack::Never, sources.limits, None)
            .map(Some)
            .map_err(fail(false));
    }
    let Some(store) = sources.store else {
        return Ok(None);
    };
    // A store that fails is the platform's problem (retryable); a refused key or a bad archive
    // is the input's.
    match store.get_input(artifact) {
        Ok(Some(mut input)) => {
            // A directory arrives as a tar made on the fly, not the bytes its producer hashed.
            let (unpack, expected) = match input.directory {
                true => (Unpack::Auto, None),
                false => (unpack, artifact.sha256.as_deref()),
            };
            archive::stage(&mut input.bytes, dest, unpack, sources.limits, expected)
                .map(Some)
                .map_err(fail(false))
        }
        Ok(None) => Ok(None),
        Err(GetError::BadKey(e)) => Err(fail(false)(e)),
        Err(GetError::Failed(e)) => Err(fail(true)(e)),
    }
}

/// Where `emissary init` records the digests of the inputs it staged in `dir`: `DIR.sha256/`,
/// beside it, which only init's uid may write (unlike `dir`, which every uid may).
pub fn digest_dir(dir: &Path) -> PathBuf {
    let mut records = dir.as_os_str().to_owned();
    records.push(".sha256");
    records.into()
}

/// Where `emissary init` records the digest of the input `name` it staged in `dir`.
pub fn digest_file(dir: &Path, name: &str) -> PathBuf {
    digest_dir(dir).join(name)
}

/// The digest init recorded for the input `name` it staged in `dir`, and init's uid, if the
/// record is init's: in a real directory no other uid may write.
fn staged_digest(dir: &Path, name: &str) -> Option<(String, u32)> {
    let records = fs::symlink_metadata(digest_dir(dir)).ok()?;
    if !records.is_dir() || records.mode() & 0o022 != 0 {
        return None;
    }
    let text = fs::read_to_string(digest_file(dir, name)).ok()?;
    Some((text.trim().to_owned(), records.uid()))
}

/// `--input NAME=PATH`: a file is staged like stored bytes (archives unpacked); a directory is
/// copied as is.
fn stage_path(path: &Path, dest: &Path, unpack: Unpack, limits: Limits) -> Result<Digest, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        let mut hasher = archive::HashingWriter::new(io::sink());
        copy_tree(path, dest, &mut hasher)
            .map_err(|e| format!("copying {}: {e}", path.display()))?;
        return Ok(hasher.finish().1);
    }
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    archive::stage(&mut file, dest, unpack, limits, None)
}

/// Moves `from` to `to`, copying across filesystems (the shared volume is usually not the
/// container's root filesystem).
fn move_into(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    if fs::symlink_metadata(to).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(to).map_err(|e| format!("replacing {}: {e}", to.display()))?;
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        // Across filesystems, or init's file in the sticky inputs/ and this uid not init's.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => {
            copy_tree(from, to, &mut io::sink())
                .map_err(|e| format!("copying to {}: {e}", to.display()))
        }
        Err(e) => Err(format!(
            "moving {} to {}: {e}",
            from.display(),
            to.display()
        )),
    }
}

/// Copies a file, symlink or directory tree, keeping modes; `digest` sees every relative path
/// and file content in a stable order.
fn copy_tree(from: &Path, to: &Path, digest: &mut impl io::Write) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir_all(to)?;
        let mut children: Vec<_> = fs::read_dir(from)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            digest.write_all(child.file_name().as_encoded_bytes())?;
            copy_tree(&child.path(), &to.join(child.file_name()), digest)?;
        }
    } else if meta.file_type().is_symlink() {
        let target = fs::read_link(from)?;
        digest.write_all(target.as_os_str().as_encoded_bytes())?;
        let _ = fs::remove_file(to);
        // A link's own mode is meaningless, and chmod would follow it: done.
        return std::os::unix::fs::symlink(target, to);
    } else if meta.is_file() {
        let mut source = File::open(from)?;
        let mut target = File::create(to)?;
        io::copy(&mut source, &mut TeeWriter(&mut target, digest))?;
    } else {
        // A FIFO would block the copy forever, a device is not data: left out, as in outputs.
        crate::note!(
            "emissary: {} is not a regular file; left out",
            from.display()
        );
        return Ok(());
    }
    fs::set_permissions(to, meta.permissions())
}

/// Writes to two writers.
struct TeeWriter<'a, A, B>(&'a mut A, &'a mut B);

impl<A: io::Write, B: io::Write> io::Write for TeeWriter<'_, A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}
