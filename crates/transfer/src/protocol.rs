//! The precopy wire protocol, version 7: one type per frame kind, each
//! encoded and decoded here and nowhere else.
//!
//! This module owns the byte layout of everything that crosses a connection
//! and of checkpoint image records (an image is a stream of the same frames,
//! see [`crate::image`]). The receiver ([`crate::receiver`]) and the image
//! reader decode frames with the same types: [`RoundBegin`], [`Pages`],
//! [`Zero`], [`RoundEnd`], [`State`], [`Finish`], ... It never touches
//! destination memory, and nothing outside it reads a header byte.
//! Reading and writing frames on a byte stream, with their checksums, is
//! [`stream`]; compression of PAGES payloads is [`crate::codec`].
//!
//! Crate-private: an embedder uses [`Sender`](crate::Sender),
//! [`Receiver`](crate::Receiver) and [`Image`](crate::Image). The `fuzzing`
//! cargo feature makes it public for the fuzz targets and the tests that
//! craft hostile frames.
//!
//! # Preamble and frames
//!
//! Each side of a connection starts with a 16-byte preamble, then frames:
//!
//! ```text
//! preamble: magic "PRECOPY\0" (8) | version u32 LE (= 7) | reserved u32 (= 0)
//!
//! frame header (RawHeader), 32 bytes, little-endian:
//!   0  u8      kind          (FrameKind)
//!   1  u8      codec         (PAGES only: 0 none, 1 lz4 block, 2 zstd; else 0)
//!   2  u8      flags         (PAGES only: bit 0 live frame, see below and [`crate::live`]; else 0)
//!   3  u8      reserved      (0)
//!   4  u32     payload_len   (bytes following the header, <= MAX_PAYLOAD)
//!   8  [u8;20] fields        the kind's own header fields, table below
//!  28  u32     crc           CRC32C of header bytes 0..28 followed by the payload
//!                               (uncompressed PAGES: by the page-hash list only, below)
//! ```
//!
//! Every kind's fields share one shape: a u64 at bytes 8..16, a u64 at
//! 16..24 and a u32 at 24..28 of the header (each a `zerocopy` struct below;
//! unused slots are written as zeros).
//!
//! | kind (type) | dir | u64 @8 | u64 @16 | u32 @24 | payload |
//! |---|---|---|---|---|---|
//! | 1 HELLO ([`Hello`]) | S→R | session id | flags: bit 0 resume ([`HELLO_RESUME`]) | – | stream_index u32, stream_count u32, nonce \[16\], n u32, 0 u32, n × region (32 bytes, below) |
//! | 2 CHALLENGE ([`Challenge`]) | R→S | bit 0: key required | – | – | nonce \[16\] |
//! | 3 AUTH ([`Auth`]) | S→R | – | – | – | HMAC-SHA256 (32) or empty |
//! | 4 WELCOME ([`Welcome`]) | R→S | – | – | – | HMAC-SHA256 (32) or empty |
//! | 5 ROUND_BEGIN ([`RoundBegin`]) | S→R | round | pages the round holds at most, connection 0 only (0: not stated) | flags: bit 0 final round ([`ROUND_FINAL`]) | – |
//! | 6 PAGES ([`Pages`]) | S→R | offset in region | raw length | region id | uncompressed: the pages, then the hash of each (u64 LE); compressed: the pages compressed per `codec` |
//! | 7 ZERO ([`Zero`]) | S→R | offset in region | length | region id | – |
//! | 8 ROUND_END ([`RoundEnd`]) | S→R | round | pages on this stream | – | zero pages on this stream, u64 |
//! | 9 FINISH ([`Finish`]) | S→R | rounds sent | memory digest | check: 0 recorded, 1 full | – |
//! | 10 DONE ([`Done`]) | R→S | pages applied | memory digest | – | – |
//! | 11 ERROR ([`ErrorFrame`]) | both | – | – | error code | UTF-8 message |
//! | 12 INDEX ([`Index`]) | image | – | – | – | n × (region id u32, 0 u32, offset u64, length u64, file offset u64 or `u64::MAX` for zeros) |
//! | 13 TRAILER ([`Trailer`]) | image | index offset | trailer offset | – | memory digest, u64 |
//! | 14 STATE ([`State`]) | S→R | blob length | – | CRC32C of the blob | the VMM's state blob (vCPU and device state) |
//! | 15 COMMIT ([`Commit`]) | S→R | memory digest | – | – | – |
//! | 16 PING ([`Ping`]) | S→R | token | – | – | – |
//! | 17 PONG ([`Pong`]) | R→S | token of the PING | – | – | – |
//! | 18 RESUME ([`Resume`]) | R→S | next round | pages per block | – | n × u64 block digest |
//! | 19 REGION ([`Region`]) | S→R, image | – | – | – | one region (32 bytes, as in HELLO) |
//! | 20 COMPACTED ([`Compacted`]) | image | rounds the next round stands for | file bytes dropped so far | compactions so far | n × u64: for each REGION before it, the round it was added before |
//! | 21 MAPPED ([`Mapped`]) | S→R (connection 0), image | – | – | – | n × (region id u32, 0 u32, offset u64, length u64): the memory that exists now |
//!
//! A HELLO region is `id u32 | backing u8 (0 unstated, 1 anonymous, 2 memfd,
//! 3 hugetlb, 4 file) | flags u8 (bit 0: guest address present) | 0 u16 |
//! size u64 | page size u64 | guest-physical address u64`. The wire page
//! size is the smallest region page size ([`Layout::page_size`]).
//!
//! Pages are named by **region id and offset inside the region**, never by a
//! host address: the receiver places them through the announced [`Layout`]
//! into whatever memory its side mapped for that region, and rejects anything
//! outside it ([`Pages::place`], [`PageSpan::place`]). PAGES and ZERO frames
//! always cover whole pages inside one region. A ZERO frame stands for pages that read as all
//! zeros (including pages dropped with `MADV_DONTNEED`); the receiver writes
//! zeros there.
//!
//! An **uncompressed PAGES frame** carries its pages followed by their
//! **page-hash list**: the [`PageHash`](crate::digest::PageHash) (XXH3-64) of
//! each page as the sender took it, u64 LE each. Its frame CRC covers the
//! header and the list, not the pages; the receiver hashes each page (it
//! needs the hash for its table anyway) and compares it with the list, so one
//! pass over the bytes checks the frame and yields the hashes both ends
//! record. A page that differs from its listed hash fails the frame
//! ([`ProtocolError::BadPageHash`]), except in a **live** frame (flags bit 0,
//! [`LIVE_FRAME`]; uncompressed only): its pages were read by the sender's
//! kernel straight from memory that may change meanwhile, and
//! [`crate::live`] says what the receiver does with one that differs. A
//! compressed PAGES frame has no list: its CRC covers header and compressed
//! payload, and the receiver hashes the pages it decompressed. Images never
//! hold live or compressed frames.
//!
//! # The exchange
//!
//! ```text
//! Sender (per connection)                          Receiver
//!   preamble, HELLO(layout, page size, nonce_s) ──►
//!                                               ◄── preamble, CHALLENGE(key required?, nonce_r)
//!   AUTH(HMAC(key, "sender" | nonce_r | nonce_s | session | index)) ──►
//!                                               ◄── WELCOME(HMAC(key, "receiver" | nonce_s | nonce_r | session | index))
//!                                                   (or ERROR, and the connection closes;
//!                                                   ERROR code BUSY: a receiver busy with
//!                                                   another transfer, which takes one at a time)
//!   ┌ for each round r = 0, 1, 2, ... on every connection:
//!   │ ROUND_BEGIN(r)
//!   │ PAGES / ZERO ...      (each page at most once per round, on one connection)
//!   └ ROUND_END(r, counts)  ── receiver: all connections meet at a barrier
//!   REGION(region) ──►      (between rounds, on every connection: memory mapped since the
//!                            start, laid out after the regions before it)
//!   MAPPED(spans) ──►       (between rounds, connection 0 only: the memory that exists now;
//!                            pages outside it were unmapped by the source and are dropped)
//!   PING(token) ──►         (between rounds, any number)
//!                                               ◄── PONG(token)
//!   STATE(blob, crc)  ──►   (connection 0 only, at most once; the sink gets it now)
//!   FINISH(rounds, checksum) ──►
//!                                               ◄── DONE(pages, checksum)  or  ERROR(code, message)
//!   COMMIT(checksum) ──►                            (only if DONE came in time: the receiver's copy
//!                                                    is complete only now)
//! ```
//!
//! HELLO's flags are 0 for a new transfer: a stream that never resumes is
//! byte for byte what it was before resuming existed.
//!
//! The receiver's per-connection state machine, which decides which of these
//! frames it accepts when, is drawn in [`crate::receiver`] next to its
//! `State` type.
//!
//! COMMIT is the second half of a two-phase end. The source may give up on a
//! destination that acknowledged too late (it already resumed its workload,
//! see `precopy-migrate`'s final-round bound); a receiver that sent DONE but
//! sees the connection close instead of COMMIT must not treat its copy as
//! complete. (If the connection breaks after the source wrote COMMIT but
//! before it arrives, the source reports success and the receiver failure:
//! the one window two-phase ends leave, as in any such protocol.)
//!
//! A receiver tells a sender that ended the transfer from a broken connection by where
//! the stream stops: at a frame boundary, the sender closed its connection between frames
//! (it gave up, e.g. past its final-round bound after DONE, was interrupted, or exited:
//! [`ProtocolError::SenderClosed`](crate::ProtocolError::SenderClosed)); inside a frame, the
//! connection was cut mid-frame ([`ProtocolError::Truncated`](crate::ProtocolError::Truncated)),
//! or reset. A sender interrupted while writing a frame looks like the second. (ERROR goes
//! both ways, but a sender that gives up writes none: its writers may be inside a frame.)
//!
//! Several connections may carry one transfer (HELLO's `stream_count`), all
//! with the same session id. A round's pages are spread over them; the
//! receiver lets no connection apply round `r + 1` before every connection
//! has applied all of round `r`, so an older copy of a page never overwrites a
//! newer one. Within a connection frames apply in order, so a page sent in two
//! rounds simply ends up with its last copy.
//!
//! # Resuming
//!
//! A receiver run with a listener to come back on
//! ([`Receiver::run_resumable`](crate::Receiver::run_resumable)) whose
//! connections break (end of stream, reset, broken pipe; not a fault in a
//! frame) before COMMIT, or whose sender comes back on new connections (its
//! path went silent), keeps what it applied (and forgets a STATE and FINISH
//! already received: the sender sends them again) and waits, for a bounded time
//! ([`ReceiverConfig::resume_wait`](crate::ReceiverConfig::resume_wait)), for
//! the same sender: every connection again, each with a HELLO carrying
//! [`HELLO_RESUME`], the **same session id**, layout and stream count, and a
//! valid key proof. The proof covers the session id and fresh nonces, so
//! only a holder of the key can take the session over; a connection that
//! fails any of this gets an ERROR (code [`error_code::RESUME`] naming why,
//! or [`error_code::AUTH`]) and the wait goes on. Once all are back it sends
//! RESUME on connection 0: the next round it expects (the rounds every
//! connection completed) and, for each block of `pages per block` pages in
//! layout order ([`resume_block_pages`]), the XXH3-64 of the block's recorded
//! page hashes as u64 LE ([`crate::digest::PageHashes::block_digests`]). The
//! sender compares them with the same digests of its own table and sends
//! every block that differs again in its next round, with the pages of the
//! round that failed. A round cut half-way is never completed: the pages it
//! applied stay (each was checked before it was applied), and a later copy
//! of a page wins as always. The final digest check proves the result.
//!
//! ```text
//!  Idle(n) or InRound(n) ──connections break, no STATE/FINISH yet──► Waiting(next = rounds completed)
//!  Waiting ──every connection back (HELLO_RESUME, same session, layout, streams; key proven)──►
//!          RESUME(next, block digests) on connection 0 ──► Idle(next) on every connection
//!  Waiting ──resume_wait passes──► Failed (ResumeTimedOut)
//! ```
//!
//! A HELLO with [`HELLO_RESUME`] to a receiver holding no such session, and a
//! new HELLO to a receiver waiting for a resume, are refused
//! ([`ResumeRefusal`](crate::error::ResumeRefusal)). Images never hold a resume HELLO or RESUME.
//!
//! # Checks
//!
//! Every frame is read completely and its CRC checked before anything looks
//! at its fields, so a damaged frame is never applied; the pages of an
//! uncompressed PAGES frame are checked against its hash list (above). The
//! memory digest (XXH3-64 of the page hashes in layout order, 64 bits, see
//! [`crate::digest`]) is checked before DONE: against the page hashes the
//! receiver recorded, and with FINISH's check = 1 ([`FinalCheck::Full`]) also
//! against the destination's memory read anew.
//!
//! Version 1 carried a CRC32C of the memory bytes themselves in FINISH,
//! version 2 named pages by the source's host addresses and had no STATE,
//! version 3 checked pages with a CRC32C each (folded into the frame CRC)
//! and had 32-bit digests, version 4 had no REGION (its layout was fixed
//! at the start), version 5 had no MAPPED (memory the source unmapped
//! kept its last copy at the destination), and version 6 did not mark the
//! final round (its ROUND_BEGIN u32 was always 0 and a version 6 receiver
//! ignores it, so a version 7 sender would silently never raise it); all are
//! refused in the handshake ([`ProtocolError::OldVersion`], and an older
//! build refuses version 7 as unknown).
//!
//! # The final round
//!
//! The sender sets [`ROUND_FINAL`] in the ROUND_BEGIN of the round it sends
//! with its workload paused, on every connection (a final round retried after
//! a resume carries it again). Nothing about applying the round changes: the
//! flag tells the receiver that downtime has begun, so that it may run its
//! threads for the rest of the transfer (the round, STATE, FINISH, DONE,
//! COMMIT) at a real-time priority
//! ([`ReceiverConfig::final_priority`](crate::ReceiverConfig::final_priority))
//! and put them back when the transfer ends, completed, failed or cut.
//! Rounds sent in a pause probe (a rehearsal, the workload resumed right
//! after) do not carry it. Images never hold it (an image records rounds as
//! the sender numbered them, not when they were sent).
//!
//! # Memory unmapped mid-stream
//!
//! A source whose memory shrinks (an attached process that unmaps memory)
//! sends a MAPPED frame between rounds, on connection 0 (the receiver's
//! round barriers order it against every connection's rounds): the spans of
//! its layout that exist now, whole pages, each inside one region, in
//! layout order. Every page outside them is dropped at both ends: it reads
//! as never sent (zeros) and its page-hash table entry is that of a zero
//! page, so the memory digest of both ends agrees. A page dropped and later
//! mapped again is simply sent again. The receiver hands the spans to its
//! sink (`Sink::retain`): an image records them (the final mappings), memory
//! a destination mapped is zeroed there.
//!
//! # Regions added mid-stream
//!
//! A source whose memory grows while it is sent (a process that maps new
//! memory) announces each new region with a REGION frame between rounds, on
//! every connection, before any page of it. The region takes the next id
//! (larger than every id before it), so it is laid out after all regions
//! known so far: no memory offset, page-hash table entry or RESUME block of
//! the earlier regions moves, and the new region's pages are appended to the
//! tables both ends keep ([`crate::digest::PageHashes::grow`]). The receiver
//! applies it at the round barrier, once every connection delivered the same
//! REGION ([`Region::add_to`]); its sink must be able to grow
//! (`Sink::add_region`: an image writer can, memory a destination mapped for
//! a fixed layout cannot, and the transfer fails with the sink's error). A
//! transfer whose layout grew is not resumed after a break: a receiver that
//! can resume holds memory sized for the first layout (its sink tells what it
//! holds), which cannot grow.
//!
//! # Authentication
//!
//! A receiver that listens on TCP requires a key, loopback included (any
//! local user can connect to a loopback port; a Unix socket is created
//! owner-only instead); the challenge-response above proves both ends hold
//! it without sending it. It authenticates the peer, it does not encrypt or
//! sign the page stream: run over a trusted network or a tunnel when an
//! active attacker is a concern.

