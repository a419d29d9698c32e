//! Checkpoint images: a file holding a layout, rounds of pages (later rounds
//! supersede earlier ones), the memory digest and an index.
//!
//! This module owns the image file format and the rules that make a crash
//! harmless: records are only appended (a compaction replaces the whole file,
//! below), and the image counts as complete only when a walk from the start
//! reaches a FINISH record (the checksum), the INDEX records and a TRAILER
//! that ends exactly at end of file. A file cut at any point therefore never
//! looks complete, and a cut is never taken for damage: cut inside its
//! preamble or its first record (HELLO), an image is incomplete with no record
//! ([`ImageError::Incomplete`](crate::ImageError::Incomplete) from
//! [`Image::open`]); a record that fails its CRC or is out of place is
//! damage ([`Image::damage`], `ImageError::Corrupt`). A record's length is
//! covered by its CRC, which is checked only once the whole record is read, so
//! a damaged length that runs past the end of the file reads like a cut: the
//! walk then looks at the file's last 40 bytes, and when they are a valid
//! TRAILER naming its own offset (written once, last), the file was written to
//! its end and the record is damage (`ProtocolError::PastTrailer`), in the
//! first record (HELLO) too. Without a valid trailer at the end (an
//! unfinished image, or one whose trailer is damaged too) the format cannot
//! tell a damaged length from a cut: incomplete.
//!
//! ```text
//! "PRCPIMG\0" | version u32 (7) | reserved u32 (zero: anything else is damage)
//! HELLO      (the layout; session, nonce and stream fields zero)
//! REGION...  (between rounds, optional: a region added to the layout mid-stream)
//! COMPACTED  (optional, after HELLO and the REGIONs of a compacted image: the next round stands for rounds 0..n)
//! MAPPED...  (between rounds, optional: the memory that exists now; pages outside it are dropped)
//! ROUND_BEGIN r | PAGES (raw, codec 0: pages, then their hash list)... | ZERO... | ROUND_END r   (per round, synced)
//! STATE      (optional: the state blob, with its own CRC32C)
//! FINISH     (rounds, memory digest)
//! INDEX...   (region, offset, length, file offset of the data | u64::MAX for zeros)
//! TRAILER    (offset of the first INDEX, own offset; payload: memory digest, u64)   synced, then renamed
//! ```
//!
//! Records are the wire protocol's frames (module `protocol`), each with its
//! CRC32C (a PAGES record's pages are checked by their listed XXH3-64
//! hashes), at file offsets, encoded and decoded by the same frame types as a
//! connection's. The memory digest is the one defined in [`crate::digest`]
//! (version 1 images held a CRC32C of the memory bytes, version 2 ones named
//! pages by host address, version 3 ones checked pages by CRC32C, version 4
//! ones had no REGION, version 5 ones no COMPACTED, version 6 ones no MAPPED; all are refused). The layout is HELLO's plus every
//! REGION record before the FINISH, each laid out after the regions before
//! it (the protocol's "Regions added mid-stream"); the index names pages of
//! added regions like any others. Pages never sent read as zeros.
//!
//! # Memory unmapped mid-run
//!
//! A source whose memory shrinks (a process that unmaps memory while it is
//! tracked) tells the writer, between rounds, which memory exists now
//! ([`Sink::retain`](crate::Sink::retain), the protocol's MAPPED): the writer
//! appends a MAPPED record naming those spans, and from that record on every
//! page outside them is dropped, for the writer's page table (so the index,
//! and any later compaction, leave them out) and for the reader's (which
//! applies the record where it stands in the file, so an image cut later
//! reads the same). A page dropped and mapped again comes back with the round
//! that sends it. The last MAPPED record is the image's final mappings
//! ([`ImageInfo::mapped`]; for `precopy send --pid`, the process's tracked
//! mappings when the final round was sent). A compacted copy holds the last
//! MAPPED record again, after its COMPACTED record.
//! An incomplete image is still readable: its contents are the rounds that
//! ended before the cut.
//!
//! # Compaction
//!
//! Appending keeps every round's copy of a page, so a writer that ran many
//! rounds over the same pages would grow without bound. The writer therefore
//! compacts between rounds ([`ImageWriter::compact`], when the file passes
//! its [`CompactionPolicy`]: by default twice the compacted size plus 64 MiB):
//! it writes beside the partial file a new one holding the preamble, HELLO,
//! the REGION records, a COMPACTED record and **one round, numbered `n - 1`,
//! holding the latest copy of every page of rounds `0..n`** (each read back
//! and checked against the hash recorded when it was written), syncs it and
//! renames it over the partial file (then syncs the directory), and appends
//! the next rounds there. The COMPACTED record carries `n`, the compactions
//! so far, the file bytes they dropped and, for each REGION record, the round
//! it was first added before, so `image info` tells the same story. A crash
//! at any step leaves at the partial path either the old file or the new one,
//! each an incomplete image holding every round that ended; the reader's
//! rules are unchanged (a COMPACTED record only shifts the number the next
//! round must have). A migration driver's writer compacts only when it is
//! pinged between rounds (`Sink::ping`, while the source runs), never in the
//! final phase; a writer nobody pings (a receiver's) compacts at the end of a
//! round.
//!
//! # Free space
//!
//! Before a round whose size the writer was told
//! ([`Sink::expect_round`](crate::Sink::expect_round): a migration's `send_round`
//! knows its ranges, a receiver reads it from ROUND_BEGIN) the writer asks the
//! file system for its free space (`fstatvfs`) and compares it with what the
//! whole round may write at worst (every page uncompressed in a PAGES record
//! of its own: page, hash and header, plus its index entry) and what the
//! finish needs after it (the index, 64 KiB for FINISH, TRAILER and the state
//! blob). If it does not fit and a compaction would make it fit (the copy
//! must fit in what is free, and the file shrinks to about one copy of every
//! page held), the writer compacts first; otherwise the round fails with
//! [`ImageError::NoSpace`](crate::ImageError::NoSpace)
//! ([`SpaceFor::Round`](crate::SpaceFor::Round), what it needs and what is
//! free) before any of it is written. Between rounds (at the ping, or at the
//! end of a round for a writer nobody pings) the writer also compacts when free
//! space would no longer hold a compacted copy plus two rounds as large as the
//! largest after round 0 and the file holds older copies worth one such round,
//! so that the check at a round's start rarely has to compact (which may fall
//! into the final phase). A compaction checks its own room first
//! ([`SpaceFor::Compaction`](crate::SpaceFor::Compaction)), and a round of
//! unstated size checks before any write past the room it last measured
//! ([`SpaceFor::Write`](crate::SpaceFor::Write)).
//!
//! By concern: [`writer`] (the [`ImageWriter`] sink), `walk` (reading the
//! records from the start, shared by opening and verifying), [`reader`]
//! ([`Image`]: open, state blob, checked page reads), [`verify`]
//! ([`Image::verify`]), [`info`] ([`ImageInfo`] and the `precopy image`
//! helpers); this file holds the page table both ends keep (where each page's
//! latest copy lives) and its index form.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::digest::{MemoryDigest, zero_page_hash};
use crate::error::ImageError;
use crate::layout::Layout;
use crate::protocol::IndexEntry;

