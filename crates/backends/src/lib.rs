//! The dirty log: one trait, [`DirtyLog`] (start, collect, stop), for every way of finding the
//! pages written since the last collection, and the comparison trackers that implement it beside
//! the engine, so they can be compared on the same memory in the same run (`precopy bench`) and
//! so a migration can run on kernels that lack the engine's mechanism (soft-dirty before 6.7).
//! `precopy-migrate`'s driver takes any [`DirtyLog`]: the engine's own (`UffdDirtyLog`), one of
//! these, a process's (`TargetLog`) or a VMM's (KVM's log).
//!
//! | [`BackendKind`] | mechanism | collect-and-reset | first write after reset | `read(2)` into tracked memory |
//! |---|---|---|---|---|
//! | `uffd-async` | userfaultfd async write-protect + `PAGEMAP_SCAN` (the engine's own, 6.7+) | one atomic scan-and-reprotect ioctl per chunk | a fault resolved in the kernel | works, reported |
//! | `soft-dirty` | `/proc/PID/clear_refs` "4" + pagemap bit 55 (or `PAGEMAP_SCAN` with `PAGE_IS_SOFT_DIRTY`) | read every entry, then clear the whole process | a minor fault in the kernel | works, reported |
//! | `mprotect` | `mprotect(PROT_READ)` + a `SIGSEGV` handler | re-protect each written run | a signal delivered to user space | `EFAULT` unless prepared |
//! | `uffd-sync` | userfaultfd synchronous write-protect, a handler thread (pre-6.7) | re-protect each written run | a round trip to the handler thread | works, reported, where the process may create a uffd that handles kernel faults (root, `vm.unprivileged_userfaultfd = 1`, `/dev/userfaultfd`); else `EFAULT` unless prepared |
//!
//! The last column is [`KernelWrites`]: when the kernel writes into tracked memory on the
//! process's behalf (`read(2)`, `recv`, `pread` into a buffer there), its copy faults inside the
//! kernel. The first two mechanisms resolve that fault in the kernel. An `mprotect`ed page
//! makes the copy fail with `EFAULT` and no `SIGSEGV` is sent, so no handler can help; a
//! userfaultfd created with `UFFD_USER_MODE_ONLY` (all an unprivileged process may create) does
//! not queue kernel faults for its reader, with the same result. There the caller opens the
//! range first with [`DirtyLog::prepare_kernel_write`], which marks it written; `precopy bench`
//! prints which backends need it.
//!
//! Every backend reports a write in the collection after it, or (when the write races the
//! collection) the one after that; none may ever miss one. `soft-dirty` has no atomic
//! get-and-clear: writes between its read and its clear are lost, so its writers must be paused
//! around [`DirtyLog::collect`] ([`DirtyLog::needs_pause`]), as CRIU freezes its target for every
//! pre-dump; the migration driver does that and reports what each pause cost.
//!
//! A backend that cannot prove it works is refused with an [`Unavailable`] reason, never used:
//! [`available`] runs each one's self-test (cached per process), and [`choose_default`] picks the
//! engine's backend where it passes, else soft-dirty, and says why.
//!
//! This crate never touches page contents and holds no `unsafe`: the raw pieces (signal handler,
//! uffd message reads) live in `precopy_sys::track`.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]

mod error;
mod mprotect;
mod soft_dirty;
mod uffd_async;
mod uffd_sync;

pub use error::{Error, Unavailable};
pub use mprotect::Mprotect;
pub use soft_dirty::SoftDirty;
pub use uffd_async::UffdAsync;
pub use uffd_sync::UffdSync;

use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_sys::ranges::push_merged;
use serde::Serialize;
use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The dirty-tracking mechanisms this crate offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// userfaultfd async write-protect + `PAGEMAP_SCAN`: the engine's own (Linux 6.7+).
    UffdAsync,
    /// Soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`): the baseline, and the fallback before 6.7.
    SoftDirty,
    /// `mprotect` + `SIGSEGV`: the classic user-space method, own process only.
    Mprotect,
    /// userfaultfd synchronous write-protect with a fault-handler thread (5.7+).
    UffdSync,
}

