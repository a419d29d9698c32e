//! The memory description: the regions of guest memory a transfer covers,
//! stated once, and everything derived from it.
//!
//! A VMM describes its memory as [`MemoryRegion`]s: an id, a size, a page
//! size, and optionally the guest-physical address, the backing and (on the
//! source) where this process mapped it. From that one [`Layout`] come:
//!
//! - the **tracker's registrations** on the source ([`Layout::host_ranges`]);
//! - the **wire layout**: HELLO carries every region but its host address,
//!   and PAGES/ZERO frames name pages by *region id and offset* inside the
//!   region, never by a host address (see the crate-private `protocol` module);
//! - the **receiver's placement**: a region's pages land in the memory the
//!   destination mapped for that id ([`MemorySink::with_memory`](crate::MemorySink::with_memory))
//!   or in an owned mapping.
//!
//! Inside this crate pages are addressed by **memory offset**: the regions
//! laid back to back in id order, so region `i` starts at the sum of the
//! sizes of the regions with smaller ids. Sinks, the page-hash tables and the
//! memory digest all use that order. The wire unit, [`Layout::page_size`],
//! is the smallest page size of any region; a hugetlb region still travels
//! in those units (its tracker reports whole huge pages, which are simply
//! several units).
//!
//! Never does: accept a range it cannot place. A page outside the layout has
//! nowhere to go and is rejected here.

use std::ops::Range;

use serde::Serialize;

use crate::error::LayoutError;

/// Most regions a layout may hold (bounded so a handshake frame stays small).
pub const MAX_REGIONS: usize = 1 << 16;

/// What backs a region's memory, as the source states it. The destination
/// may use it to choose how to map its side; the source's tracker checks it
/// against what it finds mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// Shared memory: a memfd or shmem mapping.
    Memfd,
    /// hugetlb pages (the region's page size is the huge page size).
    Hugetlb,
    /// A shared mapping of a regular file.
    File,
}

impl Backing {
    /// The wire byte (0 is "not stated").
    pub(crate) fn wire(backing: Option<Backing>) -> u8 {
        match backing {
            None => 0,
            Some(Backing::Anonymous) => 1,
            Some(Backing::Memfd) => 2,
            Some(Backing::Hugetlb) => 3,
            Some(Backing::File) => 4,
        }
    }

    /// The backing for a wire byte; `Err` for an unknown byte.
    pub(crate) fn from_wire(b: u8) -> Result<Option<Backing>, ()> {
        Ok(match b {
            0 => None,
            1 => Some(Backing::Anonymous),
            2 => Some(Backing::Memfd),
            3 => Some(Backing::Hugetlb),
            4 => Some(Backing::File),
            _ => return Err(()),
        })
    }
}

/// One region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryRegion {
    /// The region's id, unique in its layout; the wire names pages by it.
    pub id: u32,
    /// Bytes (a multiple of `page_size`).
    pub size: u64,
    /// The region's page size in bytes: 4096 for ordinary memory, the huge
    /// page size for hugetlb.
    pub page_size: u64,
    /// Guest-physical address of the region's first byte, if it has one.
    pub guest_addr: Option<u64>,
    /// What backs it, if stated.
    pub backing: Option<Backing>,
    /// Where this process mapped it (the source reads and tracks it there).
    /// Never sent: a destination maps its own.
    #[serde(skip)]
    pub host_addr: Option<u64>,
}

impl MemoryRegion {
    /// Region `id` of `size` bytes in pages of `page_size` bytes, with
    /// nothing else stated.
    pub fn new(id: u32, size: u64, page_size: u64) -> MemoryRegion {
        MemoryRegion {
            id,
            size,
            page_size,
            guest_addr: None,
            backing: None,
            host_addr: None,
        }
    }

    /// The region is mapped in this process at `addr`.
    pub fn host(mut self, addr: u64) -> MemoryRegion {
        self.host_addr = Some(addr);
        self
    }

    /// The region starts at guest-physical address `gpa`.
    pub fn guest(mut self, gpa: u64) -> MemoryRegion {
        self.guest_addr = Some(gpa);
        self
    }

    /// The region is backed by `backing`.
    pub fn backed_by(mut self, backing: Backing) -> MemoryRegion {
        self.backing = Some(backing);
        self
    }

