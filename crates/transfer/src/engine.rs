//! The send pipeline: dirty ranges in, page contents read and handed to a
//! sink, zero pages turned into range markers.
//!
//! [`Transfer`] owns the order of a transfer — rounds, batching, the
//! read-after-scan rule — and nothing about where bytes go (that is the
//! [`Sink`]'s business). It reads a page only when a caller hands it a range
//! the scanner already reported, i.e. after the round that reported it
//! returned; a write racing with the read is caught by the next round and the
//! page is simply sent again.
//!
//! Stages overlap: the caller's thread scans and reads a batch, then hands it
//! to the sink; the socket sink compresses, checksums and writes on its own
//! per-connection threads behind bounded queues, so the caller can scan and
//! read the next batch meanwhile and a slow peer blocks the caller instead of
//! growing memory.

use std::ops::Range;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::auth::Key;
use crate::buffer::{BufferPool, is_zero};
use crate::digest::{FinalCheck, PageHash, PageHashes, page_hash};
use crate::error::{LayoutError, TransferError};
use crate::layout::{Layout, MemoryRegion};
use crate::live::LivePages;
use crate::protocol::{MAX_PAGES_LEN, MAX_STATE_LEN};
use crate::sink::Sink;
use crate::source::PageSource;

pub use crate::codec::Compression;

/// A batch's contents: read into a pooled buffer, or lent by the source.
#[derive(Clone, Copy)]
enum Batch<'a> {
    Read(&'a crate::buffer::SharedBuf),
    Lent(&'a [LivePages]),
}

/// Bytes read per step of [`Transfer::changed_since_sent`].
const VERIFY_CHUNK: u64 = 4 << 20;

/// Default pages per batch (256 KiB with 4 KiB pages); see the crate docs.
pub const DEFAULT_BATCH_PAGES: usize = 64;
/// Default batches queued per connection ahead of its writer.
pub const DEFAULT_QUEUE_DEPTH: usize = 4;

/// How a sender reads and sends.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Compression of page frames.
    pub compression: Compression,
    /// Parallel connections (must equal the connections handed to the sender).
    pub streams: usize,
    /// Cap on bytes per second over all connections (`None`: unlimited).
    pub bandwidth_limit: Option<u64>,
    /// Pages read per `process_vm_readv` batch and carried per frame at most.
    pub batch_pages: usize,
    /// Batches queued per connection before the reader blocks.
    pub queue_depth: usize,
    /// Shared key proving this sender to the receiver.
    pub key: Option<Key>,
    /// Time allowed for each connection's handshake.
    pub handshake_timeout: Duration,
    /// The longest a connection may make no progress: a write that moves no
    /// byte for this long, or a receiver that has not acknowledged FINISH
    /// this long after it was sent (plus the time a full check needs to read
    /// the destination: 4 s per GiB), fails with
    /// [`TransferError::Stalled`]. `None`: wait forever (not recommended: a
    /// stopped receiver then blocks the sender for good).
    pub io_timeout: Option<Duration>,
    /// Send lent pages ([`OwnMemory`](crate::OwnMemory)) to a socket with `vmsplice(2)` and
    /// `splice(2)` instead of `writev(2)`: the socket holds references to the pages instead of
    /// a copy, and over loopback the receiver copies straight from them (see
    /// [`crate::live`]). A connection whose socket refuses `splice` falls back to `writev`.
    ///
    /// Default `false`: which of the two costs less is the CPU's. On the Intel Xeon (Emerald
    /// Rapids) this was last measured on, `writev` (its copy finds each page in cache right
    /// after the page hash) cost less CPU per GiB than splicing in nearly every same-run pair,
    /// and ran faster; on the AMD Zen 1 host before it, splicing was the cheaper one
    /// (BENCHMARKS.md, "The stream's floor on this CPU"). Set it where splicing measures
    /// cheaper (the stream bench's `own_splice` against `own_writev`).
    pub splice: bool,
}

/// Default [`SenderConfig::io_timeout`] and handshake timeout: long enough
/// for a loaded host to schedule a peer, short enough that a stopped peer
/// does not hold a paused workload for long.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for SenderConfig {
    fn default() -> SenderConfig {
        SenderConfig {
            compression: Compression::None,
            streams: 1,
            bandwidth_limit: None,
            batch_pages: DEFAULT_BATCH_PAGES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            key: None,
            handshake_timeout: DEFAULT_IO_TIMEOUT,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            splice: false,
        }
    }
}

/// What one round sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoundSent {
    /// The round number (from 0).
    pub round: u64,
    /// Pages sent with contents.
    pub pages: u64,
    /// Pages sent as zero-range markers.
    pub zero_pages: u64,
    /// Bytes the sink wrote for the round (frames on the wire, or file bytes).
    pub bytes_on_wire: u64,
    /// From the round's first range to the sink having written all of it.
    pub duration: Duration,
}

