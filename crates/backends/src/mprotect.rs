//! `mprotect` + `SIGSEGV`: the classic user-space method. The signal handler and its bitmap live
//! in `precopy_sys::track`; this is the policy around them.

use crate::{Backend, BackendKind, CollectStats, Error, KernelWrites, Result};
use precopy_sys::track::WriteFaultTracker;
use std::ops::Range;

/// `mprotect(PROT_READ)` + a `SIGSEGV` handler that records the page and makes it writable.
///
/// Own process only, one range per process at a time. Writers need not pause: a store racing
/// [`Backend::collect`] is reported by it or the next one, because the handler marks a page
/// before making it writable and a collection waits for the handlers in flight before
/// re-protecting what it took (the proof is in `precopy_sys::track`). Every written run costs one
/// more VMA until it is re-protected: scattered writes can reach `vm.max_map_count`, and then the
/// handler cannot make a page writable and aborts the process.
///
/// A system call that writes into protected pages (`read(2)` into a buffer there) fails with
/// `EFAULT`: the kernel's copy raises no signal. [`Backend::prepare_kernel_write`] opens the
/// pages for it (and reports them), see [`KernelWrites::NeedsPrepare`].
#[derive(Debug, Default)]
pub struct Mprotect {
    tracker: Option<WriteFaultTracker>,
}

impl Mprotect {
    /// A backend with nothing tracked.
    pub fn new() -> Mprotect {
        Mprotect::default()
    }
}

impl Backend for Mprotect {
    fn kind(&self) -> BackendKind {
        BackendKind::Mprotect
    }

    fn method(&self) -> String {
        "mprotect(PROT_READ) + SA_SIGINFO SIGSEGV handler (atomic bitmap, chains to the previous handler)".into()
    }

    fn start(&mut self, ranges: &[Range<u64>]) -> Result<()> {
        self.tracker = None;
        let [range] = ranges else {
            return Err(Error::Unsupported {
                backend: BackendKind::Mprotect,
                what: "the SIGSEGV handler serves exactly one range per process",
            });
        };
        let page = precopy_sys::page_size();
        if range.start >= range.end || range.start % page != 0 || range.end % page != 0 {
            return Err(Error::InvalidRange {
                backend: BackendKind::Mprotect,
                start: range.start,
                end: range.end,
            });
        }
        let map_err = |what| {
            move |source| Error::Range {
                backend: BackendKind::Mprotect,
                what,
                start: range.start,
                end: range.end,
                source,
            }
        };
        let tracker = WriteFaultTracker::new(range.clone()).map_err(map_err("claim"))?;
        tracker.protect_all().map_err(map_err("write-protect"))?;
        self.tracker = Some(tracker);
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats> {
        let tracker = self.tracker.as_ref().ok_or(Error::NotStarted {
            backend: BackendKind::Mprotect,
        })?;
        let first = out.len();
        let calls = tracker.collect(out).map_err(|source| Error::Io {
            backend: BackendKind::Mprotect,
            what: "re-protect written pages",
            source,
        })?;
        let mut stats = CollectStats::count(&out[first..], precopy_sys::page_size());
        stats.syscalls = calls;
        Ok(stats)
    }

    fn stop(&mut self) -> Result<()> {
        self.tracker = None;
        Ok(())
    }

    /// Always [`KernelWrites::NeedsPrepare`]: the kernel's copy into a read-only page fails
    /// with `EFAULT` and sends no `SIGSEGV`, so the handler never sees it.
    fn kernel_writes(&self) -> KernelWrites {
        KernelWrites::NeedsPrepare
    }

    /// Marks the pages written and makes them writable, as the handler does for a store
    /// (`WriteFaultTracker::open_for_kernel_write`); the next collection reports and protects
    /// them again.
    fn prepare_kernel_write(&self, range: Range<u64>) -> Result<()> {
        let tracker = self.tracker.as_ref().ok_or(Error::NotStarted {
            backend: BackendKind::Mprotect,
        })?;
        crate::check_inside(BackendKind::Mprotect, &[tracker.range()], &range)?;
        tracker
            .open_for_kernel_write(range.clone())
            .map_err(|source| Error::Range {
                backend: BackendKind::Mprotect,
                what: "open for a kernel write",
                start: range.start,
                end: range.end,
                source,
            })
    }
}