mod gate;
pub mod info;
pub mod reader;
pub mod verify;
mod walk;
pub mod writer;

pub use gate::PublishGate;
pub use info::{
    AddedRegion, AddressKind, CompactionInfo, ImageInfo, MappedRange, ProcessDescription,
    RegionInfo, RoundInfo, image_cat, image_info, parse_span,
};
pub use reader::Image;
pub use verify::{VerifyReport, image_verify};
pub use writer::{CompactionPolicy, ImageReservation, ImageWriter};

/// The first eight bytes of an image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"PRCPIMG\0";
/// The image format version written by this build (7: MAPPED records; version 6 images,
/// which had none, and older ones are refused).
pub const IMAGE_VERSION: u32 = 7;
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

/// The memory digest of the memory described by `loc` (file offsets, zeros,
/// never sent), reading the pages from `file`.
fn digest_of_locations(file: &File, loc: &[u64], ps: u64) -> std::io::Result<u64> {
    let mut digest = MemoryDigest::new();
    let zero = zero_page_hash(ps);
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
        digest.push_whole_pages(chunk, ps as usize);
        i += n;
    }
    Ok(digest.finish())
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
            let file_offset = if l == ZERO { IndexEntry::ZEROS } else { l };
            if let Some(last) = out.last_mut() {
                let zeros = file_offset == IndexEntry::ZEROS;
                let contiguous = last.region == region.id
                    && last.offset + last.len == offset
                    && ((zeros && last.file_offset == IndexEntry::ZEROS)
                        || (!zeros
                            && last.file_offset != IndexEntry::ZEROS
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
        if off != IndexEntry::ZEROS && off.checked_add(len)? > file_len {
            return None;
        }
        for k in 0..len / ps {
            let slot = &mut loc[(first + k) as usize];
            if *slot != NEVER {
                return None;
            }
            *slot = if off == IndexEntry::ZEROS {
                ZERO
            } else {
                off + k * ps
            };
        }
    }
    Some(loc)
}

/// [`ImageError::NotAFile`] unless `file` (opened from `path`) is a regular file.
fn regular_file(path: &Path, file: &File) -> Result<(), ImageError> {
    let meta = file.metadata().map_err(|source| ImageError::Io {
        path: path.to_owned(),
        what: "inspecting",
        source,
    })?;
    match not_regular(&meta) {
        None => Ok(()),
        Some(kind) => Err(ImageError::NotAFile {
            path: path.to_owned(),
            kind,
        }),
    }
}

/// What a file that is not a regular file is ("a FIFO", "a directory", ...),
/// or `None` for a regular file.
pub fn not_regular(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryRegion;

    #[test]
    fn a_migration_names_an_image_as_its_destination() {
        let dir = std::env::temp_dir().join(format!("precopy-image-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.img");
        let layout = Layout::new(vec![MemoryRegion::new(0, 4096, 4096)]).unwrap();
        let w = ImageWriter::create(&path, layout).unwrap();
        // "sending round 3 to image PATH failed", not "to the destination".
        assert_eq!(
            crate::Sink::peer(&w),
            Some(format!("image {}", path.display()))
        );
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
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