impl BackendKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::UffdAsync,
        BackendKind::SoftDirty,
        BackendKind::Mprotect,
        BackendKind::UffdSync,
    ];

    /// The short name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::UffdAsync => "uffd-async",
            BackendKind::SoftDirty => "soft-dirty",
            BackendKind::Mprotect => "mprotect",
            BackendKind::UffdSync => "uffd-sync",
        }
    }

    /// The kind called `name` (as [`BackendKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<BackendKind> {
        BackendKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// One line on the mechanism.
    pub fn mechanism(self) -> &'static str {
        match self {
            BackendKind::UffdAsync => "userfaultfd async write-protect + PAGEMAP_SCAN (Linux 6.7+)",
            BackendKind::SoftDirty => "clear_refs \"4\" + soft-dirty bit (CONFIG_MEM_SOFT_DIRTY)",
            BackendKind::Mprotect => "mprotect(PROT_READ) + SIGSEGV handler",
            BackendKind::UffdSync => "userfaultfd synchronous write-protect + handler thread",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one [`DirtyLog::collect`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CollectStats {
    /// Base pages reported written.
    pub pages: u64,
    /// Coalesced runs reported.
    pub regions: u64,
    /// System calls made (ioctls, preads, mprotects, writes to `clear_refs`).
    pub syscalls: u64,
}

impl CollectStats {
    /// Pages and runs of `out` (`page`-byte pages), no system calls counted.
    pub fn count(out: &[Range<u64>], page: u64) -> CollectStats {
        CollectStats {
            pages: out.iter().map(|r| (r.end - r.start) / page).sum(),
            regions: out.len() as u64,
            syscalls: 0,
        }
    }
}

/// What happens when the kernel itself writes into tracked memory on the process's behalf: the
/// copy of `read(2)`, `recv`, `pread`, `io_uring` reads into a buffer in the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelWrites {
    /// The system call succeeds and the pages are reported like any store.
    Tracked,
    /// The system call fails with `EFAULT` on a page protected since the last collection,
    /// unless [`DirtyLog::prepare_kernel_write`] opened the range first. The mechanism cannot
    /// take a fault raised inside the kernel's copy: `mprotect`'s `SIGSEGV` is never sent for
    /// it, and a userfaultfd created with `UFFD_USER_MODE_ONLY` (all an unprivileged process
    /// may create) does not hand kernel faults to its reader.
    NeedsPrepare,
}

impl KernelWrites {
    /// One line for reports.
    pub fn describe(self) -> &'static str {
        match self {
            KernelWrites::Tracked => "read(2) into tracked memory works and is reported",
            KernelWrites::NeedsPrepare => {
                "read(2) into tracked memory fails with EFAULT unless the range is prepared first \
                 (prepare_kernel_write): the kernel's copy cannot take this mechanism's fault"
            }
        }
    }
}

/// Which memory is tracked and which of it was written: the seam between finding pages and
/// sending them (Cloud Hypervisor's `Migratable`: start dirty log, get it, stop it).
///
/// The life cycle is [`start`](DirtyLog::start) (from here every write shows up; the first
/// collection reports only what is written afterwards), any number of
/// [`collect`](DirtyLog::collect)s, then [`stop`](DirtyLog::stop) (also done on drop). Read
/// reported pages' contents only after `collect` returns: a write that races a collection is
/// reported by it or by the next one, never by neither.
pub trait DirtyLog {
    /// What a failure says (each implementation's own typed error).
    type Error: std::error::Error + Send + Sync + 'static;

