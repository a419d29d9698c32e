//! Stress: writer threads write random values to random pages while the main thread runs rounds
//! and copies every reported page (dirty and untracked) into a mirror **after** each round
//! returns, as a pre-copy sender would. Once the writers stop and a final full pass ran, the
//! mirror must equal memory byte for byte, and so must the writers' own record (the shadow) of
//! what they wrote. A write lost by the tracker shows up as a mirror/memory difference.
//!
//! Sizes default to what a debug build runs in seconds; `PRECOPY_STRESS_MIB` and
//! `PRECOPY_STRESS_ROUNDS` scale them up (use `--release` for big runs); `PRECOPY_STRESS_VEC_LEN`
//! overrides the scanner's output buffer size.

mod common;

use common::*;
use precopy::sys::mem::{Advice, Backing, Mapping, Thp};
use precopy::{ScanOptions, Scanner, Tracker};
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Pages are owned by writers in blocks, so runs of adjacent pages get written too.
const BLOCK_PAGES: u64 = 64;

struct Cfg {
    name: &'static str,
    mib: u64,
    writers: u64,
    rounds: usize,
    opts: ScanOptions,
    /// Map with `MADV_HUGEPAGE` and populate before arming (armed THPs split on first write).
    thp: bool,
    /// Writers sometimes drop a page with `MADV_DONTNEED` (it then reads zero).
    dontneed: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn copy_out(mem: &Mapping, mirror: &mut [u8], ranges: &[Range<u64>]) {
    for r in ranges {
        let off = (r.start - mem.addr()) as usize;
        let len = (r.end - r.start) as usize;
        mem.read(off as u64, &mut mirror[off..off + len]).unwrap();
    }
}

/// Per-page history, to explain a mismatch: the round count when a writer last wrote the page
/// (read after the write) and the last round that reported it.
struct History {
    rounds_done: AtomicU64,
    last_write: Vec<AtomicU64>,
    last_report: Vec<AtomicU64>,
}

impl History {
    fn new(pages: u64) -> History {
        History {
            rounds_done: AtomicU64::new(0),
            last_write: (0..pages).map(|_| AtomicU64::new(u64::MAX)).collect(),
            last_report: (0..pages).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }
}

/// One round: copy what it reports. Returns (pages reported, whether the round completed).
fn round_and_copy(
    scanner: &mut Scanner,
    tracker: &Tracker,
    mem: &Mapping,
    mirror: &mut [u8],
    ranges: &mut Vec<Range<u64>>,
    history: &History,
) -> (u64, bool) {
    let round = scanner.round(tracker).expect("round");
    assert!(
        round.untracked().is_empty(),
        "nothing changed the layout, yet {:x?} is untracked",
        round.untracked()
    );
    ranges.clear();
    ranges.extend(round.dirty().iter().cloned());
    let (pages, complete) = (round.stats().pages, round.complete());
    let n = history.rounds_done.fetch_add(1, Ordering::SeqCst);
    for r in ranges.iter() {
        for a in (r.start..r.end).step_by(PAGE as usize) {
            history.last_report[((a - mem.addr()) / PAGE) as usize].store(n, Ordering::Relaxed);
        }
    }
    // Contents are read only now, after the round returned (and re-protected the pages).
    copy_out(mem, mirror, ranges);
    (pages, complete)
}

/// What the writer threads share with the main thread.
struct Shared<'a> {
    mem: &'a Mapping,
    shadow: &'a [AtomicU64],
    stop: &'a AtomicBool,
    writes: &'a AtomicU64,
    history: &'a History,
}

fn writer(id: u64, cfg_writers: u64, dontneed: bool, shared: &Shared<'_>) {
    let Shared {
        mem,
        shadow,
        stop,
        writes,
        history,
    } = *shared;
    let pages = mem.len() / PAGE;
    let blocks: Vec<u64> = (0..pages / BLOCK_PAGES)
        .filter(|b| b % cfg_writers == id)
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0000 + id);
    let words_per_page = PAGE / 8;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let block = blocks[rng.random_range(0..blocks.len())];
        let first = block * BLOCK_PAGES + rng.random_range(0..BLOCK_PAGES);
        let op = rng.random_range(0..1000u32);
        if dontneed && op < 3 {
            mem.advise(first * PAGE, PAGE, Advice::DontNeed).unwrap();
            for w in 0..words_per_page {
                shadow[(first * words_per_page + w) as usize].store(0, Ordering::Relaxed);
            }
            let round = history.rounds_done.load(Ordering::SeqCst);
            history.last_write[first as usize].store(round, Ordering::Relaxed);
        } else {
            // A run of 1..=8 pages inside the block, one random word in each.
            let run = rng
                .random_range(1..=8u64)
                .min(BLOCK_PAGES - first % BLOCK_PAGES);
            for p in first..first + run {
                let word = p * words_per_page + rng.random_range(0..words_per_page);
                let value: u64 = rng.random();
                mem.write_u64(word * 8, value).unwrap();
                shadow[word as usize].store(value, Ordering::Relaxed);
                let round = history.rounds_done.load(Ordering::SeqCst);
                history.last_write[p as usize].store(round, Ordering::Relaxed);
            }
        }
        n += 1;
        if n.is_multiple_of(64) {
            writes.fetch_add(64, Ordering::Relaxed);
            std::thread::yield_now();
        }
    }
    writes.fetch_add(n % 64, Ordering::Relaxed);
}

