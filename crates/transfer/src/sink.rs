//! Where pages go: the [`Sink`] trait and the memory sink.
//!
//! A sink receives rounds of pages in order, then at most one state blob,
//! then the final checksum. The socket sender
//! ([`SocketSink`](crate::SocketSink)), the checkpoint image writer
//! ([`ImageWriter`](crate::ImageWriter)) and [`MemorySink`] implement it; the
//! [`Receiver`](crate::Receiver) drives a sink with what arrives on the wire.
//! Pages are addressed by **memory offset** (see [`crate::layout`]). A sink is
//! handed only whole pages inside one region of its layout, and rejects
//! anything else rather than clipping it.
//!
//! [`MemorySink`] writes into destination memory: an anonymous mapping it
//! owns ([`MemorySink::new`]), or the regions the destination VMM mapped
//! itself ([`MemorySink::with_memory`], anything implementing
//! [`RegionMemory`]: a [`Mapping`] of anonymous, memfd or hugetlb memory, an
//! `MmapMut`, a `Vec<u8>`), the way `vm-memory` lets a VMM hand its guest
//! memory to a library.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bitvec::vec::BitVec;
use memmap2::MmapMut;
use precopy_sys::mem::Mapping;

use crate::buffer::PageBuf;
use crate::digest::{FinalCheck, MemoryDigest, PageHash, PageHashes, check_final};
use crate::error::{LayoutError, TransferError};
use crate::layout::Layout;

/// Makes a sink's blocked calls return with an error; callable from any
/// thread, any number of times (see [`Sink::interrupter`]).
pub type Interrupt = Arc<dyn Fn() + Send + Sync>;

/// A sink's pacing of its writes to a byte rate ([`Sink::pacing`]): a token bucket that
/// every connection's writer takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pacing {
    /// Bytes per second (header and payload bytes alike).
    pub rate: u64,
    /// Bytes it would let through now without waiting (what the bucket holds).
    pub ready: u64,
    /// The most it lets through at once after an idle spell (the bucket's size).
    pub burst: u64,
}

/// A destination for rounds of pages.
///
/// Call order: (`begin_round`, (`send_pages` | `send_zero_range`)*,
/// `end_round`)*, `send_state`?, `finish`. Within a round each page is sent
/// at most once; across rounds the later copy wins. `offset` arguments are
/// memory offsets (see [`crate::layout`]).
pub trait Sink {
    /// Round `round` starts (rounds count up from 0).
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError>;

