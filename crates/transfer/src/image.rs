//! Checkpoint images: a file holding a layout, rounds of pages (later rounds
//! supersede earlier ones), the memory digest and an index.
//!
//! This module owns the image file format and the rules that make a crash
//! harmless: records are only appended, and the image counts as complete only
//! when a walk from the start reaches a FINISH record (the checksum), the
//! INDEX records and a TRAILER that ends exactly at end of file. A file cut at
//! any point therefore never looks complete.
//!
//! ```text
//! "PRCPIMG\0" | version u32 (3) | reserved u32
//! HELLO      (the layout; session, nonce and stream fields zero)
//! ROUND_BEGIN r | PAGES (raw, codec 0)... | ZERO... | ROUND_END r      (per round)
//! STATE      (optional: the state blob, with its own CRC32C)
//! FINISH     (rounds, memory digest)            written, flushed and synced, then
//! INDEX...   (region, offset, length, file offset of the data | u64::MAX for zeros)
//! TRAILER    (a = offset of the first INDEX, b = own offset, c = checksum)
//! ```
//!
//! Records are [`protocol`](crate::protocol) frames, each with its CRC32C, at
//! file offsets. The memory digest is the one defined in [`crate::digest`]
//! (version 1 images held a CRC32C of the memory bytes, version 2 ones named
//! pages by host address; both are refused). Pages never sent read as zeros. An incomplete image is still
//! readable: its contents are the rounds that ended before the cut.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::buffer::PageBuf;
use crate::digest::{
    FinalCheck, MemoryDigest, PageCrcs, PageFold, check_final, page_crc, zero_page_crc,
};
use crate::error::{ImageError, ProtocolError, TransferError};
use crate::layout::{Layout, MemoryRegion};
use crate::protocol::{
    FrameKind, FrameReader, FrameWriter, HEADER_LEN, Header, Hello, MAX_PAYLOAD, expect,
    verify_frame_pages,
};
use crate::sink::Sink;

/// The first eight bytes of an image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"PRCPIMG\0";
/// The image format version written by this build.
pub const IMAGE_VERSION: u32 = 3;
const PREAMBLE_LEN: u64 = 16;

/// Page location: never sent.
const NEVER: u64 = u64::MAX;
/// Page location: sent as zeros.
const ZERO: u64 = u64::MAX - 1;
/// Index entries per INDEX record.
const INDEX_ENTRIES_PER_RECORD: usize = 1 << 16;
/// Most pages an image layout may cover (256 GiB of 4 KiB pages): reader and
/// writer keep an 8-byte location per page.
pub const MAX_IMAGE_PAGES: u64 = 1 << 26;

/// A page table of `pages` entries, or `None` if too large.
fn page_table(pages: u64) -> Option<Vec<u64>> {
    if pages > MAX_IMAGE_PAGES {
        return None;
    }
    Some(vec![NEVER; pages as usize])
}

/// Writes a checkpoint image; a [`Sink`].
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    out: FrameWriter<BufWriter<File>>,
    layout: Layout,
    /// Per layout page: file offset of its latest data, [`ZERO`] or [`NEVER`].
    loc: Vec<u64>,
    /// Per layout page: CRC of its latest data.
    crcs: PageCrcs,
    fold: PageFold,
    /// Updates of the round in progress, applied at its end.
    next_round: u64,
    in_round: Option<(u64, u64, u64, u64)>,
    state_written: bool,
    finished: bool,
}

