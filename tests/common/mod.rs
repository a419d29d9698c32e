//! Helpers shared by the behaviour tests: set up tracked memory, run rounds, compare page sets.
#![allow(dead_code)]

use precopy::scanner::Error as ScanError;
use precopy::sys::abi::category;
use precopy::sys::mem::{Backing, Mapping, Thp};
use precopy::sys::pagemap::{self, EMPTY_REGION};
use precopy::{Round, ScanOptions, Scanner, Tracker, Uffd, UntrackedReason};
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;

pub const PAGE: u64 = 4096;
pub const HUGE: u64 = 2 << 20;

/// Prints a loud skip line (visible with `--nocapture`, and in the failure-free output of
/// `cargo test` as captured stderr only when it fails, so it also goes to the real stderr).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
}

/// A tracker over the whole of `mem`, armed.
pub fn track(mem: &Mapping) -> Tracker {
    let mut tracker = Tracker::new(Uffd::new().expect("create userfaultfd"));
    tracker.register(mem.range()).expect("register");
    tracker.arm().expect("arm");
    tracker
}

/// A scanner with default options (kernel self-test on).
pub fn scanner() -> Scanner {
    Scanner::new(ScanOptions::default()).expect("scanner")
}

/// A scanner with these options (self-test on).
pub fn scanner_with(opts: ScanOptions) -> Scanner {
    Scanner::new(opts).expect("scanner")
}

/// Anonymous private memory of `pages` base pages, no THP.
pub fn anon(pages: u64) -> Mapping {
    Mapping::new(Backing::AnonPrivate, pages * PAGE, 0, Thp::NoHuge).expect("map")
}

/// Writes one u64 into page `page` of `mem` (at a page-dependent offset).
pub fn touch(mem: &Mapping, page: u64, value: u64) {
    let off = page * PAGE + (page * 8 % PAGE);
    mem.write_u64(off, value).expect("write");
}

/// Page indices (relative to `base`) of every page in `ranges`.
pub fn page_indices(ranges: &[Range<u64>], base: u64) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
        .map(|a| (a - base) / PAGE)
        .collect()
}

/// Page indices of a round's dirty ranges.
pub fn dirty_pages(round: &Round, base: u64) -> Vec<u64> {
    page_indices(round.dirty(), base)
}

/// Checks the shape promised for `Round::dirty`: non-empty, page-aligned, half-open, sorted,
/// disjoint and coalesced (no two ranges touch).
pub fn assert_shape(round: &Round) {
    let d = round.dirty();
    for r in d {
        assert!(r.start < r.end, "empty or inverted range {r:x?}");
        assert_eq!(r.start % PAGE, 0, "unaligned start {r:x?}");
        assert_eq!(r.end % PAGE, 0, "unaligned end {r:x?}");
    }
    for w in d.windows(2) {
        assert!(
            w[0].end < w[1].start,
            "ranges not sorted, disjoint and coalesced: {:x?} then {:x?}",
            w[0],
            w[1]
        );
    }
    let pages: u64 = d.iter().map(|r| (r.end - r.start) / PAGE).sum();
    assert_eq!(
        round.stats().pages,
        pages,
        "stats.pages disagrees with dirty()"
    );
    assert_eq!(round.stats().regions, d.len() as u64);
    assert_eq!(round.pages().count() as u64, pages);
}

/// Runs rounds until one completes (a budget-limited scanner needs several), returning how many
/// times each page (index relative to `base`) was reported, and how many rounds it took.
/// Panics if the pass does not finish within `max_rounds` (a resume that loops forever).
pub fn full_pass(
    scanner: &mut Scanner,
    tracker: &Tracker,
    base: u64,
    max_rounds: usize,
) -> (BTreeMap<u64, u32>, usize) {
    let mut seen = BTreeMap::new();
    for n in 1..=max_rounds {
        let round = scanner.round(tracker).expect("round");
        assert_shape(round);
        assert!(
            round.untracked().is_empty(),
            "unexpected untracked parts {:x?}",
            round.untracked()
        );
        for p in dirty_pages(round, base) {
            *seen.entry(p).or_insert(0) += 1;
        }
        if round.complete() {
            return (seen, n);
        }
    }
    panic!("no complete pass within {max_rounds} rounds: the resume does not progress");
}

/// Whether the page at `addr` of this process is currently mapped by a huge page (THP or
/// hugetlb), as `PAGE_IS_HUGE` says.
pub fn is_huge(addr: u64) -> bool {
    page_has(addr, category::HUGE)
}