pub mod stream;

use std::borrow::Cow;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::codec::Codec;
use crate::digest::{FinalCheck, PAGE_HASH_LEN};
use crate::error::ProtocolError;
pub use crate::kind::FrameKind;
use crate::layout::{Backing, Layout, MAX_REGIONS, MemoryRegion};
pub use stream::{FrameReader, FrameWriter, verify_frame_pages, verify_hashed_list};

/// The first eight bytes of every precopy stream and image.
pub const MAGIC: [u8; 8] = *b"PRECOPY\0";
/// The protocol version this build speaks.
pub const VERSION: u32 = 7;
/// Bytes in the preamble.
pub const PREAMBLE_LEN: usize = 16;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// Bytes of a header's kind-specific fields.
pub const FIELDS_LEN: usize = 20;
/// Header bytes the frame CRC covers (all but the CRC itself).
const SEALED_LEN: usize = HEADER_LEN - 4;
/// Largest raw (uncompressed) length of one PAGES frame.
pub const MAX_PAGES_LEN: u64 = 16 << 20;
/// Largest state blob a STATE frame carries.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// Largest payload of any frame: a PAGES frame or a state blob (a HELLO with
/// [`MAX_REGIONS`] regions is smaller).
pub const MAX_PAYLOAD: u64 = MAX_STATE_LEN;
const _: () = assert!(
    MAX_PAYLOAD >= MAX_PAGES_LEN
        && MAX_PAYLOAD >= (size_of::<HelloFixed>() + size_of::<HelloRegion>() * MAX_REGIONS) as u64
);
/// ROUND_BEGIN flags (u32 @24), bit 0: the final round (see "The final round" in the
/// module docs).
pub const ROUND_FINAL: u32 = 1;
/// PAGES header flags, bit 0: a live frame (see the module docs).
pub const LIVE_FRAME: u8 = 1;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes in an authentication code.
pub const MAC_LEN: usize = 32;