    /// All tracked memory: page-aligned, sorted, disjoint address ranges. A migration's round 0
    /// sends it.
    fn memory(&self) -> Vec<Range<u64>>;
    /// Bytes per page (the unit of what `collect` reports).
    fn page_size(&self) -> u64;
    /// Starts logging from a clean state.
    fn start(&mut self) -> Result<(), Self::Error>;
    /// Appends every range written since the previous collection (or since `start`) to `out`
    /// and resets it to clean.
    fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, Self::Error>;
    /// Stops logging and releases what `start` set up. Harmless when not started.
    fn stop(&mut self) -> Result<(), Self::Error>;
    /// The part of [`DirtyLog::memory`] whose changes this log may miss (shared memory written
    /// through another mapping or process, a hole punched in a memfd, hugetlb `MADV_DONTNEED`,
    /// DMA): a migration re-checks it with the workload paused before it declares the copy
    /// complete. No default: a log that wraps another must forward it, or the re-check is
    /// silently skipped for the memory it wraps.
    fn unvouched(&self) -> Vec<Range<u64>>;
    /// Whether writers must be paused around [`DirtyLog::collect`] for it to miss nothing
    /// (soft-dirty: its read and its clear are two steps). The default: no.
    fn needs_pause(&self) -> bool {
        false
    }
    /// How it works on this kernel, for reports (e.g. which interface reads soft-dirty bits).
    fn method(&self) -> String {
        String::new()
    }
    /// Whether system calls that write into tracked memory on the process's behalf work as
    /// they are, or need [`DirtyLog::prepare_kernel_write`] first (see [`KernelWrites`]). The
    /// default: they work and are reported.
    fn kernel_writes(&self) -> KernelWrites {
        KernelWrites::Tracked
    }
    /// Makes the pages of `range` (inside tracked memory) writable by the kernel for a system
    /// call about to write into them, reporting them as written in the next collection. Call
    /// it right before each such call; a collection in between protects them again. The
    /// comparison backends check the range even where [`DirtyLog::kernel_writes`] is
    /// [`KernelWrites::Tracked`] ([`Error::InvalidRange`] when empty or inverted,
    /// [`Error::OutsideTracked`], [`Error::NotStarted`]). The default does nothing: right for
    /// a log whose kernel writes are [`KernelWrites::Tracked`]; one that says
    /// [`KernelWrites::NeedsPrepare`] must implement it.
    fn prepare_kernel_write(&self, range: Range<u64>) -> Result<(), Self::Error> {
        let _ = range;
        Ok(())
    }
}

/// Checks that `range` is non-empty and inside one of `tracked`, for
/// [`DirtyLog::prepare_kernel_write`].
pub(crate) fn check_inside(
    backend: BackendKind,
    tracked: &[Range<u64>],
    range: &Range<u64>,
) -> Result<()> {
    if range.start >= range.end {
        return Err(Error::InvalidRange {
            backend,
            start: range.start,
            end: range.end,
        });
    }
    if !tracked
        .iter()
        .any(|t| t.start <= range.start && range.end <= t.end)
    {
        return Err(Error::OutsideTracked {
            backend,
            start: range.start,
            end: range.end,
        });
    }
    Ok(())
}

macro_rules! forward_dirty_log {
    ($($t:ty),*) => {$(
        impl<T: DirtyLog + ?Sized> DirtyLog for $t {
            type Error = T::Error;
            fn memory(&self) -> Vec<Range<u64>> {
                (**self).memory()
            }
            fn page_size(&self) -> u64 {
                (**self).page_size()
            }
            fn start(&mut self) -> Result<(), Self::Error> {
                (**self).start()
            }
            fn collect(&mut self, out: &mut Vec<Range<u64>>) -> Result<CollectStats, Self::Error> {
                (**self).collect(out)
            }
            fn stop(&mut self) -> Result<(), Self::Error> {
                (**self).stop()
            }
            fn unvouched(&self) -> Vec<Range<u64>> {
                (**self).unvouched()
            }
            fn needs_pause(&self) -> bool {
                (**self).needs_pause()
            }
            fn method(&self) -> String {
                (**self).method()
            }
            fn kernel_writes(&self) -> KernelWrites {
                (**self).kernel_writes()
            }
            fn prepare_kernel_write(&self, range: Range<u64>) -> Result<(), Self::Error> {
                (**self).prepare_kernel_write(range)
            }
        }
    )*};
}

forward_dirty_log!(&mut T, Box<T>);

/// A comparison backend, not started, as [`open`] and [`choose_default`] hand it out.
pub type BoxedDirtyLog = Box<dyn DirtyLog<Error = Error> + Send>;

/// The parts of `ranges` (sorted) in process `pid` whose changes a page-table dirty bit may
/// miss: everything but private anonymous memory (heap, stacks, anonymous mappings), and
/// anything no longer mapped. From `/proc/PID/maps`; if it cannot be read, all of `ranges`.
pub(crate) fn unvouched_parts(pid: i32, ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    use precopy_tracker::target::{MappingKind, target_mappings};
    let Ok(maps) = target_mappings(pid) else {
        return ranges.to_vec();
    };
    let vouched = |m: &precopy_tracker::target::TargetMapping| {
        matches!(
            m.class,
            Ok(MappingKind::Anonymous | MappingKind::Heap | MappingKind::Stack)
        ) && (m.name.is_empty() || m.name.starts_with("[heap]") || m.name.starts_with("[stack"))
    };
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        let mut at = r.start;
        for m in maps
            .iter()
            .filter(|m| m.range.end > r.start && m.range.start < r.end)
        {
            let (s, e) = (m.range.start.max(r.start), m.range.end.min(r.end));
            if at < s {
                push_merged(&mut out, 0, at..s);
            }
            if !vouched(m) {
                push_merged(&mut out, 0, s..e);
            }
            at = e;
        }
        if at < r.end {
            push_merged(&mut out, 0, at..r.end);
        }
    }
    out
}

