//! Connections and listeners (TCP or Unix), and the interrupt state that
//! shuts a transfer's connections down at once.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::writer::RateLimiter;
use crate::error::TransferError;

/// The TCP congestion control a connection whose both ends are on this host uses (`reno`, which
/// every kernel has and lets unprivileged processes choose), whatever the system's default.
///
/// Over loopback nothing is lost and nothing queues, so congestion control has nothing to
/// protect, but a model-based one such as BBR (a common default, this project's test machine's)
/// still bounds the sender's window to about twice the bandwidth × a microseconds-long round
/// trip and paces: the sender's segments wait in its socket's write queue and go out when an ACK
/// comes in, and over loopback an ACK is processed by the thread that sent it, the receiver's.
/// The receiver's socket thread then does the sender's transmit work on top of its copy and page
/// hash, and it is the thread that bounds the stream. Reno (or CUBIC) without losses leaves the
/// window growing, so the sender sends on its own thread. Measured with the stream bench, one
/// own-memory stream against the raw TCP copy with all threads under `SCHED_FIFO` (no thread
/// waiting for a CPU on a loaded machine): 0.57–0.75× raw at 1.30–1.48× its CPU with BBR,
/// 0.79–0.88× at 0.97–1.20× with reno, in five runs; on a nearly idle machine with ordinary
/// scheduling no difference was measured (both ~0.6×; BENCHMARKS.md, "Where the spliced copy's
/// receiver spends"). The raw copy's own speed did not change. Connections to other hosts keep
/// the system's choice.
pub const LOOPBACK_CONGESTION_CONTROL: &str = "reno";

