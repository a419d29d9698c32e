//! What one round returns.

#[cfg(doc)]
use precopy_sys::ranges::coalesce;
use precopy_sys::ranges::push_merged;
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

/// Appends `r` to `ranges`, merging it into the last one when it starts exactly where the last
/// one ends or inside it. Returns false when `r` starts *before* the last range: the output is
/// then no longer sorted and the caller must coalesce it ([`coalesce`]). (`PAGEMAP_SCAN` can return a
/// region below one it returned earlier in the same call, when its internal walk restarts;
/// merging such a region blindly into the last one would drop its pages.)
pub(crate) fn push_region(ranges: &mut Vec<Range<u64>>, r: Range<u64>) -> bool {
    let in_order = ranges.last().is_none_or(|last| r.start >= last.start);
    // Below the last start, `push_merged` appends it unmerged.
    push_merged(ranges, 0, r);
    in_order
}

#[cfg(test)]
mod tests {
    use super::*;
    use precopy_sys::ranges::coalesce;

    #[test]
    fn a_region_below_the_last_is_kept_not_swallowed() {
        let mut v = Vec::new();
        assert!(push_region(&mut v, 0x5000..0x6000));
        assert!(push_region(&mut v, 0x6000..0x7000));
        assert!(!push_region(&mut v, 0x1000..0x2000));
        assert!(push_region(&mut v, 0x2000..0x3000));
        coalesce(&mut v);
        assert_eq!(v, vec![0x1000..0x3000, 0x5000..0x7000]);
    }
}
