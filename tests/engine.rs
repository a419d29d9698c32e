//! Behaviour of one round and of rounds in sequence, on the caller's own memory: what is reported,
//! what is not, the shape of the result, small buffers and page budgets, every backing kind.

mod common;

use common::*;
use precopy::sys::mem::{Advice, Backing, Mapping, Protection, Thp};
use precopy::tracker::Error as TrackerError;
use precopy::{MemoryKind, RegisterOptions, ScanOptions, Scanner, ThpPolicy, Tracker, Uffd};

#[test]
fn clean_start_reports_nothing() {
    // Half populated before arming, half never touched: both must read clean once armed.
    let mem = anon(64);
    mem.fill(0, 32 * PAGE, 0x5a).unwrap();
    let tracker = track(&mem);
    let mut scanner = scanner();
    let round = scanner.round(&tracker).unwrap();
    assert!(
        round.is_clean(),
        "armed memory reported {:x?}",
        round.dirty()
    );
    assert!(round.complete());
    assert_eq!(round.stats().pages, 0);
}

#[test]
fn written_once_reported_once() {
    let mem = anon(64);
    mem.fill(0, 16 * PAGE, 1).unwrap();
    let tracker = track(&mem);
    let mut scanner = scanner();
    let base = mem.addr();
    // Populated-before-arming and never-populated pages, several writes to the same page.
    for p in [3, 9, 40, 63] {
        touch(&mem, p, p);
        touch(&mem, p, p + 1);
    }
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, base), vec![3, 9, 40, 63]);
    assert!(round.untracked().is_empty());
    // Nothing new: nothing reported, twice.
    assert!(scanner.round(&tracker).unwrap().is_clean());
    assert!(scanner.round(&tracker).unwrap().is_clean());
    // Writing again reports again, only that page.
    touch(&mem, 9, 99);
    assert_eq!(dirty_pages(scanner.round(&tracker).unwrap(), base), vec![9]);
    assert!(scanner.round(&tracker).unwrap().is_clean());
}

#[test]
fn reads_are_never_reported() {
    let mem = anon(32);
    mem.fill(0, 8 * PAGE, 7).unwrap();
    let tracker = track(&mem);
    let mut scanner = scanner();
    // Populated pages and never-populated ones (the read maps the zero page).
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..32 {
        mem.read(p * PAGE, &mut buf).unwrap();
        let _ = mem.read_u64(p * PAGE + 8).unwrap();
    }
    let round = scanner.round(&tracker).unwrap();
    assert!(round.is_clean(), "reads reported {:x?}", round.dirty());
    // A read after a write does not make it reported twice.
    touch(&mem, 20, 1);
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), mem.addr()),
        vec![20]
    );
    let _ = mem.read_u64(20 * PAGE).unwrap();
    assert!(scanner.round(&tracker).unwrap().is_clean());
}

#[test]
fn result_is_sorted_coalesced_half_open_page_aligned() {
    let mem = anon(128);
    let tracker = track(&mem);
    let mut scanner = scanner();
    let base = mem.addr();
    // Written in a scrambled order: runs 5..8, 8..9 (touches the first: must merge), 20, 22..25,
    // 100..128 (up to the end of the range), 0 (the start).
    let pages = [
        24, 100, 5, 8, 0, 6, 20, 7, 22, 23, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111,
        112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127,
    ];
    for &p in &pages {
        // Write somewhere inside the page, not at its start, and at its last byte once.
        mem.fill(p * PAGE + PAGE - 1, 1, 0xff).unwrap();
    }
    let round = scanner.round(&tracker).unwrap();
    assert_shape(round);
    let want = [
        base..base + PAGE,
        base + 5 * PAGE..base + 9 * PAGE,
        base + 20 * PAGE..base + 21 * PAGE,
        base + 22 * PAGE..base + 25 * PAGE,
        base + 100 * PAGE..base + 128 * PAGE,
    ];
    assert_eq!(round.dirty(), &want[..]);
    assert_eq!(round.stats().pages, pages.len() as u64);
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        round.pages().map(|a| (a - base) / PAGE).collect::<Vec<_>>(),
        sorted
    );
}

