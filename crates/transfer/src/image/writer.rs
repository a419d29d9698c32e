//! [`ImageWriter`]: the [`Sink`] that writes a checkpoint image, record by
//! record, syncing at the end of every round and after the index and trailer
//! that make it complete, and compacting it between rounds once older copies
//! of pages take more room than its [`CompactionPolicy`] allows.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gate::PublishGate;
use super::info::CompactionInfo;
use super::{
    IMAGE_MAGIC, IMAGE_VERSION, INDEX_ENTRIES_PER_RECORD, MAX_IMAGE_PAGES, NEVER, PREAMBLE_LEN,
    ZERO, digest_of_locations, index_entries, page_table,
};
use crate::buffer::PageBuf;
use crate::digest::{FinalCheck, PAGE_HASH_LEN, PageHash, PageHashes, check_final, page_hash};
use crate::error::{ImageError, ProtocolError, SpaceFor, TransferError};
use crate::layout::{Layout, MemoryRegion};
use crate::protocol::{
    Compacted, Finish, Frame, FrameWriter, HEADER_LEN, Hello, INDEX_ENTRY_LEN, Index, Mapped,
    PageSpan, Region, RoundBegin, RoundEnd, State, Trailer, Zero,
};
use crate::sink::Sink;

/// When an [`ImageWriter`] compacts its image: once the file is larger than `ratio` times
/// what a compacted copy of it would take (the latest copy of every page, in one round) plus
/// `slack` bytes. The file then stays below about `ratio × compacted + slack` plus one round,
/// and the disk holds at most that plus the compacted copy while one is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Multiple of the compacted size the file may reach (at least 1; the default is 2).
    pub ratio: u64,
    /// Bytes the file may exceed that multiple by (the default is 64 MiB, so that a small
    /// image is never rewritten for a few pages).
    pub slack: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            ratio: 2,
            slack: 64 << 20,
        }
    }
}

/// Most pages in one PAGES record of a compacted round (1 MiB of 4 KiB pages).
const COMPACT_RUN_PAGES: u64 = 256;

/// A run of pages of one region, for a compacted round: contents read back (`data`), or
/// zeros.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Index of the first page in the page table.
    first: u64,
    /// Pages.
    pages: u64,
    /// Region id and offset inside it of the first page.
    region: u32,
    offset: u64,
    data: bool,
}

/// The steps of a compaction, after which a test may stop it as a crash would.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CompactionStep {
    /// The compacted copy is written, not synced, not renamed.
    Written,
    /// It is synced, not renamed.
    Synced,
    /// It is renamed over the partial file; the directory is not synced.
    Renamed,
}

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
    /// The exclusive `flock` on the file at `partial` (after [`Sink::commit`], at `path`),
    /// held for the writer's life: a second writer for the same path is refused.
    lock: Lock,
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
    /// The layout as HELLO states it (no host addresses), and each region added since with
    /// the round it was added before: what a compacted copy starts with.
    first_layout: Layout,
    added: Vec<(MemoryRegion, u64)>,
    /// Pages whose latest copy holds data (a location in the file).
    data_pages: u64,
    /// When to compact (`None`: never).
    policy: Option<CompactionPolicy>,
    /// What the compactions so far did.
    compacted: Option<CompactionInfo>,
    /// Whether [`Sink::ping`] was called: its caller runs between rounds while the source
    /// runs (a migration driver), so compaction waits for it rather than end a round.
    pinged: bool,
    /// A compaction between rounds that failed: the next step of the transfer fails with it.
    failed: Option<TransferError>,
    /// Pages whose latest copy is zeros.
    zero_pages: u64,
    /// Bytes of the HELLO record.
    hello_len: u64,
    /// File offset up to which the file system was found to have room (see
    /// [`ImageWriter::ensure_room`]).
    room_until: u64,
    /// Decides between the publishing rename and a withdrawal ([`ImageWriter::with_publish_gate`]).
    gate: Option<Arc<PublishGate>>,
    /// The next round's most pages ([`Sink::expect_round`]), if stated.
    round_pages: Option<u64>,
    /// The last MAPPED record written ([`Sink::retain`]): the memory that exists, which a
    /// compacted copy records again.
    mapped: Option<Mapped>,
    /// Bytes of the largest round written after round 0 (a full copy, which no later round
    /// repeats): the free space a compaction between rounds keeps for the next ones
    /// ([`ImageWriter::space_low`]).
    largest_round: u64,
    #[cfg(test)]
    stop_after: Option<CompactionStep>,
}

/// Per-round syncs remembered for the finish estimate ([`Sink::ping`]).
const SYNC_WINDOW: usize = 8;
/// A sync of fewer bytes than this times mostly its fixed cost (what the finish's sync of
/// its few records costs): [`Sink::end_round`] makes sure one is among the remembered syncs.
const SMALL_SYNC: u64 = 64 << 10;

impl ImageWriter {
    /// Where the image at `path` is written until it is complete: `path` with `.partial`
    /// appended.
    pub fn partial_path(path: impl AsRef<Path>) -> PathBuf {
        let mut p = path.as_ref().as_os_str().to_owned();
        p.push(".partial");
        PathBuf::from(p)
    }

    /// Where the compacted copy of the image at `path` is written before it is renamed over
    /// the partial file: [`ImageWriter::partial_path`] with `.compacting` appended. It exists
    /// only while a compaction runs (or after a crash in one: the next writer removes it).
    pub fn compacting_path(path: impl AsRef<Path>) -> PathBuf {
        compacting_path(&Self::partial_path(path))
    }

    /// Starts the image that will be `path` for `layout`, writing it at
    /// [`ImageWriter::partial_path`] (created or truncated, mode 0600). Fails if `path` exists
    /// and is not a regular file (a directory, a FIFO, a device), or the partial file cannot
    /// be created, or another writer holds it ([`ImageError::Locked`]).
    pub fn create(path: impl AsRef<Path>, layout: Layout) -> Result<ImageWriter, TransferError> {
        Self::reserve(path)?.create(layout)
    }

    /// Takes the image that will be `path` before its layout is known (a receiver waiting
    /// for a sender): checks the destination as [`ImageWriter::create`] does and holds the
    /// partial file's exclusive lock, so a second writer to `path` is refused
    /// ([`ImageError::Locked`]) from now on, not only once the image is started. Nothing is
    /// written; [`ImageReservation::create`] starts the image. A reservation dropped unused
    /// removes the partial file if it is still empty.
    pub fn reserve(path: impl AsRef<Path>) -> Result<ImageReservation, TransferError> {
        let path = path.as_ref().to_owned();
        let partial = Self::partial_path(&path);
        Self::check_destination(&path)?;
        let (file, lock) = lock_partial(&path, &partial)?;
        Ok(ImageReservation {
            held: Some((file, lock)),
            path,
            partial,
        })
    }

    fn start(
        path: PathBuf,
        partial: PathBuf,
        file: File,
        lock: Lock,
        layout: Layout,
    ) -> Result<ImageWriter, TransferError> {
        let io = |what| {
            let path = path.clone();
            move |source| ImageError::Io { path, what, source }
        };
        let loc = page_table(layout.total_pages()).ok_or(TransferError::Config {
            reason: "layout has more pages than an image holds (MAX_IMAGE_PAGES)",
        })?;
        file.set_len(0).map_err(io("truncating"))?;
        // A compacted copy a crash left half-written is never the image: drop it (only the
        // writer holding the lock ever writes one, and that is this one now).
        let _ = std::fs::remove_file(compacting_path(&partial));
        let mut out = FrameWriter::new(BufWriter::with_capacity(1 << 20, file));
        let first_layout = layout.without_host();
        out.get_mut()
            .write_all(&preamble())
            .map_err(io("writing"))?;
        let hello_len = out.send(&hello(&first_layout)).map_err(io("writing"))?;
        let hashes = PageHashes::new(loc.len(), layout.page_size());
        Ok(ImageWriter {
            path,
            partial,
            lock,
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
            first_layout,
            added: Vec::new(),
            data_pages: 0,
            policy: Some(CompactionPolicy::default()),
            compacted: None,
            pinged: false,
            failed: None,
            zero_pages: 0,
            hello_len,
            room_until: 0,
            gate: None,
            round_pages: None,
            mapped: None,
            largest_round: 0,
            #[cfg(test)]
            stop_after: None,
        })
    }

