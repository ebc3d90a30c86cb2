//! The parts of an Argo template the agent acts on: where each input artifact comes from and
//! where each output goes. The template is the pod's own (its `init` container's
//! `ARGO_TEMPLATE`, or the ConfigMap Argo offloads it to), as the controller resolved it; a
//! task names an artifact, never a location.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(default)]
    pub inputs: Inputs,
    /// Kept as written: the task result carries the template's output specs back.
    #[serde(default)]
    pub outputs: Value,
    #[serde(default)]
    pub archive_location: Option<ArchiveLocation>,
    #[serde(default)]
    pub container_set: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Inputs {
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// An artifact and its location (at most one kind of location is set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub name: String,
    #[serde(default)]
    pub s3: Option<S3>,
    #[serde(default)]
    pub http: Option<Http>,
    #[serde(default)]
    pub raw: Option<Value>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Location kinds Argo has and this agent does not move (yet).
const UNSUPPORTED: [&str; 7] = [
    "git",
    "gcs",
    "azure",
    "hdfs",
    "oss",
    "artifactory",
    "plugin",
];

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct S3 {
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub insecure: Option<bool>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub access_key_secret: Option<SecretRef>,
    #[serde(default)]
    pub secret_key_secret: Option<SecretRef>,
    #[serde(default)]
    pub session_token_secret: Option<SecretRef>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, Hash)]
