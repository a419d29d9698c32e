//! What an image holds, for people: [`ImageInfo`] (`precopy image info`),
//! and the helpers behind the other `precopy image` commands.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// What the addresses of an image's regions ([`MemoryRegion::guest_addr`]) are. In JSON:
/// `"guest-physical address"` or `"process virtual address"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AddressKind {
    /// Guest-physical addresses of a VM's memory (an embedding VMM's image, the demo's).
    #[serde(rename = "guest-physical address")]
    GuestPhysical,
    /// Virtual addresses in the process whose memory the image holds: its state record is a
    /// [`ProcessDescription`] (`precopy send --pid`).
    #[serde(rename = "process virtual address")]
    ProcessVirtual,
}

/// The state record of an image of a running process's memory (written by `precopy send
/// --pid`): a small JSON object, `{"precopy_image_of": "process", "pid", "comm", "exe",
/// "addresses": "process virtual addresses"}`, that says whose memory the image holds and
/// that the regions' addresses are that process's virtual addresses. A description, not a
/// state to resume from: the process's registers and files are not in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDescription {
    /// The process ID at the time of the copy.
    pub pid: i32,
    /// Its name (`/proc/PID/comm`), if it could be read.
    pub comm: Option<String>,
    /// Its executable (`/proc/PID/exe`), if it could be read.
    pub exe: Option<String>,
}

/// The key of a [`ProcessDescription`]'s JSON object that marks it as one.
const IMAGE_OF: &str = "precopy_image_of";

/// A state record longer than this is a VM's state, not a description: not parsed.
const MAX_DESCRIPTION_LEN: u64 = 64 << 10;

impl ProcessDescription {
    /// The state record (JSON) that describes this process.
    pub fn to_state(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Record<'a> {
            precopy_image_of: &'static str,
            #[serde(flatten)]
            process: &'a ProcessDescription,
            addresses: &'static str,
        }
        let record = Record {
            precopy_image_of: "process",
            process: self,
            addresses: "process virtual addresses",
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// The description a state record holds, if it is one (`None` for anything else: a VM's
    /// state, the demo's writer records, damaged JSON).
    pub fn from_state(state: &[u8]) -> Option<ProcessDescription> {
        let v: serde_json::Value = serde_json::from_slice(state).ok()?;
        if v.get(IMAGE_OF)?.as_str()? != "process" {
            return None;
        }
        serde_json::from_value(v).ok()
    }
}

/// A region added to the layout after the start (a REGION record: memory the source mapped
/// while it was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddedRegion {
    /// The region's id.
    pub id: u32,
    /// The first round that could hold its pages: it was added after the rounds before.
    pub before_round: u64,
}

/// How an image was compacted (the module docs of [`crate::image`], "Compaction"): its
/// first round holds the latest copy of every page of the rounds it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CompactionInfo {
    /// Rounds `0..rounds` are folded into the image's first round (numbered `rounds - 1`).
    pub rounds: u64,
    /// Times the image was compacted while it was written.
    pub compactions: u32,
    /// File bytes the compactions dropped: copies of pages a later round superseded.
    pub bytes_dropped: u64,
}

/// One region of an image's layout, where it lies in memory offsets and at what addresses.
/// In JSON the region's own fields (`id`, `size`, `page_size`, `guest_addr`, `backing`) and
/// these beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RegionInfo {
    /// The region as the layout states it.
    #[serde(flatten)]
    pub region: MemoryRegion,
    /// Memory offset of its first byte (regions back to back in id order: what
    /// `precopy image cat --range` takes).
    pub memory_offset: u64,
    /// Its first address and the address after its last byte ([`ImageInfo::address_kind`]
    /// says whether guest-physical or the process's virtual addresses), when it has one.
    pub address: Option<u64>,
    /// See [`RegionInfo::address`].
    pub address_end: Option<u64>,
    /// For a region added mid-stream: the first round that could hold its pages.
    pub added_before_round: Option<u64>,
}