/// Checks that `ranges` are non-empty, `page`-aligned and disjoint, and sorts them.
pub(crate) fn sorted_ranges(
    kind: BackendKind,
    ranges: &[Range<u64>],
    page: u64,
) -> Result<Vec<Range<u64>>> {
    let mut v = ranges.to_vec();
    if let Some(r) = v
        .iter()
        .find(|r| r.start >= r.end || r.start % page != 0 || r.end % page != 0)
    {
        return Err(Error::InvalidRange {
            backend: kind,
            start: r.start,
            end: r.end,
        });
    }
    v.sort_by_key(|r| r.start);
    if v.windows(2).any(|w| w[0].end > w[1].start) {
        return Err(Error::Unsupported {
            backend: kind,
            what: "ranges must not overlap",
        });
    }
    Ok(v)
}

/// Builds a backend of `kind` over `ranges` of this process after its prerequisite check,
/// without the behavioural self-test.
fn build(kind: BackendKind, ranges: &[Range<u64>]) -> Result<BoxedDirtyLog> {
    Ok(match kind {
        BackendKind::UffdAsync => Box::new(UffdAsync::new(ranges)?),
        BackendKind::SoftDirty => Box::new(SoftDirty::new(ranges)?),
        BackendKind::Mprotect => Box::new(Mprotect::new(ranges)?),
        BackendKind::UffdSync => Box::new(UffdSync::new(ranges)?),
    })
}

/// Runs `backend` over 16 fresh pages: an armed range must report nothing, two stores must be
/// reported (extra pages are tolerated, missing ones are not), and a second collection must be
/// clean again.
fn behaviour_test(kind: BackendKind) -> std::result::Result<(), String> {
    let page = precopy_sys::page_size();
    let mem = Mapping::new(Backing::AnonPrivate, 16 * page, 0, Thp::NoHuge)
        .map_err(|e| format!("cannot map test memory: {e}"))?;
    mem.fill(0, 16 * page, 0x5a)
        .map_err(|e| format!("cannot populate test memory: {e}"))?;
    let base = mem.addr();
    let pages = |v: &[Range<u64>]| -> Vec<u64> {
        v.iter()
            .flat_map(|r| (r.start..r.end).step_by(page as usize))
            .filter(|a| (base..base + 16 * page).contains(a))
            .map(|a| (a - base) / page)
            .collect()
    };
    let run = || -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
        let mut b = build(kind, &[mem.range()])?;
        b.start()?;
        let mut out = Vec::new();
        b.collect(&mut out)?;
        let clean = pages(&out);
        let io = |e| Error::Io {
            backend: kind,
            what: "self-test write",
            source: e,
        };
        mem.write_u64(3 * page + 8, 1).map_err(io)?;
        mem.write_u64(12 * page, 2).map_err(io)?;
        out.clear();
        b.collect(&mut out)?;
        let written = pages(&out);
        out.clear();
        b.collect(&mut out)?;
        let again = pages(&out);
        b.stop()?;
        Ok((clean, written, again))
    };
    let (clean, written, again) = run().map_err(|e| match e {
        Error::Unavailable(u) => u.reason,
        other => precopy_sys::error_chain(&other),
    })?;
    let missed: Vec<u64> = [3, 12]
        .into_iter()
        .filter(|p| !written.contains(p))
        .collect();
    if !missed.is_empty() {
        return Err(format!(
            "self-test: wrote pages 3 and 12, collection reported {written:?} (missed {missed:?})"
        ));
    }
    if !clean.is_empty() || !again.is_empty() {
        return Err(format!(
            "self-test: a clean range reported pages {clean:?} after start and {again:?} after a \
             collection: resetting does not work"
        ));
    }
    Ok(())
}