    /// Right before [`Sink::begin_round`], when the caller knows it: the round about to
    /// begin holds at most `pages` pages. A sink with finite room checks it for the whole
    /// round at its start (an image: [`ImageWriter`](crate::ImageWriter) compacts first, or
    /// fails with [`ImageError::NoSpace`](crate::ImageError::NoSpace) before writing any of
    /// it); a sending sink passes it on (ROUND_BEGIN's page count). Only the next
    /// `begin_round` uses it. The default ignores it.
    fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
        let _ = pages;
        Ok(())
    }

    /// Right before [`Sink::begin_round`]: the round about to begin is the final one (the
    /// source is paused until the transfer ends). A sending sink passes it on (ROUND_BEGIN's
    /// final-round flag, so that the receiver may raise its threads for the final phase);
    /// only the next `begin_round` uses it. The default ignores it.
    fn expect_final_round(&mut self) {}
    /// Whole pages starting at memory offset `offset`, inside one layout
    /// region, with the hash of each page (already computed by the sender,
    /// or verified by the receiver, so a sink need not hash them again).
    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError>;
    /// Pages (memory offsets `range`) that read as all zeros.
    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError>;
    /// Round `round` is complete; returns the bytes this sink wrote for it
    /// (on the wire or to its file).
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError>;
    /// No more rounds. `memory_checksum` is the sender's memory digest (see
    /// [`crate::digest`]); a sink that can, checks what it holds against it,
    /// as `check` says, and fails on a mismatch.
    fn finish(&mut self, memory_checksum: u64, check: FinalCheck) -> Result<(), TransferError>;

    /// Between rounds: `region` (no host address) joins the layout after
    /// every region before it ([`Layout::with_region`]): memory the source
    /// mapped after the transfer started. A sending sink announces it (the
    /// protocol's REGION), an image records it, and pages of it may follow
    /// in later rounds. The default refuses with
    /// [`TransferError::CannotGrow`]: a sink whose memory was sized for a
    /// fixed layout has nowhere to put the region.
    fn add_region(&mut self, region: &crate::layout::MemoryRegion) -> Result<(), TransferError> {
        Err(TransferError::CannotGrow { region: region.id })
    }

    /// Between rounds, before the state: the memory that exists now is `memory` (memory
    /// offsets, sorted and coalesced); every page outside it was unmapped by the source and
    /// is dropped: it reads as never sent (zeros) and its page hash becomes a zero page's,
    /// as the sender's table does, so the memory digests agree. A sending sink announces it
    /// (the protocol's MAPPED), an image records it (the final mappings, what `image info`
    /// lists) and drops the pages from its index and from later compactions, memory a
    /// destination mapped is zeroed there. Returns whether the sink dropped them: the
    /// default keeps every page it was given and returns `false`, and then the sender keeps
    /// its own table as it was (a receiver refuses such a sink with
    /// [`TransferError::CannotDrop`], since its sender has dropped them).
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        let _ = memory;
        Ok(false)
    }

    /// The source's opaque state blob (vCPU and device state), after the
    /// last round and before [`Sink::finish`], at most once. A receiving
    /// sink keeps it (or refuses it, and then the receiver refuses the
    /// migration); a sending sink passes it on. The default accepts an empty
    /// state and refuses any other: a sink that has nowhere to put a state
    /// must not drop it silently.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        if state.is_empty() {
            return Ok(());
        }
        Err(TransferError::Misuse {
            operation: "send_state",
            state: "on a sink that keeps no state",
        })
    }

    /// The first half of [`Sink::finish`]: everything but making the copy
    /// count as complete, which [`Sink::commit`] does. A sending sink whose
    /// destination acknowledges sends the checksum and waits for the
    /// acknowledgement without yet telling the destination its copy is
    /// complete; a sink that keeps the copy itself (an image) checks and
    /// syncs it without yet publishing it. A migration driver commits only
    /// if this returned within its bound (see the protocol's COMMIT), and a
    /// receiver only after the sender committed. The default is
    /// [`Sink::finish`].
    fn finish_uncommitted(
        &mut self,
        memory_checksum: u64,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
        self.finish(memory_checksum, check)
    }

    /// After [`Sink::finish_uncommitted`]: the destination may now consider
    /// its copy complete (an image is renamed into place). The default does
    /// nothing.
    fn commit(&mut self) -> Result<(), TransferError> {
        Ok(())
    }

    /// A handle that makes this sink's blocked calls (from another thread)
    /// return promptly with [`TransferError::Interrupted`], and every later
    /// call fail. `None` (the default): the sink never blocks on a peer.
    fn interrupter(&self) -> Option<Interrupt> {
        None
    }

    /// A handle that cuts the round in progress short from another thread, breaking
    /// nothing: the sink drops the page frames it has not begun to write (a frame being
    /// written is finished) and ends a wait for its pacing, and the round ends as soon as
    /// [`Sink::end_round`] is called, with the counts of what was written. Until
    /// [`Sink::uncut`], [`Sink::round_cut`] says so and every later round is cut too.
    /// [`Transfer::send_round`](crate::Transfer::send_round) stops handing pages over then
    /// and returns what was not sent ([`Transfer::take_cut`](crate::Transfer::take_cut)).
    /// `None` (the default): rounds always go whole. A sink that gives one implements
    /// [`Sink::round_cut`], [`Sink::take_cut_pages`] and [`Sink::uncut`] too (a page it drops
    /// unreported would be lost), and so does a wrapper that forwards it.
    fn round_cutter(&self) -> Option<Interrupt> {
        None
    }

    /// Whether [`Sink::round_cutter`]'s handle was called since [`Sink::uncut`].
    fn round_cut(&self) -> bool {
        false
    }

    /// Hands `f` each range of memory offsets whose page frame this sink dropped since the
    /// round cut ([`Sink::round_cutter`]); each once. The default has none.
    fn take_cut_pages(&mut self, f: &mut dyn FnMut(Range<u64>)) {
        let _ = f;
    }

    /// After a cut ([`Sink::round_cutter`]): later rounds go whole again (and paced).
    fn uncut(&mut self) {}

    /// The destination, for messages (`None`: not a remote peer).
    fn peer(&self) -> Option<String> {
        None
    }

    /// What [`Sink::finish`] does besides comparing digests, for messages, when it is more
    /// than an acknowledgement from a peer (an image: its index and `fsync`). `None` (the
    /// default): the digests and the acknowledgement round trip.
    fn finish_work(&self) -> Option<String> {
        None
    }

    /// How the sink paces its writes (`--bandwidth`): its rate and what it would let through
    /// right now without waiting, summed over its connections; the switch-over estimate
    /// counts a final round as no faster than that. `None` (the default): not paced.
    fn pacing(&self) -> Option<Pacing> {
        None
    }

    /// The IDs of the threads this sink runs its sends and acknowledgements on (a socket
    /// sink's writer and watcher threads), for a caller that raises their scheduling priority
    /// while the workload is paused. Empty (the default): the sink works on the caller's
    /// thread only.
    fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
        Vec::new()
    }

    /// Between rounds: one round trip to the destination (PING and PONG on every connection,
    /// the slowest of them), what acknowledging FINISH costs beyond the digests; for a sink
    /// that finishes locally (an image writer), its own finish, estimated. `None` (the
    /// default): the sink has no peer to answer and nothing to estimate.
    fn ping(&mut self) -> Result<Option<std::time::Duration>, TransferError> {
        Ok(None)
    }

    /// A receiving sink's digests of the pages it holds, per block of
    /// `block_pages` pages in layout order ([`PageHashes::block_digests`] of
    /// the hash of every page): what a receiver tells a resuming sender (the
    /// protocol's RESUME), which sends again every block whose digest
    /// differs from its own. A block holding a page whose contents the sink
    /// does not know must get a digest that differs. `None` (the default): a
    /// receiver with this sink cannot resume a broken transfer and fails
    /// instead.
    fn resume_digests(&self, block_pages: u64) -> Option<Vec<u64>> {
        let _ = block_pages;
        None
    }

    /// A receiving sink whose sender comes back after its final phase was cut
    /// (after the state or the final checksum, before the commit): forgets
    /// the state blob and the finish, which the sender sends again at its
    /// next switch-over. The default does nothing.
    fn reopen(&mut self) {}

    /// Whether [`Sink::resume`] may work: a sending sink that can reach its
    /// destination again and has not finished. The default: no.
    fn can_resume(&self) -> bool {
        false
    }

    /// A sending sink whose connections broke, between rounds and before
    /// the state or the final checksum: connects to the same transfer again
    /// (proving the key again) and returns where the destination stands (it
    /// kept what it applied). The default fails with
    /// [`TransferError::Misuse`].
    fn resume(&mut self) -> Result<ResumePoint, TransferError> {
        Err(TransferError::Misuse {
            operation: "resume",
            state: "on a sink that cannot reconnect",
        })
    }

    /// Whole pages of the sender's own memory at memory offset `offset`,
    /// lent without a copy ([`crate::live`]); `hashes` are the hash of each
    /// page as the sender took it just before, which the bytes may no longer
    /// match (the source keeps running in live rounds). The default copies
    /// the pages, takes the hashes of the copy and hands it to
    /// [`Sink::send_pages`]; a socket sink sends them from memory in a live
    /// frame.
    fn send_live_pages(
        &mut self,
        offset: u64,
        pages: crate::live::LivePages,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        let mut copy = vec![0u8; pages.len() as usize];
        pages
            .copy_to(0, &mut copy)
            .map_err(TransferError::io("copying lent pages"))?;
        let ps = copy.len().checked_div(hashes.len()).unwrap_or(0).max(1);
        let held: Vec<PageHash> = copy.chunks(ps).map(crate::digest::page_hash).collect();
        self.send_pages(offset, PageBuf::from_vec(copy), &held)
    }

    /// Whether this sink takes the hashes of lent pages itself
    /// ([`Sink::send_unhashed_live_pages`]). The default: no.
    fn hashes_live_pages(&self) -> bool {
        false
    }

    /// [`Sink::send_live_pages`] without the hashes, for a sink that
    /// [hashes lent pages itself](Sink::hashes_live_pages): it takes each page's hash right
    /// before it hands the page to the kernel, so that the kernel's copy reads the page from
    /// cache instead of memory, sends it as [`Sink::send_live_pages`] does, and reports the
    /// hashes through [`Sink::take_live_hashes`]. The default fails with
    /// [`TransferError::Misuse`].
    fn send_unhashed_live_pages(
        &mut self,
        offset: u64,
        pages: crate::live::LivePages,
    ) -> Result<(), TransferError> {
        let _ = (offset, pages);
        Err(TransferError::Misuse {
            operation: "send_unhashed_live_pages",
            state: "on a sink that does not hash lent pages",
        })
    }

    /// Calls `f` with the hashes of pages sent by [`Sink::send_unhashed_live_pages`] and not
    /// reported yet: the memory offset of the first page and the hash of each page, as it was
    /// sent, in the order they were sent. Once [`Sink::end_round`] returned `Ok`, every page
    /// of the round has been reported by the next call; pages the sink failed to send are
    /// never reported. The default reports nothing.
    fn take_live_hashes(&mut self, f: &mut dyn FnMut(u64, &[PageHash])) {
        let _ = f;
    }

    /// Optional fast path for a receiver: lends the destination bytes of the
    /// whole pages `offset..offset + len` (inside one region) so a frame's payload
    /// can be read from the socket straight into them, saving a copy. A sink
    /// lends only pages it can restore exactly if the frame then fails its
    /// check ([`MemorySink`]: pages that hold zeros because nothing was ever
    /// applied to them, or only zeros). After lending, the receiver calls
    /// exactly one of [`Sink::commit_lent`] or [`Sink::revert_lent`] before
    /// anything else. The default lends nothing.
    fn lend_pages(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let _ = (offset, len);
        None
    }

    /// The lent pages at `offset` passed their check and now hold pages with
    /// hashes `hashes`: record them as [`Sink::send_pages`] would.
    fn commit_lent(&mut self, offset: u64, hashes: &[PageHash]) -> Result<(), TransferError> {
        let _ = (offset, hashes);
        Err(TransferError::Misuse {
            operation: "commit_lent",
            state: "on a sink that lends nothing",
        })
    }

    /// The lent pages `offset..offset + len` failed their check (or their
    /// read failed): put back what they held before.
    fn revert_lent(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

/// Where a destination stands when a sender resumes a broken transfer (the
/// protocol's RESUME frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The next round the destination expects: the rounds every connection
    /// completed (the pages a round cut half-way applied stay applied).
    pub next_round: u64,
    /// Pages per block of [`ResumePoint::block_digests`].
    pub block_pages: u64,
    /// For each block of pages in layout order, the digest of the page hashes
    /// the destination recorded ([`PageHashes::block_digests`]).
    pub block_digests: Vec<u64>,
}