/// A range of the memory that existed when the image's last MAPPED record was written (for
/// a `send --pid` image: a tracked mapping of the process at the end of the run), inside one
/// region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MappedRange {
    /// The region holding it.
    pub region: u32,
    /// Its memory offset (what `precopy image cat --range` takes).
    pub memory_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Its first address (the region's address plus its offset in the region), when the
    /// region has one.
    pub address: Option<u64>,
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
    /// The layout's regions (those added mid-stream included, after the others), with their
    /// memory offsets and address ranges.
    pub regions: Vec<RegionInfo>,
    /// What the regions' addresses are; `None` when no region has one, or when the image
    /// cannot tell: its state record, which says it, is damaged, or missing from an image cut
    /// before it was written.
    pub address_kind: Option<AddressKind>,
    /// The process whose memory the image holds, when its state record describes one.
    pub process: Option<ProcessDescription>,
    /// The regions added after the start, in the order added.
    pub added_regions: Vec<AddedRegion>,
    /// Bytes the layout covers.
    pub total_len: u64,
    /// The rounds whose records the image holds, in order (in a compacted image the first
    /// stands for every round before it: [`ImageInfo::compacted`]).
    pub rounds: Vec<RoundInfo>,
    /// Rounds that ended before the image was finished or cut, those folded by a compaction
    /// included.
    pub rounds_ended: u64,
    /// Whether, and how, the image was compacted while it was written.
    pub compacted: Option<CompactionInfo>,
    /// Distinct pages whose latest copy holds data.
    pub data_pages: u64,
    /// Distinct pages whose latest copy is zeros.
    pub zero_pages: u64,
    /// Pages no record in the file holds (read as zeros): never sent, dropped (outside
    /// [`ImageInfo::mapped`]), or, in an incomplete image, perhaps sent after the cut.
    pub never_sent_pages: u64,
    /// The memory that existed at the image's last MAPPED record (a `send --pid` image: the
    /// process's tracked mappings at the end of the run, or at the last round before a cut),
    /// in memory-offset order; every page outside it is dropped and reads as zeros. `None`:
    /// the image has no such record (all of its layout is memory).
    pub mapped: Option<Vec<MappedRange>>,
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
    /// Why the image is incomplete, if it is, or corrupt, if it is (see [`ImageInfo::corrupt`]).
    pub incomplete_reason: Option<String>,
    /// Whether the image is damaged rather than cut: what ended it early is a record that
    /// fails its CRC or is out of place, a record that runs past the trailer that ends the
    /// file, an index that does not fit the layout, a damaged preamble or layout record
    /// (`incomplete_reason` says which), or, once [`ImageInfo::mark_corrupt`] was called, a
    /// check of the page data failed. `precopy image info` then fails, saying "corrupt" as
    /// `verify` does.
    pub corrupt: bool,
    /// File size.
    pub file_len: u64,
}

impl ImageInfo {
    /// An image cut before its first record (HELLO, the layout) ended: incomplete, with no
    /// layout and no round; `reason` says where it was cut.
    fn without_records(path: &Path, reason: String) -> ImageInfo {
        ImageInfo {
            path: path.to_owned(),
            version: IMAGE_VERSION,
            page_size: 0,
            regions: Vec::new(),
            address_kind: None,
            process: None,
            added_regions: Vec::new(),
            total_len: 0,
            rounds: Vec::new(),
            rounds_ended: 0,
            compacted: None,
            data_pages: 0,
            zero_pages: 0,
            never_sent_pages: 0,
            mapped: None,
            unfinished_round: None,
            unfinished_only_pages: 0,
            complete: false,
            memory_checksum: None,
            state_bytes: None,
            incomplete_reason: Some(reason),
            corrupt: false,
            file_len: std::fs::metadata(path).map_or(0, |m| m.len()),
        }
    }
}

impl ImageInfo {
    /// Records that a check of the page data (`Image::verify`) found damage: the image is
    /// corrupt, `reason` says why (the records may all be present: `complete` stays).
    pub fn mark_corrupt(&mut self, reason: String) {
        self.corrupt = true;
        self.incomplete_reason = Some(reason);
    }
}