    /// Publishes the finished image only through `gate`: once the gate is withdrawn (a
    /// command interrupted), [`Sink::commit`] leaves the image at the partial path and fails
    /// with [`ImageError::Withdrawn`]; once it published, a withdrawal says so.
    pub fn with_publish_gate(mut self, gate: Arc<PublishGate>) -> ImageWriter {
        self.gate = Some(gate);
        self
    }

    /// This writer with compaction as `policy` says (`None`: never compact, so the image
    /// keeps every round's copy of a page). The default is [`CompactionPolicy::default`].
    pub fn with_compaction(mut self, policy: Option<CompactionPolicy>) -> ImageWriter {
        self.policy = policy.map(|p| CompactionPolicy {
            ratio: p.ratio.max(1),
            ..p
        });
        self
    }

    /// What the compactions so far did (`None`: none yet).
    pub fn compaction(&self) -> Option<CompactionInfo> {
        self.compacted
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
        if let Some(what) = unwritable_file_system(dir) {
            return Err(ImageError::FileSystemNotWritable {
                dir: dir.to_owned(),
                what,
            });
        }
        if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
            return Err(ImageError::DirectoryNotWritable {
                dir: dir.to_owned(),
            });
        }
        if let Some(name) = path.file_name() {
            // The longest name the writer makes from it; NAME_MAX is per file system.
            let suffix = Self::compacting_path(name).as_os_str().len() - name.len();
            let name_max = nix::unistd::pathconf(dir, nix::unistd::PathconfVar::NAME_MAX)
                .ok()
                .flatten()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(255);
            if name.len() + suffix > name_max {
                return Err(ImageError::NameTooLong {
                    path: path.to_owned(),
                    len: name.len(),
                    suffix,
                    fits: name_max.saturating_sub(suffix),
                    name_max,
                });
            }
        }
        // The writer's own files are never followed through a symbolic link (see
        // `lock_partial`): one there is refused up front.
        for own in [Self::partial_path(path), Self::compacting_path(path)] {
            if std::fs::symlink_metadata(&own).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(ImageError::NotAFile {
                    path: own,
                    kind: "a symbolic link",
                });
            }
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

