//! `precopy image`: inspect and check checkpoint images (the files an
//! `ImageWriter` writes).
//!
//! - `info IMG [--verify] [--json]`: layout, rounds, page counts, whether the
//!   image is complete (every record present) and, with `--verify`, whether it
//!   is verified (every checksum checked). Works on incomplete images (cut
//!   anywhere, even before the first record) and says why they are incomplete;
//!   a damaged one is shown up to the damage and fails, "corrupt" as `verify`
//!   says.
//! - `cat IMG --range START-END [--incomplete]`: the raw bytes at memory
//!   offsets `START..END` (the image's regions back to back in id order, as
//!   `info` lists them) as the image holds them (zeros for pages never
//!   sent), to stdout. Every page of the span is checked against its CRC
//!   before any byte is written; a damaged page fails the command with
//!   nothing written. An incomplete
//!   image is refused unless `--incomplete`.
//! - `verify IMG [--json]`: every record's CRC, the index and the memory
//!   checksum. Exits 0 only for a complete image that passes every check; an
//!   incomplete or damaged image is an error.
//!
//! All the work is in `precopy_transfer::image`; this module only parses
//! arguments and prints. Errors are returned, never printed here: `main`
//! reports them once.

use crate::output::outln;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use precopy_transfer::VerifyReport;
use serde::Serialize;

