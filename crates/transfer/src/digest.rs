//! Per-page hashes and the whole-memory digest built from them.
//!
//! Every page that travels carries a [`PageHash`], computed once, right after
//! it was read (sender) or as it is checked (receiver). The same numbers serve
//! three purposes:
//!
//! - an uncompressed PAGES frame lists them after its pages, and its frame
//!   CRC covers the header and that list, so each page is checked against its
//!   listed hash without a second pass over the payload on either side;
//! - each end records the hash of the last copy of every page in a
//!   [`PageHashes`] table;
//! - the **memory digest** is the XXH3-64 of that table: the hash of every
//!   page of the layout, regions in address order, as little-endian `u64`s
//!   back to back. Pages never sent count as zero pages (a destination starts
//!   zeroed).
//!
//! So the final check of a transfer compares two tables, not two memories:
//! it costs a pass over 8 bytes per page instead of over the memory, and a
//! migration's downtime does not grow with memory size. What it proves: the
//! destination holds, for every page, the last copy the sender read. A write
//! the tracker missed would not show up there, because the sender never read
//! it; [`FinalCheck::Full`] re-reads the stopped source (and the destination)
//! and compares against the tables, which catches exactly that, at the cost
//! of a pass over memory on both ends.
//!
//! **The page hash is XXH3-64** ([`page_hash`], the one place that names it;
//! protocol and image version 4 on). It replaced a CRC32C of each page (versions
//! 1-3): on the project machine (AMD Zen 1, AVX2) XXH3-64 hashes a cached
//! 4 KiB page ~2.9x as fast as the fastest CRC32C crate and ~2.2x as fast
//! from memory (`cargo bench -p precopy-transfer --bench page_hash`,
//! BENCHMARKS.md), and it runs on every page at both ends. On a CPU with
//! AVX-512 it is computed by `precopy_sys::xxh3` (same values; on an Intel
//! Xeon with AVX-512 1.3x `twox-hash`'s AVX2 code, in cache and from memory). It is not a
//! cryptographic hash: it detects damage and torn copies, not forgery (the
//! wire's key authenticates the peer, see [`crate::protocol`]). Two different
//! pages share a hash with probability about 2^-64, against 2^-32 for the
//! CRC32C it replaced, so the final comparison of the tables (and the digest
//! of them) is the stronger for it.

use std::hash::Hasher;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use twox_hash::XxHash3_64;

use crate::error::{LayoutError, TransferError};

/// How a transfer's final checksum is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum FinalCheck {
    /// Compare the page hashes each end recorded while sending and
    /// applying: no pass over memory (the default; keeps downtime small).
    #[default]
    Recorded,
    /// Also re-read all source memory (stopped) and all destination memory,
    /// and require both to match the recorded CRCs. Catches a write the
    /// tracker did not report; costs a pass over memory on each end.
    Full,
}

impl FinalCheck {
    /// The value carried in a FINISH frame's `b` field.
    pub fn wire(self) -> u64 {
        match self {
            FinalCheck::Recorded => 0,
            FinalCheck::Full => 1,
        }
    }

    /// The check a FINISH frame's `b` field asks for.
    pub fn from_wire(b: u64) -> Option<FinalCheck> {
        match b {
            0 => Some(FinalCheck::Recorded),
            1 => Some(FinalCheck::Full),
            _ => None,
        }
    }
}

/// A sink's final check: the digest of the hashes it `recorded` must equal
/// `expected`, and with [`FinalCheck::Full`] so must the digest of what it
/// holds, read back by `read_back` (called only then).
pub(crate) fn check_final(
    expected: u64,
    recorded: u64,
    check: FinalCheck,
    read_back: impl FnOnce() -> Result<u64, TransferError>,
) -> Result<(), TransferError> {
    let mismatch = |actual| TransferError::ChecksumMismatch { expected, actual };
    if recorded != expected {
        return Err(mismatch(recorded));
    }
    if check == FinalCheck::Full {
        let actual = read_back()?;
        if actual != expected {
            return Err(mismatch(actual));
        }
    }
    Ok(())
}

/// The hash of one page's bytes ([`page_hash`]).
pub type PageHash = u64;

/// Bytes of one [`PageHash`] on the wire and in a page-hash list (u64 LE).
pub const PAGE_HASH_LEN: usize = size_of::<PageHash>();

