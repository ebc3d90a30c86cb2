//! etcd and kube-apiserver, built from their Go modules (`build.sh`), started on 127.0.0.1 on
//! ephemeral ports with the flags envtest uses, plus what a real cluster has and envtest leaves
//! out: RBAC and the Node authorizer, ServiceAccount admission, bound ServiceAccount tokens
//! (TokenRequest) and mutating admission webhooks.
//!
//! Who is who: the tests are `admin` (system:masters), the test kubelet is
//! `system:node:NODE` (group system:nodes, so the Node authorizer limits it to its own pods'
//! secrets and tokens, as a kubelet is), and its scheduler is `system:kube-scheduler`. Each gets
//! a static bearer token and a kubeconfig in the cluster's directory.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The users of the control plane, by the name of their kubeconfig.
pub const ADMIN: &str = "admin";
pub const KUBELET: &str = "kubelet";
pub const SCHEDULER: &str = "scheduler";

pub struct ControlPlane {
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub server: String,
    /// The CA that signed the API server's certificate.
    pub ca_pem: String,
    // Dropped in reverse: the API server before etcd.
    processes: Vec<Process>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver from `bin` (`build.sh OUT k8s`) with their state in `dir`.
    /// The error names the component that failed and shows its log's tail.
    pub fn start(bin: &Path, dir: &Path, node: &str) -> Result<ControlPlane, String> {
        // Their ports are found free a moment before they bind them: another process may
        // take one in between, and the server exits. Everything starts again, twice at most.
        let mut tries = 0;
        loop {
            match ControlPlane::start_once(bin, dir, node) {
                Err(e) if e.contains("address already in use") && tries < 2 => {
                    tries += 1;
                    eprintln!(
                        "a control-plane server lost its port to another process: starting again"
                    );
                    fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                started => return started,
            }
        }
    }

    fn start_once(bin: &Path, dir: &Path, node: &str) -> Result<ControlPlane, String> {
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).map_err(|e| format!("{}: {e}", pki.display()))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, String> {
            let path = pki.join(name);
            fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        };

        let ca = Ca::new();
        let (server_cert, server_key) = ca.issue(&["127.0.0.1", "localhost"]);
        let sa_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let tokens = [
            (ADMIN, "admin", "system:masters"),
            (KUBELET, &*format!("system:node:{node}"), "system:nodes"),
            (SCHEDULER, "system:kube-scheduler", ""),
        ]
        .map(|(file, user, group)| (file, user.to_owned(), group, random_token()));
        let token_csv: String = tokens
            .iter()
            .map(|(_, user, group, token)| format!("{token},{user},{user},\"{group}\"\n"))
            .collect();

        let ca_file = write("ca.crt", &ca.pem)?;
        let cert_file = write("apiserver.crt", &server_cert)?;
        let key_file = write("apiserver.key", &server_key)?;
        let sa_file = write("sa.key", &sa_key.serialize_pem())?;
        let sa_public = write("sa.pub", &sa_key.public_key_pem())?;
        let tokens_file = write("tokens.csv", &token_csv)?;

        let mut processes = Vec::new();
        let (etcd_client, etcd_peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .args(["--logger=zap", "--log-level=warn", "--unsafe-no-fsync"])
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            // No metrics or pprof listener of its own on a default port.
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                free_port()?
            ));
        processes.push(Process::spawn("etcd", &mut etcd, dir)?);

        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", cert_file.display()))
            .arg(format!("--tls-private-key-file={}", key_file.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg(format!("--token-auth-file={}", tokens_file.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg(format!("--service-account-issuer={server}"))
            .arg(format!(
                "--service-account-key-file={}",
                sa_public.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_file.display()
            ))
            .args([
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                // No kube-proxy or Endpoints for the loopback address.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ]);
        processes.push(Process::spawn("kube-apiserver", &mut apiserver, dir)?);

        let plane = ControlPlane {
            dir: dir.to_owned(),
            server,
            ca_pem: ca.pem.clone(),
            processes,
        };
        for (name, user, _, token) in &tokens {
            plane.write_kubeconfig(name, user, token)?;
        }
        plane.wait_ready(&tokens[0].3, Duration::from_secs(60))?;
        Ok(plane)
    }

    /// The kubeconfig of one of [`ADMIN`], [`KUBELET`], [`SCHEDULER`].
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.kubeconfig"))
    }

    fn write_kubeconfig(&self, name: &str, user: &str, token: &str) -> Result<(), String> {
        let path = self.kubeconfig(name);
        let ca = self.dir.join("pki/ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n\
             current-context: test\n",
            self.server,
            ca.display()
        );
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Polls `/readyz` until the API server answers 200; fails with the log of whichever
    /// process died, or of the API server when time runs out.
    fn wait_ready(&self, token: &str, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            for process in &self.processes {
                process.check_alive()?;
            }
            let ready = Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--max-time", "2", "--cacert"])
                .arg(self.dir.join("pki/ca.crt"))
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .arg(format!("{}/readyz", self.server))
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("curl: {e}"))?;
            if ready.success() {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "kube-apiserver was not ready after {limit:?}\n{}",
                    self.processes[1].log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A child process that is stopped (TERM, then KILL) when dropped. Its output goes to
/// `DIR/NAME.log`.
pub struct Process {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Result<Process, String> {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        // Its own process group: a Ctrl-C at the terminal stops the cluster in order, through
        // its parent, instead of reaching etcd and the API server first.
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Process {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the process and showing its log's tail if it has exited.
    pub fn check_alive(&self) -> Result<(), String> {
        // SAFETY: waitid with WNOWAIT only peeks at the child's state.
        let exited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() != 0
        };
        if exited {
            return Err(format!("{} exited\n{}", self.name, self.log_tail()));
        }
        Ok(())
    }

    /// The last 40 lines of the log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    pub fn stop(&mut self, grace: Duration) {
        // SAFETY: signalling our own child, which we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The cluster's certificate authority.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "emissary test cluster CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(
            params,
            rcgen::KeyPair::generate().expect("key pair"),
        )
        .expect("self-signed CA");
        let pem = issuer.pem();
        Ca { issuer, pem }
    }

    /// A serving certificate for `names` (IP addresses or DNS names): (cert PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key pair");
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = rcgen::CertificateParams::new(names)
            .expect("certificate params")
            .signed_by(&key, &self.issuer)
            .expect("signed certificate");
        (cert.pem(), key.serialize_pem())
    }
}

impl Default for Ca {
    fn default() -> Ca {
        Ca::new()
    }
}

/// A port nothing listens on now (the kernel's next ephemeral one).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