/// A scattered pattern: every third page, plus a run, plus the last page.
fn scattered(pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..pages).filter(|p| p % 3 == 1).collect();
    v.extend(40..52);
    v.push(pages - 1);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn small_output_buffer_reports_everything_in_one_round() {
    for vec_len in [1usize, 2, 3] {
        let mem = anon(256);
        let tracker = track(&mem);
        let mut scanner = scanner_with(ScanOptions {
            vec_len,
            ..ScanOptions::default()
        });
        let want = scattered(256);
        for &p in &want {
            touch(&mem, p, p ^ 0xabc);
        }
        let round = scanner.round(&tracker).unwrap();
        assert!(round.complete(), "vec_len {vec_len}: round not complete");
        assert_shape(round);
        assert_eq!(dirty_pages(round, mem.addr()), want, "vec_len {vec_len}");
        let regions = round.stats().regions;
        assert!(
            round.stats().ioctls >= regions.div_ceil(vec_len as u64),
            "vec_len {vec_len}: {} regions cannot fit in {} calls",
            regions,
            round.stats().ioctls
        );
        assert!(
            scanner.round(&tracker).unwrap().is_clean(),
            "vec_len {vec_len}"
        );
    }
}

#[test]
fn page_budget_rounds_resume_and_report_each_page_once() {
    for (max_pages, vec_len) in [(1u64, 4096usize), (3, 4096), (3, 1), (7, 2), (64, 4096)] {
        let mem = anon(256);
        let tracker = track(&mem);
        let mut scanner = scanner_with(ScanOptions {
            max_pages: Some(max_pages),
            vec_len,
            ..ScanOptions::default()
        });
        let base = mem.addr();
        let want = scattered(256);
        for &p in &want {
            touch(&mem, p, p + 7);
        }
        let (seen, rounds) = full_pass(&mut scanner, &tracker, base, 1000);
        let once: Vec<u64> = seen.keys().copied().collect();
        assert_eq!(once, want, "max_pages {max_pages} vec_len {vec_len}");
        assert!(
            seen.values().all(|&n| n == 1),
            "max_pages {max_pages}: pages reported more than once: {:?}",
            seen.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
        assert!(
            rounds as u64 >= (want.len() as u64).div_ceil(max_pages),
            "max_pages {max_pages}: a round reported more than its budget"
        );
        // A second full pass: nothing left.
        let (seen, _) = full_pass(&mut scanner, &tracker, base, 1000);
        assert!(
            seen.is_empty(),
            "max_pages {max_pages}: second pass {seen:?}"
        );

        // Writes landing mid-pass, before and after the cursor, are all reported by the end of
        // the next full pass.
        for &p in &want[..3] {
            touch(&mem, p, 1);
        }
        let round = scanner.round(&tracker).unwrap();
        let mut got: Vec<u64> = dirty_pages(round, base);
        let mid_complete = round.complete();
        touch(&mem, 0, 5);
        touch(&mem, 255, 5);
        if !mid_complete {
            let (seen, _) = full_pass(&mut scanner, &tracker, base, 1000);
            got.extend(seen.keys());
        }
        let (seen, _) = full_pass(&mut scanner, &tracker, base, 1000);
        got.extend(seen.keys());
        for p in [want[0], want[1], want[2], 0, 255] {
            assert!(got.contains(&p), "max_pages {max_pages}: page {p} lost");
        }
    }
}

#[test]
fn anonymous_dontneed_is_reported() {
    let mem = anon(32);
    mem.fill(0, 32 * PAGE, 0x11).unwrap();
    let tracker = track(&mem);
    let mut scanner = scanner();
    mem.advise(4 * PAGE, 3 * PAGE, Advice::DontNeed).unwrap();
    // Never-populated pages dropped again count too (they read zero either way, but nothing
    // may be lost): 20..22 were populated, so this drops real data.
    mem.advise(20 * PAGE, 2 * PAGE, Advice::DontNeed).unwrap();
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, mem.addr()), vec![4, 5, 6, 20, 21]);
    assert_eq!(
        mem.read_u64(5 * PAGE).unwrap(),
        0,
        "dropped page reads zero"
    );
    assert!(scanner.round(&tracker).unwrap().is_clean());
}