/// What a whole transfer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TransferSummary {
    /// Rounds sent.
    pub rounds: u64,
    /// Pages sent with contents, all rounds.
    pub pages: u64,
    /// Pages sent as zeros, all rounds.
    pub zero_pages: u64,
    /// Bytes written by the sink, all rounds.
    pub bytes_on_wire: u64,
    /// The memory digest the sink accepted (see [`crate::digest`]).
    pub checksum: u64,
    /// How it was checked.
    pub check: FinalCheck,
    /// Time spent re-reading the source for [`FinalCheck::Full`] (zero
    /// otherwise).
    pub source_check: Duration,
}

#[derive(Debug)]
struct RoundState {
    round: u64,
    start: Instant,
    pages: u64,
    zero_pages: u64,
}

/// Drives rounds of dirty ranges from a [`PageSource`] into a [`Sink`].
#[derive(Debug)]
pub struct Transfer<S, K> {
    source: S,
    sink: K,
    layout: Layout,
    batch_bytes: u64,
    pool: BufferPool,
    next_round: u64,
    current: Option<RoundState>,
    /// Ranges of the batch being gathered, and their total bytes.
    batch: Vec<Range<u64>>,
    batch_len: u64,
    /// Hash of each page of the batch being flushed, and whether it is all
    /// zeros (then its hash is not taken nor used).
    batch_hashes: Vec<PageHash>,
    batch_zero: Vec<bool>,
    scratch: Vec<Range<u64>>,
    /// The hash of the last copy read of every page.
    hashes: PageHashes,
    totals: TransferSummary,
    /// What the last round that failed part-way had handed to the sink ([`Transfer::failed_round`]).
    failed_round: Option<RoundSent>,
    finished: bool,
    state_sent: bool,
    /// The memory offsets that exist, as last given to [`Transfer::retain_memory`]
    /// (`None`: all of the layout).
    memory: Option<Vec<Range<u64>>>,
    /// Host ranges of the round in progress not handed to the sink because the round was
    /// cut ([`Sink::round_cutter`]).
    cut_unsent: Vec<Range<u64>>,
    /// The last round was cut: the host ranges it did not send ([`Transfer::take_cut`]).
    cut: Option<Vec<Range<u64>>>,
}

impl<S: PageSource, K: Sink> Transfer<S, K> {
    /// A transfer of `layout` from `source` into `sink`, reading
    /// `batch_pages` pages per batch.
    pub fn new(
        source: S,
        sink: K,
        layout: Layout,
        batch_pages: usize,
    ) -> Result<Transfer<S, K>, TransferError> {
        Transfer::with_pool(source, sink, layout, batch_pages, 4)
    }