/// `Sink` for a pointer to a sink: every method forwards.
macro_rules! forward_sink {
    ($($ptr:ty),*) => {$(
        impl<T: Sink + ?Sized> Sink for $ptr {
            fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
                (**self).begin_round(round)
            }
            fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
                (**self).expect_round(pages)
            }
            fn expect_final_round(&mut self) {
                (**self).expect_final_round()
            }
            fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
                (**self).retain(memory)
            }
            fn send_pages(
                &mut self,
                offset: u64,
                pages: PageBuf,
                hashes: &[PageHash],
            ) -> Result<(), TransferError> {
                (**self).send_pages(offset, pages, hashes)
            }
            fn send_live_pages(
                &mut self,
                offset: u64,
                pages: crate::live::LivePages,
                hashes: &[PageHash],
            ) -> Result<(), TransferError> {
                (**self).send_live_pages(offset, pages, hashes)
            }
            fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
                (**self).send_zero_range(range)
            }
            fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
                (**self).end_round(round)
            }
            fn finish(&mut self, checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
                (**self).finish(checksum, check)
            }
            fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
                (**self).send_state(state)
            }
            fn reopen(&mut self) {
                (**self).reopen()
            }
            fn add_region(
                &mut self,
                region: &crate::layout::MemoryRegion,
            ) -> Result<(), TransferError> {
                (**self).add_region(region)
            }
            fn finish_uncommitted(
                &mut self,
                checksum: u64,
                check: FinalCheck,
            ) -> Result<(), TransferError> {
                (**self).finish_uncommitted(checksum, check)
            }
            fn commit(&mut self) -> Result<(), TransferError> {
                (**self).commit()
            }
            fn interrupter(&self) -> Option<Interrupt> {
                (**self).interrupter()
            }
            fn round_cutter(&self) -> Option<Interrupt> {
                (**self).round_cutter()
            }
            fn round_cut(&self) -> bool {
                (**self).round_cut()
            }
            fn take_cut_pages(&mut self, f: &mut dyn FnMut(Range<u64>)) {
                (**self).take_cut_pages(f)
            }
            fn uncut(&mut self) {
                (**self).uncut()
            }
            fn peer(&self) -> Option<String> {
                (**self).peer()
            }
            fn finish_work(&self) -> Option<String> {
                (**self).finish_work()
            }
            fn pacing(&self) -> Option<Pacing> {
                (**self).pacing()
            }
            fn threads(&self) -> Vec<precopy_sys::sched::Tid> {
                (**self).threads()
            }
            fn ping(&mut self) -> Result<Option<std::time::Duration>, TransferError> {
                (**self).ping()
            }
            fn resume_digests(&self, block_pages: u64) -> Option<Vec<u64>> {
                (**self).resume_digests(block_pages)
            }
            fn can_resume(&self) -> bool {
                (**self).can_resume()
            }
            fn resume(&mut self) -> Result<ResumePoint, TransferError> {
                (**self).resume()
            }
            fn hashes_live_pages(&self) -> bool {
                (**self).hashes_live_pages()
            }
            fn send_unhashed_live_pages(
                &mut self,
                offset: u64,
                pages: crate::live::LivePages,
            ) -> Result<(), TransferError> {
                (**self).send_unhashed_live_pages(offset, pages)
            }
            fn take_live_hashes(&mut self, f: &mut dyn FnMut(u64, &[PageHash])) {
                (**self).take_live_hashes(f)
            }
            fn lend_pages(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
                (**self).lend_pages(offset, len)
            }
            fn commit_lent(&mut self, offset: u64, hashes: &[PageHash]) -> Result<(), TransferError> {
                (**self).commit_lent(offset, hashes)
            }
            fn revert_lent(&mut self, offset: u64, len: u64) {
                (**self).revert_lent(offset, len)
            }
        }
    )*};
}

