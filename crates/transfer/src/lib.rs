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
//! let summary = tx.finish(FinalCheck::Full)?; // waits for the receiver's DONE
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
//! `cargo bench -p precopy-transfer --bench stream` on the project machine
//! (2 cores, Linux 6.18, other builds running: load average 2-5, so figures
//! vary ±30 % run to run), 1 GiB of non-zero pages (half random, half a
//! repeated word), engine reading its own memory with `process_vm_readv` into a
//! [`MemorySink`] receiver; "vs raw" is a bare socket copy of the same bytes in
//! the same run (medians of 10):
//!
//! | config (TCP loopback) | GiB/s | vs raw |
//! |---|---|---|
//! | raw copy | 2.1–3.0 | 1.00 |
//! | 1 stream, no compression | 2.0 | 0.66–0.68 |
//! | 1 stream, lz4 | 1.9 | 0.62 |
//! | 1 stream, zstd(1) | 0.7–1.2 | 0.3–0.4 |
//! | 2 streams, no compression | 1.5–2.6 | 0.5–0.86 |
//! | 2 streams, lz4 | 1.1–2.3 | 0.4–1.06 |
//!
//! Unix socket: raw 3.0–4.6 GiB/s, engine 1.2–2.6 GiB/s (0.4–0.56x).
//! One core does CRC32C at ~12.5 GB/s, memcpy at ~10.5 GB/s and
//! `process_vm_readv` at ~4.5 GB/s: the engine adds a `process_vm_readv`
//! copy, two CRC passes and a verify-then-apply copy to the raw copy's two
//! kernel copies, and on two cores that extra work, not the socket, sets the
//! pace. Hence:
//!
//! - **Compression off** ([`Compression::None`]): on loopback every codec
//!   costs more CPU than the bytes it saves; lz4 pays off only on links slower
//!   than ~2 GB/s, zstd on links slower than ~1 GB/s. Choose per transfer.
//! - **One stream**: a second connection adds writer and receiver threads that
//!   compete for the same two cores; its results swing with load. More
//!   streams help when the link, not the CPU, is the limit, or with lz4.
//! - **64 pages per batch** (256 KiB): per-frame costs (two system calls, a
//!   32-byte header, an `Arc`) vanish at this size while memory in flight stays
//!   at a few MiB. (The bench's `PRECOPY_BENCH_FULL=1` sweep of 16/256/1024
//!   pages exists but was not run on the shared machine.)
//! - **Queue depth 4** batches per connection: memory in flight is bounded by
//!   `streams × (4 + 2) × batch`, and the sender blocks when the receiver
//!   falls behind.
//! - The receiver reads each socket on its own thread and verifies and
//!   applies on another (queue of 4 frames), so checksumming overlaps the
//!   kernel copy where cores allow.

pub mod auth;
pub mod buffer;
pub mod digest;
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
pub use digest::{FinalCheck, MemoryDigest, PageCrcs, PageFold};
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