/// Sets up a new TCP connection: `TCP_NODELAY`, and over loopback
/// [`LOOPBACK_CONGESTION_CONTROL`] (best effort: a kernel that refuses it keeps its default).
fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let local = s.local_addr().is_ok_and(|a| a.ip().is_loopback())
        && s.peer_addr().is_ok_and(|a| a.ip().is_loopback());
    if local {
        let cc = std::ffi::OsString::from(LOOPBACK_CONGESTION_CONTROL);
        if let Err(e) =
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::TcpCongestion, &cc)
        {
            tracing::debug!(error = %e, "loopback congestion control not set; the default stays");
        }
    }
    Ok(())
}

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
    /// not held back; over loopback with [`LOOPBACK_CONGESTION_CONTROL`]).
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Connection> {
        let s = TcpStream::connect(addr)?;
        tune_tcp(&s)?;
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
                    tune_tcp(&s)?;
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
            // A sender's socket names the receiver's path (as bound: a staging name stands for
            // the path it was published at); a receiver's peer is unnamed.
            Connection::Unix(s) => s
                .peer_addr()
                .ok()
                .and_then(|a| {
                    a.as_pathname()
                        .map(|p| format!("unix:{}", published_path(p).display()))
                })
                .unwrap_or_else(|| "unix peer".into()),
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
    /// no other user's process can become the sender.
    ///
    /// **The path appears only once the socket listens**: the socket is bound under a
    /// staging name beside it (`.NAME.PID.bind`, hidden), restricted, made to listen, and
    /// only then linked at `path` (the staging name removed), so a connect that finds the
    /// file is never refused for want of a listener, and no connection gets in before the
    /// socket is restricted. A file already at `path` is never replaced: that fails as a
    /// bind there would (`AddrInUse`). A path too long for its staging name in a socket
    /// address (108 bytes), or on a file system that refuses hard links, is bound in place,
    /// the file then existing a moment before the listen. A staging name left by a killed
    /// process that had this one's ID is removed first. The listener's [`address`](Listener::address), and the receiver a sender's
    /// [`Connection::peer`] names, are `path` either way.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        Listener::bind_unix_watched(path.as_ref(), |_| {})
    }

    /// [`Listener::bind_unix`], calling `before_listen` with the path the socket was bound
    /// at, between the bind and the listen (for a test to look at what a peer would see).
    fn bind_unix_watched(path: &Path, before_listen: impl FnOnce(&Path)) -> io::Result<Listener> {
        use nix::sys::socket::UnixAddr;
        let Some(staging) = staging_path(path).filter(|s| UnixAddr::new(s.as_path()).is_ok())
        else {
            return bind_listen(path, before_listen);
        };
        // The staging name carries this process's ID: a socket file there is a leftover of a
        // process that had the same ID and was killed between its bind and its link (a live
        // one of this process would be listed).
        if std::fs::symlink_metadata(&staging)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            && !Listener::unix_name_listed(&staging)?
        {
            let _ = std::fs::remove_file(&staging);
        }
        let listener = bind_listen(&staging, before_listen)?;
        match publish(&staging, path) {
            Ok(()) => Ok(listener),
            Err(e) => {
                drop(listener);
                let _ = std::fs::remove_file(&staging);
                match e.raw_os_error() {
                    // A file at `path`: refused, as a bind there would be.
                    Some(e_) if e_ == nix::errno::Errno::EADDRINUSE as i32 => Err(e),
                    // A file system without hard links (some FUSE ones): bound in place,
                    // where a connect between the bind and the listen is refused.
                    _ => bind_listen(path, |_| {}),
                }
            }
        }
    }

    /// Whether `/proc/net/unix` lists a socket bound at exactly `path`.
    fn unix_name_listed(path: &Path) -> io::Result<bool> {
        let table = procfs::net::unix().map_err(io::Error::other)?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(table
            .iter()
            .filter_map(|e| e.path.as_deref())
            .any(|p| p == path || p == absolute))
    }

    /// Whether a live socket in this network namespace is bound to `path`
    /// (`/proc/net/unix`): under that name, or under the staging name
    /// [`Listener::bind_unix`] bound it with before it listened. A socket bound with a
    /// relative path is listed as typed, from whichever directory: the same file name counts
    /// as in use, to be safe. For removing a socket file left by a receiver that was killed
    /// only when nothing holds it.
    pub fn unix_path_in_use(path: &Path) -> io::Result<bool> {
        let table = procfs::net::unix().map_err(io::Error::other)?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let name = path.file_name();
        Ok(table
            .iter()
            .filter_map(|e| e.path.as_deref())
            .map(published_path)
            .any(|p| p == path || p == absolute || (p.is_relative() && p.file_name() == name)))
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Connection> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                tune_tcp(&s)?;
                Connection::Tcp(s)
            }
            Listener::Unix(l) => Connection::Unix(l.accept()?.0),
        })
    }

    /// Accepts one connection, waiting at most `timeout` (`Ok(None)` if none
    /// came). The listener is polled every 10 ms meanwhile; the connection
    /// returned blocks as usual.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Connection>> {
        let nonblocking = |on: bool| match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        };
        nonblocking(true)?;
        let deadline = std::time::Instant::now() + timeout;
        let accepted = loop {
            match self.accept() {
                Ok(c) => break Ok(Some(c)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break Ok(None);
                    }
                    std::thread::sleep(left.min(Duration::from_millis(10)));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let restored = nonblocking(false);
        let conn = accepted?;
        restored?;
        // An accepted socket may inherit the listener's non-blocking mode.
        match &conn {
            Some(Connection::Tcp(s)) => s.set_nonblocking(false)?,
            Some(Connection::Unix(s)) => s.set_nonblocking(false)?,
            None => {}
        }
        Ok(conn)
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
                .and_then(|a| {
                    a.as_pathname()
                        .map(|p| published_path(p).display().to_string())
                })
                .unwrap_or_else(|| "unix socket".into()),
        }
    }
}

/// Suffix of the staging name of a Unix socket ([`Listener::bind_unix`]).
const STAGING_SUFFIX: &str = "bind";

/// The name [`Listener::bind_unix`] binds a socket for `path` under until it listens:
/// `.NAME.PID.bind` in the same directory (this process's id: two processes binding the same
/// path never share it). `None` for a path without a file name.
fn staging_path(path: &Path) -> Option<PathBuf> {
    let mut staged = OsString::from(".");
    staged.push(path.file_name()?);
    staged.push(format!(".{}.{STAGING_SUFFIX}", std::process::id()));
    Some(path.with_file_name(staged))
}

