//! [`Image`]: an image opened for reading, its state blob and checked page
//! reads.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zerocopy::FromBytes;

use super::info::{AddedRegion, CompactionInfo, RoundInfo};
use super::walk::walk;
use super::{ZERO, file_len, locations_from_index};
use crate::digest::{PageHash, page_hash};
use crate::error::{ImageError, ProtocolError, TransferError};
use crate::layout::Layout;
use crate::protocol::{FrameKind, HEADER_LEN, RawHeader, verify_frame_pages};

/// A checkpoint image opened for reading.
#[derive(Debug)]
pub struct Image {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) layout: Layout,
    pub(super) rounds: Vec<RoundInfo>,
    /// Rounds that ended, those a compaction folded included.
    pub(super) rounds_ended: u64,
    /// What the COMPACTED record says, if the image was compacted.
    pub(super) compacted: Option<CompactionInfo>,
    pub(super) loc: Vec<u64>,
    /// Every PAGES record, in file order: (header offset, payload length).
    pub(super) pages_records: Vec<(u64, u64)>,
    pub(super) complete: bool,
    pub(super) checksum: Option<u64>,
    pub(super) state: Option<(u64, u64, u32)>,
    pub(super) incomplete_reason: Option<String>,
    /// The damage the walk stopped at (a record that fails its CRC or is out of place, an
    /// index that does not fit the layout), as opposed to the end of a cut file.
    pub(super) damage: Option<ProtocolError>,
    pub(super) file_len: u64,
    /// The round cut short, and the pages only it holds (see [`ImageInfo::unfinished_round`]).
    pub(super) unfinished: Option<(RoundInfo, u64)>,
    /// Regions added mid-stream (see [`ImageInfo::added_regions`]).
    pub(super) added: Vec<AddedRegion>,
    /// The memory offsets the last MAPPED record names (see [`ImageInfo::mapped`]).
    pub(super) mapped: Option<Vec<std::ops::Range<u64>>>,
}

