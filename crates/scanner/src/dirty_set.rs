//! A bitmap of pending pages over a fixed layout, for merging rounds.

use crate::round::Round;
use crate::{Error, Result};
use bitvec::prelude::*;
use precopy_sys::ranges::push_merged;
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
    /// An empty set over `layout`: non-empty ranges aligned to `page_size` (a power of two),
    /// sorted by address and disjoint.
    ///
    /// # Errors
    /// [`Error::BadPageSize`], [`Error::UnalignedRange`] (empty, inverted or unaligned) or
    /// [`Error::UnsortedRanges`] (out of order or overlapping).
    pub fn new(layout: impl IntoIterator<Item = Range<u64>>, page_size: u64) -> Result<DirtySet> {
        if !page_size.is_power_of_two() {
            return Err(Error::BadPageSize { page_size });
        }
        let mut bits_total = 0usize;
        let mut ranges: Vec<(Range<u64>, usize)> = Vec::new();
        for r in layout {
            if r.start >= r.end || r.start % page_size != 0 || r.end % page_size != 0 {
                return Err(Error::UnalignedRange {
                    start: r.start,
                    end: r.end,
                    page_size,
                });
            }
            if let Some((prev, _)) = ranges.last()
                && prev.end > r.start
            {
                return Err(Error::UnsortedRanges {
                    start: r.start,
                    end: r.end,
                    prev_start: prev.start,
                    prev_end: prev.end,
                });
            }
            let first = bits_total;
            let pages = (r.end - r.start) / page_size;
            bits_total = usize::try_from(pages)
                .ok()
                .and_then(|n| bits_total.checked_add(n))
                .ok_or(Error::LayoutTooLarge { pages: u64::MAX })?;
            ranges.push((r, first));
        }
        // One bit per page, allocated fallibly: a layout too large for memory is an error,
        // not an abort.
        let too_large = Error::LayoutTooLarge {
            pages: bits_total as u64,
        };
        if bits_total > BitSlice::<u64, Lsb0>::MAX_BITS {
            return Err(too_large);
        }
        let words = bits_total.div_ceil(64);
        let mut storage: Vec<u64> = Vec::new();
        storage.try_reserve_exact(words).map_err(|_| too_large)?;
        storage.resize(words, 0);
        let mut bits = BitVec::from_vec(storage);
        bits.truncate(bits_total);
        Ok(DirtySet {
            layout: ranges,
            bits,
            page_size,
        })
    }

    /// A set over the ranges `tracker` tracks.
    ///
    /// # Errors
    /// As [`DirtySet::new`]; a tracker's own ranges always fit.
    pub fn for_tracker(tracker: &precopy_tracker::Tracker) -> Result<DirtySet> {
        DirtySet::new(
            tracker.ranges().iter().map(|r| r.range()),
            tracker.page_size(),
        )
    }

    /// Marks every page `range` touches that lies in the layout (a partial page counts whole);
    /// returns how many bytes of `range` fell outside it. An empty range marks nothing.
    ///
    /// # Errors
    /// [`Error::InvertedRange`] when `range.end < range.start`; nothing is marked.
    pub fn insert(&mut self, range: Range<u64>) -> Result<u64> {
        if range.end < range.start {
            return Err(Error::InvertedRange {
                start: range.start,
                end: range.end,
            });
        }
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
        Ok((range.end - range.start) - inside)
    }

    /// Merges a round: its written pages and its untracked parts (which must be re-sent whole).
    pub fn insert_round(&mut self, round: &Round) {
        // A round's ranges are never inverted, so `insert` cannot fail on them.
        for r in round.dirty() {
            let _ = self.insert(r.clone());
        }
        for u in round.untracked() {
            let _ = self.insert(u.range.clone());
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
                push_merged(out, 0, start..start + len as u64 * self.page_size);
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
        let mut set = DirtySet::new([0x10000..0x20000, 0x40000..0x42000], 0x1000).unwrap();
        assert!(set.is_empty());
        assert_eq!(set.insert(0x11000..0x13000).unwrap(), 0);
        set.insert(0x13000..0x14000).unwrap();
        set.insert(0x1f000..0x20000).unwrap();
        // Spans the gap between the two layout ranges: the gap is "outside".
        assert_eq!(set.insert(0x1f000..0x41000).unwrap(), 0x40000 - 0x20000);
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
        let mut set = DirtySet::new([0x1000..0x3000], 0x1000).unwrap();
        assert_eq!(set.insert(0x5000..0x6000).unwrap(), 0x1000);
        set.insert_all();
        let mut out = Vec::new();
        set.ranges_into(&mut out);
        assert_eq!(out, vec![0x1000..0x3000]);
    }

    // The input sweep: bad arguments are typed errors, never panics.

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // the inverted range is the point
    fn insert_inverted_range_is_an_error_and_marks_nothing() {
        let mut set = DirtySet::new([0x1000..0x3000], 0x1000).unwrap();
        let err = set.insert(0x2000..0x1000).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvertedRange {
                    start: 0x2000,
                    end: 0x1000
                }
            ),
            "{err:?}"
        );
        assert!(set.is_empty());
    }

    #[test]
    fn insert_empty_range_marks_nothing() {
        let mut set = DirtySet::new([0x1000..0x3000], 0x1000).unwrap();
        assert_eq!(set.insert(0x2000..0x2000).unwrap(), 0);
        assert!(set.is_empty());
    }

    #[test]
    fn insert_near_u64_max_counts_it_outside() {
        let mut set = DirtySet::new([0x1000..0x3000], 0x1000).unwrap();
        assert_eq!(set.insert(u64::MAX - 10..u64::MAX).unwrap(), 10);
        assert_eq!(set.insert(0x2fff..u64::MAX).unwrap(), u64::MAX - 0x3000);
        assert_eq!(set.len(), 1, "the partial page at 0x2fff counts whole");
    }

    #[test]
    fn new_refuses_a_page_size_not_a_power_of_two() {
        for page_size in [0, 3, 4095] {
            let err = DirtySet::new([0x1000..0x3000], page_size).unwrap_err();
            assert!(
                matches!(err, Error::BadPageSize { page_size: p } if p == page_size),
                "{err:?}"
            );
        }
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // the inverted range is the point
    fn new_refuses_empty_inverted_or_unaligned_layout_ranges() {
        for r in [
            0x1000..0x1000,
            0x3000..0x1000,
            0x1800..0x3000,
            0x1000..0x2800,
        ] {
            let err = DirtySet::new([r.clone()], 0x1000).unwrap_err();
            assert!(
                matches!(err, Error::UnalignedRange { start, end, page_size: 0x1000 } if start == r.start && end == r.end),
                "{r:x?}: {err:?}"
            );
        }
    }

    #[test]
    fn new_refuses_unsorted_or_overlapping_layout_ranges() {
        for second in [0x0..0x1000, 0x2000..0x4000] {
            let err = DirtySet::new([0x1000..0x3000, second], 0x1000).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::UnsortedRanges {
                        prev_start: 0x1000,
                        prev_end: 0x3000,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn new_refuses_a_layout_too_large_for_its_bitmap() {
        // 2^52 pages: a 512 TiB bitmap, which no allocator grants.
        let top: u64 = !0xfff;
        let err = DirtySet::new([0..top], 0x1000).unwrap_err();
        assert!(
            matches!(err, Error::LayoutTooLarge { pages } if pages == top / 0x1000),
            "{err:?}"
        );
        // Byte-sized pages over the whole address space overflow the running count.
        let err = DirtySet::new([0..1 << 63, 1 << 63..u64::MAX], 1).unwrap_err();
        assert!(matches!(err, Error::LayoutTooLarge { .. }), "{err:?}");
    }
}
