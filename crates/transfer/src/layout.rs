//! The memory layout: which source address ranges a transfer covers and where
//! each lands in the destination's linear storage.
//!
//! The layout owns the one mapping every sink and receiver uses: a source
//! address maps to an *offset*, the sum of the lengths of the regions below it
//! plus its distance into its own region. Destinations store memory by offset
//! (a mapping the size of [`Layout::total_len`], or an image file), so a page
//! outside the layout has nowhere to go and is always rejected here.

use std::ops::Range;

use serde::Serialize;

use crate::error::LayoutError;

/// Most regions a layout may hold (bounded so a handshake frame stays small).
pub const MAX_REGIONS: usize = 1 << 20;

/// One contiguous span of source memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    /// First source address (page-aligned).
    pub start: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

impl Region {
    /// The region as a half-open address range.
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }
}

/// A validated set of regions: sorted, page-aligned, non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    page_size: u64,
    regions: Vec<Region>,
    /// `offsets[i]` is the destination offset of `regions[i].start`.
    offsets: Vec<u64>,
    total_len: u64,
}

impl Layout {
    /// Builds a layout from `regions` in any order.
    pub fn new(page_size: u64, mut regions: Vec<Region>) -> Result<Layout, LayoutError> {
        if !page_size.is_power_of_two() || !(512..=1 << 30).contains(&page_size) {
            return Err(LayoutError::BadPageSize { page_size });
        }
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        for r in &regions {
            if r.len == 0 {
                return Err(LayoutError::EmptyRegion { start: r.start });
            }
            if r.start % page_size != 0 || r.len % page_size != 0 {
                return Err(LayoutError::Unaligned {
                    start: r.start,
                    len: r.len,
                    page_size,
                });
            }
            if r.start.checked_add(r.len).is_none() {
                return Err(LayoutError::Wraps {
                    start: r.start,
                    len: r.len,
                });
            }
        }
        regions.sort_by_key(|r| r.start);
        let mut offsets = Vec::with_capacity(regions.len());
        let mut total: u64 = 0;
        for (i, r) in regions.iter().enumerate() {
            if i > 0 {
                let prev = regions[i - 1];
                if prev.start + prev.len > r.start {
                    return Err(LayoutError::Overlap {
                        first: prev.range(),
                        second: r.range(),
                    });
                }
            }
            offsets.push(total);
            // Cannot overflow: regions are disjoint inside the 64-bit space.
            total += r.len;
        }
        Ok(Layout {
            page_size,
            regions,
            offsets,
            total_len: total,
        })
    }

    /// A layout of one region.
    pub fn single(page_size: u64, start: u64, len: u64) -> Result<Layout, LayoutError> {
        Layout::new(page_size, vec![Region { start, len }])
    }