impl ImageWriter {
    /// Creates (or truncates) the image at `path` for `layout`.
    pub fn create(path: impl AsRef<Path>, layout: Layout) -> Result<ImageWriter, TransferError> {
        let path = path.as_ref().to_owned();
        let io = |what| {
            let path = path.clone();
            move |source| ImageError::Io { path, what, source }
        };
        let loc = page_table(layout.total_pages()).ok_or(TransferError::Config {
            reason: "layout has more pages than an image holds (MAX_IMAGE_PAGES)",
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io("creating"))?;
        let mut out = FrameWriter::new(BufWriter::with_capacity(1 << 20, file));
        let mut pre = [0u8; PREAMBLE_LEN as usize];
        pre[..8].copy_from_slice(&IMAGE_MAGIC);
        pre[8..12].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
        out.get_mut().write_all(&pre).map_err(io("writing"))?;
        let hello = Hello {
            session: 0,
            stream_index: 0,
            stream_count: 1,
            nonce: [0; 16],
            layout: layout.without_host(),
        };
        out.write_frame(FrameKind::Hello, 0, 0, 0, 0, &hello.payload())
            .map_err(io("writing"))?;
        let crcs = PageCrcs::new(loc.len(), layout.page_size());
        let fold = PageFold::new(layout.page_size());
        Ok(ImageWriter {
            path,
            out,
            layout,
            loc,
            crcs,
            fold,
            next_round: 0,
            in_round: None,
            state_written: false,
            finished: false,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn pos(&self) -> u64 {
        PREAMBLE_LEN + self.out.written()
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> TransferError {
        let path = self.path.clone();
        move |source| ImageError::Io { path, what, source }.into()
    }

    fn write(
        &mut self,
        kind: FrameKind,
        a: u64,
        b: u64,
        c: u32,
        payload: &[u8],
    ) -> Result<(), TransferError> {
        if self.finished {
            return Err(TransferError::Misuse {
                operation: "writing to an image",
                state: "after finish",
            });
        }
        let r = self.out.write_frame(kind, 0, a, b, c, payload);
        r.map(|_| ()).map_err(self.io("writing"))
    }

    fn round_counts(
        &mut self,
        operation: &'static str,
    ) -> Result<&mut (u64, u64, u64, u64), TransferError> {
        self.in_round.as_mut().ok_or(TransferError::Misuse {
            operation,
            state: "outside a round",
        })
    }

    fn sync(&mut self) -> Result<(), TransferError> {
        self.out.flush().map_err(self.io("writing"))?;
        let r = self.out.get_ref().get_ref().sync_data();
        r.map_err(self.io("syncing"))
    }

    /// The memory digest of what the image now holds, read back from the file.
    fn checksum(&mut self) -> Result<u32, TransferError> {
        self.out.flush().map_err(self.io("writing"))?;
        let ps = self.layout.page_size();
        let file = self.out.get_ref().get_ref();
        digest_of_locations(file, &self.loc, ps).map_err(self.io("reading back"))
    }
}

/// The memory digest of the memory described by `loc` (file offsets, zeros,
/// never sent), reading the pages from `file`.
fn digest_of_locations(file: &File, loc: &[u64], ps: u64) -> std::io::Result<u32> {
    let mut digest = MemoryDigest::new();
    let zero = zero_page_crc(ps);
    let mut buf = vec![0u8; (1 << 20).max(ps as usize)];
    let per = buf.len() / ps as usize;
    let mut i = 0;
    while i < loc.len() {
        if loc[i] >= ZERO {
            let mut n = 1;
            while i + n < loc.len() && loc[i + n] >= ZERO {
                n += 1;
            }
            digest.push_repeated(zero, n as u64);
            i += n;
            continue;
        }
        // Coalesce pages stored back to back.
        let mut n = 1;
        while i + n < loc.len() && n < per && loc[i + n] == loc[i] + n as u64 * ps {
            n += 1;
        }
        let chunk = &mut buf[..n * ps as usize];
        file.read_exact_at(chunk, loc[i])?;
        digest.push_pages(chunk, ps as usize);
        i += n;
    }
    Ok(digest.finish())
}

impl Sink for ImageWriter {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        if self.in_round.is_some() || round != self.next_round {
            return Err(TransferError::Misuse {
                operation: "begin_round",
                state: "inside a round or out of sequence",
            });
        }
        self.write(FrameKind::RoundBegin, round, 0, 0, &[])?;
        self.in_round = Some((round, 0, 0, self.pos()));
        Ok(())
    }

    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        crcs: &[u32],
    ) -> Result<(), TransferError> {
        self.round_counts("send_pages")?;
        let len = pages.len() as u64;
        let ps = self.layout.page_size();
        let (region, at) = wire_address(&self.layout, offset, len)?;
        let first = offset / ps;
        if crcs.len() as u64 != len / ps || self.finished {
            return Err(TransferError::Misuse {
                operation: "send_pages",
                state: "with a CRC count that differs from the page count, or after finish",
            });
        }
        let data = self.pos() + HEADER_LEN as u64;
        let r = self.out.write_pages(region, at, &pages, crcs, &self.fold);
        r.map_err(self.io("writing"))?;
        self.crcs.set(first as usize, crcs);
        for k in 0..len / ps {
            self.loc[(first + k) as usize] = data + k * ps;
        }
        self.round_counts("send_pages")?.1 += len / ps;
        Ok(())
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        self.round_counts("send_zero_range")?;
        let ps = self.layout.page_size();
        let len = range.end.saturating_sub(range.start);
        let (region, at) = wire_address(&self.layout, range.start, len)?;
        let first = range.start / ps;
        self.write(FrameKind::Zero, at, len, region, &[])?;
        self.crcs.set_zero(first as usize, (len / ps) as usize);
        for k in 0..len / ps {
            self.loc[(first + k) as usize] = ZERO;
        }
        self.round_counts("send_zero_range")?.2 += len / ps;
        Ok(())
    }

    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        let (r, pages, zero, start) = *self.round_counts("end_round")?;
        if r != round {
            return Err(TransferError::Misuse {
                operation: "end_round",
                state: "for another round",
            });
        }
        self.write(FrameKind::RoundEnd, round, pages, 0, &zero.to_le_bytes())?;
        self.in_round = None;
        self.next_round += 1;
        Ok(self.pos() - start + HEADER_LEN as u64)
    }

    /// Writes the STATE record: the blob with its own CRC32C.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        if self.in_round.is_some() || self.state_written {
            return Err(TransferError::Misuse {
                operation: "send_state",
                state: "inside a round or twice",
            });
        }
        let crc = crc32c::crc32c(state);
        self.write(FrameKind::State, state.len() as u64, 0, crc, state)?;
        self.state_written = true;
        Ok(())
    }

