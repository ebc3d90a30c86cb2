//! The real emissary-agent as a child process, for the black-box tests, the benchmarks and
//! the soak: started on ephemeral ports (its ready file says which), tokens minted with its own
//! `token` command, raw HTTP to it, kill -9 and restart.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{agent_bin, kill, release_agent_bin, wait_until};

/// A running emissary-agent, its data, secret, ready file and log under `dir`; killed when
/// dropped.
pub struct Agent {
    pub dir: PathBuf,
    /// The node it serves (`node-1` unless started with [`Agent::start_on`]).
    pub node: String,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    bin: PathBuf,
    /// `RUST_LOG`: `info` in the tests (their failures print the log), `warn` where measured.
    log_level: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent whose data lives in `dir`, with extra `serve` flags.
    pub fn start(dir: PathBuf, args: &[&str]) -> Agent {
        Agent::start_with_env(dir, args, &[])
    }

    /// [`Agent::start`] with extra environment variables (e.g. S3 credentials).
    pub fn start_with_env(dir: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_on("node-1", dir, args, env)
    }

    /// [`Agent::start_with_env`] for node `node`.
    pub fn start_on(node: &str, dir: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_listening(node, dir, "127.0.0.1:0", args, env)
    }

    /// [`Agent::start_on`] with its API on `listen`.
    pub fn start_listening(
        node: &str,
        dir: PathBuf,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::launched(agent_bin(), "info", node, dir, listen, args, env)
    }

    /// The release build, logging warnings only: what the benchmarks and the soak measure.
    pub fn start_release(dir: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let bin = release_agent_bin();
        Agent::launched(bin, "warn", "node-1", dir, "127.0.0.1:0", args, env)
    }

    fn launched(
        bin: PathBuf,
        log_level: &'static str,
        node: &str,
        dir: PathBuf,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        std::fs::create_dir_all(&dir).unwrap();
        let mut agent = Agent {
            dir,
            bin,
            log_level,
            node: node.to_owned(),
            api: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        agent.launch(listen);
        agent
    }

    fn launch(&mut self, listen: &str) {
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = serve_command_with(&self.bin, &self.node, &self.dir, listen)
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", self.log_level)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = wait_until(Duration::from_secs(20), || ready.exists());
        assert!(
            started,
            "the agent did not become ready; log:\n{}",
            self.log()
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
        self.api = json["api"].as_str().unwrap().parse().unwrap();
        self.admin = json["admin"].as_str().unwrap().parse().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// kill -9, then the same agent again (same data dir and API port).
    pub fn crash_and_restart(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let listen = self.api.to_string();
        self.launch(&listen);
    }

    /// SIGTERM; returns the exit status once it stopped.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        kill(child.id(), libc::SIGTERM);
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "the agent did not stop on SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A token from `emissary-agent token`.
    pub fn token(&self, workflow: &str, task: &str, attempt: u32, ttl: &str) -> String {
        self.token_with(&[
            "--task",
            task,
            "--attempt",
            &attempt.to_string(),
            "--workflow",
            workflow,
            "--ttl",
            ttl,
        ])
    }

    /// A token from `emissary-agent token ARGS` with this agent's key.
    pub fn token_with(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("token")
            .args(args)
            .arg("--secret-file")
            .arg(self.dir.join("secret"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "emissary-agent token {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Every file under the agent's local store, relative to it.
    pub fn store_files(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let relative = path.strip_prefix(root).unwrap();
                    out.push(relative.to_string_lossy().into_owned());
                }
            }
        }
        let root = self.dir.join("data/store");
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http(self.admin, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The environment that points an emissary at this agent as task `task`.
    pub fn emissary_env(&self, cmd: &mut Command, workflow: &str, task: &str, attempt: u32) {
        cmd.env("EMISSARY_AGENT_ADDR", self.api.to_string())
            .env("EMISSARY_TOKEN", self.token(workflow, task, attempt, "1h"))
            .env("EMISSARY_TASK_ID", task)
            .env("EMISSARY_ATTEMPT", attempt.to_string());
    }
}

/// `emissary-agent serve` on 127.0.0.1 as node `node-1`, with its data and node secret (made
/// when missing) under `dir`.
pub fn serve_command(dir: &Path, listen: &str) -> Command {
    serve_command_for("node-1", dir, listen)
}

/// [`serve_command`] as node `node`.
pub fn serve_command_for(node: &str, dir: &Path, listen: &str) -> Command {
    serve_command_with(&agent_bin(), node, dir, listen)
}

fn serve_command_with(bin: &Path, node: &str, dir: &Path, listen: &str) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let secret = dir.join("secret");
    if !secret.exists() {
        std::fs::write(&secret, format!("{}\n", crate::controller::NODE_SECRET)).unwrap();
    }
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", listen, "--admin-listen", "127.0.0.1:0"])
        .args(["--node", node])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--secret-file")
        .arg(secret);
    cmd
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 request; returns the status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    read_response(stream)
}

pub fn read_response(stream: impl Read) -> (u16, Vec<u8>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
        if name.eq_ignore_ascii_case("transfer-encoding") && value.trim() == "chunked" {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    (status, body)
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub fn auth(token: &str) -> [(&'static str, String); 1] {
    [("Authorization", bearer(token))]
}