/// A Unix socket bound at `bound`, with mode 0600, listening; `before_listen` is called
/// between the bind and the listen. The file is removed again on failure.
fn bind_listen(bound: &Path, before_listen: impl FnOnce(&Path)) -> io::Result<Listener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    use std::os::unix::fs::PermissionsExt;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(bound)?)?;
    let ready =
        std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o600)).and_then(|()| {
            before_listen(bound);
            Ok(listen(&fd, Backlog::MAXCONN)?)
        });
    if let Err(e) = ready {
        let _ = std::fs::remove_file(bound);
        return Err(e);
    }
    Ok(Listener::Unix(UnixListener::from(fd)))
}

/// The path a Unix socket bound at `bound` is published at: the path its staging name
/// ([`staging_path`]) stands for, else `bound` itself (the kernel names a socket as it was
/// bound, whatever it was linked or renamed to since).
fn published_path(bound: &Path) -> PathBuf {
    let staged = bound.file_name().and_then(|n| {
        let n = n.as_bytes().strip_prefix(b".")?;
        let n = n
            .strip_suffix(STAGING_SUFFIX.as_bytes())?
            .strip_suffix(b".")?;
        let dot = n.iter().rposition(|&b| b == b'.')?;
        let (name, pid) = (&n[..dot], &n[dot + 1..]);
        (!name.is_empty() && !pid.is_empty() && pid.iter().all(u8::is_ascii_digit))
            .then(|| OsStr::from_bytes(name))
    });
    match staged {
        Some(name) => bound.with_file_name(name),
        None => bound.to_path_buf(),
    }
}

/// Links the listening socket bound at `staging` at `path`, never replacing a file there
/// (a hard link fails where `path` exists: `EADDRINUSE`, as a bind there would), then removes
/// the staging name (best effort: the socket listens at `path` either way).
fn publish(staging: &Path, path: &Path) -> io::Result<()> {
    std::fs::hard_link(staging, path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::from(nix::errno::Errno::EADDRINUSE),
        _ => e,
    })?;
    let _ = std::fs::remove_file(staging);
    Ok(())
}

/// What [`Sink::interrupter`] of a [`SocketSink`] acts on: a flag its
/// operations check, a handle to every connection, shut down at once so
/// a blocked read or write returns, and the rate limiter, cut so that a
/// writer waiting on it (no socket call, which the shutdown would end) returns too.
///
/// And what [`Sink::round_cutter`] acts on, which breaks nothing: a flag that makes the
/// writers drop the page frames of the round in progress they have not begun to write
/// (each recorded in `skipped`), and the rate limiter's wait ended for it.
#[derive(Debug, Default)]
pub(super) struct InterruptState {
    interrupted: AtomicBool,
    conns: Mutex<Vec<Connection>>,
    pacers: Mutex<Vec<RateLimiter>>,
    round_cut: AtomicBool,
    /// Memory offsets of the page frames dropped since the cut.
    skipped: Mutex<Vec<Range<u64>>>,
}

impl InterruptState {
    /// Cuts the round in progress (or the next one) short: the writers drop the page frames
    /// they have not begun to write, until [`InterruptState::uncut`].
    pub(super) fn cut_round(&self) {
        let pacers = self.pacers.lock().unwrap_or_else(PoisonError::into_inner);
        self.round_cut.store(true, Ordering::SeqCst);
        for p in pacers.iter() {
            p.skip_round(true);
        }
    }

    /// Rounds go whole again, and paced.
    pub(super) fn uncut(&self) {
        let pacers = self.pacers.lock().unwrap_or_else(PoisonError::into_inner);
        self.round_cut.store(false, Ordering::SeqCst);
        for p in pacers.iter() {
            p.skip_round(false);
        }
    }

    pub(super) fn round_is_cut(&self) -> bool {
        self.round_cut.load(Ordering::SeqCst)
    }

    /// A writer dropped the page frame of memory offsets `range` (the round was cut).
    pub(super) fn skipped(&self, range: Range<u64>) {
        let mut skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
        skipped.push(range);
    }

