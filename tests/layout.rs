//! A tracked range whose layout changes mid-run: part unmapped, replaced with `MAP_FIXED`,
//! mremapped away, or unregistered. Pages written in the still-tracked parts, before and after
//! the hole, must all be reported; the hole must come back in `Round::untracked` with the right
//! reason, round after round, never as clean.
//!
//! Everything here runs inside ONE `#[test]`, case after case, so that no other test thread is
//! started while a case runs: a new thread maps a small signal stack, and the kernel may put it
//! in the hole a munmap or mremap left, rightly turning an expected `Unmapped` into `NotTracked`
//! (seen here). Each case prints its name to stderr as it passes.

mod common;

use common::*;
use precopy::sys::mem::Mapping;
use precopy::{Round, ScanOptions, Scanner, Tracker, UntrackedReason};
use std::collections::BTreeMap;
use std::ops::Range;

const PAGES: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Unmap,
    ReplaceFixed,
    MoveOut,
    /// Unregistered behind the tracker's back (another party, or a bug elsewhere).
    ForeignUnregister,
}

impl Change {
    fn reason(self) -> UntrackedReason {
        match self {
            Change::Unmap | Change::MoveOut => UntrackedReason::Unmapped,
            Change::ReplaceFixed | Change::ForeignUnregister => UntrackedReason::NotTracked,
        }
    }

    /// Whether the hole can still be written (it is mapped).
    fn writable(self) -> bool {
        matches!(self, Change::ReplaceFixed | Change::ForeignUnregister)
    }
}

/// Applies `change` to pages `hole` of `mem`; returns a moved-out mapping to keep alive.
fn apply(
    change: Change,
    mem: &mut Mapping,
    tracker: &Tracker,
    hole: &Range<u64>,
) -> Option<Mapping> {
    let (off, len) = (hole.start * PAGE, (hole.end - hole.start) * PAGE);
    match change {
        Change::Unmap => mem.unmap(off, len).unwrap(),
        Change::ReplaceFixed => mem.replace_anonymous(off, len).unwrap(),
        Change::MoveOut => return Some(mem.move_out(off, len).unwrap()),
        Change::ForeignUnregister => {
            precopy::sys::uffd::unregister(tracker.uffd().fd(), mem.addr() + off, len).unwrap()
        }
    }
    None
}

/// An untracked part, in pages relative to the range start, and why.
type Part = (Range<u64>, UntrackedReason);

/// Everything a pass (rounds until one completes) reported: times each page was reported and
/// the untracked parts (page ranges relative to `base`).
fn pass(scanner: &mut Scanner, tracker: &Tracker, base: u64) -> (BTreeMap<u64, u32>, Vec<Part>) {
    let mut seen = BTreeMap::new();
    let mut untracked = Vec::new();
    for _ in 0..10_000 {
        let round: &Round = scanner.round(tracker).unwrap();
        assert_shape(round);
        for p in dirty_pages(round, base) {
            *seen.entry(p).or_insert(0) += 1;
        }
        untracked.extend(untracked_pages(round, base));
        if round.complete() {
            // Merge untracked pieces a budget split across rounds.
            untracked.sort_by_key(|(r, _)| r.start);
            let mut merged: Vec<Part> = Vec::new();
            for (r, why) in untracked {
                match merged.last_mut() {
                    Some((last, w)) if last.end == r.start && *w == why => last.end = r.end,
                    _ => merged.push((r, why)),
                }
            }
            return (seen, merged);
        }
    }
    panic!("pass did not complete");
}