#[test]
fn mprotect_cycles_lose_nothing() {
    let mem = anon(64);
    mem.fill(0, 64 * PAGE, 3).unwrap();
    let tracker = track(&mem);
    let mut scanner = scanner();
    let base = mem.addr();
    for cycle in 0..4u64 {
        // Written before protecting: must still be reported after the protection changes.
        touch(&mem, 10 + cycle, cycle);
        mem.protect(8 * PAGE, 16 * PAGE, Protection::Read).unwrap();
        if cycle % 2 == 0 {
            let round = scanner.round(&tracker).unwrap();
            assert_eq!(dirty_pages(round, base), vec![10 + cycle], "cycle {cycle}");
        }
        let _ = mem.read_u64(12 * PAGE).unwrap();
        mem.protect(8 * PAGE, 16 * PAGE, Protection::ReadWrite)
            .unwrap();
        // Written after making it writable again.
        touch(&mem, 20, cycle);
        touch(&mem, 30, cycle);
        let round = scanner.round(&tracker).unwrap();
        let mut want = vec![20, 30];
        if cycle % 2 == 1 {
            want.insert(0, 10 + cycle);
        }
        assert_eq!(dirty_pages(round, base), want, "cycle {cycle}");
        assert!(scanner.round(&tracker).unwrap().is_clean(), "cycle {cycle}");
    }
    // PROT_NONE and back as well.
    mem.protect(0, 64 * PAGE, Protection::None).unwrap();
    assert!(scanner.round(&tracker).unwrap().is_clean());
    mem.protect(0, 64 * PAGE, Protection::ReadWrite).unwrap();
    touch(&mem, 63, 1);
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), base),
        vec![63]
    );
}

fn shared_mapping_case(name: &str, mem: Mapping, expected: MemoryKind) {
    let base = mem.addr();
    let pages = mem.len() / PAGE;
    mem.fill(0, 8 * PAGE, 0x42).unwrap();
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    let r = tracker.register(mem.range()).unwrap();
    assert_eq!(r.kind, expected, "{name}");
    assert!(
        r.verify,
        "{name}: shared memory must be re-checked at switch-over"
    );
    tracker.arm().unwrap();
    let mut scanner = scanner();
    let round = scanner.round(&tracker).unwrap();
    assert!(
        round.is_clean(),
        "{name}: clean start reported {:x?}",
        round.dirty()
    );
    let mut buf = [0u8; 64];
    mem.read(2 * PAGE, &mut buf).unwrap();
    mem.read(20 * PAGE, &mut buf).unwrap();
    assert!(scanner.round(&tracker).unwrap().is_clean(), "{name}: reads");
    for p in [1, 2, 3, 17, pages - 1] {
        touch(&mem, p, p);
    }
    let round = scanner.round(&tracker).unwrap();
    assert_shape(round);
    assert_eq!(
        dirty_pages(round, base),
        vec![1, 2, 3, 17, pages - 1],
        "{name}"
    );
    assert!(scanner.round(&tracker).unwrap().is_clean(), "{name}");
    touch(&mem, 17, 0);
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), base),
        vec![17],
        "{name}"
    );
}

#[test]
fn memfd_shared_mapping() {
    let mem = Mapping::new(Backing::Memfd, 64 * PAGE, 0, Thp::Default).unwrap();
    shared_mapping_case("memfd", mem, MemoryKind::Shmem);
}

#[test]
fn file_backed_shared_mapping() {
    let file = tempfile::tempfile().unwrap();
    let mem = Mapping::new(Backing::File(file), 64 * PAGE, 0, Thp::Default).unwrap();
    shared_mapping_case("file", mem, MemoryKind::SharedFile);
}

/// A 4 MiB THP-advised mapping, populated, or `None` (with a loud skip) if no THP formed.
fn thp_mapping(test: &str) -> Option<Mapping> {
    match thp_mode().as_deref() {
        Some("always") | Some("madvise") => {}
        mode => {
            skip(
                test,
                &format!("transparent huge pages are off here ({mode:?})"),
            );
            return None;
        }
    }
    let mem = Mapping::new(Backing::AnonPrivate, 2 * HUGE, HUGE, Thp::Huge).unwrap();
    mem.fill(0, 2 * HUGE, 0x77).unwrap();
    if !(is_huge(mem.addr()) && is_huge(mem.addr() + HUGE)) {
        skip(
            test,
            "no THP formed in a MADV_HUGEPAGE mapping (fragmented memory?)",
        );
        return None;
    }
    Some(mem)
}