    /// The page frames dropped since the last call.
    pub(super) fn take_skipped(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *self.skipped.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        for p in self
            .pacers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            p.cut();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub(super) fn is_set(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Drops the handles to connections that are gone (before a resume
    /// registers the new ones).
    pub(super) fn forget(&self) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.pacers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Keeps a handle to the writers' rate limiter for [`InterruptState::interrupt`]; cuts
    /// it at once if the interrupt came first.
    pub(super) fn register_pacer(&self, pacer: &RateLimiter) {
        let mut pacers = self.pacers.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_set() {
            pacer.cut();
        }
        pacer.skip_round(self.round_is_cut());
        pacers.push(pacer.clone());
    }

    /// Keeps a handle to `conn` for [`InterruptState::interrupt`]; shuts it
    /// down at once if the interrupt came first.
    pub(super) fn register(&self, conn: &Connection) -> Result<(), TransferError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt::TcpCongestion};

    /// A staging name stands for the path it was made for, relative or absolute, whatever
    /// the file name holds; other names stand for themselves.
    #[test]
    fn a_staging_name_stands_for_its_path() {
        for path in [
            "/run/x/recv.sock",
            "sock",
            "a.b.1.bind",
            "/d/.hidden",
            "dir/x.123",
        ] {
            let path = Path::new(path);
            let staged = staging_path(path).unwrap();
            assert_eq!(staged.parent(), path.parent());
            assert_eq!(published_path(&staged), path);
            assert_eq!(published_path(path), path);
        }
        for other in [
            ".x.bind",
            "..1.bind",
            ".x.12a.bind",
            ".x.1.binds",
            "x.1.bind",
        ] {
            assert_eq!(published_path(Path::new(other)), Path::new(other));
        }
        assert_eq!(staging_path(Path::new("/")), None);
    }

    /// Between the bind and the listen, a peer finds no file at the path (a connect fails
    /// with "not found", never "refused"); once `bind_unix` returns, it connects.
    #[test]
    fn the_path_does_not_exist_between_the_bind_and_the_listen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let mut seen = None;
        let l = Listener::bind_unix_watched(&path, |bound| {
            seen = Some((
                bound.to_path_buf(),
                std::fs::symlink_metadata(&path).is_ok(),
                UnixStream::connect(&path).map_err(|e| e.kind()).map(drop),
            ));
        })
        .unwrap();
        let (bound, exists, connect) = seen.unwrap();
        assert_eq!(connect, Err(io::ErrorKind::NotFound));
        assert!(!exists, "the path exists before the socket listens");
        assert_ne!(bound, path, "bound under a staging name");
        assert!(Connection::connect_unix(&path).is_ok());
        assert!(!bound.exists(), "the staging name is removed");
        drop(l);
    }

    /// A staging name left by a killed process that had this one's ID (a socket file no
    /// socket is bound to) does not make the bind fail: it is removed, and the path listens.
    #[test]
    fn a_staging_name_left_by_a_killed_process_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let staging = staging_path(&path).unwrap();
        // A socket file nothing is bound to any more: bound, then closed.
        drop(std::os::unix::net::UnixListener::bind(&staging).unwrap());
        assert!(staging.exists());
        let l = Listener::bind_unix(&path).unwrap();
        assert!(Connection::connect_unix(&path).is_ok());
        assert!(!staging.exists(), "the staging name is removed");
        drop(l);
    }

    /// Both ends of a loopback TCP connection use the loopback congestion control, whatever the
    /// system's default (BBR on this project's test machine).
    #[test]
    fn loopback_tcp_uses_the_loopback_congestion_control() {
        let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
        let Listener::Tcp(t) = &l else { unreachable!() };
        let c = Connection::connect_tcp(t.local_addr().unwrap()).unwrap();
        let a = l.accept().unwrap();
        for conn in [&c, &a] {
            let Connection::Tcp(s) = conn else {
                unreachable!()
            };
            let cc = getsockopt(s, TcpCongestion).unwrap();
            assert_eq!(cc.to_str(), Some(LOOPBACK_CONGESTION_CONTROL), "{cc:?}");
            assert!(s.nodelay().unwrap());
        }
    }
}
