//! Injection: the CLI on Pods and Workflows, and the admission webhook over real TLS.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::agent_util::read_response;
use crate::util::*;

const CONFIG: &str = "\
executor: emissary
emissaryImage: ghcr.io/emissary-executor/emissary:0.1.0
agentPort: 7946
images:
  python:3.12-alpine:
    entrypoint: [python3]
    cmd: [-V]
";

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: step-1
  labels:
    emissary.io/inject: "true"
  annotations:
    emissary.io/template: '{"container": {"command": ["sh"]}}'
    emissary.io/task-id: step-1
    emissary.io/token: t0k3n
spec:
  restartPolicy: Never
  containers:
    - name: main
      image: alpine:3.20
      command: [sh, -c]
      args: ["echo hello"]
      env:
        - name: KEEP
          value: "1"
    - name: helper
      image: python:3.12-alpine
"#;

fn inject(dir: &Dir, input: &str, name: &str) -> Output {
    let config = dir.write("inject.yaml", CONFIG);
    let pod = dir.write(name, input);
    run_quick(
        Command::new(agent_bin())
            .args(["inject", "-f"])
            .arg(&pod)
            .arg("--config")
            .arg(&config),
    )
}

#[test]
fn the_cli_injects_a_pod_in_its_own_format_and_only_once() {
    let dir = Dir::new("inject-cli");
    let out = inject(&dir, POD, "pod.yaml");
    out.assert_code(0);
    let pod: Value = serde_norway::from_str(&out.stdout()).unwrap();
    let main = &pod["spec"]["containers"][0];
    assert_eq!(
        main["command"],
        json!([
            "/var/run/emissary/emissary",
            "run",
            "--",
            "sh",
            "-c",
            "echo hello"
        ])
    );
    assert_eq!(
        pod["spec"]["containers"][1]["command"],
        json!(["/var/run/emissary/emissary", "run", "--", "python3", "-V"])
    );
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "emissary-init");
    let env: Vec<&str> = main["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in [
        "EMISSARY_AGENT_ADDR",
        "EMISSARY_TOKEN",
        "EMISSARY_TASK_ID",
        "EMISSARY_TEMPLATE",
        "EMISSARY_CONTAINER_NAME",
        "KEEP",
    ] {
        assert!(env.contains(&name), "{name} missing: {env:?}");
    }

    // Injecting the injected pod changes nothing, in YAML as in JSON.
    let again = inject(&dir, &out.stdout(), "again.yaml");
    again.assert_code(0);
    assert_eq!(
        serde_norway::from_str::<Value>(&again.stdout()).unwrap(),
        pod
    );
    let json_in = serde_json::to_string(&pod).unwrap();
    let json_out = inject(&dir, &json_in, "pod.json");
    json_out.assert_code(0);
    assert_eq!(
        serde_json::from_str::<Value>(&json_out.stdout()).unwrap(),
        pod
    );

    // The injected pod is a valid Kubernetes 1.32 Pod, unknown fields rejected.
    let file = dir.write("injected.yaml", out.stdout());
    crate::deploy::validate(&file).assert_code(0);
}

#[test]
fn a_container_without_command_or_index_entry_is_refused_with_what_to_add() {
    let dir = Dir::new("inject-no-command");
    let pod = POD.replace("python:3.12-alpine", "example.com/unknown:1");
    inject(&dir, &pod, "pod.yaml")
        .assert_code(1)
        .assert_stderr_contains(
            "container \"helper\" (image \"example.com/unknown:1\") has no command",
        )
        .assert_stderr_contains("images:");
}

