//! Engine round cost against the kernel's own cost, measured in the same run.
//!
//! Over one private anonymous, populated range with THP off it times:
//! - `Scanner::round()` against a minimal raw `PAGEMAP_SCAN` loop (the fast-path masks,
//!   `WP_MATCHING | CHECK_WPASYNC`, a 4096-entry vector, resuming from `walk_end`: the kernel's
//!   cost with nothing else) with 0 %, 1 % scattered and 100 % of the pages written per round;
//! - `Tracker::arm()` against one raw `UFFDIO_WRITEPROTECT` over the range;
//! - a round split over 2 threads against 1 thread, on 1 GiB and on 8 GiB.
//!
//! The pages are re-dirtied before every iteration outside the timed part (`iter_custom`). Each
//! timed iteration is also recorded here, and the end of the run prints the medians and the
//! engine/raw ratios (criterion does not print ratios).
//!
//! Run: `cargo bench -p precopy --bench round`. Needs userfaultfd async write-protect and
//! `PAGEMAP_SCAN` (Linux 6.7+); without them it prints SKIP and exits. Set
//! `PRECOPY_BENCH_8G=0` to leave out the 8 GiB thread comparison (it needs 8 GiB of free RAM and
//! about a minute).

use criterion::{Criterion, SamplingMode};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_sys::abi::PageRegion;
use precopy_sys::mem::{Backing, Mapping, Thp};
use precopy_sys::pagemap::{self, EMPTY_REGION};
use precopy_tracker::{Tracker, Uffd};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const VEC_LEN: usize = 4096;
const SEED: u64 = 0x005e_ed0f_d17e;

/// Which pages are written before each timed round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    None,
    /// One page at a random offset in every block of 100 (about 1 %), seeded.
    Scattered,
    /// Every second page: the most separate regions a round can return (for the engine's
    /// per-region cost).
    Alternate,
    All,
}

impl Pattern {
    fn label(self) -> &'static str {
        match self {
            Pattern::None => "0%",
            Pattern::Scattered => "1%",
            Pattern::Alternate => "50%-alternate",
            Pattern::All => "100%",
        }
    }
}

/// A populated, registered and armed range, plus the page offsets each pattern writes.
struct Bed {
    map: Mapping,
    tracker: Tracker,
    scattered: Vec<u64>,
    page: u64,
    stamp: u64,
}

impl Bed {
    fn new(len: u64) -> std::io::Result<Option<Bed>> {
        let page = precopy_sys::page_size();
        let map = Mapping::new(Backing::AnonPrivate, len, 0, Thp::NoHuge)?;
        map.fill(0, len, 1)?;
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIP: round bench: no async write-protect userfaultfd here: {e}");
                return Ok(None);
            }
        };
        let mut tracker = Tracker::new(uffd);
        tracker
            .register(map.range())
            .map_err(std::io::Error::other)?;
        tracker.arm().map_err(std::io::Error::other)?;
        let pages = len / page;
        let mut rng = StdRng::seed_from_u64(SEED);
        let scattered = (0..pages)
            .step_by(100)
            .map(|block| {
                let p = block + rng.random_range(0..100.min(pages - block));
                p * page
            })
            .collect();
        Ok(Some(Bed {
            map,
            tracker,
            scattered,
            page,
            stamp: 0,
        }))
    }

    fn range(&self) -> Range<u64> {
        self.map.range()
    }

    /// Writes the pattern's pages (one store each: the cost is the write-protect fault).
    fn dirty(&mut self, pattern: Pattern) -> u64 {
        self.stamp += 1;
        let stamp = self.stamp;
        match pattern {
            Pattern::None => 0,
            Pattern::Scattered => {
                for &off in &self.scattered {
                    self.map.write_u64(off, stamp).expect("write");
                }
                self.scattered.len() as u64
            }
            Pattern::Alternate | Pattern::All => {
                let step = if pattern == Pattern::All { 1 } else { 2 };
                let mut off = 0;
                let mut n = 0;
                while off < self.map.len() {
                    self.map.write_u64(off, stamp).expect("write");
                    off += step * self.page;
                    n += 1;
                }
                n
            }
        }
    }
}

