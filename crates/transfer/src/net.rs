//! The socket side of sending: connections, the sender's handshake and the
//! [`SocketSink`] that writes page frames over one or more connections.
//!
//! Each connection gets a writer thread (compress, checksum, rate-limit,
//! write) fed by a bounded queue, and a watcher thread that reads whatever the
//! receiver says (an ERROR mid-stream, DONE at the end) so a rejection stops
//! the writer at once instead of after the next round.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender as Chan, bounded};

use crate::auth::{self, Key, Role};
use crate::buffer::PageBuf;
use crate::codec::Compressor;
use crate::digest::{FinalCheck, PageFold};
use crate::engine::{SenderConfig, Transfer};
use crate::error::{ProtocolError, TransferError};
use crate::layout::Layout;
use crate::live::LivePages;
use crate::protocol::{
    Auth, Challenge, Commit, Done, ErrorFrame, Finish, FrameKind, FrameReader, FrameWriter, Header,
    Hello, PageSpan, Pages, RoundBegin, RoundEnd, State, Welcome, Zero,
};
use crate::sink::{Interrupt, Sink};
use crate::source::PageSource;

/// A connected byte stream: TCP or Unix.
#[derive(Debug)]
pub enum Connection {
    /// A TCP stream.
    Tcp(TcpStream),
    /// A Unix-domain stream.
    Unix(UnixStream),
}

impl Connection {
    /// Connects over TCP (with `TCP_NODELAY`, so small control frames are
    /// not held back).
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Connection> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Connection::Tcp(s))
    }

    /// Connects over TCP, giving up after `timeout` per address tried (a
    /// host that drops SYNs otherwise holds `connect` for minutes).
    pub fn connect_tcp_timeout(
        addr: impl ToSocketAddrs,
        timeout: Duration,
    ) -> io::Result<Connection> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(Connection::Tcp(s));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connects to a Unix-domain socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Connection> {
        Ok(Connection::Unix(UnixStream::connect(path)?))
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
        })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(how),
            Connection::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_write_timeout(t),
            Connection::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Whether the peer is on this machine: a Unix socket, or TCP between
    /// loopback addresses.
    pub fn is_local(&self) -> bool {
        match self {
            Connection::Unix(_) => true,
            Connection::Tcp(s) => {
                s.local_addr().is_ok_and(|a| a.ip().is_loopback())
                    && s.peer_addr().is_ok_and(|a| a.ip().is_loopback())
            }
        }
    }

    /// The peer, for messages.
    pub fn peer(&self) -> String {
        match self {
            Connection::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp peer".into()),
            Connection::Unix(_) => "unix peer".into(),
        }
    }
}

impl std::os::fd::AsFd for Connection {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Connection::Tcp(s) => s.as_fd(),
            Connection::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Connection::Tcp(s) => (&*s).read(buf),
            Connection::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Connection::Tcp(s) => (&*s).write(buf),
            Connection::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Connection::Tcp(s) => (&*s).write_vectored(bufs),
            Connection::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket: TCP or Unix.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-domain listener.
    Unix(UnixListener),
}

impl Listener {
    /// Listens on a TCP address.
    pub fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Listens on a Unix-domain socket path, **accessible to this user only**
    /// (mode 0600): connecting needs write permission on the socket file, so
    /// no other user's process can become the sender. The socket is bound,
    /// restricted, and only then listens, so no connection gets in before.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        use std::os::unix::fs::PermissionsExt;
        let path = path.as_ref();
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        let restricted = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| Ok(listen(&fd, Backlog::MAXCONN)?));
        if let Err(e) = restricted {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Listener::Unix(UnixListener::from(fd)))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Connection> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
            Listener::Unix(l) => Connection::Unix(l.accept()?.0),
        })
    }

    /// Whether only this machine can connect: a Unix socket, or TCP bound to
    /// a loopback address.
    pub fn is_local(&self) -> bool {
        match self {
            Listener::Unix(_) => true,
            Listener::Tcp(l) => l.local_addr().is_ok_and(|a| a.ip().is_loopback()),
        }
    }

    /// The address, for messages.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "unix socket".into()),
        }
    }
}