/// Security review, finding 2c: kubelet expands `$(EMISSARY_TOKEN)` in command, args and env,
/// which would hand the command the token the emissary keeps from it.
#[test]
fn a_pod_that_asks_kubelet_for_the_token_is_refused() {
    let dir = Dir::new("inject-token-reference");
    for (pod, place) in [
        (
            POD.replace("echo hello", "echo $(EMISSARY_TOKEN)"),
            "spec.containers[0].args[0] refers to $(EMISSARY_TOKEN)",
        ),
        (
            POD.replace("value: \"1\"", "value: \"x$$$(EMISSARY_TOKEN)\""),
            "spec.containers[0].env[0].value refers to $(EMISSARY_TOKEN)",
        ),
        (
            POD.replace(
                "value: \"1\"",
                "valueFrom: {fieldRef: {fieldPath: \"metadata.annotations['emissary.io/token']\"}}",
            ),
            "spec.containers[0].env[0] reads the emissary.io/token annotation",
        ),
    ] {
        inject(&dir, &pod, "pod.yaml")
            .assert_code(1)
            .assert_stderr_contains(place);
    }
    // Escaped, it is the literal text, left alone.
    let escaped = POD.replace("echo hello", "echo $$(EMISSARY_TOKEN)");
    inject(&dir, &escaped, "pod.yaml").assert_code(0);
}

#[test]
fn a_workflow_gets_its_emissary_templates_labelled() {
    let dir = Dir::new("inject-workflow");
    let workflow = "\
apiVersion: argoproj.io/v1alpha1
kind: Workflow
metadata: {generateName: hello-}
spec:
  entrypoint: main
  templates:
    - name: main
      steps: [[{name: a, template: a}]]
    - name: a
      container: {image: alpine, command: [echo, hi]}
    - name: b
      executor: argo
      container: {image: alpine, command: [echo, hi]}
";
    let out = inject(&dir, workflow, "wf.yaml");
    out.assert_code(0);
    let wf: Value = serde_norway::from_str(&out.stdout()).unwrap();
    assert_eq!(
        wf["spec"]["templates"][1]["metadata"]["labels"]["emissary.io/inject"],
        "true"
    );
    assert!(
        wf["spec"]["templates"][0]["metadata"].is_null(),
        "steps run no pod"
    );
    assert!(
        wf["spec"]["templates"][2]["metadata"].is_null(),
        "the template chose argo"
    );
}

/// A webhook with a freshly generated certificate for 127.0.0.1.
struct Webhook {
    addr: std::net::SocketAddr,
    cert: rcgen::CertifiedKey<rcgen::KeyPair>,
    child: std::process::Child,
}

impl Webhook {
    fn start(dir: &Dir) -> Webhook {
        Webhook::start_with(dir, &[])
    }

    fn start_with(dir: &Dir, extra: &[&str]) -> Webhook {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let cert_file = dir.write("tls.crt", cert.cert.pem());
        let key_file = dir.write("tls.key", cert.signing_key.serialize_pem());
        let config = dir.write("inject.yaml", CONFIG);
        let ready = dir.join("webhook-ready.json");
        let child = Command::new(agent_bin())
            .args(["webhook", "--listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert_file)
            .arg("--tls-key")
            .arg(&key_file)
            .arg("--inject-config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || ready.exists()),
            "the webhook did not start"
        );
        let json: Value = serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
        Webhook {
            addr: json["addr"].as_str().unwrap().parse().unwrap(),
            cert,
            child,
        }
    }

    /// A TLS connection that trusts only the generated certificate.
    fn connect(&self) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.cert.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let socket = std::net::TcpStream::connect(self.addr).unwrap();
        rustls::StreamOwned::new(connection, socket)
    }

    /// POSTs `body` to `/inject` over TLS.
    fn post(&self, body: &[u8]) -> (u16, Value) {
        let mut tls = self.connect();
        write!(tls, "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        tls.write_all(body).unwrap();
        let (status, body) = read_response(tls);
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn review(pod: Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                    "namespace": "default", "object": pod}
    })
    .to_string()
    .into_bytes()
}

/// Applies an RFC 6902 patch of `add`/`replace` operations (what the webhook sends).
fn apply(mut doc: Value, patch: &Value) -> Value {
    for op in patch.as_array().unwrap() {
        assert!(matches!(op["op"].as_str(), Some("add" | "replace")), "{op}");
        let (parent, key) = op["path"].as_str().unwrap().rsplit_once('/').unwrap();
        doc.pointer_mut(parent).unwrap()[key] = op["value"].clone();
    }
    doc
}

#[test]
fn the_webhook_answers_admission_reviews_with_a_patch_and_fails_closed() {
    let dir = Dir::new("inject-webhook");
    let webhook = Webhook::start(&dir);
    let pod: Value = serde_norway::from_str(POD).unwrap();

    let (status, answer) = webhook.post(&review(pod.clone()));
    assert_eq!(status, 200, "{answer}");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let patched = apply(pod.clone(), &patch);
    let cli = inject(&dir, POD, "pod.yaml");
    assert_eq!(
        patched,
        serde_norway::from_str::<Value>(&cli.stdout()).unwrap(),
        "webhook and CLI inject alike"
    );

    // Not labelled: admitted untouched.
    let mut unlabelled = pod.clone();
    unlabelled["metadata"]["labels"] = json!({});
    let (status, answer) = webhook.post(&review(unlabelled));
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());