    /// Checks the page CRCs recorded while writing (and with
    /// [`FinalCheck::Full`] the memory read back from the file) against
    /// `memory_checksum`, then writes the FINISH record, syncs, writes the
    /// index and trailer, and syncs again. On a mismatch the image is left
    /// incomplete.
    fn finish(&mut self, memory_checksum: u32, check: FinalCheck) -> Result<(), TransferError> {
        if self.in_round.is_some() {
            return Err(TransferError::Misuse {
                operation: "finish",
                state: "inside a round",
            });
        }
        let recorded = self.crcs.digest();
        check_final(memory_checksum, recorded, check, || self.checksum())?;
        self.write(FrameKind::Finish, self.next_round, 0, memory_checksum, &[])?;
        self.sync()?;
        let index_offset = self.pos();
        let entries = index_entries(&self.loc, &self.layout);
        for chunk in entries.chunks(INDEX_ENTRIES_PER_RECORD) {
            let mut p = Vec::with_capacity(chunk.len() * INDEX_ENTRY_LEN);
            for e in chunk {
                p.extend_from_slice(&e.region.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&e.offset.to_le_bytes());
                p.extend_from_slice(&e.len.to_le_bytes());
                p.extend_from_slice(&e.file_offset.to_le_bytes());
            }
            self.write(FrameKind::Index, 0, 0, 0, &p)?;
        }
        let trailer_offset = self.pos();
        self.write(
            FrameKind::Trailer,
            index_offset,
            trailer_offset,
            memory_checksum,
            &[],
        )?;
        self.sync()?;
        self.finished = true;
        Ok(())
    }
}

/// The wire's name (region id, offset inside it) for `len` bytes at memory
/// offset `offset`, which must be whole pages inside one region.
fn wire_address(layout: &Layout, offset: u64, len: u64) -> Result<(u32, u64), TransferError> {
    layout.check_span(offset, len)?;
    let (r, at) = layout
        .region_at(offset)
        .ok_or(crate::error::LayoutError::OutsideLayout {
            range: offset..offset + len,
        })?;
    Ok((r.id, at))
}

/// Bytes of one INDEX entry.
const INDEX_ENTRY_LEN: usize = 32;

/// One INDEX entry: pages of one region with the same kind of location,
/// contiguous in the region and (for data) in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    region: u32,
    offset: u64,
    len: u64,
    /// File offset of the data, or `u64::MAX` for zeros.
    file_offset: u64,
}

/// The index of `loc`: extents per region.
fn index_entries(loc: &[u64], layout: &Layout) -> Vec<IndexEntry> {
    let ps = layout.page_size();
    let mut out: Vec<IndexEntry> = Vec::new();
    let mut page = 0usize;
    for region in layout.regions() {
        for k in 0..region.size / ps {
            let l = loc[page];
            page += 1;
            if l == NEVER {
                continue;
            }
            let offset = k * ps;
            let file_offset = if l == ZERO { u64::MAX } else { l };
            if let Some(last) = out.last_mut() {
                let zeros = file_offset == u64::MAX;
                let contiguous = last.region == region.id
                    && last.offset + last.len == offset
                    && ((zeros && last.file_offset == u64::MAX)
                        || (!zeros
                            && last.file_offset != u64::MAX
                            && last.file_offset + last.len == file_offset));
                if contiguous {
                    last.len += ps;
                    continue;
                }
            }
            out.push(IndexEntry {
                region: region.id,
                offset,
                len: ps,
                file_offset,
            });
        }
    }
    out
}

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
    /// Pages never sent (read as zeros).
    pub never_sent_pages: u64,
    /// Whether the image is complete: its records, final checksum, index
    /// and trailer are all present and well formed. Says nothing about the
    /// page data, which `info` does not read: [`Image::verify`] checks that.
    pub complete: bool,
    /// The recorded memory checksum, when complete.
    pub memory_checksum: Option<u32>,
    /// Bytes of the state blob, if the image holds one.
    pub state_bytes: Option<u64>,
    /// Why the image is incomplete, if it is.
    pub incomplete_reason: Option<String>,
    /// File size.
    pub file_len: u64,
}