/// Codes carried by ERROR frames.
///
/// The set is open within a version: a peer decodes an ERROR whatever its code
/// ([`ErrorFrame`]'s decode is lenient) and reports its message, so a code added
/// later needs no new version. [`BUSY`](error_code::BUSY) came within version 7: a
/// version 7 sender from before it reports "peer reported an error: this receiver is
/// busy with another transfer ...", where a newer one says the same in its own words
/// (`TransferError::ReceiverBusy`). A sender must not stop at a code it does not know.
pub mod error_code {
    /// The peer broke the protocol (damaged or unexpected frame).
    pub const PROTOCOL: u32 = 1;
    /// Authentication failed or was required.
    pub const AUTH: u32 = 2;
    /// The destination's memory checksum did not match.
    pub const CHECKSUM: u32 = 3;
    /// Unsupported version or page size.
    pub const INCOMPATIBLE: u32 = 4;
    /// The receiver's destination failed.
    pub const DESTINATION: u32 = 5;
    /// A resume the receiver cannot honour (see "Resuming" in the module
    /// docs); the message names why.
    pub const RESUME: u32 = 6;
    /// The receiver is busy with another transfer and takes one at a time
    /// ([`Receiver::accept`](crate::Receiver::accept) while it gathers the first sender's
    /// connections, [`Receiver::run_refusing_others`](crate::Receiver::run_refusing_others)):
    /// the answer, in place of WELCOME, to another sender's AUTH, its key proven.
    pub const BUSY: u32 = 7;
}

/// The 16-byte preamble of this version.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(&MAGIC);
    p[8..12].copy_from_slice(&VERSION.to_le_bytes());
    p
}

/// Checks a preamble: magic, then version.
pub fn check_preamble(p: &[u8; PREAMBLE_LEN]) -> Result<(), ProtocolError> {
    let mut found = [0u8; 8];
    found.copy_from_slice(&p[..8]);
    if found != MAGIC {
        return Err(ProtocolError::BadMagic { found });
    }
    let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if (1..VERSION).contains(&version) {
        return Err(ProtocolError::OldVersion {
            version,
            supported: VERSION,
        });
    }
    if version != VERSION {
        return Err(ProtocolError::UnknownVersion {
            version,
            supported: VERSION,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The fixed header.

/// A frame header exactly as it lies on the wire (see the module docs).
/// Nothing in it is trusted until [`RawHeader::decode`] and the CRC check
/// ([`stream`]) have passed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    kind: u8,
    codec: u8,
    flags: u8,
    reserved: u8,
    payload_len: U32,
    fields: [u8; FIELDS_LEN],
    crc: U32,
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

impl RawHeader {
    /// A header for `kind` with `fields`, its CRC not yet set.
    fn unsealed(kind: FrameKind, codec: u8, fields: [u8; FIELDS_LEN], payload_len: usize) -> Self {
        RawHeader {
            kind: kind as u8,
            codec,
            flags: 0,
            reserved: 0,
            payload_len: U32::new(payload_len as u32),
            fields,
            crc: U32::ZERO,
        }
    }

    /// The kind byte (unchecked).
    pub fn kind_byte(&self) -> u8 {
        self.kind
    }

    /// Whether it announces a live PAGES frame (unchecked).
    pub fn is_live(&self) -> bool {
        self.kind == FrameKind::Pages as u8 && self.flags & LIVE_FRAME != 0
    }

    /// Whether it announces an uncompressed PAGES frame, whose payload is
    /// pages and their hash list (unchecked).
    pub fn is_listed(&self) -> bool {
        self.kind == FrameKind::Pages as u8 && self.codec == Codec::None as u8
    }

    /// For an uncompressed PAGES frame: the length of its pages and of its
    /// hash list, if they add up to the payload length with pages of `ps`
    /// bytes.
    pub fn listed_lengths(&self, ps: u64) -> Option<(u64, u64)> {
        let span: SpanFields = zerocopy::transmute!(self.fields);
        let len = span.len.get();
        let list = len.checked_div(ps)?.checked_mul(PAGE_HASH_LEN as u64)?;
        let whole =
            len.is_multiple_of(ps) && len.checked_add(list) == Some(u64::from(self.payload_len()));
        whole.then_some((len, list))
    }

    /// For PAGES: the raw length of its pages (unchecked).
    pub fn pages_len(&self) -> u64 {
        let span: SpanFields = zerocopy::transmute!(self.fields);
        span.len.get()
    }

    /// The payload length it announces (unchecked).
    pub fn payload_len(&self) -> u32 {
        self.payload_len.get()
    }

    /// The CRC it carries.
    pub fn stored_crc(&self) -> u32 {
        self.crc.get()
    }

    /// CRC32C of the header bytes the frame CRC covers: the start of the
    /// frame CRC, which the payload (or the page-hash list) then extends.
    pub fn crc_start(&self) -> u32 {
        crc32c::crc32c(&self.as_bytes()[..SEALED_LEN])
    }

    /// This header with its CRC set to `crc`.
    fn sealed(mut self, crc: u32) -> RawHeader {
        self.crc = U32::new(crc);
        self
    }

    /// The header sealed with the CRC of itself and `payload`.
    fn seal_over(self, payload: &[u8]) -> RawHeader {
        let crc = crc32c::crc32c_append(self.crc_start(), payload);
        self.sealed(crc)
    }

    /// The header's 32 bytes.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(*self)
    }

    /// Decodes the kind and the reserved bytes of the header found at stream
    /// `offset`, without looking at its CRC (for a caller that must decide
    /// where a payload goes before it can check the frame; the reader's
    /// verifying functions decode only after the CRC matched).
    pub fn decode(&self, offset: u64) -> Result<Header, ProtocolError> {
        let kind = FrameKind::from_u8(self.kind).ok_or(ProtocolError::UnknownFrame {
            offset,
            kind: self.kind,
        })?;
        let live =
            self.flags == LIVE_FRAME && kind == FrameKind::Pages && self.codec == Codec::None as u8;
        if (self.flags != 0 && !live) || self.reserved != 0 {
            return Err(ProtocolError::Malformed {
                offset,
                kind,
                reason: "reserved header bytes are not zero",
            });
        }
        Ok(Header {
            offset,
            kind,
            codec: self.codec,
            flags: self.flags,
            payload_len: self.payload_len.get(),
            fields: self.fields,
        })
    }
}

/// A decoded (and, coming from [`stream`], checksum-verified) frame header:
/// its kind and the raw fields that kind's type decodes
/// ([`Header::decode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stream offset of the header's first byte.
    pub offset: u64,
    /// The frame kind.
    pub kind: FrameKind,
    /// The codec byte (meaningful for PAGES only).
    pub codec: u8,
    /// The flags byte (PAGES only: [`LIVE_FRAME`]).
    pub flags: u8,
    /// Payload length.
    pub payload_len: u32,
    fields: [u8; FIELDS_LEN],
}

impl Header {
    /// Decodes this frame as `F` with its `payload` (at least
    /// `payload_len` bytes; more are ignored). A frame of another kind is
    /// [`ProtocolError::Unexpected`].
    pub fn decode<'p, F: Frame<'p>>(&self, payload: &'p [u8]) -> Result<F, ProtocolError> {
        self.expect(F::KIND)?;
        let n = (self.payload_len as usize).min(payload.len());
        F::decode(self, &payload[..n])
    }

    /// Requires kind `kind`.
    pub fn expect(&self, kind: FrameKind) -> Result<(), ProtocolError> {
        if self.kind == kind {
            return Ok(());
        }
        Err(ProtocolError::Unexpected {
            offset: self.offset,
            kind: self.kind,
            state: match kind {
                FrameKind::Hello => "waiting for HELLO",
                FrameKind::Challenge => "waiting for CHALLENGE",
                FrameKind::Auth => "waiting for AUTH",
                FrameKind::Welcome => "waiting for WELCOME",
                FrameKind::Done => "waiting for DONE",
                FrameKind::Resume => "waiting for RESUME",
                _ => "waiting for another frame",
            },
        })
    }

    fn malformed(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            offset: self.offset,
            kind: self.kind,
            reason,
        }
    }

    /// A frame without pages: payload of exactly `len` bytes (if given), no
    /// codec.
    fn plain(&self, len: Option<u32>) -> Result<(), ProtocolError> {
        if len.is_some_and(|len| self.payload_len != len) {
            return Err(self.malformed("wrong payload length"));
        }
        if self.codec != 0 {
            return Err(self.malformed("codec set on a frame without pages"));
        }
        Ok(())
    }

    /// The fields as the kind's layout `T`.
    fn fields<T: FromBytes>(&self) -> T {
        T::read_from_bytes(&self.fields[..]).unwrap_or_else(|_| zerocopy::FromZeros::new_zeroed())
    }
}

/// `T`'s bytes as a header's fields.
fn to_fields<T: IntoBytes + Immutable>(t: &T) -> [u8; FIELDS_LEN] {
    let mut f = [0u8; FIELDS_LEN];
    let b = t.as_bytes();
    f[..b.len().min(FIELDS_LEN)].copy_from_slice(&b[..b.len().min(FIELDS_LEN)]);
    f
}

/// One frame kind's type: how it sits in a header and payload.
pub trait Frame<'p>: Sized {
    /// Its kind.
    const KIND: FrameKind;
    /// Its header fields.
    fn fields(&self) -> [u8; FIELDS_LEN];
    /// Its payload.
    fn payload(&self) -> Cow<'_, [u8]>;
    /// Decodes it from a header of its kind and the payload; checks every
    /// rule that needs nothing beyond the frame itself.
    fn decode(h: &Header, payload: &'p [u8]) -> Result<Self, ProtocolError>;
}

/// The header and payload of `frame`, sealed with its CRC.
pub fn encode<'p, F: Frame<'p>>(frame: &F) -> (RawHeader, Cow<'_, [u8]>) {
    let payload = frame.payload();
    let h = RawHeader::unsealed(F::KIND, 0, frame.fields(), payload.len()).seal_over(&payload);
    (h, payload)
}

// ---------------------------------------------------------------------------
// Field layouts: bytes 8..28 of the header, one per shape.

/// Fields of HELLO.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SessionFields {
    session: U64,
    /// [`HELLO_RESUME`] or 0; other bits are refused.
    flags: U64,
    reserved: U32,
}

