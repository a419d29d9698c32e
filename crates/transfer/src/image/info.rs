//! What an image holds, for people: [`ImageInfo`] (`precopy image info`),
//! and the helpers behind the other `precopy image` commands.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{IMAGE_VERSION, Image, NEVER, ZERO};
use crate::error::ImageError;
use crate::layout::MemoryRegion;

/// One round as recorded in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundInfo {
    /// The round number.
    pub round: u64,
    /// Pages stored with contents.
    pub pages: u64,
    /// Pages stored as zeros.
    pub zero_pages: u64,
}

/// What `precopy image info` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The image file.
    pub path: PathBuf,
    /// Format version.
    pub version: u32,
    /// Page size.
    pub page_size: u64,
    /// The layout's regions.
    pub regions: Vec<MemoryRegion>,
    /// Bytes the layout covers.
    pub total_len: u64,
    /// Rounds that ended in the image.
    pub rounds: Vec<RoundInfo>,
    /// Distinct pages whose latest copy holds data.
    pub data_pages: u64,
    /// Distinct pages whose latest copy is zeros.
    pub zero_pages: u64,
    /// Pages no record in the file holds (read as zeros): never sent, or, in an incomplete
    /// image, perhaps sent after the cut.
    pub never_sent_pages: u64,
    /// The round that began but did not end before the cut (incomplete images only): what its
    /// whole records hold. Its pages are not used: `cat --incomplete` reads the rounds that
    /// ended.
    pub unfinished_round: Option<RoundInfo>,
    /// Pages only the unfinished round holds: sent, but not usable (counted neither as data,
    /// zero, nor never sent).
    pub unfinished_only_pages: u64,
    /// Whether the image is complete: its records, final checksum, index
    /// and trailer are all present and well formed. Says nothing about the
    /// page data, which `info` does not read: [`Image::verify`] checks that.
    pub complete: bool,
    /// The recorded memory checksum, when complete.
    pub memory_checksum: Option<u64>,
    /// Bytes of the state blob, if the image holds one.
    pub state_bytes: Option<u64>,
    /// Why the image is incomplete, if it is.
    pub incomplete_reason: Option<String>,
    /// File size.
    pub file_len: u64,
}

impl Image {
    /// Summary for `precopy image info`.
    pub fn info(&self) -> ImageInfo {
        let count = |f: &dyn Fn(u64) -> bool| self.loc.iter().filter(|&&l| f(l)).count() as u64;
        let unfinished_only = self.unfinished.map_or(0, |u| u.1);
        ImageInfo {
            path: self.path.clone(),
            version: IMAGE_VERSION,
            page_size: self.layout.page_size(),
            regions: self.layout.regions().to_vec(),
            total_len: self.layout.total_len(),
            rounds: self.rounds.clone(),
            data_pages: count(&|l| l < ZERO),
            zero_pages: count(&|l| l == ZERO),
            never_sent_pages: count(&|l| l == NEVER) - unfinished_only,
            unfinished_round: self.unfinished.map(|u| u.0),
            unfinished_only_pages: unfinished_only,
            complete: self.complete,
            memory_checksum: self.checksum,
            state_bytes: self.state.map(|s| s.1),
            incomplete_reason: self.incomplete_reason.clone(),
            file_len: self.file_len,
        }
    }
}

impl std::fmt::Display for ImageInfo {
    /// The human-readable form `precopy image info` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "image:      {}", self.path.display())?;
        writeln!(
            f,
            "format:     version {}, {} bytes",
            self.version, self.file_len
        )?;
        match (self.complete, &self.incomplete_reason) {
            (true, _) => writeln!(
                f,
                "status:     complete (all records present), memory checksum {:#018x}",
                self.memory_checksum.unwrap_or(0)
            )?,
            (false, reason) => writeln!(
                f,
                "status:     INCOMPLETE ({})",
                reason.as_deref().unwrap_or("unknown")
            )?,
        }
        writeln!(
            f,
            "layout:     {} region(s), {} bytes, {}-byte pages",
            self.regions.len(),
            self.total_len,
            self.page_size
        )?;
        let mut offset = 0;
        for r in &self.regions {
            write!(
                f,
                "  region {}: memory offsets {:#x}-{:#x} ({} bytes, {}-byte pages",
                r.id,
                offset,
                offset + r.size,
                r.size,
                r.page_size
            )?;
            if let Some(gpa) = r.guest_addr {
                write!(f, ", guest-physical {gpa:#x}")?;
            }
            if let Some(b) = r.backing {
                write!(f, ", {b:?}")?;
            }
            writeln!(f, ")")?;
            offset += r.size;
        }
        if let Some(n) = self.state_bytes {
            writeln!(f, "state:      {n} bytes")?;
        }
        writeln!(f, "rounds:     {}", self.rounds.len())?;
        for r in &self.rounds {
            writeln!(
                f,
                "  round {:>4}: {} pages, {} zero pages",
                r.round, r.pages, r.zero_pages
            )?;
        }
        if let Some(r) = &self.unfinished_round {
            writeln!(
                f,
                "  round {:>4}: UNFINISHED, cut short after {} pages, {} zero pages (not used)",
                r.round, r.pages, r.zero_pages
            )?;
        }
        if self.complete {
            write!(
                f,
                "pages:      {} with data, {} zero, {} never sent",
                self.data_pages, self.zero_pages, self.never_sent_pages
            )
        } else {
            write!(
                f,
                "pages:      {} with data, {} zero (in the rounds that ended); {} only in the unfinished round; {} in no record before the cut (never sent, or sent after it)",
                self.data_pages, self.zero_pages, self.unfinished_only_pages, self.never_sent_pages
            )
        }
    }
}

/// `precopy image info IMG`: the image's layout, rounds, pages and status.
/// Works on incomplete images (`complete` is then false).
pub fn image_info(path: impl AsRef<Path>) -> Result<ImageInfo, ImageError> {
    Ok(Image::open(path)?.info())
}

/// `precopy image cat IMG --range START-END`: writes the raw bytes at memory
/// offsets `range` as the image holds them (zeros for pages never sent).
pub fn image_cat(
    path: impl AsRef<Path>,
    range: Range<u64>,
    out: &mut dyn Write,
) -> Result<(), ImageError> {
    Image::open(path)?.read_span(range, out)
}

/// Parses `START-END` (each decimal or `0x` hex) into a half-open range;
/// `None` if malformed or `END < START`.
pub fn parse_span(s: &str) -> Option<Range<u64>> {
    let (a, b) = s.split_once('-')?;
    let num = |t: &str| {
        let t = t.trim();
        match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => t.parse().ok(),
        }
    };
    let (a, b) = (num(a)?, num(b)?);
    (a <= b).then_some(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse_span("0x1000-0x2000"), Some(0x1000..0x2000));
        assert_eq!(parse_span("10-20"), Some(10..20));
        assert_eq!(parse_span("20-10"), None);
        assert_eq!(parse_span("x-10"), None);
        assert_eq!(parse_span("10"), None);
    }
}
