//! Raw pieces of the two classic write-tracking methods that the engine is compared against:
//! `mprotect` + `SIGSEGV` ([`WriteFaultTracker`]) and synchronous userfaultfd write-protect
//! ([`read_wp_faults`], [`poll_readable`]), plus [`populate_write`].
//!
//! What this module owns: the process-wide `SIGSEGV` handler, the one tracked range it serves and
//! that range's atomic dirty bitmap. What it must never do: decide policy (which ranges, when to
//! collect) or interpret results; `precopy-backends` does that in safe Rust.
//!
//! # The SIGSEGV handler
//! The handler is async-signal-safe: it touches only atomics and makes only the `mprotect`,
//! `sigaction`, `write` and `abort` system calls; it never waits. Any fault that is not a
//! permission fault (`SEGV_ACCERR`) inside the tracked range is passed to the handler that was
//! installed before (Rust's own stack-overflow handler, a sanitizer's, or the default action).
//!
//! # Why no write is lost
//! The invariant: **outside a collection's window for a page (from taking its bit to
//! re-protecting it), a writable tracked page has its bit set.** Then a store at time `t` to a
//! page is either inside such a window (that collection reports the page and returns after `t`,
//! so contents copied after it returns include the store) or finds the bit set, so the first
//! collection to take that bit reports it: the one in progress at `t` or the first to begin
//! after. Never later, never in neither.
//!
//! The handler for page `P` does, in this order:
//! 1. *enter*: reads the phase `PHASE`, counts itself in `ACTIVE[phase % 2]`, re-reads `PHASE`
//!    and retries if it moved (so it is counted under the phase it read last);
//! 2. *mark*: sets `P`'s bit;
//! 3. *open*: `mprotect(P, READ|WRITE)`;
//! 4. *leave*: uncounts itself.
//!
//! [`WriteFaultTracker::open_for_kernel_write`] runs the same four steps from an ordinary thread
//! for pages a system call is about to write (the kernel's copy raises no signal), so everything
//! below holds for it as for a handler.
//!
//! A collection ([`WriteFaultTracker::collect`], and [`WriteFaultTracker::protect_all`] which
//! is a collection that discards what it takes), serialized with any other on the tracker:
//! 1. *take*: swaps each bitmap word with 0;
//! 2. *drain* (only if it took a bit): advances `PHASE` and waits, yielding, until
//!    `ACTIVE[old phase % 2]` is 0;
//! 3. *close*: `mprotect(READ)` on every page it took.
//!
//! Proof of the invariant. While tracking, only *open* makes a page writable and only *take*
//! clears a bit.
//! - A handler `H` opens `P` only after marking it. If no *take* clears that mark before `H`'s
//!   *open*, `P` becomes writable with its bit set.
//! - If collection `C` takes `H`'s mark (before or after `H`'s *open*), then `H`'s *enter*
//!   precedes `C`'s *take*, which precedes `C`'s phase advance (all `SeqCst`, and *take*
//!   acquires `H`'s *mark*). `H`'s final phase read therefore saw a phase that the first advance
//!   after it moves away from, and that advance's drain waits for `H`'s *leave*, so for its
//!   *open*. That advance is `C`'s, or an earlier collection's that finished before `C` began.
//!   Either way `H`'s *open* comes before `C`'s *close*, which write-protects `P` again. So a
//!   take never leaves a page writable once its window ends, whatever the interleaving: a
//!   handler preempted between *mark* and *open* only delays that collection's *close*.
//!
//! Both halves are needed. Marking after opening (the first version) left `P` writable with a
//! clear bit between the two steps: stores there were reported only when the preempted handler
//! ran again, possibly many collections later, or never if the process was paused for the final
//! round meanwhile. Marking first without the drain let a collection take the mark and close `P`
//! *before* a preempted handler opened it: writable, bit clear, nothing pending. Marking again
//! after opening does not close that hole either (the same preemption falls between *open* and
//! the second mark); with the drain a second mark would only add duplicate reports, so the
//! handler marks once.
//!
//! The cost is on the collector only: one extra phase advance and a wait for the handlers in
//! flight, which `collect` skips when it took nothing. Handlers entering after the advance are
//! counted under the other parity and never delay it, so a stream of faults cannot starve a
//! collection. A thread stopped inside the handler (ptrace) stalls collections until it resumes,
//! and a child forked while another thread was inside it inherits a count that never drops:
//! do not collect in such a child. The same drain lets `Drop` free the bitmap only after every
//! handler that could have loaded it has left. When a
//! *close* fails (`ENOMEM` at `vm.max_map_count`), the bits of every page taken are set again
//! before the error is returned, so the invariant holds and the next collection reports them.

