//! [`SocketSink`]: the [`Sink`] that spreads a transfer's frames over its
//! connections' writers, and [`Sender`], a transfer into it.

use std::io;
use std::net::Shutdown;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender as Chan, bounded};

use super::conn::{Connection, InterruptState};
use super::handshake::sender_handshake;
use super::writer::{
    Cmd, FirstFailure, LentSend, LiveHashes, RateLimiter, Reply, StallBound, StreamWriter,
    send_timeout_slice, watch_peer,
};
use crate::auth;
use crate::buffer::PageBuf;
use crate::codec::Compressor;
use crate::digest::{FinalCheck, PageHash};
use crate::engine::{SenderConfig, Transfer};
use crate::error::TransferError;
use crate::layout::Layout;
use crate::live::LivePages;
use crate::protocol::{ErrorFrame, FrameKind, FrameReader, FrameWriter, Hello, Resume, error_code};
use crate::sink::{Interrupt, Pacing, ResumePoint, Sink};
use crate::source::PageSource;

struct Worker {
    cmds: Option<Chan<Cmd>>,
    replies: Receiver<Reply>,
    handle: Option<JoinHandle<Result<(), TransferError>>>,
    watcher: Option<JoinHandle<()>>,
    conn: Connection,
    /// Set by the watcher when the connection broke (end of stream, reset).
    broken: Arc<AtomicBool>,
    /// The error the writer stopped on (a receiver's ERROR, a stall, a break), once taken:
    /// every later call reports it again, not a bare abort.
    failed: Option<TransferError>,
    /// The writer's and the watcher's thread IDs, each set by the thread itself when it
    /// starts (0 until then).
    tids: [Arc<AtomicI32>; 2],
    /// Small page frames not yet handed to the writer ([`Worker::send_small`]).
    held: Vec<Cmd>,
    /// The rate limiter (shared with the writer and every other connection's), for
    /// [`Sink::pacing`].
    limiter: Option<RateLimiter>,
    held_bytes: usize,
}

/// Page bytes a [`Worker`] gathers before it hands its small frames to the writer thread
/// in one [`Cmd::Batch`]. A round of scattered pages is a frame per page; handed over one
/// by one, each costs two context switches between the engine's thread and the writer's
/// (about 8 µs each on this project's test machine, `perf sched timehist`), more than the
/// page's own copy and hash.
const HOLD_BYTES: usize = 256 << 10;
/// Frames a [`Worker`] gathers at most before it hands them over (zero runs carry no bytes).
const HOLD_FRAMES: usize = 64;

impl Worker {
    /// The worker's own error, after it stopped (waits for it to stop).
    fn failure(&mut self) -> TransferError {
        self.cmds = None;
        let Some(handle) = self.handle.take() else {
            return self
                .failed
                .as_ref()
                .map_or(TransferError::Aborted, TransferError::again);
        };
        let e = match handle.join() {
            Ok(Err(e)) => e,
            Ok(Ok(())) => TransferError::Aborted,
            Err(_) => TransferError::WorkerPanicked,
        };
        self.failed = Some(e.again());
        e
    }

    /// Hands `cmd` to the writer, after the frames held back.
    fn send(&mut self, cmd: Cmd) -> Result<(), TransferError> {
        self.release()?;
        self.hand(cmd)
    }

    /// Holds back a page frame of `bytes` bytes to hand it over with others; a large one
    /// goes at once.
    fn send_small(&mut self, cmd: Cmd, bytes: usize) -> Result<(), TransferError> {
        if bytes >= HOLD_BYTES {
            return self.send(cmd);
        }
        self.held.push(cmd);
        self.held_bytes += bytes;
        if self.held_bytes >= HOLD_BYTES || self.held.len() >= HOLD_FRAMES {
            self.release()?;
        }
        Ok(())
    }

    /// Hands the frames held back to the writer in one batch.
    fn release(&mut self) -> Result<(), TransferError> {
        self.held_bytes = 0;
        let cmd = if self.held.len() > 1 {
            Cmd::Batch(std::mem::take(&mut self.held))
        } else if let Some(one) = self.held.pop() {
            one
        } else {
            return Ok(());
        };
        self.hand(cmd)
    }

    fn hand(&mut self, cmd: Cmd) -> Result<(), TransferError> {
        match &self.cmds {
            Some(tx) if tx.send(cmd).is_ok() => Ok(()),
            _ => Err(self.failure()),
        }
    }

    fn reply(&mut self) -> Result<Reply, TransferError> {
        match self.replies.recv() {
            Ok(r) => Ok(r),
            Err(_) => Err(self.failure()),
        }
    }
}