/// The kernel's cost with nothing else: one get-and-reprotect walk of `range`, resuming from
/// `walk_end`. Returns the bytes reported.
fn raw_round(fd: BorrowedFd<'_>, range: Range<u64>, buf: &mut [PageRegion]) -> u64 {
    let mut bytes = 0;
    let mut addr = range.start;
    while addr < range.end {
        let mut arg = pagemap::written_and_reprotect_arg(addr, range.end);
        let n = pagemap::scan(fd, &mut arg, buf).expect("PAGEMAP_SCAN");
        for r in &buf[..n] {
            bytes += r.end - r.start;
        }
        addr = arg.walk_end;
    }
    bytes
}

/// CPU time the calling thread has run (the scheduler's own count, in ns): unlike wall-clock
/// time, it leaves out the time other processes on a busy machine hold the CPU. The count is
/// brought up to date at scheduler ticks and switches, so it only resolves rounds of several ms.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat run time");
    Duration::from_nanos(ns)
}

/// Timings of two alternatives measured in alternation: wall-clock and the thread's CPU time.
#[derive(Default)]
struct Pair {
    a: Vec<Duration>,
    b: Vec<Duration>,
    a_cpu: Vec<Duration>,
    b_cpu: Vec<Duration>,
}

impl Pair {
    fn median_a(&self) -> Duration {
        median(&self.a)
    }
    fn median_b(&self) -> Duration {
        median(&self.b)
    }
    /// Median of the per-pair wall-clock ratios a/b: robust to load that drifts during the run.
    fn ratio(&self) -> f64 {
        ratio(&self.a, &self.b)
    }
    /// The same for CPU time: robust to preemption too. `None` when the rounds are shorter than
    /// the clock's update interval (the scheduler tick): then some readings are zero.
    fn cpu_ratio(&self) -> Option<f64> {
        let zero = |v: &[Duration]| v.iter().any(|d| d.is_zero());
        (!zero(&self.a_cpu) && !zero(&self.b_cpu)).then(|| ratio(&self.a_cpu, &self.b_cpu))
    }
}

fn ratio(a: &[Duration], b: &[Duration]) -> f64 {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-9))
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// Runs `a` and `b` `pairs` times each, alternating which goes first, with `prepare` (untimed)
/// before every single run.
fn paired(
    pairs: usize,
    prepare: &mut dyn FnMut(),
    a: &mut dyn FnMut(),
    b: &mut dyn FnMut(),
) -> Pair {
    let mut out = Pair::default();
    let time = |f: &mut dyn FnMut(), prepare: &mut dyn FnMut()| {
        prepare();
        let (t, c) = (Instant::now(), thread_cpu());
        f();
        (t.elapsed(), thread_cpu().saturating_sub(c))
    };
    for i in 0..pairs {
        let (ta, tb);
        if i % 2 == 0 {
            ta = time(a, prepare);
            tb = time(b, prepare);
        } else {
            tb = time(b, prepare);
            ta = time(a, prepare);
        }
        out.a.push(ta.0);
        out.a_cpu.push(ta.1);
        out.b.push(tb.0);
        out.b_cpu.push(tb.1);
    }
    out
}

/// Times `measure` `iters` times, running `prepare` untimed before each.
fn timed<P: FnMut(), M: FnMut()>(iters: u64, mut prepare: P, mut measure: M) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        prepare();
        let t = Instant::now();
        measure();
        total += t.elapsed();
    }
    total
}

fn scanner(threads: usize) -> Scanner {
    Scanner::new(ScanOptions {
        threads,
        verify_kernel: threads == 1,
        ..ScanOptions::default()
    })
    .expect("scanner")
}

/// One row of the summary.
struct Row {
    case: String,
    /// Pages, regions and ioctls of one engine round.
    detail: String,
    pair: Pair,
}

