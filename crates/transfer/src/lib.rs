//! precopy-transfer: turns the scanner's dirty ranges into bytes at a
//! destination — over TCP or Unix sockets, into a checkpoint image, or into
//! memory — without ever applying a page that was not meant to arrive.
//!
//! # Where a page goes
//!
//! ```text
//! scanner ranges ─► Transfer::send_dirty ─► PageSource::read_ranges (or lend) ─► zero check, page hash
//!     (caller's thread: read after the round that reported the page returned;
//!      the page's XXH3-64 goes into the sender's PageHashes table)
//!   ─► Sink::send_pages / send_zero_range (pages + their hashes)
//!        SocketSink: bounded queue ─► per-connection writer (compress, or list the
//!                    page hashes after the pages, frame CRC over header + list, pace, write)
//!                      ─► Receiver (verify each page once, layout check, barrier)
//!                           ─► MemorySink (fresh pages: read in place) / ImageWriter
//!        ImageWriter: append records to the image file
//!        MemorySink: copy into an anonymous mapping
//!   finish: XXH3-64 of the PageHashes table at each end, compared (digest)
//! ```
//!
//! Modules: [`layout`] (regions and offsets), [`source`] (reading pages,
//! the memory checksum), [`digest`] (the page hash, page-hash tables,
//! the memory digest and [`FinalCheck`]), [`engine`] (rounds and batches), [`sink`] (the sink
//! trait, in-memory sink), `protocol` (crate-private: one type per frame
//! kind, the drawn exchange; public under the `fuzzing` feature), [`codec`]
//! (compression), [`net`] (connections, socket sink), [`receiver`] (and its
//! drawn state machine), [`image`] (checkpoint image: writer, reader,
//! verifier, info), [`live`] (own memory sent without a copy), [`auth`]
//! (shared key).
//!
//! # Using it
//!
//! Sender (migration driver):
//! ```no_run
//! # use precopy_transfer::*;
//! # fn main() -> Result<(), TransferError> {
//! let layout = Layout::single(4096, 0x7f00_0000_0000, 1 << 30)?;
//! let conn = Connection::connect_tcp("127.0.0.1:7000").map_err(|source| TransferError::Io { what: "connecting", source })?;
//! // Every TCP receiver requires the key, loopback included.
//! let config = SenderConfig { key: Some(Key::from_file("transfer.key".as_ref())?), ..SenderConfig::default() };
//! let mut tx = Sender::connect(vec![conn], layout, ProcessMemory::new(1234), &config)?;
//! let first = tx.send_round(&[0x7f00_0000_0000..0x7f00_4000_0000])?; // round 0: everything
//! // ... scan, send_round(dirty) until converged, stop the source, last round ...
//! let summary = tx.finish(FinalCheck::Recorded)?; // waits for the receiver's DONE, then commits
//! # Ok(()) }
//! ```
//! Receiver:
//! ```no_run
//! # use precopy_transfer::*;
//! # fn main() -> Result<(), TransferError> {
//! let listener = Listener::bind_tcp("127.0.0.1:7000").map_err(|source| TransferError::Io { what: "listening", source })?;
//! let config = ReceiverConfig { key: Some(Key::from_file("transfer.key".as_ref())?), ..ReceiverConfig::default() };
//! let rx = Receiver::accept(&listener, &config)?;
//! let mut dest = MemorySink::new(rx.layout().clone())?;
//! let report = rx.run(&mut dest)?;
//! # Ok(()) }
//! ```
//!
//! # Defaults, and the measurements behind them
//!
//! `cargo bench -p precopy-transfer --bench stream` on the project machine
//! (2 cores, Linux 6.18, shared: figures vary ±15 % run to run), 1 GiB of
//! non-zero pages (half random, half a repeated word), engine reading its own
//! memory with `process_vm_readv` into a [`MemorySink`] receiver; "vs raw" is
//! a bare socket copy of the same bytes in the same run, CPU is user + system
//! seconds per GiB over both ends (medians of 10; BENCHMARKS.md has the runs):
//!
//! | config (TCP loopback) | GiB/s | vs raw | CPU s/GiB | wire/memory |
//! |---|---|---|---|---|
//! | raw copy | 2.6 | 1.00 | 0.56 | 1.00 |
//! | 1 stream, no compression | 1.8 | 0.69 | 0.82 | 1.00 |
//! | 1 stream, lz4 | 0.85 | 0.33 | 2.1 | 0.51 |
//! | 1 stream, zstd(1) | 0.6 | 0.23 | 2.5 | 0.50 |
//! | 2 streams, no compression | 2.0 | 0.77 | 0.91 | 1.00 |
//! | 2 streams, lz4 | 0.9 | 0.34 | 2.1 | 0.51 |
//!
//! Unix socket: raw 3.4 GiB/s, engine 2.1 GiB/s (0.62x). Both ends are
//! CPU-bound on two cores (raw keeps ~1.5 cores busy, so does the engine), so
//! the ratio is about the ratio of CPU per byte. What the engine adds to the
//! raw copy's two kernel copies: the `process_vm_readv` copy that reads the
//! source safely while it is written (~0.25 CPU s/GiB here, by far the
//! largest), one hash pass per page at each end (then a CRC32C, since
//! replaced by XXH3-64; see BENCHMARKS.md for the figures after the change), and for pages that already hold data at the
//! destination, a copy from the frame buffer (fresh pages are read in place).
//! Across a veth pair shaped to 2 Gbit/s (`scripts/bench-netns.sh`) one
//! stream matches the raw copy (1.00x), lz4 carries 1.84x and zstd(1) 1.96x
//! what the raw copy does. Hence:
//!
//! - **Compression off** ([`Compression::None`]): on loopback every codec
//!   costs more CPU than the bytes it saves. On a link slower than what the
//!   codec sustains (lz4 ~0.85 GiB/s, zstd(1) ~0.6 GiB/s of memory on this
//!   machine) and with compressible memory, turn it on: it doubled what a
//!   2 Gbit/s link carried. Choose per transfer.
//! - **One stream**: a second connection adds writer and receiver threads that
//!   compete for the same two cores and gains 5–10 %, within the noise of
//!   this machine; it costs more CPU per byte and gives up reading in place.
//!   More streams help when the link, not the CPU, is the limit.
//! - **64 pages per batch** (256 KiB): per-frame costs (two system calls, a
//!   32-byte header, an `Arc`) vanish at this size while memory in flight stays
//!   at a few MiB, and a batch stays in cache between the read and its hash.
//!   (The bench's `PRECOPY_BENCH_FULL=1` sweep of 16/256/1024 pages exists
//!   but was not run on the shared machine.)
//! - **Queue depth 4** batches per connection: memory in flight is bounded by
//!   `streams × (4 + 2) × batch`, and the sender blocks when the receiver
//!   falls behind.
//! - The receiver reads a single connection on one thread, straight into
//!   destination pages that hold nothing yet ([`Sink::lend_pages`]); with
//!   several connections each socket is read on its own thread and frames
//!   are verified and applied on another (queue of 4 frames).

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

