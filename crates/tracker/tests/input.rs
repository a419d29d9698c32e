//! The input sweep of the tracker's public functions: every bad range, address, size or process
//! id is a typed error (the exact variant is asserted), never a panic, and nothing is changed.

use precopy_sys::mem::Mapping;
use precopy_tracker::{AttachError, Error, Tracker, Uffd};
use std::os::fd::AsFd;

/// A tracker over 8 fresh pages, registered; `None` (after a loud SKIP) without WP_ASYNC.
fn tracked(test: &str) -> Option<(Tracker, Mapping)> {
    let uffd = match Uffd::new() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("SKIP {test}: no async write-protect userfaultfd here: {e}");
            return None;
        }
    };
    let mem = Mapping::anonymous(8 * page()).unwrap();
    let mut tracker = Tracker::new(uffd);
    tracker.register(mem.range()).unwrap();
    Some((tracker, mem))
}

fn page() -> u64 {
    precopy_sys::page_size()
}

#[test]
fn register_refuses_inverted_empty_and_unaligned_ranges() {
    let Some((mut t, mem)) = tracked("register_refuses_inverted_empty_and_unaligned_ranges") else {
        return;
    };
    let b = mem.addr();
    let err = t.register(b + 2 * page()..b).unwrap_err();
    assert!(matches!(err, Error::InvertedRange { .. }), "{err:?}");
    for r in [b..b, b + 1..b + page(), b..b + page() + 1] {
        let err = t.register(r.clone()).unwrap_err();
        assert!(
            matches!(err, Error::Unaligned { start, end, .. } if start == r.start && end == r.end),
            "{r:x?}: {err:?}"
        );
    }
    assert_eq!(t.ranges().len(), 1, "nothing registered");
}

#[test]
fn register_refuses_ranges_near_u64_max() {
    let Some((mut t, _mem)) = tracked("register_refuses_ranges_near_u64_max") else {
        return;
    };
    let top = !(page() - 1);
    // Page-aligned, but nothing is (or can be) mapped up there.
    let err = t.register(top - page()..top).unwrap_err();
    assert!(matches!(err, Error::NotMapped { .. }), "{err:?}");
    let err = t.register(top..u64::MAX).unwrap_err();
    assert!(matches!(err, Error::Unaligned { .. }), "{err:?}");
}

#[test]
fn register_refuses_unmapped_memory() {
    let Some((mut t, _mem)) = tracked("register_refuses_unmapped_memory") else {
        return;
    };
    let mut other = Mapping::anonymous(4 * page()).unwrap();
    other.unmap(page(), page()).unwrap();
    let b = other.addr();
    let err = t.register(b..b + 4 * page()).unwrap_err();
    assert!(
        matches!(err, Error::NotMapped { hole_start, hole_end, .. }
            if hole_start == b + page() && hole_end == b + 2 * page()),
        "{err:?}"
    );
}

#[test]
fn register_refuses_overlap_with_a_tracked_range() {
    let Some((mut t, mem)) = tracked("register_refuses_overlap_with_a_tracked_range") else {
        return;
    };
    let b = mem.addr();
    let err = t.register(b + page()..b + 2 * page()).unwrap_err();
    assert!(matches!(err, Error::Overlap { .. }), "{err:?}");
}

#[test]
fn arm_range_refuses_inverted_empty_unaligned_and_untracked_ranges() {
    let Some((t, mem)) = tracked("arm_range_refuses_inverted_empty_unaligned_and_untracked_ranges")
    else {
        return;
    };
    let b = mem.addr();
    let err = t.arm_range(b + page()..b).unwrap_err();
    assert!(matches!(err, Error::InvertedRange { .. }), "{err:?}");
    for r in [b..b, b + 1..b + page()] {
        let err = t.arm_range(r.clone()).unwrap_err();
        assert!(matches!(err, Error::Unaligned { .. }), "{r:x?}: {err:?}");
    }
    // Past the tracked range's end, and entirely outside it.
    for r in [b..b + 9 * page(), b - page()..b, 0..page()] {
        let err = t.arm_range(r.clone()).unwrap_err();
        assert!(
            matches!(err, Error::NotTracked { start, end } if start == r.start && end == r.end),
            "{r:x?}: {err:?}"
        );
    }
    t.arm_range(b + page()..b + 3 * page()).unwrap();
}

