//! A connection's writer thread (compress, checksum, pace, write) and the
//! watcher that reads what the receiver says meanwhile.

use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender as Chan};

use super::conn::{Connection, InterruptState};
use crate::buffer::PageBuf;
use crate::codec::Compressor;
use crate::digest::{FinalCheck, PageHash};
use crate::error::{ProtocolError, TransferError};
use crate::layout::{Layout, MemoryRegion};
use crate::live::LivePages;
use crate::protocol::{
    Commit, Done, ErrorFrame, Finish, FrameKind, FrameReader, FrameWriter, Mapped, PageSpan, Pages,
    Ping, Pong, Region, RoundBegin, RoundEnd, State, Zero,
};

/// What a [`SocketSink`](super::SocketSink) asks a connection's writer to do.
pub(super) enum Cmd {
    /// Round, the most pages it holds (0: not stated; see [`RoundBegin::pages`]), and whether
    /// it is the final round ([`RoundBegin::final_round`]).
    Begin(u64, u64, bool),
    Pages(u64, PageBuf, Vec<PageHash>),
    /// Lent pages, with their hashes, or `None`: take them right before the write and report
    /// them on [`StreamWriter::live_hashes`].
    Live(u64, LivePages, Option<Vec<PageHash>>),
    Zero(Range<u64>),
    End(u64),
    State(Vec<u8>),
    Finish {
        checksum: u64,
        rounds: u64,
        check: FinalCheck,
        wait: Option<Duration>,
    },
    Commit(u64),
    /// A PING with this token; the writer waits for its PONG.
    Ping(u64),
    /// Page and zero frames handed over together (none of them answers).
    Batch(Vec<Cmd>),
    /// A region added to the layout (no host address): REGION, and the writer lays it out.
    Region(MemoryRegion),
    Mapped(Mapped),
}

/// The hashes a writer took of lent pages it sent: the memory offset of the first page and
/// the hash of each page.
pub(super) type LiveHashes = (u64, Vec<PageHash>);

/// A writer's answer to the commands that wait for one.
pub(super) enum Reply {
    RoundWritten(u64),
    Finished,
    Committed,
    /// The PING's round trip.
    Pong(Duration),
}

/// What the watcher heard from the receiver.
pub(super) enum PeerEvent {
    Pong { token: u64 },
    Done { checksum: u64 },
    Error { code: u32, message: String },
    Closed(TransferError),
}

/// Reads what the receiver says on `conn` (PONGs, then DONE or ERROR) and
/// reports it to the writer; sets `broken` if the connection broke instead
/// ([`TransferError::is_connection_break`]), which the sink checks between
/// rounds.
pub(super) fn watch_peer(conn: Connection, events: Chan<PeerEvent>, broken: Arc<AtomicBool>) {
    let mut r = FrameReader::new(&conn);
    let mut p = Vec::new();
    let event = loop {
        match r.read_frame(&mut p) {
            Ok(h) if h.kind == FrameKind::Pong => match h.decode::<Pong>(&p) {
                Ok(pong) => {
                    if events.send(PeerEvent::Pong { token: pong.token }).is_err() {
                        return;
                    }
                }
                Err(e) => break PeerEvent::Closed(e.into()),
            },
            Ok(h) if h.kind == FrameKind::Done => match h.decode::<Done>(&p) {
                Ok(done) => {
                    break PeerEvent::Done {
                        checksum: done.digest,
                    };
                }
                Err(e) => break PeerEvent::Closed(e.into()),
            },
            Ok(h) if h.kind == FrameKind::Error => {
                // Stop the writer now rather than at its next flush.
                let _ = conn.shutdown(Shutdown::Both);
                break match h.decode::<ErrorFrame>(&p) {
                    Ok(e) => PeerEvent::Error {
                        code: e.code,
                        message: e.message.into_owned(),
                    },
                    Err(e) => PeerEvent::Closed(e.into()),
                };
            }
            Ok(h) => {
                break PeerEvent::Closed(
                    ProtocolError::Unexpected {
                        offset: h.offset,
                        kind: h.kind,
                        state: "sending pages",
                    }
                    .into(),
                );
            }
            Err(e) => {
                if e.is_connection_break() {
                    broken.store(true, Ordering::SeqCst);
                }
                break PeerEvent::Closed(e);
            }
        }
    };
    let _ = events.send(event);
}

