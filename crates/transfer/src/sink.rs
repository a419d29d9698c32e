//! Where pages go: the [`Sink`] trait and the in-memory sink.
//!
//! A sink receives rounds of pages in order. The socket sender
//! ([`SocketSink`](crate::SocketSink)), the checkpoint image writer
//! ([`ImageWriter`](crate::ImageWriter)) and [`MemorySink`] implement it; the
//! [`Receiver`](crate::Receiver) drives a sink with what arrives on the wire.
//! A sink is handed only whole pages inside its layout, and rejects anything
//! else rather than clipping it.

use std::ops::Range;

use bitvec::vec::BitVec;
use memmap2::MmapMut;

use crate::buffer::PageBuf;
use crate::digest::{FinalCheck, MemoryDigest, PageCrcs, check_final};
use crate::error::{LayoutError, TransferError};
use crate::layout::Layout;

/// A destination for rounds of pages.
///
/// Call order: (`begin_round`, (`send_pages` | `send_zero_range`)*,
/// `end_round`)*, `finish`. Within a round each page is sent at most once;
/// across rounds the later copy wins.
pub trait Sink {
    /// Round `round` starts (rounds count up from 0).
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError>;
    /// Whole pages starting at source address `addr`, inside one layout
    /// region, with the CRC32C of each page (already computed by the sender,
    /// or verified by the receiver, so a sink need not hash them again).
    fn send_pages(&mut self, addr: u64, pages: PageBuf, crcs: &[u32]) -> Result<(), TransferError>;
    /// Pages that read as all zeros.
    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError>;
    /// Round `round` is complete; returns the bytes this sink wrote for it
    /// (on the wire or to its file).
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError>;
    /// No more rounds. `memory_checksum` is the sender's memory digest (see
    /// [`crate::digest`]); a sink that can, checks what it holds against it,
    /// as `check` says, and fails on a mismatch.
    fn finish(&mut self, memory_checksum: u32, check: FinalCheck) -> Result<(), TransferError>;

    /// Optional fast path for a receiver: lends the destination bytes of the
    /// whole pages `addr..addr + len` (inside one region) so a frame's payload
    /// can be read from the socket straight into them, saving a copy. A sink
    /// lends only pages it can restore exactly if the frame then fails its
    /// check ([`MemorySink`]: pages that hold zeros because nothing was ever
    /// applied to them, or only zeros). After lending, the receiver calls
    /// exactly one of [`Sink::commit_lent`] or [`Sink::revert_lent`] before
    /// anything else. The default lends nothing.
    fn lend_pages(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let _ = (addr, len);
        None
    }

    /// The lent pages at `addr` passed their check and now hold pages with
    /// CRCs `crcs`: record them as [`Sink::send_pages`] would.
    fn commit_lent(&mut self, addr: u64, crcs: &[u32]) -> Result<(), TransferError> {
        let _ = (addr, crcs);
        Err(TransferError::Misuse {
            operation: "commit_lent",
            state: "on a sink that lends nothing",
        })
    }

    /// The lent pages `addr..addr + len` failed their check (or their read
    /// failed): put back what they held before.
    fn revert_lent(&mut self, addr: u64, len: u64) {
        let _ = (addr, len);
    }
}

/// `Sink` for a pointer to a sink: every method forwards.
macro_rules! forward_sink {
    ($($ptr:ty),*) => {$(
        impl<T: Sink + ?Sized> Sink for $ptr {
            fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
                (**self).begin_round(round)
            }
            fn send_pages(
                &mut self,
                addr: u64,
                pages: PageBuf,
                crcs: &[u32],
            ) -> Result<(), TransferError> {
                (**self).send_pages(addr, pages, crcs)
            }
            fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
                (**self).send_zero_range(range)
            }
            fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
                (**self).end_round(round)
            }
            fn finish(&mut self, checksum: u32, check: FinalCheck) -> Result<(), TransferError> {
                (**self).finish(checksum, check)
            }
            fn lend_pages(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
                (**self).lend_pages(addr, len)
            }
            fn commit_lent(&mut self, addr: u64, crcs: &[u32]) -> Result<(), TransferError> {
                (**self).commit_lent(addr, crcs)
            }
            fn revert_lent(&mut self, addr: u64, len: u64) {
                (**self).revert_lent(addr, len)
            }
        }
    )*};
}

forward_sink!(&mut T, Box<T>);

/// Counts kept by [`MemorySink`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Rounds completed.
    pub rounds: u64,
    /// Pages written with contents (a page sent twice counts twice).
    pub pages: u64,
    /// Pages written as zeros.
    pub zero_pages: u64,
    /// The checksum accepted by `finish`, once finished.
    pub finished: Option<u32>,
}

/// Destination memory laid out by offset in an anonymous mapping this sink
/// owns; starts all zeros. The receiving end of a live migration, and the
/// in-memory sink tests compare against the source.
#[derive(Debug)]
pub struct MemorySink {
    layout: Layout,
    mem: MmapMut,
    crcs: PageCrcs,
    /// Per page: holds applied contents (clear: zeros, never written or
    /// sent as zeros). Only such clear pages are lent.
    holds_data: BitVec,
    stats: MemoryStats,
}