use crate::abi;
use crate::cvt;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

// ---------------------------------------------------------------------------------------------
// mprotect + SIGSEGV
// ---------------------------------------------------------------------------------------------

/// The tracked range served by the handler: `[START, END)`; `END == 0` means none.
static START: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static PAGE_SHIFT: AtomicU64 = AtomicU64::new(12);
/// The dirty bitmap of the tracked range (one bit per page), or null.
static BITS: AtomicPtr<AtomicU64> = AtomicPtr::new(ptr::null_mut());
/// The drain phase: advanced by each drain (see the module docs).
static PHASE: AtomicUsize = AtomicUsize::new(0);
/// Handlers in flight, by the parity of the phase they entered under. A drain waits for the old
/// parity to reach 0: for the handlers that might have marked a bit it took, or loaded `BITS`
/// before the owner cleared it.
static ACTIVE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// The `sigaction` that was installed before ours (leaked once, read by the handler).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
/// Serializes installation and the claim of the single tracking slot.
static SLOT: Mutex<bool> = Mutex::new(false);

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Writes `msg` to stderr and aborts: the only way out when a tracked page cannot be made
/// writable again (the faulting write would otherwise loop forever).
fn die(msg: &[u8]) -> ! {
    // SAFETY: write(2) on fd 2 with a valid buffer; async-signal-safe.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: abort has no preconditions; async-signal-safe.
    unsafe { libc::abort() }
}

/// Passes a fault we do not own to the previous handler, or restores the default action so the
/// faulting instruction, re-executed on return, ends the process the way it would have.
///
/// # Safety
/// Called only from the SIGSEGV handler with the arguments the kernel passed to it.
unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.load(Ordering::Acquire);
    // SAFETY: PREVIOUS is null or points to a leaked, never-freed sigaction written before our
    // handler was installed.
    let prev = unsafe { prev.as_ref() };
    let Some(prev) = prev else {
        reset_default(sig);
        return;
    };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // A SIGSEGV from a fault cannot be ignored: re-faulting with the default action is what
        // would have happened without us.
        reset_default(sig);
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the installed value is a three-argument handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the installed value is a one-argument handler.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

fn reset_default(sig: libc::c_int) {
    // SAFETY: an all-zero sigaction is valid (no flags, empty mask); SIG_DFL is set below.
    let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    dfl.sa_sigaction = libc::SIG_DFL;
    // SAFETY: `dfl` is a valid sigaction; sigaction(2) is async-signal-safe.
    unsafe { libc::sigaction(sig, &dfl, ptr::null_mut()) };
}

/// `si_code` of a fault on a mapped page without the needed permission (asm-generic siginfo.h).
const SEGV_ACCERR: libc::c_int = 2;

/// Counts the calling handler in flight (step *enter* of the module docs); returns the parity
/// to pass to [`leave`].
fn enter() -> usize {
    loop {
        let phase = PHASE.load(Ordering::SeqCst);
        let parity = phase % 2;
        ACTIVE[parity].fetch_add(1, Ordering::SeqCst);
        if PHASE.load(Ordering::SeqCst) == phase {
            return parity;
        }
        // A drain advanced the phase meanwhile and may already have seen this parity at 0.
        ACTIVE[parity].fetch_sub(1, Ordering::SeqCst);
    }
}

fn leave(parity: usize) {
    ACTIVE[parity].fetch_sub(1, Ordering::SeqCst);
}