    /// The page size, in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes covered by all regions (the destination's size).
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Total pages covered by all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_len / self.page_size
    }

    /// Index of the region containing `addr`, if any.
    fn region_index(&self, addr: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let r = self.regions[i];
        (addr - r.start < r.len).then_some(i)
    }

    /// Destination offset of `range`, which must be non-empty, page-aligned and
    /// lie inside a single region.
    pub fn locate(&self, range: Range<u64>) -> Result<u64, LayoutError> {
        self.check_pages(&range)?;
        let outside = || LayoutError::OutsideLayout {
            range: range.clone(),
        };
        let i = self.region_index(range.start).ok_or_else(outside)?;
        let r = self.regions[i];
        if range.end > r.start + r.len {
            return Err(outside());
        }
        Ok(self.offsets[i] + (range.start - r.start))
    }

    /// Source address of destination `offset` (inverse of [`Layout::locate`]).
    pub fn address_of(&self, offset: u64) -> Option<u64> {
        if offset >= self.total_len {
            return None;
        }
        let i = self.offsets.partition_point(|&o| o <= offset) - 1;
        Some(self.regions[i].start + (offset - self.offsets[i]))
    }

    /// Checks that `range` is a non-empty span of whole pages.
    pub fn check_pages(&self, range: &Range<u64>) -> Result<(), LayoutError> {
        if range.start >= range.end
            || range.start % self.page_size != 0
            || range.end % self.page_size != 0
        {
            return Err(LayoutError::RangeUnaligned {
                range: range.clone(),
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    /// Splits `range` at region boundaries, calling `f` for each piece with the
    /// piece and its destination offset. Fails, before calling `f` at all, if
    /// any byte of `range` is outside the layout.
    pub fn split(
        &self,
        range: Range<u64>,
        mut f: impl FnMut(Range<u64>, u64) -> Result<(), crate::TransferError>,
    ) -> Result<(), crate::TransferError> {
        self.check_pages(&range)?;
        let outside = || LayoutError::OutsideLayout {
            range: range.clone(),
        };
        // First pass: check coverage, so nothing is emitted for a bad range.
        let first = self.region_index(range.start).ok_or_else(outside)?;
        let mut at = range.start;
        let mut i = first;
        while at < range.end {
            let r = self.regions.get(i).ok_or_else(outside)?;
            if r.start != at && i != first {
                return Err(outside().into());
            }
            at = (r.start + r.len).min(range.end);
            i += 1;
        }
        let mut at = range.start;
        let mut i = first;
        while at < range.end {
            let r = self.regions[i];
            let end = (r.start + r.len).min(range.end);
            f(at..end, self.offsets[i] + (at - r.start))?;
            at = end;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(
            4096,
            vec![
                Region {
                    start: 0x10000,
                    len: 0x2000,
                },
                Region {
                    start: 0x1000,
                    len: 0x3000,
                },
                Region {
                    start: 0x12000,
                    len: 0x1000,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn sorts_and_offsets() {
        let l = layout();
        assert_eq!(l.regions()[0].start, 0x1000);
        assert_eq!(l.total_len(), 0x6000);
        assert_eq!(l.locate(0x1000..0x2000).unwrap(), 0);
        assert_eq!(l.locate(0x10000..0x12000).unwrap(), 0x3000);
        assert_eq!(l.locate(0x12000..0x13000).unwrap(), 0x5000);
        assert_eq!(l.address_of(0x3000), Some(0x10000));
        assert_eq!(l.address_of(0x6000), None);
    }

    #[test]
    fn rejects_outside_and_straddling() {
        let l = layout();
        assert!(l.locate(0..0x1000).is_err());
        assert!(l.locate(0x3000..0x5000).is_err());
        assert!(l.locate(0x11000..0x13000).is_err(), "straddles two regions");
        assert!(l.locate(0x1000..0x1800).is_err(), "unaligned");
        assert!(l.locate(0x2000..0x2000).is_err(), "empty");
        assert!(l.locate(u64::MAX - 4095..u64::MAX).is_err());
    }

    #[test]
    fn split_at_adjacent_regions_only() {
        let l = layout();
        let mut pieces = Vec::new();
        l.split(0x11000..0x13000, |r, off| {
            pieces.push((r, off));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            pieces,
            vec![(0x11000..0x12000, 0x4000), (0x12000..0x13000, 0x5000)]
        );
        let mut called = false;
        assert!(
            l.split(0x3000..0x11000, |_, _| {
                called = true;
                Ok(())
            })
            .is_err()
        );
        assert!(!called, "nothing emitted for a range with a hole");
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(Layout::single(4095, 0, 4096).is_err());
        assert!(Layout::single(4096, 1, 4096).is_err());
        assert!(Layout::single(4096, 0, 0).is_err());
        assert!(Layout::single(4096, u64::MAX - 4095, 8192).is_err());
        assert!(Layout::new(4096, vec![]).is_err());
        assert!(
            Layout::new(
                4096,
                vec![
                    Region {
                        start: 0,
                        len: 8192
                    },
                    Region {
                        start: 4096,
                        len: 4096
                    }
                ]
            )
            .is_err()
        );
    }
}
