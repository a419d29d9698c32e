//! The scan loop over one span of one tracked range, with its own reusable buffers.
//!
//! Invariant: between calls, every entry of `buf` is all-zero. The kernel fills a prefix of it;
//! after a successful call the scanner copies that prefix out and zeroes it again. After an
//! `EPERM` (an untracked area met mid-walk) the kernel has still written and re-protected the
//! entries before the area but returned no count, so the non-zero prefix *is* the count. Zeroing
//! costs only what the kernel wrote, never the whole buffer.

use crate::round::{Untracked, UntrackedReason, push_region};
use crate::{Error, Result};
use precopy_sys::abi::{PageRegion, PmScanArg, category};
use precopy_sys::pagemap::{self, EMPTY_REGION};
use precopy_sys::ranges::coalesce;
use precopy_tracker::{Tracker, Vma, unmapped_parts};
use std::ops::Range;

/// Buffers and output of one scanning thread.
#[derive(Debug)]
pub(crate) struct Worker {
    buf: Vec<PageRegion>,
    vmas: Vec<Vma>,
    pub(crate) dirty: Vec<Range<u64>>,
    pub(crate) untracked: Vec<Untracked>,
    pub(crate) pages: u64,
    pub(crate) ioctls: u64,
    page_size: u64,
    /// Whether `dirty` is still sorted (see `push_region`).
    sorted: bool,
}

/// How a span scan ended.
pub(crate) enum SpanEnd {
    /// The whole span was scanned.
    Done,
    /// The page budget ran out at this address.
    BudgetAt(u64),
}

impl Worker {
    pub(crate) fn new(vec_len: usize, page_size: u64) -> Worker {
        Worker {
            buf: vec![EMPTY_REGION; vec_len],
            vmas: Vec::new(),
            dirty: Vec::new(),
            untracked: Vec::new(),
            pages: 0,
            ioctls: 0,
            page_size,
            sorted: true,
        }
    }

    /// Sorts and merges `dirty` if the kernel returned a region out of order.
    pub(crate) fn finish(&mut self) {
        if !self.sorted {
            coalesce(&mut self.dirty);
            self.sorted = true;
        }
    }

    pub(crate) fn reset(&mut self) {
        self.sorted = true;
        self.dirty.clear();
        self.untracked.clear();
        self.pages = 0;
        self.ioctls = 0;
    }

    /// Moves the first `n` kernel-filled entries to `dirty`, zeroing them; returns their pages.
    ///
    /// Hot path: one pass, one branch per region, the zeroing done as one `fill` afterwards.
    fn take(&mut self, n: usize) -> u64 {
        let slots = &self.buf[..n];
        let Some(first) = slots.first() else {
            return 0;
        };
        self.dirty.reserve(n);
        let mut bytes = first.end - first.start;
        self.sorted &= push_region(&mut self.dirty, first.start..first.end);
        let mut prev_end = first.end;
        for slot in &slots[1..] {
            bytes += slot.end - slot.start;
            if slot.start == prev_end {
                // Adjacent across one of the kernel's internal buffer flushes.
                if let Some(last) = self.dirty.last_mut() {
                    last.end = last.end.max(slot.end);
                }
            } else {
                // Below the previous region: the kernel's walk restarted (see `push_region`).
                self.sorted &= slot.start > prev_end;
                self.dirty.push(slot.start..slot.end);
            }
            prev_end = slot.end;
        }
        self.buf[..n].fill(EMPTY_REGION);
        let pages = bytes / self.page_size;
        self.pages += pages;
        pages
    }

    /// Scans `span` (inside one tracked range whose reporting unit is `granule`), then reports
    /// the parts of it that are no longer mapped. `budget` is the number of pages still allowed
    /// this round, if limited; it is decremented.
    pub(crate) fn scan_span(
        &mut self,
        tracker: &Tracker,
        span: Range<u64>,
        granule: u64,
        budget: &mut Option<u64>,
    ) -> Result<SpanEnd> {
        let end = self.scan_tracked(tracker, span.clone(), granule, budget, true)?;
        let stop = match end {
            SpanEnd::Done => span.end,
            SpanEnd::BudgetAt(at) => at,
        };
        if stop > span.start {
            tracker.mappings_into(span.start..stop, &mut self.vmas)?;
            for hole in unmapped_parts(span.start..stop, &self.vmas) {
                self.untracked.push(Untracked {
                    range: hole,
                    reason: UntrackedReason::Unmapped,
                });
            }
        }
        Ok(end)
    }

