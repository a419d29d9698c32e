//! The precopy wire protocol, version 3: frame encoding and decoding.
//!
//! This module owns the byte layout of everything that crosses a connection
//! (and, reused, of checkpoint image records). It never touches destination
//! memory: the receiver state machine lives in [`crate::receiver`] and only
//! acts on frames this module has fully read and checksummed.
//!
//! # Preamble and frames
//!
//! Each side of a connection starts with a 16-byte preamble, then frames:
//!
//! ```text
//! preamble: magic "PRECOPY\0" (8) | version u32 LE (= 3) | reserved u32 (= 0)
//!
//! frame header, 32 bytes, little-endian:
//!   0  u8   kind            (FrameKind)
//!   1  u8   codec           (PAGES only: 0 none, 1 lz4 block, 2 zstd; else 0)
//!   2  u8   flags           (PAGES only: bit 0 live frame, see [`crate::live`]; else 0)
//!   3  u8   reserved        (0)
//!   4  u32  payload_len     (bytes following the header, <= MAX_PAYLOAD)
//!   8  u64  a               \
//!  16  u64  b                } meaning depends on kind, see below
//!  24  u32  c               /
//!  28  u32  crc             CRC32C of header bytes 0..28 followed by the payload
//! ```
//!
//! | kind | dir | a | b | c | payload |
//! |---|---|---|---|---|---|
//! | 1 HELLO | S→R | session id | – | – | stream_index u32, stream_count u32, nonce \[16\], n u32, 0 u32, n × region (32 bytes, below) |
//! | 2 CHALLENGE | R→S | bit 0: key required | – | – | nonce \[16\] |
//! | 3 AUTH | S→R | – | – | – | HMAC-SHA256 (32) or empty |
//! | 4 WELCOME | R→S | – | – | – | HMAC-SHA256 (32) or empty |
//! | 5 ROUND_BEGIN | S→R | round | – | – | – |
//! | 6 PAGES | S→R | offset in region | raw length | region id | the pages, compressed per `codec` |
//! | 7 ZERO | S→R | offset in region | length | region id | – |
//! | 8 ROUND_END | S→R | round | pages on this stream | – | zero pages on this stream, u64 |
//! | 9 FINISH | S→R | rounds sent | check: 0 recorded, 1 full | memory digest | – |
//! | 10 DONE | R→S | pages applied | – | memory digest | – |
//! | 11 ERROR | both | – | – | error code | UTF-8 message |
//! | 12 INDEX | image | – | – | – | n × (region id u32, 0 u32, offset u64, length u64, file offset u64 or `u64::MAX` for zeros) |
//! | 13 TRAILER | image | index offset | trailer offset | memory digest | – |
//! | 14 STATE | S→R | blob length | – | CRC32C of the blob | the VMM's state blob (vCPU and device state) |
//! | 15 COMMIT | S→R | – | – | memory digest | – |
//!
//! A HELLO region is `id u32 | backing u8 (0 unstated, 1 anonymous, 2 memfd,
//! 3 hugetlb, 4 file) | flags u8 (bit 0: guest address present) | 0 u16 |
//! size u64 | page size u64 | guest-physical address u64`. The wire page
//! size is the smallest region page size ([`Layout::page_size`]).
//!
//! Pages are named by **region id and offset inside the region**, never by a
//! host address: the receiver places them through the announced [`Layout`]
//! into whatever memory its side mapped for that region, and rejects anything
//! outside it. PAGES and ZERO frames always cover whole pages inside one
//! region. A ZERO frame stands for pages that read as all zeros (including
//! pages dropped with `MADV_DONTNEED`); the receiver writes zeros there.
//!
//! # The exchange
//!
//! ```text
//! Sender (per connection)                          Receiver
//!   preamble, HELLO(layout, page size, nonce_s) ──►
//!                                               ◄── preamble, CHALLENGE(key required?, nonce_r)
//!   AUTH(HMAC(key, "sender" | nonce_r | nonce_s | session | index)) ──►
//!                                               ◄── WELCOME(HMAC(key, "receiver" | nonce_s | nonce_r | session | index))
//!                                                   (or ERROR, and the connection closes)
//!   ┌ for each round r = 0, 1, 2, ... on every connection:
//!   │ ROUND_BEGIN(r)
//!   │ PAGES / ZERO ...      (each page at most once per round, on one connection)
//!   └ ROUND_END(r, counts)  ── receiver: all connections meet at a barrier
//!   STATE(blob, crc)  ──►   (connection 0 only, at most once; the sink gets it now)
//!   FINISH(rounds, checksum) ──►
//!                                               ◄── DONE(pages, checksum)  or  ERROR(code, message)
//!   COMMIT(checksum) ──►                            (only if DONE came in time: the receiver's copy
//!                                                    is complete only now)
//! ```
//!
//! COMMIT is the second half of a two-phase end. The source may give up on a
//! destination that acknowledged too late (it already resumed its workload,
//! see `precopy-migrate`'s final-round bound); a receiver that sent DONE but
//! sees the connection close instead of COMMIT must not treat its copy as
//! complete. (If the connection breaks after the source wrote COMMIT but
//! before it arrives, the source reports success and the receiver failure:
//! the one window two-phase ends leave, as in any such protocol.)
//!
//! Several connections may carry one transfer (HELLO's `stream_count`), all
//! with the same session id. A round's pages are spread over them; the
//! receiver lets no connection apply round `r + 1` before every connection
//! has applied all of round `r`, so an older copy of a page never overwrites a
//! newer one. Within a connection frames apply in order, so a page sent in two
//! rounds simply ends up with its last copy.
//!
//! # The receiver's state machine (per connection)
//!
//! ```text
//!  AwaitPreamble ─magic+version ok─► AwaitHello ─HELLO ok─► AwaitAuth ─AUTH ok─► Idle(next = 0)
//!
//!  Idle(next) ──ROUND_BEGIN(next)──► [barrier] ─► InRound(next)
//!  InRound(r) ──PAGES/ZERO in layout──► InRound(r)
//!  InRound(r) ──ROUND_END(r, counts match)──► [barrier] ─► Idle(r + 1)
//!  Idle(n)    ──STATE(blob CRC ok, connection 0, first)──► Idle(n), sink holds the state
//!  Idle(n)    ──FINISH(rounds = n)──► Finished ─ all connections finished,
//!                                     checksum of destination == FINISH's ─► DONE sent
//!  DONE sent  ──COMMIT on every connection──► success
//!  any other frame, bad checksum, EOF, bad layout/page size/version,
//!  failed key check ──► Failed: ERROR sent, nothing more applied
//! ```
//!
//! Every frame is read completely and its CRC checked before the receiver
//! looks at its fields, so a damaged frame is never applied. For an
//! uncompressed PAGES frame both ends compute the frame CRC from the CRC32C of
//! each page ([`PageFold`]): one pass over the bytes yields the frame check
//! and the per-page CRCs each end records. The memory digest (CRC32C of the
//! per-page CRCs in layout order, see [`crate::digest`]) is checked before
//! DONE: against the page CRCs the receiver recorded, and with FINISH's
//! check = 1 ([`FinalCheck::Full`](crate::FinalCheck::Full)) also against
//! the destination's memory read anew.
//!
//! Version 1 carried a CRC32C of the memory bytes themselves in FINISH and
//! version 2 named pages by the source's host addresses and had no STATE;
//! both are refused in the handshake ([`ProtocolError::OldVersion`]).
//!
//! # Authentication
//!
//! A receiver that listens on TCP requires a key, loopback included (any
//! local user can connect to a loopback port; a Unix socket is created
//! owner-only instead); the
//! challenge-response above proves both ends hold it without sending it. It
//! authenticates the peer, it does not encrypt or sign the page stream: run
//! over a trusted network or a tunnel when an active attacker is a concern.

