//! [`DirtyLog`] over the engine's own tracking: a [`Tracker`] armed once and a [`Scanner`] run
//! per round, in this process or in another one whose userfaultfd was adopted.

use crate::control::{CollectStats, DirtyLog, ExternalDirty};
use precopy_scanner::{Scanner, UntrackedReason};
use precopy_tracker::{MemoryKind, Tracker, Uffd};
use precopy_transfer::{Backing, Layout};
use std::ops::Range;
use std::os::fd::{AsFd, RawFd};

/// Tracked memory that can no longer be migrated.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// A tracked range was unmapped: its contents are gone, so the migration cannot be exact.
    #[error("tracked memory {start:#x}..{end:#x} was unmapped during the migration")]
    Unmapped {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// Copying the userfaultfd out of the target process failed.
    #[error("copying fd {fd} out of process {pid} failed (needs ptrace access, Linux 5.6+)")]
    GetFd {
        /// The process.
        pid: i32,
        /// Its fd number.
        fd: RawFd,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Creating this process's userfaultfd failed (kernel without WP_ASYNC, no permission).
    #[error("creating a userfaultfd for the migration failed")]
    Uffd {
        /// The tracker's error.
        #[source]
        source: precopy_tracker::Error,
    },
    /// A region of the layout has no host address, so there is nothing to track.
    #[error("region {region} has no host address: a source must say where it mapped each region")]
    NoHostAddress {
        /// The region's id.
        region: u32,
    },
    /// Registering a region with the tracker failed.
    #[error("registering region {region} with the tracker failed")]
    Register {
        /// The region's id.
        region: u32,
        /// The tracker's error.
        #[source]
        source: precopy_tracker::Error,
    },
    /// A region's host range holds more than one object: from `at` on, the mappings are of
    /// another file or memfd, another kind of memory, page size or sharing than at its start
    /// (a region stated too large reaches into whatever is mapped next: another memfd, the
    /// heap, a library). A region must be one mapped object.
    #[error("region {region} is not one mapping: {first} up to {at:#x}, then {then}")]
    Spans {
        /// The region's id.
        region: u32,
        /// Where the other mapping starts.
        at: u64,
        /// What the region starts with.
        first: String,
        /// What follows at `at`.
        then: String,
    },
    /// What is mapped at a region's host address is not what the layout states.
    #[error("region {region}: the layout states {stated}, but the memory mapped there is {found}")]
    Mismatch {
        /// The region's id.
        region: u32,
        /// What the layout says (backing or page size).
        stated: String,
        /// What the tracker found.
        found: String,
    },
    /// Write-protecting the tracked memory at the start failed.
    #[error("write-protecting the tracked memory failed")]
    Arm {
        /// The tracker's error.
        #[source]
        source: precopy_tracker::Error,
    },
    /// Taking the writes the embedder marked ([`ExternalDirty`]) failed; the marks stay for
    /// the next collection.
    #[error("taking the externally marked writes failed")]
    External {
        /// Why.
        #[source]
        source: crate::control::MarkError,
    },
    /// A scanner round failed.
    #[error("a dirty-page scan failed")]
    Scan {
        /// The scanner's error.
        #[source]
        source: precopy_scanner::Error,
    },
    /// Unregistering a range when the log stopped failed.
    #[error("unregistering {start:#x}..{end:#x} from the tracker failed")]
    Unregister {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// The tracker's error.
        #[source]
        source: precopy_tracker::Error,
    },
    /// The tracker refused the adopted fd.
    #[error("adopting the userfaultfd of process {pid} failed")]
    Adopt {
        /// The process.
        pid: i32,
        /// The tracker's error.
        #[source]
        source: precopy_tracker::Error,
    },
}

/// Copies userfaultfd number `fd` out of process `pid` (which created it with
/// `precopy_sys::uffd::create()` and did no `UFFDIO_API` on it) and adopts it: the result acts
/// on `pid`'s memory.
pub fn adopt_process_uffd(pid: i32, fd: RawFd) -> Result<Uffd, TrackingError> {
    let get = |source| TrackingError::GetFd { pid, fd, source };
    let pidfd = precopy_sys::process::pidfd_open(pid).map_err(get)?;
    let ours = precopy_sys::process::pidfd_getfd(pidfd.as_fd(), fd).map_err(get)?;
    Uffd::adopt(ours, pid).map_err(|source| TrackingError::Adopt { pid, source })
}

/// Where the mappings `vmas` (covering one region, in address order) stop being one object: the
/// start of the first mapping whose file or memfd (inode), sharing, permissions or page size
/// differs from the first one's, with both described. Private anonymous memory has no identity
/// beyond that, so adjacent anonymous mappings pass; so would two mappings of the same memfd at
/// unrelated offsets (the query gives no file offset).
fn one_object(vmas: &[precopy_sys::pagemap::Vma]) -> Option<(u64, String, String)> {
    let first = vmas.first()?;
    let same = |v: &&precopy_sys::pagemap::Vma| {
        (v.inode, v.flags, v.page_size) == (first.inode, first.flags, first.page_size)
    };
    let other = vmas.iter().find(|v| !same(v))?;
    let describe = |v: &precopy_sys::pagemap::Vma| match v.inode {
        0 => format!("anonymous memory in {}-byte pages", v.page_size),
        inode => format!(
            "the file or memfd with inode {inode} in {}-byte pages",
            v.page_size
        ),
    };
    let (a, mut b) = (describe(first), describe(other));
    if a == b {
        b.push_str(" with other sharing or permissions");
    }
    Some((other.start, a, b))
}

/// The tracker's ranges are the memory; each [`DirtyLog::collect`] call is one scanner round,
/// plus whatever the embedder marked through [`UffdDirtyLog::external_dirty`]. Parts that
/// stopped being tracked are reported dirty (re-sent in full); parts that were unmapped fail
/// the migration. Ranges the tracker marked [`verify`](precopy_tracker::TrackedRange::verify)
/// (memory whose changes the write-protect bit cannot all see) are
/// [`DirtyLog::unvouched`]: the driver re-checks them while the workload is paused.
#[derive(Debug)]
pub struct UffdDirtyLog {
    tracker: Tracker,
    scanner: Scanner,
    external: ClosedOnDrop,
}

/// The log's [`ExternalDirty`], closed when the log goes away (also through
/// [`UffdDirtyLog::into_parts`]), so a device's late mark fails at its call.
#[derive(Debug)]
struct ClosedOnDrop(ExternalDirty);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl UffdDirtyLog {
    /// A dirty log over `tracker`'s registered ranges.
    pub fn new(tracker: Tracker, scanner: Scanner) -> UffdDirtyLog {
        let memory = tracker.ranges().iter().map(|r| r.range()).collect();
        UffdDirtyLog {
            tracker,
            scanner,
            external: ClosedOnDrop(ExternalDirty::for_memory(memory)),
        }
    }

    /// The handle through which the embedder adds writes no page table shows (DMA, another
    /// process) to the next round; see [`ExternalDirty`]. It accepts ranges of the tracked
    /// memory only (source host addresses), and nothing once this log is gone.
    pub fn external_dirty(&self) -> ExternalDirty {
        self.external.0.clone()
    }

    /// Tracks this process's memory as `layout` describes it: a new userfaultfd, every region
    /// registered at its host address, each checked against its stated backing and page size
    /// (the tracker finds both from the mapping), so the description the wire and the receiver
    /// use is the one that is tracked.
    pub fn for_layout(layout: &Layout, scanner: Scanner) -> Result<UffdDirtyLog, TrackingError> {
        let uffd = Uffd::new().map_err(|source| TrackingError::Uffd { source })?;
        let mut tracker = Tracker::new(uffd);
        for r in layout.regions() {
            let range = r
                .host_range()
                .ok_or(TrackingError::NoHostAddress { region: r.id })?;
            let register = |source| TrackingError::Register {
                region: r.id,
                source,
            };
            let tracked = tracker.register(range.clone()).map_err(register)?;
            let mismatch = |stated: String, found: String| TrackingError::Mismatch {
                region: r.id,
                stated,
                found,
            };
            if tracked.granule != r.page_size {
                return Err(mismatch(
                    format!("{}-byte pages", r.page_size),
                    format!("tracked in {}-byte pages", tracked.granule),
                ));
            }
            let fits = match r.backing {
                None => true,
                Some(Backing::Anonymous) => tracked.kind == MemoryKind::PrivateAnonymous,
                Some(Backing::Memfd) => tracked.kind == MemoryKind::Shmem,
                Some(Backing::File) => tracked.kind == MemoryKind::SharedFile,
                Some(Backing::Hugetlb) => tracked.kind == MemoryKind::Hugetlb,
            };
            if let (false, Some(stated)) = (fits, r.backing) {
                return Err(mismatch(
                    format!("{stated:?} memory"),
                    format!("{} memory", tracked.kind.name()),
                ));
            }
            // Registered first, so a hole is `NotMapped`; a refusal drops the whole tracker.
            let vmas = tracker.mappings(range).map_err(register)?;
            if let Some((at, first, then)) = one_object(&vmas) {
                return Err(TrackingError::Spans {
                    region: r.id,
                    at,
                    first,
                    then,
                });
            }
        }
        Ok(UffdDirtyLog::new(tracker, scanner))
    }

    /// The tracker.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The tracker and scanner back.
    pub fn into_parts(self) -> (Tracker, Scanner) {
        (self.tracker, self.scanner)
    }
}

impl DirtyLog for UffdDirtyLog {
    type Error = TrackingError;

    fn memory(&self) -> Vec<Range<u64>> {
        self.tracker.ranges().iter().map(|r| r.range()).collect()
    }

    fn page_size(&self) -> u64 {
        self.tracker.page_size()
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        self.tracker
            .arm()
            .map_err(|source| TrackingError::Arm { source })
    }

    /// Unregisters every tracked range (the write protection goes with it).
    fn stop(&mut self) -> Result<(), TrackingError> {
        for r in self.memory() {
            self.tracker
                .unregister(r.clone())
                .map_err(|source| TrackingError::Unregister {
                    start: r.start,
                    end: r.end,
                    source,
                })?;
        }
        Ok(())
    }

    fn method(&self) -> String {
        "userfaultfd async write-protect + PAGEMAP_SCAN".into()
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.tracker.verify_ranges()
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, TrackingError> {
        let first = out.len();
        let mut ioctls = 0;
        // Drained before the scan: a range marked after its write may be sent twice, never
        // missed.
        self.external
            .0
            .drain_into(self.tracker.page_size(), out)
            .map_err(|source| TrackingError::External { source })?;
        loop {
            let round = self
                .scanner
                .round(&self.tracker)
                .map_err(|source| TrackingError::Scan { source })?;
            ioctls += round.stats().ioctls;
            out.extend_from_slice(round.dirty());
            for u in round.untracked() {
                if u.reason == UntrackedReason::Unmapped {
                    return Err(TrackingError::Unmapped {
                        start: u.range.start,
                        end: u.range.end,
                    });
                }
                out.push(u.range.clone());
            }
            // Only a page budget makes a round incomplete; finish the walk.
            if round.complete() {
                let mut stats = CollectStats::count(&out[first..], self.tracker.page_size());
                stats.syscalls = ioctls;
                return Ok(stats);
            }
        }
    }
}
