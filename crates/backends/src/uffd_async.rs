//! The engine's own mechanism: userfaultfd async write-protect + `PAGEMAP_SCAN`, through
//! `precopy-tracker` and `precopy-scanner`.

use crate::{BackendKind, CollectStats, DirtyLog, Error, Result};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::ranges::coalesce;
use precopy_tracker::{Tracker, Uffd};
use std::ops::Range;

/// uffd async write-protect + `PAGEMAP_SCAN`: a round is one atomic scan-and-reprotect walk.
/// (For a migration, `precopy-migrate`'s `UffdDirtyLog` is the richer form of the same: it
/// checks a layout against the memory, honours unvouched-memory policies and takes writes an
/// embedder reports.)
#[derive(Debug)]
pub struct UffdAsync {
    scanner: Scanner,
    memory: Vec<Range<u64>>,
    tracker: Option<Tracker>,
}

impl UffdAsync {
    /// Tracking of `ranges` of this process (page-aligned, disjoint). Runs the engine's kernel
    /// self-test (once per process) and refuses an untrustworthy kernel.
    pub fn new(ranges: &[Range<u64>]) -> Result<UffdAsync> {
        Self::with_options(ranges, ScanOptions::default())
    }

    /// As [`UffdAsync::new`] with scanner options (threads, page budget).
    pub fn with_options(ranges: &[Range<u64>], opts: ScanOptions) -> Result<UffdAsync> {
        let memory =
            crate::sorted_ranges(BackendKind::UffdAsync, ranges, precopy_sys::page_size())?;
        let scanner = Scanner::new(opts).map_err(|e| crate::Unavailable {
            kind: BackendKind::UffdAsync,
            reason: precopy_sys::error_chain(&e),
        })?;
        Ok(UffdAsync {
            scanner,
            memory,
            tracker: None,
        })
    }
}

impl DirtyLog for UffdAsync {
    type Error = Error;

    fn memory(&self) -> Vec<Range<u64>> {
        self.memory.clone()
    }

    fn page_size(&self) -> u64 {
        self.tracker
            .as_ref()
            .map_or_else(precopy_sys::page_size, Tracker::page_size)
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.tracker
            .as_ref()
            .map_or_else(Vec::new, Tracker::verify_ranges)
    }

    fn method(&self) -> String {
        "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)".into()
    }

    fn start(&mut self) -> Result<()> {
        self.tracker = None;
        let mut tracker = Tracker::new(Uffd::new()?);
        for r in &self.memory {
            tracker.register(r.clone())?;
        }
        tracker.arm()?;
        self.tracker = Some(tracker);
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats> {
        let tracker = self.tracker.as_ref().ok_or(crate::Error::NotStarted {
            backend: BackendKind::UffdAsync,
        })?;
        let round = self.scanner.round(tracker)?;
        let first = out.len();
        // Untracked parts are never clean: report them as written.
        let mut all: Vec<Range<u64>> = round.dirty().to_vec();
        all.extend(round.untracked().iter().map(|u| u.range.clone()));
        coalesce(&mut all);
        out.extend(all);
        let mut stats = CollectStats::count(&out[first..], tracker.page_size());
        stats.syscalls = round.stats().ioctls;
        Ok(stats)
    }

    /// Nothing to prepare: async write-protect resolves the kernel's own write fault in the
    /// kernel, as it does a store's, and the page reads written in the next round.
    fn prepare_kernel_write(&self, range: Range<u64>) -> Result<()> {
        let tracker = self.tracker.as_ref().ok_or(crate::Error::NotStarted {
            backend: BackendKind::UffdAsync,
        })?;
        let tracked: Vec<Range<u64>> = tracker.ranges().iter().map(|r| r.range()).collect();
        crate::check_inside(BackendKind::UffdAsync, &tracked, &range)
    }

    fn stop(&mut self) -> Result<()> {
        self.tracker = None;
        Ok(())
    }
}