    /// Whether writing an image to `path` would replace only what an image writer may
    /// replace: fails with [`ImageError::NotAnImage`] when `path`, its partial file
    /// ([`ImageWriter::partial_path`]) or the compacted copy's path
    /// ([`ImageWriter::compacting_path`]) is a regular file that is neither empty nor starts
    /// like a precopy image (its magic, or a prefix of it: an image cut short). Reads at most
    /// the first 8 bytes of each; a missing file, or one that cannot be read, passes (the
    /// write then reports its own error). [`ImageWriter::create`] does not run this check:
    /// a tool runs it before it starts, unless its user asked to replace the file.
    pub fn check_replaceable(path: impl AsRef<Path>) -> Result<(), ImageError> {
        use std::io::Read;
        let path = path.as_ref();
        for p in [
            path.to_owned(),
            Self::partial_path(path),
            Self::compacting_path(path),
        ] {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if !meta.is_file() || meta.len() == 0 {
                continue;
            }
            let Ok(f) = File::open(&p) else {
                continue;
            };
            let mut head = Vec::with_capacity(IMAGE_MAGIC.len());
            if f.take(IMAGE_MAGIC.len() as u64)
                .read_to_end(&mut head)
                .is_err()
            {
                continue;
            }
            if !IMAGE_MAGIC.starts_with(&head) {
                return Err(ImageError::NotAnImage {
                    path: p,
                    len: meta.len(),
                });
            }
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
        self.ensure_room((HEADER_LEN + frame.payload().len()) as u64)?;
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

    /// Bytes free for this user on the file system holding the image (`fstatvfs`).
    fn free_space(&self) -> Result<u64, TransferError> {
        let file = self.out.get_ref().get_ref();
        let st = nix::sys::statvfs::fstatvfs(file)
            .map_err(|e| self.io("checking the free space for")(std::io::Error::from(e)))?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    fn no_space(&self, step: SpaceFor, need: u64, free: u64) -> TransferError {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        ImageError::NoSpace {
            dir,
            step,
            need,
            free,
        }
        .into()
    }

    /// Fails with [`ImageError::NoSpace`] unless the file system holding the image has room
    /// for `need` more bytes; returns the bytes free.
    fn check_room(&self, step: SpaceFor, need: u64) -> Result<u64, TransferError> {
        let free = self.free_space()?;
        if need > free {
            return Err(self.no_space(step, need, free));
        }
        Ok(free)
    }

    /// Bytes a round of at most `pages` pages may add to the file, with the finish after
    /// it: each page uncompressed in a PAGES record of its own with its hash (the worst
    /// case), ROUND_BEGIN and ROUND_END, and the finish's reserve grown by an index entry
    /// per page.
    fn round_need(&self, pages: u64) -> u64 {
        let ps = self.layout.page_size();
        let h = HEADER_LEN as u64;
        let per_page = ps + PAGE_HASH_LEN as u64 + h + INDEX_ENTRY_LEN as u64;
        pages
            .saturating_mul(per_page)
            .saturating_add(3 * h + 8)
            .saturating_add(self.finish_reserve())
    }

    /// Before round `round` of at most `pages` pages writes anything: makes sure the file
    /// system has room for all of it and the finish ([`ImageWriter::round_need`]). If it has
    /// not, compacts first when compaction is allowed and the room it frees (the file less
    /// its compacted size, about one copy of every page held) makes the round fit, and
    /// fails with [`ImageError::NoSpace`] ([`SpaceFor::Round`]) otherwise, with nothing of
    /// the round written.
    fn room_for_round(&mut self, round: u64, pages: u64) -> Result<(), TransferError> {
        let need = self.round_need(pages);
        self.out.flush().map_err(self.io("writing"))?;
        let free = self.free_space()?;
        if need <= free {
            self.room_until = self.pos() + free;
            return Ok(());
        }
        if self.can_compact() {
            let new_len = self.compacted_size();
            let freed = self.pos().saturating_sub(new_len);
            if new_len <= free && need <= free.saturating_add(freed) {
                tracing::info!(
                    image = %self.path.display(),
                    round,
                    need,
                    free,
                    "compacting the image to make room for the next round"
                );
                self.compact()?;
                let free = self.free_space()?;
                if need <= free {
                    self.room_until = self.pos() + free;
                    return Ok(());
                }
                return Err(self.no_space(SpaceFor::Round { round, pages }, need, free));
            }
        }
        Err(self.no_space(SpaceFor::Round { round, pages }, need, free))
    }

    /// Bytes the finish needs beyond the rounds: an index entry per page sent at most, one
    /// per region, and 64 KiB for FINISH, TRAILER and a small state blob.
    fn finish_reserve(&self) -> u64 {
        let entries = self.data_pages + self.zero_pages + self.layout.regions().len() as u64;
        entries * INDEX_ENTRY_LEN as u64 + (64 << 10)
    }

    /// Before writing `bytes` more: checks the file system has room for them and the finish
    /// after them ([`ImageWriter::finish_reserve`]). The free space is asked for (one
    /// `fstatvfs`) only when the write would pass what the last check found, so a round
    /// that fits costs one check, at its start; a write that would not fit fails with
    /// [`ImageError::NoSpace`] before a byte of it is written, leaving the image as it was
    /// (incomplete, every ended round intact).
    fn ensure_room(&mut self, bytes: u64) -> Result<(), TransferError> {
        let reserve = self.finish_reserve();
        let end = self.pos() + bytes;
        if end + reserve <= self.room_until {
            return Ok(());
        }
        // Bytes still in the buffer take no room on the file system yet.
        let buffered = self.out.get_ref().buffer().len() as u64;
        let free = self.check_room(SpaceFor::Write, buffered + bytes + reserve)?;
        self.room_until = self.pos() - buffered + free;
        Ok(())
    }

    /// The failure of a compaction between rounds, once: the step after it fails with it.
    fn take_failure(&mut self) -> Result<(), TransferError> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the file is over the budget of its [`CompactionPolicy`], judged by a quick
    /// bound on the compacted size that is never below it (every page in a record of its
    /// own), so that a file holding no older copies is never compacted.
    fn over_budget(&self) -> bool {
        let Some(p) = self.policy else {
            return false;
        };
        if !self.can_compact() {
            return false;
        }
        self.pos()
            > self
                .compacted_bound()
                .saturating_mul(p.ratio)
                .saturating_add(p.slack)
    }

    /// Whether the policy allows a compaction and the image is between rounds, after the
    /// first, before the state and finish.
    fn can_compact(&self) -> bool {
        self.policy.is_some()
            && self.next_round > 0
            && !self.state_written
            && !self.finished
            && self.in_round.is_none()
    }

    /// The exact size of a compacted copy of the image now.
    fn compacted_size(&self) -> u64 {
        let record = Compacted {
            rounds: 0,
            bytes_dropped: 0,
            compactions: 0,
            added_before: self.added.iter().map(|a| a.1).collect(),
        };
        self.compacted_len(&self.runs(), &record)
    }

    /// Whether free space runs low between rounds, so that a compaction is due while the
    /// source runs: the file holds older copies worth at least one more round as large as the
    /// largest after round 0, and free space no longer holds a compacted copy, two such rounds
    /// and the finish (later it could not be compacted at all), while it still holds the
    /// compacted copy. This keeps [`ImageWriter::room_for_round`] from having to compact at
    /// the start of a round (which may be the final one), and compacts about once per free
    /// space's worth of rounds rather than after every round. One `fstatvfs`; the compacted
    /// size is computed only when space is low.
    fn space_low(&self) -> bool {
        if !self.can_compact() || self.largest_round == 0 {
            return false;
        }
        let bound = self.compacted_bound();
        if self.pos() <= bound.saturating_add(self.largest_round) {
            return false;
        }
        let Ok(free) = self.free_space() else {
            return false;
        };
        let want = bound
            .saturating_add(self.largest_round.saturating_mul(2))
            .saturating_add(self.finish_reserve());
        free < want && self.compacted_size() <= free
    }

    /// A quick bound on the compacted size that is never below it (every page in a record
    /// of its own).
    fn compacted_bound(&self) -> u64 {
        let ps = self.layout.page_size();
        let header = HEADER_LEN as u64;
        let fixed =
            PREAMBLE_LEN + self.hello_len + self.added.len() as u64 * (header + 40) + 4 * header;
        fixed + self.data_pages * (ps + PAGE_HASH_LEN as u64 + header) + self.zero_pages * header
    }

    /// The runs of a compacted round: per region, pages whose latest copy has data (at most
    /// [`COMPACT_RUN_PAGES`] per run) or is zeros, in layout order; pages never sent are left
    /// out.
    fn runs(&self) -> Vec<Run> {
        let ps = self.layout.page_size();
        let mut runs: Vec<Run> = Vec::new();
        let mut page = 0u64;
        for region in self.layout.regions() {
            let mut open: Option<Run> = None;
            for k in 0..region.size / ps {
                let l = self.loc[page as usize];
                let kind = match l {
                    NEVER => None,
                    ZERO => Some(false),
                    _ => Some(true),
                };
                match (&mut open, kind) {
                    (Some(run), Some(data))
                        if run.data == data && (!data || run.pages < COMPACT_RUN_PAGES) =>
                    {
                        run.pages += 1;
                    }
                    (_, kind) => {
                        runs.extend(open.take());
                        open = kind.map(|data| Run {
                            first: page,
                            pages: 1,
                            region: region.id,
                            offset: k * ps,
                            data,
                        });
                    }
                }
                page += 1;
            }
            runs.extend(open);
        }
        runs
    }

    /// Bytes of the compacted copy of `runs`.
    fn compacted_len(&self, runs: &[Run], compacted: &Compacted) -> u64 {
        let ps = self.layout.page_size();
        let frame = |payload: usize| (HEADER_LEN + payload) as u64;
        let regions: u64 = self
            .added
            .iter()
            .map(|(r, _)| frame(crate::protocol::encode(&Region { region: *r }).1.len()))
            .sum();
        let records: u64 = runs
            .iter()
            .map(|r| {
                if r.data {
                    frame((r.pages * (ps + PAGE_HASH_LEN as u64)) as usize)
                } else {
                    frame(0)
                }
            })
            .sum();
        let mapped = self.mapped.as_ref().map_or(0, |m| frame(m.payload().len()));
        PREAMBLE_LEN
            + frame(crate::protocol::encode(&hello(&self.first_layout)).1.len())
            + regions
            + frame(compacted.payload().len())
            + mapped
            + frame(0)
            + records
            + frame(8)
    }

    /// Compacts the image now, between rounds: writes beside the partial file a copy that
    /// holds the preamble, HELLO, the REGION records, a COMPACTED record and one round with
    /// the latest copy of every page (read back from the file and checked against the hash
    /// recorded when it was written), syncs it, renames it over the partial file and syncs
    /// the directory; the image then continues there. A crash at any point leaves either
    /// the old file or the compacted one at the partial path, each an incomplete image that
    /// holds every round that ended. Fails with [`ImageError::NoSpace`] (nothing written)
    /// when the file system has no room for the copy, and with [`ImageError::PageDamaged`]
    /// (the old file kept) when a page read back fails its hash.
    pub fn compact(&mut self) -> Result<(), TransferError> {
        if self.in_round.is_some() || self.state_written || self.finished || self.next_round == 0 {
            return Err(TransferError::Misuse {
                operation: "compact",
                state: "inside a round, before the first round ended, or after the state or finish",
            });
        }
        self.out.flush().map_err(self.io("writing"))?;
        let old_len = self.pos();
        let runs = self.runs();
        let previous = self.compacted.unwrap_or(CompactionInfo {
            rounds: 0,
            compactions: 0,
            bytes_dropped: 0,
        });
        let mut record = Compacted {
            rounds: self.next_round,
            bytes_dropped: 0,
            compactions: previous.compactions + 1,
            added_before: self.added.iter().map(|a| a.1).collect(),
        };
        let new_len = self.compacted_len(&runs, &record);
        self.check_room(SpaceFor::Compaction, new_len)?;
        record.bytes_dropped = previous.bytes_dropped + old_len.saturating_sub(new_len);
        let tmp = compacting_path(&self.partial);
        let written = self.write_compacted(&tmp, &runs, &record, new_len);
        let (out, loc) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        #[cfg(test)]
        if self.stop_after == Some(CompactionStep::Written) {
            return Err(simulated_crash());
        }
        if let Err(e) = out.get_ref().get_ref().sync_data() {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("syncing the compacted copy of")(e));
        }
        #[cfg(test)]
        if self.stop_after == Some(CompactionStep::Synced) {
            return Err(simulated_crash());
        }
        // Locked before it takes the partial file's name, so that the partial path is never
        // unlocked while this writer runs (the old file's lock goes with it when it is dropped).
        let lock = match lock_file(out.get_ref().get_ref()) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(self.io("locking the compacted copy of")(e.into()));
            }
        };
        if let Err(e) = std::fs::rename(&tmp, &self.partial) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("renaming the compacted copy over")(e));
        }
        // From here the partial file is the compacted copy: continue there.
        self.out = out;
        self.lock = lock;
        self.loc = loc;
        self.synced_to = new_len;
        self.room_until = 0;
        self.compacted = Some(CompactionInfo {
            rounds: record.rounds,
            compactions: record.compactions,
            bytes_dropped: record.bytes_dropped,
        });
        #[cfg(test)]
        if self.stop_after == Some(CompactionStep::Renamed) {
            return Err(simulated_crash());
        }
        sync_dir(&self.partial).map_err(self.io("syncing the directory of"))?;
        tracing::debug!(
            image = %self.path.display(),
            rounds = record.rounds,
            old_len,
            new_len,
            "image compacted"
        );
        Ok(())
    }

    /// Writes the compacted copy of the image to `tmp` (see [`ImageWriter::compact`]);
    /// returns its writer, flushed, and the page table for it.
    fn write_compacted(
        &self,
        tmp: &Path,
        runs: &[Run],
        record: &Compacted,
        new_len: u64,
    ) -> Result<(FrameWriter<BufWriter<File>>, Vec<u64>), TransferError> {
        let io = |what| self.io(what);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            // Never through a symbolic link (one made there would truncate its target).
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(io("creating a compacted copy of"))?;
        let old = self.out.get_ref().get_ref();
        let ps = self.layout.page_size();
        let mut out = FrameWriter::new(BufWriter::with_capacity(1 << 20, file));
        let w = |r: std::io::Result<u64>| r.map(|_| ()).map_err(io("writing a compacted copy of"));
        out.get_mut()
            .write_all(&preamble())
            .map_err(io("writing a compacted copy of"))?;
        w(out.send(&hello(&self.first_layout)))?;
        for (region, _) in &self.added {
            w(out.send(&Region { region: *region }))?;
        }
        w(out.send(record))?;
        if let Some(mapped) = &self.mapped {
            w(out.send(mapped))?;
        }
        let round = record.rounds - 1;
        w(out.send(&RoundBegin {
            round,
            pages: 0,
            final_round: false,
        }))?;
        let mut loc = self.loc.clone();
        let mut buf = vec![0u8; (COMPACT_RUN_PAGES * ps) as usize];
        let mut hashes: Vec<PageHash> = Vec::with_capacity(COMPACT_RUN_PAGES as usize);
        let (mut pages, mut zero_pages) = (0, 0);
        for run in runs {
            let span = PageSpan {
                region: run.region,
                offset: run.offset,
                len: run.pages * ps,
            };
            if !run.data {
                w(out.send(&Zero { span }))?;
                zero_pages += run.pages;
                continue;
            }
            let data = &mut buf[..(run.pages * ps) as usize];
            self.read_back(old, run.first, data)?;
            hashes.clear();
            for (k, page) in data.chunks(ps as usize).enumerate() {
                let i = (run.first + k as u64) as usize;
                let got = page_hash(page);
                let want = self.hashes.get(i).unwrap_or(!got);
                if got != want {
                    return Err(ImageError::PageDamaged {
                        path: self.partial.clone(),
                        offset: i as u64 * ps,
                        source: ProtocolError::BadPageHash {
                            offset: self.loc[i],
                            page: 0,
                            stored: want,
                            computed: got,
                        },
                    }
                    .into());
                }
                hashes.push(got);
            }
            let at = PREAMBLE_LEN + out.written() + HEADER_LEN as u64;
            w(out.send_listed_pages(span, data, &hashes))?;
            for k in 0..run.pages {
                loc[(run.first + k) as usize] = at + k * ps;
            }
            pages += run.pages;
        }
        w(out.send(&RoundEnd::new(round, pages, zero_pages)))?;
        out.flush().map_err(io("writing a compacted copy of"))?;
        if PREAMBLE_LEN + out.written() != new_len {
            return Err(TransferError::Misuse {
                operation: "compact",
                state: "the compacted copy differs in length from its plan",
            });
        }
        Ok((out, loc))
    }

    /// Reads the latest copies of the pages `first..` (as many as `buf` holds) from `old`,
    /// one read per stretch stored back to back.
    fn read_back(&self, old: &File, first: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        let ps = self.layout.page_size() as usize;
        let n = buf.len() / ps;
        let mut k = 0;
        while k < n {
            let at = self.loc[first as usize + k];
            let mut m = 1;
            while k + m < n && self.loc[first as usize + k + m] == at + (m * ps) as u64 {
                m += 1;
            }
            old.read_exact_at(&mut buf[k * ps..(k + m) * ps], at)
                .map_err(self.io("reading back"))?;
            k += m;
        }
        Ok(())
    }

    /// Compacts if the file is over its budget; a failure is kept for the next step.
    fn compact_if_due(&mut self) {
        if self.failed.is_none()
            && (self.over_budget() || self.space_low())
            && let Err(e) = self.compact()
        {
            self.failed = Some(e);
        }
    }
}

