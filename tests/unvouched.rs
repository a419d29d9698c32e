//! Memory changes the write-protect bit cannot see (issue 14): one case per (memory kind ×
//! change path) this machine can produce, each asserting the outcome the table in
//! ARCHITECTURE.md ("Changes the write-protect bit cannot see") promises, and, for every case,
//! that what the engine sends before declaring a copy complete (the round's dirty ranges plus
//! the switch-over re-check of unvouched memory) leaves the destination equal to the source.
//!
//! hugetlb cases need a pool: as root the test reserves one through
//! `/proc/sys/vm/nr_hugepages` (and puts it back); otherwise it prints a loud SKIP.

mod common;

use common::*;
use precopy::migrate::{
    Callbacks, Error, Migration, MigrationConfig, MigrationReport, Phase, Status, TrackingError,
    TransferTransport, UffdDirtyLog,
};
use precopy::sys::mem::{Advice, Backing, Mapping, Thp};
use precopy::tracker::Error as TrackerError;
use precopy::transfer::{FinalCheck, Layout, MemorySink, ProcessMemory, Transfer, TransferError};
use precopy::{MemoryKind, RegisterOptions, Tracker, Uffd, UnvouchedPolicy};
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// The error of these tests' migrations: the engine's log, an in-memory transfer, callbacks
/// that cannot fail.
type MigrateError = Error<TrackingError, TransferError, std::convert::Infallible>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PrivateAnon,
    SharedAnon,
    Memfd,
    PrivateFile,
    SharedFile,
    Hugetlb,
    HugetlbMemfd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// `madvise(MADV_DONTNEED)` through the tracked mapping.
    DontNeed,
    /// `madvise(MADV_REMOVE)` through the tracked mapping.
    Remove,
    /// `madvise(MADV_FREE)`, then `MADV_PAGEOUT` so the lazily freed pages really go.
    FreeThenPageOut,
    /// `madvise(MADV_PAGEOUT)`.
    PageOut,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` on the backing fd.
    PunchHole,
    /// `ftruncate` below the pages, then back.
    Truncate,
    /// A store through a second mapping of the same fd in this process.
    OtherMapping,
    /// A store by a forked child through its inherited mapping.
    OtherProcess,
    /// `pwrite` to the backing fd.
    Pwrite,
}

/// What the table promises for a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Promise {
    /// The next round reports the changed pages.
    Reported,
    /// The round may miss them; the switch-over re-check finds them.
    Detected,
    /// The contents do not change (nothing to report).
    Unchanged,
    /// The kernel refuses the operation on this kind (or it has no fd to act on).
    NotApplicable,
}

const UNITS: u64 = 4;

struct Setup {
    mem: Mapping,
    unit: u64,
    kind: Kind,
}

fn backing_file() -> File {
    tempfile::tempfile().expect("temporary file")
}

/// Maps `kind`, gives every page distinct non-zero contents (files: written to the file, not
/// through the mapping), then writes unit 1 through the mapping (a copy-on-write copy for a
/// private file mapping) and leaves unit 2 as it is.
fn setup(kind: Kind) -> std::io::Result<Setup> {
    let unit = match kind {
        Kind::Hugetlb | Kind::HugetlbMemfd => HUGE,
        _ => PAGE,
    };
    let len = UNITS * unit;
    let content = |off: u64| -> Vec<u8> {
        (0..unit)
            .step_by(8)
            .flat_map(|i| (0xa5a5_0000_0000_0000u64 | (off + i)).to_ne_bytes())
            .collect()
    };
    let file_backed = |private: bool| -> std::io::Result<Mapping> {
        let mut f = backing_file();
        for u in 0..UNITS {
            f.write_all(&content(u * unit))?;
        }
        let b = if private {
            Backing::PrivateFile(f)
        } else {
            Backing::File(f)
        };
        Mapping::new(b, len, 0, Thp::NoHuge)
    };
    let mem = match kind {
        Kind::PrivateAnon => Mapping::new(Backing::AnonPrivate, len, 0, Thp::NoHuge)?,
        Kind::SharedAnon => Mapping::new(Backing::AnonShared, len, 0, Thp::NoHuge)?,
        Kind::Memfd => Mapping::new(Backing::Memfd, len, 0, Thp::NoHuge)?,
        Kind::PrivateFile => file_backed(true)?,
        Kind::SharedFile => file_backed(false)?,
        Kind::Hugetlb => Mapping::new(Backing::Hugetlb, len, 0, Thp::Default)?,
        Kind::HugetlbMemfd => Mapping::new(Backing::MemfdHugetlb, len, 0, Thp::Default)?,
    };
    if !matches!(kind, Kind::PrivateFile | Kind::SharedFile) {
        for u in 0..UNITS {
            mem.write(u * unit, &content(u * unit))?;
        }
    }
    mem.write_u64(unit + 64, 0x1111_2222_3333_4444)?;
    Ok(Setup { mem, unit, kind })
}

/// Applies `path` to units 1 and 2. `Err` when the kernel refuses it or the kind has no fd.
fn apply(s: &Setup, path: Path) -> Result<(), String> {
    let (off, len) = (s.unit, 2 * s.unit);
    let fd = || {
        s.mem
            .fd()
            .ok_or_else(|| "no fd behind this mapping".to_string())
    };
    let e = |x: std::io::Error| x.to_string();
    match path {
        Path::DontNeed => s.mem.advise(off, len, Advice::DontNeed).map_err(e),
        Path::Remove => s.mem.advise(off, len, Advice::Remove).map_err(e),
        Path::FreeThenPageOut => {
            s.mem.advise(off, len, Advice::Free).map_err(e)?;
            s.mem.advise(off, len, Advice::PageOut).map_err(e)
        }
        Path::PageOut => s.mem.advise(off, len, Advice::PageOut).map_err(e),
        Path::PunchHole => {
            use nix::fcntl::{FallocateFlags, fallocate};
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            fallocate(fd()?, flags, off as i64, len as i64).map_err(|x| x.to_string())
        }
        Path::Truncate => {
            let f = File::from(fd()?.try_clone_to_owned().map_err(e)?);
            f.set_len(off).map_err(e)?;
            f.set_len(UNITS * s.unit).map_err(e)
        }
        Path::OtherMapping => {
            let f = File::from(fd()?.try_clone_to_owned().map_err(e)?);
            let backing = match s.kind {
                Kind::HugetlbMemfd => return write_through_second_hugetlb_mapping(s, f),
                _ => Backing::File(f),
            };
            let other = Mapping::new(backing, UNITS * s.unit, 0, Thp::NoHuge).map_err(e)?;
            other.write_u64(off + 8, 0xbeef).map_err(e)?;
            other.write_u64(off + s.unit + 8, 0xbeef).map_err(e)
        }
        Path::OtherProcess => {
            let mem = &s.mem;
            let child = spawn(|| {
                mem.write_u64(off + 8, 0xfeed).is_ok()
                    && mem.write_u64(off + s.unit + 8, 0xfeed).is_ok()
            });
            wait_ok(child);
            Ok(())
        }
        Path::Pwrite => {
            let f = File::from(fd()?.try_clone_to_owned().map_err(e)?);
            f.write_all_at(&[0x77; 64], off + 16).map_err(e)?;
            f.write_all_at(&[0x77; 64], off + s.unit + 16).map_err(e)
        }
    }
}

/// A second `MAP_SHARED` mapping of a hugetlb memfd (`Backing::File` would try to grow it).
fn write_through_second_hugetlb_mapping(s: &Setup, f: File) -> Result<(), String> {
    let other = Mapping::new(Backing::File(f), UNITS * s.unit, 0, Thp::Default)
        .map_err(|x| x.to_string())?;
    other
        .write_u64(s.unit + 8, 0xbeef)
        .map_err(|x| x.to_string())?;
    other
        .write_u64(2 * s.unit + 8, 0xbeef)
        .map_err(|x| x.to_string())
}

/// What happened in one cell.
#[derive(Debug)]
struct Observed {
    applied: Result<(), String>,
    content_changed: bool,
    reported: bool,
    detected: bool,
    verify: bool,
}

fn pages_differing(a: &[u8], b: &[u8], base: u64) -> Vec<Range<u64>> {
    a.chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| base + i as u64 * PAGE..base + (i as u64 + 1) * PAGE)
        .collect()
}

fn covers(ranges: &[Range<u64>], page: &Range<u64>) -> bool {
    ranges
        .iter()
        .any(|r| r.start <= page.start && page.end <= r.end)
}

/// Runs one cell: register (default options), send everything, arm, change, then collect
/// what the engine would send before "completed" and check the destination against the source.
fn run_cell(kind: Kind, path: Path) -> Option<Observed> {
    let s = match setup(kind) {
        Ok(s) => s,
        Err(e) => {
            skip(&format!("{kind:?} × {path:?}"), &format!("cannot map: {e}"));
            return None;
        }
    };
    let base = s.mem.addr();
    let len = s.mem.len();
    let mut tracker = Tracker::new(Uffd::new().expect("uffd"));
    let r = tracker.register(s.mem.range()).expect("register").clone();
    assert_eq!(r.verify, !r.kind.vouched(), "{kind:?}");
    let layout = Layout::single(PAGE, base, len).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let mut tx = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    tracker.arm().unwrap();
    tx.send_round(&[s.mem.range()]).unwrap();
    let mut scanner = scanner();
    let clean = scanner.round(&tracker).unwrap();
    assert!(
        clean.is_clean(),
        "{kind:?} × {path:?}: reading reported writes"
    );

    let mut before = vec![0u8; len as usize];
    s.mem.read(0, &mut before).unwrap();
    let applied = apply(&s, path);
    let mut after = vec![0u8; len as usize];
    s.mem.read(0, &mut after).unwrap();
    let changed = pages_differing(&before, &after, base);

    let round = scanner.round(&tracker).unwrap();
    let mut dirty: Vec<Range<u64>> = round.dirty().to_vec();
    dirty.extend(round.untracked().iter().map(|u| u.range.clone()));
    let found = tx.changed_since_sent(&tracker.verify_ranges()).unwrap();
    let o = Observed {
        content_changed: !changed.is_empty(),
        reported: !changed.is_empty() && changed.iter().all(|p| covers(&dirty, p)),
        detected: !changed.is_empty() && changed.iter().all(|p| covers(&found, p)),
        verify: r.verify,
        applied,
    };

    // What the driver sends in its final round: the round's ranges plus what the re-check
    // found. The destination must then equal the source.
    dirty.extend(found);
    tx.send_round(&dirty).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let (_, sink) = tx.into_parts();
    let mut now = vec![0u8; len as usize];
    s.mem.read(0, &mut now).unwrap();
    let wrong = pages_differing(sink.memory().expect("the sink owns its memory"), &now, base);
    assert!(
        wrong.is_empty(),
        "{kind:?} × {path:?}: destination differs from the source at {wrong:x?} ({o:?})"
    );
    Some(o)
}

const PATHS: [Path; 9] = [
    Path::DontNeed,
    Path::Remove,
    Path::FreeThenPageOut,
    Path::PageOut,
    Path::PunchHole,
    Path::Truncate,
    Path::OtherMapping,
    Path::OtherProcess,
    Path::Pwrite,
];

/// The table (ARCHITECTURE.md), as measured on Linux 6.18.
fn promise(kind: Kind, path: Path) -> Promise {
    use Kind::*;
    use Path::*;
    use Promise::*;
    match (kind, path) {
        // Only this address space changes private anonymous memory, through its page tables.
        (PrivateAnon, DontNeed) => Reported,
        (PrivateAnon, FreeThenPageOut) => Reported,
        (PrivateAnon, PageOut) => Unchanged,
        (PrivateAnon, OtherProcess) => Unchanged,
        (PrivateAnon, _) => NotApplicable,
        (SharedAnon, Remove | OtherProcess) => Detected,
        (SharedAnon, DontNeed | PageOut) => Unchanged,
        (SharedAnon, _) => NotApplicable,
        (
            Memfd | SharedFile,
            Remove | PunchHole | Truncate | OtherMapping | OtherProcess | Pwrite,
        ) => Detected,
        (Memfd | SharedFile, DontNeed | PageOut) => Unchanged,
        (Memfd | SharedFile, FreeThenPageOut) => NotApplicable,
        (PrivateFile, DontNeed | PunchHole | Truncate | OtherMapping | Pwrite) => Detected,
        (PrivateFile, PageOut | OtherProcess) => Unchanged,
        (PrivateFile, Remove | FreeThenPageOut) => NotApplicable,
        (Hugetlb, DontNeed) => Detected,
        (Hugetlb, OtherProcess) => Unchanged,
        (Hugetlb, _) => NotApplicable,
        (HugetlbMemfd, Remove | PunchHole | Truncate | OtherMapping | OtherProcess) => Detected,
        (HugetlbMemfd, DontNeed) => Unchanged,
        (HugetlbMemfd, _) => NotApplicable,
    }
}

fn check_kind(kind: Kind) {
    for path in PATHS {
        let Some(o) = run_cell(kind, path) else {
            continue;
        };
        let want = promise(kind, path);
        eprintln!(
            "{kind:?} × {path:?}: promised {want:?}; applied {:?}, changed {}, reported {}, detected {}",
            o.applied, o.content_changed, o.reported, o.detected
        );
        match want {
            Promise::Reported => {
                assert!(o.applied.is_ok(), "{kind:?} × {path:?}: {o:?}");
                assert!(
                    o.content_changed && o.reported,
                    "{kind:?} × {path:?}: {o:?}"
                );
            }
            Promise::Detected => {
                assert!(o.applied.is_ok(), "{kind:?} × {path:?}: {o:?}");
                assert!(o.verify, "{kind:?} × {path:?}: not marked for re-check");
                assert!(
                    o.content_changed && o.detected,
                    "{kind:?} × {path:?}: {o:?}"
                );
            }
            Promise::Unchanged => {
                assert!(o.applied.is_ok(), "{kind:?} × {path:?}: {o:?}");
                assert!(!o.content_changed, "{kind:?} × {path:?}: {o:?}");
            }
            Promise::NotApplicable => {
                assert!(o.applied.is_err(), "{kind:?} × {path:?}: {o:?}");
                assert!(!o.content_changed, "{kind:?} × {path:?}: {o:?}");
            }
        }
    }
}

#[test]
fn private_anonymous() {
    check_kind(Kind::PrivateAnon);
}

#[test]
fn shared_anonymous() {
    check_kind(Kind::SharedAnon);
}

#[test]
fn memfd() {
    check_kind(Kind::Memfd);
}

#[test]
fn private_file() {
    check_kind(Kind::PrivateFile);
}

#[test]
fn shared_file() {
    check_kind(Kind::SharedFile);
}

#[test]
fn hugetlb_private_and_memfd() {
    let test = "hugetlb_private_and_memfd";
    let Some(_pool) = reserve_pool(test, 2 * UNITS) else {
        return;
    };
    check_kind(Kind::Hugetlb);
    check_kind(Kind::HugetlbMemfd);
}

/// `UnvouchedPolicy::Refuse` turns every kind but private anonymous memory away, naming the
/// kind and the options that accept it; `external_writers` makes private anonymous memory
/// unvouched too; `AcceptRisk` tracks without re-checking.
#[test]
fn refuse_and_accept_risk_policies() {
    let refuse = RegisterOptions {
        unvouched: UnvouchedPolicy::Refuse,
        ..RegisterOptions::default()
    };
    for kind in [
        Kind::SharedAnon,
        Kind::Memfd,
        Kind::PrivateFile,
        Kind::SharedFile,
    ] {
        let s = setup(kind).unwrap();
        let mut tracker = Tracker::new(Uffd::new().unwrap());
        let err = tracker.register_with(s.mem.range(), refuse).unwrap_err();
        let TrackerError::Unvouched { kind: k, .. } = err else {
            panic!("{kind:?}: {err}");
        };
        let msg = err.to_string();
        assert!(msg.contains(k.name()), "{msg}");
        assert!(msg.contains("UnvouchedPolicy::AcceptRisk"), "{msg}");
        assert!(tracker.ranges().is_empty());
    }
    let s = setup(Kind::PrivateAnon).unwrap();
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    assert!(!tracker.register_with(s.mem.range(), refuse).unwrap().verify);
    drop(tracker);
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    let dma = RegisterOptions {
        unvouched: UnvouchedPolicy::Refuse,
        external_writers: true,
        ..RegisterOptions::default()
    };
    let err = tracker.register_with(s.mem.range(), dma).unwrap_err();
    assert!(err.to_string().contains("written by devices"), "{err}");
    let r = tracker
        .register_with(
            s.mem.range(),
            RegisterOptions {
                external_writers: true,
                ..RegisterOptions::default()
            },
        )
        .unwrap();
    assert_eq!(r.kind, MemoryKind::PrivateAnonymous);
    assert!(r.verify);
    let s = setup(Kind::Memfd).unwrap();
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    let r = tracker
        .register_with(
            s.mem.range(),
            RegisterOptions {
                unvouched: UnvouchedPolicy::AcceptRisk,
                ..RegisterOptions::default()
            },
        )
        .unwrap();
    assert_eq!(r.kind, MemoryKind::Shmem);
    assert!(!r.verify);
    assert!(tracker.verify_ranges().is_empty());
}

/// One live migration of `mem` (registered with `opts`) into a [`MemorySink`], with `change`
/// applied right after the first scan (nothing else writes). Returns the result, the report,
/// the destination's memory and the source's memory after the migration.
fn migrate_with_change(
    mem: std::sync::Arc<Mapping>,
    opts: RegisterOptions,
    change: impl FnOnce(&Mapping) + Send + 'static,
) -> (
    Result<MigrationReport, MigrateError>,
    MigrationReport,
    Vec<u8>,
    Vec<u8>,
) {
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register_with(mem.range(), opts).unwrap();
    let log = UffdDirtyLog::new(tracker, scanner());
    let layout = Layout::single(PAGE, mem.addr(), mem.len()).unwrap();
    let sink = MemorySink::new(layout.clone()).unwrap();
    let tx = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    let workload = Callbacks::<std::convert::Infallible>::new(|| Ok(()), || Ok(()));
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        ..MigrationConfig::default()
    };
    let m = mem.clone();
    let mut change = Some(change);
    let mut migration = Migration::new(log, TransferTransport::new(tx), workload, config)
        .on_progress(move |p| {
            if p.phase == Phase::Iterating
                && let Some(c) = change.take()
            {
                c(&m);
            }
        });
    let result = migration.run();
    let report = migration.report().clone();
    let (_, transport, _) = migration.into_parts();
    let (_, sink) = transport.into_inner().into_parts();
    let mut source = vec![0u8; mem.len() as usize];
    mem.read(0, &mut source).unwrap();
    (
        result,
        report,
        sink.memory().expect("the sink owns its memory").to_vec(),
        source,
    )
}

fn filled_memfd(pages: u64) -> std::sync::Arc<Mapping> {
    let mem = Mapping::new(Backing::Memfd, pages * PAGE, 0, Thp::NoHuge).unwrap();
    for p in 0..pages {
        mem.fill(p * PAGE, PAGE, (p % 250 + 1) as u8).unwrap();
    }
    std::sync::Arc::new(mem)
}

/// Outcome rule of issue 14: equal destination, or a clear failure; never completed with a
/// difference.
fn assert_equal_or_failed(
    name: &str,
    result: &Result<MigrationReport, MigrateError>,
    dest: &[u8],
    source: &[u8],
) {
    match result {
        Ok(r) => {
            assert_eq!(r.status, Status::Completed);
            let wrong = pages_differing(dest, source, 0);
            assert!(
                wrong.is_empty(),
                "{name}: completed with {} page(s) differing",
                wrong.len()
            );
        }
        Err(e) => eprintln!("{name}: failed clearly: {e}"),
    }
}

/// Case 1: a page of a tracked memfd is `MADV_REMOVE`d after a clean round; the write-protect
/// bit never reports it, the switch-over re-check does.
#[test]
fn migration_of_memfd_with_madv_remove_ends_equal() {
    let mem = filled_memfd(256);
    let (result, report, dest, source) =
        migrate_with_change(mem, RegisterOptions::default(), |m: &Mapping| {
            m.advise(5 * PAGE, PAGE, Advice::Remove).unwrap()
        });
    assert_equal_or_failed("memfd MADV_REMOVE", &result, &dest, &source);
    assert!(result.is_ok(), "{:?}", report.error);
    assert!(
        source[5 * PAGE as usize..6 * PAGE as usize]
            .iter()
            .all(|&b| b == 0)
    );
    let v = report.verify.expect("the switch-over re-check ran");
    assert_eq!(v.checked_bytes, 256 * PAGE);
    assert_eq!(v.changed_bytes, PAGE, "{v:?}");
}

/// Case 2: a forked child writes 8 pages of the shared memfd through its own mapping.
#[test]
fn migration_of_memfd_written_by_a_forked_child_ends_equal() {
    let mem = filled_memfd(256);
    let (result, report, dest, source) =
        migrate_with_change(mem, RegisterOptions::default(), |m: &Mapping| {
            let child =
                spawn(|| (0..8).all(|i| m.write_u64((40 + 3 * i) * PAGE + 8, 0xc4_11d).is_ok()));
            wait_ok(child);
        });
    assert_equal_or_failed("forked child", &result, &dest, &source);
    assert!(result.is_ok(), "{:?}", report.error);
    let v = report.verify.expect("the switch-over re-check ran");
    assert_eq!(v.changed_bytes, 8 * PAGE, "{v:?}");
}

/// Control: the same change with the re-check waived (`AcceptRisk`) completes with a stale
/// page. This is the risk that option accepts, and proof that the two tests above can fail.
#[test]
fn accept_risk_waives_the_recheck_and_the_copy_is_stale() {
    let mem = filled_memfd(64);
    let opts = RegisterOptions {
        unvouched: UnvouchedPolicy::AcceptRisk,
        ..RegisterOptions::default()
    };
    let (result, report, dest, source) = migrate_with_change(mem, opts, |m: &Mapping| {
        m.advise(5 * PAGE, PAGE, Advice::Remove).unwrap()
    });
    assert!(result.is_ok());
    assert!(report.verify.is_none());
    assert_eq!(pages_differing(&dest, &source, 0), vec![5 * PAGE..6 * PAGE]);
}