/// Fields with one leading u64 (CHALLENGE flags, ROUND_BEGIN round).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct LeadFields {
    value: U64,
    unused: [u8; 12],
}

/// Fields of PAGES and ZERO.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SpanFields {
    offset: U64,
    len: U64,
    region: U32,
}

/// Fields of the frames that carry two counts and a 32-bit value (ROUND_END,
/// FINISH, DONE, STATE, TRAILER).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct CountFields {
    first: U64,
    second: U64,
    word: U32,
}

/// Fields with one trailing u32 (ERROR code).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WordFields {
    unused: [u8; 16],
    word: U32,
}

const _: () = assert!(
    size_of::<SessionFields>() == FIELDS_LEN
        && size_of::<LeadFields>() == FIELDS_LEN
        && size_of::<SpanFields>() == FIELDS_LEN
        && size_of::<CountFields>() == FIELDS_LEN
        && size_of::<WordFields>() == FIELDS_LEN
);

fn lead(value: u64) -> [u8; FIELDS_LEN] {
    to_fields(&LeadFields {
        value: U64::new(value),
        unused: [0; 12],
    })
}

fn counts(first: u64, second: u64, word: u32) -> [u8; FIELDS_LEN] {
    to_fields(&CountFields {
        first: U64::new(first),
        second: U64::new(second),
        word: U32::new(word),
    })
}

fn word(word: u32) -> [u8; FIELDS_LEN] {
    to_fields(&WordFields {
        unused: [0; 16],
        word: U32::new(word),
    })
}

// ---------------------------------------------------------------------------
// The frames.

/// HELLO: the sender's handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Random id shared by all connections of one transfer.
    pub session: u64,
    /// This connection's index among the transfer's connections.
    pub stream_index: u32,
    /// How many connections the transfer uses.
    pub stream_count: u32,
    /// The sender's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The memory layout (host addresses are never sent).
    pub layout: Layout,
    /// The sender comes back to session `session` after its connections
    /// broke (flag [`HELLO_RESUME`]; see "Resuming" in the module docs).
    pub resume: bool,
}

/// HELLO flag: the sender resumes a session whose connections broke.
pub const HELLO_RESUME: u64 = 1;

/// Pages per block of a RESUME frame for a layout of `pages` pages: at least
/// 64 (256 KiB with 4 KiB pages, what a cut costs at most per block), more
/// for layouts so large that the digests would pass 4 MiB (one million
/// blocks).
pub fn resume_block_pages(pages: u64) -> u64 {
    pages.div_ceil(1 << 20).next_power_of_two().max(64)
}

/// HELLO's payload before its regions.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloFixed {
    stream_index: U32,
    stream_count: U32,
    nonce: [u8; NONCE_LEN],
    regions: U32,
    reserved: U32,
}

/// One region in a HELLO payload.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloRegion {
    id: U32,
    backing: u8,
    /// Bit 0: `guest_addr` is present.
    flags: u8,
    reserved: U16,
    size: U64,
    page_size: U64,
    guest_addr: U64,
}
const _: () = assert!(size_of::<HelloFixed>() == 32 && size_of::<HelloRegion>() == 32);

impl HelloRegion {
    /// `r` as HELLO and REGION carry it (never its host address).
    fn encode(r: &MemoryRegion) -> HelloRegion {
        HelloRegion {
            id: U32::new(r.id),
            backing: Backing::wire(r.backing),
            flags: u8::from(r.guest_addr.is_some()),
            reserved: U16::ZERO,
            size: U64::new(r.size),
            page_size: U64::new(r.page_size),
            guest_addr: U64::new(r.guest_addr.unwrap_or(0)),
        }
    }

    /// The region it describes (checked as part of a layout by the caller).
    fn decode(&self) -> Result<MemoryRegion, &'static str> {
        let backing = Backing::from_wire(self.backing).map_err(|()| "unknown backing")?;
        if self.flags > 1 || self.reserved.get() != 0 {
            return Err("unknown region flags");
        }
        Ok(MemoryRegion {
            id: self.id.get(),
            size: self.size.get(),
            page_size: self.page_size.get(),
            guest_addr: (self.flags & 1 == 1).then(|| self.guest_addr.get()),
            backing,
            host_addr: None,
        })
    }
}

impl<'p> Frame<'p> for Hello {
    const KIND: FrameKind = FrameKind::Hello;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        to_fields(&SessionFields {
            session: U64::new(self.session),
            flags: U64::new(if self.resume { HELLO_RESUME } else { 0 }),
            reserved: U32::ZERO,
        })
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        let regions = self.layout.regions();
        let fixed = HelloFixed {
            stream_index: U32::new(self.stream_index),
            stream_count: U32::new(self.stream_count),
            nonce: self.nonce,
            regions: U32::new(regions.len() as u32),
            reserved: U32::ZERO,
        };
        let mut p = Vec::with_capacity(size_of::<HelloFixed>() + 32 * regions.len());
        p.extend_from_slice(fixed.as_bytes());
        for r in regions {
            p.extend_from_slice(HelloRegion::encode(r).as_bytes());
        }
        Cow::Owned(p)
    }

    /// The layout is validated; its page size is not checked against the
    /// receiver's expectation.
    fn decode(h: &Header, p: &'p [u8]) -> Result<Hello, ProtocolError> {
        h.plain(None)?;
        let bad = |reason| h.malformed(reason);
        let Ok((fixed, rest)) = HelloFixed::ref_from_prefix(p) else {
            return Err(bad("payload too short"));
        };
        if fixed.reserved.get() != 0 {
            return Err(bad("reserved bytes are not zero"));
        }
        let n = fixed.regions.get() as usize;
        let wire = match <[HelloRegion]>::ref_from_bytes(rest) {
            Ok(w) if n <= MAX_REGIONS && w.len() == n => w,
            _ => return Err(bad("region count does not match payload length")),
        };
        let (stream_index, stream_count) = (fixed.stream_index.get(), fixed.stream_count.get());
        if stream_count == 0 || stream_index >= stream_count {
            return Err(bad("stream index out of range"));
        }
        let mut regions = Vec::with_capacity(n);
        for r in wire {
            regions.push(r.decode().map_err(bad)?);
        }
        let layout = Layout::new(regions).map_err(ProtocolError::BadLayout)?;
        let session: SessionFields = h.fields();
        let flags = session.flags.get();
        if flags & !HELLO_RESUME != 0 {
            return Err(bad("unknown HELLO flags"));
        }
        Ok(Hello {
            session: session.session.get(),
            stream_index,
            stream_count,
            nonce: fixed.nonce,
            layout,
            resume: flags == HELLO_RESUME,
        })
    }
}

/// CHALLENGE: the receiver's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The receiver requires the key.
    pub key_required: bool,
    /// The receiver's nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl<'p> Frame<'p> for Challenge {
    const KIND: FrameKind = FrameKind::Challenge;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        lead(u64::from(self.key_required))
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.nonce)
    }

    fn decode(h: &Header, p: &'p [u8]) -> Result<Challenge, ProtocolError> {
        h.plain(Some(NONCE_LEN as u32))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&p[..NONCE_LEN]);
        let flags: LeadFields = h.fields();
        Ok(Challenge {
            key_required: flags.value.get() & 1 == 1,
            nonce,
        })
    }
}