/// Criterion groups for engine against raw loop at each pattern, and arm against raw
/// write-protect, on `bed`; then the same in alternating pairs for the summary.
fn engine_vs_raw(
    c: &mut Criterion,
    bed: &RefCell<Bed>,
    rows: &mut Vec<Row>,
    threads: &mut Vec<Row>,
) {
    let mut engine = scanner(1);
    let mut engine2 = scanner(2);
    let mut buf = vec![EMPTY_REGION; VEC_LEN];
    // Start from a clean state: whatever populating left is reported once here.
    engine.round(&bed.borrow().tracker).expect("round");

    for pattern in [
        Pattern::None,
        Pattern::Scattered,
        Pattern::Alternate,
        Pattern::All,
    ] {
        // Sanity (untimed): both report exactly the written pages.
        let detail = {
            let mut b = bed.borrow_mut();
            let n = b.dirty(pattern);
            let round = engine.round(&b.tracker).expect("round");
            assert_eq!(round.stats().pages, n, "engine missed pages");
            assert!(round.untracked().is_empty());
            let st = round.stats();
            let detail = format!(
                "{} pages, {} regions, {} ioctls",
                st.pages, st.regions, st.ioctls
            );
            let n = b.dirty(pattern);
            let fd = b.tracker.uffd().pagemap();
            assert_eq!(raw_round(fd, b.range(), &mut buf), n * b.page, "raw loop");
            detail
        };
        let mut g = c.benchmark_group(format!("round_1GiB_{}", pattern.label()));
        g.sample_size(10).sampling_mode(SamplingMode::Flat);
        g.warm_up_time(Duration::from_millis(200));
        g.measurement_time(Duration::from_secs(1));
        let dirty = || {
            bed.borrow_mut().dirty(pattern);
        };
        g.bench_function("engine", |b| {
            b.iter_custom(|iters| {
                timed(iters, dirty, || {
                    engine.round(&bed.borrow().tracker).expect("round");
                })
            })
        });
        g.bench_function("raw", |b| {
            b.iter_custom(|iters| {
                timed(iters, dirty, || {
                    let b = bed.borrow();
                    let fd = b.tracker.uffd().pagemap();
                    std::hint::black_box(raw_round(fd, b.range(), &mut buf));
                })
            })
        });
        g.finish();

        // Paired, for the ratio: engine, raw, raw, engine, ...
        let pairs = match pattern {
            Pattern::None | Pattern::Scattered => 201,
            Pattern::Alternate | Pattern::All => 21,
        };
        let pair = paired(
            pairs,
            &mut || {
                bed.borrow_mut().dirty(pattern);
            },
            &mut || {
                engine.round(&bed.borrow().tracker).expect("round");
            },
            &mut || {
                let b = bed.borrow();
                let fd = b.tracker.uffd().pagemap();
                std::hint::black_box(raw_round(fd, b.range(), &mut buf));
            },
        );
        rows.push(Row {
            case: format!("round, {} written", pattern.label()),
            detail: detail.clone(),
            pair,
        });
        if matches!(pattern, Pattern::Scattered | Pattern::All) {
            let pairs = if pattern == Pattern::All { 21 } else { 101 };
            let pair = paired(
                pairs,
                &mut || {
                    bed.borrow_mut().dirty(pattern);
                },
                &mut || {
                    engine2.round(&bed.borrow().tracker).expect("round");
                },
                &mut || {
                    engine.round(&bed.borrow().tracker).expect("round");
                },
            );
            threads.push(Row {
                case: format!("1 GiB, {} written", pattern.label()),
                detail: detail.clone(),
                pair,
            });
        }
    }

    let mut g = c.benchmark_group("arm_1GiB");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(200));
    g.measurement_time(Duration::from_secs(1));
    // Un-protect (untimed) so that arming has every PTE to change, as after a round of writes.
    let unarm = || {
        let b = bed.borrow();
        let r = b.range();
        precopy_sys::uffd::writeprotect(b.tracker.uffd().fd(), r.start, r.end - r.start, false)
            .expect("un-protect");
    };
    let mut arm_engine = || {
        bed.borrow().tracker.arm().expect("arm");
    };
    let mut arm_raw = || {
        let b = bed.borrow();
        let r = b.range();
        precopy_sys::uffd::writeprotect(b.tracker.uffd().fd(), r.start, r.end - r.start, true)
            .expect("write-protect");
    };
    g.bench_function("engine", |b| {
        b.iter_custom(|iters| timed(iters, unarm, &mut arm_engine))
    });
    g.bench_function("raw", |b| {
        b.iter_custom(|iters| timed(iters, unarm, &mut arm_raw))
    });
    g.finish();
    let pair = paired(41, &mut { unarm }, &mut arm_engine, &mut arm_raw);
    rows.push(Row {
        case: "arm (write-protect all)".into(),
        detail: "one UFFDIO_WRITEPROTECT".into(),
        pair,
    });
}

