//! The engine's own mechanism: userfaultfd async write-protect + `PAGEMAP_SCAN`, through
//! `precopy-tracker` and `precopy-scanner`.

use crate::{Backend, BackendKind, CollectStats, Result};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{Tracker, Uffd};
use std::ops::Range;

/// uffd async write-protect + `PAGEMAP_SCAN`: a round is one atomic scan-and-reprotect walk.
#[derive(Debug)]
pub struct UffdAsync {
    scanner: Scanner,
    tracker: Option<Tracker>,
}

impl UffdAsync {
    /// Runs the engine's kernel self-test (once per process) and refuses an untrustworthy
    /// kernel.
    pub fn new() -> Result<UffdAsync> {
        Self::with_options(ScanOptions::default())
    }

    /// As [`UffdAsync::new`] with scanner options (threads, page budget).
    pub fn with_options(opts: ScanOptions) -> Result<UffdAsync> {
        let scanner = Scanner::new(opts).map_err(|e| crate::Unavailable {
            kind: BackendKind::UffdAsync,
            reason: precopy_sys::error_chain(&e),
        })?;
        Ok(UffdAsync {
            scanner,
            tracker: None,
        })
    }
}

impl Backend for UffdAsync {
    fn kind(&self) -> BackendKind {
        BackendKind::UffdAsync
    }

    fn method(&self) -> String {
        "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC)".into()
    }

    fn start(&mut self, ranges: &[Range<u64>]) -> Result<()> {
        self.tracker = None;
        let mut tracker = Tracker::new(Uffd::new()?);
        for r in ranges {
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
        all.sort_by_key(|r| r.start);
        for r in all {
            crate::push_run(out, first, r.start, r.end - r.start);
        }
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
