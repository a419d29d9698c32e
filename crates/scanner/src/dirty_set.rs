//! A bitmap of pending pages over a fixed layout, for merging rounds.

use crate::round::{Round, push_coalesced};
use bitvec::prelude::*;
use std::ops::Range;

/// Pages pending transfer, one bit per base page over a fixed set of ranges (the layout).
///
/// Rounds are merged in with [`DirtySet::insert_round`]; the pending pages come out as sorted,
/// coalesced ranges. Addresses outside the layout are ignored by `insert` and counted in the
/// return value, so a caller can detect them.
#[derive(Debug, Clone)]
pub struct DirtySet {
    /// (range, index of its first bit), sorted by address.
    layout: Vec<(Range<u64>, usize)>,
    bits: BitVec<u64, Lsb0>,
    page_size: u64,
}

impl DirtySet {
    /// An empty set over `layout` (page-aligned ranges, sorted and disjoint).
    pub fn new(layout: impl IntoIterator<Item = Range<u64>>, page_size: u64) -> DirtySet {
        let mut bits_total = 0usize;
        let layout: Vec<_> = layout
            .into_iter()
            .map(|r| {
                let first = bits_total;
                bits_total += ((r.end - r.start) / page_size) as usize;
                (r, first)
            })
            .collect();
        DirtySet {
            layout,
            bits: bitvec![u64, Lsb0; 0; bits_total],
            page_size,
        }
    }

    /// A set over the ranges `tracker` tracks.
    pub fn for_tracker(tracker: &precopy_tracker::Tracker) -> DirtySet {
        DirtySet::new(
            tracker.ranges().iter().map(|r| r.range()),
            tracker.page_size(),
        )
    }

    /// Marks every page of `range` that lies in the layout; returns how many bytes of `range`
    /// fell outside it.
    pub fn insert(&mut self, range: Range<u64>) -> u64 {
        let mut inside = 0u64;
        let first = self.layout.partition_point(|(r, _)| r.end <= range.start);
        for (r, bit0) in &self.layout[first..] {
            if r.start >= range.end {
                break;
            }
            let s = range.start.max(r.start);
            let e = range.end.min(r.end);
            let lo = bit0 + ((s - r.start) / self.page_size) as usize;
            let hi = bit0 + (e - r.start).div_ceil(self.page_size) as usize;
            self.bits[lo..hi].fill(true);
            inside += e - s;
        }
        (range.end - range.start) - inside
    }

    /// Merges a round: its written pages and its untracked parts (which must be re-sent whole).
    pub fn insert_round(&mut self, round: &Round) {
        for r in round.dirty() {
            self.insert(r.clone());
        }
        for u in round.untracked() {
            self.insert(u.range.clone());
        }
    }

    /// Marks everything in the layout.
    pub fn insert_all(&mut self) {
        self.bits.fill(true);
    }

    /// Pending pages.
    pub fn len(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.bits.not_any()
    }

    /// Pending bytes.
    pub fn bytes(&self) -> u64 {
        self.len() * self.page_size
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.bits.fill(false);
    }

    /// Appends the pending pages as sorted, coalesced ranges to `out`.
    pub fn ranges_into(&self, out: &mut Vec<Range<u64>>) {
        for (r, bit0) in &self.layout {
            let n = ((r.end - r.start) / self.page_size) as usize;
            let bits = &self.bits[*bit0..*bit0 + n];
            let mut i = 0;
            while let Some(off) = bits[i..].first_one() {
                let s = i + off;
                let len = bits[s..].first_zero().unwrap_or(n - s);
                let start = r.start + s as u64 * self.page_size;
                push_coalesced(out, start..start + len as u64 * self.page_size);
                i = s + len;
                if i >= n {
                    break;
                }
            }
        }
    }

    /// Moves the pending ranges to `out` (appended) and clears the set.
    pub fn drain_into(&mut self, out: &mut Vec<Range<u64>>) {
        self.ranges_into(out);
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_and_list_coalesced() {
        let mut set = DirtySet::new([0x10000..0x20000, 0x40000..0x42000], 0x1000);
        assert!(set.is_empty());
        assert_eq!(set.insert(0x11000..0x13000), 0);
        set.insert(0x13000..0x14000);
        set.insert(0x1f000..0x20000);
        // Spans the gap between the two layout ranges: the gap is "outside".
        assert_eq!(set.insert(0x1f000..0x41000), 0x40000 - 0x20000);
        let mut out = Vec::new();
        set.ranges_into(&mut out);
        assert_eq!(
            out,
            vec![0x11000..0x14000, 0x1f000..0x20000, 0x40000..0x41000]
        );
        assert_eq!(set.len(), 3 + 1 + 1);
        set.drain_into(&mut Vec::new());
        assert!(set.is_empty());
    }

    #[test]
    fn full_range_and_outside() {
        let mut set = DirtySet::new([0x1000..0x3000], 0x1000);
        assert_eq!(set.insert(0x5000..0x6000), 0x1000);
        set.insert_all();
        let mut out = Vec::new();
        set.ranges_into(&mut out);
        assert_eq!(out, vec![0x1000..0x3000]);
    }
}
