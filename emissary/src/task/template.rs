//! Where the task spec comes from, and its parameters.
//!
//! `--template FILE`, else `EMISSARY_TEMPLATE` (or Argo's `ARGO_TEMPLATE`): inline JSON, or
//! `@/path/to/file` (large specs must not travel only in the environment: Argo #7586).
//! `-p NAME=VALUE` then fills `{{inputs.parameters.NAME}}`, over the template's own values.

use std::fs;
use std::path::Path;

use protocol::spec::{self, Template};

const TEMPLATE_VARS: [&str; 2] = ["EMISSARY_TEMPLATE", "ARGO_TEMPLATE"];

/// True when the environment carries a spec (pod mode).
pub fn from_environment() -> bool {
    crate::env_any(&TEMPLATE_VARS).is_some()
}

/// A parsed, substituted, validated spec.
pub struct Loaded {
    pub template: Template,
    /// The substituted JSON, as hashed into the inputs digest and written by `emissary init`.
    pub json: Vec<u8>,
}

/// Loads the spec from `file` or the environment and applies `params`.
pub fn load(file: Option<&Path>, params: &[(String, String)]) -> Result<Loaded, String> {
    let (source, text) = match file {
        Some(path) => (path.display().to_string(), read(path)?),
        None => {
            let (var, value) = TEMPLATE_VARS
                .iter()
                .find_map(|var| Some((*var, crate::env_any(&[var])?)))
                .ok_or("no task spec: pass --template FILE or set EMISSARY_TEMPLATE")?;
            match value.strip_prefix('@') {
                Some(path) => (path.to_owned(), read(Path::new(path))?),
                None => (var.to_owned(), value),
            }
        }
    };
    let fail = |e: spec::SpecError| format!("bad task spec {source}: {e}");
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("bad task spec {source}: not valid JSON: {e}"))?;
    // The template's own values first, then -p on top.
    let mut values = spec::declared_parameters(&value);
    values.extend(params.iter().cloned());
    spec::substitute(&mut value, &values).map_err(fail)?;
    let json = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    let template = spec::from_value(value).map_err(fail)?;
    Ok(Loaded { template, json })
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read task spec {}: {e}", path.display()))
}