forward_sink!(&mut T, Box<T>);

/// The memory of one region that the destination mapped itself: where a
/// [`MemorySink`] built with [`MemorySink::with_memory`] writes that
/// region's pages. Offsets are bytes from the region's start.
pub trait RegionMemory: Send {
    /// Bytes mapped (must equal the region's size).
    fn size(&self) -> u64;
    /// Copies `data` to `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset`.
    fn zero_at(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The memory as a slice, if it may be seen as one (lets the receiver
    /// read a frame from the socket straight into it). The default: no.
    fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        None
    }
}

fn slice_range(len: usize, offset: u64, n: u64) -> io::Result<Range<usize>> {
    let start = usize::try_from(offset).ok();
    let end = start.and_then(|s| s.checked_add(usize::try_from(n).ok()?));
    match (start, end) {
        (Some(s), Some(e)) if e <= len => Ok(s..e),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "outside the region's memory",
        )),
    }
}

macro_rules! slice_region_memory {
    ($($t:ty),*) => {$(
        impl RegionMemory for $t {
            fn size(&self) -> u64 {
                self.len() as u64
            }
            fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
                let r = slice_range(self.len(), offset, data.len() as u64)?;
                self[r].copy_from_slice(data);
                Ok(())
            }
            fn zero_at(&mut self, offset: u64, len: u64) -> io::Result<()> {
                let r = slice_range(self.len(), offset, len)?;
                self[r].fill(0);
                Ok(())
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                let r = slice_range(self.len(), offset, buf.len() as u64)?;
                buf.copy_from_slice(&self[r]);
                Ok(())
            }
            fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
                Some(&mut self[..])
            }
        }
    )*};
}