/// The 16-byte preamble of an image of this version.
pub(super) fn preamble() -> [u8; PREAMBLE_LEN as usize] {
    let mut pre = [0u8; PREAMBLE_LEN as usize];
    pre[..8].copy_from_slice(&IMAGE_MAGIC);
    pre[8..12].copy_from_slice(&IMAGE_VERSION.to_le_bytes());
    pre
}

/// An image's HELLO record for `layout` (session, nonce and stream fields zero).
fn hello(layout: &Layout) -> Hello {
    Hello {
        session: 0,
        stream_index: 0,
        stream_count: 1,
        nonce: [0; 16],
        layout: layout.clone(),
        resume: false,
    }
}

/// Opens (creating it, mode 0600, not truncating) the partial file `partial` of the image
/// at `path` and takes an exclusive `flock` on it, held as long as the returned [`Lock`]
/// lives (the writer keeps it until it is dropped). Fails with [`ImageError::Locked`] when another
/// writer holds it. The file locked is checked to be the one still at `partial` (a writer
/// that compacted or published meanwhile renamed another file there or this one away);
/// if not, it tries again.
fn lock_partial(path: &Path, partial: &Path) -> Result<(File, Lock), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let io = |what| {
        let path = path.to_owned();
        move |source| ImageError::Io { path, what, source }
    };
    // Each try that finds another file at `partial` than the one it locked means another
    // writer compacted or published in between; more than this many means something else
    // keeps replacing it.
    for _ in 0..LOCK_TRIES {
        // Non-blocking, so that a FIFO opens at once (read-write never waits) and anything
        // but a regular file is then refused before a byte is written. Not through a
        // symbolic link: that would create or take a file elsewhere (and the check below,
        // which looks at the link itself, would never find the file it locked there).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
            .open(partial)
            .map_err(|e| {
                if e.raw_os_error() == Some(nix::libc::ELOOP) {
                    ImageError::NotAFile {
                        path: partial.to_owned(),
                        kind: "a symbolic link",
                    }
                } else {
                    io("creating")(e)
                }
            })?;
        super::regular_file(partial, &file)?;
        let lock = lock_file(&file).map_err(|e| match e {
            nix::errno::Errno::EWOULDBLOCK => ImageError::Locked {
                path: path.to_owned(),
                partial: partial.to_owned(),
            },
            e => io("locking")(e.into()),
        })?;
        let held = file.metadata().map_err(io("inspecting"))?;
        match std::fs::symlink_metadata(partial) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                return Ok((file, lock));
            }
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("inspecting")(e)),
        }
    }
    Err(io("locking")(std::io::Error::other(format!(
        "the file at {} was replaced {LOCK_TRIES} times while it was being locked",
        partial.display()
    ))))
}

/// How many times [`lock_partial`] opens the partial file again after finding it replaced.
const LOCK_TRIES: u32 = 100;

/// An exclusive `flock` on an image file, held until dropped (on a duplicate of the
/// writer's descriptor: the lock belongs to the open file both share).
type Lock = nix::fcntl::Flock<File>;