pub struct SecretRef {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Http {
    pub url: String,
    #[serde(default)]
    pub headers: Vec<Header>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveLocation {
    #[serde(default)]
    pub archive_logs: Option<bool>,
    #[serde(default)]
    pub s3: Option<S3>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Where an artifact is, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A complete S3 location: bucket, endpoint and credentials from the artifact, else from the
    /// template's archive location (a key-only artifact passed from another step).
    S3(S3),
    Http {
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Template {
    pub fn input(&self, name: &str) -> Option<&Artifact> {
        self.inputs.artifacts.iter().find(|a| a.name == name)
    }

    /// Where input `name` comes from.
    pub fn input_location(&self, name: &str) -> Result<Location, String> {
        let art = self
            .input(name)
            .ok_or_else(|| format!("the template has no input artifact {name:?}"))?;
        if let Some(kind) = unsupported(&art.other) {
            return Err(format!(
                "input artifact {name:?} is in a {kind} repository, which emissary does not \
                 support yet (S3, HTTP and raw artifacts are)"
            ));
        }
        if let Some(http) = &art.http {
            return Ok(Location::Http {
                url: http.url.clone(),
                headers: http
                    .headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            });
        }
        if art.raw.is_some() {
            return Err(format!(
                "input artifact {name:?} is raw: its data is in the template, not in a store"
            ));
        }
        let s3 = art
            .s3
            .as_ref()
            .ok_or_else(|| format!("input artifact {name:?} has no location (s3, http or raw)"))?;
        if s3.key.as_deref().is_none_or(str::is_empty) {
            return Err(format!("input artifact {name:?} has no s3.key"));
        }
        Ok(Location::S3(self.complete(s3)?))
    }

    /// Where an output file goes: `archiveLocation.s3.key/FILE`, in the archive location's
    /// bucket.
    pub fn output_location(&self, file: &str) -> Result<S3, String> {
        let archive = self.archive_s3()?;
        let base = archive
            .key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or("the template's archiveLocation.s3 has no key")?;
        let mut location = archive.clone();
        location.key = Some(format!("{}/{file}", base.trim_end_matches('/')));
        Ok(location)
    }

    fn archive_s3(&self) -> Result<&S3, String> {
        let archive = self.archive_location.as_ref().ok_or(
            "the template has no archiveLocation: configure an artifact repository for the \
             workflow (artifactRepository in the controller's configmap)",
        )?;
        if let Some(s3) = &archive.s3 {
            return Ok(s3);
        }
        Err(match unsupported(&archive.other) {
            Some(kind) => format!(
                "the artifact repository is {kind}, which emissary does not support yet (S3 is)"
            ),
            None => "the template's archiveLocation has no repository".into(),
        })
    }

    /// `s3` with what it leaves out taken from the archive location.
    fn complete(&self, s3: &S3) -> Result<S3, String> {
        let mut out = s3.clone();
        if let Some(base) = self.archive_location.as_ref().and_then(|a| a.s3.as_ref()) {
            out.bucket = out.bucket.or(base.bucket.clone());
            out.endpoint = out.endpoint.or(base.endpoint.clone());
            out.region = out.region.or(base.region.clone());
            out.insecure = out.insecure.or(base.insecure);
            if out.access_key_secret.is_none() {
                out.access_key_secret = base.access_key_secret.clone();
                out.secret_key_secret = base.secret_key_secret.clone();
                out.session_token_secret = base.session_token_secret.clone();
            }
        }
        if out.bucket.as_deref().is_none_or(str::is_empty) {
            return Err(
                "an S3 artifact without a bucket, and no archiveLocation to take one from".into(),
            );
        }
        Ok(out)
    }

    /// Whether the main containers' logs are archived (`main.log`...).
    pub fn archive_logs(&self) -> bool {
        self.archive_location
            .as_ref()
            .and_then(|a| a.archive_logs)
            .unwrap_or(false)
    }

    /// The output artifact specs as the template gives them.
    pub fn output_artifacts(&self) -> Vec<Value> {
        self.outputs["artifacts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The file names an upload of this task may use: `NAME.tgz` (tar, Argo's default),
    /// `NAME.tar.zst` (zstd) or the path's base name (`archive: none`; a directory's files
    /// under it, each its own object, as Argo stores one) for each output artifact, and
    /// `CONTAINER.log` for archived logs.
    pub fn allows_output(&self, file: &str, containers: &[String]) -> Option<String> {
        let (first, in_directory) = match file.split_once('/') {
            Some((first, _)) => (first, true),
            None => (file, false),
        };
        for art in self.output_artifacts() {
            let name = art["name"].as_str().unwrap_or_default();
            let base = art["path"]
                .as_str()
                .and_then(|p| p.trim_end_matches('/').rsplit('/').next())
                .unwrap_or_default();
            let none = art["archive"].get("none").is_some();
            if (!in_directory
                && (file == format!("{name}.tgz") || file == format!("{name}.tar.zst")))
                || (none && first == base)
            {
                return Some(name.to_owned());
            }
        }
        if self.archive_logs() {
            for container in containers {
                if file == format!("{container}.log") {
                    return Some(format!("{container}-logs"));
                }
            }
        }
        None
    }
}

fn unsupported(fields: &serde_json::Map<String, Value>) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|k| fields.get(**k).is_some_and(|v| !v.is_null()))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(value: Value) -> Template {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_key_only_input_takes_the_rest_from_the_archive_location() {
        let t = template(json!({
            "inputs": {"artifacts": [{"name": "in", "path": "/tmp/in", "s3": {"key": "wf/p/out.tgz"}}]},
            "archiveLocation": {"s3": {"bucket": "b", "endpoint": "minio:9000", "insecure": true,
                "accessKeySecret": {"name": "s", "key": "a"}, "secretKeySecret": {"name": "s", "key": "k"},
                "key": "wf/this-pod"}}
        }));
        let Location::S3(s3) = t.input_location("in").unwrap() else {
            panic!()
        };
        assert_eq!(s3.bucket.as_deref(), Some("b"));
        assert_eq!(s3.key.as_deref(), Some("wf/p/out.tgz"));
        assert_eq!(s3.access_key_secret.unwrap().name, "s");
        assert_eq!(
            t.output_location("x.tgz").unwrap().key.as_deref(),
            Some("wf/this-pod/x.tgz")
        );
    }

    #[test]
    fn unsupported_repositories_are_named() {
        let t = template(json!({"inputs": {"artifacts": [{"name": "src", "git": {"repo": "x"}}]}}));
        let e = t.input_location("src").unwrap_err();
        assert!(e.contains("git repository"), "{e}");
        let t = template(json!({"archiveLocation": {"gcs": {"bucket": "b"}}}));
        assert!(t.output_location("x.tgz").unwrap_err().contains("gcs"));
    }

    #[test]
    fn only_the_templates_own_outputs_may_be_uploaded() {
        let t = template(json!({
            "outputs": {"artifacts": [{"name": "a", "path": "/tmp/a"},
                                      {"name": "b", "path": "/tmp/dir/b.txt", "archive": {"none": {}}}]},
            "archiveLocation": {"archiveLogs": true, "s3": {"key": "k"}}
        }));
        let main = ["main".to_owned()];
        assert_eq!(t.allows_output("a.tgz", &main).as_deref(), Some("a"));
        assert_eq!(t.allows_output("b.txt", &main).as_deref(), Some("b"));
        assert_eq!(t.allows_output("b.txt/in/x", &main).as_deref(), Some("b"));
        assert_eq!(t.allows_output("a.tgz/x", &main), None);
        assert_eq!(
            t.allows_output("main.log", &main).as_deref(),
            Some("main-logs")
        );
        assert_eq!(t.allows_output("c.tgz", &main), None);
        assert_eq!(t.allows_output("a.txt", &main), None);
    }
}