/// The selected THP mode (`always`, `madvise`, `never`), if the kernel has THP.
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = s.find('[')?;
    let end = s.find(']')?;
    Some(s[start + 1..end].to_string())
}

/// The untracked parts of a round, relative to `base`, in pages.
pub fn untracked_pages(round: &Round, base: u64) -> Vec<(Range<u64>, UntrackedReason)> {
    round
        .untracked()
        .iter()
        .map(|u| {
            (
                (u.range.start - base) / PAGE..(u.range.end - base) / PAGE,
                u.reason,
            )
        })
        .collect()
}

/// Whether an error chain came from the scanner refusing this kernel (then tests cannot run).
pub fn is_untrusted(e: &ScanError) -> bool {
    matches!(e, ScanError::Untrusted { .. })
}

/// Whether the page at `addr` of this process reads as written (not write-protected) right now,
/// asked without re-protecting it.
pub fn is_written(addr: u64) -> bool {
    page_has(addr, category::WRITTEN)
}

/// Whether the page at `addr` of this process has `category`, asked without re-protecting it.
fn page_has(addr: u64, category: u64) -> bool {
    let pm = File::open("/proc/self/pagemap").expect("open pagemap");
    let mut arg = pagemap::query_arg(addr, addr + PAGE, category);
    let mut out = [EMPTY_REGION; 1];
    pagemap::scan(pm.as_fd(), &mut arg, &mut out).expect("PAGEMAP_SCAN") > 0
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

pub fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// Puts `nr_hugepages` back when dropped, if this test changed it.
pub struct PoolGuard {
    old: Option<String>,
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.old
            && let Err(e) = std::fs::write(NR_HUGEPAGES, old)
        {
            eprintln!("could not restore {NR_HUGEPAGES} to {old}: {e}");
        }
    }
}

/// Makes sure `want` default-size huge pages are free, growing the pool as root (put back when
/// the guard drops); `None` (after a loud skip) if not.
pub fn reserve_pool(test: &str, want: u64) -> Option<PoolGuard> {
    if meminfo("Hugepagesize:").map(|kb| kb * 1024) != Some(HUGE) {
        skip(test, "no hugetlb, or its default page size is not 2 MiB");
        return None;
    }
    let mut guard = PoolGuard { old: None };
    let free = meminfo("HugePages_Free:").unwrap_or(0);
    if free < want {
        let Ok(old) = std::fs::read_to_string(NR_HUGEPAGES) else {
            skip(test, "cannot read /proc/sys/vm/nr_hugepages");
            return None;
        };
        let old = old.trim().to_string();
        let total: u64 = old.parse().unwrap_or(0);
        if let Err(e) = std::fs::write(NR_HUGEPAGES, (total + want - free).to_string()) {
            skip(
                test,
                &format!(
                    "hugetlb pool has {free} free pages and growing it failed ({e}); needs root"
                ),
            );
            return None;
        }
        guard.old = Some(old);
        let now = meminfo("HugePages_Free:").unwrap_or(0);
        if now < want {
            skip(
                test,
                &format!("the kernel gave only {now} free huge pages (memory fragmented?)"),
            );
            return None;
        }
    }
    Some(guard)
}

/// Forked children (tests are multi-threaded, so children only touch memory, pipes and sockets,
/// then `_exit`).
/// Reads exactly `buf.len()` bytes; false on EOF or error.
pub fn read_exact(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Writes all of `buf`; false on error.
pub fn write_all(fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> bool {
    let mut put = 0;
    while put < buf.len() {
        match nix::unistd::write(fd, &buf[put..]) {
            Ok(n) => put += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}

pub fn wait_ok(pid: nix::unistd::Pid) {
    match nix::sys::wait::waitpid(pid, None).expect("waitpid") {
        nix::sys::wait::WaitStatus::Exited(_, 0) => {}
        other => panic!("child ended badly: {other:?}"),
    }
}

/// Forks; runs `child` in the child and `_exit`s with its result (0 when it returns true).
pub fn spawn(child: impl FnOnce() -> bool) -> nix::unistd::Pid {
    // SAFETY: the child runs only `child`, which touches memory, pipes and sockets (no locks
    // held by other threads of this process, no unwinding into the harness), then `_exit`s.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(false);
            // SAFETY: `_exit` ends the child at once, running no atexit handlers or destructors
            // that belong to the parent's state.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    }
}