/// Runs the sender's half of the handshake on one connection.
fn sender_handshake(
    conn: &mut Connection,
    hello: &Hello,
    key: Option<&Key>,
    timeout: Duration,
) -> Result<(), TransferError> {
    conn.set_read_timeout(Some(timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(Some(timeout))
        .map_err(TransferError::io("setting a socket timeout"))?;
    let mut w = FrameWriter::new(&*conn);
    w.write_preamble()
        .map_err(TransferError::io("sending the handshake"))?;
    w.send(hello)
        .map_err(TransferError::io("sending the handshake"))?;
    let mut r = FrameReader::new(&*conn);
    r.read_preamble()?;
    let mut p = Vec::new();
    let h = r.read_frame(&mut p)?;
    rejected(&h, &p)?;
    let challenge: Challenge = h.decode(&p)?;
    let receiver_nonce = challenge.nonce;
    if challenge.key_required && key.is_none() {
        // Answer anyway so the receiver reports a failed authentication
        // rather than a cut stream.
        let _ = w.send(&Auth { mac: None });
        return Err(TransferError::AuthRequired);
    }
    let mac = key.map(|k| {
        auth::proof(
            k,
            Role::Sender,
            &hello.nonce,
            &receiver_nonce,
            hello.session,
            hello.stream_index,
        )
    });
    w.send(&Auth { mac })
        .map_err(TransferError::io("sending the handshake"))?;
    let h = r.read_frame(&mut p)?;
    rejected(&h, &p)?;
    let their = h.decode::<Welcome>(&p)?.mac;
    if let Some(k) = key {
        let proven = their.is_some_and(|m| {
            auth::proof_matches(
                k,
                Role::Receiver,
                &hello.nonce,
                &receiver_nonce,
                hello.session,
                hello.stream_index,
                &m,
            )
        });
        if !proven {
            return Err(TransferError::AuthFailed { peer: conn.peer() });
        }
    }
    conn.set_read_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    conn.set_write_timeout(None)
        .map_err(TransferError::io("setting a socket timeout"))?;
    Ok(())
}

/// Turns an ERROR frame into [`TransferError::PeerRejected`].
fn rejected(h: &Header, p: &[u8]) -> Result<(), TransferError> {
    if h.kind == FrameKind::Error {
        let e: ErrorFrame = h.decode(p)?;
        return Err(TransferError::PeerRejected {
            code: e.code,
            message: e.message.into_owned(),
        });
    }
    Ok(())
}

enum Cmd {
    Begin(u64),
    Pages(u64, PageBuf, Vec<u32>),
    Live(u64, LivePages, Vec<u32>),
    Zero(Range<u64>),
    End(u64),
    State(Vec<u8>),
    Finish {
        checksum: u32,
        rounds: u64,
        check: FinalCheck,
        wait: Option<Duration>,
    },
    Commit(u32),
}

enum Reply {
    RoundWritten(u64),
    Finished,
    Committed,
}

/// What [`Sink::interrupter`] of a [`SocketSink`] acts on: a flag its
/// operations check, and a handle to every connection, shut down at once so
/// a blocked read or write returns.
#[derive(Debug, Default)]
struct InterruptState {
    interrupted: AtomicBool,
    conns: Mutex<Vec<Connection>>,
}

impl InterruptState {
    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn is_set(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Keeps a handle to `conn` for [`InterruptState::interrupt`]; shuts it
    /// down at once if the interrupt came first.
    fn register(&self, conn: &Connection) -> Result<(), TransferError> {
        let c = conn
            .try_clone()
            .map_err(TransferError::io("cloning a socket"))?;
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_set() {
            let _ = c.shutdown(Shutdown::Both);
        }
        conns.push(c);
        Ok(())
    }
}

/// What the watcher heard from the receiver.
enum PeerEvent {
    Done { checksum: u32 },
    Error { code: u32, message: String },
    Closed(TransferError),
}

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

fn watch_peer(conn: Connection, events: Chan<PeerEvent>) {
    let mut r = FrameReader::new(&conn);
    let mut p = Vec::new();
    let event = match r.read_frame(&mut p) {
        Ok(h) if h.kind == FrameKind::Done => match h.decode::<Done>(&p) {
            Ok(done) => PeerEvent::Done {
                checksum: done.digest,
            },
            Err(e) => PeerEvent::Closed(e.into()),
        },
        Ok(h) if h.kind == FrameKind::Error => {
            // Stop the writer now rather than at its next flush.
            let _ = conn.shutdown(Shutdown::Both);
            match h.decode::<ErrorFrame>(&p) {
                Ok(e) => PeerEvent::Error {
                    code: e.code,
                    message: e.message.into_owned(),
                },
                Err(e) => PeerEvent::Closed(e.into()),
            }
        }
        Ok(h) => PeerEvent::Closed(
            ProtocolError::Unexpected {
                offset: h.offset,
                kind: h.kind,
                state: "sending pages",
            }
            .into(),
        ),
        Err(e) => PeerEvent::Closed(e),
    };
    let _ = events.send(event);
}

/// Paces writes to a byte rate (token bucket with a short burst).
struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: f64) -> RateLimiter {
        let burst = (rate / 20.0).max(256.0 * 1024.0);
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn consume(&mut self, bytes: u64) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
        }
    }
}

