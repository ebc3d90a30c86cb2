//! The test kubelet's images: an image reference maps to a root filesystem on this machine.
//! There is no registry and no container engine here, so the table is fixed:
//!
//! | image | root filesystem |
//! |---|---|
//! | `ghcr.io/emissary-executor/emissary:*` | our OCI image, `make image`'s `emissary.oci.tar`, unpacked |
//! | `ghcr.io/emissary-executor/emissary-agent:*` | `emissary-agent.oci.tar`, unpacked |
//! | `ghcr.io/emissary-executor/argoexec:*` | `argoexec.oci.tar` (Argo's executor, replaced), unpacked |
//! | `busybox*`, `alpine*` | Debian's static busybox with every applet linked in `/bin` |
//! | `gcr.io/distroless/static*` | only `/bin/busybox` and `/etc/passwd`: no shell, no applets |
//! | `debian*`, `ubuntu*`, `python*` | this machine's Debian `/usr` and `/etc`, read-only |
//! | `argoproj/argosay*` | the Debian root plus `/argosay`, a shell rendition of Argo's test tool |
//! | `quay.io/argoproj/argoexec:*` | Argo's own executor, built from its v4.1 module (benchmarks) |
//!
//! Anything else is not pulled: the container waits with reason `ErrImagePull` and a message
//! naming this table, as a kubelet does for an image it cannot fetch. Each container runs on an
//! overlay of its image (a fresh writable layer per start, as a runtime gives it).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

/// What an image's config gives a container that does not say otherwise.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
    pub workdir: String,
}

/// An image ready to run: its lower layer, host directories bound read-only over it, and
/// its config.
#[derive(Debug, Clone)]
pub struct Image {
    pub lower: PathBuf,
    /// (host path, path in the container), bound read-only.
    pub binds: Vec<(PathBuf, String)>,
    pub config: ImageConfig,
}

/// Where the images' layers come from and where they are unpacked.
pub struct Images {
    oci_dir: PathBuf,
    cache: PathBuf,
    ready: Mutex<BTreeMap<&'static str, Image>>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Images {
    /// `oci_dir` holds `make image`'s archives; layers are unpacked under `cache`.
    pub fn new(oci_dir: &Path, cache: &Path) -> Images {
        Images {
            oci_dir: oci_dir.to_owned(),
            cache: cache.to_owned(),
            ready: Mutex::new(BTreeMap::new()),
        }
    }

    /// The image `reference` names, or why this machine cannot provide it.
    pub fn resolve(&self, reference: &str) -> Result<Image, String> {
        let kind = kind_of(reference).ok_or_else(|| {
            format!(
                "image {reference:?} is not in the test kubelet's image table (tests/cluster/images.rs): \
                 there is no registry here"
            )
        })?;
        let mut ready = self.ready.lock().unwrap();
        if let Some(image) = ready.get(kind) {
            return Ok(image.clone());
        }
        let image = self.prepare(kind)?;
        ready.insert(kind, image.clone());
        Ok(image)
    }