/// An optional MAC payload: empty or exactly [`MAC_LEN`] bytes.
fn decode_mac(h: &Header, p: &[u8]) -> Result<Option<[u8; MAC_LEN]>, ProtocolError> {
    h.plain(None)?;
    match p.len() {
        0 => Ok(None),
        MAC_LEN => {
            let mut m = [0u8; MAC_LEN];
            m.copy_from_slice(p);
            Ok(Some(m))
        }
        _ => Err(h.malformed("authentication code has the wrong length")),
    }
}

fn mac_payload(mac: &Option<[u8; MAC_LEN]>) -> Cow<'_, [u8]> {
    Cow::Borrowed(mac.as_ref().map_or(&[][..], |m| &m[..]))
}

/// A frame whose payload is an optional MAC (AUTH, WELCOME).
macro_rules! mac_frame {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            /// HMAC-SHA256 proof.
            pub mac: Option<[u8; MAC_LEN]>,
        }

        impl<'p> Frame<'p> for $name {
            const KIND: FrameKind = $kind;

            fn fields(&self) -> [u8; FIELDS_LEN] {
                [0; FIELDS_LEN]
            }

            fn payload(&self) -> Cow<'_, [u8]> {
                mac_payload(&self.mac)
            }

            fn decode(h: &Header, p: &'p [u8]) -> Result<$name, ProtocolError> {
                Ok($name {
                    mac: decode_mac(h, p)?,
                })
            }
        }
    };
}

mac_frame!(
    /// AUTH: the sender's proof that it holds the key (none without a key).
    Auth,
    FrameKind::Auth
);
mac_frame!(
    /// WELCOME: the receiver's acceptance and its own proof.
    Welcome,
    FrameKind::Welcome
);

/// ROUND_BEGIN: round `round` starts on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundBegin {
    /// The round, counted from 0.
    pub round: u64,
    /// The most pages the whole round holds, all connections together, stated on connection
    /// 0 only (0: not stated; every other connection, images and senders before this field
    /// existed write 0). A receiver hands it to its sink before the round
    /// ([`Sink::expect_round`](crate::Sink::expect_round)), so that an image checks its room
    /// for the round before writing any of it.
    pub pages: u64,
    /// The final round: the source is paused from here to the end ([`ROUND_FINAL`]; images
    /// write `false`).
    pub final_round: bool,
}

impl<'p> Frame<'p> for RoundBegin {
    const KIND: FrameKind = FrameKind::RoundBegin;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        let flags = if self.final_round { ROUND_FINAL } else { 0 };
        counts(self.round, self.pages, flags)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<RoundBegin, ProtocolError> {
        h.plain(Some(0))?;
        let f: CountFields = h.fields();
        let flags = f.word.get();
        if flags & !ROUND_FINAL != 0 {
            return Err(h.malformed("unknown ROUND_BEGIN flags"));
        }
        Ok(RoundBegin {
            round: f.first.get(),
            pages: f.second.get(),
            final_round: flags == ROUND_FINAL,
        })
    }
}

/// Where the pages of a PAGES or ZERO frame go: `len` bytes at `offset`
/// inside region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpan {
    /// The region's id.
    pub region: u32,
    /// Offset inside the region.
    pub offset: u64,
    /// Bytes (raw, for PAGES).
    pub len: u64,
}

impl PageSpan {
    fn fields(&self) -> [u8; FIELDS_LEN] {
        to_fields(&SpanFields {
            offset: U64::new(self.offset),
            len: U64::new(self.len),
            region: U32::new(self.region),
        })
    }

    fn from_header(h: &Header) -> PageSpan {
        let f: SpanFields = h.fields();
        PageSpan {
            region: f.region.get(),
            offset: f.offset.get(),
            len: f.len.get(),
        }
    }

    /// The memory offset of these pages in `layout` (of the frame with header
    /// `h`): whole pages of the layout's page size inside one region, or
    /// [`ProtocolError`].
    pub fn place(&self, h: &Header, layout: &Layout) -> Result<u64, ProtocolError> {
        let ps = layout.page_size();
        let PageSpan {
            region,
            offset,
            len,
        } = *self;
        if len == 0 || offset % ps != 0 || len % ps != 0 {
            return Err(h.malformed("not whole pages"));
        }
        layout
            .place(region, offset, len)
            .map_err(|_| ProtocolError::PageOutsideLayout {
                region,
                offset,
                len,
            })
    }
}

/// PAGES: page contents. The payload (the pages, compressed per `codec`) is
/// handled apart, since it may be read straight into destination memory,
/// skipped (an image walk) or checked through the page CRCs
/// ([`stream::verify_frame_pages`]); [`Frame::decode`] ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages {
    /// Where the pages go; `len` is their raw (uncompressed) length.
    pub span: PageSpan,
    /// How the payload is compressed.
    pub codec: Codec,
    /// A live frame: its pages may differ from their listed hashes (module
    /// docs).
    pub live: bool,
}

impl Pages {
    /// The memory offset of these pages in `layout` (see
    /// [`PageSpan::place`]); for an uncompressed frame also checks that the
    /// payload is the pages plus one hash per page.
    pub fn place(&self, h: &Header, layout: &Layout) -> Result<u64, ProtocolError> {
        let offset = self.span.place(h, layout)?;
        let list = self.span.len / layout.page_size() * PAGE_HASH_LEN as u64;
        if self.codec == Codec::None && u64::from(h.payload_len) != self.span.len + list {
            return Err(h.malformed("payload is not the pages plus one hash per page"));
        }
        Ok(offset)
    }

    /// An uncompressed frame's payload split into the pages and the hash
    /// list (`payload` as [`Pages::place`] accepted it).
    pub fn split_listed<'a>(&self, payload: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        payload.split_at((self.span.len as usize).min(payload.len()))
    }

    /// The header of this compressed frame for `payload` (compressed per
    /// `codec`), with the CRC over it.
    pub fn header(&self, payload: &[u8]) -> RawHeader {
        RawHeader::unsealed(
            FrameKind::Pages,
            self.codec as u8,
            self.span.fields(),
            payload.len(),
        )
        .seal_over(payload)
    }

    /// The header of an uncompressed frame for `span` whose pages had the
    /// hashes `list` (as [`crate::digest::hash_list`] encodes them) when the
    /// sender took them, live or not: the payload is the pages then the
    /// list, and the frame CRC covers the header and the list only.
    pub fn listed_header(span: PageSpan, list: &[u8], live: bool) -> RawHeader {
        let mut h = RawHeader::unsealed(
            FrameKind::Pages,
            Codec::None as u8,
            span.fields(),
            span.len as usize + list.len(),
        );
        if live {
            h.flags = LIVE_FRAME;
        }
        h.seal_over(list)
    }
}

impl<'p> Frame<'p> for Pages {
    const KIND: FrameKind = FrameKind::Pages;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        self.span.fields()
    }

    /// Empty: see [`Pages::header`] and [`Pages::listed_header`].
    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    /// Checks the raw length limit, the codec and, uncompressed, that the
    /// payload is longer than the pages; [`Pages::place`] checks the rest.
    fn decode(h: &Header, _: &'p [u8]) -> Result<Pages, ProtocolError> {
        let span = PageSpan::from_header(h);
        if span.len > MAX_PAGES_LEN {
            return Err(h.malformed("page frame longer than 16 MiB"));
        }
        let codec = Codec::from_u8(h.codec).ok_or(h.malformed("unknown codec"))?;
        let live = h.flags & LIVE_FRAME != 0;
        if codec == Codec::None && u64::from(h.payload_len) < span.len {
            return Err(h.malformed("payload is not the pages plus one hash per page"));
        }
        Ok(Pages { span, codec, live })
    }
}

/// ZERO: pages that read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zero {
    /// Where the zero pages are.
    pub span: PageSpan,
}

impl<'p> Frame<'p> for Zero {
    const KIND: FrameKind = FrameKind::Zero;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        self.span.fields()
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Zero, ProtocolError> {
        h.plain(Some(0))?;
        Ok(Zero {
            span: PageSpan::from_header(h),
        })
    }
}

/// ROUND_END: the round's counts on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round that ends.
    pub round: u64,
    /// Pages sent in it on this connection.
    pub pages: u64,
    /// Zero pages sent in it on this connection.
    pub zero_pages: u64,
    zero_bytes: [u8; 8],
}

impl RoundEnd {
    /// The end of `round` with these counts.
    pub fn new(round: u64, pages: u64, zero_pages: u64) -> RoundEnd {
        RoundEnd {
            round,
            pages,
            zero_pages,
            zero_bytes: zero_pages.to_le_bytes(),
        }
    }
}

impl<'p> Frame<'p> for RoundEnd {
    const KIND: FrameKind = FrameKind::RoundEnd;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.round, self.pages, 0)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.zero_bytes)
    }

    fn decode(h: &Header, p: &'p [u8]) -> Result<RoundEnd, ProtocolError> {
        h.plain(Some(8))?;
        let zero = U64::read_from_prefix(p).map_or(0, |(z, _)| z.get());
        let f: CountFields = h.fields();
        Ok(RoundEnd::new(f.first.get(), f.second.get(), zero))
    }
}

