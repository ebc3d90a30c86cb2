//! Outputs, collected after the command ends, whether it succeeded or not: parameters from
//! files, `result` from the captured stdout, artifacts packed into the store.
//!
//! A missing non-optional output is an error, but every other output is still collected.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use protocol::api::{ArchiveFormat, ArtifactOutput, Outputs, ParameterOutput};
use protocol::spec::{Archive, Template};

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

/// Collects parameters and artifacts of `template`; returns them with the errors met.
pub fn collect(template: &Template, store: &dyn Store) -> (Outputs, Vec<OutputError>) {
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
        // Checked here so that it is reported as the step's output, not a failing store.
        if packing.format == ArchiveFormat::None
            && !std::fs::metadata(path).is_ok_and(|m| m.is_file())
        {
            errors.push(user(format!(
                "output artifact {:?}: archive none takes a single file; {} is not one (use tar or zstd)",
                a.name,
                path.display()
            )));
            continue;
        }
        let ext = packing.format.extension();
        let file = if ext.is_empty() {
            a.name.clone()
        } else {
            format!("{}.{ext}", a.name)
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
/// tail.
pub fn result(stdout_file: &Path, from: u64) -> io::Result<(String, bool)> {
    let mut file = File::open(stdout_file)?;
    let len = file.metadata()?.len();
    // One byte more than the limit, so the newline is trimmed before the limit is applied.
    let start = len.saturating_sub(RESULT_LIMIT + 1).max(from.min(len));
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
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
    Ok((text, truncated))
}