slice_region_memory!(Vec<u8>, MmapMut);

/// A [`Mapping`] (anonymous, memfd, hugetlb) written through copies, never
/// seen as a slice: a VMM may keep its own handle ([`Arc`]) to the memory.
macro_rules! mapping_region_memory {
    ($($t:ty),*) => {$(
        impl RegionMemory for $t {
            fn size(&self) -> u64 {
                self.len()
            }
            fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
                self.write(offset, data)
            }
            fn zero_at(&mut self, offset: u64, len: u64) -> io::Result<()> {
                self.fill(offset, len, 0)
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                self.read(offset, buf)
            }
        }
    )*};
}

mapping_region_memory!(Mapping, Arc<Mapping>);

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
    pub finished: Option<u64>,
}

/// Where a [`MemorySink`]'s bytes live.
enum Storage {
    /// One anonymous mapping, regions back to back by memory offset.
    Owned(MmapMut),
    /// The destination's own memory, one per region in layout order.
    Caller(Vec<Box<dyn RegionMemory>>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Owned(m) => write!(f, "Owned({} bytes)", m.len()),
            Storage::Caller(r) => write!(f, "Caller({} regions)", r.len()),
        }
    }
}

/// Destination memory: pages land at their region and offset, in an
/// anonymous mapping this sink owns ([`MemorySink::new`], starts all zeros)
/// or in memory the caller mapped ([`MemorySink::with_memory`]). The
/// receiving end of a live migration, and the sink tests compare against
/// the source.
#[derive(Debug)]
pub struct MemorySink {
    layout: Layout,
    storage: Storage,
    hashes: PageHashes,
    /// Per page: may hold something other than zeros (clear: holds zeros,
    /// never written or sent as zeros). Only clear pages are lent.
    holds_data: BitVec,
    /// Per page: caller memory never written since the sink was made, whose
    /// contents (and so hash) are unknown.
    unknown: BitVec,
    stats: MemoryStats,
    state: Option<Vec<u8>>,
}