impl Image {
    /// Summary for `precopy image info`.
    pub fn info(&self) -> ImageInfo {
        let count = |f: &dyn Fn(u64) -> bool| self.loc.iter().filter(|&&l| f(l)).count() as u64;
        let unfinished_only = self.unfinished.map_or(0, |u| u.1);
        let state = match self.state {
            Some((_, len, _)) if len <= MAX_DESCRIPTION_LEN => self.state().map_err(|_| ()),
            _ => Ok(None),
        };
        let process = match &state {
            Ok(Some(blob)) => ProcessDescription::from_state(blob),
            _ => None,
        };
        let mut offset = 0;
        let regions: Vec<RegionInfo> = self
            .layout
            .regions()
            .iter()
            .map(|r| {
                let info = RegionInfo {
                    region: *r,
                    memory_offset: offset,
                    address: r.guest_addr,
                    address_end: r.guest_addr.map(|a| a.saturating_add(r.size)),
                    added_before_round: self
                        .added
                        .iter()
                        .find(|a| a.id == r.id)
                        .map(|a| a.before_round),
                };
                offset += r.size;
                info
            })
            .collect();
        // The state record comes last: an image cut before it (or whose record is damaged)
        // cannot tell.
        let address_kind = match (&state, &process) {
            _ if regions.iter().all(|r| r.address.is_none()) => None,
            (_, Some(_)) => Some(AddressKind::ProcessVirtual),
            (Ok(Some(_)), None) => Some(AddressKind::GuestPhysical),
            (Ok(None), None) if self.complete => Some(AddressKind::GuestPhysical),
            _ => None,
        };
        ImageInfo {
            path: self.path.clone(),
            version: IMAGE_VERSION,
            page_size: self.layout.page_size(),
            regions,
            address_kind,
            process,
            added_regions: self.added.clone(),
            total_len: self.layout.total_len(),
            rounds: self.rounds.clone(),
            rounds_ended: self.rounds_ended,
            compacted: self.compacted,
            data_pages: count(&|l| l < ZERO),
            zero_pages: count(&|l| l == ZERO),
            never_sent_pages: count(&|l| l == NEVER) - unfinished_only,
            mapped: self.mapped.as_ref().map(|m| {
                crate::protocol::Mapped::of(&self.layout, m)
                    .spans
                    .iter()
                    .map(|s| {
                        let r = self.layout.region(s.region);
                        MappedRange {
                            region: s.region,
                            memory_offset: self
                                .layout
                                .place(s.region, s.offset, s.len)
                                .unwrap_or(0),
                            len: s.len,
                            address: r
                                .and_then(|r| r.guest_addr)
                                .map(|a| a.saturating_add(s.offset)),
                        }
                    })
                    .collect()
            }),
            unfinished_round: self.unfinished.map(|u| u.0),
            unfinished_only_pages: unfinished_only,
            complete: self.complete,
            memory_checksum: self.checksum,
            state_bytes: self.state.map(|s| s.1),
            incomplete_reason: self.incomplete_reason.clone(),
            corrupt: self.damage.is_some(),
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
            (true, _) if !self.corrupt => writeln!(
                f,
                "status:     complete (all records present), memory checksum {:#018x}",
                self.memory_checksum.unwrap_or(0)
            )?,
            (complete, reason) => writeln!(
                f,
                "status:     {} ({}){}",
                if self.corrupt {
                    "CORRUPT"
                } else {
                    "INCOMPLETE"
                },
                reason.as_deref().unwrap_or("unknown"),
                if complete {
                    "; all records present"
                } else {
                    ""
                }
            )?,
        }
        if self.regions.is_empty() {
            return write!(
                f,
                "layout:     none ({})",
                if self.corrupt {
                    "the preamble or the first record, which holds it, is damaged"
                } else {
                    "the file ends before its first record, which holds it"
                }
            );
        }
        writeln!(
            f,
            "layout:     {} region(s), {} bytes, {}-byte pages",
            self.regions.len(),
            self.total_len,
            self.page_size
        )?;
        for info in &self.regions {
            let r = &info.region;
            write!(
                f,
                "  region {}: memory offsets {:#x}-{:#x} ({} bytes, {}-byte pages",
                r.id,
                info.memory_offset,
                info.memory_offset + r.size,
                r.size,
                r.page_size
            )?;
            if let (Some(a), Some(end)) = (info.address, info.address_end) {
                match self.address_kind {
                    Some(AddressKind::GuestPhysical) => {
                        write!(f, ", guest-physical {a:#x}-{end:#x}")?
                    }
                    Some(AddressKind::ProcessVirtual) => {
                        write!(f, ", process addresses {a:#x}-{end:#x}")?
                    }
                    None => write!(f, ", addresses {a:#x}-{end:#x} (of unknown kind)")?,
                }
            }
            if let Some(b) = r.backing {
                write!(f, ", {b:?}")?;
            }
            if let Some(round) = info.added_before_round {
                write!(f, ", added before round {round}")?;
            }
            writeln!(f, ")")?;
        }
        if let Some(p) = &self.process {
            writeln!(
                f,
                "holds:      memory of process {} ({}): region addresses are its virtual addresses",
                p.pid,
                p.comm.as_deref().unwrap_or("?")
            )?;
        }
        if let Some(mapped) = &self.mapped {
            let bytes: u64 = mapped.iter().map(|m| m.len).sum();
            writeln!(
                f,
                "mapped:     {} range(s), {bytes} bytes at the last mapping record (pages outside them were unmapped by the source: dropped)",
                mapped.len()
            )?;
            for m in mapped {
                write!(
                    f,
                    "  memory offsets {:#x}-{:#x}",
                    m.memory_offset,
                    m.memory_offset + m.len
                )?;
                if let Some(a) = m.address {
                    let end = a.saturating_add(m.len);
                    match self.address_kind {
                        Some(AddressKind::GuestPhysical) => {
                            write!(f, ", guest-physical {a:#x}-{end:#x}")?
                        }
                        Some(AddressKind::ProcessVirtual) => {
                            write!(f, ", process addresses {a:#x}-{end:#x}")?
                        }
                        None => write!(f, ", addresses {a:#x}-{end:#x}")?,
                    }
                }
                writeln!(f)?;
            }
        }
        if let Some(n) = self.state_bytes {
            writeln!(f, "state:      {n} bytes")?;
        }
        writeln!(f, "rounds:     {}", self.rounds_ended)?;
        if let Some(c) = &self.compacted {
            writeln!(
                f,
                "compacted:  {} time(s) while written: rounds 0-{} folded into one (the latest copy of each page), {} bytes of older copies dropped",
                c.compactions,
                c.rounds.saturating_sub(1),
                c.bytes_dropped
            )?;
        }
        for (i, r) in self.rounds.iter().enumerate() {
            match &self.compacted {
                Some(c) if i == 0 => writeln!(
                    f,
                    "  rounds 0-{}: {} pages, {} zero pages (compacted)",
                    c.rounds.saturating_sub(1),
                    r.pages,
                    r.zero_pages
                )?,
                _ => writeln!(
                    f,
                    "  round {:>4}: {} pages, {} zero pages",
                    r.round, r.pages, r.zero_pages
                )?,
            }
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
/// Works on incomplete images (`complete` is then false), those cut before their first record
/// ended included (no region, no round), and on damaged images (`corrupt` is then true too;
/// no region and no round either when the damage is in the preamble or the first record).
pub fn image_info(path: impl AsRef<Path>) -> Result<ImageInfo, ImageError> {
    match Image::open(path.as_ref()) {
        Ok(image) => Ok(image.info()),
        Err(ImageError::Incomplete { path, reason }) => {
            Ok(ImageInfo::without_records(&path, reason))
        }
        Err(ImageError::Corrupt { path, source }) => {
            let mut info = ImageInfo::without_records(&path, String::new());
            info.mark_corrupt(source.to_string());
            Ok(info)
        }
        Err(e) => Err(e),
    }
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
