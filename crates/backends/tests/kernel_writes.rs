//! `read(2)` into tracked memory with every backend: it works and is reported, or it fails with
//! `EFAULT` exactly where the backend says so ([`KernelWrites::NeedsPrepare`]) and works once
//! the range is prepared. And the input sweep of `prepare_kernel_write` and `open`.

use precopy_backends::{
    BackendKind, BoxedDirtyLog, DirtyLog, Error, KernelWrites, UffdSync, check, open,
};
use precopy_sys::mem::{Backing, Mapping, Thp};
use std::io::Write;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// The mprotect tracker is one per process: tests take turns.
static TURN: Mutex<()> = Mutex::new(());

const PAGES: u64 = 8;

fn page() -> u64 {
    precopy_sys::page_size()
}

/// Every backend that works here over `ranges`, plus uffd-sync with the fd an unprivileged
/// process gets: (name, kind, backend, not started).
fn backends(ranges: &[Range<u64>]) -> Vec<(String, BackendKind, BoxedDirtyLog)> {
    let mut all: Vec<(String, BackendKind, BoxedDirtyLog)> = Vec::new();
    for kind in BackendKind::ALL {
        match check(kind) {
            Ok(()) => all.push((kind.name().to_string(), kind, open(kind, ranges).unwrap())),
            Err(u) => eprintln!("SKIP {kind}: {}", u.reason),
        }
    }
    if check(BackendKind::UffdSync).is_ok() {
        all.push((
            "uffd-sync (UFFD_USER_MODE_ONLY)".to_string(),
            BackendKind::UffdSync,
            Box::new(UffdSync::user_mode_only(ranges).unwrap()),
        ));
    }
    all
}

fn pages_of(out: &[Range<u64>], base: u64) -> Vec<u64> {
    out.iter()
        .flat_map(|r| (r.start..r.end).step_by(page() as usize))
        .filter(|a| (base..base + PAGES * page()).contains(a))
        .map(|a| (a - base) / page())
        .collect()
}

#[test]
fn read_into_tracked_memory_works_or_fails_exactly_as_declared() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let p = page();
    let data = [0xabu8; 100];
    let mem = Mapping::new(Backing::AnonPrivate, PAGES * p, 0, Thp::NoHuge).unwrap();
    mem.fill(0, PAGES * p, 1).unwrap();
    let base = mem.addr();
    for (name, _, mut b) in backends(&[mem.range()]) {
        b.start().unwrap();
        let mut out = Vec::new();
        b.collect(&mut out).unwrap();
        assert!(pages_of(&out, base).is_empty(), "{name}: clean after start");
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        tx.write_all(&data).unwrap();
        let at = 3 * p + 16;
        let declared = b.kernel_writes();
        eprintln!("{name}: {}", declared.describe());
        if declared == KernelWrites::NeedsPrepare {
            let err = mem.read_from_fd(at, 100, rx.as_fd()).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{name}: {err}");
            // Whether or not the failed read consumed anything, 100 bytes are there.
            tx.write_all(&data).unwrap();
            b.prepare_kernel_write(base + at..base + at + 100).unwrap();
        }
        let n = mem
            .read_from_fd(at, 100, rx.as_fd())
            .unwrap_or_else(|e| panic!("{name} ({declared:?}): read(2) into tracked memory: {e}"));
        assert_eq!(n, 100, "{name}");
        let mut back = [0u8; 100];
        mem.read(at, &mut back).unwrap();
        assert_eq!(back, data, "{name}: the bytes read landed");
        out.clear();
        b.collect(&mut out).unwrap();
        assert!(
            pages_of(&out, base).contains(&3),
            "{name}: the page read(2) wrote is reported, got {:?}",
            pages_of(&out, base)
        );
        if declared == KernelWrites::NeedsPrepare {
            // Collected means protected again: unprepared, the kernel's copy fails again.
            tx.write_all(&data).unwrap();
            let err = mem.read_from_fd(at, 100, rx.as_fd()).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{name}: {err}");
        }
        b.stop().unwrap();
    }
}

#[test]
fn mprotect_always_needs_prepare() {
    let Ok(()) = check(BackendKind::Mprotect) else {
        eprintln!("SKIP mprotect_always_needs_prepare: mprotect backend unavailable");
        return;
    };
    let mem = Mapping::new(Backing::AnonPrivate, PAGES * page(), 0, Thp::NoHuge).unwrap();
    assert_eq!(
        open(BackendKind::Mprotect, &[mem.range()])
            .unwrap()
            .kernel_writes(),
        KernelWrites::NeedsPrepare
    );
    let Ok(()) = check(BackendKind::UffdSync) else {
        return;
    };
    assert_eq!(
        UffdSync::user_mode_only(&[mem.range()])
            .unwrap()
            .kernel_writes(),
        KernelWrites::NeedsPrepare
    );
}

#[test]
#[allow(clippy::reversed_empty_ranges)] // the inverted range is the point
fn prepare_kernel_write_refuses_bad_ranges_and_an_unstarted_backend() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let p = page();
    let mem = Mapping::new(Backing::AnonPrivate, PAGES * p, 0, Thp::NoHuge).unwrap();
    let base = mem.addr();
    for (name, kind, mut b) in backends(&[mem.range()]) {
        let err = b.prepare_kernel_write(0x1000..0x2000).unwrap_err();
        assert!(
            matches!(err, Error::NotStarted { backend } if backend == kind),
            "{name}: {err:?}"
        );
        b.start().unwrap();
        for r in [base + p..base + p, base + 2 * p..base + p] {
            let err = b.prepare_kernel_write(r.clone()).unwrap_err();
            assert!(
                matches!(err, Error::InvalidRange { start, end, .. } if start == r.start && end == r.end),
                "{name} {r:x?}: {err:?}"
            );
        }
        for r in [
            base - p..base + p,
            base..base + (PAGES + 1) * p,
            u64::MAX - 1..u64::MAX,
        ] {
            let err = b.prepare_kernel_write(r.clone()).unwrap_err();
            assert!(
                matches!(err, Error::OutsideTracked { start, end, .. } if start == r.start && end == r.end),
                "{name} {r:x?}: {err:?}"
            );
        }
        b.prepare_kernel_write(base + 1..base + 2).unwrap();
        b.stop().unwrap();
    }
}

#[test]
#[allow(clippy::reversed_empty_ranges)] // the inverted range is the point
fn open_refuses_empty_inverted_and_unaligned_ranges() {
    let p = page();
    let mem = Mapping::new(Backing::AnonPrivate, PAGES * p, 0, Thp::NoHuge).unwrap();
    let base = mem.addr();
    for r in [base..base, base + 2 * p..base, base + 1..base + p] {
        let mut refusals: Vec<(String, Error)> = Vec::new();
        for kind in BackendKind::ALL {
            match check(kind) {
                Ok(()) => {
                    let err = open(kind, std::slice::from_ref(&r))
                        .map(|_| ())
                        .unwrap_err();
                    refusals.push((kind.name().to_string(), err));
                }
                Err(u) => eprintln!("SKIP {kind}: {}", u.reason),
            }
        }
        if check(BackendKind::UffdSync).is_ok() {
            let err = UffdSync::user_mode_only(std::slice::from_ref(&r)).unwrap_err();
            refusals.push(("uffd-sync (UFFD_USER_MODE_ONLY)".to_string(), err));
        }
        for (name, err) in refusals {
            assert!(
                matches!(err, Error::InvalidRange { start, end, .. } if start == r.start && end == r.end),
                "{name} {r:x?}: {err:?}"
            );
        }
    }
}