/// The untracked parts must be exactly `hole`, with the reason `change` implies. One exception:
/// a scanner with several threads spawns them per round, and a new thread's signal stack is a
/// small mapping the kernel may place in the hole a munmap or mremap left; the scanner then
/// rightly calls that part `NotTracked`. Any reason is fine there, but the hole must be covered.
/// That only happens with `threads > 1` because the test runs alone (see the module docs).
fn check_untracked(
    untracked: &[Part],
    hole: &Range<u64>,
    change: Change,
    opts: &ScanOptions,
    ctx: &str,
) {
    if opts.threads == 1 || change.reason() == UntrackedReason::NotTracked {
        assert_eq!(
            untracked,
            &[(hole.clone(), change.reason())][..],
            "{ctx}: untracked"
        );
        return;
    }
    // The layout changed during the round (the other scan thread's signal stack came and went),
    // so parts may overlap: ask only that their union is exactly the hole.
    let mut covered: Vec<u64> = untracked.iter().flat_map(|(r, _)| r.clone()).collect();
    covered.sort_unstable();
    covered.dedup();
    assert_eq!(
        covered,
        hole.clone().collect::<Vec<_>>(),
        "{ctx}: untracked {untracked:?} is not exactly {hole:?}"
    );
}

fn hole_case(change: Change, hole: Range<u64>, opts: ScanOptions) {
    let ctx = format!("{change:?} of pages {hole:?} with {opts:?}");
    let mut mem = anon(PAGES);
    mem.fill(0, PAGES * PAGE, 0x33).unwrap();
    let base = mem.addr();
    let tracker = track(&mem);
    let mut scanner = scanner_with(opts);
    let (seen, untracked) = pass(&mut scanner, &tracker, base);
    assert!(
        seen.is_empty() && untracked.is_empty(),
        "{ctx}: clean start"
    );

    let outside: Vec<u64> = (0..PAGES).filter(|p| !hole.contains(p)).collect();
    // Written before the change, on both sides of the hole and inside it.
    let before: Vec<u64> = outside.iter().copied().filter(|p| p % 5 == 0).collect();
    for &p in &before {
        touch(&mem, p, 1);
    }
    for p in hole.clone() {
        touch(&mem, p, 1);
    }
    let _keep = apply(change, &mut mem, &tracker, &hole);
    // Written after the change, on both sides, and inside the hole where it is still mapped.
    let after: Vec<u64> = outside.iter().copied().filter(|p| p % 7 == 3).collect();
    for &p in &after {
        touch(&mem, p, 2);
    }
    if change.writable() {
        for p in hole.clone() {
            touch(&mem, p, 2);
        }
    }
    let mut want: Vec<u64> = before.iter().chain(&after).copied().collect();
    want.sort_unstable();
    want.dedup();
    assert!(want.iter().any(|&p| p < hole.start) || hole.start == 0);
    assert!(want.iter().any(|&p| p >= hole.end) || hole.end == PAGES);

    let (seen, untracked) = pass(&mut scanner, &tracker, base);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        want,
        "{ctx}: dirty pages"
    );
    assert!(
        seen.values().all(|&n| n == 1),
        "{ctx}: reported twice {seen:?}"
    );
    check_untracked(&untracked, &hole, change, &opts, &ctx);

    // Still untracked next time (never silently clean), and the tracked parts still work.
    touch(&mem, outside[0], 3);
    touch(&mem, *outside.last().unwrap(), 3);
    let (seen, untracked) = pass(&mut scanner, &tracker, base);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![outside[0], *outside.last().unwrap()],
        "{ctx}: second pass"
    );
    check_untracked(
        &untracked,
        &hole,
        change,
        &opts,
        &format!("{ctx}: second pass"),
    );
}

fn option_sets() -> Vec<ScanOptions> {
    let d = ScanOptions::default();
    vec![
        d,
        ScanOptions { vec_len: 1, ..d },
        ScanOptions { vec_len: 2, ..d },
        ScanOptions {
            max_pages: Some(3),
            ..d
        },
        ScanOptions {
            max_pages: Some(1),
            vec_len: 1,
            ..d
        },
        ScanOptions { threads: 2, ..d },
    ]
}

fn holes() -> Vec<Range<u64>> {
    vec![24..32, 0..8, 56..64, 31..32]
}

fn run(change: Change) {
    for opts in option_sets() {
        for hole in holes() {
            hole_case(change, hole, opts);
        }
    }
}