    /// Host addresses of the region, if it has them.
    ///
    /// The end saturates at `u64::MAX` for a region that would wrap (which
    /// [`Layout::new`] refuses with [`LayoutError::Wraps`]).
    pub fn host_range(&self) -> Option<Range<u64>> {
        self.host_addr.map(|a| a..a.saturating_add(self.size))
    }

    /// The region as the wire carries it: without its host address.
    pub fn without_host(mut self) -> MemoryRegion {
        self.host_addr = None;
        self
    }
}

/// A validated memory description: region ids unique, sizes and addresses
/// aligned to each region's page size, host ranges disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The wire unit: the smallest region page size.
    page_size: u64,
    /// Sorted by id.
    regions: Vec<MemoryRegion>,
    /// `offsets[i]` is the memory offset of `regions[i]`.
    offsets: Vec<u64>,
    total_len: u64,
    /// Indices of the regions with a host address, sorted by it.
    by_host: Vec<usize>,
}

pub(crate) fn valid_page_size(page_size: u64) -> bool {
    page_size.is_power_of_two() && (512..=1 << 30).contains(&page_size)
}

/// The indices of the regions that have an address `at`, in address order.
fn by_address(regions: &[MemoryRegion], at: impl Fn(&MemoryRegion) -> Option<u64>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..regions.len())
        .filter(|&i| at(&regions[i]).is_some())
        .collect();
    order.sort_by_key(|&i| at(&regions[i]));
    order
}

/// The ids of the first two regions of `order` (address order) whose ranges from `at` overlap.
fn first_overlap(
    regions: &[MemoryRegion],
    order: &[usize],
    at: impl Fn(&MemoryRegion) -> Option<u64>,
) -> Option<(u32, u32)> {
    // Checked for wrapping before: `at + size` fits.
    order.windows(2).find_map(|w| {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        (at(a).unwrap_or(0) + a.size > at(b).unwrap_or(0)).then_some((a.id, b.id))
    })
}

