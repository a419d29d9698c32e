//! Frames on a byte stream: [`FrameReader`] reads a header and payload and
//! checks the frame CRC before anything decodes its fields; [`FrameWriter`]
//! writes typed frames ([`super::Frame`]) with header and payload gathered
//! into as few system calls as the writer allows.

use std::io::{self, IoSlice, Read, Write};

use zerocopy::{FromZeros, IntoBytes};

use super::{
    Frame, FrameKind, HEADER_LEN, Header, MAX_PAYLOAD, PREAMBLE_LEN, PageSpan, Pages, RawHeader,
    check_preamble, encode, preamble,
};
use crate::digest::{PAGE_HASH_LEN, PageHash, hash_list, hashes_of_list, page_hash};
use crate::error::{ProtocolError, TransferError};

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

    /// One read into `buf` (not empty), retried when interrupted: how many bytes came. The
    /// end of the stream, at stream offset `at`, is a truncated `what`.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        at: u64,
        what: &'static str,
    ) -> Result<usize, TransferError> {
        loop {
            match self.inner.read(buf) {
                Ok(0) => return Err(ProtocolError::Truncated { offset: at, what }.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransferError::Io {
                        what: "reading from the peer",
                        source,
                    });
                }
            }
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), TransferError> {
        let start = self.offset;
        let mut got = 0;
        while got < buf.len() {
            got += self.read_some(&mut buf[got..], start + got as u64, what)?;
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

    /// Reads one frame's raw header and payload without checking them
    /// (beyond the payload size limit); [`verify_frame`] does the rest. Lets a
    /// receiver read the socket on one thread and verify on another.
    pub fn read_unverified(
        &mut self,
        payload: &mut Vec<u8>,
    ) -> Result<(RawHeader, u64), TransferError> {
        let (h, offset) = self.read_raw_header()?;
        self.read_payload_vec(&h, payload)?;
        Ok((h, offset))
    }

    /// Reads one frame's raw header, unchecked except for the payload size
    /// limit, and its stream offset. The payload follows: read it with
    /// [`FrameReader::read_payload_vec`] or [`FrameReader::read_payload_into`].
    pub fn read_raw_header(&mut self) -> Result<(RawHeader, u64), TransferError> {
        let offset = self.offset;
        let mut h = RawHeader::new_zeroed();
        self.fill(h.as_mut_bytes(), "a frame header")?;
        let payload_len = h.payload_len();
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
        h: &RawHeader,
        payload: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        let n = h.payload_len() as usize;
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

    /// Reads exactly `pages.len()` payload bytes, whole pages of `ps`, into `pages`, and puts
    /// the hash of each page into `hashes` as soon as the page has arrived, while the kernel's
    /// copy of it is still in this core's cache: one pass over the bytes from memory instead of
    /// two. Each read asks for at most [`HASH_AS_READ`] bytes, so what it brings stays in
    /// cache until hashed. The hashes prove nothing until the frame is checked
    /// ([`verify_hashed_list`]); `hashes` holds garbage if this fails.
    pub fn read_pages_hashing(
        &mut self,
        pages: &mut [u8],
        ps: usize,
        hashes: &mut Vec<PageHash>,
    ) -> Result<(), TransferError> {
        hashes.clear();
        if ps == 0 {
            return self.fill(pages, "a frame payload");
        }
        let (mut got, mut hashed) = (0usize, 0usize);
        while got < pages.len() {
            let end = pages.len().min(got + HASH_AS_READ);
            let at = self.offset + got as u64;
            got += self.read_some(&mut pages[got..end], at, "a frame payload")?;
            while hashed + ps <= got {
                hashes.push(page_hash(&pages[hashed..hashed + ps]));
                hashed += ps;
            }
        }
        self.offset += got as u64;
        Ok(())
    }
}

/// Checks a raw frame read by [`FrameReader::read_unverified`] at stream
/// `offset`: CRC32C first, then kind and reserved bytes. An uncompressed
/// PAGES frame is checked as [`verify_frame_pages`] does, with the page size
/// its payload implies (its pages and hash list must agree on one; the
/// receiver's [`Pages::place`](super::Pages::place) then holds it to the
/// layout's); the page hashes are dropped.
pub fn verify_frame(h: &RawHeader, offset: u64, payload: &[u8]) -> Result<Header, TransferError> {
    let n = checked_len(h, offset, payload)?;
    if h.is_listed() {
        let ps = implied_page_size(h, offset)?;
        return verify_frame_pages(h, offset, payload, ps, &mut Vec::new());
    }
    let computed = crc32c::crc32c_append(h.crc_start(), &payload[..n]);
    finish_verify(h, offset, computed)
}

/// [`verify_frame`] for a receiver that knows the page size `ps`: an
/// uncompressed PAGES frame must be whole pages of `ps` followed by one hash
/// each; the hash of each page goes into `hashes` (see [`verify_listed`]).
/// For any other frame `hashes` is left empty. Nothing in `hashes` is
/// meaningful unless this returns `Ok`.
pub fn verify_frame_pages(
    h: &RawHeader,
    offset: u64,
    payload: &[u8],
    ps: u64,
    hashes: &mut Vec<PageHash>,
) -> Result<Header, TransferError> {
    hashes.clear();
    let n = checked_len(h, offset, payload)?;
    if !h.is_listed() {
        let computed = crc32c::crc32c_append(h.crc_start(), &payload[..n]);
        return finish_verify(h, offset, computed);
    }
    let (pages, _) = h
        .listed_lengths(ps)
        .ok_or_else(|| listed_malformed(offset))?;
    let (pages, list) = payload[..n].split_at(pages as usize);
    verify_listed(h, offset, pages, list, ps, hashes)
}

/// Checks an uncompressed PAGES frame whose payload was read as `pages`
/// (whole pages of `ps`) and `list` (their hashes, u64 LE): header and list
/// by the frame CRC, then every page against its listed hash, its hash going
/// into `hashes`. A page that differs fails the frame
/// ([`ProtocolError::BadPageHash`]) unless the frame is live; for a live
/// frame the caller compares `hashes` with `list` (see [`crate::live`]).
pub fn verify_listed(
    h: &RawHeader,
    offset: u64,
    pages: &[u8],
    list: &[u8],
    ps: u64,
    hashes: &mut Vec<PageHash>,
) -> Result<Header, TransferError> {
    hashes.clear();
    let ps = usize::try_from(ps).unwrap_or(0);
    if ps == 0 || !pages.len().is_multiple_of(ps) || pages.len() / ps * PAGE_HASH_LEN != list.len()
    {
        return Err(listed_malformed(offset));
    }
    hashes.extend(pages.chunks_exact(ps).map(page_hash));
    verify_hashed_list(h, offset, pages.len() as u64, list, ps as u64, hashes)
}

/// [`verify_listed`] for pages already hashed as they were read
/// ([`FrameReader::read_pages_hashing`]): `hashes` holds the hash of each of the `pages_len`
/// bytes of pages of `ps` that the frame carried, `list` the hashes it listed. Checks header
/// and list by the frame CRC, then every page's hash against the list, as [`verify_listed`].
pub fn verify_hashed_list(
    h: &RawHeader,
    offset: u64,
    pages_len: u64,
    list: &[u8],
    ps: u64,
    hashes: &[PageHash],
) -> Result<Header, TransferError> {
    let count = pages_len.checked_div(ps).unwrap_or(0);
    if ps == 0
        || !pages_len.is_multiple_of(ps)
        || count != hashes.len() as u64
        || count * PAGE_HASH_LEN as u64 != list.len() as u64
    {
        return Err(listed_malformed(offset));
    }
    let computed = crc32c::crc32c_append(h.crc_start(), list);
    let header = finish_verify(h, offset, computed)?;
    if !h.is_live() {
        let bad = hashes
            .iter()
            .zip(hashes_of_list(list))
            .enumerate()
            .find(|(_, (held, listed))| *held != listed);
        if let Some((page, (&computed, stored))) = bad {
            return Err(ProtocolError::BadPageHash {
                offset,
                page: page as u64,
                stored,
                computed,
            }
            .into());
        }
    }
    Ok(header)
}

/// The page size an uncompressed PAGES frame's payload implies: the pages'
/// length over the hashes listed after them.
fn implied_page_size(h: &RawHeader, offset: u64) -> Result<u64, TransferError> {
    let span_len = h.pages_len();
    let list = u64::from(h.payload_len())
        .checked_sub(span_len)
        .filter(|l| *l > 0 && l % PAGE_HASH_LEN as u64 == 0)
        .ok_or_else(|| listed_malformed(offset))?;
    let count = list / PAGE_HASH_LEN as u64;
    match span_len.checked_div(count) {
        Some(ps) if ps > 0 && span_len.is_multiple_of(count) => Ok(ps),
        _ => Err(listed_malformed(offset)),
    }
}

/// An uncompressed PAGES frame whose lengths do not add up.
fn listed_malformed(offset: u64) -> TransferError {
    ProtocolError::Malformed {
        offset,
        kind: FrameKind::Pages,
        reason: "page frame: payload is not the pages plus one hash per page",
    }
    .into()
}

/// The payload length a raw header announces, if `payload` holds it.
fn checked_len(h: &RawHeader, offset: u64, payload: &[u8]) -> Result<usize, TransferError> {
    let n = h.payload_len() as usize;
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
fn finish_verify(h: &RawHeader, offset: u64, computed: u32) -> Result<Header, TransferError> {
    let stored = h.stored_crc();
    if stored != computed {
        return Err(ProtocolError::BadChecksum {
            offset,
            kind: h.kind_byte(),
            stored,
            computed,
        }
        .into());
    }
    Ok(h.decode(offset)?)
}

/// Bytes asked of the socket per read by [`FrameReader::read_pages_hashing`] at most: a
/// frame of the default batch (64 pages, 256 KiB) in one read, and small enough that what one
/// read brings is still in cache (L2 or L3) when it is hashed.
///
/// Fewer, larger reads are what count here. Over TCP a read that consumed more than a full
/// segment lets the kernel send an ACK, and over loopback the processing of that ACK for the
/// sender's socket (releasing the spliced pages it acknowledges, waking the sender's writer) runs
/// on the receiving thread. Reading a frame's pages 64 KiB at a time instead of whole cost that
/// thread 0.06-0.11 s of CPU per GiB more in the stream bench's ladder (BENCHMARKS.md, "Where the
/// spliced copy's receiver spends").
pub const HASH_AS_READ: usize = 1 << 20;

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

    /// Writes the preamble.
    pub fn write_preamble(&mut self) -> io::Result<()> {
        self.inner.write_all(&preamble())?;
        self.written += PREAMBLE_LEN as u64;
        Ok(())
    }

    /// Writes one frame. Returns the bytes written.
    pub fn send<'p, F: Frame<'p>>(&mut self, frame: &F) -> io::Result<u64> {
        let (header, payload) = encode(frame);
        self.send_encoded(&header, &payload)
    }

    /// Writes a compressed PAGES frame whose payload (compressed per
    /// `pages.codec`) is `payload`. Returns the bytes written.
    pub fn send_pages(&mut self, pages: &Pages, payload: &[u8]) -> io::Result<u64> {
        self.send_encoded(&pages.header(payload), payload)
    }

    /// Counts `n` bytes written to the underlying writer directly (a live
    /// frame gathered by `precopy_sys::live::write_all_gather`).
    pub fn wrote(&mut self, n: u64) {
        self.written += n;
    }

    /// Writes an uncompressed PAGES frame for `span` whose pages, `payload`,
    /// have the hashes `hashes` (see [`Pages::listed_header`]). Returns the
    /// bytes written.
    pub fn send_listed_pages(
        &mut self,
        span: PageSpan,
        payload: &[u8],
        hashes: &[PageHash],
    ) -> io::Result<u64> {
        let list = hash_list(hashes);
        let header = Pages::listed_header(span, &list, false);
        let mut slices = [
            IoSlice::new(header.as_bytes()),
            IoSlice::new(payload),
            IoSlice::new(&list),
        ];
        self.write_slices(&mut slices)?;
        let n = (HEADER_LEN + payload.len() + list.len()) as u64;
        self.written += n;
        Ok(n)
    }

    /// Writes a header sealed for `payload` ([`encode`]) and the payload.
    /// Returns the bytes written.
    pub fn send_encoded(&mut self, header: &RawHeader, payload: &[u8]) -> io::Result<u64> {
        let mut slices = [IoSlice::new(header.as_bytes()), IoSlice::new(payload)];
        let bufs = if payload.is_empty() {
            &mut slices[..1]
        } else {
            &mut slices[..]
        };
        self.write_slices(bufs)?;
        let n = (HEADER_LEN + payload.len()) as u64;
        self.written += n;
        Ok(n)
    }

    /// Writes every byte of `bufs`, in order.
    fn write_slices(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !bufs.is_empty() {
            match self.inner.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{RoundBegin, encode_header};
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
        let begin: RoundBegin = h.decode(&p).unwrap();
        assert_eq!((begin.round, h.offset), (7, 16));
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

    /// A reader that hands out at most `step` bytes per read, and counts the reads.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
        reads: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            self.reads += 1;
            Ok(n)
        }
    }

    /// Pages read in one frame larger than one read, arriving in pieces that end inside pages,
    /// get the hash of each whole page, whatever the split; a frame that fits one read is asked
    /// for in one read.
    #[test]
    fn pages_hashed_as_read_match_however_they_arrive() {
        let ps = 4096usize;
        let pages = HASH_AS_READ / ps * 2 + 3;
        let data: Vec<u8> = (0..pages * ps).map(|i| (i * 13 % 253) as u8).collect();
        let want: Vec<u64> = data.chunks(ps).map(page_hash).collect();
        for step in [usize::MAX, HASH_AS_READ, 65_536, 5_000, 4_095] {
            let mut r = FrameReader::at_offset(
                Trickle {
                    bytes: &data,
                    step,
                    reads: 0,
                },
                100,
            );
            let mut got = vec![0u8; data.len()];
            let mut hashes = Vec::new();
            r.read_pages_hashing(&mut got, ps, &mut hashes).unwrap();
            assert_eq!(got, data, "step {step}");
            assert_eq!(hashes, want, "step {step}");
            assert_eq!(r.offset(), 100 + data.len() as u64);
            if step == usize::MAX {
                assert_eq!(r.get_mut().reads, data.len().div_ceil(HASH_AS_READ));
            }
        }
        // A 64-page frame (the default batch) is asked for in one read.
        let mut r = FrameReader::new(Trickle {
            bytes: &data,
            step: usize::MAX,
            reads: 0,
        });
        r.read_pages_hashing(&mut vec![0u8; 64 * ps], ps, &mut Vec::new())
            .unwrap();
        assert_eq!(r.get_mut().reads, 1);
        // Cut short: truncated at the stream offset where the bytes stopped.
        let mut r = FrameReader::new(Trickle {
            bytes: &data[..3 * ps + 10],
            step: 5_000,
            reads: 0,
        });
        let err = r
            .read_pages_hashing(&mut vec![0u8; 4 * ps], ps, &mut Vec::new())
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Protocol(ProtocolError::Truncated { offset, .. })
                    if offset == 3 * ps as u64 + 10
            ),
            "{err:?}"
        );
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
    fn uncompressed_pages_frames_list_their_page_hashes() {
        let ps = 4096usize;
        let data: Vec<u8> = (0..3 * ps).map(|i| (i * 7 % 251) as u8).collect();
        let hashes: Vec<u64> = data.chunks(ps).map(page_hash).collect();
        let span = PageSpan {
            region: 2,
            offset: 0x5000,
            len: data.len() as u64,
        };
        let mut out = FrameWriter::new(Vec::new());
        let n = out.send_listed_pages(span, &data, &hashes).unwrap();
        let f = out.get_ref().clone();
        assert_eq!(n as usize, HEADER_LEN + data.len() + 3 * PAGE_HASH_LEN);
        assert_eq!(f.len() as u64, n);
        assert_eq!(&f[HEADER_LEN + data.len()..], &hash_list(&hashes)[..]);

        let mut p = Vec::new();
        let mut got = Vec::new();
        let (raw, at) = FrameReader::new(&f[..]).read_unverified(&mut p).unwrap();
        let h = verify_frame_pages(&raw, at, &p, ps as u64, &mut got).unwrap();
        let pages: Pages = h.decode(&p).unwrap();
        assert_eq!((pages.span, got.clone()), (span, hashes));
        // The plain reader checks it as well, with the page size the lengths imply.
        assert!(FrameReader::new(&f[..]).read_frame(&mut p).is_ok());
        // A flipped bit anywhere is caught: in a page by its hash, in the
        // header or the list by the frame CRC.
        for byte in [0, 9, HEADER_LEN, HEADER_LEN + ps + 17, f.len() - 1] {
            let mut g = f.clone();
            g[byte] ^= 0x10;
            let (raw, at) = FrameReader::new(&g[..]).read_unverified(&mut p).unwrap();
            let r = verify_frame_pages(&raw, at, &p, ps as u64, &mut got);
            assert!(
                matches!(
                    r,
                    Err(TransferError::Protocol(
                        ProtocolError::BadChecksum { .. }
                            | ProtocolError::BadPageHash { .. }
                            | ProtocolError::Malformed { .. }
                    ))
                ),
                "flip at byte {byte}: {r:?}"
            );
            assert!(
                FrameReader::new(&g[..]).read_frame(&mut p).is_err(),
                "{byte}"
            );
        }
        // Pages of another size than the layout's are refused.
        let (raw, at) = FrameReader::new(&f[..]).read_unverified(&mut p).unwrap();
        assert!(verify_frame_pages(&raw, at, &p, 2 * ps as u64, &mut got).is_err());
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
        // Version 3 (CRC32C page checks, 32-bit digests) is refused, saying why.
        p[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = check_preamble(&p).unwrap_err();
        assert!(matches!(e, ProtocolError::OldVersion { version: 3, .. }));
        assert!(e.to_string().contains("XXH3-64"), "{e}");
        // Version 6 did not mark the final round: a peer speaking it is refused in the
        // handshake rather than left unraised without a word.
        p[8..12].copy_from_slice(&6u32.to_le_bytes());
        let e = check_preamble(&p).unwrap_err();
        assert!(matches!(e, ProtocolError::OldVersion { version: 6, .. }));
        assert!(e.to_string().contains("final round marked"), "{e}");
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
}