/// FINISH: the sender's last frame before DONE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// Rounds sent.
    pub rounds: u64,
    /// How the receiver is to check its copy.
    pub check: FinalCheck,
    /// The memory digest of the source.
    pub digest: u64,
}

impl<'p> Frame<'p> for Finish {
    const KIND: FrameKind = FrameKind::Finish;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.rounds, self.digest, self.check.wire() as u32)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Finish, ProtocolError> {
        h.plain(Some(0))?;
        let f: CountFields = h.fields();
        let check =
            FinalCheck::from_wire(f.word.get().into()).ok_or(h.malformed("unknown final check"))?;
        Ok(Finish {
            rounds: f.first.get(),
            check,
            digest: f.second.get(),
        })
    }
}

/// DONE: the receiver holds a complete copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Pages applied over all connections.
    pub pages: u64,
    /// The memory digest of the destination.
    pub digest: u64,
}

impl<'p> Frame<'p> for Done {
    const KIND: FrameKind = FrameKind::Done;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.pages, self.digest, 0)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Done, ProtocolError> {
        h.plain(Some(0))?;
        let f: CountFields = h.fields();
        Ok(Done {
            pages: f.first.get(),
            digest: f.second.get(),
        })
    }
}

/// ERROR: either side's failure report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame<'p> {
    /// One of [`error_code`].
    pub code: u32,
    /// UTF-8 message (the error chain).
    pub message: Cow<'p, str>,
}

/// Longest ERROR message kept.
const MAX_ERROR_MESSAGE: usize = 4096;

impl<'p> Frame<'p> for ErrorFrame<'p> {
    const KIND: FrameKind = FrameKind::Error;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        word(self.code)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.message.as_bytes())
    }

    /// Lenient: a peer's failure report is shown whatever else is wrong with it.
    fn decode(h: &Header, p: &'p [u8]) -> Result<ErrorFrame<'p>, ProtocolError> {
        let f: WordFields = h.fields();
        Ok(ErrorFrame {
            code: f.word.get(),
            message: String::from_utf8_lossy(&p[..p.len().min(MAX_ERROR_MESSAGE)]),
        })
    }
}

/// One INDEX entry: pages of one region with the same kind of location,
/// contiguous in the region and (for data) in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The region's id.
    pub region: u32,
    /// Offset inside the region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// File offset of the data, or [`IndexEntry::ZEROS`].
    pub file_offset: u64,
}

impl IndexEntry {
    /// [`IndexEntry::file_offset`] of pages that read as zeros.
    pub const ZEROS: u64 = u64::MAX;
}

/// An INDEX entry on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct IndexRecord {
    region: U32,
    reserved: U32,
    offset: U64,
    len: U64,
    file_offset: U64,
}

/// Bytes of one INDEX entry.
pub const INDEX_ENTRY_LEN: usize = size_of::<IndexRecord>();
const _: () = assert!(INDEX_ENTRY_LEN == 32);

/// INDEX: part of an image's page index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// Its entries.
    pub entries: Vec<IndexEntry>,
}

impl<'p> Frame<'p> for Index {
    const KIND: FrameKind = FrameKind::Index;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        [0; FIELDS_LEN]
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        let mut p = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_LEN);
        for e in &self.entries {
            let r = IndexRecord {
                region: U32::new(e.region),
                reserved: U32::ZERO,
                offset: U64::new(e.offset),
                len: U64::new(e.len),
                file_offset: U64::new(e.file_offset),
            };
            p.extend_from_slice(r.as_bytes());
        }
        Cow::Owned(p)
    }

    fn decode(h: &Header, p: &'p [u8]) -> Result<Index, ProtocolError> {
        h.plain(None)?;
        let Ok(records) = <[IndexRecord]>::ref_from_bytes(p) else {
            return Err(h.malformed("index length is not a multiple of 32"));
        };
        let entries = records
            .iter()
            .map(|r| IndexEntry {
                region: r.region.get(),
                offset: r.offset.get(),
                len: r.len.get(),
                file_offset: r.file_offset.get(),
            })
            .collect();
        Ok(Index { entries })
    }
}

/// TRAILER: an image's completion marker, the last record of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// File offset of the first INDEX record.
    pub index_offset: u64,
    /// File offset of this record.
    pub trailer_offset: u64,
    /// The memory digest of the image.
    pub digest: u64,
}

impl<'p> Frame<'p> for Trailer {
    const KIND: FrameKind = FrameKind::Trailer;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.index_offset, self.trailer_offset, 0)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.digest.to_le_bytes().to_vec())
    }

    fn decode(h: &Header, p: &'p [u8]) -> Result<Trailer, ProtocolError> {
        h.plain(Some(8))?;
        let f: CountFields = h.fields();
        let digest = U64::read_from_prefix(p).map_or(0, |(d, _)| d.get());
        Ok(Trailer {
            index_offset: f.first.get(),
            trailer_offset: f.second.get(),
            digest,
        })
    }
}

/// STATE: the source's opaque state blob (vCPU and device state), with its
/// own CRC32C besides the frame's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State<'p> {
    /// The blob.
    pub blob: &'p [u8],
    /// Its CRC32C.
    pub crc: u32,
}

impl<'p> State<'p> {
    /// The STATE frame for `blob`.
    pub fn new(blob: &'p [u8]) -> State<'p> {
        State {
            blob,
            crc: crc32c::crc32c(blob),
        }
    }
}

impl<'p> Frame<'p> for State<'p> {
    const KIND: FrameKind = FrameKind::State;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.blob.len() as u64, 0, self.crc)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.blob)
    }

    /// Checks the blob's own length and CRC32C (the frame CRC covered the
    /// payload already).
    fn decode(h: &Header, p: &'p [u8]) -> Result<State<'p>, ProtocolError> {
        let f: CountFields = h.fields();
        let len = f.first.get();
        if h.codec != 0 || f.second.get() != 0 || len != p.len() as u64 || len > MAX_STATE_LEN {
            return Err(h.malformed("state length does not match the payload, or exceeds 16 MiB"));
        }
        let computed = crc32c::crc32c(p);
        if computed != f.word.get() {
            return Err(ProtocolError::StateChecksum {
                offset: h.offset,
                stored: f.word.get(),
                computed,
            });
        }
        Ok(State {
            blob: p,
            crc: computed,
        })
    }
}

/// COMMIT: the sender accepted DONE in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The memory digest FINISH named.
    pub digest: u64,
}

impl<'p> Frame<'p> for Commit {
    const KIND: FrameKind = FrameKind::Commit;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        lead(self.digest)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Commit, ProtocolError> {
        h.plain(Some(0))?;
        let f: LeadFields = h.fields();
        Ok(Commit {
            digest: f.value.get(),
        })
    }
}

/// REGION: a memory region added to the layout between rounds (memory the
/// source mapped after the transfer started), in HELLO's region form. Its id
/// is larger than every id before it, so it is laid out after the regions
/// already known and nothing else moves ([`Layout::with_region`], which the
/// receiver and the image reader both apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The region (no host address).
    pub region: MemoryRegion,
}

impl<'p> Frame<'p> for Region {
    const KIND: FrameKind = FrameKind::Region;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        [0; FIELDS_LEN]
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Owned(HelloRegion::encode(&self.region).as_bytes().to_vec())
    }

    /// Checks the region's encoding; whether it fits the layout so far is
    /// [`Region::add_to`]'s check.
    fn decode(h: &Header, p: &'p [u8]) -> Result<Region, ProtocolError> {
        h.plain(Some(size_of::<HelloRegion>() as u32))?;
        let Ok(wire) = HelloRegion::ref_from_bytes(p) else {
            return Err(h.malformed("wrong payload length"));
        };
        if h.fields != [0; FIELDS_LEN] {
            return Err(h.malformed("reserved header fields are not zero"));
        }
        Ok(Region {
            region: wire.decode().map_err(|reason| h.malformed(reason))?,
        })
    }
}

impl Region {
    /// `layout` with this region added (see [`Layout::with_region`]), or
    /// [`ProtocolError::BadLayout`].
    pub fn add_to(&self, layout: &Layout) -> Result<Layout, ProtocolError> {
        layout
            .with_region(self.region)
            .map_err(ProtocolError::BadLayout)
    }
}

/// COMPACTED (images only, never on a connection): the image was compacted
/// ([`crate::image`], "Compaction"): the round that follows it holds the
/// latest copy of every page and stands for rounds `0..rounds`, so it is
/// numbered `rounds - 1`. It comes after HELLO and the REGION records and
/// before any round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Rounds the next round stands for (at least 1).
    pub rounds: u64,
    /// File bytes the compactions so far dropped (this one included).
    pub bytes_dropped: u64,
    /// Compactions so far, this one included (at least 1).
    pub compactions: u32,
    /// For each REGION record before this one, in file order: the round it
    /// was added before in the image as first written (non-decreasing, at
    /// most `rounds`).
    pub added_before: Vec<u64>,
}

