//! The receiving end: handshake, authentication, and the per-connection state
//! machine below, applying frames to a [`Sink`].
//!
//! The receiver owns every check between bytes arriving and a sink seeing a
//! page: checksum, layout, page size, round order, counts, and the
//! cross-connection round barrier. It must never hand a sink anything from a
//! frame it has not fully verified, nor anything after the first fault.
//! Frames are decoded by their types in [`crate::protocol`] (the exchange is
//! drawn there); this module decides which it accepts when.
//!
//! # The state machine (per connection; `State` in this module)
//!
//! ```text
//!  AwaitPreamble ─magic+version ok─► AwaitHello ─HELLO ok─► AwaitAuth ─AUTH ok, admitted─► Idle(next = 0)
//!  (admitted: `Admission`, one lock for all handshakes; not admitted: ERROR, BUSY for another sender)
//!
//!  Idle(next) ──ROUND_BEGIN(next)──► [barrier] ─► InRound(next)
//!  InRound(r) ──PAGES/ZERO in layout──► InRound(r)
//!  InRound(r) ──ROUND_END(r, counts match)──► [barrier] ─► Idle(r + 1)
//!  Idle(n)    ──STATE(blob CRC ok, connection 0, first)──► Idle(n), sink holds the state
//!  Idle(n)    ──PING(token)──► Idle(n), PONG(token) sent on that connection
//!  Idle(n)    ──REGION(region fits after the layout)──► [barrier: the last
//!                 connection to arrive hands it to the sink] ─► Idle(n), layout grown
//!                 (every connection must have sent the same region)
//!  Idle(n)    ──FINISH(rounds = n)──► Finished ─ all connections finished,
//!                                     checksum of destination == FINISH's ─► DONE sent
//!  DONE sent  ──COMMIT on every connection──► success
//!  any other frame, bad checksum, EOF, bad layout/page size/version,
//!  failed key check ──► Failed: ERROR sent, nothing more applied
//! ```
//!
//! Run with [`Receiver::run_resumable`], connections that break (end of
//! stream, reset) before COMMIT lead to `Waiting` instead of `Failed`: what
//! was applied stays (a STATE or FINISH already received is forgotten), and the same sender may come back
//! within [`ReceiverConfig::resume_wait`] (drawn in the protocol module,
//! "Resuming"); then every connection starts again at `Idle(next)`.
//!
//! The handshake states are the steps of `handshake_steps`; `Idle` and
//! `InRound` are the `State` values of `receive_stream`; the barrier is
//! `RoundBarrier`.

use std::io::{BufReader, ErrorKind, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::auth::{self, Key, Role};
use crate::buffer::BufferPool;
use crate::codec::{Codec, Decompressor};
use crate::digest::{FinalCheck, PageHash, page_hash};
use crate::error::{ProtocolError, ResumeRefusal, TransferError};
use crate::layout::Layout;
use crate::live::ChangedPages;
use crate::net::{Connection, Listener};
use crate::protocol::{
    Auth, Challenge, Commit, Done, ErrorFrame, Finish, FrameKind, FrameReader, FrameWriter,
    HEADER_LEN, Header, Hello, Mapped, NONCE_LEN, Pages, Ping, Pong, RawHeader, Region, Resume,
    RoundBegin, RoundEnd, State as StateFrame, Welcome, Zero, error_code, resume_block_pages,
    verify_frame_pages, verify_hashed_list,
};
use crate::sink::Sink;

mod raise;
use raise::FinalRaise;
pub use raise::FinalRaiseReport;

/// How a receiver accepts a transfer.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Shared key. Required on every TCP listener, loopback included (any
    /// local user can connect to a loopback port); a Unix socket made by
    /// [`Listener::bind_unix`] is reachable by this user only and may go
    /// without. When set, every sender must prove it holds the key.
    pub key: Option<Key>,
    /// The page size this end expects (`None`: accept the sender's, as long
    /// as the layout is valid).
    pub page_size: Option<u64>,
    /// Most parallel connections a sender may use.
    pub max_streams: u32,
    /// Largest layout (bytes) a sender may announce; larger is refused in
    /// the handshake, before the caller sizes a destination from it.
    pub max_memory: u64,
    /// Time allowed for each connection's handshake.
    pub handshake_timeout: Duration,
    /// The longest the sender may stay silent once the transfer runs (no
    /// byte on any connection), and the longest it may take to COMMIT after
    /// DONE: past it the receiver fails with [`TransferError::Stalled`]
    /// instead of waiting for a stopped or vanished sender. `None`: wait
    /// forever. A sender making a [`FinalCheck::Full`] re-reads all its
    /// memory before FINISH in silence (about 0.5 s per GiB): allow for it.
    pub io_timeout: Option<Duration>,
    /// With [`Receiver::run_resumable`]: how long to wait for the sender to
    /// come back after its connections broke (plus at most one handshake
    /// timeout for a connection accepted just before it ends); past it the
    /// receiver fails with [`TransferError::ResumeTimedOut`].
    pub resume_wait: Duration,
    /// The `SCHED_FIFO` priority (1-99) of the receiver's threads from the final round's
    /// ROUND_BEGIN (the sender paused its workload: downtime runs) until the transfer's
    /// connections are done with, committed, failed or cut; each thread is put back to its own
    /// policy before it exits or the run returns (see [`FinalRaiseReport`]). Where the process
    /// may not (`CAP_SYS_NICE`, `RLIMIT_RTPRIO`), the threads keep their own and a warning says
    /// so. `None`: never raise.
    pub final_priority: Option<u8>,
}

/// Default [`ReceiverConfig::io_timeout`].
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default [`ReceiverConfig::resume_wait`]: covers a sender's default
/// reconnect attempts and backoff (`precopy-migrate`'s `ReconnectConfig`:
/// 3 attempts, 0.2 s doubling to 2 s, each connect and handshake bounded by
/// 10 s) with room to spare.
pub const DEFAULT_RESUME_WAIT: Duration = Duration::from_secs(60);

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            key: None,
            page_size: None,
            max_streams: 64,
            max_memory: 1 << 40,
            handshake_timeout: crate::engine::DEFAULT_IO_TIMEOUT,
            io_timeout: Some(DEFAULT_RECEIVE_TIMEOUT),
            resume_wait: DEFAULT_RESUME_WAIT,
            final_priority: Some(1),
        }
    }
}

/// What a completed transfer delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReceiveReport {
    /// Rounds received.
    pub rounds: u64,
    /// Pages applied with contents in completed rounds (a page sent twice
    /// counts twice; pages of a round cut by a broken connection stay
    /// applied but are not counted).
    pub pages: u64,
    /// Pages applied as zeros (counted as `pages`).
    pub zero_pages: u64,
    /// Times the sender resumed after its connections broke
    /// ([`Receiver::run_resumable`]).
    pub resumes: u32,
    /// Connections refused because they failed the handshake (garbage, no or a wrong key,
    /// another sender's, told BUSY), while accepting, while running (with a watched
    /// listener) and while waiting for a resume; each counted before it was told.
    pub refused: u64,
    /// Bytes read from the connections after the handshake (after the last
    /// resume, if any: connections cut by a break are not counted).
    pub bytes: u64,
    /// Connections used.
    pub streams: u32,
    /// The memory digest, checked against the destination.
    pub checksum: u64,
    /// How the sender asked it to be checked.
    pub check: FinalCheck,
    /// Pages that arrived torn in a live frame (changed while the sender's
    /// kernel read them; see [`crate::live`]), every one of them received
    /// again intact before FINISH was accepted.
    pub changed_while_sent: u64,
    /// Bytes of the state blob handed to the sink before acknowledging
    /// (`None`: the sender sent no state).
    pub state_bytes: Option<u64>,
    /// From the end of the handshake to success.
    pub duration: Duration,
    /// What the final phase did with the receiver's threads' priority
    /// ([`ReceiverConfig::final_priority`]; `None`: not asked, or no round was marked final).
    pub final_priority: Option<FinalRaiseReport>,
}

/// An accepted, authenticated transfer, ready to [`run`](Receiver::run).
#[derive(Debug)]
pub struct Receiver {
    conns: Vec<Connection>,
    hello: Hello,
    config: ReceiverConfig,
    door: Door,
}

/// Sends an ERROR frame, best effort: the peer may already be gone.
fn send_error(conn: &Connection, code: u32, message: &str) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let mut w = FrameWriter::new(conn);
    let _ = w.send(&ErrorFrame {
        code,
        message: message.into(),
    });
}

fn code_for(e: &TransferError) -> u32 {
    match e {
        TransferError::WrongKey { .. }
        | TransferError::NoKey { .. }
        | TransferError::KeyRequired { .. } => error_code::AUTH,
        TransferError::Protocol(
            ProtocolError::UnknownVersion { .. }
            | ProtocolError::OldVersion { .. }
            | ProtocolError::WrongPageSize { .. },
        ) => error_code::INCOMPATIBLE,
        TransferError::ChecksumMismatch { .. } | TransferError::ChangedWhileSent { .. } => {
            error_code::CHECKSUM
        }
        TransferError::Protocol(ProtocolError::ResumeRefused { .. }) => error_code::RESUME,
        TransferError::Busy => error_code::BUSY,
        TransferError::Protocol(_) => error_code::PROTOCOL,
        _ => error_code::DESTINATION,
    }
}

