//! [`SocketSink`]: the [`Sink`] that spreads a transfer's frames over its
//! connections' writers, and [`Sender`], a transfer into it.

use std::net::Shutdown;
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender as Chan, bounded};

use super::conn::{Connection, InterruptState};
use super::handshake::sender_handshake;
use super::writer::{Cmd, RateLimiter, Reply, StreamWriter, watch_peer};
use crate::auth;
use crate::buffer::PageBuf;
use crate::codec::Compressor;
use crate::digest::{FinalCheck, PageFold};
use crate::engine::{SenderConfig, Transfer};
use crate::error::TransferError;
use crate::layout::Layout;
use crate::live::LivePages;
use crate::protocol::{FrameWriter, Hello};
use crate::sink::{Interrupt, Sink};
use crate::source::PageSource;

struct Worker {
    cmds: Option<Chan<Cmd>>,
    replies: Receiver<Reply>,
    handle: Option<JoinHandle<Result<(), TransferError>>>,
    watcher: Option<JoinHandle<()>>,
    conn: Connection,
}

impl Worker {
    /// The worker's own error, after it stopped.
    fn failure(&mut self) -> TransferError {
        self.cmds = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Ok(Ok(()))) | None => TransferError::Aborted,
            Some(Err(_)) => TransferError::WorkerPanicked,
        }
    }

    fn send(&mut self, cmd: Cmd) -> Result<(), TransferError> {
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
pub struct SocketSink {
    workers: Vec<Worker>,
    next: usize,
    rounds: u64,
    finished: bool,
    interrupt: Arc<InterruptState>,
    peer: String,
    io_timeout: Option<Duration>,
    layout_bytes: u64,
    checksum: u32,
    /// PINGs sent (the last one's token).
    pings: u64,
}

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
        let count = conns.len() as u32;
        let mut workers = Vec::with_capacity(conns.len());
        // Handshake every connection at once: the receiver may accept them in
        // any order.
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
        let ready = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let fold = PageFold::new(layout.page_size());
        let interrupt = Arc::new(InterruptState::default());
        let peer = ready.first().map(Connection::peer).unwrap_or_default();
        for (i, conn) in ready.into_iter().enumerate() {
            conn.set_write_timeout(config.io_timeout)
                .map_err(TransferError::io("setting a socket timeout"))?;
            interrupt.register(&conn)?;
            let (cmd_tx, cmd_rx) = bounded(config.queue_depth.max(1));
            let (reply_tx, reply_rx) = bounded(1);
            let (event_tx, event_rx) = bounded(1);
            let watch = conn
                .try_clone()
                .map_err(TransferError::io("cloning a socket"))?;
            let keep = conn
                .try_clone()
                .map_err(TransferError::io("cloning a socket"))?;
            let watcher = std::thread::Builder::new()
                .name(format!("precopy-watch-{i}"))
                .spawn(move || watch_peer(watch, event_tx))
                .map_err(TransferError::io("starting a watcher thread"))?;
            let writer = StreamWriter {
                out: FrameWriter::new(conn),
                compressor: Compressor::new(config.compression),
                limiter: config
                    .bandwidth_limit
                    .map(|bps| RateLimiter::new(bps as f64 / f64::from(count))),
                pages: 0,
                zero_pages: 0,
                round_start: 0,
                page_size: layout.page_size(),
                layout: layout.without_host(),
                fold: fold.clone(),
                events: event_rx,
                peer: conn_peer(i, &peer),
                io_timeout: config.io_timeout,
                interrupt: interrupt.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("precopy-send-{i}"))
                .spawn(move || writer.run(cmd_rx, reply_tx))
                .map_err(TransferError::io("starting a writer thread"))?;
            workers.push(Worker {
                cmds: Some(cmd_tx),
                replies: reply_rx,
                handle: Some(handle),
                watcher: Some(watcher),
                conn: keep,
            });
        }
        Ok(SocketSink {
            workers,
            next: 0,
            rounds: 0,
            finished: false,
            interrupt,
            peer,
            io_timeout: config.io_timeout,
            layout_bytes: layout.total_len(),
            checksum: 0,
            pings: 0,
        })
    }

    /// The error to return for `e`: [`TransferError::Interrupted`] once the
    /// sink was interrupted (whatever the broken socket said), else `e`.
    fn explain(&self, e: TransferError) -> TransferError {
        if self.interrupt.is_set() {
            return TransferError::Interrupted {
                peer: self.peer.clone(),
            };
        }
        e
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

    fn next_worker(&mut self) -> &mut Worker {
        let i = self.next;
        self.next = (self.next + 1) % self.workers.len();
        &mut self.workers[i]
    }
}

impl Sink for SocketSink {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.each(|w| w.send(Cmd::Begin(round)))
    }

    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        crcs: &[u32],
    ) -> Result<(), TransferError> {
        let r = self
            .next_worker()
            .send(Cmd::Pages(offset, pages, crcs.to_vec()));
        r.map_err(|e| self.explain(e))
    }

    /// Sends lent pages from memory in live frames (see [`crate::live`]).
    fn send_live_pages(
        &mut self,
        offset: u64,
        pages: LivePages,
        crcs: &[u32],
    ) -> Result<(), TransferError> {
        self.next_worker()
            .send(Cmd::Live(offset, pages, crcs.to_vec()))
    }

    /// Sends the state blob on the first connection, ahead of its FINISH.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        let r = self.workers[0].send(Cmd::State(state.to_vec()));
        r.map_err(|e| self.explain(e))
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        let r = self.next_worker().send(Cmd::Zero(range));
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
        self.rounds = round + 1;
        Ok(bytes)
    }

    fn finish(&mut self, memory_checksum: u32, check: FinalCheck) -> Result<(), TransferError> {
        self.finish_uncommitted(memory_checksum, check)?;
        self.commit()
    }

    fn finish_uncommitted(
        &mut self,
        memory_checksum: u32,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
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

    fn peer(&self) -> Option<String> {
        Some(self.peer.clone())
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
        for w in &mut self.workers {
            w.cmds = None;
            if !self.finished {
                // Unblocks a writer stuck on a peer that stopped reading; the
                // receiver sees a truncated stream and applies nothing more.
                let _ = w.conn.shutdown(Shutdown::Both);
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
        if config.batch_pages == 0 {
            return Err(TransferError::Config {
                reason: "batch_pages must be at least 1",
            });
        }
        let sink = SocketSink::connect(conns, &layout, config)?;
        let pool = config.streams * (config.queue_depth + 2) + 2;
        Transfer::with_pool(source, sink, layout, config.batch_pages, pool)
    }
}
