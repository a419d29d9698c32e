//! `precopy image` (being built; see the open issue).

use anyhow::Result;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<ExitCode> {
    anyhow::bail!("`precopy image` is not built yet")
}
