//! Test support, never a dependency of the engine: where a test's receiver listens (loopback
//! TCP or a Unix socket) and a [`Proxy`] between sender and receiver that does to a connection
//! what a network path can do: cut it (both directions shut down, as a reset would), refuse new
//! connections (a path that stays broken), or drop everything silently (a peer host that
//! vanished, a proxy that stopped forwarding: no reset, no end of stream, only silence).
//!
//! Used by the resume and timeout tests of `precopy-transfer` and `precopy-migrate`.

#![forbid(unsafe_code)]

use precopy_transfer::{Connection, Listener};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
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
