//! The socket side of sending: connections, the sender's handshake and the
//! [`SocketSink`] that writes page frames over one or more connections.
//!
//! Each connection gets a writer thread (compress, checksum, rate-limit,
//! write) fed by a bounded queue, and a watcher thread that reads whatever the
//! receiver says (an ERROR mid-stream, DONE at the end) so a rejection stops
//! the writer at once instead of after the next round.
//!
//! By concern: [`conn`] (TCP and Unix connections and listeners),
//! `handshake` (the sender's half of the handshake), `writer` (a
//! connection's writer thread and the watcher beside it), [`sink`] (the
//! [`SocketSink`] that drives them, and [`Sender`]).

pub mod conn;
mod handshake;
pub mod sink;
mod writer;

pub use conn::{Connection, Listener};
pub use sink::{Sender, SocketSink};
