//! emissary-agent: the per-node daemon (skeleton; the server lands with the agent issue).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "emissary-agent",
    about = "The per-node emissary agent.",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Version => println!("emissary-agent {}", env!("CARGO_PKG_VERSION")),
    }
    std::process::ExitCode::SUCCESS
}
