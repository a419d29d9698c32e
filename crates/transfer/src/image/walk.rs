//! Walking an image's records from the start: the one reader of the record
//! sequence, shared by [`Image::open`](super::Image::open) (page payloads
//! skipped) and [`Image::verify`](super::Image::verify) (every CRC checked).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use zerocopy::{FromZeros, IntoBytes};

use super::info::{AddedRegion, CompactionInfo, RoundInfo};
use super::{
    IMAGE_MAGIC, IMAGE_VERSION, MAX_IMAGE_PAGES, NEVER, PREAMBLE_LEN, ZERO, file_len, page_table,
};
use crate::codec::Codec;
use crate::error::{ImageError, ProtocolError, TransferError};
use crate::layout::Layout;
use crate::protocol::{
    Compacted, Finish, FrameKind, FrameReader, HEADER_LEN, Header, Hello, Index, IndexEntry,
    MAX_PAYLOAD, Mapped, Pages, RawHeader, Region, RoundBegin, RoundEnd, State, Trailer, Zero,
};

/// Result of walking an image's records from the start.
pub(super) struct Walk {
    pub(super) layout: Layout,
    /// The rounds whose records the file holds (after a COMPACTED record, the first of them
    /// stands for every round before it).
    pub(super) rounds: Vec<RoundInfo>,
    /// The number the next round must have: rounds that ended, those a COMPACTED record
    /// stands for included.
    pub(super) next_round: u64,
    /// What a COMPACTED record said, if the image has one.
    pub(super) compacted: Option<CompactionInfo>,
    pub(super) loc: Vec<u64>,
    pub(super) records: u64,
    pub(super) finish: Option<(u64, u64)>,
    /// File offset, length and CRC32C of the state blob.
    pub(super) state: Option<(u64, u64, u32)>,
    pub(super) index: Vec<IndexEntry>,
    /// Header offset and contents of the TRAILER.
    pub(super) trailer: Option<(u64, Trailer)>,
    /// Every PAGES record seen, in file order: (header offset, payload length).
    pub(super) pages_records: Vec<(u64, u64)>,
    /// Regions added by REGION records, in file order.
    pub(super) added: Vec<AddedRegion>,
    /// The memory offsets the last MAPPED record names (`None`: no such record).
    pub(super) mapped: Option<Vec<std::ops::Range<u64>>>,
    /// First fault: a record that is cut short (`true`) or damaged (`false`).
    pub(super) fault: Option<(ProtocolError, bool)>,
    /// The round that began and did not end (an incomplete image): what its whole records
    /// hold, and how many distinct pages they hold that no ended round does.
    pub(super) unfinished: Option<(RoundInfo, u64)>,
}