/// The hash of one page: XXH3-64 with seed 0. The one place the page hash is
/// chosen; see the module docs for why this one. On a CPU with AVX-512 a page
/// (longer than 240 bytes) goes through `precopy_sys::xxh3`'s 512-bit loop,
/// anything else through `twox-hash` (which picks its AVX2 or SSE2 code at run
/// time): the same values either way.
pub fn page_hash(page: &[u8]) -> PageHash {
    precopy_sys::xxh3::xxh3_64_long(page).unwrap_or_else(|| XxHash3_64::oneshot(page))
}

/// `hashes` as a page-hash list: u64 LE each, back to back.
pub fn hash_list(hashes: &[PageHash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// The hashes of a page-hash list ([`hash_list`]); a partial last entry is
/// ignored.
pub fn hashes_of_list(list: &[u8]) -> impl Iterator<Item = PageHash> + '_ {
    list.chunks_exact(PAGE_HASH_LEN).map(|c| {
        let mut b = [0u8; PAGE_HASH_LEN];
        b.copy_from_slice(c);
        PageHash::from_le_bytes(b)
    })
}

/// The hash of `page_size` zero bytes.
pub fn zero_page_hash(page_size: u64) -> PageHash {
    static ZERO_4K: OnceLock<PageHash> = OnceLock::new();
    static OTHERS: Mutex<Vec<(u64, PageHash)>> = Mutex::new(Vec::new());
    if page_size == 4096 {
        return *ZERO_4K.get_or_init(|| hash_zeros(4096));
    }
    let mut known = OTHERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, h)) = known.iter().find(|(ps, _)| *ps == page_size) {
        return h;
    }
    let h = hash_zeros(page_size);
    known.push((page_size, h));
    h
}

/// XXH3-64 of `len` zero bytes, hashed in pieces (a 1 GiB huge page needs
/// no 1 GiB buffer).
fn hash_zeros(len: u64) -> PageHash {
    static PIECE: [u8; 1 << 16] = [0; 1 << 16];
    if len <= PIECE.len() as u64 {
        return page_hash(&PIECE[..len as usize]);
    }
    let mut h = XxHash3_64::with_seed(0);
    let mut left = len;
    while left > 0 {
        let n = left.min(PIECE.len() as u64) as usize;
        h.write(&PIECE[..n]);
        left -= n as u64;
    }
    h.finish()
}

/// The hash of the last copy of every page of a layout, indexed by page
/// number in layout order (regions back to back). Starts as all zero pages.
/// 8 bytes per page.
#[derive(Debug, Clone)]
pub struct PageHashes {
    /// `hash ^ zero`, so a zero-filled table means "all zero pages" and a
    /// large table costs nothing until written.
    entries: Vec<PageHash>,
    zero: PageHash,
}

impl PageHashes {
    /// A table of `pages` zero pages of `page_size` bytes.
    pub fn new(pages: usize, page_size: u64) -> PageHashes {
        PageHashes {
            entries: vec![0; pages],
            zero: zero_page_hash(page_size),
        }
    }

    /// Pages in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no pages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends `pages` entries for zero pages (a region added to the
    /// layout, laid out after every region before it).
    pub fn grow(&mut self, pages: usize) {
        self.entries.resize(self.entries.len() + pages, 0);
    }

    /// Records the hashes of pages `first..first + hashes.len()`. Returns
    /// `false` (and records nothing) if they do not fit.
    pub fn set(&mut self, first: usize, hashes: &[PageHash]) -> bool {
        let Some(slots) = first
            .checked_add(hashes.len())
            .and_then(|end| self.entries.get_mut(first..end))
        else {
            return false;
        };
        for (slot, &h) in slots.iter_mut().zip(hashes) {
            *slot = h ^ self.zero;
        }
        true
    }

    /// Records pages `first..first + n` as zero pages. Returns `false` (and
    /// records nothing) if they do not fit.
    pub fn set_zero(&mut self, first: usize, n: usize) -> bool {
        let Some(slots) = first
            .checked_add(n)
            .and_then(|end| self.entries.get_mut(first..end))
        else {
            return false;
        };
        slots.fill(0);
        true
    }

    /// The hash recorded for page `index`.
    pub fn get(&self, index: usize) -> Option<PageHash> {
        self.entries.get(index).map(|e| e ^ self.zero)
    }