    pub(crate) fn with_pool(
        source: S,
        sink: K,
        layout: Layout,
        batch_pages: usize,
        pool: usize,
    ) -> Result<Transfer<S, K>, TransferError> {
        if batch_pages == 0 {
            return Err(TransferError::Config {
                reason: "batch_pages must be at least 1",
            });
        }
        if layout.host_ranges().len() != layout.regions().len() {
            return Err(TransferError::Config {
                reason: "a sender's layout needs the host address of every region",
            });
        }
        // A batch is one frame at most: fewer pages when pages are large.
        let ps = layout.page_size();
        let batch_bytes = (batch_pages as u64)
            .saturating_mul(ps)
            .min(MAX_PAGES_LEN / ps * ps)
            .max(ps);
        let pages = usize::try_from(layout.total_len() / layout.page_size()).map_err(|_| {
            TransferError::Config {
                reason: "layout is larger than the address space",
            }
        })?;
        let hashes = PageHashes::new(pages, layout.page_size());
        Ok(Transfer {
            source,
            sink,
            layout,
            batch_bytes,
            pool: BufferPool::new(pool),
            next_round: 0,
            current: None,
            batch: Vec::new(),
            batch_len: 0,
            batch_hashes: Vec::new(),
            batch_zero: Vec::new(),
            scratch: Vec::new(),
            hashes,
            totals: TransferSummary {
                rounds: 0,
                pages: 0,
                zero_pages: 0,
                bytes_on_wire: 0,
                checksum: 0,
                check: FinalCheck::Recorded,
                source_check: Duration::ZERO,
            },
            failed_round: None,
            finished: false,
            state_sent: false,
            memory: None,
            cut_unsent: Vec::new(),
            cut: None,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The source.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The sink.
    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// Gives back the source and the sink.
    pub fn into_parts(self) -> (S, K) {
        (self.source, self.sink)
    }

    /// Totals over the rounds sent so far.
    pub fn totals(&self) -> TransferSummary {
        self.totals
    }

    /// After [`Transfer::send_round`] failed part-way: what that round had handed to the sink
    /// before it failed (pages and zero pages; not known to have arrived), the bytes the sink
    /// wrote for it if it could still end the round (else 0), and the time until the failure.
    /// `None` before any round failed, or when the last one failed before it began. For a
    /// report of what happened; the caller still treats every range of the round as
    /// undelivered.
    pub fn failed_round(&self) -> Option<RoundSent> {
        self.failed_round
    }

    /// Sends one whole round: `dirty` are the ranges the scanner reported
    /// (plus any the caller wants re-sent in full), page-aligned source
    /// addresses, in any order, overlaps allowed.
    ///
    /// **On error, no page of `dirty` counts as delivered**: the caller must
    /// keep all of `dirty` pending and hand it again (to this transfer after
    /// a reconnect, to another sink, or in its report of what was lost). A
    /// range outside the layout is refused before the round starts; after a
    /// failure half-way the round is closed (if the sink still works) so the
    /// transfer stays usable: the next `send_round` starts a new round.
    pub fn send_round(&mut self, dirty: &[Range<u64>]) -> Result<RoundSent, TransferError> {
        self.failed_round = None;
        let mut bytes = 0u64;
        for r in dirty {
            self.layout.check_pages(r)?;
            bytes = bytes.saturating_add(r.end - r.start);
        }
        // Ranges may overlap: the sum is an upper bound, as the sink wants it.
        if self.current.is_none() && !self.finished {
            self.sink.expect_round(bytes / self.layout.page_size())?;
        }
        self.begin_round()?;
        let sent = self.send_dirty(dirty).and_then(|()| self.end_round());
        if sent.is_err() {
            self.close_failed_round();
            // Every range of a failed round stays the caller's to send: no cut to tell.
            self.cut = None;
            self.sink.take_cut_pages(&mut |_| {});
        }
        sent
    }

    /// A handle that cuts the round in progress short from another thread without breaking
    /// the transfer, if the sink can ([`Sink::round_cutter`]): the round stops handing pages
    /// to the sink, the sink drops those it has not begun to write, and the round ends with
    /// what was written; [`Transfer::take_cut`] then names what was not. Every round is cut
    /// so until [`Transfer::uncut`].
    pub fn round_cutter(&self) -> Option<crate::sink::Interrupt> {
        self.sink.round_cutter()
    }

    /// After a round that ended (`Ok`) while cut ([`Transfer::round_cutter`]): the host
    /// ranges of it that were not sent (sorted, coalesced; maybe none), which the caller
    /// must send in a later round, as those of a failed round; `None` if the last round was
    /// not cut. Their page hashes here may be of copies the destination never got: a later
    /// round that sends them sets them again.
    pub fn take_cut(&mut self) -> Option<Vec<Range<u64>>> {
        self.cut.take()
    }

    /// After a cut: later rounds go whole again ([`Sink::uncut`]).
    pub fn uncut(&mut self) {
        self.sink.uncut();
    }

    /// Host ranges of memory offsets `offsets` (region by region), appended to `out`.
    fn host_ranges(&self, offsets: Range<u64>, out: &mut Vec<Range<u64>>) {
        let mut at = offsets.start;
        while at < offsets.end {
            let Some((region, inside)) = self.layout.region_at(at) else {
                break;
            };
            let n = (offsets.end - at).min(region.size - inside);
            // A sender's layout has every region's host address (checked in `new`).
            let host = region.host_addr.unwrap_or(0) + inside;
            out.push(host..host + n);
            at += n;
        }
    }

    /// After a failure inside [`Transfer::send_round`]: drops the batch not
    /// yet handed to the sink and ends the round in the sink if it still
    /// can, so the next round can begin. A sink that cannot end it (a broken
    /// connection) leaves the round number unused.
    fn close_failed_round(&mut self) {
        self.batch.clear();
        self.batch_len = 0;
        let Some(state) = self.current.take() else {
            // Failed in the sink's end of the round: `end_round` kept what it had handed over.
            self.record_live_hashes();
            return;
        };
        let ended = self.sink.end_round(state.round);
        self.record_live_hashes();
        self.failed_round = Some(RoundSent {
            round: state.round,
            pages: state.pages,
            zero_pages: state.zero_pages,
            bytes_on_wire: *ended.as_ref().unwrap_or(&0),
            duration: state.start.elapsed(),
        });
        if let Ok(bytes) = ended {
            self.next_round += 1;
            self.totals.rounds += 1;
            self.totals.pages += state.pages;
            self.totals.zero_pages += state.zero_pages;
            self.totals.bytes_on_wire += bytes;
        }
    }

    /// A handle that makes a blocked call of this transfer return promptly
    /// (from another thread), if the sink can block (see
    /// [`Sink::interrupter`]).
    pub fn interrupter(&self) -> Option<crate::sink::Interrupt> {
        self.sink.interrupter()
    }

    /// The destination, for messages (see [`Sink::peer`]).
    pub fn peer(&self) -> Option<String> {
        self.sink.peer()
    }

    /// What the finish does besides the digests and an acknowledgement, for messages (see
    /// [`Sink::finish_work`]).
    pub fn finish_work(&self) -> Option<String> {
        self.sink.finish_work()
    }

    /// How the sink paces its writes, if it does (see [`Sink::pacing`]).
    pub fn pacing(&self) -> Option<crate::sink::Pacing> {
        self.sink.pacing()
    }

    /// Whether [`Transfer::resume`] may work: the sink can reconnect
    /// ([`Sink::can_resume`]: a socket sender made with
    /// [`Sender::dial`](crate::Sender::dial)) and the receiver has not
    /// acknowledged the final checksum.
    pub fn can_resume(&self) -> bool {
        !self.finished && self.sink.can_resume()
    }

    /// After a round, the state or the final checksum failed because the
    /// connection broke ([`TransferError::is_connection_break`]) or went
    /// silent, outside a round and before the receiver acknowledged the final
    /// checksum: connects to the same transfer again
    /// through the sink ([`Sink::resume`]) and returns the source ranges
    /// (page-aligned host addresses, sorted) the destination lacks or holds
    /// another copy of: the blocks of pages whose digest of page hashes
    /// differs from the one of the hashes recorded here (see the protocol's
    /// RESUME).
    ///
    /// The caller sends them in its next round **together with every range
    /// of the round that failed** (whether those pages arrived is unknown).
    /// The next round is numbered where the destination stands. A block
    /// whose pages changed at the source without being sent again has the
    /// same digest at both ends and is not returned: those pages are in the
    /// caller's dirty log.
    ///
    /// # Errors
    ///
    /// [`TransferError::Misuse`] inside a round or after the receiver
    /// acknowledged the final checksum; the sink's error if it cannot reconnect (for a socket sender:
    /// connect, handshake, [`TransferError::ResumeRefused`]); a protocol error
    /// if the destination's answer does not match the layout. The transfer
    /// stays as it was, and `resume` may be called again.
    pub fn resume(&mut self) -> Result<Vec<Range<u64>>, TransferError> {
        if self.current.is_some() || self.finished {
            return Err(TransferError::Misuse {
                operation: "resume",
                state: "inside a round or after the final acknowledgement",
            });
        }
        self.batch.clear();
        self.batch_len = 0;
        // Pages the broken round's writers sent before the break count as sent (the digests
        // below tell whether they arrived); the sink stopped those writers by the time it
        // returns.
        self.record_live_hashes();
        let point = self.sink.resume()?;
        self.record_live_hashes();
        let block = usize::try_from(point.block_pages).unwrap_or(usize::MAX);
        let ours = self.hashes.block_digests(block);
        if point.block_pages == 0 || ours.len() != point.block_digests.len() {
            return Err(crate::error::ProtocolError::Malformed {
                offset: 0,
                kind: crate::FrameKind::Resume,
                reason: "block digests do not cover the layout",
            }
            .into());
        }
        self.next_round = point.next_round;
        // A final phase cut short: the state goes again with the next final phase.
        self.state_sent = false;
        let ps = self.layout.page_size();
        let total = self.layout.total_len();
        let block_bytes = point.block_pages.saturating_mul(ps);
        let mut lacking: Vec<Range<u64>> = Vec::new();
        let differ = ours
            .iter()
            .zip(&point.block_digests)
            .enumerate()
            .filter(|(_, (a, b))| a != b);
        for (i, _) in differ {
            let at = (i as u64).saturating_mul(block_bytes);
            let end = at.saturating_add(block_bytes).min(total);
            self.host_ranges(at..end, &mut lacking);
        }
        lacking.sort_unstable_by_key(|r| r.start);
        lacking.dedup_by(|next, prev| {
            if next.start == prev.end {
                prev.end = next.end;
                true
            } else {
                false
            }
        });
        Ok(lacking)
    }

    /// Between rounds, before the state: the source's memory is now the host ranges `memory`
    /// (parts outside the layout are ignored). When that differs from what it was (at first:
    /// all of the layout), the sink is told ([`Sink::retain`]: a socket sends the protocol's
    /// MAPPED, an image records the mappings and drops the pages outside them) and, if it
    /// dropped them, the page hashes recorded for pages outside it become a zero page's, so
    /// the digests of both ends agree. Returns whether the sink was told.
    pub fn retain_memory(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        if self.current.is_some() || self.finished || self.state_sent {
            return Err(TransferError::Misuse {
                operation: "retain_memory",
                state: "inside a round, after the state or after finish",
            });
        }
        let kept = self.layout.memory_offsets(memory);
        let unchanged = match &self.memory {
            Some(m) => *m == kept,
            None => kept == [0..self.layout.total_len()],
        };
        if unchanged {
            return Ok(false);
        }
        if self.sink.retain(&kept)? {
            let ps = self.layout.page_size();
            for r in self.layout.outside(&kept) {
                self.hashes
                    .set_zero((r.start / ps) as usize, ((r.end - r.start) / ps) as usize);
            }
        }
        self.memory = Some(kept);
        Ok(true)
    }

    /// Between rounds, before the state: adds `region` (with its host address) to the layout
    /// after every region there ([`Layout::with_region`]: the next id, a page size no smaller
    /// than the layout's) and announces it to the sink ([`Sink::add_region`]: a socket sends
    /// the protocol's REGION, an image records it). Memory the source mapped after the
    /// transfer started can then be sent like any other. Nothing changes if the sink refuses
    /// ([`TransferError::CannotGrow`] for a destination sized for the first layout).
    pub fn add_region(&mut self, region: MemoryRegion) -> Result<(), TransferError> {
        if self.current.is_some() || self.finished || self.state_sent {
            return Err(TransferError::Misuse {
                operation: "add_region",
                state: "inside a round, after the state or after finish",
            });
        }
        if region.host_addr.is_none() {
            return Err(TransferError::Config {
                reason: "a sender's layout needs the host address of every region",
            });
        }
        let layout = self.layout.with_region(region)?;
        let added =
            usize::try_from(layout.total_pages() - self.layout.total_pages()).map_err(|_| {
                TransferError::Config {
                    reason: "layout is larger than the address space",
                }
            })?;
        self.sink.add_region(&region)?;
        self.hashes.grow(added);
        self.layout = layout;
        Ok(())
    }

    /// Adds a region ([`Transfer::add_region`]) for every part of the host ranges `ranges`
    /// (page-aligned) that no region covers: memory a source mapped after the transfer
    /// started. Each part is widened to `align` bytes (a power of two; the layout's page size
    /// at least) where no region is, so memory that grows by small steps does not add a
    /// region per step (pages never sent read as zeros at the destination). New regions
    /// take the next ids, with their host address as guest address. Returns the regions
    /// added, in the order added.
    pub fn add_regions_for(
        &mut self,
        ranges: &[Range<u64>],
        align: u64,
    ) -> Result<Vec<MemoryRegion>, TransferError> {
        let ps = self.layout.page_size();
        let align = align.max(ps);
        if !align.is_power_of_two() {
            return Err(LayoutError::InvalidPageSize { page_size: align }.into());
        }
        let mut added = Vec::new();
        for r in ranges {
            self.layout.check_pages(r)?;
            for part in self.layout.uncovered(r.clone()) {
                let wide =
                    part.start & !(align - 1)..part.end.saturating_add(align - 1) & !(align - 1);
                let wide = if wide.end < part.end {
                    part.clone()
                } else {
                    wide
                };
                for piece in self.layout.uncovered(wide) {
                    if piece.end <= part.start || piece.start >= part.end {
                        continue;
                    }
                    let id = self.layout.next_id().ok_or(TransferError::Config {
                        reason: "no region id left to add a region",
                    })?;
                    let region = MemoryRegion::new(id, piece.end - piece.start, ps)
                        .host(piece.start)
                        .guest(piece.start);
                    self.add_region(region)?;
                    added.push(region);
                }
            }
        }
        Ok(added)
    }

    /// The next round (the next [`Transfer::send_round`] or [`Transfer::begin_round`]) is the
    /// final one: the source is paused until the transfer ends. A socket sink marks its
    /// ROUND_BEGIN (the protocol's final-round flag), so that the receiver may raise its
    /// threads for the final phase ([`ReceiverConfig::final_priority`](crate::ReceiverConfig::final_priority)).
    pub fn expect_final_round(&mut self) {
        self.sink.expect_final_round();
    }

    /// Starts a round; returns its number. Use with [`Transfer::send_dirty`]
    /// and [`Transfer::end_round`] to feed a round batch by batch as the
    /// scanner produces it.
    pub fn begin_round(&mut self) -> Result<u64, TransferError> {
        if self.current.is_some() || self.finished {
            return Err(TransferError::Misuse {
                operation: "begin_round",
                state: "inside a round or after finish",
            });
        }
        let round = self.next_round;
        self.sink.begin_round(round)?;
        self.cut_unsent.clear();
        self.cut = None;
        self.current = Some(RoundState {
            round,
            start: Instant::now(),
            pages: 0,
            zero_pages: 0,
        });
        Ok(round)
    }

    /// Reads and sends the pages of `dirty` (see [`Transfer::send_round`]).
    /// Every range is checked against the layout before any page is read, so
    /// an error sends nothing of this call. Ranges within one call are merged;
    /// a page given in two calls of one round is sent twice.
    pub fn send_dirty(&mut self, dirty: &[Range<u64>]) -> Result<(), TransferError> {
        if self.current.is_none() {
            return Err(TransferError::Misuse {
                operation: "send_dirty",
                state: "outside a round",
            });
        }
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(dirty.len());
        for r in dirty {
            self.layout.check_pages(r)?;
            merged.push(r.clone());
        }
        precopy_sys::ranges::coalesce(&mut merged);
        let mut pieces = std::mem::take(&mut self.scratch);
        pieces.clear();
        for run in merged {
            self.layout.split(run, |p, _| {
                pieces.push(p);
                Ok(())
            })?;
        }
        let result = self.send_pieces(&pieces);
        self.scratch = pieces;
        result
    }

    fn send_pieces(&mut self, pieces: &[Range<u64>]) -> Result<(), TransferError> {
        for (i, piece) in pieces.iter().enumerate() {
            let mut at = piece.start;
            while at < piece.end {
                // Cut: the rest of the round is not handed over.
                if self.sink.round_cut() {
                    self.cut_unsent.push(at..piece.end);
                    self.cut_unsent.extend(pieces[i + 1..].iter().cloned());
                    return self.flush_batch();
                }
                let room = self.batch_bytes - self.batch_len;
                let end = piece.end.min(at + room);
                // Pieces are never merged: two that touch lie in different
                // regions, and a frame must stay inside one region.
                self.batch.push(at..end);
                self.batch_len += end - at;
                at = end;
                if self.batch_len == self.batch_bytes {
                    self.flush_batch()?;
                }
            }
        }
        Ok(())
    }

    /// Reads the gathered batch, takes each page's hash while it is still in
    /// cache, and hands runs of zero and non-zero pages to the sink.
    fn flush_batch(&mut self) -> Result<(), TransferError> {
        if self.batch_len == 0 {
            return Ok(());
        }
        if self.sink.round_cut() {
            // Not read, not hashed, not handed over: the round was cut.
            self.cut_unsent.append(&mut self.batch);
            self.batch_len = 0;
            return Ok(());
        }
        if let Some(lent) = self.lend_batch() {
            // Keeps the reports from piling up over a long round.
            self.record_live_hashes();
            return self.send_lent(&lent);
        }
        let n = self.batch_len as usize;
        let mut buf = self.pool.take(n);
        let read = self.source.read_ranges(&self.batch, &mut buf[..n]);
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        if let Err(e) = read {
            self.batch = batch;
            self.batch.clear();
            return Err(e.into());
        }
        let ps = self.layout.page_size() as usize;
        let (mut hashes, mut zero) = (
            std::mem::take(&mut self.batch_hashes),
            std::mem::take(&mut self.batch_zero),
        );
        zero.clear();
        zero.extend(buf[..n].chunks_exact(ps).map(is_zero));
        hashes.clear();
        hashes.extend(
            buf[..n]
                .chunks_exact(ps)
                .zip(&zero)
                .map(|(p, &z)| if z { 0 } else { page_hash(p) }),
        );
        let shared = self.pool.share(buf);
        let result = self.send_batch(&batch, Batch::Read(&shared), &hashes, &zero);
        (self.batch_hashes, self.batch_zero) = (hashes, zero);
        self.batch = batch;
        self.batch.clear();
        result
    }

    /// The gathered batch lent by the source (its own memory), or `None`
    /// if any range of it must be read by copy.
    fn lend_batch(&mut self) -> Option<Vec<LivePages>> {
        let batch = &self.batch;
        let source = &mut self.source;
        batch.iter().map(|r| source.lend(r.clone())).collect()
    }

    /// Sends a lent batch: each page's hash and zero test are taken in
    /// place, without a copy (the pages may be written meanwhile, so the
    /// bytes the kernel then sends may differ from that hash: see
    /// [`crate::live`]); the sink gets the pages themselves.
    fn send_lent(&mut self, lent: &[LivePages]) -> Result<(), TransferError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        let ps = self.layout.page_size() as usize;
        let (mut hashes, mut zero) = (
            std::mem::take(&mut self.batch_hashes),
            std::mem::take(&mut self.batch_zero),
        );
        hashes.clear();
        zero.clear();
        // A sink that hashes lent pages itself does it right before its write, so that the
        // kernel's copy reads them from cache: only the zero test here (it reads the first
        // bytes of a page that is not all zeros).
        let hash_here = !self.sink.hashes_live_pages();
        for p in lent {
            p.for_each_page(ps as u64, |page| {
                let z = is_zero(page);
                zero.push(z);
                hashes.push(if z || !hash_here { 0 } else { page_hash(page) });
            });
        }
        let result = self.send_batch(&batch, Batch::Lent(lent), &hashes, &zero);
        (self.batch_hashes, self.batch_zero) = (hashes, zero);
        self.batch = batch;
        self.batch.clear();
        result
    }

    /// Hands the runs of a read or lent batch to the sink and records their
    /// hashes. `hashes` and `zero` hold each page's hash and whether it is all
    /// zeros.
    fn send_batch(
        &mut self,
        batch: &[Range<u64>],
        data: Batch<'_>,
        hashes: &[PageHash],
        zero: &[bool],
    ) -> Result<(), TransferError> {
        let ps = self.layout.page_size();
        let state = self.current.as_mut().ok_or(TransferError::Misuse {
            operation: "send_dirty",
            state: "outside a round",
        })?;
        let mut at = 0usize;
        for (i, r) in batch.iter().enumerate() {
            let count = ((r.end - r.start) / ps) as usize;
            // Pieces lie inside one region, so their table slots are contiguous.
            let base = self.layout.locate(r.clone())?;
            let first = (base / ps) as usize;
            let mut k = 0;
            while k < count {
                // A run of pages that are all zero or all not.
                let z = zero[at + k];
                let end = zero[at + k..at + count]
                    .iter()
                    .position(|&p| p != z)
                    .map_or(count, |n| k + n);
                let offset = base + k as u64 * ps;
                let n = (end - k) as u64;
                if z {
                    state.zero_pages += n;
                    self.hashes.set_zero(first + k, end - k);
                    self.sink.send_zero_range(offset..offset + n * ps)?;
                } else {
                    state.pages += n;
                    let run = &hashes[at + k..at + end];
                    match data {
                        Batch::Read(shared) => {
                            self.hashes.set(first + k, run);
                            let off = (at + k) * ps as usize;
                            let view = shared.view(off..off + (n * ps) as usize);
                            self.sink.send_pages(offset, view, run)?;
                        }
                        Batch::Lent(lent) => {
                            let from = k as u64 * ps;
                            let part = lent[i]
                                .slice(from..from + n * ps)
                                .map_err(TransferError::io("lending pages"))?;
                            if self.sink.hashes_live_pages() {
                                // Recorded when the sink reports them (`record_live_hashes`).
                                self.sink.send_unhashed_live_pages(offset, part)?;
                            } else {
                                self.hashes.set(first + k, run);
                                self.sink.send_live_pages(offset, part, run)?;
                            }
                        }
                    }
                }
                k = end;
            }
            at += count;
        }
        Ok(())
    }

    /// Records the hashes the sink took of lent pages it sent
    /// ([`Sink::take_live_hashes`]) in the page-hash table.
    fn record_live_hashes(&mut self) {
        let ps = self.layout.page_size();
        let table = &mut self.hashes;
        self.sink.take_live_hashes(&mut |offset, hashes| {
            // Offsets are the ones this transfer handed out; one that does not fit leaves the
            // table as it was, and the final digest then fails rather than passes.
            table.set((offset / ps) as usize, hashes);
        });
    }

    /// Ends the round: flushes the last batch and waits until the sink has
    /// written everything of the round.
    pub fn end_round(&mut self) -> Result<RoundSent, TransferError> {
        if self.current.is_none() {
            return Err(TransferError::Misuse {
                operation: "end_round",
                state: "outside a round",
            });
        }
        self.flush_batch()?;
        let mut state = self.current.take().ok_or(TransferError::Misuse {
            operation: "end_round",
            state: "outside a round",
        })?;
        let ended = self.sink.end_round(state.round);
        self.record_live_hashes();
        if ended.is_ok() && self.sink.round_cut() {
            // What the sink dropped was handed over and counted, yet never sent.
            let mut unsent = std::mem::take(&mut self.cut_unsent);
            let mut dropped = Vec::new();
            self.sink.take_cut_pages(&mut |r| dropped.push(r));
            for r in dropped {
                state.pages = state
                    .pages
                    .saturating_sub((r.end - r.start) / self.layout.page_size());
                self.host_ranges(r, &mut unsent);
            }
            precopy_sys::ranges::coalesce(&mut unsent);
            self.cut = Some(unsent);
        }
        let bytes = ended.inspect_err(|_| {
            self.failed_round = Some(RoundSent {
                round: state.round,
                pages: state.pages,
                zero_pages: state.zero_pages,
                bytes_on_wire: 0,
                duration: state.start.elapsed(),
            });
        })?;
        self.next_round += 1;
        self.totals.rounds += 1;
        self.totals.pages += state.pages;
        self.totals.zero_pages += state.zero_pages;
        self.totals.bytes_on_wire += bytes;
        Ok(RoundSent {
            round: state.round,
            pages: state.pages,
            zero_pages: state.zero_pages,
            bytes_on_wire: bytes,
            duration: state.start.elapsed(),
        })
    }

    /// Re-reads the pages of `ranges` (page-aligned source addresses inside the layout) and
    /// returns those whose hash differs from the copy this transfer last sent (pages never
    /// sent count as zero pages), coalesced and sorted. Call with the source stopped and
    /// outside a round, before the last round: it finds the changes a dirty log could not see
    /// (shared memory written through another mapping, a hole punched in a memfd, DMA), which
    /// the last round then sends. Reads `ranges` once in 4 MiB chunks; a page whose contents
    /// changed yet kept its 64-bit hash would be missed (probability about 2^-64 per changed
    /// page).
    pub fn changed_since_sent(
        &mut self,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Range<u64>>, TransferError> {
        if self.current.is_some() || self.finished {
            return Err(TransferError::Misuse {
                operation: "changed_since_sent",
                state: "inside a round or after finish",
            });
        }
        let mut pieces = Vec::new();
        for r in ranges {
            self.layout.split(r.clone(), |piece, offset| {
                pieces.push((piece, offset));
                Ok(())
            })?;
        }
        let ps = self.layout.page_size();
        let chunk = (VERIFY_CHUNK / ps).max(1) * ps;
        let mut buf = vec![
            0u8;
            chunk.min(
                pieces
                    .iter()
                    .map(|(p, _)| p.end - p.start)
                    .max()
                    .unwrap_or(0)
            ) as usize
        ];
        let mut changed: Vec<Range<u64>> = Vec::new();
        for (piece, offset) in pieces {
            let mut at = piece.start;
            while at < piece.end {
                let n = (piece.end - at).min(chunk);
                let data = &mut buf[..n as usize];
                self.source.read_ranges(&[at..at + n], data)?;
                let first = ((offset + (at - piece.start)) / ps) as usize;
                for (i, page) in data.chunks_exact(ps as usize).enumerate() {
                    let hash = if is_zero(page) {
                        crate::digest::zero_page_hash(ps)
                    } else {
                        page_hash(page)
                    };
                    if self.hashes.get(first + i) != Some(hash) {
                        let addr = at + i as u64 * ps;
                        precopy_sys::ranges::push_merged(&mut changed, 0, addr..addr + ps);
                    }
                }
                at += n;
            }
        }
        precopy_sys::ranges::coalesce(&mut changed);
        Ok(changed)
    }

    /// Between rounds: what acknowledging FINISH would cost now, measured. That is one PING
    /// round trip on every connection (the slowest; [`Sink::ping`]) plus the memory digest of
    /// the recorded page hashes, timed here and counted twice (the receiver hashes a table of the
    /// same size before it answers). `None` when the sink has no peer to ask. The switch-over
    /// estimate of `precopy-migrate` takes it before it pauses the source.
    pub fn probe_finish(&mut self) -> Result<Option<Duration>, TransferError> {
        if self.current.is_some() || self.finished {
            return Err(TransferError::Misuse {
                operation: "probe_finish",
                state: "inside a round or after finish",
            });
        }
        let Some(round_trip) = self.sink.ping()? else {
            return Ok(None);
        };
        let start = Instant::now();
        std::hint::black_box(self.hashes.digest());
        Ok(Some(round_trip + 2 * start.elapsed()))
    }

    /// Sends the source's opaque state blob (vCPU registers, device state)
    /// after the last round and before [`Transfer::finish`], at most once and
    /// at most [`MAX_STATE_LEN`] bytes ([`TransferError::StateTooLarge`]). It
    /// travels with its own CRC32C; the receiver hands it to its sink before
    /// it acknowledges the transfer.
    pub fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        if self.current.is_some() || self.finished || self.state_sent {
            return Err(TransferError::Misuse {
                operation: "send_state",
                state: "inside a round, after finish, or twice",
            });
        }
        if state.len() as u64 > MAX_STATE_LEN {
            return Err(TransferError::StateTooLarge {
                len: state.len() as u64,
                max: MAX_STATE_LEN,
            });
        }
        self.sink.send_state(state)?;
        self.state_sent = true;
        Ok(())
    }

    /// Ends the transfer: sends the memory digest of the page hashes recorded
    /// as pages were read (see [`crate::digest`]); for a socket, waits for the
    /// receiver to check it and acknowledge.
    ///
    /// With [`FinalCheck::Full`] it first re-reads all source memory (which
    /// must be stopped) and fails with [`TransferError::SourceChanged`] if it
    /// differs from what was sent (a write the tracker did not report), and
    /// asks the receiver to re-read its destination too. Call after the final
    /// round.
    pub fn finish(&mut self, check: FinalCheck) -> Result<TransferSummary, TransferError> {
        let summary = self.finish_uncommitted(check)?;
        self.commit()?;
        Ok(summary)
    }

    /// [`Transfer::finish`] without the commit: returns once the receiver
    /// acknowledged the checksum, which does not yet make its copy complete;
    /// [`Transfer::commit`] does. A caller with a deadline on the final round
    /// commits only if the acknowledgement came in time.
    pub fn finish_uncommitted(
        &mut self,
        check: FinalCheck,
    ) -> Result<TransferSummary, TransferError> {
        self.check_can_finish()?;
        let recorded = self.hashes.digest();
        if check == FinalCheck::Full {
            let start = Instant::now();
            let actual = crate::source::memory_checksum(&mut self.source, &self.layout)?;
            self.totals.source_check = start.elapsed();
            if actual != recorded {
                return Err(TransferError::SourceChanged { recorded, actual });
            }
        }
        self.end(recorded, check, false)
    }

    /// Tells the receiver, after [`Transfer::finish_uncommitted`], that its
    /// copy is complete.
    pub fn commit(&mut self) -> Result<(), TransferError> {
        if !self.finished {
            return Err(TransferError::Misuse {
                operation: "commit",
                state: "before finish",
            });
        }
        self.sink.commit()
    }

    /// Ends the transfer claiming `checksum` as the memory digest, whatever
    /// was recorded: for tests of a receiver's final check.
    pub fn finish_with_checksum(
        &mut self,
        checksum: u64,
        check: FinalCheck,
    ) -> Result<TransferSummary, TransferError> {
        self.end(checksum, check, true)
    }

    /// Sends the digest `checksum`; with `commit`, the whole end, else up to
    /// the acknowledgement.
    fn end(
        &mut self,
        checksum: u64,
        check: FinalCheck,
        commit: bool,
    ) -> Result<TransferSummary, TransferError> {
        self.check_can_finish()?;
        if commit {
            self.sink.finish(checksum, check)?;
        } else {
            self.sink.finish_uncommitted(checksum, check)?;
        }
        self.finished = true;
        self.totals.checksum = checksum;
        self.totals.check = check;
        Ok(self.totals)
    }

    fn check_can_finish(&self) -> Result<(), TransferError> {
        if self.current.is_some() || self.finished {
            return Err(TransferError::Misuse {
                operation: "finish",
                state: "inside a round or after finish",
            });
        }
        Ok(())
    }
}
