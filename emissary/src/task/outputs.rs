//! Outputs, collected after the command ends, whether it succeeded or not: parameters from
//! files, `result` from the captured stdout, artifacts packed into the store.
//!
//! A missing non-optional output is an error, but every other output is still collected.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use protocol::api::{ArchiveFormat, ArtifactOutput, Outputs, ParameterOutput, StoredArtifact};
use protocol::spec::{Archive, Packing, Template};

use crate::transfer::store::Store;

/// Argo keeps the last 256 KiB of stdout as `outputs.result`.
pub const RESULT_LIMIT: u64 = 256 * 1024;
/// An output parameter larger than this is an error (it belongs in an artifact).
pub const PARAMETER_LIMIT: u64 = 256 * 1024;

/// An output that could not be collected.
pub struct OutputError {
    pub message: String,
    /// The store failed (the platform's fault), rather than the step not producing it.
    pub system: bool,
}

fn user(message: String) -> OutputError {
    OutputError {
        message,
        system: false,
    }
}

/// How stored artifacts are named: `NAME.EXT`, with an `archive: none` file named `NAME`
/// (ours) or after the path's base name (Argo's, whose keys controllers and users expect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Ours,
    Argo,
}

/// Collects parameters and artifacts of `template`; returns them with the errors met.
pub fn collect(
    template: &Template,
    store: &dyn Store,
    naming: Naming,
) -> (Outputs, Vec<OutputError>) {
    let mut outputs = Outputs::default();
    let mut errors = Vec::new();
    for p in &template.outputs.parameters {
        let Some(from) = &p.value_from else { continue };
        // Only file-backed parameters are ours; others (supplied, jsonPath...) are the controller's.
        let Some(path) = &from.path else { continue };
        match read_parameter(Path::new(path)) {
            Ok(value) => outputs.parameters.push(ParameterOutput {
                name: p.name.clone(),
                value,
            }),
            Err(e) => match &from.default {
                Some(default) if e.kind() == io::ErrorKind::NotFound => {
                    outputs.parameters.push(ParameterOutput {
                        name: p.name.clone(),
                        value: default.clone(),
                    })
                }
                _ => errors.push(user(format!("output parameter {:?}: {path}: {e}", p.name))),
            },
        }
    }
    for a in &template.outputs.artifacts {
        let path = Path::new(a.path.as_deref().unwrap_or_default());
        if std::fs::symlink_metadata(path).is_err() {
            if !a.optional {
                errors.push(user(format!(
                    "output artifact {:?}: {} does not exist",
                    a.name,
                    path.display()
                )));
            }
            continue;
        }
        let packing = match Archive::packing(a.archive.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                errors.push(user(format!("output artifact {:?}: {e}", a.name)));
                continue;
            }
        };
        let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
        if packing.format == ArchiveFormat::None && is_dir && naming == Naming::Argo {
            let base = path
                .file_name()
                .map_or(a.name.clone(), |n| n.to_string_lossy().into());
            match put_directory(store, &base, path) {
                Ok(stored) => outputs.artifacts.push(ArtifactOutput {
                    name: a.name.clone(),
                    stored,
                    archive: packing.format,
                }),
                Err(e) => errors.push(OutputError {
                    message: format!("output artifact {:?}: {e}", a.name),
                    system: true,
                }),
            }
            continue;
        }
        // Checked here so that it is reported as the step's output, not a failing store (the
        // store checks again as it reads).
        if packing.format == ArchiveFormat::None
            && let Err(e) = crate::fsutil::open_regular(path)
        {
            let why = if e.kind() == io::ErrorKind::PermissionDenied {
                format!("{}: {e}", path.display())
            } else {
                format!(
                    "archive none takes a single file; {} is not one (use tar or zstd)",
                    path.display()
                )
            };
            errors.push(user(format!("output artifact {:?}: {why}", a.name)));
            continue;
        }
        let ext = packing.format.extension();
        let file = match (ext.is_empty(), naming) {
            (false, _) => format!("{}.{ext}", a.name),
            (true, Naming::Ours) => a.name.clone(),
            (true, Naming::Argo) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| a.name.clone()),
        };
        match store.put(&file, path, packing) {
            Ok(stored) => outputs.artifacts.push(ArtifactOutput {
                name: a.name.clone(),
                stored,
                archive: packing.format,
            }),
            Err(e) => errors.push(OutputError {
                message: format!("output artifact {:?}: {e}", a.name),
                system: true,
            }),
        }
    }
    (outputs, errors)
}