struct StreamWriter {
    out: FrameWriter<Connection>,
    compressor: Compressor,
    limiter: Option<RateLimiter>,
    pages: u64,
    zero_pages: u64,
    round_start: u64,
    page_size: u64,
    /// Names memory offsets on the wire (region id, offset inside it).
    layout: Layout,
    fold: PageFold,
    events: Receiver<PeerEvent>,
    peer: String,
    io_timeout: Option<Duration>,
    interrupt: Arc<InterruptState>,
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

    fn run(mut self, cmds: Receiver<Cmd>, replies: Chan<Reply>) -> Result<(), TransferError> {
        for cmd in cmds {
            match self.handle(cmd) {
                Ok(Some(reply)) => {
                    if replies.send(reply).is_err() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(self.explain(e)),
            }
        }
        Ok(())
    }

    /// A write that failed because the receiver gave up becomes the
    /// receiver's own message.
    fn explain(&self, e: TransferError) -> TransferError {
        if let TransferError::Io { .. } = e
            && let Ok(PeerEvent::Error { code, message }) =
                self.events.recv_timeout(Duration::from_secs(2))
        {
            return TransferError::PeerRejected { code, message };
        }
        e
    }

    /// Writes `frame` (after the rate limiter let its bytes through).
    fn send<'p, F: crate::protocol::Frame<'p>>(&mut self, frame: &F) -> Result<(), TransferError> {
        let (header, payload) = crate::protocol::encode(frame);
        self.pace(payload.len() as u64);
        let written = self.out.send_encoded(&header, &payload);
        written.map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Waits until the rate limit lets a frame with `payload` bytes through.
    fn pace(&mut self, payload: u64) {
        if let Some(l) = &mut self.limiter {
            l.consume(crate::protocol::HEADER_LEN as u64 + payload);
        }
    }

    fn handle(&mut self, cmd: Cmd) -> Result<Option<Reply>, TransferError> {
        match cmd {
            Cmd::Begin(round) => {
                self.pages = 0;
                self.zero_pages = 0;
                self.round_start = self.out.written();
                self.send(&RoundBegin { round })?;
            }
            Cmd::Pages(offset, pages, crcs) => {
                self.pages += pages.len() as u64 / self.page_size;
                let span = self.wire_span(offset, pages.len() as u64)?;
                let written = match self.compressor.compress(&pages)? {
                    Some((codec, packed)) => {
                        if let Some(l) = &mut self.limiter {
                            l.consume(crate::protocol::HEADER_LEN as u64 + packed.len() as u64);
                        }
                        self.out.send_pages(
                            &Pages {
                                span,
                                codec,
                                live: false,
                            },
                            packed,
                        )
                    }
                    None if crcs.len() as u64 * self.page_size == span.len => {
                        // The frame CRC comes from the page CRCs: no pass here.
                        self.pace(span.len);
                        self.out.send_folded_pages(span, &pages, &crcs, &self.fold)
                    }
                    None => {
                        self.pace(span.len);
                        let codec = crate::codec::Codec::None;
                        self.out.send_pages(
                            &Pages {
                                span,
                                codec,
                                live: false,
                            },
                            &pages,
                        )
                    }
                };
                written.map_err(|e| self.write_error(e))?;
            }
            Cmd::Live(offset, pages, crcs) => {
                if self.compressor.compresses() {
                    // Compress a copy, in an ordinary frame checked as a whole.
                    let mut copy = vec![0u8; pages.len() as usize];
                    pages
                        .copy_to(0, &mut copy)
                        .map_err(TransferError::io("copying lent pages"))?;
                    let ps = self.page_size as usize;
                    let held = copy.chunks(ps).map(crate::digest::page_crc).collect();
                    return self.handle(Cmd::Pages(offset, PageBuf::from_vec(copy), held));
                }
                self.write_live(offset, &pages, &crcs)?;
            }
            Cmd::Zero(range) => {
                self.zero_pages += (range.end - range.start) / self.page_size;
                let span = self.wire_span(range.start, range.end - range.start)?;
                self.send(&Zero { span })?;
            }
            Cmd::State(blob) => {
                self.send(&State::new(&blob))?;
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
                let event = match wait {
                    Some(t) => self.events.recv_timeout(t).map_err(|e| e.is_timeout()),
                    None => self.events.recv().map_err(|_| false),
                };
                return match event {
                    Ok(PeerEvent::Done { checksum: theirs }) if theirs == checksum => {
                        Ok(Some(Reply::Finished))
                    }
                    Ok(PeerEvent::Done { checksum: theirs }) => {
                        Err(TransferError::ChecksumMismatch {
                            expected: checksum,
                            actual: theirs,
                        })
                    }
                    Ok(PeerEvent::Error { code, message }) => {
                        Err(TransferError::PeerRejected { code, message })
                    }
                    Ok(PeerEvent::Closed(_)) | Err(_) if self.interrupt.is_set() => {
                        Err(TransferError::Interrupted {
                            peer: self.peer.clone(),
                        })
                    }
                    Ok(PeerEvent::Closed(e)) => Err(e),
                    Err(true) => Err(TransferError::Stalled {
                        what: "waiting for the acknowledgement of",
                        peer: self.peer.clone(),
                        after: wait.unwrap_or_default(),
                    }),
                    Err(false) => Err(TransferError::Aborted),
                };
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

    /// Writes lent pages at memory offset `offset` as live frames, the
    /// kernel reading them from memory (at most [`MAX_PAYLOAD`] bytes of
    /// pages and CRC list per frame).
    ///
    /// [`MAX_PAYLOAD`]: crate::protocol::MAX_PAYLOAD
    fn write_live(
        &mut self,
        offset: u64,
        pages: &LivePages,
        crcs: &[u32],
    ) -> Result<(), TransferError> {
        use precopy_sys::live::{Gather, write_all_gather};
        use std::os::fd::AsFd;
        use zerocopy::IntoBytes;
        let ps = self.page_size;
        let per_frame = (crate::protocol::MAX_PAYLOAD / (ps + 4)).max(1) as usize;
        for (k, chunk) in crcs.chunks(per_frame).enumerate() {
            let from = (k * per_frame) as u64 * ps;
            let len = chunk.len() as u64 * ps;
            let part = pages
                .slice(from..from + len)
                .map_err(TransferError::io("lending pages"))?;
            let span = self.wire_span(offset + from, len)?;
            let list = Pages::crc_list(chunk);
            let header = Pages::live_header(span, &list);
            self.pace(len + list.len() as u64);
            let n = write_all_gather(
                self.out.get_ref().as_fd(),
                &[
                    Gather::Bytes(header.as_bytes()),
                    Gather::Live(&part),
                    Gather::Bytes(&list),
                ],
            )
            .map_err(|e| self.write_error(e))?;
            self.out.wrote(n);
            self.pages += chunk.len() as u64;
        }
        Ok(())
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