#[test]
fn thp_dirtied_before_arming_then_dropped_reports_whole_run() {
    let Some(mem) = thp_mapping("thp_dirtied_before_arming_then_dropped_reports_whole_run") else {
        return;
    };
    let tracker = track(&mem);
    let mut scanner = scanner();
    assert!(scanner.round(&tracker).unwrap().is_clean());
    assert!(is_huge(mem.addr()), "arming split the THP");
    mem.advise(0, HUGE, Advice::DontNeed).unwrap();
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(round.dirty(), &[mem.addr()..mem.addr() + HUGE][..]);
    assert_eq!(round.stats().pages, HUGE / PAGE);
    assert!(scanner.round(&tracker).unwrap().is_clean());
}

#[test]
fn write_to_armed_thp_reports_4k_only() {
    let Some(mem) = thp_mapping("write_to_armed_thp_reports_4k_only") else {
        return;
    };
    let tracker = track(&mem);
    let mut scanner = scanner();
    assert!(scanner.round(&tracker).unwrap().is_clean());
    let base = mem.addr();
    mem.write_u64(5 * PAGE + 16, 1).unwrap();
    mem.write_u64(HUGE + 511 * PAGE, 2).unwrap();
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, base), vec![5, 1023]);
    assert!(scanner.round(&tracker).unwrap().is_clean());
    // The rest of each THP stays clean; another page of it reports on its own.
    mem.write_u64(6 * PAGE, 3).unwrap();
    assert_eq!(dirty_pages(scanner.round(&tracker).unwrap(), base), vec![6]);
}

#[test]
fn thp_with_page_budget_below_huge_page() {
    let Some(mem) = thp_mapping("thp_with_page_budget_below_huge_page") else {
        return;
    };
    let tracker = track(&mem);
    let mut scanner = scanner_with(ScanOptions {
        max_pages: Some(100),
        ..ScanOptions::default()
    });
    let base = mem.addr();
    let (seen, _) = full_pass(&mut scanner, &tracker, base, 100);
    assert!(seen.is_empty());
    // A whole THP dropped (512 pages) and a 4 KiB write, under a 100-page budget.
    mem.advise(HUGE, HUGE, Advice::DontNeed).unwrap();
    mem.write_u64(7 * PAGE, 1).unwrap();
    let (seen, rounds) = full_pass(&mut scanner, &tracker, base, 100);
    let mut want = vec![7];
    want.extend(512..1024);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), want);
    assert!(seen.values().all(|&n| n == 1), "a page reported twice");
    assert!(rounds >= 6, "513 pages in {rounds} rounds of at most 100");
}

#[test]
fn thp_policy_disable_keeps_4k_pages() {
    if thp_mode().as_deref() == Some("never") || thp_mode().is_none() {
        skip(
            "thp_policy_disable_keeps_4k_pages",
            "transparent huge pages are off here: nothing to disable",
        );
        return;
    }
    // THP advised at mapping time; registering with ThpPolicy::Disable must override it.
    let mem = Mapping::new(Backing::AnonPrivate, 2 * HUGE, HUGE, Thp::Huge).unwrap();
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker
        .register_with(
            mem.range(),
            RegisterOptions {
                thp: ThpPolicy::Disable,
                ..RegisterOptions::default()
            },
        )
        .unwrap();
    tracker.arm().unwrap();
    let mut scanner = scanner();
    mem.fill(0, HUGE, 9).unwrap();
    assert!(
        !is_huge(mem.addr()),
        "a THP formed despite ThpPolicy::Disable"
    );
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(round.dirty(), &[mem.addr()..mem.addr() + HUGE][..]);
    mem.write_u64(3 * PAGE, 1).unwrap();
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), mem.addr()),
        vec![3]
    );
}

