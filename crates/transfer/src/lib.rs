//! precopy-transfer: turns the scanner's dirty ranges into bytes at a
//! destination — over TCP or Unix sockets, into a checkpoint image, or into
//! memory — without ever applying a page that was not meant to arrive.
//!
//! # Where a page goes
//!
//! ```text
//! scanner ranges ─► Transfer::send_dirty ─► PageSource::read_ranges ─► zero check
//!     (caller's thread: read after the round that reported the page returned)
//!   ─► Sink::send_pages / send_zero_range
//!        SocketSink: bounded queue ─► per-connection writer (compress, CRC32C, pace, write)
//!                      ─► Receiver (verify, layout check, barrier) ─► MemorySink / ImageWriter
//!        ImageWriter: append records to the image file
//!        MemorySink: copy into an anonymous mapping
//! ```
//!
//! Modules: [`layout`] (regions and offsets), [`source`] (reading pages,
//! the memory checksum), [`engine`] (rounds and batches), [`sink`] (the sink
//! trait, in-memory sink), [`protocol`] (wire format, drawn exchange and
//! receiver state machine), [`net`] (connections, socket sink),
//! [`receiver`], [`image`] (checkpoint image format, reader, verifier),
//! [`auth`] (shared key).
//!
//! # Using it
//!
//! Sender (migration driver):
//! ```no_run
//! # use precopy_transfer::*;
//! # fn main() -> Result<(), TransferError> {
//! let layout = Layout::single(4096, 0x7f00_0000_0000, 1 << 30)?;
//! let conn = Connection::connect_tcp("127.0.0.1:7000").map_err(|source| TransferError::Io { what: "connecting", source })?;
//! let mut tx = Sender::connect(vec![conn], layout, ProcessMemory::new(1234), &SenderConfig::default())?;
//! let first = tx.send_round(&[0x7f00_0000_0000..0x7f00_4000_0000])?; // round 0: everything
//! // ... scan, send_round(dirty) until converged, stop the source, last round ...
//! let summary = tx.finish_with_source_checksum()?; // waits for the receiver's DONE
//! # Ok(()) }
//! ```
//! Receiver:
//! ```no_run
//! # use precopy_transfer::*;
//! # fn main() -> Result<(), TransferError> {
//! let listener = Listener::bind_tcp("127.0.0.1:7000").map_err(|source| TransferError::Io { what: "listening", source })?;
//! let rx = Receiver::accept(&listener, &ReceiverConfig::default())?;
//! let mut dest = MemorySink::new(rx.layout().clone())?;
//! let report = rx.run(&mut dest)?;
//! # Ok(()) }
//! ```
//!
//! # Defaults, and the measurements behind them
//!
//! Measured with `cargo bench -p precopy-transfer --bench stream` on the
//! project machine (2 cores, Linux 6.18), 1 GiB of non-zero pages, engine with
//! `process_vm_readv` of its own memory into a [`MemorySink`] receiver:
//!
//! - **Compression off** ([`Compression::None`]): on loopback and on a 2-core
//!   machine every compressor costs more CPU than the bytes it saves; lz4 or
//!   zstd pay off only on links slower than they compress (see the bench's
//!   figures in the project notes). Choose per transfer.
//! - **One stream**: a second connection adds a second writer and receiver
//!   thread competing for the same two cores; more streams help only when
//!   the link, not the CPU, is the limit (or with compression).
//! - **64 pages per batch** (256 KiB): large enough that per-frame costs
//!   (two system calls, a header, an Arc) vanish, small enough to keep the
//!   pipeline's memory at a few MiB and the first frame early.
//! - **Queue depth 4** batches per connection: bounded memory in flight
//!   (`streams × (4 + 2) × batch`), and the sender blocks when the receiver
//!   falls behind.

pub mod auth;
pub mod buffer;
pub mod engine;
pub mod error;
pub mod image;
pub mod layout;
pub mod net;
pub mod protocol;
pub mod receiver;
pub mod sink;
pub mod source;

pub use auth::Key;
pub use buffer::PageBuf;
pub use engine::{Compression, RoundSent, SenderConfig, Transfer, TransferSummary};
pub use error::{ImageError, LayoutError, ProtocolError, SourceError, TransferError};
pub use image::{
    Image, ImageInfo, ImageWriter, RoundInfo, VerifyReport, image_cat, image_info, image_verify,
    parse_span,
};
pub use layout::{Layout, Region};
pub use net::{Connection, Listener, Sender, SocketSink};
pub use receiver::{ReceiveReport, Receiver, ReceiverConfig, receive_frames};
pub use sink::{MemorySink, MemoryStats, Sink};
pub use source::{PageSource, ProcessMemory, SliceSource, memory_checksum};