use std::io::{self, IoSlice, Read, Write};

use crate::digest::{PageFold, page_crc};
use crate::error::{ProtocolError, TransferError};
use crate::layout::{Backing, Layout, MAX_REGIONS, MemoryRegion};

/// The first eight bytes of every precopy stream and image.
pub const MAGIC: [u8; 8] = *b"PRECOPY\0";
/// The protocol version this build speaks.
pub const VERSION: u32 = 3;
/// Bytes in the preamble.
pub const PREAMBLE_LEN: usize = 16;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest raw (uncompressed) length of one PAGES frame.
pub const MAX_PAGES_LEN: u64 = 16 << 20;
/// Largest state blob a STATE frame carries.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// Bytes per region in a HELLO payload.
const HELLO_REGION_LEN: usize = 32;
/// Bytes of a HELLO payload before its regions.
const HELLO_FIXED_LEN: usize = 32;
/// Largest payload of any frame: a PAGES frame or a state blob (a HELLO with
/// [`MAX_REGIONS`] regions is smaller).
pub const MAX_PAYLOAD: u64 = MAX_STATE_LEN;
const _: () = assert!(
    MAX_PAYLOAD >= MAX_PAGES_LEN
        && MAX_PAYLOAD >= (HELLO_FIXED_LEN + HELLO_REGION_LEN * MAX_REGIONS) as u64
);
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes in an authentication code.
pub const MAC_LEN: usize = 32;