#[test]
fn layout_changes_mid_run() {
    let cases: [(&str, fn()); 6] = [
        ("partly_unmapped", || run(Change::Unmap)),
        ("partly_replaced_with_map_fixed", || {
            run(Change::ReplaceFixed)
        }),
        ("partly_mremapped_away", || run(Change::MoveOut)),
        ("partly_unregistered_behind_the_trackers_back", || {
            run(Change::ForeignUnregister)
        }),
        (
            "several_holes_of_every_kind_in_one_range",
            several_holes_of_every_kind_in_one_range,
        ),
        (
            "unregistered_through_the_tracker_is_simply_gone",
            unregistered_through_the_tracker_is_simply_gone,
        ),
    ];
    for (name, case) in cases {
        case();
        eprintln!("layout case {name}: ok");
    }
}

fn several_holes_of_every_kind_in_one_range() {
    for opts in option_sets() {
        let ctx = format!("{opts:?}");
        let mut mem = anon(128);
        let base = mem.addr();
        let tracker = track(&mem);
        let mut scanner = scanner_with(opts);
        let plan = [
            (Change::ReplaceFixed, 10..14),
            (Change::Unmap, 30..33),
            (Change::ForeignUnregister, 50..60),
            (Change::MoveOut, 80..82),
            (Change::ReplaceFixed, 100..101),
        ];
        let in_hole = |p: u64| plan.iter().any(|(_, h)| h.contains(&p));
        for p in (0..128).step_by(3) {
            touch(&mem, p, 1);
        }
        let mut keep = Vec::new();
        for (change, hole) in &plan {
            keep.push(apply(*change, &mut mem, &tracker, hole));
        }
        for p in (1..128).step_by(4).filter(|&p| !in_hole(p)) {
            touch(&mem, p, 2);
        }
        let mut want: Vec<u64> = (0..128)
            .filter(|&p| !in_hole(p) && (p % 3 == 0 || p % 4 == 1))
            .collect();
        want.sort_unstable();
        let (seen, untracked) = pass(&mut scanner, &tracker, base);
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), want, "{ctx}");
        assert!(seen.values().all(|&n| n == 1), "{ctx}: reported twice");
        for (change, hole) in &plan {
            let parts: Vec<_> = untracked
                .iter()
                .filter(|(r, _)| r.start < hole.end && hole.start < r.end)
                .cloned()
                .collect();
            check_untracked(&parts, hole, *change, &opts, &ctx);
        }
        assert!(
            untracked
                .iter()
                .all(|(r, _)| in_hole(r.start) && in_hole(r.end - 1)),
            "{ctx}: untracked outside the holes: {untracked:?}"
        );
    }
}

fn unregistered_through_the_tracker_is_simply_gone() {
    let mem = anon(PAGES);
    let base = mem.addr();
    let mut tracker = track(&mem);
    let mut scanner = scanner();
    for p in [2, 20, 25, 40, 60] {
        touch(&mem, p, 1);
    }
    tracker
        .unregister(base + 16 * PAGE..base + 32 * PAGE)
        .unwrap();
    assert_eq!(
        tracker
            .ranges()
            .iter()
            .map(|r| r.range())
            .collect::<Vec<_>>(),
        vec![
            base..base + 16 * PAGE,
            base + 32 * PAGE..base + PAGES * PAGE
        ]
    );
    for p in [3, 21, 41] {
        touch(&mem, p, 2);
    }
    let round = scanner.round(&tracker).unwrap();
    assert_eq!(dirty_pages(round, base), vec![2, 3, 40, 41, 60]);
    assert!(round.untracked().is_empty(), "{:?}", round.untracked());
    // Re-registering the part and arming it: tracked again from a clean start.
    tracker
        .register(base + 16 * PAGE..base + 32 * PAGE)
        .unwrap();
    tracker
        .arm_range(base + 16 * PAGE..base + 32 * PAGE)
        .unwrap();
    assert!(scanner.round(&tracker).unwrap().is_clean());
    touch(&mem, 17, 1);
    assert_eq!(
        dirty_pages(scanner.round(&tracker).unwrap(), base),
        vec![17]
    );
}