/// Advances the phase and waits until every handler counted under the old one has left (step
/// *drain* of the module docs). Callers serialize drains with one another.
fn drain() {
    let parity = PHASE.fetch_add(1, Ordering::SeqCst) % 2;
    while ACTIVE[parity].load(Ordering::SeqCst) != 0 {
        // The handler may be preempted on the core we would spin on.
        std::thread::yield_now();
    }
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // Counted before loading BITS or marking: see the module docs.
    let parity = enter();
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let info_ref = unsafe { &*info };
    let code = info_ref.si_code;
    // SAFETY: si_addr is the meaningful union member for SIGSEGV.
    let addr = unsafe { info_ref.si_addr() } as u64;
    let start = START.load(Ordering::Acquire);
    let end = END.load(Ordering::Acquire);
    let bits = BITS.load(Ordering::SeqCst);
    if code == SEGV_ACCERR && !bits.is_null() && start <= addr && addr < end {
        let shift = PAGE_SHIFT.load(Ordering::Relaxed);
        let index = (addr - start) >> shift;
        let page = start + (index << shift);
        // Recorded first, writable second: see the module docs on races with `collect`.
        // SAFETY: `bits` stays allocated while this handler is counted in ACTIVE (the owner
        // drains before freeing it), and `index` is below the range's page count, the bitmap's
        // length in bits.
        let word_ptr = unsafe { bits.add((index / 64) as usize) };
        // SAFETY: `word_ptr` points to a live, initialized AtomicU64 of the bitmap (see above).
        let word = unsafe { &*word_ptr };
        word.fetch_or(1 << (index % 64), Ordering::SeqCst);
        // SAFETY: the page lies in the tracked range, which `WriteFaultTracker::new` checked is
        // a read-write, non-executable mapping; restoring read-write changes no contents.
        let ret = unsafe {
            libc::mprotect(
                page as *mut libc::c_void,
                1 << shift,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if ret != 0 {
            die(b"precopy: mprotect in the SIGSEGV write tracker failed (vm.max_map_count?)\n");
        }
        leave(parity);
        return;
    }
    leave(parity);
    // SAFETY: forwarding the kernel's own arguments from inside the handler.
    unsafe { chain(sig, info, ctx) };
}

fn install_handler() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; every field we rely on is set below.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_segv as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: `new.sa_mask` is a valid sigset_t to initialize.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    let old = Box::into_raw(Box::new(new));
    // SAFETY: `new` is valid and `old` points to writable storage for the previous action.
    let ret = unsafe { libc::sigaction(libc::SIGSEGV, &new, old) };
    if ret != 0 {
        let err = io::Error::last_os_error();
        // SAFETY: `old` came from Box::into_raw above and was not published.
        drop(unsafe { Box::from_raw(old) });
        return Err(err);
    }
    PREVIOUS.store(old, Ordering::Release);
    Ok(())
}

/// Whether every byte of `range` is mapped readable and writable and not executable, per
/// `/proc/self/maps`.
fn mapped_rw(range: &Range<u64>) -> io::Result<bool> {
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut cursor = range.start;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(span), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((a, b)) = span.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if b <= cursor {
            continue;
        }
        // The lines are sorted: a mapping starting above the cursor leaves a hole at it.
        let p = perms.as_bytes();
        if a > cursor || p.len() < 3 || p[0] != b'r' || p[1] != b'w' || p[2] == b'x' {
            return Ok(false);
        }
        cursor = b;
        if cursor >= range.end {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `mprotect` + `SIGSEGV` write tracking of one range of the calling process.
///
/// Only one exists per process at a time (the signal handler serves a single range). The range
/// must stay mapped while tracked; on drop it is made read-write again. While protected, system
/// calls that write into the range (e.g. `read(2)`) fail with `EFAULT` instead of faulting (the
/// kernel's copy raises no signal): this method only sees user-space stores, and a caller about
/// to make such a call opens the pages first with [`WriteFaultTracker::open_for_kernel_write`]. Stores racing [`collect`] are never lost (see the module
/// docs); `collect` may wait for a handler that another thread is running.
///
/// [`collect`]: WriteFaultTracker::collect
#[derive(Debug)]
pub struct WriteFaultTracker {
    range: Range<u64>,
    shift: u32,
    bits: Box<[AtomicU64]>,
    /// Serializes collections (and so drains) on this tracker.
    collecting: Mutex<()>,
}

impl WriteFaultTracker {
    /// Claims the process's tracking slot for `range` (page-aligned, mapped read-write and not
    /// executable) and installs the handler on first use. Nothing is protected yet: call
    /// [`WriteFaultTracker::protect_all`].
    pub fn new(range: Range<u64>) -> io::Result<WriteFaultTracker> {
        let page = crate::page_size();
        if range.start >= range.end
            || !range.start.is_multiple_of(page)
            || !range.end.is_multiple_of(page)
        {
            return Err(invalid("range must be non-empty and page-aligned"));
        }
        if !mapped_rw(&range)? {
            return Err(invalid(
                "range must be fully mapped read-write and not executable",
            ));
        }
        let mut claimed = SLOT.lock().unwrap_or_else(|e| e.into_inner());
        if !BITS.load(Ordering::Acquire).is_null() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "another mprotect write tracker is active in this process",
            ));
        }
        if !*claimed {
            install_handler()?;
            *claimed = true;
        }
        let pages = (range.end - range.start) / page;
        let bits: Box<[AtomicU64]> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let shift = page.trailing_zeros();
        PAGE_SHIFT.store(shift as u64, Ordering::Relaxed);
        START.store(range.start, Ordering::Release);
        END.store(range.end, Ordering::Release);
        BITS.store(bits.as_ptr() as *mut AtomicU64, Ordering::SeqCst);
        Ok(WriteFaultTracker {
            range,
            shift,
            bits,
            collecting: Mutex::new(()),
        })
    }

    /// The tracked range.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    fn protect(&self, start: u64, len: u64, prot: libc::c_int) -> io::Result<()> {
        debug_assert!(start >= self.range.start && start + len <= self.range.end);
        // SAFETY: `start..start+len` lies in the tracked range, checked at construction to be
        // a read-write, non-executable mapping. Dropping write permission cannot invalidate
        // memory safety: a store then faults and our handler makes the page writable again.
        cvt(unsafe { libc::mprotect(start as *mut libc::c_void, len as usize, prot) })?;
        Ok(())
    }

    /// Sets the bits of every page in `runs` again: after a failed *close*, so that no page is
    /// left writable with its bit clear (see the module docs).
    fn mark_again(&self, runs: &[Range<u64>]) {
        let page = 1u64 << self.shift;
        for r in runs {
            for addr in (r.start..r.end).step_by(page as usize) {
                let index = (addr - self.range.start) >> self.shift;
                self.bits[(index / 64) as usize].fetch_or(1 << (index % 64), Ordering::SeqCst);
            }
        }
    }

    /// Clears the bitmap and write-protects the whole range: the next [`collect`] reports only
    /// pages stored to from now on.
    ///
    /// [`collect`]: WriteFaultTracker::collect
    pub fn protect_all(&self) -> io::Result<()> {
        let _serial = self.collecting.lock().unwrap_or_else(|e| e.into_inner());
        // Take, drain, close: a collection whose result is discarded.
        for w in self.bits.iter() {
            w.swap(0, Ordering::SeqCst);
        }
        drain();
        let whole = self.range.clone();
        let ret = self.protect(whole.start, whole.end - whole.start, libc::PROT_READ);
        if ret.is_err() {
            self.mark_again(std::slice::from_ref(&whole));
        }
        ret
    }

    /// Appends the runs of pages stored to since the last collection (coalesced, in order) to
    /// `out`, write-protecting each again. Returns the number of `mprotect` calls made. Contents
    /// read after it returns include every store to a reported page made before it returned.
    ///
    /// On error nothing is appended and every page taken stays marked for the next collection.
    pub fn collect(&self, out: &mut Vec<Range<u64>>) -> io::Result<u64> {
        let _serial = self.collecting.lock().unwrap_or_else(|e| e.into_inner());
        let page = 1u64 << self.shift;
        let first = out.len();
        // Take.
        for (i, w) in self.bits.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let addr = self.range.start + (i as u64 * 64 + b) * page;
                let extends = out.len() > first && out.last().is_some_and(|l| l.end == addr);
                match out.last_mut() {
                    Some(last) if extends => last.end += page,
                    _ => out.push(addr..addr + page),
                }
            }
        }
        if out.len() == first {
            // Nothing taken, nothing to close: no handler's mark was cleared.
            return Ok(0);
        }
        // Drain: a handler that marked a page taken above has opened it before this returns.
        drain();
        // Close.
        let mut calls = 0;
        for r in &out[first..] {
            if let Err(e) = self.protect(r.start, r.end - r.start, libc::PROT_READ) {
                self.mark_again(&out[first..]);
                out.truncate(first);
                return Err(e);
            }
            calls += 1;
        }
        Ok(calls)
    }
}