/// A [`Sink`] writing page frames over one or more connections.
///
/// Every blocking step is bounded: the handshake by
/// [`SenderConfig::handshake_timeout`], each write and the wait for the
/// receiver's acknowledgement by [`SenderConfig::io_timeout`]
/// ([`TransferError::Stalled`]); and [`Sink::interrupter`] ends any of them
/// from another thread ([`TransferError::Interrupted`]).
///
/// Made with [`SocketSink::dial`], it can also resume the transfer after its
/// connections broke ([`Sink::resume`]).
pub struct SocketSink {
    workers: Vec<Worker>,
    next: usize,
    rounds: u64,
    finished: bool,
    interrupt: Arc<InterruptState>,
    peer: String,
    io_timeout: Option<Duration>,
    layout_bytes: u64,
    checksum: u64,
    /// PINGs sent (the last one's token).
    pings: u64,
    /// The transfer's session id, which a resume presents again.
    session: u64,
    config: SenderConfig,
    /// The layout as announced (no host addresses).
    layout: Layout,
    dial: Option<Dial>,
    /// Where the writers report the hashes they took of lent pages
    /// ([`Sink::take_live_hashes`]), and where the sink collects them.
    live_hashes: (Chan<LiveHashes>, Receiver<LiveHashes>),
    /// Which of the current connections' writers stopped on an error first.
    first_failure: FirstFailure,
    /// The next round's most pages ([`Sink::expect_round`]), stated on connection 0.
    round_pages: u64,
    /// The next round is the final one ([`Sink::expect_final_round`]), stated on every
    /// connection.
    final_next: bool,
}

/// Opens one new connection to the destination, for [`SocketSink::dial`]
/// and each resume. It should bound its own wait (e.g.
/// [`Connection::connect_tcp_timeout`]).
pub type Dial = Box<dyn FnMut() -> io::Result<Connection> + Send>;

impl std::fmt::Debug for SocketSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketSink")
            .field("streams", &self.workers.len())
            .field("rounds", &self.rounds)
            .finish()
    }
}

impl SocketSink {
    /// Runs the handshake on every connection (announcing `layout`) and
    /// starts their writers. `config.streams` must equal `conns.len()`.
    pub fn connect(
        conns: Vec<Connection>,
        layout: &Layout,
        config: &SenderConfig,
    ) -> Result<SocketSink, TransferError> {
        if conns.is_empty() || conns.len() != config.streams || conns.len() > u32::MAX as usize {
            return Err(TransferError::Config {
                reason: "streams must be at least 1 and equal the number of connections",
            });
        }
        if config.bandwidth_limit == Some(0) {
            return Err(TransferError::Config {
                reason: "bandwidth limit must be positive",
            });
        }
        let session: u64 = rand::random();
        let ready = handshake_all(conns, session, layout, config, false)?;
        SocketSink::start(ready, session, layout, config)
    }

    /// A sink over `ready`, connections of session `session` whose handshake is done.
    fn start(
        ready: Vec<Connection>,
        session: u64,
        layout: &Layout,
        config: &SenderConfig,
    ) -> Result<SocketSink, TransferError> {
        let peer = ready.first().map(Connection::peer).unwrap_or_default();
        let mut sink = SocketSink {
            workers: Vec::new(),
            next: 0,
            rounds: 0,
            finished: false,
            interrupt: Arc::new(InterruptState::default()),
            peer,
            io_timeout: config.io_timeout,
            layout_bytes: layout.total_len(),
            checksum: 0,
            pings: 0,
            session,
            config: config.clone(),
            layout: layout.without_host(),
            dial: None,
            live_hashes: crossbeam_channel::unbounded(),
            first_failure: FirstFailure::default(),
            round_pages: 0,
            final_next: false,
        };
        sink.start_workers(ready)?;
        Ok(sink)
    }

    /// Opens `config.streams` connections with `dial`, then as
    /// [`SocketSink::connect`]; keeps `dial`, so that [`Sink::resume`] can
    /// connect to the same transfer again after the connections broke.
    pub fn dial(
        mut dial: impl FnMut() -> io::Result<Connection> + Send + 'static,
        layout: &Layout,
        config: &SenderConfig,
    ) -> Result<SocketSink, TransferError> {
        let conns = (0..config.streams)
            .map(|_| dial())
            .collect::<io::Result<Vec<_>>>()
            .map_err(TransferError::io("connecting to the receiver"))?;
        let mut sink = SocketSink::connect(conns, layout, config)?;
        sink.dial = Some(Box::new(dial));
        Ok(sink)
    }