/// Argo's `archive: none` of a directory: each regular file its own object under `BASE/`, as
/// Argo's S3 driver stores it; the artifact is that key prefix, its digest the SHA-256 of the
/// `PATH SHA256` lines of its files.
fn put_directory(store: &dyn Store, base: &str, dir: &Path) -> Result<StoredArtifact, String> {
    let mut files = Vec::new();
    list_files(dir, "", &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut manifest = String::new();
    let (mut prefix, mut size) = (None, 0);
    for relative in &files {
        let stored = store.put(
            &format!("{base}/{relative}"),
            &dir.join(relative),
            Packing {
                format: ArchiveFormat::None,
                level: 0,
            },
        )?;
        size += stored.size;
        manifest.push_str(&format!("{relative} {}\n", stored.sha256));
        prefix = stored
            .key
            .strip_suffix(&format!("/{relative}"))
            .map(str::to_owned);
    }
    let key = prefix.ok_or_else(|| format!("{} has no files to store", dir.display()))?;
    Ok(StoredArtifact {
        key,
        size,
        sha256: crate::transfer::archive::sha256(manifest.as_bytes()),
    })
}

/// The regular files under `dir`, as relative paths, in a stable order.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(&entry.path(), &format!("{name}/"), out)?;
        } else if kind.is_file() {
            out.push(name);
        }
    }
    Ok(())
}

/// A parameter's value: the file's text with one trailing newline removed (as Argo).
fn read_parameter(path: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    crate::fsutil::open_regular(path)?
        .take(PARAMETER_LIMIT + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > PARAMETER_LIMIT {
        return Err(io::Error::other(format!(
            "larger than {PARAMETER_LIMIT} bytes; use an output artifact for large values"
        )));
    }
    if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `outputs.result`: the captured stdout from byte `from` on (where the last attempt began),
/// one trailing newline removed, the last [`RESULT_LIMIT`] bytes; true when that is only the
/// tail. Read from the capture file the emissary wrote, never reopened by its path, which the
/// command may have replaced (with a symlink to /proc/self/environ, say).
pub fn result(stdout: &File, from: u64) -> io::Result<(String, bool)> {
    let len = stdout.metadata()?.len();
    // One byte more than the limit, so the newline is trimmed before the limit is applied.
    let start = len.saturating_sub(RESULT_LIMIT + 1).max(from.min(len));
    // pread: the capture's descriptors share this one's offset.
    let mut bytes = vec![0; (len - start) as usize];
    stdout.read_exact_at(&mut bytes, start)?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
    }
    let truncated = start > from || bytes.len() as u64 > RESULT_LIMIT;
    if bytes.len() as u64 > RESULT_LIMIT {
        bytes.drain(..bytes.len() - RESULT_LIMIT as usize);
    }
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if truncated && text.starts_with('\u{fffd}') {
        // The cut may split a UTF-8 sequence; drop the broken head rather than mangle it.
        text = text.trim_start_matches('\u{fffd}').to_owned();
    }
    // Binary output grows up to six times as JSON (`\u0000`): keep the tail that fits twice
    // the limit, so that the result always fits the body the agent takes.
    let mut encoded = 0;
    let cut = text.char_indices().rev().find_map(|(i, c)| {
        encoded += json_len(c);
        (encoded > 2 * RESULT_LIMIT as usize).then_some(i + c.len_utf8())
    });
    if let Some(cut) = cut {
        text.drain(..cut);
        return Ok((text, true));
    }
    Ok((text, truncated))
}

/// Bytes of `c` inside a JSON string, as serde_json writes it.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_what_serde_json_writes() {
        for c in (0..0x110000)
            .filter_map(char::from_u32)
            .step_by(7)
            .chain(['"', '\\', '\n'])
        {
            let quoted = serde_json::to_string(&c.to_string()).unwrap();
            assert_eq!(json_len(c), quoted.len() - 2, "{c:?}");
        }
    }

    #[test]
    fn binary_output_is_cut_to_a_result_that_fits_the_agents_body() {
        let mut stdout = tempfile_with(&vec![0u8; 2_000_000]);
        let (text, truncated) = result(&stdout, 0).unwrap();
        assert!(truncated);
        let encoded = serde_json::to_string(&text).unwrap().len();
        assert!(encoded <= 2 * RESULT_LIMIT as usize + 2, "{encoded}");
        assert!(encoded > 2 * RESULT_LIMIT as usize - 6, "{encoded}");
        stdout = tempfile_with(b"plain text\n");
        assert_eq!(
            result(&stdout, 0).unwrap(),
            ("plain text".to_owned(), false)
        );
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "emissary-outputs-test-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