    // Labelled but impossible to inject: denied with the reason.
    let mut broken = pod.clone();
    broken["spec"]["containers"][1]["image"] = json!("example.com/unknown:1");
    let (status, answer) = webhook.post(&review(broken));
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("has no command")
    );

    // Not an AdmissionReview at all: 400, never an admission.
    let (status, answer) = webhook.post(b"{\"kind\": \"Pod\"}");
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("AdmissionReview"),
        "{answer}"
    );
    let (status, _) = webhook.post(b"not json");
    assert_eq!(status, 400);
}

#[test]
fn a_client_that_never_finishes_its_handshake_or_headers_is_cut_off() {
    let dir = Dir::new("webhook-silent");
    let webhook = Webhook::start(&dir);
    let limit = Duration::from_secs(40);
    let addr = webhook.addr;
    let handshake =
        std::thread::spawn(move || cuts_off_a_silent_client(addr, b"\x16\x03\x01", limit));
    let admin = {
        let agent = crate::agent_util::Agent::start(dir.join("agent"), &[]);
        let addr = agent.admin;
        let cut = cuts_off_a_silent_client(addr, b"GET /metr", limit);
        drop(agent);
        cut
    };
    assert!(admin, "the admin port kept a silent client");
    assert!(
        handshake.join().unwrap(),
        "the webhook kept a silent TLS client"
    );
}

/// Security review, finding 9: anyone who reaches the webhook can send it bytes. A body over
/// 1 MiB is refused before it is read, only 16 are read at once, and one that takes longer
/// than the request timeout is cut off.
#[test]
fn the_webhook_bounds_what_any_client_makes_it_hold() {
    let dir = Dir::new("webhook-bounds");
    let webhook = Webhook::start_with(&dir, &["--request-timeout", "8s"]);
    let status_of =
        |tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| {
            tls.sock
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut line = [0u8; 12];
            match std::io::Read::read(tls, &mut line) {
                Ok(12) => String::from_utf8_lossy(&line[9..12]).parse::<u16>().ok(),
                _ => None,
            }
        };
    let mut large = webhook.connect();
    write!(
        large,
        "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Length: 3145728\r\n\r\n"
    )
    .unwrap();
    large.write_all(&[b' '; 1000]).unwrap();
    assert_eq!(
        status_of(&mut large),
        Some(413),
        "a 3 MiB body was not refused at once"
    );

    // 40 clients each sending all but the last byte of 1 MiB.
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..40 {
        let mut tls = webhook.connect();
        write!(
            tls,
            "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Length: 1048576\r\n\r\n"
        )
        .unwrap();
        tls.flush().unwrap();
        tls.sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut line = [0u8; 12];
        match std::io::Read::read(&mut tls, &mut line) {
            Ok(12) => {
                assert_eq!(&line[9..12], b"503", "{}", String::from_utf8_lossy(&line));
                busy += 1;
            }
            _ => {
                tls.write_all(&vec![b' '; (1 << 20) - 1]).unwrap();
                held.push(tls);
            }
        }
    }
    assert_eq!((held.len(), busy), (16, 24));
    // Past the request timeout each held client is answered 408 and let go.
    for tls in &mut held {
        tls.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = [0u8; 12];
        std::io::Read::read_exact(tls, &mut line).unwrap();
        assert_eq!(&line[9..12], b"408", "{}", String::from_utf8_lossy(&line));
    }
    // And the webhook still answers.
    let (status, _) = webhook.post(b"not json");
    assert_eq!(status, 400);
}