/// What [`Image::verify`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records whose CRC was checked.
    pub records: u64,
    /// Rounds in the image.
    pub rounds: u64,
    /// The memory checksum, recomputed and matching.
    pub memory_checksum: u32,
}

/// Result of walking an image's records from the start.
struct Walk {
    layout: Layout,
    rounds: Vec<RoundInfo>,
    loc: Vec<u64>,
    records: u64,
    finish: Option<(u64, u32)>,
    /// File offset, length and CRC32C of the state blob.
    state: Option<(u64, u64, u32)>,
    index: Vec<IndexEntry>,
    trailer: Option<Header>,
    /// Every PAGES record seen, in file order: (header offset, payload length).
    pages_records: Vec<(u64, u64)>,
    /// First fault: a record that is cut short (`true`) or damaged (`false`).
    fault: Option<(ProtocolError, bool)>,
}

/// A checkpoint image opened for reading.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    layout: Layout,
    rounds: Vec<RoundInfo>,
    loc: Vec<u64>,
    /// Every PAGES record, in file order: (header offset, payload length).
    pages_records: Vec<(u64, u64)>,
    complete: bool,
    checksum: Option<u32>,
    state: Option<(u64, u64, u32)>,
    incomplete_reason: Option<String>,
    file_len: u64,
}

