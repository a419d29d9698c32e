//! userfaultfd synchronous write-protect: the method before Linux 6.7 (and before
//! `UFFD_FEATURE_WP_ASYNC`). Every first write after a reset stops the writing thread until a
//! handler thread reads the fault message, records the page and un-protects it (which wakes the
//! writer). A collection swaps the recorded pages out and write-protects them again.
//!
//! The handler's *open* (un-protect a page, record it) and a collection's *take and close*
//! (swap the records out, re-protect what it took) exclude each other (a mutex held across
//! each), and the handler wakes the writer only after its open. So whenever neither runs, every
//! writable page is on record: a store to a page another thread's fault just opened (it
//! completes without faulting) is on record before the next collection can begin, a store that
//! has completed is on record, and a write racing a collection is reported in it or in the next
//! one. (Un-protect and record without the mutex left a gap: a second thread's store could
//! complete on the opened page, unrecorded, while the handler was preempted between the two,
//! and any number of collections could pass before the record.)
//!
//! # Writes by the kernel
//! A fault the kernel takes while copying into tracked memory (`read(2)` into a buffer there)
//! reaches the handler thread only if the userfaultfd was created without
//! `UFFD_USER_MODE_ONLY`; with the flag the system call fails with `EFAULT`. The backend asks
//! for such an fd first (`CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd = 1` or access to
//! `/dev/userfaultfd`); then the kernel's copy waits for the handler like a store does, and
//! [`DirtyLog::kernel_writes`] is [`KernelWrites::Tracked`]. Without the privilege it falls back
//! to a user-mode-only fd and [`KernelWrites::NeedsPrepare`]: [`DirtyLog::prepare_kernel_write`]
//! un-protects and records the pages the way the handler would.

use crate::{BackendKind, CollectStats, DirtyLog, Error, KernelWrites, Result, Unavailable};
use precopy_sys::ranges::push_merged;
use precopy_sys::{abi, track, uffd};
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Above this many written runs a collection re-protects each whole range in one call instead
/// of one call per run.
const WHOLE_RANGE_ABOVE: usize = 8192;
/// How long the handler thread sleeps in `poll` before it looks at the stop flag.
const POLL_MS: i32 = 50;

#[derive(Debug)]
struct Tracked {
    range: Range<u64>,
    bits: Box<[AtomicU64]>,
}

#[derive(Debug)]
struct Shared {
    fd: OwnedFd,
    ranges: Vec<Tracked>,
    page: u64,
    stop: AtomicBool,
    faults: AtomicU64,
    error: Mutex<Option<io::Error>>,
    /// Held across the handler's open (un-protect, record) and a collection's take and close
    /// (swap, re-protect): see the module docs.
    section: Mutex<()>,
}

impl Shared {
    fn record(&self, addr: u64) {
        let idx = self.ranges.partition_point(|t| t.range.end <= addr);
        if let Some(t) = self.ranges.get(idx)
            && t.range.start <= addr
        {
            let i = (addr - t.range.start) / self.page;
            t.bits[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel);
        }
    }