impl WriteFaultTracker {
    /// Does for the pages `range` touches what the handler does for a faulting store (mark,
    /// then make writable, counted in flight like a handler, so the module docs' proof covers
    /// it): for a system call about to write into them. The kernel's own copy into a
    /// write-protected page (`read(2)`, `recv`, `pread`) raises no `SIGSEGV` and fails with
    /// `EFAULT`; after this it succeeds, and the next collection reports the pages and
    /// protects them again. Call it before every such system call, from any thread.
    ///
    /// `range` must be non-empty and inside the tracked range (it is widened to whole pages);
    /// `InvalidInput` otherwise. If `mprotect` fails the pages stay marked (reported, never
    /// lost) and protected.
    pub fn open_for_kernel_write(&self, range: Range<u64>) -> io::Result<()> {
        if range.start >= range.end || range.start < self.range.start || range.end > self.range.end
        {
            return Err(invalid(
                "range must be non-empty and inside the tracked range",
            ));
        }
        let page = 1u64 << self.shift;
        let start = range.start & !(page - 1);
        let end = range.end.next_multiple_of(page);
        let parity = enter();
        self.mark_again(std::slice::from_ref(&(start..end)));
        let ret = self.protect(start, end - start, libc::PROT_READ | libc::PROT_WRITE);
        leave(parity);
        ret
    }
}