pub mod auth;
pub mod buffer;
pub mod codec;
pub mod digest;
pub mod engine;
pub mod error;
pub mod image;
mod kind;
pub mod layout;
pub mod live;
pub mod net;
/// The wire format: crate-private, public only with the `fuzzing` feature
/// (fuzz targets and the tests that craft hostile frames).
#[cfg(feature = "fuzzing")]
pub mod protocol;
#[cfg(not(feature = "fuzzing"))]
pub(crate) mod protocol;
pub mod receiver;
pub mod sink;
pub mod source;

pub use auth::Key;
pub use buffer::PageBuf;
pub use codec::Compression;
pub use digest::{FinalCheck, MemoryDigest, PageHash, PageHashes, page_hash};
pub use engine::{RoundSent, SenderConfig, Transfer, TransferSummary};
pub use error::{
    ImageError, LayoutError, ProtocolError, ResumeRefusal, SourceError, SpaceFor, TransferError,
    Unreadable,
};
pub use image::{
    AddedRegion, AddressKind, CompactionInfo, CompactionPolicy, Image, ImageInfo, ImageReservation,
    ImageWriter, MappedRange, ProcessDescription, PublishGate, RegionInfo, RoundInfo, VerifyReport,
    image_cat, image_info, image_verify, not_regular, parse_span,
};
pub use kind::FrameKind;
pub use layout::{Backing, Layout, MemoryRegion};
pub use live::{LivePages, OwnMemory};
pub use net::{Connection, Listener, Sender, SocketSink};
/// The largest state blob a migration carries (16 MiB): its STATE frame's payload limit.
pub use protocol::MAX_STATE_LEN;
pub use receiver::{
    DEFAULT_RECEIVE_TIMEOUT, FinalRaiseReport, ReceiveReport, Receiver, ReceiverConfig,
    receive_frames,
};
pub use sink::{Interrupt, MemorySink, MemoryStats, Pacing, RegionMemory, ResumePoint, Sink};
pub use source::{PageSource, ProcessMemory, SliceSource, memory_checksum};