/// Whether `kind` works here: its prerequisites hold and its self-test passes. Cached per
/// process.
pub fn check(kind: BackendKind) -> std::result::Result<(), Unavailable> {
    static VERDICTS: [OnceLock<std::result::Result<(), String>>; 4] =
        [const { OnceLock::new() }; 4];
    let idx = BackendKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0);
    let verdict = VERDICTS[idx].get_or_init(|| behaviour_test(kind));
    verdict
        .clone()
        .map_err(|reason| Unavailable { kind, reason })
}

/// Every backend with whether it works here, and why not.
pub fn available() -> Vec<(BackendKind, std::result::Result<(), Unavailable>)> {
    BackendKind::ALL
        .into_iter()
        .map(|k| (k, check(k)))
        .collect()
}

/// A backend of `kind` over `ranges` of this process (page-aligned, mapped, disjoint), not yet
/// started, or why it cannot be used here.
pub fn open(kind: BackendKind, ranges: &[Range<u64>]) -> Result<BoxedDirtyLog> {
    check(kind)?;
    build(kind, ranges)
}

/// The backend [`choose_default`] picked, and why.
pub struct Chosen {
    /// Which one.
    pub kind: BackendKind,
    /// The backend, not yet started.
    pub backend: BoxedDirtyLog,
    /// One sentence for the user: what was picked, and why not the engine's own if it was not.
    pub note: String,
    /// The backends refused before it, with their reasons.
    pub refused: Vec<Unavailable>,
}

impl fmt::Debug for Chosen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chosen")
            .field("kind", &self.kind)
            .field("note", &self.note)
            .finish_non_exhaustive()
    }
}

/// Picks the engine's backend (uffd async WP + `PAGEMAP_SCAN`) where its self-test passes, else
/// soft-dirty where it provably works (kernels before 6.7 built with soft-dirty), else fails
/// listing why each was refused. The slower classic methods are never picked silently: callers
/// may [`open`] them by name.
pub fn choose_default(ranges: &[Range<u64>]) -> Result<Chosen> {
    let mut refused = Vec::new();
    for kind in [BackendKind::UffdAsync, BackendKind::SoftDirty] {
        match check(kind) {
            Ok(()) => {
                let backend = build(kind, ranges)?;
                let note = if refused.is_empty() {
                    format!("using {kind}: {}", kind.mechanism())
                } else {
                    let why: Vec<String> = refused
                        .iter()
                        .map(|u: &Unavailable| u.to_string())
                        .collect();
                    format!(
                        "using {kind} ({}) because {}; {kind} needs the writers paused around \
                         each round",
                        kind.mechanism(),
                        why.join("; ")
                    )
                };
                if !refused.is_empty() {
                    tracing::warn!("{note}");
                }
                return Ok(Chosen {
                    kind,
                    backend,
                    note,
                    refused,
                });
            }
            Err(u) => refused.push(u),
        }
    }
    Err(Error::NoBackend { refused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(BackendKind::from_name(k.name()), Some(k));
        }
        assert_eq!(BackendKind::from_name("nope"), None);
    }

    #[test]
    fn available_lists_every_backend_with_a_reason_when_refused() {
        let all = available();
        assert_eq!(all.len(), BackendKind::ALL.len());
        for (kind, verdict) in all {
            match verdict {
                Ok(()) => eprintln!("{kind}: available"),
                Err(u) => {
                    assert_eq!(u.kind, kind);
                    assert!(!u.reason.is_empty());
                    eprintln!("{kind}: unavailable: {}", u.reason);
                }
            }
        }
    }

    #[test]
    fn choose_default_picks_a_working_backend_or_explains() {
        let mem = Mapping::new(
            Backing::AnonPrivate,
            4 * precopy_sys::page_size(),
            0,
            Thp::NoHuge,
        )
        .unwrap();
        match choose_default(&[mem.range()]) {
            Ok(c) => {
                assert!(check(c.kind).is_ok());
                assert!(!c.note.is_empty());
                assert_eq!(c.backend.memory(), vec![mem.range()]);
                if check(BackendKind::UffdAsync).is_ok() {
                    assert_eq!(c.kind, BackendKind::UffdAsync);
                } else {
                    assert_eq!(c.kind, BackendKind::SoftDirty);
                    assert!(c.note.contains("uffd-async"), "{}", c.note);
                }
            }
            Err(Error::NoBackend { refused }) => {
                assert_eq!(refused.len(), 2);
                eprintln!("SKIP: no default backend works on this kernel: {refused:?}");
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