/// Codes carried by ERROR frames.
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
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Sender's handshake.
    Hello = 1,
    /// Receiver's handshake and challenge.
    Challenge = 2,
    /// Sender's challenge response.
    Auth = 3,
    /// Receiver's acceptance.
    Welcome = 4,
    /// A round starts.
    RoundBegin = 5,
    /// Page contents.
    Pages = 6,
    /// Pages that are all zeros.
    Zero = 7,
    /// A round ends, with this connection's counts.
    RoundEnd = 8,
    /// No more rounds; carries the memory checksum.
    Finish = 9,
    /// Receiver's success acknowledgement.
    Done = 10,
    /// Either side's failure report.
    Error = 11,
    /// Image page index.
    Index = 12,
    /// Image completion marker.
    Trailer = 13,
    /// The source's state blob, after the last round.
    State = 14,
    /// Sender's confirmation that it accepted DONE in time.
    Commit = 15,
}

impl FrameKind {
    /// The kind for a header byte.
    pub fn from_u8(kind: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match kind {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => Welcome,
            5 => RoundBegin,
            6 => Pages,
            7 => Zero,
            8 => RoundEnd,
            9 => Finish,
            10 => Done,
            11 => Error,
            12 => Index,
            13 => Trailer,
            14 => State,
            15 => Commit,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use FrameKind::*;
        f.write_str(match self {
            Hello => "HELLO",
            Challenge => "CHALLENGE",
            Auth => "AUTH",
            Welcome => "WELCOME",
            RoundBegin => "ROUND_BEGIN",
            Pages => "PAGES",
            Zero => "ZERO",
            RoundEnd => "ROUND_END",
            Finish => "FINISH",
            Done => "DONE",
            Error => "ERROR",
            Index => "INDEX",
            Trailer => "TRAILER",
            State => "STATE",
            Commit => "COMMIT",
        })
    }
}

/// How a PAGES frame's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw pages.
    None = 0,
    /// One LZ4 block.
    Lz4 = 1,
    /// One zstd frame.
    Zstd = 2,
}