/// The socket send timeout (`SO_SNDTIMEO`) a connection with I/O timeout `io_timeout` gets:
/// a short slice of it, so that [`StallBound`] sees progress (a partial write) within a slice
/// of when it happened. The kernel's timeout bounds one call and a call that moved some bytes
/// returns their count when it expires, so with the whole timeout per call a frame written in
/// two calls could wait twice as long (measured: `--io-timeout 2` failed after ~4 s of silence).
pub(super) fn send_timeout_slice(io_timeout: Duration) -> Duration {
    (io_timeout / 20)
        .clamp(Duration::from_millis(10), Duration::from_millis(250))
        .min(io_timeout)
}

/// Bytes of small frames a writer gathers before one `writev` sends them together.
///
/// A round of scattered pages is one PAGES frame per run of pages, often a single 4 KiB
/// page: written one by one, that is a system call per page at the sender and about one
/// read per page at the receiver (measured with `strace -f -c` on the demo: 19 719 `writev`
/// and 21 327 `recvfrom` for 21 970 pages of iterative rounds). Frames that fit are copied
/// here instead (a 4 KiB copy costs far less than a system call) and go out with the next
/// frame that does not fit, or at the next flush.
pub(super) const COALESCE_BYTES: usize = 64 << 10;

/// A connection whose writes fail only after `stall` without progress: each call retries
/// the socket's short timeouts ([`send_timeout_slice`]) until a byte moves or `stall` has
/// passed since the call began (a call begins right after the previous one moved bytes, or
/// when a new frame is written), so the deadline holds to within one slice. `None`: the
/// socket blocks as long as it takes.
///
/// Small writes are gathered ([`COALESCE_BYTES`]) and sent with the next large one in the
/// same `writev`, or by [`io::Write::flush`]: whoever writes to `conn` directly, or waits
/// for the receiver's answer, flushes first.
pub(super) struct StallBound {
    pub(super) conn: Connection,
    pub(super) stall: Option<Duration>,
    /// Bytes accepted but not yet written, in order.
    pub(super) staged: Vec<u8>,
}

impl StallBound {
    pub(super) fn new(conn: Connection, stall: Option<Duration>) -> StallBound {
        StallBound {
            conn,
            stall,
            staged: Vec::with_capacity(COALESCE_BYTES),
        }
    }
}

impl StallBound {
    fn retry<T>(&self, mut call: impl FnMut(&Connection) -> io::Result<T>) -> io::Result<T> {
        let since = Instant::now();
        loop {
            match call(&self.conn) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && self.stall.is_some_and(|s| since.elapsed() < s) => {}
                other => return other,
            }
        }
    }
}

impl io::Write for StallBound {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    /// Stages `bufs` if they fit beside what is staged; otherwise writes the staged bytes
    /// and then `bufs` in one `writev` (as many calls as partial writes need), and returns
    /// how much of `bufs` went out.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.staged.len() + total <= COALESCE_BYTES {
            for b in bufs {
                self.staged.extend_from_slice(b);
            }
            return Ok(total);
        }
        while !self.staged.is_empty() {
            let mut all = Vec::with_capacity(bufs.len() + 1);
            all.push(io::IoSlice::new(&self.staged));
            all.extend(bufs.iter().map(|b| io::IoSlice::new(b)));
            let n = self.retry(|mut c| io::Write::write_vectored(&mut c, &all))?;
            if n == 0 {
                return Ok(0);
            }
            if n <= self.staged.len() {
                self.staged.drain(..n);
            } else {
                let past = n - self.staged.len();
                self.staged.clear();
                return Ok(past);
            }
        }
        self.retry(|mut c| io::Write::write_vectored(&mut c, bufs))
    }

    /// Writes what is staged.
    fn flush(&mut self) -> io::Result<()> {
        while !self.staged.is_empty() {
            let n = self.retry(|mut c| io::Write::write(&mut c, &self.staged))?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.staged.drain(..n);
        }
        Ok(())
    }
}

/// Paces writes to a byte rate (token bucket with a short burst). Clones share one bucket:
/// every connection's writer thread consumes from it, the sink reads how much it would let
/// through now ([`RateLimiter::pacing`]) for the switch-over estimate.
///
/// A writer that owes the bucket waits here, not in a socket call, so shutting the sockets
/// down does not end its wait: [`RateLimiter::cut`] does (the sink's interrupt, and the sink
/// when it stops its writers). At a low rate that wait is long (a 256 KiB frame at 64 KiB/s:
/// 4 s), and a final round past its bound kept the workload paused that much longer.
#[derive(Clone, Debug)]
pub(super) struct RateLimiter(Arc<Pacer>);