fn dest_io(what: &'static str) -> impl FnOnce(io::Error) -> TransferError {
    TransferError::io(what)
}

impl MemorySink {
    /// Zero-filled memory for `layout`, in one anonymous mapping.
    pub fn new(layout: Layout) -> Result<MemorySink, TransferError> {
        let len = usize::try_from(layout.total_len()).map_err(|_| TransferError::Config {
            reason: "layout is larger than the address space",
        })?;
        let mem =
            MmapMut::map_anon(len).map_err(TransferError::io("mapping destination memory"))?;
        Ok(MemorySink::build(layout, Storage::Owned(mem), false))
    }

    /// Writes each region's pages into the memory the destination mapped for
    /// it: `regions` pairs a region id of `layout` with its memory, every
    /// region exactly once, each exactly the region's size. The memory's
    /// contents before the transfer are not assumed to be zeros.
    pub fn with_memory(
        layout: Layout,
        regions: Vec<(u32, Box<dyn RegionMemory>)>,
    ) -> Result<MemorySink, TransferError> {
        let mut slots: Vec<Option<Box<dyn RegionMemory>>> =
            (0..layout.regions().len()).map(|_| None).collect();
        for (id, mem) in regions {
            let bad = |reason| LayoutError::Placement { region: id, reason };
            let i = layout
                .regions()
                .binary_search_by_key(&id, |r| r.id)
                .map_err(|_| bad("no region of the layout has this id"))?;
            if mem.size() != layout.regions()[i].size {
                return Err(bad("memory size differs from the region size").into());
            }
            if slots[i].replace(mem).is_some() {
                return Err(bad("memory given twice").into());
            }
        }
        let mut mems = Vec::with_capacity(slots.len());
        for (i, slot) in slots.into_iter().enumerate() {
            let id = layout.regions()[i].id;
            mems.push(slot.ok_or(LayoutError::Placement {
                region: id,
                reason: "no memory given for this region",
            })?);
        }
        Ok(MemorySink::build(layout, Storage::Caller(mems), true))
    }