impl Codec {
    /// The codec for a header byte.
    pub fn from_u8(codec: u8) -> Option<Codec> {
        match codec {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// The codec's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "uncompressed",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// A decoded, checksum-verified frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stream offset of the header's first byte.
    pub offset: u64,
    /// The frame kind.
    pub kind: FrameKind,
    /// The codec byte (PAGES only).
    pub codec: u8,
    /// The flags byte (PAGES only: [`crate::live::LIVE_FRAME`]).
    pub flags: u8,
    /// Payload length.
    pub payload_len: u32,
    /// Field `a`.
    pub a: u64,
    /// Field `b`.
    pub b: u64,
    /// Field `c`.
    pub c: u32,
}

/// Encodes a frame header for `payload`.
pub fn encode_header(
    kind: FrameKind,
    codec: u8,
    a: u64,
    b: u64,
    c: u32,
    payload: &[u8],
) -> [u8; HEADER_LEN] {
    let mut h = unsealed_header(kind, codec, a, b, c, payload.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), payload);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A header without its CRC (bytes 28..32 zero).
pub(crate) fn unsealed_header(
    kind: FrameKind,
    codec: u8,
    a: u64,
    b: u64,
    c: u32,
    payload_len: usize,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = codec;
    h[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[8..16].copy_from_slice(&a.to_le_bytes());
    h[16..24].copy_from_slice(&b.to_le_bytes());
    h[24..28].copy_from_slice(&c.to_le_bytes());
    h
}

/// The header of an uncompressed PAGES frame whose pages have the CRCs
/// `crcs` (one per `fold.page_size()` bytes of payload): the frame CRC is
/// folded from them, without reading the payload.
pub fn encode_pages_header(
    region: u32,
    offset: u64,
    payload_len: usize,
    crcs: &[u32],
    fold: &PageFold,
) -> [u8; HEADER_LEN] {
    let mut h = unsealed_header(
        FrameKind::Pages,
        Codec::None as u8,
        offset,
        payload_len as u64,
        region,
        payload_len,
    );
    let crc = fold.fold_all(crc32c::crc32c(&h[..28]), crcs);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
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

/// Reads frames from a byte stream, checking each one's checksum.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader at stream offset 0.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader { inner, offset: 0 }
    }

    /// A reader whose first byte is at stream offset `offset`.
    pub fn at_offset(inner: R, offset: u64) -> FrameReader<R> {
        FrameReader { inner, offset }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Declares that the underlying reader was moved to stream offset
    /// `offset` behind this reader's back (e.g. by seeking past a payload).
    pub fn set_offset(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), TransferError> {
        let start = self.offset;
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(ProtocolError::Truncated {
                        offset: start + got as u64,
                        what,
                    }
                    .into());
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransferError::Io {
                        what: "reading from the peer",
                        source,
                    });
                }
            }
        }
        self.offset += got as u64;
        Ok(())
    }

    /// Reads and checks the preamble.
    pub fn read_preamble(&mut self) -> Result<(), TransferError> {
        let mut p = [0u8; PREAMBLE_LEN];
        self.fill(&mut p, "the preamble")?;
        check_preamble(&p)?;
        Ok(())
    }

    /// Reads one frame; its payload lands in `payload[..header.payload_len]`.
    ///
    /// `payload` grows only as bytes actually arrive, so a header announcing a
    /// huge payload on a short stream allocates little.
    pub fn read_frame(&mut self, payload: &mut Vec<u8>) -> Result<Header, TransferError> {
        let (h, offset) = self.read_unverified(payload)?;
        verify_frame(&h, offset, payload)
    }

    /// [`FrameReader::read_frame`] that, for an uncompressed PAGES frame
    /// whose payload is whole pages, also leaves each page's CRC32C in
    /// `crcs` (see [`verify_frame_pages`]).
    pub fn read_frame_pages(
        &mut self,
        payload: &mut Vec<u8>,
        fold: &PageFold,
        crcs: &mut Vec<u32>,
    ) -> Result<Header, TransferError> {
        let (h, offset) = self.read_unverified(payload)?;
        verify_frame_pages(&h, offset, payload, fold, crcs)
    }

    /// Reads one frame's raw header and payload without checking them
    /// (beyond the payload size limit); [`verify_frame`] does the rest. Lets a
    /// receiver read the socket on one thread and verify on another.
    pub fn read_unverified(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<([u8; HEADER_LEN], u64), TransferError> {
        let (h, offset) = self.read_raw_header()?;
        self.read_payload_vec(&h, payload)?;
        Ok((h, offset))
    }

    /// Reads one frame's raw header, unchecked except for the payload size
    /// limit, and its stream offset. The payload follows: read it with
    /// [`FrameReader::read_payload_vec`] or [`FrameReader::read_payload_into`].
    pub fn read_raw_header(&mut self) -> Result<([u8; HEADER_LEN], u64), TransferError> {
        let offset = self.offset;
        let mut h = [0u8; HEADER_LEN];
        self.fill(&mut h, "a frame header")?;
        let payload_len = raw_payload_len(&h);
        if u64::from(payload_len) > MAX_PAYLOAD {
            return Err(ProtocolError::FrameTooLarge {
                offset,
                len: payload_len.into(),
                max: MAX_PAYLOAD,
            }
            .into());
        }
        Ok((h, offset))
    }

    /// Reads the payload announced by raw header `h` into `payload[..len]`.
    ///
    /// `payload` grows only as bytes actually arrive, so a header announcing a
    /// huge payload on a short stream allocates little.
    pub fn read_payload_vec(
        &mut self,
        h: &[u8; HEADER_LEN],
        payload: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        let n = raw_payload_len(h) as usize;
        if payload.len() >= n {
            return self.fill(&mut payload[..n], "a frame payload");
        }
        payload.clear();
        let got = (&mut self.inner)
            .take(n as u64)
            .read_to_end(payload)
            .map_err(TransferError::io("reading from the peer"))?;
        self.offset += got as u64;
        if got < n {
            return Err(ProtocolError::Truncated {
                offset: self.offset,
                what: "a frame payload",
            }
            .into());
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` payload bytes into `buf` (a caller that
    /// already knows where the payload should land).
    pub fn read_payload_into(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        self.fill(buf, "a frame payload")
    }
}

/// The payload length a raw header announces.
pub fn raw_payload_len(h: &[u8; HEADER_LEN]) -> u32 {
    u32::from_le_bytes([h[4], h[5], h[6], h[7]])
}

/// Checks a raw uncompressed PAGES header against the CRCs of the pages its
/// payload held (computed by the caller, one per `fold.page_size()` bytes),
/// then decodes it.
pub fn verify_pages_header(
    h: &[u8; HEADER_LEN],
    offset: u64,
    crcs: &[u32],
    fold: &PageFold,
) -> Result<Header, TransferError> {
    let computed = fold.fold_all(crc32c::crc32c(&h[..28]), crcs);
    finish_verify(h, offset, computed)
}

/// Checks a raw frame read by [`FrameReader::read_unverified`] at stream
/// `offset`: CRC32C first, then kind and reserved bytes.
pub fn verify_frame(
    h: &[u8; HEADER_LEN],
    offset: u64,
    payload: &[u8],
) -> Result<Header, TransferError> {
    let n = checked_len(h, offset, payload)?;
    let computed = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &payload[..n]);
    finish_verify(h, offset, computed)
}

/// [`verify_frame`] that, when the frame is an uncompressed PAGES frame whose
/// payload is whole pages of `fold.page_size()`, computes the CRC32C of each
/// page into `crcs` and the frame CRC from them (one pass over the payload).
/// For any other frame `crcs` is left empty. Nothing in `crcs` is meaningful
/// unless this returns `Ok`.
pub fn verify_frame_pages(
    h: &[u8; HEADER_LEN],
    offset: u64,
    payload: &[u8],
    fold: &PageFold,
    crcs: &mut Vec<u32>,
) -> Result<Header, TransferError> {
    crcs.clear();
    let n = checked_len(h, offset, payload)?;
    let ps = fold.page_size() as usize;
    if crate::live::is_live(h) {
        let (pages, _) = crate::live::live_lengths(h, ps as u64)
            .ok_or_else(|| crate::live::malformed(offset))?;
        let (pages, list) = payload[..n].split_at(pages as usize);
        let header = crate::live::verify_live(h, offset, list)?;
        crcs.extend(pages.chunks_exact(ps).map(page_crc));
        return Ok(header);
    }
    let pages_frame = h[0] == FrameKind::Pages as u8 && h[1] == Codec::None as u8;
    if !pages_frame || ps == 0 || n % ps != 0 {
        return verify_frame(h, offset, payload);
    }
    crcs.extend(payload[..n].chunks_exact(ps).map(page_crc));
    let computed = fold.fold_all(crc32c::crc32c(&h[..28]), crcs);
    finish_verify(h, offset, computed)
}

/// The payload length a raw header announces, if `payload` holds it.
fn checked_len(h: &[u8; HEADER_LEN], offset: u64, payload: &[u8]) -> Result<usize, TransferError> {
    let n = raw_payload_len(h) as usize;
    if payload.len() < n {
        return Err(ProtocolError::Truncated {
            offset,
            what: "a frame payload",
        }
        .into());
    }
    Ok(n)
}

/// Compares the stored CRC with `computed`, then decodes the header.
pub(crate) fn finish_verify(
    h: &[u8; HEADER_LEN],
    offset: u64,
    computed: u32,
) -> Result<Header, TransferError> {
    let stored = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if stored != computed {
        return Err(ProtocolError::BadChecksum {
            offset,
            kind: h[0],
            stored,
            computed,
        }
        .into());
    }
    Ok(decode_header(h, offset)?)
}

/// Decodes a raw header's fields without looking at its CRC: for a caller
/// that must decide where a payload goes before it can check the frame
/// ([`verify_frame`] and friends decode only after the CRC matched).
pub fn decode_header(h: &[u8; HEADER_LEN], offset: u64) -> Result<Header, ProtocolError> {
    let payload_len = raw_payload_len(h);
    let kind =
        FrameKind::from_u8(h[0]).ok_or(ProtocolError::UnknownFrame { offset, kind: h[0] })?;
    let field = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    let live =
        h[2] == crate::live::LIVE_FRAME && kind == FrameKind::Pages && h[1] == Codec::None as u8;
    if (h[2] != 0 && !live) || h[3] != 0 {
        return Err(ProtocolError::Malformed {
            offset,
            kind,
            reason: "reserved header bytes are not zero",
        });
    }
    Ok(Header {
        offset,
        kind,
        codec: h[1],
        flags: h[2],
        payload_len,
        a: field(8..16),
        b: field(16..24),
        c: field(24..28) as u32,
    })
}

/// Writes frames to a byte stream, counting bytes.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter { inner, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes the preamble.
    pub fn write_preamble(&mut self) -> io::Result<()> {
        self.inner.write_all(&preamble())?;
        self.written += PREAMBLE_LEN as u64;
        Ok(())
    }

    /// Writes one frame (header and payload, gathered into as few system calls
    /// as the writer allows). Returns the bytes written.
    pub fn write_frame(
        &mut self,
        kind: FrameKind,
        codec: u8,
        a: u64,
        b: u64,
        c: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let header = encode_header(kind, codec, a, b, c, payload);
        self.write_sealed(&header, payload)
    }

    /// Writes an uncompressed PAGES frame whose pages have the CRCs `crcs`
    /// (see [`encode_pages_header`]). Returns the bytes written.
    pub fn write_pages(
        &mut self,
        region: u32,
        offset: u64,
        payload: &[u8],
        crcs: &[u32],
        fold: &PageFold,
    ) -> io::Result<u64> {
        let header = encode_pages_header(region, offset, payload.len(), crcs, fold);
        self.write_sealed(&header, payload)
    }

    fn write_sealed(&mut self, header: &[u8; HEADER_LEN], payload: &[u8]) -> io::Result<u64> {
        let mut slices = [IoSlice::new(header), IoSlice::new(payload)];
        let mut bufs = &mut slices[..];
        if payload.is_empty() {
            bufs = &mut bufs[..1];
        }
        while !bufs.is_empty() {
            match self.inner.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = (HEADER_LEN + payload.len()) as u64;
        self.written += n;
        Ok(n)
    }

    /// Counts `n` bytes written to the underlying writer directly (a live
    /// frame gathered by [`precopy_sys::live::write_all_gather`]).
    pub(crate) fn wrote(&mut self, n: u64) {
        self.written += n;
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The sender's handshake.
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
}

impl Hello {
    /// The HELLO payload.
    pub fn payload(&self) -> Vec<u8> {
        let regions = self.layout.regions();
        let mut p = Vec::with_capacity(HELLO_FIXED_LEN + HELLO_REGION_LEN * regions.len());
        p.extend_from_slice(&self.stream_index.to_le_bytes());
        p.extend_from_slice(&self.stream_count.to_le_bytes());
        p.extend_from_slice(&self.nonce);
        p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(&r.id.to_le_bytes());
            p.push(Backing::wire(r.backing));
            p.push(u8::from(r.guest_addr.is_some()));
            p.extend_from_slice(&0u16.to_le_bytes());
            p.extend_from_slice(&r.size.to_le_bytes());
            p.extend_from_slice(&r.page_size.to_le_bytes());
            p.extend_from_slice(&r.guest_addr.unwrap_or(0).to_le_bytes());
        }
        p
    }

    /// Parses a HELLO frame. The layout is validated; its page size is not
    /// checked against the receiver's expectation.
    pub fn parse(h: &Header, p: &[u8]) -> Result<Hello, ProtocolError> {
        let bad = |reason| ProtocolError::Malformed {
            offset: h.offset,
            kind: FrameKind::Hello,
            reason,
        };
        if p.len() < HELLO_FIXED_LEN {
            return Err(bad("payload too short"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap_or_default());
        let stream_index = u32_at(0);
        let stream_count = u32_at(4);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&p[8..24]);
        let n = u32_at(24) as usize;
        if u32_at(28) != 0 {
            return Err(bad("reserved bytes are not zero"));
        }
        if n > MAX_REGIONS || p.len() != HELLO_FIXED_LEN + HELLO_REGION_LEN * n {
            return Err(bad("region count does not match payload length"));
        }
        if stream_count == 0 || stream_index >= stream_count {
            return Err(bad("stream index out of range"));
        }
        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let o = HELLO_FIXED_LEN + HELLO_REGION_LEN * i;
            let backing = Backing::from_wire(p[o + 4]).map_err(|()| bad("unknown backing"))?;
            let flags = p[o + 5];
            if flags > 1 || p[o + 6] != 0 || p[o + 7] != 0 {
                return Err(bad("unknown region flags"));
            }
            regions.push(MemoryRegion {
                id: u32_at(o),
                size: u64_at(o + 8),
                page_size: u64_at(o + 16),
                guest_addr: (flags & 1 == 1).then(|| u64_at(o + 24)),
                backing,
                host_addr: None,
            });
        }
        let layout = Layout::new(regions).map_err(ProtocolError::BadLayout)?;
        Ok(Hello {
            session: h.a,
            stream_index,
            stream_count,
            nonce,
            layout,
        })
    }
}

/// Requires `kind` and no payload beyond `len` bytes.
pub(crate) fn expect(
    h: &Header,
    kind: FrameKind,
    payload_len: Option<u32>,
) -> Result<(), ProtocolError> {
    if h.kind != kind {
        return Err(ProtocolError::Unexpected {
            offset: h.offset,
            kind: h.kind,
            state: match kind {
                FrameKind::Hello => "waiting for HELLO",
                FrameKind::Challenge => "waiting for CHALLENGE",
                FrameKind::Auth => "waiting for AUTH",
                FrameKind::Welcome => "waiting for WELCOME",
                FrameKind::Done => "waiting for DONE",
                _ => "waiting for another frame",
            },
        });
    }
    if let Some(len) = payload_len
        && h.payload_len != len
    {
        return Err(ProtocolError::Malformed {
            offset: h.offset,
            kind,
            reason: "wrong payload length",
        });
    }
    if kind != FrameKind::Pages && h.codec != 0 {
        return Err(ProtocolError::Malformed {
            offset: h.offset,
            kind,
            reason: "codec set on a frame without pages",
        });
    }
    Ok(())
}

/// Reads an optional MAC payload (empty or exactly [`MAC_LEN`] bytes).
pub(crate) fn parse_mac(h: &Header, p: &[u8]) -> Result<Option<[u8; MAC_LEN]>, ProtocolError> {
    match p.len() {
        0 => Ok(None),
        MAC_LEN => {
            let mut m = [0u8; MAC_LEN];
            m.copy_from_slice(p);
            Ok(Some(m))
        }
        _ => Err(ProtocolError::Malformed {
            offset: h.offset,
            kind: h.kind,
            reason: "authentication code has the wrong length",
        }),
    }
}

/// Decodes an ERROR frame's message.
pub(crate) fn error_message(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(4096)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, a: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_header(kind, 0, a, 0, 0, payload).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_and_offsets() {
        let mut bytes = preamble().to_vec();
        bytes.extend(frame(FrameKind::RoundBegin, 7, b""));
        bytes.extend(frame(FrameKind::Error, 0, b"boom"));
        let mut r = FrameReader::new(&bytes[..]);
        r.read_preamble().unwrap();
        let mut p = Vec::new();
        let h = r.read_frame(&mut p).unwrap();
        assert_eq!((h.kind, h.a, h.offset), (FrameKind::RoundBegin, 7, 16));
        let h = r.read_frame(&mut p).unwrap();
        assert_eq!(&p[..h.payload_len as usize], b"boom");
        assert!(matches!(
            r.read_frame(&mut p),
            Err(TransferError::Protocol(ProtocolError::Truncated {
                offset: 84,
                ..
            }))
        ));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let f = frame(FrameKind::Zero, 0x1000, b"xyz");
        for bit in 0..f.len() * 8 {
            let mut g = f.clone();
            g[bit / 8] ^= 1 << (bit % 8);
            let mut p = Vec::new();
            let r = FrameReader::new(&g[..]).read_frame(&mut p);
            assert!(r.is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn pages_frames_fold_their_crc_from_page_crcs() {
        let ps = 4096usize;
        let fold = PageFold::new(ps as u64);
        let data: Vec<u8> = (0..3 * ps).map(|i| (i * 7 % 251) as u8).collect();
        let crcs: Vec<u32> = data.chunks(ps).map(page_crc).collect();
        let folded = encode_pages_header(2, 0x5000, data.len(), &crcs, &fold);
        let plain = encode_header(FrameKind::Pages, 0, 0x5000, data.len() as u64, 2, &data);
        assert_eq!(folded, plain);

        let mut f = folded.to_vec();
        f.extend_from_slice(&data);
        let mut p = Vec::new();
        let mut got = Vec::new();
        let h = FrameReader::new(&f[..])
            .read_frame_pages(&mut p, &fold, &mut got)
            .unwrap();
        assert_eq!((h.kind, h.a, got.clone()), (FrameKind::Pages, 0x5000, crcs));
        // A flipped payload bit in any page is caught by the folded check.
        for byte in [0, ps + 17, 3 * ps - 1] {
            let mut g = f.clone();
            g[HEADER_LEN + byte] ^= 0x10;
            let r = FrameReader::new(&g[..]).read_frame_pages(&mut p, &fold, &mut got);
            assert!(
                matches!(
                    r,
                    Err(TransferError::Protocol(ProtocolError::BadChecksum { .. }))
                ),
                "flip at payload byte {byte}"
            );
        }
    }

    #[test]
    fn bad_preambles() {
        let mut p = preamble();
        p[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            check_preamble(&p),
            Err(ProtocolError::OldVersion { version: 1, .. })
        ));
        p[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = check_preamble(&p).unwrap_err();
        assert!(matches!(e, ProtocolError::OldVersion { version: 2, .. }));
        assert!(e.to_string().contains("version 2"), "{e}");
        p[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            check_preamble(&p),
            Err(ProtocolError::UnknownVersion { version: 9, .. })
        ));
        p[0] = b'X';
        assert!(matches!(
            check_preamble(&p),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn huge_announced_payload_is_refused_or_truncated_cheaply() {
        let mut h = encode_header(FrameKind::Pages, 0, 0, 0, 0, b"");
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut p = Vec::new();
        assert!(matches!(
            FrameReader::new(&h[..]).read_frame(&mut p),
            Err(TransferError::Protocol(ProtocolError::FrameTooLarge { .. }))
        ));
        h[4..8].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        assert!(matches!(
            FrameReader::new(&h[..]).read_frame(&mut p),
            Err(TransferError::Protocol(ProtocolError::Truncated { .. }))
        ));
        assert!(p.capacity() < 1 << 20);
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
        };
        let p = hello.payload();
        let h = Header {
            offset: 0,
            kind: FrameKind::Hello,
            flags: 0,
            codec: 0,
            payload_len: p.len() as u32,
            a: 42,
            b: 0,
            c: 0,
        };
        assert_eq!(Hello::parse(&h, &p).unwrap(), hello);
        assert!(Hello::parse(&h, &p[..p.len() - 1]).is_err());
    }
}