#[test]
fn registration_errors_are_typed() {
    let mut mem = anon(16);
    let base = mem.addr();
    let mut tracker = Tracker::new(Uffd::new().unwrap());

    // Unaligned start, unaligned end, empty.
    for r in [base + 1..base + PAGE * 4, base..base + 100, base..base] {
        match tracker.register(r.clone()) {
            Err(TrackerError::Unaligned { align, .. }) => assert_eq!(align, PAGE),
            other => panic!("{r:x?}: expected Unaligned, got {other:?}"),
        }
    }
    assert!(tracker.ranges().is_empty());

    // Overlapping a range this tracker already has (same, inside, straddling).
    tracker.register(base + 4 * PAGE..base + 8 * PAGE).unwrap();
    for r in [
        base + 4 * PAGE..base + 8 * PAGE,
        base + 5 * PAGE..base + 6 * PAGE,
        base + 2 * PAGE..base + 5 * PAGE,
        base..base + 16 * PAGE,
    ] {
        match tracker.register(r.clone()) {
            Err(TrackerError::Overlap {
                other_start,
                other_end,
                ..
            }) => assert_eq!((other_start, other_end), (base + 4 * PAGE, base + 8 * PAGE)),
            other => panic!("{r:x?}: expected Overlap, got {other:?}"),
        }
    }

    // Already registered with another userfaultfd.
    let mut other = Tracker::new(Uffd::new().unwrap());
    match other.register(base + 4 * PAGE..base + 8 * PAGE) {
        Err(TrackerError::Busy { start, end }) => {
            assert_eq!((start, end), (base + 4 * PAGE, base + 8 * PAGE))
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    match other.register(base + 6 * PAGE..base + 10 * PAGE) {
        Err(TrackerError::Busy { .. }) => {}
        other => panic!("expected Busy for a partial overlap, got {other:?}"),
    }
    assert!(other.ranges().is_empty());

    // Not (fully) mapped.
    mem.unmap(12 * PAGE, 2 * PAGE).unwrap();
    match tracker.register(base + 10 * PAGE..base + 16 * PAGE) {
        Err(TrackerError::NotMapped {
            hole_start,
            hole_end,
            ..
        }) => assert_eq!((hole_start, hole_end), (base + 12 * PAGE, base + 14 * PAGE)),
        other => panic!("expected NotMapped, got {other:?}"),
    }
    match tracker.register(base + 12 * PAGE..base + 14 * PAGE) {
        Err(TrackerError::NotMapped { .. }) => {}
        other => panic!("expected NotMapped for a wholly unmapped range, got {other:?}"),
    }

    // Unregistering something not tracked.
    match tracker.unregister(base..base + PAGE) {
        Err(TrackerError::NotTracked { .. }) => {}
        other => panic!("expected NotTracked, got {other:?}"),
    }

    // Failed attempts left the tracker as it was, and it still works.
    assert_eq!(tracker.ranges().len(), 1);
    tracker.arm().unwrap();
    let mut scanner = scanner();
    touch(&mem, 5, 1);
    touch(&mem, 1, 1); // not tracked: not reported
    assert_eq!(dirty_pages(scanner.round(&tracker).unwrap(), base), vec![5]);
}

#[test]
fn invalid_scan_options_are_refused() {
    use precopy::scanner::Error;
    for opts in [
        ScanOptions {
            vec_len: 0,
            ..ScanOptions::default()
        },
        ScanOptions {
            threads: 0,
            ..ScanOptions::default()
        },
        ScanOptions {
            max_pages: Some(0),
            ..ScanOptions::default()
        },
        ScanOptions {
            max_pages: Some(10),
            threads: 2,
            ..ScanOptions::default()
        },
    ] {
        match Scanner::new(opts) {
            Err(Error::InvalidOptions(_)) => {}
            other => panic!("{opts:?}: expected InvalidOptions, got {other:?}"),
        }
    }
}

#[test]
fn several_ranges_and_threads() {
    // Three separate mappings in one tracker, scanned by 1 and 3 threads: same answer.
    let maps: Vec<Mapping> = (0..3).map(|_| anon(100)).collect();
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    for m in &maps {
        tracker.register(m.range()).unwrap();
    }
    tracker.arm().unwrap();
    assert_eq!(tracker.ranges().len(), 3);
    for threads in [1usize, 3] {
        let mut scanner = scanner_with(ScanOptions {
            threads,
            vec_len: 5,
            ..ScanOptions::default()
        });
        let mut want = Vec::new();
        for (i, m) in maps.iter().enumerate() {
            for p in (i as u64..100).step_by(7) {
                touch(m, p, p);
                want.push(m.addr() + p * PAGE);
            }
        }
        want.sort_unstable();
        let round = scanner.round(&tracker).unwrap();
        assert_shape(round);
        assert!(round.complete());
        assert_eq!(round.pages().collect::<Vec<_>>(), want, "threads {threads}");
        assert!(scanner.round(&tracker).unwrap().is_clean());
    }
}