    fn scan_tracked(
        &mut self,
        tracker: &Tracker,
        span: Range<u64>,
        granule: u64,
        budget: &mut Option<u64>,
        may_split: bool,
    ) -> Result<SpanEnd> {
        let fd = tracker.uffd().pagemap();
        let granule_pages = (granule / self.page_size).max(1);
        let mut addr = span.start;
        while addr < span.end {
            let mut arg = pagemap::written_and_reprotect_arg(addr, span.end);
            if let Some(left) = *budget {
                if left == 0 {
                    return Ok(SpanEnd::BudgetAt(addr));
                }
                // A budget below one huge page makes the kernel return nothing with `walk_end`
                // stuck: never ask for less than one reporting unit.
                arg.max_pages = left.max(granule_pages);
            }
            self.ioctls += 1;
            match pagemap::scan(fd, &mut arg, &mut self.buf) {
                Ok(n) => {
                    let pages = self.take(n);
                    if let Some(left) = budget.as_mut() {
                        *left = left.saturating_sub(pages);
                    }
                    if arg.walk_end <= addr {
                        return Err(Error::NoProgress { addr });
                    }
                    addr = arg.walk_end.min(span.end);
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && may_split => {
                    let n = self.buf.iter().take_while(|r| r.end != 0).count();
                    let pages = self.take(n);
                    if let Some(left) = budget.as_mut() {
                        *left = left.saturating_sub(pages);
                    }
                    return self.scan_around_untracked(tracker, addr..span.end, granule, budget);
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    // The layout changed again under us: vouch for nothing in this part.
                    let n = self.buf.iter().take_while(|r| r.end != 0).count();
                    self.take(n);
                    self.untracked.push(Untracked {
                        range: addr..span.end,
                        reason: UntrackedReason::NotTracked,
                    });
                    return Ok(SpanEnd::Done);
                }
                Err(source) => {
                    return Err(Error::Scan {
                        start: addr,
                        end: span.end,
                        source,
                    });
                }
            }
        }
        Ok(SpanEnd::Done)
    }

    /// Lists the untracked parts of `span` (pages whose VMA is not registered for async WP),
    /// reports them, and scans the tracked parts between them.
    fn scan_around_untracked(
        &mut self,
        tracker: &Tracker,
        span: Range<u64>,
        granule: u64,
        budget: &mut Option<u64>,
    ) -> Result<SpanEnd> {
        let first = self.untracked.len();
        let fd = tracker.uffd().pagemap();
        let mut addr = span.start;
        let mut regions = [EMPTY_REGION; 64];
        while addr < span.end {
            let mut arg = PmScanArg {
                flags: 0,
                category_inverted: category::WPALLOWED,
                category_mask: category::WPALLOWED,
                return_mask: category::WPALLOWED,
                ..pagemap::written_and_reprotect_arg(addr, span.end)
            };
            self.ioctls += 1;
            let n = pagemap::scan(fd, &mut arg, &mut regions).map_err(|source| Error::Scan {
                start: addr,
                end: span.end,
                source,
            })?;
            for r in &regions[..n] {
                self.untracked.push(Untracked {
                    range: r.start..r.end,
                    reason: UntrackedReason::NotTracked,
                });
            }
            if arg.walk_end <= addr {
                return Err(Error::NoProgress { addr });
            }
            addr = arg.walk_end;
        }
        let mut gaps = Vec::new();
        let mut cursor = span.start;
        for u in &self.untracked[first..] {
            if u.range.start > cursor {
                gaps.push(cursor..u.range.start);
            }
            cursor = cursor.max(u.range.end);
        }
        if cursor < span.end {
            gaps.push(cursor..span.end);
        }
        for gap in gaps {
            if let SpanEnd::BudgetAt(at) =
                self.scan_tracked(tracker, gap, granule, budget, false)?
            {
                // The next round resumes at `at` and lists the untracked parts above it again:
                // report only those this round walked past, or a budget-limited pass would
                // report (and the caller re-send) them once per round.
                let listed = self.untracked.split_off(first);
                self.untracked
                    .extend(listed.into_iter().filter(|u| u.range.start < at));
                return Ok(SpanEnd::BudgetAt(at));
            }
        }
        Ok(SpanEnd::Done)
    }
}