impl Image {
    /// Opens an image. Succeeds for incomplete images (see
    /// [`ImageInfo::complete`]); fails only if the file cannot be read or its
    /// preamble and layout record are not valid.
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        let path = path.as_ref().to_owned();
        let file = File::open(&path).map_err(|source| ImageError::Io {
            path: path.clone(),
            what: "opening",
            source,
        })?;
        let walk = walk(&path, &file, false)?;
        let file_len = file_len(&path, &file)?;
        let mut complete = walk.fault.is_none() && walk.trailer.is_some() && walk.finish.is_some();
        let mut reason = match (&walk.fault, &walk.trailer) {
            (Some((e, _)), _) => Some(e.to_string()),
            (None, None) => Some("no trailer: the writer did not finish".to_owned()),
            _ => None,
        };
        let mut loc = walk.loc;
        if complete {
            match locations_from_index(&walk.index, &walk.layout, file_len) {
                Some(from_index) => loc = from_index,
                None => {
                    complete = false;
                    reason = Some("index does not fit the layout".to_owned());
                }
            }
        }
        Ok(Image {
            path,
            file,
            layout: walk.layout,
            rounds: walk.rounds,
            loc,
            pages_records: walk.pages_records,
            complete,
            checksum: if complete {
                walk.finish.map(|f| f.1)
            } else {
                None
            },
            state: walk.state,
            incomplete_reason: reason,
            file_len,
        })
    }

    /// The state blob the image holds, read from the file and checked
    /// against its own CRC32C (`None`: the image has none).
    pub fn state(&self) -> Result<Option<Vec<u8>>, ImageError> {
        let Some((at, len, crc)) = self.state else {
            return Ok(None);
        };
        let mut blob = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut blob, at)
            .map_err(|source| ImageError::Io {
                path: self.path.clone(),
                what: "reading the state blob of",
                source,
            })?;
        let computed = crc32c::crc32c(&blob);
        if computed != crc {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                source: ProtocolError::StateChecksum {
                    offset: at - HEADER_LEN as u64,
                    stored: crc,
                    computed,
                },
            });
        }
        Ok(Some(blob))
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the image is complete.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Summary for `precopy image info`.
    pub fn info(&self) -> ImageInfo {
        let count = |f: &dyn Fn(u64) -> bool| self.loc.iter().filter(|&&l| f(l)).count() as u64;
        ImageInfo {
            path: self.path.clone(),
            version: IMAGE_VERSION,
            page_size: self.layout.page_size(),
            regions: self.layout.regions().to_vec(),
            total_len: self.layout.total_len(),
            rounds: self.rounds.clone(),
            data_pages: count(&|l| l < ZERO),
            zero_pages: count(&|l| l == ZERO),
            never_sent_pages: count(&|l| l == NEVER),
            complete: self.complete,
            memory_checksum: self.checksum,
            state_bytes: self.state.map(|s| s.1),
            incomplete_reason: self.incomplete_reason.clone(),
            file_len: self.file_len,
        }
    }

    /// Writes the bytes at memory offsets `range` (regions back to back in
    /// id order, see [`crate::layout`]) as the image holds them (zeros where
    /// a page was never sent) to `out`.
    ///
    /// Every page written out is checked first: the PAGES record holding it
    /// is read whole once and its CRC32C checked (yielding each page's
    /// CRC32C), and the page's bytes are checked against that page CRC. A
    /// page that fails is [`ImageError::PageDamaged`]; bytes before it may
    /// already be in `out`. This does not make an incomplete image complete:
    /// check [`Image::is_complete`] first (pages of an unfinished round are
    /// not part of the image, and pages never sent read as zeros).
    pub fn read_span(&self, range: Range<u64>, out: &mut dyn Write) -> Result<(), ImageError> {
        let ps = self.layout.page_size();
        if range.start >= range.end {
            return Ok(());
        }
        if range.end > self.layout.total_len() {
            return Err(ImageError::SpanOutsideLayout { range });
        }
        let io = |what| {
            let path = self.path.clone();
            move |source| ImageError::Io { path, what, source }
        };
        let mut page = vec![0u8; ps as usize];
        let mut checked = RecordCrcs {
            fold: PageFold::new(ps),
            records: std::collections::HashMap::new(),
        };
        let mut at = range.start - range.start % ps;
        while at < range.end {
            let l = self.loc[(at / ps) as usize];
            if l >= ZERO {
                page.fill(0);
            } else {
                let want = self.page_crc_at(at, l, &mut checked)?;
                self.file
                    .read_exact_at(&mut page, l)
                    .map_err(io("reading"))?;
                let got = page_crc(&page);
                if got != want {
                    return Err(ImageError::PageDamaged {
                        path: self.path.clone(),
                        offset: at,
                        source: ProtocolError::BadChecksum {
                            offset: l,
                            kind: FrameKind::Pages as u8,
                            stored: want,
                            computed: got,
                        },
                    });
                }
            }
            let from = range.start.max(at) - at;
            let to = range.end.min(at + ps) - at;
            out.write_all(&page[from as usize..to as usize])
                .map_err(io("writing span of"))?;
            at += ps;
        }
        Ok(())
    }

    /// The CRC32C of the page at memory offset `offset`, whose data is at
    /// file offset `at`, from its PAGES record, whose CRC is checked the
    /// first time one of its pages is asked for.
    fn page_crc_at(
        &self,
        offset: u64,
        at: u64,
        checked: &mut RecordCrcs,
    ) -> Result<u32, ImageError> {
        let ps = self.layout.page_size();
        let damaged = |source| ImageError::PageDamaged {
            path: self.path.clone(),
            offset,
            source,
        };
        let not_in_record = || {
            damaged(ProtocolError::Malformed {
                offset: at,
                kind: FrameKind::Index,
                reason: "the index points at bytes that are not a page of a PAGES record",
            })
        };
        let hdr = HEADER_LEN as u64;
        let i = self.pages_records.partition_point(|&(o, _)| o + hdr <= at);
        let &(record, len) = i
            .checked_sub(1)
            .and_then(|i| self.pages_records.get(i))
            .ok_or_else(not_in_record)?;
        let in_record = at - (record + hdr);
        if in_record >= len || in_record % ps != 0 {
            return Err(not_in_record());
        }
        if !checked.records.contains_key(&record) {
            let mut buf = vec![0u8; (hdr + len) as usize];
            self.file
                .read_exact_at(&mut buf, record)
                .map_err(|source| ImageError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                })?;
            let (h, payload) = buf.split_at(HEADER_LEN);
            let h: &[u8; HEADER_LEN] = h.try_into().map_err(|_| not_in_record())?;
            let mut crcs = Vec::new();
            match verify_frame_pages(h, record, payload, &checked.fold, &mut crcs) {
                Ok(_) if crcs.len() as u64 == len / ps => {}
                Ok(_) => return Err(not_in_record()),
                Err(TransferError::Protocol(e)) => return Err(damaged(e)),
                Err(e) => {
                    return Err(ImageError::Io {
                        path: self.path.clone(),
                        what: "checking",
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
            checked.records.insert(record, crcs);
        }
        let crcs = &checked.records[&record];
        crcs.get((in_record / ps) as usize)
            .copied()
            .ok_or_else(not_in_record)
    }

    /// [`Image::read_span`] into a vector.
    pub fn read_span_to_vec(&self, range: Range<u64>) -> Result<Vec<u8>, ImageError> {
        let mut v = Vec::with_capacity(range.end.saturating_sub(range.start).min(1 << 30) as usize);
        self.read_span(range, &mut v)?;
        Ok(v)
    }

    /// Checks everything: every record's CRC, the record sequence, that the
    /// image is complete, that the index matches the records, and that the
    /// memory the image holds has the recorded checksum.
    pub fn verify(&self) -> Result<VerifyReport, ImageError> {
        let walk = walk(&self.path, &self.file, true)?;
        if let Some((e, truncated)) = walk.fault {
            return Err(if truncated {
                ImageError::Incomplete {
                    path: self.path.clone(),
                    reason: e.to_string(),
                }
            } else {
                ImageError::Corrupt {
                    path: self.path.clone(),
                    source: e,
                }
            });
        }
        let (Some((rounds, checksum)), Some(trailer)) = (walk.finish, walk.trailer) else {
            return Err(ImageError::Incomplete {
                path: self.path.clone(),
                reason: "no final checksum and trailer".to_owned(),
            });
        };
        let corrupt = |reason| ImageError::Corrupt {
            path: self.path.clone(),
            source: ProtocolError::Malformed {
                offset: trailer.offset,
                kind: FrameKind::Trailer,
                reason,
            },
        };
        if trailer.c != checksum {
            return Err(corrupt("trailer checksum differs from FINISH"));
        }
        let file_len = file_len(&self.path, &self.file)?;
        let from_index = locations_from_index(&walk.index, &walk.layout, file_len)
            .ok_or_else(|| corrupt("index does not fit the layout"))?;
        let ps = walk.layout.page_size();
        if let Some(i) = (0..walk.loc.len()).find(|&i| walk.loc[i] != from_index[i]) {
            return Err(ImageError::IndexMismatch {
                path: self.path.clone(),
                offset: i as u64 * ps,
            });
        }
        if self.state()?.is_some() != walk.state.is_some() {
            return Err(corrupt("state record changed while verifying"));
        }
        let actual =
            digest_of_locations(&self.file, &walk.loc, ps).map_err(|source| ImageError::Io {
                path: self.path.clone(),
                what: "reading",
                source,
            })?;
        if actual != checksum {
            return Err(ImageError::ChecksumMismatch {
                expected: checksum,
                actual,
            });
        }
        Ok(VerifyReport {
            records: walk.records,
            rounds,
            memory_checksum: checksum,
        })
    }
}

/// Page CRCs of the PAGES records checked so far by one [`Image::read_span`].
struct RecordCrcs {
    fold: PageFold,
    /// Header offset of a checked record -> its pages' CRC32Cs.
    records: std::collections::HashMap<u64, Vec<u32>>,
}

fn file_len(path: &Path, file: &File) -> Result<u64, ImageError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| ImageError::Io {
            path: path.to_owned(),
            what: "reading the size of",
            source,
        })
}

