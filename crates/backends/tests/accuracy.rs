//! Behaviour of every backend that works on this kernel, driven the way `precopy bench` and an
//! embedder drive them: no write may ever be missed.

use precopy_backends::{BackendKind, DirtyLog, check, open};
use precopy_sys::mem::{Backing, Mapping, Thp};
use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The tracker of mprotect is one per process: tests take turns.
static TURN: Mutex<()> = Mutex::new(());

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn pages_of(out: &[Range<u64>], base: u64, page: u64, n: u64) -> HashSet<u64> {
    out.iter()
        .flat_map(|r| (r.start..r.end).step_by(page as usize))
        .filter(|a| *a >= base && *a < base + n * page)
        .map(|a| (a - base) / page)
        .collect()
}

fn usable() -> Vec<BackendKind> {
    BackendKind::ALL
        .into_iter()
        .filter(|k| match check(*k) {
            Ok(()) => true,
            Err(u) => {
                eprintln!("SKIP {k}: {}", u.reason);
                false
            }
        })
        .collect()
}

#[test]
fn quiescent_rounds_report_every_written_page() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let page = precopy_sys::page_size();
    let n = 2048u64;
    for kind in usable() {
        for thp in [Thp::NoHuge, Thp::Huge] {
            let mem = Mapping::new(Backing::AnonPrivate, n * page, 2 << 20, thp).unwrap();
            mem.fill(0, n * page, 1).unwrap();
            let mut b = open(kind, &[mem.range()]).unwrap();
            b.start().unwrap();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut out = Vec::new();
            for round in 0..6 {
                let written: HashSet<u64> = (0..n / 16).map(|_| xorshift(&mut seed) % n).collect();
                let list: Vec<u64> = written.iter().copied().collect();
                std::thread::scope(|s| {
                    for chunk in list.chunks(list.len().div_ceil(2)) {
                        let mem = &mem;
                        s.spawn(move || {
                            for p in chunk {
                                mem.write_u64(p * page + 8 * (round % 8), round).unwrap();
                            }
                        });
                    }
                });
                out.clear();
                b.collect(&mut out).unwrap();
                let reported = pages_of(&out, mem.addr(), page, n);
                let missed: Vec<_> = written.difference(&reported).collect();
                assert!(
                    missed.is_empty(),
                    "{kind} {thp:?} round {round}: missed {} of {} pages",
                    missed.len(),
                    written.len()
                );
                if thp == Thp::NoHuge && kind != BackendKind::SoftDirty {
                    assert_eq!(reported.len(), written.len(), "{kind}: extra pages");
                }
            }
            b.stop().unwrap();
        }
    }
}

#[test]
fn writes_racing_a_collection_land_in_it_or_the_next() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let page = precopy_sys::page_size();
    // Spread over many pages, and crowded on a few (where one thread's fault opens a page the
    // other thread stores to without faulting).
    for (kind, n) in usable().into_iter().flat_map(|k| [(k, 512u64), (k, 8)]) {
        let mem = Arc::new(Mapping::new(Backing::AnonPrivate, n * page, 0, Thp::NoHuge).unwrap());
        mem.fill(0, n * page, 1).unwrap();
        let mut b = open(kind, &[mem.range()]).unwrap();
        if b.needs_pause() {
            eprintln!(
                "SKIP {kind} in the racing test: it needs writers paused around a collection"
            );
            continue;
        }
        b.start().unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (mem, epoch) = (Arc::clone(&mem), Arc::clone(&epoch));
                std::thread::spawn(move || {
                    let mut seed = 0x1234_5678 + t;
                    let mut log = Vec::new();
                    for i in 0..20_000u64 {
                        let p = xorshift(&mut seed) % n;
                        // Began after collection `before` began ...
                        let before = epoch.load(Ordering::SeqCst);
                        mem.write_u64(p * page + 8 * t, i).unwrap();
                        // ... and completed before collection `after + 1` began.
                        log.push((p, before, epoch.load(Ordering::SeqCst)));
                    }
                    log
                })
            })
            .collect();
        let mut reports: Vec<HashSet<u64>> = vec![HashSet::new()];
        let mut out = Vec::new();
        let mut finishing = 0;
        while finishing < 2 {
            if writers.iter().all(|w| w.is_finished()) {
                done.store(true, Ordering::SeqCst);
                finishing += 1;
            }
            epoch.fetch_add(1, Ordering::SeqCst);
            out.clear();
            b.collect(&mut out).unwrap();
            reports.push(pages_of(&out, mem.addr(), page, n));
        }
        let logs: Vec<(u64, u64, u64)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        // A store is reported by a collection that began after the store began (or the one in
        // progress then) and no later than the one after the first that began after it ended.
        for (p, before, after) in &logs {
            let (lo, hi) = (*before as usize, *after as usize + 2);
            let seen = (lo..=hi).any(|k| reports.get(k).is_some_and(|r| r.contains(p)));
            assert!(
                seen,
                "{kind}: page {p} of {n} written between collections {lo} and {} was lost",
                after + 1
            );
        }
        eprintln!(
            "{kind}: {} racing writes to {n} pages over {} collections, none lost",
            logs.len(),
            reports.len() - 1
        );
        b.stop().unwrap();
    }
}
