//! The set of registered ranges.

use crate::{Error, Result, Target, Uffd};
use precopy_sys::pagemap::{self, Vma};
use std::io;
use std::ops::Range;

/// What memory backs a tracked range. It decides which changes the write-protect bit can see:
/// only writes through this address space's page tables are. The table in ARCHITECTURE.md
/// ("Changes the write-protect bit cannot see") lists, per kind and change path, whether the
/// engine reports, detects or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`: only this address space changes it, through its page
    /// tables (`process_vm_writev` and `/proc/PID/mem` writes go through them too). Vouched
    /// for, except for DMA through pinned pages, which only the embedder knows about.
    PrivateAnonymous,
    /// shmem: a memfd, `MAP_SHARED | MAP_ANONYMOUS`, SysV shm. Other mappings, other
    /// processes, `write(2)`, hole punching, `MADV_REMOVE` and truncation change it unseen.
    Shmem,
    /// hugetlb (`MAP_HUGETLB` or an `MFD_HUGETLB` memfd), reported in whole huge pages;
    /// `MADV_DONTNEED`, hole punching and writes through other mappings are unseen.
    Hugetlb,
    /// A private mapping of a file: pages not yet copied on write show the file, which other
    /// writers, truncation and hole punching change unseen; `MADV_DONTNEED` reverts copied
    /// pages to the file's bytes unseen.
    PrivateFile,
    /// A shared mapping of a file: as shmem, plus writes to the file by anyone.
    SharedFile,
}

impl MemoryKind {
    /// A short name for errors and reports.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::PrivateAnonymous => "private anonymous",
            MemoryKind::Shmem => "shared (memfd/shmem)",
            MemoryKind::Hugetlb => "hugetlb",
            MemoryKind::PrivateFile => "private file-backed",
            MemoryKind::SharedFile => "shared file-backed",
        }
    }

    /// Whether the write-protect bit sees every change the kernel can make to this kind
    /// (DMA through pinned pages aside): true only for private anonymous memory.
    pub fn vouched(self) -> bool {
        self == MemoryKind::PrivateAnonymous
    }
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with memory whose changes the write-protect bit cannot all see (every
/// [`MemoryKind`] but private anonymous, and any range registered with
/// [`RegisterOptions::external_writers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnvouchedPolicy {
    /// Track it and mark it [`TrackedRange::verify`]: whoever finishes from the rounds must
    /// re-check it with the source stopped (the migration driver does: it re-reads those
    /// ranges while paused, compares each page with the CRC of the copy last sent, sends what
    /// differs, and reports the cost in downtime). The default.
    #[default]
    Verify,
    /// Refuse it at registration with [`Error::Unvouched`](crate::Error::Unvouched).
    Refuse,
    /// Track it without re-checking: the caller knows no change happens outside the page
    /// tables, or reports every such change itself (precopy-migrate's `ExternalDirty`).
    AcceptRisk,
}

/// What to do about transparent huge pages when registering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ThpPolicy {
    /// Leave the range's THP policy alone (armed THPs still report at 4 KiB).
    #[default]
    Keep,
    /// `MADV_NOHUGEPAGE` the range first, so no new THP forms in it (own process only).
    Disable,
}

/// Options for [`Tracker::register_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RegisterOptions {
    /// THP policy.
    pub thp: ThpPolicy,
    /// Memory the write-protect bit cannot vouch for.
    pub unvouched: UnvouchedPolicy,
    /// Something writes this range without its page tables (a device by DMA through pinned
    /// pages, io_uring fixed buffers, vhost, VFIO): treat it as unvouched whatever its kind.
    pub external_writers: bool,
}

/// One registered range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// What backs it.
    pub kind: MemoryKind,
    /// The smallest unit the kernel reports for it: the base page, or the huge page for hugetlb.
    pub granule: u64,
    /// Changes to it may bypass the write-protect bit and it was registered with
    /// [`UnvouchedPolicy::Verify`]: re-check it with the source stopped before declaring a copy
    /// complete.
    pub verify: bool,
}

impl TrackedRange {
    /// `start..end`.
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }
}

/// Registered ranges of one [`Uffd`], kept sorted and disjoint.
#[derive(Debug)]
pub struct Tracker {
    uffd: Uffd,
    ranges: Vec<TrackedRange>,
    page_size: u64,
}

// PROCMAP_QUERY_VMA_SHARED and PROCMAP_QUERY_FILE_BACKED_VMA in the kernel's enum.
const VMA_SHARED: u64 = 8;

