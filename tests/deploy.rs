//! Deployment artifacts: the images are FROM scratch with one layer, and the Kubernetes
//! manifests validate offline against the v1.32 schemas with unknown fields rejected.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// `images/deploy/overlays/example`, with the node key file its README step creates (a random
/// one, made once, as a user would).
pub fn example_overlay() -> PathBuf {
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/deploy/overlays/example");
    let key = overlay.join("node-key");
    if !key.exists() {
        use base64::Engine;
        let random: Vec<u8> = noise(32, std::process::id() as u64);
        let text = base64::engine::general_purpose::STANDARD.encode(random);
        let tmp = overlay.join(format!(".node-key.{}", std::process::id()));
        std::fs::write(&tmp, text + "\n").unwrap();
        std::fs::rename(&tmp, &key).unwrap();
    }
    overlay
}

fn image_dir() -> PathBuf {
    std::env::var_os("IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

/// Every file of an OCI archive, by path.
fn oci_files(archive: &Path) -> BTreeMap<String, Vec<u8>> {
    let file = std::fs::File::open(archive)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make image`)", archive.display()));
    let mut tar = tar::Archive::new(file);
    let mut files = BTreeMap::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        files.insert(path, bytes);
    }
    files
}

fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &serde_json::Value) -> &'a [u8] {
    let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
    files
        .get(&format!("blobs/sha256/{hex}"))
        .unwrap_or_else(|| panic!("missing blob {hex}"))
}

/// (path, mode, bytes) of every entry in a (possibly gzipped) layer.
fn layer_entries(layer: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let reader: Box<dyn Read> = if layer.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    let mut tar = tar::Archive::new(reader);
    let mut entries = Vec::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mode = entry.header().mode().unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if !path.is_empty() {
            entries.push((path, mode, bytes));
        }
    }
    entries
}

/// The config and the one layer's entries of an OCI archive (which must have one layer).
fn single_layer_image(archive: &Path) -> (serde_json::Value, Vec<(String, u32, Vec<u8>)>) {
    let files = oci_files(archive);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(blob(&files, &index["manifests"][0]["digest"])).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let config = serde_json::from_slice(blob(&files, &manifest["config"]["digest"])).unwrap();
    (config, layer_entries(blob(&files, &layers[0]["digest"])))
}

#[test]
fn the_emissary_image_is_the_static_binary_alone() {
    let archive = image_dir().join("emissary.oci.tar");
    let (config, entries) = single_layer_image(&archive);
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/emissary"])
    );
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["init", "--dest", "/var/run/emissary"])
    );
    let names: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["emissary"],
        "nothing but the binary (no shell, no libc)"
    );
    assert!(
        entries[0].2 == std::fs::read(emissary_bin()).unwrap(),
        "the layer holds the binary under test"
    );
    assert_eq!(entries[0].1 & 0o111, 0o111, "executable");
    let size = std::fs::metadata(&archive).unwrap().len();
    assert!(
        size <= 2_500_000,
        "emissary image is {size} bytes, over its 2.5 MB goal"
    );
}

#[test]
fn the_argo_executor_image_is_the_same_binary_as_argoexec() {
    let archive = image_dir().join("argoexec.oci.tar");
    let (config, entries) = single_layer_image(&archive);
    // As Argo's own image: `argoexec` on PATH, the entrypoint (artifact GC pods pass only
    // arguments), root unless the executor's securityContext says otherwise.
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["argoexec"])
    );
    assert!(config["config"]["User"].as_str().unwrap_or("").is_empty());
    let env = config["config"]["Env"].as_array().unwrap();
    assert!(env.iter().any(|e| e == "PATH=/bin"), "{env:?}");
    let files: Vec<&(String, u32, Vec<u8>)> = entries
        .iter()
        .filter(|(_, _, bytes)| !bytes.is_empty())
        .collect();
    assert_eq!(files.len(), 1, "only the binary");
    assert_eq!(files[0].0, "bin/argoexec");
    assert!(files[0].2 == std::fs::read(emissary_bin()).unwrap());
    assert_eq!(files[0].1 & 0o111, 0o111, "executable");
    let size = std::fs::metadata(&archive).unwrap().len();
    assert!(
        size <= 8_000_000,
        "the executor image is {size} bytes, over 8 MB"
    );
}

#[test]
fn the_agent_image_is_the_static_agent_and_ca_certificates() {
    let archive = image_dir().join("emissary-agent.oci.tar");
    let (config, entries) = single_layer_image(&archive);
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/emissary-agent"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["serve"]));
    let mut names: Vec<&str> = entries
        .iter()
        .map(|(p, _, _)| p.as_str())
        .filter(|p| !p.ends_with('/'))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["emissary-agent", "etc/ssl/certs/ca-certificates.crt"],
        "nothing but the agent and its CA bundle"
    );
    let binary = &entries
        .iter()
        .find(|(p, _, _)| p == "emissary-agent")
        .unwrap()
        .2;
    assert_eq!(&binary[..4], b"\x7fELF");
    if let Some(expected) = std::env::var_os("AGENT_IMAGE_BIN") {
        assert!(
            *binary == std::fs::read(expected).unwrap(),
            "the layer holds the agent built for the image"
        );
    }
    // Static: no program interpreter to look for in an image without a libc.
    assert!(!has_interpreter(binary), "the agent is dynamically linked");
    assert!(
        has_interpreter(&std::fs::read("/bin/sh").unwrap()),
        "the check itself sees a dynamic binary"
    );
}

fn kubernetes_validate() -> PathBuf {
    std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/kubernetes-validate")
        })
}

pub fn validate(file: &Path) -> Output {
    run_quick(
        Command::new(kubernetes_validate())
            .args(["--strict", "-k", "1.32"])
            .arg(file),
    )
}

#[test]
fn the_manifests_validate_against_kubernetes_1_32() {
    let dir = Dir::new("manifests");
    let rendered = run_quick(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(example_overlay()),
    );
    rendered.assert_code(0);
    let text = rendered.stdout();
    for kind in [
        "DaemonSet",
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
        "ConfigMap",
        "ServiceAccount",
        "NetworkPolicy",
    ] {
        assert!(
            text.contains(&format!("kind: {kind}\n")),
            "the overlay renders no {kind}"
        );
    }
    // Node tokens and events' outputs cross the pod network: the shipped config verifies the
    // controller over HTTPS (security review, finding 15).
    assert!(
        text.contains("controller-url = \"https://") && text.contains("controller-ca = "),
        "{text}"
    );
    assert!(!text.contains("controller-url = \"http://"), "{text}");
    let file = dir.write("rendered.yaml", &text);
    let out = validate(&file);
    out.assert_code(0);
    assert!(
        !out.stdout().contains("WARN") && !out.stderr().contains("WARN"),
        "{}",
        out.dump()
    );

    // The validator must be able to fail: an unknown field and a wrong type are caught.
    for (from, to) in [
        ("containerPort: 7946", "containerPortt: 7946"),
        ("replicas: 2", "replicas: \"two\""),
    ] {
        assert!(text.contains(from), "{from} not in the rendered manifests");
        let broken = dir.write("broken.yaml", text.replacen(from, to, 1));
        assert_ne!(validate(&broken).code, Some(0), "{to} was not caught");
    }
}

#[test]
fn prepare_data_dir_hands_a_hostpath_to_the_agent_with_only_chown_capabilities() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    let dir = Dir::new("prepare-data-dir");
    let outside = dir.write("outside", "not the agent's");
    let data = dir.join("hostpath");
    // What kubelet's DirectoryOrCreate leaves, plus a journal from an earlier pod.
    std::fs::create_dir_all(data.join("journal")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("journal/segment"), "events").unwrap();
    symlink(&outside, data.join("link")).unwrap();
    // As the init container runs it: root, every capability dropped but CHOWN and
    // DAC_READ_SEARCH. Twice: a restarted pod finds the directory already the agent's.
    for _ in 0..2 {
        run_quick(
            Command::new("setpriv")
                .args([
                    "--bounding-set=-all,+chown,+dac_read_search",
                    "--inh-caps=-all",
                ])
                .arg(agent_bin())
                .args(["prepare-data-dir", "--owner", "65532:65533"])
                .arg(&data),
        )
        .assert_code(0);
    }
    for path in [
        data.clone(),
        data.join("journal"),
        data.join("journal/segment"),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65532, 65533),
            "{}",
            path.display()
        );
    }
    assert_eq!(std::fs::metadata(&data).unwrap().mode() & 0o777, 0o700);
    let link = std::fs::symlink_metadata(data.join("link")).unwrap();
    assert_eq!(link.uid(), 65532, "the link itself changes hands");
    assert_eq!(
        std::fs::metadata(&outside).unwrap().uid(),
        0,
        "its target does not"
    );

    let out = run_quick(Command::new(agent_bin()).args([
        "prepare-data-dir",
        "--owner",
        "agent",
        "/tmp/x",
    ]));
    out.assert_code(2)
        .assert_stderr_contains("expected UID:GID");
}

/// Security review, finding 7: no key ships. The base has no node key Secret, and the overlay
/// renders only once the key file exists (then holding exactly it).
#[test]
fn no_node_key_ships_and_the_overlay_needs_the_users_own() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/deploy");
    let base = run_quick(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(deploy.join("base")),
    );
    base.assert_code(0);
    assert!(
        !base.stdout().contains("name: emissary-node-key\n"),
        "the base ships a node key"
    );
    assert!(
        !base.stdout().contains("RANDOM-BYTES"),
        "a placeholder key ships"
    );

    // A copy of the overlay without the key file: kustomize refuses it, naming the file.
    let dir = Dir::new("overlay-key");
    for sub in ["base", "overlays/example"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for entry in std::fs::read_dir(deploy.join(sub)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "node-key" {
                std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).unwrap();
            }
        }
    }
    let overlay = dir.join("overlays/example");
    let out = run_quick(Command::new("kubectl").arg("kustomize").arg(&overlay));
    assert_ne!(out.code, Some(0), "{}", out.dump());
    out.assert_stderr_contains("node-key");
    std::fs::write(
        overlay.join("node-key"),
        "a-key-only-this-user-knows-0123456789",
    )
    .unwrap();
    let out = run_quick(Command::new("kubectl").arg("kustomize").arg(&overlay));
    out.assert_code(0);
    use base64::Engine;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode("a-key-only-this-user-knows-0123456789");
    assert!(
        out.stdout().contains(&format!("key: {encoded}")),
        "{}",
        out.stdout()
    );
}