/// Reads records from the start. With `check_payloads`, reads every payload
/// and checks its CRC; without, skips page payloads (checking only that the
/// file holds them), which is enough to find the image's shape and whether
/// it is complete.
pub(super) fn walk(path: &Path, file: &File, check_payloads: bool) -> Result<Walk, ImageError> {
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
    if len < PREAMBLE_LEN {
        // Too short to hold the preamble: a cut image if what is there is the start of this
        // version's preamble (incomplete, with no record), damaged if it starts like an image
        // and differs, else no image at all.
        let head = &mut pre[..len as usize];
        f.read_exact(head).map_err(io)?;
        if len > 0 && super::writer::preamble().starts_with(head) {
            return Err(ImageError::Incomplete {
                path: path.to_owned(),
                reason: format!("cut in the image preamble, after {len} bytes: it holds no record"),
            });
        }
        if len > 0 && IMAGE_MAGIC.starts_with(&head[..head.len().min(IMAGE_MAGIC.len())]) {
            return Err(corrupt(ProtocolError::Truncated {
                offset: len,
                what: "the image preamble",
            }));
        }
        return Err(ImageError::TooShort {
            path: path.to_owned(),
            len,
            preamble: PREAMBLE_LEN,
        });
    }
    f.read_exact(&mut pre).map_err(io)?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&pre[..8]);
    if found != IMAGE_MAGIC {
        return Err(corrupt(ProtocolError::BadMagic { found }));
    }
    let version = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
    if (1..IMAGE_VERSION).contains(&version) {
        return Err(corrupt(ProtocolError::OldImageVersion {
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
    // Every writer writes zeros there (no version wrote anything else): other bytes are
    // damage, which no checksum would otherwise catch.
    let reserved = [pre[12], pre[13], pre[14], pre[15]];
    if reserved != [0; 4] {
        return Err(corrupt(ProtocolError::PreambleReserved { found: reserved }));
    }
    let mut r = FrameReader::at_offset(std::io::BufReader::with_capacity(1 << 16, f), PREAMBLE_LEN);
    let mut p = Vec::new();
    let to_protocol = |e: TransferError| match e {
        TransferError::Protocol(p) => Ok(in_image_terms(p)),
        TransferError::Io { source, .. } => Err(io(source)),
        other => Err(io(std::io::Error::other(other.to_string()))),
    };
    let h = match r.read_frame(&mut p) {
        Ok(h) => h,
        // Cut before its first record (the layout) ended: a valid prefix like any cut image,
        // only one with no record in it.
        Err(e) => match to_protocol(e)? {
            e @ ProtocolError::Truncated { .. } => {
                if let Some(trailer) = ends_with_trailer(f, len) {
                    return Err(corrupt(ProtocolError::PastTrailer {
                        offset: PREAMBLE_LEN,
                        file_len: len,
                        trailer,
                    }));
                }
                return Err(ImageError::Incomplete {
                    path: path.to_owned(),
                    reason: format!(
                        "{e}, in its first record (HELLO: the layout): it holds no record"
                    ),
                });
            }
            e => return Err(corrupt(e)),
        },
    };
    let hello = h.decode::<Hello>(&p).map_err(corrupt)?;
    if hello.resume {
        return Err(corrupt(ProtocolError::Malformed {
            offset: h.offset,
            kind: h.kind,
            reason: "an image never resumes a transfer",
        }));
    }
    let layout = hello.layout;
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
        next_round: 0,
        compacted: None,
        loc,
        records: 1,
        finish: None,
        state: None,
        index: Vec::new(),
        trailer: None,
        pages_records: Vec::new(),
        added: Vec::new(),
        mapped: None,
        fault: None,
        unfinished: None,
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
                w.fault = match e {
                    // A cut leaves no trailer behind: with one at the end, the record's
                    // length is damaged.
                    ProtocolError::Truncated { .. } => match ends_with_trailer(f, len) {
                        Some(trailer) => fault(
                            ProtocolError::PastTrailer {
                                offset,
                                file_len: len,
                                trailer,
                            },
                            false,
                        ),
                        None => fault(e, true),
                    },
                    e => fault(e, false),
                };
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
                    let RoundBegin { round, .. } = h.decode(payload)?;
                    let next = w.next_round;
                    if round != next {
                        return Err(ProtocolError::RoundOutOfOrder {
                            expected: next,
                            got: round,
                        });
                    }
                    current = Some(RoundInfo {
                        round,
                        pages: 0,
                        zero_pages: 0,
                    });
                }
                (FrameKind::Pages | FrameKind::Zero, Some(round)) => {
                    let span = if h.kind == FrameKind::Pages {
                        let pages: Pages = h.decode(payload)?;
                        if pages.codec != Codec::None {
                            return Err(ProtocolError::Malformed {
                                offset: h.offset,
                                kind: h.kind,
                                reason: "compressed pages are not used in images",
                            });
                        }
                        if pages.live {
                            // Images never hold live frames (their sink copies pages).
                            return Err(ProtocolError::Malformed {
                                offset: h.offset,
                                kind: h.kind,
                                reason: "live page frames are not used in images",
                            });
                        }
                        pages.span
                    } else {
                        h.decode::<Zero>(payload)?.span
                    };
                    let first = span.place(&h, &w.layout)? / ps;
                    let data = h.offset + HEADER_LEN as u64;
                    if h.kind == FrameKind::Pages {
                        w.pages_records.push((h.offset, span.len));
                    }
                    for k in 0..span.len / ps {
                        let l = if h.kind == FrameKind::Zero {
                            ZERO
                        } else {
                            data + k * ps
                        };
                        pending.push(((first + k) as usize, l));
                    }
                    if h.kind == FrameKind::Zero {
                        round.zero_pages += span.len / ps;
                    } else {
                        round.pages += span.len / ps;
                    }
                }
                (FrameKind::RoundEnd, Some(round)) => {
                    let end: RoundEnd = h.decode(payload)?;
                    if end.round != round.round
                        || end.pages != round.pages
                        || end.zero_pages != round.zero_pages
                    {
                        return Err(ProtocolError::CountMismatch {
                            round: round.round,
                            claimed_pages: end.pages,
                            claimed_zero: end.zero_pages,
                            pages: round.pages,
                            zero: round.zero_pages,
                        });
                    }
                    for (i, l) in pending.drain(..) {
                        w.loc[i] = l;
                    }
                    w.rounds.push(*round);
                    w.next_round = round.round + 1;
                    current = None;
                }
                (FrameKind::Region, None) if w.finish.is_none() && w.state.is_none() => {
                    let frame: Region = h.decode(payload)?;
                    let grown = frame.add_to(&w.layout)?;
                    if grown.total_pages() > MAX_IMAGE_PAGES {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "layout has more pages than an image holds",
                        });
                    }
                    let added = grown.total_pages() - w.layout.total_pages();
                    w.loc.resize(w.loc.len() + added as usize, NEVER);
                    w.layout = grown;
                    w.added.push(AddedRegion {
                        id: frame.region.id,
                        before_round: w.next_round,
                    });
                }
                // Before any round: the round that follows stands for the rounds before it.
                (FrameKind::Compacted, None)
                    if w.next_round == 0
                        && w.compacted.is_none()
                        && w.state.is_none()
                        && w.finish.is_none() =>
                {
                    let c: Compacted = h.decode(payload)?;
                    if c.added_before.len() != w.added.len() {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "names another number of added regions than the REGION records before it",
                        });
                    }
                    for (a, &before) in w.added.iter_mut().zip(&c.added_before) {
                        a.before_round = before;
                    }
                    w.next_round = c.rounds - 1;
                    w.compacted = Some(CompactionInfo {
                        rounds: c.rounds,
                        compactions: c.compactions,
                        bytes_dropped: c.bytes_dropped,
                    });
                }
                // Between rounds: pages outside the memory that exists now are dropped.
                (FrameKind::Mapped, None) if w.finish.is_none() && w.state.is_none() => {
                    let frame: Mapped = h.decode(payload)?;
                    let kept = frame.offsets(&h, &w.layout)?;
                    for r in w.layout.outside(&kept) {
                        w.loc[(r.start / ps) as usize..(r.end / ps) as usize].fill(NEVER);
                    }
                    w.mapped = Some(kept);
                }
                (FrameKind::State, None) if w.finish.is_none() && w.state.is_none() => {
                    let state: State = h.decode(payload)?;
                    let at = h.offset + HEADER_LEN as u64;
                    w.state = Some((at, state.blob.len() as u64, state.crc));
                }
                (FrameKind::Finish, None) if w.finish.is_none() => {
                    let finish: Finish = h.decode(payload)?;
                    if finish.rounds != w.next_round {
                        return Err(ProtocolError::RoundOutOfOrder {
                            expected: w.next_round,
                            got: finish.rounds,
                        });
                    }
                    w.finish = Some((finish.rounds, finish.digest));
                }
                (FrameKind::Index, None) if w.finish.is_some() => {
                    w.index.extend(h.decode::<Index>(payload)?.entries);
                }
                (FrameKind::Trailer, None) if w.finish.is_some() => {
                    let trailer: Trailer = h.decode(payload)?;
                    if trailer.trailer_offset != h.offset
                        || h.offset + HEADER_LEN as u64 + u64::from(h.payload_len) != len
                    {
                        return Err(ProtocolError::Malformed {
                            offset: h.offset,
                            kind: h.kind,
                            reason: "trailer is not the last record",
                        });
                    }
                    w.trailer = Some((h.offset, trailer));
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
    if let Some(round) = current {
        let mut only: Vec<usize> = pending
            .iter()
            .map(|&(i, _)| i)
            .filter(|&i| w.loc[i] == NEVER)
            .collect();
        only.sort_unstable();
        only.dedup();
        w.unfinished = Some((round, only.len() as u64));
    }
    Ok(w)
}