impl Drop for WriteFaultTracker {
    fn drop(&mut self) {
        let _ = self.protect(
            self.range.start,
            self.range.end - self.range.start,
            libc::PROT_READ | libc::PROT_WRITE,
        );
        let _guard = SLOT.lock().unwrap_or_else(|e| e.into_inner());
        END.store(0, Ordering::Release);
        BITS.store(ptr::null_mut(), Ordering::SeqCst);
        // A handler that loaded the old pointer was counted in ACTIVE before loading it, so
        // before this store and the drain's phase advance: the drain waits for it to leave
        // before the bitmap is freed with `self`.
        drain();
    }
}

// ---------------------------------------------------------------------------------------------
// Synchronous userfaultfd write-protect
// ---------------------------------------------------------------------------------------------

const MSG_SIZE: usize = core::mem::size_of::<linux_raw_sys::general::uffd_msg>();
const _: () = assert!(MSG_SIZE == 32);
const EVENT_PAGEFAULT: u8 = linux_raw_sys::general::UFFD_EVENT_PAGEFAULT as u8;
const PAGEFAULT_FLAG_WP: u64 = linux_raw_sys::general::UFFD_PAGEFAULT_FLAG_WP as u64;
const _: () = assert!(EVENT_PAGEFAULT == 0x12);
const _: () = assert!(abi::UFFDIO_WRITEPROTECT_MODE_WP == 1);