impl MemorySink {
    /// Zero-filled memory for `layout`.
    pub fn new(layout: Layout) -> Result<MemorySink, TransferError> {
        let len = usize::try_from(layout.total_len()).map_err(|_| TransferError::Config {
            reason: "layout is larger than the address space",
        })?;
        let mem =
            MmapMut::map_anon(len).map_err(TransferError::io("mapping destination memory"))?;
        let pages = len / layout.page_size() as usize;
        let crcs = PageCrcs::new(pages, layout.page_size());
        Ok(MemorySink {
            layout,
            mem,
            crcs,
            holds_data: BitVec::repeat(false, pages),
            stats: MemoryStats::default(),
        })
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// All destination memory, regions back to back in address order.
    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    /// The bytes at source addresses `range` (non-empty, inside one region).
    pub fn read(&self, range: Range<u64>) -> Result<&[u8], LayoutError> {
        let ps = self.layout.page_size();
        let outside = || LayoutError::OutsideLayout {
            range: range.clone(),
        };
        if range.start >= range.end {
            return Err(outside());
        }
        let start = range.start - range.start % ps;
        let end = range.end.checked_next_multiple_of(ps).ok_or_else(outside)?;
        let off = self.layout.locate(start..end)? + (range.start - start);
        Ok(&self.mem[off as usize..(off + (range.end - range.start)) as usize])
    }

    /// Back to all zeros with nothing received, as after [`MemorySink::new`]
    /// but keeping the mapping (and its pages, already faulted in).
    pub fn clear(&mut self) {
        self.mem.fill(0);
        self.crcs = PageCrcs::new(self.crcs.len(), self.layout.page_size());
        self.holds_data.fill(false);
        self.stats = MemoryStats::default();
    }

    /// Counts so far.
    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// The memory digest of all destination memory, read now (see
    /// [`memory_checksum`](crate::memory_checksum)): a pass over the memory.
    pub fn checksum(&self) -> u32 {
        let mut d = MemoryDigest::new();
        d.push_pages(&self.mem, self.layout.page_size() as usize);
        d.finish()
    }

    /// The memory digest of the page CRCs recorded as pages were applied:
    /// what [`MemorySink::checksum`] returns, unless the memory was changed
    /// behind the sink's back.
    pub fn recorded_checksum(&self) -> u32 {
        self.crcs.digest()
    }
}

impl Sink for MemorySink {
    fn begin_round(&mut self, _round: u64) -> Result<(), TransferError> {
        Ok(())
    }

    fn send_pages(&mut self, addr: u64, pages: PageBuf, crcs: &[u32]) -> Result<(), TransferError> {
        let len = pages.len() as u64;
        let ps = self.layout.page_size();
        let off = self.layout.locate(addr..addr.saturating_add(len))?;
        if crcs.len() as u64 != len / ps || !self.crcs.set((off / ps) as usize, crcs) {
            return Err(TransferError::Misuse {
                operation: "send_pages",
                state: "with a CRC count that differs from the page count",
            });
        }
        let first = (off / ps) as usize;
        self.holds_data[first..first + crcs.len()].fill(true);
        let off = off as usize;
        self.mem[off..off + pages.len()].copy_from_slice(&pages);
        self.stats.pages += len / ps;
        Ok(())
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        let len = range.end.saturating_sub(range.start);
        let ps = self.layout.page_size();
        let off = self.layout.locate(range)?;
        let (first, n) = ((off / ps) as usize, (len / ps) as usize);
        self.crcs.set_zero(first, n);
        self.holds_data[first..first + n].fill(false);
        let off = off as usize;
        self.mem[off..off + len as usize].fill(0);
        self.stats.zero_pages += len / ps;
        Ok(())
    }

    /// Lends pages that hold zeros (never written, or sent as zeros), which
    /// [`Sink::revert_lent`] restores by zeroing them again.
    fn lend_pages(&mut self, addr: u64, len: u64) -> Option<&mut [u8]> {
        let ps = self.layout.page_size();
        let off = self.layout.locate(addr..addr.checked_add(len)?).ok()?;
        let (first, n) = ((off / ps) as usize, (len / ps) as usize);
        if len % ps != 0 || self.holds_data[first..first + n].any() {
            return None;
        }
        Some(&mut self.mem[off as usize..(off + len) as usize])
    }

    fn commit_lent(&mut self, addr: u64, crcs: &[u32]) -> Result<(), TransferError> {
        let ps = self.layout.page_size();
        let len = crcs.len() as u64 * ps;
        let off = self.layout.locate(addr..addr.saturating_add(len))?;
        let first = (off / ps) as usize;
        self.crcs.set(first, crcs);
        self.holds_data[first..first + crcs.len()].fill(true);
        self.stats.pages += crcs.len() as u64;
        Ok(())
    }

    fn revert_lent(&mut self, addr: u64, len: u64) {
        if let Ok(off) = self.layout.locate(addr..addr.saturating_add(len)) {
            self.mem[off as usize..(off + len) as usize].fill(0);
        }
    }

    fn end_round(&mut self, _round: u64) -> Result<u64, TransferError> {
        self.stats.rounds += 1;
        Ok(0)
    }

    /// Compares the recorded page CRCs with `memory_checksum`; with
    /// [`FinalCheck::Full`], also re-reads all memory and requires the same.
    fn finish(&mut self, memory_checksum: u32, check: FinalCheck) -> Result<(), TransferError> {
        let recorded = self.recorded_checksum();
        check_final(memory_checksum, recorded, check, || Ok(self.checksum()))?;
        self.stats.finished = Some(recorded);
        Ok(())
    }
}