/// The offset of the TRAILER record that ends the file, if its last bytes are one: a valid
/// record (CRC included) that names its own offset as the one it lies at. The writer writes
/// it once, last, after every other record; a file cut short ends with one only if the cut
/// fell right after bytes that happen to form such a record at that very offset.
fn ends_with_trailer(mut f: &File, len: u64) -> Option<u64> {
    let at = match len.checked_sub(TRAILER_LEN) {
        Some(at) if at >= PREAMBLE_LEN => at,
        _ => return None,
    };
    let mut tail = [0u8; TRAILER_LEN as usize];
    let read = f
        .seek(SeekFrom::Start(at))
        .and_then(|_| f.read_exact(&mut tail));
    read.ok()?;
    let mut p = Vec::new();
    let h = FrameReader::at_offset(&tail[..], at)
        .read_frame(&mut p)
        .ok()?;
    let t = h.decode::<Trailer>(&p).ok()?;
    (t.trailer_offset == at && t.index_offset < at).then_some(at)
}

/// Bytes of a TRAILER record: its header and its 8-byte payload (the memory digest).
const TRAILER_LEN: u64 = HEADER_LEN as u64 + 8;

/// What a cut image was reading when it ended, in the image's words: a record's header, or
/// its payload.
const RECORD_HEADER: &str = "a record header";
const RECORD_PAYLOAD: &str = "a record's payload";

