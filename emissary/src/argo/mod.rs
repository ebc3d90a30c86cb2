//! The Argo adapter: Argo's executor command line, files and environment over `task`, so that
//! an unmodified workflow-controller whose `executor.image` is ours runs its pods on emissary.
//!
//! Invoked as `argoexec` (the image's `/bin/argoexec`, and the copy `init` installs as
//! `/var/run/argo/argoexec`): `init` installs the binary, writes the template and script,
//! logs in to the node agent and stages the inputs; `wait` ends at once (nothing waits beside
//! `main`: its own emissary reports); `emissary -- CMD...` runs a main container or sidecar;
//! `kill SIG PID` signals. What emissary does not do (resource, data and HTTP templates,
//! artifact GC and plugins, v4.1's init-less `supervisor`) fails at once with a message that
//! says so. Argo's global flags (`--loglevel`, `--log-format`, `--gloglevel`, `--kubeconfig`,
//! kubectl's, and whatever `executor.args` adds) are accepted and ignored.
//!
//! The emissary's own failures exit 64 with the reason in `/dev/termination-log`, which the
//! controller shows in the node's message, as argoexec does.

mod agent;
mod container;
mod init;

use std::ffi::OsString;
use std::path::Path;

/// Argo's shared volume in every container of its pods.
pub const VAR_RUN_ARGO: &str = "/var/run/argo";
/// The exit code of argoexec's own failures.
pub const FAILED: i32 = 64;
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// True when this binary runs as Argo's executor (by the name it was started with).
pub fn invoked_as_argoexec(arg0: &OsString) -> bool {
    Path::new(arg0).file_name().is_some_and(|n| n == "argoexec")
}

/// `argoexec SUBCOMMAND [FLAGS] [-- CMD ARGS...]`; returns the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    let (subcommand, words, command) = match parse(args) {
        Ok(parsed) => parsed,
        Err(message) => return fail(&message),
    };
    let result = match subcommand.as_str() {
        "init" => init::init(),
        "wait" => Ok(0),
        "emissary" => return container::run(command),
        "kill" => kill(&words),
        "version" => {
            println!("argoexec (emissary) {}", crate::version::describe());
            Ok(0)
        }
        "resource"
        | "data"
        | "agent"
        | "artifact"
        | "artifact-plugin-init"
        | "artifact-plugin-sidecar"
        | "supervisor" => Err(unsupported(&subcommand)),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(code) => code,
        Err(message) => fail(&message),
    }
}

fn unsupported(subcommand: &str) -> String {
    let what = match subcommand {
        "resource" => "resource templates",
        "data" => "data templates",
        "agent" => "HTTP and plugin templates (Argo's agent pod)",
        "artifact" => "artifact garbage collection (artifactGC)",
        "artifact-plugin-init" | "artifact-plugin-sidecar" => "artifact plugins (artifactDrivers)",
        _ => "the init-less pod layout (initlessPod), which replaces init and wait by a supervisor",
    };
    format!(
        "argoexec {subcommand}: {what} are not supported by emissary \
         (github.com/emissary-executor/emissary); use Argo's own executor image for them"
    )
}

/// Says why on stderr and in the termination message; exits [`FAILED`].
pub fn fail(message: &str) -> i32 {
    crate::note!("argoexec: {message}");
    let _ = std::fs::write(TERMINATION_LOG, message);
    FAILED
}

/// Flags Argo's executor takes a value for (its own and kubectl's).
const VALUE_FLAGS: [&str; 18] = [
    "--loglevel",
    "--log-format",
    "--gloglevel",
    "--kubeconfig",
    "--context",
    "--cluster",
    "--user",
    "--namespace",
    "-n",
    "--server",
    "-s",
    "--token",
    "--as",
    "--as-group",
    "--certificate-authority",
    "--client-certificate",
    "--client-key",
    "--request-timeout",
];

/// The subcommand, its other words, and what follows `--`; flags dropped.
fn parse(args: Vec<OsString>) -> Result<(String, Vec<String>, Vec<OsString>), String> {
    let mut args = args.into_iter().skip(1);
    let mut words = Vec::new();
    let mut command = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--" {
            command.extend(args.by_ref());
            break;
        }
        let text = arg.to_string_lossy();
        if text.starts_with('-') {
            // `--flag value` for the ones that take one, `--flag=value` and booleans otherwise.
            if VALUE_FLAGS.contains(&text.as_ref()) {
                args.next();
            }
            continue;
        }
        words.push(text.into_owned());
    }
    if words.is_empty() {
        return Err("a command is required (init, wait, emissary, kill, version)".into());
    }
    Ok((words.remove(0), words, command))
}

/// `argoexec kill SIGNAL PID` (what Argo's controller execs to stop a container).
fn kill(words: &[String]) -> Result<i32, String> {
    let [signal, pid] = words else {
        return Err("usage: argoexec kill SIGNAL PID".into());
    };
    let signal: i32 = signal
        .parse()
        .map_err(|_| format!("kill: signal {signal:?} is not a number"))?;
    let pid: i32 = pid
        .parse()
        .map_err(|_| format!("kill: pid {pid:?} is not a number"))?;
    // SAFETY: kill(2) with plain integers.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(format!(
            "kill -{signal} {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(0)
}

/// The Argo template, as Argo passes it: `ARGO_TEMPLATE` (or, when Argo offloaded a large one,
/// the file of its ConfigMap), else the copy `init` wrote to `/var/run/argo/template`.
fn template_file() -> Result<Option<std::path::PathBuf>, String> {
    if crate::env_any(&["ARGO_TEMPLATE"]).as_deref() == Some("offloaded") {
        return Ok(Some("/argo/config/ARGO_TEMPLATE".into()));
    }
    if crate::env_any(&["ARGO_TEMPLATE"]).is_some() {
        return Ok(None);
    }
    let copy = Path::new(VAR_RUN_ARGO).join("template");
    if copy.exists() {
        return Ok(Some(copy));
    }
    Err("no template: neither ARGO_TEMPLATE nor /var/run/argo/template".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[&str]) -> (String, Vec<String>, Vec<OsString>) {
        parse(args.iter().map(OsString::from).collect()).unwrap()
    }

    #[test]
    fn argos_flags_are_accepted_wherever_they_are() {
        let (sub, rest, command) = words(&[
            "argoexec",
            "emissary",
            "--loglevel",
            "info",
            "--log-format",
            "text",
            "--gloglevel",
            "0",
            "--kubeconfig=/x",
            "--insecure-skip-tls-verify",
            "--",
            "sh",
            "-c",
            "echo --x",
        ]);
        assert_eq!(sub, "emissary");
        assert!(rest.is_empty());
        assert_eq!(command, ["sh", "-c", "echo --x"]);
        let (sub, rest, _) = words(&["argoexec", "--loglevel", "warn", "kill", "15", "1"]);
        assert_eq!(
            (sub.as_str(), rest),
            ("kill", vec!["15".into(), "1".into()])
        );
    }

    #[test]
    fn what_emissary_does_not_do_is_named() {
        let message = unsupported("resource");
        assert!(message.contains("resource templates") && message.contains("emissary"));
    }
}