/// Which connections a receiver lets in. Each connection's handshake decides under the lock,
/// once the key is proven and before WELCOME: a connection that is not let in is never
/// welcomed, and the decision holds for handshakes that began in an earlier phase too.
#[derive(Debug, Clone)]
enum Admission {
    /// [`Receiver::accept`]: the first sender to prove the key, then the rest of its
    /// connections (same session, layout and stream count), one per stream index; anyone
    /// else is busy ([`TransferError::Busy`]).
    Accepting {
        first: Option<Hello>,
        /// The stream indexes let in so far.
        taken: Vec<bool>,
    },
    /// A transfer runs: anyone who proves the key is told the receiver is busy.
    Busy,
    /// A connection of the sender of this HELLO's session, resuming.
    Resuming(Hello),
}

impl Admission {
    fn accepting() -> Admission {
        Admission::Accepting {
            first: None,
            taken: Vec::new(),
        }
    }

    /// Lets the connection that sent `hello` (key proven) in, or says why not.
    fn admit(&mut self, hello: &Hello) -> Result<(), TransferError> {
        let index = hello.stream_index as usize;
        let refused = |reason| ProtocolError::ResumeRefused {
            index: hello.stream_index,
            reason,
        };
        match self {
            Admission::Busy => Err(TransferError::Busy),
            Admission::Accepting { .. } if hello.resume => {
                Err(refused(ResumeRefusal::NoSession).into())
            }
            Admission::Accepting { first, taken } => match first {
                None => {
                    *taken = vec![false; hello.stream_count as usize];
                    taken[index] = true;
                    *first = Some(hello.clone());
                    Ok(())
                }
                Some(f) if !same_transfer(f, hello) => Err(TransferError::Busy),
                Some(_) if taken[index] => Err(ProtocolError::StreamMismatch {
                    index: hello.stream_index,
                    reason: "stream index used twice",
                }
                .into()),
                Some(_) => {
                    taken[index] = true;
                    Ok(())
                }
            },
            Admission::Resuming(_) if !hello.resume => {
                Err(refused(ResumeRefusal::SessionWaiting).into())
            }
            Admission::Resuming(f) if f.session != hello.session => {
                Err(refused(ResumeRefusal::UnknownSession).into())
            }
            Admission::Resuming(f) if f.layout != hello.layout => {
                Err(refused(ResumeRefusal::DifferentLayout).into())
            }
            Admission::Resuming(f) if f.stream_count != hello.stream_count => {
                Err(refused(ResumeRefusal::DifferentStreams).into())
            }
            Admission::Resuming(_) => Ok(()),
        }
    }

    /// Takes back what [`Admission::admit`] gave a connection whose handshake then failed.
    fn release(&mut self, hello: &Hello) {
        if let Admission::Accepting {
            first: Some(f),
            taken,
        } = self
            && same_transfer(f, hello)
        {
            taken[hello.stream_index as usize] = false;
            if !taken.contains(&true) {
                *self = Admission::accepting();
            }
        }
    }
}

/// Whether two HELLOs are of the same transfer's connections.
fn same_transfer(a: &Hello, b: &Hello) -> bool {
    a.session == b.session && a.layout == b.layout && a.stream_count == b.stream_count
}

/// What every handshake on a listener shares: which connections get in, and the count of
/// those refused.
#[derive(Debug)]
struct Gate {
    admission: Mutex<Admission>,
    /// Connections refused; each is counted before it is told why.
    refused: AtomicU64,
    /// The receiver is done with its listener: handshakes still running are cut off, not
    /// refused.
    closing: AtomicBool,
}

