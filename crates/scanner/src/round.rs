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

/// Appends `r` to `ranges`, merging it into the last one when it starts exactly where the last
/// one ends or inside it. Returns false when `r` starts *before* the last range: the output is
/// then no longer sorted and the caller must [`normalize`] it. (`PAGEMAP_SCAN` can return a
/// region below one it returned earlier in the same call, when its internal walk restarts;
/// merging such a region blindly into the last one would drop its pages.)
pub(crate) fn push_region(ranges: &mut Vec<Range<u64>>, r: Range<u64>) -> bool {
    if let Some(last) = ranges.last_mut() {
        if r.start < last.start {
            ranges.push(r);
            return false;
        }
        if r.start <= last.end {
            last.end = last.end.max(r.end);
            return true;
        }
    }
    ranges.push(r);
    true
}

/// Sorts `ranges` and merges the ones that overlap or touch.
pub(crate) fn normalize(ranges: &mut Vec<Range<u64>>) {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out = 0;
    for i in 0..ranges.len() {
        let r = ranges[i].clone();
        if out > 0 && r.start <= ranges[out - 1].end {
            ranges[out - 1].end = ranges[out - 1].end.max(r.end);
        } else {
            ranges[out] = r;
            out += 1;
        }
    }
    ranges.truncate(out);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_below_the_last_is_kept_not_swallowed() {
        let mut v = Vec::new();
        assert!(push_region(&mut v, 0x5000..0x6000));
        assert!(push_region(&mut v, 0x6000..0x7000));
        assert!(!push_region(&mut v, 0x1000..0x2000));
        assert!(push_region(&mut v, 0x2000..0x3000));
        normalize(&mut v);
        assert_eq!(v, vec![0x1000..0x3000, 0x5000..0x7000]);
    }

    #[test]
    fn normalize_merges_overlaps_and_duplicates() {
        let mut v = vec![
            0x8000..0x9000,
            0x1000..0x3000,
            0x2000..0x4000,
            0x8000..0x9000,
        ];
        normalize(&mut v);
        assert_eq!(v, vec![0x1000..0x4000, 0x8000..0x9000]);
    }
}
