//! `mprotect` + `SIGSEGV`: the classic user-space method. The signal handler and its bitmap live
//! in `precopy_sys::track`; this is the policy around them.

use crate::{BackendKind, CollectStats, DirtyLog, Error, KernelWrites, Result};
use precopy_sys::track::WriteFaultTracker;
use std::ops::Range;

/// `mprotect(PROT_READ)` + a `SIGSEGV` handler that records the page and makes it writable.
///
/// Own process only, one range per process at a time. Writers need not pause: a store racing
/// [`DirtyLog::collect`] is reported by it or the next one, because the handler marks a page
/// before making it writable and a collection waits for the handlers in flight before
/// re-protecting what it took (the proof is in `precopy_sys::track`). Every written run costs one
/// more VMA until it is re-protected: scattered writes can reach `vm.max_map_count`, and then the
/// handler cannot make a page writable and aborts the process.
///
/// A system call that writes into protected pages (`read(2)` into a buffer there) fails with
/// `EFAULT`: the kernel's copy raises no signal. [`DirtyLog::prepare_kernel_write`] opens the
/// pages for it (and reports them), see [`KernelWrites::NeedsPrepare`].
#[derive(Debug)]
pub struct Mprotect {
    range: Range<u64>,
    tracker: Option<WriteFaultTracker>,
    unvouched: Vec<Range<u64>>,
}

impl Mprotect {
    /// Tracking of `ranges` of this process, which must be exactly one page-aligned range (the
    /// handler serves one per process).
    pub fn new(ranges: &[Range<u64>]) -> Result<Mprotect> {
        let sorted = crate::sorted_ranges(BackendKind::Mprotect, ranges, precopy_sys::page_size())?;
        let [range] = sorted.as_slice() else {
            return Err(Error::Unsupported {
                backend: BackendKind::Mprotect,
                what: "the SIGSEGV handler serves exactly one range per process",
            });
        };
        Ok(Mprotect {
            range: range.clone(),
            tracker: None,
            unvouched: Vec::new(),
        })
    }
}

impl DirtyLog for Mprotect {
    type Error = Error;

    fn memory(&self) -> Vec<Range<u64>> {
        vec![self.range.clone()]
    }

    fn page_size(&self) -> u64 {
        precopy_sys::page_size()
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.unvouched.clone()
    }

    fn method(&self) -> String {
        "mprotect(PROT_READ) + SA_SIGINFO SIGSEGV handler (atomic bitmap, chains to the previous handler)".into()
    }

    fn start(&mut self) -> Result<()> {
        self.tracker = None;
        let range = &self.range;
        self.unvouched =
            crate::unvouched_parts(std::process::id() as i32, std::slice::from_ref(range));
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