/// `e` in the image's words: an image is a sequence of records, which the frame reader
/// reads as frames. `image info` (which skips page data) and `image verify` (which reads
/// it through the frame reader) then word the same cut alike.
fn in_image_terms(e: ProtocolError) -> ProtocolError {
    match e {
        ProtocolError::Truncated { offset, what } => ProtocolError::Truncated {
            offset,
            what: match what {
                "a frame header" => RECORD_HEADER,
                "a frame payload" => RECORD_PAYLOAD,
                other => other,
            },
        },
        e => e,
    }
}

/// Reads a header and, except for PAGES, its payload (checking the CRC);
/// for PAGES checks the file holds the payload and seeks past it.
fn read_header_skipping_pages<R: Read + Seek>(
    r: &mut FrameReader<std::io::BufReader<R>>,
    p: &mut Vec<u8>,
    file_len: u64,
) -> Result<Header, TransferError> {
    let offset = r.offset();
    let mut h = RawHeader::new_zeroed();
    if offset + HEADER_LEN as u64 > file_len {
        return Err(ProtocolError::Truncated {
            offset: file_len,
            what: RECORD_HEADER,
        }
        .into());
    }
    r.get_mut()
        .read_exact(h.as_mut_bytes())
        .map_err(TransferError::io("reading the image"))?;
    let payload_len = u64::from(h.payload_len());
    if h.kind_byte() != FrameKind::Pages as u8 || payload_len > MAX_PAYLOAD {
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
            what: RECORD_PAYLOAD,
        }
        .into());
    }
    r.get_mut()
        .seek_relative(payload_len as i64)
        .map_err(TransferError::io("reading the image"))?;
    r.set_offset(end);
    Ok(h.decode(offset)?)
}