    fn build(layout: Layout, storage: Storage, unknown: bool) -> MemorySink {
        let pages = layout.total_pages() as usize;
        let hashes = PageHashes::new(pages, layout.page_size());
        MemorySink {
            layout,
            storage,
            hashes,
            holds_data: BitVec::repeat(unknown, pages),
            unknown: BitVec::repeat(unknown, pages),
            stats: MemoryStats::default(),
            state: None,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// All destination memory, regions back to back by memory offset, when
    /// this sink owns it (`None` for caller memory: read that directly).
    pub fn memory(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Owned(m) => Some(m),
            Storage::Caller(_) => None,
        }
    }

    /// The caller's region memories back, in layout order (empty for owned
    /// memory).
    pub fn into_regions(self) -> Vec<Box<dyn RegionMemory>> {
        match self.storage {
            Storage::Owned(_) => Vec::new(),
            Storage::Caller(r) => r,
        }
    }

    /// Copies the bytes at memory offsets `offset..offset + buf.len()`
    /// (inside one region) into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        let outside = || LayoutError::OutsideLayout {
            range: offset..offset.saturating_add(buf.len() as u64),
        };
        let (r, inside) = self.layout.region_at(offset).ok_or_else(outside)?;
        if inside + buf.len() as u64 > r.size {
            return Err(outside().into());
        }
        match &self.storage {
            Storage::Owned(m) => {
                let o = offset as usize;
                buf.copy_from_slice(&m[o..o + buf.len()]);
                Ok(())
            }
            Storage::Caller(mems) => {
                let i = self.layout.regions().partition_point(|x| x.id < r.id);
                mems[i]
                    .read_at(inside, buf)
                    .map_err(dest_io("reading destination memory"))
            }
        }
    }

    /// Back to all zeros with nothing received, as after [`MemorySink::new`]
    /// but keeping the memory (and its pages, already faulted in).
    pub fn clear(&mut self) -> Result<(), TransferError> {
        match &mut self.storage {
            Storage::Owned(m) => m.fill(0),
            Storage::Caller(mems) => {
                for m in mems {
                    let n = m.size();
                    m.zero_at(0, n)
                        .map_err(dest_io("clearing destination memory"))?;
                }
            }
        }
        self.hashes = PageHashes::new(self.hashes.len(), self.layout.page_size());
        self.holds_data.fill(false);
        self.unknown.fill(false);
        self.stats = MemoryStats::default();
        self.state = None;
        Ok(())
    }

    /// Counts so far.
    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// The state blob the source sent, if any.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Takes the state blob the source sent, if any.
    pub fn take_state(&mut self) -> Option<Vec<u8>> {
        self.state.take()
    }

    /// The memory digest of all destination memory, read now (see
    /// [`memory_checksum`](crate::memory_checksum)): a pass over the memory.
    pub fn checksum(&self) -> Result<u64, TransferError> {
        let ps = self.layout.page_size() as usize;
        let mut d = MemoryDigest::new();
        match &self.storage {
            Storage::Owned(m) => d.push_whole_pages(m, ps),
            Storage::Caller(mems) => {
                let mut buf = vec![0u8; (1 << 20).max(ps)];
                for m in mems {
                    let size = m.size();
                    let mut at = 0;
                    while at < size {
                        let n = (size - at).min(buf.len() as u64) as usize;
                        m.read_at(at, &mut buf[..n])
                            .map_err(dest_io("reading destination memory"))?;
                        d.push_whole_pages(&buf[..n], ps);
                        at += n as u64;
                    }
                }
            }
        }
        Ok(d.finish())
    }

    /// The memory digest of the page hashes recorded as pages were applied:
    /// what [`MemorySink::checksum`] returns, unless the memory was changed
    /// behind the sink's back.
    pub fn recorded_checksum(&self) -> u64 {
        self.hashes.digest()
    }

    /// The storage of the pages at memory offset `offset`: the region
    /// memory (or the owned mapping) and the offset inside it.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), TransferError> {
        match &mut self.storage {
            Storage::Owned(m) => {
                let o = offset as usize;
                m[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            Storage::Caller(mems) => {
                let (i, inside) = caller_slot(&self.layout, offset)?;
                mems[i]
                    .write_at(inside, data)
                    .map_err(dest_io("writing destination memory"))
            }
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), TransferError> {
        match &mut self.storage {
            Storage::Owned(m) => {
                m[offset as usize..(offset + len) as usize].fill(0);
                Ok(())
            }
            Storage::Caller(mems) => {
                let (i, inside) = caller_slot(&self.layout, offset)?;
                mems[i]
                    .zero_at(inside, len)
                    .map_err(dest_io("writing destination memory"))
            }
        }
    }
}

/// Index of the region holding memory offset `offset` and the offset inside it.
fn caller_slot(layout: &Layout, offset: u64) -> Result<(usize, u64), TransferError> {
    let (r, inside) = layout.region_at(offset).ok_or(LayoutError::OutsideLayout {
        range: offset..offset,
    })?;
    let id = r.id;
    Ok((layout.regions().partition_point(|x| x.id < id), inside))
}

impl Sink for MemorySink {
    /// The digests of the recorded page hashes; a block with a page of caller
    /// memory never written since the sink was made gets its digest
    /// inverted, so a resuming sender sends it again (equal by chance with
    /// probability about 2^-64, as any 64-bit hash).
    fn resume_digests(&self, block_pages: u64) -> Option<Vec<u64>> {
        let block = usize::try_from(block_pages).ok()?.max(1);
        let mut digests = self.hashes.block_digests(block);
        for (d, unknown) in digests.iter_mut().zip(self.unknown.chunks(block)) {
            if unknown.any() {
                *d = !*d;
            }
        }
        Some(digests)
    }

    fn begin_round(&mut self, _round: u64) -> Result<(), TransferError> {
        Ok(())
    }

    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        let len = pages.len() as u64;
        let ps = self.layout.page_size();
        self.layout.check_span(offset, len)?;
        if hashes.len() as u64 != len / ps || !self.hashes.set((offset / ps) as usize, hashes) {
            return Err(TransferError::Misuse {
                operation: "send_pages",
                state: "with a CRC count that differs from the page count",
            });
        }
        let first = (offset / ps) as usize;
        self.holds_data[first..first + hashes.len()].fill(true);
        self.unknown[first..first + hashes.len()].fill(false);
        self.write(offset, &pages)?;
        self.stats.pages += len / ps;
        Ok(())
    }

    /// Zeroes the pages outside `memory` (they read as never sent) and records them as zero
    /// pages.
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        let ps = self.layout.page_size();
        for r in self.layout.outside(memory) {
            let (first, n) = ((r.start / ps) as usize, ((r.end - r.start) / ps) as usize);
            if !self.holds_data[first..first + n].any() && !self.unknown[first..first + n].any() {
                continue;
            }
            self.hashes.set_zero(first, n);
            self.zero(r.start, r.end - r.start)?;
            self.holds_data[first..first + n].fill(false);
            self.unknown[first..first + n].fill(false);
        }
        Ok(true)
    }

    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        let len = range.end.saturating_sub(range.start);
        let ps = self.layout.page_size();
        self.layout.check_span(range.start, len)?;
        let (first, n) = ((range.start / ps) as usize, (len / ps) as usize);
        self.hashes.set_zero(first, n);
        self.zero(range.start, len)?;
        self.holds_data[first..first + n].fill(false);
        self.unknown[first..first + n].fill(false);
        self.stats.zero_pages += len / ps;
        Ok(())
    }

    /// Lends pages that hold zeros (never written, or sent as zeros), which
    /// [`Sink::revert_lent`] restores by zeroing them again, and only from
    /// memory that may be seen as a slice.
    fn lend_pages(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let ps = self.layout.page_size();
        self.layout.check_span(offset, len).ok()?;
        let (first, n) = ((offset / ps) as usize, (len / ps) as usize);
        if self.holds_data[first..first + n].any() {
            return None;
        }
        match &mut self.storage {
            Storage::Owned(m) => Some(&mut m[offset as usize..(offset + len) as usize]),
            Storage::Caller(mems) => {
                let (i, inside) = caller_slot(&self.layout, offset).ok()?;
                let s = mems[i].as_mut_slice()?;
                s.get_mut(inside as usize..(inside + len) as usize)
            }
        }
    }

    fn commit_lent(&mut self, offset: u64, hashes: &[PageHash]) -> Result<(), TransferError> {
        let ps = self.layout.page_size();
        let len = hashes.len() as u64 * ps;
        self.layout.check_span(offset, len)?;
        let first = (offset / ps) as usize;
        self.hashes.set(first, hashes);
        self.holds_data[first..first + hashes.len()].fill(true);
        self.unknown[first..first + hashes.len()].fill(false);
        self.stats.pages += hashes.len() as u64;
        Ok(())
    }

    fn revert_lent(&mut self, offset: u64, len: u64) {
        if self.layout.check_span(offset, len).is_ok() {
            // Only slices were lent; zeroing a slice cannot fail.
            let _ = self.zero(offset, len);
        }
    }

    fn end_round(&mut self, _round: u64) -> Result<u64, TransferError> {
        self.stats.rounds += 1;
        Ok(0)
    }

    /// Forgets the state blob and the finish of a final phase that was cut.
    fn reopen(&mut self) {
        self.state = None;
        self.stats.finished = None;
    }

    /// Keeps the state blob for [`MemorySink::state`]; refuses a second one.
    fn send_state(&mut self, state: &[u8]) -> Result<(), TransferError> {
        if self.state.is_some() {
            return Err(TransferError::Misuse {
                operation: "send_state",
                state: "twice",
            });
        }
        self.state = Some(state.to_vec());
        Ok(())
    }

    /// Compares the recorded page hashes with `memory_checksum`; with
    /// [`FinalCheck::Full`], also re-reads all memory and requires the same.
    fn finish(&mut self, memory_checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        let recorded = self.recorded_checksum();
        check_final(memory_checksum, recorded, check, || self.checksum())?;
        self.stats.finished = Some(recorded);
        Ok(())
    }
}

/// [`Sink::finish`] for a sink that finishes in two steps: [`Sink::finish_uncommitted`],
/// then [`Sink::commit`] (the trait's defaults run the other way, for one-step sinks).
pub fn finish_in_two_steps<K: Sink + ?Sized>(
    sink: &mut K,
    memory_checksum: u64,
    check: FinalCheck,
) -> Result<(), TransferError> {
    sink.finish_uncommitted(memory_checksum, check)?;
    sink.commit()
}
