//! [`ImageWriter`]: the [`Sink`] that writes a checkpoint image, record by
//! record, syncing at the end of every round and after the index and trailer
//! that make it complete.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    IMAGE_MAGIC, IMAGE_VERSION, INDEX_ENTRIES_PER_RECORD, MAX_IMAGE_PAGES, NEVER, PREAMBLE_LEN,
    ZERO, digest_of_locations, index_entries, page_table,
};
use crate::buffer::PageBuf;
use crate::digest::{FinalCheck, PageHash, PageHashes, check_final};
use crate::error::{ImageError, TransferError};
use crate::layout::{Layout, MemoryRegion};
use crate::protocol::{
    Finish, Frame, FrameWriter, HEADER_LEN, Hello, Index, PageSpan, Region, RoundBegin, RoundEnd,
    State, Trailer, Zero,
};
use crate::sink::Sink;

/// Writes a checkpoint image; a [`Sink`].
///
/// The image is written to [`ImageWriter::partial_path`] (`PATH.partial`, owner-only
/// permissions: it holds a process's memory) and renamed to `PATH` only by
/// [`Sink::commit`], once it is complete and synced and the transfer's outcome is decided
/// (a driver commits after its verdict, a receiver after the sender's COMMIT), so a
/// transfer that fails, is cut or is given up never replaces an earlier image at `PATH`;
/// what it wrote stays at `PATH.partial` (incomplete, or complete but never published when
/// it was given up after the finish).
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    partial: PathBuf,
    out: FrameWriter<BufWriter<File>>,
    layout: Layout,
    /// Per layout page: file offset of its latest data, [`ZERO`] or [`NEVER`].
    loc: Vec<u64>,
    /// Per layout page: CRC of its latest data.
    hashes: PageHashes,
    /// Updates of the round in progress, applied at its end.
    next_round: u64,
    in_round: Option<(u64, u64, u64, u64)>,
    state_written: bool,
    finished: bool,
    committed: bool,
    /// File offset up to which the image is synced.
    synced_to: u64,
    /// The last [`SYNC_WINDOW`] per-round syncs: bytes they made durable, time they took.
    syncs: VecDeque<(u64, Duration)>,
}

/// Per-round syncs remembered for the finish estimate ([`Sink::ping`]).
const SYNC_WINDOW: usize = 8;

impl ImageWriter {
    /// Where the image at `path` is written until it is complete: `path` with `.partial`
    /// appended.
    pub fn partial_path(path: impl AsRef<Path>) -> PathBuf {
        let mut p = path.as_ref().as_os_str().to_owned();
        p.push(".partial");
        PathBuf::from(p)
    }