#[test]
fn unregister_refuses_inverted_and_untracked_ranges() {
    let Some((mut t, mem)) = tracked("unregister_refuses_inverted_and_untracked_ranges") else {
        return;
    };
    let b = mem.addr();
    let err = t.unregister(b + page()..b).unwrap_err();
    assert!(matches!(err, Error::InvertedRange { .. }), "{err:?}");
    for r in [b..b, b..b + 9 * page()] {
        let err = t.unregister(r.clone()).unwrap_err();
        assert!(matches!(err, Error::NotTracked { .. }), "{r:x?}: {err:?}");
    }
    let err = t.unregister(b + 1..b + page()).unwrap_err();
    assert!(matches!(err, Error::Unaligned { .. }), "{err:?}");
    assert_eq!(t.tracked_bytes(), 8 * page(), "nothing unregistered");
}

#[test]
fn forget_refuses_inverted_and_unaligned_ranges_and_drops_nothing() {
    let Some((mut t, mem)) =
        tracked("forget_refuses_inverted_and_unaligned_ranges_and_drops_nothing")
    else {
        return;
    };
    let b = mem.addr();
    let err = t.forget(b + 4 * page()..b + 2 * page()).unwrap_err();
    assert!(matches!(err, Error::InvertedRange { .. }), "{err:?}");
    let err = t.forget(b + 1..b + page()).unwrap_err();
    assert!(matches!(err, Error::Unaligned { .. }), "{err:?}");
    assert_eq!(t.forget(b..b).unwrap(), 0);
    assert_eq!(t.tracked_bytes(), 8 * page());
    assert_eq!(t.forget(b + page()..b + 3 * page()).unwrap(), 2 * page());
    assert_eq!(t.tracked_bytes(), 6 * page());
}

#[test]
fn mappings_refuses_an_inverted_range() {
    let Some((t, mem)) = tracked("mappings_refuses_an_inverted_range") else {
        return;
    };
    let b = mem.addr();
    let err = t.mappings(b + page()..b).unwrap_err();
    assert!(matches!(err, Error::InvertedRange { .. }), "{err:?}");
    assert!(t.mappings(b..b).unwrap().is_empty());
}

#[test]
fn adopt_and_from_process_refuse_bad_process_ids() {
    for pid in [0, -1, i32::MIN] {
        let fd = match precopy_sys::uffd::create() {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("SKIP adopt_and_from_process_refuse_bad_process_ids: {e}");
                return;
            }
        };
        let err = Uffd::adopt(fd, pid).unwrap_err();
        assert!(
            matches!(err, Error::BadPid { pid: p } if p == pid),
            "{err:?}"
        );
        let err = Uffd::from_process(pid, 3).unwrap_err();
        assert!(
            matches!(err, Error::BadPid { pid: p } if p == pid),
            "{err:?}"
        );
    }
    let own = std::process::id() as i32;
    let err = Uffd::from_process(own, -1).unwrap_err();
    assert!(
        matches!(&err, Error::Handoff(e) if e.raw_os_error() == Some(libc::EBADF)),
        "{err:?}"
    );
    // An fd number that is not a userfaultfd: refused after the copy, typed.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let copy = file.as_fd().try_clone_to_owned().unwrap();
    let err = Uffd::adopt(copy, own).unwrap_err();
    assert!(matches!(err, Error::NotUffd), "{err:?}");
}

#[test]
fn attach_refuses_bad_and_own_process_ids() {
    for pid in [0, -1] {
        let err = Uffd::attach(pid).unwrap_err();
        assert!(
            matches!(err, AttachError::NoSuchProcess { pid: p } if p == pid),
            "{err:?}"
        );
    }
    let own = std::process::id() as i32;
    let err = Uffd::attach(own).unwrap_err();
    assert!(
        matches!(err, AttachError::OwnProcess { pid } if pid == own),
        "{err:?}"
    );
    // A thread of this process is this process too.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        // "/proc/thread-self" links to "PID/task/TID".
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        let tid: i32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
        tx.send(tid).unwrap();
        let _ = done_rx.recv();
    });
    let live = rx.recv().unwrap();
    let err = Uffd::attach(live).unwrap_err();
    done_tx.send(()).unwrap();
    h.join().unwrap();
    if let AttachError::Tracker(e) = &err {
        eprintln!("SKIP attach_refuses_bad_and_own_process_ids (thread case): {e}");
        return;
    }
    assert!(
        matches!(err, AttachError::OwnProcess { pid } if pid == live),
        "{err:?}"
    );
}

#[test]
fn attach_refuses_a_process_that_does_not_exist() {
    // PIDs above pid_max (at most 2^22) never exist.
    let err = Uffd::attach(i32::MAX - 1).unwrap_err();
    assert!(matches!(err, AttachError::NoSuchProcess { .. }), "{err:?}");
}
