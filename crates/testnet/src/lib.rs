//! Test support, never a dependency of the engine: where a test's receiver listens (loopback
//! TCP or a Unix socket) and a [`Proxy`] between sender and receiver that does to a connection
//! what a network path can do: cut it (both directions shut down, as a reset would), refuse new
//! connections (a path that stays broken), or drop everything silently (a peer host that
//! vanished, a proxy that stopped forwarding: no reset, no end of stream, only silence).
//!
//! Both ends of a resumed transfer too: a [`Dialer`] for a sender that can dial again (and that
//! a test can cut), and a [`resumable_receiver`].
//!
//! Used by the resume and timeout tests of `precopy-transfer` and `precopy-migrate`.
//!
//! Also [`compile_c`]: the C fixture programs the tests of `precopy-migrate` and
//! `precopy-cli` run as targets, compiled one way for both; and [`VforkWait`], a process held
//! in `vfork`.

#![forbid(unsafe_code)]

mod c_fixture;
mod vfork;
pub use c_fixture::compile_c;
pub use vfork::{VforkWait, state as thread_state};

use precopy_transfer::{
    Connection, Layout, Listener, MemorySink, ReceiveReport, Receiver, ReceiverConfig, Sender,
    SenderConfig, SliceSource, TransferError,
};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which kind of socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// Loopback TCP.
    Tcp,
    /// A Unix-domain socket in a temporary directory.
    Unix,
}

/// Where to connect: a loopback TCP address or a Unix socket path.
#[derive(Clone, Debug)]
pub enum Target {
    /// `HOST:PORT`.
    Tcp(String),
    /// A socket path.
    Unix(PathBuf),
}

impl Target {
    /// Connects (TCP: bounded by 5 s).
    pub fn connect(&self) -> io::Result<Connection> {
        match self {
            Target::Tcp(a) => Connection::connect_tcp_timeout(a.as_str(), Duration::from_secs(5)),
            Target::Unix(p) => Connection::connect_unix(p),
        }
    }
}

/// The dial function of a sender that can resume (`Sender::dial`): connects to a [`Target`]
/// that the test may change ([`Dialer::redirect`]) and keeps a handle to every connection it
/// opened, so that the test can cut them all ([`Dialer::cut`]). Clones share both.
#[derive(Clone, Debug)]
pub struct Dialer {
    target: Arc<Mutex<Target>>,
    opened: Arc<Mutex<Vec<Connection>>>,
}

impl Dialer {
    /// Dials `target`.
    pub fn new(target: Target) -> Dialer {
        Dialer {
            target: Arc::new(Mutex::new(target)),
            opened: Arc::default(),
        }
    }

    /// The function to give `Sender::dial` (or `SocketSink::dial`).
    pub fn dial(&self) -> impl FnMut() -> io::Result<Connection> + Send + 'static {
        let d = self.clone();
        move || {
            let c = d.target.lock().unwrap().connect()?;
            d.opened.lock().unwrap().push(c.try_clone()?);
            Ok(c)
        }
    }

    /// Cuts every connection opened so far (both directions shut down), as a broken path
    /// would.
    pub fn cut(&self) {
        for c in self.opened.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Later dials connect to `target` instead.
    pub fn redirect(&self, target: Target) {
        *self.target.lock().unwrap() = target;
    }

    /// A sender of `mem`, one region of `page_size` pages mapped at `base`, that dials with
    /// this dialer (and so can resume).
    pub fn sender(
        &self,
        page_size: u64,
        base: u64,
        mem: Vec<u8>,
        config: &SenderConfig,
    ) -> Sender<SliceSource<Vec<u8>>> {
        let layout = Layout::single(page_size, base, mem.len() as u64).expect("a layout");
        Sender::dial(self.dial(), layout, SliceSource::new(base, mem), config)
            .expect("a sender connected")
    }
}

/// What a [`resumable_receiver`] ended with.
#[derive(Debug)]
pub struct Received {
    /// The receiver's report.
    pub report: ReceiveReport,
    /// The memory it received.
    pub memory: Vec<u8>,
    /// The state blob it took, if any.
    pub state: Option<Vec<u8>>,
}

/// Accepts one transfer on `listener` in a thread and receives it into memory the sink owns
/// (`MemorySink::new`), resuming after broken connections (`Receiver::run_resumable`).
pub fn resumable_receiver(
    listener: Listener,
    config: ReceiverConfig,
) -> JoinHandle<Result<Received, TransferError>> {
    std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &config)?;
        let mut sink = MemorySink::new(rx.layout().clone())?;
        let report = rx.run_resumable(&listener, &mut sink)?;
        Ok(Received {
            report,
            memory: sink.memory().expect("owned memory").to_vec(),
            state: sink.state().map(<[u8]>::to_vec),
        })
    })
}