/// Reads the pending messages of a non-blocking userfaultfd and appends the address of each
/// write-protect fault to `out`. Returns the number of messages read (0 when none was pending).
/// Other events (none are enabled by the callers of this module) are read and dropped.
pub fn read_wp_faults(fd: BorrowedFd<'_>, out: &mut Vec<u64>) -> io::Result<usize> {
    let mut buf = [0u8; MSG_SIZE * 64];
    // SAFETY: `buf` is writable for its whole length for the duration of the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(err),
        };
    }
    let msgs = n as usize / MSG_SIZE;
    for m in buf[..msgs * MSG_SIZE].chunks_exact(MSG_SIZE) {
        // struct uffd_msg (packed): event u8 at 0; pagefault.flags u64 at 8, .address at 16.
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        if m[0] == EVENT_PAGEFAULT && word(8) & PAGEFAULT_FLAG_WP != 0 {
            out.push(word(16));
        }
    }
    Ok(msgs)
}

/// `UFFDIO_WAKE` = `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u32 = linux_raw_sys::ioctl::UFFDIO_WAKE;
/// `UFFDIO_WRITEPROTECT` mode bit: do not wake the threads waiting on the range.
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);

/// Removes write protection from `[start, start + len)` **without** waking the threads that
/// faulted on it, so the caller can record the fault before the writer goes on; then call
/// [`wake`].
pub fn unprotect_no_wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = abi::UffdioWriteprotect {
        range: abi::UffdioRange { start, len },
        mode: UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    };
    // SAFETY: `arg` is a valid uffdio_writeprotect for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), abi::UFFDIO_WRITEPROTECT as _, &mut arg) })?;
    Ok(())
}

/// Wakes the threads waiting on a userfaultfd fault in `[start, start + len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut arg = abi::UffdioRange { start, len };
    // SAFETY: `arg` is a valid uffdio_range for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &mut arg) })?;
    Ok(())
}

/// Waits up to `timeout_ms` for `fd` to become readable; returns whether it is.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(ret > 0 && pfd.revents & libc::POLLIN != 0)
}