    /// Starts the image that will be `path` for `layout`, writing it at
    /// [`ImageWriter::partial_path`] (created or truncated, mode 0600). Fails if `path` exists
    /// and is not a regular file (a directory, a FIFO, a device), or the partial file cannot
    /// be created.
    pub fn create(path: impl AsRef<Path>, layout: Layout) -> Result<ImageWriter, TransferError> {
        let path = path.as_ref().to_owned();
        let partial = Self::partial_path(&path);
        let io = |what| {
            let path = path.clone();
            move |source| ImageError::Io { path, what, source }
        };
        let loc = page_table(layout.total_pages()).ok_or(TransferError::Config {
            reason: "layout has more pages than an image holds (MAX_IMAGE_PAGES)",
        })?;
        Self::check_destination(&path)?;
        // Non-blocking, so that a FIFO opens at once (read-write never waits) and anything but
        // a regular file is then refused before a byte is written.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&partial)
            .map_err(io("creating"))?;
        super::regular_file(&partial, &file)?;
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
            resume: false,
        };
        out.send(&hello).map_err(io("writing"))?;
        let hashes = PageHashes::new(loc.len(), layout.page_size());
        Ok(ImageWriter {
            path,
            partial,
            out,
            layout,
            loc,
            hashes,
            next_round: 0,
            in_round: None,
            state_written: false,
            finished: false,
            committed: false,
            synced_to: 0,
            syncs: VecDeque::new(),
        })
    }

    /// Whether an image can be written to `path`, checked without writing anything: its
    /// directory exists ([`ImageError::NoDirectory`]) and is writable by this user
    /// ([`ImageError::DirectoryNotWritable`]), and `path`, if it exists, is a regular file
    /// ([`ImageError::NotAFile`]: the rename that publishes the image would replace whatever
    /// is there). [`ImageWriter::create`] runs this check first; a tool calls it before it
    /// starts anything else, to refuse a bad destination up front.
    pub fn check_destination(path: impl AsRef<Path>) -> Result<(), ImageError> {
        let path = path.as_ref();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(ImageError::NoDirectory {
                dir: dir.to_owned(),
            });
        }
        if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
            return Err(ImageError::DirectoryNotWritable {
                dir: dir.to_owned(),
            });
        }
        // Non-blocking, so that a FIFO opens at once and is then refused.
        if std::fs::symlink_metadata(path).is_ok() {
            let existing = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(|source| ImageError::Io {
                    path: path.to_owned(),
                    what: "inspecting",
                    source,
                })?;
            super::regular_file(path, &existing)?;
        }
        Ok(())
    }

    /// The image file (it exists once the image is complete; until then see
    /// [`ImageWriter::partial_path`]).
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

    fn write<'p, F: Frame<'p>>(&mut self, frame: &F) -> Result<(), TransferError> {
        if self.finished {
            return Err(TransferError::Misuse {
                operation: "writing to an image",
                state: "after finish",
            });
        }
        let r = self.out.send(frame);
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

    /// Flushes and `fdatasync`s what was written; returns the time the sync took and records
    /// it with the bytes it made durable.
    fn sync(&mut self) -> Result<Duration, TransferError> {
        self.out.flush().map_err(self.io("writing"))?;
        let at = Instant::now();
        let r = self.out.get_ref().get_ref().sync_data();
        r.map_err(self.io("syncing"))?;
        let took = at.elapsed();
        let pos = self.pos();
        if self.syncs.len() == SYNC_WINDOW {
            self.syncs.pop_front();
        }
        self.syncs.push_back((pos - self.synced_to, took));
        self.synced_to = pos;
        Ok(took)
    }

    /// Bytes of the image so far (the file's length once flushed).
    pub fn bytes_written(&self) -> u64 {
        self.pos()
    }

    /// Bytes of the image an `fdatasync` has made durable: all of it at the end of every
    /// round ([`Sink::end_round`]) and after [`Sink::finish_uncommitted`], so a crash loses at
    /// most the round under way.
    pub fn synced_len(&self) -> u64 {
        self.synced_to
    }

    /// The time a sync of `bytes` bytes is expected to take, from the recent per-round syncs: a
    /// line `fixed + bytes × per_byte` fitted by least squares (its fixed part never above the
    /// fastest sync seen), or the fastest sync when no rising line fits. `None` before the
    /// first sync.
    fn sync_estimate(&self, bytes: u64) -> Option<Duration> {
        let fastest = self.syncs.iter().map(|s| s.1).min()?.as_secs_f64();
        let n = self.syncs.len() as f64;
        let mx = self.syncs.iter().map(|s| s.0 as f64).sum::<f64>() / n;
        let my = self.syncs.iter().map(|s| s.1.as_secs_f64()).sum::<f64>() / n;
        let sxx: f64 = self.syncs.iter().map(|s| (s.0 as f64 - mx).powi(2)).sum();
        let sxy: f64 = self
            .syncs
            .iter()
            .map(|s| (s.0 as f64 - mx) * (s.1.as_secs_f64() - my))
            .sum();
        let (fixed, per_byte) = if sxx > 0.0 && sxy > 0.0 {
            let slope = sxy / sxx;
            ((my - slope * mx).clamp(0.0, fastest), slope)
        } else {
            (fastest, 0.0)
        };
        Duration::try_from_secs_f64(fixed + per_byte * bytes as f64).ok()
    }

    /// The memory digest of what the image now holds, read back from the file.
    fn checksum(&mut self) -> Result<u64, TransferError> {
        self.out.flush().map_err(self.io("writing"))?;
        let ps = self.layout.page_size();
        let file = self.out.get_ref().get_ref();
        digest_of_locations(file, &self.loc, ps).map_err(self.io("reading back"))
    }
}