impl Gate {
    fn new(admission: Admission) -> Gate {
        Gate {
            admission: Mutex::new(admission),
            refused: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    /// Refuses `conn` (from `peer`) for `why`: counts it, logs it (each of the first ones,
    /// then every hundredth), then tells the peer (an ERROR with `code`). A receiver that is
    /// closing its listener neither counts nor tells.
    fn refuse(&self, conn: &Connection, peer: &str, code: u32, why: &TransferError) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let refused = self.refused.fetch_add(1, Ordering::SeqCst) + 1;
        if refused <= LOGGED_REFUSALS || refused.is_multiple_of(100) {
            tracing::warn!(
                peer,
                refused,
                error = %precopy_sys::error_chain(why),
                "refused a connection; still listening"
            );
        }
        send_error(conn, code, &precopy_sys::error_chain(why));
    }
}

/// The receiver's half of the handshake on one connection, let in or refused by `gate`.
fn receiver_handshake(
    conn: &Connection,
    config: &ReceiverConfig,
    gate: &Gate,
) -> Result<Hello, TransferError> {
    let result = handshake_steps(conn, config, gate).map_err(|e| {
        e.or_stalled(
            "the handshake with",
            || conn.peer(),
            config.handshake_timeout,
        )
    });
    if let Err(e) = &result {
        gate.refuse(conn, &conn.peer(), code_for(e), e);
        let _ = conn.shutdown(Shutdown::Both);
    }
    result
}

fn handshake_steps(
    conn: &Connection,
    config: &ReceiverConfig,
    gate: &Gate,
) -> Result<Hello, TransferError> {
    if config.key.is_none() && matches!(conn, Connection::Tcp(_)) {
        return Err(TransferError::KeyRequired { addr: conn.peer() });
    }
    conn.set_read_timeout(Some(config.handshake_timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(Some(config.handshake_timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    let mut w = FrameWriter::new(conn);
    w.write_preamble()
        .map_err(TransferError::io("sending the handshake"))?;
    let mut r = FrameReader::new(conn);
    r.read_preamble()?;
    let mut p = Vec::new();
    let h = r.read_frame(&mut p)?;
    let hello: Hello = h.decode(&p)?;
    if let Some(ours) = config.page_size
        && ours != hello.layout.page_size()
    {
        return Err(ProtocolError::WrongPageSize {
            ours,
            theirs: hello.layout.page_size(),
        }
        .into());
    }
    if hello.layout.total_len() > config.max_memory {
        return Err(ProtocolError::Malformed {
            offset: h.offset,
            kind: FrameKind::Hello,
            reason: "layout larger than this receiver accepts (max_memory)",
        }
        .into());
    }
    if hello.stream_count > config.max_streams {
        return Err(ProtocolError::StreamMismatch {
            index: hello.stream_index,
            reason: "more streams than this receiver allows",
        }
        .into());
    }
    let nonce = auth::nonce();
    w.send(&Challenge {
        key_required: config.key.is_some(),
        nonce,
    })
    .map_err(TransferError::io("sending the handshake"))?;
    let h = r.read_frame(&mut p)?;
    let mac = h.decode::<Auth>(&p)?.mac;
    if let Some(k) = &config.key {
        let Some(m) = mac else {
            return Err(TransferError::NoKey {
                sender: conn.peer(),
            });
        };
        if !auth::proof_matches(
            k,
            Role::Sender,
            &hello.nonce,
            &nonce,
            hello.session,
            hello.stream_index,
            &m,
        ) {
            return Err(TransferError::WrongKey {
                sender: conn.peer(),
            });
        }
    }
    // Only a sender that proved the key learns whether it gets in, and why not.
    lock(&gate.admission).admit(&hello)?;
    let welcomed = welcome(conn, config, &hello, &nonce, &mut w);
    if welcomed.is_err() {
        lock(&gate.admission).release(&hello);
    }
    welcomed.map(|()| hello)
}

/// The handshake's last step: WELCOME, with the receiver's proof of the key.
fn welcome(
    conn: &Connection,
    config: &ReceiverConfig,
    hello: &Hello,
    nonce: &[u8; NONCE_LEN],
    w: &mut FrameWriter<&Connection>,
) -> Result<(), TransferError> {
    let mac = config.key.as_ref().map(|k| {
        auth::proof(
            k,
            Role::Receiver,
            &hello.nonce,
            nonce,
            hello.session,
            hello.stream_index,
        )
    });
    w.send(&Welcome { mac })
        .map_err(TransferError::io("sending the handshake"))?;
    conn.set_read_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))
}

impl Receiver {
    /// Accepts a transfer on `listener`: the first connection that completes the handshake
    /// (proves the key) says how many connections the sender uses, and the rest of that
    /// sender's are accepted too. Fails before accepting anything if the listener is TCP
    /// (loopback included) and no key is configured.
    ///
    /// **A connection that fails the handshake does not end it**: garbage, a wrong or missing
    /// key, an incompatible HELLO, a stream index of the sender's used twice, or one that
    /// stays silent past the handshake timeout is told why (an ERROR), closed, logged and
    /// counted ([`Receiver::refused`], [`ReceiveReport::refused`]), and the receiver keeps
    /// listening. **Another sender** that proves the key is told the receiver is busy (an
    /// ERROR with code `BUSY`, before any WELCOME), counted the same way: one that connects
    /// while this sender's connections are gathered, and one whose handshake is still running
    /// when they are all in (that handshake goes on while the transfer runs, its refusal
    /// counted in the transfer's report; it is cut off only when the transfer ends).
    /// Handshakes run side by side (at most [`MAX_HANDSHAKES`] at once; more connections wait
    /// in the listen backlog until one ends), so a silent connection does not hold up the
    /// sender for longer than the handshake timeout; past [`REFUSALS_PER_SECOND`] refusals the
    /// receiver waits out the second, so a flood cannot spin a CPU. Only a fault of the
    /// listener ends it. Nothing is applied from any connection before then.
    pub fn accept(listener: &Listener, config: &ReceiverConfig) -> Result<Receiver, TransferError> {
        if config.key.is_none() && matches!(listener, Listener::Tcp(_)) {
            return Err(TransferError::KeyRequired {
                addr: listener.address(),
            });
        }
        let mut door = Door::new(config, Admission::accepting());
        let mut first: Option<Hello> = None;
        let mut conns: Vec<Option<Connection>> = Vec::new();
        // The gate lets in only the first sender's connections, one per stream index.
        gather(listener, Until::Forever, &mut door, |conn, hello| {
            let f = first.get_or_insert_with(|| {
                conns = (0..hello.stream_count).map(|_| None).collect();
                hello.clone()
            });
            let index = hello.stream_index as usize;
            if !same_transfer(f, &hello) || conns.get(index).is_none_or(Option::is_some) {
                // Unreachable past the gate; refused rather than trusted.
                let e = ProtocolError::StreamMismatch {
                    index: hello.stream_index,
                    reason: "not one of the accepted sender's connections",
                };
                return Ok(Take::Refused(conn, error_code::PROTOCOL, e.into()));
            }
            conns[index] = Some(conn);
            Ok(if conns.iter().all(Option::is_some) {
                Take::Done
            } else {
                Take::Keep
            })
        })?;
        let hello = first.ok_or(TransferError::Aborted)?;
        // The gate already turns everyone else away; said once more for handshakes to come.
        door.admit(Admission::Busy);
        Ok(Receiver {
            conns: conns.into_iter().flatten().collect(),
            hello,
            config: config.clone(),
            door,
        })
    }

    /// Connections refused so far (see [`Receiver::accept`]); handshakes that began during
    /// `accept` may add to it until the transfer ends.
    pub fn refused(&self) -> u64 {
        self.door.refused()
    }

    /// Runs the handshake on an already connected single-stream transfer.
    pub fn accept_connection(
        conn: Connection,
        config: &ReceiverConfig,
    ) -> Result<Receiver, TransferError> {
        let door = Door::new(config, Admission::accepting());
        let hello = receiver_handshake(&conn, config, &door.gate)?;
        if hello.stream_count != 1 {
            let e = ProtocolError::StreamMismatch {
                index: hello.stream_index,
                reason: "sender uses several streams; use Receiver::accept",
            };
            send_error(&conn, error_code::PROTOCOL, &e.to_string());
            return Err(e.into());
        }
        door.admit(Admission::Busy);
        Ok(Receiver {
            conns: vec![conn],
            hello,
            config: config.clone(),
            door,
        })
    }

    /// The layout the sender announced (size the destination from it).
    pub fn layout(&self) -> &Layout {
        &self.hello.layout
    }

    /// Number of connections.
    pub fn streams(&self) -> usize {
        self.conns.len()
    }

    /// Receives every round into `sink`, then checks the sender's memory
    /// checksum against it (via [`Sink::finish_uncommitted`]), acknowledges
    /// (DONE), waits for the sender's COMMIT and then commits `sink`
    /// ([`Sink::commit`]: an image is published at its path only then). On
    /// any fault, tells the sender why, stops applying and returns the first
    /// fault's error.
    ///
    /// **Only `Ok` means the copy is complete.** A sender that gives up
    /// after DONE (its final round ran past its bound and it resumed the
    /// source) never commits: then this returns
    /// [`TransferError::NotCommitted`] even though `sink` was finished.
    pub fn run<K: Sink + Send + ?Sized>(
        self,
        sink: &mut K,
    ) -> Result<ReceiveReport, TransferError> {
        self.run_on(sink, None, false)
    }

    /// As [`Receiver::run`], while `listener` (the one this transfer was accepted on) is
    /// watched: any other sender that connects meanwhile gets the handshake as usual and,
    /// once it proved the key, an ERROR with code `BUSY` (it reports
    /// [`TransferError::ReceiverBusy`]); each such refusal is logged (`tracing`, warn) and
    /// counted in [`ReceiveReport::refused`]. Without the watch, such a sender waits in the
    /// listen backlog until this receiver closes the listener, and then reads a reset (one
    /// whose handshake began during [`Receiver::accept`] is answered either way).
    pub fn run_refusing_others<K: Sink + Send + ?Sized>(
        self,
        listener: &Listener,
        sink: &mut K,
    ) -> Result<ReceiveReport, TransferError> {
        self.run_on(sink, Some(listener), false)
    }

    /// As [`Receiver::run`], and when the connections break (end of stream,
    /// reset, broken pipe; not a fault in a frame, not a sender silent past
    /// the I/O timeout) before COMMIT arrived, keeps what `sink` applied
    /// (forgetting a state blob and finish of a final phase that was cut:
    /// [`Sink::reopen`]) and waits up to [`ReceiverConfig::resume_wait`] on
    /// `listener` for the same sender to come back
    /// ([`Transfer::resume`](crate::Transfer::resume)): same session id,
    /// layout and stream count, the key proven again on every connection. A
    /// connection that is not that sender is refused (an ERROR naming why)
    /// and the wait goes on. The sender then sends only the blocks of pages
    /// whose digests differ, with the round that failed (see the protocol's
    /// "Resuming"); the final digest check proves the result as usual.
    ///
    /// A path that goes silent (no reset, no end of stream) shows no break
    /// here; the sender notices it (its I/O timeout) and comes back. So while
    /// the connections run, the listener is watched too: the same sender
    /// coming back with a resume HELLO (key proven) ends the current
    /// connections as a break. Anyone else connecting meanwhile is refused
    /// and counted ([`ReceiveReport::refused`]).
    ///
    /// Needs a sink that can tell what it holds ([`Sink::resume_digests`]:
    /// [`MemorySink`](crate::MemorySink)); with one that cannot, a broken
    /// connection fails as in [`Receiver::run`]. Fails with
    /// [`TransferError::ResumeTimedOut`] if the sender does not come back in
    /// time, and like [`Receiver::run`] otherwise.
    pub fn run_resumable<K: Sink + Send + ?Sized>(
        self,
        listener: &Listener,
        sink: &mut K,
    ) -> Result<ReceiveReport, TransferError> {
        self.run_on(sink, Some(listener), true)
    }

    /// Runs the transfer; `listener` is watched while it runs: for the same sender coming
    /// back when `resumable`, else to tell anyone else this receiver is busy.
    fn run_on<K: Sink + Send + ?Sized>(
        self,
        sink: &mut K,
        listener: Option<&Listener>,
        resumable: bool,
    ) -> Result<ReceiveReport, TransferError> {
        let start = Instant::now();
        let Receiver {
            mut conns,
            hello,
            config,
            mut door,
        } = self;
        let resumable = resumable && listener.is_some();
        // Pages applied torn stay torn across a resume until a good copy arrives.
        let changed = Mutex::new(ChangedPages::default());
        let mut next = 0;
        let mut resumes = 0u32;
        let mut before = Counted::default();
        // Grows with every REGION.
        let layout = Mutex::new(hello.layout.clone());
        loop {
            let leg = Leg {
                conns: &conns,
                layout: &layout,
                config: &config,
                changed: &changed,
                next,
                resumable,
            };
            // While the leg runs, the door keeps watching the listener: the same sender
            // coming back (its old path went silent, so this end saw no break) ends the leg
            // as a break. After a break the same watch is the wait for the resume, so a
            // connection already in its handshake is not lost.
            let watch = Watch::default();
            let (end, resumed) = std::thread::scope(|s| {
                let (door, watch, cfg, first, old) = (&mut door, &watch, &config, &hello, &conns);
                let watching = listener.map(|l| {
                    s.spawn(move || {
                        if resumable {
                            watch_for_resume(l, first, old, watch, door)
                        } else {
                            refuse_while_busy(l, watch, door);
                            Vec::new()
                        }
                    })
                });
                let end = leg.run(&mut *sink);
                let digests = match &end {
                    // A sink that cannot tell what it holds makes a break final
                    // (`resume_digests`).
                    LegEnd::Broken { error, counted } if resumable => {
                        // A final phase cut short: the sender sends state and FINISH again.
                        sink.reopen();
                        let block = resume_block_pages(first.layout.total_pages());
                        let digests = sink.resume_digests(block).map(|d| (block, d));
                        if digests.is_some() {
                            tracing::warn!(
                                error = %precopy_sys::error_chain(error),
                                next_round = counted.rounds,
                                "the sender's connections broke; waiting for it to resume"
                            );
                        }
                        digests
                    }
                    _ => None,
                };
                let deadline = Instant::now() + cfg.resume_wait;
                match digests {
                    Some(_) => watch.until(deadline),
                    None => watch.stop(),
                }
                let back = watching.map(|w| w.join().unwrap_or_default());
                (end, digests.zip(back).map(|(d, b)| (d, b, deadline)))
            });
            let broken = match end {
                LegEnd::Done(mut report) => {
                    report.pages += before.pages;
                    report.zero_pages += before.zero_pages;
                    report.resumes = resumes;
                    // Handshakes still running are cut off here, so the count is final.
                    door.close();
                    report.refused = door.refused();
                    report.duration = start.elapsed();
                    return Ok(report);
                }
                LegEnd::Failed(e) => return Err(e),
                LegEnd::Broken { error, counted } => {
                    next = counted.rounds;
                    before.pages += counted.pages;
                    before.zero_pages += counted.zero_pages;
                    error
                }
            };
            // No listener, or a sink that cannot tell what it holds: the break ends it.
            let (Some(listener), Some((digests, back, deadline))) = (listener, resumed) else {
                return Err(broken);
            };
            // A layout that grew (REGION) is not resumed: a sink that can tell what it holds
            // holds memory sized for the first layout, which cannot grow.
            if *lock(&layout) != hello.layout {
                return Err(broken);
            }
            conns = complete_resume(
                listener, &config, &hello, next, digests, broken, &mut door, back, deadline,
            )?;
            resumes += 1;
        }
    }
}

/// What completed rounds of one set of connections applied.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    /// The next round expected: rounds completed by every connection.
    rounds: u64,
    pages: u64,
    zero_pages: u64,
}

/// One set of connections of a transfer, from round `next` on: the first
/// ones, or those of a resume.
struct Leg<'a> {
    conns: &'a [Connection],
    /// The layout so far (HELLO's, grown by every REGION).
    layout: &'a Mutex<Layout>,
    config: &'a ReceiverConfig,
    changed: &'a Mutex<ChangedPages>,
    next: u64,
    /// A break may be resumed: do not tell the sender it failed.
    resumable: bool,
}

/// How a [`Leg`] ended.
enum LegEnd {
    /// FINISH, DONE, COMMIT: the copy is complete.
    Done(ReceiveReport),
    /// A fault that ends the transfer.
    Failed(TransferError),
    /// With `resumable`: the connections broke before COMMIT.
    Broken {
        error: TransferError,
        counted: Counted,
    },
}

impl Leg<'_> {
    fn run<K: Sink + Send + ?Sized>(&self, sink: &mut K) -> LegEnd {
        match self.receive(sink) {
            Ok(report) => LegEnd::Done(report),
            Err((error, Some(counted))) => LegEnd::Broken { error, counted },
            Err((e, None)) => LegEnd::Failed(e),
        }
    }