impl<'p> Frame<'p> for Compacted {
    const KIND: FrameKind = FrameKind::Compacted;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.rounds, self.bytes_dropped, self.compactions)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Owned(
            self.added_before
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect(),
        )
    }

    /// Checks the counts and that the rounds in the payload are whole, in
    /// order and within `rounds`; whether they match the REGION records
    /// before it is the image reader's check.
    fn decode(h: &Header, p: &'p [u8]) -> Result<Compacted, ProtocolError> {
        h.plain(None)?;
        let f: CountFields = h.fields();
        let (rounds, compactions) = (f.first.get(), f.word.get());
        let Ok(list) = <[U64]>::ref_from_bytes(p) else {
            return Err(h.malformed("a partial round number"));
        };
        if rounds == 0 || compactions == 0 {
            return Err(h.malformed("no rounds or no compactions"));
        }
        let added_before: Vec<u64> = list.iter().map(|r| r.get()).collect();
        if added_before.windows(2).any(|w| w[0] > w[1]) || added_before.iter().any(|&r| r > rounds)
        {
            return Err(h.malformed("regions added out of order or after the rounds"));
        }
        Ok(Compacted {
            rounds,
            bytes_dropped: f.second.get(),
            compactions,
            added_before,
        })
    }
}

/// MAPPED: the memory that exists now, as spans of the layout (whole pages,
/// each inside one region, in layout order, not overlapping); every page
/// outside them is dropped (see "Memory unmapped mid-stream" in the module
/// docs). Between rounds; on a connection, connection 0 only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The spans.
    pub spans: Vec<PageSpan>,
}

/// A MAPPED span on the wire.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct MappedRecord {
    region: U32,
    reserved: U32,
    offset: U64,
    len: U64,
}
const _: () = assert!(size_of::<MappedRecord>() == 24);

impl Mapped {
    /// The spans of `layout` that the memory offsets `memory` (sorted, not overlapping,
    /// whole pages inside the layout) cover, split at region boundaries.
    pub fn of(layout: &Layout, memory: &[std::ops::Range<u64>]) -> Mapped {
        let mut spans = Vec::new();
        for r in memory {
            let mut at = r.start;
            while at < r.end {
                let Some((region, inside)) = layout.region_at(at) else {
                    break;
                };
                let len = (region.size - inside).min(r.end - at);
                spans.push(PageSpan {
                    region: region.id,
                    offset: inside,
                    len,
                });
                at += len;
            }
        }
        Mapped { spans }
    }

    /// The memory offsets of the spans in `layout` (of the frame with header `h`), sorted
    /// and coalesced; fails on a span that is not whole pages inside one region, or on
    /// spans out of order or overlapping.
    pub fn offsets(
        &self,
        h: &Header,
        layout: &Layout,
    ) -> Result<Vec<std::ops::Range<u64>>, ProtocolError> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(self.spans.len());
        for s in &self.spans {
            let at = s.place(h, layout)?;
            let r = at..at + s.len;
            if out.last().is_some_and(|l| l.end > r.start) {
                return Err(h.malformed("mapped spans out of order or overlapping"));
            }
            precopy_sys::ranges::push_merged(&mut out, 0, r);
        }
        Ok(out)
    }
}

impl<'p> Frame<'p> for Mapped {
    const KIND: FrameKind = FrameKind::Mapped;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        [0; FIELDS_LEN]
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        let mut p = Vec::with_capacity(self.spans.len() * size_of::<MappedRecord>());
        for s in &self.spans {
            let r = MappedRecord {
                region: U32::new(s.region),
                reserved: U32::ZERO,
                offset: U64::new(s.offset),
                len: U64::new(s.len),
            };
            p.extend_from_slice(r.as_bytes());
        }
        Cow::Owned(p)
    }

    /// Checks the payload's shape; whether the spans fit the layout is
    /// [`Mapped::offsets`].
    fn decode(h: &Header, p: &'p [u8]) -> Result<Mapped, ProtocolError> {
        h.plain(None)?;
        let Ok(records) = <[MappedRecord]>::ref_from_bytes(p) else {
            return Err(h.malformed("mapped spans' length is not a multiple of 24"));
        };
        if records.iter().any(|r| r.reserved.get() != 0) {
            return Err(h.malformed("reserved bytes are not zero"));
        }
        let spans = records
            .iter()
            .map(|r| PageSpan {
                region: r.region.get(),
                offset: r.offset.get(),
                len: r.len.get(),
            })
            .collect();
        Ok(Mapped { spans })
    }
}

/// PING: the sender asks for a PONG, between rounds. The round trip is what the
/// acknowledgement of FINISH costs beyond the digests (the receiver answers from
/// the thread that reads the connection), so the sender's switch-over estimate
/// measures it before it pauses the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Any value; the PONG repeats it.
    pub token: u64,
}

impl<'p> Frame<'p> for Ping {
    const KIND: FrameKind = FrameKind::Ping;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        lead(self.token)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Ping, ProtocolError> {
        h.plain(Some(0))?;
        let f: LeadFields = h.fields();
        Ok(Ping {
            token: f.value.get(),
        })
    }
}

/// PONG: the receiver's answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// The PING's token.
    pub token: u64,
}

impl<'p> Frame<'p> for Pong {
    const KIND: FrameKind = FrameKind::Pong;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        lead(self.token)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }

    fn decode(h: &Header, _: &'p [u8]) -> Result<Pong, ProtocolError> {
        h.plain(Some(0))?;
        let f: LeadFields = h.fields();
        Ok(Pong {
            token: f.value.get(),
        })
    }
}

/// RESUME: the receiver's answer to a resuming sender, once all its
/// connections are back (see "Resuming" in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The next round the receiver expects: the rounds every connection
    /// completed.
    pub next_round: u64,
    /// Pages per block of `block_digests` (at least 1).
    pub block_pages: u64,
    /// For each block of pages in layout order, the XXH3-64 of the page
    /// hashes the receiver recorded
    /// ([`crate::digest::PageHashes::block_digests`]).
    pub block_digests: Vec<u64>,
}

impl Resume {
    /// Whether the digests cover a layout of `pages` pages exactly.
    pub fn covers(&self, pages: u64) -> bool {
        self.block_pages > 0 && pages.div_ceil(self.block_pages) == self.block_digests.len() as u64
    }
}

impl<'p> Frame<'p> for Resume {
    const KIND: FrameKind = FrameKind::Resume;

    fn fields(&self) -> [u8; FIELDS_LEN] {
        counts(self.next_round, self.block_pages, 0)
    }

    fn payload(&self) -> Cow<'_, [u8]> {
        Cow::Owned(
            self.block_digests
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect(),
        )
    }

    /// Checks the block size and that the payload is whole digests;
    /// [`Resume::covers`] checks them against the layout.
    fn decode(h: &Header, p: &'p [u8]) -> Result<Resume, ProtocolError> {
        h.plain(None)?;
        let f: CountFields = h.fields();
        if f.second.get() == 0 || !p.len().is_multiple_of(8) {
            return Err(h.malformed("no pages per block, or a partial block digest"));
        }
        Ok(Resume {
            next_round: f.first.get(),
            block_pages: f.second.get(),
            block_digests: crate::digest::hashes_of_list(p).collect(),
        })
    }
}

