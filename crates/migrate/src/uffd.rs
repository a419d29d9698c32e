//! [`DirtyLog`] over the engine's own tracking: a [`Tracker`] armed once and a [`Scanner`] run
//! per round, in this process or in another one whose userfaultfd was adopted.

use crate::control::{BoxError, DirtyLog, ExternalDirty};
use precopy_scanner::{Scanner, UntrackedReason};
use precopy_tracker::{Tracker, Uffd};
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

/// The tracker's ranges are the memory; each [`DirtyLog::dirty`] call is one scanner round,
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
    fn memory(&self) -> Vec<Range<u64>> {
        self.tracker.ranges().iter().map(|r| r.range()).collect()
    }

    fn page_size(&self) -> u64 {
        self.tracker.page_size()
    }

    fn start(&mut self) -> Result<(), BoxError> {
        Ok(self.tracker.arm()?)
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.tracker.verify_ranges()
    }

    fn dirty(&mut self, out: &mut Vec<Range<u64>>) -> Result<(), BoxError> {
        // Drained before the scan: a range marked after its write may be sent twice, never
        // missed.
        self.external.drain_into(self.tracker.page_size(), out);
        loop {
            let round = self.scanner.round(&self.tracker)?;
            out.extend_from_slice(round.dirty());
            for u in round.untracked() {
                if u.reason == UntrackedReason::Unmapped {
                    return Err(Box::new(TrackingError::Unmapped {
                        start: u.range.start,
                        end: u.range.end,
                    }));
                }
                out.push(u.range.clone());
            }
            // Only a page budget makes a round incomplete; finish the walk.
            if round.complete() {
                return Ok(());
            }
        }
    }
}