/// `MADV_POPULATE_WRITE` (Linux 5.14+) on a page-aligned range of the calling process: every page
/// gets a writable page-table entry, contents unchanged. Synchronous write-protect on kernels
/// without `UFFD_FEATURE_WP_UNPOPULATED` cannot protect a page that is not populated.
pub fn populate_write(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: MADV_POPULATE_WRITE only faults pages in (breaking copy-on-write where needed)
    // and never changes what the memory reads as; the kernel rejects unmapped or read-only
    // ranges with an error.
    cvt(unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::Mapping;

    /// The tracker is one per process: tests that create one take turns.
    static TURN: Mutex<()> = Mutex::new(());

    #[test]
    fn segv_tracker_records_stores_and_restores_on_drop() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let page = crate::page_size();
        let mem = Mapping::anonymous(8 * page).unwrap();
        mem.fill(0, 8 * page, 7).unwrap();
        let t = WriteFaultTracker::new(mem.range()).unwrap();
        assert!(
            WriteFaultTracker::new(mem.range()).is_err(),
            "one slot only"
        );
        t.protect_all().unwrap();
        let mut out = Vec::new();
        t.collect(&mut out).unwrap();
        assert!(out.is_empty());
        mem.write_u64(2 * page, 1).unwrap();
        mem.write_u64(3 * page + 8, 1).unwrap();
        mem.write_u64(6 * page, 1).unwrap();
        assert_eq!(mem.read_u64(5 * page).unwrap(), 0x0707_0707_0707_0707);
        t.collect(&mut out).unwrap();
        let b = mem.addr();
        assert_eq!(
            out,
            vec![b + 2 * page..b + 4 * page, b + 6 * page..b + 7 * page]
        );
        out.clear();
        t.collect(&mut out).unwrap();
        assert!(out.is_empty(), "collection resets");
        mem.write_u64(6 * page, 2).unwrap();
        t.collect(&mut out).unwrap();
        assert_eq!(out, vec![b + 6 * page..b + 7 * page]);
        drop(t);
        mem.write_u64(0, 3).unwrap();
        assert_eq!(mem.read_u64(0).unwrap(), 3);
    }

    #[test]
    fn segv_tracker_refuses_unmapped_or_readonly() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let page = crate::page_size();
        let mem = Mapping::anonymous(4 * page).unwrap();
        mem.protect(0, page, crate::mem::Protection::Read).unwrap();
        assert!(WriteFaultTracker::new(mem.range()).is_err());
        // Inaccessible rather than unmapped: an unmapped hole can be taken by another test
        // thread's new mapping (a stack, a buffer) before the check, and then it is mapped
        // read-write (seen in CI). `mapped_rw` refuses both the same way.
        mem.protect(0, page, crate::mem::Protection::None).unwrap();
        assert!(WriteFaultTracker::new(mem.addr()..mem.addr() + 2 * page).is_err());
        assert!(WriteFaultTracker::new(mem.addr() + page..mem.addr() + 3 * page).is_ok());
    }

    /// More writers than cores, so that handlers are preempted between their steps while a
    /// collection runs. A store is reported by the collection in progress when it began or the
    /// first one to begin after it ended: the guarantee of the module docs.
    #[test]
    fn segv_tracker_loses_no_store_racing_collections() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let page = crate::page_size();
        let n = 64u64;
        let mem = Arc::new(Mapping::anonymous(n * page).unwrap());
        mem.fill(0, n * page, 1).unwrap();
        let t = WriteFaultTracker::new(mem.range()).unwrap();
        t.protect_all().unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let stores = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..6u64)
            .map(|w| {
                let (mem, epoch) = (Arc::clone(&mem), Arc::clone(&epoch));
                let (done, stores) = (Arc::clone(&done), Arc::clone(&stores));
                std::thread::spawn(move || {
                    let mut seed = 0x9E37_79B9 + w;
                    let mut log = Vec::new();
                    let (mut seen_epoch, mut burst) = (0, 0);
                    while !done.load(Ordering::SeqCst) {
                        // At most 8 stores per collection, so that the log stays small.
                        let now = epoch.load(Ordering::SeqCst);
                        if now != seen_epoch {
                            (seen_epoch, burst) = (now, 0);
                        }
                        if burst == 8 {
                            std::thread::yield_now();
                            continue;
                        }
                        burst += 1;
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let p = seed % n;
                        let before = epoch.load(Ordering::SeqCst);
                        mem.write_u64(p * page + 8 * w, seed).unwrap();
                        log.push((p, before, epoch.load(Ordering::SeqCst)));
                        stores.fetch_add(1, Ordering::Relaxed);
                    }
                    log
                })
            })
            .collect();
        let base = mem.addr();
        let mut reports: Vec<Vec<bool>> = vec![vec![false; n as usize]];
        let mut out = Vec::new();
        // Writers store throughout 5000 collections, at least 16 stores apart, then two more
        // begin after they all ended.
        let mut finishing = 0;
        let mut paced = 0;
        while finishing < 2 {
            while finishing == 0 && stores.load(Ordering::Relaxed) < paced + 16 {
                std::thread::yield_now();
            }
            paced = stores.load(Ordering::Relaxed);
            if reports.len() > 5000 {
                done.store(true, Ordering::SeqCst);
                while !writers.iter().all(|w| w.is_finished()) {
                    std::thread::yield_now();
                }
                finishing += 1;
            }
            epoch.fetch_add(1, Ordering::SeqCst);
            out.clear();
            t.collect(&mut out).unwrap();
            let mut seen = vec![false; n as usize];
            for r in &out {
                for a in (r.start..r.end).step_by(page as usize) {
                    seen[((a - base) / page) as usize] = true;
                }
            }
            reports.push(seen);
        }
        let logs: Vec<(u64, u64, u64)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let reported: usize = reports
            .iter()
            .map(|r| r.iter().filter(|s| **s).count())
            .sum();
        eprintln!(
            "{} racing stores, {} collections, {reported} pages reported",
            logs.len(),
            reports.len() - 1
        );
        let lost: Vec<_> = logs
            .iter()
            .filter(|(p, before, after)| {
                !(*before as usize..=*after as usize + 1).any(|k| reports[k][*p as usize])
            })
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {} stores lost, first: page {} between collections {} and {}",
            lost.len(),
            logs.len(),
            lost[0].0,
            lost[0].1,
            lost[0].2 + 1
        );
    }
}