    /// The transfer's random session id (every connection presents it, a
    /// resume too).
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Starts a writer and a watcher for each handshaken connection.
    fn start_workers(&mut self, ready: Vec<Connection>) -> Result<(), TransferError> {
        let config = &self.config;
        self.first_failure = FirstFailure::default();
        // One bucket for all connections: the rate is the transfer's, however the pages of a
        // round fall on them (each with its own share, a round spread over half of them went
        // at half the rate).
        let limiter = config
            .bandwidth_limit
            .map(|bps| RateLimiter::new(bps as f64));
        if let Some(l) = &limiter {
            self.interrupt.register_pacer(l);
        }
        for (i, conn) in ready.into_iter().enumerate() {
            conn.set_write_timeout(config.io_timeout.map(send_timeout_slice))
                .map_err(TransferError::io("setting a socket timeout"))?;
            self.interrupt.register(&conn)?;
            let (cmd_tx, cmd_rx) = bounded(config.queue_depth.max(1));
            let (reply_tx, reply_rx) = bounded(1);
            let (event_tx, event_rx) = bounded(1);
            let watch = conn
                .try_clone()
                .map_err(TransferError::io("cloning a socket"))?;
            let keep = conn
                .try_clone()
                .map_err(TransferError::io("cloning a socket"))?;
            let broken = Arc::new(AtomicBool::new(false));
            let seen = broken.clone();
            let tids = [Arc::new(AtomicI32::new(0)), Arc::new(AtomicI32::new(0))];
            let watcher_tid = tids[1].clone();
            let watcher = std::thread::Builder::new()
                .name(format!("precopy-watch-{i}"))
                .spawn(move || {
                    watcher_tid.store(precopy_sys::sched::gettid(), Ordering::Relaxed);
                    watch_peer(watch, event_tx, seen)
                })
                .map_err(TransferError::io("starting a watcher thread"))?;
            let writer = StreamWriter {
                out: FrameWriter::new(StallBound::new(conn, config.io_timeout)),
                compressor: Compressor::new(config.compression),
                limiter: limiter.clone(),
                pages: 0,
                zero_pages: 0,
                round_start: 0,
                page_size: self.layout.page_size(),
                layout: self.layout.clone(),
                events: event_rx,
                peer: conn_peer(i, &self.peer),
                io_timeout: config.io_timeout,
                interrupt: self.interrupt.clone(),
                live_hashes: self.live_hashes.0.clone(),
                stream: i,
                first_failure: self.first_failure.clone(),
                lent: if config.splice {
                    LentSend::Splice(None)
                } else {
                    LentSend::Writev
                },
            };
            let writer_tid = tids[0].clone();
            let handle = std::thread::Builder::new()
                .name(format!("precopy-send-{i}"))
                .spawn(move || {
                    writer_tid.store(precopy_sys::sched::gettid(), Ordering::Relaxed);
                    writer.run(cmd_rx, reply_tx)
                })
                .map_err(TransferError::io("starting a writer thread"))?;
            self.workers.push(Worker {
                cmds: Some(cmd_tx),
                replies: reply_rx,
                handle: Some(handle),
                watcher: Some(watcher),
                conn: keep,
                broken,
                failed: None,
                tids,
                held: Vec::new(),
                held_bytes: 0,
                limiter: limiter.clone(),
            });
        }
        self.next = 0;
        Ok(())
    }

    /// Stops every writer and watcher; with `cut`, shuts the connections
    /// down first (a writer may be stuck on a peer that stopped reading) and
    /// cuts the rate limiter (or waiting on it, for seconds at a low rate).
    fn stop_workers(&mut self, cut: bool) {
        for w in &mut self.workers {
            w.cmds = None;
            if cut {
                let _ = w.conn.shutdown(Shutdown::Both);
                if let Some(l) = &w.limiter {
                    l.cut();
                }
            }
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
            let _ = w.conn.shutdown(Shutdown::Both);
            if let Some(h) = w.watcher.take() {
                let _ = h.join();
            }
        }
    }

    /// Fails if a watcher saw a connection break: a round that began or
    /// ended after that may not have reached the receiver, however much the
    /// kernel accepted.
    fn check_unbroken(&mut self) -> Result<(), TransferError> {
        if self.workers.is_empty() {
            return Err(self.explain(no_connection()));
        }
        if self.workers.iter().any(|w| w.broken.load(Ordering::SeqCst)) {
            return Err(self.explain(TransferError::Io {
                what: "sending frames",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the receiver's end of the connection closed",
                ),
            }));
        }
        Ok(())
    }

    /// The error to return for `e`: [`TransferError::Interrupted`] once the
    /// sink was interrupted (whatever the broken socket said); else the error
    /// of the stream whose writer stopped first, which may not be the one
    /// that met `e` (one stream's failure makes the receiver stop them all);
    /// else `e`.
    fn explain(&mut self, e: TransferError) -> TransferError {
        if self.interrupt.is_set() {
            return TransferError::Interrupted {
                peer: self.peer.clone(),
            };
        }
        let first = self.first_failure.stream();
        match first.and_then(|i| self.workers.get_mut(i)) {
            Some(w) => w.failure(),
            None => e,
        }
    }

    fn each(
        &mut self,
        mut f: impl FnMut(&mut Worker) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        let r = self.workers.iter_mut().try_for_each(&mut f);
        r.map_err(|e| self.explain(e))
    }

    /// Number of connections.
    pub fn streams(&self) -> usize {
        self.workers.len()
    }

    fn next_worker(&mut self) -> Result<&mut Worker, TransferError> {
        if self.workers.is_empty() {
            return Err(no_connection());
        }
        let i = self.next % self.workers.len();
        self.next = (i + 1) % self.workers.len();
        Ok(&mut self.workers[i])
    }
}