/// The image at a path taken before its layout is known ([`ImageWriter::reserve`]): the
/// partial file's lock is held until [`ImageReservation::create`] hands it to the writer or
/// the reservation is dropped.
#[derive(Debug)]
pub struct ImageReservation {
    path: PathBuf,
    partial: PathBuf,
    held: Option<(File, Lock)>,
}

impl ImageReservation {
    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the image for `layout` under the lock already held (see
    /// [`ImageWriter::create`]).
    pub fn create(mut self, layout: Layout) -> Result<ImageWriter, TransferError> {
        if layout.total_pages() > super::MAX_IMAGE_PAGES {
            // Refused before the reservation is used: dropping it removes the empty file.
            return Err(TransferError::Config {
                reason: "layout has more pages than an image holds (MAX_IMAGE_PAGES)",
            });
        }
        let (file, lock) = self.held.take().ok_or(TransferError::Misuse {
            operation: "ImageReservation::create",
            state: "already used",
        })?;
        ImageWriter::start(self.path.clone(), self.partial.clone(), file, lock, layout)
    }
}

impl Drop for ImageReservation {
    fn drop(&mut self) {
        // Still ours (the lock is held): an empty partial file is only what `reserve` created.
        if let Some((file, _lock)) = &self.held
            && file.metadata().is_ok_and(|m| m.len() == 0)
        {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Takes an exclusive `flock` on `file` without waiting (`EWOULDBLOCK`: another open file
/// holds it).
fn lock_file(file: &File) -> Result<Lock, nix::errno::Errno> {
    let dup = file
        .try_clone()
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)))?;
    Lock::lock(dup, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e)
}

/// What the file system of `dir` is when no image can be created there: mounted read-only
/// (`ST_RDONLY`), or a kernel's pseudo file system whose files are the kernel's own (creating
/// one fails with `ENOENT` or `EACCES`, even for root, which reads as a missing or forbidden
/// directory). `None` when it may take files, or when it cannot be told.
fn unwritable_file_system(dir: &Path) -> Option<&'static str> {
    use nix::sys::statfs as fs;
    if let Ok(v) = nix::sys::statvfs::statvfs(dir)
        && v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
    {
        return Some("a read-only file system");
    }
    let kind = fs::statfs(dir).ok()?.filesystem_type();
    [
        (fs::PROC_SUPER_MAGIC, "the proc file system (/proc)"),
        (fs::SYSFS_MAGIC, "the sysfs file system (/sys)"),
        (fs::CGROUP_SUPER_MAGIC, "a cgroup file system"),
        (fs::CGROUP2_SUPER_MAGIC, "a cgroup2 file system"),
        (fs::DEBUGFS_MAGIC, "the debugfs file system"),
        (fs::TRACEFS_MAGIC, "the tracefs file system"),
        (fs::SECURITYFS_MAGIC, "the securityfs file system"),
        (fs::DEVPTS_SUPER_MAGIC, "the devpts file system"),
    ]
    .into_iter()
    .find(|(magic, _)| *magic == kind)
    .map(|(_, what)| what)
}

/// Where the compacted copy of the partial file `partial` is written before it replaces it.
fn compacting_path(partial: &Path) -> PathBuf {
    let mut p = partial.as_os_str().to_owned();
    p.push(".compacting");
    PathBuf::from(p)
}

/// Syncs the directory holding `path`, so that a rename in it survives a crash.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
fn simulated_crash() -> TransferError {
    TransferError::Misuse {
        operation: "compact",
        state: "stopped by the test as a crash would",
    }
}

impl Sink for ImageWriter {
    /// The image, named where a migration's errors name its destination ("sending round 3 to
    /// image PATH failed"); its final acknowledgement is the write-out to disk (`fdatasync`).
    fn peer(&self) -> Option<String> {
        Some(format!("image {}", self.path.display()))
    }

    fn finish_work(&self) -> Option<String> {
        Some("its index and the fsync of its last records and directory".into())
    }

    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.take_failure()?;
        // The room is measured again at every round (a compaction, or anything else on the
        // file system, changes it).
        self.room_until = 0;
        let pages = self.round_pages.take();
        if self.in_round.is_some() || round != self.next_round {
            return Err(TransferError::Misuse {
                operation: "begin_round",
                state: "inside a round or out of sequence",
            });
        }
        if let Some(pages) = pages {
            self.room_for_round(round, pages)?;
        }
        self.write(&RoundBegin {
            round,
            pages: 0,
            final_round: false,
        })?;
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
        self.ensure_room(HEADER_LEN as u64 + len + len / ps * PAGE_HASH_LEN as u64)?;
        let data = self.pos() + HEADER_LEN as u64;
        let r = self.out.send_listed_pages(span, &pages, hashes);
        r.map_err(self.io("writing"))?;
        self.hashes.set(first as usize, hashes);
        for k in 0..len / ps {
            let slot = &mut self.loc[(first + k) as usize];
            self.data_pages += u64::from(*slot >= ZERO);
            self.zero_pages -= u64::from(*slot == ZERO);
            *slot = data + k * ps;
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
            let slot = &mut self.loc[(first + k) as usize];
            self.data_pages -= u64::from(*slot < ZERO);
            self.zero_pages += u64::from(*slot != ZERO);
            *slot = ZERO;
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
        // Until a sync of a few bytes was timed, the pages are synced before the ROUND_END
        // record and that record alone after them: the finish syncs a few records too, and
        // one sync of all of round 0 says nothing about that sync's fixed cost (the finish
        // was estimated at round 0's whole sync, 170-650 ms for 256 MiB-1 GiB, against 1-6
        // ms measured in the final phase).
        if !self.syncs.iter().any(|s| s.0 < SMALL_SYNC) {
            self.sync()?;
        }
        self.write(&RoundEnd::new(round, pages, zero))?;
        // Durable round by round: the final sync then covers only the final round (paid in
        // the round's own time, which the switch-over estimate fits), not every round's
        // pages at once while the source is paused.
        self.sync()?;
        self.in_round = None;
        self.next_round += 1;
        let bytes = self.pos() - start + HEADER_LEN as u64;
        if round > 0 {
            self.largest_round = self.largest_round.max(bytes);
        }
        // A caller that never pings (a receiver writing what a sender streams) gets its image
        // compacted here; a migration driver pings between rounds, while the source runs, and
        // compaction waits for that, so that it never falls into the final phase.
        if !self.pinged {
            self.compact_if_due();
        }
        Ok(bytes)
    }

    /// What finishing would cost now, for the switch-over estimate: computing the index
    /// (timed here), then one `fdatasync` of the FINISH, INDEX and TRAILER records and the
    /// directory sync that makes the rename durable, each estimated from the per-round syncs
    /// (see [`ImageWriter`]'s `sync_estimate`). `None` before the first round ended.
    fn ping(&mut self) -> Result<Option<Duration>, TransferError> {
        // Between rounds, with the source running: the one place a migration's image is
        // compacted (see `end_round`).
        self.pinged = true;
        self.compact_if_due();
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

    /// The next round holds at most `pages` pages: [`Sink::begin_round`] checks the room for
    /// all of it first (compacting if that makes it fit), see [`ImageError::NoSpace`].
    fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
        self.round_pages = Some(pages);
        Ok(())
    }