/// Listens on loopback TCP (any free port) or on a Unix socket `name` in `dir`.
pub fn bind(net: Net, dir: &tempfile::TempDir, name: &str) -> (Listener, Target) {
    match net {
        Net::Tcp => {
            let l = Listener::bind_tcp("127.0.0.1:0").expect("bind loopback TCP");
            let a = l.address();
            (l, Target::Tcp(a))
        }
        Net::Unix => {
            let p = dir.path().join(name);
            (
                Listener::bind_unix(&p).expect("bind a Unix socket"),
                Target::Unix(p),
            )
        }
    }
}

/// One forwarded connection: both sockets, and whether it was blackholed.
struct Carried {
    client: Connection,
    server: Connection,
    silent: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    live: Mutex<Vec<Carried>>,
    /// Blackholed connections, held open until the proxy is dropped.
    silent: Mutex<Vec<Carried>>,
    forwarded: AtomicU64,
    refuse: AtomicBool,
    refused: AtomicU64,
    accepted: AtomicU64,
    closed: AtomicBool,
}

/// A forwarder between a sender and a receiver, listening on the same kind of socket as the
/// receiver. Every connection it accepts is forwarded to a new connection to the receiver,
/// byte for byte, in both directions, until either end closes or the test intervenes.
pub struct Proxy {
    /// Where the sender connects.
    pub target: Target,
    state: Arc<State>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("target", &self.target)
            .finish()
    }
}

impl Proxy {
    /// Listens next to the receiver (same kind of socket, `dir` for a Unix one) and forwards
    /// to `to`.
    pub fn start(net: Net, dir: &tempfile::TempDir, to: Target) -> Proxy {
        let (listener, target) = bind(net, dir, "proxy");
        let state = Arc::new(State::default());
        let s = state.clone();
        std::thread::spawn(move || {
            while let Ok(client) = listener.accept() {
                if s.closed.load(SeqCst) {
                    return;
                }
                s.accepted.fetch_add(1, SeqCst);
                if s.refuse.load(SeqCst) {
                    s.refused.fetch_add(1, SeqCst);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = to.connect() else { return };
                let silent = Arc::new(AtomicBool::new(false));
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    return;
                };
                s.live.lock().unwrap().push(Carried {
                    client: c3,
                    server: s3,
                    silent: silent.clone(),
                });
                pipe(c2, s2, silent.clone(), Some(s.clone()));
                pipe(server, client, silent, None);
            }
        });
        Proxy { target, state }
    }

    /// Cuts every connection carried so far (both directions shut down, as a broken path
    /// would reset them).
    pub fn cut(&self) {
        for c in self.state.live.lock().unwrap().drain(..) {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
    }

    /// Stops forwarding on every connection carried so far, in both directions, without
    /// closing anything: each end sees only silence (its writes stall once the buffers are
    /// full, its reads wait). Connections made later are forwarded as usual (a new path).
    pub fn blackhole(&self) {
        let mut live = self.state.live.lock().unwrap();
        for c in live.iter() {
            c.silent.store(true, SeqCst);
        }
        self.state.silent.lock().unwrap().extend(live.drain(..));
    }

    /// While `on`, every new connection is closed at once (a path that stays broken).
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, SeqCst);
    }

    /// Bytes forwarded from the sender to the receiver so far.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(SeqCst)
    }

    /// Connections closed at once while refusing.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(SeqCst)
    }

    /// Connections accepted so far (forwarded or refused).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, SeqCst);
        self.cut();
        for c in self.state.silent.lock().unwrap().drain(..) {
            let _ = c.client.shutdown(Shutdown::Both);
            let _ = c.server.shutdown(Shutdown::Both);
        }
        // Wakes the accepting thread so it sees `closed`.
        let _ = self.target.connect();
    }
}

/// Copies `from` to `to` until either end closes (then closes both), counting into `count`;
/// once `silent` is set it stops copying and holds both open, reading nothing more.
fn pipe(
    mut from: Connection,
    mut to: Connection,
    silent: Arc<AtomicBool>,
    count: Option<Arc<State>>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if silent.load(SeqCst) {
                // What was in flight is lost, as on a path that drops packets; nothing more
                // is read, so the sender's buffers fill and its writes stall.
                return;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(s) = &count {
                s.forwarded.fetch_add(n as u64, SeqCst);
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