    /// For each block of `block_pages` pages in layout order (the last may be
    /// shorter), the XXH3-64 of the block's recorded page hashes as u64 LE:
    /// what a receiver tells a resuming sender (the protocol's RESUME), so
    /// that only blocks whose pages differ are sent again. `block_pages` 0
    /// counts as 1.
    pub fn block_digests(&self, block_pages: usize) -> Vec<u64> {
        let mut d = MemoryDigest::new();
        self.entries
            .chunks(block_pages.max(1))
            .map(|block| {
                d.reset();
                self.push_entries(&mut d, block);
                d.finish()
            })
            .collect()
    }

    /// The memory digest of the recorded pages.
    pub fn digest(&self) -> u64 {
        let mut d = MemoryDigest::new();
        self.push_entries(&mut d, &self.entries);
        d.finish()
    }

    fn push_entries(&self, d: &mut MemoryDigest, entries: &[PageHash]) {
        let mut bytes = [0u8; DIGEST_CHUNK * PAGE_HASH_LEN];
        for chunk in entries.chunks(DIGEST_CHUNK) {
            for (out, e) in bytes.chunks_exact_mut(PAGE_HASH_LEN).zip(chunk) {
                out.copy_from_slice(&(e ^ self.zero).to_le_bytes());
            }
            d.hasher.write(&bytes[..chunk.len() * PAGE_HASH_LEN]);
        }
    }
}

/// Page hashes hashed per step.
const DIGEST_CHUNK: usize = 1024;

/// Builds a memory digest (XXH3-64 of the page hashes as u64 LE, see the
/// module docs) from pages or page hashes given in layout order.
#[derive(Clone)]
pub struct MemoryDigest {
    hasher: XxHash3_64,
}

impl std::fmt::Debug for MemoryDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDigest")
            .field("digest", &format_args!("{:#018x}", self.finish()))
            .finish()
    }
}

impl Default for MemoryDigest {
    fn default() -> MemoryDigest {
        MemoryDigest::new()
    }
}

impl MemoryDigest {
    /// An empty digest.
    pub fn new() -> MemoryDigest {
        MemoryDigest {
            hasher: XxHash3_64::with_seed(0),
        }
    }

    fn reset(&mut self) {
        self.hasher = XxHash3_64::with_seed(0);
    }

    /// Appends the hashes of each page of `data` (whole pages of `page_size`).
    ///
    /// # Errors
    /// [`LayoutError::InvalidPageSize`] for a page size that is not a power of two between
    /// 512 bytes and 1 GiB, [`LayoutError::RangeUnaligned`] when `data` is not whole pages;
    /// nothing is appended.
    pub fn push_pages(&mut self, data: &[u8], page_size: usize) -> Result<(), LayoutError> {
        let ps = page_size as u64;
        if !crate::layout::valid_page_size(ps) {
            return Err(LayoutError::InvalidPageSize { page_size: ps });
        }
        if !data.len().is_multiple_of(page_size) {
            return Err(LayoutError::RangeUnaligned {
                range: 0..data.len() as u64,
                page_size: ps,
            });
        }
        self.push_whole_pages(data, page_size);
        Ok(())
    }

    /// [`MemoryDigest::push_pages`] for a page size taken from a [`crate::Layout`] (so valid);
    /// a partial last page is hashed as it is.
    pub(crate) fn push_whole_pages(&mut self, data: &[u8], page_size: usize) {
        let mut bytes = [0u8; DIGEST_CHUNK * PAGE_HASH_LEN];
        for group in data.chunks(page_size * DIGEST_CHUNK) {
            let mut n = 0;
            for page in group.chunks(page_size) {
                bytes[n..n + PAGE_HASH_LEN].copy_from_slice(&page_hash(page).to_le_bytes());
                n += PAGE_HASH_LEN;
            }
            self.hasher.write(&bytes[..n]);
        }
    }

    /// Appends `n` pages with the same hash (zero pages, pages never sent).
    pub fn push_repeated(&mut self, page_hash: PageHash, mut n: u64) {
        let mut bytes = [0u8; DIGEST_CHUNK * PAGE_HASH_LEN];
        for out in bytes.chunks_exact_mut(PAGE_HASH_LEN) {
            out.copy_from_slice(&page_hash.to_le_bytes());
        }
        while n > 0 {
            let k = n.min(DIGEST_CHUNK as u64) as usize;
            self.hasher.write(&bytes[..k * PAGE_HASH_LEN]);
            n -= k as u64;
        }
    }