    /// Writes a MAPPED record (between rounds, before the state): the memory that exists
    /// now; pages outside it are dropped from the page table (they read as never sent, leave
    /// the index and are not copied by a compaction) and their hashes become a zero page's.
    /// The last such record is the image's final mappings ([`ImageInfo::mapped`](super::ImageInfo::mapped)).
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        if self.in_round.is_some() || self.state_written || self.finished {
            return Err(TransferError::Misuse {
                operation: "retain",
                state: "inside a round, or after the state or finish",
            });
        }
        let record = Mapped::of(&self.layout, memory);
        self.write(&record)?;
        let ps = self.layout.page_size();
        for r in self.layout.outside(memory) {
            let (first, n) = (r.start / ps, (r.end - r.start) / ps);
            for slot in &mut self.loc[first as usize..(first + n) as usize] {
                match *slot {
                    NEVER => {}
                    ZERO => self.zero_pages -= 1,
                    _ => self.data_pages -= 1,
                }
                *slot = NEVER;
            }
            self.hashes.set_zero(first as usize, n as usize);
        }
        self.mapped = Some(record);
        Ok(true)
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
        self.added.push((region, self.next_round));
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
        self.take_failure()?;
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
        self.take_failure()?;
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
        let rename = || std::fs::rename(&self.partial, &self.path);
        let published = match &self.gate {
            Some(gate) => gate.publish(rename),
            None => rename().map(|()| true),
        }
        .map_err(self.io("renaming into place"))?;
        if !published {
            return Err(ImageError::Withdrawn {
                path: self.path.clone(),
            }
            .into());
        }
        sync_dir(&self.path).map_err(self.io("syncing the directory"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Transfer;
    use crate::image::Image;
    use crate::source::SliceSource;

    const PS: u64 = 4096;
    const BASE: u64 = 0x10_0000;
    const PAGES: u64 = 16;

    /// 16 pages, page `i` filled with `i + 1 + 16 × round` (page 5 all zeros).
    fn memory(round: u64) -> Vec<u8> {
        let mut m = vec![0u8; (PAGES * PS) as usize];
        for (i, p) in m.chunks_mut(PS as usize).enumerate() {
            if i != 5 {
                p.fill((i as u64 + 1 + 16 * round) as u8);
            }
        }
        m
    }

    /// A transfer into an image at `dir/x.img` compacted as soon as it holds an older copy
    /// of a page, stopped after `stop` in its first compaction.
    fn transfer(
        dir: &Path,
        stop: Option<CompactionStep>,
    ) -> Transfer<SliceSource<Vec<u8>>, ImageWriter> {
        let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
        let mut w = ImageWriter::create(dir.join("x.img"), layout.clone())
            .unwrap()
            .with_compaction(Some(CompactionPolicy { ratio: 1, slack: 0 }));
        w.stop_after = stop;
        Transfer::new(SliceSource::new(BASE, memory(0)), w, layout, 4).unwrap()
    }

    /// Round 0 sends all pages; round `r` rewrites pages 0..8 with round `r`'s bytes.
    fn round(tx: &mut Transfer<SliceSource<Vec<u8>>, ImageWriter>, r: u64) {
        if r == 0 {
            tx.send_round(&[BASE..BASE + PAGES * PS]).unwrap();
        } else {
            let m = memory(r);
            tx.source_mut().data_mut()[..(8 * PS) as usize]
                .copy_from_slice(&m[..(8 * PS) as usize]);
            tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
        }
    }

    /// What the image at `path` holds, all of it, incomplete or not.
    fn contents(path: &Path) -> (Vec<u8>, crate::image::ImageInfo) {
        let img = Image::open(path).unwrap();
        (img.read_span_to_vec(0..PAGES * PS).unwrap(), img.info())
    }

    #[test]
    fn a_symbolic_link_at_the_partial_path_is_refused_and_never_followed() {
        // A dangling link at PATH.partial: opening through it created its target and then
        // spun for ever, the link never being the file it had locked.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.img");
        let victim = dir.path().join("victim");
        let partial = ImageWriter::partial_path(&path);
        std::os::unix::fs::symlink(&victim, &partial).unwrap();
        let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
        let refused = |e: TransferError| {
            assert!(
                matches!(&e, TransferError::Image(ImageError::NotAFile { path, kind })
                    if *path == partial && *kind == "a symbolic link"),
                "{e:?}"
            );
        };
        refused(ImageWriter::create(&path, layout.clone()).unwrap_err());
        refused(ImageWriter::reserve(&path).unwrap_err());
        // Past the up-front check too (a link made after it): refused, not followed.
        refused(
            lock_partial(&path, &partial)
                .map(|_| ())
                .unwrap_err()
                .into(),
        );
        assert!(!victim.exists(), "the link's target was created");
        // A link to an existing file: the same.
        std::fs::write(&victim, b"").unwrap();
        refused(
            lock_partial(&path, &partial)
                .map(|_| ())
                .unwrap_err()
                .into(),
        );
        refused(ImageWriter::create(&path, layout).unwrap_err());
        // And at the compacted copy's path.
        std::fs::remove_file(&partial).unwrap();
        let compacting = ImageWriter::compacting_path(&path);
        std::os::unix::fs::symlink(&victim, &compacting).unwrap();
        let e = ImageWriter::check_destination(&path).unwrap_err();
        assert!(
            matches!(&e, ImageError::NotAFile { path, .. } if *path == compacting),
            "{e:?}"
        );
    }

    /// A second writer for the same path is refused, before it truncates or removes
    /// anything, for as long as the first runs (across its compactions), and the first's
    /// image is whole.
    #[test]
    fn a_second_writer_for_the_same_path_is_refused_while_the_first_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
        let partial = ImageWriter::partial_path(&path);
        let refused = || {
            let len = std::fs::metadata(&partial).unwrap().len();
            assert!(len > 0);
            let e = ImageWriter::create(&path, layout.clone()).unwrap_err();
            assert!(
                matches!(&e, TransferError::Image(ImageError::Locked { partial, .. })
                    if *partial == ImageWriter::partial_path(&path)),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "another precopy is writing {} ({} is locked)",
                    path.display(),
                    ImageWriter::partial_path(&path).display()
                )
            );
            // Nothing truncated.
            assert_eq!(std::fs::metadata(&partial).unwrap().len(), len);
        };
        let mut tx = transfer(dir.path(), None);
        round(&mut tx, 0);
        tx.probe_finish().unwrap();
        refused();
        round(&mut tx, 1);
        tx.probe_finish().unwrap();
        assert!(tx.sink().compaction().is_some(), "compacted");
        // The compacted copy now at the partial path is locked too.
        refused();
        round(&mut tx, 2);
        tx.finish(FinalCheck::Full).unwrap();
        Image::open(&path).unwrap().verify().unwrap();
        drop(tx);
        // Once the first is gone, a new writer starts.
        ImageWriter::create(&path, layout.clone()).unwrap();
    }

    /// A review: the finish was estimated from round 0's sync alone (all of memory: 570-650
    /// ms for 1 GiB, against 4-6 ms for the final phase's sync of a few records). Round 0's
    /// ROUND_END record is now synced on its own, so the fit knows a small sync's cost.
    #[test]
    fn round_0_times_a_small_sync_beside_the_sync_of_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut tx = transfer(dir.path(), None);
        round(&mut tx, 0);
        let syncs: Vec<u64> = tx.sink().syncs.iter().map(|s| s.0).collect();
        assert_eq!(syncs.len(), 2, "{syncs:?}");
        // The pages (page 5 is a zero range, no data) and the ROUND_END record.
        assert!(syncs[0] >= (PAGES - 1) * PS, "{syncs:?}");
        assert!(syncs[1] < SMALL_SYNC, "{syncs:?}");
        assert_eq!(tx.sink().synced_len(), tx.sink().bytes_written());
        tx.probe_finish().unwrap().expect("a finish estimate");
        // One small sync is remembered: the next rounds sync once each.
        round(&mut tx, 1);
        assert_eq!(tx.sink().syncs.len(), 3);
        tx.finish(FinalCheck::Full).unwrap();
        Image::open(dir.path().join("x.img"))
            .unwrap()
            .verify()
            .unwrap();
    }