impl Layout {
    /// Validates `regions` (any order) into a layout.
    pub fn new(mut regions: Vec<MemoryRegion>) -> Result<Layout, LayoutError> {
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
            if !valid_page_size(r.page_size) {
                return Err(LayoutError::BadPageSize {
                    region: r.id,
                    page_size: r.page_size,
                });
            }
            if r.size == 0 {
                return Err(LayoutError::EmptyRegion { region: r.id });
            }
            let aligned = |a: u64| a.is_multiple_of(r.page_size);
            if !aligned(r.size)
                || !r.host_addr.is_none_or(aligned)
                || !r.guest_addr.is_none_or(aligned)
            {
                return Err(LayoutError::Unaligned {
                    region: r.id,
                    page_size: r.page_size,
                });
            }
            let wraps = |a: Option<u64>| a.is_some_and(|a| a.checked_add(r.size).is_none());
            if wraps(r.host_addr) || wraps(r.guest_addr) {
                return Err(LayoutError::Wraps { region: r.id });
            }
        }
        regions.sort_by_key(|r| r.id);
        if let Some(w) = regions.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(LayoutError::DuplicateId { region: w[0].id });
        }
        let mut offsets = Vec::with_capacity(regions.len());
        let mut total: u64 = 0;
        for r in &regions {
            offsets.push(total);
            total = total
                .checked_add(r.size)
                .ok_or(LayoutError::Wraps { region: r.id })?;
        }
        let by_host = by_address(&regions, |r| r.host_addr);
        if let Some((first, second)) = first_overlap(&regions, &by_host, |r| r.host_addr) {
            return Err(LayoutError::Overlap { first, second });
        }
        let by_guest = by_address(&regions, |r| r.guest_addr);
        if let Some((first, second)) = first_overlap(&regions, &by_guest, |r| r.guest_addr) {
            return Err(LayoutError::GuestOverlap { first, second });
        }
        let page_size = regions.iter().map(|r| r.page_size).min().unwrap_or(4096);
        Ok(Layout {
            page_size,
            regions,
            offsets,
            total_len: total,
            by_host,
        })
    }

    /// This layout with `region` added after the others: memory mapped after a transfer
    /// started, announced mid-stream (the protocol's REGION). Its id must be larger than
    /// every id here, so the memory offsets of the regions already here stay where they are
    /// (the new region's pages follow them), and its page size no smaller than
    /// [`Layout::page_size`], so the wire unit stays ([`LayoutError::CannotAdd`]); otherwise
    /// it is checked as [`Layout::new`] checks every region (alignment, overlap, count).
    pub fn with_region(&self, region: MemoryRegion) -> Result<Layout, LayoutError> {
        let cannot = |reason| LayoutError::CannotAdd {
            region: region.id,
            reason,
        };
        if self.regions.last().is_some_and(|r| r.id >= region.id) {
            return Err(cannot("its id is not larger than every id of the layout"));
        }
        if region.page_size < self.page_size {
            return Err(cannot("its page size is smaller than the layout's"));
        }
        let mut regions = self.regions.clone();
        regions.push(region);
        Layout::new(regions)
    }

    /// The id the next region added with [`Layout::with_region`] takes: one more than the
    /// largest (`None` if that is `u32::MAX`).
    pub fn next_id(&self) -> Option<u32> {
        self.regions.last().map_or(Some(0), |r| r.id.checked_add(1))
    }

    /// The parts of host range `range` that no region covers, in address order.
    pub fn uncovered(&self, range: Range<u64>) -> Vec<Range<u64>> {
        // Regions from the last one starting at or below `range.start` up to `range.end`.
        let first = self
            .by_host
            .partition_point(|&i| self.regions[i].host_addr.unwrap_or(0) <= range.start)
            .saturating_sub(1);
        let near: Vec<Range<u64>> = self.by_host[first..]
            .iter()
            .filter_map(|&i| self.regions[i].host_range())
            .take_while(|r| r.start < range.end)
            .collect();
        precopy_sys::ranges::subtract(range, &near)
    }

    /// The memory offsets of the parts of host ranges `host` that lie inside the layout's
    /// regions (parts outside are left out), sorted and coalesced.
    pub fn memory_offsets(&self, host: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            let Some(hr) = r.host_range() else {
                continue;
            };
            for h in host {
                let (s, e) = (h.start.max(hr.start), h.end.min(hr.end));
                if s < e {
                    let at = self.offsets[i] + (s - hr.start);
                    out.push(at..at + (e - s));
                }
            }
        }
        precopy_sys::ranges::coalesce(&mut out);
        out
    }

    /// The memory offsets of the layout outside `memory` (memory offsets, sorted and
    /// coalesced), split at region boundaries: what [`Sink::retain`](crate::Sink::retain)
    /// drops.
    pub fn outside(&self, memory: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            let region = self.offsets[i]..self.offsets[i] + r.size;
            out.extend(precopy_sys::ranges::subtract(region, memory));
        }
        out
    }

    /// A layout of one anonymous region, id 0, mapped here at `host_addr`.
    pub fn single(page_size: u64, host_addr: u64, len: u64) -> Result<Layout, LayoutError> {
        Layout::new(vec![
            MemoryRegion::new(0, len, page_size)
                .host(host_addr)
                .backed_by(Backing::Anonymous),
        ])
    }

    /// The wire unit in bytes: the smallest page size of any region. Every
    /// region's size and offsets are whole units.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The regions, sorted by id.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// The region with `id`.
    pub fn region(&self, id: u32) -> Option<&MemoryRegion> {
        let i = self.regions.binary_search_by_key(&id, |r| r.id).ok()?;
        Some(&self.regions[i])
    }

    /// The same layout without host addresses: what the wire carries.
    pub fn without_host(&self) -> Layout {
        Layout {
            regions: self.regions.iter().map(|r| r.without_host()).collect(),
            by_host: Vec::new(),
            ..self.clone()
        }
    }

    /// Host ranges of the regions that have one, in id order (what a source
    /// tracks and sends in full in round 0).
    pub fn host_ranges(&self) -> Vec<Range<u64>> {
        self.regions.iter().filter_map(|r| r.host_range()).collect()
    }

    /// Total bytes covered by all regions (the destination's size).
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Total wire pages covered by all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_len / self.page_size
    }

    /// Memory offset of `len` bytes at `offset` inside region `id`, which
    /// must be whole wire pages inside the region: where the wire's
    /// (region, offset) lands.
    pub fn place(&self, id: u32, offset: u64, len: u64) -> Result<u64, LayoutError> {
        let ps = self.page_size;
        let outside = LayoutError::OutsideRegion {
            region: id,
            offset,
            len,
        };
        if len == 0 || !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(outside);
        }
        let i = self
            .regions
            .binary_search_by_key(&id, |r| r.id)
            .map_err(|_| LayoutError::UnknownRegion { region: id })?;
        match offset.checked_add(len) {
            Some(end) if end <= self.regions[i].size => Ok(self.offsets[i] + offset),
            _ => Err(outside),
        }
    }

    /// The region holding memory offset `offset` and the offset inside it:
    /// how a memory offset is named on the wire.
    pub fn region_at(&self, offset: u64) -> Option<(&MemoryRegion, u64)> {
        if offset >= self.total_len {
            return None;
        }
        let i = self.offsets.partition_point(|&o| o <= offset) - 1;
        Some((&self.regions[i], offset - self.offsets[i]))
    }

    /// Checks that `len` bytes at memory offset `offset` are whole wire
    /// pages inside one region.
    pub fn check_span(&self, offset: u64, len: u64) -> Result<(), LayoutError> {
        let (r, inside) = self.region_at(offset).ok_or(LayoutError::OutsideLayout {
            range: offset..offset.saturating_add(len),
        })?;
        self.place(r.id, inside, len).map(|_| ())
    }

    /// Index (into [`Layout::regions`]) of the region whose host range holds
    /// `addr`.
    fn host_index(&self, addr: u64) -> Option<usize> {
        let k = self
            .by_host
            .partition_point(|&i| self.regions[i].host_addr.unwrap_or(0) <= addr)
            .checked_sub(1)?;
        let i = self.by_host[k];
        let r = &self.regions[i];
        (addr - r.host_addr.unwrap_or(0) < r.size).then_some(i)
    }

    /// Memory offset of host range `range`, which must be non-empty, whole
    /// wire pages and lie inside a single region.
    pub fn locate(&self, range: Range<u64>) -> Result<u64, LayoutError> {
        self.check_pages(&range)?;
        let outside = || LayoutError::OutsideLayout {
            range: range.clone(),
        };
        let i = self.host_index(range.start).ok_or_else(outside)?;
        let r = &self.regions[i];
        let base = r.host_addr.unwrap_or(0);
        if range.end > base + r.size {
            return Err(outside());
        }
        Ok(self.offsets[i] + (range.start - base))
    }

    /// Checks that host range `range` is a non-empty span of whole wire pages.
    pub fn check_pages(&self, range: &Range<u64>) -> Result<(), LayoutError> {
        if range.start >= range.end
            || !range.start.is_multiple_of(self.page_size)
            || !range.end.is_multiple_of(self.page_size)
        {
            return Err(LayoutError::RangeUnaligned {
                range: range.clone(),
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    /// Splits host range `range` at region boundaries, calling `f` for each
    /// piece with the piece and its memory offset. Fails, before calling `f`
    /// at all, if any byte of `range` is outside the layout.
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
        let first = self.host_index(range.start).ok_or_else(outside)?;
        let first = self.by_host.iter().position(|&i| i == first).unwrap_or(0);
        let mut pieces = Vec::new();
        let mut at = range.start;
        let mut k = first;
        while at < range.end {
            let i = *self.by_host.get(k).ok_or_else(outside)?;
            let r = &self.regions[i];
            let base = r.host_addr.unwrap_or(0);
            if base > at {
                return Err(outside().into());
            }
            let end = (base + r.size).min(range.end);
            pieces.push((at..end, self.offsets[i] + (at - base)));
            at = end;
            k += 1;
        }
        for (piece, offset) in pieces {
            f(piece, offset)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_added_after_the_others_and_nothing_before_it_moves() {
        let l = layout();
        assert_eq!(l.next_id(), Some(8));
        let grown = l
            .with_region(MemoryRegion::new(8, 0x4000, 4096).host(0x40000))
            .unwrap();
        for r in l.regions() {
            let at = l.place(r.id, 0, 4096).unwrap();
            assert_eq!(grown.place(r.id, 0, 4096).unwrap(), at);
        }
        assert_eq!(grown.place(8, 0, 4096).unwrap(), l.total_len());
        assert_eq!(
            grown.locate(0x41000..0x42000).unwrap(),
            l.total_len() + 0x1000
        );
        let refused = |r: MemoryRegion| l.with_region(r).unwrap_err();
        assert!(matches!(
            refused(MemoryRegion::new(6, 0x1000, 4096).host(0x40000)),
            LayoutError::CannotAdd { region: 6, .. }
        ));
        assert!(matches!(
            refused(MemoryRegion::new(9, 0x1000, 1024).host(0x40000)),
            LayoutError::CannotAdd { region: 9, .. }
        ));
        assert!(matches!(
            refused(MemoryRegion::new(9, 0x1000, 4096).host(0x12000)),
            LayoutError::Overlap { .. }
        ));
    }

    #[test]
    fn uncovered_lists_the_parts_no_region_holds() {
        // Regions at 0x1000..0x4000, 0x10000..0x12000, 0x12000..0x13000.
        let l = layout();
        assert_eq!(l.uncovered(0x1000..0x4000), vec![]);
        assert_eq!(
            l.uncovered(0x0..0x20000),
            vec![0x0..0x1000, 0x4000..0x10000, 0x13000..0x20000]
        );
        assert_eq!(l.uncovered(0x11000..0x14000), vec![0x13000..0x14000]);
        assert_eq!(l.uncovered(0x5000..0x6000), vec![0x5000..0x6000]);
    }

    fn layout() -> Layout {
        Layout::new(vec![
            MemoryRegion::new(5, 0x2000, 4096).host(0x10000),
            MemoryRegion::new(1, 0x3000, 4096).host(0x1000),
            MemoryRegion::new(7, 0x1000, 4096).host(0x12000),
        ])
        .unwrap()
    }

    #[test]
    fn sorts_by_id_and_offsets() {
        let l = layout();
        assert_eq!(l.regions()[0].id, 1);
        assert_eq!(l.total_len(), 0x6000);
        assert_eq!(l.locate(0x1000..0x2000).unwrap(), 0);
        assert_eq!(l.locate(0x10000..0x12000).unwrap(), 0x3000);
        assert_eq!(l.locate(0x12000..0x13000).unwrap(), 0x5000);
        assert_eq!(l.place(5, 0x1000, 0x1000).unwrap(), 0x4000);
        let (r, off) = l.region_at(0x4000).unwrap();
        assert_eq!((r.id, off), (5, 0x1000));
        assert!(l.region_at(0x6000).is_none());
        assert_eq!(
            l.host_ranges(),
            vec![0x1000..0x4000, 0x10000..0x12000, 0x12000..0x13000]
        );
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
        assert!(l.place(5, 0x1000, 0x2000).is_err(), "past the region end");
        assert!(l.place(2, 0, 0x1000).is_err(), "unknown id");
        assert!(l.place(5, u64::MAX - 4095, 4096).is_err());
        assert!(l.check_span(0x2000, 0x2000).is_err(), "crosses regions");
        assert!(l.without_host().locate(0x1000..0x2000).is_err());
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
    fn page_size_is_the_smallest_and_regions_align_to_their_own() {
        let l = Layout::new(vec![
            MemoryRegion::new(0, 4 << 20, 2 << 20).backed_by(Backing::Hugetlb),
            MemoryRegion::new(1, 8192, 4096),
        ])
        .unwrap();
        assert_eq!(l.page_size(), 4096);
        assert!(Layout::new(vec![MemoryRegion::new(0, 4 << 20, 2 << 20).host(4096)]).is_err());
        assert!(Layout::new(vec![MemoryRegion::new(0, 4 << 20, 2 << 20).guest(4096)]).is_err());
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(Layout::single(4095, 0, 4096).is_err());
        assert!(Layout::single(4096, 1, 4096).is_err());
        assert!(Layout::single(4096, 0, 0).is_err());
        assert!(Layout::single(4096, u64::MAX - 4095, 8192).is_err());
        assert!(Layout::new(vec![]).is_err());
        assert!(
            Layout::new(vec![
                MemoryRegion::new(0, 8192, 4096).host(0),
                MemoryRegion::new(1, 4096, 4096).host(4096),
            ])
            .is_err()
        );
        assert!(
            Layout::new(vec![
                MemoryRegion::new(3, 8192, 4096),
                MemoryRegion::new(3, 4096, 4096),
            ])
            .is_err(),
            "duplicate id"
        );
    }
}
