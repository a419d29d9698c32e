//! Sending this process's own memory without a copy, and how the wire keeps that honest.
//!
//! [`OwnMemory`] is the page source for memory this process maps itself (an embedded VMM's guest
//! RAM, a benchmark's buffer): instead of copying a batch with `process_vm_readv`, it lends the
//! pages ([`LivePages`]) to the socket writer. The page's hash (XXH3-64) is taken in place,
//! without a copy (`LivePages::for_each_page`), by the connection's writer thread right before
//! it sends the page ([`Sink::send_unhashed_live_pages`](crate::Sink::send_unhashed_live_pages)),
//! and reported back for the sender's page-hash table
//! ([`Sink::take_live_hashes`](crate::Sink::take_live_hashes)); the sending thread only tests
//! each page for zeros, which reads the start of a page that is not all zeros.
//!
//! The writer sends a lent page one of two ways ([`SenderConfig::splice`](crate::SenderConfig::splice)):
//!
//! - **`writev`** (the default): the kernel copies the page into the socket during the call
//!   (after the hash, so it finds the page in cache).
//! - **`vmsplice` + `splice`**: the pipe and then the socket hold references to the pages, not a
//!   copy (`precopy_sys::splice`); over loopback the receiver's `recv` copies straight from them,
//!   so each byte is copied once instead of twice. The kernel reads the page when the receiver
//!   copies it, which may be well after the writer moved on. A socket that refuses `splice` gets
//!   `writev` instead. Cheaper than `writev` on some CPUs (AMD Zen 1), dearer on others (Intel
//!   Emerald Rapids): BENCHMARKS.md.
//!
//! # Pages that change while they are sent
//!
//! The workload keeps writing during live rounds, so a page can change between its checksum and
//! the kernel's read, or during the read: the bytes sent are then *torn*, and match neither the
//! checksum nor the page. With `splice` the kernel's read is the receiver's copy, so the window
//! runs from the hash until the receiver reads the page (a write after the `splice` returned
//! still reaches the wire), but the argument is the same: that is harmless for the final result
//! only because the write that tore it came after the round's scan re-armed the page (the hash
//! and the send come after the scan), so the next round reports the page and sends it again; the
//! final round runs with the source paused, and the source stays paused until the receiver
//! acknowledged FINISH, which it does only after it read every page before it, so nothing tears
//! there. The wire makes that argument checkable instead of trusting it:
//!
//! - A lent page goes out in a **live PAGES frame**: header byte 2 (otherwise reserved) has bit 0
//!   ([`LIVE_FRAME`]) set; like any uncompressed PAGES frame its payload is the pages followed by
//!   the hash of each page as the sender took it (`u64` LE each), and its frame CRC covers the
//!   header and that list, not the pages, so header and list are checked strictly; each page is
//!   then checked against its listed hash.
//! - In a live frame, a page whose bytes do not match its listed hash is applied anyway (the
//!   receiver records the hash of what it holds) and remembered in the receiver's **changed
//!   set** ([`ChangedPages`]); in any other frame it fails the frame.
//!   Any later copy of that page that verifies (a PAGES or ZERO frame of a later round) removes
//!   it. The receiver refuses FINISH while the set is not empty
//!   ([`TransferError::ChangedWhileSent`](crate::TransferError::ChangedWhileSent)): a torn page
//!   that was never sent again — a missed write, a source that was not really paused, or bytes
//!   damaged on the way — fails the migration.
//! - The memory digest at FINISH compares the sender's page-hash table (what it hashed) with the
//!   receiver's (what it holds), as for any transfer: a torn page left in place also shows there.
//!
//! So the per-frame check of lent pages is relaxed only into "known changed, must be re-sent",
//! and the final check is stricter than before, not weaker. With compression on, lent pages are
//! copied first and sent in ordinary frames (compressing bytes that change is pointless work).
//!
//! `MSG_ZEROCOPY` was measured for these sends (the stream bench's `raw_zerocopy`) and is not
//! used: over loopback the kernel copies anyway for a local receiver, and pinning plus completion
//! handling made the copy slower (BENCHMARKS.md, "Own memory without a copy"). `splice` has no
//! completions to wait for and is not turned back into a copy for a local receiver.

use std::ops::Range;
use std::sync::Arc;

use precopy_sys::mem::Mapping;

pub use precopy_sys::live::LivePages;

use crate::error::{SourceError, TransferError};
use crate::source::{PageSource, ProcessMemory};

/// Header byte 2, bit 0: a live PAGES frame (see the module docs); encoded
/// and decoded by the protocol's `Pages` frame.
pub const LIVE_FRAME: u8 = crate::protocol::LIVE_FRAME;