impl Sink for ImageWriter {
    /// The image, named where a migration's errors name its destination ("sending round 3 to
    /// image PATH failed"); its final acknowledgement is the write-out to disk (`fdatasync`).
    fn peer(&self) -> Option<String> {
        Some(format!("image {}", self.path.display()))
    }

    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        if self.in_round.is_some() || round != self.next_round {
            return Err(TransferError::Misuse {
                operation: "begin_round",
                state: "inside a round or out of sequence",
            });
        }
        self.write(&RoundBegin { round })?;
        self.in_round = Some((round, 0, 0, self.pos()));
        Ok(())
    }

    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        self.round_counts("send_pages")?;
        let len = pages.len() as u64;
        let ps = self.layout.page_size();
        let span = wire_span(&self.layout, offset, len)?;
        let first = offset / ps;
        if hashes.len() as u64 != len / ps || self.finished {
            return Err(TransferError::Misuse {
                operation: "send_pages",
                state: "with a CRC count that differs from the page count, or after finish",
            });
        }
        let data = self.pos() + HEADER_LEN as u64;
        let r = self.out.send_listed_pages(span, &pages, hashes);
        r.map_err(self.io("writing"))?;
        self.hashes.set(first as usize, hashes);
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
        let span = wire_span(&self.layout, range.start, len)?;
        let first = range.start / ps;
        self.write(&Zero { span })?;
        self.hashes.set_zero(first as usize, (len / ps) as usize);
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
        self.write(&RoundEnd::new(round, pages, zero))?;
        // Durable round by round: the final sync then covers only the final round (paid in
        // the round's own time, which the switch-over estimate fits), not every round's
        // pages at once while the source is paused.
        self.sync()?;
        self.in_round = None;
        self.next_round += 1;
        Ok(self.pos() - start + HEADER_LEN as u64)
    }

    /// What finishing would cost now, for the switch-over estimate: computing the index
    /// (timed here), then one `fdatasync` of the FINISH, INDEX and TRAILER records and the
    /// directory sync that makes the rename durable, each estimated from the per-round syncs
    /// (see [`ImageWriter`]'s `sync_estimate`). `None` before the first round ended.
    fn ping(&mut self) -> Result<Option<Duration>, TransferError> {
        let at = Instant::now();
        let entries = index_entries(&self.loc, &self.layout).len() as u64;
        let index = at.elapsed();
        let records = entries * crate::protocol::INDEX_ENTRY_LEN as u64
            + 4 * HEADER_LEN as u64 * (1 + entries / INDEX_ENTRIES_PER_RECORD as u64);
        let (Some(finish), Some(dir)) = (self.sync_estimate(records), self.sync_estimate(0)) else {
            return Ok(None);
        };
        Ok(Some(index + finish + dir))
    }

    /// Writes a REGION record (between rounds) and lays the region out after the others; its
    /// pages read as never sent until a round holds them.
    fn add_region(&mut self, region: &MemoryRegion) -> Result<(), TransferError> {
        if self.in_round.is_some() || self.state_written || self.finished {
            return Err(TransferError::Misuse {
                operation: "add_region",
                state: "inside a round, or after the state or finish",
            });
        }
        let region = region.without_host();
        let layout = self.layout.with_region(region)?;
        let added = layout.total_pages() - self.layout.total_pages();
        if layout.total_pages() > MAX_IMAGE_PAGES {
            return Err(TransferError::Config {
                reason: "layout has more pages than an image holds (MAX_IMAGE_PAGES)",
            });
        }
        self.write(&Region { region })?;
        self.loc.resize(self.loc.len() + added as usize, NEVER);
        self.hashes.grow(added as usize);
        self.layout = layout;
        Ok(())
    }

    /// Writes the STATE record: the blob with its own CRC32C.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        if self.in_round.is_some() || self.state_written {
            return Err(TransferError::Misuse {
                operation: "send_state",
                state: "inside a round or twice",
            });
        }
        self.write(&State::new(state))?;
        self.state_written = true;
        Ok(())
    }

    /// [`Sink::finish_uncommitted`], then [`Sink::commit`]: the image is complete and
    /// published at its path.
    fn finish(&mut self, memory_checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        crate::sink::finish_in_two_steps(self, memory_checksum, check)
    }

    /// Checks the page hashes recorded while writing (and with
    /// [`FinalCheck::Full`] the memory read back from the file) against
    /// `memory_checksum`, then writes the FINISH record, the index and the
    /// trailer and syncs, all at [`ImageWriter::partial_path`]. One sync is
    /// enough: the rounds before are synced already, and a crash before it
    /// completes leaves only the partial file, which is never published. On a mismatch the image is left
    /// incomplete. The image is not published at its path until
    /// [`Sink::commit`]: a migration driver commits only once it decided the
    /// migration completed, and a receiver only once the sender committed,
    /// so a transfer given up after this point leaves the earlier image at
    /// the path untouched (and this complete one at the partial path).
    fn finish_uncommitted(
        &mut self,
        memory_checksum: u64,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
        if self.in_round.is_some() {
            return Err(TransferError::Misuse {
                operation: "finish",
                state: "inside a round",
            });
        }
        let recorded = self.hashes.digest();
        check_final(memory_checksum, recorded, check, || self.checksum())?;
        self.write(&Finish {
            rounds: self.next_round,
            check: FinalCheck::Recorded,
            digest: memory_checksum,
        })?;
        let index_offset = self.pos();
        let entries = index_entries(&self.loc, &self.layout);
        for chunk in entries.chunks(INDEX_ENTRIES_PER_RECORD) {
            self.write(&Index {
                entries: chunk.to_vec(),
            })?;
        }
        let trailer_offset = self.pos();
        self.write(&Trailer {
            index_offset,
            trailer_offset,
            digest: memory_checksum,
        })?;
        self.sync()?;
        self.finished = true;
        Ok(())
    }

    /// Publishes the image finished by [`Sink::finish_uncommitted`]: renames
    /// the partial file to the image's path and syncs the directory, so the
    /// rename survives a crash.
    fn commit(&mut self) -> Result<(), TransferError> {
        if !self.finished || self.committed {
            return Err(TransferError::Misuse {
                operation: "commit",
                state: "before finish, or twice",
            });
        }
        self.committed = true;
        std::fs::rename(&self.partial, &self.path).map_err(self.io("renaming into place"))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("syncing the directory"))?;
        Ok(())
    }
}

/// The wire's name (region id, offset inside it) for `len` bytes at memory
/// offset `offset`, which must be whole pages inside one region.
fn wire_span(layout: &Layout, offset: u64, len: u64) -> Result<PageSpan, TransferError> {
    layout.check_span(offset, len)?;
    let (r, at) = layout
        .region_at(offset)
        .ok_or(crate::error::LayoutError::OutsideLayout {
            range: offset..offset + len,
        })?;
    Ok(PageSpan {
        region: r.id,
        offset: at,
        len,
    })
}