impl Tracker {
    /// A tracker with no ranges.
    pub fn new(uffd: Uffd) -> Tracker {
        Tracker {
            uffd,
            ranges: Vec::new(),
            page_size: precopy_sys::page_size(),
        }
    }

    /// The userfaultfd and address space.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The registered ranges, sorted by address.
    pub fn ranges(&self) -> &[TrackedRange] {
        &self.ranges
    }

    /// The ranges marked [`TrackedRange::verify`], sorted.
    pub fn verify_ranges(&self) -> Vec<Range<u64>> {
        self.ranges
            .iter()
            .filter(|r| r.verify)
            .map(|r| r.range())
            .collect()
    }

    /// Total bytes tracked.
    pub fn tracked_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The base page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Registers `range` for async write-protect tracking with default options.
    pub fn register(&mut self, range: Range<u64>) -> Result<&TrackedRange> {
        self.register_with(range, RegisterOptions::default())
    }

    /// Registers `range`. It must be page-aligned (huge-page-aligned for hugetlb), fully mapped,
    /// disjoint from tracked ranges and not registered with another userfaultfd. The range is not
    /// armed yet: call [`Tracker::arm`] before the first round.
    pub fn register_with(
        &mut self,
        range: Range<u64>,
        opts: RegisterOptions,
    ) -> Result<&TrackedRange> {
        let Range { start, end } = range;
        check_order(start, end)?;
        let unaligned = |align| Error::Unaligned { start, end, align };
        if start >= end || start % self.page_size != 0 || end % self.page_size != 0 {
            return Err(unaligned(self.page_size));
        }
        if let Some(other) = self.ranges.iter().find(|r| r.start < end && start < r.end) {
            return Err(Error::Overlap {
                start,
                end,
                other_start: other.start,
                other_end: other.end,
            });
        }
        let vmas = self.mappings(start..end)?;
        if let Some(hole) = holes(start..end, &vmas).next() {
            return Err(Error::NotMapped {
                start,
                end,
                hole_start: hole.start,
                hole_end: hole.end,
            });
        }
        let granule = vmas
            .iter()
            .map(|v| v.page_size)
            .max()
            .unwrap_or(self.page_size);
        if start % granule != 0 || end % granule != 0 {
            return Err(unaligned(granule));
        }
        let kind = self.kind_of(&vmas, granule);
        let unvouched = !kind.vouched() || opts.external_writers;
        if unvouched && opts.unvouched == UnvouchedPolicy::Refuse {
            return Err(Error::Unvouched {
                start,
                end,
                kind,
                external_writers: opts.external_writers,
            });
        }
        let verify = unvouched && opts.unvouched == UnvouchedPolicy::Verify;
        if opts.thp == ThpPolicy::Disable && kind != MemoryKind::Hugetlb {
            if self.uffd.target() != Target::This {
                return Err(Error::Unsupported(
                    "THP can only be disabled for the calling process's own memory",
                ));
            }
            precopy_sys::mem::set_thp(start, end - start, false)
                .map_err(|source| Error::Register { start, end, source })?;
        }
        precopy_sys::uffd::register(
            self.uffd.fd(),
            start,
            end - start,
            precopy_sys::abi::UFFDIO_REGISTER_MODE_WP,
        )
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => Error::Busy { start, end },
            _ => Error::Register { start, end, source },
        })?;
        let at = self.ranges.partition_point(|r| r.start < start);
        self.ranges.insert(
            at,
            TrackedRange {
                start,
                end,
                kind,
                granule,
                verify,
            },
        );
        tracing::debug!(start, end, ?kind, granule, verify, "registered");
        Ok(&self.ranges[at])
    }

    /// The kind of memory `vmas` (covering a range) are: the first one that is not private
    /// anonymous decides, since one unvouched part makes the range unvouched.
    fn kind_of(&self, vmas: &[Vma], granule: u64) -> MemoryKind {
        if granule > self.page_size {
            return MemoryKind::Hugetlb;
        }
        for v in vmas {
            let shared = v.flags & VMA_SHARED != 0;
            if shared {
                let shmem = match pagemap::vma_name(self.uffd.maps(), v.start) {
                    Ok(Some(name)) => is_shmem_name(&name),
                    // No name to go by: a shared mapping with an inode is a file or shmem;
                    // both are unvouched, so the label matters only for messages.
                    _ => true,
                };
                return if shmem {
                    MemoryKind::Shmem
                } else {
                    MemoryKind::SharedFile
                };
            }
            if v.inode != 0 {
                return MemoryKind::PrivateFile;
            }
        }
        MemoryKind::PrivateAnonymous
    }

    /// Stops tracking `range`, which must lie inside one tracked range (a part splits it).
    ///
    /// # Errors
    /// [`Error::InvertedRange`], [`Error::NotTracked`] (empty, or not inside one tracked range),
    /// [`Error::Unaligned`] (not aligned to the range's granule), [`Error::Unregister`].
    pub fn unregister(&mut self, range: Range<u64>) -> Result<()> {
        let Range { start, end } = range;
        check_order(start, end)?;
        let idx = self
            .ranges
            .iter()
            .position(|r| r.start <= start && end <= r.end && start < end)
            .ok_or(Error::NotTracked { start, end })?;
        let granule = self.ranges[idx].granule;
        if start % granule != 0 || end % granule != 0 {
            return Err(Error::Unaligned {
                start,
                end,
                align: granule,
            });
        }
        precopy_sys::uffd::unregister(self.uffd.fd(), start, end - start)
            .map_err(|source| Error::Unregister { start, end, source })?;
        let old = self.ranges.remove(idx);
        let mut at = idx;
        for part in [old.start..start, end..old.end] {
            if !part.is_empty() {
                self.ranges.insert(
                    at,
                    TrackedRange {
                        start: part.start,
                        end: part.end,
                        ..old
                    },
                );
                at += 1;
            }
        }
        Ok(())
    }

    /// Drops the parts of `range` that are tracked from the bookkeeping *without* asking the
    /// kernel: for memory the kernel already stopped tracking (a round reported it untracked:
    /// unmapped, or replaced by a new mapping). Returns the bytes dropped (0 for an empty
    /// range).
    ///
    /// # Errors
    /// [`Error::InvertedRange`], or [`Error::Unaligned`] when `range` does not start and end
    /// on page boundaries (the bookkeeping would then describe partial pages); nothing is
    /// dropped.
    pub fn forget(&mut self, range: Range<u64>) -> Result<u64> {
        check_order(range.start, range.end)?;
        if !range.start.is_multiple_of(self.page_size) || !range.end.is_multiple_of(self.page_size)
        {
            return Err(Error::Unaligned {
                start: range.start,
                end: range.end,
                align: self.page_size,
            });
        }
        if range.is_empty() {
            return Ok(0);
        }
        let mut dropped = 0;
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for r in self.ranges.drain(..) {
            if r.end <= range.start || range.end <= r.start {
                kept.push(r);
                continue;
            }
            dropped += r.end.min(range.end) - r.start.max(range.start);
            for part in [
                r.start..range.start.max(r.start),
                range.end.min(r.end)..r.end,
            ] {
                if !part.is_empty() {
                    kept.push(TrackedRange {
                        start: part.start,
                        end: part.end,
                        ..r
                    });
                }
            }
        }
        self.ranges = kept;
        Ok(dropped)
    }

    /// Write-protects every tracked range, populated or not, so the next round reports only
    /// what is written from now on.
    pub fn arm(&self) -> Result<()> {
        for r in &self.ranges {
            self.arm_range(r.range())?;
        }
        Ok(())
    }

    /// Write-protects `range` (inside tracked ranges): it reports clean until written again.
    ///
    /// # Errors
    /// [`Error::InvertedRange`]; [`Error::Unaligned`] (empty or not page-aligned);
    /// [`Error::NotTracked`] when part of it is outside every tracked range (nothing is
    /// protected); [`Error::Arm`] when the kernel refuses (e.g. the memory changed meanwhile).
    pub fn arm_range(&self, range: Range<u64>) -> Result<()> {
        let Range { start, end } = range;
        check_order(start, end)?;
        if start == end || start % self.page_size != 0 || end % self.page_size != 0 {
            return Err(Error::Unaligned {
                start,
                end,
                align: self.page_size,
            });
        }
        if !self.covers(start..end) {
            return Err(Error::NotTracked { start, end });
        }
        precopy_sys::uffd::writeprotect(self.uffd.fd(), start, end - start, true)
            .map_err(|source| Error::Arm { start, end, source })
    }

    /// Whether the tracked ranges cover every byte of `range` (non-empty).
    fn covers(&self, range: Range<u64>) -> bool {
        let mut at = range.start;
        let first = self.ranges.partition_point(|r| r.end <= at);
        for r in &self.ranges[first..] {
            if r.start > at {
                return false;
            }
            at = r.end;
            if at >= range.end {
                return true;
            }
        }
        false
    }

    /// The mappings (VMAs) of the tracked process that intersect `range`, sorted (none for an
    /// empty range).
    ///
    /// # Errors
    /// [`Error::InvertedRange`], [`Error::QueryMaps`].
    pub fn mappings(&self, range: Range<u64>) -> Result<Vec<Vma>> {
        let mut out = Vec::new();
        self.mappings_into(range, &mut out)?;
        Ok(out)
    }

    /// As [`Tracker::mappings`], into a reused vector (cleared first).
    pub fn mappings_into(&self, range: Range<u64>, out: &mut Vec<Vma>) -> Result<()> {
        out.clear();
        check_order(range.start, range.end)?;
        let mut addr = range.start;
        while addr < range.end {
            match pagemap::query_vma(self.uffd.maps(), addr) {
                Ok(Some(vma)) if vma.start < range.end => {
                    addr = vma.end;
                    out.push(vma);
                }
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                    return self.mappings_from_smaps(range, out);
                }
                Err(e) => return Err(Error::QueryMaps(e)),
            }
        }
        Ok(())
    }

    /// Fallback for kernels before 6.11 (no `PROCMAP_QUERY`): parse `/proc/PID/smaps`.
    fn mappings_from_smaps(&self, range: Range<u64>, out: &mut Vec<Vma>) -> Result<()> {
        let to_io = |e: procfs::ProcError| io::Error::other(e.to_string());
        let process = procfs::process::Process::new(self.uffd.pid())
            .map_err(|e| Error::QueryMaps(to_io(e)))?;
        let maps = process.smaps().map_err(|e| Error::QueryMaps(to_io(e)))?;
        out.clear();
        for m in maps.iter() {
            let (s, e) = m.address;
            if e <= range.start || s >= range.end {
                continue;
            }
            let shared = m.perms.contains(procfs::process::MMPermissions::SHARED);
            let page_size = m
                .extension
                .map
                .get("KernelPageSize")
                .copied()
                .unwrap_or(self.page_size);
            out.push(Vma {
                start: s,
                end: e,
                flags: if shared { VMA_SHARED } else { 0 },
                page_size,
                inode: m.inode,
            });
        }
        Ok(())
    }
}

