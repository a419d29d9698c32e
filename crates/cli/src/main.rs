//! `precopy`: probe the kernel, run the pre-copy demo, benchmark tracking backends, inspect
//! checkpoint images.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod probe;

#[derive(Debug, Parser)]
#[command(
    name = "precopy",
    version,
    about = "Find written pages and stream them elsewhere"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this kernel offers and self-test the semantics the engine relies on.
    Probe(probe::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRECOPY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => probe::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("precopy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