fn stress(cfg: Cfg) {
    let mib = env_u64("PRECOPY_STRESS_MIB").unwrap_or(cfg.mib);
    let rounds = env_u64("PRECOPY_STRESS_ROUNDS").map_or(cfg.rounds, |r| r as usize);
    let bytes = mib << 20;
    let mem = if cfg.thp {
        Mapping::new(Backing::AnonPrivate, bytes, HUGE, Thp::Huge).unwrap()
    } else {
        Mapping::new(Backing::AnonPrivate, bytes, 0, Thp::Default).unwrap()
    };
    let words = (bytes / 8) as usize;
    let shadow: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
    let mut mirror = vec![0u8; bytes as usize];
    if cfg.thp {
        // Fill before arming; the mirror and shadow start as a copy.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (i, s) in shadow.iter().enumerate().step_by(61) {
            let v: u64 = rng.random();
            mem.write_u64(i as u64 * 8, v).unwrap();
            s.store(v, Ordering::Relaxed);
        }
        mem.read(0, &mut mirror).unwrap();
        if !is_huge(mem.addr()) {
            eprintln!(
                "stress {}: NOTE no THP formed (THP mode {:?}); running on 4 KiB pages",
                cfg.name,
                thp_mode()
            );
        }
    }
    let tracker = track(&mem);
    let mut opts = cfg.opts;
    if let Some(v) = env_u64("PRECOPY_STRESS_VEC_LEN") {
        opts.vec_len = v as usize;
    }
    let mut scanner = scanner_with(opts);
    let mut ranges = Vec::new();
    let history = History::new(bytes / PAGE);
    let stop = AtomicBool::new(false);
    let writes = Arc::new(AtomicU64::new(0));

    let (busy_rounds, pages_total) = std::thread::scope(|s| {
        for id in 0..cfg.writers {
            let shared = Shared {
                mem: &mem,
                shadow: &shadow,
                stop: &stop,
                writes: &writes,
                history: &history,
            };
            s.spawn(move || writer(id, cfg.writers, cfg.dontneed, &shared));
        }
        let mut busy = 0usize;
        let mut total = 0u64;
        for _ in 0..rounds {
            let (pages, _) = round_and_copy(
                &mut scanner,
                &tracker,
                &mem,
                &mut mirror,
                &mut ranges,
                &history,
            );
            if pages > 0 {
                busy += 1;
            }
            total += pages;
            // Let the writers run between rounds (the rounds also race them).
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        stop.store(true, Ordering::Relaxed);
        (busy, total)
    });

    // Final pass: finish the pass in progress (a page budget may have stopped mid-way), then
    // one whole pass that starts at the beginning.
    for _ in 0..2 {
        let mut n = 0;
        while !round_and_copy(
            &mut scanner,
            &tracker,
            &mem,
            &mut mirror,
            &mut ranges,
            &history,
        )
        .1
        {
            n += 1;
            assert!(n < 1_000_000, "final pass does not complete");
        }
    }

    let writes = writes.load(Ordering::Relaxed);
    eprintln!(
        "stress {}: {mib} MiB, {} writers, {rounds} rounds ({busy_rounds} of them reported pages, \
         {pages_total} pages in all), {writes} write operations",
        cfg.name, cfg.writers
    );
    assert!(writes > 0, "the writers never ran");
    if busy_rounds < rounds / 10 {
        // Scheduling, not correctness: the writers were starved (a loaded machine).
        eprintln!(
            "stress {}: NOTE only {busy_rounds} of {rounds} rounds saw writes; the race was weak",
            cfg.name
        );
    }

    let mut now = vec![0u8; bytes as usize];
    mem.read(0, &mut now).unwrap();
    let bad: Vec<usize> = (0..now.len())
        .step_by(PAGE as usize)
        .filter(|&o| now[o..o + PAGE as usize] != mirror[o..o + PAGE as usize])
        .collect();
    if !bad.is_empty() {
        for &o in bad.iter().take(8) {
            let page = o as u64 / PAGE;
            let words: Vec<usize> = (o / 8..(o + PAGE as usize) / 8)
                .filter(|&w| now[w * 8..w * 8 + 8] != mirror[w * 8..w * 8 + 8])
                .collect();
            let w = words[0];
            eprintln!(
                "page {page}: {} words differ, first word {w}: memory {:#x} mirror {:#x} shadow \
                 {:#x}; last written after round {} (of {}), last reported by round {}; \
                 reads as written now: {}",
                words.len(),
                u64::from_ne_bytes(now[w * 8..w * 8 + 8].try_into().unwrap()),
                u64::from_ne_bytes(mirror[w * 8..w * 8 + 8].try_into().unwrap()),
                shadow[w].load(Ordering::Relaxed),
                history.last_write[page as usize].load(Ordering::Relaxed) as i64,
                history.rounds_done.load(Ordering::Relaxed),
                history.last_report[page as usize].load(Ordering::Relaxed) as i64,
                is_written(mem.addr() + page * PAGE),
            );
        }
        panic!(
            "stress {}: mirror differs from memory in {} pages (a write was lost)",
            cfg.name,
            bad.len()
        );
    }
    for (i, s) in shadow.iter().enumerate() {
        let mem_word = u64::from_ne_bytes(now[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(
            s.load(Ordering::Relaxed),
            mem_word,
            "stress {}: shadow differs from memory at word {i}",
            cfg.name
        );
    }
    // And nothing is left to report.
    let (seen, _) = full_pass(&mut scanner, &tracker, mem.addr(), 1_000_000);
    assert!(
        seen.is_empty(),
        "stress {}: pages left after the final pass",
        cfg.name
    );
}

#[test]
fn stress_default_options() {
    stress(Cfg {
        name: "default",
        mib: 64,
        writers: 4,
        rounds: 300,
        opts: ScanOptions::default(),
        thp: false,
        dontneed: false,
    });
}

#[test]
fn stress_small_buffer_and_page_budget() {
    stress(Cfg {
        name: "vec_len 3, max_pages 200",
        mib: 16,
        writers: 4,
        rounds: 300,
        opts: ScanOptions {
            vec_len: 3,
            max_pages: Some(200),
            ..ScanOptions::default()
        },
        thp: false,
        dontneed: true,
    });
}

#[test]
fn stress_thp_dontneed_two_scan_threads() {
    stress(Cfg {
        name: "THP populated before arming, MADV_DONTNEED, 2 scan threads",
        mib: 64,
        writers: 4,
        rounds: 300,
        opts: ScanOptions {
            threads: 2,
            ..ScanOptions::default()
        },
        thp: true,
        dontneed: true,
    });
}
