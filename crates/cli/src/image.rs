//! `precopy image`: inspect and check checkpoint images (the files an
//! `ImageWriter` writes).
//!
//! - `info IMG [--json]`: layout, rounds, page counts and whether the image is
//!   complete. Works on incomplete images and says why they are incomplete.
//! - `cat IMG --range START-END`: the raw bytes of source addresses
//!   `START..END` as the image holds them (zeros for pages never sent), to
//!   stdout.
//! - `verify IMG [--json]`: every record's CRC, the index and the memory
//!   checksum. Exits 0 only for a complete image that passes every check; an
//!   incomplete or damaged image is an error.
//!
//! All the work is in `precopy_transfer::image`; this module only parses
//! arguments and prints. Errors are returned, never printed here: `main`
//! reports them once.

use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use precopy_transfer::VerifyReport;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Show an image's layout, rounds, page counts and whether it is complete.
    Info {
        /// The image file.
        image: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the bytes of source addresses START..END, as the image holds them, to stdout.
    Cat {
        /// The image file.
        image: PathBuf,
        /// Half-open span of source addresses, each decimal or 0x hex (e.g. 0x1000-0x2000).
        #[arg(long, value_name = "START-END", value_parser = span)]
        range: Range<u64>,
    },
    /// Check every record, the index and the memory checksum; exit 0 only if the image is
    /// complete and intact.
    Verify {
        /// The image file.
        image: PathBuf,
        /// On success, print one JSON object instead of text (failures go to stderr).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.command {
        ImageCommand::Info { image, json } => info(&image, json),
        ImageCommand::Cat { image, range } => cat(&image, range),
        ImageCommand::Verify { image, json } => verify(&image, json),
    }
}

fn info(image: &Path, json: bool) -> Result<ExitCode> {
    let info = precopy_transfer::image_info(image)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{info}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cat(image: &Path, range: Range<u64>) -> Result<ExitCode> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let written = precopy_transfer::image_cat(image, range, &mut out)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(out.flush()?));
    match written {
        // A reader that stopped early (`| head`) is not a failure of ours.
        Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}

/// What `verify --json` prints on success.
#[derive(Serialize)]
struct Verified<'a> {
    path: &'a Path,
    complete: bool,
    #[serde(flatten)]
    report: VerifyReport,
}

fn verify(image: &Path, json: bool) -> Result<ExitCode> {
    // An incomplete image is an error like any other: the library's message
    // ("image X is incomplete: <why>") says so.
    let report = precopy_transfer::image_verify(image).context("verification failed")?;
    if json {
        let out = Verified {
            path: image,
            complete: true,
            report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}: OK, complete; {} records in {} rounds checked, memory checksum {:#010x}",
            image.display(),
            report.records,
            report.rounds,
            report.memory_checksum
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--range` parser: `START-END`, each decimal or `0x` hex, `START <= END`.
fn span(s: &str) -> Result<Range<u64>, String> {
    precopy_transfer::parse_span(s)
        .ok_or_else(|| format!("expected START-END (decimal or 0x hex, START <= END), got {s:?}"))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_argument() {
        assert_eq!(span("0x1000-0x2000"), Ok(0x1000..0x2000));
        assert!(span("0x2000-0x1000").is_err());
        assert!(span("0x1000").is_err());
    }
}