/// A page source for memory this process mapped itself, lending pages to the socket writer
/// instead of copying them. Copies (for sinks other than a socket, the switch-over re-check and
/// [`FinalCheck::Full`](crate::FinalCheck::Full)) go through `process_vm_readv` as with
/// [`ProcessMemory`], so an unreadable page there is an error rather than a crash.
///
/// The mappings are held for as long as the source or any page it lent lives, so lent memory
/// cannot be unmapped under the kernel's read. A lent page that the embedder makes unreadable
/// (`mprotect(PROT_NONE)`) while a round runs stops the process with `SIGSEGV` when its checksum
/// is taken, as it would stop a vCPU touching it.
#[derive(Debug, Clone)]
pub struct OwnMemory {
    /// Sorted by address, non-overlapping.
    mappings: Vec<Arc<Mapping>>,
    copy: ProcessMemory,
}

impl OwnMemory {
    /// A source over `mappings` (every page a transfer reads must lie inside one of them; other
    /// addresses are read by copy, like [`ProcessMemory::current`]).
    pub fn new(mappings: impl IntoIterator<Item = Arc<Mapping>>) -> OwnMemory {
        let mut mappings: Vec<Arc<Mapping>> = mappings.into_iter().collect();
        mappings.sort_by_key(|m| m.addr());
        OwnMemory {
            mappings,
            copy: ProcessMemory::current(),
        }
    }

    fn owner(&self, range: &Range<u64>) -> Option<&Arc<Mapping>> {
        let i = self
            .mappings
            .partition_point(|m| m.addr() <= range.start)
            .checked_sub(1)?;
        let m = &self.mappings[i];
        (range.end <= m.addr() + m.len()).then_some(m)
    }
}

impl PageSource for OwnMemory {
    fn read_ranges(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<(), SourceError> {
        self.copy.read_ranges(ranges, buf)
    }

    fn lend(&mut self, range: Range<u64>) -> Option<LivePages> {
        let m = self.owner(&range)?.clone();
        LivePages::new(m, range).ok()
    }
}

/// The receiver's set of pages applied torn from a live frame and not sent again since (see the
/// module docs), as memory offsets of whole pages.
#[derive(Debug, Default)]
pub(crate) struct ChangedPages {
    pages: std::collections::BTreeSet<u64>,
    /// Pages that were ever found changed (for the report).
    seen: u64,
}

impl ChangedPages {
    /// Pages at `offset` were just applied with hashes `held`; the sender listed `sent` (live
    /// frame) or nothing (an ordinary, strictly checked frame: every page is a good copy).
    pub(crate) fn applied(
        &mut self,
        offset: u64,
        ps: u64,
        held: &[crate::digest::PageHash],
        sent: Option<&[u8]>,
    ) {
        match sent {
            None => {
                if !self.pages.is_empty() {
                    let end = offset + held.len() as u64 * ps;
                    self.forget(offset..end);
                }
            }
            Some(list) => {
                let listed = crate::digest::hashes_of_list(list);
                for (i, (&h, s)) in held.iter().zip(listed).enumerate() {
                    let at = offset + i as u64 * ps;
                    if s == h {
                        self.pages.remove(&at);
                    } else {
                        self.seen += 1;
                        self.pages.insert(at);
                    }
                }
            }
        }
    }

    /// Pages `range` were replaced by a good copy (zeros).
    pub(crate) fn forget(&mut self, range: Range<u64>) {
        if self.pages.is_empty() {
            return;
        }
        let gone: Vec<u64> = self.pages.range(range).copied().collect();
        for p in gone {
            self.pages.remove(&p);
        }
    }

    /// Fails if any page is still torn.
    pub(crate) fn check(&self) -> Result<(), TransferError> {
        match self.pages.first() {
            None => Ok(()),
            Some(&first) => Err(TransferError::ChangedWhileSent {
                pages: self.pages.len() as u64,
                first,
            }),
        }
    }

    /// Pages found changed while sent, over the whole transfer.
    pub(crate) fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_set_clears_on_a_good_copy_only() {
        let ps = 4096;
        let mut c = ChangedPages::default();
        let list = crate::digest::hash_list(&[1, 2, 3]);
        c.applied(0, ps, &[1, 9, 3], Some(&list));
        assert!(matches!(
            c.check(),
            Err(TransferError::ChangedWhileSent {
                pages: 1,
                first: 4096
            })
        ));
        // Torn again in a later live frame: still there.
        c.applied(4096, ps, &[7], Some(&crate::digest::hash_list(&[8])));
        assert!(c.check().is_err());
        // An ordinary frame elsewhere does not clear it.
        c.applied(8192, ps, &[5], None);
        assert!(c.check().is_err());
        // A live frame whose page matches does.
        c.applied(4096, ps, &[8], Some(&crate::digest::hash_list(&[8])));
        assert!(c.check().is_ok());
        c.applied(0, ps, &[0, 1], Some(&crate::digest::hash_list(&[0, 2])));
        c.forget(4096..8192);
        assert!(c.check().is_ok());
        assert_eq!(c.seen(), 3);
    }
}