    fn prepare(&self, kind: &str) -> Result<Image, String> {
        let lower = self.cache.join(kind);
        if lower.exists() {
            fs::remove_dir_all(&lower).map_err(|e| format!("{}: {e}", lower.display()))?;
        }
        fs::create_dir_all(&lower).map_err(|e| format!("{}: {e}", lower.display()))?;
        let root_config = ImageConfig {
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            workdir: "/".into(),
            ..ImageConfig::default()
        };
        match kind {
            "emissary" | "emissary-agent" | "argoexec" => {
                let archive = self.oci_dir.join(format!("{kind}.oci.tar"));
                let config = unpack_oci(&archive, &lower)?;
                Ok(Image {
                    lower,
                    binds: vec![],
                    config,
                })
            }
            "busybox" | "distroless" => {
                base_dirs(&lower)?;
                let busybox = Path::new("/bin/busybox");
                if !busybox.exists() {
                    return Err(
                        "/bin/busybox is missing: `make test` installs busybox-static".into(),
                    );
                }
                let applets = if kind == "busybox" {
                    applets()?
                } else {
                    vec![]
                };
                for applet in applets {
                    if applet != "busybox" {
                        let link = lower.join("bin").join(&applet);
                        if !link.exists() {
                            symlink("busybox", &link).map_err(|e| e.to_string())?;
                        }
                    }
                }
                fs::copy(busybox, lower.join("bin/busybox")).map_err(|e| e.to_string())?;
                let cmd = if kind == "busybox" {
                    vec!["sh".into()]
                } else {
                    vec![]
                };
                Ok(Image {
                    lower,
                    binds: vec![],
                    config: ImageConfig { cmd, ..root_config },
                })
            }
            "debian" | "argosay" => {
                base_dirs(&lower)?;
                // The host's merged /usr: /bin, /lib... are links into it, as on Debian.
                for (dir, target) in [
                    ("bin", "usr/bin"),
                    ("sbin", "usr/sbin"),
                    ("lib", "usr/lib"),
                    ("lib64", "usr/lib64"),
                ] {
                    let link = lower.join(dir);
                    let _ = fs::remove_dir(&link);
                    symlink(target, &link).map_err(|e| e.to_string())?;
                }
                fs::create_dir_all(lower.join("usr")).map_err(|e| e.to_string())?;
                let binds = vec![
                    (PathBuf::from("/usr"), "/usr".into()),
                    (PathBuf::from("/etc"), "/etc".into()),
                ];
                let mut config = ImageConfig {
                    cmd: vec!["bash".into()],
                    ..root_config
                };
                if kind == "argosay" {
                    let path = lower.join("argosay");
                    fs::write(&path, ARGOSAY).map_err(|e| e.to_string())?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(|e| e.to_string())?;
                    config.cmd = vec![];
                    config.entrypoint = vec!["/argosay".into()];
                }
                Ok(Image {
                    lower,
                    binds,
                    config,
                })
            }
            "argo-executor" => {
                // Argo's own executor, for the side-by-side benchmark: built from Argo's module.
                base_dirs(&lower)?;
                let built = super::cluster_bin().join("argo-v4.1/argoexec");
                if !built.exists() {
                    return Err(format!(
                        "{} is missing: build Argo's executor with `tests/cluster/build.sh \
                         target/cluster-bin argoexec` (make bench does)",
                        built.display()
                    ));
                }
                fs::copy(&built, lower.join("bin/argoexec")).map_err(|e| e.to_string())?;
                Ok(Image {
                    lower,
                    binds: vec![],
                    config: ImageConfig {
                        entrypoint: vec!["argoexec".into()],
                        // As Argo's image: a non-root user of its own.
                        uid: 8737,
                        gid: 8737,
                        ..root_config
                    },
                })
            }
            other => unreachable!("kind_of returned {other}"),
        }
    }
}

fn kind_of(reference: &str) -> Option<&'static str> {
    let name = reference.split('@').next().unwrap_or(reference);
    let repo = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    let repo = repo
        .strip_prefix("docker.io/")
        .unwrap_or(repo)
        .strip_prefix("library/")
        .unwrap_or(repo);
    Some(match repo {
        "ghcr.io/emissary-executor/emissary" => "emissary",
        "ghcr.io/emissary-executor/emissary-agent" => "emissary-agent",
        "ghcr.io/emissary-executor/argoexec" => "argoexec",
        "quay.io/argoproj/argoexec" => "argo-executor",
        "busybox" | "alpine" => "busybox",
        r if r.starts_with("gcr.io/distroless/") => "distroless",
        "debian" | "ubuntu" | "python" => "debian",
        "argoproj/argosay" => "argosay",
        _ => return None,
    })
}

/// The directories every Linux image has.
fn base_dirs(root: &Path) -> Result<(), String> {
    for (dir, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
    ] {
        let path = root.join(dir);
        fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n\
         nonroot:x:65532:65532:nonroot:/home:/bin/false\n",
    )
    .map_err(|e| e.to_string())?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n",
    )
    .map_err(|e| e.to_string())
}

