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
    external: ExternalDirty,
}

impl UffdDirtyLog {
    /// A dirty log over `tracker`'s registered ranges.
    pub fn new(tracker: Tracker, scanner: Scanner) -> UffdDirtyLog {
        UffdDirtyLog {
            tracker,
            scanner,
            external: ExternalDirty::new(),
        }
    }

    /// The handle through which the embedder adds writes no page table shows (DMA, another
    /// process) to the next round; see [`ExternalDirty`].
    pub fn external_dirty(&self) -> ExternalDirty {
        self.external.clone()
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
            let tracked = tracker
                .register(range)
                .map_err(|source| TrackingError::Register {
                    region: r.id,
                    source,
                })?;
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
            if !fits {
                return Err(mismatch(
                    format!("{:?} memory", r.backing),
                    format!("{} memory", tracked.kind.name()),
                ));
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
