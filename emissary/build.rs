//! Stamps the binary with its git commit and target for `emissary version`.
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=EMISSARY_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=EMISSARY_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    for path in ["../.git/HEAD", "../.git/refs/heads"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