impl Image {
    /// Opens an image. Succeeds for incomplete images (see
    /// [`ImageInfo::complete`](crate::image::ImageInfo::complete)) and for images damaged
    /// after their first record ([`Image::damage`]); fails if the file cannot be read, if its
    /// preamble or layout record is damaged ([`ImageError::Corrupt`]), or if it was cut before
    /// its layout record ended ([`ImageError::Incomplete`]: a cut image that holds no record).
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        let path = path.as_ref().to_owned();
        // Non-blocking, so that a FIFO opens at once and is refused below.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| ImageError::Io {
                path: path.clone(),
                what: "opening",
                source,
            })?;
        super::regular_file(&path, &file)?;
        let walk = walk(&path, &file, false)?;
        let file_len = file_len(&path, &file)?;
        let mut complete = walk.fault.is_none() && walk.trailer.is_some() && walk.finish.is_some();
        let mut reason = match (&walk.fault, &walk.trailer) {
            (Some((e, _)), _) => Some(e.to_string()),
            (None, None) => Some("no trailer: the writer did not finish".to_owned()),
            _ => None,
        };
        let mut damage = match &walk.fault {
            Some((e, false)) => Some(e.clone()),
            _ => None,
        };
        let mut loc = walk.loc;
        if complete {
            match locations_from_index(&walk.index, &walk.layout, file_len) {
                Some(from_index) => loc = from_index,
                None => {
                    complete = false;
                    let e = ProtocolError::Malformed {
                        offset: walk.trailer.as_ref().map_or(0, |t| t.0),
                        kind: FrameKind::Trailer,
                        reason: "index does not fit the layout",
                    };
                    reason = Some(e.to_string());
                    damage = Some(e);
                }
            }
        }
        // The last round whose end the file holds (a COMPACTED record alone, cut before the
        // round it announces ended, holds none).
        let rounds_ended = walk.rounds.last().map_or(0, |r| r.round + 1);
        Ok(Image {
            path,
            file,
            layout: walk.layout,
            rounds: walk.rounds,
            rounds_ended,
            compacted: walk.compacted,
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
            damage,
            file_len,
            unfinished: walk.unfinished,
            added: walk.added,
            mapped: walk.mapped,
        })
    }

    /// The damage found while opening, as [`ImageError::Corrupt`] (what `verify` says of
    /// it): a record that fails its CRC or is out of place, an index that does not fit the
    /// layout. `None` for an intact image, complete or cut (page data, which opening does
    /// not read, is checked by [`Image::verify`]).
    pub fn damage(&self) -> Option<ImageError> {
        self.damage.clone().map(|source| ImageError::Corrupt {
            path: self.path.clone(),
            source,
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

    /// Writes the bytes at memory offsets `range` (regions back to back in
    /// id order, see [`crate::layout`]) as the image holds them (zeros where
    /// a page was never sent) to `out`.
    ///
    /// Every page written out is checked first: the PAGES record holding it
    /// is read whole once and checked (its CRC32C over header and hash list,
    /// each page against its listed hash), and the page's bytes read again
    /// are checked against that hash. A
    /// page that fails is [`ImageError::PageDamaged`]; bytes before it may
    /// already be in `out`. This does not make an incomplete image complete:
    /// check [`Image::is_complete`] first (pages of an unfinished round are
    /// not part of the image, and pages never sent read as zeros).
    pub fn read_span(&self, range: Range<u64>, out: &mut dyn Write) -> Result<(), ImageError> {
        let ps = self.layout.page_size();
        if range.end < range.start {
            return Err(ImageError::InvertedSpan { range });
        }
        if range.start == range.end {
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
        let mut checked = RecordHashes {
            records: std::collections::HashMap::new(),
        };
        let mut at = range.start - range.start % ps;
        while at < range.end {
            let l = self.loc[(at / ps) as usize];
            if l >= ZERO {
                page.fill(0);
            } else {
                let (want, record, index) = self.page_hash_at(at, l, &mut checked)?;
                self.file
                    .read_exact_at(&mut page, l)
                    .map_err(io("reading"))?;
                let got = page_hash(&page);
                if got != want {
                    return Err(ImageError::PageDamaged {
                        path: self.path.clone(),
                        offset: at,
                        source: ProtocolError::BadPageHash {
                            offset: record,
                            page: index,
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

    /// The hash of the page at memory offset `offset`, whose data is at
    /// file offset `at`, from its PAGES record (whose CRC and pages are
    /// checked the first time one of its pages is asked for), with the
    /// record's file offset and the page's index in it.
    fn page_hash_at(
        &self,
        offset: u64,
        at: u64,
        checked: &mut RecordHashes,
    ) -> Result<(PageHash, u64, u64), ImageError> {
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
        if in_record >= len || !in_record.is_multiple_of(ps) {
            return Err(not_in_record());
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = checked.records.entry(record) {
            // The pages, then their hash list.
            let list = len / ps * crate::digest::PAGE_HASH_LEN as u64;
            let mut buf = vec![0u8; (hdr + len + list) as usize];
            self.file
                .read_exact_at(&mut buf, record)
                .map_err(|source| ImageError::Io {
                    path: self.path.clone(),
                    what: "reading",
                    source,
                })?;
            let Ok((h, payload)) = RawHeader::read_from_prefix(&buf) else {
                return Err(not_in_record());
            };
            let mut hashes = Vec::new();
            match verify_frame_pages(&h, record, payload, ps, &mut hashes) {
                Ok(_) if hashes.len() as u64 == len / ps => {}
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
            slot.insert(hashes);
        }
        let index = in_record / ps;
        let hashes = &checked.records[&record];
        let hash = hashes
            .get(index as usize)
            .copied()
            .ok_or_else(not_in_record)?;
        Ok((hash, record, index))
    }

    /// [`Image::read_span`] into a vector.
    pub fn read_span_to_vec(&self, range: Range<u64>) -> Result<Vec<u8>, ImageError> {
        let mut v = Vec::with_capacity(range.end.saturating_sub(range.start).min(1 << 30) as usize);
        self.read_span(range, &mut v)?;
        Ok(v)
    }
}

/// Page hashes of the PAGES records checked so far by one [`Image::read_span`].
struct RecordHashes {
    /// Header offset of a checked record -> its pages' hashes.
    records: std::collections::HashMap<u64, Vec<PageHash>>,
}