/// [`Error::InvertedRange`] when `end < start`.
fn check_order(start: u64, end: u64) -> Result<()> {
    if end < start {
        return Err(Error::InvertedRange { start, end });
    }
    Ok(())
}

/// Whether a mapping name (as `/proc/PID/maps` shows it) is shmem rather than a file on disk:
/// a memfd, shared anonymous memory (`/dev/zero`), SysV shared memory, or POSIX shm.
fn is_shmem_name(name: &str) -> bool {
    name.starts_with("/memfd:")
        || name.starts_with("/dev/zero")
        || name.starts_with("/SYSV")
        || name.starts_with("/dev/shm/")
}

/// The parts of `range` that no VMA in `vmas` (sorted) covers.
pub(crate) fn holes<'a>(
    range: Range<u64>,
    vmas: &'a [Vma],
) -> impl Iterator<Item = Range<u64>> + 'a {
    let mut cursor = range.start;
    let end = range.end;
    vmas.iter()
        .map(|v| v.start..v.end)
        .chain(std::iter::once(end..end))
        .filter_map(move |v| {
            let hole = cursor..v.start.min(end);
            cursor = cursor.max(v.end);
            (hole.start < hole.end).then_some(hole)
        })
}

/// The parts of `range` with no mapping in the tracked process, given its VMAs (sorted).
pub fn unmapped_parts(range: Range<u64>, vmas: &[Vma]) -> Vec<Range<u64>> {
    holes(range, vmas).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            flags: 0,
            page_size: 4096,
            inode: 0,
        }
    }

    #[test]
    fn holes_between_and_around_vmas() {
        let vmas = [vma(0x2000, 0x3000), vma(0x5000, 0x8000)];
        let got: Vec<_> = holes(0x1000..0x9000, &vmas).collect();
        assert_eq!(got, vec![0x1000..0x2000, 0x3000..0x5000, 0x8000..0x9000]);
        let none: Vec<_> = holes(0x2000..0x3000, &vmas).collect();
        assert!(none.is_empty());
        let all: Vec<_> = holes(0x1000..0x2000, &[]).collect();
        assert_eq!(all, vec![0x1000..0x2000]);
    }
}