use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Show an image's layout, rounds, page counts and whether it is complete (all records
    /// present) and, with --verify, verified (every checksum checked). A cut image is
    /// incomplete (status 0); a damaged one is corrupt (status 1, as `verify` says).
    Info {
        /// The image file.
        image: PathBuf,
        /// Also check every record's CRC, the index and the memory checksum (reads the whole
        /// file); exit non-zero if a check fails.
        #[arg(long)]
        verify: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the bytes at memory offsets START..END (regions back to back in id order, as `info`
    /// lists them), as the image holds them, to stdout.
    /// Every page written is checked against its CRC first; a damaged page is an error.
    Cat {
        /// The image file.
        image: PathBuf,
        /// Half-open span of memory offsets, each decimal or 0x hex (e.g. 0x1000-0x2000).
        #[arg(long, value_name = "START-END", value_parser = span, allow_hyphen_values = true)]
        range: Span,
        /// Read an incomplete image anyway: the rounds that ended before the cut, pages not
        /// sent in them as zeros (which need not be the source's bytes).
        #[arg(long)]
        incomplete: bool,
    },
    /// Check every record, the index and the memory checksum; exit 0 only if the image is
    /// complete and intact.
    Verify {
        /// The image file.
        image: PathBuf,
        /// Print one JSON object instead of text (on failure too).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (ImageCommand::Info { image, .. }
    | ImageCommand::Cat { image, .. }
    | ImageCommand::Verify { image, .. }) = &args.command;
    check_image_arg(image)?;
    match args.command {
        ImageCommand::Info {
            image,
            verify,
            json,
        } => info(&image, verify, json),
        ImageCommand::Cat {
            image,
            range,
            incomplete,
        } => cat(&image, range, incomplete),
        ImageCommand::Verify { image, json } => verify(&image, json),
    }
}

fn info(image: &Path, check: bool, json: bool) -> Result<ExitCode> {
    let mut info = precopy_transfer::image_info(image)?;
    // Damage is corruption, as `verify` says, whether or not --verify was asked: the info is
    // shown (what the records before it hold, none for a damaged preamble or first record),
    // then the command fails.
    let damage = match info.corrupt {
        false => None,
        true => match precopy_transfer::Image::open(image) {
            Ok(img) => img.damage(),
            Err(e) => Some(e),
        },
    };
    let checked = match damage {
        Some(e) => Some(Err(anyhow::Error::from(e))),
        None => check.then(|| precopy_transfer::image_verify(image).context("verification failed")),
    };
    // Damage only the page data shows (a page that fails its hash, the memory checksum):
    // corrupt too, in the status and in `"corrupt"`.
    if let Some(Err(e)) = &checked
        && !info.corrupt
        && let Some(reason) = e
            .downcast_ref::<precopy_transfer::ImageError>()
            .and_then(precopy_transfer::ImageError::damage_reason)
    {
        info.mark_corrupt(reason);
    }
    let verified = matches!(checked, Some(Ok(_)));
    let verified_text = match &checked {
        None if info.complete => {
            "no (page data not read: `precopy image verify` or `image info --verify` checks it)"
        }
        None => "no (incomplete)",
        Some(Ok(_)) => "yes (every record's CRC, the index and the memory checksum)",
        Some(Err(_)) if info.corrupt => "NO: corrupt",
        Some(Err(_)) => "NO: a check failed",
    };
    if json {
        let mut v = serde_json::to_value(&info)?;
        v["verified"] = verified.into();
        v["verify_checked"] = check.into();
        match checked {
            Some(Err(e)) => return Err(output::fail(true, v, e)),
            _ => output::print_json(v, None),
        }
    } else {
        outln!("{info}");
        outln!("verified:   {verified_text}");
        if let Some(Err(e)) = checked {
            return Err(e);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cat(image: &Path, range: Span, incomplete: bool) -> Result<ExitCode> {
    let img = precopy_transfer::Image::open(image)?;
    // A span outside the layout is the value's fault (status 2), known once the image is open.
    let total = img.layout().total_len();
    if range.span.end > total {
        return Err(crate::args::invalid(
            "--range",
            &range.typed,
            format!(
                "ends beyond the image's memory, which spans offsets 0-{total:#x} ({})",
                crate::args::human(total)
            ),
            format!(
                "use a span within 0-{total:#x} (regions back to back, as `precopy image info` lists them)"
            ),
        ));
    }
    if !img.is_complete() {
        let info = img.info();
        let reason = info.incomplete_reason.as_deref().unwrap_or("unknown");
        // Damaged, or cut: said in the word `verify` uses.
        let (what, ended) = match info.corrupt {
            true => ("corrupt", "before the damage"),
            false => ("incomplete", "before the cut"),
        };
        if !incomplete {
            bail!(
                "image {} is {what} ({reason}): it holds no finished copy of the source's \
                 memory; pass --incomplete to read the {} round(s) that ended {ended}",
                image.display(),
                info.rounds_ended
            );
        }
        crate::output::errln!(
            "precopy: warning: image {} is {what} ({reason}); showing the {} round(s) that \
             ended {ended}, pages not sent in them as zeros",
            image.display(),
            info.rounds_ended
        );
    }
    // Every page of the span is checked before the first byte goes out: a damaged page fails
    // the command with nothing written, never after a partial copy. (The pages are read twice;
    // the second read checks them again.)
    let range = range.span;
    img.read_span(range.clone(), &mut io::sink())?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let written = img
        .read_span(range, &mut out)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(out.flush()?));
    match written {
        // A reader that stopped early (`| head`) is not a failure of ours.
        Err(e) if output::is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}

/// Refuses an `IMAGE` argument that names nothing readable as a file (missing, a directory, a
/// FIFO, a device, unreadable) as bad input, like a bad flag value (status 2); what the file
/// holds is checked by the command itself (a file that is no image, or a damaged one, fails
/// it: status 1).
fn check_image_arg(image: &Path) -> Result<()> {
    let problem = match std::fs::metadata(image) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => format!("cannot be read ({e})"),
        Ok(m) => match precopy_transfer::not_regular(&m) {
            Some(kind) => format!("is {kind}, not an image file"),
            None => return Ok(()),
        },
    };
    Err(crate::args::invalid(
        "IMAGE",
        image.display(),
        problem,
        "name an image file, e.g. one `precopy send --to file:PATH` or `precopy recv` wrote",
    ))
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
    let report = match precopy_transfer::image_verify(image).context("verification failed") {
        Ok(r) => r,
        Err(e) => {
            let complete = precopy_transfer::image_info(image).is_ok_and(|i| i.complete);
            let v = serde_json::json!({ "path": image, "complete": complete, "verified": false });
            return Err(output::fail(json, v, e));
        }
    };
    if json {
        let mut v = serde_json::to_value(Verified {
            path: image,
            complete: true,
            report,
        })?;
        v["verified"] = true.into();
        output::print_json(v, None);
    } else {
        outln!(
            "{}: OK, complete and verified; {} records in {} rounds checked, memory checksum {:#018x}",
            image.display(),
            report.records,
            report.rounds,
            report.memory_checksum
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--range` as typed: `START-END`, each decimal or `0x` hex, `START <= END`.
#[derive(Debug, Clone)]
struct Span {
    span: Range<u64>,
    typed: String,
}

/// `--range` parser (see [`Span`]).
fn span(s: &str) -> Result<Span, String> {
    parse_range(s).map(|span| Span {
        span,
        typed: s.trim().to_string(),
    })
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    if s.trim_start().starts_with('-') {
        return Err(
            "memory offsets cannot be negative: use START-END, e.g. 0-0x1000 (see `image info`)"
                .into(),
        );
    }
    precopy_transfer::parse_span(s).ok_or_else(|| {
        // A number past 64 bits is too large, not malformed (as for sizes).
        let past_64_bits = |p: &str| {
            let (digits, radix) = p.strip_prefix("0x").map_or((p, 10), |h| (h, 16));
            u64::from_str_radix(digits, radix)
                .is_err_and(|e| *e.kind() == std::num::IntErrorKind::PosOverflow)
        };
        match s.trim().split_once('-') {
            Some((a, b)) if past_64_bits(a.trim()) || past_64_bits(b.trim()) => {
                "too large: memory offsets are at most 0xffffffffffffffff (see `image info`)".into()
            }
            _ => "expected START-END, each decimal or 0x hex with START <= END, e.g. 0x1000-0x2000"
                .into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_argument() {
        assert_eq!(parse_range("0x1000-0x2000"), Ok(0x1000..0x2000));
        assert!(parse_range("0x2000-0x1000").is_err());
        assert!(parse_range("0x1000").is_err());
        for huge in ["0x0-0xffffffffffffffffff", "99999999999999999999-1"] {
            let e = parse_range(huge).unwrap_err();
            assert!(e.starts_with("too large"), "{huge}: {e}");
        }
        assert!(
            parse_range("0x1000-zz")
                .unwrap_err()
                .starts_with("expected")
        );
        assert_eq!(span(" 0-8192").map(|s| s.typed), Ok("0-8192".to_string()));
    }
}