    fn section(&self) -> std::sync::MutexGuard<'_, ()> {
        self.section.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: io::Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    /// The handler thread: resolve each write-protect fault and record its page.
    fn serve(&self) {
        let mut addrs = Vec::with_capacity(64);
        while !self.stop.load(Ordering::Acquire) {
            match track::poll_readable(self.fd.as_fd(), POLL_MS) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
            addrs.clear();
            if let Err(e) = track::read_wp_faults(self.fd.as_fd(), &mut addrs) {
                self.fail(e);
                return;
            }
            for &addr in &addrs {
                let page = addr & !(self.page - 1);
                // Un-protect and record inside the section, wake the writer after it: no
                // collection sees the page open and unrecorded.
                let section = self.section();
                loop {
                    match track::unprotect_no_wake(self.fd.as_fd(), page, self.page) {
                        Ok(()) => break,
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                        Err(e) => {
                            self.fail(e);
                            break;
                        }
                    }
                }
                self.record(page);
                drop(section);
                if let Err(e) = track::wake(self.fd.as_fd(), page, self.page) {
                    self.fail(e);
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Debug)]
struct Running {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Synchronous userfaultfd write-protect with a fault-handler thread.
#[derive(Debug)]
pub struct UffdSync {
    unpopulated: bool,
    /// Whether to ask for a userfaultfd that hands kernel faults to the handler.
    want_kernel_faults: bool,
    /// Whether the fd of the current (or next) run handles kernel faults.
    kernel_faults: bool,
    memory: Vec<Range<u64>>,
    running: Option<Running>,
    unvouched: Vec<Range<u64>>,
}

impl UffdSync {
    /// Tracking of `ranges` of this process (page-aligned, disjoint). Checks that the kernel has
    /// userfaultfd write-protect (Linux 5.7+).
    pub fn new(ranges: &[Range<u64>]) -> Result<UffdSync> {
        let memory = crate::sorted_ranges(BackendKind::UffdSync, ranges, precopy_sys::page_size())?;
        let features = precopy_tracker::uffd_kernel_features().map_err(|e| {
            Error::Unavailable(Unavailable {
                kind: BackendKind::UffdSync,
                reason: precopy_sys::error_chain(&e),
            })
        })?;
        let wp = linux_wp_bit();
        if features.bits() & wp == 0 {
            return Err(Error::Unavailable(Unavailable {
                kind: BackendKind::UffdSync,
                reason: "kernel lacks userfaultfd write-protect (needs Linux 5.7+)".into(),
            }));
        }
        // Whether this process may create an fd that handles kernel faults; `start` asks
        // again and falls back if it no longer may.
        let kernel_faults = uffd::create_with_kernel_faults().is_ok();
        Ok(UffdSync {
            unpopulated: features.wp_unpopulated(),
            want_kernel_faults: true,
            kernel_faults,
            memory,
            running: None,
            unvouched: Vec::new(),
        })
    }

    /// As [`UffdSync::new`], but with the userfaultfd an unprivileged process gets
    /// (`UFFD_USER_MODE_ONLY`) even where a privileged one is allowed:
    /// [`KernelWrites::NeedsPrepare`]. For comparisons and tests of that case.
    pub fn user_mode_only(ranges: &[Range<u64>]) -> Result<UffdSync> {
        let mut b = UffdSync::new(ranges)?;
        b.want_kernel_faults = false;
        b.kernel_faults = false;
        Ok(b)
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(mut run) = self.running.take() else {
            return Ok(());
        };
        let mut first_err = None;
        // Unregistering drops the protection and wakes any writer still waiting on a fault.
        for t in &run.shared.ranges {
            let len = t.range.end - t.range.start;
            if let Err(source) = uffd::unregister(run.shared.fd.as_fd(), t.range.start, len) {
                first_err.get_or_insert(Error::Range {
                    backend: BackendKind::UffdSync,
                    what: "unregister",
                    start: t.range.start,
                    end: t.range.end,
                    source,
                });
            }
        }
        run.shared.stop.store(true, Ordering::Release);
        if let Some(h) = run.thread.take() {
            let _ = h.join();
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: the kernel can report write-protect faults.
fn linux_wp_bit() -> u64 {
    1 << 0
}

impl DirtyLog for UffdSync {
    type Error = Error;

    fn memory(&self) -> Vec<Range<u64>> {
        self.memory.clone()
    }

    fn page_size(&self) -> u64 {
        precopy_sys::page_size()
    }

    fn unvouched(&self) -> Vec<Range<u64>> {
        self.unvouched.clone()
    }

    fn method(&self) -> String {
        format!(
            "UFFDIO_REGISTER_MODE_WP without WP_ASYNC{}; handler thread un-protects each faulting page{}",
            if self.unpopulated {
                " (+ WP_UNPOPULATED)"
            } else {
                "; ranges populated with MADV_POPULATE_WRITE first"
            },
            if self.kernel_faults {
                ", kernel faults included"
            } else {
                "; UFFD_USER_MODE_ONLY: kernel writes need prepare_kernel_write"
            }
        )
    }

    fn kernel_writes(&self) -> KernelWrites {
        if self.kernel_faults {
            KernelWrites::Tracked
        } else {
            KernelWrites::NeedsPrepare
        }
    }

    /// With a user-mode-only fd: un-protects the pages and records them the way the handler
    /// does (inside the section a collection also holds), so the kernel's copy finds them writable and
    /// the next collection reports and protects them again. With kernel faults handled, only
    /// checks the range.
    fn prepare_kernel_write(&self, range: Range<u64>) -> Result<()> {
        let run = self.running.as_ref().ok_or(Error::NotStarted {
            backend: BackendKind::UffdSync,
        })?;
        let shared = &run.shared;
        let tracked: Vec<Range<u64>> = shared.ranges.iter().map(|t| t.range.clone()).collect();
        crate::check_inside(BackendKind::UffdSync, &tracked, &range)?;
        if self.kernel_faults {
            return Ok(());
        }
        let page = shared.page;
        let start = range.start & !(page - 1);
        let end = range.end.next_multiple_of(page);
        let fail = |source| Error::Range {
            backend: BackendKind::UffdSync,
            what: "un-protect for a kernel write",
            start,
            end,
            source,
        };
        let section = shared.section();
        loop {
            match track::unprotect_no_wake(shared.fd.as_fd(), start, end - start) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(fail(e)),
            }
        }
        for addr in (start..end).step_by(page as usize) {
            shared.record(addr);
        }
        drop(section);
        // A thread of ours may already wait on a fault there: let it go on.
        track::wake(shared.fd.as_fd(), start, end - start).map_err(fail)
    }

    fn start(&mut self) -> Result<()> {
        self.shutdown()?;
        self.unvouched = crate::unvouched_parts(std::process::id() as i32, &self.memory);
        let io_err = |what| {
            move |source| Error::Io {
                backend: BackendKind::UffdSync,
                what,
                source,
            }
        };
        let page = precopy_sys::page_size();
        let (fd, kernel_faults) = match self
            .want_kernel_faults
            .then(uffd::create_with_kernel_faults)
        {
            Some(Ok(fd)) => (fd, true),
            _ => (
                uffd::create().map_err(io_err("create a userfaultfd"))?,
                false,
            ),
        };
        self.kernel_faults = kernel_faults;
        let want = if self.unpopulated {
            abi::UFFD_FEATURE_WP_UNPOPULATED
        } else {
            0
        };
        uffd::api(fd.as_fd(), want).map_err(io_err("UFFDIO_API"))?;
        let mut tracked = Vec::with_capacity(self.memory.len());
        for r in self.memory.clone() {
            let len = r.end - r.start;
            let range_err = |what| {
                move |source| Error::Range {
                    backend: BackendKind::UffdSync,
                    what,
                    start: r.start,
                    end: r.end,
                    source,
                }
            };
            if !self.unpopulated {
                track::populate_write(r.start, len).map_err(range_err("populate"))?;
            }
            uffd::register(fd.as_fd(), r.start, len, abi::UFFDIO_REGISTER_MODE_WP)
                .map_err(range_err("register"))?;
            uffd::writeprotect(fd.as_fd(), r.start, len, true)
                .map_err(range_err("write-protect"))?;
            let words = (len / page).div_ceil(64);
            tracked.push(Tracked {
                range: r,
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        let shared = Arc::new(Shared {
            fd,
            ranges: tracked,
            page,
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            error: Mutex::new(None),
            section: Mutex::new(()),
        });
        let serve = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("uffd-sync-wp".into())
            .spawn(move || serve.serve())
            .map_err(io_err("spawn the fault-handler thread"))?;
        self.running = Some(Running {
            shared,
            thread: Some(thread),
        });
        Ok(())
    }

    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats> {
        let run = self.running.as_ref().ok_or(Error::NotStarted {
            backend: BackendKind::UffdSync,
        })?;
        let shared = &run.shared;
        if let Some(source) = shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(Error::Io {
                backend: BackendKind::UffdSync,
                what: "the fault-handler thread",
                source,
            });
        }
        let page = shared.page;
        let first = out.len();
        let mut calls = 0;
        // Take and close with no handler's open in between: see the module docs.
        let _section = shared.section();
        for t in &shared.ranges {
            let from = out.len();
            // Take the records first, re-protect second.
            for (i, w) in t.bits.iter().enumerate() {
                let mut bits = w.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let addr = t.range.start + (i as u64 * 64 + b) * page;
                    push_merged(out, from, addr..addr + page);
                }
            }
            let protect = |start: u64, end: u64| {
                uffd::writeprotect(shared.fd.as_fd(), start, end - start, true).map_err(|source| {
                    Error::Range {
                        backend: BackendKind::UffdSync,
                        what: "re-protect",
                        start,
                        end,
                        source,
                    }
                })
            };
            let closed = if out.len() - from > WHOLE_RANGE_ABOVE {
                calls += 1;
                protect(t.range.start, t.range.end)
            } else {
                out[from..].iter().try_for_each(|r| {
                    calls += 1;
                    protect(r.start, r.end)
                })
            };
            if let Err(e) = closed {
                // Every page taken goes back on record (some may be writable now): nothing is
                // appended, and the next collection reports them all.
                for r in out.drain(first..) {
                    for addr in (r.start..r.end).step_by(page as usize) {
                        shared.record(addr);
                    }
                }
                return Err(e);
            }
        }
        let mut stats = CollectStats::count(&out[first..], page);
        stats.syscalls = calls;
        Ok(stats)
    }

    fn stop(&mut self) -> Result<()> {
        self.shutdown()
    }
}

impl Drop for UffdSync {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