    /// Receives until the transfer completes; on a resumable break, the
    /// error with what the completed rounds applied.
    fn receive<K: Sink + Send + ?Sized>(
        &self,
        sink: &mut K,
    ) -> Result<ReceiveReport, (TransferError, Option<Counted>)> {
        let fatal = |e| (e, None);
        let io_timeout = self.config.io_timeout;
        let n = self.conns.len();
        for c in self.conns {
            c.set_read_timeout(io_timeout)
                .map_err(|e| fatal(TransferError::io("setting a socket timeout")(e)))?;
        }
        let stalled = |c: &Connection, e: TransferError| match (&e, io_timeout) {
            (TransferError::Io { source, .. }, Some(after))
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                TransferError::Stalled {
                    what: "receiving frames from",
                    peer: c.peer(),
                    after,
                }
            }
            _ => e,
        };
        let shared = Shared {
            sink: Mutex::new(sink),
            barrier: RoundBarrier::new(n),
            failure: Mutex::new(None),
            conns: self.conns,
            layout: self.layout,
            max_memory: self.config.max_memory,
            changed: self.changed,
            resumable: self.resumable,
            completed: Mutex::new(Counted {
                rounds: self.next,
                ..Counted::default()
            }),
            writing: self.conns.iter().map(|_| Mutex::new(())).collect(),
            raise: FinalRaise::new(self.config.final_priority),
        };
        // This thread checks FINISH, sends DONE and waits for COMMIT: raised with the others
        // once the final round begins, put back whenever this returns.
        let _caller = shared.raise.enlist();
        let next = self.next;
        let progress = &Progress::new();
        let outcomes: Vec<Option<StreamOutcome>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .conns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let shared = &shared;
                    s.spawn(move || {
                        let _enlisted = shared.raise.enlist();
                        if n == 1 {
                            // One connection: read frames here, page payloads
                            // straight into the destination where the sink
                            // lends it (no copy; measured faster on 2 cores
                            // than a separate reading thread).
                            let pool = BufferPool::new(2);
                            let reader = BufReader::with_capacity(READ_BUFFER, c);
                            let frames = Frames::Direct(FrameReader::new(reader));
                            let r = receive_stream(frames, &pool, shared, i, next);
                            return shared.outcome(r.map_err(|e| stalled(c, e)));
                        }
                        // Several connections: each socket is read on its own
                        // thread so the kernel copy overlaps checksumming and
                        // applying.
                        let pool = BufferPool::new(QUEUED_FRAMES + 4);
                        let (tx, rx) = crossbeam_channel::bounded(QUEUED_FRAMES);
                        let reader_pool = pool.clone();
                        let watched = Watched {
                            conn: c,
                            progress,
                            after: io_timeout,
                        };
                        std::thread::scope(|s2| {
                            s2.spawn(move || {
                                let _enlisted = shared.raise.enlist();
                                read_socket(watched, &reader_pool, tx)
                            });
                            let frames: Frames<&[u8]> = Frames::Queued { rx };
                            let r = receive_stream(frames, &pool, shared, i, next);
                            shared.outcome(r.map_err(|e| stalled(c, e)))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        shared.fail(TransferError::WorkerPanicked);
                        None
                    })
                })
                .collect()
        });
        if let Some(e) = lock(&shared.failure).take() {
            if shared.resumes(&e) {
                return Err((e, Some(*lock(&shared.completed))));
            }
            return Err(fatal(e));
        }
        let outcomes: Vec<StreamOutcome> = outcomes.into_iter().flatten().collect();
        let Some(first) = outcomes.first().copied() else {
            return Err(fatal(TransferError::Aborted));
        };
        if outcomes.iter().any(|o| {
            o.checksum != first.checksum || o.rounds != first.rounds || o.check != first.check
        }) {
            let e: TransferError = ProtocolError::StreamMismatch {
                index: 0,
                reason: "streams finished with different rounds or checksums",
            }
            .into();
            shared.fail_now(&e);
            return Err(fatal(e));
        }
        let finished = lock(shared.changed)
            .check()
            .and_then(|()| lock(&shared.sink).finish_uncommitted(first.checksum, first.check));
        if let Err(e) = finished {
            shared.fail_now(&e);
            return Err(fatal(e));
        }
        let pages: u64 = outcomes.iter().map(|o| o.pages).sum();
        let zero_pages: u64 = outcomes.iter().map(|o| o.zero_pages).sum();
        for c in self.conns {
            let mut w = FrameWriter::new(c);
            let _ = w.send(&Done {
                pages,
                digest: first.checksum,
            });
        }
        for (c, o) in self.conns.iter().zip(&outcomes) {
            let peer = c.peer();
            let committed = await_commit(c, o.bytes, first.checksum).map_err(|e| stalled(c, e));
            let _ = c.shutdown(Shutdown::Both);
            if let Err(e) = committed {
                if self.resumable && e.is_connection_break() {
                    // Cut before COMMIT: the sender may come back, its workload running again.
                    let counted = *lock(&shared.completed);
                    return Err((
                        TransferError::NotCommitted {
                            peer,
                            source: Box::new(e),
                        },
                        Some(counted),
                    ));
                }
                return Err(fatal(TransferError::NotCommitted {
                    peer,
                    source: Box::new(e),
                }));
            }
        }
        // The sender committed on every connection: only now may the sink publish its copy
        // (an image is renamed into place).
        lock(&shared.sink).commit().map_err(fatal)?;
        Ok(ReceiveReport {
            rounds: first.rounds,
            pages,
            zero_pages,
            resumes: 0,
            refused: 0,
            bytes: outcomes.iter().map(|o| o.bytes).sum(),
            streams: n as u32,
            checksum: first.checksum,
            check: first.check,
            changed_while_sent: lock(shared.changed).seen(),
            state_bytes: outcomes.iter().find_map(|o| o.state_bytes),
            duration: Duration::ZERO,
            final_priority: shared.raise.report(),
        })
    }
}

/// After the connections of session `hello` broke and the watch ([`watch_for_resume`])
/// brought `back` what it could before `deadline`: accepts on `listener` until every
/// connection of the same sender is back (resume HELLO, same session, layout and stream count,
/// key proven), refusing anyone else (counted by `door`), then sends RESUME (next round
/// `next`, the `(block_pages, digests)` of what the sink holds) on connection 0; an attempt
/// whose RESUME cannot be sent is dropped and the next one awaited. Fails with
/// [`TransferError::ResumeTimedOut`] once `deadline` ([`ReceiverConfig::resume_wait`] after
/// the break) has passed.
#[allow(clippy::too_many_arguments)] // one call site; the arguments are the receiver's state
fn complete_resume(
    listener: &Listener,
    config: &ReceiverConfig,
    hello: &Hello,
    next: u64,
    (block_pages, block_digests): (u64, Vec<u64>),
    broken: TransferError,
    door: &mut Door,
    mut back: Vec<Option<Connection>>,
    deadline: Instant,
) -> Result<Vec<Connection>, TransferError> {
    let resume = Resume {
        next_round: next,
        block_pages,
        block_digests,
    };
    loop {
        let complete = back.iter().all(Option::is_some) || {
            door.admit(Admission::Resuming(hello.clone()));
            gather(listener, Until::Deadline(deadline), door, |conn, h| {
                Ok(take_back(&mut back, conn, &h))
            })?
        };
        if !complete {
            return Err(TransferError::ResumeTimedOut {
                after: config.resume_wait,
                source: Box::new(broken),
            });
        }
        let conns: Vec<Connection> = back.iter_mut().filter_map(Option::take).collect();
        match send_resume(&conns[0], &resume, config) {
            Ok(()) => return Ok(conns),
            // This attempt broke before it began (the sender sees its RESUME never came and
            // tries again): wait for the next one, until the same deadline.
            Err(e) => tracing::warn!(
                error = %precopy_sys::error_chain(&e),
                "a resume broke before RESUME was sent; waiting for the sender to try again"
            ),
        }
    }
}