impl Sink for SocketSink {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        // Taken first: the mark never outlives the round it was meant for.
        let final_round = std::mem::take(&mut self.final_next);
        self.check_unbroken()?;
        // Connection 0 states the round's size for the whole round (the receiver sums the
        // connections' figures at its barrier); the others state none.
        let mut pages = std::mem::take(&mut self.round_pages);
        self.each(|w| w.send(Cmd::Begin(round, std::mem::take(&mut pages), final_round)))
    }

    /// Marks the next ROUND_BEGIN, on every connection, as the final round's.
    fn expect_final_round(&mut self) {
        self.final_next = true;
    }

    /// Remembers the size for the next ROUND_BEGIN (see [`RoundBegin::pages`](crate::protocol::RoundBegin)).
    fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
        self.round_pages = pages;
        Ok(())
    }

    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        let bytes = pages.len();
        let r = self
            .next_worker()
            .and_then(|w| w.send_small(Cmd::Pages(offset, pages, hashes.to_vec()), bytes));
        r.map_err(|e| self.explain(e))
    }

    /// Sends lent pages from memory in live frames (see [`crate::live`]).
    fn send_live_pages(
        &mut self,
        offset: u64,
        pages: LivePages,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        let bytes = usize::try_from(pages.len()).unwrap_or(usize::MAX);
        let r = self
            .next_worker()
            .and_then(|w| w.send_small(Cmd::Live(offset, pages, Some(hashes.to_vec())), bytes));
        r.map_err(|e| self.explain(e))
    }

    /// The writers hash lent pages right before their `writev`.
    fn hashes_live_pages(&self) -> bool {
        true
    }

    /// Sends lent pages from memory in live frames, the connection's writer taking their
    /// hashes just before it writes them (see [`crate::live`]).
    fn send_unhashed_live_pages(
        &mut self,
        offset: u64,
        pages: LivePages,
    ) -> Result<(), TransferError> {
        let bytes = usize::try_from(pages.len()).unwrap_or(usize::MAX);
        let r = self
            .next_worker()
            .and_then(|w| w.send_small(Cmd::Live(offset, pages, None), bytes));
        r.map_err(|e| self.explain(e))
    }

    fn take_live_hashes(&mut self, f: &mut dyn FnMut(u64, &[PageHash])) {
        for (offset, hashes) in self.live_hashes.1.try_iter() {
            f(offset, &hashes);
        }
    }

    /// Sends REGION on every connection (each writer lays the region out too), so that
    /// pages of it may follow on any of them in the next round; a resume announces the grown
    /// layout.
    fn add_region(&mut self, region: &crate::layout::MemoryRegion) -> Result<(), TransferError> {
        if self.finished {
            return Err(TransferError::Misuse {
                operation: "add_region",
                state: "after the final checksum was sent",
            });
        }
        self.check_unbroken()?;
        let region = region.without_host();
        let layout = self.layout.with_region(region)?;
        self.each(|w| w.send(Cmd::Region(region)))?;
        self.layout_bytes = layout.total_len();
        self.layout = layout;
        Ok(())
    }

    /// Sends the protocol's MAPPED on the first connection, between rounds.
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        if self.finished {
            return Err(TransferError::Misuse {
                operation: "retain",
                state: "after the final checksum was sent",
            });
        }
        self.check_unbroken()?;
        let frame = crate::protocol::Mapped::of(&self.layout, memory);
        let r = match self.workers.first_mut() {
            Some(w) => w.send(Cmd::Mapped(frame)),
            None => Err(no_connection()),
        };
        r.map_err(|e| self.explain(e))?;
        Ok(true)
    }

    /// Sends the state blob on the first connection, ahead of its FINISH.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        self.check_unbroken()?;
        let r = self.workers[0].send(Cmd::State(state.to_vec()));
        r.map_err(|e| self.explain(e))
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        let r = self
            .next_worker()
            .and_then(|w| w.send_small(Cmd::Zero(range), 0));
        r.map_err(|e| self.explain(e))
    }

    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        self.each(|w| w.send(Cmd::End(round)))?;
        let mut bytes = 0;
        self.each(|w| match w.reply()? {
            Reply::RoundWritten(b) => {
                bytes += b;
                Ok(())
            }
            _ => Err(TransferError::WorkerPanicked),
        })?;
        self.check_unbroken()?;
        self.rounds = round + 1;
        Ok(bytes)
    }

    fn finish(&mut self, memory_checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        crate::sink::finish_in_two_steps(self, memory_checksum, check)
    }

    fn finish_uncommitted(
        &mut self,
        memory_checksum: u64,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
        self.check_unbroken()?;
        let rounds = self.rounds;
        // A full check reads the destination anew before the receiver answers.
        let wait = self.io_timeout.map(|t| match check {
            FinalCheck::Full => t + Duration::from_secs(4 * self.layout_bytes.div_ceil(1 << 30)),
            _ => t,
        });
        self.each(|w| {
            w.send(Cmd::Finish {
                checksum: memory_checksum,
                rounds,
                check,
                wait,
            })
        })?;
        self.each(|w| w.reply().map(|_| ()))?;
        self.checksum = memory_checksum;
        self.finished = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), TransferError> {
        if !self.finished {
            return Err(TransferError::Misuse {
                operation: "commit",
                state: "before the receiver acknowledged FINISH",
            });
        }
        let checksum = self.checksum;
        self.each(|w| w.send(Cmd::Commit(checksum)))?;
        self.each(|w| w.reply().map(|_| ()))
    }

    fn interrupter(&self) -> Option<Interrupt> {
        let state = self.interrupt.clone();
        Some(Arc::new(move || state.interrupt()))
    }

    /// The writers drop the page frames they have not begun to write, a wait for the rate
    /// limit included (at 64 KiB/s one 256 KiB frame waits 4 s); ROUND_END then counts
    /// what each connection wrote, as the receiver checks it.
    fn round_cutter(&self) -> Option<Interrupt> {
        let state = self.interrupt.clone();
        Some(Arc::new(move || state.cut_round()))
    }

    fn round_cut(&self) -> bool {
        self.interrupt.round_is_cut()
    }

    fn take_cut_pages(&mut self, f: &mut dyn FnMut(Range<u64>)) {
        self.interrupt.take_skipped().into_iter().for_each(f);
    }

    fn uncut(&mut self) {
        self.interrupt.uncut();
    }

    fn peer(&self) -> Option<String> {
        Some(self.peer.clone())
    }

    fn pacing(&self) -> Option<Pacing> {
        // Every connection's writer shares one bucket.
        self.workers
            .iter()
            .find_map(|w| w.limiter.as_ref().map(RateLimiter::pacing))
    }

    /// Every connection's writer and watcher thread (those started so far).
    fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
        self.workers
            .iter()
            .flat_map(|w| w.tids.iter().map(|t| t.load(Ordering::Relaxed)))
            .filter(|&t| t > 0)
            .collect()
    }

    fn ping(&mut self) -> Result<Option<Duration>, TransferError> {
        self.pings += 1;
        let token = self.pings;
        self.each(|w| w.send(Cmd::Ping(token)))?;
        let mut slowest = Duration::ZERO;
        self.each(|w| match w.reply()? {
            Reply::Pong(d) => {
                slowest = slowest.max(d);
                Ok(())
            }
            _ => Err(TransferError::WorkerPanicked),
        })?;
        Ok(Some(slowest))
    }

    fn can_resume(&self) -> bool {
        self.dial.is_some() && !self.finished && !self.interrupt.is_set()
    }

    /// Drops the broken connections, dials `config.streams` new ones with
    /// the [`Dial`] given to [`SocketSink::dial`], presents the same session
    /// with the resume flag (the key proven again on each), and reads the
    /// receiver's RESUME. Fails after an interrupt, once the receiver
    /// acknowledged the final checksum, or without a dial; a receiver that
    /// refuses the resume gives [`TransferError::ResumeRefused`]. A final
    /// phase cut before its acknowledgement resumes too: the rounds go on,
    /// and the state and the final checksum are sent again later.
    fn resume(&mut self) -> Result<ResumePoint, TransferError> {
        if self.interrupt.is_set() {
            return Err(TransferError::Interrupted {
                peer: self.peer.clone(),
            });
        }
        if self.finished {
            return Err(TransferError::Misuse {
                operation: "resume",
                state: "after the receiver acknowledged the final checksum",
            });
        }
        let Some(dial) = self.dial.as_mut() else {
            return Err(TransferError::Misuse {
                operation: "resume",
                state: "on a sink made by SocketSink::connect (no way to dial again)",
            });
        };
        let conns = (0..self.config.streams)
            .map(|_| dial())
            .collect::<io::Result<Vec<_>>>()
            .map_err(TransferError::io("connecting to the receiver again"))?;
        self.stop_workers(true);
        self.workers.clear();
        self.interrupt.forget();
        for c in &conns {
            self.interrupt.register(c)?;
        }
        let ready = handshake_all(conns, self.session, &self.layout, &self.config, true).and_then(
            |ready| {
                let timeout = self.config.handshake_timeout;
                let point = read_resume(&ready[0], &self.layout, timeout).map_err(|e| {
                    e.or_stalled("waiting for the RESUME of", || self.peer.clone(), timeout)
                })?;
                Ok((ready, point))
            },
        );
        let (ready, point) = ready.map_err(|e| match e {
            TransferError::PeerRejected { code, message } if code == error_code::RESUME => {
                TransferError::ResumeRefused {
                    peer: self.peer.clone(),
                    message,
                }
            }
            e => self.explain(e),
        })?;
        self.interrupt.forget();
        self.start_workers(ready)?;
        self.rounds = point.next_round;
        Ok(point)
    }
}