fn applets() -> Result<Vec<String>, String> {
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| format!("busybox --list: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Unpacks the single-platform OCI archive's layers into `root` and returns its config.
fn unpack_oci(archive: &Path, root: &Path) -> Result<ImageConfig, String> {
    let mut files = BTreeMap::new();
    let file = fs::File::open(archive)
        .map_err(|e| format!("{}: {e} (`make image` builds it)", archive.display()))?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?;
        let path = path.to_string_lossy().trim_start_matches("./").to_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        files.insert(path, bytes);
    }
    let blob = |digest: &Value| -> Result<&Vec<u8>, String> {
        let hex = digest
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .ok_or_else(|| format!("{}: bad digest {digest}", archive.display()))?;
        files
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| format!("{}: missing blob {hex}", archive.display()))
    };
    let json = |bytes: &[u8]| -> Result<Value, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("{}: {e}", archive.display()))
    };
    let index = json(files.get("index.json").ok_or("no index.json")?)?;
    let manifest = json(blob(&index["manifests"][0]["digest"])?)?;
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let bytes = blob(&layer["digest"])?;
        let reader: Box<dyn Read> = if bytes.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(bytes.as_slice()))
        } else {
            Box::new(bytes.as_slice())
        };
        let mut layer = tar::Archive::new(reader);
        layer.set_preserve_permissions(true);
        layer
            .unpack(root)
            .map_err(|e| format!("{}: unpacking a layer: {e}", archive.display()))?;
    }
    let config = json(blob(&manifest["config"]["digest"])?)?;
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let (uid, gid) = match c["User"].as_str().unwrap_or("") {
        "" => (0, 0),
        user => {
            let (u, g) = user.split_once(':').unwrap_or((user, user));
            (
                u.parse().map_err(|_| format!("image user {user:?}"))?,
                g.parse().map_err(|_| format!("image user {user:?}"))?,
            )
        }
    };
    let mut env: Vec<(String, String)> = strings(&c["Env"])
        .iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
    }
    Ok(ImageConfig {
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env,
        uid,
        gid,
        workdir: c["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .into(),
    })
}

/// Argo's test image `argoproj/argosay:v2`, as far as the examples use it: `echo [MSG [FILE]]`,
/// `cat FILE...`, `sleep DURATION`, `exit [CODE]`, `assert_contains FILE TEXT`,
/// `assert_exist FILE`; no arguments says "hello argo".
const ARGOSAY: &str = r#"#!/bin/bash
set -euo pipefail
cmd=${1:-echo}
[ $# -gt 0 ] && shift
case "$cmd" in
echo)
    msg=${1:-hello argo}
    if [ $# -ge 2 ]; then mkdir -p "$(dirname "$2")"; printf '%s' "$msg" > "$2"; else echo "$msg"; fi ;;
cat) cat "$@" ;;
sleep) d=${1:-1s}; case "$d" in *ms) sleep "$(awk "BEGIN{print ${d%ms}/1000}")" ;; *s) sleep "${d%s}" ;; *m) sleep $(( ${d%m} * 60 )) ;; *h) sleep $(( ${d%h} * 3600 )) ;; *) sleep "$d" ;; esac ;;
exit) exit "${1:-0}" ;;
assert_contains) grep -qF -- "$2" "$1" || { echo "$1 does not contain $2" >&2; exit 1; } ;;
assert_exist) [ -e "$1" ] || { echo "$1 does not exist" >&2; exit 1; } ;;
*) echo "argosay: unknown command $cmd" >&2; exit 1 ;;
esac
"#;

#[cfg(test)]
mod tests {
    use super::kind_of;

    #[test]
    fn references_map_to_their_kind() {
        assert_eq!(kind_of("busybox"), Some("busybox"));
        assert_eq!(kind_of("docker.io/library/alpine:3.23"), Some("busybox"));
        assert_eq!(kind_of("python:alpine3.23"), Some("debian"));
        assert_eq!(kind_of("argoproj/argosay:v2"), Some("argosay"));
        assert_eq!(
            kind_of("ghcr.io/emissary-executor/emissary:0.1.0"),
            Some("emissary")
        );
        assert_eq!(
            kind_of("quay.io/argoproj/argoexec:v4.1.4"),
            Some("argo-executor")
        );
        assert_eq!(kind_of("localhost:5000/busybox"), None);
    }
}
