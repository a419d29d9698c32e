//! What one round returns.

use serde::Serialize;
use std::ops::Range;
use std::time::Duration;

/// Why part of a tracked range is no longer tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UntrackedReason {
    /// Nothing is mapped there any more (munmap, or mremap moved it away).
    Unmapped,
    /// Something is mapped there that is not registered for async write-protect (`MAP_FIXED`
    /// replacement, munmap + mmap, unregistered by another party).
    NotTracked,
}

/// A part of a tracked range the engine cannot vouch for: re-send it in full (or, when
/// [`UntrackedReason::Unmapped`], there is nothing left to read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Untracked {
    /// The affected addresses.
    pub range: Range<u64>,
    /// Why.
    pub reason: UntrackedReason,
}

/// Counters of one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoundStats {
    /// Base pages reported written.
    pub pages: u64,
    /// Coalesced regions reported written.
    pub regions: u64,
    /// `PAGEMAP_SCAN` calls made.
    pub ioctls: u64,
    /// Bytes reported untracked.
    pub untracked_bytes: u64,
    /// Wall-clock time of the round.
    pub duration: Duration,
}

/// The result of one round: sorted, coalesced, page-aligned, half-open address ranges.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub(crate) dirty: Vec<Range<u64>>,
    pub(crate) untracked: Vec<Untracked>,
    pub(crate) stats: RoundStats,
    pub(crate) complete: bool,
    pub(crate) page_size: u64,
}

impl Round {
    /// Ranges written since the previous round (and now write-protected again).
    pub fn dirty(&self) -> &[Range<u64>] {
        &self.dirty
    }

    /// Parts of tracked ranges that are no longer tracked: never clean, always to re-send.
    pub fn untracked(&self) -> &[Untracked] {
        &self.untracked
    }

    /// Counters.
    pub fn stats(&self) -> &RoundStats {
        &self.stats
    }

    /// Whether this round reached the end of the tracked ranges. False only when a page budget
    /// stopped it early; the next round resumes where it stopped.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Every reported page's address, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let step = self.page_size.max(1) as usize;
        self.dirty
            .iter()
            .flat_map(move |r| (r.start..r.end).step_by(step))
    }

    /// Whether nothing was reported, written or untracked.
    pub fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.untracked.is_empty()
    }

    pub(crate) fn reset(&mut self, page_size: u64) {
        self.dirty.clear();
        self.untracked.clear();
        self.stats = RoundStats::default();
        self.complete = false;
        self.page_size = page_size;
    }
}

/// Appends `r` to sorted `ranges`, merging it into the last one when they touch.
pub(crate) fn push_coalesced(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = ranges.last_mut()
        && last.end >= r.start
    {
        last.end = last.end.max(r.end);
        return;
    }
    ranges.push(r);
}