    /// The digest.
    pub fn finish(&self) -> u64 {
        self.hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize, ps: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n * ps)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn block_digests_differ_only_where_a_page_hash_differs() {
        let mut a = PageHashes::new(200, 4096);
        let mut b = a.clone();
        assert_eq!(a.block_digests(64), b.block_digests(64));
        assert_eq!(a.block_digests(64).len(), 4);
        a.set(130, &[5]);
        let (da, db) = (a.block_digests(64), b.block_digests(64));
        let differ: Vec<usize> = (0..4).filter(|&i| da[i] != db[i]).collect();
        assert_eq!(differ, [2]);
        b.set(130, &[5]);
        assert_eq!(a.block_digests(64), b.block_digests(64));
        // A page recorded as zeros and a page never recorded are the same.
        a.set_zero(0, 1);
        assert_eq!(a.block_digests(64), b.block_digests(64));
        assert_eq!(a.block_digests(0).len(), 200);
    }

    #[test]
    fn page_hash_is_xxh3_64_and_streams() {
        // The XXH3 reference value of the empty input (seed 0).
        assert_eq!(page_hash(b""), 0x2d06_8005_38d3_94c2);
        for len in [1usize, 7, 4096, 65536, 200_000] {
            let data = pages(1, len, len as u64 + 1);
            let mut h = XxHash3_64::with_seed(0);
            for piece in data.chunks(1000) {
                h.write(piece);
            }
            assert_eq!(page_hash(&data), h.finish(), "length {len}");
        }
        for len in [512u64, 4096, 65536, 1 << 17, 2 << 20] {
            assert_eq!(
                zero_page_hash(len),
                page_hash(&vec![0u8; len as usize]),
                "{len}"
            );
        }
    }

    /// The AVX-512 loop (where the CPU has it) and `twox-hash` agree on every length a
    /// page or a table can have past XXH3's short inputs, and on large pages.
    #[test]
    fn page_hash_matches_twox_hash_at_every_length() {
        if !precopy_sys::xxh3::has_avx512() {
            println!("SKIP: no AVX-512F on this CPU: page_hash is twox-hash itself here");
        }
        let data = pages(1, (2 << 20) + 64, 11);
        for len in (0..=8192).chain([65536, 65537, 1 << 21, (2 << 20) + 64]) {
            assert_eq!(
                page_hash(&data[..len]),
                XxHash3_64::oneshot(&data[..len]),
                "length {len}"
            );
        }
        // Unaligned starts.
        for at in 1..64 {
            let p = &data[at..at + 4096];
            assert_eq!(page_hash(p), XxHash3_64::oneshot(p), "at {at}");
        }
        // A page of one repeated byte, of zeros and of ones.
        for b in [0u8, 0xFF, 0x5A] {
            let p = vec![b; 4096];
            assert_eq!(page_hash(&p), XxHash3_64::oneshot(&p), "byte {b:#x}");
        }
    }

    #[test]
    fn hash_lists_round_trip() {
        let h = [1u64, u64::MAX, 0x0102_0304_0506_0708];
        let list = hash_list(&h);
        assert_eq!(list.len(), 3 * PAGE_HASH_LEN);
        assert_eq!(&list[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(hashes_of_list(&list).collect::<Vec<_>>(), h);
    }

    #[test]
    fn table_digest_matches_memory_digest() {
        let ps = 4096;
        let data = pages(8, ps, 3);
        let mut t = PageHashes::new(12, ps as u64);
        let hashes: Vec<u64> = data.chunks(ps).map(page_hash).collect();
        assert!(t.set(2, &hashes));
        assert!(t.set_zero(3, 2));
        assert!(!t.set(10, &hashes), "past the end is refused");
        assert!(!t.set_zero(usize::MAX, 2), "overflow is refused");

        let mut mem = vec![0u8; 12 * ps];
        mem[2 * ps..10 * ps].copy_from_slice(&data);
        mem[3 * ps..5 * ps].fill(0);
        let mut d = MemoryDigest::new();
        d.push_pages(&mem, ps).unwrap();
        assert_eq!(t.digest(), d.finish());

        let mut r = MemoryDigest::new();
        r.push_repeated(zero_page_hash(ps as u64), 12);
        assert_eq!(PageHashes::new(12, ps as u64).digest(), r.finish());
        assert_ne!(t.digest(), r.finish());
        assert_eq!(t.get(0), Some(zero_page_hash(ps as u64)));
        assert_eq!(t.get(2), Some(hashes[0]));
        // The digest is the XXH3-64 of the table as u64 LE.
        let table: Vec<u8> = (0..12)
            .flat_map(|i| t.get(i).unwrap().to_le_bytes())
            .collect();
        assert_eq!(t.digest(), page_hash(&table));
    }
}