/// Two threads against one, in alternating pairs, on a freshly made range of `len` bytes.
fn threads_big(len: u64, label: &str, rows: &mut Vec<Row>) {
    let bed = match Bed::new(len) {
        Ok(Some(b)) => RefCell::new(b),
        Ok(None) => return,
        Err(e) => {
            eprintln!("SKIP: {label} thread comparison: cannot set up {len} bytes: {e}");
            return;
        }
    };
    let mut one = scanner(1);
    let mut two = scanner(2);
    one.round(&bed.borrow().tracker).expect("round");
    for (pattern, pairs) in [(Pattern::Scattered, 21), (Pattern::All, 7)] {
        eprintln!("{label}, {} written: {pairs} pairs", pattern.label());
        let pair = paired(
            pairs,
            &mut || {
                bed.borrow_mut().dirty(pattern);
            },
            &mut || {
                two.round(&bed.borrow().tracker).expect("round");
            },
            &mut || {
                one.round(&bed.borrow().tracker).expect("round");
            },
        );
        rows.push(Row {
            case: format!("{label}, {} written", pattern.label()),
            detail: String::new(),
            pair,
        });
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn summary(rows: &[Row], threads: &[Row], load_before: &str) {
    println!(
        "\nEngine round cost: 1 GiB private anonymous, populated, THP off; medians of alternating \
         pairs (load average {load_before} before, {} after)",
        load()
    );
    println!(
        "| case | engine | raw loop | engine/raw, wall (median of pair ratios) | engine/raw, \
         thread CPU time | pairs | one round |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {} |",
            r.case,
            ms(r.pair.median_a()),
            ms(r.pair.median_b()),
            r.pair.ratio(),
            r.pair
                .cpu_ratio()
                .map_or("(rounds too short)".to_string(), |r| format!("{r:.3}")),
            r.pair.a.len(),
            r.detail
        );
    }
    println!("\nRound over 2 threads against 1 (ScanOptions::threads), alternating pairs");
    println!("| range, written | 1 thread | 2 threads | 2 threads / 1 thread | pairs |");
    println!("|---|---|---|---|---|");
    for r in threads {
        println!(
            "| {} | {} | {} | {:.3} | {} |",
            r.case,
            ms(r.pair.median_b()),
            ms(r.pair.median_a()),
            r.pair.ratio(),
            r.pair.a.len()
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let load_before = load();
    let mut rows = Vec::new();
    let mut threads = Vec::new();
    match Bed::new(GIB) {
        Ok(Some(bed)) => {
            let bed = RefCell::new(bed);
            engine_vs_raw(&mut c, &bed, &mut rows, &mut threads);
        }
        Ok(None) => return,
        Err(e) => {
            eprintln!("SKIP: round bench: cannot set up 1 GiB: {e}");
            return;
        }
    }
    if std::env::var("PRECOPY_BENCH_8G").as_deref() != Ok("0") {
        threads_big(8 * GIB, "8 GiB", &mut threads);
    }
    c.final_summary();
    summary(&rows, &threads, &load_before);
}