/// Sends RESUME on `conn`, bounded by the handshake timeout.
fn send_resume(
    conn: &Connection,
    resume: &Resume,
    config: &ReceiverConfig,
) -> Result<(), TransferError> {
    conn.set_write_timeout(Some(config.handshake_timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    FrameWriter::new(conn)
        .send(resume)
        .map_err(TransferError::io("sending RESUME"))?;
    conn.set_write_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))
}

/// When [`watch_for_resume`] stops: at once (the leg ended otherwise), or at a deadline (the
/// leg broke: the watch is now the wait for the resume).
#[derive(Debug, Default)]
struct Watch {
    stop: AtomicBool,
    deadline: Mutex<Option<Instant>>,
}

impl Watch {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn until(&self, at: Instant) {
        *lock(&self.deadline) = Some(at);
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || lock(&self.deadline).is_some_and(|d| Instant::now() >= d)
    }
}

/// Puts a connection of the resuming sender in its slot of `back`; a second one for the same
/// stream is refused.
fn take_back(back: &mut [Option<Connection>], conn: Connection, h: &Hello) -> Take {
    let slot = &mut back[h.stream_index as usize];
    if slot.is_some() {
        let e = ProtocolError::StreamMismatch {
            index: h.stream_index,
            reason: "stream index used twice",
        };
        return Take::Refused(conn, error_code::PROTOCOL, e.into());
    }
    *slot = Some(conn);
    if back.iter().all(Option::is_some) {
        Take::Done
    } else {
        Take::Keep
    }
}

