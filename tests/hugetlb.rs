//! hugetlb memory: reported in whole huge pages, and a page budget smaller than one huge page
//! neither loops forever nor loses it.
//!
//! Needs a hugetlb pool. When the pool is short, this test (as root) grows
//! `/proc/sys/vm/nr_hugepages` and puts the old value back afterwards; when it cannot, it skips
//! loudly.

mod common;

use common::*;
use precopy::sys::mem::{Backing, Mapping, Thp};
use precopy::tracker::Error as TrackerError;
use precopy::{MemoryKind, ScanOptions, Tracker, Uffd};

const WANT: u64 = 3;

#[test]
fn hugetlb_reports_whole_huge_pages_and_budgets_do_not_stall() {
    let test = "hugetlb_reports_whole_huge_pages_and_budgets_do_not_stall";
    let Some(_pool) = reserve_pool(test, WANT) else {
        return;
    };
    let mem = match Mapping::new(Backing::Hugetlb, WANT * HUGE, 0, Thp::Default) {
        Ok(m) => m,
        Err(e) => {
            skip(test, &format!("MAP_HUGETLB failed: {e}"));
            return;
        }
    };
    let base = mem.addr();
    assert_eq!(base % HUGE, 0);
    mem.fill(0, 16, 0x66).unwrap(); // huge page 0 populated before arming

    let mut tracker = Tracker::new(Uffd::new().unwrap());
    // Page-aligned is not enough on hugetlb.
    match tracker.register(base..base + HUGE + PAGE) {
        Err(TrackerError::Unaligned { align, .. }) => assert_eq!(align, HUGE),
        other => panic!("expected Unaligned to the huge page size, got {other:?}"),
    }
    let r = tracker.register(mem.range()).unwrap();
    assert_eq!(r.kind, MemoryKind::Hugetlb);
    assert_eq!(r.granule, HUGE);
    tracker.arm().unwrap();
    let mut scanner = scanner();
    assert!(scanner.round(&tracker).unwrap().is_clean(), "clean start");

    // One byte in the middle of huge page 1 reports all of it.
    mem.fill(HUGE + 1234 * 8, 1, 1).unwrap();
    let round = scanner.round(&tracker).unwrap();
    assert_shape(round);
    assert_eq!(round.dirty(), &[base + HUGE..base + 2 * HUGE][..]);
    assert_eq!(round.stats().pages, HUGE / PAGE);
    assert!(scanner.round(&tracker).unwrap().is_clean());

    // Page budgets below one huge page: every written huge page still comes out, exactly once
    // per pass, in a bounded number of rounds.
    let per_huge = HUGE / PAGE;
    for max_pages in [1, 3, per_huge - 1, per_huge, per_huge + 1] {
        let mut budgeted = scanner_with(ScanOptions {
            max_pages: Some(max_pages),
            ..ScanOptions::default()
        });
        mem.fill(5, 1, 2).unwrap();
        mem.fill(2 * HUGE + HUGE - 1, 1, 2).unwrap();
        let (seen, rounds) = full_pass(&mut budgeted, &tracker, base, 20);
        let mut want: Vec<u64> = (0..per_huge).collect();
        want.extend(2 * per_huge..3 * per_huge);
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            want,
            "max_pages {max_pages}"
        );
        assert!(
            seen.values().all(|&n| n == 1),
            "max_pages {max_pages}: twice"
        );
        // The budget is rounded up to whole huge pages: up to one huge page per round here.
        if max_pages <= per_huge {
            assert!(rounds >= 2, "max_pages {max_pages}: one round took both");
        }
        let (seen, _) = full_pass(&mut budgeted, &tracker, base, 20);
        assert!(
            seen.is_empty(),
            "max_pages {max_pages}: second pass {seen:?}"
        );
    }

    // Unregistering part of it must respect the huge page size too.
    match tracker.unregister(base..base + PAGE) {
        Err(TrackerError::Unaligned { align, .. }) => assert_eq!(align, HUGE),
        other => panic!("expected Unaligned, got {other:?}"),
    }
    tracker.unregister(base..base + HUGE).unwrap();
    mem.fill(0, 1, 3).unwrap();
    mem.fill(HUGE, 1, 3).unwrap();
    assert_eq!(
        scanner.round(&tracker).unwrap().dirty(),
        &[base + HUGE..base + 2 * HUGE][..]
    );
    drop(tracker);
    drop(mem);
}