/// Per-page locations described by INDEX extents, or `None` if an extent
/// leaves the layout or the file, or overlaps another.
fn locations_from_index(index: &[IndexEntry], layout: &Layout, file_len: u64) -> Option<Vec<u64>> {
    let ps = layout.page_size();
    let mut loc = page_table(layout.total_pages())?;
    for e in index {
        let (len, off) = (e.len, e.file_offset);
        let first = layout.place(e.region, e.offset, len).ok()? / ps;
        if off != u64::MAX && off.checked_add(len)? > file_len {
            return None;
        }
        for k in 0..len / ps {
            let slot = &mut loc[(first + k) as usize];
            if *slot != NEVER {
                return None;
            }
            *slot = if off == u64::MAX { ZERO } else { off + k * ps };
        }
    }
    Some(loc)
}

/// Reads records from the start. With `check_payloads`, reads every payload
/// and checks its CRC; without, skips page payloads (checking only that the
/// file holds them), which is enough to find the image's shape and whether
/// it is complete.
fn walk(path: &Path, file: &File, check_payloads: bool) -> Result<Walk, ImageError> {
    let corrupt = |source| ImageError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let io = |source| ImageError::Io {
        path: path.to_owned(),
        what: "reading",
        source,
    };
    let len = file_len(path, file)?;
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut pre = [0u8; PREAMBLE_LEN as usize];
    f.read_exact(&mut pre).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(ProtocolError::Truncated {
                offset: 0,
                what: "the image preamble",
            })
        } else {
            io(e)
        }
    })?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&pre[..8]);
    if found != IMAGE_MAGIC {
        return Err(corrupt(ProtocolError::BadMagic { found }));
    }
    let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
    if (1..IMAGE_VERSION).contains(&version) {
        return Err(corrupt(ProtocolError::OldVersion {
            version,
            supported: IMAGE_VERSION,
        }));
    }
    if version != IMAGE_VERSION {
        return Err(corrupt(ProtocolError::UnknownVersion {
            version,
            supported: IMAGE_VERSION,
        }));
    }
    let mut r = FrameReader::at_offset(std::io::BufReader::with_capacity(1 << 16, f), PREAMBLE_LEN);
    let mut p = Vec::new();
    let to_protocol = |e: TransferError| match e {
        TransferError::Protocol(p) => Ok(p),
        TransferError::Io { source, .. } => Err(io(source)),
        other => Err(io(std::io::Error::other(other.to_string()))),
    };
    let h = match r.read_frame(&mut p) {
        Ok(h) => h,
        Err(e) => return Err(corrupt(to_protocol(e)?)),
    };
    expect(&h, FrameKind::Hello, None).map_err(corrupt)?;
    let layout = Hello::parse(&h, &p[..h.payload_len as usize])
        .map_err(corrupt)?
        .layout;
    let loc = page_table(layout.total_pages()).ok_or_else(|| {
        corrupt(ProtocolError::Malformed {
            offset: h.offset,
            kind: h.kind,
            reason: "layout has more pages than an image holds",
        })
    })?;
    let mut w = Walk {
        layout,
        rounds: Vec::new(),
        loc,
        records: 1,
        finish: None,
        state: None,
        index: Vec::new(),
        trailer: None,
        pages_records: Vec::new(),
        fault: None,
    };
    let ps = w.layout.page_size();
    let mut pending: Vec<(usize, u64)> = Vec::new();
    let mut current: Option<RoundInfo> = None;
    loop {
        let offset = r.offset();
        if offset == len && w.trailer.is_some() {
            break;
        }
        let fault = |e: ProtocolError, truncated: bool| Some((e, truncated));
        let read = if check_payloads {
            r.read_frame(&mut p)
        } else {
            read_header_skipping_pages(&mut r, &mut p, len)
        };
        let h = match read {
            Ok(h) => h,
            Err(e) => {
                let e = to_protocol(e)?;
                let t = matches!(e, ProtocolError::Truncated { .. });
                w.fault = fault(e, t);
                break;
            }
        };
        w.records += 1;
        let payload = &p[..if h.kind == FrameKind::Pages {
            0
        } else {
            h.payload_len as usize
        }];
        let unexpected = |state| ProtocolError::Unexpected {
            offset: h.offset,
            kind: h.kind,
            state,
        };
        let step: Result<bool, ProtocolError> = (|| {
            if w.trailer.is_some() {
                return Err(unexpected("after the trailer"));
            }
            match (h.kind, &mut current) {
                (FrameKind::RoundBegin, None) if w.finish.is_none() => {
                    expect(&h, h.kind, Some(0))?;
                    let next = w.rounds.len() as u64;
                    if h.a != next {
                        return Err(ProtocolError::RoundOutOfOrder {
                            expected: next,
                            got: h.a,
                        });
                    }
                    current = Some(RoundInfo {
                        round: h.a,
                        pages: 0,
                        zero_pages: 0,
                    });
                }
                (FrameKind::Pages | FrameKind::Zero, Some(round)) => {
                    if h.kind == FrameKind::Pages && h.codec != 0 {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "compressed pages are not used in images",
                        });
                    }
                    if h.kind == FrameKind::Pages && u64::from(h.payload_len) != h.b {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "payload length differs from the page length",
                        });
                    }
                    if h.kind == FrameKind::Zero {
                        expect(&h, h.kind, Some(0))?;
                    }
                    let first = w.layout.place(h.c, h.a, h.b).map_err(|_| {
                        ProtocolError::PageOutsideLayout {
                            region: h.c,
                            offset: h.a,
                            len: h.b,
                        }
                    })? / ps;
                    let data = h.offset + HEADER_LEN as u64;
                    if h.kind == FrameKind::Pages {
                        w.pages_records.push((h.offset, h.b));
                    }
                    for k in 0..h.b / ps {
                        let l = if h.kind == FrameKind::Zero {
                            ZERO
                        } else {
                            data + k * ps
                        };
                        pending.push(((first + k) as usize, l));
                    }
                    if h.kind == FrameKind::Zero {
                        round.zero_pages += h.b / ps;
                    } else {
                        round.pages += h.b / ps;
                    }
                }
                (FrameKind::RoundEnd, Some(round)) => {
                    expect(&h, h.kind, Some(8))?;
                    let zero = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                    if h.a != round.round || h.b != round.pages || zero != round.zero_pages {
                        return Err(ProtocolError::CountMismatch {
                            round: round.round,
                            claimed_pages: h.b,
                            claimed_zero: zero,
                            pages: round.pages,
                            zero: round.zero_pages,
                        });
                    }
                    for (i, l) in pending.drain(..) {
                        w.loc[i] = l;
                    }
                    w.rounds.push(*round);
                    current = None;
                }
                (FrameKind::State, None) if w.finish.is_none() && w.state.is_none() => {
                    let blob = crate::receiver::check_state(&h, payload)?;
                    w.state = Some((h.offset + HEADER_LEN as u64, blob.len() as u64, h.c));
                }
                (FrameKind::Finish, None) if w.finish.is_none() => {
                    expect(&h, h.kind, Some(0))?;
                    if h.a != w.rounds.len() as u64 {
                        return Err(ProtocolError::RoundOutOfOrder {
                            expected: w.rounds.len() as u64,
                            got: h.a,
                        });
                    }
                    w.finish = Some((h.a, h.c));
                }
                (FrameKind::Index, None) if w.finish.is_some() => {
                    expect(&h, h.kind, None)?;
                    if payload.len() % INDEX_ENTRY_LEN != 0 {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "index length is not a multiple of 32",
                        });
                    }
                    for e in payload.chunks_exact(INDEX_ENTRY_LEN) {
                        let at = |o: usize| {
                            u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or_default())
                        };
                        let region = u32::from_le_bytes(e[0..4].try_into().unwrap_or_default());
                        w.index.push(IndexEntry {
                            region,
                            offset: at(8),
                            len: at(16),
                            file_offset: at(24),
                        });
                    }
                }
                (FrameKind::Trailer, None) if w.finish.is_some() => {
                    expect(&h, h.kind, Some(0))?;
                    if h.b != h.offset || h.offset + HEADER_LEN as u64 != len {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "trailer is not the last record",
                        });
                    }
                    w.trailer = Some(h);
                    return Ok(true);
                }
                _ => return Err(unexpected("walking the image")),
            }
            Ok(false)
        })();
        match step {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                w.fault = Some((e, false));
                break;
            }
        }
    }
    Ok(w)
}