/// Handshakes every connection of session `session` at once (the receiver
/// may accept them in any order); `resume` marks a sender coming back.
fn handshake_all(
    conns: Vec<Connection>,
    session: u64,
    layout: &Layout,
    config: &SenderConfig,
    resume: bool,
) -> Result<Vec<Connection>, TransferError> {
    let count = conns.len() as u32;
    let results: Vec<Result<Connection, TransferError>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut conn)| {
                let hello = Hello {
                    session,
                    stream_index: i as u32,
                    stream_count: count,
                    nonce: auth::nonce(),
                    layout: layout.without_host(),
                    resume,
                };
                s.spawn(move || {
                    sender_handshake(
                        &mut conn,
                        &hello,
                        config.key.as_ref(),
                        config.handshake_timeout,
                    )
                    .map(|()| conn)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(TransferError::WorkerPanicked)))
            .collect()
    });
    results.into_iter().collect()
}

/// Reads the receiver's RESUME on `conn` (within `timeout`) and checks that
/// its block digests cover `layout`.
fn read_resume(
    conn: &Connection,
    layout: &Layout,
    timeout: Duration,
) -> Result<ResumePoint, TransferError> {
    conn.set_read_timeout(Some(timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    let mut r = FrameReader::new(conn);
    let mut p = Vec::new();
    let h = r.read_frame(&mut p)?;
    if h.kind == FrameKind::Error {
        let e: ErrorFrame = h.decode(&p)?;
        return Err(TransferError::PeerRejected {
            code: e.code,
            message: e.message.into_owned(),
        });
    }
    let resume: Resume = h.decode(&p)?;
    if !resume.covers(layout.total_pages()) {
        return Err(crate::error::ProtocolError::Malformed {
            offset: h.offset,
            kind: h.kind,
            reason: "block digests do not cover the layout",
        }
        .into());
    }
    conn.set_read_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    Ok(ResumePoint {
        next_round: resume.next_round,
        block_pages: resume.block_pages,
        block_digests: resume.block_digests,
    })
}

/// The error of a sink left without connections by a resume that failed.
fn no_connection() -> TransferError {
    TransferError::Io {
        what: "sending frames",
        source: io::Error::new(
            io::ErrorKind::NotConnected,
            "no connection: the last resume failed",
        ),
    }
}

/// The name of connection `i` of a transfer to `peer`, for messages.
fn conn_peer(i: usize, peer: &str) -> String {
    if i == 0 {
        peer.to_string()
    } else {
        format!("{peer} (stream {i})")
    }
}

impl Drop for SocketSink {
    fn drop(&mut self) {
        // Unless finished, cut the connections first: unblocks a writer stuck
        // on a peer that stopped reading; the receiver sees a truncated
        // stream and applies nothing more.
        self.stop_workers(!self.finished);
    }
}

/// A sender over sockets: a [`Transfer`] into a [`SocketSink`].
pub type Sender<S> = Transfer<S, SocketSink>;

impl<S: PageSource> Transfer<S, SocketSink> {
    /// Connects a sender: handshakes `conns` (one per stream) announcing
    /// `layout`, then reads pages from `source` as rounds are sent.
    pub fn connect(
        conns: Vec<Connection>,
        layout: Layout,
        source: S,
        config: &SenderConfig,
    ) -> Result<Sender<S>, TransferError> {
        Sender::over(
            || SocketSink::connect(conns, &layout, config),
            layout.clone(),
            source,
            config,
        )
    }

    /// Like [`Sender::connect`], opening the `config.streams` connections
    /// with `dial`, which it keeps: after the connections break (between
    /// rounds or inside one, before the state or the final checksum),
    /// [`Transfer::resume`] connects to the same transfer again. The
    /// receiver must run [`Receiver::run_resumable`](crate::Receiver::run_resumable).
    pub fn dial(
        dial: impl FnMut() -> io::Result<Connection> + Send + 'static,
        layout: Layout,
        source: S,
        config: &SenderConfig,
    ) -> Result<Sender<S>, TransferError> {
        Sender::over(
            || SocketSink::dial(dial, &layout, config),
            layout.clone(),
            source,
            config,
        )
    }

    /// A sender of `layout` from `source` into the sink `connect` makes
    /// (checked after the configuration).
    fn over(
        connect: impl FnOnce() -> Result<SocketSink, TransferError>,
        layout: Layout,
        source: S,
        config: &SenderConfig,
    ) -> Result<Sender<S>, TransferError> {
        if config.batch_pages == 0 {
            return Err(TransferError::Config {
                reason: "batch_pages must be at least 1",
            });
        }
        let sink = connect()?;
        let pool = config.streams * (config.queue_depth + 2) + 2;
        Transfer::with_pool(source, sink, layout, config.batch_pages, pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameWriter, Ping, Pong};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// A sink over `streams` socket pairs whose handshake is taken as done, and the
    /// receiver's end of each.
    fn sink_over_pairs(streams: usize) -> (SocketSink, Vec<Connection>) {
        sink_paced(streams, None)
    }

    /// As [`sink_over_pairs`], paced to `bandwidth_limit` bytes per second.
    fn sink_paced(streams: usize, bandwidth_limit: Option<u64>) -> (SocketSink, Vec<Connection>) {
        let (ours, theirs): (Vec<_>, Vec<_>) = (0..streams)
            .map(|_| {
                let (a, b) = UnixStream::pair().unwrap();
                (Connection::Unix(a), Connection::Unix(b))
            })
            .unzip();
        let config = SenderConfig {
            streams,
            io_timeout: Some(Duration::from_secs(30)),
            bandwidth_limit,
            ..SenderConfig::default()
        };
        let layout = Layout::single(4096, 0x10_0000, 64 * 4096).unwrap();
        let sink = SocketSink::start(ours, 1, &layout, &config).unwrap();
        (sink, theirs)
    }

    /// The receiver refuses on `conn`: an ERROR frame with `message`.
    fn refuse(conn: &Connection, message: &str) {
        FrameWriter::new(conn)
            .send(&ErrorFrame {
                code: error_code::DESTINATION,
                message: message.into(),
            })
            .unwrap();
    }

    /// Plays a receiver that answers every PING on `conn` until the connection ends.
    fn answer_pings(conn: Connection) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut r = FrameReader::new(&conn);
            let mut p = Vec::new();
            while let Ok(h) = r.read_frame(&mut p) {
                if h.kind == FrameKind::Ping {
                    let token = h.decode::<Ping>(&p).unwrap().token;
                    if FrameWriter::new(&conn).send(&Pong { token }).is_err() {
                        return;
                    }
                }
            }
        })
    }

    fn refused_with(e: &TransferError, text: &str) -> bool {
        matches!(e, TransferError::PeerRejected { message, .. } if message == text)
    }

    /// The defect the migration test saw in about 40 % of runs: the receiver's ERROR ends
    /// the PING between rounds (whose failure the driver only logs), and the next round
    /// reported "another stream failed" on a sink with one stream. Every later call must
    /// name the receiver's reason again.
    #[test]
    fn a_failure_met_between_rounds_is_reported_again_by_every_later_call() {
        let (mut sink, theirs) = sink_over_pairs(1);
        refuse(&theirs[0], "destination died");
        let err = sink.ping().unwrap_err();
        assert!(refused_with(&err, "destination died"), "{err:?}");
        for _ in 0..2 {
            let err = sink.begin_round(0).unwrap_err();
            assert!(refused_with(&err, "destination died"), "{err:?}");
        }
        let err = sink.end_round(0).unwrap_err();
        assert!(refused_with(&err, "destination died"), "{err:?}");
    }

    /// Stream 1 is refused first; stream 0's connection closes only afterwards (what a
    /// receiver that stops every stream does). The sink meets stream 0's break first, yet
    /// reports stream 1's refusal: the cause, not its consequence.
    #[test]
    fn the_stream_that_failed_first_is_the_one_reported() {
        let (mut sink, mut theirs) = sink_over_pairs(2);
        let second = theirs.pop().unwrap();
        let first = theirs.pop().unwrap();
        let pinger = answer_pings(first.try_clone().unwrap());
        refuse(&second, "stream 1 refused");
        let err = sink.ping().unwrap_err();
        assert!(refused_with(&err, "stream 1 refused"), "{err:?}");

        first.shutdown(Shutdown::Both).unwrap();
        pinger.join().unwrap();
        // Wait (bounded) until stream 0's watcher saw the end of its connection.
        let until = Instant::now() + Duration::from_secs(30);
        while !sink.workers[0].broken.load(Ordering::SeqCst) {
            assert!(Instant::now() < until, "stream 0's end was never seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..2 {
            let err = sink.begin_round(1).unwrap_err();
            assert!(refused_with(&err, "stream 1 refused"), "{err:?}");
            assert!(!err.is_connection_break(), "{err:?}");
        }
    }

    /// Reads and drops everything the sender writes on `conn` until the connection ends, so
    /// that no write waits for room in the socket: only the rate limiter holds the writer.
    /// The receiver hears once `bytes` came.
    fn drain(conn: Connection, bytes: usize) -> (JoinHandle<()>, Receiver<()>) {
        let (tx, rx) = bounded(1);
        let t = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0;
            while let Ok(n @ 1..) = io::Read::read(&mut &conn, &mut buf) {
                got += n;
                if got >= bytes {
                    let _ = tx.try_send(());
                }
            }
        });
        (t, rx)
    }

    /// Sends a round on `sink`, paced at 1 KiB/s: a frame of 128 KiB, which the bucket (256
    /// KiB) lets through, then 256 KiB frames, the first of which holds the writer for
    /// minutes. `sent` hears once the first frame is in the socket (so the writer waits, or
    /// is about to); then `end` says what to do with the sink.
    fn paced_round(
        mut sink: SocketSink,
        end: impl FnOnce(SocketSink) -> Result<u64, TransferError> + Send + 'static,
    ) -> Receiver<Result<u64, TransferError>> {
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let pages = vec![0x5au8; 64 * 4096];
            let hashes: Vec<PageHash> = pages.chunks(4096).map(crate::digest::page_hash).collect();
            let round = (|| {
                sink.begin_round(0)?;
                let half = PageBuf::from_vec(pages[..32 * 4096].to_vec());
                sink.send_pages(0, half, &hashes[..32])?;
                for _ in 0..2 {
                    sink.send_pages(0, PageBuf::from_vec(pages.clone()), &hashes)?;
                }
                Ok(())
            })();
            let _ = tx.send(round.and_then(|()| end(sink)));
        });
        rx
    }

    /// How long a test waits for a writer the rate limiter holds for minutes to return after
    /// what should end its wait: far past any scheduling delay, far below that wait.
    const LIVENESS: Duration = Duration::from_secs(30);

    /// The defect: a writer waiting on the rate limiter did not see the interrupt (which shuts
    /// the sockets down) until its wait was over, seconds at `--bandwidth 64K`, so a final
    /// round past its bound kept the workload paused that long. Now the round returns the
    /// interrupt's error.
    #[test]
    fn an_interrupt_ends_a_writer_waiting_on_the_rate_limit() {
        let (sink, mut theirs) = sink_paced(1, Some(1024));
        let (drained, first) = drain(theirs.pop().unwrap(), 32 * 4096);
        let interrupt = sink.interrupter().unwrap();
        let round = paced_round(sink, |mut sink| sink.end_round(0));
        first
            .recv_timeout(LIVENESS)
            .expect("the first frame never came");
        interrupt();
        let result = round
            .recv_timeout(LIVENESS)
            .expect("the paced writer never returned");
        assert!(
            matches!(result, Err(TransferError::Interrupted { .. })),
            "{result:?}"
        );
        drained.join().unwrap();
    }

    /// A sink dropped while its writer waits on the rate limiter (its connection broke, the
    /// caller gives up) stops that writer at once, not when the wait is over.
    #[test]
    fn a_sink_dropped_while_paced_stops_its_writer() {
        let (sink, mut theirs) = sink_paced(1, Some(1024));
        let (drained, first) = drain(theirs.pop().unwrap(), 32 * 4096);
        let limiter = sink.workers[0].limiter.clone().unwrap();
        let (go, wait) = bounded::<()>(1);
        let dropped = paced_round(sink, move |sink| {
            let _ = wait.recv();
            drop(sink);
            Ok(0)
        });
        first
            .recv_timeout(LIVENESS)
            .expect("the first frame never came");
        go.send(()).unwrap();
        let result = dropped.recv_timeout(LIVENESS);
        assert!(
            result.is_ok(),
            "dropping the sink waited for the paced writer"
        );
        assert!(limiter.consume(1).is_err(), "the limiter was cut");
        drained.join().unwrap();
    }
}