    #[test]
    fn a_compacted_image_holds_the_latest_copies_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut tx = transfer(dir.path(), None);
        round(&mut tx, 0);
        tx.probe_finish().unwrap();
        assert!(
            tx.sink().compaction().is_none(),
            "nothing to drop after round 0"
        );
        round(&mut tx, 1);
        let before = tx.sink().bytes_written();
        tx.probe_finish().unwrap();
        let after = tx.sink().bytes_written();
        assert!(after < before, "compacted: {before} -> {after} bytes");
        let c = tx.sink().compaction().expect("compacted");
        assert_eq!(
            (c.rounds, c.compactions, c.bytes_dropped),
            (2, 1, before - after)
        );
        assert!(!compacting_path(&ImageWriter::partial_path(dir.path().join("x.img"))).exists());
        round(&mut tx, 2);
        tx.probe_finish().unwrap();
        round(&mut tx, 3);
        tx.finish(FinalCheck::Full).unwrap();
        let img = Image::open(dir.path().join("x.img")).unwrap();
        img.verify().unwrap();
        let mut want = memory(0);
        want[..(8 * PS) as usize].copy_from_slice(&memory(3)[..(8 * PS) as usize]);
        assert_eq!(img.read_span_to_vec(0..PAGES * PS).unwrap(), want);
        let info = img.info();
        assert_eq!(info.rounds_ended, 4);
        assert_eq!(
            info.compacted.map(|c| (c.rounds, c.compactions)),
            Some((3, 2))
        );
        // The compacted round stands for rounds 0-2, then round 3 as written.
        assert_eq!(info.rounds.len(), 2);
        assert_eq!((info.rounds[0].round, info.rounds[0].pages), (2, 15));
        assert_eq!(info.rounds[0].zero_pages, 1);
        assert_eq!(info.rounds[1].round, 3);
        assert!(
            info.to_string().contains("rounds 0-2 folded into one"),
            "{info}"
        );
    }

    /// A crash after each step of a compaction (the writer stopped there and dropped, as a
    /// crashed process's would be) leaves at the partial path an incomplete image with every
    /// round that ended; a new writer at the path drops the half-made copy.
    #[test]
    fn a_crash_at_each_step_of_a_compaction_loses_no_ended_round() {
        for step in [
            CompactionStep::Written,
            CompactionStep::Synced,
            CompactionStep::Renamed,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.img");
            let partial = ImageWriter::partial_path(&path);
            let mut tx = transfer(dir.path(), Some(step));
            round(&mut tx, 0);
            tx.probe_finish().unwrap();
            round(&mut tx, 1);
            // The compaction stops here; the next step of the transfer fails with it.
            tx.probe_finish().unwrap();
            let err = tx.send_round(&[BASE..BASE + PS]).unwrap_err();
            assert!(
                format!("{err}").contains("as a crash would"),
                "{step:?}: {err}"
            );
            drop(tx);
            let (got, info) = contents(&partial);
            let mut want = memory(0);
            want[..(8 * PS) as usize].copy_from_slice(&memory(1)[..(8 * PS) as usize]);
            assert_eq!(got, want, "{step:?}: the rounds that ended");
            assert!(!info.complete, "{step:?}");
            assert_eq!(info.rounds_ended, 2, "{step:?}");
            // Renamed: the compacted copy is the image; before that, the old file is.
            assert_eq!(
                info.compacted.is_some(),
                step == CompactionStep::Renamed,
                "{step:?}"
            );
            let tmp = compacting_path(&partial);
            assert_eq!(tmp.exists(), step != CompactionStep::Renamed, "{step:?}");
            let layout = Layout::single(PS, BASE, PAGES * PS).unwrap();
            drop(ImageWriter::create(&path, layout).unwrap());
            assert!(!tmp.exists(), "{step:?}: the half-made copy is dropped");
        }
    }

    /// A tmpfs of `size` mounted on a fresh directory (unmounted, then removed, on drop), or
    /// `None` after a loud SKIP where this process cannot mount one (it needs root).
    ///
    /// One at a time in this test process ([`SMALL_FS`], held until the unmount): these
    /// tests count every byte free, and a file's blocks return to the file system only when
    /// the last descriptor of it closes. A sibling test that starts `mount` or `umount`
    /// forks this process, and until that child has `exec`ed it holds a copy of every
    /// descriptor, the image file a compaction just replaced included; the writer then
    /// rightly finds too little room for its next round (seen in 11 of 40 runs of these
    /// tests beside two CPU hogs, never with one test at a time).
    struct SmallFs {
        dir: tempfile::TempDir,
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    /// Held by the one [`SmallFs`] alive in this process.
    static SMALL_FS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    impl SmallFs {
        fn mount(size: &str) -> Option<SmallFs> {
            let turn = SMALL_FS.lock().unwrap_or_else(|e| e.into_inner());
            let dir = tempfile::tempdir().unwrap();
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output();
            if !matches!(&mounted, Ok(o) if o.status.success()) {
                eprintln!("SKIP: cannot mount a {size} tmpfs (needs root): {mounted:?}");
                return None;
            }
            Some(SmallFs { dir, _turn: turn })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        fn free(&self) -> u64 {
            let st = nix::sys::statvfs::statvfs(self.path()).unwrap();
            st.blocks_available() as u64 * st.fragment_size() as u64
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.path())
                .status();
        }
    }

    /// `n` pages, page `i` filled with `(i + salt) | 1` (never zeros).
    fn filled(n: u64, salt: u64) -> Vec<u8> {
        (0..n * PS).map(|i| ((i / PS + salt) as u8) | 1).collect()
    }

    /// A round the file system has no room for fails before any of it is written, naming
    /// what it needs and what is free; the image stays as it was and the transfer goes on
    /// with a round that fits. Needs a small tmpfs (root).
    #[test]
    fn a_round_without_room_fails_before_any_of_it_is_written() {
        let Some(fs) = SmallFs::mount("2m") else {
            return;
        };
        // 1024 pages (4 MiB) on 2 MiB: round 0 cannot fit.
        const N: u64 = 1024;
        let layout = Layout::single(PS, BASE, N * PS).unwrap();
        let path = fs.path().join("x.img");
        let w = ImageWriter::create(&path, layout.clone()).unwrap();
        let mut tx = Transfer::new(SliceSource::new(BASE, filled(N, 0)), w, layout, 8).unwrap();
        let len = tx.sink().bytes_written();
        let free = fs.free();
        let err = tx.send_round(&[BASE..BASE + N * PS]).unwrap_err();
        let TransferError::Image(ImageError::NoSpace {
            step,
            need,
            free: said_free,
            ..
        }) = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*step, SpaceFor::Round { round: 0, pages: N });
        assert!(*need >= N * PS && *need > *said_free, "{err}");
        assert!(
            said_free.abs_diff(free) <= 64 << 10,
            "{said_free} vs {free}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("no space left for the image on the file system of")
                && msg.contains("round 0 (at most 1024 pages) and the finish need")
                && msg.contains(" free"),
            "{msg}"
        );
        // Nothing of the round reached the file or the file system.
        let partial = ImageWriter::partial_path(&path);
        let on_disk = || std::fs::metadata(&partial).unwrap().len();
        assert_eq!(on_disk(), len);
        assert!(fs.free().abs_diff(free) <= 64 << 10);
        // The transfer goes on: a round that fits is written and the image finishes.
        tx.send_round(&[BASE..BASE + 64 * PS]).unwrap();
        // (Recorded: the pages never sent differ from the source's.)
        tx.finish(FinalCheck::Recorded).unwrap();
        let img = Image::open(&path).unwrap();
        img.verify().unwrap();
        assert_eq!(
            img.read_span_to_vec(0..64 * PS).unwrap(),
            filled(N, 0)[..(64 * PS) as usize]
        );
    }

    /// A run whose rounds fit on the file system only when older copies are dropped
    /// completes: compaction is started by low free space (the default policy's 64 MiB of
    /// slack would never start it), between rounds (at the end of a round for a writer
    /// nobody pings, at the ping for a driver's), and the image verifies with the last
    /// round's pages. Needs a small tmpfs (root).
    #[test]
    fn a_run_that_fits_only_by_compacting_completes() {
        for pinged in [false, true] {
            let Some(fs) = SmallFs::mount("6m") else {
                return;
            };
            // 256 pages (1 MiB) rewritten whole every round: 12 rounds write 12 MiB to 6 MiB.
            const N: u64 = 256;
            let layout = Layout::single(PS, BASE, N * PS).unwrap();
            let path = fs.path().join("x.img");
            let w = ImageWriter::create(&path, layout.clone()).unwrap();
            let mut tx = Transfer::new(SliceSource::new(BASE, filled(N, 0)), w, layout, 8).unwrap();
            for r in 0..12 {
                tx.source_mut().data_mut().copy_from_slice(&filled(N, r));
                tx.send_round(&[BASE..BASE + N * PS])
                    .unwrap_or_else(|e| panic!("pinged {pinged}, round {r}: {e}"));
                if pinged {
                    tx.probe_finish().unwrap();
                }
            }
            let c = tx.sink().compaction().expect("compacted");
            assert!(c.compactions >= 2, "{c:?}");
            tx.finish(FinalCheck::Full).unwrap();
            let img = Image::open(&path).unwrap();
            img.verify().unwrap();
            assert_eq!(img.read_span_to_vec(0..N * PS).unwrap(), filled(N, 11));
            assert!(img.info().complete);
        }
    }

    /// On a file system with room for the image and some rounds but not two full copies, the
    /// writer compacts once per free space's worth of small rounds, not after every round (a
    /// review found 297 compactions in 300 rounds, each rewriting the whole image, because
    /// round 0 counted as the round to keep room for). Needs a small tmpfs (root).
    #[test]
    fn small_rounds_on_a_tight_file_system_compact_now_and_then_not_every_round() {
        let Some(fs) = SmallFs::mount("4m") else {
            return;
        };
        // 384 pages (1.5 MiB) in round 0, then 40 rounds of 8 pages with pings between.
        const N: u64 = 384;
        let layout = Layout::single(PS, BASE, N * PS).unwrap();
        let path = fs.path().join("x.img");
        let w = ImageWriter::create(&path, layout.clone()).unwrap();
        let mut tx = Transfer::new(SliceSource::new(BASE, filled(N, 0)), w, layout, 8).unwrap();
        tx.send_round(&[BASE..BASE + N * PS]).unwrap();
        tx.probe_finish().unwrap();
        for r in 1..=40u64 {
            tx.source_mut().data_mut()[..(8 * PS) as usize].copy_from_slice(&filled(8, r));
            tx.send_round(&[BASE..BASE + 8 * PS])
                .unwrap_or_else(|e| panic!("round {r}: {e}"));
            tx.probe_finish().unwrap();
        }
        let c = tx.sink().compaction().map_or(0, |c| c.compactions);
        assert!((1..=4).contains(&c), "{c} compactions in 40 small rounds");
        tx.finish(FinalCheck::Full).unwrap();
        let img = Image::open(&path).unwrap();
        img.verify().unwrap();
        let mut want = filled(N, 0);
        want[..(8 * PS) as usize].copy_from_slice(&filled(8, 40));
        assert_eq!(img.read_span_to_vec(0..N * PS).unwrap(), want);
    }

    /// A round larger than every one before it, which fits only once older copies are
    /// dropped, gets the image compacted at its start, before any of it is written (free
    /// space was never low for the rounds before), and the run completes.
    #[test]
    fn a_large_round_after_small_ones_compacts_first() {
        let Some(fs) = SmallFs::mount("4m") else {
            return;
        };
        // 512 pages (2 MiB); eight rounds rewrite the first 64 (about 2.1 MiB in all), then a
        // round sends all 512 (2.1 MiB with its finish), more than is free by then.
        const N: u64 = 512;
        let layout = Layout::single(PS, BASE, N * PS).unwrap();
        let path = fs.path().join("x.img");
        let w = ImageWriter::create(&path, layout.clone()).unwrap();
        let mut tx = Transfer::new(SliceSource::new(BASE, filled(N, 0)), w, layout, 8).unwrap();
        for r in 0..8 {
            tx.source_mut().data_mut()[..(64 * PS) as usize].copy_from_slice(&filled(64, r + 100));
            tx.send_round(&[BASE..BASE + 64 * PS]).unwrap();
            tx.probe_finish().unwrap();
        }
        assert!(tx.sink().compaction().is_none(), "space was not low yet");
        let need = tx.sink().round_need(N);
        assert!(
            need > fs.free(),
            "the test's last round must not fit as it stands"
        );
        tx.send_round(&[BASE..BASE + N * PS]).unwrap();
        assert_eq!(tx.sink().compaction().map(|c| c.compactions), Some(1));
        tx.finish(FinalCheck::Full).unwrap();
        let img = Image::open(&path).unwrap();
        img.verify().unwrap();
        let mut want = filled(N, 0);
        want[..(64 * PS) as usize].copy_from_slice(&filled(64, 107));
        assert_eq!(img.read_span_to_vec(0..N * PS).unwrap(), want);
    }

    /// A compaction the file system has no room for is refused before anything is written:
    /// the image stays as it was, every round in it. Needs a small tmpfs (root).
    #[test]
    fn a_compaction_without_room_is_refused_and_the_image_stays_whole() {
        let Some(fs) = SmallFs::mount("2m") else {
            return;
        };
        let dir = fs.path();
        // 128 pages (512 KiB): round 0 sends them all, later rounds rewrite 8, until about
        // 300 KiB are left: room for a round, not for a compacted copy (over 512 KiB).
        const N: u64 = 128;
        let layout = Layout::single(PS, BASE, N * PS).unwrap();
        let w = ImageWriter::create(dir.join("x.img"), layout.clone())
            .unwrap()
            .with_compaction(None);
        let mem: Vec<u8> = (0..N * PS).map(|i| (i / PS) as u8 | 1).collect();
        let mut tx = Transfer::new(SliceSource::new(BASE, mem), w, layout, 8).unwrap();
        tx.send_round(&[BASE..BASE + N * PS]).unwrap();
        while tx.sink().bytes_written() < (2 << 20) - (300 << 10) {
            tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
        }
        let (src, mut w) = tx.into_parts();
        let partial = ImageWriter::partial_path(dir.join("x.img"));
        let len = w.bytes_written();
        let rounds = w.next_round;
        let err = w.compact().unwrap_err();
        assert!(
            matches!(err, TransferError::Image(ImageError::NoSpace { need, free, .. }) if need > free),
            "{err:?}"
        );
        assert!(format!("{err}").starts_with("no space left for the image on the file system of"));
        assert!(!compacting_path(&partial).exists());
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), len);
        let img = Image::open(&partial).unwrap();
        assert_eq!(img.read_span_to_vec(0..N * PS).unwrap(), src.data());
        let info = img.info();
        assert_eq!(info.rounds_ended, rounds);
        assert!(info.compacted.is_none());
    }

    #[test]
    fn a_page_damaged_on_disk_fails_the_compaction_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let partial = ImageWriter::partial_path(dir.path().join("x.img"));
        let mut tx = transfer(dir.path(), None);
        round(&mut tx, 0);
        tx.probe_finish().unwrap();
        round(&mut tx, 1);
        // Page 12's only copy is round 0's: damage one byte of it in the file.
        let at = tx.sink().loc[12];
        let f = OpenOptions::new().write(true).open(&partial).unwrap();
        f.write_all_at(&[0xee], at + 7).unwrap();
        let len = tx.sink().bytes_written();
        let (_, mut w) = tx.into_parts();
        let err = w.compact().unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Image(ImageError::PageDamaged { offset, .. }) if offset == 12 * PS
            ),
            "{err:?}"
        );
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), len);
        assert!(!compacting_path(&partial).exists());
        assert!(w.compaction().is_none());
    }
}