/// Reads a header and, except for PAGES, its payload (checking the CRC);
/// for PAGES checks the file holds the payload and seeks past it.
fn read_header_skipping_pages<R: Read + Seek>(
    r: &mut FrameReader<std::io::BufReader<R>>,
    p: &mut Vec<u8>,
    file_len: u64,
) -> Result<Header, TransferError> {
    let offset = r.offset();
    let mut h = [0u8; HEADER_LEN];
    if offset + HEADER_LEN as u64 > file_len {
        return Err(ProtocolError::Truncated {
            offset: file_len,
            what: "a record header",
        }
        .into());
    }
    r.get_mut()
        .read_exact(&mut h)
        .map_err(TransferError::io("reading the image"))?;
    let kind = h[0];
    let payload_len = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
    if kind != FrameKind::Pages as u8 || payload_len > MAX_PAYLOAD {
        // Small records: rewind and read them whole, CRC included.
        r.get_mut()
            .seek_relative(-(HEADER_LEN as i64))
            .map_err(TransferError::io("reading the image"))?;
        return r.read_frame(p);
    }
    let end = offset + HEADER_LEN as u64 + payload_len;
    if end > file_len {
        return Err(ProtocolError::Truncated {
            offset: file_len,
            what: "page data",
        }
        .into());
    }
    r.get_mut()
        .seek_relative(payload_len as i64)
        .map_err(TransferError::io("reading the image"))?;
    if h[2] != 0 || h[3] != 0 {
        // Images never hold live frames (their sink copies pages).
        return Err(ProtocolError::Malformed {
            offset,
            kind: FrameKind::Pages,
            reason: "reserved header bytes are not zero",
        }
        .into());
    }
    let field = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
    let header = Header {
        offset,
        kind: FrameKind::Pages,
        codec: h[1],
        flags: 0,
        payload_len: payload_len as u32,
        a: field(8),
        b: field(16),
        c: u32::from_le_bytes([h[24], h[25], h[26], h[27]]),
    };
    r.set_offset(end);
    Ok(header)
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
                "status:     complete (all records present), memory checksum {:#010x}",
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
        write!(
            f,
            "pages:      {} with data, {} zero, {} never sent",
            self.data_pages, self.zero_pages, self.never_sent_pages
        )
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

/// `precopy image verify IMG`: every check [`Image::verify`] does; any `Err`
/// means the image is not good (exit non-zero).
pub fn image_verify(path: impl AsRef<Path>) -> Result<VerifyReport, ImageError> {
    Image::open(path)?.verify()
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

    #[test]
    fn index_extents_coalesce() {
        let layout = Layout::new(vec![
            MemoryRegion::new(4, 5 * 4096, 4096),
            MemoryRegion::new(9, 2 * 4096, 4096),
        ])
        .unwrap();
        let loc = vec![100, 4196, ZERO, ZERO, NEVER, 8292, 12388];
        let e = |region, offset, len, file_offset| IndexEntry {
            region,
            offset,
            len,
            file_offset,
        };
        assert_eq!(
            index_entries(&loc, &layout),
            vec![
                e(4, 0, 8192, 100),
                e(4, 8192, 8192, u64::MAX),
                e(9, 0, 8192, 8292)
            ],
            "extents never span two regions"
        );
        assert_eq!(
            locations_from_index(&index_entries(&loc, &layout), &layout, 20_000),
            Some(loc)
        );
        // Overlapping extents are refused, and so are unknown regions.
        assert_eq!(
            locations_from_index(&[e(4, 0, 8192, 0), e(4, 4096, 4096, 0)], &layout, 10_000),
            None
        );
        assert_eq!(
            locations_from_index(&[e(5, 0, 4096, 0)], &layout, 10_000),
            None
        );
    }
}