#[derive(Debug)]
struct Pacer {
    bucket: Mutex<Bucket>,
    /// Wakes the writers waiting on the bucket when it is cut.
    cut: Condvar,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes per second.
    rate: f64,
    /// The most bytes the bucket holds: a write after an idle spell goes through at once up
    /// to this many.
    burst: f64,
    /// Bytes it would let through now without waiting (negative: owed, a wait is due).
    tokens: f64,
    last: Instant,
    /// Cut ([`RateLimiter::cut`]): every wait ends, now and later.
    cut: bool,
    /// The round in progress was cut short ([`RateLimiter::skip_round`]): every wait ends,
    /// its bytes given back, until the next round is paced again.
    skipping: bool,
}

/// Why a wait for the rate limiter ended without letting the bytes through.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Halt {
    /// It was cut ([`RateLimiter::cut`]): the writers are being stopped.
    Cut,
    /// The round in progress was cut short ([`RateLimiter::skip_round`]): its page frames
    /// are dropped, the others written unpaced.
    Skip,
}

impl Bucket {
    /// Brings `tokens` up to `now`.
    fn refill(&mut self, now: Instant) {
        let idle = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + idle * self.rate).min(self.burst);
        self.last = now;
    }
}

impl RateLimiter {
    pub(super) fn new(rate: f64) -> RateLimiter {
        // A twentieth of a second's worth (50 ms of sending), at least 256 KiB.
        let burst = (rate / 20.0).max(256.0 * 1024.0);
        RateLimiter(Arc::new(Pacer {
            bucket: Mutex::new(Bucket {
                rate,
                burst,
                tokens: burst,
                last: Instant::now(),
                cut: false,
                skipping: false,
            }),
            cut: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Bucket> {
        self.0.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `bytes` from the bucket and, if it owes them, waits until it would have them,
    /// unless the limiter is cut first (or was already), or the round is cut short (then the
    /// bytes are given back).
    pub(super) fn consume(&self, bytes: u64) -> Result<(), Halt> {
        let mut b = self.lock();
        if b.cut {
            return Err(Halt::Cut);
        }
        if b.skipping {
            return Err(Halt::Skip);
        }
        let now = Instant::now();
        b.refill(now);
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            return Ok(());
        }
        // `None`: further off than an `Instant` reaches; only the cut ends it.
        let until = Duration::try_from_secs_f64(-b.tokens / b.rate)
            .ok()
            .and_then(|wait| now.checked_add(wait));
        loop {
            b = match until {
                Some(u) => {
                    let left = u.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(());
                    }
                    let woke = self.0.cut.wait_timeout(b, left);
                    woke.unwrap_or_else(PoisonError::into_inner).0
                }
                None => self.0.cut.wait(b).unwrap_or_else(PoisonError::into_inner),
            };
            if b.cut {
                return Err(Halt::Cut);
            }
            if b.skipping {
                b.tokens = (b.tokens + bytes as f64).min(b.burst);
                return Err(Halt::Skip);
            }
        }
    }

    /// `true`: the round in progress is cut short: every wait for the bucket ends now, and
    /// every later one at once, until `false` paces the next round again.
    pub(super) fn skip_round(&self, on: bool) {
        self.lock().skipping = on;
        self.0.cut.notify_all();
    }

    /// Ends every wait for the bucket, and every later one at once: its writers are being
    /// stopped.
    pub(super) fn cut(&self) {
        self.lock().cut = true;
        self.0.cut.notify_all();
    }

    /// The rate, and what the bucket would let through now without waiting.
    pub(super) fn pacing(&self) -> crate::sink::Pacing {
        let mut b = self.lock();
        b.refill(Instant::now());
        crate::sink::Pacing {
            rate: b.rate as u64,
            ready: b.tokens.max(0.0) as u64,
            burst: b.burst as u64,
        }
    }
}

/// Waits until `limiter` (if any) lets a frame with `payload` bytes through. A cut ends the
/// wait with an error that [`StreamWriter::write_error`] reports as
/// [`TransferError::Interrupted`] after an interrupt, as it does a write the interrupt cut.
/// `Ok(false)`: the round in progress was cut short ([`InterruptState::cut_round`]): a page
/// frame is dropped, any other frame written unpaced.
fn pace(limiter: Option<&RateLimiter>, payload: u64) -> io::Result<bool> {
    match limiter.map(|l| l.consume(crate::protocol::HEADER_LEN as u64 + payload)) {
        Some(Err(Halt::Cut)) => Err(io::Error::other("the writer was stopped while paced")),
        Some(Err(Halt::Skip)) => Ok(false),
        Some(Ok(())) | None => Ok(true),
    }
}

/// Which stream of one set of connections stopped on an error first, shared by their
/// writers: one stream's failure makes the receiver stop them all, so the error to report is
/// that first one, not what it caused on the others.
#[derive(Clone, Default)]
pub(super) struct FirstFailure(Arc<AtomicUsize>);

impl FirstFailure {
    /// Records that stream `index` stopped on an error, unless one did before.
    fn record(&self, index: usize) {
        let _ = self
            .0
            .compare_exchange(0, index + 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The stream that stopped on an error first, if one did.
    pub(super) fn stream(&self) -> Option<usize> {
        self.0.load(Ordering::SeqCst).checked_sub(1)
    }
}

/// One connection's writer thread: compresses, checksums, paces and writes
/// the frames its [`Cmd`]s ask for.
pub(super) struct StreamWriter {
    pub(super) out: FrameWriter<StallBound>,
    pub(super) compressor: Compressor,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) pages: u64,
    pub(super) zero_pages: u64,
    pub(super) round_start: u64,
    pub(super) page_size: u64,
    /// Names memory offsets on the wire (region id, offset inside it).
    pub(super) layout: Layout,
    pub(super) events: Receiver<PeerEvent>,
    pub(super) peer: String,
    pub(super) io_timeout: Option<Duration>,
    pub(super) interrupt: Arc<InterruptState>,
    /// Where the hashes this writer took of lent pages go, once the pages were written.
    pub(super) live_hashes: Chan<LiveHashes>,
    /// This stream's index, recorded in `first_failure` when it stops on an error.
    pub(super) stream: usize,
    pub(super) first_failure: FirstFailure,
    /// How lent pages go to the socket: spliced (opened at the first use) or by `writev`.
    pub(super) lent: LentSend,
}

/// How a writer sends lent pages ([`SenderConfig::splice`](crate::SenderConfig::splice)).
pub(super) enum LentSend {
    /// `vmsplice` + `splice` through this pipe, opened at the first lent page.
    Splice(Option<precopy_sys::splice::SplicePipe>),
    /// `writev`: asked for, or splice was refused (no pipe, or the socket refused it).
    Writev,
}

impl StreamWriter {
    /// A failed write: [`TransferError::Stalled`] when the socket timeout
    /// ran out, [`TransferError::Interrupted`] after an interrupt.
    fn write_error(&self, source: io::Error) -> TransferError {
        if self.interrupt.is_set() {
            return TransferError::Interrupted {
                peer: self.peer.clone(),
            };
        }
        match (source.kind(), self.io_timeout) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(after)) => {
                TransferError::Stalled {
                    what: "sending frames to",
                    peer: self.peer.clone(),
                    after,
                }
            }
            _ => TransferError::Io {
                what: "sending frames",
                source,
            },
        }
    }

    pub(super) fn run(
        mut self,
        cmds: Receiver<Cmd>,
        replies: Chan<Reply>,
    ) -> Result<(), TransferError> {
        for cmd in cmds {
            match self.handle(cmd) {
                Ok(Some(reply)) => {
                    if replies.send(reply).is_err() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // Recorded at once: `explain` may wait for the receiver's word.
                    self.first_failure.record(self.stream);
                    return Err(self.explain(e));
                }
            }
        }
        Ok(())
    }

    /// A write that failed because the receiver gave up becomes the
    /// receiver's own message.
    fn explain(&self, e: TransferError) -> TransferError {
        if let TransferError::Io { .. } = e
            && let Ok(PeerEvent::Error { code, message }) = self.next_event(Duration::from_secs(2))
        {
            return TransferError::PeerRejected { code, message };
        }
        e
    }

    /// The receiver's next word other than a PONG, waiting at most `wait`.
    fn next_event(&self, wait: Duration) -> Result<PeerEvent, crossbeam_channel::RecvTimeoutError> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left)? {
                PeerEvent::Pong { .. } => continue,
                other => return Ok(other),
            }
        }
    }

    /// Writes `frame` (after the rate limiter let its bytes through).
    fn send<'p, F: crate::protocol::Frame<'p>>(&mut self, frame: &F) -> Result<(), TransferError> {
        let (header, payload) = crate::protocol::encode(frame);
        // Written unpaced after a cut of the round: only page frames are dropped.
        let written = self
            .pace(payload.len() as u64)
            .and_then(|_| self.out.send_encoded(&header, &payload));
        written.map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Waits until the rate limit lets a frame with `payload` bytes through (see [`pace`]).
    fn pace(&self, payload: u64) -> io::Result<bool> {
        pace(self.limiter.as_ref(), payload)
    }

    fn handle(&mut self, cmd: Cmd) -> Result<Option<Reply>, TransferError> {
        match cmd {
            Cmd::Begin(round, round_pages, final_round) => {
                self.pages = 0;
                self.zero_pages = 0;
                self.round_start = self.out.written();
                self.send(&RoundBegin {
                    round,
                    pages: round_pages,
                    final_round,
                })?;
                // Not staged: with several connections the receiver starts a round only
                // when every connection's ROUND_BEGIN has arrived, while this connection's
                // pages may be held up behind another's.
                let flushed = self.out.flush();
                flushed.map_err(|e| self.write_error(e))?;
            }
            Cmd::Pages(offset, pages, hashes) => {
                let len = pages.len() as u64;
                let span = self.wire_span(offset, len)?;
                if self.send_page_frame(span, &pages, hashes)? {
                    self.pages += len / self.page_size;
                } else {
                    self.interrupt.skipped(offset..offset + len);
                }
            }
            Cmd::Live(offset, pages, hashes) => {
                if self.compressor.compresses() {
                    // Compress a copy, in an ordinary frame checked as a whole.
                    let mut copy = vec![0u8; pages.len() as usize];
                    pages
                        .copy_to(0, &mut copy)
                        .map_err(TransferError::io("copying lent pages"))?;
                    let ps = self.page_size as usize;
                    let held: Vec<PageHash> =
                        copy.chunks(ps).map(crate::digest::page_hash).collect();
                    let report = hashes.is_none().then(|| held.clone());
                    let before = self.pages;
                    let reply = self.handle(Cmd::Pages(offset, PageBuf::from_vec(copy), held))?;
                    // Not for pages a cut of the round dropped: they were never sent.
                    if let Some(held) = report.filter(|_| self.pages > before) {
                        let _ = self.live_hashes.send((offset, held));
                    }
                    return Ok(reply);
                }
                self.write_live(offset, &pages, hashes.as_deref())?;
            }
            Cmd::Zero(range) => {
                self.zero_pages += (range.end - range.start) / self.page_size;
                let span = self.wire_span(range.start, range.end - range.start)?;
                self.send(&Zero { span })?;
            }
            Cmd::State(blob) => {
                self.send(&State::new(&blob))?;
            }
            Cmd::Mapped(frame) => {
                self.send(&frame)?;
            }
            Cmd::Region(region) => {
                self.layout = self.layout.with_region(region)?;
                self.send(&Region { region })?;
                // Not staged: the receiver applies a region only once every connection's
                // REGION has arrived.
                let flushed = self.out.flush();
                flushed.map_err(|e| self.write_error(e))?;
            }
            Cmd::End(round) => {
                self.send(&RoundEnd::new(round, self.pages, self.zero_pages))?;
                let flushed = self.out.flush();
                flushed.map_err(|e| self.write_error(e))?;
                return Ok(Some(Reply::RoundWritten(
                    self.out.written() - self.round_start,
                )));
            }
            Cmd::Finish {
                checksum,
                rounds,
                check,
                wait,
            } => {
                self.send(&Finish {
                    rounds,
                    check,
                    digest: checksum,
                })?;
                let flushed = self.out.flush();
                flushed.map_err(|e| self.write_error(e))?;
                let accept = |event| match event {
                    PeerEvent::Done { checksum: theirs } if theirs == checksum => Some(Ok(())),
                    PeerEvent::Done { checksum: theirs } => {
                        Some(Err(TransferError::ChecksumMismatch {
                            expected: checksum,
                            actual: theirs,
                        }))
                    }
                    _ => None,
                };
                self.await_peer(wait, "waiting for the acknowledgement of", accept)?;
                return Ok(Some(Reply::Finished));
            }
            Cmd::Ping(token) => return self.ping(token).map(|d| Some(Reply::Pong(d))),
            Cmd::Batch(cmds) => {
                for cmd in cmds {
                    self.handle(cmd)?;
                }
            }
            Cmd::Commit(checksum) => {
                self.send(&Commit { digest: checksum })?;
                let flushed = self.out.flush();
                flushed.map_err(|e| self.write_error(e))?;
                return Ok(Some(Reply::Committed));
            }
        }
        Ok(None)
    }

    /// Writes a PAGES frame of `pages` at `span` with their `hashes` (compressed if the
    /// connection compresses), after the rate limit let it through. `false`: dropped
    /// unwritten, the round was cut short ([`InterruptState::cut_round`]).
    fn send_page_frame(
        &mut self,
        span: PageSpan,
        pages: &PageBuf,
        hashes: Vec<PageHash>,
    ) -> Result<bool, TransferError> {
        if self.interrupt.round_is_cut() {
            return Ok(false);
        }
        let (go, written) = match self.compressor.compress(pages)? {
            // The writer's own `pace` would borrow all of it, `packed` too.
            Some((codec, packed)) => match pace(self.limiter.as_ref(), packed.len() as u64) {
                Ok(true) => {
                    let frame = Pages {
                        span,
                        codec,
                        live: false,
                    };
                    (true, self.out.send_pages(&frame, packed).map(|_| ()))
                }
                Ok(false) => (false, Ok(())),
                Err(e) => (true, Err(e)),
            },
            None => {
                // The hashes came with the pages: no pass over them here.
                let mut hashes = hashes;
                if hashes.len() as u64 * self.page_size != span.len {
                    let ps = self.page_size as usize;
                    hashes = pages.chunks(ps).map(crate::digest::page_hash).collect();
                }
                let list = hashes.len() * crate::digest::PAGE_HASH_LEN;
                match self.pace(span.len + list as u64) {
                    Ok(true) => {
                        let sent = self.out.send_listed_pages(span, pages, &hashes);
                        (true, sent.map(|_| ()))
                    }
                    Ok(false) => (false, Ok(())),
                    Err(e) => (true, Err(e)),
                }
            }
        };
        written.map_err(|e| self.write_error(e))?;
        Ok(go)
    }

    /// Sends PING `token` and waits for its PONG (at most the I/O timeout): the round trip.
    fn ping(&mut self, token: u64) -> Result<Duration, TransferError> {
        let at = Instant::now();
        self.send(&Ping { token })?;
        let flushed = self.out.flush();
        flushed.map_err(|e| self.write_error(e))?;
        let accept = |event| match event {
            PeerEvent::Pong { token: t } if t == token => Some(Ok(())),
            PeerEvent::Done { .. } => Some(Err(ProtocolError::Unexpected {
                offset: 0,
                kind: FrameKind::Done,
                state: "waiting for a PONG",
            }
            .into())),
            // An answer to an earlier PING that timed out.
            _ => None,
        };
        self.await_peer(self.io_timeout, "waiting for the PONG of", accept)?;
        Ok(at.elapsed())
    }

    /// Waits, at most `wait` in all, for the receiver's word that `accept` takes (`Some`: the
    /// result; `None`: skip it, e.g. a stale PONG). An ERROR, a closed connection, an interrupt
    /// or the timeout (`what` names the wait) end it with the matching error.
    fn await_peer(
        &self,
        wait: Option<Duration>,
        what: &'static str,
        mut accept: impl FnMut(PeerEvent) -> Option<Result<(), TransferError>>,
    ) -> Result<(), TransferError> {
        let until = wait.map(|t| Instant::now() + t);
        loop {
            let event = match until {
                Some(u) => {
                    let left = u.saturating_duration_since(Instant::now());
                    self.events.recv_timeout(left).map_err(|e| e.is_timeout())
                }
                None => self.events.recv().map_err(|_| false),
            };
            let failed = match event {
                Ok(PeerEvent::Error { code, message }) => {
                    TransferError::PeerRejected { code, message }
                }
                Ok(PeerEvent::Closed(_)) | Err(_) if self.interrupt.is_set() => {
                    TransferError::Interrupted {
                        peer: self.peer.clone(),
                    }
                }
                Ok(PeerEvent::Closed(e)) => e,
                Err(true) => TransferError::Stalled {
                    what,
                    peer: self.peer.clone(),
                    after: wait.unwrap_or_default(),
                },
                Err(false) => TransferError::Aborted,
                Ok(other) => match accept(other) {
                    Some(result) => return result,
                    None => continue,
                },
            };
            return Err(failed);
        }
    }

    /// Writes lent pages at memory offset `offset` as live frames, the
    /// kernel reading them from memory (at most [`MAX_PAYLOAD`] bytes of
    /// pages and hash list per frame). `hashes`: the hash of each page as the
    /// sender took it; `None`: take each frame's hashes here, right before its
    /// write, so the kernel's copy finds the pages in cache, and report them
    /// on `live_hashes` once written.
    ///
    /// [`MAX_PAYLOAD`]: crate::protocol::MAX_PAYLOAD
    fn write_live(
        &mut self,
        offset: u64,
        pages: &LivePages,
        hashes: Option<&[PageHash]>,
    ) -> Result<(), TransferError> {
        use precopy_sys::live::{Gather, write_all_gather_within};
        use std::os::fd::AsFd;
        use zerocopy::IntoBytes;
        let ps = self.page_size;
        let per_frame = (crate::protocol::MAX_PAYLOAD / (ps + crate::digest::PAGE_HASH_LEN as u64))
            .max(1) as usize;
        let count = (pages.len() / ps) as usize;
        let mut taken = Vec::new();
        for k in 0..count.div_ceil(per_frame) {
            let first = k * per_frame;
            let n = per_frame.min(count - first);
            let from = first as u64 * ps;
            let len = n as u64 * ps;
            // A cut of the round drops the rest of these pages, unwritten.
            if self.interrupt.round_is_cut() {
                self.interrupt.skipped(offset + from..offset + pages.len());
                break;
            }
            let part = pages
                .slice(from..from + len)
                .map_err(TransferError::io("lending pages"))?;
            let span = self.wire_span(offset + from, len)?;
            // The frames staged before this one go first (before the hash, which should be
            // the last thing to touch the pages before the kernel's copy).
            let flushed = self.out.flush();
            flushed.map_err(|e| self.write_error(e))?;
            let chunk = match hashes {
                Some(h) => h.get(first..first + n).ok_or(TransferError::Misuse {
                    operation: "send_live_pages",
                    state: "with a hash count that differs from the page count",
                })?,
                None => {
                    taken.clear();
                    part.for_each_page(ps, |p| taken.push(crate::digest::page_hash(p)));
                    &taken[..]
                }
            };
            let list = crate::digest::hash_list(chunk);
            let header = Pages::listed_header(span, &list, true);
            let paced = self.pace(len + list.len() as u64);
            if !paced.map_err(|e| self.write_error(e))? {
                self.interrupt.skipped(offset + from..offset + pages.len());
                break;
            }
            let parts = [
                Gather::Bytes(header.as_bytes()),
                Gather::Live(&part),
                Gather::Bytes(&list),
            ];
            let n = match self.send_spliced(&parts) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    let fd = self.out.get_ref().conn.as_fd();
                    write_all_gather_within(fd, &parts, self.io_timeout)
                        .map_err(|e| self.write_error(e))?
                }
                Err(e) => return Err(self.write_error(e)),
            };
            self.out.wrote(n);
            self.pages += chunk.len() as u64;
            if hashes.is_none() {
                let _ = self
                    .live_hashes
                    .send((offset + from, std::mem::take(&mut taken)));
            }
        }
        Ok(())
    }

    /// Sends `parts` with `vmsplice` + `splice` (the kernel reads the lent pages when the
    /// receiver copies them, which a live frame tolerates: see [`crate::live`]); `None`: this
    /// writer sends lent pages with `writev` instead, nothing was sent. A pipe that cannot be
    /// opened or a socket that refuses `splice` turns splicing off for the connection.
    fn send_spliced(&mut self, parts: &[precopy_sys::live::Gather<'_>]) -> io::Result<Option<u64>> {
        use precopy_sys::splice::{SplicePipe, Spliced};
        use std::os::fd::AsFd;
        let LentSend::Splice(pipe) = &mut self.lent else {
            return Ok(None);
        };
        let pipe = match pipe {
            Some(p) => p,
            None => match SplicePipe::new() {
                Ok(p) => pipe.insert(p),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splice; lent pages go by writev");
                    self.lent = LentSend::Writev;
                    return Ok(None);
                }
            },
        };
        let fd = self.out.get_ref().conn.as_fd();
        match pipe.write_all(fd, parts, self.io_timeout)? {
            Spliced::Sent(n) => Ok(Some(n)),
            Spliced::Unsupported(e) => {
                tracing::debug!(error = %e, "the socket refused splice; lent pages go by writev");
                self.lent = LentSend::Writev;
                Ok(None)
            }
        }
    }

    /// The wire's name for `len` bytes at memory offset `offset`: region id
    /// and offset inside the region.
    fn wire_span(&self, offset: u64, len: u64) -> Result<PageSpan, TransferError> {
        let (r, at) =
            self.layout
                .region_at(offset)
                .ok_or(crate::error::LayoutError::OutsideLayout {
                    range: offset..offset,
                })?;
        Ok(PageSpan {
            region: r.id,
            offset: at,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for a wait that a cut should have ended before it calls the
    /// wake-up lost: far past any scheduling delay, far below the waits it cuts.
    const LIVENESS: Duration = Duration::from_secs(30);

    /// Consumes `bytes` from `limiter` on another thread; what it returned, once it did.
    fn consume_elsewhere(limiter: &RateLimiter, bytes: u64) -> crossbeam_channel::Receiver<bool> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let l = limiter.clone();
        std::thread::spawn(move || {
            let _ = tx.send(l.consume(bytes).is_ok());
        });
        rx
    }

    /// At 1 byte/s a write of 1 MiB past the burst owes 12 days; the cut ends that wait,
    /// and every later one at once. At the smallest positive rate the wait is past what an
    /// `Instant` holds: the cut ends that one too.
    #[test]
    fn a_cut_ends_a_wait_for_the_bucket_and_every_later_one() {
        for rate in [1.0, f64::MIN_POSITIVE] {
            let limiter = RateLimiter::new(rate);
            assert!(limiter.consume(256 << 10).is_ok(), "the burst goes at once");
            let waiting = consume_elsewhere(&limiter, 1 << 20);
            // Most likely waiting by now; if not, it finds the bucket cut, as it must too.
            std::thread::sleep(Duration::from_millis(50));
            limiter.cut();
            let let_through = waiting
                .recv_timeout(LIVENESS)
                .expect("the wait was not cut");
            assert!(
                !let_through,
                "rate {rate}: cut, yet it let the bytes through"
            );
            assert!(limiter.consume(1).is_err(), "rate {rate}: a later wait");
            assert_eq!(limiter.pacing().burst, 256 << 10);
        }
    }

    /// A cut of the round ends a wait for the bucket too, and gives the bytes back (the frame
    /// is dropped, not sent); every later wait ends at once, until the next round is paced
    /// again, which the limiter's own cut still ends.
    #[test]
    fn a_cut_of_the_round_ends_a_wait_and_gives_its_bytes_back() {
        let limiter = RateLimiter::new(1.0);
        assert!(limiter.consume(256 << 10).is_ok(), "the burst goes at once");
        let waiting = consume_elsewhere(&limiter, 1 << 20);
        std::thread::sleep(Duration::from_millis(50));
        limiter.skip_round(true);
        let let_through = waiting
            .recv_timeout(LIVENESS)
            .expect("the wait was not cut");
        assert!(!let_through, "cut, yet it let the bytes through");
        assert_eq!(limiter.consume(1), Err(Halt::Skip));
        let owed = limiter.lock().tokens;
        assert!(
            owed > -1.0,
            "the dropped frame's bytes are not owed: {owed}"
        );
        limiter.skip_round(false);
        let paced = consume_elsewhere(&limiter, 1 << 20);
        std::thread::sleep(Duration::from_millis(50));
        limiter.cut();
        assert!(!paced.recv_timeout(LIVENESS).expect("not cut"));
    }

    /// A wait the bucket owes ends by itself when the bytes are due, without a cut.
    #[test]
    fn a_wait_nobody_cuts_ends_when_the_bytes_are_due() {
        // At 1 MiB/s the burst is 256 KiB: 1 KiB past it is due in about 1 ms.
        let limiter = RateLimiter::new((1 << 20) as f64);
        let waiting = consume_elsewhere(&limiter, (256 << 10) + 1024);
        let let_through = waiting
            .recv_timeout(LIVENESS)
            .expect("the wait never ended");
        assert!(let_through);
    }
}