/// While a leg of session `hello` runs on `conns`, and after it broke: accepts on `listener`
/// (refusing anyone else, counted by `door`) until `watch` says stop. When every connection
/// of the same sender is back with a resume HELLO (it gave up on a path that went silent,
/// which this end cannot see, or its connections broke), shuts `conns` down so a leg still
/// running ends as a break, and returns the new connections (some slots are empty if the
/// watch ended first).
fn watch_for_resume(
    listener: &Listener,
    hello: &Hello,
    conns: &[Connection],
    watch: &Watch,
    door: &mut Door,
) -> Vec<Option<Connection>> {
    let mut back: Vec<Option<Connection>> = (0..hello.stream_count).map(|_| None).collect();
    door.admit(Admission::Resuming(hello.clone()));
    let came_back = gather(listener, Until::Watched(watch), door, |conn, h| {
        Ok(take_back(&mut back, conn, &h))
    });
    match came_back {
        Ok(true) => {
            tracing::warn!(
                "the sender came back on new connections: leaving the old ones, which went silent"
            );
            for c in conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(
            error = %precopy_sys::error_chain(&e),
            "watching for the sender to come back failed"
        ),
    }
    back
}

/// While a transfer runs (until `watch` says stop): accepts on `listener` and tells every
/// sender that proves the key that this receiver is busy, each refusal counted and logged by
/// `door`'s gate.
fn refuse_while_busy(listener: &Listener, watch: &Watch, door: &mut Door) {
    door.admit(Admission::Busy);
    let refused = gather(listener, Until::Watched(watch), door, |conn, _| {
        // The gate refuses every connection: nothing gets this far.
        Ok(Take::Refused(conn, error_code::BUSY, TransferError::Busy))
    });
    if let Err(e) = refused {
        tracing::warn!(
            error = %precopy_sys::error_chain(&e),
            "watching for other senders failed; they wait in the listen backlog"
        );
    }
}

/// Most handshakes a receiver runs at once while it accepts; further connections wait in the
/// listen backlog until one of them ends.
pub const MAX_HANDSHAKES: usize = 16;

/// Refused connections a receiver handles per second at most; past it, it waits out the rest
/// of the second before accepting again.
pub const REFUSALS_PER_SECOND: u32 = 64;

/// Refused connections logged one by one; after that, every hundredth.
const LOGGED_REFUSALS: u64 = 16;

/// How often [`gather`] looks at finished handshakes between accepts.
const GATHER_POLL: Duration = Duration::from_millis(20);

/// A handshake's result: its id in the [`Door`], the connection, its peer, the HELLO or why it
/// failed.
type Handshaken = (u64, Connection, String, Result<Hello, TransferError>);

/// One handshake running on its own thread.
#[derive(Debug)]
struct InFlight {
    id: u64,
    /// A handle to the connection, to cut it off.
    conn: Connection,
    thread: JoinHandle<()>,
}

/// The receiver's door: the handshakes running on the listener's connections, their
/// [`Gate`], and the pace of refusals. A handshake outlives the [`gather`] that started it
/// (one running when [`Receiver::accept`] returns ends while the transfer runs, refused as
/// busy), until [`Door::close`].
#[derive(Debug)]
struct Door {
    config: Arc<ReceiverConfig>,
    gate: Arc<Gate>,
    ended_tx: crossbeam_channel::Sender<Handshaken>,
    ended: crossbeam_channel::Receiver<Handshaken>,
    in_flight: Vec<InFlight>,
    next_id: u64,
    window: Option<Instant>,
    in_window: u32,
}

impl Door {
    fn new(config: &ReceiverConfig, admission: Admission) -> Door {
        let (ended_tx, ended) = crossbeam_channel::unbounded();
        Door {
            config: Arc::new(config.clone()),
            gate: Arc::new(Gate::new(admission)),
            ended_tx,
            ended,
            in_flight: Vec::new(),
            next_id: 0,
            window: None,
            in_window: 0,
        }
    }

    /// From now on, handshakes (running ones included) let in what `admission` says.
    fn admit(&self, admission: Admission) {
        *lock(&self.gate.admission) = admission;
    }

    /// Connections refused so far.
    fn refused(&self) -> u64 {
        self.gate.refused.load(Ordering::SeqCst)
    }

    /// Starts the handshake on `conn`, on its own thread.
    fn start(&mut self, conn: Connection) -> Result<(), TransferError> {
        let id = self.next_id;
        self.next_id += 1;
        let handle = conn
            .try_clone()
            .map_err(TransferError::io("cloning a socket"))?;
        let (config, gate, tx) = (
            self.config.clone(),
            self.gate.clone(),
            self.ended_tx.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("precopy-handshake".into())
            .spawn(move || {
                let peer = conn.peer();
                let result = receiver_handshake(&conn, &config, &gate);
                let _ = tx.send((id, conn, peer, result));
            })
            .map_err(TransferError::io("starting a handshake thread"))?;
        self.in_flight.push(InFlight {
            id,
            conn: handle,
            thread,
        });
        Ok(())
    }

    /// Forgets the handshake `id`, which ended.
    fn forget(&mut self, id: u64) {
        if let Some(i) = self.in_flight.iter().position(|h| h.id == id) {
            // It has sent its result: its thread is ending.
            let _ = self.in_flight.swap_remove(i).thread.join();
        }
    }

    /// Paces refusals: past [`REFUSALS_PER_SECOND`] in the current second, waits it out.
    fn pace(&mut self) {
        let now = Instant::now();
        match self.window {
            Some(w) if now.duration_since(w) < Duration::from_secs(1) => self.in_window += 1,
            _ => {
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.in_window >= REFUSALS_PER_SECOND
            && let Some(w) = self.window
        {
            std::thread::sleep((w + Duration::from_secs(1)).saturating_duration_since(now));
        }
    }

    /// Done with the listener: cuts off the handshakes still running (neither counted nor
    /// told: a refusal told before is counted already) and waits for their threads.
    fn close(&mut self) {
        self.gate.closing.store(true, Ordering::SeqCst);
        for h in &self.in_flight {
            let _ = h.conn.shutdown(Shutdown::Both);
        }
        for h in self.in_flight.drain(..) {
            let _ = h.thread.join();
        }
        while self.ended.try_recv().is_ok() {}
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        self.close();
    }
}

/// What [`gather`]'s caller made of a connection that completed the handshake.
enum Take {
    /// Kept; accept more.
    Keep,
    /// Kept, and that was the last one needed.
    Done,
    /// Refused: the peer is told why (an ERROR with this code), counted, and accepting goes
    /// on.
    Refused(Connection, u32, TransferError),
}

/// How long [`gather`] accepts.
#[derive(Clone, Copy)]
enum Until<'a> {
    /// Until its caller is done.
    Forever,
    /// Until this instant (then it returns `Ok(false)`).
    Deadline(Instant),
    /// Until the watch is over (then it returns `Ok(false)`).
    Watched(&'a Watch),
}

/// Hands a handshake that ended to `take` (a failed one was refused by the handshake itself)
/// and forgets it at `door`; `Some(true)` when `take` needs no more connections.
fn handshake_ended(
    (id, conn, peer, result): Handshaken,
    door: &mut Door,
    take: &mut impl FnMut(Connection, Hello) -> Result<Take, TransferError>,
) -> Result<Option<bool>, TransferError> {
    door.forget(id);
    match result {
        Ok(hello) => match take(conn, hello)? {
            Take::Done => return Ok(Some(true)),
            Take::Keep => {}
            Take::Refused(conn, code, e) => {
                door.gate.refuse(&conn, &peer, code, &e);
                let _ = conn.shutdown(Shutdown::Both);
                door.pace();
            }
        },
        Err(_) => door.pace(),
    }
    Ok(None)
}

/// Accepts connections on `listener` and runs the receiver's handshake on each, side by side
/// (`door` lets in or refuses each connection, counting refusals), handing every connection
/// that completes it to `take`, until `take` says it is done (`Ok(true)`) or `until` ends
/// (`Ok(false)`); an error of `take` or of the listener ends it. Handshakes still running
/// when it returns go on, in `door`.
fn gather(
    listener: &Listener,
    until: Until<'_>,
    door: &mut Door,
    mut take: impl FnMut(Connection, Hello) -> Result<Take, TransferError>,
) -> Result<bool, TransferError> {
    loop {
        while let Ok(ended) = door.ended.try_recv() {
            if let Some(done) = handshake_ended(ended, door, &mut take)? {
                return Ok(done);
            }
        }
        let wait = match until {
            Until::Forever => GATHER_POLL,
            Until::Deadline(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                left.min(GATHER_POLL)
            }
            Until::Watched(watch) => {
                if watch.over() {
                    return Ok(false);
                }
                GATHER_POLL
            }
        };
        if door.in_flight.len() >= MAX_HANDSHAKES {
            // Every slot is taken: further connections wait in the listen backlog (the
            // kernel holds them) until a handshake ends, which each does within the
            // handshake timeout. A sender opening more streams than there are slots gets
            // them all, one after another.
            if let Ok(ended) = door.ended.recv_timeout(wait)
                && let Some(done) = handshake_ended(ended, door, &mut take)?
            {
                return Ok(done);
            }
            continue;
        }
        if let Some(conn) = listener
            .accept_timeout(wait)
            .map_err(TransferError::io("accepting a connection"))?
        {
            door.start(conn)?;
        }
    }
}

/// Reads the sender's COMMIT (for `checksum`) at stream offset `offset`.
fn await_commit(c: &Connection, offset: u64, checksum: u64) -> Result<(), TransferError> {
    let mut r = FrameReader::at_offset(c, offset);
    let mut p = Vec::new();
    let h = r
        .read_frame(&mut p)
        .map_err(|e| between_frames(e, offset))?;
    if h.decode::<Commit>(&p)?.digest != checksum {
        return Err(ProtocolError::Malformed {
            offset: h.offset,
            kind: h.kind,
            reason: "COMMIT names another memory digest than FINISH",
        }
        .into());
    }
    Ok(())
}

/// `e`, or [`ProtocolError::SenderClosed`] where it is the stream ending exactly where the
/// frame at stream offset `at` would start: the sender closed its connection between frames
/// (it gave up or exited), which a connection cut inside a frame is not.
fn between_frames(e: TransferError, at: u64) -> TransferError {
    match e {
        TransferError::Protocol(ProtocolError::Truncated { offset, .. }) if offset == at => {
            ProtocolError::SenderClosed { offset }.into()
        }
        e => e,
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared<'a, K: ?Sized> {
    sink: Mutex<&'a mut K>,
    barrier: RoundBarrier,
    failure: Mutex<Option<TransferError>>,
    conns: &'a [Connection],
    /// The layout so far; a connection keeps its own copy, refreshed at each REGION.
    layout: &'a Mutex<Layout>,
    /// Largest layout accepted ([`ReceiverConfig::max_memory`]), grown or not.
    max_memory: u64,
    /// Pages applied torn from live frames and not sent again since (kept
    /// across a resume).
    changed: &'a Mutex<ChangedPages>,
    /// A break before the final phase may be resumed: the sender is not
    /// told it failed.
    resumable: bool,
    /// What every connection completed so far.
    completed: Mutex<Counted>,
    /// One lock per connection, held while a frame is written to it: a stream's PONG and
    /// another thread's ERROR must not interleave.
    writing: Vec<Mutex<()>>,
    /// The threads raised for the final phase.
    raise: FinalRaise,
}

/// A PONG that could not be written: on a connection the sender closed (an interrupted
/// sender; `EPIPE`, `ECONNRESET`) the message says so, not only "answering a PING failed:
/// Broken pipe". Still an I/O error, so still a connection break.
fn pong_failed(source: std::io::Error) -> TransferError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected};
    let closed = matches!(
        source.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected
    );
    let what = if closed {
        "the sender closed the connection; answering its PING"
    } else {
        "answering a PING"
    };
    TransferError::io(what)(source)
}

impl<K: ?Sized> Shared<'_, K> {
    /// Answers a PING on connection `index` (none when frames come from a buffer).
    fn pong(&self, index: usize, token: u64) -> Result<(), TransferError> {
        let (Some(c), Some(w)) = (self.conns.get(index), self.writing.get(index)) else {
            return Ok(());
        };
        let _held = lock(w);
        FrameWriter::new(c)
            .send(&Pong { token })
            .map_err(pong_failed)?;
        Ok(())
    }

    /// Whether failure `e` leaves the transfer waiting for a resume (a break, in the final
    /// phase too: until COMMIT the sender may resume its workload and come back).
    fn resumes(&self, e: &TransferError) -> bool {
        self.resumable && e.is_connection_break()
    }

    /// Records the first failure, tells the sender (unless it may resume),
    /// and stops every stream.
    fn fail(&self, e: TransferError) {
        {
            let mut f = lock(&self.failure);
            if f.is_none() {
                if !matches!(e, TransferError::Aborted) && !self.resumes(&e) {
                    self.fail_now(&e);
                }
                *f = Some(e);
            }
        }
        self.barrier.abort();
        for c in self.conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// A stream's result: its outcome, or `None` after recording its failure.
    fn outcome(&self, r: Result<StreamOutcome, TransferError>) -> Option<StreamOutcome> {
        r.map_err(|e| self.fail(e)).ok()
    }

    fn fail_now(&self, e: &TransferError) {
        let msg = precopy_sys::error_chain(e);
        for (c, w) in self.conns.iter().zip(&self.writing) {
            let _held = lock(w);
            send_error(c, code_for(e), &msg);
            let _ = c.shutdown(Shutdown::Write);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct StreamOutcome {
    rounds: u64,
    checksum: u64,
    check: FinalCheck,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    /// Length of the state blob this stream delivered.
    state_bytes: Option<u64>,
}

/// Per-connection receiver state after the handshake (drawn in the module
/// docs).
enum State {
    Idle {
        next: u64,
    },
    InRound {
        round: u64,
        pages: u64,
        zero_pages: u64,
    },
}

/// Bytes read from the socket per system call for small frames.
const READ_BUFFER: usize = 8 << 10;

/// Frames queued by a socket-reading thread: raw header, its offset, payload.
type RawFrame = Result<(RawHeader, u64, Vec<u8>), TransferError>;

/// Frames in queue for the queue depth between socket reader and applier.
const QUEUED_FRAMES: usize = 4;

/// Where a stream's frames come from.
enum Frames<R> {
    /// Read and verified in the applying thread; uncompressed page frames go
    /// straight into the destination where the sink lends it.
    Direct(FrameReader<R>),
    /// Read by [`read_socket`] on another thread, verified here.
    Queued {
        rx: crossbeam_channel::Receiver<RawFrame>,
    },
}

/// A frame as [`Frames::next`] delivers it.
enum Next {
    /// Verified; its payload is in the caller's buffer.
    Frame(Header),
    /// A PAGES frame read into memory the sink lent, verified there and
    /// committed: nothing left to apply.
    Applied(Header),
}

impl<R: Read> Frames<R> {
    /// The next verified frame; its payload replaces `payload` (the old
    /// buffer goes back to `pool`). For an uncompressed PAGES frame, `hashes`
    /// receives each page's hash (see [`verify_frame_pages`]). Inside a round
    /// (`in_round`), a direct reader offers an uncompressed PAGES frame to
    /// [`Sink::lend_pages`] first.
    fn next<K: Sink + ?Sized>(
        &mut self,
        payload: &mut Vec<u8>,
        pool: &BufferPool,
        ps: u64,
        hashes: &mut Vec<PageHash>,
        in_round: Option<(&Shared<'_, K>, &Layout)>,
    ) -> Result<Next, TransferError> {
        match self {
            Frames::Direct(r) => {
                let at = r.offset();
                let (h, offset) = r.read_raw_header().map_err(|e| between_frames(e, at))?;
                if let Some((shared, layout)) = in_round
                    && let Some(header) = read_in_place(r, &h, offset, ps, hashes, shared, layout)?
                {
                    return Ok(Next::Applied(header));
                }
                r.read_payload_vec(&h, payload)?;
                verify_frame_pages(&h, offset, payload, ps, hashes).map(Next::Frame)
            }
            Frames::Queued { rx } => {
                let (h, offset, buf) = rx.recv().map_err(|_| TransferError::Aborted)??;
                pool.give(std::mem::replace(payload, buf));
                verify_frame_pages(&h, offset, payload, ps, hashes).map(Next::Frame)
            }
        }
    }
}

/// Reads the payload of the frame with raw header `h` straight into the
/// destination, if it is an uncompressed PAGES frame for whole pages inside
/// the layout and the sink lends those pages; checks it there; commits it, or
/// reverts the pages and fails. `Ok(None)`: not taken, the payload is still
/// unread.
///
/// The header's fields are used before its CRC is checked (the CRC covers the
/// hash list that follows the pages, and each page is checked against it), so they are bounds-checked like any other input first: the
/// worst a forged header achieves is a lent range of zero pages, written and
/// then zeroed again.
fn read_in_place<R: Read, K: Sink + ?Sized>(
    r: &mut FrameReader<R>,
    h: &RawHeader,
    offset: u64,
    ps: u64,
    hashes: &mut Vec<PageHash>,
    shared: &Shared<'_, K>,
    layout: &Layout,
) -> Result<Option<Header>, TransferError> {
    let Ok(peek) = h.decode(offset) else {
        return Ok(None);
    };
    let pages = match peek.decode::<Pages>(&[]) {
        Ok(p) if peek.kind == FrameKind::Pages && p.codec == Codec::None => p,
        _ => return Ok(None),
    };
    let Ok(offset) = pages.place(&peek, layout) else {
        return Ok(None);
    };
    let len = pages.span.len;
    let live = pages.live;
    let mut sink = lock(&shared.sink);
    let Some(dest) = sink.lend_pages(offset, len) else {
        return Ok(None);
    };
    let mut list = vec![0u8; (len / ps) as usize * crate::digest::PAGE_HASH_LEN];
    let checked = r
        .read_pages_hashing(dest, ps as usize, hashes)
        .and_then(|()| {
            r.read_payload_into(&mut list)?;
            verify_hashed_list(h, offset, len, &list, ps, hashes)
        });
    match checked {
        Ok(header) => {
            sink.commit_lent(offset, hashes)?;
            drop(sink);
            lock(shared.changed).applied(offset, ps, hashes, live.then_some(&list[..]));
            Ok(Some(header))
        }
        Err(e) => {
            sink.revert_lent(offset, len);
            Err(e)
        }
    }
}

/// When a byte last arrived on any connection of one transfer (a leg): the silence bound
/// ([`ReceiverConfig::io_timeout`]) is the sender's, not one connection's. A paced sender
/// with several streams feeds them in turns (one stream's lent pages are written, at the
/// rate limit, before the next stream gets any: 1 MiB at 64 KiB/s is 16 s), so one
/// connection may rightly stay silent longer than the bound while another makes progress.
struct Progress {
    start: Instant,
    /// Nanoseconds after `start` of the last byte read.
    last: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let at = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.fetch_max(at, Ordering::Relaxed);
    }

    /// How long no connection has received a byte.
    fn silent_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// One connection of a transfer with several, read under the transfer's silence bound: a
/// read that times out while another connection received a byte within `after` waits
/// again (for what is left of `after`) instead of failing. The timeout ends the read only
/// when every connection of the transfer was silent for `after`.
struct Watched<'a> {
    conn: &'a Connection,
    progress: &'a Progress,
    /// The silence bound (`None`: no read timeout).
    after: Option<Duration>,
}

impl Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match (&*self.conn).read(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.progress.touch();
                    }
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let Some(after) = self.after else {
                        return Err(e);
                    };
                    let left = after.saturating_sub(self.progress.silent_for());
                    if left.is_zero() {
                        return Err(e);
                    }
                    // At least a millisecond: a zero timeout means none.
                    self.conn
                        .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads raw frames from `conn` until FINISH or ERROR (nothing follows
/// them), an error, or the applier hanging up.
fn read_socket(conn: Watched<'_>, pool: &BufferPool, tx: crossbeam_channel::Sender<RawFrame>) {
    let mut r = FrameReader::new(BufReader::with_capacity(READ_BUFFER, conn));
    loop {
        let mut buf = pool.take(0);
        let at = r.offset();
        match r
            .read_unverified(&mut buf)
            .map_err(|e| between_frames(e, at))
        {
            Ok((h, offset)) => {
                let last = h.kind_byte() == FrameKind::Finish as u8
                    || h.kind_byte() == FrameKind::Error as u8;
                if tx.send(Ok((h, offset, buf))).is_err() || last {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Runs connection `index`'s state machine. Only the first connection
/// (index 0) may carry the state blob.
fn receive_stream<R: Read, K: Sink + Send + ?Sized>(
    mut frames: Frames<R>,
    pool: &BufferPool,
    shared: &Shared<'_, K>,
    index: usize,
    start_round: u64,
) -> Result<StreamOutcome, TransferError> {
    let mut state_allowed = index == 0;
    let mut state_bytes = None;
    let mut payload = pool.take(0);
    let mut decompressor = Decompressor::default();
    let mut layout = lock(shared.layout).clone();
    let ps = layout.page_size();
    let mut state = State::Idle { next: start_round };
    let mut totals = (0u64, 0u64);
    let mut hashes: Vec<PageHash> = Vec::new();
    loop {
        let in_round = matches!(state, State::InRound { .. }).then_some((shared, &layout));
        let (h, applied) = match frames.next(&mut payload, pool, ps, &mut hashes, in_round)? {
            Next::Frame(h) => (h, false),
            Next::Applied(h) => (h, true),
        };
        let p = &payload[..if applied { 0 } else { h.payload_len as usize }];
        let unexpected = |state: &'static str| ProtocolError::Unexpected {
            offset: h.offset,
            kind: h.kind,
            state,
        };
        match (&mut state, h.kind) {
            (State::Idle { next }, FrameKind::RoundBegin) => {
                let RoundBegin {
                    round,
                    pages: round_pages,
                    final_round,
                } = h.decode(p)?;
                if round != *next {
                    return Err(ProtocolError::RoundOutOfOrder {
                        expected: *next,
                        got: round,
                    }
                    .into());
                }
                if final_round {
                    // Downtime runs at the sender: this round, STATE, FINISH, DONE and COMMIT
                    // at the final phase's priority.
                    shared.raise.begin_final();
                }
                shared.barrier.wait(round_pages, 0, |round_pages, _| {
                    let mut sink = lock(&shared.sink);
                    if round_pages > 0 {
                        sink.expect_round(round_pages)?;
                    }
                    sink.begin_round(round)
                })?;
                state = State::InRound {
                    round,
                    pages: 0,
                    zero_pages: 0,
                };
            }
            (State::InRound { pages, .. }, FrameKind::Pages) if applied => {
                // Read, checked and committed in place by `read_in_place`.
                *pages += h.decode::<Pages>(p)?.span.len / ps;
            }
            (State::InRound { pages, .. }, FrameKind::Pages) => {
                let frame: Pages = h.decode(p)?;
                let offset = frame.place(&h, &layout)?;
                let len = frame.span.len;
                let listed = frame.live.then(|| frame.split_listed(p).1.to_vec());
                let data = match frame.codec {
                    Codec::None => {
                        let buf = std::mem::replace(&mut payload, pool.take(0));
                        pool.share(buf).view(0..len as usize)
                    }
                    Codec::Lz4 | Codec::Zstd => {
                        let mut out = pool.take(len as usize);
                        let n = len as usize;
                        decompressor.decompress_into(frame.codec, p, &mut out[..n], h.offset)?;
                        hashes.clear();
                        hashes.extend(out[..n].chunks_exact(ps as usize).map(page_hash));
                        pool.share(out).view(0..n)
                    }
                };
                lock(&shared.sink).send_pages(offset, data, &hashes)?;
                lock(shared.changed).applied(offset, ps, &hashes, listed.as_deref());
                *pages += len / ps;
            }
            (State::InRound { zero_pages, .. }, FrameKind::Zero) => {
                let Zero { span } = h.decode(p)?;
                let start = span.place(&h, &layout)?;
                let range = start..start + span.len;
                lock(&shared.sink).send_zero_range(range.clone())?;
                lock(shared.changed).forget(range);
                *zero_pages += span.len / ps;
            }
            (
                State::InRound {
                    round,
                    pages,
                    zero_pages,
                },
                FrameKind::RoundEnd,
            ) => {
                let end: RoundEnd = h.decode(p)?;
                if end.round != *round {
                    return Err(ProtocolError::RoundOutOfOrder {
                        expected: *round,
                        got: end.round,
                    }
                    .into());
                }
                if end.pages != *pages || end.zero_pages != *zero_pages {
                    return Err(ProtocolError::CountMismatch {
                        round: *round,
                        claimed_pages: end.pages,
                        claimed_zero: end.zero_pages,
                        pages: *pages,
                        zero: *zero_pages,
                    }
                    .into());
                }
                let round = *round;
                totals.0 += *pages;
                totals.1 += *zero_pages;
                shared.barrier.wait(*pages, *zero_pages, |all, all_zero| {
                    lock(&shared.sink).end_round(round)?;
                    let mut c = lock(&shared.completed);
                    c.rounds = round + 1;
                    c.pages += all;
                    c.zero_pages += all_zero;
                    Ok(())
                })?;
                state = State::Idle { next: round + 1 };
            }
            (State::Idle { .. }, FrameKind::State) => {
                if !state_allowed {
                    return Err(unexpected(
                        "a state blob was already received or is not allowed on this connection",
                    )
                    .into());
                }
                state_allowed = false;
                let frame: StateFrame = h.decode(p)?;
                lock(&shared.sink).send_state(frame.blob)?;
                state_bytes = Some(frame.blob.len() as u64);
            }
            (State::Idle { next }, FrameKind::Finish) => {
                let finish: Finish = h.decode(p)?;
                if finish.rounds != *next {
                    return Err(ProtocolError::RoundOutOfOrder {
                        expected: *next,
                        got: finish.rounds,
                    }
                    .into());
                }
                return Ok(StreamOutcome {
                    rounds: *next,
                    checksum: finish.digest,
                    check: finish.check,
                    pages: totals.0,
                    zero_pages: totals.1,
                    bytes: h.offset + HEADER_LEN as u64,
                    state_bytes,
                });
            }
            (State::Idle { .. }, FrameKind::Region) => {
                let frame: Region = h.decode(p)?;
                let grown = frame.add_to(&layout)?;
                if grown.total_len() > shared.max_memory {
                    return Err(ProtocolError::Malformed {
                        offset: h.offset,
                        kind: h.kind,
                        reason: "layout grown larger than this receiver accepts (max_memory)",
                    }
                    .into());
                }
                // Every connection announces it; the last to arrive hands it to the sink.
                shared.barrier.wait(0, 0, |_, _| {
                    lock(&shared.sink).add_region(&frame.region)?;
                    *lock(shared.layout) = grown.clone();
                    Ok(())
                })?;
                if *lock(shared.layout) != grown {
                    return Err(ProtocolError::StreamMismatch {
                        index: index as u32,
                        reason: "connections announced different regions",
                    }
                    .into());
                }
                layout = grown;
            }
            // Connection 0 only: the barriers of the rounds before and after order it against
            // every other connection's pages.
            (State::Idle { .. }, FrameKind::Mapped) if index == 0 => {
                let frame: Mapped = h.decode(p)?;
                let kept = frame.offsets(&h, &layout)?;
                if !lock(&shared.sink).retain(&kept)? {
                    let dropped = layout.outside(&kept).iter().map(|r| r.end - r.start).sum();
                    return Err(TransferError::CannotDrop { dropped });
                }
            }
            (State::Idle { .. }, FrameKind::Ping) => {
                let Ping { token } = h.decode(p)?;
                shared.pong(index, token)?;
            }
            (_, FrameKind::Error) => {
                let e: ErrorFrame = h.decode(p)?;
                return Err(TransferError::PeerRejected {
                    code: e.code,
                    message: e.message.into_owned(),
                });
            }
            (State::Idle { .. }, _) => return Err(unexpected("between rounds").into()),
            (State::InRound { .. }, _) => return Err(unexpected("inside a round").into()),
        }
    }
}

/// A barrier for the connections of one transfer, with an action run by the
/// last to arrive, and an abort that releases everyone with an error.
struct RoundBarrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: bool,
    pages: u64,
    zero_pages: u64,
}

impl RoundBarrier {
    fn new(n: usize) -> RoundBarrier {
        RoundBarrier {
            n,
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                aborted: false,
                pages: 0,
                zero_pages: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn wait(
        &self,
        pages: u64,
        zero_pages: u64,
        last: impl FnOnce(u64, u64) -> Result<(), TransferError>,
    ) -> Result<(), TransferError> {
        let mut st = lock(&self.state);
        if st.aborted {
            return Err(TransferError::Aborted);
        }
        st.arrived += 1;
        st.pages += pages;
        st.zero_pages += zero_pages;
        if st.arrived == self.n {
            let r = last(st.pages, st.zero_pages);
            st.arrived = 0;
            st.pages = 0;
            st.zero_pages = 0;
            st.generation += 1;
            if r.is_err() {
                st.aborted = true;
            }
            self.cv.notify_all();
            return r;
        }
        let generation = st.generation;
        while st.generation == generation && !st.aborted {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.generation == generation {
            return Err(TransferError::Aborted);
        }
        Ok(())
    }

    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.cv.notify_all();
    }
}

/// Runs the single-stream receiver state machine over `bytes`: the frames
/// that follow a completed handshake announcing `layout`, into `sink`, then
/// [`Sink::finish`]. No socket is involved; this is the entry point of the
/// frame-decoder fuzz target and of tests that feed malformed streams.
pub fn receive_frames<K: Sink + Send + ?Sized>(
    bytes: &[u8],
    layout: &Layout,
    sink: &mut K,
) -> Result<ReceiveReport, TransferError> {
    let start = Instant::now();
    let changed = Mutex::new(ChangedPages::default());
    let shared = Shared {
        sink: Mutex::new(sink),
        barrier: RoundBarrier::new(1),
        failure: Mutex::new(None),
        conns: &[],
        layout: &Mutex::new(layout.clone()),
        max_memory: u64::MAX,
        changed: &changed,
        resumable: false,
        completed: Mutex::new(Counted::default()),
        writing: Vec::new(),
        raise: FinalRaise::new(None),
    };
    let pool = BufferPool::new(2);
    let outcome = receive_stream(
        Frames::Direct(FrameReader::new(bytes)),
        &pool,
        &shared,
        0,
        0,
    )?;
    lock(&changed).check()?;
    let sink = shared
        .sink
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    sink.finish(outcome.checksum, outcome.check)?;
    Ok(ReceiveReport {
        rounds: outcome.rounds,
        pages: outcome.pages,
        zero_pages: outcome.zero_pages,
        resumes: 0,
        refused: 0,
        bytes: outcome.bytes,
        streams: 1,
        checksum: outcome.checksum,
        check: outcome.check,
        changed_while_sent: lock(&changed).seen(),
        state_bytes: outcome.state_bytes,
        duration: start.elapsed(),
        final_priority: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryRegion;
    use std::os::unix::net::UnixStream;

    fn key() -> Key {
        Key::from_bytes(b"receiver unit test key".to_vec()).unwrap()
    }

    /// A PONG written to a connection the sender closed says the sender closed it (it read
    /// "answering a PING failed: Broken pipe (os error 32)"), and stays a connection break.
    #[test]
    fn a_pong_to_a_closed_sender_says_the_sender_closed_the_connection() {
        use std::error::Error as _;
        for kind in [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionReset,
        ] {
            let e = pong_failed(std::io::Error::from(kind));
            assert!(
                e.to_string()
                    .starts_with("the sender closed the connection; answering its PING failed"),
                "{e}"
            );
            assert!(e.source().is_some());
            assert!(e.is_connection_break());
        }
        let e = pong_failed(std::io::Error::other("disk on fire"));
        assert_eq!(e.to_string(), "answering a PING failed");
    }

    fn hello(session: u64, pages: u64, streams: u32, resume: bool) -> Hello {
        Hello {
            session,
            stream_index: 0,
            stream_count: streams,
            nonce: auth::nonce(),
            layout: Layout::new(vec![MemoryRegion::new(1, pages * 4096, 4096)]).unwrap(),
            resume,
        }
    }

    /// Runs a sender's handshake with `theirs` (proving `their_key`) against the receiver's
    /// half admitting by `admission`; returns the receiver's result and the code of the ERROR the
    /// sender got, if any.
    fn handshake(
        admission: Admission,
        theirs: Hello,
        their_key: Key,
    ) -> (Result<Hello, TransferError>, Option<u32>) {
        let (a, b) = UnixStream::pair().unwrap();
        let (ours, sender) = (Connection::Unix(a), Connection::Unix(b));
        let config = ReceiverConfig {
            key: Some(key()),
            ..ReceiverConfig::default()
        };
        std::thread::scope(|s| {
            let client = s.spawn(move || {
                let mut w = FrameWriter::new(&sender);
                w.write_preamble().unwrap();
                w.send(&theirs).unwrap();
                let mut r = FrameReader::new(&sender);
                r.read_preamble().unwrap();
                let mut p = Vec::new();
                let challenge: Challenge = r.read_frame(&mut p).unwrap().decode(&p).unwrap();
                let mac = auth::proof(
                    &their_key,
                    Role::Sender,
                    &theirs.nonce,
                    &challenge.nonce,
                    theirs.session,
                    theirs.stream_index,
                );
                w.send(&Auth { mac: Some(mac) }).unwrap();
                let h = r.read_frame(&mut p).unwrap();
                (h.kind == FrameKind::Error).then(|| h.decode::<ErrorFrame>(&p).unwrap().code)
            });
            let result = receiver_handshake(&ours, &config, &Gate::new(admission));
            (result, client.join().unwrap())
        })
    }

    #[test]
    fn a_resume_is_refused_unless_it_is_the_waiting_session_with_the_key() {
        let waiting = hello(7, 64, 1, false);
        let refused = |r: &Result<Hello, TransferError>| match r {
            Err(TransferError::Protocol(ProtocolError::ResumeRefused { reason, .. })) => {
                Some(*reason)
            }
            _ => None,
        };
        let cases = [
            (hello(8, 64, 1, true), ResumeRefusal::UnknownSession),
            (hello(7, 65, 1, true), ResumeRefusal::DifferentLayout),
            (hello(7, 64, 2, true), ResumeRefusal::DifferentStreams),
            (hello(7, 64, 1, false), ResumeRefusal::SessionWaiting),
        ];
        for (theirs, why) in cases {
            let (r, code) = handshake(Admission::Resuming(waiting.clone()), theirs, key());
            assert_eq!(refused(&r), Some(why), "{r:?}");
            assert_eq!(code, Some(error_code::RESUME));
        }
        // The right session with the wrong key: an authentication failure, nothing more.
        let wrong = Key::from_bytes(b"another key entirely".to_vec()).unwrap();
        let (r, code) = handshake(
            Admission::Resuming(waiting.clone()),
            hello(7, 64, 1, true),
            wrong,
        );
        assert!(matches!(r, Err(TransferError::WrongKey { .. })), "{r:?}");
        assert_eq!(code, Some(error_code::AUTH));
        // A resume to a receiver that holds no session.
        let (r, code) = handshake(Admission::accepting(), hello(7, 64, 1, true), key());
        assert_eq!(refused(&r), Some(ResumeRefusal::NoSession), "{r:?}");
        assert_eq!(code, Some(error_code::RESUME));
        // The waiting session itself, with the key, gets in.
        let (r, code) = handshake(
            Admission::Resuming(waiting.clone()),
            hello(7, 64, 1, true),
            key(),
        );
        assert!(r.is_ok_and(|h| h.resume && h.session == 7));
        assert_eq!(code, None);
    }
}