/// Encodes a header for `payload` with the kind's three field slots given
/// as plain numbers (`a` at byte 8, `b` at 16, `c` at 24) and any codec:
/// for tests and fuzz targets that craft frames no typed frame would encode.
#[cfg(any(test, feature = "fuzzing"))]
pub fn encode_header(
    kind: FrameKind,
    codec: u8,
    a: u64,
    b: u64,
    c: u32,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    RawHeader::unsealed(kind, codec, counts(a, b, c), payload.len())
        .seal_over(payload)
        .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every typed frame encodes to the bytes the layout drawn in the module
    /// docs gives with plain numbers, and decodes back to itself.
    #[test]
    fn typed_frames_match_the_drawn_layout() {
        fn same<T: PartialEq + std::fmt::Debug>(decoded: &T, sent: &T) {
            assert_eq!(decoded, sent);
        }
        // A macro, not a function: decoding borrows the encoded payload.
        macro_rules! check {
            ($f:expr, $a:expr, $b:expr, $c:expr $(,)?) => {{
                let f = $f;
                let (h, p) = encode(f);
                let kind = h.decode(0).unwrap().kind;
                assert_eq!(
                    h.to_bytes(),
                    encode_header(kind, 0, $a, $b, $c, &p),
                    "{f:?}"
                );
                let header = h.decode(0).unwrap();
                same(&header.decode(&p).unwrap(), f);
            }};
        }
        let nonce = [7; NONCE_LEN];
        check!(
            &Challenge {
                key_required: true,
                nonce,
            },
            1,
            0,
            0,
        );
        check!(
            &Auth {
                mac: Some([3; MAC_LEN]),
            },
            0,
            0,
            0,
        );
        check!(&Welcome { mac: None }, 0, 0, 0);
        check!(
            &RoundBegin {
                round: 9,
                pages: 0,
                final_round: false
            },
            9,
            0,
            0
        );
        check!(
            &RoundBegin {
                round: 9,
                pages: 70,
                final_round: true
            },
            9,
            70,
            ROUND_FINAL
        );
        // A flag this version does not know is refused, not ignored.
        let h = encode_header(FrameKind::RoundBegin, 0, 9, 0, 2, &[]);
        let header = RawHeader::read_from_bytes(&h[..])
            .unwrap()
            .decode(0)
            .unwrap();
        assert!(matches!(
            header.decode::<RoundBegin>(&[]),
            Err(ProtocolError::Malformed {
                reason: "unknown ROUND_BEGIN flags",
                ..
            })
        ));
        let span = PageSpan {
            region: 2,
            offset: 0x3000,
            len: 0x2000,
        };
        check!(&Zero { span }, 0x3000, 0x2000, 2);
        check!(&RoundEnd::new(4, 17, 3), 4, 17, 0);
        let finish = Finish {
            rounds: 5,
            check: FinalCheck::Full,
            digest: 0xabcd,
        };
        check!(&finish, 5, 0xabcd, 1);
        let big = Finish {
            digest: u64::MAX - 1,
            ..finish
        };
        check!(&big, 5, u64::MAX - 1, 1);
        check!(
            &Done {
                pages: 40,
                digest: 0x1234,
            },
            40,
            0x1234,
            0,
        );
        check!(
            &ErrorFrame {
                code: 3,
                message: "boom".into(),
            },
            0,
            0,
            3,
        );
        let entry = IndexEntry {
            region: 1,
            offset: 0,
            len: 4096,
            file_offset: IndexEntry::ZEROS,
        };
        check!(
            &Index {
                entries: vec![entry],
            },
            0,
            0,
            0,
        );
        let trailer = Trailer {
            index_offset: 100,
            trailer_offset: 200,
            digest: 0x0102_0304_0506_0708,
        };
        check!(&trailer, 100, 200, 0);
        assert_eq!(
            &*encode(&trailer).1,
            &0x0102_0304_0506_0708u64.to_le_bytes()
        );
        let blob = b"vcpu0 rip=0xfff0";
        check!(
            &State::new(blob),
            blob.len() as u64,
            0,
            crc32c::crc32c(blob),
        );
        check!(&Commit { digest: 77 << 40 }, 77 << 40, 0, 0);
        check!(&Ping { token: 9 }, 9, 0, 0);
        check!(&Pong { token: 9 }, 9, 0, 0);
        check!(
            &Resume {
                next_round: 3,
                block_pages: 64,
                block_digests: vec![1, 0xdead_beef_0bad_f00d],
            },
            3,
            64,
            0,
        );
        let pages = Pages {
            span,
            codec: Codec::Lz4,
            live: false,
        };
        let h = pages.header(b"xyz");
        assert_eq!(
            h.to_bytes(),
            encode_header(FrameKind::Pages, 1, 0x3000, 0x2000, 2, b"xyz")
        );
    }

    #[test]
    fn hello_round_trip() {
        let hello = Hello {
            session: 42,
            stream_index: 1,
            stream_count: 2,
            nonce: [9; NONCE_LEN],
            layout: Layout::new(vec![
                MemoryRegion::new(3, 0x4000, 4096).guest(0x10000),
                MemoryRegion::new(9, 4 << 20, 2 << 20).backed_by(Backing::Hugetlb),
            ])
            .unwrap(),
            resume: false,
        };
        let (raw, p) = encode(&hello);
        assert_eq!(raw.to_bytes()[8..16], 42u64.to_le_bytes());
        let h = raw.decode(0).unwrap();
        assert_eq!(h.decode::<Hello>(&p).unwrap(), hello);
        let short = Header {
            payload_len: h.payload_len - 1,
            ..h
        };
        assert!(short.decode::<Hello>(&p[..p.len() - 1]).is_err());
        assert!(matches!(
            h.decode::<Challenge>(&p),
            Err(ProtocolError::Unexpected {
                state: "waiting for CHALLENGE",
                ..
            })
        ));
        // A new transfer's HELLO keeps its flags slot zero (byte-compatible
        // with streams from before resuming); the resume flag is bit 0 of the
        // u64 at byte 16, and any other bit is refused.
        assert_eq!(raw.to_bytes()[16..24], [0; 8]);
        let resumed = Hello {
            resume: true,
            ..hello.clone()
        };
        let (raw, rp) = encode(&resumed);
        assert_eq!(raw.to_bytes()[16..24], HELLO_RESUME.to_le_bytes());
        assert!(raw.decode(0).unwrap().decode::<Hello>(&rp).unwrap().resume);
        let mut odd = raw.to_bytes();
        odd[16] = 2;
        let odd: RawHeader = zerocopy::transmute!(odd);
        assert!(matches!(
            odd.decode(0).unwrap().decode::<Hello>(&rp),
            Err(ProtocolError::Malformed {
                reason: "unknown HELLO flags",
                ..
            })
        ));
    }

    #[test]
    fn resume_frame_checks_its_blocks() {
        let r = Resume {
            next_round: 2,
            block_pages: 64,
            block_digests: vec![7; 3],
        };
        assert!(r.covers(129) && r.covers(192) && !r.covers(193) && !r.covers(128));
        let (raw, p) = encode(&r);
        let h = raw.decode(0).unwrap();
        assert!(h.decode::<Resume>(&p[..p.len() - 1]).is_err());
        let zero = encode_header(FrameKind::Resume, 0, 2, 0, 0, &p);
        let zero: RawHeader = zerocopy::transmute!(zero);
        assert!(zero.decode(0).unwrap().decode::<Resume>(&p).is_err());
        assert_eq!(resume_block_pages(1000), 64);
        assert_eq!(resume_block_pages(1 << 30), 1024);
        assert!((1u64 << 40).div_ceil(resume_block_pages(1 << 40)) <= 1 << 20);
    }

    #[test]
    fn listed_frames_check_header_and_list_by_crc_and_pages_by_hash() {
        use crate::digest::{hash_list, page_hash};
        let pages: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        let hashes: Vec<u64> = pages.chunks(4096).map(page_hash).collect();
        let list = hash_list(&hashes);
        let span = PageSpan {
            region: 3,
            offset: 0x2000,
            len: 8192,
        };
        let mut got = Vec::new();
        for live in [false, true] {
            let h = Pages::listed_header(span, &list, live);
            assert_eq!(h.is_live(), live);
            assert_eq!(h.listed_lengths(4096), Some((8192, 16)));
            assert_eq!(h.listed_lengths(8192), None);
            let header = stream::verify_listed(&h, 0, &pages, &list, 4096, &mut got).unwrap();
            assert_eq!(got, hashes);
            let frame: Pages = header.decode(&[]).unwrap();
            assert_eq!((frame.span, frame.live), (span, live));
            // The list and the header are covered by the frame CRC.
            let mut bad = list.clone();
            bad[0] ^= 1;
            assert!(matches!(
                stream::verify_listed(&h, 0, &pages, &bad, 4096, &mut got),
                Err(crate::TransferError::Protocol(
                    ProtocolError::BadChecksum { .. }
                ))
            ));
            let mut h2 = h.to_bytes();
            h2[8] ^= 1;
            let h2: RawHeader = zerocopy::transmute!(h2);
            assert!(stream::verify_listed(&h2, 0, &pages, &list, 4096, &mut got).is_err());
            // A page that differs from its listed hash fails a strict frame
            // and is left to the receiver's changed set in a live one.
            let mut torn = pages.clone();
            torn[5000] ^= 0x40;
            let r = stream::verify_listed(&h, 0, &torn, &list, 4096, &mut got);
            if live {
                assert!(r.is_ok());
                assert_eq!(got[0], hashes[0]);
                assert_ne!(got[1], hashes[1]);
            } else {
                assert!(matches!(
                    r,
                    Err(crate::TransferError::Protocol(ProtocolError::BadPageHash {
                        page: 1,
                        ..
                    }))
                ));
            }
        }
        // The flag is refused on anything but an uncompressed PAGES frame.
        let mut z = encode_header(FrameKind::Zero, 0, 0, 4096, 3, &[]);
        z[2] = LIVE_FRAME;
        let z: RawHeader = zerocopy::transmute!(z);
        assert!(z.decode(0).is_err());
    }

    #[test]
    fn state_blob_checks() {
        let blob = b"registers";
        let state = State::new(blob);
        let (raw, p) = encode(&state);
        let h = raw.decode(0).unwrap();
        let mut bad = p.to_vec();
        bad[0] ^= 1;
        assert!(matches!(
            h.decode::<State>(&bad),
            Err(ProtocolError::StateChecksum { .. })
        ));
        assert_eq!(h.decode::<State>(&p).unwrap().blob, blob);
    }
}
